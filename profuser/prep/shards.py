"""Stage output on disk: atomic Parquet shards, per-shard sidecars, a manifest per stage.

Layout of one stage (run_dir/prep/<stage>/):

    manifest.json                  status, per-part config hash + deps, shard list, counts, versions
    rejects.jsonl                  every record the stage could not use, with its reason
    <part>/shard-00000.parquet     the rows (zstd; log-probs float16 with byte-stream-split)
    <part>/shard-00000.json        sidecar written after the parquet: counts, rejects, timing, and
                                   the parquet's size, row count and sha256. Its presence marks the
                                   shard finished; `verify_shard` checks the parquet against it
                                   before a finished shard is trusted.

A part is one independently invalidated slice of a stage (one source's generations, one source's
teacher rows in one mode). Every write goes to a temp file first and is renamed into place, so a
killed process leaves either a finished shard or nothing that counts.

A shard is never visible half-written: files are written under a temporary name, then renamed.
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


def user_cache_dir() -> Path:
    """ProFuser's per-user cache: $PROFUSER_CACHE, else $XDG_CACHE_HOME/profuser, else ~/.cache/profuser.
    It holds what depends only on file contents: file hashes, vocabulary tables per tokenizer pair."""
    root = os.environ.get("PROFUSER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "profuser"
    return Path(root)


def _hash_cache_path() -> Path:
    return user_cache_dir() / "file-hashes.json"


_HASHES: Optional[dict] = None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, computed once per (path, size, mtime, inode) and cached on disk
    (PROFUSER_CACHE, default ~/.cache/profuser): touching a file costs one re-read, not a new hash."""
    global _HASHES
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache = _hash_cache_path()
    if _HASHES is None:
        try:
            _HASHES = json.loads(cache.read_text())
        except (OSError, ValueError):
            _HASHES = {}
    if key in _HASHES:
        return _HASHES[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    _HASHES = {k: v for k, v in _HASHES.items() if not k.startswith(f"{p}|")}  # drop the file's stale entries
    _HASHES[key] = digest
    try:
        atomic_write_text(cache, json.dumps(_HASHES))
    except OSError:
        pass  # a read-only cache only costs re-hashing
    return digest


def fingerprint(path: str | os.PathLike, content: bool = True, skip_suffixes: tuple[str, ...] = ()) -> str:
    """Content identity of a file or directory (hidden entries skipped): sha256 of the file, or of
    every file's (relative name, size, sha256). Modification times play no part, so touching or
    copying a model changes nothing; the hashes are cached (`file_sha256`). `content=False` gives
    names and sizes only; `skip_suffixes` leaves out files by suffix (e.g. weights, for a stage
    that reads only the tokenizer)."""
    p = Path(path)
    if not p.exists():
        return "missing"
    if p.is_file():
        return ("sha256:" + file_sha256(p)[:16]) if content else f"size:{p.stat().st_size}"
    entries = []
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.endswith(skip_suffixes):
                continue
            f = Path(root, name)
            entries.append((str(f.relative_to(p)), f.stat().st_size, file_sha256(f) if content else None))
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
    return json.dumps(v, default=str)  # in full: a cut value hides what changed


def shard_identity(path: Path) -> dict:
    """What a finished Parquet shard is: its size, row count (from the footer) and sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "rows": pq.ParquetFile(path).metadata.num_rows, "sha256": h.hexdigest()}


def check_shard_file(path: Path, want: Optional[dict], rows: Optional[int] = None, full: bool = True) -> Optional[str]:
    """None when the Parquet file at `path` matches `want` (a `shard_identity`), else the problem.
    A sidecar without `file` (written before shards carried it) is checked by its row count."""
    if not path.exists():
        return "the file is missing"
    size = path.stat().st_size
    if want and size != want.get("bytes"):
        return f"{size} bytes, {want.get('bytes')} were written"
    try:
        n = pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # noqa: BLE001 — any unreadable footer is damage
        return f"not a readable Parquet file ({type(e).__name__}: {e})"
    expect = want.get("rows") if want else rows
    if expect is not None and n != expect:
        return f"{n} rows, {expect} were written"
    if full and want and want.get("sha256"):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != want["sha256"]:
            return "its bytes changed since it was written (sha256 differs)"
    return None


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
        """A part's folder, always inside this stage's folder (part names come from validated source
        names, and this is checked again here because files under it get removed)."""
        d = self.root / part
        root = self.root.resolve()
        real = d.resolve()
        if real != root and root not in real.parents:
            raise ValueError(f"part {part!r} of stage {self.stage!r} resolves to {real}, outside {root}")
        return d

    def shard_path(self, part: str, i: int) -> Path:
        return self.part_dir(part) / f"{shard_name(i)}.parquet"

    def sidecar_path(self, part: str, i: int) -> Path:
        return self.part_dir(part) / f"{shard_name(i)}.json"

    def is_done(self, part: str, i: int) -> bool:
        return self.sidecar_path(part, i).exists() and self.shard_path(part, i).exists()

    def commit(self, part: str, i: int, table: pa.Table, info: dict) -> None:
        """Write one finished shard: rows first, then the sidecar that marks it done."""
        write_parquet(self.shard_path(part, i), table)
        self.mark_done(part, i, table.num_rows, info)

    def mark_done(self, part: str, i: int, rows: int, info: dict) -> None:
        """Write the sidecar of a shard whose parquet is in place: its counts plus the file's size,
        row count and sha256, which `verify_shard` checks before the shard is trusted again."""
        path = self.shard_path(part, i)
        atomic_write_json(self.sidecar_path(part, i), {"shard": shard_name(i), "rows": rows, **info,
                                                       "file": shard_identity(path)})

    def verify_shard(self, part: str, i: int, full: bool = True) -> Optional[str]:
        """None when shard i of `part` is what its sidecar says was written, else what is wrong.
        `full` also compares the sha256 (reads the whole file; else size and Parquet footer only)."""
        path = self.shard_path(part, i)
        try:
            side = self.sidecar(part, i)
        except (OSError, ValueError) as e:
            return f"unreadable sidecar {self.sidecar_path(part, i).name}: {e}"
        return check_shard_file(path, side.get("file"), side.get("rows"), full)

    def remove_shard(self, part: str, i: int) -> None:
        """Sidecar first (the shard stops counting as done), then the rows."""
        self.sidecar_path(part, i).unlink(missing_ok=True)
        self.shard_path(part, i).unlink(missing_ok=True)

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
        d = self.part_dir(part)  # raises for a folder outside the stage's
        assert d.resolve() == self.root.resolve() or self.root.resolve() in d.resolve().parents
        shutil.rmtree(d, ignore_errors=True)

    def remove_derived(self) -> None:
        """Stage-level files computed from all parts (rebuilt when the stage finishes)."""
        for name in (REJECTS, "stats.json"):
            (self.root / name).unlink(missing_ok=True)

    def clean_tmp(self) -> None:
        """Temp files left by a killed process (only called while no rank is writing)."""
        if self.root.exists():
            for f in self.root.rglob("*.tmp*"):
                f.unlink(missing_ok=True)
