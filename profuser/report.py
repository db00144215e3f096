"""`profuser report RUN_DIR...`: the dashboard's figures as PNG + a Markdown summary, from the run
directories alone (for runs without a W&B account).

One run: reads what the stages write: prep/stats.json and the score/teacher shards (distributions,
win rates), every training output's metrics.jsonl (RUN_DIR/train*/metrics.jsonl: loss parts per
mode, schedule weights, teacher shares), and eval results (RUN_DIR/eval/*/results.json).

Several runs (several RUN_DIRs, or a directory holding run directories such as a demo's seed-N/):
the models evaluated in them side by side — every scorer's mean and the CE per model, overall and
per skill, as mean ± sample standard deviation over the runs that evaluated the model, drawn as
bars with error bars — and the teacher share of each source per mode (and skill) from each run's
training set, averaged over the runs.

Reads run directories only: it never writes into a stage's or a training run's outputs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from profuser.constants import MODES


def read_metrics(path: Path) -> list[dict]:
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r for r in rows if "loss" in r]  # training-step logs (not the final summary line)


def training_runs(run_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for p in sorted(run_dir.glob("train*/metrics.jsonl")):
        rows = read_metrics(p)
        if rows:
            out[p.parent.name] = rows
    return out


def _series(rows: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _figure(n: int, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.8), squeeze=False)
    fig.suptitle(title)
    return fig, axes[0]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_training(runs: dict[str, list[dict]], out: Path) -> list[Path]:
    paths = []
    fig, axes = _figure(3, "Loss parts per mode (per label token)")
    for name, rows in runs.items():
        axes[0].plot(*_series(rows, "loss"), label=name)
        for m in MODES:
            for part, ax in (("ce", axes[1]), ("kd", axes[2])):
                xs, ys = _series(rows, f"{m}/{part}")
                if xs:
                    ax.plot(xs, ys, label=f"{name} {m}", linestyle="-" if m == "training" else "--")
    for ax, t in zip(axes, ("total loss", "CE", "distillation D")):
        ax.set_title(t)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    paths.append(_save(fig, out / "loss_parts.png"))

    fig, axes = _figure(1, "Schedule: mode weights")
    for name, rows in runs.items():
        for key, style in (("w_inf", "--"), ("w_train", "-")):
            axes[0].plot(*_series(rows, key), style, label=f"{name} {key}")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    paths.append(_save(fig, out / "schedule.png"))

    fig, axes = _figure(len(MODES), "Share of samples whose teacher is each source")
    for ax, m in zip(axes, MODES):
        for name, rows in runs.items():
            keys = sorted({k for r in rows for k in r if k.startswith(f"teacher_share/{m}/")})
            for k in keys:
                ax.plot(*_series(rows, k), label=f"{name}: {k.rsplit('/', 1)[1]}")
        ax.set_title(f"{m} mode")
        ax.set_xlabel("step")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
    paths.append(_save(fig, out / "teacher_share.png"))
    return paths


def prep_distributions(run_dir: Path, stats: Optional[dict]) -> Optional[dict]:
    """Raw per-source values: {"scores": {scorer: {source: [..]}}, "ce": {mode: {source: [..]}}}."""
    from profuser.prep.read import part_table
    from profuser.selection import bits_per_byte

    if stats is None or not (run_dir / "prep" / "teacher" / "manifest.json").exists():
        return None
    sources = list(dict.fromkeys(s for per in stats.get("ce", {}).values() for s in per))
    scorers = list(stats.get("scores", {}))
    out: dict = {"scores": {}, "ce": {}, "bpb": {}}
    try:
        t = part_table(run_dir, "score", "scores").to_pylist()
        for sc in scorers:
            per = {s: [] for s in sources}
            for row in t:
                for j, s in enumerate(row["sources"]):
                    v = row[f"score_{sc}"][j]
                    if v is not None:
                        per[s].append(v)
            out["scores"][sc] = per
    except (FileNotFoundError, KeyError):
        pass
    for m in MODES:
        out["ce"][m], out["bpb"][m] = {}, {}
        for s in sources:
            try:
                t = part_table(run_dir, "teacher", f"{m}/{s}", ["ce", "text_nll", "text_bytes"]).to_pydict()
            except (FileNotFoundError, KeyError):
                t = {"ce": [], "text_nll": [], "text_bytes": []}
            out["ce"][m][s] = [x for x in t["ce"] if x is not None]
            out["bpb"][m][s] = [bits_per_byte(a, b) for a, b in zip(t["text_nll"], t["text_bytes"]) if b]
    return out


def plot_prep(dist: dict, stats: Optional[dict], out: Path) -> list[Path]:
    paths = []
    panels = [("score", sc, per) for sc, per in dist["scores"].items()] + \
             [("CE nats/token", m, per) for m, per in dist["ce"].items() if any(per.values())] + \
             [("bits/byte", m, per) for m, per in dist.get("bpb", {}).items() if any(per.values())]
    if panels:
        fig, axes = _figure(len(panels), "Per-source distributions")
        for ax, (kind, name, per) in zip(axes, panels):
            data = [v for v in per.values()]
            ax.boxplot([d if d else [float("nan")] for d in data], tick_labels=list(per), showmeans=True)
            ax.set_title(f"{kind}: {name}")
            ax.tick_params(axis="x", labelrotation=20, labelsize=7)
        paths.append(_save(fig, out / "prep_distributions.png"))
    if stats and stats.get("win_rate"):
        wr = stats["win_rate"]
        fig, axes = _figure(1, "Teacher per mode (share of samples each source teaches, after fallbacks)")
        srcs = sorted({s for per in wr.values() for s in per})
        width = 0.8 / max(1, len(wr))
        for i, (m, per) in enumerate(sorted(wr.items())):
            axes[0].bar([j + i * width for j in range(len(srcs))], [per.get(s, {}).get("share", 0) for s in srcs],
                        width, label=m)
        axes[0].set_xticks([j + width * (len(wr) - 1) / 2 for j in range(len(srcs))], srcs, fontsize=8)
        axes[0].set_ylim(0, 1)
        axes[0].legend()
        paths.append(_save(fig, out / "win_rate.png"))
    return paths


def _table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def write_report(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    out = Path(out) if out else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# ProFuser report: {run_dir.name}", ""]
    images: list[Path] = []

    stats_path = run_dir / "prep" / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    dist = prep_distributions(run_dir, stats)
    if stats or dist:
        md += ["## Data prep", ""]
        if stats and stats.get("counts"):
            rows = [[st, c.get("rows", c.get("in", "")), c.get("accepted", c.get("out", "")), c.get("rejected", "")]
                    for st, c in stats["counts"].items() if c]
            md += [_table(["stage", "in", "kept", "rejected"], rows), ""]
        if stats and stats.get("win_rate"):
            srcs = sorted({s for per in stats["win_rate"].values() for s in per})
            cell = lambda r: f"{r.get('share', 0):.1%} ({r.get('first_choice_share', r.get('share', 0)):.1%})"  # noqa: E731
            rows = [[m] + [cell(per.get(s, {})) for s in srcs] for m, per in stats["win_rate"].items()]
            md += [f"Share of samples each source teaches (in brackets: first choice, before fallbacks; training "
                   f"mode chosen by MinCE per {stats.get('mince', 'token')}):", "", _table(["mode"] + srcs, rows), ""]
        if stats and stats.get("ce"):
            bpb = stats.get("bpb", {})
            rows = [[m, s, v.get("mean", float("nan")), bpb.get(m, {}).get(s, {}).get("mean", float("nan")),
                     v.get("n", 0)] for m, per in stats["ce"].items() for s, v in per.items() if v.get("n")]
            md += ["Teacher-forced cross-entropy per source:", "",
                   _table(["mode", "source", "nats per own token (mean)", "bits per byte of text (mean)", "n"], rows), ""]
        images += plot_prep(dist or {"scores": {}, "ce": {}, "bpb": {}}, stats, out)

    runs = training_runs(run_dir)
    if runs:
        md += ["## Training", ""]
        rows = []
        for name, r in runs.items():
            first, last = r[0], r[-1]
            rows.append([name, last["step"], first["loss"], last["loss"], last.get("w_inf", ""), last.get("w_train", ""),
                         last.get("tokens_per_second", "")])
        md += [_table(["run", "steps", "first loss", "last loss", "w_inf (last)", "w_train (last)", "tokens/s"], rows), ""]
        images += plot_training(runs, out)

    evals = sorted((run_dir / "eval").glob("*/results.json")) if (run_dir / "eval").is_dir() else []
    if evals:
        md += ["## Evaluation (held-out)", ""]
        res = [json.loads(p.read_text()) for p in evals]
        scorers = sorted({k for r in res for k in r["scores"]})
        srcs = sorted({k for r in res for k in r["win_rate"]})
        rows = [[r["model"], r["ce"], r["perplexity"]] + [r["scores"].get(s, "") for s in scorers] +
                [r["win_rate"].get(s, "") for s in srcs] for r in res]
        md += [_table(["model", "CE", "ppl"] + scorers + [f"win vs {s}" for s in srcs], rows), ""]

    if not (stats or dist or runs or evals):
        raise FileNotFoundError(f"{run_dir}: nothing to report (no prep/stats.json, train*/metrics.jsonl or eval results)")
    md += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in images]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# several runs side by side


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "prep").is_dir() or (path / "eval").is_dir() or
                              any(path.glob("train*/metrics.jsonl")))


def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Each path that is a run directory, else the run directories directly inside it (sorted)."""
    out = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"run directory {str(p)!r} does not exist")
        inner = [] if is_run_dir(p) else sorted(d for d in p.iterdir() if is_run_dir(d))
        if not is_run_dir(p) and not inner:
            raise FileNotFoundError(f"{p}: nothing to report (neither a run directory nor a folder of run directories)")
        out += [p] if is_run_dir(p) else inner
    return list(dict.fromkeys(out))


def mean_sd(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (n - 1), n); sd is 0 for a single value; NaNs are left out."""
    import numpy as np

    a = np.asarray([v for v in values if v == v], dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan"), 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size)


def teacher_shares(run_dir: str | Path, sources: Optional[list[str]] = None) -> dict:
    """{mode: {group: {source: share}}}: who teaches each sample of the training set (the build
    output's `{mode}_teacher`, i.e. after fallbacks); group = the record's `skill` (its meta) or "all".
    Sources from prep/stats.json unless given. {} when the run has no training set."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from collections import Counter, defaultdict

    run_dir = Path(run_dir)
    files = sorted((run_dir / "prep" / "build").glob("*.parquet"))
    if not files:
        return {}
    if sources is None:
        stats = run_dir / "prep" / "stats.json"
        sources = list(json.loads(stats.read_text()).get("win_rate", {}).get("training", {})) or None \
            if stats.exists() else None  # config order
    cols = ["id", "meta", "training_teacher", "inference_teacher"]
    table = pa.concat_tables([pq.read_table(f, columns=cols) for f in files])
    counts: dict = defaultdict(lambda: defaultdict(Counter))
    for row in table.to_pylist():
        meta = json.loads(row["meta"] or "{}") if isinstance(row["meta"], str) else (row["meta"] or {})
        group = str(meta.get("skill", "all"))
        for m in MODES:
            if row[f"{m}_teacher"] is not None:
                counts[m][group][row[f"{m}_teacher"]] += 1
    names = sources or sorted({s for per in counts.values() for c in per.values() for s in c})
    return {m: {g: {s: c[s] / sum(c.values()) for s in names} for g, c in sorted(per.items())}
            for m, per in counts.items()}


def compare_runs(run_dirs: list[Path]) -> dict:
    """Every evaluated model across the runs: {"models": {name: {"runs": [...], "overall": {metric:
    [value per run]}, "by_skill": {skill: {metric: [...]}}}}, "metrics": [...], "skills": [...],
    "teacher_share": {"per_run": {run: shares}, "mean": {mode: {group: {source: mean}}}}}.
    Metrics: "ce" and every scorer's mean (for exact_match, the accuracy)."""
    models: dict = {}
    metrics: list[str] = ["ce"]
    skills: list[str] = []
    for rd in run_dirs:
        for p in sorted((rd / "eval").glob("*/results.json")) if (rd / "eval").is_dir() else []:
            r = json.loads(p.read_text())
            m = models.setdefault(r["model"], {"runs": [], "overall": {}, "by_skill": {}})
            m["runs"].append(rd.name)
            vals = {"ce": r["ce"], **r.get("scores", {})}
            for k, v in vals.items():
                m["overall"].setdefault(k, []).append(v)
                if k not in metrics:
                    metrics.append(k)
            for sk, b in (r.get("by_skill") or {}).items():
                if sk not in skills:
                    skills.append(sk)
                for k, v in {"ce": b["ce"], **b.get("scores", {})}.items():
                    m["by_skill"].setdefault(sk, {}).setdefault(k, []).append(v)
    per_run = {rd.name: teacher_shares(rd) for rd in run_dirs}
    mean: dict = {}
    for shares in per_run.values():
        for mode, per in shares.items():
            for g, by_src in per.items():
                for s, v in by_src.items():
                    mean.setdefault(mode, {}).setdefault(g, {}).setdefault(s, []).append(v)
    mean = {mode: {g: {s: mean_sd(v)[0] for s, v in by.items()} for g, by in per.items()} for mode, per in mean.items()}
    # a single "all" skill is no breakdown
    if skills == ["all"]:
        skills = []
    return {"runs": [str(r) for r in run_dirs], "models": models, "metrics": metrics, "skills": skills,
            "teacher_share": {"per_run": per_run, "mean": mean}}


def _pm(values: list[float], fmt: str = "{:.3f}") -> str:
    mu, sd, n = mean_sd(values)
    if n == 0:
        return ""
    return fmt.format(mu) + (f" ± {fmt.format(sd)}" if n > 1 else "") + f" (n={n})"


def plot_comparison(cmp: dict, out: Path) -> list[Path]:
    import numpy as np

    paths = []
    names = list(cmp["models"])
    groups = ["overall", *cmp["skills"]]
    for metric in cmp["metrics"]:
        fig, axes = _figure(1, f"{metric}: mean ± sd over runs" + (" (lower is better)" if metric == "ce" else ""))
        ax = axes[0]
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            m = cmp["models"][name]
            stats = [mean_sd(m["overall"].get(metric, []) if g == "overall" else m["by_skill"].get(g, {}).get(metric, []))
                     for g in groups]
            xs = np.arange(len(groups)) + i * width
            ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3,
                   label=f"{name} (n={max(s[2] for s in stats)})")
        ax.set_xticks(np.arange(len(groups)) + width * (len(names) - 1) / 2, groups)
        ax.legend(fontsize=7, ncol=2)
        paths.append(_save(fig, out / f"compare_{metric}.png"))
    share = cmp["teacher_share"]["mean"]
    if share:
        modes = [m for m in MODES if m in share]
        fig, axes = _figure(len(modes), "Teacher share per mode (mean over runs; after fallbacks)")
        for ax, mode in zip(axes, modes):
            per = share[mode]
            gs = list(per)
            srcs = list(dict.fromkeys(s for g in gs for s in per[g]))
            width = 0.8 / max(1, len(srcs))
            for j, s in enumerate(srcs):
                ax.bar(np.arange(len(gs)) + j * width, [per[g].get(s, 0.0) for g in gs], width, label=s)
            ax.set_xticks(np.arange(len(gs)) + width * (len(srcs) - 1) / 2, gs)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{mode} mode")
            ax.legend(fontsize=7)
        paths.append(_save(fig, out / "compare_teacher_share.png"))
    return paths


def write_comparison(paths: list[str | Path], out: Optional[str | Path] = None) -> Path:
    """The side-by-side report of several runs (or a folder of runs) to `out` (default: the folder's
    report/ when one folder was given, else ./profuser-report)."""
    run_dirs = expand_run_dirs(paths)
    if out is None:
        out = Path(paths[0]) / "report" if len(paths) == 1 else Path("profuser-report")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cmp = compare_runs(run_dirs)
    if not cmp["models"] and not cmp["teacher_share"]["mean"]:
        raise FileNotFoundError(f"{', '.join(map(str, paths))}: nothing to compare (no eval/*/results.json, no training set)")
    md = [f"# ProFuser runs side by side ({len(run_dirs)} runs)", "", "Runs: " + ", ".join(f"`{r}`" for r in cmp["runs"]),
          "", "Mean ± sample standard deviation over the runs that evaluated each model (n = how many).", ""]
    for metric in cmp["metrics"]:
        md += [f"## {metric}" + (" (nats per token on the references; lower is better)" if metric == "ce" else ""), ""]
        rows = [[name, _pm(m["overall"].get(metric, []))] +
                [_pm(m["by_skill"].get(sk, {}).get(metric, [])) for sk in cmp["skills"]]
                for name, m in cmp["models"].items()]
        md += [_table(["model", "overall", *cmp["skills"]], rows), ""]
    share = cmp["teacher_share"]["mean"]
    if share:
        md += ["## Teacher share per mode", "", "Share of training samples each source teaches (the training set's "
               "teacher, after fallbacks), mean over runs:", ""]
        srcs = list(dict.fromkeys(s for per in share.values() for g in per.values() for s in g))
        rows = [[mode, g] + [f"{per[g].get(s, 0.0):.1%}" for s in srcs] for mode, per in share.items() for g in per]
        md += [_table(["mode", "group", *srcs], rows), ""]
    images = plot_comparison(cmp, out)
    md += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in images]
    reports = [rd / "report" / "report.md" for rd in run_dirs if (rd / "report" / "report.md").exists()]
    if reports:
        md += ["", "Per-run reports: " + ", ".join(f"[{p.parent.parent.name}]({os.path.relpath(p, out)})" for p in reports)]
    (out / "compare.json").write_text(json.dumps(cmp, indent=1))
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def cmd_report(args) -> int:
    import sys

    dirs = list(args.run_dir)
    try:
        single = len(dirs) == 1 and is_run_dir(Path(dirs[0]))
        path = write_report(dirs[0], args.out) if single else write_comparison(dirs, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report written to {path} (figures beside it)")
    return 0
