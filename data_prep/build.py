"""Data prep stage 'build': the training set, one row per sample with both modes' input_ids, labels and aligned top-k teacher rows.

    python data_prep/build.py CONFIG [key.sub=value ...]
    deepspeed --num_gpus 8 data_prep/build.py CONFIG        # one process per GPU (CPU: DS_ACCELERATOR=cpu)
    torchrun --nproc_per_node 8 data_prep/build.py CONFIG

Outputs go to RUN_DIR/prep/build/*.parquet (the trainer's input); finished shards are skipped on a rerun. Same as
`profuser prep CONFIG --stage build`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from profuser.prep.run import script_main  # noqa: E402


def main() -> int:
    return script_main("build")


if __name__ == "__main__":
    sys.exit(main())
