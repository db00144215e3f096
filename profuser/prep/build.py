"""Stage 6, build: the training set — one row per sample joining its two modes' aligned teacher rows.

Columns (docs/ARCHITECTURE.md, "Stage contracts"; read by profuser.train.dataset.FusionDataset):
  id, meta (the record's meta as a JSON string), and per mode m in (training, inference):
  {m}_input_ids, {m}_labels (-100 on the prompt), {m}_teacher (source name), {m}_teacher_score
  (training: the teacher's CE; inference: its scorer votes), {m}_topk_ids [T, k] int32 (-1 = none),
  {m}_topk_logprobs [T, k] float16 — all null when the sample has no aligned row in that mode.
A sample with neither mode is rejected (no_teacher).

Unlike the other stages the output is flat: RUN_DIR/prep/build/shard-NNNNN.parquet (+ its .json
sidecar, manifest.json, rejects.jsonl), so the training set is `RUN_DIR/prep/build/*.parquet` and
loads with `datasets.Dataset.from_parquet(sorted(files))`. Shard i holds normalize's shard i, rows
in input order, whatever the number of processes. The join is done with Arrow `take`: the nested
teacher columns are never turned into Python objects.
"""
from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profuser.constants import PREP_MODES
from profuser.prep.formats import BUILD_FIELDS, BUILD_SCHEMA
from profuser.prep.shards import StageDir
from profuser.prep.stages import Context, Progress, Stage, sidecar_info, upstream_hashes

BUILD_VERSION = 2
PART = ""  # the shards live in the stage directory itself (see the module docstring)


class BuildStage(Stage):
    name = "build"
    needs = ("normalize", "align")

    def parts(self, cfg, plan):
        return {PART: {"upstream": upstream_hashes(plan, "normalize", "align"), "version": BUILD_VERSION}}

    def run(self, ctx: Context, todo: dict[str, list[int]]) -> None:
        shards = todo.get(PART)
        if not shards:
            return
        stage_dir, align_dir, norm = ctx.stage_dir(self.name), ctx.stage_dir("align"), ctx.stage_dir("normalize")
        bar = Progress(ctx, sum(norm.num_rows("records", i) for i in shards), "build")
        for i in shards:
            t0 = time.time()
            records = norm.read("records", i, ["id", "meta"])
            ids = records["id"].to_pylist()
            picked = {}
            for m in PREP_MODES:
                table = align_dir.read(m, i, ["id", *BUILD_FIELDS.values()])
                row_of = {rid: j for j, rid in enumerate(table["id"].to_pylist())}
                picked[m] = (table, [row_of.get(rid) for rid in ids])
            keep = [j for j, rid in enumerate(ids) if any(picked[m][1][j] is not None for m in PREP_MODES)]
            rejects = [{"id": rid, "kind": "no_teacher",
                        "reason": "no aligned teacher row in either mode (see the teacher and align rejects "
                                  "for this id)"}
                       for j, rid in enumerate(ids) if all(picked[m][1][j] is None for m in PREP_MODES)]
            take = pa.array(keep, pa.int64())
            arrays = [records["id"].take(take), records["meta"].take(take)]
            for m in PREP_MODES:
                table, rows = picked[m]
                idx = pa.array([rows[j] for j in keep], pa.int64())
                arrays += [table[col].take(idx).cast(BUILD_SCHEMA.field(f"{m}_{f}").type)
                           for f, col in BUILD_FIELDS.items()]
            out = pa.Table.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays],
                                       schema=BUILD_SCHEMA)
            modes = {m: sum(picked[m][1][j] is not None for j in keep) for m in PREP_MODES}
            modes["both"] = sum(all(picked[m][1][j] is not None for m in PREP_MODES) for j in keep)
            tokens = sum(pc.sum(pc.list_value_length(out[f"{m}_input_ids"])).as_py() or 0 for m in PREP_MODES)
            commit(stage_dir, i, out, sidecar_info(len(ids), len(keep), rejects, time.time() - t0, tokens, modes=modes))
            bar.update(len(ids), tokens)
        bar.close()

    def finalize(self, ctx, stage_dir, parts, rejects):
        n = len(parts[PART]["shards"])
        modes = dict.fromkeys((*PREP_MODES, "both"), 0)
        for i in range(n):
            for m, c in stage_dir.sidecar(PART, i).get("modes", {}).items():
                modes[m] += c
        rows = parts[PART]["counts"]["out"]
        ctx.say(f"build: {rows} training samples in {stage_dir.root}/*.parquet — training mode {modes['training']}, "
                f"inference mode {modes['inference']}, both {modes['both']}")
        return {"modes": modes}



def commit(stage_dir: StageDir, i: int, table: pa.Table, info: dict) -> None:
    """StageDir.commit, except that a shard without rows is written with no row group at all:
    `datasets.Dataset.from_parquet` (so the trainer) fails on a file holding one empty row group
    ("BatchSize must be greater than 0") and reads a file without row groups fine."""
    if table.num_rows:
        stage_dir.commit(PART, i, table, info)
        return
    path = stage_dir.shard_path(PART, i)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.ParquetWriter(tmp, table.schema, compression="zstd").close()
    os.replace(tmp, path)
    stage_dir.mark_done(PART, i, 0, info)
