"""python benchmarks/bench_lookahead_replay.py --trace FILE [--shape smollm2-135m|llama-1b|tiny] [--rounds 2] [--out FILE]

The word lookahead's cost on whatever device is present (CUDA if available, else CPU), from the
shapes of its forwards on a real teacher. Why: the GPU machine cannot hold the real teacher (the
SmolLM2 GGUF is 94 MB; a device call carries 64 MiB), and the lookahead's cost is set by how many
paths the teacher's own distributions keep alive, which a random-init model does not reproduce.

`python benchmarks/bench_lookahead.py --trace FILE` records, on the real SmolLM2-135M-Instruct, every
forward of the model's body during the teacher stage's lookahead (per sequence: the shared forward
of the sequence, then each token-tree step: paths fed, keys in the cache before them) and the
teacher stage's sequences (lengths, response lengths). This script replays them on a random-init
Llama of `--shape` with the trace's vocabulary (bf16 on CUDA, fp32 on CPU, sdpa): the shared
forward through the body with the word starts' rows projected per chunk and top-k'd in fp32, then
each step as the tree runs it (the same tokens fed, the same cache lengths, a dense additive 4-D
mask of the same size, the chunk's cache started again from the context's keys, logits for every
fed row, then the fp32 log-softmax, the word-end log-sum-exp, the top word pieces and their copy to
the host), and the teacher stage's forward (profuser.prep.teacher.forward_batches, its batching) on
random sequences of the recorded lengths. The work of a forward depends on its shapes, not on the
weights' values. Prints one JSON line with `ratio_replay_over_teacher_forward` (median over
--rounds, interleaved; wall time, CUDA synchronized). What the replay leaves out is the beam's
bookkeeping in Python (paths, texts, masks' contents): run this on the CPU that recorded the trace
and compare with bench_lookahead's own ratio to see its share.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class ForwardTrace:
    """Records [batch, tokens fed, keys in the cache before them] of every forward of `model`'s body
    while `on` is set, into the list `forwards` (bench_lookahead --trace; tests)."""

    def __init__(self, model):
        self.on, self.forwards = False, []
        model.base_model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        ids, past = kwargs.get("input_ids", args[0] if args else None), kwargs.get("past_key_values")
        if self.on and ids is not None:
            self.forwards.append([int(ids.shape[0]), int(ids.shape[1]),
                                  int(past.get_seq_length()) if past is not None else 0])

    def sequence(self, fn, enc, cost: dict):
        """fn() (one sequence's lookahead, accumulating `cost`) recorded: (its result, the trace's
        entry for the sequence)."""
        before, self.forwards, self.on = cost.get("word_starts", 0), [], True
        try:
            out = fn()
        finally:
            self.on = False
        return out, {"length": len(enc.input_ids), "prompt": enc.prompt_len, "forwards": self.forwards,
                     "word_starts": cost["word_starts"] - before}


def replay(model, trace: dict, device: str) -> int:
    """The trace's lookahead forwards on `model`; returns the rows projected onto the vocabulary."""
    import torch
    from transformers import DynamicCache

    from profuser.models import split_head

    la, V = trace["lookahead"], model.config.vocab_size
    k, branch = trace["topk"], la["branch"]
    per = max(1, trace["batch_tokens"] // max(1, la["beam"] * la["steps"]))
    gen = torch.Generator().manual_seed(1)
    pieces = torch.rand(V, generator=gen).lt(0.5).to(device)  # stand-ins for the word-piece / ender masks
    enders = ~pieces
    body, project = split_head(model, list(range(16)))
    rows = 0
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        for seq in trace["lookahead_sequences"]:
            fw = seq["forwards"]
            if not fw:
                continue
            if fw[0][2] != 0 or any(b != 1 for b, _, _ in fw):
                raise SystemExit("the trace is not a token tree (a shared forward, then batch-1 steps): the teacher "
                                 "ran the lookahead's prefill-per-word-start fallback, which this script does not replay")
            T = fw[0][1]
            out = body(input_ids=torch.randint(V, (1, T), generator=gen).to(device), past_key_values=DynamicCache(),
                       use_cache=True)
            n = seq["word_starts"]
            hidden = out.last_hidden_state[0, -n:]
            kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            for c0 in range(0, n, per):  # the chunks' first rows
                first = project(hidden[c0:c0 + per]).float().log_softmax(-1)
                first.topk(k, dim=-1)[0].tolist()
                rows += first.shape[0]
            cache = None
            for b, fed, past in fw[1:]:
                if past < T:  # the tree's one-token check (once per model): not the lookahead's work
                    continue
                if past == T or cache is None:  # a chunk starts again from the context's keys
                    cache = DynamicCache(ddp_cache_data=[(a, v) for a, v in kv])
                mask = torch.zeros((1, 1, fed, past + fed), dtype=dtype, device=device)
                pos = torch.arange(past, past + fed, device=device)[None]
                logits = model(input_ids=torch.randint(V, (b, fed), generator=gen).to(device), attention_mask=mask,
                               position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=fed).logits
                row = logits[0].float().log_softmax(-1)
                row.masked_fill(~enders, -float("inf")).logsumexp(-1).tolist()
                cv, ci = row.masked_fill(~pieces, -float("inf")).topk(branch, dim=-1)
                cv.tolist(), ci.tolist()  # to the host, as the beam reads them
                rows += fed  # the step's keys stay in the cache: the chunk's later steps attend to them
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", required=True, help="The JSON that bench_lookahead.py --trace wrote.")
    ap.add_argument("--shape", default="smollm2-135m", choices=["smollm2-135m", "llama-1b", "tiny"],
                    help="Model dimensions to replay on (bench_prep's SHAPES; the trace's own teacher is smollm2-135m).")
    ap.add_argument("--rounds", type=int, default=2, help="Interleaved (teacher forward, replay) rounds.")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads on CPU.")
    ap.add_argument("--out", default=None, help="Also write the JSON here.")
    args = ap.parse_args(argv)

    import torch

    from bench_prep import Clock, build_model
    from profuser.prep.teacher import forward_batches, plan_batches

    trace = json.loads(Path(args.trace).read_text())
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if not cuda:
        torch.set_num_threads(args.threads)
    model = build_model(args.shape, None, device, dtype, vocab=trace["vocab"])[0]
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(trace["vocab"], (L,), generator=gen).tolist() for L, _ in trace["teacher_sequences"]]
    n_resp = [r for _, r in trace["teacher_sequences"]]
    batches = plan_batches([len(s) - 1 for s in seqs], trace["batch_tokens"], 8)

    timed = Clock(device)

    def clock(fn):  # (wall seconds, result)
        (wall, _), out = timed(fn)
        return wall, out

    def teacher():
        for _ in forward_batches(model, seqs, n_resp, batches, trace["topk"], 1024, 0):
            pass

    clock(teacher)  # warm-up: kernels, the head check, allocator
    clock(lambda: replay(model, {**trace, "lookahead_sequences": trace["lookahead_sequences"][:1]}, device))
    t_fw, t_re, rows = [], [], 0
    for _ in range(args.rounds):
        t_fw.append(clock(teacher)[0])
        dt, rows = clock(lambda: replay(model, trace, device))
        t_re.append(dt)
    steps = sum(len(s["forwards"]) for s in trace["lookahead_sequences"])
    result = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}), "
                                                            f"{args.threads} torch threads",
        "dtype": str(dtype).replace("torch.", ""), "shape": args.shape, "trace_teacher": trace["teacher"],
        "sequences": len(trace["lookahead_sequences"]), "forwards": steps, "vocabulary_rows": rows,
        "response_tokens": sum(n_resp), "teacher_forward_seconds": [round(x, 3) for x in t_fw],
        "replay_seconds": [round(x, 3) for x in t_re],
        "ratio_replay_over_teacher_forward": round(statistics.median(r / f for r, f in zip(t_re, t_fw)), 2),
    }
    text = json.dumps(result)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
