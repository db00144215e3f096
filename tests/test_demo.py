"""The demo end to end (reduced sizes): specialists, prep, 2-rank ZeRO-2 training, eval, table."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_and_mince_picks_the_specialists(tmp_path):
    out = tmp_path / "demo"
    shm = set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))
    res = subprocess.run([sys.executable, "-m", "profuser.cli", "demo", "--out", str(out), "--presets", "profuser",
                          "--per-skill", "30", "--eval-per-skill", "4", "--steps", "12", "--pretrain-steps", "200"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Held-out exact-match accuracy and CE" in res.stdout and "Teacher share per mode and skill" in res.stdout
    results = json.loads((out / "results.json").read_text())
    specialists = {"arithmetic": "chatml_bpe", "spelling": "vicuna_spm", "capitals": "gemma_unigram"}
    for skill, source in specialists.items():
        assert results["teacher_share"]["training"][skill][source] >= 0.9, (skill, results["teacher_share"])
        # each specialist is far better than the others on its own skill (the designed premise)
        own = results["eval"][source]["by_skill"][skill]["ce"]
        others = [results["eval"][s]["by_skill"][skill]["ce"] for s in specialists.values() if s != source]
        assert own < min(others) / 3, (skill, own, others)
    trained = results["eval"]["target:profuser"]
    assert trained["n_records"] == 12 and set(trained["win_rate"]) == set(specialists.values())
    assert (out / "run" / "train-profuser" / "final" / "config.json").exists()
    assert (out / "run" / "report" / "report.md").exists()
    assert list((out / "run" / "wandb").glob("offline-run-*"))
    # the demo removes the shared-memory buffers DeepSpeed's CPU backend leaves behind
    assert set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*")) <= shm
