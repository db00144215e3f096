"""fusion_loss against hand-computed numbers and a dense, per-position fp64 reference."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from profuser.losses import DIVERGENCES, TEACHER_REST, LossParts, fusion_loss, safe_div, teacher_buckets


def make_batch(B, T, V, K, *, seed=0, p_masked=0.3, p_no_teacher=0.2, p_empty=0.2, dtype=torch.float64):
    """Random logits/labels and a label-aligned top-k teacher with -1 holes and empty rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < p_masked] = -100
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    lps = teacher.log_softmax(-1).gather(-1, ids).to(dtype)  # full-vocab log-probs: top-k mass < 1
    ids[torch.rand(B, T, K, generator=g) < p_empty] = -1
    ids[torch.rand(B, T, generator=g) < p_no_teacher] = -1
    lps = lps.masked_fill(ids < 0, 0.0)  # the value stored beside a -1 must not matter
    return logits, labels, ids, lps


def reference(logits, labels, ids, lps, *, beta=1.0, divergence="forward_kl", temperature=1.0, fusellm_lambda=None,
              rest="other", min_mass=0.0):
    """Loop over positions with dense fp64 distributions; returns (total_sum, ce_sum, kd_sum, n).

    rest="other": the teacher is its stored probabilities plus one bucket with the rest of its mass,
    the student its probabilities at those ids plus one bucket with the rest of its mass, both
    tempered as distributions over these buckets. rest="renormalize": the teacher renormalized
    over the stored ids (and, for reverse KL, the student too)."""
    tau = temperature
    B, T, V = logits.shape
    ce_sum = kd_sum = logits.new_zeros((), dtype=torch.float64)
    n = 0
    for b in range(B):
        for t in range(1, T):
            y = int(labels[b, t])
            if y == -100:
                continue
            n += 1
            z = logits[b, t - 1].double()
            ce_sum = ce_sum - torch.log_softmax(z, -1)[y]
            keep = (ids[b, t] >= 0) & (lps[b, t] != float("-inf"))
            if not keep.any() or float(lps[b, t][keep].double().exp().sum()) < min_mass:
                continue
            support = ids[b, t][keep]
            q = torch.softmax(z / tau, -1)
            if rest == "renormalize":
                p = torch.softmax(lps[b, t][keep].double() / tau, -1)
                qb = q[support]
                if divergence == "forward_kl":
                    d = (p * (p.log() - qb.log())).sum()
                elif divergence == "ce":
                    d = -(p * qb.log()).sum()
                else:
                    qs = qb / qb.sum()
                    d = (qs * (qs.log() - p.log())).sum()
            else:
                raw = lps[b, t][keep].double().exp()
                rest_p = 1.0 - raw.sum()
                rest_p = rest_p if rest_p > 16 * torch.finfo(torch.float64).eps else rest_p * 0
                pb = torch.cat([raw, rest_p.clamp(min=0).view(1)])
                tempered = torch.where(pb > 0, pb.clamp(min=1e-300) ** (1 / tau), torch.zeros_like(pb))
                pb = tempered / tempered.sum()
                qb = torch.cat([q[support], (1.0 - q[support].sum()).clamp(min=1e-300).view(1)])
                if divergence == "forward_kl":
                    d = sum(pi * (pi.log() - qi.log()) for pi, qi in zip(pb, qb) if pi > 0)
                elif divergence == "ce":
                    d = -sum(pi * qi.log() for pi, qi in zip(pb, qb) if pi > 0)
                else:
                    pb = torch.cat([pb[:-1], pb[-1:].clamp(min=1e-8)])  # an empty "other" counts as 1e-8
                    d = (qb * (qb.log() - pb.log())).sum()
            kd_sum = kd_sum + tau**2 * d
    lam = fusellm_lambda
    total = ce_sum + beta * kd_sum if lam is None else lam * ce_sum + (1 - lam) * kd_sum
    return total, ce_sum, kd_sum, n


def assert_parts_close(parts, ref, tol=1e-9):
    for got, want in zip((parts.total_sum, parts.ce_sum, parts.kd_sum), ref[:3]):
        got, want = got.detach(), want.detach()
        assert torch.isfinite(got)
        assert float(got) == pytest.approx(float(want), rel=tol, abs=tol)
    assert int(parts.n_tokens) == ref[3]


# ---------------------------------------------------------------------------------------------
# hand-computed values: V = 3, one scored position


def tiny_example():
    # student q = [0.2, 0.3, 0.5] at position 0 predicts label 2 at position 1
    logits = torch.log(torch.tensor([[[0.2, 0.3, 0.5], [0.0, 0.0, 0.0]]], dtype=torch.float64))
    labels = torch.tensor([[-100, 2]])
    # teacher top-2 over position 1: ids [2, 0] with full-vocab probs 0.4, 0.4 (mass 0.8); -1 elsewhere
    ids = torch.tensor([[[-1, -1, -1], [2, 0, -1]]])
    lps = torch.log(torch.tensor([[[1.0, 1.0, 1.0], [0.4, 0.4, 1.0]]], dtype=torch.float64))
    return logits, labels, ids, lps


def test_hand_computed_tiny_vocab_other_bucket():
    logits, labels, ids, lps = tiny_example()
    # teacher buckets: id 2: 0.4, id 0: 0.4, other: 0.2; student buckets: id 2: 0.5, id 0: 0.2, other: 0.3
    fkl = 0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / 0.2) + 0.2 * math.log(0.2 / 0.3)
    xent = -(0.4 * math.log(0.5) + 0.4 * math.log(0.2) + 0.2 * math.log(0.3))
    rkl = 0.5 * math.log(0.5 / 0.4) + 0.2 * math.log(0.2 / 0.4) + 0.3 * math.log(0.3 / 0.2)
    for value, literal in ((fkl, 0.106909), (xent, 1.161829), (rkl, 0.094582)):
        assert value == pytest.approx(literal, abs=1e-6)
    for divergence, d in (("forward_kl", fkl), ("ce", xent), ("reverse_kl", rkl)):
        parts = fusion_loss(logits, labels, ids, lps, beta=0.5, divergence=divergence)
        assert float(parts.ce_sum) == pytest.approx(-math.log(0.5), abs=1e-9)
        assert float(parts.kd_sum) == pytest.approx(d, abs=1e-9)
        assert float(parts.total_sum) == pytest.approx(-math.log(0.5) + 0.5 * d, abs=1e-9)
    # a floor above the stored mass (0.8) leaves CE only
    assert float(fusion_loss(logits, labels, ids, lps, min_mass=0.81).kd_sum) == 0.0
    assert float(fusion_loss(logits, labels, ids, lps, min_mass=0.79).kd_sum) == pytest.approx(fkl, abs=1e-9)


def test_hand_computed_tiny_vocab():
    logits, labels, ids, lps = tiny_example()
    # renormalized teacher p = [0.5 at id 2, 0.5 at id 0]
    ce = -math.log(0.5)  # 0.693147
    fkl = 0.5 * math.log(0.5 / 0.5) + 0.5 * math.log(0.5 / 0.2)  # 0.458145
    xent = -(0.5 * math.log(0.5) + 0.5 * math.log(0.2))  # 1.151293
    # student renormalized on {2, 0}: q~ = [5/7, 2/7]
    rkl = 5 / 7 * math.log((5 / 7) / 0.5) + 2 / 7 * math.log((2 / 7) / 0.5)  # 0.094878
    for value, literal in ((ce, 0.693147), (fkl, 0.458145), (xent, 1.151293), (rkl, 0.094878)):
        assert value == pytest.approx(literal, abs=1e-6)
    for divergence, d in (("forward_kl", fkl), ("ce", xent), ("reverse_kl", rkl)):
        parts = fusion_loss(logits, labels, ids, lps, beta=0.5, divergence=divergence, rest="renormalize")
        assert float(parts.ce_sum) == pytest.approx(ce, abs=1e-9)
        assert float(parts.kd_sum) == pytest.approx(d, abs=1e-9)
        assert float(parts.total_sum) == pytest.approx(ce + 0.5 * d, abs=1e-9)
        assert int(parts.n_tokens) == 1


def test_hand_computed_temperature_and_lambda():
    logits, labels, ids, lps = tiny_example()
    # tau = 2: student softmax(log q / 2) = sqrt(q) / sum(sqrt(q)); teacher sqrt(0.4), sqrt(0.4) -> [0.5, 0.5]
    s = [math.sqrt(x) for x in (0.2, 0.3, 0.5)]
    qt = [x / sum(s) for x in s]  # [0.262752, 0.321803, 0.415445]
    d = 2**2 * (0.5 * math.log(0.5 / qt[2]) + 0.5 * math.log(0.5 / qt[0]))
    assert d == pytest.approx(1.657314, abs=1e-6)
    parts = fusion_loss(logits, labels, ids, lps, temperature=2.0, rest="renormalize")
    assert float(parts.kd_sum) == pytest.approx(d, abs=1e-9)
    assert float(parts.ce_sum) == pytest.approx(-math.log(0.5), abs=1e-9)  # CE stays at tau = 1
    parts = fusion_loss(logits, labels, ids, lps, beta=7.0, fusellm_lambda=0.25, rest="renormalize")  # beta ignored
    fkl = 0.5 * math.log(2.5)
    assert float(parts.total_sum) == pytest.approx(0.25 * -math.log(0.5) + 0.75 * fkl, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# properties against direct torch computations


def test_identical_distributions_give_zero_divergence():
    logits, labels, _, _ = make_batch(2, 6, 7, 7, seed=1, p_masked=0.0)
    # teacher = student, all V entries, in a shuffled order per position
    ids = torch.stack([torch.randperm(7) for _ in range(12)]).view(2, 6, 7)
    lps = torch.cat([logits[:, :1], logits[:, :-1]], 1).log_softmax(-1).gather(-1, ids)  # label-aligned
    for divergence in ("forward_kl", "reverse_kl"):
        for tau in (1.0, 0.5, 3.0):
            parts = fusion_loss(logits, labels, ids, lps, divergence=divergence, temperature=tau)
            assert abs(float(parts.kd_sum)) < 1e-12
    # the ce divergence is then the student's entropy
    parts = fusion_loss(logits, labels, ids, lps, divergence="ce")
    logq = logits[:, :-1].log_softmax(-1)
    assert float(parts.kd_sum) == pytest.approx(float(-(logq.exp() * logq).sum()), rel=1e-10)


def test_full_vocab_topk_equals_torch_kl_div():
    B, T, V = 2, 5, 9
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = -100
    teacher_logp = torch.randn(B, T, V, generator=g, dtype=torch.float64).log_softmax(-1)
    ids = torch.stack([torch.randperm(V, generator=g) for _ in range(B * T)]).view(B, T, V)
    lps = teacher_logp.gather(-1, ids)
    mask = labels[:, 1:] != -100
    for tau in (1.0, 2.0):
        logq = (logits[:, :-1] / tau).log_softmax(-1)[mask]
        logp = (teacher_logp[:, 1:] / tau).log_softmax(-1)[mask]
        want = tau**2 * F.kl_div(logq, logp, log_target=True, reduction="sum")
        got = fusion_loss(logits, labels, ids, lps, temperature=tau).kd_sum
        assert float(got) == pytest.approx(float(want), rel=1e-10)
        # reverse KL over the full vocabulary: KL(q || p)
        want_r = tau**2 * F.kl_div(logp, logq, log_target=True, reduction="sum")
        got_r = fusion_loss(logits, labels, ids, lps, temperature=tau, divergence="reverse_kl").kd_sum
        assert float(got_r) == pytest.approx(float(want_r), rel=1e-10)
        # ce: -sum p log q
        want_c = tau**2 * -(logp.exp() * logq).sum()
        got_c = fusion_loss(logits, labels, ids, lps, temperature=tau, divergence="ce").kd_sum
        assert float(got_c) == pytest.approx(float(want_c), rel=1e-10)


def test_positions_without_teacher_add_ce_only():
    logits, labels, ids, lps = make_batch(3, 7, 11, 4, seed=5)
    ids[:, 4:] = -1  # no teacher from position 4 on
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    parts = fusion_loss(logits, labels, ids, lps)
    assert float(parts.ce_sum) == pytest.approx(float(ce), rel=1e-12)
    ref = reference(logits, labels, ids, lps)
    assert_parts_close(parts, ref)
    # no teacher anywhere: total is exactly CE (with and without top-k tensors)
    for parts in (fusion_loss(logits, labels, torch.full_like(ids, -1), lps), fusion_loss(logits, labels, None, None)):
        assert float(parts.kd_sum) == 0.0
        assert float(parts.total_sum) == pytest.approx(float(ce), rel=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_equals_unchunked(divergence):
    B, T, V, K = 2, 9, 13, 5
    logits, labels, ids, lps = make_batch(B, T, V, K, seed=7)
    results = []
    for chunk in (1, 2, 3, T - 1, T, 1000):
        x = logits.clone().requires_grad_(True)
        parts = fusion_loss(x, labels, ids, lps, divergence=divergence, temperature=1.5, chunk_size=chunk)
        parts.total_sum.backward()
        results.append((parts, x.grad))
    base, base_grad = results[0]
    for parts, grad in results[1:]:
        for a, b in zip((base.total_sum, base.ce_sum, base.kd_sum), (parts.total_sum, parts.ce_sum, parts.kd_sum)):
            assert a.item() == pytest.approx(b.item(), rel=1e-12)
        torch.testing.assert_close(grad, base_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 6])
def test_all_masked_gives_zero_without_nan(T):
    logits, _, ids, lps = make_batch(2, T, 8, 3, seed=11, dtype=torch.float32)
    labels = torch.full((2, T), -100)
    for divergence in DIVERGENCES:
        x = logits.clone().requires_grad_(True)
        parts = fusion_loss(x, labels, ids, lps, divergence=divergence, temperature=2.0)
        for v in (parts.total_sum, parts.ce_sum, parts.kd_sum, parts.mean()):
            assert v.item() == 0.0
        assert int(parts.n_tokens) == 0
        parts.mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad == 0).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_microbatch_sums_equal_one_padded_batch(divergence):
    V, K = 10, 4
    a = make_batch(2, 5, V, K, seed=21, p_masked=0.2)
    b = make_batch(1, 8, V, K, seed=22, p_masked=0.2)
    # one batch of 3 rows padded to length 8: garbage logits, label -100, no teacher on padding
    g = torch.Generator().manual_seed(23)
    logits = torch.randn(3, 8, V, generator=g, dtype=torch.float64) * 5
    labels = torch.full((3, 8), -100)
    ids = torch.full((3, 8, K), -1)
    lps = torch.randn(3, 8, K, generator=g, dtype=torch.float64)
    for rows, (lg, lb, i, lp) in ((slice(0, 2), a), (slice(2, 3), b)):
        T = lg.shape[1]
        logits[rows, :T], labels[rows, :T], ids[rows, :T], lps[rows, :T] = lg, lb, i, lp
    kw = dict(divergence=divergence, temperature=1.3, beta=0.7)
    pa, pb = fusion_loss(*a, **kw), fusion_loss(*b, **kw)
    n = pa.n_tokens + pb.n_tokens
    accumulated = safe_div(pa.total_sum, n) + safe_div(pb.total_sum, n)
    padded = fusion_loss(logits, labels, ids, lps, chunk_size=3, **kw)
    assert int(padded.n_tokens) == int(n) > 0
    assert float(accumulated) == pytest.approx(float(padded.mean()), abs=1e-12)
    # the same in fp32
    to32 = lambda t: t.float() if t.is_floating_point() else t  # noqa: E731
    pa, pb = fusion_loss(*map(to32, a), **kw), fusion_loss(*map(to32, b), **kw)
    padded = fusion_loss(*map(to32, (logits, labels, ids, lps)), **kw)
    assert float((pa.total_sum + pb.total_sum) / n) == pytest.approx(float(padded.mean()), abs=1e-6)


def test_padding_entries_change_nothing():
    logits, labels, ids, lps = make_batch(2, 6, 12, 4, seed=31)
    base = fusion_loss(logits, labels, ids, lps)
    g = torch.Generator().manual_seed(32)
    # three extra -1 columns with garbage log-probs, then a per-position shuffle of the columns
    ids2 = torch.cat([ids, torch.full((2, 6, 3), -1)], -1)
    lps2 = torch.cat([lps, torch.randn(2, 6, 3, generator=g, dtype=torch.float64)], -1)
    perm = torch.stack([torch.randperm(7, generator=g) for _ in range(12)]).view(2, 6, 7)
    ids2, lps2 = ids2.gather(-1, perm), lps2.gather(-1, perm)
    for divergence in DIVERGENCES:
        a = fusion_loss(logits, labels, ids, lps, divergence=divergence)
        b = fusion_loss(logits, labels, ids2, lps2, divergence=divergence)
        assert float(a.total_sum) == pytest.approx(float(b.total_sum), rel=1e-12)
    assert float(base.kd_sum) > 0


def test_zero_mass_entry_leaves_support_and_nan_is_not_hidden():
    logits, labels, ids, lps = make_batch(1, 4, 6, 3, seed=41, p_masked=0.0, p_no_teacher=0.0, p_empty=0.0)
    dropped = ids.clone()
    dropped[0, 2, 1] = -1
    with_ninf = lps.clone()
    with_ninf[0, 2, 1] = float("-inf")
    for divergence in DIVERGENCES:
        a = fusion_loss(logits, labels, dropped, lps, divergence=divergence)
        b = fusion_loss(logits, labels, ids, with_ninf, divergence=divergence)
        assert float(a.kd_sum) == pytest.approx(float(b.kd_sum), rel=1e-12)
    with_nan = lps.clone()
    with_nan[0, 2, 1] = float("nan")
    assert torch.isnan(fusion_loss(logits, labels, ids, with_nan).kd_sum)


def test_low_precision_logits_are_upcast_per_chunk():
    logits, labels, ids, lps = make_batch(2, 6, 9, 3, seed=51)
    bf16 = logits.to(torch.bfloat16)
    got = fusion_loss(bf16, labels, ids, lps.half(), chunk_size=2)
    want = reference(bf16.double(), labels, ids, lps.half().double())
    assert got.total_sum.dtype == torch.float32
    assert float(got.total_sum) == pytest.approx(float(want[0]), rel=1e-5)


def test_no_full_sequence_fp32_logits_kept_for_backward():
    B, T, V, chunk = 2, 16, 64, 4
    logits, labels, ids, lps = make_batch(B, T, V, 5, seed=61)
    x = logits.to(torch.bfloat16).requires_grad_(True)
    saved_fp32 = []

    def pack(t):
        if t.dtype == torch.float32 and t.shape[-1] == V:
            saved_fp32.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        parts = fusion_loss(x, labels, ids, lps, temperature=2.0, chunk_size=chunk)
    parts.total_sum.backward()
    assert sum(saved_fp32) < B * chunk * V  # each chunk's gradient is computed in the forward pass; no chunk's fp32 logits are kept
    assert torch.isfinite(x.grad.float()).all() and x.grad.abs().sum() > 0


def test_mean_and_safe_div():
    parts = LossParts(torch.tensor(6.0), torch.tensor(4.0), torch.tensor(2.0), torch.tensor(3))
    assert float(parts.mean()) == 2.0
    assert float(parts.mean(12)) == 0.5
    assert float(parts.mean(0)) == 0.0
    assert float(safe_div(torch.tensor(5.0), torch.tensor(0))) == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(divergence="js"), r"divergence: 'js' is not allowed; use one of 'forward_kl', 'reverse_kl' or 'ce'"),
        (dict(temperature=0.0), r"temperature: 0.0 is out of range; it must be > 0"),
        (dict(temperature=float("inf")), r"temperature: inf is not a finite number"),
        (dict(beta=-1.0), r"beta: -1.0 is out of range"),
        (dict(fusellm_lambda=1.5), r"fusellm_lambda: 1.5 is out of range; it must be <= 1"),
        (dict(chunk_size=0), r"loss_chunk_size: 0 is out of range; it must be >= 1"),
        (dict(chunk_size=2.0), r"loss_chunk_size: expected a valid integer, got float 2.0"),
        (dict(rest="all"), r"teacher_rest: 'all' is not allowed"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    """The run config's rules and messages (profuser.config.TrainConfig), named by their train key."""
    logits, labels, ids, lps = make_batch(1, 3, 5, 2)
    with pytest.raises(ValueError, match=match):
        fusion_loss(logits, labels, ids, lps, **kwargs)


def test_shape_mismatch_raises():
    logits, labels, ids, lps = make_batch(1, 3, 5, 2)
    with pytest.raises(ValueError, match=r"must be \[B, T, V\]"):
        fusion_loss(logits, labels[:, :2], ids, lps)
    with pytest.raises(ValueError, match=r"must both be \[B, T, K\]"):
        fusion_loss(logits, labels, ids, lps[..., :1])
    with pytest.raises(ValueError, match="both be given or both be None"):
        fusion_loss(logits, labels, ids, None)


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 7),
    V=st.integers(2, 12),
    k_frac=st.floats(0.0, 1.0),
    chunk=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    divergence=st.sampled_from(DIVERGENCES),
    tau=st.sampled_from([0.5, 1.0, 2.0]),
    lam=st.sampled_from([None, 0.0, 0.3, 1.0]),
    rest=st.sampled_from(TEACHER_REST),
    min_mass=st.sampled_from([0.0, 0.3]),
)
def test_matches_dense_reference(B, T, V, k_frac, chunk, seed, divergence, tau, lam, rest, min_mass):
    K = max(1, round(k_frac * V))
    logits, labels, ids, lps = make_batch(B, T, V, K, seed=seed)
    kw = dict(beta=0.6, divergence=divergence, temperature=tau, fusellm_lambda=lam, rest=rest, min_mass=min_mass)
    x = logits.clone().requires_grad_(True)
    parts = fusion_loss(x, labels, ids, lps, chunk_size=chunk, **kw)
    ref_x = logits.clone().requires_grad_(True)
    ref = reference(ref_x, labels, ids, lps, **kw)
    assert_parts_close(parts, ref, tol=1e-9)
    parts.total_sum.backward()
    if ref[0].requires_grad:
        ref[0].backward()
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-8, atol=1e-10)
    else:
        assert (x.grad == 0).all()


@settings(max_examples=80, deadline=None)
@given(K=st.integers(1, 8), kept=st.floats(1e-4, 1.0), seed=st.integers(0, 2**16), tau=st.sampled_from([1.0, 0.5]))
def test_no_entry_gets_more_than_the_kept_mass(K, kept, seed, tau):
    """A row that kept little of the teacher's mass is never turned into a confident teacher: with
    rest="other" each entry keeps exactly its own probability at tau = 1 (so none exceeds the kept
    mass), and sharpening (tau < 1) moves mass further towards "other" when it is the larger part.
    "renormalize" is the mode that blows a scrap up to probability 1."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(K, generator=g, dtype=torch.float64) + 1e-3
    lps = (raw / raw.sum() * kept).log()
    ids = torch.randperm(50, generator=g)[:K]
    logp, valid, has = teacher_buckets(ids, lps, "other", tau)
    assert bool(has)
    entries = logp[:-1].exp()
    if tau == 1.0:
        torch.testing.assert_close(entries, lps.exp(), rtol=1e-12, atol=0)
        assert float(entries.max()) <= kept + 1e-12
        if kept < 1 - 1e-9:
            assert float(logp[-1].exp()) == pytest.approx(1 - kept, abs=1e-12)
    elif kept <= 0.5:
        assert float(entries.sum()) <= kept + 1e-12
    renorm, _, _ = teacher_buckets(ids, lps, "renormalize", 1.0)
    assert float(renorm[:-1].exp().sum()) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(V=st.integers(3, 30), K=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_other_bucket_kl_is_a_lower_bound_of_the_full_kl(V, K, seed):
    """Coarsening both distributions to (stored ids, other) can only lose divergence (data
    processing); with every id stored it is the full KL."""
    K = min(K, V)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 2, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(1, 2, V, generator=g, dtype=torch.float64).log_softmax(-1) * 2
    t = t.log_softmax(-1)
    labels = torch.tensor([[-100, 0]])
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(2)]).view(1, 2, K)
    lps = t.gather(-1, ids)
    full = F.kl_div(z[0, 0].log_softmax(-1), t[0, 1], log_target=True, reduction="sum")
    got = fusion_loss(z, labels, ids, lps).kd_sum
    assert float(got) <= float(full) + 1e-12
    if K == V:
        assert float(got) == pytest.approx(float(full), rel=1e-9, abs=1e-12)
