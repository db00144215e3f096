"""The `profuser` command. Every subcommand takes the run's YAML config and `key.sub=value` overrides.

It must never do a command's work: each subcommand imports its module only when it runs, so
`profuser --help` never imports torch.
"""
from __future__ import annotations

import argparse
import logging
import sys

from profuser.config import ConfigError, load_config, save_resolved


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="The run's YAML config file.")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="Override config values, e.g. train.learning_rate=2e-5 sources.0.path=/models/x")


def add_skip_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-check", action="store_true",
                   help="Start without the preflight (the checks of `profuser check`), e.g. when you know better.")


def _launched_command(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand that also runs once per process under a launcher (deepspeed, torchrun): the config
    and its overrides (options may follow them), --skip-check, and the --local_rank launchers add."""
    from profuser.train.__main__ import IntermixedParser

    p = sub.add_parser(name, **kwargs)
    p.__class__ = IntermixedParser
    _add_config_args(p)
    add_skip_check(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def cmd_check(args) -> int:
    from profuser.check import run_check

    try:
        cfg = load_config(args.config, args.overrides, check_paths=False)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        rep = run_check(cfg, load_weights=args.load_weights)
    except Exception as e:  # noqa: BLE001 — a check never ends in a traceback; this is a bug to report
        logging.getLogger("profuser").debug("check failed", exc_info=True)
        print(f"check error: the check itself failed ({type(e).__name__}: {e}); please report it "
              "(-v shows the traceback)", file=sys.stderr)
        return 1
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

    from profuser.prep.run import STAGE_NAMES, cmd_prep

    p = _launched_command(sub, "prep", help="Teacher-signal data prep: " + ", ".join(STAGE_NAMES) + ".",
                          description="Run the data-prep stages (" + ", ".join(STAGE_NAMES) + ") in order, "
                                      "skipping finished ones and resuming interrupted ones; outputs go to "
                                      "RUN_DIR/prep/. Under the deepspeed or torchrun launcher the shards are split "
                                      "across the processes (launch/prep.sh).")
    p.add_argument("--stage", choices=STAGE_NAMES, default=None,
                   help="Run only this stage (its inputs must be complete). Default: all stages.")
    p.set_defaults(func=cmd_prep)

    from profuser.train.__main__ import add_arguments as add_train_arguments, run as run_train

    p = sub.add_parser("train", help="Train the target by progressive fusion on the built training set.",
                       description="Train the target on RUN_DIR/prep/build (or --data) with the config's train "
                                   "section; one process here, or N per node under `deepspeed --module "
                                   "profuser.train` / launch/train.sh. Resumes from the last complete checkpoint.")
    add_train_arguments(p)
    p.set_defaults(func=run_train)  # (--skip-check is among the train arguments)

    from profuser.evaluate import cmd_eval

    p = _launched_command(sub, "eval", help="Held-out CE, scores and win rates of a model; writes results.json.",
                          description="Evaluate a model on data.eval_path: teacher-forced CE and perplexity on the "
                                      "ground truth, greedy responses scored by the run's scorers, win rate against "
                                      "each source's responses, per-skill breakdown; optional lm-eval tasks "
                                      "(eval.lm_eval_tasks, needs the eval extra). Models and model scorers run on the "
                                      "model's device (auto = cuda:LOCAL_RANK, else cpu). Under a launcher "
                                      "(`torchrun --nproc-per-node N -m profuser.cli eval ...` or `deepspeed --module "
                                      "profuser.cli eval ...`) the records are split across the processes and rank 0 "
                                      "writes results.json.")
    p.add_argument("--model", required=True,
                   help="A trained model directory (e.g. RUN_DIR/train/final) or a source/target name from the config.")
    p.add_argument("--out", default=None, help="results.json path (default: RUN_DIR/eval/<model>/results.json).")
    p.add_argument("--no-compare", action="store_true", help="Skip the win rates against the sources.")
    p.set_defaults(func=cmd_eval)

    from profuser.report import cmd_report

    p = sub.add_parser("report", help="PNG figures and a Markdown summary of a run, or of several side by side.",
                       description="One run directory: render its prep statistics, training curves (loss parts per "
                                   "mode, schedule weights, teacher shares) and eval results to RUN_DIR/report/. "
                                   "Several run directories, or a folder of them (a demo's --out): the evaluated "
                                   "models side by side (every scorer and CE, overall and per skill, mean ± sd over "
                                   "the runs, bars with error bars) and the teacher share per mode.")
    p.add_argument("run_dir", nargs="+", help="Run directories (the configs' run_dir), or a folder holding them.")
    p.add_argument("--out", default=None, help="Output directory (default: RUN_DIR/report for one run or folder, "
                                               "./profuser-report for several).")
    p.set_defaults(func=cmd_report)

    from profuser.demo import add_arguments as add_demo_arguments, run_demo

    p = sub.add_parser("demo", help="The whole pipeline on tiny specialist models on a CPU, in minutes.",
                       description="Build three tiny specialist sources and a target, prep, train the presets "
                                   "with 2 CPU ranks under DeepSpeed ZeRO-2, evaluate, and print a table.")
    add_demo_arguments(p)
    p.set_defaults(func=run_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
