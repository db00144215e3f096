"""Data-prep components on small hand-made inputs: voting, fp32 top-k, batching, storage, hashing."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from profuser.config import ScorerConfig
from profuser.prep.score import RuleScorer, pick_winner, score_safely
from profuser.prep.shards import StageDir, diff_deps, stable_hash
from profuser.prep.stages import owner
from profuser.prep.formats import TEACHER_SCHEMA, teacher_table
from profuser.prep.teacher import teacher_forward, topk_from_logits


# --------------------------------------------------------------------------------------------
# voting


def test_majority_vote_then_mean_z_then_config_order():
    # three scorers: candidate 1 wins two of them
    w, votes, _ = pick_winner(np.array([[0.1, 0.9, 0.5], [1.0, 2.0, 0.0], [3.0, 1.0, 2.0]]))
    assert w == 1 and votes == [1.0, 2.0, 0.0]
    # one vote each: the higher mean z-score wins (hand-computed: z of [0,1] is [-1,1])
    w, votes, z = pick_winner(np.array([[0.0, 1.0], [10.0, 0.0]]))
    assert votes == [1.0, 1.0] and z == [0.0, 0.0] and w == 0  # exact tie -> earlier source
    w, _, z = pick_winner(np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 3.0]]))
    assert w == 1 and z == pytest.approx([-1 / 3, 1 / 3])
    # a scorer's tied best candidates share its vote; votes stay exact fractions
    w, votes, _ = pick_winner(np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    assert votes == [1.0, 1.0, 1.0] and w == 0
    w, votes, _ = pick_winner(np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert votes == [0.5, 0.5, 1.0] and w == 2


def _rule(record, response):
    if response == "boom":
        raise ValueError("bad response")
    if response == "nan":
        return float("nan")
    return float(len(response))


def test_a_scorer_failing_on_one_item_costs_only_that_item():
    sc = RuleScorer(ScorerConfig(type="rule", name="r", function=f"{__name__}:_rule", batch_size=2))
    recs = [{"reference": "x"}] * 5
    out = score_safely(sc, recs, ["a", "boom", "abc", "nan", "ab"])
    assert out[0] == 1.0 and out[2] == 3.0 and out[4] == 2.0
    assert out[1] == "ValueError: bad response" and out[3].startswith("non-finite score")


# --------------------------------------------------------------------------------------------
# top-k and CE from logits


def test_topk_is_fp32_chunk_invariant_and_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(37, 1000) * 5
    labels = torch.randint(0, 1000, (37,))
    ref = logits.double().log_softmax(-1)
    for chunk in (1, 8, 37, 100):
        nll, ids, lps = topk_from_logits(logits, labels, 10, chunk)
        assert ids.dtype == torch.int32 and lps.dtype == torch.float32
        assert torch.equal(ids.long(), ref.topk(10).indices)
        torch.testing.assert_close(lps.double(), ref.topk(10).values, rtol=0, atol=1e-5)
        torch.testing.assert_close(nll.double(), -ref.gather(1, labels[:, None]).squeeze(1), rtol=0, atol=1e-5)


def test_half_precision_logits_are_ranked_in_fp32():
    """bf16 logits are upcast per chunk before top-k: the log-probs are those of the bf16 values
    computed in fp32 (not a half-precision log-softmax, which loses the small differences)."""
    torch.manual_seed(1)
    logits = (torch.randn(5, 50000) * 3).to(torch.bfloat16)
    _, ids, lps = topk_from_logits(logits, torch.zeros(5, dtype=torch.long), 10, 2)
    ref = logits.float().log_softmax(-1).topk(10)
    torch.testing.assert_close(lps, ref.values, rtol=0, atol=1e-5)
    half = logits.log_softmax(-1).float().topk(10).values  # what a bf16 log-softmax would store
    assert (half - ref.values).abs().max() > 1e-3


def test_teacher_forward_batch_equals_one_sequence_at_a_time(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma_unigram"], dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(10, 500, (n,), generator=g).tolist() for n in (9, 23, 4, 15)]
    n_resp = [3, 10, 2, 14]
    batch = teacher_forward(model, seqs, n_resp, k=6, chunk=7, pad_id=0)
    for s, r, b in zip(seqs, n_resp, batch):
        (one,) = teacher_forward(model, [s], [r], k=6, chunk=1000)
        with torch.no_grad():
            logp = model(torch.tensor([s])).logits[0].double().log_softmax(-1)[len(s) - 1 - r:-1]
        assert b.topk_ids.shape == (r, 6) and b.topk_ids.dtype == np.int32 and b.topk_logprobs.dtype == np.float16
        assert np.array_equal(b.topk_ids, one.topk_ids) and np.array_equal(b.topk_ids, logp.topk(6).indices.numpy())
        assert abs(b.ce - one.ce) < 1e-5
        assert abs(b.ce + logp.gather(1, torch.tensor(s[-r:])[:, None]).mean().item()) < 1e-5


# --------------------------------------------------------------------------------------------
# storage


def _fake_rows(n_rows: int, k: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(n_rows):
        r = int(rng.integers(1, 30))
        lp = -np.sort(rng.exponential(3, size=(r, k)), axis=1).astype(np.float16)
        rows.append({"id": f"r{j}", "mode": "training", "source": "s", "response": "x" * r, "ce": float(rng.random()),
                     "text_nll": float(rng.random() * r), "text_bytes": r, "text_tokens": max(r - 1, 1),
                     "token_ids": rng.integers(0, 50000, r).tolist(),
                     "token_logprobs": -rng.exponential(2, r).astype(np.float16),
                     "topk_ids": rng.integers(0, 50000, (r, k)).astype(np.int32), "topk_logprobs": lp})
    return rows


def test_teacher_table_round_trips_through_parquet_and_datasets(tmp_path):
    import datasets

    rows = _fake_rows(7, 4)
    table = teacher_table(rows)
    assert table.schema.equals(TEACHER_SCHEMA)
    sd = StageDir(tmp_path, "teacher")
    sd.commit("training/s", 0, table, {"in": 7})
    sd.commit("training/s", 1, teacher_table([]), {"in": 0})  # an empty shard keeps the schema
    assert sd.read("training/s", 1).schema.equals(TEACHER_SCHEMA)
    ds = datasets.Dataset.from_parquet(str(sd.shard_path("training/s", 0)), cache_dir=str(tmp_path / "cache"))
    for r, back in zip(rows, ds):
        assert np.array_equal(np.array(back["topk_ids"]), r["topk_ids"])
        assert np.array_equal(np.array(back["topk_logprobs"], np.float16), r["topk_logprobs"])
        assert back["token_ids"] == r["token_ids"] and back["n_tokens"] == len(r["token_ids"])
        assert np.array_equal(np.array(back["token_logprobs"], np.float16), r["token_logprobs"])
        assert (back["text_nll"], back["text_bytes"], back["text_tokens"]) == (r["text_nll"], r["text_bytes"],
                                                                              r["text_tokens"])


def test_commit_is_atomic_and_the_sidecar_marks_done(tmp_path):
    sd = StageDir(tmp_path, "generate")
    t = pa.table({"id": ["a"]})
    assert not sd.is_done("p", 0)
    sd.commit("p", 0, t, {"in": 1, "out": 1})
    assert sd.is_done("p", 0) and json.loads(sd.sidecar_path("p", 0).read_text())["rows"] == 1
    assert not list(sd.root.rglob("*.tmp*"))
    sd.sidecar_path("p", 0).unlink()  # rows written, sidecar not yet: not done (recomputed on resume)
    assert not sd.is_done("p", 0)
    (sd.part_dir("p") / "shard-00001.parquet.tmp123").write_text("partial")
    sd.clean_tmp()
    assert not list(sd.root.rglob("*.tmp*"))


def test_dependency_diff_names_the_changed_key():
    old = {"upstream": {"normalize/records": "aaa"}, "generate": {"max_new_tokens": 16, "do_sample": False}}
    new = {"upstream": {"normalize/records": "bbb"}, "generate": {"max_new_tokens": 8, "do_sample": False}}
    assert diff_deps(old, new) == ["generate.max_new_tokens: 16 -> 8", "upstream normalize/records changed"]
    assert stable_hash(old) == stable_hash(json.loads(json.dumps(old))) != stable_hash(new)


def test_shard_assignment_covers_every_unit_once():
    groups = ["a", "b", "c"]
    for world in (1, 2, 3, 5):
        seen = [(g, i) for r in range(world) for g in groups for i in range(7) if owner(groups, g, i, 7, world) == r]
        assert sorted(seen) == sorted((g, i) for g in groups for i in range(7))


def test_stage_scripts_and_cli_expose_the_stages():
    from profuser.cli import build_parser

    for argv in (["prep", "--stage", "score", "cfg.yaml", "prep.topk=3"], ["prep", "cfg.yaml", "prep.topk=3", "--stage", "score"]):
        args = build_parser().parse_args(argv)
        assert args.stage == "score" and args.config == "cfg.yaml" and args.overrides == ["prep.topk=3"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prep", "cfg.yaml", "--stage", "nope"])
    root = os.path.join(os.path.dirname(__file__), "..")
    for st in ("normalize", "generate", "score", "teacher"):
        text = open(os.path.join(root, "data_prep", f"{st}.py")).read()
        assert f'script_main("{st}")' in text and text.splitlines()[2].strip().startswith(f"python data_prep/{st}.py")


# --------------------------------------------------------------------------------------------
# generation


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_models):
    from profuser.config import GenerateConfig, ModelConfig
    from profuser.models import load_chat_model
    from profuser.prep.generate import HFGenerator, prompt_ids, stop_ids

    cm = load_chat_model(ModelConfig(path=str(tiny_models["chatml_bpe"]), name="c"), device="cpu")
    questions = ["What is 3 plus 4?", "Reverse the word \"garden\".", "What is the capital of Peru?", "Hi"]
    prompts = [prompt_ids(cm, [{"role": "user", "content": q}], 256)[0] for q in questions]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch is really left-padded
    batched = HFGenerator(cm, GenerateConfig(max_new_tokens=12, batch_size=4)).generate(prompts, seed=0)
    single = HFGenerator(cm, GenerateConfig(max_new_tokens=12, batch_size=1)).generate(prompts, seed=0)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    stop = set(stop_ids(cm))
    for g in batched:
        assert not stop & set(g.token_ids) and g.finish_reason == ("length" if len(g.token_ids) == 12 else "stop")

    sampling = GenerateConfig(max_new_tokens=12, batch_size=4, do_sample=True, temperature=1.5)
    a = HFGenerator(cm, sampling).generate(prompts, seed=7)
    b = HFGenerator(cm, sampling).generate(prompts, seed=7)
    c = HFGenerator(cm, sampling).generate(prompts, seed=8)
    assert [g.token_ids for g in a] == [g.token_ids for g in b] != [g.token_ids for g in c]


def test_token_batches_close_at_the_cap_and_keep_every_text_once():
    """The align stage's projection batches: consecutive texts, each batch closed as soon as it holds
    `cap` target tokens (so below cap + the last text's size), every text exactly once; cap 0 gives
    one text per batch."""
    from profuser.prep.align_stage import token_batches

    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 50, size=int(rng.integers(0, 30))).tolist()
        cap = int(rng.integers(0, 120))
        parts = token_batches(sizes, cap)
        assert [i for p in parts for i in p] == list(range(len(sizes)))
        for p in parts[:-1]:
            assert sum(sizes[i] for i in p) >= cap and sum(sizes[i] for i in p[:-1]) < max(cap, 1)
        assert all(len(p) == 1 for p in token_batches(sizes, 0))
