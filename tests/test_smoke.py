"""The smoke path a user takes, through the real commands: config -> `profuser check` -> `profuser prep`
-> a 2-step, 2-rank ZeRO-2 training under the real deepspeed launcher -> the final model loads with
`from_pretrained`. launch/floor.sh runs this file against the lowest versions setup.py admits."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config_dict
from profuser.prep.dist import free_port, remove_shm_buffers

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _run(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=timeout)
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def test_check_prep_train_load(tiny_suite, tmp_path):
    d = tiny_config_dict(tiny_suite, tmp_path / "run")
    d["wandb"] = {"enabled": False}
    d["data"]["limit"] = 8
    d["prep"]["lookahead"] = {"enabled": True}  # its KV-cache beam runs at the floor versions too (launch/floor.sh)
    d["train"] = {"max_steps": 2, "learning_rate": 1e-3, "per_device_train_batch_size": 2, "warmup_ratio": 0.0,
                  "lr_scheduler_type": "constant", "deepspeed": "deepspeed_configs/zero2.json"}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(d))
    py = sys.executable
    out = _run([py, "-m", "profuser.cli", "check", str(cfg)])
    assert "READY" in out.stdout
    out = _run([py, "-m", "profuser.cli", "prep", str(cfg)])
    assert "build: 8 training samples" in out.stdout
    assert "gemma_unigram: word lookahead at " in out.stdout and "; word lookahead at " in out.stdout
    port = free_port()
    try:
        _run([py, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
              "--module", "profuser.train", str(cfg)], timeout=900)  # a fresh venv JIT-builds DeepSpeed's CPU op first
    finally:
        remove_shm_buffers(port)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = tmp_path / "run" / "train" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size >= len(tok) and tok.chat_template
