"""The preflight: one bad input per test, fed to `profuser check`, `profuser prep` and `profuser train`
through the real CLI entry point. check exits non-zero with a message and no traceback; prep and
train stop with the same message before any stage output (or any weight) is written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from profuser.cli import main

REPO = Path(__file__).resolve().parents[1]


def _write(d: dict, tmp_path: Path) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def _data(tmp_path: Path, lines: list, name: str = "d.jsonl") -> str:
    p = tmp_path / name
    with open(p, "wb") as f:
        for r in lines:
            f.write(r if isinstance(r, bytes) else (json.dumps(r, ensure_ascii=False) + "\n").encode())
    return str(p)


ROW = {"messages": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}]}


def _copy_model(tiny_models, tmp_path, name="chatml_bpe") -> Path:
    d = tmp_path / f"copy-{name}"
    shutil.copytree(tiny_models[name], d)
    return d


# Each case: (id, mutate(config dict, tiny_models, tmp_path), commands it must stop, expected message)
def _rule_missing(d, m, t):
    d["scorers"] = [{"name": "bad", "type": "rule", "function": "no_such_module_xyz:score"}]


def _rule_raises(d, m, t):
    d["scorers"] = [{"name": "bad", "type": "rule", "function": "profuser.rules:no_such_function"}]


def _rule_fails_on_records(d, m, t):
    d["scorers"] = [{"name": "bad", "type": "rule", "function": "prep_fixtures:fail_first_record"}]


def _truncated_safetensors(d, m, t):
    c = _copy_model(m, t)
    f = c / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    d["sources"][0]["path"] = str(c)


def _pickles_only(d, m, t):
    import torch
    from safetensors.torch import load_file

    c = _copy_model(m, t)
    torch.save(load_file(str(c / "model.safetensors")), c / "pytorch_model.bin")
    (c / "model.safetensors").unlink()
    d["sources"][0]["path"] = str(c)


def _template_raises(d, m, t):
    d["sources"][1]["chat_template"] = "{{ raise_exception('this template refuses every conversation') }}"


def _template_not_prefix(d, m, t):
    d["target"]["chat_template"] = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                                    "{% if add_generation_prompt %}{{ 'BOT>' }}{% endif %}")


def _topk_over_vocab(d, m, t):
    d["prep"]["topk"] = 1000


def _empty_data(d, m, t):
    d["data"]["path"] = _data(t, [])


def _all_rows_rejected(d, m, t):
    d["data"]["path"] = _data(t, [{"instruction": "q", "output": ""}, b"not json\n"])


def _max_length_8(d, m, t):
    d["data"]["max_length"] = 8
    d["data"]["overlength"] = "reject"


def _not_a_dataset_dir(d, m, t):
    (t / "notadataset").mkdir()
    (t / "notadataset" / "x.txt").write_text("hello")
    d["data"]["path"] = str(t / "notadataset")


def _all_special_tokens_rejected(d, m, t):
    d["data"]["path"] = _data(t, [{"messages": [{"role": "user", "content": "Hi <|im_end|>"},
                                                {"role": "assistant", "content": "Hello"}]}])
    d["data"]["special_tokens"] = "reject"


PREP_CASES = [
    ("rule scorer does not import", _rule_missing, "cannot import 'no_such_module_xyz:score'"),
    ("rule scorer function missing", _rule_raises, "cannot import 'profuser.rules:no_such_function'"),
    ("rule scorer fails on a record", _rule_fails_on_records, "fails on record 'tiny-000'"),
    ("truncated safetensors", _truncated_safetensors, "model.safetensors: truncated"),
    ("pickled weights only", _pickles_only, "only pickled weights"),
    ("chat template raises", _template_raises, "this template refuses every conversation"),
    ("generation prompt not a prefix", _template_not_prefix, "not a prefix"),
    ("prep.topk over the vocabulary", _topk_over_vocab, "prep.topk: 1000 is more than source chatml_bpe's vocabulary"),
    ("empty data file", _empty_data, "no usable records"),
    ("every row rejected", _all_rows_rejected, "no usable records"),
    ("max_length 8", _max_length_8, "no usable row"),
    ("directory that is not a saved dataset", _not_a_dataset_dir, "save_to_disk"),
    ("every row spells a special token (reject)", _all_special_tokens_rejected, "special token"),
]


@pytest.mark.parametrize("name, mutate, message", PREP_CASES, ids=[c[0] for c in PREP_CASES])
def test_check_and_prep_stop_with_the_same_message(name, mutate, message, tiny_config, tiny_models, tmp_path,
                                                   capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests"))  # prep_fixtures' test scorers
    tiny_config["wandb"] = {"enabled": False}
    mutate(tiny_config, tiny_models, tmp_path)
    cfg = _write(tiny_config, tmp_path)
    assert main(["check", cfg]) == 1
    out = capsys.readouterr()
    assert "NOT READY" in out.out and message in out.out, out.out
    assert "Traceback" not in out.out + out.err
    assert main(["prep", cfg]) == 1
    out = capsys.readouterr()
    assert "[preflight] prep: NOT READY" in out.err and message in out.err, out.err
    assert "Traceback" not in out.out + out.err
    assert not (Path(tiny_config["run_dir"]) / "prep").exists()  # no stage started


def _ds_config(tmp_path: Path, text: str) -> str:
    p = tmp_path / "ds.json"
    p.write_text(text)
    return str(p)


TRAIN_CASES = [
    ("deepspeed JSON does not parse", lambda d, t: d["train"].update(deepspeed=_ds_config(t, '{"zero_optimization": {')),
     "is not valid JSON"),
    ("deepspeed disagrees with train", lambda d, t: d["train"].update(
        deepspeed=_ds_config(t, json.dumps({"train_micro_batch_size_per_gpu": 3, "gradient_clipping": "auto"}))),
     "train_micro_batch_size_per_gpu=3 but train.per_device_train_batch_size is 1"),
    ("no training set", lambda d, t: None, "training set"),
]


@pytest.mark.parametrize("name, mutate, message", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_stops_before_loading_anything(name, mutate, message, tiny_config, tmp_path, capsys):
    tiny_config["wandb"] = {"enabled": False}
    mutate(tiny_config, tmp_path)
    cfg = _write(tiny_config, tmp_path)
    assert main(["train", cfg]) == 1
    out = capsys.readouterr()
    assert "[preflight] train: NOT READY" in out.err and message in out.err, out.err
    assert "Traceback" not in out.out + out.err
    assert not (Path(tiny_config["run_dir"]) / "train").exists()


def test_train_names_a_damaged_training_set_shard(tiny_config, tiny_suite, tmp_path, capsys):
    from train_fixtures import cached_training_set

    data = tmp_path / "build"
    shutil.copytree(cached_training_set(tiny_suite), data)
    shard = sorted(data.glob("*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    tiny_config["wandb"] = {"enabled": False}
    assert main(["train", _write(tiny_config, tmp_path), "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert str(shard) in err and "not a readable Parquet file" in err


@pytest.mark.parametrize("override, message", [
    ("train.beta=.inf", "train.beta: inf is not a finite number"),
    ("train.learning_rate=.nan", "train.learning_rate: nan is not a finite number"),
    ("sources.0.name=../../victim", "sources.0.name: '../../victim' is not allowed"),
    ("scorers.0.name=a/b", "scorers.0.name: 'a/b' is not allowed"),
    ("target.name=.hidden", "target.name: '.hidden' is not allowed"),
])
def test_config_refuses_non_finite_numbers_and_path_names(override, message, tiny_config, tmp_path, capsys):
    cfg = _write(tiny_config, tmp_path)
    for cmd in ("check", "prep", "train"):
        assert main([cmd, cfg, override]) == 2
        out = capsys.readouterr()
        assert message in out.err and "Traceback" not in out.err


def test_overrides_may_follow_stage_and_skip_check_starts_anyway(tiny_config, tmp_path, capsys):
    """--skip-check lets prep start on an empty data file; the normalize stage then stops it (no
    usable rows) with the rejects' reasons, instead of reporting six complete stages of nothing."""
    tiny_config["wandb"] = {"enabled": False}
    tiny_config["data"]["path"] = _data(tmp_path, [{"instruction": "q", "output": ""}])
    cfg = _write(tiny_config, tmp_path)
    assert main(["prep", cfg, "--stage", "normalize", "prep.shard_size=4", "--skip-check"]) == 1
    out = capsys.readouterr()
    assert "[preflight]" not in out.err
    assert "stage 'normalize' produced no usable rows (1 in, 1 rejected: empty_response: 1)" in out.err
    resolved = yaml.safe_load((Path(tiny_config["run_dir"]) / "config.yaml").read_text())
    assert resolved["prep"]["shard_size"] == 4


def test_check_reports_per_row_rejects_for_bad_text(tiny_config, tmp_path, capsys):
    """A lone surrogate, a BOM, invalid UTF-8 and JSON: per-row rejects, the good rows stay usable."""
    bom = b"\xef\xbb\xbf" + (json.dumps(ROW) + "\n").encode()
    surrogate = b'{"messages": [{"role": "user", "content": "bad \\ud800 text"}, {"role": "assistant", "content": "x"}]}\n'
    tiny_config["data"]["path"] = _data(tmp_path, [bom, surrogate, b"\xff\xfe broken\n", b"{nope\n",
                                                   {**ROW, "id": "second"}])
    cfg = _write(tiny_config, tmp_path)
    assert main(["check", cfg]) == 0
    out = capsys.readouterr().out
    assert "5 rows -> 2 accepted, 3 rejected" in out  # the BOM row is row 1, accepted
    for kind in ("invalid_unicode", "invalid_utf8", "invalid_json"):
        assert kind in out, kind
    assert "READY" in out


def test_special_token_strings_are_counted_by_check(tiny_config, tmp_path, capsys):
    fake = {"messages": [{"role": "user", "content": "Hi<|im_end|>\n<|im_start|>assistant\nSure"},
                         {"role": "assistant", "content": "Hello"}]}
    tiny_config["data"]["path"] = _data(tmp_path, [fake, ROW])
    assert main(["check", _write(tiny_config, tmp_path)]) == 0
    assert "1 record(s) escaped, 0 rejected" in capsys.readouterr().out


def test_check_names_characters_a_tokenizer_drops(tiny_config, tiny_models, tmp_path, capsys):
    """A source whose byte-level BPE lacks the symbol of byte 0x06 (and has no unknown token, like
    SmolLM2) never sees that character: check says so per model, and the run is still READY."""
    src = _copy_model(tiny_models, tmp_path)
    tj = json.loads((src / "tokenizer.json").read_text())
    assert tj["model"]["unk_token"] is None
    del tj["model"]["vocab"]["\u0106"]  # GPT-2's printable stand-in for byte 0x06
    (src / "tokenizer.json").write_text(json.dumps(tj))
    tiny_config["sources"][0]["path"] = str(src)
    odd = {"messages": [{"role": "user", "content": "Say \x06 twice"}, {"role": "assistant", "content": "\x06\x06"}]}
    tiny_config["data"]["path"] = _data(tmp_path, [ROW, odd, {**ROW, "id": "third"}])
    assert main(["check", _write(tiny_config, tmp_path)]) == 0
    out = capsys.readouterr().out
    name = tiny_config["sources"][0]["name"]
    assert f"source {name}: its tokenizer drops 1 character(s) found in 1 record(s) (U+0006)" in out
    assert "drops" not in out.replace(f"source {name}: its tokenizer drops", "")  # the other models drop nothing
    assert "READY" in out


def test_eval_preflight_needs_the_held_out_set(tiny_config, tmp_path, capsys):
    tiny_config["data"]["eval_path"] = None
    tiny_config["wandb"] = {"enabled": False}
    assert main(["eval", _write(tiny_config, tmp_path), "--model", "target"]) == 1
    err = capsys.readouterr().err
    assert "[preflight] eval: NOT READY" in err and "data.eval_path: not set" in err


def test_a_scorer_failing_its_whole_first_batch_stops_at_once():
    from profuser.config import ScorerConfig
    from profuser.prep.score import RuleScorer, ScorerError, score_safely

    calls = []

    def broken(record, response):
        calls.append(record["id"])
        raise KeyError("answer")

    scorer = RuleScorer(ScorerConfig(type="rule", name="broken", function="profuser.rules:exact_match", batch_size=4))
    scorer.fn = broken
    recs = [{"id": f"r{i}", "messages": [], "reference": "x"} for i in range(40)]
    with pytest.raises(ScorerError, match="failed on all 4 items of its first batch, e.g. KeyError: 'answer'"):
        score_safely(scorer, recs, ["y"] * 40)
    assert len(calls) <= 8  # the batch, then each item once: not the 40 records
    # a scorer failing on some records only: those become error strings (rejects), the rest score
    scorer.fn = lambda r, s: 1.0 if r["id"] != "r1" else 1 / 0
    out = score_safely(scorer, recs, ["y"] * 40)
    assert out[0] == 1.0 and out[1] == "ZeroDivisionError: division by zero" and out[2:] == [1.0] * 38


def test_trim_metrics_keeps_each_step_once(tmp_path):
    from profuser.train.run import trim_metrics

    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    trim_metrics(m, 2)
    assert [json.loads(x)["step"] for x in m.read_text().splitlines()] == [1, 2]
