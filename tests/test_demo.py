"""The demo: its results.json schema and numbers (unit), and the demo end to end at reduced sizes
(specialists, prep per seed, 2-rank ZeRO-2 training per seed, eval, table, report)."""
import glob
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from profuser.demo import SKILLS, SPECIALISTS, assemble_results, format_table

REPO = Path(__file__).resolve().parents[1]


def _eval(acc: float, ce: float, per_skill: dict) -> dict:
    """An eval result as `profuser eval` writes it (the fields the demo reads)."""
    return {"scores": {"exact_match": acc}, "ce": ce, "win_rate": {"chatml_bpe": 0.5},
            "by_skill": {sk: {"n": 4, "ce": ce, "scores": {"exact_match": a}} for sk, a in per_skill.items()}}


def check_schema(res: dict, presets: list[str], n_seeds: int) -> None:
    """What results.json promises: per preset and source, per seed the overall and per-skill accuracy
    and CE, mean and sd; teacher shares per mode and skill; goal checks; timings; the device."""
    assert res["schema_version"] == 1
    assert set(res["presets"]) == set(presets) and set(res["sources"]) == set(SPECIALISTS)
    for name, r in [*res["presets"].items(), *res["sources"].items()]:
        n = n_seeds if name in res["presets"] else 1
        assert r["n"] == n and len(r["seeds"]) == n, name
        for run in r["seeds"]:
            assert {"seed", "acc", "ce", "by_skill"} <= set(run)
            assert set(run["by_skill"]) == set(SKILLS) and all({"acc", "ce"} <= set(b) for b in run["by_skill"].values())
        for stat in ("mean", "sd"):
            assert {"acc", "ce", "by_skill"} <= set(r[stat]) and set(r[stat]["by_skill"]) == set(SKILLS)
    for mode in ("training", "inference"):
        assert set(res["teacher_share"]["mean"][mode]) == set(SKILLS)
        assert set(res["teacher_share"]["min_designed"][mode]) == set(SKILLS)
    assert len(res["teacher_share"]["per_seed"]) == n_seeds
    assert {"kind", "cpu_count", "torch"} <= set(res["device"])
    assert "timings" in res and "goal" in res and res["design"]["seeds"] == list(range(n_seeds))


def test_results_json_schema_means_and_sds():
    seeds, presets = [0, 1, 2], ["profuser", "sft"]
    accs = {"profuser": [0.5, 0.6, 0.7], "sft": [0.4, 0.4, 0.5]}
    targets = {(p, s): _eval(accs[p][s], 1.0 + s, {"arithmetic": accs[p][s], "spelling": 0.2, "capitals": 0.9})
               for p in presets for s in seeds}
    sources = {n: _eval(0.33, 5.0, {sk: float(SPECIALISTS[n] == sk) for sk in SKILLS}) for n in SPECIALISTS}
    share = {m: {sk: {n: float(SPECIALISTS[n] == sk) for n in SPECIALISTS} for sk in SKILLS}
             for m in ("training", "inference")}
    shares = {0: share, 1: share, 2: json.loads(json.dumps(share))}
    shares[2]["inference"]["spelling"] = {"chatml_bpe": 0.25, "vicuna_spm": 0.75, "gemma_unigram": 0.0}
    design = {"seeds": seeds, "presets": presets, "held_out_per_skill": 4, "fusion_examples_per_skill": 2,
              "pretrain_examples_per_skill": 9}
    res = assemble_results(design, sources, targets, shares)
    check_schema(res, presets, 3)
    p = res["presets"]["profuser"]
    assert p["mean"]["acc"] == pytest.approx(0.6) and p["sd"]["acc"] == pytest.approx(statistics.stdev([0.5, 0.6, 0.7]))
    assert p["mean"]["ce"] == pytest.approx(2.0) and p["sd"]["by_skill"]["spelling"]["acc"] == pytest.approx(0.0, abs=1e-12)
    assert res["sources"]["chatml_bpe"]["sd"]["acc"] == 0.0  # one evaluation
    assert res["teacher_share"]["min_designed"]["inference"]["spelling"] == 0.75
    assert res["teacher_share"]["mean"]["inference"]["spelling"]["vicuna_spm"] == pytest.approx((1 + 1 + 0.75) / 3)
    g = res["goal"]
    assert g["profuser_vs_sft"]["difference"] == pytest.approx(0.6 - 0.4333333)
    assert g["profuser_vs_sft"]["met"] is True  # 0.167 > max(0.1, 0.058)
    assert g["profuser_vs_best_source"]["arithmetic"]["met"] is False  # 0.6 < chatml_bpe's 1.0
    assert g["profuser_vs_best_source"]["capitals"]["best_source"] == "gemma_unigram"
    table = format_table(res)
    assert "0.60 ± 0.10" in table and "target:sft" in table and "NOT met" not in table.split("Goal 2")[0]
    json.dumps(res)  # serializable as is


@pytest.mark.slow
def test_demo_runs_with_seeds_and_mince_picks_the_specialists(tmp_path):
    out = tmp_path / "demo"
    shm = set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))
    res = subprocess.run([sys.executable, "-m", "profuser.cli", "demo", "--out", str(out), "--seeds", "2",
                          "--presets", "profuser", "--per-skill", "8", "--eval-per-skill", "3", "--steps", "6",
                          "--pretrain-examples", "200", "--pretrain-steps", "200"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "mean ± sd over seeds" in res.stdout and "Teacher share per mode and skill" in res.stdout
    results = json.loads((out / "results.json").read_text())
    check_schema(results, ["profuser"], 2)
    assert (out / "table.txt").read_text().strip() in res.stdout
    specialists = {sk: src for src, sk in SPECIALISTS.items()}
    for skill, source in specialists.items():
        assert results["teacher_share"]["min_designed"]["training"][skill] >= 0.9, (skill, results["teacher_share"])
        # each specialist is far better than the others on its own skill (the designed premise)
        own = results["sources"][source]["mean"]["by_skill"][skill]["ce"]
        others = [results["sources"][s]["mean"]["by_skill"][skill]["ce"] for s in specialists.values() if s != source]
        assert own < min(others) / 3, (skill, own, others)
    for seed in (0, 1):
        run = out / f"seed-{seed}"
        assert (run / "train-profuser" / "final" / "config.json").exists()
        trained = json.loads((run / "eval" / "train-profuser" / "results.json").read_text())
        assert trained["n_records"] == 9 and set(trained["win_rate"]) == set(SPECIALISTS)
        assert (run / "report" / "report.md").exists() and list((run / "wandb").glob("offline-run-*"))
    # the seeds differ where they should: fusion sets and target initializations
    assert (out / "data" / "fusion-s0.jsonl").read_text() != (out / "data" / "fusion-s1.jsonl").read_text()
    assert len(results["presets"]["profuser"]["seeds"]) == 2
    md = (out / "report" / "report.md").read_text()
    assert "train-profuser" in md and "(n=2)" in md and "Teacher share per mode" in md
    assert (out / "report" / "compare_exact_match.png").exists()
    # the demo removes the shared-memory buffers DeepSpeed's CPU backend leaves behind
    assert set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*")) <= shm
