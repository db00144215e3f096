"""The stage machinery shared by every stage (normalize, generate, score, teacher, align, build).

A stage declares its *parts* (independently invalidated slices: one per source for generate, one
per (mode, source) for teacher) and, for each part, the config it depends on (`deps`). The part's
hash covers its deps and the hashes of the upstream parts it reads, so the whole plan — every
part's hash in every stage — follows from the config alone. At start-up any stored part whose hash
differs from the plan is removed, with a line saying why; everything downstream of it changes hash
too and goes with it.

Records are split into shards once, by the normalize stage (`prep.shard_size` records each, in
input order); every later stage keeps that partition, so shard i of every stage covers the same
records and its content does not depend on how many processes ran. Shard i of a part goes to rank
(group_index * n_shards + i) % world, where parts that share a model form one group.

No stage-specific logic lives here, and it never writes or removes anything outside RUN_DIR/prep/.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from profuser.config import ModelConfig, RunConfig
from profuser.prep.dist import Dist
from profuser.prep.shards import (REJECTS, StageDir, atomic_write_text, diff_deps, fingerprint, library_versions,
                                  shard_name, stable_hash)


class PrepError(RuntimeError):
    pass


@dataclass
class Context:
    cfg: RunConfig
    dist: Dist
    plan: dict  # stage -> part -> {"hash": str, "deps": dict}
    loader: Callable  # ModelConfig -> ChatModel (with .model loaded)
    stats: Any = None  # profuser.prep.stats.StatsLogger on rank 0
    cache: dict = field(default_factory=dict)  # per-process memo (e.g. the normalized data)

    @property
    def prep_dir(self) -> Path:
        return Path(self.cfg.run_dir) / "prep"

    def stage_dir(self, name: str) -> StageDir:
        return StageDir(self.prep_dir, name)

    def say(self, msg: str) -> None:
        """A line on stdout from rank 0."""
        if self.dist.is_main:
            print(f"[prep] {msg}", flush=True)

    def log(self, msg: str) -> None:
        """A line on stdout from every rank (tagged with the rank when there are several)."""
        print(f"[prep] {self.dist.tag()}{msg}", flush=True)


class Stage:
    """Base class. Subclasses set `name`, `needs`, and implement `parts` and `run`."""

    name: str = ""
    needs: tuple[str, ...] = ()

    def parts(self, cfg: RunConfig, plan: dict) -> dict[str, dict]:
        """part -> deps (JSON-able). `plan` holds the hashes of the stages before this one."""
        raise NotImplementedError

    def group(self, part: str) -> str:
        """Parts of one group share a model and are given to ranks together."""
        return part

    def n_shards(self, ctx: Context) -> int:
        m = ctx.stage_dir("normalize").manifest()
        return m["n_shards"]

    def run(self, ctx: Context, todo: dict[str, list[int]]) -> None:
        """Compute and `commit` the listed (part -> shard indices) of this rank."""
        raise NotImplementedError

    def finalize(self, ctx: Context, stage_dir: StageDir, parts: dict, rejects: list[dict]) -> dict:
        """Rank 0, once every shard is done: extra manifest fields (may append global rejects)."""
        return {}


# --------------------------------------------------------------------------------------------
# the plan


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".onnx")


def model_deps(m: ModelConfig, weights: bool = True) -> dict:
    """What a model contributes to a stage's hash: where it is, how it is read, and its files'
    content (not their modification times). `weights=False` for a stage that reads only the
    tokenizer and template: then changing the weights does not invalidate it."""
    return {
        "path": str(Path(m.path).resolve()),
        "files": fingerprint(m.path, skip_suffixes=() if weights else WEIGHT_SUFFIXES),
        "tokenizer": m.tokenizer and str(Path(m.tokenizer).resolve()),
        "tokenizer_files": m.tokenizer and fingerprint(m.tokenizer),
        "chat_template": m.chat_template,
        "dtype": m.dtype,
        "trust_remote_code": m.trust_remote_code,
    }


def upstream_hashes(plan: dict, *stages: str) -> dict:
    """The hashes of every part of `stages`, to put in a part's deps ({"stage/part": hash})."""
    return {f"{stage}/{p}": v["hash"] for stage in stages for p, v in plan[stage].items()}


def make_plan(cfg: RunConfig, stages: list[Stage]) -> dict:
    plan: dict = {}
    for st in stages:
        plan[st.name] = {p: {"hash": stable_hash(deps), "deps": deps} for p, deps in st.parts(cfg, plan).items()}
    return plan


def _hashes(d: Optional[dict]) -> dict:
    return {p: v["hash"] for p, v in (d or {}).items()}


def is_complete(stage_dir: StageDir, want: dict) -> bool:
    m = stage_dir.manifest()
    return bool(m) and m.get("status") == "complete" and _hashes(m.get("parts")) == _hashes(want)


def invalidate_stale(ctx: Context, stages: list[Stage]) -> list[str]:
    """Rank 0: remove every stored part whose hash is not the plan's; say which and why."""
    removed = []
    for st in stages:
        stage_dir = ctx.stage_dir(st.name)
        man = stage_dir.manifest()
        if man is None:
            if stage_dir.root.exists() and any(stage_dir.root.iterdir()):
                ctx.say(f"{st.name}: output without a manifest (killed before it started?) — removing it")
                shutil.rmtree(stage_dir.root)
            continue
        want = ctx.plan[st.name]
        changed = False
        for part, old in list(man.get("parts", {}).items()):
            new = want.get(part)
            if new is not None and new["hash"] == old["hash"]:
                continue
            why = diff_deps(old.get("deps", {}), new["deps"]) if new else ["no longer configured"]
            shown = "; ".join(why[:4]) + (f"; and {len(why) - 4} more" if len(why) > 4 else "")
            ctx.say(f"{st.name}/{part}: INVALIDATED — config it depends on changed ({shown}); removing its output")
            stage_dir.remove_part(part)
            del man["parts"][part]
            removed.append(f"{st.name}/{part}")
            changed = True
        if changed:
            man["status"] = "running"
            stage_dir.remove_derived()
            stage_dir.write_manifest(man)
    return removed


def verify_outputs(ctx: Context, stages: list[Stage]) -> list[str]:
    """Rank 0: check every finished shard against its sidecar (size, row count, sha256); remove a
    damaged one (named in a message) so that its stage redoes it. Shards are deterministic, so the
    redone shard equals the lost one and nothing downstream is invalidated."""
    damaged = []
    for st in stages:
        stage_dir = ctx.stage_dir(st.name)
        man = stage_dir.manifest()
        if not man:
            continue
        bad_here = []
        for part in man.get("parts", {}):
            for i in range(man.get("n_shards") or 0):
                if not stage_dir.sidecar_path(part, i).exists():
                    continue
                why = stage_dir.verify_shard(part, i)
                if why:
                    ctx.say(f"{st.name}: {stage_dir.shard_path(part, i)} is damaged ({why}) — redoing it")
                    stage_dir.remove_shard(part, i)
                    bad_here.append(f"{st.name}/{part}/{shard_name(i)}")
        if bad_here:
            damaged += bad_here
            man["status"] = "running"
            stage_dir.remove_derived()
            stage_dir.write_manifest(man)
    return damaged


def _require_rows(stage_dir: StageDir) -> None:
    """A complete stage that kept no row at all stops the run, with the rejects' top reasons."""
    c = (stage_dir.manifest() or {}).get("counts") or {}
    if c and not c.get("out"):
        reasons = ", ".join(f"{k}: {v}" for k, v in list((c.get("reasons") or {}).items())[:5]) or "no input records"
        raise PrepError(f"stage {stage_dir.stage!r} produced no usable rows ({c.get('in', 0)} in, {c.get('rejected', 0)} "
                        f"rejected: {reasons}); see {stage_dir.root / REJECTS}")


# --------------------------------------------------------------------------------------------
# running one stage


def owner(groups: list[str], group: str, i: int, n_shards: int, world: int) -> int:
    return (groups.index(group) * n_shards + i) % world


def run_stage(ctx: Context, stage: Stage) -> bool:
    """Run `stage` on this rank's unfinished shards; rank 0 then writes the manifest. Returns
    False when the stage was already complete for this config."""
    stage_dir = ctx.stage_dir(stage.name)
    want = ctx.plan[stage.name]
    if is_complete(stage_dir, want):
        c = stage_dir.manifest().get("counts", {})
        ctx.say(f"{stage.name}: already complete for this config ({_count_line(c)}); skipping")
        _require_rows(stage_dir)
        return False
    for need in stage.needs:
        if not is_complete(ctx.stage_dir(need), ctx.plan[need]):
            raise PrepError(f"stage {stage.name!r} needs {need!r} to be complete for this config; run "
                            f"`profuser prep CONFIG --stage {need}` first (or run all stages without --stage)")
    n = stage.n_shards(ctx)
    if ctx.dist.is_main:
        stage_dir.clean_tmp()
        stage_dir.write_manifest({"stage": stage.name, "status": "running", "n_shards": n, "parts": dict(want)})
    ctx.dist.barrier()

    groups = list(dict.fromkeys(stage.group(p) for p in want))
    todo: dict[str, list[int]] = {}
    for part in want:
        my_shards = [i for i in range(n) if owner(groups, stage.group(part), i, n, ctx.dist.world) == ctx.dist.rank]
        done = [i for i in my_shards if stage_dir.is_done(part, i)]
        if done:
            ctx.log(f"{stage.name}/{part}: {len(done)} of {len(my_shards)} shards already done; skipping them "
                    f"({', '.join(shard_name(i) for i in done[:6])}{' ...' if len(done) > 6 else ''})")
        todo[part] = [i for i in my_shards if i not in done]
    t0 = time.time()
    stage.run(ctx, {p: s for p, s in todo.items() if s})
    ctx.dist.barrier()
    if ctx.dist.is_main:
        _finalize(ctx, stage, stage_dir, n, time.time() - t0)
    ctx.dist.barrier()
    _require_rows(stage_dir)
    return True


def _merge_counts(infos: list[dict]) -> dict:
    out = {"in": 0, "out": 0, "rejected": 0}
    reasons: Counter = Counter()
    for info in infos:
        for k in out:
            out[k] += info.get(k, 0)
        reasons.update(info.get("reasons", {}))
    out["reasons"] = dict(reasons.most_common())
    return out


def _count_line(c: dict) -> str:
    if not c:
        return "no counts"
    line = f"{c.get('in', 0)} in, {c.get('out', 0)} out, {c.get('rejected', 0)} rejected"
    if c.get("reasons"):
        line += " (" + ", ".join(f"{k}: {v}" for k, v in c["reasons"].items()) + ")"
    return line


def _finalize(ctx: Context, stage: Stage, stage_dir: StageDir, n: int, seconds: float) -> None:
    want = ctx.plan[stage.name]
    parts, rejects = {}, []
    for part, v in want.items():
        infos = []
        for i in range(n):
            if not stage_dir.is_done(part, i):
                raise PrepError(f"{stage.name}/{part}: {shard_name(i)} is missing after every rank finished")
            info = stage_dir.sidecar(part, i)
            infos.append(info)
            rejects += [{"stage": stage.name, "part": part, "shard": i, **r} for r in info.get("rejects", [])]
        parts[part] = {"hash": v["hash"], "deps": v["deps"], "shards": [f"{shard_name(i)}.parquet" for i in range(n)],
                       "counts": _merge_counts(infos),
                       "seconds": round(sum(i.get("seconds", 0.0) for i in infos), 3),
                       "tokens": sum(i.get("tokens", 0) for i in infos)}
    extra = stage.finalize(ctx, stage_dir, parts, rejects)
    atomic_write_text(stage_dir.root / REJECTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    counts = extra.pop("counts", None) or _merge_counts([p["counts"] for p in parts.values()])
    stage_dir.write_manifest({"stage": stage.name, "status": "complete", "n_shards": n, "parts": parts, "counts": counts,
                              **extra, "world_size": ctx.dist.world, "wall_seconds": round(seconds, 3),
                              "versions": library_versions()})
    ctx.say(f"{stage.name}: done in {seconds:.1f}s — {_count_line(counts)}; rejects in {stage_dir.root / REJECTS}")
    if len(parts) > 1:
        for p, v in parts.items():
            ctx.say(f"  {stage.name}/{p}: {_count_line(v['counts'])}")


def sidecar_info(n_in: int, rows: int, rejects: list[dict], seconds: float, tokens: int = 0, **extra) -> dict:
    """The counts every shard sidecar carries: in = out + rejected (records); `reasons` counts every
    reject line by kind (a score-stage line may drop one candidate without losing the record)."""
    reasons = Counter(r["kind"] for r in rejects)
    return {"in": n_in, "out": rows, "rejected": n_in - rows, "reasons": dict(reasons), "rejects": rejects,
            "seconds": round(seconds, 3), "tokens": tokens, **extra}


def read_records(ctx: Context, i: int) -> list[dict]:
    """The canonical records of shard i (from the normalize stage), in shard order."""
    rows = ctx.stage_dir("normalize").read("records", i).to_pylist()
    for r in rows:
        r["meta"] = json.loads(r["meta"])
    return rows


class Progress:
    """A tqdm bar over records with the token rate in its postfix (one per rank)."""

    def __init__(self, ctx: Context, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=f"{ctx.dist.tag()}{desc}", unit="rec", mininterval=1.0, dynamic_ncols=True,
                        position=ctx.dist.local_rank if ctx.dist.world > 1 else None, leave=True)
        self.tokens, self.t0 = 0, time.time()

    def update(self, records: int, tokens: int) -> None:
        self.tokens += tokens
        if self.tokens:
            self.bar.set_postfix_str(f"{self.tokens / max(time.time() - self.t0, 1e-9):.0f} tok/s", refresh=False)
        self.bar.update(records)

    def close(self) -> None:
        self.bar.close()


def free_memory() -> None:
    """Drop a model's memory before the next one loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
