"""Reading W&B offline run files back in tests (no network, no wandb API)."""
from __future__ import annotations

import struct
from pathlib import Path


def read_wandb_records(path: Path) -> list:
    """Every protobuf Record of an offline W&B run file (run-*.wandb): a LevelDB-style log with a
    7-byte header and 32 KiB blocks of chunks (crc32, length, type: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    block, pos, out, buf = 32768, 7, [], b""  # 7-byte file header, then 32 KiB blocks
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            out.append(chunk)
        elif kind == 2:  # first
            buf = chunk
        elif kind == 3:  # middle
            buf += chunk
        elif kind == 4:  # last
            out.append(buf + chunk)
    recs = []
    for raw in out:
        r = pb.Record()
        r.ParseFromString(raw)
        recs.append(r)
    return recs
