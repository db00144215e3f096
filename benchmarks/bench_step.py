"""python benchmarks/bench_step.py [--seq-len 1024] [--batch 1] [--steps 3] [--chunk 256] [--layers 30]

One training step (collate -> forward -> loss -> backward -> AdamW step) of a SmolLM2-135M-sized
causal LM (Llama architecture, vocabulary 49152, random init, fp32 on CPU / bf16 autocast on GPU)
on the same sequences, three ways:

  sft       the plain supervised step: model(input_ids, labels=labels).loss (transformers' causal-LM CE)
  profuser  one ProFuser mode with a k=10 teacher: profuser.train.collator.collate_mode (sparse
            [B, T, k] teacher) + profuser.losses.fusion_loss (chunked fp32 CE + forward KL)
  dense     the older fusion codes' approach: the collator scatters the same top-k into a dense
            [B, T, V] teacher distribution, and the loss is CE + KL(p || softmax(logits)) over the
            full vocabulary

Time: one process, one model, the three variants' steps interleaved round by round (order rotated)
after a warm-up step each; the ratio is the median over rounds of each round's ratio to sft. On CPU
the clock is the process's CPU time with one torch thread (the work done, unaffected by other load
on a shared machine; wall times are reported too); on CUDA, synchronized wall time. Memory: each variant in a fresh process;
on CPU the peak resident set of the measured step (VmHWM, reset through /proc/self/clear_refs after
a warm-up step, so the lazily created AdamW state is in the baseline of every variant), reported as
the absolute peak and as the step's working memory (peak minus the resident set just before the
step: model, gradients, optimizer state); on CUDA torch.cuda.max_memory_allocated. Prints one JSON
object with the ratios to sft.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("sft", "profuser", "dense")
K = 10


def _mem_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    return (int(re.search(r"VmHWM:\s+(\d+)", status).group(1)), int(re.search(r"VmRSS:\s+(\d+)", status).group(1)))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def build_model(layers: int, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # SmolLM2-135M-Instruct's architecture (HuggingFaceTB/SmolLM2-135M-Instruct config.json)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device).train()


def make_rows(batch: int, seq_len: int, vocab: int) -> list[dict]:
    """Samples with a 25% prompt and a label-aligned k=10 teacher (realistic log-probs, top-k mass < 1)."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    for _ in range(batch):
        ids = rng.integers(0, vocab, seq_len)
        prompt = seq_len // 4
        labels = ids.copy()
        labels[:prompt] = -100
        topk_ids = np.stack([rng.choice(vocab, K, replace=False) for _ in range(seq_len)]).astype(np.int32)
        logits = rng.normal(size=(seq_len, K)) * 2
        lps = logits - np.log(np.exp(logits).sum(-1, keepdims=True)) - 0.2  # mass exp(-0.2) on the top-k
        topk_ids[:prompt] = -1
        rows.append({"input_ids": ids, "labels": labels, "topk_ids": topk_ids,
                     "topk_logprobs": lps.astype(np.float16), "teacher": "t", "id": str(len(rows))})
    return rows


def dense_teacher(batch: dict, vocab: int):
    """The older collators: scatter the top-k probabilities into a dense [B, T, V] fp32 tensor."""
    import torch

    ids, lps = batch["topk_ids"].long(), batch["topk_logprobs"].float()
    valid = ids >= 0
    p = torch.zeros(*ids.shape[:2], vocab)
    p.scatter_(-1, ids.clamp_min(0), torch.where(valid, lps.exp(), 0.0))
    return p / p.sum(-1, keepdim=True).clamp_min(1e-12)


def step_fn(variant: str, model, rows: list[dict], chunk: int, device: str):
    import torch

    from profuser.losses import fusion_loss
    from profuser.train.collator import collate_mode

    vocab = model.config.vocab_size

    def step():
        batch = collate_mode(rows, pad_token_id=0)
        if variant == "dense":
            batch["dense"] = dense_teacher(batch, vocab)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            if variant == "sft":
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"], use_cache=False).loss
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
                if variant == "profuser":
                    parts = fusion_loss(logits, batch["labels"], batch["topk_ids"], batch["topk_logprobs"],
                                        chunk_size=chunk)
                    del logits  # as FusionTrainer.compute_loss: backward needs only the loss's gradient buffer
                    loss = parts.mean()
                else:
                    labels = batch["labels"][:, 1:]
                    logq = logits[:, :-1].float().log_softmax(-1)
                    p = batch["dense"][:, 1:]
                    mask = labels != -100
                    ce = -logq.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
                    kl = (torch.xlogy(p, p) - p * logq).sum(-1)
                    loss = torch.where(mask, ce + kl, 0.0).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return step


def run_memory(args) -> dict:
    """One variant in this (fresh) process: warm-up step, reset the peak, one measured step."""
    import torch

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.layers, device)
    rows = make_rows(args.batch, args.seq_len, model.config.vocab_size)
    step = step_fn(args.variant, model, rows, args.chunk, device)
    step()  # warm-up: allocates gradients and the optimizer state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        base = _mem_kib()[1] * 1024
    loss = step()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _mem_kib()[0] * 1024
    return {"variant": args.variant, "device": device, "peak_bytes": peak, "base_bytes": base,
            "step_peak_bytes": peak - base, "loss": loss}


def run_timing(args) -> dict:
    """All variants in one process on one model, interleaved step by step (rotating the order each
    round), so that a change in machine load hits every variant alike."""
    import torch

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.layers, device)
    rows = make_rows(args.batch, args.seq_len, model.config.vocab_size)
    steps = {v: step_fn(v, model, rows, args.chunk, device) for v in VARIANTS}
    for v in VARIANTS:  # warm-up each (its optimizer state, allocator caches)
        steps[v]()
    wall, cpu = {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
    for r in range(args.steps):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for v in order:
            if device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            steps[v]()
            if device == "cuda":
                torch.cuda.synchronize()
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    return {"device": device, "wall": wall, "cpu": cpu}


def _sub(args, *extra) -> dict:
    cmd = [sys.executable, __file__, *extra] + [f"--{k.replace('_', '-')}={getattr(args, k)}"
                                              for k in ("seq_len", "batch", "steps", "chunk", "layers", "threads")]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1024, help="Tokens per sequence (>= 1024 for the issue's goal).")
    p.add_argument("--batch", type=int, default=1, help="Sequences per step.")
    p.add_argument("--steps", type=int, default=3, help="Timed rounds (one step of each variant per round).")
    p.add_argument("--chunk", type=int, default=256, help="fusion_loss chunk_size (train.loss_chunk_size).")
    p.add_argument("--layers", type=int, default=30, help="Decoder layers (SmolLM2-135M has 30).")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the CPU time of a step is its work, even on a busy machine).")
    p.add_argument("--phase", choices=("time", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase == "time":
        print(json.dumps(run_timing(args)))
        return
    if args.phase == "memory":
        print(json.dumps(run_memory(args)))
        return

    mem = {v: _sub(args, "--phase=memory", f"--variant={v}") for v in VARIANTS}  # a fresh process each
    timing = _sub(args, "--phase=time")
    # CPU: the process's CPU time is the step's work, whatever else runs on a shared machine (one
    # thread, so no spin-waiting is counted); CUDA: wall time with synchronization.
    clock = "cpu" if timing["device"] == "cpu" else "wall"
    t = timing[clock]
    med = {v: statistics.median(t[v]) for v in VARIANTS}
    round_ratio = {v: statistics.median(a / b for a, b in zip(t[v], t["sft"])) for v in VARIANTS}
    sft = mem["sft"]
    report = {
        "model": f"Llama (SmolLM2-135M dims), {args.layers} layers, vocab 49152, random init",
        "device": timing["device"], "seq_len": args.seq_len, "batch": args.batch, "topk": K,
        "loss_chunk_size": args.chunk, "threads": args.threads, "timed_rounds": args.steps,
        "time_measure": ("process CPU time" if clock == "cpu" else "wall time") + " of each step; one process, "
                        "the three variants' steps interleaved per round (order rotated); median step time, and "
                        "median over rounds of the per-round ratio to sft",
        "memory_measure": ("torch.cuda.max_memory_allocated" if timing["device"] == "cuda" else
                           "VmHWM (peak RSS) of a fresh process per variant, reset after a warm-up step; "
                           "working = peak minus RSS before the step (model, grads, AdamW state)"),
        "variants": {v: {"step_s": round(med[v], 3), "step_s_all": [round(x, 3) for x in t[v]],
                         "wall_s_all": [round(x, 3) for x in timing["wall"][v]],
                         "peak_MiB": round(mem[v]["peak_bytes"] / 2**20, 1),
                         "step_working_MiB": round(mem[v]["step_peak_bytes"] / 2**20, 1),
                         "loss": round(mem[v]["loss"], 4)} for v in VARIANTS},
        "ratios_vs_sft": {v: {"time": round(round_ratio[v], 3),
                              "peak_memory": round(mem[v]["peak_bytes"] / sft["peak_bytes"], 3),
                              "step_working_memory": round(mem[v]["step_peak_bytes"] / max(sft["step_peak_bytes"], 1),
                                                           3)}
                          for v in VARIANTS if v != "sft"},
        "goal": "profuser time <= 1.10x and peak memory <= 1.05x of sft",
    }
    r = report["ratios_vs_sft"]["profuser"]
    report["goal_met"] = {"time": r["time"] <= 1.10, "peak_memory": r["peak_memory"] <= 1.05}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
