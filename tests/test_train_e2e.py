"""End to end under the real `deepspeed` launcher with 2 CPU ranks (DS_ACCELERATOR=cpu), ZeRO-2 and
ZeRO-3: the loss decreases, every step equals the same step trained in one process (the loss is
normalized over the whole accumulated global batch), the saved model loads and generates, and the
offline W&B run holds the metrics and the run config. Plus exact resume after a SIGKILL, with two
DeepSpeed ranks and in one process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from profuser.config import parse_config
from profuser.train import train
from profuser.prep.dist import free_port
from train_fixtures import cached_training_set, read_wandb_offline, run_config, tied_target, write_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STEPS = 20


def ds_env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def launch(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=ds_env(), timeout=timeout)


def deepspeed_cmd(*user_args: str) -> list[str]:
    exe = shutil.which("deepspeed")
    launcher = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*launcher, "--num_gpus", "2", "--master_port", str(free_port()), *user_args]


def step_logs(run_dir: Path) -> list[dict]:
    """One record per optimizer step from metrics.jsonl (a resumed run's later record wins)."""
    rows = {}
    for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "w_inf" in r:
            rows[r["step"]] = r
    return [rows[k] for k in sorted(rows)]


def single_process_losses(suite, data, tmp: Path, target: Path | None = None, **train_kw) -> list[float]:
    d = run_config(suite, tmp, **train_kw)
    if target is not None:
        d["target"]["path"] = str(target)
    trainer = train(parse_config(d), data=str(data))
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def loss_paths(out: subprocess.CompletedProcess) -> list[str]:
    return [line.split("loss path: ", 1)[1] for line in (out.stdout + out.stderr).splitlines() if "loss path: " in line]


def check_final_model_generates(run_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run_dir / "train" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert model.generation_config.eos_token_id in (tok.convert_tokens_to_ids("<|im_end|>"),
                                                    [tok.convert_tokens_to_ids("<|im_end|>")])


WANDB_KEYS = ("train/loss", "train/grad_norm", "train/learning_rate", "train/tokens_per_second", "train/w_inf",
              "train/w_train", "train/inference/ce", "train/inference/kd", "train/training/ce", "train/training/kd",
              "train/teacher_share/inference/chatml_bpe", "train/teacher_share/inference/chatml_bpe_b",
              "train/teacher_share/training/chatml_bpe", "train/teacher_share/training/chatml_bpe_b")


def check_wandb(run_dir: Path, logs: list[dict], deepspeed_config: str):
    config, history = read_wandb_offline(run_dir)
    assert config["run_config"]["train"]["deepspeed"] == deepspeed_config  # the whole run config
    assert config["loss_path"].startswith("fused-linear (Olmo2ForCausalLM")
    assert config["run_config"]["target"]["name"] == "target" and len(config["run_config"]["sources"]) == 3
    steps = [h for h in history if "train/loss" in h]
    assert len(steps) == len(logs)
    for key in WANDB_KEYS:
        assert any(key in h for h in steps), key
    assert [h["train/loss"] for h in steps] == pytest.approx([r["loss"] for r in logs], rel=1e-9)


@pytest.fixture(scope="module")
def zero2_run(tiny_suite, tmp_path_factory):
    """profuser preset over 20 steps, ZeRO-2, 2 ranks x 2 samples x 2 micro-batches (the whole set per step),
    a checkpoint at step 10."""
    data = cached_training_set(tiny_suite)
    tmp = tmp_path_factory.mktemp("zero2")
    cfg = write_config(tmp / "run.yaml", run_config(tiny_suite, tmp / "run", wandb=True, max_steps=STEPS,
                                                     save_steps=STEPS // 2, deepspeed="deepspeed_configs/zero2.json"))
    out = launch(deepspeed_cmd("--module", "profuser.train", str(cfg), "--data", str(data)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return tmp, cfg, data, out


def test_zero2_two_ranks(zero2_run, tiny_suite):
    tmp, cfg, data, out = zero2_run
    run = tmp / "run"
    logs = step_logs(run)
    assert [r["step"] for r in logs] == list(range(1, STEPS + 1))
    assert loss_paths(out) == ["fused-linear (Olmo2ForCausalLM: logits = lm_head(h), untied 512 x 64 projection)"]
    assert all(r["fused_loss"] == 1.0 for r in logs)
    # the schedule: stage 1 inference only, stage 2 both modes (each mode's backward before the next forward)
    assert [(r["w_inf"], r["w_train"]) for r in logs] == [(1.0, 0.0)] * 10 + [(0.1, 1.0)] * 10
    assert all("training/ce" not in r for r in logs[:10]) and all("training/ce" in r for r in logs[10:])
    # learning: the loss falls in each stage, and over the run
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert logs[9]["inference/ce"] < 0.8 * logs[0]["inference/ce"]
    assert logs[-1]["training/ce"] < 0.8 * logs[10]["training/ce"]
    assert logs[0]["inference/samples"] == 7 and logs[10]["training/samples"] == 8  # all 8 samples per step
    # the same steps in one process (4 samples x 2 micro-batches): equal per-step losses
    ref = single_process_losses(tiny_suite, data, tmp / "ref", max_steps=STEPS, per_device_train_batch_size=4)
    assert [r["loss"] for r in logs] == pytest.approx(ref, rel=2e-4)
    assert [r["loss"] for r in logs[:5]] == pytest.approx(ref[:5], rel=1e-5)
    check_final_model_generates(run)
    check_wandb(run, logs, "deepspeed_configs/zero2.json")


def test_zero3_two_ranks_via_train_sh(tiny_suite, tmp_path):
    """ZeRO-3 through launch/train.sh, with the fused-linear loss on a target whose output projection is
    tied to the input embedding (a partitioned parameter used by two modules); half the samples lack
    the inference mode and each rank takes one sample per micro-batch, so a rank often has no sample
    of a mode the other trains: it forwards a placeholder (ZeRO-3 gathers parameters collectively in
    every forward; unequal counts would hang). Every step and the final weights equal one process
    training on the logits path."""
    data = cached_training_set(tiny_suite, no_inference=(1, 3, 5, 7))
    target = tied_target(tiny_suite)
    run = run_config(tiny_suite, tmp_path / "run", wandb=True, max_steps=STEPS, schedule="simul",
                     per_device_train_batch_size=1, deepspeed="deepspeed_configs/zero3.json")
    run["target"]["path"] = str(target)
    cfg = write_config(tmp_path / "run.yaml", run)
    env_cmd = ["env", "NUM_GPUS=2", f"MASTER_PORT={free_port()}", "bash", "launch/train.sh", str(cfg), "--data",
               str(data)]
    out = launch(env_cmd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    placeholders = [int(line.rsplit("of which ", 1)[1].split()[0])
                    for line in (out.stdout + out.stderr).splitlines() if "placeholders" in line]
    assert len(placeholders) == 2 and sum(placeholders) > 0, placeholders
    assert loss_paths(out) == ["fused-linear (Olmo2ForCausalLM: logits = lm_head(h), tied 512 x 64 projection)"]
    run = tmp_path / "run"
    logs = step_logs(run)
    assert len(logs) == STEPS and all(r["w_inf"] == r["w_train"] == 1.0 and r["fused_loss"] == 1.0 for r in logs)
    first, last = logs[0], logs[-1]
    assert last["loss"] < 0.8 * first["loss"]
    assert last["inference/ce"] < first["inference/ce"] and last["training/ce"] < first["training/ce"]
    ref = single_process_losses(tiny_suite, data, tmp_path / "ref", target=target, max_steps=STEPS, schedule="simul",
                                per_device_train_batch_size=2, fused_loss="off")
    assert [r["loss"] for r in logs] == pytest.approx(ref, rel=2e-4)
    weights, ref_weights = (load_file(p / "train" / "final" / "model.safetensors") for p in (run, tmp_path / "ref"))
    assert weights.keys() == ref_weights.keys()
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-4, msg=lambda m: f"{k}: {m}")
    check_final_model_generates(run)
    check_wandb(run, logs, "deepspeed_configs/zero3.json")


def _assert_same_run(a: Path, b: Path):
    la, lb = step_logs(a), step_logs(b)
    assert [r["step"] for r in lb] == [r["step"] for r in la]
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=0, abs=1e-6), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=0, abs=1e-6), ra["step"]
    wa, wb = (load_file(p / "train" / "final" / "model.safetensors") for p in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


def test_zero2_resume_after_kill_is_exact(zero2_run):
    """Kill both ranks (SIGKILL) right after checkpoint-10, start the same command again: steps 11-20
    and the final weights equal the uninterrupted run's."""
    tmp, cfg, data, _ = zero2_run
    run = tmp / "killed"
    over = [f"run_dir={run}"]
    out = launch(deepspeed_cmd("tests/train_fixtures.py", "kill-after", str(STEPS // 2), str(cfg), "--data", str(data),
                               *over))
    assert out.returncode != 0 and not (run / "train" / "final").exists()
    assert (run / "train" / f"checkpoint-{STEPS // 2}" / ".complete").exists()
    out = launch(deepspeed_cmd("--module", "profuser.train", str(cfg), "--data", str(data), *over))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert f"resuming from {run / 'train' / f'checkpoint-{STEPS // 2}'}" in out.stdout + out.stderr
    _assert_same_run(tmp / "run", run)


def test_single_process_resume_after_kill_is_exact(tiny_suite, tmp_path):
    """One process: 6 steps straight vs killed after checkpoint-3 (mid-epoch, before the schedule's
    switch at step 4) and resumed."""
    data = cached_training_set(tiny_suite)
    cfg = write_config(tmp_path / "run.yaml", run_config(tiny_suite, tmp_path / "a", max_steps=6, save_steps=3,
                                                          switch_fraction=0.67))
    base = [sys.executable, "-m", "profuser.train", str(cfg), "--data", str(data)]
    assert launch(base).returncode == 0
    over = [f"run_dir={tmp_path / 'b'}"]
    out = launch([sys.executable, "tests/train_fixtures.py", "kill-after", "3", str(cfg), "--data", str(data), *over])
    assert out.returncode == -9 and (tmp_path / "b" / "train" / "checkpoint-3" / ".complete").exists()
    out = launch(base + over)
    assert out.returncode == 0, out.stderr[-3000:]
    logs = step_logs(tmp_path / "a")
    assert [(r["w_inf"], r["w_train"]) for r in logs] == [(1.0, 0.0)] * 5 + [(0.1, 1.0)]
    _assert_same_run(tmp_path / "a", tmp_path / "b")
