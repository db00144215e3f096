"""FusionTrainer: progressive two-mode distillation as a ``transformers.Trainer``. It must never densify
the teacher nor average a loss per micro-batch: losses are sums, divided by the step's token counts.

Per optimizer step (``get_batch_samples``, which sees the whole accumulated batch):
  1. mode weights (w_inf, w_train) = profuser.schedule.mode_weights(step, total steps); a mode with
     weight 0 is neither collated nor forwarded;
  2. each micro-batch is collated per active mode (with ``sample_mode``: each sample only in the
     mode ``draw_modes`` drew for it; a sample without that mode sits the step out);
  3. the loss denominators are counted: N_m = label tokens (``labels[1:] != -100``) of every sample
     of the step that has mode m, over all micro-batches and all ranks (one all-reduce).
``compute_loss`` then runs one forward pass per mode and returns, on rank r,

    loss_r = sum_m c_m * W * S_m,r / N_m

with S_m,r the micro-batch's ``fusion_loss(...).total_sum`` (a sum, not a mean, over its label
tokens), W the data-parallel world size (DDP and DeepSpeed average gradients over ranks; the W
undoes that) and c_m = w_m. Summed over micro-batches and averaged over ranks, the gradient is
exactly that of

    L = sum_m w_m * (sum of mode-m token losses in the step) / N_m,

each mode's loss being the mean over every label token of that mode in the accumulated global
batch, however the tokens fall into micro-batches and ranks. In sample mode c_m =
``sampling_scale`` = w_inf + w_train and S_m covers only the samples that drew m (probability
p_m = w_m / (w_inf + w_train)), while N_m still counts every sample with mode m, so
E[loss] = sum_m (w_inf + w_train) * p_m * S_m(all) / N_m = the L above: unbiased, at about half the
forward passes when both weights are non-zero. The logged per-mode ce/kd/loss are per-token means
over the tokens actually forwarded.

S_m is the fused-linear loss (``profuser.train.fused``: the trunk's last hidden state and the output
projection, chunk by chunk, no [B, T, V] logits) where ``train.fused_loss`` and the model allow it,
else ``fusion_loss`` over the model's logits; the path is logged once. With two modes in a
micro-batch (stage 2), ``training_step`` runs one mode's forward and backward before the other's
forward, so only one mode's activations are alive at a time: same gradient (a sum), and only the
last backward ends the accumulation window.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from transformers import Trainer

from profuser.constants import MODES
from profuser.losses import fusion_loss
from profuser.schedule import draw_modes, mode_weights, preset_beta, sampling_scale
from profuser.train.collator import RawBatch, collate, count_targets, placeholder_mode
from profuser.train.dataset import LengthGroupedSampler
from profuser.train.fused import choose_loss_path, fused_forward

log = logging.getLogger("profuser")
COMPLETE = ".complete"  # written into checkpoint-N/ once every rank has finished saving it


class _Stats:
    """Per-mode sums between two logs, reduced over ranks when logged (no per-step host sync)."""

    FIELDS = ("ce", "kd", "total", "tokens", "samples")

    def __init__(self, teacher_names: list[str]):
        self.names = list(teacher_names)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, list] = {m: [0.0] * len(self.FIELDS) for m in MODES}
        self.teachers = torch.zeros(len(MODES), len(self.names) + 1, dtype=torch.float64)  # last: unknown
        self.input_tokens = 0
        self.since = time.perf_counter()

    def add(self, mode: str, parts, batch: dict) -> None:
        s = self.sums[mode]
        s[0] = s[0] + parts.ce_sum.detach()
        s[1] = s[1] + parts.kd_sum.detach()
        s[2] = s[2] + parts.total_sum.detach()
        s[3] = s[3] + parts.n_tokens.detach()
        s[4] += len(batch["teacher"])
        j = MODES.index(mode)
        for name in batch["teacher"]:
            self.teachers[j, self.names.index(name) if name in self.names else len(self.names)] += 1
        if batch["teacher"]:  # a placeholder row is not data
            self.input_tokens += int(batch["attention_mask"].sum())

    def reduce(self, device, world_size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                            for m in MODES for v in self.sums[m]])
        flat = torch.cat([flat, self.teachers.to(device).flatten(),
                          torch.tensor([float(self.input_tokens)], dtype=torch.float64, device=device)])
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
        flat = flat.cpu()
        n = len(MODES) * len(self.FIELDS)
        sums = flat[:n].view(len(MODES), len(self.FIELDS))
        teachers = flat[n:-1].view(len(MODES), -1)
        return sums, teachers, float(flat[-1])


class FusionTrainer(Trainer):
    """A Trainer whose batches are per-mode sub-batches and whose loss is ``profuser.losses.fusion_loss``.

    Extra constructor arguments: ``pad_token_id`` (for padding) and ``teacher_names`` (the sources, for
    the teacher-share metrics). ``args`` must be :class:`~profuser.train.args.FusionTrainingArguments`.
    """

    loss_is_scaled_for_ga = True  # normalized over the whole accumulated batch already

    def __init__(self, *args, pad_token_id: int, teacher_names: list[str] = (), metrics_file: Optional[str] = None,
                 **kwargs):
        kwargs.setdefault("data_collator", RawBatch.collate_fn)
        super().__init__(*args, **kwargs)
        self.pad_token_id = pad_token_id
        self.metrics_file = metrics_file
        self._stats = _Stats(list(teacher_names))
        self._timing_started = False
        self._last_weights = (float("nan"), float("nan"))
        self.forward_counts = {m: 0 for m in MODES}  # forward passes per mode (placeholders included)
        self.placeholder_forwards = 0  # of which placeholders (this rank had no sample of the mode)
        # the fused-linear loss (no [B, T, V] logits) where train.fused_loss and the model allow it
        self.head_spec, why = choose_loss_path(self.args.fused_loss, self.model)
        self.loss_path = ("fused-linear" if self.head_spec is not None else "logits") + f" ({why})"
        if self.args.process_index == 0:
            log.info("loss path: %s", self.loss_path)

    # ---- schedule --------------------------------------------------------------------------

    def mode_weights_at(self, step: int) -> tuple[float, float]:
        a = self.args
        return mode_weights(a.schedule, step, max(int(self.state.max_steps), 1), switch_fraction=a.switch_fraction,
                            stage2_inference_weight=a.stage2_inference_weight, ramp_shape=a.ramp_shape,
                            custom_weights=a.custom_weights)

    # ---- batches ---------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy == "group_by_length":
            ds = train_dataset if train_dataset is not None else self.train_dataset
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(ds.lengths(), self.args.per_device_train_batch_size * self.args.world_size,
                                        seed=seed)
        return super()._get_train_sampler(train_dataset)

    def _all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.args.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = t.to(self.args.device)
            dist.all_reduce(t)
        return t.cpu()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Collate the step's micro-batches for the modes it trains, and count the loss denominators."""
        raw: list[RawBatch] = []
        for _ in range(num_batches):
            try:
                raw.append(next(epoch_iterator))
            except StopIteration:
                break
        if not raw:
            return [], None
        if not self._timing_started:  # tokens/s counts from the first batch, not from setup
            self._stats.since, self._timing_started = time.perf_counter(), True
        a = self.args
        step = int(self.state.global_step)
        w_inf, w_train = self.mode_weights_at(step)
        weights = dict(zip(MODES, (w_inf, w_train)))
        active = [m for m in MODES if weights[m] > 0]
        if a.sample_mode:
            factor = dict.fromkeys(active, sampling_scale(w_inf, w_train))
        else:
            factor = {m: weights[m] for m in active}
        self._last_weights = (w_inf, w_train)

        batches = []
        for samples in raw:
            if a.sample_mode:
                drawn = draw_modes(w_inf, w_train, [s["id"] for s in samples], a.seed, step)
                assignment = {m: [i for i, d in enumerate(drawn) if d == m] for m in active}
            else:
                assignment = {m: list(range(len(samples))) for m in active}
            batches.append(collate(samples, assignment, self.pad_token_id, a.pad_to_multiple_of))

        # rows 0..n-1: samples forwarded per micro-batch and mode; last row: the denominators N_m,
        # label tokens of every sample that has mode m (drawn or not, in sample mode); summed over ranks
        counts = torch.zeros(len(batches) + 1, len(MODES), dtype=torch.float64)
        for i, (samples, b) in enumerate(zip(raw, batches)):
            for j, m in enumerate(MODES):
                if m in b:
                    counts[i, j] = len(b[m]["ids"])
                if m in active:
                    counts[-1, j] += sum(count_targets(torch.as_tensor(s[m]["labels"])[None])
                                         for s in samples if s.get(m) is not None)
        counts = self._all_reduce_sum(counts)
        n_targets = {m: float(counts[-1, j]) for j, m in enumerate(MODES)}

        out = []
        for i, b in enumerate(batches):
            # Every rank forwards the same modes (ZeRO-3 gathers parameters collectively in each
            # forward); a rank without samples of such a mode forwards a label-less placeholder.
            forward = [m for j, m in enumerate(MODES) if counts[i, j] > 0] or active[:1]
            modes = {m: b[m] if m in b else placeholder_mode(self.pad_token_id) for m in forward}
            self.placeholder_forwards += sum(m not in b for m in forward)
            scale = {m: factor[m] * a.world_size / n_targets[m] if n_targets[m] > 0 else 0.0 for m in forward}
            out.append({"modes": modes, "scale": scale})
        return out, torch.tensor(sum(n_targets.values()), device=device)

    def _prepare_inputs(self, inputs):
        """Move the sub-batches to the device as they are (the base class would cast the float16
        teacher log-probs to DeepSpeed's compute dtype; bf16 would lose precision)."""
        dev = self.args.device
        modes = {m: {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
                 for m, b in inputs["modes"].items()}
        return {"modes": modes, "scale": inputs["scale"]}

    # ---- loss ------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """One forward pass per mode in the batch; the modes' loss sums scaled by the step's factors."""
        loss = None
        for mode, b in inputs["modes"].items():
            self.forward_counts[mode] += 1
            parts = self._mode_loss(model, b)
            term = parts.total_sum * inputs["scale"][mode]
            loss = term if loss is None else loss + term
            self._stats.add(mode, parts, b)
        return (loss, None) if return_outputs else loss

    def _mode_loss(self, model, b: dict):
        """LossParts (sums) of one mode's sub-batch: the fused-linear loss, or logits then ``fusion_loss``."""
        a = self.args
        beta = preset_beta(a.schedule, a.beta)
        lam = None if a.schedule == "sft" else a.fusellm_lambda
        no_kd = (beta == 0 and lam is None) or lam == 1.0  # D has weight 0: skip computing it
        if no_kd:
            b = {**b, "topk_ids": None, "topk_logprobs": None}
        kw = dict(beta=beta, divergence=a.divergence, temperature=a.temperature, fusellm_lambda=lam,
                  chunk_size=a.loss_chunk_size, rest=a.teacher_rest, min_mass=a.teacher_min_mass)
        if self.head_spec is not None:
            # the model's own forward is bypassed: enter the autocast accelerate would wrap it in
            with self.accelerator.autocast():
                return fused_forward(model, self.accelerator.unwrap_model(model), self.head_spec, b, **kw)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        return fusion_loss(logits, b["labels"], b["topk_ids"], b["topk_logprobs"], **kw)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Two modes in a micro-batch (stage 2): forward and backward one mode, then the other, so that
        only one mode's graph (activations) is alive at a time. The gradient is the same sum as one
        backward of both modes' loss; only the last mode's backward may end the accumulation window
        (DeepSpeed's boundary and optimizer step, DDP's gradient sync)."""
        modes = list(inputs["modes"])
        if len(modes) < 2:
            return super().training_step(model, inputs, num_items_in_batch)
        total = None
        for i, mode in enumerate(modes):
            one = {"modes": {mode: inputs["modes"][mode]}, "scale": inputs["scale"]}
            with contextlib.nullcontext() if i == len(modes) - 1 else self._accumulation_inside_window(model):
                loss = super().training_step(model, one, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    @contextlib.contextmanager
    def _accumulation_inside_window(self, model):
        """A backward that only accumulates: not an accumulation boundary for DeepSpeed (no reduction
        at the boundary, no optimizer step), no gradient sync for DDP/FSDP."""
        state = self.accelerator.gradient_state
        sync = state.sync_gradients
        state._set_sync_gradients(False)
        try:
            if self.is_deepspeed_enabled:
                yield
            else:
                with self.accelerator.no_sync(model):
                    yield
        finally:
            state._set_sync_gradients(sync)

    def floating_point_ops(self, inputs) -> int:
        tokens = sum(int(b["attention_mask"].numel()) for b in inputs["modes"].values())
        return 6 * tokens * self.model.num_parameters(exclude_embeddings=True)

    # ---- logging ---------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:  # a training-step log; every rank is here, so the reduction below is safe
            logs.update(self._fusion_metrics())
        super().log(logs, start_time)
        if self.metrics_file and self.is_world_process_zero():
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps({"step": self.state.global_step, **logs}) + "\n")

    def _fusion_metrics(self) -> dict[str, float]:
        st = self._stats
        sums, teachers, input_tokens = st.reduce(self.args.device, self.args.world_size)
        elapsed = max(time.perf_counter() - st.since, 1e-9)
        beta = preset_beta(self.args.schedule, self.args.beta)
        out = {"w_inf": self._last_weights[0], "w_train": self._last_weights[1],
               "tokens_per_second": input_tokens / elapsed}
        for j, m in enumerate(MODES):
            ce, kd, total, tokens, samples = sums[j].tolist()
            if samples == 0:
                continue
            per_token = (lambda x: x / tokens) if tokens > 0 else (lambda x: 0.0)
            out[f"{m}/ce"] = per_token(ce)
            out[f"{m}/kd"] = per_token(kd)  # beta-free: D per label token (0 where no teacher)
            out[f"{m}/loss"] = per_token(total)  # unweighted by the schedule: ce + beta*kd (or FuseLLM form)
            out[f"{m}/tokens"] = tokens
            out[f"{m}/samples"] = samples
            for k, name in enumerate(st.names + ["unknown"]):
                if k < len(st.names) or teachers[j, k] > 0:
                    out[f"teacher_share/{m}/{name}"] = float(teachers[j, k] / samples)
        out["beta"] = beta
        out["fused_loss"] = float(self.head_spec is not None)
        st.reset()
        return out

    # ---- checkpoints -----------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        # A checkpoint is complete once every rank wrote its part (RNG state, ZeRO shards).
        if self.args.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()
        if self.args.should_save:
            from profuser.train.checkpoint import write_digest

            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            write_digest(folder)  # checked before a resume unpickles anything (profuser.train.checkpoint)
            (folder / COMPLETE).write_text("ok\n")


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``output_dir`` that every rank finished writing, or None."""
    d = Path(output_dir)
    if not d.is_dir():
        return None
    done = [p for p in d.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / COMPLETE).exists()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None
