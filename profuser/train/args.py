"""Training arguments: ``transformers.TrainingArguments`` plus the fusion fields, and their
construction from a run config."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainingArguments

from profuser.losses import DIVERGENCES, TEACHER_REST
from profuser.schedule import PRESETS, RAMP_SHAPES, validate_custom_weights

FUSED_LOSS = ("auto", "on", "off")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class FusionTrainingArguments(TrainingArguments):
    """TrainingArguments with only what progressive fusion adds (see profuser.schedule, profuser.losses)."""

    schedule: str = field(default="profuser", metadata=_help(f"Mode-weight preset: one of {PRESETS}."))
    switch_fraction: float = field(default=0.5, metadata=_help("profuser/reverse: fraction of steps in stage 1."))
    ramp_shape: str = field(default="linear", metadata=_help(f"ramp: one of {RAMP_SHAPES}."))
    stage2_inference_weight: float = field(default=0.1, metadata=_help("profuser: w_inf in stage 2."))
    custom_weights: Optional[list] = field(default=None, metadata=_help("custom: [[fraction, w_inf, w_train], ...]."))
    sample_mode: bool = field(default=False, metadata=_help("Draw one mode per sample, p proportional to weights."))
    beta: float = field(default=1.0, metadata=_help("Weight of the distillation term (0 under schedule sft)."))
    fusellm_lambda: Optional[float] = field(default=None, metadata=_help("If set: lambda*CE + (1-lambda)*D."))
    divergence: str = field(default="forward_kl", metadata=_help(f"One of {DIVERGENCES}."))
    temperature: float = field(default=1.0, metadata=_help("Distillation temperature tau > 0."))
    teacher_rest: str = field(default="other", metadata=_help(f"Teacher mass off its stored entries: one of {TEACHER_REST}."))
    teacher_min_mass: float = field(default=0.0, metadata=_help("Positions whose teacher entries hold less mass: CE only."))
    loss_chunk_size: int = field(default=256, metadata=_help("Positions per fp32 loss chunk."))
    fused_loss: str = field(default="auto", metadata=_help(f"Fused-linear loss: one of {FUSED_LOSS}."))
    pad_to_multiple_of: Optional[int] = field(default=None, metadata=_help("Pad sequence length to a multiple."))

    def __post_init__(self):
        def bad(name, value, fix):
            raise ValueError(f"{name}={value!r}: {fix}")

        if self.schedule not in PRESETS:
            bad("schedule", self.schedule, f"use one of {', '.join(PRESETS)}")
        if self.ramp_shape not in RAMP_SHAPES:
            bad("ramp_shape", self.ramp_shape, f"use one of {', '.join(RAMP_SHAPES)}")
        if self.divergence not in DIVERGENCES:
            bad("divergence", self.divergence, f"use one of {', '.join(DIVERGENCES)}")
        if self.fused_loss not in FUSED_LOSS:
            bad("fused_loss", self.fused_loss, f"use one of {', '.join(FUSED_LOSS)} (auto = fused where supported)")
        if self.teacher_rest not in TEACHER_REST:
            bad("teacher_rest", self.teacher_rest, f"use one of {', '.join(TEACHER_REST)}")
        if isinstance(self.teacher_min_mass, bool) or not 0.0 <= self.teacher_min_mass <= 1.0:
            bad("teacher_min_mass", self.teacher_min_mass, "use a probability mass in [0, 1] (0 = no floor)")
        if not 0.0 <= self.switch_fraction <= 1.0:
            bad("switch_fraction", self.switch_fraction, "use a fraction in [0, 1]")
        for name in ("stage2_inference_weight", "beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(name, v, "use a finite number >= 0")
        if self.fusellm_lambda is not None and not 0.0 <= self.fusellm_lambda <= 1.0:
            bad("fusellm_lambda", self.fusellm_lambda, "use a value in [0, 1], or null for CE + beta*D")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            bad("temperature", self.temperature, "use a finite number > 0 (1.0 = no temperature)")
        if isinstance(self.loss_chunk_size, bool) or not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 1:
            bad("loss_chunk_size", self.loss_chunk_size, "use an int >= 1 (256 is a good default)")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            bad("pad_to_multiple_of", self.pad_to_multiple_of, "use an int >= 1 or null")
        if self.schedule == "custom":
            try:
                self.custom_weights = [list(bp) for bp in validate_custom_weights(self.custom_weights)]
            except ValueError as e:
                raise ValueError(f"schedule='custom': {e}") from None
        if self.remove_unused_columns:  # the batch is the fusion collator's, not model kwargs
            self.remove_unused_columns = False
        super().__post_init__()


def _configure_cpu_deepspeed() -> bool:
    """DeepSpeed on CPU (DS_ACCELERATOR=cpu) under a launcher: set up the process state first.

    accelerate picks no backend for a DeepSpeed process without a GPU and then counts a single
    process (so the "auto" batch sizes come out wrong by the world size). Creating the state with
    DeepSpeed's CPU backend (gloo, or ccl when oneCCL is installed) first, and telling the
    TrainingArguments to use it, gives the real world size. Returns True when it did so.
    """
    if torch.cuda.is_available() or os.environ.get("LOCAL_RANK") is None:
        return False
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return False
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend=get_accelerator().communication_backend_name())
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return True


def _checkpointing_kwargs(on: bool) -> dict:
    """transformers >= 5.23 calls it activation checkpointing; older 5.x, gradient checkpointing."""
    import dataclasses

    name = "activation" if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)} \
        else "gradient"
    return {f"{name}_checkpointing": on or (None if name == "activation" else False),
            f"{name}_checkpointing_kwargs": {"use_reentrant": False} if on else None}


def training_arguments(cfg, output_dir: str | Path, report_to: list[str]) -> FusionTrainingArguments:
    """The run config's ``train`` section as FusionTrainingArguments."""
    t = cfg.train
    ds_config = t.deepspeed
    configured = bool(ds_config) and _configure_cpu_deepspeed()
    return FusionTrainingArguments(
        output_dir=str(output_dir),
        run_name=Path(cfg.run_dir).name or "profuser",
        seed=cfg.seed,
        # fusion
        schedule=t.schedule, switch_fraction=t.switch_fraction, ramp_shape=t.ramp_shape,
        stage2_inference_weight=t.stage2_inference_weight, custom_weights=t.custom_weights,
        sample_mode=t.sample_mode, beta=t.beta, fusellm_lambda=t.fusellm_lambda, divergence=t.divergence,
        temperature=t.temperature, teacher_rest=t.teacher_rest, teacher_min_mass=t.teacher_min_mass,
        loss_chunk_size=t.loss_chunk_size, fused_loss=t.fused_loss, pad_to_multiple_of=t.pad_to_multiple_of,
        # optimisation
        learning_rate=t.learning_rate, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler_type, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        bf16=t.bf16,
        **_checkpointing_kwargs(t.gradient_checkpointing),
        deepspeed=str(ds_config) if ds_config else None,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        # logging and checkpoints
        logging_steps=t.logging_steps, logging_first_step=True, save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, report_to=report_to,
        include_num_input_tokens_seen="no", disable_tqdm=not os.isatty(2),
        remove_unused_columns=False, dataloader_num_workers=0, data_seed=cfg.seed,
        dataloader_pin_memory=torch.cuda.is_available(),
        accelerator_config={"use_configured_state": True} if configured else None,
    )
