"""fused_linear_fusion_loss against fusion_loss over explicitly computed logits (fp64: values and
gradients w.r.t. hidden states, weight and bias), and the trainer's fused path against each
supported model's own forward."""
import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from profuser.losses import DIVERGENCES, TEACHER_REST, fused_linear_fusion_loss, fusion_loss
from profuser.train.fused import _HEADS, HeadSpec, call_with_forward, choose_loss_path, fused_forward, head_spec
from test_losses import make_batch


def head_logits(hidden, weight, bias=None, logit_scale=1.0, softcap=None):
    z = F.linear(hidden, weight, bias) * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def fused_and_reference(hidden, weight, bias, labels, ids, lps, *, logit_scale=1.0, softcap=None, grad_scale=1.0,
                        fused_chunk=3, **kw):
    """(fused parts, its grads, reference parts, its grads): grads w.r.t. hidden, weight[, bias] of grad_scale * total."""
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    got = fused_linear_fusion_loss(hidden, weight, labels, ids, lps, bias=bias, logit_scale=logit_scale,
                                   softcap=softcap, chunk_size=fused_chunk, **kw)
    got_grads = torch.autograd.grad(got.total_sum * grad_scale, leaves, allow_unused=True)
    ref = fusion_loss(head_logits(hidden, weight, bias, logit_scale, softcap), labels, ids, lps, chunk_size=2, **kw)
    ref_grads = torch.autograd.grad(ref.total_sum * grad_scale, leaves, allow_unused=True)
    return got, got_grads, ref, ref_grads


def assert_same(got, got_grads, ref, ref_grads, rtol=1e-9, atol=1e-11):
    for a, b in zip((got.total_sum, got.ce_sum, got.kd_sum), (ref.total_sum, ref.ce_sum, ref.kd_sum)):
        assert float(a.detach()) == pytest.approx(float(b.detach()), rel=rtol, abs=atol)
    assert int(got.n_tokens) == int(ref.n_tokens)
    for a, b in zip(got_grads, ref_grads):
        b = torch.zeros_like(a) if b is None else b  # the reference's graph misses an input nothing was scored with
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=atol)


def leaves(B, T, H, V, seed, bias=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, dtype=dtype) / H**0.5 * 3).requires_grad_(True)
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.5).requires_grad_(True) if bias else None
    return hidden, weight, b


@settings(max_examples=80, deadline=None)
@given(
    B=st.integers(1, 3), T=st.integers(1, 7), V=st.integers(2, 12), H=st.integers(1, 6), k_frac=st.floats(0.0, 1.0),
    chunk=st.integers(1, 9), seed=st.integers(0, 2**16), divergence=st.sampled_from(DIVERGENCES),
    tau=st.sampled_from([0.5, 1.0, 2.0]), lam=st.sampled_from([None, 0.0, 0.3, 1.0]), rest=st.sampled_from(TEACHER_REST),
    min_mass=st.sampled_from([0.0, 0.3]), head=st.sampled_from(["plain", "bias", "scale", "softcap", "scale+softcap"]),
    grad_scale=st.sampled_from([1.0, 0.37]),
)
def test_equals_fusion_loss_over_the_projected_logits(B, T, V, H, k_frac, chunk, seed, divergence, tau, lam, rest,
                                                      min_mass, head, grad_scale):
    K = max(1, round(k_frac * V))
    _, labels, ids, lps = make_batch(B, T, V, K, seed=seed)  # masked positions, -1 holes, empty rows
    hidden, weight, bias = leaves(B, T, H, V, seed + 1, bias=head == "bias")
    spec = dict(logit_scale=0.6 if "scale" in head else 1.0, softcap=2.5 if "softcap" in head else None)
    kw = dict(beta=0.6, divergence=divergence, temperature=tau, fusellm_lambda=lam, rest=rest, min_mass=min_mass)
    assert_same(*fused_and_reference(hidden, weight, bias, labels, ids, lps, grad_scale=grad_scale, fused_chunk=chunk,
                                     **spec, **kw))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_tied_head_gradient_includes_both_uses(divergence):
    """The projection is the input embedding: its gradient is the embedding's plus the head's."""
    B, T, V, H = 2, 8, 11, 5
    _, labels, ids, lps = make_batch(B, T, V, 4, seed=3)
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_(True)
    mix = torch.randn(H, H, generator=g, dtype=torch.float64).requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    kw = dict(divergence=divergence, temperature=1.5, rest="other")
    hidden = torch.tanh(emb[tokens] @ mix)
    got = fused_linear_fusion_loss(hidden, emb, labels, ids, lps, chunk_size=5, **kw)
    got_grads = torch.autograd.grad(got.total_sum, (emb, mix))
    hidden = torch.tanh(emb[tokens] @ mix)
    ref = fusion_loss(hidden @ emb.t(), labels, ids, lps, **kw)
    ref_grads = torch.autograd.grad(ref.total_sum, (emb, mix))
    assert_same(got, got_grads, ref, ref_grads)


def test_no_teacher_is_cross_entropy_and_all_masked_is_zero():
    B, T, V, H = 2, 6, 9, 4
    _, labels, ids, lps = make_batch(B, T, V, 3, seed=8)
    hidden, weight, _ = leaves(B, T, H, V, 9)
    got = fused_linear_fusion_loss(hidden, weight, labels, None, None)
    ce = F.cross_entropy(head_logits(hidden, weight)[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
    assert float(got.total_sum.detach()) == pytest.approx(float(ce.detach()), rel=1e-12) and float(got.kd_sum) == 0.0
    masked = torch.full_like(labels, -100)
    for teacher in ((ids, lps), (None, None)):
        got = fused_linear_fusion_loss(hidden, weight, masked, *teacher, temperature=2.0)
        assert float(got.total_sum) == 0.0 and int(got.n_tokens) == 0
        gh, gw = torch.autograd.grad(got.mean(), (hidden, weight))
        assert (gh == 0).all() and (gw == 0).all()  # zero gradients, not missing ones (DDP / ZeRO hooks fire)


def test_chunk_size_does_not_change_the_result():
    B, T, V, H = 3, 10, 17, 6
    _, labels, ids, lps = make_batch(B, T, V, 5, seed=12)
    hidden, weight, bias = leaves(B, T, H, V, 13, bias=True)
    results = []
    for chunk in (1, 4, 7, 1000):
        got = fused_linear_fusion_loss(hidden, weight, labels, ids, lps, bias=bias, chunk_size=chunk, temperature=1.3)
        results.append((got.total_sum.detach(), torch.autograd.grad(got.total_sum, (hidden, weight, bias))))
    for total, grads in results[1:]:
        assert float(total) == pytest.approx(float(results[0][0]), rel=1e-12)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_nothing_vocabulary_sized_is_kept_for_backward():
    """Kept for backward: the gradients of hidden [B, T, H] and weight [V, H] only, however long the
    sequence; no [B, T, V] tensor, no chunk's logits."""
    B, T, V, H, chunk = 2, 64, 96, 8, 16
    _, labels, ids, lps = make_batch(B, T, V, 5, seed=21)
    hidden, weight, _ = leaves(B, T, H, V, 22, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = fused_linear_fusion_loss(hidden, weight, labels, ids, lps, chunk_size=chunk, temperature=2.0)
    assert sorted(saved) == sorted([(B, T, H), (V, H)])
    got.total_sum.backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


def test_low_precision_chunks_match_the_fp64_loss():
    B, T, V, H = 2, 12, 40, 16
    _, labels, ids, lps = make_batch(B, T, V, 6, seed=31)
    hidden, weight, _ = leaves(B, T, H, V, 32)
    want = fusion_loss(head_logits(hidden, weight), labels, ids, lps)
    got = fused_linear_fusion_loss(hidden.detach().bfloat16().requires_grad_(True),
                                   weight.detach().bfloat16().requires_grad_(True), labels, ids, lps.half())
    assert got.total_sum.dtype == torch.float32
    assert float(got.total_sum) == pytest.approx(float(want.total_sum), rel=2e-2)


def test_invalid_arguments_raise():
    _, labels, ids, lps = make_batch(1, 4, 6, 2)
    hidden, weight, _ = leaves(1, 4, 3, 6, 0)
    with pytest.raises(ValueError, match=r"hidden \(1, 3, 3\) must be \[B, T, H\]"):
        fused_linear_fusion_loss(hidden[:, :3], weight, labels, ids, lps)
    with pytest.raises(ValueError, match=r"weight \(6, 2\) must be \[V, H\] with H = 3"):
        fused_linear_fusion_loss(hidden, weight[:, :2], labels, ids, lps)
    with pytest.raises(ValueError, match=r"bias \(5,\) must be \[V\]"):
        fused_linear_fusion_loss(hidden, weight, labels, ids, lps, bias=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"softcap=0.0 None or > 0"):
        fused_linear_fusion_loss(hidden, weight, labels, ids, lps, softcap=0.0)
    with pytest.raises(ValueError, match=r"divergence: 'js' is not allowed"):
        fused_linear_fusion_loss(hidden, weight, labels, ids, lps, divergence="js")
    got = fused_linear_fusion_loss(hidden, weight, labels, ids, lps)
    got.total_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        got.total_sum.backward()


# ---------------------------------------------------------------------------------------------
# the trainer's fused path on real (tiny, random) transformers models


def tiny_model(class_name: str, tie: bool = False) -> nn.Module:
    config_class = transformers.AutoConfig.for_model(_MODEL_TYPES[class_name]).__class__
    cfg = config_class(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=tie)
    if class_name.startswith("Gemma2"):
        cfg.final_logit_softcapping = 3.0  # small enough that the tanh matters on these logits
    if class_name.startswith("Gemma3"):
        cfg.final_logit_softcapping = 2.0  # None by default: the cap must still be read from the config
    if class_name.startswith("Cohere"):
        cfg.logit_scale = 0.7
    if class_name.startswith("Granite"):
        cfg.logits_scaling = 4.0
    torch.manual_seed(0)
    return getattr(transformers, class_name)(cfg).double().train()


_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3", "OlmoForCausalLM": "olmo", "Olmo2ForCausalLM": "olmo2",
                "GPTNeoXForCausalLM": "gpt_neox", "GemmaForCausalLM": "gemma", "Phi3ForCausalLM": "phi3",
                "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text", "CohereForCausalLM": "cohere",
                "Cohere2ForCausalLM": "cohere2", "GraniteForCausalLM": "granite"}


def tiny_batch(V, B=2, T=9, K=4, seed=0):
    _, labels, ids, lps = make_batch(B, T, V, K, seed=seed)
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, V, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, -2:] = 0  # right padding
    labels[1, -2:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "topk_ids": ids,
            "topk_logprobs": lps}


def test_every_listed_model_is_tested():
    assert set(_MODEL_TYPES) == set(_HEADS)


@pytest.mark.parametrize("class_name", sorted(_HEADS))
def test_fused_forward_equals_the_models_logits_path(class_name):
    """For each supported architecture, the fused path (trunk, then the fused loss over the output
    projection) gives the loss and the gradient of every parameter of ``fusion_loss`` over the
    model's own logits."""
    for tie in (False, True):
        model = tiny_model(class_name, tie)
        spec, why = head_spec(model)
        assert spec is not None, why
        assert ("tied" if tie else "untied") in why
        batch = tiny_batch(model.config.vocab_size)
        kw = dict(beta=0.8, divergence="forward_kl", temperature=1.5, rest="other")
        params = [p for p in model.parameters() if p.requires_grad]
        got = fused_forward(model, model, spec, batch, chunk_size=5, **kw)
        got_grads = torch.autograd.grad(got.total_sum, params, allow_unused=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        ref = fusion_loss(logits, batch["labels"], batch["topk_ids"], batch["topk_logprobs"], **kw)
        ref_grads = torch.autograd.grad(ref.total_sum, params, allow_unused=True)
        assert_same(got, got_grads, ref, ref_grads, rtol=1e-9, atol=1e-10)
        assert "forward" not in model.__dict__  # the model's own forward is back


def test_head_specs_read_the_model():
    assert head_spec(tiny_model("Gemma2ForCausalLM"))[0] == HeadSpec(softcap=3.0)
    assert head_spec(tiny_model("CohereForCausalLM"))[0] == HeadSpec(logit_scale=0.7)
    assert head_spec(tiny_model("GraniteForCausalLM"))[0] == HeadSpec(logit_scale=0.25)
    assert head_spec(tiny_model("LlamaForCausalLM"))[0] == HeadSpec()


def test_unsupported_models_fall_back_or_fail_with_the_reason():
    class MyLlama(transformers.LlamaForCausalLM):  # a subclass may do anything in its forward
        pass

    model = tiny_model("LlamaForCausalLM")
    custom = MyLlama(model.config)
    spec, why = head_spec(custom)
    assert spec is None and "MyLlama is not one of the transformers causal LMs" in why
    model.lm_head = nn.Sequential(model.lm_head)  # e.g. an adapter or quantized wrapper around the head
    spec, why = choose_loss_path("auto", model)
    assert spec is None and "the output projection is a Sequential, not a plain torch.nn.Linear" in why
    with pytest.raises(ValueError, match="train.fused_loss=on but the fused loss does not support this model"):
        choose_loss_path("on", model)
    assert choose_loss_path("off", tiny_model("LlamaForCausalLM")) == (None, "train.fused_loss=off")


def test_call_with_forward_keeps_hooks_and_restores_the_forward():
    lin = nn.Linear(3, 2)
    calls = []
    lin.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    lin.register_forward_hook(lambda m, a, o: calls.append("post"))
    out = call_with_forward(lin, lambda x: x.sum(), lin, torch.ones(4, 3))
    assert float(out) == 12.0 and calls == ["pre", "post"] and "forward" not in lin.__dict__
    wrapper = lambda x: x * 0  # noqa: E731 — an instance-level forward (as accelerate's autocast wrapper is)
    lin.forward = wrapper
    call_with_forward(lin, lambda x: x, lin, torch.ones(1, 3))
    assert lin.forward is wrapper
    call_with_forward(lin, lambda x: x, lambda x: x, torch.ones(1, 3))  # the module was never called
    assert lin.forward is wrapper
