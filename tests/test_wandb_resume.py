"""A restarted training whose W&B run id is still held by a W&B service keeps training."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_id_in_use_falls_back_to_a_new_id(tiny_config, tmp_path):
    """A fresh process holds run id held0001 in its W&B service and launches a child that shares the
    service (as a launcher started from it would); the child's init_wandb must not fail."""
    out = tmp_path / "train"
    out.mkdir()
    (out / "wandb_run_id").write_text("held0001\n")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_config))
    child = textwrap.dedent(f"""
        import logging, yaml
        from pathlib import Path
        from profuser.config import parse_config
        from profuser.train.run import init_wandb
        logging.basicConfig(level=logging.INFO)
        cfg = parse_config(yaml.safe_load(Path({str(tmp_path / 'cfg.yaml')!r}).read_text()))
        run = init_wandb(cfg, Path({str(out)!r}), "restarted", wait_s=3)
        print("RUN_ID", run.id)
        run.finish()
    """)
    holder = textwrap.dedent(f"""
        import os, subprocess, sys, wandb
        run = wandb.init(project="profuser-tests", id="held0001", mode="offline", dir={str(tmp_path)!r})
        assert "WANDB_SERVICE" in os.environ
        res = subprocess.run([sys.executable, "-c", {child!r}], capture_output=True, text=True, timeout=180)
        sys.stdout.write(res.stdout)
        sys.stderr.write(res.stderr)
        run.finish()
        sys.exit(res.returncode)
    """)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env["PYTHONPATH"] = str(REPO)
    res = subprocess.run([sys.executable, "-c", holder], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    new_id = res.stdout.split("RUN_ID", 1)[1].split()[0]
    assert new_id != "held0001" and "still held by a previous process" in res.stderr
    assert (out / "wandb_run_id").read_text().strip() == new_id
