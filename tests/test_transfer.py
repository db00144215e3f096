"""profuser.transfer: a teacher distribution at every covered target position.

The vectorized `project` is checked against a slow, readable loop implementation of the rule in
its docstring, over random Unicode text and every ordered pair of fixture tokenizers (and the real
SmolLM2 tokenizer), with synthetic teacher rows; then for the properties the rule promises:
coverage, chain-rule exactness on a byte-level teacher, mass never above 1, identical tokenizers.
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profuser.align import response_tokens, surfaces
from profuser.transfer import Projection, project, project_many
from profuser.vocab_map import _target_index, pair_tables, prefix_trie
from text_strategies import FAMILIES, texts

PROPS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
K = 6


@pytest.fixture(scope="module")
def tables(toks):
    """(first, by_byte) per ordered fixture pair, prefix mode."""
    return {(a, b): pair_tables(toks[a], toks[b], "prefix") for a, b in itertools.product(FAMILIES, repeat=2)}


def synthetic_rows(tok, ids: np.ndarray, seed: int, k: int = K, byte_probs=None, alternatives: bool = True):
    """Teacher rows for source tokens `ids`: at each position the observed token (in the top-k or
    not) and k-1 others, preferring tokens that share the observed token's first bytes (so that
    conditioning on a token's first bytes has candidates to keep and to drop). With `byte_probs`
    (a [256] distribution), every token's probability is the product of its bytes' probabilities:
    a byte-level teacher whose token probabilities the chain rule must reproduce. Without
    `alternatives`, a row holds the observed token only."""
    rng = np.random.default_rng(seed)
    s = surfaces(tok)
    V = len(s.surfaces)
    by_first = defaultdict(list)
    for i, u in enumerate(s.surfaces):
        if u and not s.special[i]:
            by_first[u[:1]].append(i)
    n = len(ids)
    top = np.full((n, k), -1, dtype=np.int64)
    lps = np.full((n, k), -np.inf)
    obs_lp = np.zeros(n)

    def logp(i):
        if byte_probs is None:
            return None
        u = s.surfaces[i]
        return float(np.log(byte_probs[np.frombuffer(u, dtype=np.uint8)]).sum()) if u else -30.0

    for r, o in enumerate(ids):
        near = by_first.get(s.surfaces[o][:1], [])
        cands = list(rng.choice(near, size=min(len(near), 3), replace=False)) if near else []
        cands += list(rng.integers(0, V, size=k))
        cands = [int(c) for c in dict.fromkeys(cands) if c != o][:k - 1] if alternatives else []
        if rng.random() < 0.8 or not alternatives:  # the observed token is in the top-k most of the time
            cands = [int(o)] + cands
        cands = cands[:k]
        if byte_probs is None:
            p = rng.dirichlet(np.ones(len(cands) + 1))[:len(cands)] * 0.95
            vals = np.log(p)
            obs = vals[cands.index(o)] if o in cands else math.log(rng.uniform(1e-4, 0.01))
        else:
            vals = np.array([logp(c) for c in cands])
            obs = logp(int(o))
        top[r, :len(cands)] = cands
        lps[r, :len(cands)] = vals
        obs_lp[r] = obs
    return top, lps, obs_lp


def longest_target(index: dict, string: bytes, exact: bool = False):
    """(target id, length) of the longest target surface that is a prefix of `string` (with exact:
    equal to it), else (-1, 0): a dict lookup per length."""
    for L in ([len(string)] if exact else range(len(string), 0, -1)):
        if string[:L] in index:
            return index[string[:L]], L
    return -1, 0


def reference(src, tgt, n_resp, s, first, by_byte, top, lps, obs_lp, k, eot=None, t_index=None, exact=False):
    """The rule of profuser.transfer, one position at a time with dicts (slow, readable). With
    `t_index` (the target's surface -> id dict, vocab_map._target_index) the trie steps run too:
    the target's own boundary, the observed path's later rows and the row after it."""
    m = len(tgt.ids)
    out_ids = np.full((m, k), -1, dtype=np.int64)
    out_lp = np.full((m, k), -np.inf)
    n = len(src.ids)
    text = src.text.tobytes()
    V = len(s.surfaces)
    P = lambda v: math.exp(v)  # noqa: E731

    def covering(byte):
        for i in range(n):
            if src.starts[i] <= byte < src.ends[i]:
                return i
        return None

    def row_of(i):
        return [(int(c), float(v)) for c, v in zip(top[i], lps[i]) if c >= 0]

    def conditioned(i, consumed):
        """Row i's candidates whose surface starts with `consumed`, and their normalizer."""
        row = row_of(i)
        cons = [(c, v) for c, v in row if c < V and s.surfaces[c].startswith(consumed)
                and (c == src.ids[i] or not s.special[c])]
        obs_in = any(c == src.ids[i] for c, _ in row)
        return cons, sum(P(v) for _, v in cons) + (0.0 if obs_in else P(obs_lp[i]))

    for j in range(m):
        a, b = int(tgt.starts[j]), int(tgt.ends[j])
        is_eot = eot is not None and eot[1] == j and eot[0] is not None
        straddle = a < 0 < b
        a = max(a, 0)
        if is_eot:
            i = last = eot[0]
            d, tail_partial = 0, False
        else:
            if not (a >= 0 and b <= n_resp and b > a):
                continue
            i, last = covering(a), covering(b - 1)
            if i is None or last is None or last < i:
                continue
            if any(src.starts[x + 1] != src.ends[x] for x in range(i, last)):
                continue
            d = a - int(src.starts[i])
            tail_partial = src.ends[last] > b and last > i
            if d > 0 and not src.exact[i]:
                continue
            if tail_partial and not src.exact[last]:
                continue
        if d:
            cons, Z = conditioned(i, text[src.base + src.starts[i]: src.base + src.starts[i] + d])
        else:
            cons, Z = row_of(i), 1.0
        head = []  # (candidate, skip, target id, probability) from row i
        for c, v in cons:
            if c == src.ids[i] or c >= V or len(s.surfaces[c]) <= d:
                continue
            if d and s.special[c]:
                continue
            tid = first[c] if d == 0 else by_byte[s.offsets[c] + d]
            if tid >= 0 and not straddle:
                head.append((c, d, int(tid), P(v) / Z))
        trie = t_index is not None
        renorm = 1.0
        if trie and j >= 1 and not straddle and tgt.exact[j - 1] and tgt.starts[j - 1] >= 0 and tgt.ends[j - 1] == a:
            before = text[src.base + tgt.starts[j - 1]: src.base + a]
            lost, keep = 0.0, []
            for c, skip, tid, p in head:
                g, L = longest_target(t_index, before + s.surfaces[c][skip:], exact)
                if g >= 0 and L > len(before) and not s.special[c]:
                    lost += p
                else:
                    keep.append((c, skip, tid, p))
            head = keep
            renorm = 1.0 / min(max(1.0 - lost, 1e-6), 1.0)
        entries = defaultdict(float)
        for _, _, tid, p in head:
            entries[tid] += p
        label = P(obs_lp[i]) / Z
        path = [label]  # path[x - i]: p(text from a to the start of source token x + 1)
        for x in range(i + 1, last):
            label *= P(obs_lp[x])
            path.append(label)
        if last > i:
            if tail_partial:
                need = text[src.base + src.starts[last]: src.base + b]
                tail_row = row_of(last)
                mass = sum(P(v) for c, v in tail_row if c < V and s.surfaces[c].startswith(need)
                           and (c == src.ids[last] or not s.special[c]))
                if not any(c == src.ids[last] for c, _ in tail_row):
                    mass += P(obs_lp[last])
                label *= mass
            else:
                label *= P(obs_lp[last])
        walkable = trie and tgt.exact[j] and not straddle and int(tgt.starts[j]) >= 0 and not is_eot
        if walkable:
            for x in range(i + 1, last + 1):  # the observed path's later rows
                for c, v in row_of(x):
                    if c >= V or c == src.ids[x] or s.special[c]:
                        continue
                    if x == last and tail_partial and s.surfaces[c].startswith(
                            text[src.base + src.starts[last]: src.base + b]):
                        continue
                    g, _ = longest_target(t_index, text[src.base + a: src.base + src.starts[x]] + s.surfaces[c], exact)
                    if g >= 0:
                        entries[g] += path[x - 1 - i] * P(v)
            r = last + 1
            if not tail_partial and src.ends[last] == b and r < n and src.starts[r] == b:  # the row after
                moved = 0.0
                for c, v in row_of(r):
                    if c >= V or c == src.ids[r] or s.special[c]:
                        continue
                    g, L = longest_target(t_index, text[src.base + a: src.base + b] + s.surfaces[c], exact)
                    if g >= 0 and L > b - a:
                        entries[g] += label * P(v)
                        moved += P(v)
                label *= max(1.0 - moved, 0.0)
        entries[int(tgt.ids[j])] += label
        ranked = sorted(((p * renorm, t) for t, p in entries.items() if p > 0), key=lambda x: (-x[0], x[1]))
        best = ranked[:k]
        label_entry = [e for e in ranked if e[1] == int(tgt.ids[j])]
        if label_entry and label_entry[0] not in best:  # the label keeps a place
            best = sorted(ranked[:k - 1] + label_entry, key=lambda x: (-x[0], x[1]))
        total = sum(p for p, _ in best)
        for c, (p, t) in enumerate(best):
            out_ids[j, c], out_lp[j, c] = t, math.log(p / max(total, 1.0))
    return out_ids, out_lp


def _sides(src_tok, tgt_tok, text):
    return response_tokens(src_tok, text, 0, text), response_tokens(tgt_tok, text, 0, text)


@PROPS
@given(text=texts, seed=st.integers(0, 2**16))
def test_vectorized_rule_equals_the_reference_loop(toks, tables, text, seed):
    n_resp = len(text.encode("utf-8"))
    for a, b in itertools.product(FAMILIES, repeat=2):
        src, tgt = _sides(toks[a], toks[b], text)
        first, by_byte = tables[(a, b)]
        top, lps, obs = synthetic_rows(toks[a], src.ids, seed)
        index = _target_index(surfaces(toks[b]))
        for trie in (None, prefix_trie(toks[b])):
            got = project(src, tgt, n_resp, surfaces(toks[a]), first, by_byte, top, lps, obs, K, trie=trie)
            want_ids, want_lp = reference(src, tgt, n_resp, surfaces(toks[a]), first, by_byte, top, lps, obs, K,
                                          t_index=None if trie is None else index)
            np.testing.assert_array_equal(got.ids, want_ids, err_msg=f"{a}->{b} {text!r} trie={trie is not None}")
            np.testing.assert_allclose(got.logprobs, want_lp, rtol=1e-5, atol=1e-5)
            # what a position carries is a (sub-)probability distribution
            mass = np.exp(np.where(got.ids >= 0, got.logprobs, -np.inf).astype(np.float64)).sum(axis=1)
            assert (mass <= 1 + 1e-5).all()


@PROPS
@given(text=texts, seed=st.integers(0, 2**16))
def test_every_covered_target_position_gets_a_distribution(toks, tables, text, seed):
    """Coverage: a target position whose bytes are tiled by source tokens, with byte-exact tokens
    wherever a token is only partly inside it, gets a distribution holding its own label."""
    tb = text.encode("utf-8")
    for a, b in itertools.product(FAMILIES, repeat=2):
        src, tgt = _sides(toks[a], toks[b], text)
        first, by_byte = tables[(a, b)]
        top, lps, obs = synthetic_rows(toks[a], src.ids, seed)
        got = project(src, tgt, len(tb), surfaces(toks[a]), first, by_byte, top, lps, obs, K, trie=prefix_trie(toks[b]))
        for j in range(len(tgt.ids)):
            x0, x1 = int(tgt.starts[j]), int(tgt.ends[j])
            inside = [i for i in range(len(src.ids)) if src.starts[i] < x1 and src.ends[i] > x0]
            if x1 <= x0 or not inside:
                continue
            tiles = all(src.starts[p + 1] == src.ends[p] for p in inside[:-1]) and \
                src.starts[inside[0]] <= x0 and src.ends[inside[-1]] >= x1
            partial_ok = all(src.exact[i] for i in inside if src.starts[i] < x0 or (src.ends[i] > x1 and i != inside[0]))
            if tiles and partial_ok:
                assert got.covered[j] and tgt.ids[j] in got.ids[j], (a, b, text, j)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=st.lists(texts, max_size=4), chat=st.lists(st.booleans(), min_size=4, max_size=4),
       cuts=st.lists(st.integers(1, 40), max_size=6), seed=st.integers(0, 2**16))
def test_project_many_equals_one_project_call_per_text(toks, tables, answers, chat, cuts, seed):
    """project_many (the align stage's batches) gives every text exactly the arrays project gives it:
    chat renderings (response after a template: target tokens straddling its start, paired ends of
    turn, template tails) mixed with plain texts, top-k rows of different widths, with and without
    the trie; texts side by side never see each other's tokens (plain pieces of one sentence, cut
    mid-word, follow each other: glued, their tokens would merge across the cut)."""
    from profuser.align import end_of_turn_index
    from profuser.chat import BUILTIN_TEMPLATES, end_of_turn_id, split_response
    from profuser.tiny import FAMILIES as TINY

    msgs = [{"role": "user", "content": "Say something."}]
    for a, b in itertools.product(FAMILIES, repeat=2):
        items = []
        sentence = "the cat sat on the mat and then there was another cat in the hat"
        bounds = sorted({0, len(sentence), *(c for c in np.cumsum(cuts) if c < len(sentence))})
        pieces = [sentence[x:y] for x, y in zip(bounds, bounds[1:])]
        for i, answer in enumerate(pieces + answers + ["the cat sat."]):
            if (i >= len(pieces) and chat[i % 4]) or i == len(pieces) + len(answers):  # the last one always
                sides = []
                for f in (a, b):
                    tmpl = BUILTIN_TEMPLATES[TINY[f][2]]
                    p, r = split_response(toks[f], tmpl, msgs, answer)
                    sides.append((response_tokens(toks[f], p + r, len(p), answer), end_of_turn_id(toks[f], tmpl)))
                n_resp = len(answer.encode("utf-8"))
                (src, e_src), (tgt, e_tgt) = sides
                eot = (end_of_turn_index(src, e_src, n_resp), end_of_turn_index(tgt, e_tgt, n_resp))
            else:
                (src, tgt), n_resp, eot = _sides(toks[a], toks[b], answer), len(answer.encode("utf-8")), None
            width = K if i % 2 == 0 else K - 2
            top, lps, obs = synthetic_rows(toks[a], src.ids, seed + i, k=width)
            items.append(Projection(src, tgt, n_resp, top, lps, obs, eot))
        if b == "vicuna_spm":  # its first response token holds the template's space (as in the test below)
            assert items[-1].tgt.starts[0] < 0 < items[-1].tgt.ends[0]
        assert items[-1].eot[0] is not None and items[-1].eot[1] is not None
        first, by_byte = tables[(a, b)]
        surf = surfaces(toks[a])
        for trie in (None, prefix_trie(toks[b])):
            many = project_many(items, surf, first, by_byte, K, trie=trie)
            for i, (it, got) in enumerate(zip(items, many)):
                want = project(it.src, it.tgt, it.n_resp, surf, first, by_byte, it.topk_ids, it.topk_logprobs,
                               it.token_logprobs, K, it.eot, trie=trie)
                for field in ("ids", "logprobs", "kept", "covered", "one_to_one"):
                    np.testing.assert_array_equal(getattr(got, field), getattr(want, field),
                                                  err_msg=f"{a}->{b} text {i} {field} trie={trie is not None}")


def test_coverage_on_real_text_is_nearly_complete(toks, tables, smollm2_tok):
    """On ordinary prose every target position is covered for every fixture pair and SmolLM2."""
    text = ("Sure! Here's a short answer: the café opened in 1998 — naïve readers “love” it.\n\n"
            "1. First, preheat the oven to 180°C.\n2. Then mix 2,500 g of flour 😀 and 中文 text.")
    n = len(text.encode())
    pairs = list(itertools.product(FAMILIES, repeat=2))
    pairs += [(f, "smollm2") for f in FAMILIES] + [("smollm2", f) for f in FAMILIES]
    all_toks = {**toks, "smollm2": smollm2_tok}
    for a, b in pairs:
        first, by_byte = tables[(a, b)] if (a, b) in tables else pair_tables(all_toks[a], all_toks[b], "prefix")
        src, tgt = _sides(all_toks[a], all_toks[b], text)
        top, lps, obs = synthetic_rows(all_toks[a], src.ids, 0)
        got = project(src, tgt, n, surfaces(all_toks[a]), first, by_byte, top, lps, obs, K, trie=prefix_trie(all_toks[b]))
        share = got.covered.mean()
        one = got.one_to_one.mean()
        assert share >= (0.97 if "gemma_unigram" in (a, b) else 1.0), (a, b, share)  # NFKC: "°" "—" rewritten
        assert share >= one  # never less than the 1:1 rule


@settings(max_examples=30, deadline=None, database=None)
@given(text=st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), min_size=1, max_size=40),
       seed=st.integers(0, 2**16))
def test_chain_rule_reproduces_a_byte_level_teacher(toks, tables, text, seed):
    """With a teacher whose token probabilities are products of per-byte probabilities (rows holding
    only the observed token, so no alternative adds to the label), a target token made of whole
    source tokens gets exactly the product over its own bytes."""
    rng = np.random.default_rng(seed)
    byte_probs = rng.dirichlet(np.ones(256) * 0.3)
    byte_probs = np.clip(byte_probs, 1e-6, None)
    n = len(text.encode())
    checked = 0
    for a, b in itertools.permutations(FAMILIES, 2):
        src, tgt = _sides(toks[a], toks[b], text)
        first, by_byte = tables[(a, b)]
        top, lps, obs = synthetic_rows(toks[a], src.ids, seed, byte_probs=byte_probs, alternatives=False)
        got = project(src, tgt, n, surfaces(toks[a]), first, by_byte, top, lps, obs, K, trie=prefix_trie(toks[b]))
        starts, ends = set(src.starts.tolist()), set(src.ends.tolist())
        for j in np.flatnonzero(got.covered):
            x0, x1 = int(tgt.starts[j]), int(tgt.ends[j])
            whole = [i for i in range(len(src.ids)) if src.starts[i] >= x0 and src.ends[i] <= x1]
            if x0 not in starts or x1 not in ends or not whole or not all(src.exact[i] for i in whole):
                continue
            want = float(np.log(byte_probs[np.frombuffer(src.text.tobytes()[src.base + x0:src.base + x1],
                                                          dtype=np.uint8)]).sum())
            hit = got.ids[j] == tgt.ids[j]
            assert hit.sum() == 1 and got.ids[j][1] == -1
            assert abs(float(got.logprobs[j][hit][0]) - want) < 1e-5 * max(1.0, abs(want)), (a, b, text, j)
            checked += 1
    assert checked > 0 or not text.strip()


def test_identical_tokenizers_keep_every_entry(toks, tables):
    text = "The quick brown fox jumps over the lazy dog. Café 😀 42."
    n = len(text.encode())
    src, tgt = _sides(toks["chatml_bpe"], toks["target"], text)
    first, by_byte = tables[("chatml_bpe", "chatml_bpe")]
    top, lps, obs = synthetic_rows(toks["chatml_bpe"], src.ids, 3)
    got = project(src, tgt, n, surfaces(toks["chatml_bpe"]), first, by_byte, top, lps, obs, K)
    assert got.covered.all() and got.one_to_one.all() and np.allclose(got.kept, 1.0)
    for j in range(len(tgt.ids)):
        row = {int(c): float(v) for c, v in zip(top[j], lps[j]) if c >= 0}
        row.setdefault(int(src.ids[j]), float(obs[j]))
        best = dict(sorted(row.items(), key=lambda x: (-x[1], x[0]))[:K])
        assert {int(c): pytest.approx(float(v), abs=1e-6) for c, v in zip(got.ids[j], got.logprobs[j]) if c >= 0} == best


def test_conditioning_inside_a_source_token_hand_example(toks):
    """A target that splits ` the` as ` th` + `e` against a source holding ` the` as one token: the
    target's ` th` gets the mass of every source candidate that starts with it, and its `e` is
    predicted from the same source row conditioned on the bytes ` th` already seen."""
    from profuser.align import ResponseTokens

    src_tok, tgt_tok = toks["vicuna_spm"], toks["gemma_unigram"]
    s, t = surfaces(src_tok), surfaces(tgt_tok)
    sid = {u: i for i, u in enumerate(s.surfaces) if u and not s.special[i]}
    tid = {u: i for i, u in enumerate(t.surfaces) if u and not t.special[i]}
    tb = np.frombuffer(b" the", dtype=np.uint8)
    src = ResponseTokens(np.array([sid[b" the"]]), np.array([0]), np.array([4]), np.array([True]), tb, 0)
    tgt = ResponseTokens(np.array([tid[b" th"], tid[b"e"]]), np.array([0, 3]), np.array([3, 4]),
                         np.array([True, True]), tb, 0)
    first, by_byte = pair_tables(src_tok, tgt_tok, "prefix")
    top = np.array([[sid[b" the"], sid[b" an"], sid[b" a"], -1]])
    lps = np.log(np.array([[0.5, 0.2, 0.3, 1.0]]))
    got = project(src, tgt, 4, s, first, by_byte, top, lps, np.log([0.5]), 4)
    e0 = {t.surfaces[int(c)]: math.exp(v) for c, v in zip(got.ids[0], got.logprobs[0]) if c >= 0}
    # ` the` is the observed path through ` th`; ` an` and ` a` are whole target tokens
    assert e0 == {b" th": pytest.approx(0.5), b" an": pytest.approx(0.2), b" a": pytest.approx(0.3)}
    # `e`: of the candidates, only ` the` starts with ` th` (Z = 0.5): all of it goes to `e`
    e1 = {t.surfaces[int(c)]: math.exp(v) for c, v in zip(got.ids[1], got.logprobs[1]) if c >= 0}
    assert e1 == {b"e": pytest.approx(1.0)}
    assert got.covered.all() and not got.one_to_one.any()
    # the observed token outside the stored top-k still counts in the conditioning
    top2 = np.array([[sid[b" an"], sid[b" a"], -1, -1]])
    got = project(src, tgt, 4, s, first, by_byte, top2, np.log([[0.2, 0.3, 1, 1]]), np.log([0.5]), 4)
    assert {t.surfaces[int(c)]: math.exp(v) for c, v in zip(got.ids[1], got.logprobs[1]) if c >= 0} == {
        b"e": pytest.approx(1.0)}


def test_a_target_token_starting_in_the_template_is_taught_from_the_response_on(toks):
    """Vicuna writes "ASSISTANT: " before the answer and its `▁the` holds that space: the target
    position still gets the source's probability of the answer's first word (by the chain rule over
    the source tokens), and nothing else (the candidates are word pieces without the space); with the
    1:1 rule it got no teacher."""
    from profuser.chat import BUILTIN_TEMPLATES, split_response

    msgs = [{"role": "user", "content": "Hi"}]
    answer = "the cat sat on the mat."
    src_tok, tgt_tok = toks["chatml_bpe"], toks["vicuna_spm"]
    sp, sr = split_response(src_tok, BUILTIN_TEMPLATES["chatml"], msgs, answer)
    tp, tr = split_response(tgt_tok, BUILTIN_TEMPLATES["vicuna"], msgs, answer)
    src = response_tokens(src_tok, sp + sr, len(sp), answer)
    tgt = response_tokens(tgt_tok, tp + tr, len(tp), answer)
    assert tgt.starts[0] < 0 < tgt.ends[0]  # the first target token straddles the response start
    first, by_byte = pair_tables(src_tok, tgt_tok, "prefix")
    top, lps, obs = synthetic_rows(src_tok, src.ids, 1)
    got = project(src, tgt, len(answer.encode()), surfaces(src_tok), first, by_byte, top, lps, obs, K)
    assert got.covered[0] and not got.one_to_one[0]
    assert list(got.ids[0][got.ids[0] >= 0]) == [tgt.ids[0]]  # the label only
    # its probability: the source tokens spelling the target token's response bytes, chained
    n_in = int(np.searchsorted(src.ends, tgt.ends[0], side="left")) + 1
    assert src.ends[n_in - 1] == tgt.ends[0] and src.starts[0] == 0
    np.testing.assert_allclose(float(got.logprobs[0][0]), float(np.sum(obs[:n_in])), rtol=1e-3, atol=1e-3)

def _hand(toks, text: bytes, src_pieces, tgt_pieces, rows, obs, tgt_tok=None, special_pairs=None, src_tok=None):
    """project() on hand-made spans: gemma_unigram source (or `src_tok`), chatml_bpe target (or
    `tgt_tok`; with its trie); rows are {surface: probability} per source token (a special token by
    its literal surface, where no regular token has it). Returns {surface: probability} per target
    position."""
    from profuser.align import ResponseTokens

    src_tok, tgt_tok = src_tok or toks["gemma_unigram"], tgt_tok or toks["chatml_bpe"]
    s, t = surfaces(src_tok), surfaces(tgt_tok)
    sid = {u: i for i, u in enumerate(s.surfaces) if u and s.special[i]}
    sid.update({u: i for i, u in enumerate(s.surfaces) if u and not s.special[i]})
    tid = _target_index(t)
    tb = np.frombuffer(text, dtype=np.uint8)

    def rt(pieces, ids):
        ends = np.cumsum([len(p) for p in pieces])
        starts = ends - np.array([len(p) for p in pieces])
        return ResponseTokens(np.array([ids[p] for p in pieces]), starts, ends, np.ones(len(pieces), dtype=bool), tb, 0)

    src, tgt = rt(src_pieces, sid), rt(tgt_pieces, tid)
    top = np.full((len(rows), 4), -1)
    lps = np.full((len(rows), 4), -np.inf)
    for r, row in enumerate(rows):
        for c, (u, p) in enumerate(row.items()):
            top[r, c], lps[r, c] = sid[u], math.log(p)
    first, by_byte = pair_tables(src_tok, tgt_tok, "prefix", special_pairs)
    got = project(src, tgt, len(text), s, first, by_byte, top, lps, np.log(obs), 6, trie=prefix_trie(tgt_tok))
    return [{t.surfaces[int(c)]: math.exp(v) for c, v in zip(got.ids[j], got.logprobs[j]) if c >= 0}
            for j in range(len(tgt_pieces))]


def test_boundaries_hand_example(toks):
    """Source ` ` + `lin`, target ` ` + `lin` (both split the same way; the target also has ` s`
    and ` a`, not ` e`). Position 0 (` `): the row after it says which continuations a longer target
    token would swallow: `s` (0.3 of it) goes to ` s`, `e` stays. Position 1 (`lin`): after the
    target's bare ` `, a continuation it would have spelled ` s` cannot follow, so `s` is dropped and
    the rest renormalized."""
    got = _hand(toks, b" lin", [b" ", b"lin"], [b" ", b"lin"],
                [{b" ": 0.6, b" a": 0.4}, {b"lin": 0.5, b"s": 0.3, b"e": 0.2}], [0.6, 0.5])
    assert got[0] == {b" ": pytest.approx(0.6 * 0.7), b" s": pytest.approx(0.6 * 0.3), b" a": pytest.approx(0.4)}
    assert got[1] == {b"lin": pytest.approx(0.5 / 0.7), b"e": pytest.approx(0.2 / 0.7)}


def _eot_bpe(corpus: list, vocab_size: int, use_regex: bool = True):
    """A byte-level BPE trained on `corpus` (x 50) with `<|im_end|>` as its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus * 50, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")


def test_a_special_candidate_is_not_swallowed_by_the_previous_target_token(toks):
    """Step 3 is about text: the end of turn offered after "." is not a continuation the target's "."
    would swallow, even in a target that has a token spelling "." + its literal surface ('.<', as
    Gemma-3 and SmolLM2 have). It keeps its probability (as the target's end of turn) and nothing is
    renormalized: on SmolLM2 -> Gemma-3 the rule had turned a row where the teacher ends the turn
    with 0.92 into ' They' 0.21, ' Their' 0.11, ..."""
    from profuser.chat import BUILTIN_TEMPLATES, end_of_turn_id
    from profuser.tiny import FAMILIES

    tgt_tok = _eot_bpe(["a. s .<x .<y b.<z"], 280)
    assert b".<" in set(surfaces(tgt_tok).surfaces)
    src_eot = end_of_turn_id(toks["gemma_unigram"], BUILTIN_TEMPLATES[FAMILIES["gemma_unigram"][2]])
    eot = surfaces(toks["gemma_unigram"]).surfaces[src_eot]
    rows = [{b".": 1.0}, {b" ": 0.1, eot: 0.9}, {b"s": 1.0}]
    got = _hand(toks, b". s", [b".", b" ", b"s"], [b".", b" ", b"s"], rows, [1.0, 0.1, 1.0], tgt_tok,
                {src_eot: tgt_tok.convert_tokens_to_ids("<|im_end|>")})
    assert got[1] == {b" ": pytest.approx(0.1), b"<|im_end|>": pytest.approx(0.9)}


def test_a_special_candidate_is_no_text_to_condition_on(toks):
    """Conditioning on a prefix of text (step 1) and the chance that a partly covered source token
    starts with the target's tail (step 4) count the candidates whose surface starts with that text;
    an end of turn whose literal name happens to start with it (`<|im_end|>` after "<") is not one."""
    tok = _eot_bpe(["<a", "<b", "a<", "x"], 270, use_regex=False)
    assert {b"<a", b"<b", b"a<", b"<", b"a", b"b", b"x"} <= set(surfaces(tok).surfaces)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    hand = dict(tgt_tok=tok, src_tok=tok, special_pairs={eot: eot})
    row = {b"<b": 0.3, b"<|im_end|>": 0.6, b"x": 0.1}
    # step 1: target `<` + `b` inside the source's `<b`; at `b` only `<b` is consistent with "<"
    got = _hand(toks, b"<b", [b"<b"], [b"<", b"b"], [row], [0.3], **hand)
    assert got[1] == {b"b": pytest.approx(1.0)}
    assert got[0][b"<|im_end|>"] == pytest.approx(0.6)  # where nothing is consumed it is the end of turn
    # step 4: target `a<` over `a` + the first byte of `<b`: p(a) x p(the next token starts with "<")
    got = _hand(toks, b"a<b", [b"a", b"<b"], [b"a<", b"b"], [{b"a": 1.0}, row], [1.0, 0.3], **hand)
    assert got[0][b"a<"] == pytest.approx(0.3)


def test_later_rows_of_the_observed_path_hand_example(toks):
    """Target ` s` over source ` ` + `s`: besides the observed path (0.7 x 0.5), the row after ` `
    offers `lin` and `e`, continuations the target starts with a bare ` ` (it has no ` l...`, ` e`)."""
    got = _hand(toks, b" s", [b" ", b"s"], [b" s"],
                [{b" ": 0.7, b" a": 0.3}, {b"s": 0.5, b"lin": 0.3, b"e": 0.2}], [0.7, 0.5])
    assert got[0] == {b" s": pytest.approx(0.35), b" ": pytest.approx(0.7 * 0.5), b" a": pytest.approx(0.3)}


@PROPS
@given(text=texts, seed=st.integers(0, 2**16))
def test_trie_walk_is_the_longest_target_prefix(toks, text, seed):
    """vocab_map.trie_walk (vectorized) against a dict lookup per length, in both modes: a stretch of
    text followed by a source token's surface from some byte on."""
    from profuser.vocab_map import trie_walk

    rng = np.random.default_rng(seed)
    tb = text.encode("utf-8")
    arr = np.frombuffer(tb, dtype=np.uint8)
    for a, b in itertools.permutations(FAMILIES, 2):
        s = surfaces(toks[a])
        index = _target_index(surfaces(toks[b]))
        Q = 40
        ids = rng.integers(0, len(s.surfaces), Q)
        skip = np.array([rng.integers(0, max(int(s.lengths[i]), 1)) for i in ids]).clip(0, s.lengths[ids])
        start = rng.integers(0, max(len(tb), 1), Q) if len(tb) else np.zeros(Q, dtype=np.int64)
        length = np.array([rng.integers(0, len(tb) - st + 1) for st in start]) if len(tb) else np.zeros(Q, dtype=np.int64)
        for exact in (False, True):
            got, got_len = trie_walk(prefix_trie(toks[b]), arr if len(tb) else np.zeros(1, np.uint8), start,
                                     length, s, ids, skip, exact)
            for q in range(Q):
                string = tb[start[q]:start[q] + length[q]] + s.surfaces[ids[q]][skip[q]:]
                assert (got[q], got_len[q]) == longest_target(index, string, exact), (a, b, string, exact)


def test_trie_extends_is_the_walks_first_step(toks):
    """vocab_map.trie_extends (the pre-filter of steps 3 and 6) is true exactly when some target
    surface starts with the state's prefix followed by the next byte of the source surface; -1 states
    and exhausted surfaces are false. Checked against a set of every target surface's prefixes."""
    from profuser.vocab_map import trie_extends

    rng = np.random.default_rng(0)
    for a, b in itertools.permutations(FAMILIES, 2):
        s, t = surfaces(toks[a]), surfaces(toks[b])
        trie, index = prefix_trie(toks[b]), _target_index(t)
        prefixes = {u[:n] for u in index for n in range(1, len(u) + 1)}
        regular = [i for i in range(len(t.surfaces)) if not t.special[i] and t.surfaces[i]]
        Q = 400
        states, texts_ = [0, -1], [b"", None]  # the root, off the trie
        for i in rng.choice(regular, Q):
            n = int(rng.integers(1, len(t.surfaces[i]) + 1))
            states.append(int(trie.node_along[trie.offsets[i] + n - 1]))
            texts_.append(t.surfaces[i][:n])
        ids = rng.integers(-1, len(s.surfaces) + 1, len(states))
        skip = np.array([rng.integers(0, int(s.lengths[i]) + 2) if 0 <= i < len(s.surfaces) else 0 for i in ids])
        got = trie_extends(trie, np.array(states), s, ids, skip)
        for q, (prefix, i) in enumerate(zip(texts_, ids)):
            nxt = s.surfaces[i][skip[q]:skip[q] + 1] if 0 <= i < len(s.surfaces) else b""
            want = prefix is not None and len(nxt) == 1 and prefix + nxt in prefixes
            assert bool(got[q]) == want, (a, b, prefix, nxt)


def test_trie_walk_refuses_bytes_outside_its_text(toks):
    from profuser.vocab_map import trie_walk

    s = surfaces(toks[FAMILIES[0]])
    text = np.frombuffer(b"hello", dtype=np.uint8)
    with pytest.raises(ValueError, match="outside the given byte array"):
        trie_walk(prefix_trie(toks[FAMILIES[1]]), text, np.array([3]), np.array([4]), s, np.array([0]), np.array([0]))


def test_trie_states_recorded_along_every_target_surface(toks):
    """PrefixTrie's per-byte record along each target surface (where profuser.transfer starts its
    walks) equals the dict lookup of the longest target surface within that surface's first n bytes."""
    for b in FAMILIES:
        t = surfaces(toks[b])
        trie, index = prefix_trie(toks[b]), _target_index(t)
        for i, u in enumerate(t.surfaces):
            if t.special[i]:
                continue
            for n in range(1, len(u) + 1):
                at = int(trie.offsets[i]) + n - 1
                assert trie.node_along[at] >= 0
                want = longest_target(index, u[:n])
                assert (trie.best_along[at], trie.best_len_along[at]) == want, (b, u, n)
