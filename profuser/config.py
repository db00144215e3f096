"""One YAML file per run, parsed into typed dataclasses.

Every command reads the same file and accepts ``key.sub=value`` overrides (``sources.1.path=/x``
indexes into lists). Validation names the key, the bad value and what is allowed. Field help text
lives in ``metadata["help"]`` so the config reference in the docs is generated, not hand-copied.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config value is unusable; the message names the key, the value and what is allowed."""


# Model and scorer names become folder and file names (RUN_DIR/prep/<stage>/<name>/...): a safe identifier.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def _default_name(path: str) -> str:
    p = Path(path)
    raw = p.stem if p.suffix == ".gguf" else p.name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw).lstrip("._-")[:100] or "model"


def _f(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, **checks: Any):
    """A dataclass field with help text and optional range checks (ge, gt, le, lt)."""
    meta = {"help": help, **checks}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# sections


@dataclass
class ModelConfig:
    """A source, target or scorer model: a local HF directory or a single .gguf file."""

    path: str = _f(help="Local model directory, or a single .gguf file.")
    name: str = _f("", help="Short name used in outputs and logs; defaults to the directory name.")
    chat_template: Optional[str] = _f(
        None,
        help="Chat template: null = the tokenizer's own; a built-in name (vicuna, llama-2, chatml, "
        "gemma, mpt); or an inline Jinja string.",
    )
    tokenizer: Optional[str] = _f(None, help="Tokenizer directory if it is not beside the weights.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", help="Weight dtype; auto = float32 on CPU, bfloat16 on GPU."
    )
    device: str = _f("auto", help="auto (cuda:LOCAL_RANK if a GPU is present, else cpu), cpu or cuda[:N].")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = _f(
        "auto", help="auto = flash_attention_2 if flash-attn imports and CUDA is present, else sdpa, else eager."
    )
    trust_remote_code: bool = _f(False, help="Run Python code shipped in the model directory. Off unless you trust it.")
    allow_pickle: bool = _f(
        False, help="Allow loading pickled weights (.bin/.pt). Off: only safetensors or gguf are read."
    )
    max_length: Optional[int] = _f(
        None, help="Max tokens of prompt+response for this model; null = data.max_length.", ge=8
    )

    def __post_init__(self):
        if not self.name and self.path:
            self.name = _default_name(self.path)


@dataclass
class ScorerConfig:
    """A reward scorer for inference mode. Several scorers vote (majority of per-sample argmax)."""

    type: Literal["reward_model", "similarity", "rule"] = _f(
        help="reward_model: a sequence-classification model; similarity: embedding cosine to the "
        "reference; rule: a Python function given by import path."
    )
    name: str = _f("", help="Name in outputs; defaults to the type.")
    path: Optional[str] = _f(None, help="Model directory (reward_model, similarity).")
    function: Optional[str] = _f(
        None, help="Rule scorer: 'package.module:function' taking (record, response) -> float."
    )
    chat_template: Optional[str] = _f(None, help="Reward model chat template override (as for models).")
    trust_remote_code: bool = _f(False, help="As for models.")
    allow_pickle: bool = _f(False, help="As for models.")
    batch_size: int = _f(8, help="Scoring batch size.", ge=1)
    max_length: Optional[int] = _f(
        None, help="reward_model: tokens kept per conversation (the start is cut); null = the model's own limit.", ge=8
    )

    def __post_init__(self):
        if not self.name:
            self.name = self.type


@dataclass
class DataConfig:
    path: str = _f(help="Training data: .jsonl, .json, or a directory saved by datasets.save_to_disk.")
    format: Literal["auto", "messages", "alpaca", "sharegpt"] = _f(
        "auto", help="Row format; auto detects each row by its fields."
    )
    eval_path: Optional[str] = _f(None, help="Held-out data for `profuser eval` (same formats).")
    max_length: int = _f(1024, help="Max tokens of prompt + response, per model's chat formatting.", ge=8)
    overlength: Literal["truncate_left", "reject"] = _f(
        "truncate_left",
        help="What to do with a sample over max_length: drop prompt tokens from the left, or reject it.",
    )
    limit: Optional[int] = _f(None, help="Use only the first N rows (smoke runs).", ge=1)
    special_tokens: Literal["escape", "reject"] = _f(
        "escape",
        help="Message text that spells a model's special token (e.g. '<|im_end|>'): escape = insert a zero-width "
        "space after its first character so it stays plain text (counted in the normalize manifest); reject = "
        "reject the row (kind special_token). Never turned into a control token.",
    )


@dataclass
class VLLMConfig:
    """Engine settings of the vLLM backend (one engine per rank, on that rank's local GPUs)."""

    gpu_memory_utilization: float = _f(
        0.85, help="Share of the GPU's memory the engine may take (weights, activations, KV cache).", gt=0.0, le=1.0
    )
    max_model_len: Optional[int] = _f(
        None, help="Context length the engine is sized for; null = the source's max_length (else data.max_length) "
        "plus max_new_tokens.", ge=8
    )
    tensor_parallel_size: int = _f(
        1, help="GPUs per engine. Each rank takes that many of its node's GPUs: local ranks x this must not exceed "
        "the GPUs visible on the node.", ge=1
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", help="Weight and activation dtype; auto = the source's dtype when it sets one, else vLLM's choice."
    )
    enforce_eager: bool = _f(False, help="Disable CUDA graphs (less memory and start-up time, slower decoding).")
    seed: Optional[int] = _f(
        None, help="Engine seed; null = the run's seed. Every request carries its own per-record seed, so this "
        "does not change what is sampled."
    )


@dataclass
class GenerateConfig:
    backend: Literal["hf", "vllm"] = _f("hf", help="hf works everywhere; vllm needs the vllm extra and a GPU.")
    max_new_tokens: int = _f(512, help="Cap on generated tokens per response.", ge=1)
    do_sample: bool = _f(False, help="Sample (seeded) instead of greedy decoding.")
    temperature: float = _f(1.0, help="Sampling temperature.", gt=0.0)
    top_p: float = _f(1.0, help="Nucleus sampling mass.", gt=0.0, le=1.0)
    top_k: int = _f(0, help="Sample only among the k most likely tokens; 0 = no top-k cut.", ge=0)
    batch_size: int = _f(
        8, help="Prompts generated at once (static batches; the concurrency cap of continuous batching).", ge=1
    )
    continuous_batching: Literal["auto", "on", "off"] = _f(
        "auto", help="hf backend: transformers' continuous batching (finished rows are refilled at once) instead "
        "of static batches; auto = on a CUDA device when the model supports it."
    )
    vllm: VLLMConfig = _f(factory=VLLMConfig, help="vLLM engine settings (backend vllm).")


@dataclass
class PrepConfig:
    topk: int = _f(10, help="Teacher distribution entries kept per token.", ge=1, le=1024)
    shard_size: int = _f(256, help="Records per output shard (the unit of resume).", ge=1)
    batch_size: int = _f(8, help="Most sequences per teacher-forcing batch (see batch_tokens).", ge=1)
    batch_tokens: int = _f(
        16384, help="Teacher forcing: padded tokens per batch. Sequences sorted by length are grouped while "
        "(sequences x longest) stays within this and batch_size; a longer sequence goes alone.", ge=1
    )
    generate: GenerateConfig = _f(factory=GenerateConfig, help="Response generation (inference mode).")
    vocab_mapping: Literal["prefix", "exact", "soft"] = _f(
        "prefix", help="Source->target token mapping when no target token has the same surface: prefix = the "
        "target token that is the longest prefix of it (the token the target starts that text with); exact = "
        "none (the entry is dropped); soft = nearest by edit distance (FuseLLM)."
    )
    mince: Literal["byte", "token"] = _f(
        "byte", help="Training-mode teacher choice (MinCE): byte = lowest NLL of the response text per UTF-8 byte "
        "(comparable across tokenizers, template tokens excluded); token = lowest mean CE per the source's own "
        "token, end of turn included (the paper's and FuseLLM's rule)."
    )
    chunk_tokens: int = _f(
        1024, help="Response positions projected onto the vocabulary at once (lm_head, then fp32 top-k and CE): "
        "the teacher's logits never exceed chunk_tokens x vocabulary, whatever the batch.", ge=1
    )
    dist_timeout_minutes: int = _f(
        720, help="How long a rank waits at a barrier for the others (multi-process prep).", ge=1
    )


@dataclass
class TrainConfig:
    schedule: Literal["profuser", "ramp", "simul", "reverse", "fusellm", "inference_only", "sft", "custom"] = _f(
        "profuser", help="Progressive fusion preset (see docs/ARCHITECTURE.md)."
    )
    switch_fraction: float = _f(0.5, help="profuser/reverse: fraction of training in stage 1.", ge=0.0, le=1.0)
    ramp_shape: Literal["linear", "cosine"] = _f("linear", help="ramp: hand-over shape.")
    stage2_inference_weight: float = _f(0.1, help="profuser: w_inf in stage 2 (reverse: w_train in stage 2).", ge=0.0)
    custom_weights: Optional[list] = _f(
        None, help="custom: list of [fraction, w_inf, w_train] breakpoints, piecewise constant."
    )
    sample_mode: bool = _f(False, help="Draw one mode per sample with probability proportional to the weights.")
    beta: float = _f(1.0, help="Weight of the distillation term D.", ge=0.0)
    fusellm_lambda: Optional[float] = _f(
        None, help="If set, use lambda*CE + (1-lambda)*D instead of CE + beta*D.", ge=0.0, le=1.0
    )
    divergence: Literal["forward_kl", "reverse_kl", "ce"] = _f("forward_kl", help="Distillation divergence D.")
    teacher_rest: Literal["other", "renormalize"] = _f(
        "other", help="The teacher's probability off its stored entries (top-k cut, unmapped tokens): other = "
        "one extra bucket compared with the student's mass off those ids (a position that kept little mass "
        "stays unsure); renormalize = the entries scaled up to sum to 1 (FuseLLM-style top-k)."
    )
    teacher_min_mass: float = _f(
        0.0, help="Positions whose stored teacher entries hold less probability than this use CE only.",
        ge=0.0, le=1.0,
    )
    temperature: float = _f(1.0, help="Distillation temperature tau.", gt=0.0)
    loss_chunk_size: int = _f(
        256, help="Positions per fp32 loss chunk: the loss holds chunk x vocab fp32 temporaries (smaller = less "
        "memory, more passes). Fused path: label tokens of the whole micro-batch; logits path: positions of "
        "each sequence.", ge=1
    )
    fused_loss: Literal["auto", "on", "off"] = _f(
        "auto", help="Fused-linear loss: the loss is computed from the last hidden states and the output "
        "projection chunk by chunk, never building the [batch, length, vocab] logits. auto = where the target's "
        "architecture is supported (else the logits path, with the reason logged); on = error if unsupported; "
        "off = always logits then the chunked loss."
    )
    learning_rate: float = _f(1e-5, help="Peak learning rate.", gt=0.0)
    num_train_epochs: float = _f(3.0, help="Epochs over the training set.", gt=0.0)
    max_steps: int = _f(-1, help="If > 0, stop after this many optimizer steps.")
    per_device_train_batch_size: int = _f(1, help="Micro-batch size per GPU.", ge=1)
    gradient_accumulation_steps: int = _f(1, help="Micro-batches per optimizer step.", ge=1)
    warmup_ratio: float = _f(0.03, help="Linear warm-up, as a fraction of the optimizer steps.", ge=0.0, lt=1.0)
    lr_scheduler_type: str = _f("cosine", help="transformers scheduler name (cosine, linear, constant, ...).")
    optim: str = _f("adamw_torch", help="transformers optimizer name (adamw_torch, adamw_torch_fused, ...).")
    weight_decay: float = _f(0.0, help="AdamW weight decay.", ge=0.0)
    max_grad_norm: float = _f(1.0, help="Gradient clipping norm.", ge=0.0)
    bf16: bool = _f(False, help="bf16 mixed precision (GPU).")
    gradient_checkpointing: bool = _f(False, help="Trade compute for activation memory.")
    deepspeed: Optional[str] = _f(None, help="DeepSpeed JSON config (see deepspeed_configs/).")
    group_by_length: bool = _f(False, help="Batch samples of similar length together (seeded, resumable order).")
    pad_to_multiple_of: Optional[int] = _f(None, help="Pad each batch's length to a multiple of N (e.g. 8 on GPU).", ge=1)
    logging_steps: int = _f(1, help="Log every N optimizer steps.", ge=1)
    save_steps: int = _f(500, help="Checkpoint every N optimizer steps.", ge=1)
    save_total_limit: Optional[int] = _f(2, help="Keep at most N checkpoints.", ge=1)
    output_dir: Optional[str] = _f(
        None, help="Checkpoints (checkpoint-N/) and the final model (final/); defaults to RUN_DIR/train."
    )
    resume: bool = _f(True, help="Resume from the latest complete checkpoint in output_dir if there is one.")


@dataclass
class EvalConfig:
    max_new_tokens: int = _f(256, help="Generation cap for eval responses.", ge=1)
    batch_size: int = _f(8, help="Eval batch size.", ge=1)
    lm_eval_tasks: list = _f(
        factory=list, help="lm-eval harness tasks run on the evaluated model as profuser loads it (device, dtype; "
        "batch size eval.batch_size); needs the eval extra."
    )
    lm_eval_include_path: Optional[str] = _f(
        None, help="A folder of your own lm-eval task YAMLs (e.g. `dataset_path: json` over local files) added to "
        "lm-eval's registry."
    )
    lm_eval_chat_template: bool = _f(
        True, help="Render lm-eval prompts with the evaluated model's chat template (a chat model is judged as it "
        "is used); false = plain text prompts."
    )
    lm_eval_num_fewshot: Optional[int] = _f(None, help="lm-eval few-shot examples; null = each task's default.", ge=0)
    lm_eval_limit: Optional[int] = _f(None, help="lm-eval: at most this many documents per task (smoke runs).", ge=1)


@dataclass
class WandbConfig:
    enabled: bool = _f(True, help="Log to Weights & Biases.")
    project: str = _f("profuser", help="W&B project.")
    entity: Optional[str] = _f(None, help="W&B entity (team).")
    mode: Literal["auto", "online", "offline", "disabled"] = _f(
        "auto", help="auto = online if an API key is configured, else offline (sync later)."
    )
    tags: list = _f(factory=list, help="Run tags.")


@dataclass
class RunConfig:
    run_dir: str = _f(help="All outputs of the run go here.")
    sources: list[ModelConfig] = _f(help="Source LLMs to fuse (at least one).")
    target: ModelConfig = _f(help="The model being trained.")
    data: DataConfig = _f(help="Training data.")
    scorers: list[ScorerConfig] = _f(factory=list, help="Reward scorers for inference mode.")
    prep: PrepConfig = _f(factory=PrepConfig, help="Teacher-signal data prep.")
    train: TrainConfig = _f(factory=TrainConfig, help="Training.")
    eval: EvalConfig = _f(factory=EvalConfig, help="Evaluation.")
    wandb: WandbConfig = _f(factory=WandbConfig, help="Weights & Biases logging.")
    seed: int = _f(42, help="Seed for sampling, data order and initialisation.")

    def model(self, name: str) -> ModelConfig:
        for m in [*self.sources, self.target]:
            if m.name == name:
                return m
        raise KeyError(f"no model named {name!r}; have {[m.name for m in self.sources]} and target {self.target.name!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *keys: str) -> str:
        """Stable hash of the named top-level sections (what a stage depends on)."""
        d = self.to_dict()
        blob = json.dumps({k: d[k] for k in keys}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# parsing and validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list or tp is list:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; use one of {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML reads `2e-5` (no dot) as a string; accept what Python reads as a float
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got boolean {value!r}")
    if tp in (int, float, str) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_range(key: str, value: Any, meta: dict) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for op, test, word in (("ge", value.__ge__, ">="), ("gt", value.__gt__, ">"),
                           ("le", value.__le__, "<="), ("lt", value.__lt__, "<")):
        if op in meta and not test(meta[op]):
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {word} {meta[op]}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = prefix or "config"
    for k in data:
        if k not in fields:
            raise ConfigError(
                f"{prefix + '.' if prefix else ''}{k}: unknown key in {where}; allowed keys: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key is missing ({f.metadata.get('help', '')})")
            continue
        value = _convert(data[name], hints[name], key)
        _check_range(key, value, f.metadata)
        kwargs[name] = value
    return cls(**kwargs)


def _semantic_checks(cfg: RunConfig) -> None:
    if not cfg.sources:
        raise ConfigError("sources: [] — at least one source model is required")
    for key, m in [*((f"sources.{i}", m) for i, m in enumerate(cfg.sources)), ("target", cfg.target),
                   *((f"scorers.{i}", s) for i, s in enumerate(cfg.scorers))]:
        if not NAME_RE.match(m.name):
            raise ConfigError(f"{key}.name: {m.name!r} is not allowed; a name becomes a folder name, so use letters, "
                              "digits, '_', '-' and '.' (starting with a letter or digit, at most 100)")
    names = [m.name for m in cfg.sources]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"sources: duplicate names {sorted(dup)}; give each source a distinct `name`")
    for i, s in enumerate(cfg.scorers):
        key = f"scorers.{i}"
        if s.type == "rule" and not s.function:
            raise ConfigError(f"{key}.function: a rule scorer needs 'package.module:function'")
        if s.type == "rule" and ":" not in s.function:
            raise ConfigError(f"{key}.function: {s.function!r} must look like 'package.module:function'")
        if s.type in ("reward_model", "similarity") and not s.path:
            raise ConfigError(f"{key}.path: a {s.type} scorer needs a model path")
    snames = [s.name for s in cfg.scorers]
    if len(set(snames)) != len(snames):
        raise ConfigError(f"scorers: duplicate names {snames}; give each scorer a distinct `name`")
    if cfg.train.schedule == "custom" and not cfg.train.custom_weights:
        raise ConfigError("train.custom_weights: schedule 'custom' needs a list of [fraction, w_inf, w_train]")


def wandb_mode(w: WandbConfig) -> str:
    """"online", "offline" or "disabled". `auto` follows WANDB_MODE if set, else online only when an
    API key is configured (WANDB_API_KEY or a netrc entry for the W&B host), else offline."""
    if not w.enabled or w.mode == "disabled":
        return "disabled"
    if w.mode != "auto":
        return w.mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def missing_paths(cfg: RunConfig) -> list[str]:
    """Every configured path that does not exist, as 'key: value' messages."""
    out = []

    def need(key: str, value: Optional[str]) -> None:
        if value and not Path(value).exists():
            out.append(f"{key}: path {value!r} does not exist")

    for i, m in enumerate(cfg.sources):
        need(f"sources.{i}.path", m.path)
        need(f"sources.{i}.tokenizer", m.tokenizer)
    need("target.path", cfg.target.path)
    need("target.tokenizer", cfg.target.tokenizer)
    for i, s in enumerate(cfg.scorers):
        need(f"scorers.{i}.path", s.path)
    need("data.path", cfg.data.path)
    need("data.eval_path", cfg.data.eval_path)
    need("train.deepspeed", cfg.train.deepspeed)
    need("eval.lm_eval_include_path", cfg.eval.lm_eval_include_path)
    return out


def apply_override(data: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; value is parsed as YAML (so 3, true, [1,2] work)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise ConfigError(f"override {key}: {part!r} is not a valid index (list has {len(node)} items)")
        else:
            if part not in node or node[part] is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"override {key}: {last!r} is not a valid index (list has {len(node)} items)")
    else:
        node[last] = value


def parse_config(data: dict, overrides: list[str] = ()) -> RunConfig:
    data = json.loads(json.dumps(data))  # deep copy; also rejects non-JSON values early
    for o in overrides:
        apply_override(data, o)
    cfg = _build(RunConfig, data, "")
    _semantic_checks(cfg)
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] = (), check_paths: bool = True) -> RunConfig:
    """Read, override, validate. Raises ConfigError naming the key and value on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    cfg = parse_config(data, overrides)
    if check_paths:
        bad = missing_paths(cfg)
        if bad:
            raise ConfigError("; ".join(bad))
    return cfg


def save_resolved(cfg: RunConfig) -> Path:
    """Write the resolved config to RUN_DIR/config.yaml (atomically) and return its path."""
    out = Path(cfg.run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".yaml.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, out)
    return out


def reference_markdown(cls: type = RunConfig, prefix: str = "") -> str:
    """The config reference table, generated from the dataclasses' help text."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if dataclasses.is_dataclass(tp):
            rows.append(reference_markdown(tp, key + "."))
            continue
        if inner is not None and dataclasses.is_dataclass(inner):
            rows.append(f"| `{key}` | list | | {f.metadata.get('help', '')} |")
            rows.append(reference_markdown(inner, key + ".N."))
            continue
        if f.default is not dataclasses.MISSING:
            default = json.dumps(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = json.dumps(f.default_factory())
        else:
            default = "required"
        rng = ", ".join(f"{k} {f.metadata[k]}" for k in ("ge", "gt", "le", "lt") if k in f.metadata)
        help_ = f.metadata.get("help", "") + (f" ({rng})" if rng else "")
        rows.append(f"| `{key}` | {_type_name(tp)} | `{default}` | {help_} |")
    body = "\n".join(rows)
    if prefix:
        return body
    return "| key | type | default | meaning |\n|---|---|---|---|\n" + body


if __name__ == "__main__":  # python -m profuser.config > docs/CONFIG.md
    print("# Run config reference\n\nGenerated from `profuser/config.py` by `python -m profuser.config`.\n")
    print(reference_markdown())
