"""The `profuser` command. Every subcommand takes the run's YAML config and `key.sub=value` overrides."""
from __future__ import annotations

import argparse
import logging
import sys

from profuser.config import ConfigError, load_config, save_resolved


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="The run's YAML config file.")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="Override config values, e.g. train.learning_rate=2e-5 sources.0.path=/models/x")


def cmd_check(args) -> int:
    from profuser.check import run_check

    try:
        cfg = load_config(args.config, args.overrides, check_paths=False)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    rep = run_check(cfg, load_weights=args.load_weights)
    if rep.ok:
        rep.add(f"resolved config written to {save_resolved(cfg)}")
    print(rep.text())
    return 0 if rep.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="profuser",
        description="Fuse several source chat LLMs into one target by progressive knowledge distillation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="Preflight: validate the config, tokenizers, templates and data.",
                       description="Validate the config, load every tokenizer and chat template, read the data "
                                   "through the normalizer and print a report. Exit 0 only if the run can start.")
    _add_config_args(p)
    p.add_argument("--load-weights", action="store_true", help="Also load every model's weights (slow for big models).")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
