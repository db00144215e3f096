"""Training arguments: ``transformers.TrainingArguments`` plus the fusion fields, both derived from
the run config's ``train`` section (``profuser.config.TrainConfig``), which declares and checks
every key once.

A ``train`` key that TrainingArguments has goes to it under its own name; a few are translated
(``TRANSLATED``); every other key becomes a field of :class:`FusionTrainingArguments` with the
config's default and help text. Adding a ``train`` key therefore needs no edit here. This module must
never declare, default or check a ``train`` key itself.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from transformers import TrainingArguments

from profuser.config import TrainConfig, validate

# train keys that TrainingArguments takes under another name or form (see training_arguments), or
# not at all (resume: the recipe decides whether to resume)
TRANSLATED = ("output_dir", "warmup_ratio", "group_by_length", "gradient_checkpointing", "resume")
_ARGUMENTS = {f.name for f in dataclasses.fields(TrainingArguments)}
PASSED_BY_NAME = tuple(k for k in TrainConfig.model_fields if k in _ARGUMENTS and k not in TRANSLATED)
FUSION_FIELDS = tuple(k for k in TrainConfig.model_fields if k not in _ARGUMENTS and k not in TRANSLATED)


def _check_fusion_fields(self) -> None:
    """The config's own rules, so arguments built by hand get the same checks and messages."""
    checked = validate(TrainConfig, {k: getattr(self, k) for k in FUSION_FIELDS})
    for k in FUSION_FIELDS:
        setattr(self, k, getattr(checked, k))  # normalized: ints as floats, custom_weights as lists
    self.remove_unused_columns = False  # the batch is the fusion collator's, not model kwargs
    TrainingArguments.__post_init__(self)


def _fusion_field(name: str):
    f = TrainConfig.model_fields[name]
    default = {"default": f.default} if f.default_factory is None else {"default_factory": f.default_factory}
    return name, f.annotation, dataclasses.field(**default, metadata={"help": f.description})


FusionTrainingArguments = dataclasses.make_dataclass(
    "FusionTrainingArguments", [_fusion_field(k) for k in FUSION_FIELDS], bases=(TrainingArguments,),
    namespace={"__post_init__": _check_fusion_fields, "__module__": __name__,
               "__doc__": "TrainingArguments with what progressive fusion adds: the train keys TrainingArguments "
                          "lacks (FUSION_FIELDS), checked by profuser.config.TrainConfig."},
)


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
    name = "activation" if "activation_checkpointing" in _ARGUMENTS else "gradient"
    return {f"{name}_checkpointing": on or (None if name == "activation" else False),
            f"{name}_checkpointing_kwargs": {"use_reentrant": False} if on else None}


def training_arguments(cfg, output_dir: str | Path, report_to: list[str]) -> FusionTrainingArguments:
    """The run config's ``train`` section as FusionTrainingArguments."""
    t = cfg.train
    configured = bool(t.deepspeed) and _configure_cpu_deepspeed()
    return FusionTrainingArguments(
        **{k: getattr(t, k) for k in PASSED_BY_NAME + FUSION_FIELDS},
        # TRANSLATED
        output_dir=str(output_dir),
        warmup_steps=t.warmup_ratio,  # a float < 1 is a fraction of the optimizer steps
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        **_checkpointing_kwargs(t.gradient_checkpointing),
        # not in the config
        run_name=Path(cfg.run_dir).name or "profuser",
        seed=cfg.seed, data_seed=cfg.seed, report_to=report_to, logging_first_step=True,
        include_num_input_tokens_seen="no", disable_tqdm=not os.isatty(2),
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        accelerator_config={"use_configured_state": True} if configured else None,
    )
