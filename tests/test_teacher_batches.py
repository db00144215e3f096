"""Teacher forcing at scale: token-budget batches, the vocabulary projection per chunk of positions
(equal to the model's own logits, whatever the architecture), and peak memory that does not grow
with batch x vocabulary (a 262,144-token vocabulary, measured in fresh processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from profuser.prep.teacher import forward_batches, plan_batches, split_head, teacher_forward

REPO = Path(__file__).resolve().parents[1]


def test_batches_follow_the_token_budget_longest_first():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, 300).tolist()
    for budget, cap in ((2048, 64), (1000, 8), (300, 1000)):
        batches = plan_batches(lengths, budget, cap)
        assert sorted(j for b in batches for j in b) == list(range(300))
        flat = [lengths[j] for b in batches for j in b]
        assert flat == sorted(lengths, reverse=True)
        for b in batches:
            assert len(b) <= cap and (len(b) == 1 or len(b) * lengths[b[0]] <= budget)
            real = sum(lengths[j] for j in b)
            assert len(b) * lengths[b[0]] - real <= 0.1 * real  # padding within a tenth of the real tokens
    assert len(plan_batches([100] * 64, 2048, 64)) == 4  # equal lengths: the budget decides
    assert plan_batches([10, 500, 20], 100, 8) == [[1], [2], [0]]  # too long for the budget: alone
    assert plan_batches([20, 19, 18, 10], 1000, 8) == [[0, 1, 2], [3]]  # 10 would pad 30 onto 67
    assert plan_batches([], 100, 8) == []


def _tiny(arch: str, vocab: int = 300):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if arch == "gemma2":  # logit soft-capping after the head
        cfg = tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0, query_pre_attn_scalar=8)
        return tf.Gemma2ForCausalLM(cfg).eval()
    if arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=128)
        return tf.GPTNeoXForCausalLM(cfg).eval()
    if arch == "cohere":  # logit scale after the head
        cfg = tf.CohereConfig(**common, logit_scale=0.37)
        return tf.CohereForCausalLM(cfg).eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=False)).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma2", "cohere"])
def test_chunked_projection_equals_the_models_logits(arch):
    model = _tiny(arch)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 23, 4, 15, 30)]
    n_resp = [3, 10, 2, 14, 29]
    assert split_head(model, seqs[0]) is not None
    for s, r, o in zip(seqs, n_resp, teacher_forward(model, seqs, n_resp, k=5, chunk=4)):
        with torch.no_grad():
            logp = model(torch.tensor([s])).logits[0].double().log_softmax(-1)[len(s) - 1 - r:-1]
        nll = -logp.gather(1, torch.tensor(s[-r:])[:, None]).squeeze(1)
        np.testing.assert_allclose(o.nll, nll.numpy(), atol=1e-4)
        assert np.array_equal(o.topk_ids, logp.topk(5).indices.numpy())
        np.testing.assert_allclose(o.topk_logprobs.astype(np.float64), logp.topk(5).values.numpy(), atol=2e-3)


def test_a_head_that_does_not_reproduce_the_logits_falls_back_to_the_forward():
    model = _tiny("llama")
    seqs, n_resp = [[5, 6, 7, 8, 9, 10], [11, 12, 13]], [4, 2]
    want = teacher_forward(model, seqs, n_resp, k=3, chunk=2)
    odd = _tiny("llama")
    odd.lm_head.weight.data = model.lm_head.weight.data.clone()
    odd.load_state_dict(model.state_dict())
    real_forward = odd.forward

    def scaled(*a, **kw):  # a model whose logits are transformed in a way the head alone does not show
        out = real_forward(*a, **kw)
        out.logits = out.logits * 0.5
        return out

    odd.forward = scaled
    assert split_head(odd, seqs[0]) is None and odd._profuser_head is False
    got = teacher_forward(odd, seqs, n_resp, k=3, chunk=2)
    assert all(np.array_equal(a.topk_ids, b.topk_ids) for a, b in zip(got, want))  # same ranking, other scale
    assert not np.allclose(got[0].nll, want[0].nll)


def test_batches_in_any_grouping_give_the_same_rows():
    model = _tiny("llama")
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in g.manual_seed(3) and
            torch.randint(4, 40, (12,))]
    n_resp = [max(1, len(s) // 2) for s in seqs]
    ref = {}
    for idx, outs in forward_batches(model, seqs, n_resp, [[j] for j in range(12)], k=4, chunk=1000):
        ref[idx[0]] = outs[0]
    for budget in (64, 200, 10_000):
        got = {}
        for idx, outs in forward_batches(model, seqs, n_resp, plan_batches([len(s) - 1 for s in seqs], budget, 8),
                                         k=4, chunk=7):
            got.update(zip(idx, outs))
        for j in range(12):
            assert np.array_equal(got[j].topk_ids, ref[j].topk_ids) and abs(got[j].ce - ref[j].ce) < 1e-5


_PEAK = r"""
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from profuser.prep.teacher import teacher_forward



def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


torch.set_num_threads(2)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=262144, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).eval()
g = torch.Generator().manual_seed(1)
seqs = [torch.randint(0, 262144, (72,), generator=g).tolist() for _ in range(16)]
out = []
for batch, mode in json.loads(sys.argv[1]):
    model._profuser_head = None if mode == "chunked" else False  # False: the model's forward, [N, V] logits
    # the peak resident set since a reset just before the call, minus the resident set then: an
    # earlier high-water mark (imports, or library pages that a busy machine evicted since) cannot
    # hide the call's own peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    res = teacher_forward(model, seqs[:batch], [64] * batch, k=10, chunk=64)
    after = status_kib("VmHWM")
    out.append({"batch": batch, "mode": mode, "peak_rise_mib": (after - before) / 1024, "ce": [o.ce for o in res[:2]]})
print(json.dumps(out))
"""


def test_peak_memory_with_a_262k_vocabulary_is_bounded_by_the_chunk_not_the_batch():
    """Teacher forcing 2, then 16 sequences of 64 response positions with a 262,144-token vocabulary,
    64 positions per chunk, in one fresh process: the call's peak resident set above the resident set
    before it (VmHWM reset through /proc/self/clear_refs) is a few chunks for 2 sequences and the same
    for 16, although 1,024 positions of fp32 logits would be 1 GiB. The model's own forward (the
    fallback: [N, V] logits) on 8 sequences, in a process of its own, rises by most of 512 MiB, so the
    measurement does see such a tensor. (Chunks of 64 MiB stay above glibc's largest mmap threshold,
    so freed chunks go back to the system instead of fragmenting the heap.)"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="2")
    got = []
    for plan in ([[2, "chunked"], [16, "chunked"]], [[8, "dense"]]):  # the dense run in its own process
        r = subprocess.run([sys.executable, "-c", _PEAK, json.dumps(plan)], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        got += json.loads(r.stdout.strip().splitlines()[-1])
    small, large, dense = got
    row_mib = 262144 * 4 / 2**20  # one position's fp32 logits: 1 MiB
    assert small["peak_rise_mib"] < 5 * 64 * row_mib, small  # a few chunk-sized temporaries
    assert large["peak_rise_mib"] < small["peak_rise_mib"] + 16, (small, large)  # 8x the positions, same peak
    assert dense["peak_rise_mib"] > 0.5 * 512 * row_mib, dense
    np.testing.assert_allclose(large["ce"], dense["ce"], rtol=1e-5)
    np.testing.assert_allclose(small["ce"], large["ce"], rtol=1e-5)
