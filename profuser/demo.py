"""`profuser demo [--out DIR]`: the whole system on a CPU in minutes, every number measured by the run.

1. Three tiny source chat models with different tokenizer families are each made a specialist in
   one synthetic skill by a short pre-training (chatml_bpe: arithmetic, vicuna_spm: spelling,
   gemma_unigram: capitals); a random-init tiny target (OLMo-2, chatml_bpe's tokenizer).
2. A synthetic instruction set with ground truths (and held-out prompts), an exact-match rule scorer.
3. `profuser prep` (normalize → generate → score → teacher → align → build).
4. Training for each preset (profuser, fusellm, sft by default) with 2 CPU ranks under the real
   `deepspeed` launcher with ZeRO-2.
5. `profuser eval` of every source and trained target on the held-out prompts, a report, and a
   table: held-out accuracy and CE per model, and the teacher share of each source per mode per skill.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from profuser.demo_data import SKILLS, make_records
from profuser.prep.dist import free_port, remove_shm_buffers

SPECIALISTS = {"chatml_bpe": "arithmetic", "vicuna_spm": "spelling", "gemma_unigram": "capitals"}
REPO = Path(__file__).resolve().parents[1]


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def build_models(root: Path, train_rows: list[dict], steps: int) -> dict[str, Path]:
    """Specialist sources and the target, saved as HF directories under root/models."""
    import torch

    from profuser.chat import BUILTIN_TEMPLATES
    from profuser.demo_data import pretrain
    from profuser.tiny import FAMILIES, build_model, build_tokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = {}
    for i, (family, skill) in enumerate(SPECIALISTS.items()):
        path = root / "models" / family
        out[family] = path
        if (path / "model.safetensors").exists():
            continue
        tok = build_tokenizer(family)
        model = build_model(FAMILIES[family][3], len(tok), seed=i, tok=tok)
        rows = [r for r in train_rows if r["skill"] == skill]
        losses = pretrain(model, tok, BUILTIN_TEMPLATES[FAMILIES[family][2]], rows, steps=steps, seed=i,
                          desc=f"pre-train {family} on {skill}")
        _say(f"{family}: pre-trained on {skill} ({steps} steps, loss {losses[0]:.2f} -> {losses[-1]:.3f})")
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(path)
        tok.save_pretrained(path)
    target = root / "models" / "target"
    if not (target / "model.safetensors").exists():
        tok = build_tokenizer("chatml_bpe")
        model = build_model("olmo2", len(tok), seed=10, tok=tok)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(target)
        tok.save_pretrained(target)
    out["target"] = target
    return out


def write_config(root: Path, models: dict[str, Path], args) -> Path:
    ds = REPO / "deepspeed_configs" / "zero2.json"
    if not ds.exists():
        raise SystemExit(f"{ds} not found: run the demo from a clone of the ProFuser repository")
    cfg = {
        "run_dir": str(root / "run"),
        "seed": 0,
        "sources": [{"name": n, "path": str(models[n])} for n in SPECIALISTS],
        "target": {"name": "target", "path": str(models["target"])},
        "scorers": [{"name": "exact_match", "type": "rule", "function": "profuser.rules:exact_match"}],
        "data": {"path": str(root / "data" / "train.jsonl"), "eval_path": str(root / "data" / "eval.jsonl"),
                 "max_length": 128},
        "prep": {"topk": 10, "shard_size": 64, "batch_size": 16,
                 "generate": {"max_new_tokens": 48, "batch_size": 32}},
        "train": {"max_steps": args.steps, "learning_rate": 3e-3, "per_device_train_batch_size": 8,
                  "gradient_accumulation_steps": 1, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                  "logging_steps": 2, "save_steps": 10_000, "deepspeed": str(ds), "switch_fraction": 0.5},
        "eval": {"max_new_tokens": 48, "batch_size": 32},
        "wandb": {"project": "profuser-demo", "mode": "offline"},
    }
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _run(cmd: list[str], env: dict | None = None) -> None:
    _say("$ " + " ".join(cmd))
    t = time.time()
    res = subprocess.run(cmd, env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise SystemExit(f"[demo] command failed with exit code {res.returncode}: {' '.join(cmd)}")
    _say(f"done in {time.time() - t:.0f}s")


def teacher_shares(run_dir: Path, records: list[dict]) -> dict:
    """{mode: {skill: {source: share}}}: the teacher of each training sample, from the training set."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    skill = {r["id"]: r["skill"] for r in records}
    cols = ["id", "training_teacher", "inference_teacher"]
    table = pa.concat_tables([pq.read_table(f, columns=cols) for f in sorted((run_dir / "prep" / "build").glob("*.parquet"))])
    counts: dict = defaultdict(lambda: defaultdict(Counter))
    for row in table.to_pylist():
        for m in ("training", "inference"):
            if row[f"{m}_teacher"] is not None:
                counts[m][skill.get(row["id"], "?")][row[f"{m}_teacher"]] += 1
    return {m: {sk: {s: c[s] / sum(c.values()) for s in SPECIALISTS} for sk, c in per.items()}
            for m, per in counts.items()}


def format_table(results: dict[str, dict], shares: dict) -> str:
    skills = list(SKILLS)
    head = f"{'model':22} {'acc':>6} " + " ".join(f"{'acc ' + s[:5]:>10}" for s in skills) + f" {'CE':>7} " + \
           " ".join(f"{'CE ' + s[:5]:>9}" for s in skills)
    lines = ["Held-out exact-match accuracy and CE (nats/token on the ground truth)", head, "-" * len(head)]
    for name, r in results.items():
        bs = r["by_skill"]
        lines.append(f"{name:22} {r['scores'].get('exact_match', float('nan')):6.2f} " +
                     " ".join(f"{bs.get(s, {}).get('scores', {}).get('exact_match', float('nan')):10.2f}" for s in skills) +
                     f" {r['ce']:7.3f} " + " ".join(f"{bs.get(s, {}).get('ce', float('nan')):9.3f}" for s in skills))
    lines += ["", "Teacher share per mode and skill (designed specialist marked *)"]
    head = f"{'mode':10} {'skill':11} " + " ".join(f"{s:>15}" for s in SPECIALISTS)
    lines += [head, "-" * len(head)]
    for m in ("training", "inference"):
        for sk in skills:
            per = shares.get(m, {}).get(sk, {})
            cells = [f"{per.get(s, 0.0):14.0%}" + ("*" if SPECIALISTS[s] == sk else " ") for s in SPECIALISTS]
            lines.append(f"{m:10} {sk:11} " + " ".join(cells))
    return "\n".join(lines)


def run_demo(args) -> int:
    t0 = time.time()
    root = Path(args.out).resolve()
    if args.fresh and root.exists():
        shutil.rmtree(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    train_rows = make_records(args.per_skill, seed=0, prefix="train")
    eval_rows = make_records(args.eval_per_skill, seed=1, prefix="eval")
    pre_rows = make_records(200, seed=2, prefix="pre")  # the specialists' own pre-training data
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        with open(root / "data" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    _say(f"data: {len(train_rows)} training and {len(eval_rows)} held-out prompts over skills {', '.join(SKILLS)}")

    models = build_models(root, pre_rows, args.pretrain_steps)
    config = write_config(root, models, args)
    run_dir = root / "run"
    py = sys.executable
    env = {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    _run([py, "-m", "profuser.cli", "prep", str(config)], env)

    for preset in args.presets:
        out_dir = run_dir / f"train-{preset}"
        if (out_dir / "final" / "config.json").exists():
            _say(f"train {preset}: already trained, skipping")
            continue
        port = free_port()
        try:
            _run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module", "profuser.train",
                  str(config), f"train.schedule={preset}", f"train.output_dir={out_dir}"],
                 {**env, "OMP_NUM_THREADS": "1"})
        finally:
            remove_shm_buffers(port)  # DeepSpeed's CPU backend leaves 66 MB per rank in /dev/shm

    from profuser.config import load_config
    from profuser.evaluate import evaluate
    from profuser.report import write_report

    cfg = load_config(config)
    results = {}
    for name in [*SPECIALISTS, *(f"target:{p}" for p in args.presets)]:
        model = str(run_dir / f"train-{name.split(':')[1]}" / "final") if name.startswith("target:") else name
        r = evaluate(cfg, model, out=str(run_dir / "eval" / name.replace(":", "-") / "results.json"),
                     compare_sources=name.startswith("target:"))
        results[name] = r
        _say(f"eval {name}: exact_match {r['scores'].get('exact_match', float('nan')):.2f}, CE {r['ce']:.3f}")
    shares = teacher_shares(run_dir, train_rows)
    report = write_report(run_dir)
    table = format_table(results, shares)
    (root / "table.txt").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps({"eval": results, "teacher_share": shares,
                                                   "seconds": time.time() - t0}, indent=2))
    print("\n" + table + "\n")
    _say(f"report: {report}")
    _say(f"W&B offline runs: {run_dir / 'wandb'} (upload with `wandb sync`)")
    _say(f"total time {time.time() - t0:.0f}s")
    return 0


def add_arguments(p) -> None:
    p.add_argument("--out", default="profuser-demo", help="Directory for everything the demo builds (default: ./profuser-demo).")
    p.add_argument("--presets", nargs="+", default=["profuser", "fusellm", "sft"],
                   choices=["profuser", "fusellm", "sft", "simul", "reverse", "ramp", "inference_only"],
                   help="Training presets to compare (each a 2-rank ZeRO-2 run).")
    p.add_argument("--per-skill", type=int, default=100, help="Training prompts per skill.")
    p.add_argument("--eval-per-skill", type=int, default=10, help="Held-out prompts per skill.")
    p.add_argument("--pretrain-steps", type=int, default=300, help="Specialist pre-training steps per source.")
    p.add_argument("--steps", type=int, default=200, help="Optimizer steps per training preset.")
    p.add_argument("--fresh", action="store_true", help="Delete --out first instead of reusing finished parts.")
