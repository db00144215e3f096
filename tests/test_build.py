"""Stages align and build end to end on the tiny fixtures: three tokenizer families (byte-level BPE,
SentencePiece-style BPE, Unigram + NFKC) into a target that shares chatml_bpe's tokenizer.

The module fixture runs the whole prep once (real models, W&B offline); the other tests read it or
rerun align + build on a copy. Nothing is mocked.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from profuser.prep.dist import free_port
import yaml

from conftest import tiny_config_dict
from prep_fixtures import manifest, rejects, rows_by_key, wandb_history, wandb_table
from profuser.chat import split_response
from profuser.config import ModelConfig, parse_config
from profuser.models import load_chat_tokenizer
from profuser.prep.read import part_table
from profuser.prep.run import run_prep

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("chatml_bpe", "vicuna_spm", "gemma_unigram")
MODES = ("training", "inference")


@pytest.fixture(scope="module")
def base_dict(tiny_suite, tmp_path_factory) -> dict:
    d = tiny_config_dict(tiny_suite, tmp_path_factory.mktemp("build") / "base")
    d["wandb"] = {"mode": "offline", "project": "build-test"}
    return d


@pytest.fixture(scope="module")
def prepped(base_dict) -> Path:
    """normalize -> ... -> build, one process."""
    assert run_prep(parse_config(base_dict)) == dict.fromkeys(
        ("normalize", "generate", "score", "teacher", "align", "build"), True)
    return Path(base_dict["run_dir"])


@pytest.fixture(scope="module")
def target(tiny_models):
    return load_chat_tokenizer(ModelConfig(path=str(tiny_models["target"]), name="target"))


def _build_rows(run: Path) -> list[dict]:
    files = sorted(glob.glob(str(run / "prep" / "build" / "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def _expected_responses(run: Path) -> dict:
    """(mode, id) -> (teacher, response) from the upstream stages alone (not from align)."""
    records = rows_by_key(run, "normalize", "records")
    winners = pq.read_table(run / "prep/teacher/winners.parquet").to_pylist()
    gens = {(s, k[0]): r["response"] for s in SOURCES for k, r in rows_by_key(run, "generate", s).items()}
    out = {}
    for w in winners:
        resp = records[(w["id"],)]["reference"] if w["mode"] == "training" else gens[(w["source"], w["id"])]
        out[(w["mode"], w["id"])] = (w["source"], resp, w)
    return out


# --------------------------------------------------------------------------------------------


def test_build_rows_decode_to_the_target_chat_rendering_in_both_modes(prepped, target):
    tok = target.tokenizer
    records = {k[0]: r for k, r in rows_by_key(prepped, "normalize", "records").items()}
    expected = _expected_responses(prepped)
    rows = _build_rows(prepped)
    assert [r["id"] for r in rows] == list(records)  # every sample, input order (shard by shard)
    V = len(tok)
    for row in rows:
        rec = records[row["id"]]
        assert json.loads(row["meta"]) == json.loads(rec["meta"])
        for m in MODES:
            teacher, response, w = expected[(m, row["id"])]
            ids, labels = row[f"{m}_input_ids"], row[f"{m}_labels"]
            prompt, resp = split_response(tok, target.template, rec["messages"], response)
            text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            assert text == prompt + resp, (m, row["id"])
            P = sum(lab == -100 for lab in labels)
            assert labels == [-100] * P + ids[P:]  # labels cover exactly the response
            assert tok.decode(ids[:P], clean_up_tokenization_spaces=False) == prompt
            assert tok.decode(ids[P:], clean_up_tokenization_spaces=False) == resp
            assert row[f"{m}_teacher"] == teacher
            assert row[f"{m}_teacher_score"] == (w["ce"] if m == "training" else w["votes"])
            top = np.array(row[f"{m}_topk_ids"], dtype=np.int64)
            lps = np.array(row[f"{m}_topk_logprobs"], dtype=np.float32)
            assert top.shape == lps.shape == (len(ids), 5)
            assert ((top == -1) | ((top >= 0) & (top < V))).all()
            assert (top[:P] == -1).all()
            assert np.isneginf(lps[top == -1]).all() and (lps[top >= 0] <= 0).all()
            assert ((top[:, 1:] == -1) | (top[:, :-1] >= 0)).all()  # entries left-packed, best first
            assert (np.diff(np.where(top >= 0, lps, -1e9), axis=1) <= 0).all()
            assert (top[P:, 0] >= 0).any()


def test_copy_path_for_the_identical_tokenizer(prepped):
    """chatml_bpe -> target: every response position carries the teacher's row, ids unchanged."""
    n = 0
    for m in MODES:
        teach = rows_by_key(prepped, "teacher", f"{m}/chatml_bpe")
        for (rid,), a in rows_by_key(prepped, "align", f"{m}/chatml_bpe").items():
            t = teach[(rid,)]
            P = a["labels"].count(-100)
            assert a["method"] == "copy" and a["n_transferred"] == a["n_response"] == t["n_tokens"]
            assert a["input_ids"][P:] == t["token_ids"]
            assert a["topk_ids"][P:] == t["topk_ids"]
            np.testing.assert_array_equal(np.array(a["topk_logprobs"][P:], np.float16),
                                          np.array(t["topk_logprobs"], np.float16))
            assert a["kept_mass"] == 1.0
            n += 1
    assert n > 0
    pair = manifest(prepped, "align")["pairs"]["chatml_bpe->target"]
    assert pair["same_tokenizer"] and pair["copy_ids"]
    assert pair["all"]["transferred_share"] == 1.0 and pair["all"]["kept_mass"] == 1.0


def test_transferred_positions_carry_the_same_text_across_tokenizers(tiny_suite, tiny_models, prepped, target):
    """Every teacher row of every source (winner or not, both modes) through the align stage's own
    functions: transferred target positions predict a token of the same text as the source's, and
    each kept top-k entry is the target token with the mapped source token's surface."""
    from profuser.align import token_surface
    from profuser.chat import end_of_turn_id
    from profuser.prep.align_stage import Target, align_sample, make_pair, unnest
    from profuser.prep.dist import Dist
    from profuser.prep.stages import Context

    cfg = parse_config(tiny_config_dict(tiny_suite, prepped))
    ctx = Context(cfg=cfg, dist=Dist(), plan={}, loader=None)
    tgt = Target(target, end_of_turn_id(target.tokenizer, target.template), 256)
    tsurf = token_surface(target.tokenizer)
    records = {k[0]: r for k, r in rows_by_key(prepped, "normalize", "records").items()}
    for src in SOURCES:
        pair = make_pair(ctx, cfg.model(src), tgt)
        ssurf = token_surface(pair.cm.tokenizer)
        shares = []
        for m in MODES:
            t = part_table(prepped, "teacher", f"{m}/{src}")
            tops, lps = unnest(t["topk_ids"], 5), unnest(t["topk_logprobs"], 5)
            for j, row in enumerate(t.select(["id", "response", "token_ids"]).to_pylist()):
                out = align_sample(pair, tgt, "truncate_left", records[row["id"]]["messages"], row["response"],
                                   np.array(row["token_ids"]), tops[j], lps[j])
                P = len(out["input_ids"]) - out["n_response"]
                shares.append(out["n_transferred"] / out["n_response"])
                for q, r in enumerate(out["tgt_to_src"]):
                    top = out["topk_ids"][P + q]
                    if r < 0:
                        assert (top == -1).all()
                        continue
                    tgt_id, src_id = out["input_ids"][P + q], row["token_ids"][r]
                    if tgt_id == tgt.eot:
                        assert src_id == pair.eot
                        continue
                    assert tsurf[tgt_id] == ssurf[src_id]  # same text (and, spans being equal, same prefix)
                    for e in top[top >= 0]:
                        if src == "chatml_bpe":
                            assert e in tops[j][r]
                        elif e != tgt.eot:
                            assert any(pair.vocab_map[s] == e and ssurf[s] == tsurf[e] for s in tops[j][r]), (src, e)
        shares = np.array(shares)
        if src == "chatml_bpe":
            assert (shares == 1).all()
        else:  # a real cross-tokenizer pair: much transfers, not everything
            assert 0.2 < shares.mean() < 1 and (shares > 0).all(), (src, shares.mean())


def test_alignment_statistics_in_the_manifest_and_wandb(prepped, base_dict):
    man = manifest(prepped, "align")
    assert man["status"] == "complete" and set(man["parts"]) == {f"{m}/{s}" for m in MODES for s in SOURCES}
    winners = pq.read_table(prepped / "prep/teacher/winners.parquet").to_pylist()
    for m in MODES:
        for s in SOURCES:
            c = man["parts"][f"{m}/{s}"]["counts"]
            assert c["in"] == sum(w["mode"] == m and w["source"] == s for w in winners)
            assert c["out"] + c["rejected"] == c["in"]
    pairs = man["pairs"]
    assert set(pairs) == {f"{s}->target" for s in SOURCES}
    for s in ("vicuna_spm", "gemma_unigram"):
        p = pairs[f"{s}->target"]
        assert not p["same_tokenizer"] and p["vocab_mapping"] == "exact" and 0 < p["mapped_share"] < 1
        a = p["all"]
        assert a["rows"] > 0 and 0 < a["transferred_share"] < 1 and 0 < a["kept_mass"] <= 1
        assert a["transferred"] <= a["aligned"] <= a["response_positions"]
        rows = [r for m in MODES for r in part_table(prepped, "align", f"{m}/{s}").to_pylist()]
        assert a["response_positions"] == sum(r["n_response"] for r in rows)
        assert a["transferred"] == sum(r["n_transferred"] for r in rows)
        assert abs(a["kept_mass"] - sum(r["kept_mass"] * r["n_aligned"] for r in rows) / a["aligned"]) < 1e-9
    assert (prepped / "prep" / "vocab_maps").is_dir() and len(list((prepped / "prep/vocab_maps").glob("*.npy"))) == 2

    hist = wandb_history(prepped, run_name=f"{prepped.name}-align")
    table = wandb_table(prepped, "prep/align/pairs", run_name=f"{prepped.name}-align")
    assert table["columns"][:3] == ["source", "target", "mode"]
    got = {(r[0], r[2]): r[5] for r in table["data"]}
    for s in SOURCES:
        assert got[(s, "all")] == pairs[f"{s}->target"]["all"]["transferred_share"]
        assert hist[f"prep/align/transferred_share_per_row/{s}/_type"] == "histogram"

    b = manifest(prepped, "build")
    assert b["counts"] == {"in": 24, "out": 24, "rejected": 0, "reasons": {}}
    assert b["modes"] == {"training": 24, "inference": 24, "both": 24}


def _mtimes(root: Path, pattern: str) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(root.glob(pattern))}


def test_rerun_skips_resumes_and_invalidates(prepped, base_dict, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(prepped, run, ignore=shutil.ignore_patterns("wandb"))
    d = {**base_dict, "run_dir": str(run), "wandb": {"enabled": False}}
    before = {**_mtimes(run / "prep/align", "*/*/shard-*"), **_mtimes(run / "prep/build", "shard-*")}
    ran = run_prep(parse_config(d))
    assert not any(ran.values()) and capfd.readouterr().out.count("already complete for this config") == 6
    assert {**_mtimes(run / "prep/align", "*/*/shard-*"), **_mtimes(run / "prep/build", "shard-*")} == before

    # a run killed in the middle of align: one shard gone, manifests still "running"
    for st in ("align", "build"):
        man = manifest(run, st)
        man["status"] = "running"
        (run / "prep" / st / "manifest.json").write_text(json.dumps(man))
    for f in ("align/inference/chatml_bpe/shard-00001", "build/shard-00002"):
        for ext in (".parquet", ".json"):
            (run / "prep" / f).with_suffix(ext).unlink()
    assert run_prep(parse_config(d), ["align", "build"]) == {"align": True, "build": True}
    out = capfd.readouterr().out
    assert "align/inference/chatml_bpe: 2 of 3 shards already done" in out
    assert "build/: 2 of 3 shards already done" in out
    after = {**_mtimes(run / "prep/align", "*/*/shard-*"), **_mtimes(run / "prep/build", "shard-*")}
    assert {p: t for p, t in after.items() if p in before and "00001" not in p.name and "00002" not in p.name} == \
        {p: t for p, t in before.items() if "00001" not in p.name and "00002" not in p.name}
    assert _build_rows(run) == _build_rows(prepped)
    assert manifest(run, "align")["pairs"] == manifest(prepped, "align")["pairs"]

    # the vocabulary mapping mode changes align (every part) and build, nothing upstream
    teacher = _mtimes(run / "prep/teacher", "*/*/shard-*")
    ran = run_prep(parse_config(d, ["prep.vocab_mapping=soft"]))
    out = capfd.readouterr().out
    assert ran == {**dict.fromkeys(("normalize", "generate", "score", "teacher"), False), "align": True, "build": True}
    assert out.count("INVALIDATED") == 7 and "vocab_mapping: \"exact\" -> \"soft\"" in out
    assert _mtimes(run / "prep/teacher", "*/*/shard-*") == teacher
    soft = manifest(run, "align")["pairs"]["vicuna_spm->target"]
    assert soft["vocab_mapping"] == "soft" and soft["mapped_share"] > manifest(prepped, "align")["pairs"][
        "vicuna_spm->target"]["mapped_share"]


def test_unusable_teacher_rows_are_rejected_and_the_set_still_loads(prepped, base_dict, tmp_path):
    """Teacher rows whose tokens no longer match their text (shard 1: inference only; shard 2:
    everything) are rejected by align; build keeps a sample with its one good mode and rejects a
    sample with none; an empty build shard still loads with datasets and the trainer's reader."""
    import datasets

    from profuser.prep.shards import shard_identity, write_parquet
    from profuser.train.dataset import FusionDataset

    run = tmp_path / "run"
    shutil.copytree(prepped, run, ignore=shutil.ignore_patterns("wandb", "align", "build"))
    for m in MODES:
        for s in SOURCES:
            for i in ((1, 2) if m == "inference" else (2,)):
                path = run / "prep/teacher" / m / s / f"shard-{i:05d}.parquet"
                t = pq.read_table(path)
                tok = [[x + 1 for x in ids] for ids in t["token_ids"].to_pylist()]
                write_parquet(path, t.set_column(t.schema.get_field_index("token_ids"), "token_ids",
                                                 pa.array(tok, pa.list_(pa.int32()))))
                side = path.with_suffix(".json")  # as if the teacher had written them (else: a damaged shard, redone)
                side.write_text(json.dumps({**json.loads(side.read_text()), "file": shard_identity(path)}))
    d = {**base_dict, "run_dir": str(run), "wandb": {"enabled": False}}
    run_prep(parse_config(d), ["align", "build"])
    ids = [r["id"] for r in part_table(run, "normalize", "records").to_pylist()]
    shard1, shard2 = set(ids[8:16]), set(ids[16:24])
    rj = rejects(run, "align")
    assert {(r["id"], r["mode"]) for r in rj} == {(i, "inference") for i in shard1 | shard2} | {
        (i, "training") for i in shard2}
    assert all(r["kind"] == "retokenization_mismatch" and "the teacher stored" in r["reason"] for r in rj)
    b = manifest(run, "build")
    assert b["counts"]["out"] == 16 and b["counts"]["reasons"] == {"no_teacher": 8}
    assert b["modes"] == {"training": 16, "inference": 8, "both": 8}
    assert {r["id"] for r in rejects(run, "build")} == shard2
    rows = {r["id"]: r for r in _build_rows(run)}
    assert all(rows[i]["inference_input_ids"] is None and rows[i]["inference_topk_ids"] is None
               and rows[i]["training_input_ids"] for i in shard1)
    assert pq.ParquetFile(run / "prep/build/shard-00002.parquet").metadata.num_rows == 0

    files = sorted(glob.glob(str(run / "prep/build/*.parquet")))
    ds = datasets.Dataset.from_parquet(files, cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 16
    f = ds.features
    assert f["training_topk_ids"].feature.feature.dtype == "int32"
    assert f["training_topk_logprobs"].feature.feature.dtype == "float16"
    fd = FusionDataset(run / "prep" / "build", cache_dir=tmp_path / "hf2")
    assert len(fd) == 16 and fd.mode_counts() == {"inference": 8, "training": 16}
    x = fd[8]  # the first sample of shard 1
    assert x["id"] in shard1 and x["inference"] is None
    assert x["training"]["topk_ids"].shape == (len(x["training"]["input_ids"]), 5)


def test_align_sample_rejects_what_it_cannot_use(prepped, tiny_suite, target):
    from profuser.chat import end_of_turn_id
    from profuser.prep.align_stage import Reject, Target, align_sample, make_pair, unnest
    from profuser.prep.dist import Dist
    from profuser.prep.stages import Context

    cfg = parse_config(tiny_config_dict(tiny_suite, prepped))
    ctx = Context(cfg=cfg, dist=Dist(), plan={}, loader=None)
    eot = end_of_turn_id(target.tokenizer, target.template)
    pair = make_pair(ctx, cfg.model("vicuna_spm"), Target(target, eot, 256))
    t = part_table(prepped, "teacher", "training/vicuna_spm").slice(0, 1)
    row = t.to_pylist()[0]
    msgs = rows_by_key(prepped, "normalize", "records")[(row["id"],)]["messages"]
    args = (np.array(row["token_ids"]), unnest(t["topk_ids"], 5)[0], unnest(t["topk_logprobs"], 5)[0])

    ok = align_sample(pair, Target(target, eot, 256), "truncate_left", msgs, row["response"], *args)
    assert ok["method"] == "spans" and 0 < ok["n_transferred"] < ok["n_response"]
    # a target that keeps only the end of the prompt still aligns the whole response
    short = align_sample(pair, Target(target, eot, ok["n_response"] + 3), "truncate_left", msgs, row["response"], *args)
    assert short["input_ids"].tolist() == ok["input_ids"][-len(short["input_ids"]):].tolist()
    assert short["n_response"] == ok["n_response"] and (short["topk_ids"][:3] == -1).all()
    assert short["topk_ids"][3:].tolist() == ok["topk_ids"][-ok["n_response"]:].tolist()
    cases = [
        (Target(target, eot, ok["n_response"]), row["response"], args, "over_length"),
        (Target(target, eot, 256), row["response"] + " extra", args, "retokenization_mismatch"),
    ]
    shouting = target.template.replace("m['content']", "m['content'] | upper")  # rewrites the message
    upper = dataclasses.replace(target, template=shouting)
    cases.append((Target(upper, eot, 256), row["response"], args, "unalignable"))
    for tgt, resp, a, kind in cases:
        with pytest.raises(Reject) as e:
            align_sample(pair, tgt, "truncate_left", msgs, resp, *a)
        assert e.value.kind == kind, (kind, e.value.reason)


@pytest.mark.slow
def test_two_deepspeed_cpu_ranks_give_the_single_process_output(prepped, base_dict, tmp_path):
    run = tmp_path / "ds"
    shutil.copytree(prepped, run, ignore=shutil.ignore_patterns("wandb", "align", "build", "vocab_maps"))
    d = {**base_dict, "run_dir": str(run), "wandb": {"enabled": False}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(d))
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    port = free_port()
    for stage in ("align", "build"):
        r = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), f"data_prep/{stage}.py",
                            str(cfg)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "[rank 1/2]" in r.stdout + r.stderr
        assert manifest(run, stage)["world_size"] == 2
    assert _build_rows(run) == _build_rows(prepped)
    assert manifest(run, "align")["pairs"] == manifest(prepped, "align")["pairs"]
    assert sorted(rejects(run, "align"), key=json.dumps) == sorted(rejects(prepped, "align"), key=json.dumps)


@pytest.mark.slow
def test_real_target_tokenizer_smollm2(tiny_suite, smollm2_path, tmp_path):
    """The three fixture families into SmolLM2-135M-Instruct's real byte-level BPE (from its GGUF,
    with its own chat template): no source shares its tokenizer, so every pair takes the span path."""
    d = tiny_config_dict(tiny_suite, tmp_path / "run")
    d["target"] = {"name": "smollm2", "path": smollm2_path}
    d["data"]["limit"] = 8
    d["wandb"] = {"enabled": False}
    run_prep(parse_config(d))
    run = Path(d["run_dir"])
    tgt = load_chat_tokenizer(ModelConfig(path=smollm2_path, name="smollm2"))
    records = {k[0]: r for k, r in rows_by_key(run, "normalize", "records").items()}
    expected = _expected_responses(run)
    rows = _build_rows(run)
    assert len(rows) == 8
    for row in rows:
        for m in MODES:
            _, response, _ = expected[(m, row["id"])]
            prompt, resp = split_response(tgt.tokenizer, tgt.template, records[row["id"]]["messages"], response)
            ids = row[f"{m}_input_ids"]
            assert tgt.tokenizer.decode(ids, clean_up_tokenization_spaces=False) == prompt + resp
            top = np.array(row[f"{m}_topk_ids"])
            assert ((top == -1) | ((top >= 0) & (top < len(tgt.tokenizer)))).all()
            assert (top[:row[f"{m}_labels"].count(-100)] == -1).all()
    pairs = manifest(run, "align")["pairs"]
    for s in SOURCES:
        p = pairs[f"{s}->smollm2"]
        assert not p["same_tokenizer"]
        if p["all"]["rows"]:
            assert 0 < p["all"]["transferred_share"] < 1 and 0 < p["all"]["kept_mass"] <= 1
