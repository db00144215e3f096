"""Data prep stage 'score': rate every source's response with the configured scorers and pick the inference winner.

    python data_prep/score.py CONFIG [key.sub=value ...]
    deepspeed --num_gpus 8 data_prep/score.py CONFIG        # one process per GPU (CPU: DS_ACCELERATOR=cpu)
    torchrun --nproc_per_node 8 data_prep/score.py CONFIG

Outputs go to RUN_DIR/prep/score/; finished shards are skipped on a rerun. Same as
`profuser prep CONFIG --stage score`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from profuser.prep.run import script_main  # noqa: E402


def main() -> int:
    return script_main("score")


if __name__ == "__main__":
    sys.exit(main())
