"""Data normalization: every format in, every malformed row out with its reason, counts add up."""
import json
from collections import Counter

import pytest

from profuser.data import content_id, length_problems, normalize

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

    chat_model = load_chat_tokenizer(ModelConfig(path=str(tiny_models["target"])))
    res = normalize(_jsonl(tmp_path, [r for r, _ in MALFORMED]))
    by_row = {r["row"]: r for r in res.rejects}
    for line, (_, kind) in enumerate(MALFORMED, 1):
        if kind in (None, "over_length"):  # parsed fine; the length is checked per model
            assert line not in by_row
        else:
            assert by_row[line]["kind"] == kind, (line, by_row.get(line))
            assert by_row[line]["reason"].startswith(kind + ":") and len(by_row[line]["reason"]) > len(kind) + 3
    assert res.counts["accepted"] + res.counts["rejected"] == res.n_rows == len(MALFORMED)
    assert len({k for _, k in MALFORMED if k}) >= 8
    assert by_row[1]["row"] == 1 and by_row[10]["row"] == 10  # line numbers, not indices into survivors
    counts = {"target": Counter()}
    problems = [length_problems(rec, [("target", chat_model, 128)], "reject", counts) for rec in res.records]
    assert [p[0][0] for p in problems if p] == ["over_length"]
    assert counts["target"] == Counter({"fits": 1, "rejected": 1})


def test_truncate_policy_counts_instead_of_rejecting(tmp_path, tiny_models):
    from profuser.config import ModelConfig
    from profuser.models import load_chat_tokenizer

    chat_model = load_chat_tokenizer(ModelConfig(path=str(tiny_models["target"])))
    res = normalize(_jsonl(tmp_path, [{"instruction": "long " * 200, "output": "x"}, GOOD_MSG,
                                      {"instruction": "q", "output": "word " * 200}]))
    counts = {"target": Counter()}
    problems = [length_problems(rec, [("target", chat_model, 64)], "truncate_left", counts) for rec in res.records]
    assert [bool(p) for p in problems] == [False, False, True]
    assert counts["target"] == Counter({"truncated": 1, "fits": 1, "rejected": 1})
    assert problems[2][0][0] == "over_length" and "response alone" in problems[2][0][1]


def test_a_record_one_model_rejects_is_rejected_for_all(tmp_path, tiny_models):
    """What the normalize stage keeps and the preflight counts: a record goes on only if every model takes it."""
    from profuser.config import ModelConfig
    from profuser.models import load_chat_tokenizer

    chat_model = load_chat_tokenizer(ModelConfig(path=str(tiny_models["target"])))
    rec = normalize(_jsonl(tmp_path, [{"instruction": "word " * 40, "output": "x"}])).records[0]
    counts = {"roomy": Counter(), "tight": Counter()}
    problems = length_problems(rec, [("roomy", chat_model, 512), ("tight", chat_model, 16)], "reject", counts)
    assert [(kind, why.split(":")[0]) for kind, why in problems] == [("over_length", "tight")]
    assert counts == {"roomy": Counter({"fits": 1}), "tight": Counter({"rejected": 1})}


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
