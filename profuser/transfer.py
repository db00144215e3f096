"""Source top-k rows -> a teacher distribution at every target response position
(docs/ARCHITECTURE.md, "Cross-tokenizer transfer"). Pure numpy on top-k rows: it never imports
torch, and a position's distribution never grows past k entries (no [T, V] array).

The rule, for target token t_j covering response bytes [a, b) (spans from profuser.align, relative
to where the response starts in each chat rendering; a target token that begins in the template
before the response — Vicuna's `▁The` after "ASSISTANT:" — gets its own probability from byte 0 on,
its template bytes being given, and no alternatives, see step 2):

1. Head. Let s_i be the source token whose byte span [c, d) contains byte a, and delta = a - c
   the bytes of s_i that the prefix already holds. Row i of the teacher is p(next source token |
   text before c). When delta > 0 the row is conditioned on those bytes: only candidates whose
   surface starts with text[c:a] stay, divided by Z = their total probability (the observed s_i is
   always one of them; Z counts it even when it is outside the stored top-k).
2. Alternatives. Every other candidate sigma of row i whose surface continues past a gives its
   (conditioned) probability to the target token that continuation would start with: the target
   token whose surface is the LONGEST PREFIX of sigma's remaining surface (`vocab_map.prefix_table`;
   identical surfaces first). Candidates with no such target token, or whose surface ends at a,
   are lost mass.
3. The target's own boundary. When the target token before t_j ends at a, a continuation that
   token would have swallowed (its text followed by the candidate's starts a longer target token)
   cannot follow it: such candidates of 2 are dropped, and the position's entries are divided by
   the probability that is left (1 minus the dropped mass). Special candidates (the end of turn)
   are no text and are never dropped here.
4. The observed path. The target label t_j gets the probability of its own text along the tokens
   the source actually used (chain rule): p(s_i)/Z, times p(s_m) for every source token lying
   wholly inside [d, b), times — when the last covered source token s_l runs past b — the
   probability that s_l starts with text[start(s_l):b] (the candidates of row l with that prefix,
   observed included). A t_j that ends inside s_i gets p(s_i)/Z (the source's own continuation).
5. Later rows of the observed path. When t_j spans several source tokens, each later row m
   (i < m <= l) offers the continuations that leave the observed text at start(m): candidate tau
   (other than s_m, and for a partly covered s_l other than those counted in 4) gives
   p(observed path up to start(m)) * p(tau) to the target token whose surface is the longest prefix
   of text[a:start(m)] + surface(tau).
6. The row after. When s_l ends exactly at b, row l+1 says how the text goes on; a candidate tau
   (other than the observed s_{l+1}) for which text[a:b] + surface(tau) starts a target token longer
   than t_j moves p(t_j) * p(tau) from the label to that token (the target would have swallowed
   it into one token).
7. Duplicates (several candidates landing on one target id) are merged by log-sum-exp; the k most
   probable entries are kept, the label always among them. Nothing is renormalized (except by 3):
   the entries' total is the share of the teacher's probability the position carries, and the loss
   puts the rest in an "other" bucket (profuser.losses.teacher_buckets).

Steps 3, 5 and 6 need the target vocabulary as a byte trie (vocab_map.PrefixTrie, the `trie`
argument; without it only 1, 2, 4 and 7 run, which is the rule as first built); with `exact_only`
(prep.vocab_mapping exact/soft) the trie only matches whole surfaces.

Approximations, stated: the target is assumed to start a continuation with the longest vocabulary
prefix of it (greedy, as BPE usually but not always does); continuations other than the observed
one are followed for one source step only (their later tokens are unknown: a candidate `Ġ` that
was not chosen gives its mass to the target's bare space, not to the words that would follow);
top-k mass outside the stored entries is unknown, so conditioning uses the stored candidates plus
the observed token, and 3 drops only stored candidates. Positions whose head (delta > 0) or
partially covered tail token is not byte-exact (normalizer rewrites, `<unk>`), or whose bytes no
source token covers, get no distribution; 5 and 6 skip target tokens that are not byte-exact,
start in the template or are the end of turn, and 3 those whose previous target token is not
byte-exact or starts in the template. The end-of-turn tokens of the two templates are paired
explicitly. Measured (transfer efficiency, and which steps earn their place): README, "Does the
transferred signal carry the teacher's knowledge?".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from profuser.align import ResponseTokens, Surfaces, clamp_index, surface_mismatch
from profuser.vocab_map import PAD_ID, PrefixTrie, merge_flat, trie_continue, trie_extends


@dataclass
class Transfer:
    """Teacher rows for the target response positions (label-aligned: row j is over token j)."""
    ids: np.ndarray  # int64 [m, k] target ids, PAD_ID = none (left-packed, most probable first)
    logprobs: np.ndarray  # float32 [m, k] log-probs (-inf where the id is PAD_ID); not renormalized
    kept: np.ndarray  # float64 [m]: share of the teacher's stored mass at the head row carried here
    covered: np.ndarray  # bool [m]: the rule applied (bytes covered by usable source tokens)
    one_to_one: np.ndarray  # bool [m]: the span equals one source token's span (the old, 1:1 rule)


def prefix_match(surf: Surfaces, cand: np.ndarray, text: np.ndarray, start: np.ndarray, length: np.ndarray,
                 obs: Optional[np.ndarray] = None) -> np.ndarray:
    """bool [Q]: surface of cand[q] starts with text[start[q] : start[q] + length[q]] (lengths >= 0).
    With `obs` (the observed token per query), a special candidate other than obs[q] matches no text
    of length > 0: its surface is its literal name (`<|im_end|>`), not text the teacher offers (the
    end of turn after "<" is not "<" going on)."""
    ok = (cand >= 0) & (cand < len(surf.lengths))
    ok &= np.where(ok, surf.lengths[np.where(ok, cand, 0)], -1) >= length
    if obs is not None:
        ok &= ~(surf.special[np.where(ok, cand, 0)] & (cand != obs) & (length > 0))
    k = np.flatnonzero(ok & (length > 0))
    ok[k[surface_mismatch(surf, cand[k], text, start[k], length[k])]] = False
    return ok


def _logsumexp_rows(lp: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """log(sum(exp(lp) where mask)) per row, -inf for empty rows."""
    x = np.where(mask, lp, -np.inf)
    m = x.max(axis=1, initial=-np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return m_safe + np.log(np.exp(x - m_safe[:, None]).sum(axis=1))


def _trie_state(trie: PrefixTrie, tid: np.ndarray, off: np.ndarray):
    """The trie state after target token tid's first `off` bytes (its surface; recorded when the trie
    was built, PrefixTrie.node_along): (node, -1 off the trie; longest target surface so far; its
    length). off = 0 is the root."""
    inside = (off > 0) & (tid >= 0) & (tid < len(trie.offsets))
    at = clamp_index(trie.offsets[clamp_index(tid, len(trie.offsets))] + off - 1, len(trie.node_along))
    return (np.where(inside, trie.node_along[at], np.where(off > 0, -1, 0)), np.where(inside, trie.best_along[at], -1),
            np.where(inside, trie.best_len_along[at], 0))


def project(src: ResponseTokens, tgt: ResponseTokens, n_resp: int, surf: Surfaces,
            first: np.ndarray, prefix_tab: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
            token_logprobs: np.ndarray, k: int, eot: Optional[tuple[int, int]] = None,
            pairs: Optional[np.ndarray] = None, trie: Optional[PrefixTrie] = None,
            exact_only: bool = False) -> Transfer:
    """Teacher distributions for the target response tokens by the rule in the module docstring.

    src/tgt: response-region tokens of the two renderings (profuser.align.response_tokens); n_resp:
    UTF-8 bytes of the response; surf: the source vocabulary's surfaces; first [V_src]: target id for
    a whole source token (vocab_map.build_vocab_map: identical surface, longest prefix, role pairs);
    prefix_tab [len(surf.flat)]: target id for a source token's surface from byte delta on
    (vocab_map.prefix_table); topk_* [n, K] and token_logprobs [n]: the teacher rows of the source
    response tokens (row r predicts src.ids[r]); eot: (source index, target index) of the paired
    end-of-turn tokens; pairs: optional int64 [m] target -> source index from MinED (tokenizers
    without offsets): then only those 1:1 pairs are used.
    """
    m = len(tgt.ids)
    pair = _eot_pair(eot, m)
    eots = np.array([pair] if pair else [], dtype=np.int64).reshape(-1, 2)
    return _project(src, tgt, np.zeros(m, dtype=np.int64), np.full(m, n_resp, dtype=np.int64), surf, first,
                    prefix_tab, topk_ids, topk_logprobs, token_logprobs, k, eots, pairs, trie, exact_only)


def _eot_pair(eot: Optional[tuple], m: int) -> Optional[tuple[int, int]]:
    """The (source index, target index) end-of-turn pair when both exist and the target index is one
    of the m target tokens, else None."""
    if eot is None or eot[0] is None or eot[1] is None or not 0 <= eot[1] < m:
        return None
    return int(eot[0]), int(eot[1])


@dataclass
class Projection:
    """One text's inputs to project (the arguments of the same names)."""
    src: ResponseTokens
    tgt: ResponseTokens
    n_resp: int
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprobs: np.ndarray
    eot: Optional[tuple] = None


def project_many(items: Sequence[Projection], surf: Surfaces, first: np.ndarray, prefix_tab: np.ndarray, k: int,
                 trie: Optional[PrefixTrie] = None, exact_only: bool = False) -> list[Transfer]:
    """project for several texts in one vectorized pass: per text, the Transfer project gives (the same
    arrays; tests/test_transfer.py compares them), with numpy's fixed cost per call (about 2 ms, a
    third of project's time on a 500-token answer) paid once per batch. The texts lie side by side on
    one byte axis: each source rendering at its own offset, with at least one byte between one text's
    tokens (source and target) and the next's, so that no step of the rule sees another text's
    tokens (its neighbour tests compare byte positions) and every text keeps its own response
    stretch and end of turn."""
    out: list[Optional[Transfer]] = [None] * len(items)
    use = []
    for i, it in enumerate(items):
        if len(it.src.ids) and len(it.tgt.ids):
            use.append(i)
        else:
            out[i] = project(it.src, it.tgt, it.n_resp, surf, first, prefix_tab, it.topk_ids, it.topk_logprobs,
                             it.token_logprobs, k)
    if not use:
        return out
    kk = max(np.shape(items[i].topk_ids)[1] for i in use)
    texts, shift, eots = [], [], []
    cur, prev_end, n_src, n_tgt = 0, -1, 0, 0
    for i in use:
        it = items[i]
        s, t = it.src, it.tgt
        lo = min(0, int(s.starts.min()), int(t.starts.min()))
        hi = max(int(it.n_resp), int(s.ends.max()), int(t.ends.max()))
        pad = max(0, prev_end + 1 - lo - s.base - cur)
        o = cur + pad + s.base  # byte 0 of this response on the shared axis
        texts += [np.zeros(pad, dtype=np.uint8), s.text]
        cur += pad + len(s.text)
        prev_end = o + hi
        shift.append(o)
        e = _eot_pair(it.eot, len(t.ids))
        if e:
            eots.append((e[0] + n_src, e[1] + n_tgt))
        n_src += len(s.ids)
        n_tgt += len(t.ids)

    def cat(side: str, field: str, moved: bool = False) -> np.ndarray:
        parts = [getattr(getattr(items[i], side), field) for i in use]
        return np.concatenate([p + o for p, o in zip(parts, shift)] if moved else parts)

    def rows(name: str, fill) -> np.ndarray:
        parts = []
        for i in use:
            x = np.asarray(getattr(items[i], name))
            parts.append(x if x.shape[1] == kk else
                         np.concatenate([x, np.full((len(x), kk - x.shape[1]), fill, dtype=x.dtype)], axis=1))
        return np.concatenate(parts)

    src = ResponseTokens(cat("src", "ids"), cat("src", "starts", True), cat("src", "ends", True), cat("src", "exact"),
                         np.concatenate(texts), 0)
    tgt = ResponseTokens(cat("tgt", "ids"), cat("tgt", "starts", True), cat("tgt", "ends", True), cat("tgt", "exact"),
                         np.zeros(0, dtype=np.uint8), 0)
    m_each = [len(items[i].tgt.ids) for i in use]
    r0 = np.repeat(np.asarray(shift, dtype=np.int64), m_each)
    r1 = r0 + np.repeat(np.asarray([items[i].n_resp for i in use], dtype=np.int64), m_each)
    tok_lp = [np.asarray(items[i].token_logprobs, dtype=np.float64) for i in use]
    # the running sum restarts at every text (rows of one text only ever take differences within it)
    cum = np.concatenate([np.concatenate(([0.0], np.cumsum(x)[:-1])) for x in tok_lp] + [np.zeros(1)])
    tr = _project(src, tgt, r0, r1, surf, first, prefix_tab, rows("topk_ids", -1), rows("topk_logprobs", -np.inf),
                  np.concatenate(tok_lp), k, np.asarray(eots, dtype=np.int64).reshape(-1, 2), None, trie, exact_only,
                  cum)
    bounds = np.cumsum([0] + m_each)
    for i, a, b in zip(use, bounds[:-1], bounds[1:]):
        out[i] = Transfer(tr.ids[a:b], tr.logprobs[a:b], tr.kept[a:b], tr.covered[a:b], tr.one_to_one[a:b])
    return out


def _project(src: ResponseTokens, tgt: ResponseTokens, r0: np.ndarray, r1: np.ndarray, surf: Surfaces,
             first: np.ndarray, prefix_tab: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
             token_logprobs: np.ndarray, k: int, eots: np.ndarray, pairs: Optional[np.ndarray],
             trie: Optional[PrefixTrie], exact_only: bool, cum: Optional[np.ndarray] = None) -> Transfer:
    """project's rule on byte coordinates where target token j's response runs over [r0[j], r1[j])
    (one text: 0 and n_resp; project_many: each text's own stretch) and eots [E, 2] holds the paired
    end-of-turn (source index, target index) rows. cum: the running sum of the observed log-probs
    (cum[r] = those of the tokens before r; project_many restarts it at every text, so that its
    differences, and with them the results, are the same bits as one text's)."""
    n, m = len(src.ids), len(tgt.ids)
    ids_out = np.full((m, k), PAD_ID, dtype=np.int64)
    lps_out = np.full((m, k), -np.inf, dtype=np.float32)
    empty = Transfer(ids_out, lps_out, np.zeros(m), np.zeros(m, dtype=bool), np.zeros(m, dtype=bool))
    if n == 0 or m == 0:
        return empty
    s_st, s_en = src.starts, src.ends
    b = tgt.ends
    # a target token that starts in the template before the response (Vicuna's `▁The` after
    # "ASSISTANT:") is taught from the response's first byte on; its template bytes are given
    straddle = (tgt.starts < r0) & (b > r0)
    a = np.maximum(tgt.starts, r0)
    if pairs is not None:
        ok = np.asarray(pairs) >= 0
        head = np.where(ok, pairs, 0)
        last = head.copy()
        delta = np.zeros(m, dtype=np.int64)
    else:
        en_max = np.maximum.accumulate(s_en)
        ok = (b <= r1) & (b > a)
        head = np.minimum(np.searchsorted(en_max, a, side="right"), n - 1)
        last = np.minimum(np.searchsorted(en_max, b - 1, side="right"), n - 1)
        ok &= (s_st[head] <= a) & (a < s_en[head]) & (s_st[last] <= b - 1) & (b <= s_en[last]) & (last >= head)
        # the source tokens from head to last must tile the bytes without gaps or overlaps
        seam = np.concatenate(([0], np.cumsum(s_st[1:] != s_en[:-1])))
        ok &= seam[last] == seam[head]
        delta = a - s_st[head]
    is_eot = np.zeros(m, dtype=bool)
    if len(eots):
        j = eots[:, 1]
        ok[j], head[j], last[j], delta[j], is_eot[j] = True, eots[:, 0], eots[:, 0], 0, True
    tail_partial = ok & (s_en[last] > b) & (last > head)
    ok &= (delta == 0) | src.exact[head]
    ok &= ~tail_partial | src.exact[last]
    tail_partial &= ok
    if not ok.any():
        return empty

    tb = src.text
    obs = src.ids
    obs_lp = np.asarray(token_logprobs, dtype=np.float64)
    top = np.asarray(topk_ids, dtype=np.int64)
    top_lp = np.asarray(topk_logprobs, dtype=np.float64)
    top_lp = np.where(top >= 0, top_lp, -np.inf)
    J = np.flatnonzero(ok)
    hJ, dJ = head[J], delta[J]
    cand = top[hJ]  # [J, K]
    clp = top_lp[hJ]
    in_row = (cand == obs[hJ][:, None]).any(axis=1)

    # 1. conditioning on the bytes of the head token that the prefix already holds
    cons = cand >= 0
    cond = dJ > 0
    if cond.any():
        rr, cc = np.nonzero(cons & cond[:, None])
        start = src.base + s_st[hJ[rr]]
        cons[rr, cc] = prefix_match(surf, cand[rr, cc], tb, start, dJ[rr], obs[hJ[rr]])
    logZ = np.logaddexp(_logsumexp_rows(clp, cons), np.where(in_row, -np.inf, obs_lp[hJ]))
    logZ = np.where(cond, logZ, 0.0)
    # what the head row offers this position (the normalizer of the kept share)
    avail = np.where(cond, 1.0, np.exp(np.logaddexp(_logsumexp_rows(clp, cand >= 0),
                                                     np.where(in_row, -np.inf, obs_lp[hJ]))))

    # 2. alternatives: every other candidate continuing past a, to the target token it starts with
    safe = clamp_index(cand, len(surf.lengths))
    known = (cand >= 0) & (cand < len(surf.lengths))
    alt = cons & known & (cand != obs[hJ][:, None]) & (surf.lengths[safe] > dJ[:, None])
    tgt_id = np.where(dJ[:, None] == 0, first[clamp_index(cand, len(first))],
                      prefix_tab[clamp_index(surf.offsets[safe] + dJ[:, None], len(prefix_tab))])
    tgt_id = np.where(alt & ~(surf.special[safe] & (dJ[:, None] > 0)), tgt_id, PAD_ID)
    # a target token that starts in the template: the source's candidates are pieces of the answer's
    # first word without the template's bytes, and the target token each would start with (" " +
    # piece) is one the target never uses for that text, so it gets its own probability only (the
    # rest goes to the loss's "other" bucket). Measured in bench_transfer, chatml_bpe -> vicuna_spm:
    # transfer efficiency 0.892 this way, 0.539 with those alternatives, 0.852 with no teacher there.
    tgt_id[straddle[J]] = PAD_ID
    alt_lp = np.where(tgt_id >= 0, clp - logZ[:, None], -np.inf)

    # 3. the target's own boundary at a: a continuation that the target's previous token would have
    # swallowed (its text + the candidate starts a longer target token) cannot follow it; such
    # candidates are dropped and the position is renormalized over the rest.
    # Steps 3, 5 and 6 look their strings up in one batched trie walk, set up here.
    use = trie is not None and pairs is None
    renorm = np.zeros(len(J))
    lJ = last[J]
    tp = tail_partial[J]
    aJ, bJ = a[J], b[J]
    if use:
        # step 3's queries: the previous target token's text + each remaining head candidate
        pj = J - 1
        pjs = np.maximum(pj, 0)
        prev_ok = (pj >= 0) & ~straddle[J] & tgt.exact[pjs] & (tgt.starts[pjs] >= r0[pjs]) & (tgt.ends[pjs] == a[J])
        # a query can only find a longer target token if the trie goes on from the previous token's
        # text by the candidate's first byte; most do not, and are left out (the same for step 6)
        at_prev = _trie_state(trie, tgt.ids[pjs], tgt.ends[pjs] - tgt.starts[pjs])[0]
        # (text candidates only: a special token, the end of turn, is no text the previous token could
        # swallow, whatever its literal surface; '.' + '<|im_end|>' would find Gemma-3's '.<')
        r3, c3 = np.nonzero((tgt_id >= 0) & prev_ok[:, None] & ~surf.special[safe])
        keep = trie_extends(trie, at_prev[r3], surf, cand[r3, c3], dJ[r3])
        r3, c3 = r3[keep], c3[keep]
        w3 = tgt.ends[pjs[r3]] - tgt.starts[pjs[r3]]
        walkable = tgt.exact[J] & ~straddle[J] & (tgt.starts[J] >= r0[J]) & ~is_eot[J]
        # step 5's queries: text[a:start(m)] + each other candidate of a later row m of the path
        cnt = np.where(walkable, lJ - hJ, 0)
        jj = np.repeat(np.arange(len(J)), cnt)
        mm = hJ[jj] + 1 + (np.arange(len(jj)) - np.repeat(np.cumsum(cnt) - cnt, cnt))
        rc5, rlp5 = top[mm], top_lp[mm]  # [Q, K]
        ok5 = (rc5 >= 0) & (rc5 < len(surf.lengths)) & (rc5 != obs[mm][:, None])
        ok5 &= ~surf.special[clamp_index(rc5, len(surf.lengths))]
        at_tail = tp[jj] & (mm == lJ[jj])
        if at_tail.any():  # candidates sharing the label's tail text are in the label already
            rr, cc = np.nonzero(ok5 & at_tail[:, None])
            L = bJ[jj[rr]] - s_st[mm[rr]]
            ok5[rr, cc] &= ~prefix_match(surf, rc5[rr, cc], tb, src.base + s_st[mm[rr]], L)
        r5, c5 = np.nonzero(ok5)
        q5 = jj[r5]
        # step 6's queries: the label's text + each other candidate of the row after the path
        nxt = lJ + 1
        look = walkable & ~tp & (s_en[lJ] == bJ) & (nxt < n)
        look &= np.where(look, s_st[np.minimum(nxt, n - 1)] == bJ, False)
        Lk = np.flatnonzero(look)
        r = nxt[Lk]
        rc6, rlp6 = top[r], top_lp[r]
        ok6 = (rc6 >= 0) & (rc6 < len(surf.lengths)) & (rc6 != obs[r][:, None])
        ok6 &= ~surf.special[clamp_index(rc6, len(surf.lengths))]
        r6, c6 = np.nonzero(ok6)
        keep = trie_extends(trie, _trie_state(trie, tgt.ids[J[Lk]], bJ[Lk] - aJ[Lk])[0][r6], surf, rc6[r6, c6], 0)
        r6, c6 = r6[keep], c6[keep]
        q6 = Lk[r6]
        w6 = bJ[q6] - aJ[q6]
        # one walk: target token t's first `off` bytes (its text is its surface: the trie state there
        # was recorded when the trie was built, PrefixTrie.node_along), then a source surface
        t = np.concatenate([pjs[r3], J[q5], J[q6]])
        off = np.concatenate([w3, s_st[mm[r5]] - aJ[q5], w6])
        qids = np.concatenate([cand[r3, c3], rc5[r5, c5], rc6[r6, c6]])
        skip = np.concatenate([dJ[r3], np.zeros(len(r5) + len(r6), dtype=np.int64)])
        node, best, best_len = _trie_state(trie, tgt.ids[t], off)
        g_all, glen_all = trie_continue(trie, node, off, best, best_len, surf, qids, skip, exact_only)
        n3, n5 = len(r3), len(r5)
        g, glen = g_all[:n3], glen_all[:n3]
        bad = (g >= 0) & (glen > w3)
        rr, cc = r3[bad], c3[bad]
        lost = np.zeros(len(J))
        np.add.at(lost, rr, np.exp(alt_lp[rr, cc]))
        tgt_id[rr, cc] = PAD_ID
        alt_lp[rr, cc] = -np.inf
        renorm = -np.log(np.clip(1.0 - lost, 1e-6, 1.0))

    # 4. the observed path: the label's own text along the source tokens actually used
    if cum is None:
        cum = np.concatenate(([0.0], np.cumsum(obs_lp)))
    inner = np.where(lJ > hJ, cum[lJ] - cum[np.minimum(hJ + 1, lJ)], 0.0)  # tokens head+1 .. last-1
    tail = np.where(lJ > hJ, obs_lp[lJ], 0.0)
    if tp.any():
        P = np.flatnonzero(tp)
        tc = top[lJ[P]]  # [P, K]
        L = b[J[P]] - s_st[lJ[P]]
        rr, cc = np.nonzero(tc >= 0)
        match = np.zeros(tc.shape, dtype=bool)
        match[rr, cc] = prefix_match(surf, tc[rr, cc], tb, src.base + s_st[lJ[P]][rr], L[rr], obs[lJ[P]][rr])
        obs_in = (tc == obs[lJ[P]][:, None]).any(axis=1)
        tail[P] = np.logaddexp(_logsumexp_rows(top_lp[lJ[P]], match), np.where(obs_in, -np.inf, obs_lp[lJ[P]]))
    label_lp = obs_lp[hJ] - logZ + inner + tail

    # the position's entries as flat (position, target id, log-prob) triples, in the order the
    # steps give them: head alternatives, label, later rows (5), the row after (6)
    rJ = np.arange(len(J))
    K = tgt_id.shape[1]
    e_row = [np.repeat(rJ, K), rJ]
    e_id = [tgt_id.ravel(), tgt.ids[J]]
    e_lp = [alt_lp.ravel(), None]
    if use:
        path0 = obs_lp[hJ] - logZ  # log p(text from a to the end of the head token)
        # 5. later rows of the observed path (head < m <= last): other continuations after text[a:start(m)]
        if len(r5):
            g = g_all[n3:n3 + n5]
            e_row.append(q5)
            e_id.append(g)
            e_lp.append(path0[q5] + cum[mm[r5]] - cum[hJ[q5] + 1] + rlp5[r5, c5])  # p(text a .. start(m)) p(tau)
        # 6. the row after: when the last source token ends exactly at b, row last+1 tells which
        # continuations a longer target token would swallow; that mass moves off the label
        g, glen = g_all[n3 + n5:], glen_all[n3 + n5:]
        longer = (g >= 0) & (glen > w6)
        rr, cc, q, g = r6[longer], c6[longer], q6[longer], g[longer]
        if len(rr):
            moved = np.zeros(len(J))
            np.add.at(moved, q, np.exp(rlp6[rr, cc]))
            e_row.append(q)
            e_id.append(g)
            e_lp.append(label_lp[q] + rlp6[rr, cc])
            with np.errstate(divide="ignore"):
                label_lp = label_lp + np.log(np.clip(1.0 - moved, 0.0, 1.0))
    e_lp[1] = label_lp
    e_row = np.concatenate(e_row)
    # merged by id; the label keeps a place among the k entries: its probability (the observed path)
    # is the exact part of the rule, the alternatives the approximate one
    merged_ids, merged_lp = merge_flat(e_row, np.concatenate(e_id), np.concatenate(e_lp) + renorm[e_row], len(J), k,
                                       keep=tgt.ids[J])
    # the rules' pieces partition the head row's mass; rounding (and renormalizing over stored
    # candidates only) can still push the total a hair past 1
    tot = _logsumexp_rows(merged_lp.astype(np.float64), merged_ids >= 0)
    merged_lp = np.where(merged_ids >= 0, merged_lp - np.maximum(tot, 0.0)[:, None], -np.inf).astype(np.float32)
    ids_out[J], lps_out[J] = merged_ids, merged_lp
    kept = np.zeros(m)
    with np.errstate(invalid="ignore", divide="ignore"):
        carried = np.exp(merged_lp.astype(np.float64)).sum(axis=1)
        kept[J] = np.where(avail > 0, np.minimum(carried / avail, 1.0), 0.0)
    one = np.zeros(m, dtype=bool)
    one[J] = (dJ == 0) & (lJ == hJ) & (s_en[hJ] == b[J]) & src.exact[hJ] & ~straddle[J]
    one[is_eot & ok] = True
    return Transfer(ids_out, lps_out, kept, ok, one)
