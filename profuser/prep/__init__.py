"""Teacher-signal data prep: normalize -> generate -> score -> teacher -> align -> build, sharded and resumable.

    profuser prep CONFIG [--stage NAME] [key.sub=value ...]      # one process, or under a launcher:
    deepspeed --num_gpus 8 --no_local_rank --module profuser.cli prep CONFIG   # (launch/prep.sh)

Outputs live in RUN_DIR/prep/<stage>/ (layout in `profuser.prep.shards`); `profuser.prep.read`
returns them as `datasets.Dataset`s memory-mapped from the shards. This module stays import-light
(the CLI reads STAGE_NAMES); everything else is imported from its submodule. It must never import
torch, pyarrow or a stage module at import time.
"""
from __future__ import annotations

STAGE_NAMES = ("normalize", "generate", "score", "teacher", "align", "build")


def __getattr__(name: str):
    if name == "run_prep":
        from profuser.prep.run import run_prep

        return run_prep
    if name in ("load_part", "load_teacher", "part_table"):
        from profuser.prep import read

        return getattr(read, name)
    raise AttributeError(name)
