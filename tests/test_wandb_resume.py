"""A restarted training whose W&B run id is still held by a W&B service keeps training."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_id_in_use_falls_back_to_a_new_id(tiny_config, tmp_path):
    import wandb

    out = tmp_path / "train"
    out.mkdir()
    (out / "wandb_run_id").write_text("held0001\n")
    holder = wandb.init(project="profuser-tests", id="held0001", mode="offline", dir=str(tmp_path))
    try:
        # a child sharing this process's W&B service, as a launcher started from here would
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SERVICE": os.environ["WANDB_SERVICE"]}
        code = textwrap.dedent(f"""
            import logging, yaml
            from pathlib import Path
            from profuser.config import parse_config
            from profuser.train.run import init_wandb
            logging.basicConfig(level=logging.INFO)
            cfg = parse_config(yaml.safe_load({repr(__import__("yaml").safe_dump(tiny_config))}))
            run = init_wandb(cfg, Path({str(out)!r}), "restarted", wait_s=3)
            print("RUN_ID", run.id)
            run.finish()
        """)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    finally:
        holder.finish()
    assert res.returncode == 0, res.stderr[-3000:]
    new_id = res.stdout.split("RUN_ID", 1)[1].split()[0]
    assert new_id != "held0001" and "still held by a previous process" in res.stderr
    assert (out / "wandb_run_id").read_text().strip() == new_id
