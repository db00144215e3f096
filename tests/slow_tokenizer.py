"""A source model whose tokenizer has no Rust backend: remote code (a character-level Python
tokenizer, loaded with trust_remote_code like Qwen-7B's or ChatGLM's), so there are no offsets and
transformers has no converter for it. ProFuser then aligns it by MinED."""
from __future__ import annotations

import json
import string
from pathlib import Path

TOKENIZER_CODE = '''
import json
import os

from transformers import PythonBackend


class CharTokenizer(PythonBackend):
    """One token per character; unknown characters become <unk>."""

    vocab_files_names = {"vocab_file": "vocab.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, **kwargs):
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = json.load(f)
        self.inverse = {i: t for t, i in self.vocab.items()}
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab)

    def _tokenize(self, text, **kwargs):
        return [c if c in self.vocab else "<unk>" for c in text]

    def _convert_token_to_id(self, token):
        return self.vocab.get(token, self.vocab["<unk>"])

    def _convert_id_to_token(self, index):
        return self.inverse.get(index, "<unk>")

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        path = os.path.join(save_directory, (filename_prefix or "") + "vocab.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        return (path,)
'''

SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]


def build_char_model(out: Path, seed: int = 0) -> Path:
    """A random-init Llama over a character vocabulary, with the remote-code tokenizer above and a
    ChatML chat template; load it with trust_remote_code=True."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch

    from profuser.chat import BUILTIN_TEMPLATES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(string.printable) | set("éèàçñüö—“”’…°"))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "tokenization_chartok.py").write_text(TOKENIZER_CODE, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CharTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chartok.CharTokenizer", None]},
        "unk_token": "<unk>", "pad_token": "<pad>", "eos_token": "<|im_end|>",
        "extra_special_tokens": ["<|im_start|>"], "chat_template": BUILTIN_TEMPLATES["chatml"],
    }), encoding="utf-8")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"], bos_token_id=None)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out
