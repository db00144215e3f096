"""Entry point under a launcher: ``deepspeed --module profuser.train CONFIG [key.sub=value ...] [--data DIR]``.

Also ``python -m profuser.train CONFIG ...`` (one process); ``profuser train`` is the same command.
It parses arguments and calls ``profuser.train.run.train``: it must never hold training logic.
"""
from __future__ import annotations

import argparse
import logging
import sys


class IntermixedParser(argparse.ArgumentParser):
    """Overrides may come after options (the deepspeed launcher puts --local_rank=N first)."""

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_intermixing", False):  # parse_known_intermixed_args calls back in here
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.__class__ = IntermixedParser  # also for the `profuser train` subparser
    p.add_argument("config", help="The run's YAML config file.")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="Override config values, e.g. train.learning_rate=2e-5 train.deepspeed=deepspeed_configs/zero3.json")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="Training set: a directory of Parquet shards (default: RUN_DIR/prep/build).")
    p.add_argument("--skip-check", action="store_true",
                   help="Start without the preflight (the checks of `profuser check` that training needs).")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the LOCAL_RANK environment variable.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from profuser.check import load_and_preflight
    from profuser.models import ModelLoadError
    from profuser.train.checkpoint import CheckpointError
    from profuser.train.dataset import TrainingSetError
    from profuser.train.run import train

    cfg, code = load_and_preflight(args, "train", data_dir=args.data)
    if cfg is None:
        return code
    try:
        train(cfg, data=args.data)
    except TrainingSetError as e:
        print(f"training set error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    except ModelLoadError as e:
        print(f"model error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    p = IntermixedParser(prog="python -m profuser.train",
                                description="Train the target by progressive fusion (one process per device).")
    add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
