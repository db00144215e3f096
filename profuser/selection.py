"""Which source teaches a sample in training mode: MinCE, as pure functions of the teacher rows' numbers.
It must never import torch or numpy, or read a file.

Every source is teacher-forced on the same ground truth; the one that finds it most likely teaches.
How "most likely" is measured decides whether the comparison is fair across tokenizers:

- ``byte`` (default): the negative log-likelihood of the response TEXT itself — the tokens that
  encode the reference's characters, not the template's end-of-turn suffix — divided by its UTF-8
  bytes, in bits per byte. Every source is scored on the same text with the same denominator, so
  a finer tokenizer (more, easier tokens) gains nothing, and a template whose end-of-turn token is
  expensive does not decide short answers. This is the figure nanochat reports for the same reason.
- ``token``: the mean cross-entropy per the source's OWN response token, end-of-turn suffix
  included — the rule of the ProFuser paper and of FuseLLM/FuseChat, kept to reproduce them.

Ties go to the source listed first in the config.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

MINCE_RULES = ("byte", "token")


def bits_per_byte(text_nll: float, text_bytes: int) -> float:
    """NLL in nats over `text_bytes` UTF-8 bytes, as bits per byte (inf for an empty text)."""
    return text_nll / (math.log(2) * text_bytes) if text_bytes > 0 else math.inf


def mince_value(ce: float, text_nll: Optional[float], text_bytes: Optional[int], rule: str) -> float:
    """What MinCE minimizes for one source on one sequence: bits per byte of the response text
    (rule "byte") or nats per own token (rule "token", `ce`)."""
    if rule == "token":
        return float(ce)
    if rule == "byte":
        return bits_per_byte(float(text_nll), int(text_bytes))
    raise ValueError(f"MinCE rule {rule!r} is not one of {MINCE_RULES}")


def rank_sources(values: Mapping[str, float]) -> list[str]:
    """Sources from best (lowest value) to worst; `values` in config order, ties keep that order,
    non-finite values last."""
    order = list(values)
    return sorted(order, key=lambda s: (not math.isfinite(values[s]), values[s] if math.isfinite(values[s]) else 0.0,
                                        order.index(s)))
