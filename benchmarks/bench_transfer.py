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

Three diagnostics, off by default (a seed takes about 7 minutes with --peer, 9.5 with --ideal, 9
with --lookahead, against 6):
- --peer: a second teacher of every family (another init and batch order, the same data), matched
  like (b) and distilled the same way (rows copied): peer_efficiency = (bpb_a - bpb_peer) /
  (bpb_a - bpb_b), what ANOTHER model of the same quality and the same tokenizer transfers;
- --ideal: WordOracle's rows: the cross-tokenizer teacher's own probabilities of every corpus word
  (and of the sentence's end) after each context, spelled with the student's own tokens and
  conditioned on the student's tokens of the word so far. No rule, no vocabulary table, no top-k of
  the teacher's rows: what a perfect transfer of the teacher's next-word knowledge gives, the
  ceiling of any rule; the same oracle on the same-family teacher checks the oracle itself (its
  rows should be close to that teacher's own rows, and teach as well). Printed twice: "ideal"
  divides each word's first position by the teacher's mass on the corpus's outcomes (knowledge of
  the corpus's word list no transfer has: it also removes the teacher's mass on non-words), and
  "unnormalized" gives it as the teacher does, the rest in the loss's "other" bucket as the
  project's rows keep it;
- --lookahead: the rows of the prep path with prep.lookahead on: the cross-tokenizer teacher's
  word outcomes at each word start (the teacher stage's own call, profuser.prep.teacher.
  lookahead_outcomes: its top-k next tokens, each followed to the end of its word by a beam over its
  own continuations, and its end of turn)
  applied by the align stage's own align_sample (outcomes spelled with the student's tokens,
  conditioned on its tokens of the word so far), with nothing of the corpus; and its cost per word
  start (outcomes, beam tokens, context tokens).

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
from typing import Optional

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


def teacher_rows(teacher, side: ChatSide, sents: list[str], lookahead: Optional[dict] = None,
                 cost: Optional[dict] = None) -> list[dict]:
    """The teacher stage's own forward (fp32 top-k + per-token log-probs) on each sentence; with
    `lookahead` (prep.lookahead's branch/beam/steps/min_prob), also the teacher stage's word outcomes
    (its own call, profuser.prep.teacher.lookahead_outcomes, with prep.topk = K), their cost
    accumulated in `cost`."""
    from types import SimpleNamespace

    from profuser.config import LookaheadConfig, PrepConfig
    from profuser.prep.teacher import lookahead_outcomes, teacher_forward

    out = []
    if lookahead is not None:
        prep = PrepConfig(topk=K, lookahead=LookaheadConfig(enabled=True, **lookahead))
        chat_model = SimpleNamespace(model=teacher, tokenizer=side.tokenizer, template=side.template)
    for s in sents:
        e = side.encode(s)
        r = len(e.input_ids) - e.prompt_len
        o = teacher_forward(teacher, [e.input_ids], [r], K)[0]
        row = {"sentence": s, "token_ids": np.asarray(e.input_ids[e.prompt_len:]), "token_logprobs": -o.nll,
               "topk_ids": o.topk_ids, "topk_logprobs": o.topk_logprobs, "lookahead": None}
        if lookahead is not None:
            oc = lookahead_outcomes(chat_model, e, e.text_tokens(s), prep, cost)
            row["lookahead"] = (oc.rows, oc.texts, oc.logprobs)
        out.append(row)
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
    rows, covered, positions, looked = [], 0, 0, 0
    for t in trows:
        s = t["sentence"]
        if rule == "after":
            a = align_sample(pair, tgt, "truncate_left", msgs, s, t["token_ids"], t["token_logprobs"],
                             t["topk_ids"], t["topk_logprobs"], t.get("lookahead"))
            ids, lps = a["topk_ids"], a["topk_logprobs"]
            n_resp = a["n_response"]
            looked += a["n_lookahead"]
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
    return rows, {"coverage": round(covered / positions, 4), "lookahead_share": round(looked / positions, 4)}


def region_tokens(side: ChatSide, text: str) -> Optional[tuple[int, ...]]:
    """The tokens `side` spells a word region with (" word", " word." or "."), read from a chat
    rendering of the response "Xx" + text + " xx" (so the region sits between two words, as in the
    corpus); None when its tokens do not start and end exactly at the region's bounds."""
    resp = "Xx" + text + (" xx" if not text.endswith(".") else "")
    e = side.encode(resp)
    c = e.text.find(resp, e.boundary)
    spans = np.asarray(e.offsets[e.prompt_len:], dtype=np.int64).reshape(-1, 2) - c
    ids = e.input_ids[e.prompt_len:]
    inside = [j for j in range(len(spans)) if 2 <= spans[j, 0] < 2 + len(text)]
    if not inside or spans[inside[0], 0] != 2 or spans[inside[-1], 1] != 2 + len(text):
        return None
    return tuple(int(ids[j]) for j in inside)


class WordOracle:
    """bench-only --ideal: what a perfect cross-tokenizer transfer of the teacher's next-WORD
    knowledge would give. At each context (a sentence's first i words), the teacher's probability of
    every corpus outcome -- " w" then a space, " w." (the sentence ends with w), or "." (it ends here)
    -- from the teacher itself along its own tokens of the outcome; a student position inside word
    i gets P(student's next token | its tokens of word i so far) over those outcomes, spelled with the
    student's OWN tokens. No rule, no vocabulary table, no top-k of the teacher's rows: the ceiling of
    any transfer rule on this corpus (one assumption: both tokenizers split at spaces)."""

    def __init__(self, words: list[str]):
        self.words = words
        self._seq: dict = {}
        self._ctx: dict = {}
        self._space: dict = {}

    def space(self, side: ChatSide, n: int):
        """bool tensor [n] (cached per family): the token id's surface starts with a space (special
        tokens: False)."""
        key = (side.family, n)
        if key not in self._space:
            import torch

            from profuser.align import surfaces

            surf = surfaces(side.tokenizer)
            self._space[key] = torch.tensor([i < len(surf.surfaces) and not surf.special[i]
                                               and surf.surfaces[i][:1] == b" " for i in range(n)])
        return self._space[key]

    def seq(self, side: ChatSide, text: str):
        key = (side.family, text)
        if key not in self._seq:
            self._seq[key] = region_tokens(side, text)
        return self._seq[key]

    def outcomes(self, model, side: ChatSide, ctx: str) -> dict[str, float]:
        """log P_teacher(outcome | prompt, ctx) for the outcomes " w ", " w." (every word w), one batch."""
        import torch

        e = side.encode(ctx)
        head = list(e.input_ids[:e.prompt_len]) + [t for t, keep in zip(e.input_ids[e.prompt_len:],
                                                                        e.text_tokens(ctx)) if keep]
        names, tails, ends = [], [], []
        for w in self.words:
            for tail in (" ", "."):
                sq = self.seq(side, " " + w + ("." if tail == "." else ""))
                if sq is None:
                    continue
                names.append(" " + w + tail)
                tails.append(list(sq))
                ends.append(tail == " ")
        # the context once (its cache shared by every outcome), then the outcomes' own tokens
        width = max(len(q) for q in tails)
        pad = side.tokenizer.pad_token_id or 0
        ids = torch.tensor([q + [pad] * (width - len(q)) for q in tails])
        lens = torch.tensor([len(q) for q in tails])
        n0, B = len(head), len(tails)
        with torch.inference_mode():
            first = model(input_ids=torch.tensor([head]), use_cache=True)
            cache = first.past_key_values
            cache.batch_repeat_interleave(B)
            mask = torch.cat([torch.ones(B, n0, dtype=torch.long),
                              (torch.arange(width)[None, :] < lens[:, None]).long()], dim=1)
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
            # position t of the outcome is predicted by the context's last logits (t = 0) or the
            # outcome's token t - 1
            pred = torch.cat([first.logits[:, -1:].expand(B, 1, -1), logits], dim=1).float().log_softmax(-1)
        space = self.space(side, pred.shape[-1])
        tok = torch.cat([ids, torch.full((B, 1), pad)], dim=1)
        got = pred.gather(2, tok[:, :, None]).squeeze(2)  # [B, width + 1]
        valid = torch.arange(width + 1)[None, :] < lens[:, None]
        lp = torch.where(valid, got, torch.zeros_like(got)).sum(1)
        after = pred[torch.arange(B), lens]  # the row after the outcome's last token
        lp = lp + torch.where(torch.tensor(ends), after[:, space].logsumexp(-1), torch.zeros_like(lp))
        return dict(zip(names, lp.tolist()))

    def rows(self, model, key, tside: ChatSide, sside: ChatSide, sents: list[str], base: list[dict],
             renormalize: bool = True) -> tuple[list[dict], dict]:
        """Student rows whose positions inside words 2..n carry the oracle's distribution (the first
        word and the end of turn keep `base`'s rows). A word's first position gets the outcomes
        divided by their total (renormalize: the teacher's mass on the corpus's words and the end made
        1, which needs the corpus's word list) or as the teacher gives them (renormalize=False: the
        rest is the loss's "other" bucket, as the project's rows keep it); later positions are
        conditioned on the word's tokens so far either way."""
        out, done, total = [], 0, 0
        for s, row in zip(sents, base):
            ids = np.array(row["topk_ids"], copy=True)
            lps = np.array(row["topk_logprobs"], copy=True)
            e = sside.encode(s)
            c = e.text.find(s, e.boundary)
            spans = np.asarray(e.offsets[e.prompt_len:], dtype=np.int64).reshape(-1, 2) - c
            resp = e.input_ids[e.prompt_len:]
            ws = s[:-1].split(" ")
            end_lp = None  # log P(the sentence ends at ctx), from the previous word's two completions
            ctx_lp = None
            for i in range(1, len(ws)):
                ctx = " ".join(ws[:i])
                lo, hi = len(ctx), len(ctx) + 1 + len(ws[i]) + (1 if i == len(ws) - 1 else 0)
                inside = [j for j in range(len(spans)) if lo <= spans[j, 0] < hi]
                if (key, ctx) not in self._ctx:  # the teacher's outcomes: the same for every student
                    self._ctx[(key, ctx)] = self.outcomes(model, tside, ctx)
                lp_o = self._ctx[(key, ctx)]
                if ctx_lp is not None:  # P(end | ctx) = P(" w.") / (P(" w.") + P(" w ")) of the previous word
                    a, b = ctx_lp.get(" " + ws[i - 1] + "."), ctx_lp.get(" " + ws[i - 1] + " ")
                    end_lp = a - np.logaddexp(a, b) if a is not None and b is not None else None
                ctx_lp = lp_o
                total += len(inside)
                if not inside or spans[inside[0], 0] != lo or spans[inside[-1], 1] != hi:
                    continue
                seqs = {}
                for name, lp in lp_o.items():  # " w " (the word, then a space) and " w." (then the end)
                    sq = self.seq(sside, name[:-1] if name.endswith(" ") else name) if name != "." else None
                    if sq is not None:
                        seqs[name] = (sq, lp)
                # the sentence ending after word i-1 (".") is consistent with the student's tokens only
                # where the student spells the period as its own token after that word
                dot = self.seq(sside, ".")
                prev_sp, prev_dot = self.seq(sside, " " + ws[i - 1]), self.seq(sside, " " + ws[i - 1] + ".")
                end = lp_o.get(".", end_lp)
                if end is not None and dot and prev_sp and prev_dot == prev_sp + dot:
                    seqs["."] = (dot, end)
                observed = tuple(int(t) for t in (resp[j] for j in inside))
                for t, j in enumerate(inside):
                    pre = observed[:t]
                    cons = [(sq, lp) for sq, lp in seqs.values() if sq[:t] == pre]
                    if not cons:
                        continue
                    z = np.logaddexp.reduce([lp for _, lp in cons]) if t > 0 or renormalize else 0.0
                    by: dict[int, float] = {}
                    for sq, lp in cons:
                        if len(sq) > t:
                            by[sq[t]] = np.logaddexp(by.get(sq[t], -np.inf), lp - z)
                    top = sorted(by.items(), key=lambda kv: -kv[1])[:K]
                    p = e.prompt_len + j
                    ids[p] = -1
                    lps[p] = -np.inf
                    for q, (v, lp) in enumerate(top):
                        ids[p, q], lps[p, q] = v, lp
                    done += 1
            out.append({**row, "topk_ids": ids, "topk_logprobs": lps.astype(np.float16)})
        return out, {"oracle_positions": round(done / max(total, 1), 4)}


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
    p.add_argument("--peer", action="store_true",
                   help="also train a second teacher of every family (another init and batch order, same data) and "
                        "distill each student from its own family's peer of the pair's quality (rows copied): "
                        "peer_efficiency = (bpb_a - bpb_peer) / (bpb_a - bpb_b) is what a DIFFERENT teacher of the same "
                        "quality and the same tokenizer transfers, the ceiling a cross-tokenizer teacher (another "
                        "model too) is measured against")
    p.add_argument("--ideal", action="store_true",
                   help="also distill each student from the WordOracle's rows: the cross-tokenizer teacher's own "
                        "next-word probabilities spelled in the student's tokens (no rule, no table): the ceiling of "
                        "any transfer rule, with each word's first position renormalized over the corpus's words and "
                        "without (ideal.unnormalized); and the same oracle on the same-family teacher, as a check of "
                        "the oracle")
    p.add_argument("--lookahead", action="store_true",
                   help="also distill each student from the rows of the align stage with prep.lookahead on: the "
                        "cross-tokenizer teacher's top-k next tokens at each word start, each followed to the end of its "
                        "word by a beam over the teacher's own continuations (profuser.prep.teacher.lookahead_outcomes, "
                        "the teacher stage's code), spelled in the student's tokens by the align stage (apply_outcomes)")
    from profuser.config import LookaheadConfig

    dflt = LookaheadConfig()
    p.add_argument("--lookahead-branch", type=int, default=dflt.branch, help="--lookahead: prep.lookahead.branch")
    p.add_argument("--lookahead-beam", type=int, default=dflt.beam, help="--lookahead: prep.lookahead.beam")
    p.add_argument("--lookahead-steps", type=int, default=dflt.steps, help="--lookahead: prep.lookahead.steps")
    p.add_argument("--lookahead-min-prob", type=float, default=dflt.min_prob, help="--lookahead: prep.lookahead.min_prob")
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
    def teach(f: str, init: int, order: int) -> list:
        """Family f's teacher trained from init seed `init` with batch order `order`: its snapshots as
        (step, held-out bits per byte, weights)."""
        side = sides[f]
        t0 = time.time()
        snaps: list = []
        train(side.model(init), sft_rows(side, teach_sents), args.teacher_steps, 3e-3, 32, order,
              side.tokenizer.pad_token_id, snapshots=snaps, every=args.snapshot_every)
        probe = side.model(init)
        curve = []
        for step, weights in snaps:
            probe.load_state_dict(weights)
            probe.eval()
            curve.append((step, round(bits_per_byte(probe, side, held_out), 4), weights))
        say(f"teacher {f} (init {init}): held-out {curve[-1][1]} bits/byte after {args.teacher_steps} steps "
            f"({time.time() - t0:.0f}s)")
        return curve

    curves = {f: teach(f, args.seed + 10, args.seed) for f in sides}
    teacher_bpb = {f: c[-1][1] for f, c in curves.items()}
    # --peer: a second teacher per family, another model of the same data and tokenizer
    peers = {f: teach(f, args.seed + 11, args.seed + 1) for f in sides} if args.peer else {}

    def matched(curve: list, level: float) -> tuple[int, float]:
        """(step, bpb) of the snapshot in `curve` whose held-out bits per byte is closest to `level`."""
        step, bpb, _ = min(curve, key=lambda c: (abs(c[1] - level), -c[0]))
        return step, bpb

    row_cache: dict = {}

    def tmodel(f: str, step: int, peer: bool = False):
        m = sides[f].model(args.seed + (11 if peer else 10))
        m.load_state_dict(next(w for s_, _, w in (peers if peer else curves)[f] if s_ == step))
        return m.eval()

    def trows(f: str, step: int, peer: bool = False) -> list[dict]:
        if (f, step, peer) not in row_cache:
            row_cache[(f, step, peer)] = teacher_rows(tmodel(f, step, peer), sides[f], student_sents)
        return row_cache[(f, step, peer)]

    oracle = WordOracle(chain[0]) if args.ideal else None
    look = ({"branch": args.lookahead_branch, "beam": args.lookahead_beam, "steps": args.lookahead_steps,
             "min_prob": args.lookahead_min_prob} if args.lookahead else None)
    la_cache: dict = {}  # (family, step) -> (teacher rows with their word outcomes, the outcomes' cost)

    def la_trows(f: str, step: int) -> tuple[list[dict], dict]:
        if (f, step) not in la_cache:
            cost: dict = {}
            t0 = time.time()
            rows = teacher_rows(tmodel(f, step), sides[f], student_sents, look, cost)
            cost["seconds"] = round(time.time() - t0, 1)
            la_cache[(f, step)] = (rows, cost)
        return la_cache[(f, step)]

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
            (sx, vx), (sy_step, vy) = matched(curves[x], level), matched(curves[y], level)
            entry = {"bpb_sft": bpb_a, "teachers": {"cross": {"family": x, "step": sx, "bpb": vx},
                                                    "same": {"family": y, "step": sy_step, "bpb": vy}}}
            for rule, rest in rests.items():
                same_rows = distill_rows(sy, sides[y], trows(y, sy_step), rule)[0]
                if (y, sy_step, rule) not in b_cache:
                    b_cache[(y, sy_step, rule)] = student(y, same_rows, rest)
                bpb_b = b_cache[(y, sy_step, rule)]
                rows, info = distill_rows(sy, sides[x], trows(x, sx), rule, trie=not args.no_trie)
                if rule == "after":
                    after_rows, after_same = rows, same_rows
                bpb_c = student(y, rows, rest)
                gain = bpb_a - bpb_b
                entry[rule] = {"bpb_same_tokenizer_teacher": bpb_b, "bpb_cross_tokenizer_teacher": bpb_c,
                               "coverage": info["coverage"],
                               "word_start_agreement": word_start_agreement(sides[x], sy, chain[0], rule),
                               "tv_to_same_tokenizer_teacher": round(row_distance(rows, same_rows), 4),
                               "transfer_efficiency": round((bpb_a - bpb_c) / gain, 3) if gain > 0 else None}
            if oracle is not None:
                t0 = time.time()
                ideal, info = oracle.rows(tmodel(x, sx), (x, sx), sides[x], sy, student_sents, after_rows)
                bpb_i = student(y, ideal, "other")
                gain = bpb_a - entry["after"]["bpb_same_tokenizer_teacher"]
                entry["ideal"] = {"bpb_cross_tokenizer_teacher": bpb_i, **info,
                                  "tv_to_same_tokenizer_teacher": round(row_distance(ideal, after_same), 4),
                                  "transfer_efficiency": round((bpb_a - bpb_i) / gain, 3) if gain > 0 else None}
                # the same oracle without the corpus's word list: each word's first position as the
                # teacher gives it, the rest in the "other" bucket
                raw, _ = oracle.rows(tmodel(x, sx), (x, sx), sides[x], sy, student_sents, after_rows, renormalize=False)
                bpb_r = student(y, raw, "other")
                entry["ideal"]["unnormalized"] = {
                    "bpb_cross_tokenizer_teacher": bpb_r, "tv_to_same_tokenizer_teacher": round(row_distance(raw, after_same), 4),
                    "transfer_efficiency": round((bpb_a - bpb_r) / gain, 3) if gain > 0 else None}
                if (y, sy_step, "ideal_same") not in b_cache:  # the oracle on the same-family teacher itself
                    own, _ = oracle.rows(tmodel(y, sy_step), (y, sy_step), sy, sy, student_sents, after_same)
                    b_cache[(y, sy_step, "ideal_same")] = (student(y, own, "other"), round(row_distance(own, after_same), 4))
                bpb_o, tv_o = b_cache[(y, sy_step, "ideal_same")]
                entry["ideal"]["same_teacher"] = {"bpb": bpb_o, "tv_to_its_own_rows": tv_o,
                                                  "transfer_efficiency": round((bpb_a - bpb_o) / gain, 3) if gain > 0 else None}
                say(f"ideal {x} -> {y}: {entry['ideal']} ({time.time() - t0:.0f}s)")
            if look is not None:
                t0 = time.time()
                la_t, cost = la_trows(x, sx)
                la_rows, info = distill_rows(sy, sides[x], la_t, "after", trie=not args.no_trie)
                bpb_l = student(y, la_rows, "other")
                gain = bpb_a - entry["after"]["bpb_same_tokenizer_teacher"]
                ws = max(cost["word_starts"], 1)
                entry["lookahead"] = {"bpb_cross_tokenizer_teacher": bpb_l, **info,
                                      "tv_to_same_tokenizer_teacher": round(row_distance(la_rows, after_same), 4),
                                      # per word start of the student sentences (the teacher's side, prep's code)
                                      "outcomes_per_word_start": round(cost["outcomes"] / ws, 1),
                                      "beam_tokens_per_word_start": round(cost["beam_tokens"] / ws, 1),
                                      "context_tokens_per_word_start": round(cost["prefill_tokens"] / ws, 1),
                                      "teacher_seconds": cost["seconds"],
                                      "transfer_efficiency": round((bpb_a - bpb_l) / gain, 3) if gain > 0 else None}
                say(f"lookahead {x} -> {y}: {entry['lookahead']} ({time.time() - t0:.0f}s)")
            if args.peer:
                sp, vp = matched(peers[y], level)
                if (y, sp, "peer") not in b_cache:
                    b_cache[(y, sp, "peer")] = student(y, distill_rows(sy, sides[y], trows(y, sp, True), "after")[0],
                                                       "other")
                gain = bpb_a - entry["after"]["bpb_same_tokenizer_teacher"]
                entry["peer"] = {"family": y, "step": sp, "bpb": vp, "bpb_student": b_cache[(y, sp, "peer")],
                                 "peer_efficiency": round((bpb_a - b_cache[(y, sp, "peer")]) / gain, 3)
                                 if gain > 0 else None}
            say(f"{x} -> {y}: {json.dumps(entry)}")
            result["pairs"][f"{x} -> {y}"] = entry
    eff = {rule: [v[rule]["transfer_efficiency"] for v in result["pairs"].values()]
           for rule in (*rests, "lookahead", "ideal") if all(rule in v for v in result["pairs"].values())}
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
        # the diagnostics against the "after" rule's (a) and (b), like its efficiency
        a = np.mean([runs[s]["pairs"][pair]["bpb_sft"] for s in seeds])
        b = np.mean([runs[s]["pairs"][pair]["after"]["bpb_same_tokenizer_teacher"] for s in seeds])
        if "ideal" in runs[seeds[0]]["pairs"][pair]:
            per = [runs[s]["pairs"][pair]["ideal"] for s in seeds]
            c, o = np.mean([e["bpb_cross_tokenizer_teacher"] for e in per]), np.mean([e["same_teacher"]["bpb"] for e in per])
            entry["ideal"] = {"transfer_efficiency": round(float((a - c) / (a - b)), 3) if a > b else None,
                              "per_seed": [e["transfer_efficiency"] for e in per],
                              **({"unnormalized": {
                                  "transfer_efficiency": round(float((a - np.mean([e["unnormalized"]["bpb_cross_tokenizer_teacher"]
                                                                                   for e in per])) / (a - b)), 3)
                                  if a > b else None,
                                  "per_seed": [e["unnormalized"]["transfer_efficiency"] for e in per],
                                  "tv_to_same_tokenizer_teacher": round(float(np.mean(
                                      [e["unnormalized"]["tv_to_same_tokenizer_teacher"] for e in per])), 4)}}
                                 if all("unnormalized" in e for e in per) else {}),
                              "tv_to_same_tokenizer_teacher": round(float(np.mean([e["tv_to_same_tokenizer_teacher"]
                                                                                   for e in per])), 4),
                              "same_teacher_efficiency": round(float((a - o) / (a - b)), 3) if a > b else None,
                              "same_teacher_tv_to_its_own_rows": round(float(np.mean(
                                  [e["same_teacher"]["tv_to_its_own_rows"] for e in per])), 4)}
        if "lookahead" in runs[seeds[0]]["pairs"][pair]:
            per = [runs[s]["pairs"][pair]["lookahead"] for s in seeds]
            c = np.mean([e["bpb_cross_tokenizer_teacher"] for e in per])
            entry["lookahead"] = {"transfer_efficiency": round(float((a - c) / (a - b)), 3) if a > b else None,
                                  "per_seed": [e["transfer_efficiency"] for e in per],
                                  "tv_to_same_tokenizer_teacher": round(float(np.mean(
                                      [e["tv_to_same_tokenizer_teacher"] for e in per])), 4),
                                  "lookahead_share": round(float(np.mean([e["lookahead_share"] for e in per])), 4),
                                  "outcomes_per_word_start": round(float(np.mean(
                                      [e["outcomes_per_word_start"] for e in per])), 1),
                                  "beam_tokens_per_word_start": round(float(np.mean(
                                      [e["beam_tokens_per_word_start"] for e in per])), 1)}
        if "peer" in runs[seeds[0]]["pairs"][pair]:
            p_ = np.mean([runs[s]["pairs"][pair]["peer"]["bpb_student"] for s in seeds])
            entry["peer_efficiency"] = round(float((a - p_) / (a - b)), 3) if a > b else None
            entry["peer_per_seed"] = [runs[s]["pairs"][pair]["peer"]["peer_efficiency"] for s in seeds]
        summary[pair] = entry
    teacher_bpb = {f: round(float(np.mean([runs[s]["teacher_bpb"][f] for s in seeds])), 4)
                   for f in runs[seeds[0]]["teacher_bpb"]}
    print(json.dumps({"device": runs[seeds[0]]["device"], "seeds": seeds, "jobs": args.jobs,
                      "teacher_bpb_mean": teacher_bpb,
                      "transfer_efficiency_of_means": summary,
                      "min_transfer_efficiency": {r: min((v[r]["transfer_efficiency"] for v in summary.values()
                                                          if v[r]["transfer_efficiency"] is not None), default=None)
                                                  for r in ("after", "before", "lookahead", "ideal")
                                                  if all(r in v for v in summary.values())},
                      "seconds": round(time.time() - t0, 1), "runs": {str(s): runs[s] for s in seeds}}, indent=1))


if __name__ == "__main__":
    main()
