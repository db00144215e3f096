"""python benchmarks/bench_step.py [--seq-len 2048] [--batch 1] [--steps 3] [--chunk 256] [--shape smollm2-135m]
       python benchmarks/bench_step.py --shape llama-1b --seq-len 4096 --batch 2 [--gradient-checkpointing]   # GPU

One training step (collate -> forward -> loss -> backward -> AdamW step) of a random-init causal LM on
the same sequences, several ways:

  sft              plain supervised step: model(input_ids, labels=labels).loss (transformers' causal-LM CE
                   over the full [B, T, V] logits)
  sft_liger        SFT with Liger's fused-linear CE (no [B, T, V] logits); only where liger-kernel imports
  profuser         one ProFuser mode with a k=10 teacher: logits, then profuser.losses.fusion_loss
                   (chunked fp32 CE + forward KL, the "logits" path of the trainer)
  fused            the same loss on the trainer's fused-linear path (profuser.train.fused.fused_forward:
                   trunk, then fused_linear_fusion_loss over the last hidden state and lm_head; no
                   [B, T, V] tensor)
  dense            the older fusion codes' approach: the collator scatters the same top-k into a dense
                   [B, T, V] teacher distribution, and the loss is CE + KL(p || softmax(logits))
  profuser2_joint  a stage-2 step with both modes (w_inf 0.1, w_train 1, different sequences and
                   teachers) as the trainer ran it before: both modes forwarded, one backward of the sum
  profuser2        both modes as the trainer runs them now: each mode's forward and backward before the
                   next mode's forward (logits path)
  fused2           the same on the fused-linear path

Shapes: smollm2-135m (default; Llama architecture with SmolLM2-135M's dimensions, vocabulary 49,152,
30 layers; fp32 on CPU, bf16 autocast on CUDA) and llama-1b (Llama-3.2-1B's dimensions, vocabulary
128,256, 16 layers, tied embeddings; bf16 weights on CUDA with fused AdamW, fp32 on CPU where it is
only a smoke run: e.g. --layers 1 --seq-len 64).

Time: one process, one model, the variants' steps interleaved round by round (order rotated) after a
warm-up step each; the ratio is the median over rounds of each round's ratio to sft. On CPU the clock
is the process's CPU time with one torch thread (the work done, unaffected by other load on a shared
machine; wall times are reported too); on CUDA, synchronized wall time. Memory: each variant in a
fresh process; on CPU the peak resident set of the measured step (VmHWM, reset through
/proc/self/clear_refs after a warm-up step, so the lazily created AdamW state is in the baseline of
every variant), reported as the absolute peak and as the step's working memory (peak minus the
resident set just before the step: model, gradients, optimizer state); on CUDA
torch.cuda.max_memory_allocated. Prints ONE JSON line with the ratios to sft (and, for the two-mode
steps, to the one-mode step of the same loss).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("sft", "sft_liger", "profuser", "fused", "dense", "profuser2_joint", "profuser2", "fused2")
TWO_MODE = {"profuser2_joint": "profuser", "profuser2": "profuser", "fused2": "fused"}  # -> its one-mode step
K = 10
STAGE2_WEIGHTS = (0.1, 1.0)  # (w_inf, w_train) of the profuser preset's stage 2
SHAPES = {
    # SmolLM2-135M-Instruct's architecture (HuggingFaceTB/SmolLM2-135M-Instruct config.json)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    # Llama-3.2-1B's architecture (meta-llama/Llama-3.2-1B config.json; rope scaling left out)
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                     rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True),
}


def _mem_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    return (int(re.search(r"VmHWM:\s+(\d+)", status).group(1)), int(re.search(r"VmRSS:\s+(\d+)", status).group(1)))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def build_model(args, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(SHAPES[args.shape])
    if args.layers is not None:
        dims["num_hidden_layers"] = args.layers
    cfg = LlamaConfig(**dims, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if device == "cuda" and args.shape == "llama-1b":
        model = model.to(torch.bfloat16)  # bf16 weights, as DeepSpeed's bf16 mode trains them
    model = model.to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_rows(batch: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """Samples with a 25% prompt and a label-aligned k=10 teacher (realistic log-probs, top-k mass < 1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
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
    p = torch.zeros(*ids.shape[:2], vocab, device=ids.device)
    p.scatter_(-1, ids.clamp_min(0), torch.where(valid, lps.exp(), 0.0))
    return p / p.sum(-1, keepdim=True).clamp_min(1e-12)


def make_optimizer(model, device: str):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")


def step_fn(variant: str, model, modes: list[list[dict]], args, device: str, opt):
    """A zero-argument training step of ``variant`` over the rows of one mode (``modes[0]``) or two."""
    import torch

    from profuser.losses import fusion_loss
    from profuser.train.collator import collate_mode
    from profuser.train.fused import fused_forward, head_spec

    vocab = model.config.vocab_size
    spec, why = head_spec(model)
    assert spec is not None, why
    autocast = device == "cuda" and next(model.parameters()).dtype == torch.float32
    lce = None
    if variant == "sft_liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        lce = LigerFusedLinearCrossEntropyLoss()

    def batch_of(rows):
        batch = collate_mode(rows, pad_token_id=0)
        if variant == "dense":
            batch["dense"] = dense_teacher(batch, vocab)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def mode_sum(batch):
        """LossParts (sums) of one mode on the logits path or the fused path."""
        if variant.startswith("fused"):
            return fused_forward(model, model, spec, batch, chunk_size=args.chunk)
        # the logits go out of scope on return: backward needs only the loss's gradient buffer (as in the trainer)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return fusion_loss(logits, batch["labels"], batch["topk_ids"], batch["topk_logprobs"], chunk_size=args.chunk)

    def one_mode(batch):
        if variant == "sft":
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False).loss
        if variant == "sft_liger":
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
            return lce(model.lm_head.weight, hidden[:, :-1].reshape(-1, hidden.shape[-1]),
                       batch["labels"][:, 1:].reshape(-1))
        if variant == "dense":
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            labels = batch["labels"][:, 1:]
            logq = logits[:, :-1].float().log_softmax(-1)
            p = batch["dense"][:, 1:]
            mask = labels != -100
            ce = -logq.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
            kl = (torch.xlogy(p, p) - p * logq).sum(-1)
            return torch.where(mask, ce + kl, 0.0).sum() / mask.sum()
        return mode_sum(batch).mean()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            if variant not in TWO_MODE:
                loss = one_mode(batch_of(modes[0]))
                loss.backward()
                total = float(loss.detach())
            else:
                # stage 2: loss = sum_m w_m * (mode-m token losses) / N_m, as FusionTrainer scales it
                total, joint = 0.0, None
                for w, rows in zip(STAGE2_WEIGHTS, modes):
                    batch = batch_of(rows)
                    term = mode_sum(batch).total_sum * (w / float((batch["labels"][:, 1:] != -100).sum()))
                    total += float(term.detach())
                    if variant == "profuser2_joint":
                        joint = term if joint is None else joint + term
                    else:
                        term.backward()  # this mode's graph is freed before the next mode's forward
                    del term, batch
                if joint is not None:
                    joint.backward()
        opt.step()
        opt.zero_grad(set_to_none=not args.keep_grads)
        return total

    return step


def _setup(args):
    import torch

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args, device)
    vocab = model.config.vocab_size
    modes = [make_rows(args.batch, args.seq_len, vocab, seed=0), make_rows(args.batch, args.seq_len, vocab, seed=1)]
    return torch, device, model, modes


def run_memory(args) -> dict:
    """One variant in this (fresh) process: warm-up step, reset the peak, one measured step."""
    torch, device, model, modes = _setup(args)
    step = step_fn(args.variant, model, modes, args, device, make_optimizer(model, device))
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
    return {"variant": args.variant, "device": device, "device_name": device_name(torch, device), "peak_bytes": peak,
            "base_bytes": base, "step_peak_bytes": peak - base, "loss": loss}


def device_name(torch, device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"


def run_timing(args) -> dict:
    """All variants in one process on one model, interleaved step by step (rotating the order each
    round), so that a change in machine load hits every variant alike."""
    torch, device, model, modes = _setup(args)
    variants = args.variants
    opt = make_optimizer(model, device)  # one AdamW state for all (the same work per step, a fraction of the memory)
    steps = {v: step_fn(v, model, modes, args, device, opt) for v in variants}
    for v in variants:  # warm-up each (its optimizer state, allocator caches)
        steps[v]()
    wall, cpu = {v: [] for v in variants}, {v: [] for v in variants}
    for r in range(args.steps):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
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
    opts = {"seq_len": args.seq_len, "batch": args.batch, "steps": args.steps, "chunk": args.chunk,
            "threads": args.threads, "shape": args.shape, "variants": ",".join(args.variants)}
    if args.layers is not None:
        opts["layers"] = args.layers
    cmd = [sys.executable, __file__, *extra] + [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    cmd += [f"--{flag}" for flag in ("gradient-checkpointing", "keep-grads") if getattr(args, flag.replace("-", "_"))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(args, mem: dict, timing: dict) -> dict:
    # CPU: the process's CPU time is the step's work, whatever else runs on a shared machine (one
    # thread, so no spin-waiting is counted); CUDA: wall time with synchronization.
    device = mem["sft"]["device"]
    clock = "cpu" if device == "cpu" else "wall"
    t = timing[clock] if timing else None
    variants = args.variants

    def time_ratio(v, base):
        return round(statistics.median(a / b for a, b in zip(t[v], t[base])), 3) if t else None

    def mem_ratios(v, base):
        return {"peak_memory": round(mem[v]["peak_bytes"] / mem[base]["peak_bytes"], 3),
                "step_working_memory": round(mem[v]["step_peak_bytes"] / max(mem[base]["step_peak_bytes"], 1), 3)}

    dims = {**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers is not None else {})}
    out = {
        "model": f"Llama, {args.shape} dims, {dims['num_hidden_layers']} layers, vocab {dims['vocab_size']}, "
                 f"random init",
        "dtype": "bf16 weights" if device == "cuda" and args.shape == "llama-1b" else
                 "fp32 weights, bf16 autocast" if device == "cuda" else "fp32",
        "device": mem["sft"]["device_name"], "seq_len": args.seq_len, "batch": args.batch, "topk": K,
        "gradient_checkpointing": args.gradient_checkpointing, "loss_chunk_size": args.chunk,
        "gradient_buffers": "kept between steps" if args.keep_grads else "freed after each step",
        "threads": args.threads, "timed_rounds": args.steps,
        "time_measure": ("process CPU time" if clock == "cpu" else "wall time") + " of each step; one process, the "
                        "variants' steps interleaved per round (order rotated); median step time, and median over "
                        "rounds of the per-round ratio" if t else "not measured (--steps 0)",
        "memory_measure": ("torch.cuda.max_memory_allocated" if device == "cuda" else
                           "VmHWM (peak RSS) of a fresh process per variant, reset after a warm-up step; "
                           "working = peak minus RSS before the step (model, grads, AdamW state)"),
        "variants": {v: {**({"step_s": round(statistics.median(t[v]), 3), "step_s_all": [round(x, 3) for x in t[v]],
                            "wall_s_all": [round(x, 3) for x in timing["wall"][v]]} if t else {}),
                         "peak_MiB": round(mem[v]["peak_bytes"] / 2**20, 1),
                         "step_working_MiB": round(mem[v]["step_peak_bytes"] / 2**20, 1),
                         "loss": round(mem[v]["loss"], 4)} for v in variants},
        "ratios_vs_sft": {v: {"time": time_ratio(v, "sft"), **mem_ratios(v, "sft")} for v in variants if v != "sft"},
        "two_mode_vs_one_mode": {v: {"time": time_ratio(v, base), **mem_ratios(v, base), "one_mode": base}
                                 for v, base in TWO_MODE.items() if v in variants and base in variants},
    }
    goals, met = {}, {}
    r = out["ratios_vs_sft"]
    if "fused" in r:
        goals["fused_vs_sft"] = "peak memory <= 0.90x and time <= 1.10x of sft"
        met["fused_vs_sft"] = r["fused"]["peak_memory"] <= 0.90 and (t is None or r["fused"]["time"] <= 1.10)
    if "fused" in variants and "sft_liger" in variants:
        liger = {"time": time_ratio("fused", "sft_liger"), **mem_ratios("fused", "sft_liger")}
        out["fused_vs_sft_liger"] = liger
        goals["fused_vs_sft_liger"] = "time <= 1.02x and peak memory <= 1.05x of sft_liger"
        met["fused_vs_sft_liger"] = liger["peak_memory"] <= 1.05 and (t is None or liger["time"] <= 1.02)
    for v in ("fused2", "profuser2"):
        if v in out["two_mode_vs_one_mode"]:
            goals[v] = f"two-mode step peak memory <= 1.05x of the one-mode step ({TWO_MODE[v]})"
            met[v] = out["two_mode_vs_one_mode"][v]["peak_memory"] <= 1.05
    out["goals"], out["goal_met"] = goals, met
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1024, help="Tokens per sequence (2048 for the CPU goals).")
    p.add_argument("--batch", type=int, default=1, help="Sequences per mode and step.")
    p.add_argument("--steps", type=int, default=3,
                   help="Timed rounds (one step of each variant per round); 0: memory only.")
    p.add_argument("--chunk", type=int, default=256, help="Loss chunk size (train.loss_chunk_size): positions "
                   "per sequence on the logits path, scored tokens of the batch on the fused path.")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m", help="Model dimensions.")
    p.add_argument("--layers", type=int, default=None, help="Decoder layers (default: the shape's).")
    p.add_argument("--gradient-checkpointing", action="store_true", help="Checkpoint every decoder layer.")
    p.add_argument("--keep-grads", action="store_true",
                   help="Keep the gradient buffers between steps (zeroed, not freed), as DeepSpeed keeps its "
                   "gradient partitions and as every micro-batch after the first of an accumulation window "
                   "finds them; default: freed after each step (torch's and the HF Trainer's zero_grad).")
    p.add_argument("--variants", default=None, help=f"Comma-separated subset of {','.join(VARIANTS)} "
                   "(default: all; sft_liger only where liger-kernel imports). sft is always included.")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the CPU time of a step is its work, even on a busy machine).")
    p.add_argument("--phase", choices=("time", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    chosen = VARIANTS if args.variants is None else tuple(v for v in args.variants.split(",") if v)
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    args.variants = tuple(v for v in VARIANTS if v in chosen or v == "sft")
    if "sft_liger" in args.variants and not liger_available():
        args.variants = tuple(v for v in args.variants if v != "sft_liger")
    if args.phase == "time":
        print(json.dumps(run_timing(args)))
        return
    if args.phase == "memory":
        print(json.dumps(run_memory(args)))
        return

    mem = {v: _sub(args, "--phase=memory", f"--variant={v}") for v in args.variants}  # a fresh process each
    timing = _sub(args, "--phase=time") if args.steps > 0 else None
    out = report(args, mem, timing)
    if not liger_available():
        out["sft_liger"] = "not measured: liger-kernel does not import here"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
