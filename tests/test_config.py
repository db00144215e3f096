"""Run config: parsing, validation messages, overrides, the resolved config file."""
from pathlib import Path

import pytest
import yaml

from profuser.config import (ConfigError, RunConfig, TrainConfig, WandbConfig, apply_override, load_config, parse_config,
                             reference_markdown, save_resolved, wandb_mode)

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, d) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_tiny_config_parses_with_defaults(tiny_config):
    cfg = parse_config(tiny_config)
    assert [s.name for s in cfg.sources] == ["chatml_bpe", "vicuna_spm", "gemma_unigram"]
    assert cfg.train.schedule == "profuser" and cfg.prep.topk == 5 and cfg.data.overlength == "truncate_left"
    assert cfg.model("target").path.endswith("target")


@pytest.mark.parametrize("override, key, value", [
    ("train.learnin_rate=1e-4", "train.learnin_rate", "unknown key"),
    ("sources.0.pth=/x", "sources.0.pth", "unknown key"),
    ("bogus=1", "bogus", "unknown key"),
])
def test_unknown_key_rejected(tiny_config, override, key, value):
    with pytest.raises(ConfigError) as e:
        parse_config(tiny_config, [override])
    assert key in str(e.value) and value in str(e.value) and "allowed keys" in str(e.value)


@pytest.mark.parametrize("override, key, shown", [
    ("prep.topk=ten", "prep.topk", "'ten'"),
    ("train.bf16=3", "train.bf16", "3"),
    ("prep.topk=true", "prep.topk", "True"),
    ("sources=notalist", "sources", "'notalist'"),
    ("data=[1]", "data", "[1]"),
])
def test_wrong_type_rejected(tiny_config, override, key, shown):
    with pytest.raises(ConfigError) as e:
        parse_config(tiny_config, [override])
    msg = str(e.value)
    assert msg.startswith(key + ":") and shown in msg and "expected" in msg


@pytest.mark.parametrize("override, key", [
    ("prep.topk=0", "prep.topk"),
    ("train.switch_fraction=1.5", "train.switch_fraction"),
    ("train.temperature=0", "train.temperature"),
    ("data.max_length=2", "data.max_length"),
    ("prep.generate.top_p=1.2", "prep.generate.top_p"),
])
def test_out_of_range_rejected(tiny_config, override, key):
    with pytest.raises(ConfigError) as e:
        parse_config(tiny_config, [override])
    value = override.split("=")[1]
    assert str(e.value).startswith(key) and value in str(e.value) and "out of range" in str(e.value)


def test_bad_choice_names_allowed_values(tiny_config):
    with pytest.raises(ConfigError) as e:
        parse_config(tiny_config, ["train.schedule=progressive"])
    assert "train.schedule" in str(e.value) and "'progressive'" in str(e.value) and "fusellm" in str(e.value)


def test_missing_required_and_semantic_errors(tiny_config):
    d = dict(tiny_config)
    del d["target"]
    with pytest.raises(ConfigError, match="target: required"):
        parse_config(d)
    with pytest.raises(ConfigError, match="at least one source"):
        parse_config(tiny_config, ["sources=[]"])
    with pytest.raises(ConfigError, match="duplicate names"):
        parse_config(tiny_config, ["sources.1.name=chatml_bpe"])
    with pytest.raises(ConfigError, match="scorers.0.function"):
        parse_config(tiny_config, ["scorers.0.function=nocolon"])


def test_missing_path_rejected(tiny_config, tmp_path):
    tiny_config["sources"][1]["path"] = str(tmp_path / "nope")
    tiny_config["data"]["path"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, tiny_config))
    msg = str(e.value)
    assert "sources.1.path" in msg and str(tmp_path / "nope") in msg and "does not exist" in msg
    assert "data.path" in msg and "missing.jsonl" in msg


def test_override_changes_resolved_config_and_is_written(tiny_config, tmp_path):
    path = _write(tmp_path, tiny_config)
    cfg = load_config(path, ["train.learning_rate=2e-5", "sources.2.chat_template=gemma", "prep.generate.do_sample=true",
                             "wandb.tags=[a, b]"])
    assert cfg.train.learning_rate == 2e-5 and cfg.sources[2].chat_template == "gemma"
    assert cfg.prep.generate.do_sample is True and cfg.wandb.tags == ["a", "b"]
    out = save_resolved(cfg)
    assert out == Path(cfg.run_dir) / "config.yaml"
    written = yaml.safe_load(out.read_text())
    assert written["train"]["learning_rate"] == 2e-5 and written["sources"][2]["chat_template"] == "gemma"
    # The written file is itself a valid config that resolves to the same thing.
    assert parse_config(written).to_dict() == cfg.to_dict()


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_override({}, "train.lr")
    with pytest.raises(ConfigError, match="not a valid index"):
        apply_override({"sources": [{}]}, "sources.5.path=/x")


def test_int_accepted_for_float_and_hash_is_stable(tiny_config):
    a = parse_config(tiny_config, ["train.learning_rate=1"])
    assert isinstance(a.train.learning_rate, float)
    b = parse_config(tiny_config, ["train.learning_rate=1"])
    assert a.section_hash("sources", "data") == b.section_hash("sources", "data")
    c = parse_config(tiny_config, ["data.max_length=128"])
    assert c.section_hash("sources", "data") != a.section_hash("sources", "data")
    assert c.section_hash("sources") == a.section_hash("sources")


@pytest.mark.parametrize("name", ["tiny.yaml", "paper_7b.yaml"])
def test_shipped_examples_parse(name):
    cfg = load_config(REPO / "examples" / name, check_paths=False)
    assert isinstance(cfg, RunConfig) and cfg.sources


def test_paper_example_is_the_paper_setting():
    cfg = load_config(REPO / "examples" / "paper_7b.yaml", check_paths=False)
    names = " ".join(s.path.lower() for s in cfg.sources)
    assert "vicuna-7b-v1.5" in names and "llama-2-7b-chat" in names and "mpt-7b-8k-chat" in names
    assert "vicuna-7b-v1.5" in cfg.target.path.lower()
    assert {s.chat_template for s in cfg.sources} == {"vicuna", "llama-2", "mpt"}


def test_reference_lists_every_leaf_key():
    ref = reference_markdown()
    for key in ("run_dir", "sources.N.path", "sources.N.trust_remote_code", "prep.generate.max_new_tokens",
                "train.schedule", "wandb.mode", "data.overlength"):
        assert f"`{key}`" in ref


def test_docs_config_reference_is_current():
    """docs/CONFIG.md is generated; regenerate with `python -m profuser.config > docs/CONFIG.md`."""
    doc = (REPO / "docs" / "CONFIG.md").read_text()
    assert reference_markdown() in doc


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc yet
    assert wandb_mode(WandbConfig(enabled=False)) == "disabled"
    assert wandb_mode(WandbConfig(mode="disabled")) == "disabled"
    assert wandb_mode(WandbConfig(mode="online")) == "online"
    assert wandb_mode(WandbConfig()) == "offline"  # auto without a key
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode(WandbConfig()) == "online"  # a key in ~/.netrc
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(WandbConfig()) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment wins over a key
    assert wandb_mode(WandbConfig()) == "offline"
    assert wandb_mode(WandbConfig(enabled=False)) == "disabled"


def test_every_train_key_reaches_the_training_arguments(tiny_config, tmp_path):
    """No field-by-field copy: each train key goes to TrainingArguments by name, becomes a
    FusionTrainingArguments field, or is one of the few translated ones."""
    from profuser.train.args import FUSION_FIELDS, PASSED_BY_NAME, TRANSLATED, training_arguments

    assert sorted(FUSION_FIELDS + PASSED_BY_NAME + TRANSLATED) == sorted(TrainConfig.model_fields)
    cfg = parse_config(tiny_config, ["train.beta=0.3", "train.teacher_min_mass=0.2", "train.schedule=custom",
                                     "train.custom_weights=[[0, 1, 0], [0.5, 0.2, 1]]", "train.weight_decay=0.01",
                                     "train.warmup_ratio=0.1", "train.group_by_length=true"])
    args = training_arguments(cfg, tmp_path / "out", report_to=[])
    for key in FUSION_FIELDS + PASSED_BY_NAME:
        assert getattr(args, key) == getattr(cfg.train, key), key
    assert args.custom_weights == [[0.0, 1.0, 0.0], [0.5, 0.2, 1.0]]
    assert args.warmup_steps == 0.1 and args.train_sampling_strategy == "group_by_length"
    assert args.output_dir == str(tmp_path / "out") and args.remove_unused_columns is False


@pytest.mark.parametrize("ds_config, optim, refused", [
    ("zero3_offload.json", "adamw_torch", False),  # its AdamW block, filled from train, is the same optimizer
    ("zero3_offload.json", "adamw_torch_fused", False),
    ("zero3_offload.json", "adafactor", True),  # would be silently replaced by the block's AdamW
    ("zero3.json", "adafactor", False),  # no optimizer block: the Trainer's optimizer applies
    ("zero2.json", "sgd", False),
])
def test_deepspeed_optimizer_block_never_silently_replaces_train_optim(tiny_config, ds_config, optim, refused):
    from profuser.check import deepspeed_problems

    path = f"deepspeed_configs/{ds_config}"
    problems = deepspeed_problems(parse_config(tiny_config, [f"train.deepspeed={REPO / path}", f"train.optim={optim}"]))
    assert bool(problems) == refused, problems
    if refused:
        (msg,) = problems
        assert msg.startswith(f"train.optim: {optim!r} would be ignored") and ds_config in msg
        assert "train.optim=adamw_torch" in msg and "deepspeed_configs/zero3.json" in msg


def test_yaml_exponent_without_dot_is_a_float(tiny_config, tmp_path):
    """YAML 1.1 reads `2e-5` as a string; the config reads it as the number it means."""
    del tiny_config["train"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config) + "train:\n  learning_rate: 2e-5\n  beta: 1E1\n")
    train = load_config(path, check_paths=False).train
    assert train.learning_rate == 2e-5 and train.beta == 10.0
