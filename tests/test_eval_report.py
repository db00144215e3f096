"""`profuser eval` on a fixture model and `profuser report` on a small real run."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from profuser.config import ModelConfig, parse_config

REPO = Path(__file__).resolve().parents[1]


def _cfg(tiny_config):
    tiny_config["scorers"] = [{"name": "token_f1", "type": "rule", "function": "profuser.rules:token_f1"},
                              {"name": "exact_match", "type": "rule", "function": "profuser.rules:exact_match"}]
    tiny_config["eval"] = {"max_new_tokens": 8, "batch_size": 4}
    return parse_config(tiny_config)


def test_eval_writes_results_with_measured_ce_and_win_rates(tiny_config, tiny_models):
    from profuser.chat import encode_chat
    from profuser.data import normalize
    from profuser.evaluate import evaluate
    from profuser.models import load_chat_model

    cfg = _cfg(tiny_config)
    r = evaluate(cfg, "target")
    out = Path(cfg.run_dir) / "eval" / "target" / "results.json"
    assert Path(r["results_path"]) == out and json.loads(out.read_text())["model"] == "target"
    saved = json.loads(out.read_text())
    assert saved["n_records"] == 6 and set(saved["scores"]) == {"token_f1", "exact_match"}
    assert all(0.0 <= v <= 1.0 for v in saved["scores"].values())
    assert set(saved["win_rate"]) == {"chatml_bpe", "vicuna_spm", "gemma_unigram"}
    assert all(0.0 <= v <= 1.0 for v in saved["win_rate"].values())
    assert math.isclose(saved["perplexity"], math.exp(saved["ce"]), rel_tol=1e-9)
    # CE is the token-weighted mean over the held-out set, recomputed here directly
    cm = load_chat_model(ModelConfig(path=str(tiny_models["target"]), name="target"), device="cpu")
    total, count = 0.0, 0
    for rec in normalize(cfg.data.eval_path).records:
        enc = encode_chat(cm.tokenizer, cm.template, rec["messages"], rec["reference"])
        with torch.no_grad():
            logits = cm.model(torch.tensor([enc.input_ids])).logits[0, :-1].float()
        labels = torch.tensor(enc.labels[1:])
        total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    assert saved["ce"] == pytest.approx(total / count, rel=1e-4)
    # source responses were generated once and cached
    assert len(list((Path(cfg.run_dir) / "eval" / "sources").glob("*.jsonl"))) == 3


def test_eval_of_a_source_by_name_and_bad_model(tiny_config):
    from profuser.config import ConfigError
    from profuser.evaluate import evaluate

    cfg = _cfg(tiny_config)
    r = evaluate(cfg, "vicuna_spm", compare_sources=False)
    assert r["model"] == "vicuna_spm" and r["win_rate"] == {} and r["ce"] > 0
    with pytest.raises(ConfigError, match="neither a path nor a model name"):
        evaluate(cfg, "no-such-model")


def _png_ok(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.exists() and path.stat().st_size > 5000, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and float(np.std(img)) > 0.01, path


@pytest.mark.slow
def test_report_on_a_small_real_run(tiny_suite, tmp_path):
    """prep (real stages) + a 4-step training run + eval, then the report over that run directory."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train_fixtures import cached_training_set, run_config, write_config

    from profuser.config import load_config
    from profuser.evaluate import evaluate
    from profuser.prep.run import run_prep
    from profuser.report import write_report

    run_dir = tmp_path / "run"
    d = run_config(tiny_suite, run_dir, wandb=False, max_steps=4)
    d["data"]["limit"] = 9
    d["prep"]["generate"]["max_new_tokens"] = 8
    path = write_config(tmp_path / "run.yaml", d)
    cfg = load_config(path)
    run_prep(cfg)
    env = {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "PATH": __import__("os").environ["PATH"]}
    res = subprocess.run([sys.executable, "-m", "profuser.train", str(path), "--data",
                          str(cached_training_set(tiny_suite))], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    evaluate(cfg, str(run_dir / "train" / "final"), compare_sources=False)

    out = subprocess.run([sys.executable, "-m", "profuser.cli", "report", str(run_dir)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rep = run_dir / "report"
    md = (rep / "report.md").read_text()
    for section in ("## Data prep", "## Training", "## Evaluation (held-out)", "## Figures", "token_f1"):
        assert section in md, section
    for name in ("loss_parts", "schedule", "teacher_share", "prep_distributions", "win_rate"):
        _png_ok(rep / f"{name}.png")
        assert f"({name}.png)" in md
    assert write_report(run_dir) == rep / "report.md"


def test_report_on_an_empty_dir_fails_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "profuser.cli", "report", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "nothing to report" in out.stderr


def _run_with_results(run: Path, accs: dict, teachers: list) -> Path:
    """A run directory as eval and build leave it: eval/<model>/results.json per model, and a
    training-set shard with each sample's skill (meta) and its teacher per mode."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for model, (a, b) in accs.items():
        res = {"model": model, "path": str(run / model), "n_records": 4, "ce": 2.0 - a, "perplexity": math.exp(2.0 - a),
               "scores": {"exact_match": (a + b) / 2},
               "by_skill": {"alpha": {"n": 2, "ce": 2.0 - a, "scores": {"exact_match": a}},
                            "beta": {"n": 2, "ce": 2.0 - a, "scores": {"exact_match": b}}},
               "win_rate": {}}
        (run / "eval" / model).mkdir(parents=True)
        (run / "eval" / model / "results.json").write_text(json.dumps(res))
    rows = [{"id": f"r{i}", "meta": json.dumps({"skill": skill}), "training_teacher": t, "inference_teacher": u}
            for i, (skill, t, u) in enumerate(teachers)]
    (run / "prep" / "build").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), run / "prep" / "build" / "shard-00000.parquet")
    return run


def test_report_compares_runs_with_error_bars_and_teacher_shares(tmp_path):
    root = tmp_path / "demo"
    teach = [("alpha", "src_a", "src_a"), ("alpha", "src_a", "src_b"), ("beta", "src_b", "src_b"), ("beta", "src_b", None)]
    _run_with_results(root / "seed-0", {"fused": (0.5, 1.0), "plain": (0.5, 0.5), "src_a": (1.0, 0.0)}, teach)
    _run_with_results(root / "seed-1", {"fused": (0.7, 1.0), "plain": (0.5, 0.5)}, teach[:3] + [("beta", "src_a", "src_b")])
    (root / "models").mkdir()  # not a run directory: left out
    out = subprocess.run([sys.executable, "-m", "profuser.cli", "report", str(root)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    md = (root / "report" / "report.md").read_text()
    assert "(2 runs)" in md and "seed-0" in md and "models" not in md.split("## ")[0]
    # exact_match of "fused": overall 0.75 and 0.85 -> 0.800 ± 0.071; per skill alpha 0.5, 0.7 -> 0.600 ± 0.141
    line = next(l for l in md.splitlines() if l.startswith("| fused |") and "0.800" in l)
    assert "0.800 ± 0.071 (n=2)" in line and "0.600 ± 0.141 (n=2)" in line and "1.000 ± 0.000 (n=2)" in line
    assert "| src_a | 0.500 (n=1) |" in md  # evaluated in one run only: no sd
    # teacher shares, mean over the runs: training/beta is src_b in run 0 (2 of 2) and 1 of 2 in run 1
    share = next(l for l in md.splitlines() if l.startswith("| training | beta |"))
    assert "75.0%" in share and "25.0%" in share
    inf = next(l for l in md.splitlines() if l.startswith("| inference | beta |"))
    assert "100.0%" in inf  # a sample without inference mode is not counted
    for name in ("compare_exact_match", "compare_ce", "compare_teacher_share"):
        _png_ok(root / "report" / f"{name}.png")
    cmp = json.loads((root / "report" / "compare.json").read_text())
    assert cmp["models"]["fused"]["overall"]["exact_match"] == [0.75, 0.85]
    # the same runs named one by one, to another folder
    out2 = subprocess.run([sys.executable, "-m", "profuser.cli", "report", str(root / "seed-0"), str(root / "seed-1"),
                           "--out", str(tmp_path / "cmp")], capture_output=True, text=True, timeout=300)
    assert out2.returncode == 0 and (tmp_path / "cmp" / "report.md").read_text() == md
