"""The training set reader and the per-mode collator (no loss math, no dense [T, V] tensors)."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from profuser.train.collator import RawBatch, collate, collate_mode, count_targets, placeholder_mode
from profuser.train.dataset import FusionDataset, LengthGroupedSampler, TrainingSetError
from train_fixtures import cached_training_set, write_shards


@pytest.fixture(scope="module")
def build_dir(tiny_suite):
    return cached_training_set(tiny_suite)


@pytest.fixture(scope="module")
def dataset(build_dir, tmp_path_factory):
    return FusionDataset(build_dir, cache_dir=tmp_path_factory.mktemp("dscache"))


def test_reads_build_rows_as_sparse_numpy(dataset, tiny_suite):
    assert len(dataset) == 8
    assert dataset.mode_counts() == {"inference": 7, "training": 8}  # tiny-004 has no inference mode
    assert dataset.teacher_names == ["chatml_bpe", "chatml_bpe_b"]
    s = dataset[0]
    assert s["id"] == "tiny-000"
    for mode in ("inference", "training"):
        r = s[mode]
        T = len(r["input_ids"])
        assert r["input_ids"].dtype == np.int64 and r["labels"].shape == (T,)
        assert r["topk_ids"].dtype == np.int32 and r["topk_ids"].shape == (T, 5)
        assert r["topk_logprobs"].dtype == np.float16 and r["topk_logprobs"].shape == (T, 5)
        prompt = (r["labels"] == -100).sum()
        assert (r["topk_ids"][:prompt] == -1).all()  # prompt rows carry no teacher
        assert (r["topk_ids"][prompt + 1:] >= 0).any(axis=1).mean() > 0.7  # most response rows do
        assert r["teacher"] in dataset.teacher_names and r["teacher_score"] < 0
    # the two modes train on different responses of the same prompt
    assert not np.array_equal(s["inference"]["input_ids"], s["training"]["input_ids"])
    absent = dataset[4]
    assert absent["id"] == "tiny-004" and absent["inference"] is None and absent["training"] is not None
    assert dataset.lengths()[0] == max(len(s["inference"]["input_ids"]), len(s["training"]["input_ids"]))


def test_reports_bad_training_sets(tmp_path, build_dir):
    with pytest.raises(TrainingSetError, match="does not exist; run the prep stages"):
        FusionDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingSetError, match="no \\*.parquet shards"):
        FusionDataset(tmp_path / "empty")
    table = pq.read_table(sorted(build_dir.glob("*.parquet"))[0]).drop_columns(["training_topk_ids"])
    (tmp_path / "bad").mkdir()
    pq.write_table(table, tmp_path / "bad" / "x.parquet")
    with pytest.raises(TrainingSetError, match="lacks columns \\['training_topk_ids'\\]"):
        FusionDataset(tmp_path / "bad", cache_dir=tmp_path / "c")


def test_row_with_mismatched_teacher_is_named(tmp_path):
    row = {"id": "s1", "training": {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "teacher": "a",
                                    "teacher_score": 0.0, "topk_ids": np.zeros((2, 4), np.int32),
                                    "topk_logprobs": np.zeros((2, 4), np.float32)}}
    write_shards([row], tmp_path / "b", n_shards=1)
    ds = FusionDataset(tmp_path / "b", cache_dir=tmp_path / "c")
    with pytest.raises(TrainingSetError, match="sample 's1', mode training.*must both be \\[T=3, k\\]"):
        ds[0]


def _row(n, k, teacher=True, lp_dtype=np.float16, prompt=2):
    ids = np.arange(10, 10 + n)
    labels = ids.copy()
    labels[:prompt] = -100
    r = {"input_ids": ids, "labels": labels, "teacher": "t" if teacher else None, "teacher_score": 0.0,
         "topk_ids": None, "topk_logprobs": None}
    if teacher:
        r["topk_ids"] = np.arange(n * k, dtype=np.int32).reshape(n, k)
        r["topk_logprobs"] = -np.ones((n, k), dtype=lp_dtype)
    return r


def test_collate_mode_pads_dynamically_and_keeps_the_teacher_sparse():
    rows = [_row(5, 3), _row(3, 2), _row(4, 3, teacher=False)]
    b = collate_mode(rows, pad_token_id=0)
    assert b["input_ids"].shape == (3, 5) and b["input_ids"].dtype == torch.long
    assert b["topk_ids"].shape == (3, 5, 3) and b["topk_ids"].dtype == torch.int32
    assert b["topk_logprobs"].dtype == torch.float16  # stored precision; the loss converts per chunk
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert b["input_ids"][1].tolist() == [10, 11, 12, 0, 0]
    assert b["labels"][1].tolist() == [-100, -100, 12, -100, -100]
    assert (b["topk_ids"][1, 3:] == -1).all() and (b["topk_ids"][1, :3, 2] == -1).all()  # padding + narrower k
    assert (b["topk_ids"][2] == -1).all() and (b["topk_logprobs"][2] == 0).all()  # no teacher: CE only
    assert b["teacher"] == ["t", "t", None]
    assert count_targets(b["labels"]) == 3 + 1 + 2
    # fp32 log-probs anywhere keep fp32; padding to a multiple
    b = collate_mode([_row(5, 3), _row(3, 3, lp_dtype=np.float32)], pad_token_id=7, pad_to_multiple_of=8)
    assert b["topk_logprobs"].dtype == torch.float32 and b["input_ids"].shape == (2, 8)
    assert b["input_ids"][0, 5:].tolist() == [7, 7, 7]
    # no row with a teacher: no teacher tensors at all
    b = collate_mode([_row(3, 2, teacher=False)], pad_token_id=0)
    assert b["topk_ids"] is None and b["topk_logprobs"] is None


def test_collate_touches_only_the_assigned_modes(dataset):
    samples = RawBatch.collate_fn([dataset[i] for i in (3, 4, 5)])  # tiny-004 lacks inference
    out = collate(samples, {"training": [0, 1, 2]}, pad_token_id=0)
    assert list(out) == ["training"] and out["training"]["ids"] == ["tiny-003", "tiny-004", "tiny-005"]
    out = collate(samples, {"inference": [0, 1, 2], "training": [1]}, pad_token_id=0)
    assert out["inference"]["ids"] == ["tiny-003", "tiny-005"]  # a sample lacking the mode is left out
    assert out["training"]["ids"] == ["tiny-004"]
    assert collate(samples, {"inference": [1]}, pad_token_id=0) == {}  # nothing left for the mode
    for b in out.values():  # sparse everywhere: no tensor has the vocabulary as a dimension
        assert all(512 not in t.shape for t in b.values() if torch.is_tensor(t))


def test_placeholder_has_no_targets():
    p = placeholder_mode(pad_token_id=3)
    assert count_targets(p["labels"]) == 0 and p["attention_mask"].all() and p["teacher"] == []


def test_length_grouped_sampler_is_seeded_and_groups_lengths():
    lengths = [5, 50, 7, 48, 9, 46, 11, 44] * 4
    s = LengthGroupedSampler(lengths, batch_size=2, seed=3)  # groups of 4 batches (32 // (2 * 4))
    first = list(s)
    assert sorted(first) == list(range(len(lengths))) and list(s) == first  # a permutation, reproducible
    s.set_epoch(1)
    second = list(s)
    assert second != first
    s.set_epoch(0)
    assert list(s) == first
    resumed = LengthGroupedSampler(lengths, batch_size=2, seed=3)  # a new process resuming in epoch 1
    resumed.set_epoch(1)
    assert list(resumed) == second
    assert list(LengthGroupedSampler(lengths, batch_size=2, seed=4)) != first
    groups = [first[i:i + 8] for i in range(0, len(first), 8)]
    for g in groups:  # sorted by length after the head (the longest sample was swapped to the front)
        assert [lengths[j] for j in g[1:]] == sorted((lengths[j] for j in g[1:]), reverse=True)
    assert lengths[first[0]] == max(lengths)  # the longest sample first
