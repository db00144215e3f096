"""Word lookahead (docs/ARCHITECTURE.md, "Word lookahead", `prep.lookahead`): the teacher's whole next
word at every response word start, so a target with another tokenizer is taught the words the
teacher means rather than the first pieces of its own segmentation.

Why: a teacher row at a word start offers first tokens (`▁`, `▁c`, `▁cat`, ...) whose meaning
depends on how the source's tokenizer goes on; the transfer rule (profuser.transfer) can only map
each one to a target token by its surface, so a Unigram source's `▁` (the start of many words)
gives all its mass to the target's bare space. Following every candidate to the end of its word
turns the row into a distribution over word texts, which any target tokenizer can spell.

Teacher side (`word_outcomes`, torch): at each response word start r (a source token whose surface
starts with whitespace, inside the response text), the teacher's top-k next tokens after the
context (prompt + response tokens before r) are followed to the end of their word by a beam over
the teacher's own continuations. A word-start candidate (whitespace, then word characters or
nothing) starts a path; each step, every live path is extended by at most `branch` word pieces
(tokens whose surface is word characters only, `str.isalnum`), `beam` paths are kept per word
start, at most `steps` steps, and no path below `min_prob`. A path whose text holds a word character
yields the outcome "its text" with its probability times the probability that the next token ends
the word (a special token or one whose first character is not a word character). A candidate that
starts no word path (".", " (", "\\n\\n" ...) is an outcome of its own surface. The observed word (the
tokens the source used) is always followed, beyond the beam's limits, so its outcome is exact.
Mass outside the top-k, the beam, the steps or the floor is lost, never renormalized away.
Contexts are prefilled together (left padding, explicit positions) and the beam decodes one token
per path and step on the prefill's KV cache (Cache.reorder_cache selects each child's parent).

Align side (`apply_outcomes`, numpy): each outcome text is spelled with the target tokenizer
(`Speller`: the text between "Xx" and " xx", cached per text; None when the target's tokens do not
start and end at the text's bounds). Where the target's response tokens tile the observed word's
bytes exactly (the word start token through the last word piece the source used), the target
position t of the word gets P(next target token | the target's tokens of the word before t) over the
outcomes spelled with those tokens: at t = 0 the outcomes' own probabilities (not renormalized; the
rest goes to the loss's "other" bucket), at t > 0 divided by the mass of the outcomes consistent
with the prefix (conditioning, as the rule's step 1 does inside a source token). Every other
position keeps the rule's row.

Approximations, stated: a target spells an outcome as it spells it between two words (the text
after it is not known); the end of a word is "the next token is not a word piece", so a token that
starts with a word character and goes on with others ("ing,") is lost mass; positions where the
target's tokens do not start and end at the observed word's bytes keep the rule.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

FRAME = ("Xx", " xx")  # the text a Speller spells an outcome between (a word before it, a word after it)


def _word(s: str) -> bool:
    return s != "" and all(c.isalnum() for c in s)


@dataclass(frozen=True)
class WordClasses:
    """Per token id of one tokenizer: its surface as text and what it does to a word."""
    text: list  # str per id, None for special tokens and surfaces that are not whole UTF-8 text
    start: np.ndarray  # bool [V]: the surface starts with whitespace (a word start)
    path: np.ndarray  # bool [V]: whitespace, then word characters or nothing: a word path starts here
    piece: np.ndarray  # bool [V]: word characters only: continues a word
    ender: np.ndarray  # bool [V]: ends a word before it (special, or its first character is no word character)
    _masks: dict = field(default_factory=dict, compare=False, repr=False)  # (n, device) -> (piece, ender) tensors

    def masks(self, n: int, device):
        """piece and ender as bool tensors of length n (a head wider than the vocabulary pads False),
        on `device`, built once per (n, device)."""
        key = (n, str(device))
        if key not in self._masks:
            import torch

            pad = np.zeros(max(0, n - len(self.text)), dtype=bool)
            self._masks[key] = tuple(torch.tensor(np.concatenate([m[:n], pad]), device=device)
                                     for m in (self.piece, self.ender))
        return self._masks[key]


_CLASSES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def word_classes(tokenizer) -> WordClasses:
    """The tokenizer's WordClasses (cached per tokenizer; built from profuser.align.surfaces)."""
    from profuser.align import surfaces

    surf = surfaces(tokenizer)
    got = _CLASSES.get(tokenizer)
    if got is not None and len(got.text) == len(surf.surfaces):
        return got
    text: list = []
    for i, b in enumerate(surf.surfaces):
        if surf.special[i] or not b:
            text.append(None)
            continue
        try:
            text.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            text.append(None)
    n = len(text)
    start, path, piece, ender = (np.zeros(n, dtype=bool) for _ in range(4))
    for i, s in enumerate(text):
        if s is None:
            ender[i] = bool(surf.special[i])
            continue
        start[i] = s[0].isspace()
        if start[i]:
            rest = s.lstrip()
            path[i] = rest == "" or _word(rest)
        piece[i] = _word(s)
        ender[i] = not s[0].isalnum()
    out = WordClasses(text, start, path, piece, ender)
    try:
        _CLASSES[tokenizer] = out
    except TypeError:
        pass
    return out


def word_starts(token_ids, in_text, classes: WordClasses) -> np.ndarray:
    """Response rows r whose observed token starts with whitespace and encodes response text."""
    ids = np.asarray(token_ids, dtype=np.int64)
    ok = (ids >= 0) & (ids < len(classes.start))
    start = np.zeros(len(ids), dtype=bool)
    start[ok] = classes.start[ids[ok]]
    return np.flatnonzero(start & np.asarray(in_text, dtype=bool))


def observed_end(token_ids, r: int, classes: WordClasses) -> int:
    """The last row of the observed word that starts at row r: r itself, or, when r starts a word
    path, the last of the word pieces that follow it."""
    ids = np.asarray(token_ids, dtype=np.int64)
    n, V = len(ids), len(classes.piece)
    if not (0 <= ids[r] < V and classes.path[ids[r]]):
        return r
    last = r
    while last + 1 < n and 0 <= ids[last + 1] < V and classes.piece[ids[last + 1]]:
        last += 1
    return last


# --------------------------------------------------------------------------------------------
# teacher side


@dataclass
class Outcomes:
    """One sequence's word outcomes, flat: outcome o belongs to the word start at response row rows[o]."""
    rows: list = field(default_factory=list)  # int: response row of the word start
    texts: list = field(default_factory=list)  # str: the outcome's text (from the word start's first byte)
    logprobs: list = field(default_factory=list)  # float: the teacher's log-prob of it
    paths: Optional[list] = None  # per outcome, the teacher token paths behind it (with `trace`)


@dataclass
class _Path:
    w: int  # word start (index into the chunk)
    toks: list  # teacher tokens from the word start on
    lp: float
    parent: int  # the cache row it extends
    forced: bool  # the observed word's path


def _last_logits(model, **kw):
    """The model's logits at the last position only (logits_to_keep=1 where the model takes it)."""
    if getattr(model, "_profuser_keep_last", True):
        try:
            out = model(logits_to_keep=1, **kw)
            return out.logits[:, -1], out.past_key_values
        except TypeError:
            model._profuser_keep_last = False
    out = model(**kw)
    return out.logits[:, -1], out.past_key_values


def word_outcomes(model, seq: list[int], prompt_len: int, starts, classes: WordClasses, k: int, branch: int = 4,
                  beam: int = 32, steps: int = 8, min_prob: float = 1e-3, pad_id: int = 0,
                  batch_tokens: int = 16384, trace: bool = False, cost: Optional[dict] = None) -> Outcomes:
    """The teacher's word outcomes at response rows `starts` of `seq` (prompt + response tokens) by
    the beam in the module docstring. `cost` (a dict) accumulates "word_starts", "outcomes",
    "prefill_tokens", "beam_tokens" (one per path and step) and "forwards"."""
    import torch

    device = next(model.parameters()).device
    resp = [int(t) for t in seq[prompt_len:]]
    min_lp = math.log(min_prob) if min_prob > 0 else -math.inf
    V = len(classes.text)
    out = Outcomes(paths=[] if trace else None)
    cost = cost if cost is not None else {}
    for key in ("word_starts", "outcomes", "prefill_tokens", "beam_tokens", "forwards"):
        cost.setdefault(key, 0)
    starts = [int(r) for r in starts]
    cost["word_starts"] += len(starts)
    # word starts in chunks whose beam cache (beam rows per word start x the longest context) stays
    # within batch_tokens tokens
    per = max(1, batch_tokens // max(1, (prompt_len + max(starts, default=0)) * max(1, beam)))
    for c0 in range(0, len(starts), per):
        chunk = starts[c0:c0 + per]
        lens = [prompt_len + r for r in chunk]
        width = max(lens)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for w, L in enumerate(lens):
            ids[w, width - L:] = torch.tensor(seq[:L])
            mask[w, width - L:] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.inference_mode():
            last, cache = _last_logits(model, input_ids=ids.to(device), attention_mask=mask.to(device),
                                       position_ids=pos.to(device), use_cache=True)
            first = last.float().log_softmax(-1)
            n_v = first.shape[-1]
            piece_t, ender_t = classes.masks(n_v, device)
            cost["prefill_tokens"] += int(mask.sum())
            cost["forwards"] += 1
            found: list[dict] = [{} for _ in chunk]
            spell: list[dict] = [{} for _ in chunk]

            def add(w: int, text: str, lp: float, toks: list) -> None:
                found[w][text] = float(np.logaddexp(found[w].get(text, -np.inf), lp))
                if trace:
                    spell[w].setdefault(text, []).append(list(toks))

            paths: list[_Path] = []
            top_v, top_i = first.topk(min(k, n_v), dim=-1)
            for w, r in enumerate(chunk):
                obs = resp[r]
                cands = dict(zip(top_i[w].tolist(), top_v[w].tolist()))
                if 0 <= obs < n_v:
                    cands.setdefault(obs, float(first[w, obs]))
                for c, lp in cands.items():
                    if c < V and classes.path[c]:
                        paths.append(_Path(w, [c], lp, w, c == obs))
                    elif c < V and classes.text[c] is not None:
                        add(w, classes.text[c], lp, [c])
            for step in range(steps):
                if not paths:
                    break
                cache.reorder_cache(torch.tensor([p.parent for p in paths], device=device))
                s = step + 1  # tokens in every live path
                inp = torch.tensor([[p.toks[-1]] for p in paths], device=device)
                m = torch.cat([mask[[p.w for p in paths]], torch.ones((len(paths), s), dtype=torch.long)], 1)
                pp = torch.tensor([[lens[p.w] + s - 1] for p in paths])
                row, cache = _last_logits(model, input_ids=inp, attention_mask=m.to(device), position_ids=pp.to(device),
                                          past_key_values=cache, use_cache=True)
                row = row.float().log_softmax(-1)
                cost["forwards"] += 1
                cost["beam_tokens"] += len(paths)
                ends = row.masked_fill(~ender_t, -math.inf).logsumexp(-1).tolist()
                cv, ci = row.masked_fill(~piece_t, -math.inf).topk(min(branch, n_v), dim=-1)
                cv, ci = cv.tolist(), ci.tolist()
                grown: dict[int, list[_Path]] = {}
                forced: list[_Path] = []
                for b, p in enumerate(paths):
                    text = "".join(classes.text[t] for t in p.toks)
                    if any(ch.isalnum() for ch in text):
                        add(p.w, text, p.lp + ends[b], p.toks + ["end"])
                    nxt = None
                    if p.forced:  # the observed word goes on with the source's next token, if a word piece
                        j = chunk[p.w] + len(p.toks)
                        if j < len(resp) and 0 <= resp[j] < V and classes.piece[resp[j]]:
                            nxt = resp[j]
                    for v, t in zip(cv[b], ci[b]):
                        if t == nxt or not math.isfinite(v) or p.lp + v <= min_lp:
                            continue
                        grown.setdefault(p.w, []).append(_Path(p.w, p.toks + [t], p.lp + v, b, False))
                    if nxt is not None:
                        forced.append(_Path(p.w, p.toks + [nxt], p.lp + float(row[b, nxt]), b, True))
                paths = [q for g in grown.values() for q in sorted(g, key=lambda q: -q.lp)[:beam]] + forced
        for w, r in enumerate(chunk):
            for text, lp in found[w].items():
                out.rows.append(r)
                out.texts.append(text)
                out.logprobs.append(lp)
                if trace:
                    out.paths.append(spell[w][text])
        del cache
    cost["outcomes"] += len(out.texts)
    return out


# --------------------------------------------------------------------------------------------
# align side


class Speller:
    """A target tokenizer's tokens for an outcome text, as it spells it between two words (FRAME),
    cached per text; None when its tokens do not start and end at the text's bounds."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, Optional[tuple]] = {}

    def __call__(self, text: str) -> Optional[tuple]:
        if text not in self.cache:
            from profuser.align import token_spans

            a, z = FRAME
            lo = len(a.encode())
            hi = lo + len(text.encode("utf-8", "surrogatepass"))
            sp = token_spans(self.tokenizer, a + text + z)
            inside = np.flatnonzero((sp.starts >= lo) & (sp.starts < hi))
            ok = (len(inside) > 0 and sp.starts[inside[0]] == lo and sp.ends[inside[-1]] == hi
                  and bool(sp.exact[inside].all()) and bool((np.diff(inside) == 1).all()))
            self.cache[text] = tuple(int(t) for t in sp.ids[inside]) if ok else None
        return self.cache[text]


_SPELLERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def speller(tokenizer) -> Speller:
    """The tokenizer's shared Speller (one cache per target tokenizer)."""
    try:
        return _SPELLERS.setdefault(tokenizer, Speller(tokenizer))
    except TypeError:
        return Speller(tokenizer)


def word_rows(observed: tuple, spelled: list[tuple[tuple, float]], k: int) -> list[Optional[tuple[list, list]]]:
    """Per target position t of an observed word (its target tokens `observed`): (ids, log-probs) of
    P(next target token | observed[:t]) over the outcomes `spelled` ((target tokens, log-prob)), at
    most k entries, most probable first, the observed token kept among them when it has any mass; at
    t = 0 the outcomes' own probabilities, at t > 0 divided by the mass of the outcomes whose tokens
    start with observed[:t]. None where no outcome is consistent with the prefix."""
    out: list = []
    for t in range(len(observed)):
        pre = observed[:t]
        cons = [(sq, lp) for sq, lp in spelled if sq[:t] == pre]
        if not cons:
            out.append(None)
            continue
        z = float(np.logaddexp.reduce([lp for _, lp in cons])) if t > 0 else 0.0
        by: dict[int, float] = {}
        for sq, lp in cons:
            if len(sq) > t:
                by[sq[t]] = float(np.logaddexp(by.get(sq[t], -np.inf), lp - z))
        if not by:
            out.append(None)
            continue
        top = sorted(by.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        lab = observed[t]
        if lab in by and all(i != lab for i, _ in top):
            top[-1] = (lab, by[lab])
            top.sort(key=lambda kv: (-kv[1], kv[0]))
        out.append(([i for i, _ in top], [min(v, 0.0) for _, v in top]))
    return out


def apply_outcomes(src, tgt, ids: np.ndarray, logprobs: np.ndarray, kept: np.ndarray, covered: np.ndarray,
                   rows, texts, outcome_logprobs, spell: Callable[[str], Optional[tuple]], classes: WordClasses) -> int:
    """Replace the rule's rows (ids/logprobs [m, k], kept [m], covered [m], over the target response
    tokens `tgt`, in place) at the positions of every observed word that has outcomes and whose bytes
    the target's tokens tile exactly (src/tgt: profuser.align.ResponseTokens of the two renderings).
    Returns the number of positions replaced."""
    from profuser.vocab_map import PAD_ID

    k = ids.shape[1]
    by_row: dict[int, list[tuple[str, float]]] = {}
    for r, t, lp in zip(rows, texts, outcome_logprobs):
        by_row.setdefault(int(r), []).append((t, float(lp)))
    n = 0
    for r, outs in by_row.items():
        if not 0 <= r < len(src.ids):
            continue
        last = observed_end(src.ids, r, classes)
        lo, hi = int(src.starts[r]), int(src.ends[last])
        if lo < 0 or not src.exact[r:last + 1].all():
            continue
        J = np.flatnonzero((tgt.starts >= lo) & (tgt.starts < hi))
        if (len(J) == 0 or tgt.starts[J[0]] != lo or tgt.ends[J[-1]] != hi or not (np.diff(J) == 1).all()
                or not tgt.exact[J].all()):
            continue
        spelled = [(sq, lp) for sq, lp in ((spell(t), lp) for t, lp in outs) if sq]
        if not spelled:
            continue
        for j, got in zip(J, word_rows(tuple(int(x) for x in tgt.ids[J]), spelled, k)):
            if got is None:
                continue
            e_ids, e_lps = got
            ids[j] = PAD_ID
            logprobs[j] = -np.inf
            ids[j, :len(e_ids)] = e_ids
            logprobs[j, :len(e_lps)] = e_lps
            covered[j] = True
            kept[j] = min(1.0, float(np.exp(np.asarray(e_lps, dtype=np.float64)).sum()))
            n += 1
    return n
