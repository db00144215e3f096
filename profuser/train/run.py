"""The training recipe: setup (args, tokenizer, data, model, W&B), train (resuming), save the final model.
It must never hold loss or schedule math (profuser.losses, profuser.schedule, profuser.train.trainer).

    profuser train CONFIG [key.sub=value ...] [--data DIR]                 # one process
    deepspeed --num_gpus N --module profuser.train CONFIG [...]            # N processes per node
    bash launch/train.sh CONFIG [...]                                       # the launcher, one node or HOSTFILE

Outputs under ``train.output_dir`` (default RUN_DIR/train): ``checkpoint-N/`` (full training state),
``final/`` (the trained model as a standard Hugging Face directory with the target's tokenizer and
chat template), ``metrics.jsonl`` (every logged step), ``trainer_state.json`` and ``config.yaml``.
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Optional, Sequence

import yaml

from profuser.config import RunConfig, wandb_mode

log = logging.getLogger("profuser")


def init_wandb(cfg: RunConfig, output_dir: Path, run_name: str, wait_s: float = 60.0):
    """Start the W&B run (world rank 0 only) with the whole run config; the Trainer's WandbCallback
    then logs into it. The run id is kept in output_dir, so a resumed training continues the run.

    A training killed and restarted at once can find its run id still held by the killed process's
    W&B service ("run ID ... is in use") until that service notices its parent is gone: wait up to
    `wait_s` for it, then continue under a new id (logged) rather than fail the training."""
    import time

    import wandb

    mode = wandb_mode(cfg.wandb)
    id_file = output_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    kwargs = dict(project=cfg.wandb.project, entity=cfg.wandb.entity, tags=list(cfg.wandb.tags) or None,
                  name=run_name, resume="allow", mode=mode, dir=str(cfg.run_dir),
                  config={"run_config": cfg.to_dict()})
    deadline = time.monotonic() + wait_s
    while True:
        try:
            run = wandb.init(id=run_id, **kwargs)
            break
        except Exception as e:  # noqa: BLE001 — wandb raises its internal ServerResponseError here
            if "in use" not in str(e):
                raise
            if time.monotonic() > deadline:
                new_id = secrets.token_hex(4)
                log.warning("W&B run id %s is still held by a previous process (%s); continuing as run %s",
                            run_id, e, new_id)
                run_id, deadline = new_id, float("inf")
            else:
                time.sleep(2.0)
    id_file.write_text(run_id + "\n")
    log.info("W&B run %s (%s) in %s", run.id, mode, run.dir)
    return run


def trim_metrics(path: Path, step: int) -> None:
    """Drop the metrics.jsonl lines of steps after `step` (a resumed run logs them again)."""
    if not path.exists():
        return
    import json

    def step_of(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except ValueError:  # a line cut short by the kill
            return float("inf")

    keep = [line for line in path.read_text().splitlines() if line.strip() and step_of(line) <= step]
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def train(cfg: RunConfig, data: Optional[str] = None, callbacks: Sequence = ()):
    """Run (or resume) the training the config describes; returns the FusionTrainer."""
    import torch
    from transformers import set_seed

    from profuser.chat import end_of_turn_id
    from profuser.models import dequantize_gguf, load_chat_tokenizer, load_model, resolve_device
    from profuser.train.checkpoint import verify_checkpoint
    from profuser.train.args import training_arguments
    from profuser.train.dataset import FusionDataset
    from profuser.train.trainer import FusionTrainer, last_complete_checkpoint

    t = cfg.train
    output_dir = Path(t.output_dir or Path(cfg.run_dir) / "train")
    data_dir = Path(data or Path(cfg.run_dir) / "prep" / "build")
    report_to = [] if wandb_mode(cfg.wandb) == "disabled" else ["wandb"]
    # TrainingArguments first: with ZeRO-3 they make from_pretrained load the model partitioned.
    args = training_arguments(cfg, output_dir, report_to)
    set_seed(cfg.seed)
    if args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = output_dir / f"config.yaml.tmp{os.getpid()}"
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        os.replace(tmp, output_dir / "config.yaml")

    target_spec = cfg.target
    if Path(target_spec.path).suffix == ".gguf":  # transformers marks GGUF models quantized: train a plain copy
        with args.main_process_first(desc="writing the GGUF target as safetensors"):
            target_spec = dequantize_gguf(cfg.target, Path(cfg.run_dir) / "target_from_gguf")
        log.info("target %s: training from %s (the GGUF's dequantized weights)", cfg.target.name, target_spec.path)
    target = load_chat_tokenizer(target_spec)
    tok = target.tokenizer
    tok.chat_template = target.template  # saved with the model: the template it was trained with
    with args.main_process_first(desc="loading the training set"):
        train_set = FusionDataset(data_dir, cache_dir=output_dir / ".dataset_cache")
    log.info("training set %s: %d samples, per mode %s, teachers %s", data_dir, len(train_set),
             train_set.mode_counts(), train_set.teacher_names)

    dtype = torch.float32 if cfg.target.dtype == "auto" else getattr(torch, cfg.target.dtype)
    model, attn = load_model(target_spec, device=resolve_device(cfg.target.device), dtype=dtype, place=False)
    eot = end_of_turn_id(tok, target.template)
    stop = [i for i in dict.fromkeys([eot, tok.eos_token_id]) if i is not None]
    model.generation_config.eos_token_id = stop if len(stop) > 1 else stop[0]
    model.generation_config.pad_token_id = tok.pad_token_id
    log.info("target %s: attention=%s, dtype=%s, bf16=%s, gradient checkpointing=%s, deepspeed=%s",
             cfg.target.name, attn, dtype, t.bf16, t.gradient_checkpointing, t.deepspeed)

    resume = last_complete_checkpoint(output_dir) if t.resume else None
    if resume:
        verify_checkpoint(resume)  # before anything in it is unpickled
        log.info("resuming from %s", resume)
        if args.should_save:
            trim_metrics(output_dir / "metrics.jsonl", int(Path(resume).name.split("-")[-1]))
    if report_to and args.process_index == 0:
        init_wandb(cfg, output_dir, args.run_name)

    trainer = FusionTrainer(
        model=model, args=args, train_dataset=train_set, processing_class=tok, callbacks=list(callbacks),
        pad_token_id=tok.pad_token_id, teacher_names=train_set.teacher_names,
        metrics_file=str(output_dir / "metrics.jsonl"),
    )
    if report_to and args.process_index == 0:
        import wandb

        wandb.config.update({"loss_path": trainer.loss_path}, allow_val_change=True)  # which loss this run trains with
    try:
        trainer.train(resume_from_checkpoint=resume)
    except RuntimeError as e:  # torch.save's message for a write that ran out of space
        if "unexpected pos" not in str(e) and "No space left" not in str(e):
            raise
        import shutil

        free = shutil.disk_usage(output_dir).free
        raise OSError(f"writing a checkpoint under {output_dir} failed ({e}); {free / 2**30:.2f} GiB are free there: "
                      "is the disk full? The last complete checkpoint is kept; free space and rerun to resume") from e
    log.info("rank %d: forward passes per mode %s, of which %d placeholders", args.process_index,
             trainer.forward_counts, trainer.placeholder_forwards)
    final = output_dir / "final"
    trainer.save_model(str(final))  # every rank: ZeRO-3 gathers the full weights for rank 0
    if args.should_save:
        trainer.save_state()
        log.info("final model saved to %s", final)
    if report_to and args.process_index == 0:
        import wandb

        wandb.finish()
    return trainer
