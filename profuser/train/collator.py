"""Batching: per mode, pad the selected samples' sequences and their sparse top-k teacher rows.

The DataLoader only groups samples (:class:`RawBatch`); which modes a step trains on depends on the
step, so the trainer calls :func:`collate` once it knows the step (``FusionTrainer.get_batch_samples``).
Padding is dynamic (to the longest sequence of the mode's sub-batch). The teacher stays sparse:
``topk_ids`` / ``topk_logprobs`` are [B, T, k]; this module must never build a [B, T, V] tensor, and
never does loss math.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch

from profuser.constants import IGNORE_INDEX


class RawBatch(list):
    """The samples of one micro-batch, as the dataset returns them (the DataLoader's collate_fn)."""

    @classmethod
    def collate_fn(cls, samples: list[dict]) -> "RawBatch":
        return cls(samples)


def _round_up(n: int, multiple: Optional[int]) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def collate_mode(rows: list[dict], pad_token_id: int, pad_to_multiple_of: Optional[int] = None) -> dict:
    """Pad one mode's rows (``FusionDataset`` ModeRows, plus ``id``) into tensors.

    Returns ``input_ids`` [B, T] (``pad_token_id`` on padding), ``attention_mask`` [B, T],
    ``labels`` [B, T] (-100 on prompt and padding), ``topk_ids`` [B, T, k] int32 (-1 on padding and on
    samples without a teacher), ``topk_logprobs`` [B, T, k] (0 there; float32 if any row is float32,
    else float16), or both None when no row has a teacher; ``teacher`` and ``ids`` lists.
    """
    if not rows:
        raise ValueError("collate_mode needs at least one row")
    B = len(rows)
    T = _round_up(max(len(r["input_ids"]) for r in rows), pad_to_multiple_of)
    input_ids = np.full((B, T), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    with_teacher = [r for r in rows if r.get("topk_ids") is not None]
    topk_ids = topk_lps = None
    if with_teacher:
        K = max(r["topk_ids"].shape[1] for r in with_teacher)
        lp_dtype = np.float16 if all(r["topk_logprobs"].dtype == np.float16 for r in with_teacher) else np.float32
        topk_ids = np.full((B, T, K), -1, dtype=np.int32)
        topk_lps = np.zeros((B, T, K), dtype=lp_dtype)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = r["input_ids"]
        attention_mask[b, :n] = 1
        labels[b, :n] = r["labels"]
        if r.get("topk_ids") is not None:
            k = r["topk_ids"].shape[1]
            topk_ids[b, :n, :k] = r["topk_ids"]
            topk_lps[b, :n, :k] = r["topk_logprobs"]
    tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    return {
        "input_ids": tensor(input_ids),
        "attention_mask": tensor(attention_mask),
        "labels": tensor(labels),
        "topk_ids": tensor(topk_ids),
        "topk_logprobs": tensor(topk_lps),
        "teacher": [r.get("teacher") for r in rows],
        "ids": [r.get("id") for r in rows],
    }


def collate(samples: Iterable[dict], assignment: dict[str, list[int]], pad_token_id: int,
            pad_to_multiple_of: Optional[int] = None) -> dict[str, dict]:
    """``{mode: collate_mode(...)}`` for the modes in ``assignment`` (mode -> indices of ``samples``).

    A sample assigned to a mode it does not have is left out of that mode; a mode left with no
    rows is left out of the result. Modes not in ``assignment`` are never touched.
    """
    samples = list(samples)
    out = {}
    for mode, idx in assignment.items():
        rows = [{**samples[i][mode], "id": samples[i]["id"]} for i in idx if samples[i].get(mode) is not None]
        if rows:
            out[mode] = collate_mode(rows, pad_token_id, pad_to_multiple_of)
    return out


def placeholder_mode(pad_token_id: int) -> dict:
    """A one-row, two-token sub-batch with no labels: its loss is 0 with a zero gradient.

    Forwarded by a rank that has no sample of a mode some other rank trains this micro-batch, so
    every rank runs the same forward passes (ZeRO-3 gathers parameters collectively per forward).
    The row is attended (mask 1): an all-masked attention row would give NaN logits.
    """
    return {
        "input_ids": torch.full((1, 2), pad_token_id, dtype=torch.long),
        "attention_mask": torch.ones((1, 2), dtype=torch.long),
        "labels": torch.full((1, 2), IGNORE_INDEX, dtype=torch.long),
        "topk_ids": None,
        "topk_logprobs": None,
        "teacher": [],
        "ids": [],
    }


def count_targets(labels: torch.Tensor) -> int:
    """Label tokens the loss scores: ``labels[:, 1:] != -100`` (the loss shifts by one)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
