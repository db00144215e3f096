"""`profuser demo [--out DIR] [--seeds N]`: the whole system on a CPU, built like the situation
fusion is for, every number measured by the run. It must never write outside --out, and never show a
number that this run did not measure.

Design (the premise, fixed before any result was seen): each source is a specialist that learned
its skill from far more examples than the fusion set holds; the fusion set has a few correct ground
truths per skill. The target must learn from that small set, either from the ground truths alone
(`sft`) or also from the sources' distributions on it (the fusion presets).

1. Three tiny source chat models with different tokenizer families, each pre-trained on
   --pretrain-examples examples of one synthetic skill (chatml_bpe: arithmetic, vicuna_spm:
   spelling backwards, gemma_unigram: capitals). Built once and cached in --out.
2. Per seed: a fusion set of --per-skill examples per skill drawn with that seed, a random-init tiny
   target (OLMo-2, chatml_bpe's tokenizer) initialized with that seed, the training data order
   seeded with it. The held-out set (--eval-per-skill prompts per skill, drawn independently from
   the same generators) is the same for every seed.
3. Per seed: `profuser prep` (normalize → generate → score → teacher → align → build) with an
   exact-match rule scorer, then one training per preset, each with 2 CPU ranks under the real
   `deepspeed` launcher with ZeRO-2 (one thread per rank), with the library's defaults for the loss
   and the teacher choice.
4. `profuser eval` of every trained target (and, once, of every source) on the held-out prompts.
5. A table of held-out exact-match accuracy and CE, mean ± sample standard deviation over seeds,
   per preset and per skill, plus each source; the teacher share per mode and skill; the goal
   checks; `results.json` with every number; `profuser report` over the seed runs.

Layout under --out: models/ (sources, one target per seed), data/ (held-out set, one fusion set per
seed), configs/seed-N.yaml, seed-N/ (the run directory of seed N: prep/, train-<preset>/, eval/,
wandb/, report/), report/ (all seeds side by side), table.txt, results.json.

Work that needs one process (pre-training, prep, eval) runs in --jobs processes at once, each with
cores/jobs threads: on a loaded or small machine one thread per process is much faster than
oversubscribed OpenMP threads.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from profuser.constants import PREP_MODES
from profuser.demo_data import SKILLS, SPACE, make_records
from profuser.prep.dist import free_port, remove_shm_buffers

SPECIALISTS = {"chatml_bpe": "arithmetic", "vicuna_spm": "spelling", "gemma_unigram": "capitals"}
PRESETS = ("profuser", "fusellm", "sft", "simul", "reverse", "ramp", "inference_only")
DEFAULT_PRESETS = ("profuser", "fusellm", "sft", "simul", "reverse")
REPO = Path(__file__).resolve().parents[1]
SCORER = "exact_match"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


class Clock:
    """Wall and CPU seconds per phase (CPU includes finished child processes: launcher, ranks, workers)."""

    def __init__(self):
        self.phases: dict = {}

    @staticmethod
    def _cpu() -> float:
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    def start(self):
        return time.time(), self._cpu()

    def stop(self, name: str, t0) -> float:
        wall, cpu = time.time() - t0[0], self._cpu() - t0[1]
        p = self.phases.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
        p["wall_s"] = round(p["wall_s"] + wall, 2)
        p["cpu_s"] = round(p["cpu_s"] + cpu, 2)
        return wall


def _threads(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _pool(jobs: int):
    import multiprocessing as mp

    return ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=(_threads(jobs),))


# --------------------------------------------------------------------------------------------
# models and data


def _pretrain_one(path: str, family: str, skill: str, rows: list[dict], steps: int, seed: int) -> str:
    from profuser.chat import BUILTIN_TEMPLATES
    from profuser.demo_data import pretrain
    from profuser.tiny import FAMILIES, build_model, build_tokenizer

    tok = build_tokenizer(family)
    model = build_model(FAMILIES[family][3], len(tok), seed=seed, tok=tok)
    losses = pretrain(model, tok, BUILTIN_TEMPLATES[FAMILIES[family][2]], rows, steps=steps, seed=seed,
                      desc=f"pre-train {family} on {skill}")
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = Path(f"{path}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # a killed demo never leaves a half-saved specialist behind
    return f"{family}: pre-trained on {len(rows)} {skill} examples ({steps} steps, loss {losses[0]:.2f} -> {losses[-1]:.3f})"


def build_sources(root: Path, pre_rows: list[dict], steps: int, jobs: int) -> dict[str, Path]:
    """The specialists under root/models (cached: a finished one is reused)."""
    out, todo = {}, []
    for i, (family, skill) in enumerate(SPECIALISTS.items()):
        path = root / "models" / family
        out[family] = path
        if not (path / "model.safetensors").exists():
            todo.append((str(path), family, skill, [r for r in pre_rows if r["skill"] == skill], steps, i))
    if todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _pool(min(jobs, len(todo))) as pool:
            for line in pool.map(_pretrain_one, *zip(*todo)):
                _say(line)
    else:
        _say("sources: already pre-trained, reusing them")
    return out


def build_target(root: Path, seed: int) -> Path:
    """A random-init target for `seed` (OLMo-2 with chatml_bpe's tokenizer)."""
    from profuser.tiny import build_model, build_tokenizer

    path = root / "models" / f"target-s{seed}"
    if not (path / "model.safetensors").exists():
        tok = build_tokenizer("chatml_bpe")
        model = build_model("olmo2", len(tok), seed=10 + seed, tok=tok)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_config(root: Path, seed: int, sources: dict[str, Path], target: Path, args) -> Path:
    ds = REPO / "deepspeed_configs" / "zero2.json"
    if not ds.exists():
        raise SystemExit(f"{ds} not found: run the demo from a clone of the ProFuser repository")
    cfg = {
        "run_dir": str(root / f"seed-{seed}"),
        "seed": seed,
        "sources": [{"name": n, "path": str(sources[n])} for n in SPECIALISTS],
        "target": {"name": "target", "path": str(target)},
        "scorers": [{"name": SCORER, "type": "rule", "function": "profuser.rules:exact_match"}],
        "data": {"path": str(root / "data" / f"fusion-s{seed}.jsonl"), "eval_path": str(root / "data" / "eval.jsonl"),
                 "max_length": 128},
        "prep": {"topk": 10, "shard_size": 64, "batch_size": 16,
                 "generate": {"max_new_tokens": 32, "batch_size": 32}},
        "train": {"max_steps": args.steps, "learning_rate": 3e-3, "per_device_train_batch_size": 8,
                  "gradient_accumulation_steps": 1, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                  "logging_steps": 5, "save_steps": 10_000, "deepspeed": str(ds)},
        "eval": {"max_new_tokens": 32, "batch_size": 40},
        "wandb": {"project": "profuser-demo", "mode": "offline"},
    }
    path = root / "configs" / f"seed-{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# running the real commands


def _env(threads: int) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_parallel(cmds: list[tuple[str, list[str], Path]], jobs: int, threads: int) -> dict[str, float]:
    """Run commands, `jobs` at a time, each logging to its file; stop at the first failure."""
    pending, running, seconds = list(cmds), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd, log = pending.pop(0)
            _say(f"$ {' '.join(cmd)}  (log: {log})")
            log.parent.mkdir(parents=True, exist_ok=True)
            f = open(log, "w")
            running[name] = (subprocess.Popen(cmd, env=_env(threads), stdout=f, stderr=subprocess.STDOUT), f,
                             time.time(), log)
        time.sleep(0.2)
        for name, (proc, f, t, log) in list(running.items()):
            if proc.poll() is None:
                continue
            f.close()
            del running[name]
            if proc.returncode != 0:
                for other, *_ in running.values():
                    other.terminate()
                tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
                raise SystemExit(f"[demo] {name} failed with exit code {proc.returncode} (log {log}):\n{tail}")
            seconds[name] = round(time.time() - t, 2)
            _say(f"{name}: done in {seconds[name]:.0f}s")
    return seconds


def train_preset(config: Path, run_dir: Path, preset: str) -> float:
    out_dir = run_dir / f"train-{preset}"
    if (out_dir / "final" / "config.json").exists():
        _say(f"train {run_dir.name}/{preset}: already trained, skipping")
        return 0.0
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module", "profuser.train", str(config),
           f"train.schedule={preset}", f"train.output_dir={out_dir}"]
    log = run_dir / "logs" / f"train-{preset}.log"
    try:
        return run_parallel([(f"train {run_dir.name}/{preset}", cmd, log)], 1, 1)[f"train {run_dir.name}/{preset}"]
    finally:
        remove_shm_buffers(port)  # DeepSpeed's CPU backend leaves 66 MB per rank in /dev/shm


def _eval_one(config: str, model: str, out: str, compare: bool) -> dict:
    from profuser.config import load_config
    from profuser.evaluate import evaluate

    t = time.time()
    r = evaluate(load_config(config), model, out=out, compare_sources=compare)
    r["seconds"] = round(time.time() - t, 2)
    return r


# --------------------------------------------------------------------------------------------
# numbers


def _acc(r: dict) -> dict:
    """One evaluation's numbers for results.json."""
    return {"acc": r["scores"].get(SCORER, float("nan")), "ce": r["ce"],
            "by_skill": {sk: {"acc": b["scores"].get(SCORER, float("nan")), "ce": b["ce"], "n": b["n"]}
                         for sk, b in r["by_skill"].items()},
            "win_rate": r.get("win_rate", {})}


def aggregate(runs: list[dict]) -> dict:
    """{"seeds": runs, "n", "mean", "sd"}; sd = sample standard deviation (n - 1), 0 for one run."""
    from profuser.report import mean_sd

    def over(get):
        return mean_sd([get(r) for r in runs])

    mean: dict = {"by_skill": {}}
    sd: dict = {"by_skill": {}}
    for key in ("acc", "ce"):
        mean[key], sd[key], _ = over(lambda r: r[key])
    for sk in SKILLS:
        mean["by_skill"][sk], sd["by_skill"][sk] = {}, {}
        for key in ("acc", "ce"):
            mean["by_skill"][sk][key], sd["by_skill"][sk][key], _ = over(lambda r: r["by_skill"].get(sk, {}).get(key, float("nan")))
    return {"n": len(runs), "seeds": runs, "mean": mean, "sd": sd}


def goal_checks(presets: dict, sources: dict) -> dict:
    """The issue's goals, computed: profuser's held-out accuracy minus sft's against the larger of
    their standard deviations; profuser against the best single source on each skill."""
    out: dict = {}
    if "profuser" in presets and "sft" in presets:
        p, s = presets["profuser"], presets["sft"]
        diff = p["mean"]["acc"] - s["mean"]["acc"]
        bar = max(p["sd"]["acc"], s["sd"]["acc"])
        out["profuser_vs_sft"] = {"difference": diff, "larger_sd": bar, "met": bool(diff > bar)}
    if "profuser" in presets:
        per = {}
        for sk in SKILLS:
            best = max(sources, key=lambda n: sources[n]["mean"]["by_skill"][sk]["acc"])
            mine = presets["profuser"]["mean"]["by_skill"][sk]["acc"]
            b = sources[best]["mean"]["by_skill"][sk]["acc"]
            per[sk] = {"profuser": mine, "best_source": best, "best_source_acc": b, "met": bool(mine >= b)}
        out["profuser_vs_best_source"] = per
    return out


def assemble_results(design: dict, sources: dict[str, dict], targets: dict[tuple[str, int], dict],
                     shares: dict[int, dict]) -> dict:
    """results.json (without timings) from the eval results: `sources` {name: eval result},
    `targets` {(preset, seed): eval result}, `shares` {seed: teacher_shares of that seed's run}."""
    seeds, presets = design["seeds"], design["presets"]
    mean_share: dict = {}
    min_designed: dict = {}
    for mode in PREP_MODES:
        for sk in SKILLS:
            for name in SPECIALISTS:
                vals = [shares[s].get(mode, {}).get(sk, {}).get(name, 0.0) for s in seeds]
                mean_share.setdefault(mode, {}).setdefault(sk, {})[name] = sum(vals) / len(vals)
                if SPECIALISTS[name] == sk:
                    min_designed.setdefault(mode, {})[sk] = min(vals)
    by_preset = {p: aggregate([{"seed": s, **_acc(targets[(p, s)])} for s in seeds]) for p in presets}
    by_source = {n: aggregate([{"seed": "all", **_acc(r)}]) for n, r in sources.items()}
    return {"schema_version": 1, "design": design, "device": device_info(), "presets": by_preset,
            "sources": by_source,
            "teacher_share": {"mean": mean_share, "min_designed": min_designed,
                              "per_seed": {str(s): v for s, v in shares.items()}},
            "goal": goal_checks(by_preset, by_source), "timings": {}}


def _cell(mean: float, sd: float, n: int) -> str:
    return f"{mean:.2f} ± {sd:.2f}" if n > 1 else f"{mean:.2f}       "


def format_table(res: dict) -> str:
    d = res["design"]
    rows = [(name, r) for name, r in res["sources"].items()] + [(f"target:{p}", r) for p, r in res["presets"].items()]
    head = f"{'model':18} {'n':>2}  {'acc':>11}  " + "  ".join(f"{s:>11}" for s in SKILLS) + f"  {'CE':>11}"
    lines = [f"Held-out exact-match accuracy ({d['held_out_per_skill']} prompts per skill) and CE (nats/token on "
             f"the references): mean ± sd over seeds",
             f"(fusion set: {d['fusion_examples_per_skill']} ground truths per skill per seed; each source "
             f"pre-trained on {d['pretrain_examples_per_skill']} examples of its skill; sources are fixed, n=1)",
             head, "-" * len(head)]
    for name, r in rows:
        m, s, n = r["mean"], r["sd"], r["n"]
        lines.append(f"{name:18} {n:>2}  {_cell(m['acc'], s['acc'], n):>11}  " +
                     "  ".join(f"{_cell(m['by_skill'][sk]['acc'], s['by_skill'][sk]['acc'], n):>11}" for sk in SKILLS) +
                     f"  {_cell(m['ce'], s['ce'], n):>11}")
    shares = res["teacher_share"]["mean"]
    lines += ["", "Teacher share per mode and skill, mean over seeds (min over seeds of the designed specialist's "
                  "share in brackets; designed specialist marked *)"]
    head = f"{'mode':10} {'skill':11} " + " ".join(f"{s:>20}" for s in SPECIALISTS)
    lines += [head, "-" * len(head)]
    for mode in PREP_MODES:
        for sk in SKILLS:
            per = shares.get(mode, {}).get(sk, {})
            cells = []
            for s in SPECIALISTS:
                if SPECIALISTS[s] == sk:
                    low = res["teacher_share"]["min_designed"].get(mode, {}).get(sk, 0.0)
                    cells.append(f"{per.get(s, 0.0):7.0%} ({low:4.0%})*".rjust(20))
                else:
                    cells.append(f"{per.get(s, 0.0):19.0%} ")
            lines.append(f"{mode:10} {sk:11} " + " ".join(cells))
    g = res["goal"]
    if "profuser_vs_sft" in g:
        v = g["profuser_vs_sft"]
        lines += ["", f"Goal 1, profuser beats sft by more than the larger sd: difference {v['difference']:+.3f}, "
                      f"larger sd {v['larger_sd']:.3f} -> {'met' if v['met'] else 'NOT met'}"]
    if "profuser_vs_best_source" in g:
        parts = [f"{sk} {v['profuser']:.2f} vs {v['best_source']} {v['best_source_acc']:.2f} "
                 f"({'met' if v['met'] else 'not met'})" for sk, v in g["profuser_vs_best_source"].items()]
        lines.append("Goal 2, profuser at least as good as the best single source on each skill: " + "; ".join(parts))
    return "\n".join(lines)


def device_info() -> dict:
    import torch

    return {"kind": "cuda" if torch.cuda.is_available() else "cpu", "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()), "platform": platform.platform(),
            "torch": torch.__version__,
            "training": "2 ranks under the deepspeed launcher, ZeRO-2, DeepSpeed's CPU backend, 1 thread per rank"}


# --------------------------------------------------------------------------------------------
# the demo


def run_demo(args) -> int:
    t0 = time.time()
    clock = Clock()
    root = Path(args.out).resolve()
    if args.fresh and root.exists():
        shutil.rmtree(root)
    seeds = list(range(args.seeds))
    jobs = max(1, args.jobs)
    threads = _threads(jobs)

    eval_rows = make_records(args.eval_per_skill, seed=1, prefix="eval")
    pre_rows = make_records(args.pretrain_examples, seed=2, prefix="pre")  # the specialists' own training data
    fusion = {s: make_records(args.per_skill, seed=1000 + s, prefix=f"fusion-s{s}") for s in seeds}
    _write_jsonl(root / "data" / "eval.jsonl", eval_rows)
    for s in seeds:
        _write_jsonl(root / "data" / f"fusion-s{s}.jsonl", fusion[s])
    prompt = lambda r: r["messages"][0]["content"]  # noqa: E731
    seen = {s: sum(prompt(r) in {prompt(x) for x in fusion[s]} for r in eval_rows) / len(eval_rows) for s in seeds}
    _say(f"design: sources pre-trained on {args.pretrain_examples} examples of their skill (skill spaces "
         f"{', '.join(f'{k} {v}' for k, v in SPACE.items())} distinct prompts); fusion set {args.per_skill} ground "
         f"truths per skill per seed; {args.eval_per_skill} held-out prompts per skill; seeds {seeds}; presets "
         f"{', '.join(args.presets)}; {jobs} process(es) x {threads} thread(s) for single-process work")

    c = clock.start()
    sources = build_sources(root, pre_rows, args.pretrain_steps, jobs)
    targets = {s: build_target(root, s) for s in seeds}
    clock.stop("models", c)
    configs = {s: write_config(root, s, sources, targets[s], args) for s in seeds}
    runs = {s: root / f"seed-{s}" for s in seeds}

    c = clock.start()
    py = sys.executable
    prep_s = run_parallel([(f"prep seed {s}", [py, "-m", "profuser.cli", "prep", str(configs[s])],
                            runs[s] / "logs" / "prep.log") for s in seeds], jobs, threads)
    clock.stop("prep", c)

    c = clock.start()
    train_s: dict = {p: {} for p in args.presets}
    for s in seeds:
        for p in args.presets:
            train_s[p][s] = train_preset(configs[s], runs[s], p)
    clock.stop("train", c)

    c = clock.start()
    with _pool(jobs) as pool:
        # the sources once (seed 0's run; they are the same in every seed), which also caches their answers
        src = {n: pool.submit(_eval_one, str(configs[seeds[0]]), n, str(runs[seeds[0]] / "eval" / n / "results.json"),
                              False) for n in SPECIALISTS}
        src = {n: f.result() for n, f in src.items()}
        for s in seeds[1:]:
            (runs[s] / "eval" / "sources").mkdir(parents=True, exist_ok=True)
            for n in SPECIALISTS:
                shutil.copy(runs[seeds[0]] / "eval" / "sources" / f"{n}.jsonl", runs[s] / "eval" / "sources" / f"{n}.jsonl")
        futs = {(p, s): pool.submit(_eval_one, str(configs[s]), str(runs[s] / f"train-{p}" / "final"),
                                    str(runs[s] / "eval" / f"train-{p}" / "results.json"), True)
                for s in seeds for p in args.presets}
        tgt = {k: f.result() for k, f in futs.items()}
    clock.stop("eval", c)
    for n, r in src.items():
        _say(f"eval {n}: exact_match {r['scores'].get(SCORER, float('nan')):.2f}, CE {r['ce']:.3f}")

    from profuser.report import teacher_shares, write_comparison, write_report

    c = clock.start()
    per_seed_shares = {s: teacher_shares(runs[s], list(SPECIALISTS)) for s in seeds}
    for s in seeds:
        write_report(runs[s])
    report = write_comparison([root], root / "report")
    clock.stop("report", c)

    design = {"skills": list(SKILLS), "specialists": SPECIALISTS, "skill_space": SPACE,
              "pretrain_examples_per_skill": args.pretrain_examples, "pretrain_steps": args.pretrain_steps,
              "fusion_examples_per_skill": args.per_skill, "held_out_per_skill": args.eval_per_skill,
              "train_steps": args.steps, "presets": list(args.presets), "seeds": seeds,
              "held_out_prompts_in_fusion_set": {str(s): v for s, v in seen.items()},
              "sources_note": "pre-trained once and evaluated once (greedy decoding): the same in every seed",
              "sd": "sample standard deviation over seeds (n - 1)"}
    res = assemble_results(design, src, tgt, per_seed_shares)
    table = format_table(res)
    res["timings"] = {"total_s": round(time.time() - t0, 1), "phases": clock.phases,
                      "prep_s": {str(s): prep_s.get(f"prep seed {s}") for s in seeds},
                      "train_s": {p: {str(s): v for s, v in d.items()} for p, d in train_s.items()},
                      "eval_s": {**{n: r["seconds"] for n, r in src.items()},
                                 **{f"{p}/seed-{s}": r["seconds"] for (p, s), r in tgt.items()}}}
    (root / "table.txt").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps(res, indent=1))
    print("\n" + table + "\n")
    _say(f"results: {root / 'results.json'}; report: {report}; per-seed runs: {', '.join(str(r) for r in runs.values())}")
    _say(f"W&B offline runs: {root}/seed-*/wandb (upload with `wandb sync`)")
    _say("time per phase (wall / CPU seconds): " + ", ".join(f"{k} {v['wall_s']:.0f}/{v['cpu_s']:.0f}"
                                                            for k, v in clock.phases.items()))
    _say(f"total time {time.time() - t0:.0f}s")
    return 0


def add_arguments(p) -> None:
    p.add_argument("--out", default="profuser-demo", help="Directory for everything the demo builds (default: ./profuser-demo).")
    p.add_argument("--seeds", type=int, default=3,
                   help="Runs per preset, with seeds 0..N-1 (the seed draws the fusion set, initializes the target and "
                        "orders the training data); the table shows mean ± sd over them (default 3).")
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), choices=list(PRESETS),
                   help="Training presets to compare, each a 2-rank ZeRO-2 run per seed (default: "
                        f"{' '.join(DEFAULT_PRESETS)}).")
    p.add_argument("--per-skill", type=int, default=20, help="Ground truths per skill in each seed's fusion set (default 20).")
    p.add_argument("--eval-per-skill", type=int, default=40, help="Held-out prompts per skill (default 40).")
    p.add_argument("--pretrain-examples", type=int, default=600,
                   help="Examples of its skill each source is pre-trained on (default 600).")
    p.add_argument("--pretrain-steps", type=int, default=600, help="Pre-training steps per source (batch 16; default 600).")
    p.add_argument("--steps", type=int, default=100, help="Optimizer steps per training (2 ranks x 8 samples; default 100).")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="Processes at once for pre-training, prep and eval, each with cores/jobs threads "
                        "(default: 2, or 1 on a single core).")
    p.add_argument("--fresh", action="store_true", help="Delete --out first instead of reusing finished parts.")
