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
from profuser.constants import PREP_MODES
from profuser.models import load_chat_tokenizer
from profuser.prep.read import part_table
from profuser.prep.run import run_prep

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("chatml_bpe", "vicuna_spm", "gemma_unigram")


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


def _expected_responses(run: Path, mince: str = "byte") -> dict:
    """(mode, id) -> (teacher, response, teacher_score) from the upstream stages alone (not from align):
    training: the MinCE source on the reference; inference: the score winner on its generation."""
    from profuser.selection import mince_value, rank_sources

    records = rows_by_key(run, "normalize", "records")
    gens = {(s, k[0]): r["response"] for s in SOURCES for k, r in rows_by_key(run, "generate", s).items()}
    train = {s: rows_by_key(run, "teacher", f"training/{s}") for s in SOURCES}
    out = {}
    for (rid,), rec in records.items():
        values = {s: mince_value(train[s][(rid,)]["ce"], train[s][(rid,)]["text_nll"], train[s][(rid,)]["text_bytes"],
                                 mince) for s in SOURCES if (rid,) in train[s]}
        best = rank_sources(values)[0]
        out[("training", rid)] = (best, rec["reference"], values[best])
    for r in part_table(run, "score", "scores").to_pylist():
        if r["winner"] is not None:
            out[("inference", r["id"])] = (r["winner"], gens[(r["winner"], r["id"])],
                                           r["votes"][r["sources"].index(r["winner"])])
    return out


# --------------------------------------------------------------------------------------------


def test_build_rows_decode_to_the_target_chat_rendering_in_both_modes(prepped, target):
    from profuser.chat import end_of_turn_id

    tok = target.tokenizer
    target_eot = end_of_turn_id(tok, target.template)
    records = {k[0]: r for k, r in rows_by_key(prepped, "normalize", "records").items()}
    expected = _expected_responses(prepped)
    rows = _build_rows(prepped)
    assert [r["id"] for r in rows] == list(records)  # every sample, input order (shard by shard)
    V = len(tok)
    for row in rows:
        rec = records[row["id"]]
        assert json.loads(row["meta"]) == json.loads(rec["meta"])
        for m in PREP_MODES:
            teacher, response, score = expected[(m, row["id"])]
            ids, labels = row[f"{m}_input_ids"], row[f"{m}_labels"]
            prompt, resp = split_response(tok, target.template, rec["messages"], response)
            text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            assert text == prompt + resp, (m, row["id"])
            P = sum(lab == -100 for lab in labels)
            assert labels == [-100] * P + ids[P:]  # labels cover exactly the response
            assert tok.decode(ids[:P], clean_up_tokenization_spaces=False) == prompt
            assert tok.decode(ids[P:], clean_up_tokenization_spaces=False) == resp
            assert row[f"{m}_teacher"] == teacher
            assert row[f"{m}_teacher_score"] == pytest.approx(score)
            top = np.array(row[f"{m}_topk_ids"], dtype=np.int64)
            lps = np.array(row[f"{m}_topk_logprobs"], dtype=np.float32)
            assert top.shape == lps.shape == (len(ids), 5)
            assert ((top == -1) | ((top >= 0) & (top < V))).all()
            assert (top[:P] == -1).all()
            assert np.isneginf(lps[top == -1]).all() and (lps[top >= 0] <= 0).all()
            assert ((top[:, 1:] == -1) | (top[:, :-1] >= 0)).all()  # entries left-packed, best first
            assert (np.diff(np.where(top >= 0, lps, -1e9), axis=1) <= 0).all()
            eot = ids[P:].index(target_eot)
            assert (top[P:P + eot + 1, 0] >= 0).all()  # every position up to the end of turn has a teacher
            assert (np.exp(np.where(top >= 0, lps, -np.inf).astype(np.float64)).sum(1) <= 1.001).all()


def test_copy_path_for_the_identical_tokenizer(prepped):
    """chatml_bpe -> target: every response position carries the teacher's row, ids unchanged."""
    n = 0
    for m in PREP_MODES:
        teach = rows_by_key(prepped, "teacher", f"{m}/chatml_bpe")
        for a in part_table(prepped, "align", m).to_pylist():
            if a["source"] != "chatml_bpe":
                continue
            t = teach[(a["id"],)]
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


def test_every_text_position_gets_a_teacher_across_tokenizers(tiny_suite, tiny_models, prepped, target, tmp_path):
    """Every teacher row of every source (chosen or not, both modes) through the align stage's own
    functions: each target position holding response text (or the end of turn) gets a distribution
    that contains its own label, the prompt gets none, and the 1:1 rule alone would leave many
    positions without one. The stage, which projects a shard's samples together, wrote the same
    rows as these one-sample calls."""
    from profuser.chat import end_of_turn_id
    from profuser.prep.align_stage import TeacherRows, Target, align_sample, make_pair

    cfg = parse_config(tiny_config_dict(tiny_suite, prepped))
    tgt = Target(target, end_of_turn_id(target.tokenizer, target.template), 256)
    records = {k[0]: r for k, r in rows_by_key(prepped, "normalize", "records").items()}
    stage = {m: {r["id"]: r for r in part_table(prepped, "align", m).to_pylist()} for m in PREP_MODES}
    compared = 0
    for src in SOURCES:
        pair = make_pair(cfg, tmp_path, cfg.model(src), tgt)
        text_share, one_share = [], []
        for m in PREP_MODES:
            rows = TeacherRows(part_table(prepped, "teacher", f"{m}/{src}"), 5)
            for rid, j in rows.row_of.items():
                row = rows.row(j)
                out = align_sample(pair, tgt, "truncate_left", records[rid]["messages"], row["response"],
                                   np.array(row["token_ids"]), row["token_logprobs"], row["topk_ids"], row["topk_logprobs"])
                P = len(out["input_ids"]) - out["n_response"]
                top = out["topk_ids"]
                assert (top[:P] == -1).all()
                has = top[P:, 0] >= 0
                labels = out["input_ids"][P:]
                # the label is an entry unless k more probable ones filled the row
                assert all(labels[q] in top[P + q] or (top[P + q] >= 0).all() for q in np.flatnonzero(has))
                written = stage[m].get(rid)
                if written is not None and written["source"] == src:
                    for col in ("input_ids", "topk_ids", "topk_logprobs", "n_transferred", "kept_mass"):
                        np.testing.assert_array_equal(np.array(written[col], dtype=np.asarray(out[col]).dtype),
                                                      out[col], err_msg=f"{src} {m} {rid} {col}")
                    compared += 1
                text_share.append(out["n_text_transferred"] / out["n_text"])
                one_share.append(out["n_aligned"] / out["n_response"])
                assert out["n_transferred"] >= out["n_aligned"] and out["n_transferred"] >= out["n_text_transferred"]
        text_share, one_share = np.array(text_share), np.array(one_share)
        if src == "chatml_bpe":
            assert (text_share == 1).all() and (one_share == 1).all()
        else:  # another tokenizer: every text position still gets a teacher; the 1:1 rule left many out
            assert text_share.mean() > 0.99 and one_share.mean() < 0.9, (src, text_share.mean(), one_share.mean())
    assert compared == sum(len(v) for v in stage.values())  # every row the stage wrote


def test_alignment_statistics_in_the_manifest_and_wandb(prepped, base_dict):
    man = manifest(prepped, "align")
    assert man["status"] == "complete" and set(man["parts"]) == set(PREP_MODES)
    assert man["mince"] == "byte"
    n = 24
    for m in PREP_MODES:
        c = man["parts"][m]["counts"]
        assert c["in"] == n and c["out"] + c["rejected"] == c["in"]
        sel = man["selection"][m]
        assert sum(v["taught"] for v in sel.values()) == c["out"] and sum(v["first"] for v in sel.values()) == n
    pairs = man["pairs"]
    assert set(pairs) == {f"{s}->target" for s in SOURCES}
    rows = {m: part_table(prepped, "align", m).to_pylist() for m in PREP_MODES}
    for s in ("vicuna_spm", "gemma_unigram"):
        p = pairs[f"{s}->target"]
        assert not p["same_tokenizer"] and p["vocab_mapping"] == "prefix" and 0 < p["mapped_share"] <= 1
        a = p["all"]
        taught = [r for m in PREP_MODES for r in rows[m] if r["source"] == s]
        assert a["rows"] == len(taught)
        if not taught:
            continue
        assert a["aligned"] <= a["transferred"] <= a["response_positions"]
        assert a["text_share"] > 0.99 and 0 < a["kept_mass"] <= 1 and 0 < a["mass"] <= 1
        assert a["response_positions"] == sum(r["n_response"] for r in taught)
        assert a["transferred"] == sum(r["n_transferred"] for r in taught)
        assert abs(a["kept_mass"] - sum(r["kept_mass"] * r["n_transferred"] for r in taught) / a["transferred"]) < 1e-9
    # the vocabulary tables of the three pairs are cached, keyed by both tokenizers and the mode
    from profuser.chat import end_of_turn_id
    from profuser.vocab_map import cache_dir, vocab_map_key

    cfg = parse_config(base_dict)
    tgt = load_chat_tokenizer(cfg.target)
    t_eot = end_of_turn_id(tgt.tokenizer, tgt.template)
    for s in SOURCES:
        src = load_chat_tokenizer(cfg.model(s))
        key = vocab_map_key(src.tokenizer, tgt.tokenizer, "prefix", {end_of_turn_id(src.tokenizer, src.template): t_eot})
        assert (cache_dir() / f"pair-{key}.npz").exists(), s

    hist = wandb_history(prepped, run_name=f"{prepped.name}-align")
    table = wandb_table(prepped, "prep/align/pairs", run_name=f"{prepped.name}-align")
    assert table["columns"][:3] == ["source", "target", "mode"]
    col = table["columns"].index("transferred_share")
    got = {(r[0], r[2]): r[col] for r in table["data"]}
    for s in SOURCES:
        assert got[(s, "all")] == pairs[f"{s}->target"]["all"]["transferred_share"]
        if pairs[f"{s}->target"]["all"]["rows"]:
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
    before = {**_mtimes(run / "prep/align", "*/shard-*"), **_mtimes(run / "prep/build", "shard-*")}
    ran = run_prep(parse_config(d))
    assert not any(ran.values()) and capfd.readouterr().out.count("already complete for this config") == 6
    assert {**_mtimes(run / "prep/align", "*/shard-*"), **_mtimes(run / "prep/build", "shard-*")} == before

    # a run killed in the middle of align: one shard gone, manifests still "running"
    for st in ("align", "build"):
        man = manifest(run, st)
        man["status"] = "running"
        (run / "prep" / st / "manifest.json").write_text(json.dumps(man))
    for f in ("align/inference/shard-00001", "build/shard-00002"):
        for ext in (".parquet", ".json"):
            (run / "prep" / f).with_suffix(ext).unlink()
    assert run_prep(parse_config(d), ["align", "build"]) == {"align": True, "build": True}
    out = capfd.readouterr().out
    assert "align/inference: 2 of 3 shards already done" in out
    assert "build/: 2 of 3 shards already done" in out
    after = {**_mtimes(run / "prep/align", "*/shard-*"), **_mtimes(run / "prep/build", "shard-*")}
    assert {p: t for p, t in after.items() if p in before and "00001" not in p.name and "00002" not in p.name} == \
        {p: t for p, t in before.items() if "00001" not in p.name and "00002" not in p.name}
    assert _build_rows(run) == _build_rows(prepped)
    assert manifest(run, "align")["pairs"] == manifest(prepped, "align")["pairs"]

    # the vocabulary mapping mode changes align (both parts) and build, nothing upstream
    teacher = _mtimes(run / "prep/teacher", "*/*/shard-*")
    ran = run_prep(parse_config(d, ["prep.vocab_mapping=exact"]))
    out = capfd.readouterr().out
    assert ran == {**dict.fromkeys(("normalize", "generate", "score", "teacher"), False), "align": True, "build": True}
    assert out.count("INVALIDATED") == 3 and "vocab_mapping: \"prefix\" -> \"exact\"" in out
    assert _mtimes(run / "prep/teacher", "*/*/shard-*") == teacher
    exact = manifest(run, "align")["pairs"]["vicuna_spm->target"]
    assert exact["vocab_mapping"] == "exact" and exact["mapped_share"] < manifest(prepped, "align")["pairs"][
        "vicuna_spm->target"]["mapped_share"]
    # the MinCE rule changes the training part only (and build)
    ran = run_prep(parse_config(d, ["prep.vocab_mapping=exact", "prep.mince=token"]))
    out = capfd.readouterr().out
    assert [line.split("] ")[-1].split(":")[0] for line in out.splitlines() if "INVALIDATED" in line] == \
        ["align/training", "build/"] and "mince: \"byte\" -> \"token\"" in out
    assert manifest(run, "align")["mince"] == "token"


def test_unusable_teacher_rows_fall_back_or_are_rejected_and_the_set_still_loads(prepped, base_dict, tmp_path):
    """Teacher rows whose tokens no longer match their text cannot be used. Shard 1: every training
    row but gemma_unigram's is spoiled, and every inference row: the training teacher falls back down
    the MinCE ranking to gemma_unigram (each skipped source recorded with why), and the sample keeps
    no inference mode (only the winner's distributions exist there). Shard 2: everything is spoiled:
    build rejects the samples. An empty build shard still loads with datasets and the trainer."""
    import datasets

    from profuser.prep.shards import shard_identity, write_parquet
    from profuser.selection import mince_value, rank_sources
    from profuser.train.dataset import FusionDataset

    run = tmp_path / "run"
    shutil.copytree(prepped, run, ignore=shutil.ignore_patterns("wandb", "align", "build"))
    spoiled = [(m, s, i) for m in PREP_MODES for s in SOURCES for i in (1, 2)
               if not (m == "training" and s == "gemma_unigram" and i == 1)]
    for m, s, i in spoiled:
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
    shard1, shard2 = ids[8:16], set(ids[16:24])
    train = {s: rows_by_key(run, "teacher", f"training/{s}") for s in SOURCES}
    ranking = {rid: rank_sources({s: mince_value(train[s][(rid,)]["ce"], train[s][(rid,)]["text_nll"],
                                                 train[s][(rid,)]["text_bytes"], "byte") for s in SOURCES})
               for rid in ids}
    rj = rejects(run, "align")
    assert all(r["kind"] == "retokenization_mismatch" and "the teacher stored" in r["reason"] for r in rj)
    for rid in shard1:
        skipped = ranking[rid][:ranking[rid].index("gemma_unigram")]
        lines = [r for r in rj if r["id"] == rid and r["mode"] == "training"]
        assert [r["source"] for r in lines] == skipped
        assert all(f"falling back to {ranking[rid][k + 1]}" in r["reason"] for k, r in enumerate(lines))
    got = {r["id"]: r for r in part_table(run, "align", "training").to_pylist()}
    for rid in shard1:
        assert got[rid]["source"] == "gemma_unigram" and got[rid]["rank"] == ranking[rid].index("gemma_unigram")
    assert not shard2 & set(got)
    inf_lines = [r for r in rj if r["mode"] == "inference"]
    assert {r["id"] for r in inf_lines} == set(shard1) | shard2 and all(
        "no inference mode for this sample" in r["reason"] for r in inf_lines)
    a = manifest(run, "align")
    assert a["parts"]["training"]["counts"]["out"] == 16 and a["parts"]["inference"]["counts"]["out"] == 8
    assert sum(p["all"]["fallback_rows"] for p in a["pairs"].values()) == sum(
        ranking[rid][0] != "gemma_unigram" for rid in shard1)
    b = manifest(run, "build")
    assert b["counts"]["out"] == 16 and b["counts"]["reasons"] == {"no_teacher": 8}
    assert b["modes"] == {"training": 16, "inference": 8, "both": 8}
    assert {r["id"] for r in rejects(run, "build")} == shard2
    rows = {r["id"]: r for r in _build_rows(run)}
    assert all(rows[i]["inference_input_ids"] is None and rows[i]["inference_topk_ids"] is None
               and rows[i]["training_teacher"] == "gemma_unigram" for i in shard1)
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


def test_align_sample_rejects_what_it_cannot_use(prepped, tiny_suite, target, tmp_path):
    from profuser.chat import end_of_turn_id
    from profuser.data import Reject
    from profuser.prep.align_stage import Target, TeacherRows, align_sample, make_pair

    cfg = parse_config(tiny_config_dict(tiny_suite, prepped))
    eot = end_of_turn_id(target.tokenizer, target.template)
    pair = make_pair(cfg, tmp_path, cfg.model("vicuna_spm"), Target(target, eot, 256))
    row = TeacherRows(part_table(prepped, "teacher", "training/vicuna_spm").slice(0, 1), 5).row(0)
    rid = part_table(prepped, "teacher", "training/vicuna_spm").slice(0, 1)["id"][0].as_py()
    msgs = rows_by_key(prepped, "normalize", "records")[(rid,)]["messages"]
    args = (np.array(row["token_ids"]), row["token_logprobs"], row["topk_ids"], row["topk_logprobs"])

    ok = align_sample(pair, Target(target, eot, 256), "truncate_left", msgs, row["response"], *args)
    assert ok["method"] == "project" and ok["n_aligned"] < ok["n_transferred"] < ok["n_response"]
    assert ok["n_text_transferred"] == ok["n_text"]
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
        assert e.value.kind == kind, (kind, e.value.detail)


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
        for m in PREP_MODES:
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
            assert p["all"]["text_share"] > 0.99 and 0 < p["all"]["kept_mass"] <= 1


def test_a_tokenizer_without_offsets_is_aligned_by_mined(tiny_suite, tmp_path):
    """A source whose tokenizer is remote Python code (no Rust backend, no converter): `check` says
    how it will be aligned and aligns a sample; prep aligns it by MinED (1:1 pairs) instead of failing."""
    from profuser.check import run_check
    from slow_tokenizer import build_char_model

    d = tiny_config_dict(tiny_suite, tmp_path / "run")
    d["sources"] = [{"name": "chars", "path": str(build_char_model(tmp_path / "chars")), "trust_remote_code": True}]
    d["data"]["limit"] = 6
    d["wandb"] = {"enabled": False}
    cfg = parse_config(d)
    rep = run_check(cfg)
    assert rep.ok, rep.text()
    assert any(line.startswith("align chars -> target: MinED") for line in rep.lines), rep.text()
    assert any("chars" in line and " no " in line for line in rep.lines)  # the offsets column says no
    run_prep(cfg)
    run = Path(d["run_dir"])
    rows = part_table(run, "align", "training").to_pylist()
    assert len(rows) == 6 and {r["method"] for r in rows} == {"mined"}
    assert all(0 < r["n_transferred"] < r["n_response"] and r["n_aligned"] == r["n_transferred"] for r in rows)
    assert manifest(run, "align")["pairs"]["chars->target"]["method"] == "mined"
    assert manifest(run, "build")["counts"]["out"] == 6


def test_check_refuses_a_pair_it_cannot_align(tiny_suite, tmp_path):
    """A target template that rewrites the answer (doubles its spaces) leaves nothing to align:
    `check` names each source and the reason, before any model is loaded; one that upper-cases it
    is refused when its end of turn is looked for."""
    from profuser.chat import BUILTIN_TEMPLATES
    from profuser.check import run_check

    d = tiny_config_dict(tiny_suite, tmp_path / "run")
    d["target"]["chat_template"] = BUILTIN_TEMPLATES["chatml"].replace("m['content']", "(m['content'] | upper)")
    rep = run_check(parse_config(d))
    assert any(p.startswith("target target: chat template (inline): the chat template does not write the assistant's")
               for p in rep.problems), rep.problems
    d["target"]["chat_template"] = BUILTIN_TEMPLATES["chatml"].replace(
        "m['content']", "(m['content'] | replace(' ', '  '))")
    rep = run_check(parse_config(d))
    assert not rep.ok
    for s in ("vicuna_spm", "gemma_unigram"):
        assert any(p.startswith(f"source {s}: its tokens cannot be aligned with the target target (unalignable)")
                   and "verbatim" in p for p in rep.problems), rep.problems
