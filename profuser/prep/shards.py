"""Stage output on disk: atomic Parquet shards, per-shard sidecars, a manifest per stage.

Layout of one stage (run_dir/prep/<stage>/):

    manifest.json                  status, per-part config hash + deps, shard list, counts, versions
    rejects.jsonl                  every record the stage could not use, with its reason
    <part>/shard-00000.parquet     the rows (zstd; log-probs float16 with byte-stream-split)
    <part>/shard-00000.json        sidecar written after the parquet: counts, rejects, timing.
                                   Its presence is what marks the shard finished.

A part is one independently invalidated slice of a stage (one source's generations, one source's
teacher rows in one mode). Every write goes to a temp file first and is renamed into place, so a
killed process leaves either a finished shard or nothing that counts.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


# --------------------------------------------------------------------------------------------
# atomic writes


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n")


def write_parquet(path: Path, table: pa.Table) -> None:
    """Atomic Parquet write. zstd everywhere; float16 columns also byte-stream-split (their high
    bytes — sign and exponent — then compress to almost nothing); no dictionaries except for short
    repeated strings (dictionaries of token ids cost more than they save)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bss, dict_cols = [], []
    for name, leaf in _leaf_columns(table.schema):
        if pa.types.is_float16(leaf) or pa.types.is_float32(leaf):
            bss.append(name)
    for f in table.schema:
        if f.name in ("mode", "source", "finish_reason", "winner"):
            dict_cols.append(f.name)
    tmp = _tmp(path)
    pq.write_table(table, tmp, compression="zstd", compression_level=9, use_dictionary=dict_cols or False,
                   use_byte_stream_split=bss or False, write_statistics=False)
    os.replace(tmp, path)


def _leaf_columns(schema: pa.Schema) -> Iterable[tuple[str, pa.DataType]]:
    """(parquet column path, leaf type) of every list-of-...-number column."""
    for f in schema:
        name, t = f.name, f.type
        while pa.types.is_list(t):
            name, t = f"{name}.list.element", t.value_type
        if name != f.name:
            yield name, t


def read_parquet(path: Path, columns: Optional[list[str]] = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


# --------------------------------------------------------------------------------------------
# hashing and fingerprints


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(path: str | os.PathLike, content: bool = False) -> str:
    """Identity of a file or directory: content hash (content=True, files only) or name/size/mtime."""
    p = Path(path)
    if not p.exists():
        return "missing"
    if p.is_file():
        if content:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            return "sha256:" + h.hexdigest()[:16]
        st = p.stat()
        return f"{st.st_size}-{st.st_mtime_ns}"
    entries = []
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            f = Path(root, name)
            st = f.stat()
            entries.append((str(f.relative_to(p)), st.st_size, st.st_mtime_ns))
    return "files:" + stable_hash(entries)


def library_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("profuser", "torch", "transformers", "tokenizers", "datasets", "pyarrow", "deepspeed",
                 "sentence-transformers", "vllm"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def diff_deps(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two dependency dicts ('key: old -> new')."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{key}: (new) -> {_short(new[k])}")
            elif k not in new:
                out.append(f"{key}: {_short(old[k])} -> (removed)")
            else:
                out += diff_deps(old[k], new[k], key)
        return out
    if old == new:
        return []
    if prefix.startswith("upstream."):  # a hash: say what changed, not the hashes
        return [f"upstream {prefix[len('upstream.'):]} changed"]
    return [f"{prefix or 'value'}: {_short(old)} -> {_short(new)}"]


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


# --------------------------------------------------------------------------------------------
# one stage's directory


class StageDir:
    def __init__(self, prep_dir: Path, stage: str):
        self.stage = stage
        self.root = Path(prep_dir) / stage

    # manifest -----------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> Optional[dict]:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return None

    def write_manifest(self, m: dict) -> None:
        m = {**m, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(self.manifest_path, m)

    # shards -------------------------------------------------------------------------------
    def part_dir(self, part: str) -> Path:
        return self.root / part

    def shard_path(self, part: str, i: int) -> Path:
        return self.part_dir(part) / f"{shard_name(i)}.parquet"

    def sidecar_path(self, part: str, i: int) -> Path:
        return self.part_dir(part) / f"{shard_name(i)}.json"

    def is_done(self, part: str, i: int) -> bool:
        return self.sidecar_path(part, i).exists() and self.shard_path(part, i).exists()

    def commit(self, part: str, i: int, table: pa.Table, info: dict) -> None:
        """Write one finished shard: rows first, then the sidecar that marks it done."""
        write_parquet(self.shard_path(part, i), table)
        atomic_write_json(self.sidecar_path(part, i), {"shard": shard_name(i), "rows": table.num_rows, **info})

    def sidecar(self, part: str, i: int) -> dict:
        return json.loads(self.sidecar_path(part, i).read_text())

    def read(self, part: str, i: int, columns: Optional[list[str]] = None) -> pa.Table:
        return read_parquet(self.shard_path(part, i), columns)

    def num_rows(self, part: str, i: int) -> int:
        return pq.ParquetFile(self.shard_path(part, i)).metadata.num_rows

    def shard_files(self, part: str) -> list[Path]:
        return sorted(self.part_dir(part).glob("shard-*.parquet"))

    # housekeeping -------------------------------------------------------------------------
    def remove_part(self, part: str) -> None:
        shutil.rmtree(self.part_dir(part), ignore_errors=True)

    def remove_derived(self) -> None:
        """Stage-level files computed from all parts (rebuilt when the stage finishes)."""
        for name in (REJECTS, "stats.json"):
            (self.root / name).unlink(missing_ok=True)

    def clean_tmp(self) -> None:
        """Temp files left by a killed process (only called while no rank is writing)."""
        if self.root.exists():
            for f in self.root.rglob("*.tmp*"):
                f.unlink(missing_ok=True)
