"""One YAML file per run, validated once into one pydantic model per section.

Every command reads the same file and accepts ``key.sub=value`` overrides (``sources.1.path=/x``
indexes into lists). A field is declared once, here, with its type, default, allowed range and help
text; from that declaration come the validation (strict: no unknown keys, no coercion, finite
floats), the error messages (:func:`validate`: the key, the bad value and what is allowed),
docs/CONFIG.md (:func:`reference_markdown`) and the training arguments (``profuser.train.args``).

It must never import torch, load a model or read data: every command reads a config first. The only
file it writes is RUN_DIR/config.yaml (:func:`save_resolved`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from profuser.constants import DIVERGENCES, LOSS_CHUNK_SIZE, TEACHER_REST
from profuser.schedule import PRESETS, RAMP_SHAPES, validate_custom_weights


class ConfigError(ValueError):
    """A config value is unusable; the message names the key, the value and what is allowed."""


# Model and scorer names become folder and file names (RUN_DIR/prep/<stage>/<name>/...): a safe identifier.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def name_from_path(path: str) -> str:
    """A safe model name (NAME_RE) from a model path: the folder name, or a .gguf file's stem."""
    p = Path(path)
    raw = p.stem if p.suffix == ".gguf" else p.name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw).lstrip("._-")[:100] or "model"


def _check_name(cls, name: str) -> str:
    if name and not NAME_RE.match(name):  # "" only when the path is missing too (reported as such)
        raise ValueError(f"{name!r} is not allowed; a name becomes a folder name, so use letters, digits, '_', '-' "
                         "and '.' (starting with a letter or digit, at most 100)")
    return name


def _named_apart(items: list, what: str) -> list:
    names = [m.name for m in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate names {dup}; give each {what} a distinct `name`")
    return items


S = typing.TypeVar("S", bound="Section")


class Section(BaseModel):
    """A config section: unknown keys are refused, values are never coerced (a boolean is not a number,
    a string not a number; an int is accepted for a float), floats are finite, assignments are checked
    too. :func:`validate` turns its data into a section or one :class:`ConfigError` naming every problem."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True)


# --------------------------------------------------------------------------------------------
# sections


class ModelConfig(Section):
    """A source, target or scorer model: a local HF directory or a single .gguf file."""

    path: str = Field(description="Local model directory, or a single .gguf file.")
    name: str = Field("", description="Short name used in outputs and logs; defaults to the directory name.")
    chat_template: Optional[str] = Field(
        None,
        description="Chat template: null = the tokenizer's own; a built-in name (vicuna, llama-2, chatml, "
        "gemma, mpt); or an inline Jinja string.",
    )
    tokenizer: Optional[str] = Field(None, description="Tokenizer directory if it is not beside the weights.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto = float32 on CPU, bfloat16 on GPU."
    )
    device: str = Field("auto", description="auto (cuda:LOCAL_RANK if a GPU is present, else cpu), cpu or cuda[:N].")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto", description="auto = flash_attention_2 if flash-attn imports and CUDA is present, else sdpa, else eager."
    )
    trust_remote_code: bool = Field(False, description="Run Python code shipped in the model directory. Off unless you trust it.")
    allow_pickle: bool = Field(
        False, description="Allow loading pickled weights (.bin/.pt). Off: only safetensors or gguf are read."
    )
    max_length: Optional[int] = Field(
        None, description="Max tokens of prompt+response for this model; null = data.max_length.", ge=8
    )

    @model_validator(mode="before")
    @classmethod
    def _name_from_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name") and isinstance(data.get("path"), str):
            data = {**data, "name": name_from_path(data["path"])}
        return data

    _name_is_safe = field_validator("name")(_check_name)


class ScorerConfig(Section):
    """A reward scorer for inference mode. Several scorers vote (majority of per-sample argmax)."""

    type: Literal["reward_model", "similarity", "rule"] = Field(
        description="reward_model: a sequence-classification model; similarity: embedding cosine to the "
        "reference; rule: a Python function given by import path."
    )
    name: str = Field("", description="Name in outputs; defaults to the type.")
    path: Optional[str] = Field(None, description="Model directory (reward_model, similarity).", validate_default=True)
    function: Optional[str] = Field(
        None, description="Rule scorer: 'package.module:function' taking (record, response) -> float.",
        validate_default=True,
    )
    chat_template: Optional[str] = Field(None, description="Reward model chat template override (as for models).")
    trust_remote_code: bool = Field(False, description="As for models.")
    allow_pickle: bool = Field(False, description="As for models.")
    batch_size: int = Field(8, description="Scoring batch size.", ge=1)
    max_length: Optional[int] = Field(
        None, description="reward_model: tokens kept per conversation (the start is cut); null = the model's own limit.", ge=8
    )

    @model_validator(mode="before")
    @classmethod
    def _name_from_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name") and isinstance(data.get("type"), str):
            data = {**data, "name": data["type"]}
        return data

    _name_is_safe = field_validator("name")(_check_name)

    @field_validator("path")
    @classmethod
    def _model_scorer_has_path(cls, path: Optional[str], info: ValidationInfo) -> Optional[str]:
        if info.data.get("type") in ("reward_model", "similarity") and not path:
            raise ValueError(f"a {info.data['type']} scorer needs a model path")
        return path

    @field_validator("function")
    @classmethod
    def _rule_scorer_has_function(cls, function: Optional[str], info: ValidationInfo) -> Optional[str]:
        if info.data.get("type") == "rule" and (not function or ":" not in function):
            raise ValueError(f"{function!r}: a rule scorer needs 'package.module:function'")
        return function


class DataConfig(Section):
    path: str = Field(description="Training data: .jsonl, .json, or a directory saved by datasets.save_to_disk.")
    format: Literal["auto", "messages", "alpaca", "sharegpt"] = Field(
        "auto", description="Row format; auto detects each row by its fields."
    )
    eval_path: Optional[str] = Field(None, description="Held-out data for `profuser eval` (same formats).")
    max_length: int = Field(1024, description="Max tokens of prompt + response, per model's chat formatting.", ge=8)
    overlength: Literal["truncate_left", "reject"] = Field(
        "truncate_left",
        description="What to do with a sample over max_length: drop prompt tokens from the left, or reject it.",
    )
    limit: Optional[int] = Field(None, description="Use only the first N rows (smoke runs).", ge=1)
    special_tokens: Literal["escape", "reject"] = Field(
        "escape",
        description="Message text that spells a model's special token (e.g. '<|im_end|>'): escape = insert a zero-width "
        "space after its first character so it stays plain text (counted in the normalize manifest); reject = "
        "reject the row (kind special_token). Never turned into a control token.",
    )


class VLLMConfig(Section):
    """Engine settings of the vLLM backend (one engine per rank, on that rank's local GPUs)."""

    gpu_memory_utilization: float = Field(
        0.85, description="Share of the GPU's memory the engine may take (weights, activations, KV cache).", gt=0.0, le=1.0
    )
    max_model_len: Optional[int] = Field(
        None, description="Context length the engine is sized for; null = the source's max_length (else data.max_length) "
        "plus max_new_tokens.", ge=8
    )
    tensor_parallel_size: int = Field(
        1, description="GPUs per engine. Each rank takes that many of its node's GPUs: local ranks x this must not exceed "
        "the GPUs visible on the node.", ge=1
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight and activation dtype; auto = the source's dtype when it sets one, else vLLM's choice."
    )
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (less memory and start-up time, slower decoding).")
    seed: Optional[int] = Field(
        None, description="Engine seed; null = the run's seed. Every request carries its own per-record seed, so this "
        "does not change what is sampled."
    )


class GenerateConfig(Section):
    backend: Literal["hf", "vllm"] = Field("hf", description="hf works everywhere; vllm needs the vllm extra and a GPU.")
    max_new_tokens: int = Field(512, description="Cap on generated tokens per response.", ge=1)
    do_sample: bool = Field(False, description="Sample (seeded) instead of greedy decoding.")
    temperature: float = Field(1.0, description="Sampling temperature.", gt=0.0)
    top_p: float = Field(1.0, description="Nucleus sampling mass.", gt=0.0, le=1.0)
    top_k: int = Field(0, description="Sample only among the k most likely tokens; 0 = no top-k cut.", ge=0)
    batch_size: int = Field(
        8, description="Prompts generated at once (static batches; the concurrency cap of continuous batching).", ge=1
    )
    continuous_batching: Literal["auto", "on", "off"] = Field(
        "auto", description="hf backend: transformers' continuous batching (finished rows are refilled at once) instead "
        "of static batches; auto = on a CUDA device when the model supports it."
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine settings (backend vllm).")


class LookaheadConfig(Section):
    enabled: bool = Field(
        False, description="Teacher stage: at every response word start (and punctuation right after a word), follow "
        "the teacher's top-k next tokens to the end of their word (a beam over its own continuations) and store the "
        "word outcomes; the align stage spells "
        "them with the target tokenizer and teaches the target's tokens of each word from them (docs/ARCHITECTURE.md, "
        "'Word lookahead'). For sources whose tokenizer differs from the target's; costs 11-15x the teacher "
        "stage's own forward on CPU, about 9x with min_prob 0.01 (README, bench_lookahead)."
    )
    branch: int = Field(4, description="Word pieces a path is extended by per step.", ge=1)
    beam: int = Field(32, description="Live paths kept per word start and step.", ge=1)
    steps: int = Field(8, description="Most word pieces followed after the word-start token.", ge=1)
    min_prob: float = Field(1e-3, description="A path (a word-start candidate included, the observed word's "
                            "excepted) is not followed once its probability is at most this; its mass is lost.",
                            ge=0.0, lt=1.0)


class PrepConfig(Section):
    topk: int = Field(10, description="Teacher distribution entries kept per token.", ge=1, le=1024)
    shard_size: int = Field(256, description="Records per output shard (the unit of resume).", ge=1)
    batch_size: int = Field(8, description="Most sequences per teacher-forcing batch (see batch_tokens).", ge=1)
    batch_tokens: int = Field(
        16384, description="Teacher forcing: padded tokens per batch. Sequences sorted by length are grouped while "
        "(sequences x longest) stays within this and batch_size; a longer sequence goes alone. The word lookahead "
        "decodes batch_tokens // (beam x steps) word starts at a time.", ge=1
    )
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Response generation (inference mode).")
    vocab_mapping: Literal["prefix", "exact", "soft"] = Field(
        "prefix", description="Source->target token mapping when no target token has the same surface: prefix = the "
        "target token that is the longest prefix of it (the token the target starts that text with); exact = "
        "none (the entry is dropped); soft = nearest by edit distance (FuseLLM)."
    )
    mince: Literal["byte", "token"] = Field(
        "byte", description="Training-mode teacher choice (MinCE): byte = lowest NLL of the response text per UTF-8 byte "
        "(comparable across tokenizers, template tokens excluded); token = lowest mean CE per the source's own "
        "token, end of turn included (the paper's and FuseLLM's rule)."
    )
    lookahead: LookaheadConfig = Field(default_factory=LookaheadConfig,
                                       description="Word lookahead at response word starts (cross-tokenizer sources).")
    chunk_tokens: int = Field(
        1024, description="Response positions projected onto the vocabulary at once (lm_head, then fp32 top-k and CE): "
        "the teacher's logits never exceed chunk_tokens x vocabulary, whatever the batch.", ge=1
    )
    dist_timeout_minutes: int = Field(
        720, description="How long a rank waits at a barrier for the others (multi-process prep).", ge=1
    )


class TrainConfig(Section):
    schedule: Literal[PRESETS] = Field(
        "profuser", description="Progressive fusion preset (see docs/ARCHITECTURE.md)."
    )
    switch_fraction: float = Field(0.5, description="profuser/reverse: fraction of training in stage 1.", ge=0.0, le=1.0)
    ramp_shape: Literal[RAMP_SHAPES] = Field("linear", description="ramp: hand-over shape.")
    stage2_inference_weight: float = Field(0.1, description="profuser: w_inf in stage 2 (reverse: w_train in stage 2).", ge=0.0)
    custom_weights: Optional[list] = Field(
        None, description="custom: list of [fraction, w_inf, w_train] breakpoints, piecewise constant.",
        validate_default=True,
    )
    sample_mode: bool = Field(False, description="Draw one mode per sample with probability proportional to the weights.")
    beta: float = Field(1.0, description="Weight of the distillation term D.", ge=0.0)
    fusellm_lambda: Optional[float] = Field(
        None, description="If set, use lambda*CE + (1-lambda)*D instead of CE + beta*D.", ge=0.0, le=1.0
    )
    divergence: Literal[DIVERGENCES] = Field("forward_kl", description="Distillation divergence D.")
    teacher_rest: Literal[TEACHER_REST] = Field(
        "other", description="The teacher's probability off its stored entries (top-k cut, unmapped tokens): other = "
        "one extra bucket compared with the student's mass off those ids (a position that kept little mass "
        "stays unsure); renormalize = the entries scaled up to sum to 1 (FuseLLM-style top-k)."
    )
    teacher_min_mass: float = Field(
        0.0, description="Positions whose stored teacher entries hold less probability than this use CE only.",
        ge=0.0, le=1.0,
    )
    temperature: float = Field(1.0, description="Distillation temperature tau.", gt=0.0)
    loss_chunk_size: int = Field(
        LOSS_CHUNK_SIZE, description="Positions per fp32 loss chunk: the loss holds chunk x vocab fp32 temporaries (smaller = less "
        "memory, more passes). Fused path: label tokens of the whole micro-batch; logits path: positions of "
        "each sequence.", ge=1
    )
    fused_loss: Literal["auto", "on", "off"] = Field(
        "auto", description="Fused-linear loss: the loss is computed from the last hidden states and the output "
        "projection chunk by chunk, never building the [batch, length, vocab] logits. auto = where the target's "
        "architecture is supported (else the logits path, with the reason logged); on = error if unsupported; "
        "off = always logits then the chunked loss."
    )
    learning_rate: float = Field(1e-5, description="Peak learning rate.", gt=0.0)
    num_train_epochs: float = Field(3.0, description="Epochs over the training set.", gt=0.0)
    max_steps: int = Field(-1, description="If > 0, stop after this many optimizer steps.")
    per_device_train_batch_size: int = Field(1, description="Micro-batch size per GPU.", ge=1)
    gradient_accumulation_steps: int = Field(1, description="Micro-batches per optimizer step.", ge=1)
    warmup_ratio: float = Field(0.03, description="Linear warm-up, as a fraction of the optimizer steps.", ge=0.0, lt=1.0)
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant, ...).")
    optim: str = Field("adamw_torch", description="transformers optimizer name (adamw_torch, adamw_torch_fused, ...).")
    weight_decay: float = Field(0.0, description="AdamW weight decay.", ge=0.0)
    max_grad_norm: float = Field(1.0, description="Gradient clipping norm.", ge=0.0)
    bf16: bool = Field(False, description="bf16 mixed precision (GPU).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    deepspeed: Optional[str] = Field(None, description="DeepSpeed JSON config (see deepspeed_configs/).")
    group_by_length: bool = Field(False, description="Batch samples of similar length together (seeded, resumable order).")
    pad_to_multiple_of: Optional[int] = Field(None, description="Pad each batch's length to a multiple of N (e.g. 8 on GPU).", ge=1)
    logging_steps: int = Field(1, description="Log every N optimizer steps.", ge=1)
    save_steps: int = Field(500, description="Checkpoint every N optimizer steps.", ge=1)
    save_total_limit: Optional[int] = Field(2, description="Keep at most N checkpoints.", ge=1)
    output_dir: Optional[str] = Field(
        None, description="Checkpoints (checkpoint-N/) and the final model (final/); defaults to RUN_DIR/train."
    )
    resume: bool = Field(True, description="Resume from the latest complete checkpoint in output_dir if there is one.")

    @field_validator("custom_weights")
    @classmethod
    def _custom_weights_are_breakpoints(cls, value: Optional[list], info: ValidationInfo) -> Optional[list]:
        if value is None and info.data.get("schedule") != "custom":
            return None
        return [list(bp) for bp in validate_custom_weights(value)]


class EvalConfig(Section):
    max_new_tokens: int = Field(256, description="Generation cap for eval responses.", ge=1)
    batch_size: int = Field(8, description="Eval batch size.", ge=1)
    lm_eval_tasks: list = Field(
        default_factory=list, description="lm-eval harness tasks run on the evaluated model as profuser loads it (device, dtype; "
        "batch size eval.batch_size); needs the eval extra."
    )
    lm_eval_include_path: Optional[str] = Field(
        None, description="A folder of your own lm-eval task YAMLs (e.g. `dataset_path: json` over local files) added to "
        "lm-eval's registry."
    )
    lm_eval_chat_template: bool = Field(
        True, description="Render lm-eval prompts with the evaluated model's chat template (a chat model is judged as it "
        "is used); false = plain text prompts."
    )
    lm_eval_num_fewshot: Optional[int] = Field(None, description="lm-eval few-shot examples; null = each task's default.", ge=0)
    lm_eval_limit: Optional[int] = Field(None, description="lm-eval: at most this many documents per task (smoke runs).", ge=1)


class WandbConfig(Section):
    enabled: bool = Field(True, description="Log to Weights & Biases.")
    project: str = Field("profuser", description="W&B project.")
    entity: Optional[str] = Field(None, description="W&B entity (team).")
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto = online if an API key is configured, else offline (sync later)."
    )
    tags: list = Field(default_factory=list, description="Run tags.")


class RunConfig(Section):
    run_dir: str = Field(description="All outputs of the run go here.")
    sources: list[ModelConfig] = Field(description="Source LLMs to fuse (at least one).")
    target: ModelConfig = Field(description="The model being trained.")
    data: DataConfig = Field(description="Training data.")
    scorers: list[ScorerConfig] = Field(default_factory=list, description="Reward scorers for inference mode.")
    prep: PrepConfig = Field(default_factory=PrepConfig, description="Teacher-signal data prep.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases logging.")
    seed: int = Field(42, description="Seed for sampling, data order and initialisation.")

    @field_validator("sources")
    @classmethod
    def _sources_named_apart(cls, sources: list[ModelConfig]) -> list[ModelConfig]:
        if not sources:
            raise ValueError("[] — at least one source model is required")
        return _named_apart(sources, "source")

    @field_validator("scorers")
    @classmethod
    def _scorers_named_apart(cls, scorers: list[ScorerConfig]) -> list[ScorerConfig]:
        return _named_apart(scorers, "scorer")

    def model(self, name: str) -> ModelConfig:
        for m in [*self.sources, self.target]:
            if m.name == name:
                return m
        raise KeyError(f"no model named {name!r}; have {[m.name for m in self.sources]} and target {self.target.name!r}")

    def to_dict(self) -> dict:
        return self.model_dump()

    def section_hash(self, *keys: str) -> str:
        """Stable hash of the named top-level sections (what a stage depends on)."""
        d = self.to_dict()
        blob = json.dumps({k: d[k] for k in keys}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# error messages, overrides, loading


def _section_at(cls: type[Section], loc: tuple) -> Any:
    """The type found at ``loc`` (field names and list indices) below ``cls``."""
    tp: Any = cls
    for part in loc:
        tp = typing.get_args(tp)[0] if isinstance(part, int) else tp.model_fields[part].annotation
    return tp


_RANGE_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _message(cls: type[Section], err: dict) -> str:
    loc, value, ctx, kind = err["loc"], err.get("input"), err.get("ctx") or {}, err["type"]
    key = ".".join(map(str, loc))
    if kind == "extra_forbidden":
        where = ".".join(map(str, loc[:-1])) or "config"
        return f"{key}: unknown key in {where}; allowed keys: {', '.join(_section_at(cls, loc[:-1]).model_fields)}"
    if kind == "missing":
        return f"{key}: required key is missing ({_section_at(cls, loc[:-1]).model_fields[loc[-1]].description})"
    if kind == "literal_error":
        return f"{key}: {value!r} is not allowed; use one of {ctx['expected']}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        (op, limit), = ((k, v) for k, v in ctx.items() if k in _RANGE_WORDS)
        return f"{key}: {value!r} is out of range; it must be {_RANGE_WORDS[op]} {limit}"
    if kind == "finite_number":
        return f"{key}: {value!r} is not a finite number"
    if kind == "value_error":  # a rule of a field_validator; its message shows the value and the fix
        return f"{key}: {ctx['error']}"
    expected = "a mapping" if kind == "model_type" else err["msg"].removeprefix("Input should be ")
    return f"{key}: expected {expected}, got {type(value).__name__} {value!r}"


def validate(cls: type[S], data: dict) -> S:
    """``data`` as a ``cls``, or a ConfigError with one message per problem, each starting with its dotted key."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError("; ".join(dict.fromkeys(_message(cls, err) for err in e.errors()))) from None


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``2e-5`` (an exponent but no dot) as a string; read it as the float it means."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


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
    value = read_yaml(raw) if raw != "" else ""
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
    return validate(RunConfig, data)


def load_config(path: str | os.PathLike, overrides: list[str] = (), check_paths: bool = True) -> RunConfig:
    """Read, override, validate. Raises ConfigError naming the key and value on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = read_yaml(p.read_text()) or {}
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


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list or tp is list:
        return "a list"
    return getattr(tp, "__name__", str(tp))


def reference_markdown(cls: type[Section] = RunConfig, prefix: str = "") -> str:
    """The config reference table, generated from the sections' fields."""
    rows = []
    for name, f in cls.model_fields.items():
        key, tp = f"{prefix}{name}", f.annotation
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if isinstance(tp, type) and issubclass(tp, Section):
            rows.append(reference_markdown(tp, key + "."))
            continue
        if isinstance(inner, type) and issubclass(inner, Section):
            rows.append(f"| `{key}` | list | | {f.description} |")
            rows.append(reference_markdown(inner, key + ".N."))
            continue
        default = "required" if f.is_required() else json.dumps(f.get_default(call_default_factory=True))
        rng = ", ".join(f"{k} {getattr(m, k)}" for m in f.metadata for k in _RANGE_WORDS if hasattr(m, k))
        rows.append(f"| `{key}` | {_type_name(tp)} | `{default}` | {f.description}{f' ({rng})' if rng else ''} |")
    body = "\n".join(rows)
    if prefix:
        return body
    return "| key | type | default | meaning |\n|---|---|---|---|\n" + body


if __name__ == "__main__":  # python -m profuser.config > docs/CONFIG.md
    print("# Run config reference\n\nGenerated from `profuser/config.py` by `python -m profuser.config`.\n")
    print(reference_markdown())
