"""Generation with per-record seeds: the sampler's distribution, and responses that do not depend on
the batch size, the batching mode or the other prompts (fp32, CPU, the tiny fixture models)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from profuser.config import GenerateConfig, ModelConfig
from profuser.prep.generate import (HFGenerator, SeededSampler, draw_key, generate_deps, mix32, prompt_ids,
                                    record_seed, stop_ids)


def test_hash_is_the_same_on_ints_and_int64_tensors():
    """Continuous batching computes keys on the host (ints), static batches on the device (tensors)."""
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    assert mix32(torch.tensor(xs, dtype=torch.int64)).tolist() == [mix32(x) for x in xs]
    seeds, steps = [0, 7, 2**32 - 1, 123456789], [0, 1, 5, 511]
    got = draw_key(torch.tensor(seeds, dtype=torch.int64), torch.tensor(steps, dtype=torch.int64)).tolist()
    assert got == [draw_key(s, t) for s, t in zip(seeds, steps)]
    assert all(0 <= k < 2**32 for k in got) and len(set(got)) == 4
    assert sorted(mix32(torch.arange(1 << 16)).tolist()) != list(range(1 << 16))  # it mixes
    assert len(set(mix32(torch.arange(1 << 16)).tolist())) == 1 << 16  # and is a bijection


def test_seeded_draws_follow_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40000
    keys = draw_key(torch.arange(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64))
    draws = SeededSampler()(logits.expand(n, -1), keys).argmax(-1)
    freq = torch.bincount(draws, minlength=6).double() / n
    p = logits.double().softmax(-1)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / n).sqrt().max()  # within 4 sigma everywhere
    # temperature 0.5 sharpens exactly as softmax(logits / 0.5)
    draws = SeededSampler(temperature=0.5)(logits.expand(n, -1), keys).argmax(-1)
    freq = torch.bincount(draws, minlength=6).double() / n
    p = (logits.double() / 0.5).softmax(-1)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / n).sqrt().max()


def test_filters_match_transformers_warpers():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(5, 300) * 3
    ids = torch.zeros(5, 1, dtype=torch.long)
    for t, k, p in ((1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.8), (0.9, 50, 0.5)):
        ref = TemperatureLogitsWarper(t)(ids, scores.clone())
        if k:
            ref = TopKLogitsWarper(k)(ids, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(ids, ref)
        got = SeededSampler(t, k, p).filter(scores.clone())
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), (t, k, p)
        torch.testing.assert_close(got[~torch.isinf(got)], ref[~torch.isinf(ref)])


@pytest.fixture(scope="module")
def prompts_of(tiny_suite):
    recs = [json.loads(line) for line in (tiny_suite / "data" / "train.jsonl").read_text().splitlines()][:10]

    def make(cm):
        return [prompt_ids(cm, r["messages"][:1], 256)[0] for r in recs], [r["id"] for r in recs]

    return make


@pytest.mark.parametrize("source", ["chatml_bpe", "gemma_unigram"])
def test_responses_do_not_depend_on_batch_size_or_batching(tiny_models, prompts_of, source):
    """Batch sizes 1, 3, 8 (static, left-padded) and continuous batching give the same tokens, greedy
    and sampled; sampling differs from greedy, and with the seed."""
    from profuser.models import load_chat_model

    cm = load_chat_model(ModelConfig(path=str(tiny_models[source]), name=source), device="cpu")
    prompts, ids = prompts_of(cm)
    assert len({len(p) for p in prompts}) > 3  # really padded
    seeds = [record_seed(42, source, i) for i in ids]
    out = {}
    for sample in (False, True):
        for bs in (1, 3, 8):
            g = GenerateConfig(max_new_tokens=14, batch_size=bs, do_sample=sample, temperature=1.2, top_p=0.95,
                               top_k=100, continuous_batching="off")
            gen = HFGenerator(cm, g)
            assert gen.mode == "static"
            out[sample, bs] = [x.token_ids for x in gen.generate(prompts, seeds)]
        assert out[sample, 1] == out[sample, 3] == out[sample, 8], sample
        g = GenerateConfig(max_new_tokens=14, batch_size=3, do_sample=sample, temperature=1.2, top_p=0.95, top_k=100,
                           continuous_batching="on")
        gen = HFGenerator(cm, g)
        cb = [x.token_ids for x in gen.generate(prompts, seeds)]
        assert gen.mode == "continuous" and cb == out[sample, 1], sample
    assert out[True, 1] != out[False, 1]
    # a record's draws depend on its own seed only: reordering the prompts moves the responses with them
    perm = [3, 9, 0, 7, 1, 8, 2, 6, 4, 5]
    g = GenerateConfig(max_new_tokens=14, batch_size=4, do_sample=True, temperature=1.2, top_p=0.95, top_k=100,
                       continuous_batching="off")
    moved = HFGenerator(cm, g).generate([prompts[j] for j in perm], [seeds[j] for j in perm])
    assert [x.token_ids for x in moved] == [out[True, 1][j] for j in perm]
    other = HFGenerator(cm, g).generate(prompts, [record_seed(43, source, i) for i in ids])
    assert [x.token_ids for x in other] != out[True, 1]
    stop = set(stop_ids(cm))
    assert all(not stop & set(t) for t in out[True, 1])


def test_generate_hash_ignores_speed_settings_only():
    base = GenerateConfig(do_sample=True)
    same = [GenerateConfig(do_sample=True, batch_size=64), GenerateConfig(do_sample=True, continuous_batching="off")]
    assert all(generate_deps(g) == generate_deps(base) for g in same)
    assert generate_deps(GenerateConfig(do_sample=True, temperature=0.7)) != generate_deps(base)
    assert "seeds" in generate_deps(base) and "seeds" not in generate_deps(GenerateConfig())
    v = GenerateConfig(backend="vllm")
    v.vllm.gpu_memory_utilization, v.vllm.enforce_eager = 0.5, True
    w = GenerateConfig(backend="vllm")
    assert generate_deps(v) == generate_deps(w)
    w.vllm.dtype = "float16"
    assert generate_deps(v) != generate_deps(w)
    assert "vllm" not in generate_deps(GenerateConfig())
    assert np.isscalar(record_seed(1, "a", "x")) and record_seed(1, "a", "x") != record_seed(1, "b", "x")
