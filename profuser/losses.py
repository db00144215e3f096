"""Per-token fusion loss: CE on the labels plus a divergence D from the teacher's stored top-k.

Pure functions of tensors; the trainer runs forward passes and calls :func:`fusion_loss` over the
logits, or :func:`fused_linear_fusion_loss` over the last hidden states and the output projection
(the same loss, computed chunk by chunk without ever building the [B, T, V] logits).
Teacher rows are LABEL-ALIGNED: ``topk_ids[b, t]`` is the teacher's distribution over the token at
position t (it pairs with ``labels[b, t]``), so the loss scores ``logits[:, :-1]`` against
``labels[:, 1:]`` and teacher rows ``[:, 1:]``. ``topk_ids == -1`` marks an empty entry.

Never builds a dense [B, T, V] teacher tensor, never averages per micro-batch (it returns sums;
the trainer divides once per accumulated batch), never rounds logits to a half type before a softmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from profuser.constants import DIVERGENCES, IGNORE_INDEX, LOSS_CHUNK_SIZE, TEACHER_REST  # noqa: F401 (re-exported)
_NEG = torch.finfo(torch.float32).min  # finite "log 0": keeps masked logsumexp and its grad NaN-free
_LOG_P_MIN = math.log(1e-8)  # reverse_kl: an empty teacher "other" bucket counts as 1e-8 (KL(q||p) stays finite)


def safe_div(num: torch.Tensor, denominator) -> torch.Tensor:
    """``num / denominator``, or 0 (with a finite, zero gradient) when the denominator is 0."""
    d = torch.as_tensor(denominator, dtype=num.dtype, device=num.device)
    return torch.where(d > 0, num / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(num))


@dataclass(frozen=True)
class LossParts:
    """Loss SUMS over the valid (label != -100) tokens of one micro-batch.

    Sums, not means: under gradient accumulation the trainer adds the sums of all micro-batches and
    divides once by the valid-token count of the whole accumulated batch (cf. ``num_items_in_batch``).
    """

    total_sum: torch.Tensor  # ce_sum + beta * kd_sum, or lambda * ce_sum + (1 - lambda) * kd_sum
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor  # tau**2 * D summed over tokens that have a teacher distribution
    n_tokens: torch.Tensor  # int64 count of labels != -100 after the shift

    def mean(self, denominator=None) -> torch.Tensor:
        """``total_sum / denominator`` (default: this micro-batch's ``n_tokens``); 0 when it is 0."""
        return safe_div(self.total_sum, self.n_tokens if denominator is None else denominator)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends; x >= 0 gives _NEG (no mass left).

    Both branches only ever see inputs where they are finite, so the gradient has no NaN."""
    x = x.clamp(max=0.0)
    big = x > -math.log(2)
    safe_big = torch.where(big & (x < 0), x, torch.full_like(x, -1.0))
    safe_small = torch.where(big, torch.full_like(x, -1.0), x)
    out = torch.where(big, torch.log(-torch.expm1(safe_big)), torch.log1p(-torch.exp(safe_small)))
    return torch.where(x < 0, out, torch.full_like(x, _NEG))


def teacher_buckets(ids: torch.Tensor, logprobs: torch.Tensor, rest: str = "other", tau: float = 1.0,
                    min_mass: float = 0.0):
    """The teacher distribution the loss compares the student with, at one or more positions.

    ids/logprobs [..., K]: stored entries (id -1 or log-prob -inf = empty) holding the teacher's
    FULL-vocabulary log-probs (their mass M <= 1 is what survived top-k, mapping and merging).
    Returns (logp [..., K+1], valid [..., K+1], has_teacher [...]):
    - rest="other": buckets = the K entries plus one "other" bucket holding 1 - M (all the
      teacher's mass that is not on a stored entry), so no single entry gets more than its own
      stored probability; at tau != 1 the K+1 buckets are tempered as if "other" were one token.
      A rest below 16 machine epsilons (the whole vocabulary stored) is rounding noise: no bucket.
    - rest="renormalize": the K entries renormalized to sum to 1 (the "other" bucket is empty).
    has_teacher: at least one entry and M >= min_mass. Computed in the dtype of ``logprobs``.
    """
    valid = (ids >= 0) & (logprobs != float("-inf"))
    lp = logprobs.masked_fill(~valid, _NEG)
    log_mass = torch.where(valid.any(-1), lp.logsumexp(-1), torch.full_like(lp[..., 0], float("-inf")))
    has_teacher = valid.any(-1)
    if min_mass > 0:
        has_teacher = has_teacher & (log_mass >= math.log(min_mass))
    if rest == "other":
        log_other = _log1mexp(log_mass)
        # a rest below rounding noise (all of the vocabulary stored) is no bucket: at tau != 1 it
        # would otherwise be tempered into real mass
        real = log_other > math.log(16 * torch.finfo(lp.dtype).eps)
        buckets = torch.cat([lp, log_other.unsqueeze(-1)], -1)
        valid = torch.cat([valid, real.unsqueeze(-1)], -1)
    else:
        buckets = torch.cat([lp, torch.full_like(lp[..., :1], _NEG)], -1)
        valid = torch.cat([valid, torch.zeros_like(valid[..., :1])], -1)
    logp = (buckets / tau).masked_fill(~valid, _NEG)
    logp = logp - logp.logsumexp(-1, keepdim=True)
    return logp, valid, has_teacher


def _chunk_sums(logits, labels, ids, logprobs, divergence: str, tau: float, rest: str = "other",
                min_mass: float = 0.0):
    """(ce_sum, kd_sum) of one chunk. logits [B, C, V] (any dtype), labels [B, C], ids/logprobs [B, C, K]."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (or fp64) math
    mask = labels != IGNORE_INDEX
    logq = logits.log_softmax(-1)  # [B, C, V], tau = 1 for the CE term
    ce = -logq.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ce_sum = torch.where(mask, ce, 0.0).sum()
    if ids is None:
        return ce_sum, logq.new_zeros(())

    logq_t = logq if tau == 1.0 else (logits / tau).log_softmax(-1)
    logq_k = logq_t.gather(-1, ids.clamp_min(0).long())  # student at the teacher's ids, [B, C, K]
    logp, valid, has_teacher = teacher_buckets(ids, logprobs.to(logits.dtype), rest, tau, min_mass)
    has_teacher = has_teacher & mask
    entry = valid[..., :-1]
    if rest == "other":
        # the student's buckets: its probabilities at the K ids, and all the rest of its mass
        on_support = logq_k.masked_fill(~entry, _NEG).logsumexp(-1)
        on_support = on_support.clamp(max=-torch.finfo(logits.dtype).eps)  # 1 - sum(q) rounds to <= 0
        logq_b = torch.cat([logq_k, _log1mexp(on_support).unsqueeze(-1)], -1)
    else:
        logq_b = torch.cat([logq_k, torch.zeros_like(logq_k[..., :1])], -1)
    p = logp.exp()  # 0 on empty buckets
    if divergence == "forward_kl":
        d = torch.where(valid, p * (logp - logq_b), 0.0).sum(-1)
    elif divergence == "ce":
        d = -torch.where(valid, p * logq_b, 0.0).sum(-1)
    elif rest == "other":  # reverse KL over the buckets; the student's "other" bucket always has mass
        live = torch.cat([entry, torch.ones_like(entry[..., :1])], -1)
        # where the teacher left no rest (all of the vocabulary stored), count it as 1e-8: finite
        logp_o = torch.where(valid[..., -1:], logp[..., -1:], torch.full_like(logp[..., -1:], _LOG_P_MIN))
        logp_r = torch.cat([logp[..., :-1], logp_o], -1)
        d = torch.where(live, logq_b.exp() * (logq_b - logp_r), 0.0).sum(-1)
    else:  # reverse KL with the student renormalized over the teacher's support (p is unknown off it)
        logq_s = logq_b.masked_fill(~valid, _NEG)
        logq_s = logq_s - logq_s.logsumexp(-1, keepdim=True)
        d = torch.where(valid, logq_s.exp() * (logq_s - logp), 0.0).sum(-1)
    kd_sum = torch.where(has_teacher, d, 0.0).sum() * tau**2
    return ce_sum, kd_sum


def fusion_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    *,
    beta: float = 1.0,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    fusellm_lambda: float | None = None,
    chunk_size: int = LOSS_CHUNK_SIZE,
    rest: str = "other",
    min_mass: float = 0.0,
) -> LossParts:
    """CE(student, label) + beta * D(teacher || student), summed over valid tokens.

    Args:
        logits: [B, T, V] student logits (bf16/fp16 chunks are converted to fp32; fp64 stays fp64).
        labels: [B, T] int, -100 on tokens that are not trained on (prompt, padding).
        topk_ids: [B, T, K] int, label-aligned teacher token ids, -1 = empty; None = no teacher.
        topk_logprobs: [B, T, K] the teacher's FULL-vocabulary log-softmax at those ids (mass M <= 1:
            what survived the top-k cut, the vocabulary mapping and merging; not renormalized).
        beta: weight of D (ignored when ``fusellm_lambda`` is set).
        rest: what the teacher's mass off its stored entries S becomes (``teacher_buckets``):
            ``other`` (default): one extra bucket holding 1 - M, compared with the student's mass
            off S, so D is the divergence between the two distributions coarsened to S + {other}
            (a lower bound of the full-vocabulary divergence, exact when M = 1) and a position that
            kept little mass never pushes the student onto its few surviving entries;
            ``renormalize``: the teacher renormalized over S (top-k KD as FuseLLM/FuseChat do it).
        min_mass: positions whose stored entries hold less teacher probability than this add CE only.
        divergence: D over the buckets B (S, plus "other" when rest="other"):
            ``forward_kl``: sum_B p (log p - log q), q the student's full-vocabulary softmax summed
            into the buckets;
            ``ce``: -sum_B p log q (forward KL plus the teacher entropy, same gradient);
            ``reverse_kl``: sum_B q (log q - log p), an empty teacher "other" bucket counted as 1e-8;
            with rest="renormalize", q is the student renormalized over S (p is unknown off S).
            With K = V (the whole vocabulary stored) every form is the full-vocabulary divergence.
        temperature: tau; D uses log_softmax(logits / tau) and the teacher buckets tempered as
            (log p) / tau and renormalized ("other" tempered as if it were one token, an
            approximation only when tau != 1), and is multiplied by tau**2 (Hinton) so its gradient
            scale does not shrink with tau. The CE term always uses tau = 1.
        fusellm_lambda: if set, total = lambda * CE + (1 - lambda) * D (FuseLLM form).
        chunk_size: sequence positions per chunk. With gradients on, each chunk's gradient is
            computed in the forward pass and written into one logits-shaped, logits-typed tensor
            (``_FusedChunks``), so no fp32 [B, T, V] tensor ever lives for the full sequence and the
            step needs no more [B, T, V] memory than plain CE. ``ce_sum``/``kd_sum`` then carry no
            gradient (backpropagate ``total_sum`` or ``mean()``).

    Positions with a label but no teacher entry add CE only; label -100 positions add nothing.
    Returns :class:`LossParts` of sums; all-masked input gives zeros with a zero gradient.
    """
    _check_options(beta, divergence, temperature, fusellm_lambda, chunk_size, rest, min_mass)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, T, V] and labels {tuple(labels.shape)} [B, T]")
    _check_teacher(labels, topk_ids, topk_logprobs)

    tau = float(temperature)
    weights = (1.0, float(beta)) if fusellm_lambda is None else (float(fusellm_lambda), 1.0 - fusellm_lambda)
    args = (labels, topk_ids, topk_logprobs, divergence, tau, weights, chunk_size, rest, float(min_mass))
    if torch.is_grad_enabled() and logits.requires_grad:
        total, ce_sum, kd_sum = _FusedChunks.apply(logits, *args)
    else:
        with torch.no_grad():
            _, ce_sum, kd_sum = _chunked_sums(logits, *args)
        total = weights[0] * ce_sum + weights[1] * kd_sum
    return LossParts(total, ce_sum, kd_sum, (labels[:, 1:] != IGNORE_INDEX).sum())


def _check_options(beta, divergence, temperature, fusellm_lambda, chunk_size, rest, min_mass) -> None:
    """The run config's rules for these options (``train.beta``, ``train.divergence``, ...; ``chunk_size``
    is ``train.loss_chunk_size``, ``rest`` ``train.teacher_rest``, ``min_mass`` ``train.teacher_min_mass``),
    so a direct caller gets the same check and message (a ConfigError, a ValueError) as a config."""
    from profuser.config import TrainConfig, validate

    validate(TrainConfig, dict(beta=beta, divergence=divergence, temperature=temperature, fusellm_lambda=fusellm_lambda,
                               loss_chunk_size=chunk_size, teacher_rest=rest, teacher_min_mass=min_mass))


def _check_teacher(labels, topk_ids, topk_logprobs) -> None:
    if (topk_ids is None) != (topk_logprobs is None):
        raise ValueError("topk_ids and topk_logprobs must both be given or both be None")
    if topk_ids is not None and (
        topk_ids.dim() != 3 or topk_ids.shape[:2] != labels.shape or topk_logprobs.shape != topk_ids.shape
    ):
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} "
            f"must both be [B, T, K] with [B, T] = {tuple(labels.shape)}"
        )


def _chunk_grad(x, labels, ids, logprobs, divergence, tau, weights, rest, min_mass, transform=None):
    """(ce, kd, d(w_ce * ce + w_kd * kd) / dx) of one chunk of logits x [B, C, V] (``transform``, if
    given, maps x to the logits the loss sees). The chunk's graph is built and freed right here."""
    x = x.detach().requires_grad_(True)
    # keep outer saved-tensor hooks (offloading, checks) away from this local graph; they see only
    # what the caller keeps for backward (the gradient)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        z = x if transform is None else transform(x)
        ce, kd = _chunk_sums(z, labels, ids, logprobs, divergence, tau, rest, min_mass)
        (g,) = torch.autograd.grad(weights[0] * ce + weights[1] * kd, x)
    return ce.detach(), kd.detach(), g


def _chunked_sums(logits, labels, topk_ids, topk_logprobs, divergence, tau, weights, chunk_size, rest="other",
                  min_mass=0.0, grad_out=None):
    """(total, ce, kd) sums over the sequence, one chunk of positions at a time (fp32 per chunk).

    With ``grad_out`` (a tensor shaped like ``logits``), d total / d logits of each chunk is computed
    right away and written into it: only one chunk's fp32 [B, C, V] tensors exist at any time.
    Position t of the logits scores labels and teacher rows t + 1 (the shift).
    """
    acc = torch.promote_types(logits.dtype, torch.float32)
    ce_sum = kd_sum = torch.zeros((), dtype=acc, device=logits.device)
    for s in range(0, logits.shape[1] - 1, chunk_size):
        e = min(s + chunk_size, logits.shape[1] - 1)
        ids = None if topk_ids is None else topk_ids[:, s + 1:e + 1]
        lps = None if topk_logprobs is None else topk_logprobs[:, s + 1:e + 1]
        x = logits[:, s:e].detach()
        if grad_out is None:
            ce, kd = _chunk_sums(x, labels[:, s + 1:e + 1], ids, lps, divergence, tau, rest, min_mass)
        else:
            ce, kd, g = _chunk_grad(x, labels[:, s + 1:e + 1], ids, lps, divergence, tau, weights, rest, min_mass)
            grad_out[:, s:e] = g
        ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
    return weights[0] * ce_sum + weights[1] * kd_sum, ce_sum, kd_sum


class _FusedChunks(torch.autograd.Function):
    """``total`` with its gradient computed chunk by chunk during the forward pass.

    Kept for backward: d total / d logits as ONE tensor shaped and typed like the logits (their
    gradient has to exist anyway). No fp32 [B, T, V] tensor, no log-softmax of the whole sequence
    and no full-size gradient of each chunk's slice is ever allocated. ``ce`` and ``kd`` are returned
    as non-differentiable (for logging); backward works once (no retain_graph double backward).
    """

    @staticmethod
    def forward(ctx, logits, labels, topk_ids, topk_logprobs, divergence, tau, weights, chunk_size, rest, min_mass):
        grad = torch.zeros_like(logits)  # the last position scores nothing: its gradient stays 0
        total, ce, kd = _chunked_sums(logits, labels, topk_ids, topk_logprobs, divergence, tau, weights,
                                      chunk_size, rest, min_mass, grad_out=grad)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_total, g_ce, g_kd):
        if getattr(ctx, "used", False):  # the saved gradient was scaled in place by the first backward
            raise RuntimeError("fusion_loss: backward can run only once per forward (no retain_graph)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        if not (g_total.numel() == 1 and float(g_total) == 1.0):
            grad.mul_(g_total.to(grad.dtype))  # in place: no second [B, T, V] tensor
        return grad, None, None, None, None, None, None, None, None, None




# ---------------------------------------------------------------------------------------------
# fused with the output projection: hidden states in, no [B, T, V] logits


def fused_linear_fusion_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    beta: float = 1.0,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    fusellm_lambda: float | None = None,
    chunk_size: int = LOSS_CHUNK_SIZE,
    rest: str = "other",
    min_mass: float = 0.0,
) -> LossParts:
    """``fusion_loss(head(hidden), labels, ...)`` computed chunk by chunk without any [B, T, V] tensor.

    head(h) = softcap * tanh(logit_scale * (h @ weight.T + bias) / softcap), or without the tanh when
    ``softcap`` is None: the model's output projection and what it does to the logits after it.

    Args:
        hidden: [B, T, H] final hidden states (the input of the output projection).
        weight: [V, H] the projection (the input embedding when the model ties them); bias: [V] or None.
        logit_scale: logits multiplier (Cohere's ``logit_scale``, 1 / Granite's ``logits_scaling``).
        softcap: Gemma-2's ``final_logit_softcapping``, applied after the scale.
        chunk_size: scored TOKENS per chunk, over the whole batch (positions whose next label is -100
            are never projected). A chunk's logits are projected in the compute dtype, its loss
            math runs in fp32 (``_chunk_sums``, the same code as ``fusion_loss``), and with
            gradients on, its gradient is pushed to ``hidden`` and ``weight`` (and ``bias``) at once.
        labels, topk_ids, topk_logprobs, beta, divergence, temperature, fusellm_lambda, rest,
        min_mass: as :func:`fusion_loss`.

    Memory: one chunk's [C, V] tensors at a time; with gradients on, the forward pass also fills the
    gradients of ``hidden`` ([B, T, H], zero where nothing is scored) and ``weight`` (one [V, H] buffer
    of its dtype, accumulated in place when the chunk's compute dtype matches it), kept for
    backward, which only scales them. ``ce_sum``/``kd_sum`` carry no gradient.
    """
    _check_options(beta, divergence, temperature, fusellm_lambda, chunk_size, rest, min_mass)
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [B, T, H] and labels {tuple(labels.shape)} [B, T]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V, H] with H = {hidden.shape[-1]}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must be [V] with V = {weight.shape[0]}")
    if not (math.isfinite(logit_scale) and logit_scale > 0) or (softcap is not None and not softcap > 0):
        raise ValueError(f"logit_scale={logit_scale!r} must be > 0 and softcap={softcap!r} None or > 0")
    _check_teacher(labels, topk_ids, topk_logprobs)

    weights = (1.0, float(beta)) if fusellm_lambda is None else (float(fusellm_lambda), 1.0 - fusellm_lambda)
    opts = _LinearOpts(divergence, float(temperature), weights, chunk_size, rest, float(min_mass),
                       float(logit_scale), None if softcap is None else float(softcap))
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        total, ce_sum, kd_sum = _FusedLinear.apply(hidden, weight, bias, labels, topk_ids, topk_logprobs, opts)
    else:
        with torch.no_grad():
            total, ce_sum, kd_sum, _ = _linear_chunks(hidden, weight, bias, labels, topk_ids, topk_logprobs, opts)
    return LossParts(total, ce_sum, kd_sum, (labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class _LinearOpts:
    divergence: str
    tau: float
    weights: tuple[float, float]
    chunk_size: int
    rest: str
    min_mass: float
    logit_scale: float
    softcap: float | None

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """Projected logits -> the logits the model returns, in fp32 (fp64 stays fp64)."""
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


def _linear_chunks(hidden, weight, bias, labels, topk_ids, topk_logprobs, opts: _LinearOpts,
                   needs_grad=(False, False, False)):
    """(total, ce, kd, [d hidden, d weight, d bias]) over the scored positions, one chunk at a time.

    Position t of ``hidden`` scores labels and teacher rows t + 1; only positions with such a label
    are gathered and projected. Gradients (of ``total``) are filled for the inputs ``needs_grad`` marks.
    """
    B, T, H = hidden.shape
    flat = hidden.reshape(B * T, H)
    scored = labels[:, 1:] != IGNORE_INDEX
    rows = torch.arange(B * T, device=hidden.device).view(B, T)[:, :-1][scored]  # flat index of each scored position
    targets = labels[:, 1:][scored]
    ids = None if topk_ids is None else topk_ids[:, 1:][scored]
    lps = None if topk_logprobs is None else topk_logprobs[:, 1:][scored]
    grads = [torch.zeros_like(t) if need else None for t, need in zip((flat, weight, bias), needs_grad)]
    d_flat, d_weight, d_bias = grads
    acc = torch.promote_types(hidden.dtype, torch.float32)
    ce_sum = kd_sum = torch.zeros((), dtype=acc, device=hidden.device)
    for s in range(0, rows.numel(), opts.chunk_size):
        r = rows[s:s + opts.chunk_size]
        h = flat.index_select(0, r)
        z = F.linear(h, weight, bias)[None]  # [1, C, V] in the compute dtype
        chunk = (targets[None, s:s + opts.chunk_size],
                 None if ids is None else ids[None, s:s + opts.chunk_size],
                 None if lps is None else lps[None, s:s + opts.chunk_size])
        if not any(needs_grad):
            ce, kd = _chunk_sums(opts.transform(z), *chunk, opts.divergence, opts.tau, opts.rest, opts.min_mass)
        else:
            ce, kd, g = _chunk_grad(z, *chunk, opts.divergence, opts.tau, opts.weights, opts.rest, opts.min_mass,
                                    transform=opts.transform)
            g = g[0]  # [C, V], d total / d projected logits, in the compute dtype
            del z
            if d_flat is not None:
                d_flat.index_copy_(0, r, (g @ weight).to(d_flat.dtype))  # rows are distinct
            if d_weight is not None:
                _add_matmul(d_weight, g.t(), h)
            if d_bias is not None:
                d_bias.add_(g.sum(0))
        ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
    if d_flat is not None:
        grads[0] = d_flat.view(B, T, H)
    w = opts.weights
    return w[0] * ce_sum + w[1] * kd_sum, ce_sum, kd_sum, grads


def _add_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, in place when the dtypes agree (no [V, H] temporary), else through one product
    in the compute dtype (e.g. bf16 autocast over fp32 weights)."""
    if a.dtype == b.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_(a @ b)


class _FusedLinear(torch.autograd.Function):
    """``total`` of :func:`fused_linear_fusion_loss`; its gradients w.r.t. hidden, weight and bias are
    computed chunk by chunk in the forward pass and kept for backward, which scales them in place
    (so, like ``_FusedChunks``, backward works once per forward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, topk_ids, topk_logprobs, opts):
        total, ce, kd, grads = _linear_chunks(hidden, weight, bias, labels, topk_ids, topk_logprobs, opts,
                                              needs_grad=ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_total, g_ce, g_kd):
        if getattr(ctx, "used", False):
            raise RuntimeError("fused_linear_fusion_loss: backward can run only once per forward (no retain_graph)")
        ctx.used = True
        grads = ctx.saved_tensors
        if not (g_total.numel() == 1 and float(g_total) == 1.0):
            for g in grads:
                if g is not None:
                    g.mul_(g_total.to(g.dtype))
        return (*grads, None, None, None, None)
