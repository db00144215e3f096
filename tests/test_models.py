"""Model loading from local directories and GGUF; attention choice; remote code and pickle safety."""
import json
import logging
import os
import shutil

import pytest
import torch

from profuser.chat import encode_chat, end_of_turn_id
from profuser.config import ModelConfig
from profuser.models import ModelLoadError, choose_attn_implementation, load_chat_model, load_model


def test_all_fixture_models_load_with_distinct_families(tiny_models, caplog):
    classes, vocab = {}, {}
    with caplog.at_level(logging.INFO, logger="profuser"):
        for name, path in tiny_models.items():
            cm = load_chat_model(ModelConfig(path=str(path)), device="cpu")
            classes[name] = type(cm.model).__name__
            vocab[name] = len(cm.tokenizer)
            assert cm.attn_implementation in ("sdpa", "eager")
            enc = encode_chat(cm.tokenizer, cm.template, [{"role": "user", "content": "Hi"}], "Hello")
            with torch.no_grad():
                out = cm.model(torch.tensor([enc.input_ids]))
            assert out.logits.shape == (1, len(enc.input_ids), cm.model.config.vocab_size)
            assert cm.model.config.vocab_size >= len(cm.tokenizer)
    assert len(set(classes.values())) == 4, classes
    assert vocab["target"] == vocab["chatml_bpe"] and len({vocab[n] for n in vocab}) == 3
    assert sum("with attention=" in r.message for r in caplog.records) == 4


def test_attention_choice():
    assert choose_attn_implementation("auto", "cpu") == "sdpa"
    assert choose_attn_implementation("eager", "cpu") == "eager"
    # flash-attn is not installed here, so even a CUDA device falls back to sdpa
    import importlib.util
    if importlib.util.find_spec("flash_attn") is None:
        assert choose_attn_implementation("auto", "cuda:0") == "sdpa"


def _custom_code_dir(src, dst, marker):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "evilnet"
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('executed')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evilnet'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")


def test_remote_code_not_executed_unless_trusted(tiny_models, tmp_path):
    marker = tmp_path / "marker"
    d = tmp_path / "custom"
    _custom_code_dir(tiny_models["chatml_bpe"], d, marker)
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(ModelConfig(path=str(d)), device="cpu")
    assert not marker.exists()
    model, _ = load_model(ModelConfig(path=str(d), trust_remote_code=True), device="cpu")
    assert marker.exists() and type(model).__name__ == "EvilModel"


def test_pickled_weights_refused_unless_allowed(tiny_models, tmp_path):
    d = tmp_path / "pickled"
    shutil.copytree(tiny_models["chatml_bpe"], d)
    from safetensors.torch import load_file
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_model(ModelConfig(path=str(d)), device="cpu")
    model, _ = load_model(ModelConfig(path=str(d), allow_pickle=True), device="cpu")
    ref, _ = load_model(ModelConfig(path=str(tiny_models["chatml_bpe"])), device="cpu")
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.gguf"):
        load_model(ModelConfig(path=str(tmp_path / "nope.gguf")))
    with pytest.raises(ModelLoadError, match="neither a directory"):
        load_model(ModelConfig(path=str(tmp_path / "nope")))


@pytest.mark.slow
def test_smollm2_gguf_generates_and_teacher_forces(smollm2):
    tok, model = smollm2.tokenizer, smollm2.model
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == 49152
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = encode_chat(tok, smollm2.template, messages, "The capital of France is Paris.")
    eot = end_of_turn_id(tok, smollm2.template)
    assert tok.convert_ids_to_tokens(eot) == "<|im_end|>"
    prompt = torch.tensor([enc.input_ids[:enc.prompt_len]])
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=eot)
    text = tok.decode(gen[0, enc.prompt_len:], skip_special_tokens=True)
    assert "Paris" in text, text
    # teacher forcing: the real model is confident on the ground truth (random init would be ~ln(49152)=10.8)
    with torch.no_grad():
        logits = model(torch.tensor([enc.input_ids])).logits[0, :-1].float()
    labels = torch.tensor(enc.labels[1:])
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    assert ce.item() < 2.0, ce.item()


def test_fixture_tokenizers_are_the_same_in_every_process():
    """Every fixture tokenizer is a function of the in-repo corpus: two fresh processes build the same
    tokenizer.json. (tokenizers' UnigramTrainer alone gives different scores and piece order per
    process, which made every run of the gemma_unigram family see a different tokenizer.)"""
    import subprocess
    import sys

    code = ("import hashlib, sys; from profuser.tiny import FAMILIES, build_tokenizer; "
            "print(' '.join(hashlib.sha256(build_tokenizer(f).backend_tokenizer.to_str().encode())"
            ".hexdigest()[:16] for f in sorted(FAMILIES)))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1], f"fixture tokenizers differ between processes: {runs}"


def _small_gguf(path):
    """A GGUF written by gguf's own writer: metadata of every value kind (arrays of strings, nested
    arrays), tensors of three types, one of them quantized (Q8_0), none a multiple of the alignment."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    w = GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 7)
    w.add_int64("t.i64", -3)
    w.add_float64("t.f64", 0.5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "café")
    w.add_array("t.strs", ["a", "", "中文", "x" * 300])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_array("t.floats", [0.25, 1.5, -2.0])
    w.add_tensor("a", np.arange(7, dtype=np.float32))
    w.add_tensor("b", np.ones((3, 5), dtype=np.float16))
    q = quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), GGMLQuantizationType.Q8_0)
    w.add_tensor("c", q, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_problem_reads_header_metadata_and_tensor_table(tmp_path):
    """gguf_problem agrees with gguf's GGUFReader on a well-formed file and finds every truncation that
    cuts into the metadata, the tensor table or the data of any tensor (GGUFReader's own offsets)."""
    from gguf import GGUFReader

    from profuser.models import gguf_problem, weight_problems

    f = tmp_path / "small.gguf"
    _small_gguf(f)
    data = f.read_bytes()
    reader = GGUFReader(str(f))
    assert {"a", "b", "c"} == {t.name for t in reader.tensors}
    needed = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert gguf_problem(f) is None and weight_problems(str(f)) == []
    cut = tmp_path / "cut.gguf"
    header_end = min(int(t.data_offset) for t in reader.tensors)
    for n in sorted({0, 3, 4, 23, 24, 25, 100, header_end - 1, header_end, needed - 1, *range(30, header_end, 37)}):
        cut.write_bytes(data[:n])
        problem = gguf_problem(cut)
        assert problem is not None, n
        if n >= header_end:
            assert problem == f"truncated or damaged ({n} bytes; its tensor table needs {needed})"
    cut.write_bytes(b"GGML" + data[4:])
    assert gguf_problem(cut).startswith("not a GGUF file (starts with b'GGML'")
    cut.write_bytes(data[:4] + (9).to_bytes(4, "little") + data[8:])
    assert gguf_problem(cut) == "GGUF version 9 (readable: 2 and 3)"
    cut.write_bytes(data.replace(b"general.architecture", b"general.architectury"))
    assert gguf_problem(cut) == "GGUF without general.architecture"
    assert weight_problems(str(cut)) == [f"{cut}: GGUF without general.architecture"]


@pytest.mark.slow
def test_real_gguf_files_pass_and_their_truncations_do_not(smollm2_path, tmp_path):
    from profuser.models import gguf_problem

    assert gguf_problem(smollm2_path) is None
    size = os.path.getsize(smollm2_path)
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        cut.write_bytes(src.read(size - 1))
    assert gguf_problem(cut) == f"truncated or damaged ({size - 1} bytes; its tensor table needs {size})"


@pytest.mark.slow
def test_gguf_tokenizer_is_converted_once_then_read_from_the_user_cache(smollm2_path, smollm2_tok, tmp_path,
                                                                        monkeypatch, caplog):
    """The first load converts the GGUF's tokenizer and caches it; later loads read the cache and give the
    same tokenizer as transformers' own GGUF conversion (smollm2_tok); a damaged entry is converted again."""
    from profuser.models import GGUF_TOKENIZER_CACHE, gguf_tokenizer, load_tokenizer, tokenizer_difference

    monkeypatch.setenv("PROFUSER_CACHE", str(tmp_path / "cache"))
    first = gguf_tokenizer(smollm2_path, "smollm2")
    (entry,) = (tmp_path / "cache" / GGUF_TOKENIZER_CACHE).iterdir()
    assert tokenizer_difference(first, smollm2_tok) is None
    again = load_tokenizer(ModelConfig(path=smollm2_path, name="smollm2"))
    assert str(again.name_or_path) == str(entry)  # read from the cache, not converted
    again = gguf_tokenizer(smollm2_path)  # load_tokenizer set a pad token; the GGUF has none
    assert str(again.name_or_path) == str(entry)
    (entry / "tokenizer.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="profuser"):
        redone = gguf_tokenizer(smollm2_path, "smollm2")
    assert "does not load" in caplog.text and tokenizer_difference(redone, smollm2_tok) is None
    assert tokenizer_difference(gguf_tokenizer(smollm2_path), smollm2_tok) is None  # the entry was rewritten
    # the comparison can fail: a changed chat template, an added token, another end token are found
    other = gguf_tokenizer(smollm2_path)
    other.chat_template = "{{ messages }}"
    assert tokenizer_difference(other, smollm2_tok) == "chat template"
    other = gguf_tokenizer(smollm2_path)
    other.add_tokens(["Hello world"])
    assert tokenizer_difference(other, smollm2_tok) == "backend tokenizer"
    assert tokenizer_difference(again, smollm2_tok) is None
    again.eos_token = "<empty_output>"
    assert tokenizer_difference(again, smollm2_tok) == "special_tokens_map"
