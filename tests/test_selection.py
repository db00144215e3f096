"""MinCE teacher choice (profuser.selection): comparable across tokenizers under `prep.mince: byte`,
the paper's per-token rule under `token`."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_config_dict
from prep_fixtures import rows_by_key
from profuser.config import parse_config
from profuser.prep.read import part_table
from profuser.prep.run import run_prep
from profuser.selection import MINCE_RULES, bits_per_byte, mince_value, rank_sources


def _source(byte_nll: np.ndarray, cuts: list[int], suffix_nll: float = 0.0) -> dict:
    """A source that tokenizes the text at `cuts` and whose knowledge is per byte: a token's NLL is
    the sum of its bytes' NLLs. `suffix_nll`: one end-of-turn token after the text."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(byte_nll))), len(byte_nll)]
    tokens = [float(byte_nll[a:b].sum()) for a, b in zip(bounds, bounds[1:])] + [suffix_nll]
    return {"ce": sum(tokens) / len(tokens), "text_nll": float(byte_nll.sum()), "text_bytes": len(byte_nll),
            "n_text_tokens": len(tokens) - 1}


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 60), seed=st.integers(0, 2**16), data=st.data())
def test_same_byte_knowledge_ties_under_byte_not_under_token(n, seed, data):
    """(a) Two sources that know the text equally well byte by byte, one tokenizing it finer: equal
    under `byte` (a tie, so the config order decides, both ways round), while `token` prefers the
    finer tokenizer whichever is listed first."""
    byte_nll = np.random.default_rng(seed).exponential(1.0, n) + 1e-3
    coarse_cuts = data.draw(st.lists(st.integers(1, n - 1), max_size=n // 3))
    extra = data.draw(st.lists(st.integers(1, n - 1), min_size=1, max_size=n))
    fine = _source(byte_nll, coarse_cuts + extra, suffix_nll=1.0)
    coarse = _source(byte_nll, coarse_cuts, suffix_nll=1.0)
    if fine["n_text_tokens"] == coarse["n_text_tokens"]:
        return  # the extra cuts all fell on existing ones
    val = {rule: {name: mince_value(s["ce"], s["text_nll"], s["text_bytes"], rule)
                  for name, s in (("fine", fine), ("coarse", coarse))} for rule in MINCE_RULES}
    assert val["byte"]["fine"] == pytest.approx(val["byte"]["coarse"], rel=1e-12)
    assert rank_sources({"fine": val["byte"]["fine"], "coarse": val["byte"]["fine"]})[0] == "fine"
    assert rank_sources({"coarse": val["byte"]["coarse"], "fine": val["byte"]["coarse"]})[0] == "coarse"
    assert val["token"]["fine"] < val["token"]["coarse"]
    for order in (("fine", "coarse"), ("coarse", "fine")):
        assert rank_sources({k: val["token"][k] for k in order})[0] == "fine"


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 8), seed=st.integers(0, 2**16), eot=st.floats(5.0, 60.0))
def test_worse_only_on_end_of_turn_does_not_lose_under_byte(n, seed, eot):
    """(b) Short answers ("42"): a source whose end-of-turn token is expensive (a 30-nat template
    floor) but which knows the answer better loses under `token` and wins under `byte`."""
    rng = np.random.default_rng(seed)
    good = rng.exponential(0.5, n) + 1e-3
    worse = good + rng.exponential(0.2, n) + 1e-3
    a = _source(good, [], suffix_nll=eot)  # better on the answer, expensive end of turn
    b = _source(worse, [], suffix_nll=0.01)
    if a["ce"] <= b["ce"]:
        return
    assert rank_sources({"b": mince_value(b["ce"], b["text_nll"], b["text_bytes"], "token"),
                         "a": mince_value(a["ce"], a["text_nll"], a["text_bytes"], "token")})[0] == "b"
    assert rank_sources({"b": mince_value(b["ce"], b["text_nll"], b["text_bytes"], "byte"),
                         "a": mince_value(a["ce"], a["text_nll"], a["text_bytes"], "byte")})[0] == "a"


def test_rank_sources_orders_and_breaks_ties_by_config_order():
    assert rank_sources({"x": 2.0, "y": 1.0, "z": 1.0}) == ["y", "z", "x"]
    assert rank_sources({"x": math.nan, "y": 3.0, "z": math.inf}) == ["y", "x", "z"]
    assert rank_sources({}) == []
    assert bits_per_byte(math.log(2) * 8, 4) == pytest.approx(2.0)
    assert bits_per_byte(1.0, 0) == math.inf
    with pytest.raises(ValueError, match="'bits' is not one of"):
        mince_value(1.0, 1.0, 1, "bits")


def _eot_heavy_template() -> str:
    """ChatML, except that an assistant turn closes with extra template text after <|im_end|>: the
    same model then pays for tokens no ground truth contains, and for nothing else (the prompt, which
    holds no assistant turn, renders exactly as ChatML)."""
    return ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}"
            "{% if m['role'] == 'assistant' %}{{ '\\nqq zz qq zz qq zz qq zz\\n' }}{% else %}{{ '\\n' }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tuned(tiny_suite) -> Path:
    """chatml_bpe fine-tuned on the training references (cached; the same one test_prep uses): it knows
    the answers and ChatML's end of turn, and has never seen the heavy template's suffix."""
    import json
    import os

    from prep_fixtures import cached_fine_tune

    cache = Path(os.environ.get("PROFUSER_TEST_CACHE", Path.home() / ".cache" / "profuser-tests"))
    recs = [json.loads(line) for line in (tiny_suite / "data" / "train.jsonl").read_text().splitlines() if line.strip()]
    return cached_fine_tune(tiny_suite / "models" / "chatml_bpe", cache, recs, steps=80, lr=1e-2)


@pytest.mark.parametrize("rule", MINCE_RULES)
def test_prep_a_source_worse_only_on_its_template_suffix(tiny_suite, tuned, tmp_path, rule):
    """(b) through the real teacher and align stages: one model under two templates that differ only
    after the end of turn. The response text costs both exactly the same, so under `byte` they tie
    and the first listed teaches every sample; under `token` the costly suffix decides."""
    d = tiny_config_dict(tiny_suite, tmp_path / "run")
    chatml = str(tuned)
    d["sources"] = [{"name": "heavy", "path": chatml, "chat_template": _eot_heavy_template()},
                    {"name": "plain", "path": chatml, "chat_template": "chatml"}]
    d["scorers"] = []
    d["data"]["limit"] = 8
    d["prep"]["mince"] = rule
    d["wandb"] = {"enabled": False}
    run_prep(parse_config(d))
    run = Path(d["run_dir"])
    heavy, plain = rows_by_key(run, "teacher", "training/heavy"), rows_by_key(run, "teacher", "training/plain")
    assert heavy.keys() == plain.keys() and len(heavy) == 8
    for k, h in heavy.items():
        p = plain[k]
        assert h["text_nll"] == p["text_nll"] and h["text_bytes"] == p["text_bytes"]  # same text, same cost
        assert h["ce"] > p["ce"]  # the suffix tokens are in the per-token mean
    teachers = {r["source"] for r in part_table(run, "align", "training").to_pylist()}
    assert teachers == ({"heavy"} if rule == "byte" else {"plain"})
