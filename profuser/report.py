"""`profuser report RUN_DIR`: the dashboard's figures as PNG + a Markdown summary, from the run
directory alone (for runs without a W&B account).

Reads what the stages write: prep/stats.json and the score/teacher shards (distributions, win
rates), every training output's metrics.jsonl (RUN_DIR/train*/metrics.jsonl: loss parts per mode,
schedule weights, teacher shares), and eval results (RUN_DIR/eval/*/results.json).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

MODES = ("inference", "training")


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


def cmd_report(args) -> int:
    import sys

    try:
        path = write_report(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report written to {path} (figures beside it)")
    return 0
