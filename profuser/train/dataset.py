"""The training set: the build stage's Parquet shards, read row by row without densifying anything.

One row per sample id (docs/ARCHITECTURE.md, "Stage contracts"): ``id``, ``meta`` and, per mode m in
(inference, training), ``{m}_input_ids``, ``{m}_labels``, ``{m}_teacher``, ``{m}_teacher_score``,
``{m}_topk_ids`` [T, k] int32 (-1 = none) and ``{m}_topk_logprobs`` [T, k] float16 — all null when
the mode is absent for the sample. The shards are loaded with ``datasets`` (memory-mapped Arrow),
and a row becomes numpy arrays: the sparse teacher stays [T, k]. It must never densify the teacher,
and never repair a malformed row: it raises TrainingSetError naming the row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler as TransformersLengthGroupedSampler

from profuser.constants import MODES
from profuser.prep.formats import BUILD_FIELDS

REQUIRED = ("id",) + tuple(f"{m}_{f}" for m in MODES for f in BUILD_FIELDS)


class TrainingSetError(ValueError):
    """The training set is missing, malformed or empty; the message names the file, row or column."""


def shard_paths(path: str | Path) -> list[Path]:
    """The Parquet shards of a training set: a directory's ``*.parquet`` (sorted) or one file."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise TrainingSetError(f"training set {str(p)!r} does not exist; run the prep stages first "
                               "(they write RUN_DIR/prep/build/*.parquet) or pass --data DIR")
    manifest = p / "manifest.json"
    if manifest.exists():  # a build stage output: only a finished one is a training set
        import json

        status = json.loads(manifest.read_text()).get("status")
        if status != "complete":
            raise TrainingSetError(f"training set {str(p)!r} is not complete (build manifest status {status!r}); "
                                   "finish it with `profuser prep CONFIG` first")
    shards = sorted(p.glob("*.parquet"))
    if not shards:
        raise TrainingSetError(f"training set {str(p)!r} holds no *.parquet shards; is the build stage finished?")
    return shards


def _list2d(arr: pa.Array, what: str) -> Optional[np.ndarray]:
    """One list<list<x>> value (an array of length 1) -> [T, k] numpy, or None when null.

    Not ``formats.unnest``: that needs k up front, turns a null into an empty array, and checks only
    the total count, not that every row holds k entries; here k is read from the row and a ragged row is an error."""
    if arr.null_count:
        return None
    rows = arr.flatten()  # list<x>, length T
    if len(rows) == 0:
        return np.zeros((0, 0), dtype=rows.type.value_type.to_pandas_dtype())
    widths = pc.list_value_length(rows)
    k_min, k_max = pc.min_max(widths).values()
    if k_min.as_py() != k_max.as_py():
        raise TrainingSetError(f"{what}: rows have different widths ({k_min}..{k_max}); each row must hold k entries")
    flat = rows.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(rows), k_max.as_py())


class FusionDataset(torch.utils.data.Dataset):
    """Samples of the training set; ``ds[i]`` is ``{"id": str, "inference": ModeRow | None, "training": ...}``.

    A ModeRow is a dict: ``input_ids`` int64 [T], ``labels`` int64 [T] (-100 on prompt tokens),
    ``topk_ids`` int32 [T, k] and ``topk_logprobs`` float16/32 [T, k] (None when the sample has no teacher
    signal in that mode: CE only), ``teacher`` (source name) and ``teacher_score``.
    """

    def __init__(self, path: str | Path, cache_dir: str | Path | None = None):
        import datasets

        self.shards = shard_paths(path)
        try:
            ds = datasets.Dataset.from_parquet([str(s) for s in self.shards],
                                               cache_dir=str(cache_dir) if cache_dir else None)
        except Exception as e:  # noqa: BLE001 — re-raised naming the shards
            raise TrainingSetError(f"cannot read the training set {[str(s) for s in self.shards]}: {e}") from e
        missing = [c for c in REQUIRED if c not in ds.column_names]
        if missing:
            raise TrainingSetError(f"training set {str(path)!r} lacks columns {missing}; expected the build "
                                   f"stage's schema (id, meta, {{mode}}_{{{','.join(BUILD_FIELDS)}}})")
        if len(ds) == 0:
            raise TrainingSetError(f"training set {str(path)!r} has no rows")
        self.path = Path(path)
        self._rows = ds.with_format("arrow")
        table = ds.data.table
        self._present = {m: np.asarray(pc.is_valid(table[f"{m}_input_ids"]).to_numpy(zero_copy_only=False))
                         for m in MODES}
        self._lengths = {m: np.nan_to_num(np.asarray(pc.list_value_length(table[f"{m}_input_ids"])
                                                     .to_numpy(zero_copy_only=False), dtype=float)).astype(np.int64)
                         for m in MODES}
        names = set()
        for m in MODES:
            names.update(v for v in table[f"{m}_teacher"].to_pylist() if v is not None)
        self.teacher_names: list[str] = sorted(names)

    def __len__(self) -> int:
        return len(self._rows)

    def mode_counts(self) -> dict[str, int]:
        """Number of samples that have each mode."""
        return {m: int(self._present[m].sum()) for m in MODES}

    def lengths(self) -> list[int]:
        """Per sample, the longest of its modes' sequences (for length-grouped batching)."""
        return np.maximum(*(self._lengths[m] for m in MODES)).tolist()

    def __getitem__(self, i: int) -> dict:
        row = self._rows[int(i)]
        sid = row.column("id")[0].as_py()
        out = {"id": sid}
        for m in MODES:
            out[m] = None
            ids = row.column(f"{m}_input_ids").combine_chunks()
            if ids.null_count:
                continue
            what = f"{self.path}: sample {sid!r}, mode {m}"
            input_ids = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
            labels_col = row.column(f"{m}_labels").combine_chunks()
            if labels_col.null_count:
                raise TrainingSetError(f"{what}: input_ids present but labels null")
            labels = labels_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
            topk_ids = _list2d(row.column(f"{m}_topk_ids").combine_chunks(), f"{what}, topk_ids")
            topk_lps = _list2d(row.column(f"{m}_topk_logprobs").combine_chunks(), f"{what}, topk_logprobs")
            T = len(input_ids)
            if len(labels) != T:
                raise TrainingSetError(f"{what}: {len(labels)} labels for {T} input_ids")
            if (topk_ids is None) != (topk_lps is None):
                raise TrainingSetError(f"{what}: topk_ids and topk_logprobs must both be present or both null")
            if topk_ids is not None:
                if topk_ids.shape != topk_lps.shape or topk_ids.shape[0] != T:
                    raise TrainingSetError(f"{what}: topk_ids {topk_ids.shape} and topk_logprobs {topk_lps.shape} "
                                           f"must both be [T={T}, k]")
                topk_ids = topk_ids.astype(np.int32, copy=False)
            score = row.column(f"{m}_teacher_score")[0].as_py()
            out[m] = {
                "input_ids": input_ids,
                "labels": labels,
                "topk_ids": topk_ids,
                "topk_logprobs": topk_lps,
                "teacher": row.column(f"{m}_teacher")[0].as_py(),
                "teacher_score": float("nan") if score is None else float(score),
            }
        if all(out[m] is None for m in MODES):
            raise TrainingSetError(f"{self.path}: sample {sid!r} has neither mode; the build stage should reject it")
        return out


class LengthGroupedSampler(TransformersLengthGroupedSampler):
    """transformers' LengthGroupedSampler (random order in which runs of up to 50 batches are sorted
    by length, the longest sample first, so an out-of-memory shows at step 1) with its generator
    reseeded from (seed, epoch) at every iteration: a resumed run and every rank draw the same order.

    The Trainer calls ``set_epoch``; transformers' own sampler draws from the global torch RNG instead.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        super().__init__(batch_size, lengths=list(lengths), generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()
