"""Chat formatting: exact prompt/response boundary for every fixture template and SmolLM2's own."""
import pytest

from profuser.chat import (BUILTIN_TEMPLATES, ChatTemplateError, OverLength, encode_chat, end_of_turn_id, render,
                           resolve_template)
from profuser.config import ModelConfig
from profuser.constants import IGNORE_INDEX
from profuser.models import load_chat_tokenizer

CONVERSATIONS = [
    ([{"role": "user", "content": "What is 2 plus 2?"}], "2 plus 2 is 4."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café 東京 😀?"},
      {"role": "assistant", "content": "Oui."}, {"role": "user", "content": "And  now\n\nthis?"}],
     "Zürich, 12 apples 🚀\n- item"),
]
EOT = {"chatml_bpe": "<|im_end|>", "vicuna_spm": "</s>", "gemma_unigram": "<end_of_turn>", "target": "<|im_end|>"}


def _check_encoding(tok, template, messages, response, eot_token):
    enc = encode_chat(tok, template, messages, response)
    full = render(tok, template, [*messages, {"role": "assistant", "content": response}], False)
    prompt = render(tok, template, messages, True)
    assert enc.text == full
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == full
    # labels: -100 exactly on the prompt tokens, the token ids on the response tokens
    assert enc.labels[:enc.prompt_len] == [IGNORE_INDEX] * enc.prompt_len
    assert enc.labels[enc.prompt_len:] == enc.input_ids[enc.prompt_len:]
    resp_tokens = tok.convert_ids_to_tokens(enc.input_ids[enc.prompt_len:])
    assert eot_token in resp_tokens, resp_tokens
    # the prompt part decodes to the generation prompt, the response part to the rest
    assert tok.decode(enc.input_ids[:enc.prompt_len], skip_special_tokens=False) == prompt
    assert tok.decode(enc.input_ids[enc.prompt_len:], skip_special_tokens=False).strip().startswith(response.split()[0])
    assert end_of_turn_id(tok, template) == tok.convert_tokens_to_ids(eot_token)
    return enc


@pytest.mark.parametrize("name", list(EOT))
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_fixture_templates_exact_boundary(tiny_models, name, conv):
    cm = load_chat_tokenizer(ModelConfig(path=str(tiny_models[name])))
    assert cm.template_source.startswith("tokenizer")
    messages, response = CONVERSATIONS[conv]
    _check_encoding(cm.tokenizer, cm.template, messages, response, EOT[name])


@pytest.mark.slow
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_smollm2_own_template_exact_boundary(smollm2, conv):
    assert smollm2.template_source == "tokenizer"
    messages, response = CONVERSATIONS[conv]
    enc = _check_encoding(smollm2.tokenizer, smollm2.template, messages, response, "<|im_end|>")
    assert "You are a helpful AI assistant named SmolLM" in enc.text or messages[0]["role"] == "system"


@pytest.mark.parametrize("builtin", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_render_with_prefix_property(tiny_models, builtin):
    eot = {"chatml": "<|im_end|>", "mpt": "<|im_end|>", "vicuna": "</s>", "llama-2": "</s>", "gemma": "<end_of_turn>"}
    family = {"chatml": "chatml_bpe", "mpt": "chatml_bpe", "vicuna": "vicuna_spm", "llama-2": "vicuna_spm",
              "gemma": "gemma_unigram"}[builtin]
    cm = load_chat_tokenizer(ModelConfig(path=str(tiny_models[family]), chat_template=builtin))
    assert cm.template_source == f"builtin:{builtin}"
    for messages, response in CONVERSATIONS:
        _check_encoding(cm.tokenizer, cm.template, messages, response, eot[builtin])


def test_inline_template_and_missing_template_errors(tiny_models):
    inline = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% if m['role'] == 'assistant' %}" \
             "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    cm = load_chat_tokenizer(ModelConfig(path=str(tiny_models["vicuna_spm"]), chat_template=inline))
    assert cm.template_source == "inline"
    _check_encoding(cm.tokenizer, cm.template, *CONVERSATIONS[0], "</s>")
    tok = cm.tokenizer
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template.*vicuna"):
        resolve_template(tok, None, "m")
    with pytest.raises(ChatTemplateError, match="neither a built-in name"):
        resolve_template(tok, "alpaca", "m")


def test_non_prefix_template_is_refused(tiny_models):
    cm = load_chat_tokenizer(ModelConfig(path=str(tiny_models["chatml_bpe"])))
    weird = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<gen>{% endif %}"
    with pytest.raises(ChatTemplateError, match="not a prefix"):
        encode_chat(cm.tokenizer, weird, *CONVERSATIONS[0])


def test_overlength_truncates_prompt_from_left_or_rejects(tiny_models):
    cm = load_chat_tokenizer(ModelConfig(path=str(tiny_models["vicuna_spm"])))
    messages, response = [{"role": "user", "content": "word " * 100}], "short answer"
    full = encode_chat(cm.tokenizer, cm.template, messages, response)
    cut = encode_chat(cm.tokenizer, cm.template, messages, response, max_length=40)
    assert len(cut.input_ids) == 40 and cut.truncated == len(full.input_ids) - 40
    assert cut.input_ids == full.input_ids[-40:] and cut.labels == full.labels[-40:]
    with pytest.raises(OverLength, match="max_length 40"):
        encode_chat(cm.tokenizer, cm.template, messages, response, max_length=40, overlength="reject")
    with pytest.raises(OverLength, match="response alone"):
        encode_chat(cm.tokenizer, cm.template, messages, "long " * 100, max_length=40)


def _text_tokens_per_token(enc, response, special_ids=()):
    """The per-token rule text_tokens vectorizes (its former list comprehension)."""
    c = enc.text.find(response, enc.boundary) if response and enc.offsets is not None else -1
    if c < 0:
        return [t not in set(special_ids) for t in enc.input_ids[enc.prompt_len:]]
    return [s < c + len(response) and e > c for s, e in enc.offsets[enc.prompt_len:]]


def test_text_tokens_equals_the_per_token_rule():
    import random

    from profuser.chat import Encoded

    rng = random.Random(0)
    for trial in range(300):
        prompt = "p" * rng.randint(0, 6)
        response = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 8)))
        text = prompt + ("" if trial % 7 == 0 else response) + "<e>\n" * rng.randint(0, 2)
        cuts = sorted(rng.sample(range(1, len(text)), min(rng.randint(0, 6), len(text) - 1))) if len(text) > 1 else []
        bounds = [0, *cuts, len(text)] if text else []
        offsets = [(bounds[i] - rng.randint(0, 1) * (i > 0), bounds[i + 1]) for i in range(len(bounds) - 1)]
        ids = [rng.randint(0, 9) for _ in offsets]
        n_prompt = rng.randint(0, len(ids))
        special = rng.sample(range(10), rng.randint(0, 3))
        enc = Encoded(ids, [-100] * n_prompt + ids[n_prompt:], n_prompt, text,
                      offsets=None if trial % 5 == 0 else offsets, boundary=len(prompt))
        got = enc.text_tokens(response, special)
        assert got.dtype == bool and got.tolist() == _text_tokens_per_token(enc, response, special), trial
