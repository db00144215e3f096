"""profuser.lookahead (prep.lookahead): the teacher side's word outcomes against plain full forwards,
the align side's rows against their definition, on the tiny fixture families with random-init
models (nothing mocked)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from profuser.chat import BUILTIN_TEMPLATES, encode_chat, end_of_turn_id
from profuser.lookahead import (EOT_OUTCOME, Speller, _Tree, apply_outcomes, observed_end, word_classes, word_outcomes,
                                word_rows, word_starts)
from profuser.tiny import FAMILIES, build_model, build_tokenizer

PROMPT = [{"role": "user", "content": "A sentence?"}]
TEXT = "The cat sat on the mat. Then it slept all day long."


def _side(family: str, seed: int = 3):
    tok = build_tokenizer(family)
    model = build_model(FAMILIES[family][3], len(tok), seed, tok, hidden=64, layers=2).eval()
    enc = encode_chat(tok, BUILTIN_TEMPLATES[FAMILIES[family][2]], PROMPT, TEXT)
    return tok, model, enc


def _run(model, tok, enc, **kw):
    classes = word_classes(tok)
    P = enc.prompt_len
    starts = word_starts(enc.input_ids[P:], enc.text_tokens(TEXT, tok.all_special_ids), classes)
    return starts, word_outcomes(model, list(enc.input_ids), P, starts, classes, **kw)


def _gemma3(tok, window: int):
    """A Gemma-3 text model (a sliding layer, then a full one) on the tokenizer `tok`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma3_text", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               sliding_window=window, layer_types=["sliding_attention", "full_attention"],
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    torch.manual_seed(5)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.mark.parametrize("family,change", [("chatml_bpe", None), ("vicuna_spm", None), ("gemma_unigram", None),
                                           ("chatml_bpe", "eager"), ("vicuna_spm", "window"),
                                           ("chatml_bpe", "gemma3"), ("chatml_bpe", "other")])
def test_outcomes_are_the_teachers_own_path_probabilities(family, change):
    """Every outcome's log-prob is the log-sum of its recorded paths, each scored alone by one plain
    forward of context + path (then, for a word, any token that ends it); each path spells the
    outcome's text; a word start's outcomes hold at most probability 1; the observed word is always
    an outcome. Computed as a token tree on one shared forward of the sequence (sdpa and eager
    attention; sliding windows shorter than the sequence on every layer, as Mistral, or on some, as
    Gemma-3; an attention that takes no 4-D mask runs on sdpa for the call), and from every context
    prefilled on its own (the way where the tree cannot run); both ways, and every chunking, give the
    same outcomes."""
    tok, model, enc = _side(family)
    if change == "window":  # Mistral's sliding window on every layer, much shorter than the sequence
        model.config.sliding_window = 6
    elif change == "gemma3":
        model = _gemma3(tok, 6)
    elif change == "eager":
        model.set_attn_implementation("eager")
    assert len(enc.input_ids) > 40
    classes = word_classes(tok)
    P = enc.prompt_len
    resp = list(enc.input_ids[P:])
    kw = dict(k=6, branch=3, beam=8, steps=3, min_prob=0.0)
    if change == "other":  # an attention that takes no 4-D mask (as FlashAttention-2): sdpa for the call
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register("profuser_test_attention", sdpa_attention_forward)
        AttentionMaskInterface.register("profuser_test_attention", sdpa_mask)
        model.set_attn_implementation("profuser_test_attention")
        assert _Tree(model, list(enc.input_ids), P, [3], "cpu").reason == \
            "attention 'profuser_test_attention' takes no 4-D mask"
    cost: dict = {}
    eot = end_of_turn_id(tok, BUILTIN_TEMPLATES[FAMILIES[family][2]])
    kw["eot"] = eot
    starts, oc = _run(model, tok, enc, trace=True, batch_tokens=10**6, cost=cost, **kw)
    assert len(starts) >= 8 and len(oc.texts) > 5 * len(starts)
    tree = cost["prefill_tokens"] == P + max(starts) and cost["forwards"] == 1 + 3
    assert tree and cost["tree_sequences"] == 1, cost  # one forward of the sequence, then one per step
    own = {"eager": "eager", "other": "profuser_test_attention"}.get(change, "sdpa")
    assert model.config._attn_implementation == own  # switched back after the call
    # the tree one word start at a time, every context prefilled on its own (batched with left
    # padding, and one at a time) give the same outcomes
    for other in (dict(batch_tokens=1), dict(tree=False, batch_tokens=10**6), dict(tree=False, batch_tokens=1)):
        _, alone = _run(model, tok, enc, **other, **kw)
        a, b = (dict(zip(zip(x.rows, x.texts), x.logprobs)) for x in (alone, oc))
        assert a.keys() == b.keys() and all(abs(a[o] - b[o]) < 1e-4 for o in a), other
    ender = torch.tensor(classes.ender)
    checked = 0
    for r, text, lp, paths in zip(oc.rows, oc.texts, oc.logprobs, oc.paths):
        if r not in starts[::3]:  # every outcome of every third word start (each path is one full forward)
            continue
        checked += 1
        scores = []
        for p in paths:
            toks = [t for t in p if t != "end"]
            if text == EOT_OUTCOME:
                assert toks == [eot]
            else:
                assert "".join(classes.text[t] for t in toks) == text
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([list(enc.input_ids[:P + r]) + toks])).logits[0].double()
            logp = logp.log_softmax(-1)
            sc = sum(float(logp[P + r - 1 + i, t]) for i, t in enumerate(toks))
            if p[-1] == "end":
                sc += float(logp[-1, ender[:logp.shape[-1]]].logsumexp(0))
            scores.append(sc)
        assert lp == pytest.approx(float(np.logaddexp.reduce(scores)), abs=2e-4), (r, text)
    assert checked > 20
    for r in starts:
        mine = {t: lp for rr, t, lp in zip(oc.rows, oc.texts, oc.logprobs) if rr == r}
        assert math.fsum(math.exp(v) for v in mine.values()) <= 1 + 1e-5
        last = observed_end(resp, r, classes)
        if last - r < 3:  # within the steps: the observed word was followed whatever the beam
            assert "".join(classes.text[t] for t in resp[r:last + 1]) in mine


@pytest.mark.parametrize("family", ["chatml_bpe", "vicuna_spm", "gemma_unigram"])
def test_word_starts_are_where_a_next_word_may_start(family):
    """A row is a word start when its observed token starts with whitespace, or is punctuation right
    after another token of the text (the "." after "mat": the teacher's alternatives there are next
    words); never a word piece, a byte piece, a template token, or punctuation opening the text."""
    tok, _, enc = _side(family)
    classes = word_classes(tok)
    P = enc.prompt_len
    resp = list(enc.input_ids[P:])
    in_text = enc.text_tokens(TEXT, tok.all_special_ids)
    got = set(word_starts(resp, in_text, classes).tolist())
    surf = [classes.text[t] for t in resp]
    for r, (t, s) in enumerate(zip(resp, surf)):
        want = bool(in_text[r]) and s is not None and (s[0].isspace() or (r > 0 and bool(in_text[r - 1])
                                                                          and not s[0].isalnum()))
        assert (r in got) == want, (r, s)
    dots = [r for r, s in enumerate(surf) if s == "." and in_text[r]]
    assert dots and set(dots) <= got  # every fixture spells both periods of TEXT as their own token
    # the same rows with punctuation opening the text, and with the text's first token a byte piece
    first = next(r for r in range(len(resp)) if in_text[r])
    dot = tok.convert_tokens_to_ids(".")
    assert first not in set(word_starts([dot] * len(resp), in_text, classes).tolist())
    byte = next(i for i, x in enumerate(classes.text) if x is None and not classes.ender[i])
    assert not set(word_starts([byte] * len(resp), in_text, classes).tolist())
    # a special token ends a word but starts none, even where a caller counts it as text
    eos = tok.eos_token_id
    assert classes.ender[eos] and not word_starts([dot, eos, eos], [True] * 3, classes).size


@pytest.mark.parametrize("src,tgt", [("chatml_bpe", "gemma_unigram"), ("gemma_unigram", "vicuna_spm")])
def test_the_end_of_turn_is_an_outcome_taught_as_the_targets(src, tgt):
    """The source's end of turn among a word start's candidates is the outcome EOT_OUTCOME with the
    teacher's own log-prob there (a plain forward's; through the teacher stage's own call), and the
    align side teaches it as the target's end of turn at the word's first target position only,
    with that probability; without `eot` on either side its mass is lost, as before."""
    from types import SimpleNamespace

    from profuser.align import response_tokens
    from profuser.chat import split_response
    from profuser.config import LookaheadConfig, PrepConfig
    from profuser.prep.teacher import lookahead_outcomes

    stok, model, enc = _side(src)
    ttok = build_tokenizer(tgt)
    s_tpl, t_tpl = BUILTIN_TEMPLATES[FAMILIES[src][2]], BUILTIN_TEMPLATES[FAMILIES[tgt][2]]
    s_eot, t_eot = end_of_turn_id(stok, s_tpl), end_of_turn_id(ttok, t_tpl)
    V = len(stok)
    kw = dict(k=V, branch=2, beam=2, steps=2, min_prob=0.0)  # every candidate, the end of turn among them
    starts, _ = _run(model, stok, enc, **kw)
    # the teacher stage's own call (it finds the source's end of turn itself)
    prep = PrepConfig(topk=V, lookahead=LookaheadConfig(branch=2, beam=2, steps=2, min_prob=0.0))
    s_cm = SimpleNamespace(model=model, tokenizer=stok, template=s_tpl)
    oc = lookahead_outcomes(s_cm, enc, enc.text_tokens(TEXT, stok.all_special_ids), prep)
    _, lost = _run(model, stok, enc, **kw)
    P = enc.prompt_len
    with torch.no_grad():
        full = model(input_ids=torch.tensor([list(enc.input_ids)])).logits[0].double().log_softmax(-1)
    end = {r: lp for r, t, lp in zip(oc.rows, oc.texts, oc.logprobs) if t == EOT_OUTCOME}
    assert set(end) == set(starts.tolist()) and EOT_OUTCOME not in lost.texts
    for r, lp in end.items():
        assert lp == pytest.approx(float(full[P + r - 1, s_eot]), abs=1e-4)
    # the align side, on rows the rule left empty, k wide enough for every outcome
    s_p, s_r = split_response(stok, s_tpl, PROMPT, TEXT)
    t_p, t_r = split_response(ttok, t_tpl, PROMPT, TEXT)
    sr, tr = response_tokens(stok, s_p + s_r, len(s_p), TEXT), response_tokens(ttok, t_p + t_r, len(t_p), TEXT)

    def taught(outcomes, eot):
        m = len(tr.ids)
        ids, lps = np.full((m, V), -1, dtype=np.int64), np.full((m, V), -np.inf, dtype=np.float32)
        kept, covered = np.zeros(m), np.zeros(m, dtype=bool)
        apply_outcomes(sr, tr, ids, lps, kept, covered, outcomes.rows, outcomes.texts, outcomes.logprobs,
                       Speller(ttok), word_classes(stok), eot)
        return ids, lps, covered

    ids, lps, covered = taught(oc, t_eot)
    firsts = 0
    for j in np.flatnonzero(covered):
        at = np.flatnonzero(ids[j] == t_eot)
        r = np.flatnonzero(sr.starts == tr.starts[j])
        if len(r) and int(r[0]) in end:  # the first target position of a taught word
            firsts += 1
            assert len(at) == 1 and float(lps[j, at[0]]) == pytest.approx(end[int(r[0])], abs=1e-5)
        else:  # further inside the word: consistent with no longer prefix
            assert len(at) == 0
    assert firsts >= 5
    ids, _, covered = taught(oc, None)
    assert covered.sum() >= firsts and not (ids == t_eot).any()


def test_a_wider_beam_only_adds_mass_and_a_floor_only_removes_outcomes():
    tok, model, enc = _side("gemma_unigram", 4)
    kw = dict(k=6, branch=3, steps=3)
    _, narrow = _run(model, tok, enc, beam=4, min_prob=0.0, **kw)
    _, wide = _run(model, tok, enc, beam=16, min_prob=0.0, **kw)
    _, floor = _run(model, tok, enc, beam=4, min_prob=3e-4, **kw)
    key = lambda oc: {(r, t): lp for r, t, lp in zip(oc.rows, oc.texts, oc.logprobs)}  # noqa: E731
    n, w, f = key(narrow), key(wide), key(floor)
    assert set(n) < set(w) and all(w[o] >= v - 1e-5 for o, v in n.items())
    assert set(f) < set(n) and all(v <= n[o] + 1e-5 for o, v in f.items())


@pytest.mark.parametrize("family", ["chatml_bpe", "gemma_unigram"])
def test_the_tree_projects_the_word_starts_rows_per_chunk(family):
    """Where the head splits off the body (profuser.models.split_head), the shared forward keeps the
    word starts' hidden states ([word starts, hidden]), not their logits ([word starts, vocabulary]),
    and projects a chunk's rows when it runs; the outcomes are those of the model's own forward (the
    head not split), over several chunks."""
    tok, model, enc = _side(family)
    P = enc.prompt_len
    starts = [int(r) for r in word_starts(enc.input_ids[P:], enc.text_tokens(TEXT, tok.all_special_ids),
                                          word_classes(tok))]
    kw = dict(k=6, branch=3, beam=8, steps=3, min_prob=0.0, batch_tokens=3 * 8 * 3)  # 3 word starts a chunk

    def tree():
        with torch.inference_mode():
            return _Tree(model, list(enc.input_ids), P, starts, "cpu")

    split = tree()
    assert split.reason is None and tuple(split.hidden.shape) == (len(starts), model.config.hidden_size)
    assert not hasattr(split, "first")
    _, by_chunk = _run(model, tok, enc, **kw)
    model._profuser_head = False  # the model's own forward, every word start's logits at once
    whole = tree()
    assert whole.reason is None and whole.hidden is None and tuple(whole.first.shape) == (len(starts), len(tok))
    _, at_once = _run(model, tok, enc, **kw)
    a, b = (dict(zip(zip(x.rows, x.texts), x.logprobs)) for x in (by_chunk, at_once))
    assert len(starts) > 9 and a.keys() == b.keys() and all(abs(a[o] - b[o]) < 1e-5 for o in a)


def test_the_floor_holds_at_the_word_start_too():
    """A word-start candidate whose own probability is at most min_prob starts no path (the observed
    word's excepted): no outcome of min_prob > 0 goes through one, while min_prob 0 (the same
    candidates) has outcomes that do, so the floor is what removes them."""
    tok, model, enc = _side("gemma_unigram", 4)
    classes = word_classes(tok)
    P, floor = enc.prompt_len, 0.02
    resp = list(enc.input_ids[P:])
    with torch.no_grad():
        first = model(input_ids=torch.tensor([list(enc.input_ids)])).logits[0].double().log_softmax(-1)

    def below(oc) -> int:  # outcomes through a non-observed word-start path candidate at most `floor`
        n = 0
        for r, paths in zip(oc.rows, oc.paths):
            for p in paths:
                c = p[0]
                if c != resp[r] and classes.path[c] and math.exp(float(first[P + r - 1, c])) <= floor:
                    n += 1
        return n

    kw = dict(k=8, branch=3, beam=8, steps=3, trace=True)
    _, free = _run(model, tok, enc, min_prob=0.0, **kw)
    _, floored = _run(model, tok, enc, min_prob=floor, **kw)
    assert below(free) > 0 and below(floored) == 0
    obs = {(r, "".join(classes.text[t] for t in p if t != "end")) for r, paths in zip(floored.rows, floored.paths)
           for p in paths if p[0] == resp[r]}
    assert {r for r, _ in obs} >= {r for r in set(floored.rows) if classes.path[resp[r]]}  # the observed word stays


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 4), min_size=1, max_size=4).map(tuple),
                          st.floats(-8.0, 0.0)), min_size=1, max_size=8),
       st.lists(st.integers(0, 4), min_size=1, max_size=4).map(tuple), st.integers(1, 5))
def test_word_rows_are_the_outcomes_conditionals(spelled, observed, k):
    """At t = 0 every id holds the total probability of the outcomes spelled starting with it; at t >
    0 the same over the outcomes that start with observed[:t], divided by their mass (so at most 1);
    at most k entries, the most probable ones, and the observed token among them when it has mass."""
    rows = word_rows(observed, spelled, k)
    assert len(rows) == len(observed)
    for t, got in enumerate(rows):
        cons = [(sq, lp) for sq, lp in spelled if sq[:t] == observed[:t]]
        full: dict[int, float] = {}
        for sq, lp in cons:
            if len(sq) > t:
                full[sq[t]] = full.get(sq[t], 0.0) + math.exp(lp)
        if not full:
            assert got is None
            continue
        z = 1.0 if t == 0 else math.fsum(math.exp(lp) for _, lp in cons)
        ids, lps = got
        assert len(ids) == min(k, len(full)) and len(set(ids)) == len(ids)
        for i, v in zip(ids, lps):
            assert math.exp(v) == pytest.approx(min(full[i] / z, 1.0), rel=1e-6)
        assert sum(math.exp(v) for v in lps) <= (1 + 1e-6 if t else sum(full.values()) + 1e-6)
        if observed[t] in full:
            assert observed[t] in ids
        rest = sorted((full[i] for i in full if i not in ids and i != observed[t]), reverse=True)
        others = [full[i] / z for i in ids if i != observed[t]]
        if rest and others:  # no dropped id is more probable than a kept one (the label aside)
            assert rest[0] / z <= min(others) + 1e-9


def test_speller_spells_between_two_words_or_refuses():
    tok = build_tokenizer("chatml_bpe")
    sp = Speller(tok)
    enc = tok("Xx cat xx", add_special_tokens=False, return_offsets_mapping=True)
    inside = tuple(t for t, (a, _) in zip(enc.input_ids, enc.offset_mapping) if 2 <= a < 6)
    assert len(inside) >= 1 and sp(" cat") == inside and " cat" in sp.cache
    # a text the tokenizer spells together with the word before it: "Xx" + "xcat" is X + xxcat
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["xxcat xxcat cat xx"] * 50, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    other = Speller(PreTrainedTokenizerFast(tokenizer_object=bpe))
    assert other("xcat") is None and other(" cat") is not None and other("cat") is not None
    # prepare (the align stage's call: every outcome of a batch at once) spells each as one call does
    for t in (tok, other.tokenizer):
        batch = [" cat", "xcat", ".", " cat.", "", " xx", "\n\n", " café"]
        many = Speller(t)
        many.prepare(batch)
        assert [many.cache[x] for x in batch] == [Speller(t)(x) for x in batch]


@pytest.mark.parametrize("src,tgt", [("gemma_unigram", "chatml_bpe"), ("chatml_bpe", "gemma_unigram"),
                                     ("vicuna_spm", "gemma_unigram")])
def test_align_sample_replaces_the_rule_only_inside_tiled_words(src, tgt):
    """align_sample with outcomes: the rule's rows stay wherever no word was taught; every taught
    position lies inside an observed word (or punctuation after one) the target tiles, and holds
    word_rows' entries over the outcomes spelled by the target (at most probability 1)."""
    from types import SimpleNamespace

    from profuser.chat import end_of_turn_id
    from profuser.prep.align_stage import Pair, Target, align_sample
    from profuser.prep.teacher import teacher_forward
    from profuser.vocab_map import pair_tables, prefix_trie

    stok, model, enc = _side(src)
    ttok = build_tokenizer(tgt)
    s_cm = SimpleNamespace(tokenizer=stok, template=BUILTIN_TEMPLATES[FAMILIES[src][2]], spec=SimpleNamespace(name=src))
    t_cm = SimpleNamespace(tokenizer=ttok, template=BUILTIN_TEMPLATES[FAMILIES[tgt][2]], spec=SimpleNamespace(name=tgt))
    s_eot, t_eot = end_of_turn_id(stok, s_cm.template), end_of_turn_id(ttok, t_cm.template)
    first, by_byte = pair_tables(stok, ttok, "prefix", {s_eot: t_eot})
    pair = Pair(src, s_cm, s_eot, False, False, first, by_byte, 1.0, "spans", prefix_trie(ttok))
    target = Target(t_cm, t_eot, 4096)
    P = enc.prompt_len
    o = teacher_forward(model, [enc.input_ids], [len(enc.input_ids) - P], 6)[0]
    args = (pair, target, "truncate_left", PROMPT, TEXT, np.asarray(enc.input_ids[P:]), -o.nll, o.topk_ids,
            o.topk_logprobs)
    _, oc = _run(model, stok, enc, k=6, branch=3, beam=8, steps=4, min_prob=1e-4)
    rule = align_sample(*args)
    got = align_sample(*args, (oc.rows, oc.texts, oc.logprobs))
    assert rule["n_lookahead"] == 0 and got["n_lookahead"] >= 5
    changed = np.flatnonzero((got["topk_ids"] != rule["topk_ids"]).any(axis=1)
                             | (got["topk_logprobs"] != rule["topk_logprobs"]).any(axis=1))
    assert 0 < len(changed) <= got["n_lookahead"]
    te = encode_chat(ttok, t_cm.template, PROMPT, TEXT)
    c = te.text.find(TEXT, te.boundary)
    # the target positions that lie inside a word of the response (between a space and the next non-word
    # character) or are punctuation after one (the "." after "mat")
    starts = [a - c for a, _ in te.offsets]
    inside_word = [0 <= a < len(TEXT) and (TEXT[a].isalnum() or (TEXT[a] == " " and a + 1 < len(TEXT)
                                                                and TEXT[a + 1].isalnum())
                                          or (a > 0 and not TEXT[a].isspace())) for a in starts]
    assert all(inside_word[j] for j in changed), [te.offsets[j] for j in changed if not inside_word[j]]
    for j in changed:
        p = np.exp(got["topk_logprobs"][j].astype(np.float64))
        assert p.sum() <= 1 + 2e-3 and (got["topk_ids"][j][p > 0] >= 0).all()


def test_the_tree_refuses_attention_it_cannot_reproduce():
    """Chunked attention or other layer types are refused by the config; a model that does not take the
    tree's mask (a Llama told its layers slide, which LlamaModel does not read: a mask per layer type
    reaches it) is refused by the tree's own check against the model's forward; tree=True raises and
    names why (refused, word_outcomes prefills every word start's context on its own: the other test)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from profuser.lookahead import _layout, tree_note

    def layout(arch, **kw):
        return _layout(SimpleNamespace(config=AutoConfig.for_model(arch, **kw)))

    assert layout("llama") == layout("qwen2") == layout("mistral", sliding_window=None) == _layout(None)
    assert layout("mistral", sliding_window=64).window == 64 and layout("mistral", sliding_window=64).types is None
    g = layout("gemma3_text", sliding_window=512)
    assert (g.window, g.types, g.reason) == (512, ("full_attention", "sliding_attention"), None)
    assert layout("llama4_text").reason.startswith("chunked attention")
    assert layout("qwen3_next").reason == "layer types ['linear_attention']"

    tok, model, enc = _side("chatml_bpe")
    model.config.sliding_window = 6
    model.config.layer_types = ["sliding_attention", "full_attention"]
    assert tree_note(model) == " (sliding window 6, masked in the token tree)"
    P = enc.prompt_len
    reason = _Tree(model, list(enc.input_ids), P, [3, 5], "cpu").reason
    assert reason.startswith("the model does not take the token tree's mask"), reason
    kw = dict(k=6, branch=3, beam=8, steps=3, min_prob=0.0)
    with pytest.raises(ValueError, match="token tree's mask"):
        _run(model, tok, enc, tree=True, **kw)
