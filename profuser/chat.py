"""Chat formatting: canonical messages -> (input_ids, labels) with an exact prompt/response boundary.

The conversation is rendered twice with the model's chat template — the prompt with the generation
prompt, and the whole conversation with the response — and the prompt rendering must be a prefix of
the full one. The full text is tokenized once (so token boundaries are the model's own), and a token
is a response token when its character span ends after the boundary (a token straddling the
boundary carries response text). Labels are -100 on
prompt tokens; the response's end-of-turn token is a label.

Never picks a chat format from a model's name or path: the template is the tokenizer's own, a
built-in named in the config, or an inline Jinja string.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from profuser.constants import IGNORE_INDEX

_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_MPT_SYSTEM = (
    "- You are a helpful assistant chatbot trained by MosaicML.\n"
    "- You answer questions.\n"
    "- You are excited to be able to help the user, but will refuse to do anything that could be "
    "considered harmful to the user.\n"
    "- You are more than just an information source, you are also able to write poetry, short "
    "stories, and make jokes."
)

_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    # MPT-7B-8K-Chat: ChatML with MosaicML's default system prompt.
    "mpt": (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + _MPT_SYSTEM.replace("\n", "\\n")
        + "<|im_end|>\\n' }}{% endif %}" + _CHATML
    ),
    # FastChat's vicuna_v1.1 conversation template.
    "vicuna": (
        "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set msgs = messages[1:] %}{% else %}{% set sys = \"" + _VICUNA_SYSTEM + "\" %}"
        "{% set msgs = messages %}{% endif %}{{ bos_token + sys + ' ' }}"
        "{% for m in msgs %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
        "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # Meta's Llama-2-chat format.
    "llama-2": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
        "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
        "{% for m in msgs %}{% if m['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    # Gemma: no system role, so a system message is folded into the first user turn.
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\\n\\n' %}"
        "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
        "{% for m in msgs %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (sys if loop.first else '') + m['content'] + '<end_of_turn>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
}


class ChatTemplateError(ValueError):
    pass


def resolve_template(tokenizer, spec: Optional[str], model_name: str = "model") -> tuple[str, str]:
    """Return (jinja_template, where_it_came_from) for a model.

    spec None -> the tokenizer's own template; a built-in name; else an inline Jinja string.
    """
    if spec is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: use the default one
            own = own.get("default")
        if not own:
            raise ChatTemplateError(
                f"{model_name}: the tokenizer has no chat template; set chat_template to one of "
                f"{', '.join(BUILTIN_TEMPLATES)} or to an inline Jinja string"
            )
        same = next((n for n, t in BUILTIN_TEMPLATES.items() if t == own), None)
        return own, f"tokenizer (={same})" if same else "tokenizer"
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec], f"builtin:{spec}"
    if "{{" in spec or "{%" in spec:
        return spec, "inline"
    raise ChatTemplateError(
        f"{model_name}: chat_template {spec!r} is neither a built-in name ({', '.join(BUILTIN_TEMPLATES)}) "
        "nor a Jinja string"
    )


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # number of prompt tokens (labels -100); input_ids[prompt_len:] is the response
    text: str  # the full rendering
    truncated: int = 0  # prompt tokens dropped by the over-length policy
    offsets: Optional[list] = None  # (start, end) character offsets into `text` of each kept token; None
    # for a tokenizer without offsets (then the prompt is the tokens the full text shares with it)
    boundary: int = 0  # character index where the response region starts (len(prompt text))

    def text_tokens(self, response: str, special_ids=()) -> np.ndarray:
        """Per response token (input_ids[prompt_len:]), a bool [R]: does it encode characters of
        `response` itself? Template text after the response (end-of-turn token, ChatML's newline) does
        not. When the template rewrote the response (not verbatim in the rendering), or the tokenizer
        has no offsets, every response token that is not a special token counts."""
        c = self.text.find(response, self.boundary) if response and self.offsets is not None else -1
        if c < 0:  # no offsets, or a template that rewrote the response
            ids = np.asarray(self.input_ids[self.prompt_len:], dtype=np.int64)
            return ~np.isin(ids, np.fromiter(special_ids, dtype=np.int64))
        spans = np.asarray(self.offsets[self.prompt_len:], dtype=np.int64).reshape(-1, 2)
        return (spans[:, 0] < c + len(response)) & (spans[:, 1] > c)


class OverLength(ValueError):
    pass


def split_response(tokenizer, template: str, messages: list[dict], response: str) -> tuple[str, str]:
    """(prompt_text, response_text) such that prompt_text + response_text is the full rendering."""
    prompt = render(tokenizer, template, messages, add_generation_prompt=True)
    full = render(tokenizer, template, [*messages, {"role": "assistant", "content": response}], False)
    if not full.startswith(prompt):
        raise ChatTemplateError(
            "the chat template's generation prompt is not a prefix of the rendered conversation, so the "
            f"prompt/response boundary is ambiguous:\n  prompt: {prompt[-80:]!r}\n  full:   {full[:len(prompt)][-80:]!r}"
        )
    return prompt, full[len(prompt):]


def encode_chat(
    tokenizer,
    template: str,
    messages: list[dict],
    response: str,
    max_length: Optional[int] = None,
    overlength: Literal["truncate_left", "reject"] = "truncate_left",
) -> Encoded:
    """Token ids and labels for prompt `messages` followed by assistant `response`.

    Raises OverLength when the sample cannot fit `max_length` under the policy.
    """
    prompt, resp = split_response(tokenizer, template, messages, response)
    text = prompt + resp
    boundary = len(prompt)
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        # First token whose span ends after the boundary: a token straddling it carries response
        # text, so it is trained on (it is what the model must produce after the prompt).
        n_prompt = next((i for i, (s, e) in enumerate(offsets) if e > boundary), len(ids))
    else:  # a tokenizer without offsets: the prompt is the tokens the full text shares with it
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n_prompt = next((i for i, (a, b) in enumerate(zip(ids, alone)) if a != b), min(len(ids), len(alone)))
        offsets = None
    truncated = 0
    if max_length is not None and len(ids) > max_length:
        n_resp = len(ids) - n_prompt
        if overlength == "reject":
            raise OverLength(f"{len(ids)} tokens > max_length {max_length}")
        if n_resp >= max_length:
            raise OverLength(f"response alone is {n_resp} tokens >= max_length {max_length}")
        truncated = len(ids) - max_length
        ids = ids[truncated:]
        n_prompt -= truncated
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    offsets = None if offsets is None else [tuple(o) for o in offsets[truncated:]]
    return Encoded(list(ids), labels, n_prompt, text, truncated, offsets, boundary)


def end_of_turn_id(tokenizer, template: str) -> Optional[int]:
    """The token that ends an assistant turn under `template` (where generation must stop).

    Found by rendering a turn with a sentinel response and taking the first special token after it.
    """
    sentinel = "Zq9sentinel"
    _, resp = split_response(tokenizer, template, [{"role": "user", "content": "hi"}], sentinel)
    if sentinel not in resp:
        raise ChatTemplateError(
            f"the chat template does not write the assistant's message as given (rendered {resp!r} for "
            f"{sentinel!r}); the response text must appear verbatim to find and align its tokens")
    tail = resp[resp.index(sentinel) + len(sentinel):]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    for tid in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if tid in special:
            return tid
    return tokenizer.eos_token_id
