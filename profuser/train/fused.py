"""The trainer's fused-linear loss path: which models it supports and how it runs them.

    spec, why = choose_loss_path(cfg.train.fused_loss, model)   # HeadSpec, or None and why the logits path
    parts = fused_forward(model_as_called, model, spec, batch, **loss_kwargs)   # LossParts, as fusion_loss

The fused path computes the model's trunk, then ``fused_linear_fusion_loss`` on the last hidden state
and the output projection, so no [B, T, V] logits tensor is ever built. It must reproduce exactly what
the model's forward does between the last hidden state and the logits; that is known per causal-LM
class (transformers 5), listed in ``_HEADS`` and checked against each model's real forward in
tests/test_fused_loss.py. Any other model (remote code, a subclass, PEFT, a quantized or otherwise
non-``nn.Linear`` head) takes the logits path, and the trainer logs why. This module must never build
[B, T, V] logits, and never take the fused path for a head it has not matched in ``_HEADS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from profuser.losses import LossParts, fused_linear_fusion_loss


@dataclass(frozen=True)
class HeadSpec:
    """logits = softcap * tanh(logit_scale * lm_head(h) / softcap) (no tanh when softcap is None)."""

    logit_scale: float = 1.0
    softcap: Optional[float] = None

    def describe(self) -> str:
        z = "lm_head(h)" if self.logit_scale == 1.0 else f"{self.logit_scale:g} * lm_head(h)"
        return z if self.softcap is None else f"{self.softcap:g} * tanh({z} / {self.softcap:g})"


def _plain(model) -> HeadSpec:
    return HeadSpec()


def _final_softcap(model) -> HeadSpec:  # Gemma-2/3: logits / cap, tanh, * cap (when the config sets a cap)
    return HeadSpec(softcap=model.config.final_logit_softcapping)


def _logit_scale(model) -> HeadSpec:  # Cohere: logits * self.logit_scale
    return HeadSpec(logit_scale=float(model.logit_scale))


def _logits_scaling(model) -> HeadSpec:  # Granite: logits / config.logits_scaling
    return HeadSpec(logit_scale=1.0 / float(model.config.logits_scaling))


# transformers 5 causal-LM class -> what its forward does to lm_head(last_hidden_state)
_HEADS: dict[str, Callable[[nn.Module], HeadSpec]] = {
    "LlamaForCausalLM": _plain, "MistralForCausalLM": _plain, "Qwen2ForCausalLM": _plain,
    "Qwen3ForCausalLM": _plain, "OlmoForCausalLM": _plain, "Olmo2ForCausalLM": _plain,
    "GPTNeoXForCausalLM": _plain, "GemmaForCausalLM": _plain, "Phi3ForCausalLM": _plain,
    "Gemma2ForCausalLM": _final_softcap, "Gemma3ForCausalLM": _final_softcap,
    "CohereForCausalLM": _logit_scale, "Cohere2ForCausalLM": _logit_scale,
    "GraniteForCausalLM": _logits_scaling,
}


def head_spec(model: nn.Module) -> tuple[Optional[HeadSpec], str]:
    """(HeadSpec, description) when the fused path reproduces ``model``'s logits, else (None, reason)."""
    cls = type(model)
    name = cls.__name__
    if name not in _HEADS or not cls.__module__.startswith("transformers.models."):
        return None, (f"{cls.__module__}.{name} is not one of the transformers causal LMs whose step from the "
                      f"last hidden state to the logits the fused path knows ({', '.join(sorted(_HEADS))})")
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return None, f"{name}: the output projection is a {type(head).__name__}, not a plain torch.nn.Linear"
    if model.base_model is model:
        return None, f"{name}: no separate trunk (base_model is the model itself)"
    spec = _HEADS[name](model)
    tied = head.weight is model.get_input_embeddings().weight
    bias = " with bias" if head.bias is not None else ""
    return spec, (f"{name}: logits = {spec.describe()}, {'tied' if tied else 'untied'} "
                  f"{head.out_features} x {head.in_features} projection{bias}")


def fused_forward(model_as_called: nn.Module, model: nn.Module, spec: HeadSpec, batch: dict,
                  **loss_kwargs) -> LossParts:
    """One forward pass of ``model_as_called`` (the DeepSpeed engine, DDP or ``model`` itself) that
    returns the fused loss of ``batch`` (input_ids, attention_mask, labels, topk_ids, topk_logprobs)
    instead of logits.

    For this one call, ``model``'s forward is the trunk followed by a call of the output-projection
    module whose forward is, for that call, ``fused_linear_fusion_loss``. Both stay ordinary module
    calls, so whatever wraps a forward works as usual: DeepSpeed's engine forward/backward hooks,
    ZeRO-3 gathering the projection for the loss's forward and again before its backward (the
    weight's gradient then lands on the gathered parameter and ZeRO's own hook reduce-scatters it,
    tied embeddings included), DDP's gradient sync, gradient checkpointing inside the trunk.
    ``total_sum`` is the tensor the call returned (the one the wrappers' backward hooks are on).
    """
    head = model.get_output_embeddings()
    parts: list[LossParts] = []

    def head_forward(hidden):
        p = fused_linear_fusion_loss(hidden, head.weight, batch["labels"], batch["topk_ids"], batch["topk_logprobs"],
                                     bias=head.bias, logit_scale=spec.logit_scale, softcap=spec.softcap, **loss_kwargs)
        parts.append(p)
        return p.total_sum

    def model_forward(input_ids, attention_mask):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return call_with_forward(head, head_forward, head, hidden)

    total = call_with_forward(model, model_forward, model_as_called, input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"])
    (p,) = parts
    return LossParts(total, p.ce_sum, p.kd_sum, p.n_tokens)


def call_with_forward(module: nn.Module, forward: Callable, caller: Callable, *args, **kwargs):
    """``caller(*args, **kwargs)`` with ``module.forward`` replaced by ``forward`` for the one call of
    it that this makes (PyTorch Lightning's "forward redirection"): ``caller`` is ``module`` or what
    wraps it, and the module's hooks run around ``forward`` as around its own forward."""
    saved = module.__dict__.get("forward")  # an instance-level forward (e.g. a wrapper) is put back as it was

    def restore():
        if saved is None:
            del module.forward
        else:
            module.forward = saved

    def once(*a, **k):
        restore()
        return forward(*a, **k)

    module.forward = once
    try:
        return caller(*args, **kwargs)
    finally:
        if module.__dict__.get("forward") is once:  # the caller never reached the module
            restore()


def choose_loss_path(setting: str, model: nn.Module) -> tuple[Optional[HeadSpec], str]:
    """The loss path under ``train.fused_loss`` = ``setting``: (HeadSpec, why) for the fused path,
    (None, why) for the logits path. ``on`` with an unsupported model is an error."""
    if setting == "off":
        return None, "train.fused_loss=off"
    spec, why = head_spec(model)
    if spec is None and setting == "on":
        raise ValueError(f"train.fused_loss=on but the fused loss does not support this model: {why}; "
                         "use train.fused_loss=auto (falls back to the logits path) or off")
    return spec, why
