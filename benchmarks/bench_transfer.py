"""python benchmarks/bench_transfer.py [--teacher-sentences 3000] [--student-sentences 200] [--seed 0]

Does the transferred teacher signal carry the teacher's knowledge across tokenizers?

A corpus where knowledge is worth distilling: sentences drawn from a random first-order Markov chain
over ~120 English words (each word has 4 possible successors with random probabilities), rendered as
chat answers to one fixed short prompt. The next word is genuinely uncertain, so a teacher that has seen
many sentences knows the transition probabilities, and a student that sees few sentences cannot
learn them from its one-hot labels alone.

For every tokenizer family Y of profuser.tiny (chatml_bpe, vicuna_spm, gemma_unigram):
- a teacher per family is trained (SFT, same steps, same --teacher-sentences sentences) on its own
  tokenizer and chat template, its weights kept every --snapshot-every steps with their held-out
  bits per byte. The families do not reach the same quality in the same steps (the Unigram fixture
  ends weakest), so for each pair X -> Y the two teachers are matched: the weaker family's final
  teacher, and the stronger family's snapshot whose held-out bits per byte is closest to it (both
  printed under "teachers");
- a student of family Y starts from the same random init each time and is trained with the same
  steps on the same --student-sentences sentences by
    (a) SFT only (CE on the labels),
    (b) the project's distillation (profuser.losses.fusion_loss, forward KL, beta 1) from the
        same-tokenizer teacher of the pair's quality (the rows copied, as the align stage's copy path
        does),
    (c) the project's distillation from the cross-tokenizer teacher X of the same quality through the
        align stage's own functions (profuser.prep.align_stage.align_sample: response re-tokenized,
        projected by profuser.transfer with the target's trie, vocabulary tables by
        profuser.vocab_map);
- each student's held-out bits per byte of response text (the tokens that encode the text, end of
  turn excluded, over its UTF-8 bytes) on fresh sentences of the same chain;
- tv_to_same_tokenizer_teacher: the mean total-variation distance between (c)'s rows and (b)'s rows
  at the student's positions (no training involved: a low-noise view of the same question);
- word_start_agreement: the share of the corpus words whose first teacher token goes, by the rule's
  vocabulary table, to the student's own first token of the word (no training; the same for every
  seed): where it misses, a next-word candidate teaches a token the student does not start that word
  with.

transfer_efficiency(X -> Y) = (bpb_a - bpb_c) / (bpb_a - bpb_b): 1 means the cross-tokenizer teacher
helps as much as a same-tokenizer one. Goal >= 0.8 for every pair. Printed twice, side by side:
"after" = this project's rule (every covered position, longest-prefix vocabulary, the teacher's rest
as an "other" bucket) and "before" = the earlier rule (1:1 spans only, exact-surface vocabulary map,
the teacher renormalized over its surviving entries), each against (b) trained with the same loss.
One JSON object on stdout; progress on stderr. One torch thread (--threads).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A sentence?"}]
K = 10


def say(msg: str) -> None:
    print(f"[bench_transfer] {msg}", file=sys.stderr, flush=True)


# --- the corpus -----------------------------------------------------------------------------------

def markov_chain(seed: int, n_words: int = 120, fanout: int = 4):
    from profuser.tiny import corpus_lines

    counts = Counter(w for line in corpus_lines() for w in re.findall(r"\b[a-z]{3,}\b", line.lower()))
    words = [w for w, _ in counts.most_common(n_words)]
    rng = np.random.default_rng(seed)
    succ = {w: rng.choice(len(words), size=fanout, replace=False) for w in words}
    probs = {w: rng.dirichlet(np.full(fanout, 0.7)) for w in words}
    return words, succ, probs


def sentences(chain, n: int, seed: int) -> list[str]:
    words, succ, probs = chain
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = words[rng.integers(len(words))]
        seq = [w]
        for _ in range(int(rng.integers(5, 12))):
            w = words[succ[w][rng.choice(len(succ[w]), p=probs[w])]]
            seq.append(w)
        out.append(" ".join(seq).capitalize() + ".")
    return out


# --- models and training ----------------------------------------------------------------------------

class ChatSide:
    """What align_sample needs of a model: a tokenizer, its chat template and a name."""

    def __init__(self, family: str):
        from types import SimpleNamespace

        from profuser.chat import BUILTIN_TEMPLATES, end_of_turn_id
        from profuser.tiny import FAMILIES, build_tokenizer

        self.family = family
        self.tokenizer = build_tokenizer(family)
        self.template = BUILTIN_TEMPLATES[FAMILIES[family][2]]
        self.arch = FAMILIES[family][3]
        self.spec = SimpleNamespace(name=family)
        self.eot = end_of_turn_id(self.tokenizer, self.template)

    def encode(self, sentence: str):
        from profuser.chat import encode_chat

        return encode_chat(self.tokenizer, self.template, PROMPT, sentence)

    def model(self, seed: int):
        from profuser.tiny import build_model

        return build_model(self.arch, len(self.tokenizer), seed, self.tokenizer, hidden=64, layers=2)


def train(model, rows: list[dict], steps: int, lr: float, batch: int, seed: int, pad: int, rest: str = "other",
          snapshots: list | None = None, every: int = 25):
    """AdamW on fusion_loss over random batches of `rows` (CE only where a row has no teacher). With
    `snapshots`, (step, copy of the weights) is appended every `every` steps and at the end."""
    import copy

    import torch

    from profuser.losses import fusion_loss
    from profuser.train.collator import collate_mode

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(rows), (min(batch, len(rows)),), generator=gen).tolist()
        b = collate_mode([rows[i] for i in idx], pad)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        parts = fusion_loss(logits, b["labels"], b["topk_ids"], b["topk_logprobs"], rest=rest)
        opt.zero_grad()
        parts.mean().backward()
        opt.step()
        if snapshots is not None and ((step + 1) % every == 0 or step + 1 == steps):
            snapshots.append((step + 1, copy.deepcopy(model.state_dict())))
    model.eval()
    return model


def bits_per_byte(model, side: ChatSide, held_out: list[str]) -> float:
    """NLL of the response text's tokens (end of turn excluded) per UTF-8 byte, in bits."""
    import torch

    nll = 0.0
    nbytes = 0
    special = side.tokenizer.all_special_ids
    with torch.no_grad():
        for s in held_out:
            enc = side.encode(s)
            ids = torch.tensor([enc.input_ids])
            logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            tok = torch.tensor(enc.input_ids[1:])
            per = -logp.gather(1, tok[:, None]).squeeze(1)[enc.prompt_len - 1:]
            mask = torch.tensor(enc.text_tokens(s, special))
            nll += float(per[mask].sum())
            nbytes += len(s.encode())
    return nll / (math.log(2) * nbytes)


def sft_rows(side: ChatSide, sents: list[str]) -> list[dict]:
    rows = []
    for s in sents:
        e = side.encode(s)
        rows.append({"input_ids": np.asarray(e.input_ids), "labels": np.asarray(e.labels)})
    return rows


def teacher_rows(teacher, side: ChatSide, sents: list[str]) -> list[dict]:
    """The teacher stage's own forward (fp32 top-k + per-token log-probs) on each sentence."""
    from profuser.prep.teacher import teacher_forward

    out = []
    for s in sents:
        e = side.encode(s)
        r = len(e.input_ids) - e.prompt_len
        o = teacher_forward(teacher, [e.input_ids], [r], K)[0]
        out.append({"sentence": s, "token_ids": np.asarray(e.input_ids[e.prompt_len:]), "token_logprobs": -o.nll,
                    "topk_ids": o.topk_ids, "topk_logprobs": o.topk_logprobs})
    return out


def distill_rows(student: ChatSide, teacher: ChatSide, trows: list[dict], rule: str,
                 trie: bool = True) -> tuple[list[dict], dict]:
    """Student rows with the teacher's distributions re-expressed on the student's tokens.

    rule "after": the align stage's align_sample (copy path for identical tokenizers, else
    profuser.transfer's projection with prefix tables); "before": the earlier 1:1 rule
    (align_response spans + exact-surface vocabulary map, vocab_map.aligned_topk)."""
    from profuser.align import align_response, same_tokenizer
    from profuser.chat import split_response
    from profuser.prep.align_stage import Pair, Target, align_sample
    from profuser.vocab_map import aligned_topk, build_vocab_map, pair_tables, prefix_trie

    pairs = {teacher.eot: student.eot}
    same = same_tokenizer(teacher.tokenizer, student.tokenizer)
    first, by_byte = pair_tables(teacher.tokenizer, student.tokenizer, "prefix", pairs)
    exact = build_vocab_map(teacher.tokenizer, student.tokenizer, "exact", pairs)
    copy = same and teacher.eot == student.eot
    pair = Pair(teacher.family, teacher, teacher.eot, same, copy, first, by_byte, 1.0, "spans",
                prefix_trie(student.tokenizer) if trie and not copy else None)
    tgt = Target(student, student.eot, 4096)
    msgs = PROMPT
    rows, covered, positions = [], 0, 0
    for t in trows:
        s = t["sentence"]
        if rule == "after":
            a = align_sample(pair, tgt, "truncate_left", msgs, s, t["token_ids"], t["token_logprobs"],
                             t["topk_ids"], t["topk_logprobs"])
            ids, lps = a["topk_ids"], a["topk_logprobs"]
            n_resp = a["n_response"]
        else:
            e = student.encode(s)
            sp, sr = split_response(teacher.tokenizer, teacher.template, msgs, s)
            tp, tr = split_response(student.tokenizer, student.template, msgs, s)
            al = align_response(teacher.tokenizer, sp + sr, len(sp), student.tokenizer, tp + tr, len(tp), s,
                                teacher.eot, student.eot)
            if al.method == "copy":
                m_ids, m_lps = np.asarray(t["topk_ids"], np.int64)[al.tgt_to_src], t["topk_logprobs"][al.tgt_to_src]
            else:
                m_ids, m_lps, _ = aligned_topk(al.tgt_to_src, t["topk_ids"], t["topk_logprobs"], exact)
            P = e.prompt_len
            ids = np.full((len(e.input_ids), K), -1, dtype=np.int32)
            lps = np.full((len(e.input_ids), K), -np.inf, dtype=np.float16)
            ids[P:], lps[P:] = m_ids, m_lps
            n_resp = len(e.input_ids) - P
        e = student.encode(s)
        rows.append({"input_ids": np.asarray(e.input_ids), "labels": np.asarray(e.labels),
                     "topk_ids": np.asarray(ids, dtype=np.int32), "topk_logprobs": np.asarray(lps, dtype=np.float16)})
        covered += int((np.asarray(ids)[-n_resp:, 0] >= 0).sum())
        positions += n_resp
    return rows, {"coverage": round(covered / positions, 4)}


def word_start_agreement(teacher: ChatSide, student: ChatSide, words: list[str], rule: str) -> float:
    """Share of the corpus words whose first teacher token (the word after another: " w") goes by the
    rule's vocabulary table ("after": vocab_map.pair_tables' longest-prefix map; "before": identical
    surfaces) to the student tokenizer's own first token of that word. A next-word candidate of the
    teacher gives its probability to that table entry, so where the two differ the student is taught a
    token its own tokenizer does not start the word with. No training: the same for every seed."""
    from profuser.align import token_spans
    from profuser.vocab_map import build_vocab_map, pair_tables

    pairs = {teacher.eot: student.eot}
    table = (pair_tables(teacher.tokenizer, student.tokenizer, "prefix", pairs)[0] if rule == "after"
             else build_vocab_map(teacher.tokenizer, student.tokenizer, "exact", pairs))
    hit = 0
    for w in words:
        text = f"{words[0]} {w} {words[0]}"
        lo = len(words[0])

        def first_token(tok) -> int:
            sp = token_spans(tok, text)
            return int(sp.ids[np.flatnonzero((sp.starts >= lo) & (sp.starts < lo + 1 + len(w)))[0]])

        hit += int(table[first_token(teacher.tokenizer)] == first_token(student.tokenizer))
    return round(hit / len(words), 4)


def row_distance(rows: list[dict], same: list[dict]) -> float:
    """Mean total-variation distance between the transferred teacher rows and the same-family
    teacher's own rows, over the response positions where both have entries (each row's entries
    plus its "other" bucket): how far the signal that reaches a student is from the one a teacher of
    its own family would give. No student is trained for it, so it is far less noisy than the
    efficiency (it also counts where the two teachers simply disagree)."""
    tv, n = 0.0, 0
    for r, q in zip(rows, same):
        pos = np.flatnonzero((np.asarray(r["topk_ids"])[:, 0] >= 0) & (np.asarray(q["topk_ids"])[:, 0] >= 0)
                             & (np.asarray(q["labels"]) >= 0))
        for p in pos:
            a = {int(i): math.exp(float(v)) for i, v in zip(r["topk_ids"][p], r["topk_logprobs"][p]) if i >= 0}
            b = {int(i): math.exp(float(v)) for i, v in zip(q["topk_ids"][p], q["topk_logprobs"][p]) if i >= 0}
            diff = sum(abs(a.get(i, 0.0) - b.get(i, 0.0)) for i in a.keys() | b.keys())
            tv += 0.5 * (diff + abs(sum(b.values()) - sum(a.values())))
            n += 1
    return tv / max(n, 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-sentences", type=int, default=3000, help="sentences each teacher is trained on")
    p.add_argument("--student-sentences", type=int, default=200, help="sentences the students are trained on")
    p.add_argument("--held-out", type=int, default=200, help="fresh sentences for the bits-per-byte figures")
    p.add_argument("--teacher-steps", type=int, default=400, help="teacher training steps (batch 32)")
    p.add_argument("--student-steps", type=int, default=150, help="student training steps (batch 16)")
    p.add_argument("--no-trie", action="store_true",
                   help="run the 'after' rule without its trie steps (profuser.transfer steps 3, 5, 6), as first built")
    p.add_argument("--snapshot-every", type=int, default=25,
                   help="keep each teacher's weights every N steps, for matching teacher quality between families")
    p.add_argument("--seed", type=int, default=0, help="seed of the chain, the data and the inits")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these tiny models, and on a loaded machine)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds (e.g. 0,1,2): run the benchmark once per seed in its own process and "
                        "print every run plus, per pair, the efficiency of the seed-averaged bits per byte and its "
                        "per-seed range (one seed's figure moves a lot: the students see 200 sentences)")
    p.add_argument("--jobs", type=int, default=1, help="with --seeds: runs at a time (one core each)")
    args = p.parse_args(argv)
    if args.seeds:
        return over_seeds(args, argv if argv is not None else sys.argv[1:])

    import torch

    torch.set_num_threads(args.threads)
    t_start = time.time()
    from profuser.tiny import SOURCES as FAMS

    chain = markov_chain(args.seed)
    teach_sents = sentences(chain, args.teacher_sentences, args.seed + 1)
    student_sents = sentences(chain, args.student_sentences, args.seed + 2)
    held_out = sentences(chain, args.held_out, args.seed + 3)
    sides = {f: ChatSide(f) for f in FAMS}

    # every teacher is trained the same way, with its weights kept every --snapshot-every steps and
    # their held-out bits per byte measured: the families do not reach the same quality in the same
    # steps, so each pair compares teachers of matched quality (below)
    curves, teacher_bpb = {}, {}
    for f, side in sides.items():
        t0 = time.time()
        snaps: list = []
        train(side.model(args.seed + 10), sft_rows(side, teach_sents), args.teacher_steps, 3e-3, 32, args.seed,
              side.tokenizer.pad_token_id, snapshots=snaps, every=args.snapshot_every)
        probe = side.model(args.seed + 10)
        curves[f] = []
        for step, weights in snaps:
            probe.load_state_dict(weights)
            probe.eval()
            curves[f].append((step, round(bits_per_byte(probe, side, held_out), 4), weights))
        teacher_bpb[f] = curves[f][-1][1]
        say(f"teacher {f}: held-out {teacher_bpb[f]} bits/byte after {args.teacher_steps} steps ({time.time() - t0:.0f}s)")

    def matched(f: str, level: float) -> tuple[int, float]:
        """(step, bpb) of family f's snapshot whose held-out bits per byte is closest to `level`."""
        step, bpb, _ = min(curves[f], key=lambda c: (abs(c[1] - level), -c[0]))
        return step, bpb

    row_cache: dict = {}

    def trows(f: str, step: int) -> list[dict]:
        if (f, step) not in row_cache:
            m = sides[f].model(args.seed + 10)
            m.load_state_dict(next(w for s_, _, w in curves[f] if s_ == step))
            m.eval()
            row_cache[(f, step)] = teacher_rows(m, sides[f], student_sents)
        return row_cache[(f, step)]

    def student(y: str, rows: list[dict], rest: str) -> float:
        s = sides[y]
        m = train(s.model(args.seed + 20), rows, args.student_steps, 3e-3, 16, args.seed, s.tokenizer.pad_token_id,
                  rest=rest)
        return round(bits_per_byte(m, s, held_out), 4)

    result = {"device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} torch threads",
              "corpus": {"words": len(chain[0]), "teacher_sentences": args.teacher_sentences,
                         "student_sentences": args.student_sentences, "held_out": args.held_out},
              "teacher_bpb": teacher_bpb, "pairs": {}}
    rests = {"after": "other", "before": "renormalize"}
    b_cache: dict = {}
    for y in FAMS:
        sy = sides[y]
        bpb_a = student(y, sft_rows(sy, student_sents), "other")
        say(f"student {y}: sft {bpb_a}")
        for x in FAMS:
            if x == y:
                continue
            # teachers of the same quality: the stronger family's snapshot closest to the weaker's final
            level = max(teacher_bpb[x], teacher_bpb[y])
            (sx, vx), (sy_step, vy) = matched(x, level), matched(y, level)
            entry = {"bpb_sft": bpb_a, "teachers": {"cross": {"family": x, "step": sx, "bpb": vx},
                                                    "same": {"family": y, "step": sy_step, "bpb": vy}}}
            for rule, rest in rests.items():
                same_rows = distill_rows(sy, sides[y], trows(y, sy_step), rule)[0]
                if (y, sy_step, rule) not in b_cache:
                    b_cache[(y, sy_step, rule)] = student(y, same_rows, rest)
                bpb_b = b_cache[(y, sy_step, rule)]
                rows, info = distill_rows(sy, sides[x], trows(x, sx), rule, trie=not args.no_trie)
                bpb_c = student(y, rows, rest)
                gain = bpb_a - bpb_b
                entry[rule] = {"bpb_same_tokenizer_teacher": bpb_b, "bpb_cross_tokenizer_teacher": bpb_c,
                               "coverage": info["coverage"],
                               "word_start_agreement": word_start_agreement(sides[x], sy, chain[0], rule),
                               "tv_to_same_tokenizer_teacher": round(row_distance(rows, same_rows), 4),
                               "transfer_efficiency": round((bpb_a - bpb_c) / gain, 3) if gain > 0 else None}
            say(f"{x} -> {y}: {json.dumps(entry)}")
            result["pairs"][f"{x} -> {y}"] = entry
    eff = {rule: [v[rule]["transfer_efficiency"] for v in result["pairs"].values()] for rule in rests}
    result["min_transfer_efficiency"] = {rule: min((e for e in v if e is not None), default=None)
                                         for rule, v in eff.items()}
    result["seconds"] = round(time.time() - t_start, 1)
    print(json.dumps(result, indent=1))


def over_seeds(args, argv: list[str]) -> None:
    """One process per seed (--jobs at a time); the JSON of every run and a per-pair summary."""
    import subprocess

    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    rest, skip = [], False
    for a in argv:  # this command line without --seeds/--jobs/--seed
        if skip:
            skip = False
        elif a in ("--seeds", "--jobs", "--seed"):
            skip = True
        elif not a.startswith(("--seeds=", "--jobs=", "--seed=")):
            rest.append(a)
    t0, runs, pending = time.time(), {}, list(seeds)
    live: dict[int, subprocess.Popen] = {}
    while pending or live:
        while pending and len(live) < max(1, args.jobs):
            s = pending.pop(0)
            live[s] = subprocess.Popen([sys.executable, __file__, "--seed", str(s), *rest], stdout=subprocess.PIPE, text=True)
        for s, proc in list(live.items()):
            if proc.poll() is not None:
                out = proc.stdout.read()
                if proc.returncode != 0:
                    raise SystemExit(f"bench_transfer --seed {s} failed (exit {proc.returncode})")
                runs[s] = json.loads(out)
                del live[s]
        time.sleep(1)
    summary = {}
    for pair in runs[seeds[0]]["pairs"]:
        entry = {}
        for rule in ("after", "before"):
            per = [runs[s]["pairs"][pair][rule] for s in seeds]
            a = np.mean([runs[s]["pairs"][pair]["bpb_sft"] for s in seeds])
            b = np.mean([e["bpb_same_tokenizer_teacher"] for e in per])
            c = np.mean([e["bpb_cross_tokenizer_teacher"] for e in per])
            effs = [e["transfer_efficiency"] for e in per if e["transfer_efficiency"] is not None]
            entry[rule] = {"transfer_efficiency": round(float((a - c) / (a - b)), 3) if a > b else None,
                           "per_seed": [e["transfer_efficiency"] for e in per],
                           "word_start_agreement": per[0].get("word_start_agreement"),
                           "tv_to_same_tokenizer_teacher": round(float(np.mean(
                               [e.get("tv_to_same_tokenizer_teacher", np.nan) for e in per])), 4),
                           "min": min(effs, default=None), "max": max(effs, default=None)}
        summary[pair] = entry
    teacher_bpb = {f: round(float(np.mean([runs[s]["teacher_bpb"][f] for s in seeds])), 4)
                   for f in runs[seeds[0]]["teacher_bpb"]}
    print(json.dumps({"device": runs[seeds[0]]["device"], "seeds": seeds, "jobs": args.jobs,
                      "teacher_bpb_mean": teacher_bpb,
                      "transfer_efficiency_of_means": summary,
                      "min_transfer_efficiency": {r: min((v[r]["transfer_efficiency"] for v in summary.values()
                                                          if v[r]["transfer_efficiency"] is not None), default=None)
                                                  for r in ("after", "before")},
                      "seconds": round(time.time() - t0, 1), "runs": {str(s): runs[s] for s in seeds}}, indent=1))


if __name__ == "__main__":
    main()
