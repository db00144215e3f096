"""Readers for prep outputs. Shards are concatenated in shard order, which is the same whatever
the number of processes that wrote them.

Read-only: never writes or repairs a stage's files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from profuser.prep.shards import StageDir


def _files(run_dir: str | Path, stage: str, part: str) -> list[str]:
    stage_dir = StageDir(Path(run_dir) / "prep", stage)
    m = stage_dir.manifest()
    if not m or m.get("status") != "complete":
        raise FileNotFoundError(f"{stage_dir.root}: stage {stage!r} is not complete; run `profuser prep CONFIG` first")
    if part not in m["parts"]:
        raise KeyError(f"{stage} has no part {part!r}; parts: {sorted(m['parts'])}")
    return [str(stage_dir.part_dir(part) / f) for f in m["parts"][part]["shards"]]


def part_table(run_dir: str | Path, stage: str, part: str, columns: Optional[list[str]] = None):
    """One part as a pyarrow Table (loads it; for small parts and tests)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f, columns=columns) for f in _files(run_dir, stage, part)])


def _dataset(files: list[str], cache_dir: Optional[str]):
    """`datasets.Dataset.from_parquet` over the non-empty shards (it cannot read a 0-row file)."""
    import datasets
    import pyarrow.parquet as pq

    full = [f for f in files if pq.ParquetFile(f).metadata.num_rows > 0]
    if not full:
        schema = pq.read_schema(files[0])
        return datasets.Dataset.from_dict({n: [] for n in schema.names},
                                          features=datasets.Features.from_arrow_schema(schema))
    return datasets.Dataset.from_parquet(full, cache_dir=cache_dir)


def load_part(run_dir: str | Path, stage: str, part: str, cache_dir: Optional[str] = None):
    """One part as a `datasets.Dataset` (Arrow cache, memory-mapped: nothing is held in RAM)."""
    return _dataset(_files(run_dir, stage, part), cache_dir)


def load_teacher(run_dir: str | Path, mode: str, source: Optional[str] = None, cache_dir: Optional[str] = None):
    """Teacher rows of one mode: one source's, or (source=None) every source's, in config order."""
    stage_dir = StageDir(Path(run_dir) / "prep", "teacher")
    m = stage_dir.manifest() or {"parts": {}}
    parts = [p for p in m["parts"] if p.startswith(f"{mode}/") and (source is None or p == f"{mode}/{source}")]
    files = [f for p in parts for f in _files(run_dir, "teacher", p)]
    if not files:
        raise KeyError(f"no teacher part for mode={mode!r} source={source!r}; parts: {sorted(m['parts'])}")
    return _dataset(files, cache_dir)
