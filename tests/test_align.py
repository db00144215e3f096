"""Cross-tokenizer alignment and vocabulary mapping (profuser.align, profuser.vocab_map).

Property tests run over random Unicode text for every ordered pair of fixture tokenizers (three
families plus a second instance of one, so identical tokenizers are covered too).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from profuser.align import (
    align_mined, align_response, align_spans, align_text, byte_decoder, dropped_characters, dtw_path,
    edit_distance_matrix, same_tokenizer, surfaces, token_spans, token_spans_many, token_surface,
)
from profuser.chat import BUILTIN_TEMPLATES, encode_chat, end_of_turn_id, split_response
from profuser.tiny import build_tokenizer
from profuser.vocab_map import (
    PAD_ID, aligned_topk, build_vocab_map, load_or_build_vocab_map, load_pair_tables, map_topk, merge_entries,
    pair_tables,
)

from text_strategies import FAMILIES, texts

TEMPLATES = {"chatml_bpe": "chatml", "vicuna_spm": "vicuna", "gemma_unigram": "gemma", "target": "chatml"}
PROPS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])




def _covered(text: str, starts, ends) -> None:
    tb = text.encode("utf-8")
    cover = np.zeros(len(tb) + 1, dtype=np.int64)
    np.add.at(cover, starts, 1)
    np.add.at(cover, ends, -1)
    covered = np.cumsum(cover)[:-1] > 0
    pos = 0
    for ch in text:
        n = len(ch.encode("utf-8"))
        if not ch.isspace():
            assert covered[pos:pos + n].all(), f"char {ch!r} at byte {pos} not covered"
        pos += n


@PROPS
@given(text=texts)
def test_spans_cover_text_and_exact_tokens_are_the_text(toks, text):
    tb = text.encode("utf-8")
    for name, tok in toks.items():
        sp = token_spans(tok, text)
        assert sp.ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
        assert (sp.starts >= 0).all() and (sp.ends <= len(tb)).all() and (sp.starts <= sp.ends).all()
        _covered(text, sp.starts, sp.ends)
        surf = token_surface(tok)
        ex = np.flatnonzero(sp.exact)
        for k in ex:
            assert surf[sp.ids[k]] == tb[sp.starts[k]:sp.ends[k]], name
        # Exact spans never overlap and come in text order.
        assert (sp.starts[ex][1:] >= sp.ends[ex][:-1]).all()


@PROPS
@given(batch=st.lists(texts, max_size=6))
@example(batch=["Xx cat xx", "", " lead", "trail ", "e\u0301x", "Xx ﬁ xx", "😀"])
def test_token_spans_many_is_token_spans_of_each_text(toks, batch):
    """The batch pass gives every text exactly its own spans, whatever its neighbours (texts with
    leading or trailing whitespace, normalizer rewrites and byte pieces at the seams included)."""
    for tok in toks.values():
        got = token_spans_many(tok, batch)
        assert len(got) == len(batch)
        for t, g in zip(batch, got):
            w = token_spans(tok, t)
            for f in ("ids", "starts", "ends", "exact", "char_starts", "char_ends"):
                assert np.array_equal(getattr(g, f), getattr(w, f)), (t, f)


def test_token_spans_many_keeps_a_repair_inside_its_text():
    """A tokenizer that strips the text's edges and prepends `▁`: "lead" alone is `▁lead` over 4
    bytes (not exact); laid after "ab " (whose trailing space no token covers), the trimmed-offset
    repair would have taken that space for `▁lead`. The batch pass leaves such texts to token_spans."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Strip()
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.train_from_iterator(["ab lead", "lead ab"] * 20, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    batch = ["ab ", "lead", " lead", "ab"]
    for t, g in zip(batch, token_spans_many(tok, batch)):
        w = token_spans(tok, t)
        for f in ("ids", "starts", "ends", "exact", "char_starts", "char_ends"):
            assert np.array_equal(getattr(g, f), getattr(w, f)), (t, f)
    assert not token_spans_many(tok, batch)[1].exact[0] and token_spans_many(tok, batch)[2].exact[0]


@PROPS
@given(text=texts)
def test_transferred_positions_have_same_text_and_prefix(toks, text):
    spans = {n: token_spans(t, text) for n, t in toks.items()}
    for a, b in itertools.product(toks, repeat=2):
        r = align_text(toks[a], toks[b], text)
        assert len(r.tgt_to_src) == len(spans[b])
        assert r.tgt_to_src.min(initial=-1) >= -1 and r.tgt_to_src.max(initial=-1) < len(spans[a])
        j = np.flatnonzero(r.tgt_to_src >= 0)
        i = r.tgt_to_src[j]
        sa, sb = token_surface(toks[a]), token_surface(toks[b])
        assert [sa[x] for x in spans[a].ids[i]] == [sb[x] for x in spans[b].ids[j]], (a, b)
        if r.method != "copy":  # same bytes AND same byte offsets, i.e. the same text prefix
            assert (spans[a].starts[i] == spans[b].starts[j]).all()
            assert (spans[a].ends[i] == spans[b].ends[j]).all()
        assert len(set(i.tolist())) == len(i)  # one to one
        if same_tokenizer(toks[a], toks[b]):
            assert r.method == "copy" and (r.tgt_to_src == np.arange(len(spans[b]))).all()


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
@example(text="\x06")  # found by Hypothesis once (a one-off failure): SmolLM2 gives it no token
def test_real_smollm2_tokenizer_against_fixtures(toks, smollm2_tok, text):
    tb = text.encode("utf-8")
    sp = token_spans(smollm2_tok, text)
    ids, starts, ends = sp
    assert ids.tolist() == smollm2_tok(text, add_special_tokens=False)["input_ids"]
    if len(ids):
        _covered(text, sp.starts, sp.ends)
    else:  # only characters SmolLM2 cannot spell (see test_smollm2_drops_bytes_missing_from_its_alphabet)
        lost = _missing_bytes(smollm2_tok)
        assert all(set(ch.encode("utf-8")) & lost for ch in text), text
    surf = token_surface(smollm2_tok)
    assert all(surf[sp.ids[k]] == tb[sp.starts[k]:sp.ends[k]] for k in np.flatnonzero(sp.exact))
    for name in ("vicuna_spm", "gemma_unigram", "chatml_bpe"):
        for a, b in ((toks[name], smollm2_tok), (smollm2_tok, toks[name])):
            r = align_text(a, b, text)
            sa, sb = token_surface(a), token_surface(b)
            j = np.flatnonzero(r.tgt_to_src >= 0)
            assert [sa[x] for x in r.src_ids[r.tgt_to_src[j]]] == [sb[x] for x in r.tgt_ids[j]]


def _missing_bytes(tok) -> set[int]:
    """Bytes whose byte-level symbol (GPT-2's bytes_to_unicode) is not in a byte-level BPE vocabulary."""
    vocab = tok.get_vocab()
    return {b for c, b in byte_decoder().items() if c not in vocab}


def test_smollm2_drops_bytes_missing_from_its_alphabet(smollm2_tok):
    """SmolLM2's byte-level BPE lacks six control bytes (and bytes UTF-8 never or rarely uses) and has
    no unknown token, so the tokenizer drops those characters. A dropped stretch between tokens is
    given to the token before it (which is then not exact); a text made only of them has no tokens."""
    lost = _missing_bytes(smollm2_tok)
    assert {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D} <= lost and not lost & set(range(0x20, 0x7F))
    assert len(token_spans(smollm2_tok, "\x06")) == 0
    sp = token_spans(smollm2_tok, "a\x06b")
    assert smollm2_tok.convert_ids_to_tokens(sp.ids.tolist()) == ["a", "b"]
    assert sp.starts.tolist() == [0, 2] and sp.ends.tolist() == [2, 3] and sp.exact.tolist() == [False, True]
    _covered("a\x06b", sp.starts, sp.ends)
    # dropped_characters (profuser check's per-model line) finds exactly those, and nothing for the
    # fixtures: combining marks that NFKC composes with the letter before them are not dropped
    chars = [chr(c) for c in range(0x3000)] + ["\u00ad", "\u200b", "\ufeff", "\U0001F600"]
    assert [ord(c) for c in dropped_characters(smollm2_tok, chars)] == [0x04, 0x06, 0x13, 0x14, 0x16, 0x1D]
    for name in ("chatml_bpe", "vicuna_spm", "gemma_unigram"):
        assert dropped_characters(build_tokenizer(name), chars) == [], name


def test_same_tokenizer_detection(toks):
    assert same_tokenizer(toks["chatml_bpe"], toks["target"])
    assert same_tokenizer(toks["vicuna_spm"], build_tokenizer("vicuna_spm"))
    for a, b in itertools.combinations(FAMILIES, 2):
        assert not same_tokenizer(toks[a], toks[b])


def test_surfaces_follow_added_tokens():
    """Tokens added after the first alignment get surfaces: token_spans (which skips len(tokenizer) on
    its hot path) rebuilds the cached table when it meets an id the table does not cover."""
    tok = build_tokenizer("chatml_bpe")
    before = len(surfaces(tok).surfaces)
    token_spans(tok, "plain text")
    tok.add_tokens(["<tool>"])
    sp = token_spans(tok, "call <tool> now")
    new_id = tok.convert_tokens_to_ids("<tool>")
    assert new_id >= before and new_id in sp.ids.tolist()
    assert surfaces(tok, new_id).surfaces[new_id] == b"<tool>"
    assert len(surfaces(tok).surfaces) == before + 1
    # an id past the vocabulary (a model head padded beyond the tokenizer) is no reason to rebuild
    table = surfaces(tok)
    assert surfaces(tok, len(tok) + 100) is table


def test_byte_pieces_align_one_to_one(toks):
    # 文 is <0xE6><0x96><0x87> for vicuna_spm and three byte-level pieces for chatml_bpe.
    text = "a 文 b"
    r = align_text(toks["vicuna_spm"], toks["chatml_bpe"], text)
    sa, sb = token_surface(toks["vicuna_spm"]), token_surface(toks["chatml_bpe"])
    pairs = [(sa[r.src_ids[i]], sb[r.tgt_ids[j]]) for j, i in enumerate(r.tgt_to_src) if i >= 0]
    assert (b"\xe6", b"\xe6") in pairs and (b"\x96", b"\x96") in pairs and (b"\x87", b"\x87") in pairs


def test_trimmed_offsets_are_repaired(toks):
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(toks["chatml_bpe"].backend_tokenizer)
    backend.post_processor = processors.ByteLevel(trim_offsets=True)  # `Ġw` reported without its space
    trimmed = PreTrainedTokenizerFast(tokenizer_object=backend)
    text = "Hello world,  café x"
    sp = token_spans(trimmed, text)
    assert sp.exact.all()
    r = align_text(toks["vicuna_spm"], trimmed, text)
    ref = align_text(toks["vicuna_spm"], toks["chatml_bpe"], text)
    assert (r.tgt_to_src == ref.tgt_to_src).all()


def test_phantom_prefix_and_normalizer_rewrites_are_not_exact(toks):
    sp = token_spans(toks["vicuna_spm"], "a b")  # `▁a`: the space is not in the text
    assert not sp.exact[0]
    sp = token_spans(toks["gemma_unigram"], "x ﬁ Ａ")  # NFKC: ﬁ -> fi, Ａ -> A
    surf = token_surface(toks["gemma_unigram"])
    tb = "x ﬁ Ａ".encode()
    for k in range(len(sp)):
        if sp.exact[k]:
            assert surf[sp.ids[k]] == tb[sp.starts[k]:sp.ends[k]]
    assert not sp.exact[-1]


# --- the hand-built café case -------------------------------------------------------------------

def _cafe_tokenizers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = [("Ġ", "c"), ("Ġc", "a"), ("Ġca", "f"), ("Ã", "©"), ("Ġcaf", "Ã©")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    bl = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()

    spm_vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for t in ["▁", "a", "c", "f", "é", "▁a", "▁c", "▁ca", "▁caf", "▁café"]:
        spm_vocab[t] = len(spm_vocab)
    spm_merges = [("▁", "a"), ("▁", "c"), ("▁c", "a"), ("▁ca", "f"), ("▁caf", "é")]
    sp = Tokenizer(models.BPE(vocab=spm_vocab, merges=spm_merges, unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=bl), PreTrainedTokenizerFast(tokenizer_object=sp)


def test_hand_built_cafe_byte_level_meets_sentencepiece():
    bl, sp = _cafe_tokenizers()
    text = "a café"
    assert bl.convert_ids_to_tokens(bl(text)["input_ids"]) == ["a", "ĠcafÃ©"]
    assert sp.convert_ids_to_tokens(sp(text)["input_ids"]) == ["▁a", "▁café"]
    r = align_text(sp, bl, text)
    assert r.tgt_to_src.tolist() == [-1, 1]  # `▁a` carries a space that is not in the text
    r = align_text(bl, sp, text)
    assert r.tgt_to_src.tolist() == [-1, 1]
    v_sb, v_bs = build_vocab_map(sp, bl), build_vocab_map(bl, sp)
    cafe_sp, cafe_bl = sp.convert_tokens_to_ids("▁café"), bl.convert_tokens_to_ids("ĠcafÃ©")
    assert v_sb[cafe_sp] == cafe_bl and v_bs[cafe_bl] == cafe_sp
    # A SentencePiece byte piece meets the byte-level character standing for that byte.
    assert v_sb[sp.convert_tokens_to_ids("<0xC3>")] == bl.convert_tokens_to_ids("Ã")
    assert align_mined(["▁a", "▁café"], ["a", "ĠcafÃ©"]).tolist() == [-1, -1]  # raw strings differ
    surf_sp, surf_bl = token_surface(sp), token_surface(bl)
    assert surf_sp[cafe_sp] == surf_bl[cafe_bl] == " café".encode()


# --- vocabulary mapping ---------------------------------------------------------------------------

def test_vocab_map_round_trips_and_keeps_surfaces(toks):
    for a, b in itertools.product(toks, repeat=2):
        ab, ba = build_vocab_map(toks[a], toks[b], "exact"), build_vocab_map(toks[b], toks[a], "exact")
        sa, sb = token_surface(toks[a]), token_surface(toks[b])
        assert len(ab) == len(sa) and ab.max() < len(sb)
        special = set(toks[a].all_special_ids)
        counts: dict[bytes, int] = {}
        for i, s in enumerate(sa):
            if i not in special:
                counts[s] = counts.get(s, 0) + 1
        n_checked = 0
        for i, s in enumerate(sa):
            if i in special or ab[i] < 0:
                continue
            assert sb[ab[i]] == s
            if counts[s] == 1:
                assert ba[ab[i]] == i, (a, b, s)
                n_checked += 1
        assert n_checked > 200
        assert ab[toks[a].eos_token_id] == toks[b].eos_token_id
        if same_tokenizer(toks[a], toks[b]):
            assert (ab == np.arange(len(sa))).all()


def test_vocab_map_special_pairs_and_soft(toks):
    src, tgt = toks["gemma_unigram"], toks["chatml_bpe"]
    eot_s = end_of_turn_id(src, BUILTIN_TEMPLATES["gemma"])
    eot_t = end_of_turn_id(tgt, BUILTIN_TEMPLATES["chatml"])
    exact = build_vocab_map(src, tgt, "exact", special_pairs={eot_s: eot_t})
    assert exact[eot_s] == eot_t
    soft = build_vocab_map(src, tgt, mode="soft", special_pairs={eot_s: eot_t})
    mapped = exact >= 0
    assert (soft[mapped] == exact[mapped]).all() and (soft >= 0).sum() > mapped.sum()
    ss, st_ = token_surface(src), token_surface(tgt)
    new = np.flatnonzero((soft >= 0) & ~mapped)
    d = [edit_distance_matrix([ss[i]], [st_[soft[i]]])[0, 0] for i in new]
    assert all(di <= 0.5 * len(ss[i]) for di, i in zip(d, new))
    with pytest.raises(ValueError, match=r"one of \('prefix', 'exact', 'soft'\), got 'fuzzy'"):
        build_vocab_map(src, tgt, mode="fuzzy")


def test_prefix_map_is_the_longest_target_prefix(toks):
    """prefix mode: a source token without an identical target surface maps to the target token
    whose surface is the longest prefix of it; the by-byte table does the same for every suffix."""
    for a, b in itertools.permutations(FAMILIES, 2):
        src, tgt = toks[a], toks[b]
        first, by_byte = pair_tables(src, tgt, "prefix")
        exact = build_vocab_map(src, tgt, "exact")
        s, t = surfaces(src), surfaces(tgt)
        regular = {bytes(x) for i, x in enumerate(t.surfaces) if not t.special[i] and x}
        rng = np.random.default_rng(0)
        checked = 0
        for i in rng.choice(len(s.surfaces), size=min(300, len(s.surfaces)), replace=False):
            u = s.surfaces[i]
            if s.special[i] or not u:
                assert all(by_byte[s.offsets[i]:s.offsets[i] + len(u)] == -1)
                continue
            for d in range(len(u)):
                want = max((n for n in range(1, len(u) - d + 1) if u[d:d + n] in regular), default=0)
                got = by_byte[s.offsets[i] + d]
                if want == 0:
                    assert got == -1
                else:
                    assert got >= 0 and t.surfaces[got] == u[d:d + want], (a, b, u, d)
                checked += 1
            if exact[i] >= 0:
                assert first[i] == exact[i]  # identical surfaces first
            elif first[i] >= 0:
                assert u.startswith(t.surfaces[first[i]]) and len(t.surfaces[first[i]]) < len(u)
        assert checked > 300
        assert (first >= 0).sum() > (exact >= 0).sum()


def test_vocab_map_cache(toks, tmp_path):
    a, b = toks["vicuna_spm"], toks["chatml_bpe"]
    m1 = load_or_build_vocab_map(a, b, tmp_path)
    first, by_byte = load_pair_tables(a, b, tmp_path)
    assert (first == m1).all() and len(list(tmp_path.glob("pair-*.npz"))) == 1
    f2, b2 = load_pair_tables(a, b, tmp_path)
    assert (f2 == first).all() and (b2 == by_byte).all()
    files = list(tmp_path.glob("vocab_map-*.npy"))
    assert len(files) == 1
    assert (load_or_build_vocab_map(a, b, tmp_path) == m1).all()
    load_or_build_vocab_map(a, b, tmp_path, mode="soft")
    load_or_build_vocab_map(a, b, tmp_path, special_pairs={2: 2})
    assert len(list(tmp_path.glob("vocab_map-*.npy"))) == 3


# --- map_topk -------------------------------------------------------------------------------------

def test_map_topk_merges_drops_and_reports_mass():
    vmap = np.array([5, 5, -1, 7, 2])  # source ids 0 and 1 collide on target 5; 2 has no counterpart
    ids = np.array([[0, 1, 2, 3], [4, -1, -1, -1], [2, 9, -1, -1]])
    lp = np.log(np.array([[0.4, 0.2, 0.1, 0.05], [0.5, 1, 1, 1], [0.3, 0.1, 1, 1]]))
    out_ids, out_lp, kept = map_topk(ids, lp, vmap)
    assert out_ids.tolist() == [[5, 7, -1, -1], [2, -1, -1, -1], [-1, -1, -1, -1]]
    np.testing.assert_allclose(np.exp(out_lp[0, :2]), [0.6, 0.05], rtol=1e-6)
    np.testing.assert_allclose(np.exp(out_lp[1, 0]), 0.5, rtol=1e-6)
    assert np.isneginf(out_lp[out_ids == PAD_ID]).all()
    np.testing.assert_allclose(kept, [0.65 / 0.75, 1.0, 0.0])
    # Identity (same tokenizer): a copy, every valid entry kept.
    cid, clp, ck = map_topk(ids, lp, None)
    assert (cid[0] == [0, 1, 2, 3]).all() and (ck == 1).all()


def test_map_topk_vectorized_matches_loop():
    rng = np.random.default_rng(0)
    R, k, V = 200, 10, 50
    ids = rng.integers(-1, V + 5, size=(R, k))
    lp = np.log(rng.dirichlet(np.ones(k + 2), size=R)[:, :k])
    vmap = rng.integers(-1, 20, size=V)
    out_ids, out_lp, kept = map_topk(ids, lp, vmap)
    for r in range(R):
        acc: dict[int, float] = {}
        for i, l in zip(ids[r], lp[r]):
            if 0 <= i < V and vmap[i] >= 0:
                acc[int(vmap[i])] = np.logaddexp(acc.get(int(vmap[i]), -np.inf), l)
        got = {int(i): float(l) for i, l in zip(out_ids[r], out_lp[r]) if i >= 0}
        assert got.keys() == acc.keys()
        for key in acc:
            assert math.isclose(got[key], acc[key], rel_tol=1e-5, abs_tol=1e-6)
        valid = ids[r] >= 0
        expect = sum(math.exp(l) for i, l in zip(ids[r], lp[r]) if 0 <= i < V and vmap[i] >= 0)
        assert math.isclose(kept[r], expect / np.exp(lp[r][valid]).sum(), rel_tol=1e-9)
        vals = out_lp[r][out_ids[r] >= 0]
        assert (np.diff(vals) <= 0).all() and (out_ids[r][len(vals):] == PAD_ID).all()


def test_merge_entries_against_a_loop():
    """merge_entries on wide rows (more distinct ids than k), repeated ids, exact ties, -inf and
    negative ids: the kept entries are a top-k of the per-id log-sum-exp, in descending order with
    the lower id first among equal values, PAD after them."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        R, W, k = int(rng.integers(1, 6)), int(rng.integers(1, 30)), int(rng.integers(1, 12))
        ids = rng.integers(-2, 12, size=(R, W))
        lps = rng.choice(np.log([0.01, 0.02, 0.05, 0.1, 0.3]), size=(R, W))
        lps[rng.random((R, W)) < 0.1] = -np.inf
        out_ids, out_lp = merge_entries(ids, lps, k)
        assert out_ids.shape == out_lp.shape == (R, k) and out_lp.dtype == np.float32
        for r in range(R):
            acc: dict[int, float] = {}
            for i, l in zip(ids[r], lps[r]):
                if i >= 0 and l > -np.inf:
                    acc[int(i)] = float(np.logaddexp(acc.get(int(i), -np.inf), l))
            n = min(k, len(acc))
            got_ids, got_lp = out_ids[r, :n], out_lp[r, :n].astype(np.float64)
            assert (out_ids[r, n:] == PAD_ID).all() and np.isneginf(out_lp[r, n:]).all()
            assert len(set(got_ids.tolist())) == n and all(int(i) in acc for i in got_ids)
            np.testing.assert_allclose(got_lp, [acc[int(i)] for i in got_ids], rtol=1e-6)
            dropped = [v for i, v in acc.items() if i not in set(got_ids.tolist())]
            assert not dropped or max(dropped) <= got_lp.min() + 1e-6  # a top-k
            assert (np.diff(got_lp) <= 1e-6).all()
            # equal values (ids met once, so their value is the input, bit for bit): the lower id first
            once = {int(i) for i in ids[r][(ids[r] >= 0) & (lps[r] > -np.inf)] if (ids[r] == i).sum() == 1}
            for i, j in zip(got_ids[:-1], got_ids[1:]):
                if int(i) in once and int(j) in once and acc[int(i)] == acc[int(j)]:
                    assert i < j


def test_merge_flat_keeps_the_kept_id_and_equals_merge_entries():
    """merge_flat on flat entries of uneven rows (one row with many entries, rows with none) gives
    what merge_entries gives on the same entries padded to a matrix; with `keep`, a row's kept id,
    when it has an entry but ranks past k, replaces the k-th entry, and the rest stay in order."""
    from profuser.vocab_map import merge_flat

    rng = np.random.default_rng(1)
    for _ in range(300):
        R, k = int(rng.integers(1, 8)), int(rng.integers(1, 6))
        counts = rng.integers(0, 4, size=R)
        counts[rng.integers(R)] = int(rng.integers(10, 40))  # one wide row
        rows = np.repeat(np.arange(R), counts)
        ids = rng.integers(-1, 15, size=len(rows))
        lps = np.log(rng.uniform(0.001, 0.5, size=len(rows)))
        lps[rng.random(len(rows)) < 0.1] = -np.inf
        order = rng.permutation(len(rows))  # entries in any row order
        W = int(counts.max())
        dense_ids = np.full((R, W), -1)
        dense_lp = np.full((R, W), -np.inf)
        slot = np.arange(len(rows)) - np.searchsorted(rows, rows)
        dense_ids[rows, slot], dense_lp[rows, slot] = ids, lps
        want_ids, want_lp = merge_entries(dense_ids, dense_lp, k)
        got_ids, got_lp = merge_flat(rows[order], ids[order], lps[order], R, k)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_lp, want_lp, rtol=1e-6)
        keep = rng.integers(0, 15, size=R)
        kid, klp = merge_flat(rows, ids, lps, R, k, keep=keep)
        wide, _ = merge_entries(dense_ids, dense_lp, 100)  # every merged entry, ranked
        for r in range(R):
            ranked = [int(i) for i in wide[r] if i >= 0]
            if keep[r] in ranked[k:]:  # ranked past k: takes the k-th place
                assert kid[r].tolist() == ranked[:k - 1] + [int(keep[r])]
            else:
                np.testing.assert_array_equal(kid[r], want_ids[r])
            assert (np.diff(klp[r][kid[r] >= 0]) <= 1e-6).all()


def test_aligned_topk_gathers_teacher_rows():
    vmap = np.array([3, -1, 4, 5])
    ids = np.array([[0, 1], [2, 3], [3, -1]])
    lp = np.log(np.array([[0.6, 0.3], [0.5, 0.4], [0.9, 1.0]]))
    out_ids, out_lp, kept = aligned_topk(np.array([-1, 2, 0, -1, 1]), ids, lp.astype(np.float16), vmap)
    assert out_ids.tolist() == [[-1, -1], [5, -1], [3, -1], [-1, -1], [4, 5]]
    np.testing.assert_allclose(kept, [0, 1, 0.6 / 0.9, 0, 1], rtol=1e-3)
    np.testing.assert_allclose(np.exp(out_lp[4]), [0.5, 0.4], rtol=1e-3)


# --- MinED ------------------------------------------------------------------------------------------

def _dtw_reference(cost):
    """FuseLLM's dtw (per-cell Python), returning the backtracked path."""
    n, m = cost.shape
    D = np.full((n + 1, m + 1), np.inf)
    D[0, 0] = 0
    for i in range(n):
        for j in range(m):
            D[i + 1, j + 1] = cost[i, j] + min(D[i, j + 1], D[i + 1, j], D[i, j])
    D = D[1:, 1:]
    i, j, path = n - 1, m - 1, []
    while i > 0 or j > 0:
        path.append((i, j))
        opts = [D[i - 1, j - 1] if i > 0 and j > 0 else np.inf, D[i - 1, j] if i > 0 else np.inf,
                D[i, j - 1] if j > 0 else np.inf]
        move = int(np.argmin(opts))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    return [(0, 0)] + path[::-1]


@settings(max_examples=50, deadline=None, database=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_dtw_path_matches_fusellm_dtw(n, m, seed):
    cost = np.random.default_rng(seed).integers(0, 4, size=(n, m))
    assert dtw_path(cost) == _dtw_reference(cost)


def test_edit_distance_matrix_hand_values():
    d = edit_distance_matrix([b"kitten", b"", b"abc"], [b"sitting", b"abc", b""])
    assert d.tolist() == [[3, 6, 6], [7, 3, 0], [7, 0, 3]]


def _levenshtein_reference(a: bytes, b: bytes) -> int:
    """The textbook dynamic program, one row at a time."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


_BYTE_STRINGS = st.lists(st.binary(max_size=9).map(lambda b: bytes(c % 5 + 250 * (c % 7 == 0) for c in b)),
                         max_size=8)


@settings(max_examples=200, deadline=None, database=None)
@given(_BYTE_STRINGS, _BYTE_STRINGS)
def test_edit_distance_matrix_matches_the_dynamic_program(a, b):
    """rapidfuzz's cdist on byte strings (a small alphabet so strings overlap; bytes >= 0x80 included)."""
    d = edit_distance_matrix(a, b)
    assert d.dtype == np.int64 and d.shape == (len(a), len(b))
    assert d.tolist() == [[_levenshtein_reference(x, y) for y in b] for x in a]


def test_byte_decoder_inverts_gpt2_bytes_to_unicode():
    dec = byte_decoder()
    assert sorted(dec.values()) == list(range(256))
    assert dec["Ġ"] == ord(" ") and dec["Ċ"] == ord("\n") and dec["!"] == ord("!") and dec["Ã"] == 0xC3


@settings(max_examples=50, deadline=None, database=None)
@given(st.lists(st.sampled_from(["a", " a", "b", "ab", " ", "\n", "é", "😀", "xyz"]), min_size=1, max_size=40))
def test_mined_equal_strings_is_identity(tokens):
    assert align_mined(tokens, tokens).tolist() == list(range(len(tokens)))


def test_mined_agrees_with_spans_on_simple_ascii(toks):
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and 12 dogs ran to it , . what is plus answer".split()
    agree = total = 0
    for a, b in [("chatml_bpe", "vicuna_spm"), ("vicuna_spm", "chatml_bpe")]:
        for _ in range(10):
            text = " ".join(rng.choice(words, 20))
            r, m = align_text(toks[a], toks[b], text), align_text(toks[a], toks[b], text, method="mined")
            agree += (r.tgt_to_src == m.tgt_to_src).sum()
            total += len(r.tgt_to_src)
    assert agree / total > 0.95
    text = "What is 12 plus 30? The answer is 42."
    r = align_text(toks["vicuna_spm"], toks["chatml_bpe"], text)
    m = align_text(toks["vicuna_spm"], toks["chatml_bpe"], text, method="mined")
    assert (r.tgt_to_src == m.tgt_to_src).all()


# --- align_spans / align_response -----------------------------------------------------------------

def test_align_spans_exact_unique_and_masked():
    src_s, src_e = np.array([0, 2, 2, 5, 7]), np.array([2, 5, 5, 7, 9])  # (2,5) twice: ambiguous
    tgt_s, tgt_e = np.array([0, 2, 5, 6, 7]), np.array([2, 5, 6, 7, 9])
    assert align_spans(src_s, src_e, tgt_s, tgt_e).tolist() == [0, -1, -1, -1, 4]
    valid = np.array([True, True, True, True, False])
    assert align_spans(src_s, src_e, tgt_s, tgt_e, src_valid=valid).tolist() == [0, -1, -1, -1, -1]
    assert align_spans([], [], tgt_s, tgt_e).tolist() == [-1] * 5


@pytest.mark.parametrize("src,tgt", list(itertools.product(list(FAMILIES) + ["target"], repeat=2)))
def test_align_response_in_chat_renderings(toks, src, tgt):
    msgs = [{"role": "user", "content": "Say something about café culture."}]
    response = "Café culture: 2 espressos ☕ and a croissant.\n\nSee  you!"
    encs, eots, parts = {}, {}, {}
    for n in (src, tgt):
        tpl = BUILTIN_TEMPLATES[TEMPLATES[n]]
        parts[n] = split_response(toks[n], tpl, msgs, response)
        encs[n] = encode_chat(toks[n], tpl, msgs, response)
        eots[n] = end_of_turn_id(toks[n], tpl)
    (sp, sr), (tp, tr) = parts[src], parts[tgt]
    r = align_response(toks[src], sp + sr, len(sp), toks[tgt], tp + tr, len(tp), response, eots[src], eots[tgt])
    assert r.src_ids.tolist() == encs[src].input_ids[encs[src].prompt_len:]
    assert r.tgt_ids.tolist() == encs[tgt].input_ids[encs[tgt].prompt_len:]
    src_eot = r.src_ids.tolist().index(eots[src])
    tgt_eot = r.tgt_ids.tolist().index(eots[tgt])
    assert r.tgt_to_src[tgt_eot] == src_eot
    if TEMPLATES[src] == TEMPLATES[tgt] and same_tokenizer(toks[src], toks[tgt]):
        assert r.method == "copy" and (r.tgt_to_src == np.arange(len(r.tgt_ids))).all()
        return
    sa, sb = token_surface(toks[src]), token_surface(toks[tgt])
    j = np.flatnonzero(r.tgt_to_src >= 0)
    j = j[j != tgt_eot]
    assert [sa[x] for x in r.src_ids[r.tgt_to_src[j]]] == [sb[x] for x in r.tgt_ids[j]]
    assert len(j) > 0.3 * (len(r.tgt_ids) - 2)
    with pytest.raises(ValueError, match="verbatim"):
        align_response(toks[src], sp + sr, len(sp), toks[tgt], tp + tr, len(tp), response + "!")
