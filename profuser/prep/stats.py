"""Prep statistics: per-source score, CE and bits-per-byte distributions and the teacher table per mode.

Written to run_dir/prep/stats.json and, when W&B is enabled, logged to a `prep` run (offline
unless an API key is configured; `wandb sync` uploads it later).

Reads the stage outputs only; it never changes them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from profuser.config import wandb_mode
from profuser.constants import PREP_MODES
from profuser.prep.shards import atomic_write_json


def collect_stats(ctx, selection: dict) -> dict:
    """Score distributions per scorer and source, CE (nats per own token) and bits per byte of the
    response text per mode and source, and the teachers of each mode: `selection` is the align
    stage's {mode: {source: {"first": first-choice count, "taught": samples it teaches}}}."""
    import math

    cfg = ctx.cfg
    sources = [m.name for m in cfg.sources]
    scorers = [s.name for s in cfg.scorers]
    n = ctx.stage_dir("normalize").manifest()["n_shards"]
    scores = {sc: {s: [] for s in sources} for sc in scorers}
    ce = {m: {s: [] for s in sources} for m in PREP_MODES}
    bpb = {m: {s: [] for s in sources} for m in PREP_MODES}
    score_dir, teacher_dir = ctx.stage_dir("score"), ctx.stage_dir("teacher")
    for i in range(n):
        for row in score_dir.read("scores", i).to_pylist():
            for j, src in enumerate(row["sources"]):
                for sc in scorers:
                    scores[sc][src].append(row[f"score_{sc}"][j])
        for m in PREP_MODES:
            for s in sources:
                t = teacher_dir.read(f"{m}/{s}", i, ["ce", "text_nll", "text_bytes"]).to_pydict()
                ce[m][s] += t["ce"]
                bpb[m][s] += [a / (math.log(2) * b) for a, b in zip(t["text_nll"], t["text_bytes"]) if b]
    win = {}
    for m in PREP_MODES:
        per = selection.get(m, {})
        total = sum(c["taught"] for c in per.values())
        firsts = sum(c["first"] for c in per.values())
        win[m] = {s: {"wins": per.get(s, {}).get("taught", 0),
                      "share": per.get(s, {}).get("taught", 0) / total if total else 0.0,
                      "first_choice": per.get(s, {}).get("first", 0),
                      "first_choice_share": per.get(s, {}).get("first", 0) / firsts if firsts else 0.0}
                  for s in sources}
    counts = {st: (ctx.stage_dir(st).manifest() or {}).get("counts") for st in ("normalize", "generate", "score")}
    return {"sources": sources, "scores": scores, "ce": ce, "bpb": bpb, "win_rate": win, "counts": counts,
            "mince": cfg.prep.mince}


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "p10": float(np.percentile(a, 10)), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "max": float(a.max())}


def summarize(stats: dict) -> dict:
    return {
        "scores": {sc: {s: _summary(v) for s, v in per.items()} for sc, per in stats["scores"].items()},
        "ce": {m: {s: _summary(v) for s, v in per.items()} for m, per in stats["ce"].items()},
        "bpb": {m: {s: _summary(v) for s, v in per.items()} for m, per in stats["bpb"].items()},
        "win_rate": stats["win_rate"],
        "mince": stats["mince"],
        "counts": stats["counts"],
    }


def start_prep_run(cfg, suffix: str):
    """A W&B run `<run_dir name>-<suffix>` (job type prep) for prep statistics, or None when W&B is
    disabled; offline unless an API key is configured."""
    mode = wandb_mode(cfg.wandb)
    if mode == "disabled":
        return None
    import wandb

    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, dir=cfg.run_dir, mode=mode,
                      name=f"{Path(cfg.run_dir).name}-{suffix}", job_type="prep", tags=list(cfg.wandb.tags),
                      config=cfg.to_dict())


def log_stats(ctx, stats: dict) -> Optional[str]:
    """stats.json always; a W&B run when enabled. Returns the W&B run directory (or None)."""
    cfg = ctx.cfg
    summary = summarize(stats)
    atomic_write_json(ctx.prep_dir / "stats.json", summary)
    run = start_prep_run(cfg, "prep")
    if run is None:
        return None
    import wandb

    data = {}
    for sc, per in stats["scores"].items():
        for s, v in per.items():
            if v:
                data[f"prep/score/{sc}/{s}"] = wandb.Histogram(v)
    for key in ("ce", "bpb"):
        for m, per in stats[key].items():
            for s, v in per.items():
                if v:
                    data[f"prep/{key}/{m}/{s}"] = wandb.Histogram(v)
    rows = [[m, s, r["wins"], r["share"], r["first_choice"], r["first_choice_share"]]
            for m, per in stats["win_rate"].items() for s, r in per.items()]
    data["prep/win_rate"] = wandb.Table(columns=["mode", "source", "teaches", "share", "first_choice",
                                                 "first_choice_share"], data=rows)
    run.log(data)
    flat = {}
    for key in ("ce", "bpb"):
        for m, per in summary[key].items():
            for s, v in per.items():
                if v.get("n"):
                    flat[f"prep/{key}_mean/{m}/{s}"] = v["mean"]
    for sc, per in summary["scores"].items():
        for s, v in per.items():
            if v.get("n"):
                flat[f"prep/score_mean/{sc}/{s}"] = v["mean"]
    for m, per in stats["win_rate"].items():
        for s, r in per.items():
            flat[f"prep/win_share/{m}/{s}"] = r["share"]
    run.summary.update(flat)
    where = run.dir
    run.finish()
    ctx.say(f"prep statistics logged to W&B ({wandb_mode(cfg.wandb)}); stats also in {ctx.prep_dir / 'stats.json'}")
    return where
