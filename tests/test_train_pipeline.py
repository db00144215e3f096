"""The real data prep (three tokenizer families, cross-tokenizer alignment, build) feeding the trainer
through the contract: RUN_DIR/prep/build/*.parquet, read with no --data override."""
from pathlib import Path

import numpy as np

from conftest import tiny_config_dict
from profuser.config import parse_config
from profuser.prep.run import run_prep
from profuser.tiny import SOURCES
from profuser.train import train
from profuser.train.dataset import FusionDataset


def test_prep_build_output_trains(tiny_suite, tmp_path):
    d = tiny_config_dict(tiny_suite, tmp_path / "run")
    d["wandb"] = {"enabled": False}
    d["train"] = {"max_steps": 4, "learning_rate": 3e-3, "per_device_train_batch_size": 4, "warmup_ratio": 0.0,
                  "lr_scheduler_type": "constant"}
    cfg = parse_config(d)
    assert all(run_prep(cfg).values())

    ds = FusionDataset(Path(cfg.run_dir) / "prep" / "build", cache_dir=tmp_path / "c")
    assert len(ds) == 24 and set(ds.teacher_names) <= set(SOURCES)
    for i in range(len(ds)):
        for mode in ("inference", "training"):
            row = ds[i][mode]
            if row is None:
                continue
            assert row["topk_ids"].shape == (len(row["input_ids"]), cfg.prep.topk)
            assert row["topk_ids"].max() < 512 and row["topk_logprobs"].dtype == np.float16  # target vocabulary

    trainer = train(cfg)  # reads RUN_DIR/prep/build
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [(h["w_inf"], h["w_train"]) for h in logs] == [(1.0, 0.0)] * 2 + [(0.1, 1.0)] * 2
    for h in logs:
        for mode in ("inference",) + (("training",) if h["w_train"] else ()):
            shares = [h[f"teacher_share/{mode}/{s}"] for s in ds.teacher_names]
            assert abs(sum(shares) - 1) < 1e-9 and h[f"{mode}/kd"] > 0
    assert (Path(cfg.run_dir) / "train" / "final" / "model.safetensors").exists()
