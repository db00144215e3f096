"""Data prep end to end on the tiny fixtures (three tokenizer families), and on SmolLM2-135M.

The baseline run (module fixture) is one process; the deepspeed test repeats it with two ranks and
compares. Everything runs the real models, launcher and W&B (offline) — nothing is mocked.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from profuser.prep.dist import free_port
import torch
import yaml

from conftest import tiny_config_dict
from prep_fixtures import (assert_same_prep, cached_fine_tune, manifest, mute_model, poison_token, rejects,
                           rows_by_key, tiny_reward_model, wandb_history, wandb_table)
from profuser.chat import encode_chat
from profuser.config import ModelConfig, parse_config
from profuser.prep.read import load_part, load_teacher, part_table
from profuser.prep.run import run_prep
from profuser.prep.score import default_similarity_model

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("chatml_bpe", "vicuna_spm", "gemma_unigram")
TEACHER_PREP = ("normalize", "generate", "score", "teacher")  # the stages tested here (align, build follow)
ALL = (*TEACHER_PREP, "align", "build")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


def _write_yaml(d: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture(scope="module")
def base_dict(tiny_suite, tmp_path_factory) -> dict:
    d = tiny_config_dict(tiny_suite, tmp_path_factory.mktemp("prep") / "base")
    d["wandb"] = {"mode": "offline", "project": "prep-test"}
    return d


@pytest.fixture(scope="module")
def baseline(base_dict) -> Path:
    """All six stages (the teacher choice and the statistics are made by align), single process,
    W&B offline."""
    run_prep(parse_config(base_dict))
    return Path(base_dict["run_dir"])


# --------------------------------------------------------------------------------------------


def test_outputs_follow_contract_and_counts_add_up(baseline, base_dict):
    k = base_dict["prep"]["topk"]
    norm = manifest(baseline, "normalize")
    assert norm["status"] == "complete" and norm["counts"]["rows"] == 24
    assert norm["counts"]["out"] + norm["counts"]["rejected"] == norm["counts"]["rows"]
    n = norm["counts"]["out"]
    gen = manifest(baseline, "generate")
    for src in SOURCES:
        c = gen["parts"][src]["counts"]
        assert c["in"] == n and c["out"] + c["rejected"] == n
    rows = part_table(baseline, "generate", "chatml_bpe").to_pylist()
    assert all(r["finish_reason"] in ("stop", "length") and 0 < r["n_tokens"] <= 16 for r in rows)
    score = manifest(baseline, "score")["counts"]
    assert score["in"] == n and score["out"] + score["rejected"] == n

    teach = manifest(baseline, "teacher")
    won = [r["winner"] for r in part_table(baseline, "score", "scores").to_pylist()]
    assert len(won) == n and None not in won
    for src in SOURCES:
        assert teach["parts"][f"training/{src}"]["counts"]["in"] == n
        assert teach["parts"][f"inference/{src}"]["counts"]["in"] == won.count(src)
    for name in ("manifest.json", "rejects.jsonl"):
        for stage in ("normalize", "generate", "score", "teacher"):
            assert (baseline / "prep" / stage / name).exists()
    assert set(teach["versions"]) >= {"torch", "transformers", "pyarrow"}

    # contract types and shapes, read through `datasets` (Arrow cache, memory-mapped)
    ds = load_teacher(baseline, "training")
    assert len(ds) == 3 * n
    f = ds.features
    assert f["topk_ids"].feature.feature.dtype == "int32" and f["topk_logprobs"].feature.feature.dtype == "float16"
    schema = pq.read_schema(baseline / "prep/teacher/training/chatml_bpe/shard-00000.parquet")
    assert str(schema.field("topk_logprobs").type) == "list<element: list<element: halffloat>>"
    for r in ds.select(range(6)):
        ids, lps = np.array(r["topk_ids"]), np.array(r["topk_logprobs"], np.float32)
        assert ids.shape == lps.shape == (r["n_tokens"], k) == (len(r["token_ids"]), k)
        assert (lps <= 0).all() and (np.diff(lps, axis=1) <= 0).all() and (np.exp(lps).sum(1) < 1.0001).all()
        assert np.isfinite(r["ce"]) and r["mode"] == "training"
        tlp = np.array(r["token_logprobs"], np.float64)
        assert tlp.shape == (r["n_tokens"],) and (tlp <= 0).all()
        assert abs(-tlp.mean() - r["ce"]) < 1e-2 * max(1.0, r["ce"])  # float16 storage of the same numbers
        # the response text without the template's end of turn: fewer tokens, same bytes as the text
        assert 0 < r["text_tokens"] < r["n_tokens"] and r["text_bytes"] == len(r["response"].encode())
        assert 0 < r["text_nll"] < r["ce"] * r["n_tokens"]
    inf = load_teacher(baseline, "inference")
    assert len(inf) == n and set(inf["mode"]) == {"inference"}
    gen_rows = {(s, r["id"]): r["response"] for s in SOURCES for r in load_part(baseline, "generate", s)}
    assert all(r["response"] == gen_rows[(r["source"], r["id"])] for r in inf)
    # MinCE (bits per byte of the response text, the default) picks the training teacher in align
    bpb = {(r["source"], r["id"]): r["text_nll"] / (np.log(2) * r["text_bytes"]) for r in ds}
    for r in part_table(baseline, "align", "training").to_pylist():
        assert r["rank"] == 0 and r["teacher_score"] == pytest.approx(min(bpb[(s, r["id"])] for s in SOURCES))
        assert r["bpb"] == pytest.approx(bpb[(r["source"], r["id"])])


def test_teacher_matches_direct_full_vocab(baseline, tiny_models, base_dict):
    """Stored CE and top-k equal a plain full-vocabulary forward of the model, one sequence at a time."""
    from transformers import AutoModelForCausalLM

    from profuser.models import load_chat_tokenizer

    k = base_dict["prep"]["topk"]
    records = {r["id"]: r for r in part_table(baseline, "normalize", "records").to_pylist()}
    src = "vicuna_spm"
    cm = load_chat_tokenizer(ModelConfig(path=str(tiny_models[src]), name=src))
    model = AutoModelForCausalLM.from_pretrained(tiny_models[src], dtype=torch.float32).eval()
    rows = part_table(baseline, "teacher", f"training/{src}").to_pylist()
    inf_rows = part_table(baseline, "teacher", f"inference/{src}").to_pylist()
    for row in rows + inf_rows:
        rec = records[row["id"]]
        enc = encode_chat(cm.tokenizer, cm.template, rec["messages"], row["response"], 256)
        with torch.no_grad():
            logp = model(torch.tensor([enc.input_ids])).logits[0].double().log_softmax(-1)
        p = enc.prompt_len
        target = torch.tensor(enc.input_ids[p:])
        pred = logp[p - 1:-1]
        assert row["token_ids"] == enc.input_ids[p:]
        nll = -pred.gather(1, target[:, None]).squeeze(1)
        assert abs(nll.mean().item() - row["ce"]) < 1e-4
        np.testing.assert_allclose(np.array(row["token_logprobs"], np.float32), -nll.numpy(), rtol=2e-3, atol=2e-3)
        # text_nll: the tokens overlapping the response's own characters — not the closing `</s>`, nor a
        # lone `▁` holding only the space the template writes after "ASSISTANT:"
        offs = cm.tokenizer(enc.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][p:]
        c0 = enc.text.index(row["response"], len(enc.text) - len(row["response"]) - len("</s>") - 1)
        text = torch.tensor([s < c0 + len(row["response"]) and e > c0 for s, e in offs])
        assert row["token_ids"][-1] == cm.tokenizer.eos_token_id and not text[-1]
        assert row["text_tokens"] == int(text.sum()) >= len(row["token_ids"]) - 2
        assert abs(nll[text].sum().item() - row["text_nll"]) < 1e-3
        top = pred.topk(k)
        assert top.indices.tolist() == row["topk_ids"]
        np.testing.assert_allclose(np.array(row["topk_logprobs"], np.float32), top.values.numpy(), rtol=2e-3, atol=2e-3)


def test_wandb_offline_run_has_distributions_and_win_rates(baseline):
    hist = wandb_history(baseline, run_name=f"{baseline.name}-prep")
    for src in SOURCES:
        assert hist[f"prep/ce/training/{src}/_type"] == "histogram"
        assert sum(hist[f"prep/ce/training/{src}/values"]) == 24
        assert hist[f"prep/score/token_f1/{src}/_type"] == "histogram"
        assert hist[f"prep/bpb/training/{src}/_type"] == "histogram"
    table = wandb_table(baseline, "prep/win_rate", run_name=f"{baseline.name}-prep")
    assert table["columns"] == ["mode", "source", "teaches", "share", "first_choice", "first_choice_share"]
    for mode in ("training", "inference"):
        rows = [r for r in table["data"] if r[0] == mode]
        assert sorted(r[1] for r in rows) == sorted(SOURCES)
        assert sum(r[2] for r in rows) == 24 and abs(sum(r[3] for r in rows) - 1) < 1e-9
        assert sum(r[4] for r in rows) == 24
    stats = json.loads((baseline / "prep" / "stats.json").read_text())
    assert stats["ce"]["training"]["gemma_unigram"]["n"] == 24 and stats["bpb"]["training"]["gemma_unigram"]["n"] == 24
    assert stats["mince"] == "byte"
    assert stats["win_rate"] == {m: {r[1]: {"wins": r[2], "share": r[3], "first_choice": r[4],
                                            "first_choice_share": r[5]} for r in table["data"] if r[0] == m}
                                 for m in ("training", "inference")}


def _mtimes(root: Path, pattern: str) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(root.glob(pattern))}


def test_rerun_skips_and_a_config_change_invalidates_downstream(baseline, base_dict, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(baseline, run, ignore=shutil.ignore_patterns("wandb"))
    d = {**base_dict, "run_dir": str(run), "wandb": {"enabled": False}}
    assert run_prep(parse_config(d), TEACHER_PREP) == dict.fromkeys(TEACHER_PREP, False)
    assert capfd.readouterr().out.count("already complete for this config") == 4

    teacher_train = _mtimes(run / "prep/teacher", "training/*/shard-*")
    norm = _mtimes(run / "prep/normalize", "records/shard-*")
    ran = run_prep(parse_config(d, ["prep.generate.max_new_tokens=4"]), TEACHER_PREP)
    out = capfd.readouterr().out
    assert ran == {"normalize": False, "generate": True, "score": True, "teacher": True}
    for part in [*(f"generate/{s}" for s in SOURCES), "score/scores", *(f"teacher/inference/{s}" for s in SOURCES),
                 "align/inference", "build/"]:
        assert f"{part}: INVALIDATED" in out, part
    assert "generate.max_new_tokens: 16 -> 4" in out and "upstream generate/chatml_bpe changed" in out
    for src in ("vicuna_spm", "gemma_unigram"):  # prep.lookahead is off: the sources it would help are named
        assert f"teacher: {src}: word lookahead off (prep.lookahead.enabled is false); its tokenizer is not" in out
    assert "chatml_bpe: word lookahead" not in out  # the target's own tokenizer
    assert not [line for line in out.splitlines() if "INVALIDATED" in line and "training" in line]  # MinCE rows
    assert _mtimes(run / "prep/teacher", "training/*/shard-*") == teacher_train
    assert _mtimes(run / "prep/normalize", "records/shard-*") == norm
    assert all(r["n_tokens"] <= 4 for r in part_table(run, "generate", "vicuna_spm").to_pylist())
    assert manifest(run, "teacher")["status"] == "complete"

    generated = _mtimes(run / "prep/generate", "*/shard-*")
    run_prep(parse_config(d, ["prep.generate.max_new_tokens=4", "prep.topk=3"]), TEACHER_PREP)
    out = capfd.readouterr().out
    invalidated = [line.split(": INVALIDATED")[0].split("] ")[-1] for line in out.splitlines() if "INVALIDATED" in line]
    assert sorted(invalidated) == sorted(["align/training", *(f"teacher/{m}/{s}" for m in ("training", "inference")
                                                               for s in SOURCES)]) and "topk: 5 -> 3" in out
    assert _mtimes(run / "prep/generate", "*/shard-*") == generated
    assert len(part_table(run, "teacher", "training/gemma_unigram").to_pylist()[0]["topk_ids"][0]) == 3


def test_word_lookahead_through_the_teacher_and_align_stages(baseline, base_dict, tmp_path, capfd):
    """prep.lookahead: the teacher stage reruns and stores word outcomes for the sources whose
    tokenizer is not the target's (null for chatml_bpe, the target's own); align teaches words from
    them and keeps the baseline's rows everywhere else; both stages report it."""
    run = tmp_path / "run"
    shutil.copytree(baseline, run, ignore=shutil.ignore_patterns("wandb"))
    d = {**base_dict, "run_dir": str(run), "wandb": {"enabled": False}}
    ran = run_prep(parse_config(d, ["prep.lookahead.enabled=true"]), ALL)
    out = capfd.readouterr().out
    assert ran == {"normalize": False, "generate": False, "score": False, "teacher": True, "align": True, "build": True}
    assert "chatml_bpe: word lookahead off (same tokenizer as the target)" in out
    assert "vicuna_spm: word lookahead on" in out and "gemma_unigram: word lookahead on" in out
    assert "teacher: gemma_unigram: word lookahead at " in out and "; word lookahead at " in out
    # Mistral's sliding window is masked in the tree: every sequence is a token tree
    assert "vicuna_spm: word lookahead on (sliding window 4096, masked in the token tree)\n" in out
    assert "gemma_unigram: word lookahead on\n" in out and "prefilled every word start's context" not in out
    cost = manifest(run, "teacher")["lookahead"]
    assert cost.keys() == {"vicuna_spm", "gemma_unigram"}
    assert all(c["tree_sequences"] == c["sequences"] > 0 for c in cost.values()), cost
    for src in SOURCES:
        rows = part_table(run, "teacher", f"training/{src}").to_pylist()
        texts = [r["lookahead_texts"] for r in rows]
        if src == "chatml_bpe":
            assert all(t is None for t in texts)
            continue
        assert all(t is not None for t in texts) and sum(len(t) for t in texts) > 10 * len(rows)
        for r in rows:
            assert len(r["lookahead_rows"]) == len(r["lookahead_texts"]) == len(r["lookahead_logprobs"])
            assert all(0 <= i < r["n_tokens"] and v <= 1e-6 for i, v in zip(r["lookahead_rows"], r["lookahead_logprobs"]))
    taught = 0
    for mode in ("training", "inference"):
        old = rows_by_key(baseline, "align", mode)
        for key, r in rows_by_key(run, "align", mode).items():
            o = old[key]
            assert (r["source"], r["input_ids"]) == (o["source"], o["input_ids"])
            if r["source"] == "chatml_bpe":
                assert r["n_lookahead"] == 0 and r["topk_ids"] == o["topk_ids"]
                continue
            changed = sum(a != b or x != y for a, b, x, y in zip(r["topk_ids"], o["topk_ids"], r["topk_logprobs"],
                                                                   o["topk_logprobs"]))
            assert changed <= r["n_lookahead"] and r["n_transferred"] >= o["n_transferred"]
            taught += r["n_lookahead"]
    assert taught > 100
    pairs = manifest(run, "align")["pairs"]
    assert pairs["gemma_unigram->target"]["all"]["lookahead_share"] > 0.2
    assert pairs["chatml_bpe->target"]["all"]["lookahead"] == 0


@pytest.mark.slow
def test_two_deepspeed_cpu_ranks_give_the_single_process_output(baseline, base_dict, tmp_path):
    """normalize through its data_prep script, then the rest through launch/prep.sh — both under the
    real deepspeed launcher with two CPU processes."""
    d = {**base_dict, "run_dir": str(tmp_path / "ds"), "wandb": {"enabled": False}}
    cfg = _write_yaml(d, tmp_path / "cfg.yaml")
    port, port2 = free_port(), free_port()
    r1 = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), "data_prep/normalize.py",
                         str(cfg)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    r2 = subprocess.run(["bash", "launch/prep.sh", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=400,
                        env={**_env(), "NPROC": "2", "MASTER_PORT": str(port2)})
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    log = r2.stdout + r2.stderr
    assert "dist_world_size=2" in log and "[rank 1/2]" in log
    for stage in ("normalize", "generate", "score", "teacher"):
        assert manifest(tmp_path / "ds", stage)["world_size"] == 2
    assert_same_prep(baseline, tmp_path / "ds")


@pytest.mark.slow
def test_sigkill_mid_stage_resumes_to_the_uninterrupted_output(tiny_suite, tmp_path):
    def cfg_dict(run_dir):
        d = tiny_config_dict(tiny_suite, run_dir)
        d["sources"] = d["sources"][:1]
        d["prep"].update(shard_size=2, generate={"max_new_tokens": 24, "batch_size": 2})
        d["wandb"] = {"enabled": False}
        return d

    killed, clean = tmp_path / "killed", tmp_path / "clean"
    run_prep(parse_config(cfg_dict(clean)), ["normalize", "generate"])
    run_prep(parse_config(cfg_dict(killed)), ["normalize"])
    cfg = _write_yaml(cfg_dict(killed), tmp_path / "killed.yaml")
    part = killed / "prep/generate/chatml_bpe"
    proc = subprocess.Popen([sys.executable, "data_prep/generate.py", str(cfg)], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(part.glob("shard-*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = _mtimes(part, "shard-*")
    n_done = len(list(part.glob("shard-*.json")))
    assert 1 <= n_done < 12, n_done
    assert manifest(killed, "generate")["status"] == "running"

    rerun = subprocess.run([sys.executable, "data_prep/generate.py", str(cfg)], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"generate/chatml_bpe: {n_done} of 12 shards already done; skipping them" in rerun.stdout
    assert {p: m for p, m in _mtimes(part, "shard-*").items() if p in done} == done  # not rewritten
    assert not list(part.glob("*.tmp*"))
    assert manifest(killed, "generate")["status"] == "complete"
    assert rows_by_key(killed, "generate", "chatml_bpe") == rows_by_key(clean, "generate", "chatml_bpe")
    pk, pc = manifest(killed, "generate")["parts"]["chatml_bpe"], manifest(clean, "generate")["parts"]["chatml_bpe"]
    assert (pk["hash"], pk["counts"], pk["shards"]) == (pc["hash"], pc["counts"], pc["shards"])


@pytest.fixture(scope="module")
def tuned(tiny_suite) -> Path:
    """chatml_bpe fine-tuned on the training references: genuinely the best source on this data."""
    cache = Path(os.environ.get("PROFUSER_TEST_CACHE", Path.home() / ".cache" / "profuser-tests"))
    recs = _records(tiny_suite / "data" / "train.jsonl")
    return cached_fine_tune(tiny_suite / "models" / "chatml_bpe", cache, recs, steps=80, lr=1e-2)


def test_known_best_source_wins_both_modes_under_three_scorer_kinds(tiny_suite, tiny_models, tuned, tmp_path):
    d = tiny_config_dict(tiny_suite, tmp_path / "run")
    # the tuned source is last, so ties (which go to the earlier source) cannot make it win
    d["sources"] = [{"name": "vicuna_spm", "path": str(tiny_models["vicuna_spm"])},
                    {"name": "gemma_unigram", "path": str(tiny_models["gemma_unigram"])},
                    {"name": "tuned", "path": str(tuned)}]
    d["scorers"] = [
        {"name": "f1", "type": "rule", "function": "profuser.rules:token_f1"},
        {"name": "sim", "type": "similarity", "path": default_similarity_model()},
        {"name": "rm", "type": "reward_model", "path": str(tiny_reward_model(tiny_models["chatml_bpe"], tmp_path / "rm")),
         "max_length": 128},
    ]
    d["prep"]["generate"] = {"max_new_tokens": 20}
    d["wandb"] = {"enabled": False}
    run_prep(parse_config(d))
    run = Path(d["run_dir"])
    sel = manifest(run, "align")["selection"]
    for m in ("training", "inference"):
        assert sel[m]["tuned"] == {"first": 24, "taught": 24}, (m, sel)
    scores = part_table(run, "score", "scores").to_pylist()
    for r in scores:
        assert r["winner"] == "tuned" and r["sources"] == ["vicuna_spm", "gemma_unigram", "tuned"]
        assert r["votes"][2] >= 2 and abs(sum(r["votes"]) - 3) < 1e-9
        assert r["score_f1"][2] == max(r["score_f1"]) and r["score_sim"][2] == max(r["score_sim"])
        assert len(r["score_rm"]) == 3
    inf = rows_by_key(run, "teacher", "inference/tuned")
    train = rows_by_key(run, "teacher", "training/tuned")
    assert len(inf) == 24
    # responses equal to the reference reuse the training row (no second forward pass)
    same = [k for k, r in inf.items() if r["response"] == train[k]["response"]]
    assert same and manifest(run, "teacher")["parts"]["inference/tuned"]["counts"]["in"] == 24
    for k_ in same:
        assert inf[k_]["ce"] == train[k_]["ce"] and inf[k_]["topk_ids"] == train[k_]["topk_ids"]
    def reused():
        return sum(json.loads(p.read_text())["reused"] for p in (run / "prep/teacher/inference/tuned").glob("*.json"))

    assert reused() == len(same)
    # new generations invalidate the inference rows but not the training rows: the reuse then reads
    # the finished training shards from disk
    train_files = _mtimes(run / "prep/teacher", "training/*/shard-*")
    run_prep(parse_config(d, ["prep.generate.max_new_tokens=21"]), TEACHER_PREP)
    assert _mtimes(run / "prep/teacher", "training/*/shard-*") == train_files
    again = rows_by_key(run, "teacher", "inference/tuned")
    assert reused() >= len(same)
    for k_ in same:
        assert (again[k_]["ce"], again[k_]["topk_ids"], again[k_]["mode"]) == (train[k_]["ce"], train[k_]["topk_ids"],
                                                                               "inference")


def test_bad_inputs_land_in_rejects_and_counts_add_up(tiny_suite, tiny_models, tmp_path):
    from profuser.models import load_chat_tokenizer

    recs = _records(tiny_suite / "data" / "train.jsonl")[:6]
    long = {"id": "too-long", "messages": [{"role": "user", "content": "Say a lot."},
                                          {"role": "assistant", "content": "word " * 400}]}
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*recs, long]) + "{not json\n")
    # a token that occurs in some references and in no prompt: NaN embedding -> NaN CE there only
    cm = load_chat_tokenizer(ModelConfig(path=str(tiny_models["vicuna_spm"]), name="v"))
    encs = [encode_chat(cm.tokenizer, cm.template, r["messages"][:1], r["messages"][1]["content"]) for r in recs]
    in_prompts = {t for e in encs for t in e.input_ids[:e.prompt_len]}
    counts = {}
    for e in encs:
        for t in set(e.input_ids[e.prompt_len:]) - in_prompts:
            counts[t] = counts.get(t, 0) + 1
    poison = min((c, t) for t, c in counts.items() if c < len(recs))[1]
    poisoned_ids = {r["id"] for r, e in zip(recs, encs) if poison in e.input_ids[e.prompt_len:]}

    d = tiny_config_dict(tiny_suite, tmp_path / "run")
    d["data"].update(path=str(data), overlength="reject")
    d["sources"] = [{"name": "chatml_bpe", "path": str(tiny_models["chatml_bpe"])},
                    {"name": "mute", "path": str(mute_model(tiny_models["gemma_unigram"], tmp_path / "mute"))},
                    {"name": "poisoned", "path": str(poison_token(tiny_models["vicuna_spm"], tmp_path / "nan", poison))}]
    d["scorers"] = [{"name": "f1", "type": "rule", "function": "profuser.rules:token_f1"},
                    {"name": "buggy", "type": "rule", "function": "prep_fixtures:raise_on_capital"}]
    d["wandb"] = {"enabled": False}
    run_prep(parse_config(d))
    run = Path(d["run_dir"])

    norm = manifest(run, "normalize")["counts"]
    assert norm["rows"] == 8 and norm["out"] == 6 and norm["rejected"] == 2
    assert norm["reasons"] == {"over_length": 1, "invalid_json": 1}
    rj = rejects(run, "normalize")
    assert {r["kind"] for r in rj} == {"over_length", "invalid_json"}
    assert any(r.get("id") == "too-long" and "max_length 256" in r["reason"] for r in rj)

    gen = manifest(run, "generate")["parts"]
    assert gen["mute"]["counts"] == {"in": 6, "out": 0, "rejected": 6, "reasons": {"empty_generation": 6}}
    assert all(r["kind"] == "empty_generation" and r["source"] == "mute" for r in rejects(run, "generate"))
    for p in gen.values():
        assert p["counts"]["in"] == 6 and p["counts"]["out"] + p["counts"]["rejected"] == 6

    capitals = {r["id"] for r in recs if "capital" in r["messages"][0]["content"]}
    sc = manifest(run, "score")["counts"]
    assert sc["in"] == 6 and sc["out"] == 6 - len(capitals) and sc["rejected"] == len(capitals)
    srj = rejects(run, "score")
    assert {r["id"] for r in srj if r["kind"] == "no_candidates"} == capitals
    assert all("this scorer cannot score capitals" in r["reason"] for r in srj if r["kind"] == "scorer_error")
    assert {(r["id"], r["source"]) for r in srj if r["kind"] == "scorer_error"} == {
        (i, s) for i in capitals for s in ("chatml_bpe", "poisoned")}

    teach = manifest(run, "teacher")
    c = teach["parts"]["training/poisoned"]["counts"]
    assert c == {"in": 6, "out": 6 - len(poisoned_ids), "rejected": len(poisoned_ids),
                 "reasons": {"non_finite_ce": len(poisoned_ids)}}
    nan_rj = [r for r in rejects(run, "teacher") if r["kind"] == "non_finite_ce" and r["mode"] == "training"]
    assert {r["id"] for r in nan_rj} == poisoned_ids and all("CE is nan" in r["reason"] for r in nan_rj)
    for part, v in teach["parts"].items():
        assert v["counts"]["out"] + v["counts"]["rejected"] == v["counts"]["in"], part
    taught = part_table(run, "align", "training").to_pylist()
    assert len(taught) == 6  # every sample has a training teacher; NaN rows never take part in MinCE
    assert all(np.isfinite(r["teacher_score"]) for r in taught)
    assert not {r["id"] for r in taught if r["source"] == "poisoned"} & poisoned_ids
    assert "mute" not in {r["source"] for r in part_table(run, "align", "inference").to_pylist()}


def test_generated_response_over_max_length_is_rejected_by_teacher(tiny_suite, tiny_models, tmp_path):
    """Over the source's max_length under policy `reject`: the teacher rejects the inference row."""
    from profuser.models import load_chat_tokenizer

    d = tiny_config_dict(tiny_suite, tmp_path / "run")
    d["sources"] = [{"name": "chatml_bpe", "path": str(tiny_models["chatml_bpe"]), "max_length": 40}]
    d["data"]["overlength"] = "reject"
    d["prep"]["generate"] = {"max_new_tokens": 32}
    d["wandb"] = {"enabled": False}
    run_prep(parse_config(d), TEACHER_PREP)
    run = Path(d["run_dir"])
    cm = load_chat_tokenizer(ModelConfig(path=str(tiny_models["chatml_bpe"]), name="c"))
    recs = {r["id"]: r for r in part_table(run, "normalize", "records").to_pylist()}
    gens = rows_by_key(run, "generate", "chatml_bpe")
    too_long = {i for (i,), g in gens.items()
                if len(encode_chat(cm.tokenizer, cm.template, recs[i]["messages"], g["response"]).input_ids) > 40}
    assert too_long  # random tiny models rarely end their turn early
    c = manifest(run, "teacher")["parts"]["inference/chatml_bpe"]["counts"]
    assert c == {"in": len(gens), "out": len(gens) - len(too_long), "rejected": len(too_long),
                 "reasons": {"over_length": len(too_long)}}
    rj = [r for r in rejects(run, "teacher") if r["kind"] == "over_length"]
    assert {r["id"] for r in rj} == too_long and all("> max_length 40" in r["reason"] for r in rj)
    assert manifest(run, "teacher")["parts"]["training/chatml_bpe"]["counts"]["rejected"] == 0


@pytest.mark.slow
def test_smollm2_gguf_through_generate_and_teacher(smollm2, smollm2_path, tiny_suite, tmp_path):
    d = tiny_config_dict(tiny_suite, tmp_path / "run")
    d["sources"] = [{"name": "smollm2", "path": smollm2_path}]
    d["target"] = {"name": "smollm2", "path": smollm2_path}
    d["data"]["limit"] = 3
    d["prep"] = {"topk": 10, "shard_size": 2, "batch_size": 2, "generate": {"max_new_tokens": 12}}
    d["wandb"] = {"enabled": False}
    run_prep(parse_config(d), TEACHER_PREP, loader=lambda spec: smollm2)
    run = Path(d["run_dir"])
    gens = part_table(run, "generate", "smollm2").to_pylist()
    assert len(gens) == 3 and all(g["response"] and 0 < g["n_tokens"] <= 12 for g in gens)
    train = rows_by_key(run, "teacher", "training/smollm2")
    inf = rows_by_key(run, "teacher", "inference/smollm2")
    assert len(train) == 3 and len(inf) == 3
    vocab = smollm2.model.config.vocab_size
    for row in [*train.values(), *inf.values()]:
        ids = np.array(row["topk_ids"])
        assert ids.shape == (row["n_tokens"], 10) and 0 <= ids.min() and ids.max() < vocab
        assert 0 < row["ce"] < 10
    # one sequence against a direct full-vocabulary forward of the real model
    rec = part_table(run, "normalize", "records").to_pylist()[0]
    row = train[(rec["id"],)]
    enc = encode_chat(smollm2.tokenizer, smollm2.template, rec["messages"], rec["reference"], 256)
    with torch.no_grad():
        logp = smollm2.model(torch.tensor([enc.input_ids])).logits[0].float().log_softmax(-1)[enc.prompt_len - 1:-1]
    target = torch.tensor(enc.input_ids[enc.prompt_len:])
    assert abs(-logp.gather(1, target[:, None]).mean().item() - row["ce"]) < 1e-4
    assert logp.topk(10).indices.tolist() == row["topk_ids"]
    # "stop" means the model ended its turn (<|im_end|>) before the cap
    assert all(g["finish_reason"] == ("length" if g["n_tokens"] == 12 else "stop") for g in gens)
    eot = smollm2.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(eot in r["token_ids"][-2:] for r in inf.values())  # ChatML: "<|im_end|>\n" closes the turn


def test_a_single_stage_needs_its_inputs(tiny_config):
    from profuser.prep.stages import PrepError

    tiny_config["wandb"] = {"enabled": False}
    with pytest.raises(PrepError, match="needs 'normalize' to be complete"):
        run_prep(parse_config(tiny_config), ["teacher"])
    with pytest.raises(PrepError, match="unknown stage"):
        run_prep(parse_config(tiny_config), ["nope"])
