"""Data normalization: every format in, every malformed row out with its reason, counts add up."""
import json
from collections import Counter

import pytest

from profuser.data import content_id, make_length_check, normalize

GOOD_MSG = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def _jsonl(tmp_path, rows, name="d.jsonl") -> str:
    p = tmp_path / name
    with open(p, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r, ensure_ascii=False) + "\n").encode())
    return str(p)


def test_messages_jsonl_multiturn_and_meta(tmp_path):
    row = {"id": "a1", "skill": "math", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"}]}
    res = normalize(_jsonl(tmp_path, [row]))
    (rec,) = res.records
    assert rec["id"] == "a1" and rec["reference"] == "6" and rec["meta"] == {"skill": "math"}
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant", "user"]


def test_alpaca_json_and_sharegpt(tmp_path):
    alp = tmp_path / "a.json"
    alp.write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"},
                               {"instruction": "Say hi", "input": "", "output": "hi"}]))
    recs = normalize(alp).records
    assert recs[0]["messages"] == [{"role": "user", "content": "Add\n\n2 and 3"}] and recs[0]["reference"] == "5"
    assert recs[1]["messages"][0]["content"] == "Say hi"
    sg = _jsonl(tmp_path, [{"id": 7, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    (rec,) = normalize(sg).records
    assert rec["id"] == "7" and rec["messages"] == [{"role": "user", "content": "q"}] and rec["reference"] == "a"


def test_saved_hf_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"instruction": "x", "input": "", "output": "y"},
                                     {"instruction": "z", "input": "w", "output": ""}])
    ds.save_to_disk(str(tmp_path / "hf"))
    res = normalize(tmp_path / "hf")
    assert res.counts["accepted"] == 1 and res.rejects[0]["kind"] == "empty_response" and res.rejects[0]["row"] == 2


def test_forced_format_rejects_other_shapes(tmp_path):
    res = normalize(_jsonl(tmp_path, [GOOD_MSG]), fmt="alpaca")
    assert res.counts["accepted"] == 0 and res.rejects[0]["kind"] == "missing_fields"


def test_ids_are_stable_content_hashes(tmp_path):
    a = normalize(_jsonl(tmp_path, [GOOD_MSG], "a.jsonl")).records[0]["id"]
    b = normalize(_jsonl(tmp_path, [{"x": 1}, GOOD_MSG], "b.jsonl")).records[0]["id"]
    assert a == b == content_id(GOOD_MSG["messages"][:1], "Hello!") and len(a) == 16


MALFORMED = [
    (b'{"messages": [\n', "invalid_json"),
    ({"messages": [{"role": "user", "content": "q"}]}, "wrong_role_order"),          # no reference
    ({"prompt": "q", "answer": "a"}, "missing_fields"),
    ({"instruction": "q", "input": "", "output": "   "}, "empty_response"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "wrong_role_order"),
    ({"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]}, "non_string_content"),
    ({"id": "dup", **GOOD_MSG}, None),                                                 # first one is fine
    ({"id": "dup", "instruction": "other", "output": "x"}, "duplicate_id"),
    ({"instruction": "long " * 400, "output": "x"}, "over_length"),
    (b'{"instruction": "caf\xe9", "output": "x"}\n', "invalid_utf8"),
    ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "bad_role"),
    ([1, 2], "not_an_object"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 5}]}, "non_string_content"),
]


def test_malformed_rows_each_rejected_with_reason(tmp_path, tiny_models):
    from profuser.config import ModelConfig
    from profuser.models import load_chat_tokenizer

    cm = load_chat_tokenizer(ModelConfig(path=str(tiny_models["target"])))
    counter = Counter()
    check = make_length_check(cm.tokenizer, cm.template, 128, "reject", counter)
    rows = [r for r, _ in MALFORMED]
    res = normalize(_jsonl(tmp_path, rows), length_check=check)
    by_row = {r["row"]: r for r in res.rejects}
    for line, (_, kind) in enumerate(MALFORMED, 1):
        if kind is None:
            assert line not in by_row
        else:
            assert by_row[line]["kind"] == kind, (line, by_row.get(line))
            assert by_row[line]["reason"].startswith(kind + ":") and len(by_row[line]["reason"]) > len(kind) + 3
    assert res.counts["accepted"] + res.counts["rejected"] == res.n_rows == len(MALFORMED)
    assert len({k for _, k in MALFORMED if k}) >= 8
    assert counter == Counter({"fits": 1, "rejected": 1})
    assert by_row[1]["row"] == 1 and by_row[10]["row"] == 10  # line numbers, not indices into survivors


def test_truncate_policy_counts_instead_of_rejecting(tmp_path, tiny_models):
    from profuser.config import ModelConfig
    from profuser.models import load_chat_tokenizer

    cm = load_chat_tokenizer(ModelConfig(path=str(tiny_models["target"])))
    counter = Counter()
    check = make_length_check(cm.tokenizer, cm.template, 64, "truncate_left", counter)
    res = normalize(_jsonl(tmp_path, [{"instruction": "long " * 200, "output": "x"}, GOOD_MSG,
                                      {"instruction": "q", "output": "word " * 200}]), length_check=check)
    assert res.counts["accepted"] == 2 and counter["truncated"] == 1 and counter["fits"] == 1
    assert res.rejects[0]["kind"] == "over_length" and "response alone" in res.rejects[0]["reason"]


def test_limit_and_unreadable_files(tmp_path):
    res = normalize(_jsonl(tmp_path, [GOOD_MSG] * 5), limit=2)
    assert res.n_rows == 2
    bad = tmp_path / "x.csv"
    bad.write_text("a,b")
    with pytest.raises(ValueError, match="expected .jsonl, .json"):
        normalize(bad)
    broken = tmp_path / "b.json"
    broken.write_text("[{]")
    with pytest.raises(ValueError, match="not valid JSON"):
        normalize(broken)
