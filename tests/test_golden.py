"""Golden losses: a tiny fixed-seed training run of every schedule preset, compared step by step
with the per-step losses stored in tests/golden/<preset>.json.

Guards against library drift: a transformers, torch or accelerate upgrade (or a change of ours) that
changes what training computes fails here, naming the preset and the step. When the change is
intended, regenerate the files and commit them with the reason:

    PROFUSER_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

The runs train in this process on the logits-free fused path, without DeepSpeed; the slow
tests/test_train_e2e.py pins DeepSpeed's two-rank steps to these single-process ones (rel 2e-4).

The training set is cached_training_set: the OLMo-2 target and two teachers that all use the
chatml_bpe tokenizer (every fixture tokenizer is the same in every process:
tests/test_models.py::test_fixture_tokenizers_are_the_same_in_every_process).
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

from profuser.config import parse_config
from profuser.schedule import PRESETS
from profuser.train import train
from train_fixtures import cached_training_set, run_config

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("PROFUSER_UPDATE_GOLDEN") == "1"
REGENERATE = "PROFUSER_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py"
# Relative tolerance per step: 10x under the 1e-2 of a loss scaled by 1.01 (which fails every step,
# test_golden_catches_a_one_percent_change), far over float noise (1 vs 2 torch threads: identical).
RTOL = 1e-3
# 4 optimizer steps of 2 micro-batches x 2 samples (the 8-sample set, 2 epochs); lr high enough that
# the loss moves visibly in 4 steps; stage switch (profuser, reverse) after step 2.
TRAIN = dict(max_steps=4, learning_rate=3e-3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
             warmup_ratio=0.0, lr_scheduler_type="constant", logging_steps=1, save_steps=1000)
EXTRA = {"custom": {"custom_weights": [[0.0, 1.0, 0.0], [0.5, 0.3, 1.0]]}}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The runs are tiny: a second thread only adds contention (10x slower on a loaded 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def golden_run(suite: Path, run_dir: Path, preset: str) -> dict:
    """Train `preset` for TRAIN's steps; returns {"loss": [per-step loss], ...} as stored."""
    train_kw = {**TRAIN, "schedule": preset, **EXTRA.get(preset, {})}
    cfg = parse_config(run_config(suite, run_dir, **train_kw))
    trainer = train(cfg, data=str(cached_training_set(suite)))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"loss": [h["loss"] for h in logs], "w_inf": [h["w_inf"] for h in logs],
            "w_train": [h["w_train"] for h in logs]}


def recorded_with() -> dict:
    import accelerate
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}


def compare(preset: str, stored: dict, got: dict, rtol: float = RTOL) -> list[str]:
    """One line per step whose loss is off by more than rtol (relative), plus any shape mismatch."""
    problems = []
    if len(got["loss"]) != len(stored["loss"]):
        problems.append(f"{len(got['loss'])} logged steps, stored {len(stored['loss'])}")
    for step, (want, have) in enumerate(zip(stored["loss"], got["loss"]), start=1):
        if abs(have - want) > rtol * abs(want):
            problems.append(f"step {step}: loss stored {want:.6f}, got {have:.6f} "
                            f"(relative change {(have - want) / want:+.2e}, tolerance {rtol:.0e})")
    return problems


def check_golden(preset: str, got: dict) -> None:
    path = GOLDEN / f"{preset}.json"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        body = {"preset": preset, "train": {**TRAIN, **EXTRA.get(preset, {})}, **got, "recorded_with": recorded_with()}
        path.write_text(json.dumps(body, indent=1) + "\n")
        return
    assert path.exists(), f"no golden losses for preset {preset!r} at {path}; create them with: {REGENERATE}"
    stored = json.loads(path.read_text())
    problems = compare(preset, stored, got)
    if problems:
        pytest.fail(f"golden losses of preset {preset!r} changed ({path.relative_to(GOLDEN.parent.parent)}, "
                    f"recorded with {stored.get('recorded_with')}, now {recorded_with()}):\n  "
                    + "\n  ".join(problems)
                    + f"\nIf the change is intended (a library upgrade, a fix), regenerate and commit: {REGENERATE}",
                    pytrace=False)


@pytest.mark.parametrize("preset", PRESETS)
def test_golden_losses(preset, tiny_suite, tmp_path):
    check_golden(preset, golden_run(tiny_suite, tmp_path / "run", preset))


def test_golden_catches_a_one_percent_change(tiny_suite, tmp_path, monkeypatch):
    """The trainer's per-mode loss scaled by 1.01 (the loss and its gradient): every step fails."""
    if UPDATE:
        pytest.skip("regenerating the golden files")
    from profuser.losses import LossParts
    from profuser.train.trainer import FusionTrainer

    original = FusionTrainer._mode_loss

    def scaled(self, model, b):
        p = original(self, model, b)
        return LossParts(p.total_sum * 1.01, p.ce_sum, p.kd_sum, p.n_tokens)

    monkeypatch.setattr(FusionTrainer, "_mode_loss", scaled)
    got = golden_run(tiny_suite, tmp_path / "run", "profuser")
    with pytest.raises(pytest.fail.Exception) as failed:
        check_golden("profuser", got)
    message = str(failed.value)
    assert "preset 'profuser'" in message and REGENERATE in message
    for step in range(1, len(got["loss"]) + 1):
        assert f"step {step}: loss stored" in message and "tolerance 1e-03" in message
