"""FusionTrainer in one process: which modes are forwarded, loss normalization under gradient
accumulation, the sampling variant, gradient checkpointing, logged metrics and argument checks."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from profuser.config import ConfigError, parse_config
from profuser.models import load_chat_tokenizer, load_model
from profuser.schedule import draw_modes, mode_weights, sampling_scale
from profuser.train import train
from profuser.train.args import FusionTrainingArguments, training_arguments
from profuser.train.collator import RawBatch, count_targets
from profuser.train.dataset import FusionDataset
from profuser.train.trainer import FusionTrainer
from train_fixtures import cached_training_set, run_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build_dir(tiny_suite):
    return cached_training_set(tiny_suite)


class ForwardCounter(TrainerCallback):
    """Counts the model's real forward calls per optimizer step (a hook on the module itself)."""

    def __init__(self):
        self.calls, self.per_step = 0, []

    def on_train_begin(self, args, state, control, model=None, **kw):
        model.register_forward_pre_hook(lambda *a: setattr(self, "calls", self.calls + 1))

    def on_step_end(self, args, state, control, **kw):
        self.per_step.append(self.calls - sum(self.per_step))


def test_zero_weight_mode_is_not_forwarded(tiny_suite, build_dir, tmp_path):
    """profuser preset, 4 steps, switch at 0.5: steps 0-1 forward only inference mode (w_train = 0)."""
    counter = ForwardCounter()
    cfg = parse_config(run_config(tiny_suite, tmp_path / "run", max_steps=4, switch_fraction=0.5))
    trainer = train(cfg, data=str(build_dir), callbacks=[counter])
    # 2 micro-batches per step: 1 forward each in stage 1, 2 (one per mode) in stage 2
    assert counter.per_step == [2, 2, 4, 4]
    assert trainer.forward_counts == {"inference": 8, "training": 4}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [(h["w_inf"], h["w_train"]) for h in logs] == [(1.0, 0.0)] * 2 + [(0.1, 1.0)] * 2
    assert "training/ce" not in logs[0] and "training/ce" in logs[2]
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_second", "inference/ce", "inference/kd",
                "teacher_share/inference/chatml_bpe", "teacher_share/inference/chatml_bpe_b"):
        assert all(key in h and h[key] == h[key] for h in logs), key  # present and not NaN
    shares = [logs[3][f"teacher_share/training/{n}"] for n in ("chatml_bpe", "chatml_bpe_b")]
    assert sum(shares) == pytest.approx(1.0)
    # the logged loss is the weighted sum of the per-mode losses
    assert logs[3]["loss"] == pytest.approx(0.1 * logs[3]["inference/loss"] + logs[3]["training/loss"], rel=1e-5)
    # final model + tokenizer + chat template, and a metrics file
    final = tmp_path / "run" / "train" / "final"
    assert (final / "model.safetensors").exists() and (final / "chat_template.jinja").exists()
    lines = (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "w_inf" in line] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def bare_trainer(tiny_suite, build_dir, tmp_path_factory):
    """A FusionTrainer built by hand (no training run) for calling get_batch_samples / compute_loss."""
    run = tmp_path_factory.mktemp("bare")
    cfg = parse_config(run_config(tiny_suite, run, per_device_train_batch_size=4, gradient_accumulation_steps=2))
    args = training_arguments(cfg, run / "out", report_to=[])
    tok = load_chat_tokenizer(cfg.target).tokenizer
    model, _ = load_model(cfg.target, device="cpu", place=False)
    ds = FusionDataset(build_dir, cache_dir=run / "c")
    trainer = FusionTrainer(model=model, args=args, train_dataset=ds, pad_token_id=tok.pad_token_id,
                            teacher_names=ds.teacher_names)
    trainer.state.max_steps = 10
    return trainer, ds


def _micro_batches(ds):
    return [RawBatch.collate_fn([ds[i] for i in range(0, 4)]), RawBatch.collate_fn([ds[i] for i in range(4, 8)])]


@pytest.mark.parametrize("schedule,step,modes", [
    ("profuser", 4, ["inference"]), ("profuser", 5, ["inference", "training"]),
    ("fusellm", 0, ["training"]), ("inference_only", 9, ["inference"]), ("reverse", 0, ["training"]),
    ("simul", 3, ["inference", "training"]), ("sft", 0, ["training"]),
])
def test_only_weighted_modes_are_collated_and_forwarded(bare_trainer, schedule, step, modes):
    trainer, ds = bare_trainer
    trainer.args.schedule, trainer.state.global_step = schedule, step
    batches, _ = trainer.get_batch_samples(iter(_micro_batches(ds)), 2, "cpu")
    assert [list(b["modes"]) for b in batches] == [modes, modes]
    calls = []
    hook = trainer.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batches[0])
    finally:
        hook.remove()
    assert len(calls) == len(modes)


def test_denominators_are_the_whole_step_label_tokens(bare_trainer):
    trainer, ds = bare_trainer
    trainer.args.schedule, trainer.state.global_step = "simul", 0
    micro = _micro_batches(ds)
    batches, total = trainer.get_batch_samples(iter(micro), 2, "cpu")
    n = {m: sum(count_targets(torch.as_tensor(ds[i][m]["labels"])[None]) for i in range(8) if ds[i][m] is not None)
         for m in ("inference", "training")}
    for b in batches:
        assert b["scale"] == {m: pytest.approx(1.0 / n[m]) for m in b["modes"]}
    assert int(total) == sum(n.values())
    # the accumulated loss equals the loss of one batch holding both micro-batches
    with torch.no_grad():
        split = sum(float(trainer.compute_loss(trainer.model, b)) for b in batches)
        whole, _ = trainer.get_batch_samples(iter([RawBatch(micro[0] + micro[1])]), 1, "cpu")
        assert split == pytest.approx(float(trainer.compute_loss(trainer.model, whole[0])), rel=1e-6)


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_stage2_step_backwards_each_mode_before_the_next_forward(bare_trainer):
    """Both modes in every micro-batch: training_step forwards and backwards one mode, then the
    other (one mode's activations alive at a time), and the step's gradient equals that of the
    trainer before the fused path and the per-mode backward: logits, both modes' loss summed, one
    backward per micro-batch."""
    trainer, ds = bare_trainer
    model = trainer.model
    trainer.args.schedule, trainer.state.global_step = "simul", 0
    batches, _ = trainer.get_batch_samples(iter(_micro_batches(ds)), 2, "cpu")
    assert all(list(b["modes"]) == ["inference", "training"] for b in batches)
    events = []

    def on_backward(module, args, out):  # the backward pass reaches the embedding output
        out.register_hook(lambda g: events.append("backward"))

    hooks = [model.register_forward_pre_hook(lambda *a: events.append("forward")),
             model.get_input_embeddings().register_forward_hook(on_backward)]
    assert trainer.head_spec is not None  # train.fused_loss=auto on the OLMo-2 target
    try:
        model.zero_grad()
        losses = [float(trainer.training_step(model, b)) for b in batches]
    finally:
        for h in hooks:
            h.remove()
    assert events == ["forward", "backward"] * 4
    fused = _grads(model)
    spec, trainer.head_spec = trainer.head_spec, None
    try:
        model.zero_grad()
        joint = []
        for b in batches:
            loss = trainer.compute_loss(model, b)
            loss.backward()
            joint.append(float(loss.detach()))
        reference = _grads(model)
    finally:
        trainer.head_spec = spec
        model.zero_grad()
    assert losses == pytest.approx(joint, rel=1e-6)
    assert fused.keys() == reference.keys()
    for name, g in reference.items():
        torch.testing.assert_close(fused[name], g, rtol=1e-5, atol=1e-7)


def test_sample_mode_draws_one_mode_per_sample(bare_trainer):
    trainer, ds = bare_trainer
    trainer.args.schedule, trainer.args.sample_mode = "profuser", True
    try:
        trainer.state.global_step = 7
        micro = _micro_batches(ds)
        batches, _ = trainer.get_batch_samples(iter(micro), 2, "cpu")
    finally:
        trainer.args.sample_mode = False
    w_inf, w_train = mode_weights("profuser", 7, 10)
    for samples, b in zip(micro, batches):
        drawn = draw_modes(w_inf, w_train, [s["id"] for s in samples], trainer.args.seed, 7)
        for m, sub in b["modes"].items():
            assert sub["ids"] == [s["id"] for s, d in zip(samples, drawn) if d == m and s[m] is not None]
        forwarded = [i for sub in b["modes"].values() for i in sub["ids"]]
        assert len(forwarded) == len(set(forwarded))  # each sample in at most one mode
    # N_m counts every sample with mode m, drawn or not: unbiased for w_inf * L_inf + w_train * L_train
    n_train = sum(count_targets(torch.as_tensor(ds[i]["training"]["labels"])[None]) for i in range(8))
    scale = sampling_scale(w_inf, w_train)
    assert any(b["scale"].get("training") == pytest.approx(scale / n_train) for b in batches)


def test_sample_mode_and_length_grouping_train(tiny_suite, build_dir, tmp_path):
    """Stage 2 from the start (both weights > 0) with one drawn mode per sample: each sample is
    forwarded at most once per step; batches come from the seeded length-grouped sampler."""
    counter = ForwardCounter()
    cfg = parse_config(run_config(tiny_suite, tmp_path / "run", max_steps=4, switch_fraction=0.0, sample_mode=True,
                                  group_by_length=True))
    trainer = train(cfg, data=str(build_dir), callbacks=[counter])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(h["loss"] == h["loss"] for h in logs)
    for h in logs:  # 4 samples per step, each in at most one mode
        assert h.get("inference/samples", 0) + h.get("training/samples", 0) <= 4
    assert sum(counter.per_step) < 4 * 2 * 2  # fewer forwards than both modes for every micro-batch
    assert trainer.args.train_sampling_strategy == "group_by_length"


def _final_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "train" / "final" / "model.safetensors")


def _losses(trainer) -> list:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_gradient_accumulation_matches_one_big_batch(tiny_suite, build_dir, tmp_path):
    """SGD (so the update is proportional to the gradient): 1x4, 2x2 and 4x1 micro-batches of the
    same 4 samples (the seeded order does not depend on the batch size) give the same step."""
    runs = {}
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        cfg = parse_config(run_config(tiny_suite, tmp_path / f"r{bs}", max_steps=1, schedule="simul", optim="sgd",
                                      learning_rate=0.5, max_grad_norm=0.0, per_device_train_batch_size=bs,
                                      gradient_accumulation_steps=ga))
        runs[bs] = (_losses(train(cfg, data=str(build_dir))), _final_weights(tmp_path / f"r{bs}"))
    (l4, w4), (l2, w2), (l1, w1) = runs[4], runs[2], runs[1]
    assert l2 == pytest.approx(l4, rel=1e-6) and l1 == pytest.approx(l4, rel=1e-6)
    for k in w4:
        torch.testing.assert_close(w2[k], w4[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w1[k], w4[k], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_steps(tiny_suite, build_dir, tmp_path):
    out = {}
    for gc in (False, True):
        cfg = parse_config(run_config(tiny_suite, tmp_path / str(gc), max_steps=2, gradient_checkpointing=gc))
        trainer = train(cfg, data=str(build_dir))
        out[gc] = (_losses(trainer), _final_weights(tmp_path / str(gc)))
        assert trainer.model.is_activation_checkpointing == gc
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    for k, v in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], v, rtol=1e-5, atol=1e-6)


def test_fused_and_logits_paths_train_the_same_weights(tiny_suite, build_dir, tmp_path, caplog):
    """profuser preset, stage 1 then stage 2 (both modes): train.fused_loss on and off give the same
    steps; the chosen path is logged once and in the metrics."""
    out = {}
    for fused in ("on", "off"):
        cfg = parse_config(run_config(tiny_suite, tmp_path / fused, max_steps=4, switch_fraction=0.5, optim="sgd",
                                      learning_rate=0.5, max_grad_norm=0.0, fused_loss=fused))
        with caplog.at_level("INFO", logger="profuser"):
            trainer = train(cfg, data=str(build_dir))
        out[fused] = (_losses(trainer), _final_weights(tmp_path / fused))
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert [h["fused_loss"] for h in logs] == [float(fused == "on")] * 4
        assert [(h["w_inf"], h["w_train"]) for h in logs] == [(1.0, 0.0)] * 2 + [(0.1, 1.0)] * 2
    paths = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loss path:")]
    assert paths == ["loss path: fused-linear (Olmo2ForCausalLM: logits = lm_head(h), untied 512 x 64 projection)",
                     "loss path: logits (train.fused_loss=off)"]
    assert out["on"][0] == pytest.approx(out["off"][0], rel=1e-6)
    for k, v in out["off"][1].items():
        torch.testing.assert_close(out["on"][1][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("schedule", "fast", "schedule: 'fast' is not allowed; use one of 'profuser', 'ramp'"),
    ("divergence", "js", "divergence: 'js' is not allowed; use one of 'forward_kl'"),
    ("temperature", 0.0, "temperature: 0.0 is out of range; it must be > 0"),
    ("temperature", float("inf"), "temperature: inf is not a finite number"),
    ("beta", -1.0, "beta: -1.0 is out of range; it must be >= 0"),
    ("fusellm_lambda", 1.5, "fusellm_lambda: 1.5 is out of range; it must be <= 1"),
    ("loss_chunk_size", 0, "loss_chunk_size: 0 is out of range; it must be >= 1"),
    ("loss_chunk_size", 2.0, "loss_chunk_size: expected a valid integer, got float 2.0"),
    ("switch_fraction", 2.0, "switch_fraction: 2.0 is out of range; it must be <= 1"),
    ("fused_loss", "yes", "fused_loss: 'yes' is not allowed; use one of 'auto', 'on' or 'off'"),
])
def test_arguments_name_the_bad_value_and_the_fix(tmp_path, field, value, message):
    """Arguments built by hand get the config's rules and messages (profuser.config.TrainConfig)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        FusionTrainingArguments(output_dir=str(tmp_path), report_to=[], **{field: value})


def test_custom_schedule_needs_breakpoints(tmp_path):
    with pytest.raises(ConfigError, match="custom_weights: custom_weights=None: preset 'custom' needs"):
        FusionTrainingArguments(output_dir=str(tmp_path), report_to=[], schedule="custom")
    args = FusionTrainingArguments(output_dir=str(tmp_path), report_to=[], schedule="custom",
                                   custom_weights=[[0, 1, 0], [0.5, 0.2, 1]])
    assert args.custom_weights == [[0.0, 1.0, 0.0], [0.5, 0.2, 1.0]] and args.remove_unused_columns is False


def test_cli_train(tiny_suite, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(run_config(tiny_suite, tmp_path / "run")))
    out = subprocess.run([sys.executable, "-m", "profuser.cli", "train", str(cfg), "train.schedule=fast"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "train.schedule: 'fast' is not allowed" in out.stderr
    # options and overrides in any order (the deepspeed launcher puts --local_rank first)
    out = subprocess.run([sys.executable, "-m", "profuser.train", "--local_rank=0", str(cfg), "--data",
                          str(tmp_path / "none"), "train.max_steps=1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and "[preflight] train: NOT READY" in out.stderr and "does not exist" in out.stderr
    out = subprocess.run([sys.executable, "-m", "profuser.train", "--local_rank=0", str(cfg), "--skip-check", "--data",
                          str(tmp_path / "none"), "train.max_steps=1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "training set error" in out.stderr and "does not exist" in out.stderr
