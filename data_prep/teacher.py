"""Data prep stage 'teacher': teacher-forced top-k distributions and CE of every source on the ground truth, and of the winner on its own response.

    python data_prep/teacher.py CONFIG [key.sub=value ...]
    deepspeed --num_gpus 8 data_prep/teacher.py CONFIG        # one process per GPU (CPU: DS_ACCELERATOR=cpu)
    torchrun --nproc_per_node 8 data_prep/teacher.py CONFIG

Outputs go to RUN_DIR/prep/teacher/; finished shards are skipped on a rerun. Same as
`profuser prep CONFIG --stage teacher`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from profuser.prep.run import script_main  # noqa: E402


def main() -> int:
    return script_main("teacher")


if __name__ == "__main__":
    sys.exit(main())
