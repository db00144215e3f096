"""Data prep stage 'align': each mode's teacher distributions re-expressed on the target's tokens and vocabulary (exact byte-span alignment, cached vocabulary maps).

    python data_prep/align.py CONFIG [key.sub=value ...]
    deepspeed --num_gpus 8 data_prep/align.py CONFIG        # one process per GPU (CPU: DS_ACCELERATOR=cpu)
    torchrun --nproc_per_node 8 data_prep/align.py CONFIG

Outputs go to RUN_DIR/prep/align/; finished shards are skipped on a rerun. Same as
`profuser prep CONFIG --stage align`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from profuser.prep.run import script_main  # noqa: E402


def main() -> int:
    return script_main("align")


if __name__ == "__main__":
    sys.exit(main())
