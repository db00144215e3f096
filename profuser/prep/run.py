"""Orchestration: plan, invalidate what the config no longer matches, run the stages in order.

Every rank runs this same code (`profuser prep`, the data_prep/ scripts, or either under the
deepspeed / torchrun launcher). Rank 0 computes the plan (hashes need file fingerprints) and hands
it to the others, removes stale outputs, and writes each stage's manifest once all ranks are done.

Holds no stage logic: each stage lives in its own module. It never loads a model itself: stages load
theirs through `Context.loader`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from profuser.config import RunConfig, save_resolved
from profuser.prep import STAGE_NAMES
from profuser.prep.dist import Dist, set_cpu_threads
from profuser.prep.stages import Context, PrepError, invalidate_stale, make_plan, run_stage, verify_outputs


def build_stages() -> list:
    from profuser.prep.align_stage import AlignStage
    from profuser.prep.build import BuildStage
    from profuser.prep.generate import GenerateStage
    from profuser.prep.normalize import NormalizeStage
    from profuser.prep.score import ScoreStage
    from profuser.prep.teacher import TeacherStage

    stages = [NormalizeStage(), GenerateStage(), ScoreStage(), TeacherStage(), AlignStage(), BuildStage()]
    assert tuple(s.name for s in stages) == STAGE_NAMES
    return stages


def _load(spec):
    from profuser.models import load_chat_model

    return load_chat_model(spec)


def run_prep(cfg: RunConfig, stages: Optional[Sequence[str]] = None, loader: Optional[Callable] = None) -> dict:
    """Run `stages` (default: all, in order), skipping finished ones. Returns {stage: ran?}.

    `loader(ModelConfig) -> ChatModel` loads a source with weights (default `load_chat_model`; tests
    pass one that reuses an already loaded model)."""
    names = list(stages or STAGE_NAMES)
    bad = [n for n in names if n not in STAGE_NAMES]
    if bad:
        raise PrepError(f"unknown stage(s) {bad}; stages are {', '.join(STAGE_NAMES)}")
    all_stages = build_stages()
    dist = Dist.from_env(cfg.prep.dist_timeout_minutes)
    try:
        set_cpu_threads(dist)
        plan = dist.broadcast(make_plan(cfg, all_stages) if dist.is_main else None)
        ctx = Context(cfg=cfg, dist=dist, plan=plan, loader=loader or _load)
        if dist.is_main:
            invalidate_stale(ctx, all_stages)
            verify_outputs(ctx, all_stages)
        dist.barrier()
        return {st.name: run_stage(ctx, st) for st in all_stages if st.name in names}
    finally:
        dist.close()


def cmd_prep(args) -> int:
    from profuser.check import load_and_preflight

    cfg, code = load_and_preflight(args, "prep")
    if cfg is None:
        return code
    if int(os.environ.get("RANK", "0")) == 0:
        save_resolved(cfg)
    try:
        run_prep(cfg, [args.stage] if args.stage else None)
    except PrepError as e:
        print(f"prep error: {e}", file=sys.stderr)
        return 1
    return 0


def script_main(stage: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of data_prep/<stage>.py: one stage, single process or under a launcher."""
    p = argparse.ArgumentParser(prog=f"data_prep/{stage}.py", description=f"Run the {stage!r} stage of data prep.")
    p.add_argument("config", help="The run's YAML config file.")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="Config overrides.")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--skip-check", action="store_true", help="Start without the preflight (`profuser check`).")
    args = p.parse_intermixed_args(argv)
    args.stage = stage
    return cmd_prep(args)
