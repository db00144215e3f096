"""Checkpoints are unpickled on resume (DeepSpeed reads its *_states.pt with weights_only=False, the
Trainer its RNG state): only files this project wrote are loaded. This module never unpickles
anything itself: it hashes and signs files, and checks them before anything else is loaded.

When a checkpoint is complete, rank 0 writes ``profuser-digest.json`` into it: the sha256 of every
file that is not safetensors (safetensors cannot run code; they hold most of the bytes), and an
HMAC-SHA256 of that list under a per-user key (``~/.config/profuser/checkpoint.key``, mode 0600,
created on first use; ``PROFUSER_KEY_FILE`` elsewhere, e.g. on storage that every node of a
multi-node run reads). Before a resume, every rank checks the checkpoint against it: a changed,
added or removed file, a symlink, or a digest that the key did not sign, and the resume is
refused before anything is unpickled. Someone who can read your key can forge a digest; someone
who can only write into the run directory cannot.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

DIGEST = "profuser-digest.json"
UNHASHED = (".safetensors",)
MARKERS = (DIGEST, ".complete")


class CheckpointError(RuntimeError):
    pass


def key_file() -> Path:
    return Path(os.environ.get("PROFUSER_KEY_FILE")
                or Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "profuser" / "checkpoint.key")


def _key() -> bytes:
    p = key_file()
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, p)  # never replaces a key another process created meanwhile
        except FileExistsError:
            pass
        tmp.unlink()
    return p.read_text().strip().encode()


def _listing(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file but safetensors and the markers; symlinks refused."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            raise CheckpointError(f"{folder}: {rel} is a symlink; a checkpoint holds only regular files")
        if not p.is_file() or rel in MARKERS or p.name.endswith(UNHASHED):
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        out[rel] = h.hexdigest()
    return out


def _sign(files: dict[str, str]) -> str:
    return hmac.new(_key(), json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def write_digest(folder: str | os.PathLike) -> None:
    folder = Path(folder)
    files = _listing(folder)
    tmp = folder / f".{DIGEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"files": files, "hmac": _sign(files)}, indent=1))
    os.replace(tmp, folder / DIGEST)


def verify_checkpoint(folder: str | os.PathLike) -> None:
    """Raise CheckpointError unless `folder` is exactly what this project wrote and signed."""
    folder = Path(folder)
    fix = ("delete it (training restarts from the previous checkpoint, or from scratch) or set "
           "train.resume=false and a new train.output_dir")
    try:
        digest = json.loads((folder / DIGEST).read_text())
        want, sig = dict(digest["files"]), str(digest["hmac"])
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no {DIGEST}: it was not written (or not finished) by this version of "
                              f"profuser, so it is not unpickled; {fix}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}/{DIGEST} is unreadable ({e}); {fix}") from None
    if not hmac.compare_digest(sig, _sign(want)):
        raise CheckpointError(f"{folder}/{DIGEST} is not signed by this user's key ({key_file()}): the checkpoint "
                              f"comes from elsewhere or was edited, so it is not unpickled; {fix}")
    have = _listing(folder)
    changed = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    added, missing = sorted(have.keys() - want.keys()), sorted(want.keys() - have.keys())
    if changed or added or missing:
        what = "; ".join(f"{label}: {', '.join(v[:5])}" for label, v in
                         (("changed", changed), ("added", added), ("missing", missing)) if v)
        raise CheckpointError(f"{folder} differs from what was written ({what}); refusing to unpickle it; {fix}")
