"""The Arrow row formats of the prep stages (docs/ARCHITECTURE.md, "Stage contracts"), defined once:
every stage's schema, and the one writer and reader of the nested (list and list<list>) columns.

Stages write their shards with these schemas and the trainer reads the build stage's; tests write
fixtures with them. A schema change changes stored files: bump the stage's *_VERSION with it.
Nested columns go through flat numpy buffers, never Python lists of lists (a shard holds millions of
top-k entries). This module must never hold stage logic: it only says what a row looks like.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profuser.constants import PREP_MODES

NORMALIZE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    pa.field("reference", pa.string()),
    pa.field("meta", pa.string()),  # JSON of the row's other fields
])

GENERATE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("response", pa.string()),
    pa.field("n_tokens", pa.int32()),  # generated tokens, not counting the stop token
    pa.field("finish_reason", pa.string()),  # "stop" (end of turn / EOS) or "length" (max_new_tokens)
])


def score_schema(scorer_names: list[str]) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("winner", pa.string()),  # null when no scorer is configured
        pa.field("sources", pa.list_(pa.string())),  # the candidates, in config order
        pa.field("votes", pa.list_(pa.float64())),
        pa.field("mean_z", pa.list_(pa.float64())),
        *[pa.field(f"score_{n}", pa.list_(pa.float64())) for n in scorer_names],
    ])


TEACHER_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("mode", pa.string()),  # "training" | "inference"
    pa.field("source", pa.string()),
    pa.field("response", pa.string()),
    pa.field("ce", pa.float64()),  # mean token CE over the response tokens (nats), template tail included
    pa.field("n_tokens", pa.int32()),  # R
    pa.field("text_nll", pa.float64()),  # NLL (nats) summed over the tokens that encode the response text
    pa.field("text_bytes", pa.int32()),  # UTF-8 bytes of the response text
    pa.field("text_tokens", pa.int32()),  # tokens counted in text_nll
    pa.field("token_ids", pa.list_(pa.int32())),  # [R] the source's response token ids, incl. end of turn
    pa.field("token_logprobs", pa.list_(pa.float16())),  # [R] log-prob of token_ids[r] (full vocab)
    pa.field("topk_ids", pa.list_(pa.list_(pa.int32()))),  # [R, k]
    pa.field("topk_logprobs", pa.list_(pa.list_(pa.float16()))),  # [R, k], log-softmax over the full vocab
    # prep.lookahead (null when off): the word outcomes, flat: outcome o of the word start at row lookahead_rows[o]
    pa.field("lookahead_rows", pa.list_(pa.int32())),  # [O] response row of the word start
    pa.field("lookahead_texts", pa.list_(pa.string())),  # [O] the outcome's text from the word start's first byte
    pa.field("lookahead_logprobs", pa.list_(pa.float32())),  # [O] the teacher's log-prob of it
])

ALIGN_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("mode", pa.string()),
    pa.field("source", pa.string()),  # the teacher
    pa.field("rank", pa.int32()),  # the teacher's place in the ranking (0 = first choice)
    pa.field("teacher_score", pa.float64()),  # training: MinCE value; inference: votes
    pa.field("ce", pa.float64()),  # the teacher's nats per own token on this mode's response
    pa.field("bpb", pa.float64()),  # the teacher's bits per byte of the response text
    pa.field("votes", pa.float64()),  # inference only
    pa.field("mean_z", pa.float64()),  # inference only
    pa.field("method", pa.string()),  # "copy" | "project" | "mined"
    pa.field("input_ids", pa.list_(pa.int32())),  # [T] target tokens, prompt + response
    pa.field("labels", pa.list_(pa.int32())),  # [T] -100 on the prompt
    pa.field("topk_ids", pa.list_(pa.list_(pa.int32()))),  # [T, k] target ids, -1 = none
    pa.field("topk_logprobs", pa.list_(pa.list_(pa.float16()))),  # [T, k] -inf where id is -1
    pa.field("n_response", pa.int32()),
    pa.field("n_aligned", pa.int32()),
    pa.field("n_transferred", pa.int32()),
    pa.field("kept_mass", pa.float64()),  # mean over transferred positions; null when none
    pa.field("mass", pa.float64()),  # mean stored probability mass over transferred positions
    pa.field("n_lookahead", pa.int32()),  # positions taught from the word lookahead's outcomes
])

BUILD_FIELDS = {  # build column suffix -> the align column it is taken from (and whose type it keeps)
    "input_ids": "input_ids",
    "labels": "labels",
    "teacher": "source",
    "teacher_score": "teacher_score",
    "topk_ids": "topk_ids",
    "topk_logprobs": "topk_logprobs",
}
BUILD_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("meta", pa.string())]
                         + [pa.field(f"{m}_{f}", ALIGN_SCHEMA.field(col).type)
                            for m in PREP_MODES for f, col in BUILD_FIELDS.items()])


def _leaf(t: pa.DataType) -> tuple[pa.DataType, int]:
    """(innermost value type, list depth) of a (nested) list type."""
    depth = 0
    while pa.types.is_list(t):
        t, depth = t.value_type, depth + 1
    return t, depth


def nested(arrays: list, list_type: pa.DataType) -> pa.Array:
    """Per-row arrays -> a column of `list_type`: list<x> from [R_i] rows, list<list<x>> from [R_i, k]
    rows (every row the same k). A None row is a null. Built from one flat buffer, no Python lists."""
    leaf, depth = _leaf(list_type)
    np_dtype = leaf.to_pandas_dtype()
    rows = [None if a is None else np.asarray(a) for a in arrays]
    present = [a for a in rows if a is not None]
    flat = np.concatenate([a.reshape(-1) for a in present]).astype(np_dtype) if present else np.zeros(0, np_dtype)
    outer = np.concatenate([[0], np.cumsum([0 if a is None else a.shape[0] for a in rows])]).astype(np.int32)
    values = pa.array(flat, type=leaf)
    if depth == 2:
        k = present[0].shape[1] if present else 1
        values = pa.ListArray.from_arrays(pa.array(np.arange(0, int(outer[-1]) * k + 1, k, dtype=np.int32)), values)
    mask = pa.array([a is None for a in rows]) if len(present) < len(rows) else None
    return pa.ListArray.from_arrays(pa.array(outer), values, mask=mask)


def unnest(col, width: Optional[int] = None) -> list[np.ndarray]:
    """A list<x> (width None) or list<list<x>> column of `width`-long rows -> per-row numpy arrays."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return []
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    inner = arr.flatten()
    if width is not None:
        inner = inner.flatten()
    flat = inner.to_numpy(zero_copy_only=False)
    per = lengths * (width or 1)
    if flat.size != per.sum():
        raise ValueError(f"nested column: {flat.size} values for rows of width {width} (expected {per.sum()})")
    parts = np.split(flat, np.cumsum(per)[:-1])
    return [p.reshape(-1, width) for p in parts] if width is not None else parts


def _is_numeric_list(t: pa.DataType) -> bool:
    leaf, depth = _leaf(t)
    return depth in (1, 2) and (pa.types.is_integer(leaf) or pa.types.is_floating(leaf))


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts holding at least the schema's columns; numeric list columns as numpy arrays or
    lists, None = null) -> a table of `schema`."""
    return pa.Table.from_arrays([nested([r[f.name] for r in rows], f.type) if _is_numeric_list(f.type)
                                 else pa.array([r[f.name] for r in rows], f.type) for f in schema], schema=schema)


def teacher_table(rows: list[dict]) -> pa.Table:
    """Teacher-stage rows (``n_tokens`` is taken from ``token_ids``; the lookahead columns are null
    when absent) -> a table of TEACHER_SCHEMA."""
    blank = dict.fromkeys(("lookahead_rows", "lookahead_texts", "lookahead_logprobs"))
    return to_table([{**blank, **r, "n_tokens": len(r["token_ids"])} for r in rows], TEACHER_SCHEMA)
