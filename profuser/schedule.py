"""Progressive-fusion mode weights: pure functions of (step, total_steps), so resume is exact.

    L(step) = w_inf(step) * L_inference + w_train(step) * L_training

``step`` is the 0-based optimizer step, ``total_steps`` the number of optimizer steps in the run.
A mode whose weight is 0 at a step needs no forward pass.

Holds no state: nothing here may depend on anything but its arguments. It never imports torch or
numpy (the config imports it to check presets).
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

PRESETS = ("profuser", "ramp", "simul", "reverse", "fusellm", "inference_only", "sft", "custom")
RAMP_SHAPES = ("linear", "cosine")
_CONSTANT = {"simul": (1.0, 1.0), "fusellm": (0.0, 1.0), "inference_only": (1.0, 0.0), "sft": (0.0, 1.0)}


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"schedule preset {preset!r} is not one of {PRESETS}")


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return float(value)


def validate_custom_weights(custom_weights) -> list[tuple[float, float, float]]:
    """Check ``[[fraction, w_inf, w_train], ...]``: fractions start at 0, strictly increase, lie in
    [0, 1]; weights are >= 0 and not both 0. Returns the breakpoints as float tuples."""
    if not custom_weights:
        raise ValueError(f"custom_weights={custom_weights!r}: preset 'custom' needs a non-empty list "
                         "of [fraction, w_inf, w_train] breakpoints, the first at fraction 0")
    out = []
    for i, row in enumerate(custom_weights):
        if not isinstance(row, (list, tuple)) or len(row) != 3:
            raise ValueError(f"custom_weights[{i}]={row!r} must be [fraction, w_inf, w_train]")
        frac, w_inf, w_train = (_check_weight(f"custom_weights[{i}][{j}]", v) for j, v in enumerate(row))
        if frac > 1:
            raise ValueError(f"custom_weights[{i}] fraction {frac} must be in [0, 1]")
        if w_inf + w_train == 0:
            raise ValueError(f"custom_weights[{i}]={row!r}: w_inf and w_train cannot both be 0")
        if i == 0 and frac != 0:
            raise ValueError(f"custom_weights[0] fraction {frac} must be 0 (the first breakpoint covers step 0)")
        if out and frac <= out[-1][0]:
            raise ValueError(f"custom_weights fractions must strictly increase; got {out[-1][0]} then {frac}")
        out.append((frac, w_inf, w_train))
    return out


def mode_weights(
    preset: str,
    step: int,
    total_steps: int,
    *,
    switch_fraction: float = 0.5,
    stage2_inference_weight: float = 0.1,
    ramp_shape: str = "linear",
    custom_weights: Sequence[Sequence[float]] | None = None,
) -> tuple[float, float]:
    """(w_inf, w_train) at ``step`` of ``total_steps``.

    Presets:
        profuser: (1, 0) while step < switch_fraction * total_steps, then (stage2_inference_weight, 1).
        reverse: the paper's ReverseFuse ablation, the exact mirror of profuser (training mode first):
            (0, 1), then (1, stage2_inference_weight) -- the stage-1 mode keeps the same residual
            weight, so the only difference from profuser is the order of the modes.
        ramp: hand-over from (1, 0) at step 0 to (0, 1) at the last step (total_steps - 1),
            w_train = progress (linear) or (1 - cos(pi * progress)) / 2 (cosine), w_inf = 1 - w_train.
        simul: (1, 1). fusellm: (0, 1). inference_only: (1, 0). sft: (0, 1), with beta forced to 0
            (see :func:`preset_beta`).
        custom: piecewise constant; the breakpoint with the largest fraction <= step / total_steps
            applies. ``custom_weights`` is ignored by the other presets.
    Steps at or past total_steps keep the final weights.
    """
    _check_preset(preset)
    if ramp_shape not in RAMP_SHAPES:
        raise ValueError(f"ramp_shape={ramp_shape!r} is not one of {RAMP_SHAPES}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} must be an int >= 1")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be an int >= 0")
    if not (isinstance(switch_fraction, (int, float)) and 0 <= switch_fraction <= 1):
        raise ValueError(f"switch_fraction={switch_fraction!r} must be in [0, 1]")
    residual = _check_weight("stage2_inference_weight", stage2_inference_weight)

    if preset in _CONSTANT:
        return _CONSTANT[preset]
    if preset in ("profuser", "reverse"):
        stage2 = step >= switch_fraction * total_steps
        if preset == "profuser":
            return (residual, 1.0) if stage2 else (1.0, 0.0)
        return (1.0, residual) if stage2 else (0.0, 1.0)
    if preset == "ramp":
        progress = min(step / max(total_steps - 1, 1), 1.0)
        w_train = progress if ramp_shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * progress))
        return (1.0 - w_train, w_train)
    # custom
    fraction = step / total_steps
    w = next(bp for bp in reversed(validate_custom_weights(custom_weights)) if bp[0] <= fraction)
    return (w[1], w[2])


def preset_beta(preset: str, beta: float) -> float:
    """The distillation weight a preset trains with: 0 for ``sft`` (plain supervised), else ``beta``."""
    _check_preset(preset)
    return 0.0 if preset == "sft" else _check_weight("beta", beta)


def _check_pair(w_inf, w_train) -> tuple[float, float]:
    w_inf, w_train = _check_weight("w_inf", w_inf), _check_weight("w_train", w_train)
    if w_inf + w_train == 0:
        raise ValueError("w_inf and w_train are both 0: no mode to train on")
    return w_inf, w_train


def draw_modes(w_inf: float, w_train: float, sample_keys: Iterable, seed: int, step: int) -> list[str]:
    """Sampling variant: one mode per sample, "inference" with probability w_inf / (w_inf + w_train).

    The draw hashes (seed, step, str(key)), so it is the same on every rank and after a resume, and
    independent of batch composition. A mode with weight 0 is never drawn. Scale the drawn mode's
    loss by :func:`sampling_scale` so its expectation equals w_inf * L_inf + w_train * L_train.
    """
    w_inf, w_train = _check_pair(w_inf, w_train)
    p_inf = w_inf / (w_inf + w_train)
    modes = []
    for key in sample_keys:
        digest = hashlib.blake2b(f"{seed}\x1f{step}\x1f{key}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
        modes.append("inference" if u < p_inf else "training")
    return modes


def sampling_scale(w_inf: float, w_train: float) -> float:
    """Factor for the drawn mode's loss in :func:`draw_modes`' variant: w_inf + w_train.

    E[scale * L_drawn] = (w_inf + w_train) * (p_inf * L_inf + p_train * L_train)
                       = w_inf * L_inf + w_train * L_train.
    """
    w_inf, w_train = _check_pair(w_inf, w_train)
    return w_inf + w_train
