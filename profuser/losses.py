"""Per-token fusion loss: CE on the labels plus a divergence D from the teacher's stored top-k.

Pure functions of tensors; the trainer runs forward passes and calls :func:`fusion_loss`.
Teacher rows are LABEL-ALIGNED: ``topk_ids[b, t]`` is the teacher's distribution over the token at
position t (it pairs with ``labels[b, t]``), so the loss scores ``logits[:, :-1]`` against
``labels[:, 1:]`` and teacher rows ``[:, 1:]``. ``topk_ids == -1`` marks an empty entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "ce")
_NEG = torch.finfo(torch.float32).min  # finite "log 0": keeps masked logsumexp and its grad NaN-free


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


def _chunk_sums(logits, labels, ids, logprobs, divergence: str, tau: float):
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
    lp = logprobs.to(logits.dtype)
    valid = (ids >= 0) & (lp != float("-inf"))  # a -inf entry has no teacher mass: off the support
    has_teacher = mask & valid.any(-1)
    # teacher renormalized over its support at temperature tau; empty entries get probability 0
    logp = (lp / tau).masked_fill(~valid, _NEG)
    logp = logp - logp.logsumexp(-1, keepdim=True)
    p = logp.exp()
    if divergence == "forward_kl":
        d = (p * (logp - logq_k)).sum(-1)
    elif divergence == "ce":
        d = -(p * logq_k).sum(-1)
    else:  # reverse_kl, with the student renormalized over the teacher's support
        logq_s = logq_k.masked_fill(~valid, _NEG)
        logq_s = logq_s - logq_s.logsumexp(-1, keepdim=True)
        d = (logq_s.exp() * (logq_s - logp)).masked_fill(~valid, 0.0).sum(-1)
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
    chunk_size: int = 1024,
) -> LossParts:
    """CE(student, label) + beta * D(teacher || student), summed over valid tokens.

    Args:
        logits: [B, T, V] student logits (bf16/fp16 chunks are converted to fp32; fp64 stays fp64).
        labels: [B, T] int, -100 on tokens that are not trained on (prompt, padding).
        topk_ids: [B, T, K] int, label-aligned teacher token ids, -1 = empty; None = no teacher.
        topk_logprobs: [B, T, K] the teacher's FULL-vocabulary log-softmax at those ids (mass < 1).
        beta: weight of D (ignored when ``fusellm_lambda`` is set).
        divergence: D, computed on the teacher's support S (its non-empty entries) only:
            ``forward_kl``: sum_S p (log p - log q), q the student's full-vocabulary softmax;
            ``ce``: -sum_S p log q (forward KL plus the teacher entropy, same gradient);
            ``reverse_kl``: sum_S q~ (log q~ - log p), q~ the student renormalized over S
            (the full-vocabulary reverse KL is undefined off S, where the stored p is unknown).
            p is the teacher renormalized over S (with K = V this is its full distribution).
        temperature: tau; D uses log_softmax(logits / tau) and the teacher renormalized from
            logprobs / tau, and is multiplied by tau**2 (Hinton) so its gradient scale does not
            shrink with tau. The CE term always uses tau = 1.
        fusellm_lambda: if set, total = lambda * CE + (1 - lambda) * D (FuseLLM form).
        chunk_size: sequence positions per chunk. With gradients on, each chunk's gradient is
            computed in the forward pass and written into one logits-shaped, logits-typed tensor
            (``_FusedChunks``), so no fp32 [B, T, V] tensor ever lives for the full sequence and the
            step needs no more [B, T, V] memory than plain CE. ``ce_sum``/``kd_sum`` then carry no
            gradient (backpropagate ``total_sum`` or ``mean()``).

    Positions with a label but no teacher entry add CE only; label -100 positions add nothing.
    Returns :class:`LossParts` of sums; all-masked input gives zeros with a zero gradient.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not one of {DIVERGENCES}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta={beta!r} must be a finite number >= 0")
    if fusellm_lambda is not None and not (isinstance(fusellm_lambda, (int, float)) and 0 <= fusellm_lambda <= 1):
        raise ValueError(f"fusellm_lambda={fusellm_lambda!r} must be None or in [0, 1]")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, T, V] and labels {tuple(labels.shape)} [B, T]")
    if (topk_ids is None) != (topk_logprobs is None):
        raise ValueError("topk_ids and topk_logprobs must both be given or both be None")
    if topk_ids is not None and (
        topk_ids.dim() != 3 or topk_ids.shape[:2] != labels.shape or topk_logprobs.shape != topk_ids.shape
    ):
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} "
            f"must both be [B, T, K] with [B, T] = {tuple(labels.shape)}"
        )

    tau = float(temperature)
    weights = (1.0, float(beta)) if fusellm_lambda is None else (float(fusellm_lambda), 1.0 - fusellm_lambda)
    args = (labels, topk_ids, topk_logprobs, divergence, tau, weights, chunk_size)
    if torch.is_grad_enabled() and logits.requires_grad:
        total, ce_sum, kd_sum = _FusedChunks.apply(logits, *args)
    else:
        with torch.no_grad():
            _, ce_sum, kd_sum = _chunked_sums(logits, *args)
        total = weights[0] * ce_sum + weights[1] * kd_sum
    return LossParts(total, ce_sum, kd_sum, (labels[:, 1:] != IGNORE_INDEX).sum())


def _chunked_sums(logits, labels, topk_ids, topk_logprobs, divergence, tau, weights, chunk_size, grad_out=None):
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
            ce, kd = _chunk_sums(x, labels[:, s + 1:e + 1], ids, lps, divergence, tau)
        else:
            x.requires_grad_(True)
            # this chunk's graph is freed right here: keep outer saved-tensor hooks (offloading,
            # checks) away from it; they see only what is kept for backward (the gradient)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                ce, kd = _chunk_sums(x, labels[:, s + 1:e + 1], ids, lps, divergence, tau)
                (g,) = torch.autograd.grad(weights[0] * ce + weights[1] * kd, x)
            grad_out[:, s:e] = g
            ce, kd = ce.detach(), kd.detach()
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
    def forward(ctx, logits, labels, topk_ids, topk_logprobs, divergence, tau, weights, chunk_size):
        grad = torch.zeros_like(logits)  # the last position scores nothing: its gradient stays 0
        total, ce, kd = _chunked_sums(logits, labels, topk_ids, topk_logprobs, divergence, tau, weights,
                                      chunk_size, grad_out=grad)
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
        return grad, None, None, None, None, None, None, None


