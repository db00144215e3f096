"""benchmarks/bench_transfer.py's WordOracle (--ideal): the ceiling it reports is only as good as
its two steps, each checked here on the tiny fixture families with random-init models."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_transfer.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_transfer", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


WORDS = ["apples", "answer", "light", "end", "add", "test"]


def _brute(bench, side, model, ctx: str, outcome: str) -> float:
    """log P(outcome | prompt, ctx) from one forward over the whole sequence: the outcome's tokens
    (a region of a chat rendering), then, for " w ", any token whose surface starts with a space."""
    from profuser.align import surfaces

    e = side.encode(ctx)
    head = list(e.input_ids[:e.prompt_len]) + [t for t, k in zip(e.input_ids[e.prompt_len:], e.text_tokens(ctx)) if k]
    text = outcome[:-1] if outcome.endswith(" ") else outcome
    seq = list(bench.region_tokens(side, text))
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([head + seq])).logits[0].double().log_softmax(-1)
    lp = sum(float(logp[len(head) - 1 + i, t]) for i, t in enumerate(seq))
    if outcome.endswith(" "):
        surf = surfaces(side.tokenizer).surfaces
        space = [i for i in range(logp.shape[-1]) if i < len(surf) and surf[i][:1] == b" "]
        lp += float(logp[-1, space].logsumexp(0))
    return lp


@pytest.mark.parametrize("family", ["chatml_bpe", "vicuna_spm", "gemma_unigram"])
def test_word_oracle_outcomes_equal_scoring_each_outcome_alone(bench, family):
    side = bench.ChatSide(family)
    model = side.model(3).eval()
    got = bench.WordOracle(WORDS).outcomes(model, side, "Apples end")  # the context's cache shared by all
    assert set(got) == {" " + w + t for w in WORDS for t in (" ", ".")}
    for name in (" light ", " add.", " answer ", " test."):
        assert got[name] == pytest.approx(_brute(bench, side, model, "Apples end", name), abs=2e-4)


def test_word_oracle_rows_are_conditionals_in_the_students_own_tokens(bench):
    """Inside every word after the first, the oracle's row at a student position holds only tokens
    that continue some word's OWN spelling (the student tokenizer's) after the tokens of the word so
    far, the observed token among them, and at most the probability that is left."""
    teacher, student = bench.ChatSide("gemma_unigram"), bench.ChatSide("chatml_bpe")
    model = teacher.model(5).eval()
    oracle = bench.WordOracle(WORDS)
    sents = ["Apples end add light.", "Test answer apples end."]
    base = bench.sft_rows(student, sents)
    for r in base:
        r["topk_ids"] = np.full((len(r["input_ids"]), bench.K), -1, dtype=np.int32)
        r["topk_logprobs"] = np.full((len(r["input_ids"]), bench.K), -np.inf, dtype=np.float16)
    rows, info = oracle.rows(model, ("t",), teacher, student, sents, base)
    assert info["oracle_positions"] > 0.9
    spell = {w: oracle.seq(student, " " + w) for w in WORDS} | {w + ".": oracle.seq(student, " " + w + ".") for w in WORDS}
    seen = 0
    for s, row in zip(sents, rows):
        e = student.encode(s)
        resp = e.input_ids[e.prompt_len:]
        first = len(student.tokenizer(s.split(" ")[0], add_special_tokens=False).input_ids)
        for j in range(len(resp)):
            p = e.prompt_len + j
            ids = [int(i) for i in row["topk_ids"][p] if i >= 0]
            if j < first or not ids:
                continue
            seen += 1
            lps = [float(v) for v in row["topk_logprobs"][p][:len(ids)]]
            assert resp[j] in ids
            assert math.fsum(math.exp(v) for v in lps) <= 1 + 1e-2
            # the current word's tokens so far: from the last token that starts with a space
            start = max(i for i in range(j + 1) if student.tokenizer.convert_ids_to_tokens(resp[i]).startswith("Ġ"))
            pre = tuple(resp[start:j])
            ok = {sq[len(pre)] for sq in spell.values() if sq[:len(pre)] == pre and len(sq) > len(pre)}
            if not pre:  # the sentence may end after the previous word
                ok.add(student.tokenizer.convert_tokens_to_ids("."))
            assert set(ids) <= ok, (s, j, set(ids) - ok)
    assert seen > 10


def test_lookahead_rows_are_the_prep_paths(bench):
    """--lookahead: teacher_rows carries the teacher stage's own word outcomes (lookahead_outcomes,
    the end of turn included) and distill_rows' align stage teaches target positions from them."""
    from types import SimpleNamespace

    from profuser.config import LookaheadConfig, PrepConfig
    from profuser.prep.teacher import lookahead_outcomes

    teacher, student = bench.ChatSide("gemma_unigram"), bench.ChatSide("chatml_bpe")
    model = teacher.model(5).eval()
    sents = ["Apples end add light.", "Test answer apples end."]
    look = {"branch": 2, "beam": 4, "steps": 3, "min_prob": 1e-3}
    cost: dict = {}
    rows = bench.teacher_rows(model, teacher, sents, look, cost)
    prep = PrepConfig(topk=bench.K, lookahead=LookaheadConfig(enabled=True, **look))
    cm = SimpleNamespace(model=model, tokenizer=teacher.tokenizer, template=teacher.template)
    for s, r in zip(sents, rows):
        e = teacher.encode(s)
        want = lookahead_outcomes(cm, e, e.text_tokens(s), prep)
        assert r["lookahead"] == (want.rows, want.texts, want.logprobs) and len(want.texts) > 0
    assert cost["word_starts"] == sum(len(set(r["lookahead"][0])) for r in rows)
    _, info = bench.distill_rows(student, teacher, rows, "after")
    assert info["lookahead_share"] > 0.3
