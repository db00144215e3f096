"""Tiny chat models of three genuinely different tokenizer families, built locally in seconds.

Used by the tests, by examples/tiny.yaml and by the demo. Each tokenizer is trained with the
`tokenizers` library on an in-repo corpus; each model is a random-init config of a different
architecture saved with `save_pretrained`, so everything downstream goes through the real
`from_pretrained` path. It must never download anything: every tokenizer and model is built from
the repository's own files.

    python -m profuser.tiny .tiny          # models in .tiny/models, data in .tiny/data

| name            | tokenizer family                                   | template | architecture |
|-----------------|----------------------------------------------------|----------|--------------|
| chatml_bpe      | byte-level BPE, `Ġ` space marker (GPT-2/Llama-3)    | chatml   | Llama        |
| vicuna_spm      | SentencePiece-style BPE, `▁`, byte fallback         | vicuna   | Mistral      |
| gemma_unigram   | Unigram, `▁`, NFKC normalizer, byte fallback        | gemma    | GPT-NeoX     |
| target          | same tokenizer as chatml_bpe (identical fast path)  | chatml   | OLMo-2       |
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from profuser.chat import BUILTIN_TEMPLATES

SOURCES = ("chatml_bpe", "vicuna_spm", "gemma_unigram")
TARGET = "target"


def corpus_lines() -> list[str]:
    text = resources.files("profuser.resources").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")
    lines = [l for l in text.splitlines() if l.strip()]
    rng = random.Random(0)
    # Synthetic lines so digits, words and numbers get merges of their own.
    for _ in range(300):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"What is {a} plus {b}? The answer is {a + b}.")
    return lines * 3


def _byte_level_bpe(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    return tok, dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)


def _byte_tokens() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


def _spm_bpe(vocab_size: int):
    """Llama-2/Vicuna style: Metaspace `▁`, BPE with byte fallback, <unk> <s> </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    probe = Tokenizer(models.BPE(unk_token="<unk>"))
    probe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    probe.train_from_iterator(corpus_lines(), trainer)
    learned = json.loads(probe.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + _byte_tokens())}
    for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens(specials)
    return tok, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")


def _unigram_scores(pieces: list[str], lines: list[str], normalizer, pre_tokenizer, iterations: int = 4):
    """Deterministic Unigram log-probabilities for a fixed piece set: hard EM (Viterbi counts).

    `tokenizers`' UnigramTrainer picks the same pieces in every process but its scores (float sums in
    hash-map order) and piece order differ from process to process, so each build segmented text a
    little differently and every run saw another tokenizer. Re-estimating the scores here, over
    pieces in sorted order, makes the fixture a function of the corpus alone.
    """
    import math
    from collections import Counter

    from tokenizers import models

    words = Counter()
    for line in lines:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            words[word] += 1
    counts = Counter()
    for word, n in words.items():  # start: how often each piece occurs as a substring
        for p in pieces:
            if p in word:
                counts[p] += n * word.count(p)
    for _ in range(iterations):
        total = sum(counts.values()) + 0.5 * len(pieces)
        scores = [(p, math.log((counts[p] + 0.5) / total)) for p in pieces]
        model = models.Unigram(scores, unk_id=None, byte_fallback=False)
        counts = Counter()
        for word, n in sorted(words.items()):
            for token in model.tokenize(word):
                counts[token.value] += n
    total = sum(counts.values()) + 0.5 * len(pieces)
    return [(p, round(math.log((counts[p] + 0.5) / total), 6)) for p in pieces]


def _unigram(vocab_size: int):
    """Gemma-ish: NFKC normalizer, Metaspace `▁` (no dummy prefix), Unigram with byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    probe = Tokenizer(models.Unigram())
    probe.normalizer = normalizers.NFKC()
    probe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    probe.train_from_iterator(corpus_lines(), trainer)
    pieces = sorted({t for t, _ in json.loads(probe.to_str())["model"]["vocab"]} - set(specials))
    learned = _unigram_scores(pieces, corpus_lines(), probe.normalizer, probe.pre_tokenizer)
    vocab = [(t, 0.0) for t in specials] + learned
    vocab += [(b, -20.0) for b in _byte_tokens() if b not in set(pieces)]
    unk_id = specials.index("<unk>")
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=True))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    return tok, dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


FAMILIES = {
    # name: (tokenizer builder, vocab size, template, architecture)
    "chatml_bpe": (_byte_level_bpe, 512, "chatml", "llama"),
    "vicuna_spm": (_spm_bpe, 640, "vicuna", "mistral"),
    "gemma_unigram": (_unigram, 600, "gemma", "gpt_neox"),
}


def build_tokenizer(family: str):
    """A transformers fast tokenizer of `family`, with its chat template set."""
    from transformers import PreTrainedTokenizerFast

    builder, vocab_size, template, _ = FAMILIES[family]
    tok, specials = builder(vocab_size)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in specials.items() if v})
    hf.chat_template = BUILTIN_TEMPLATES[template]
    return hf


def build_model(arch: str, vocab_size: int, seed: int, tok, hidden: int = 64, layers: int = 2):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    if arch in ("llama", "mistral", "olmo2"):
        common["num_key_value_heads"] = 2
    cfg = AutoConfig.for_model(arch, **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def build_one(name: str, out: Path, seed: int, arch: str | None = None, tokenizer_family: str | None = None):
    family = tokenizer_family or name
    tok = build_tokenizer(family)
    model = build_model(arch or FAMILIES[family][3], len(tok), seed, tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_records(n: int = 24, seed: int = 0) -> list[dict]:
    """A small chat-format instruction set with ground-truth answers (for examples/tiny.yaml)."""
    rng = random.Random(seed)
    words = ["planet", "garden", "silver", "rocket", "yellow", "window", "forest", "pencil"]
    capitals = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Peru": "Lima", "Egypt": "Cairo"}
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            w = rng.choice(words)
            q, ans = f'Reverse the word "{w}".', f'The reverse of "{w}" is "{w[::-1]}".'
        else:
            c = rng.choice(sorted(capitals))
            q, ans = f"What is the capital of {c}?", f"The capital of {c} is {capitals[c]}."
        out.append({"id": f"tiny-{i:03d}", "messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": ans}]})
    return out


def build_suite(root: str | os.PathLike) -> Path:
    """Build models/{chatml_bpe,vicuna_spm,gemma_unigram,target} and data/{train,eval}.jsonl under root.

    Idempotent: a finished suite (marked by root/.complete) is left alone. Built in a temp dir and
    renamed, so concurrent builders (pytest-xdist workers) never see a half-built suite.
    """
    root = Path(root)
    if (root / ".complete").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root.parent))
    try:
        for i, name in enumerate(SOURCES):
            build_one(name, tmp / "models" / name, seed=i)
        build_one(TARGET, tmp / "models" / TARGET, seed=10, arch="olmo2", tokenizer_family="chatml_bpe")
        (tmp / "data").mkdir()
        for split, n, seed in (("train", 24, 0), ("eval", 6, 1)):
            with open(tmp / "data" / f"{split}.jsonl", "w") as f:
                for r in tiny_records(n, seed):
                    f.write(json.dumps(r) + "\n")
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, root)
        except OSError:  # someone else finished first (or root exists but is incomplete)
            if not (root / ".complete").exists():
                shutil.rmtree(root, ignore_errors=True)
                os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Build the tiny models and data used by examples/tiny.yaml and the tests.")
    p.add_argument("root", nargs="?", default=".tiny", help="Output directory (default: .tiny).")
    args = p.parse_args(argv)
    root = build_suite(args.root)
    print(f"tiny models in {root / 'models'}, data in {root / 'data'}")


if __name__ == "__main__":
    main()
