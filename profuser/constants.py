"""Constants more than one module relies on, defined here once.

Only plain values: importing this module must stay free, so it must never import anything (not torch,
not pyarrow, not another profuser module), and nothing here may depend on a config or a run.
"""

MODES = ("inference", "training")
"""The two fusion modes in the schedule's order: ``(w_inf, w_train)`` pairs, the trainer's forward
passes and the report's panels follow it."""

PREP_MODES = MODES[::-1]
"""The order prep writes the modes in (the build stage's columns, stats.json and manifest keys):
training first, since the training rows exist before the inference rows that reuse them.
Reordering it would change stored files."""

IGNORE_INDEX = -100
"""Label of a token that is not trained on (prompt, padding): PyTorch's cross-entropy default."""

DIVERGENCES = ("forward_kl", "reverse_kl", "ce")
"""The distillation divergences D of profuser.losses (``train.divergence``)."""

TEACHER_REST = ("other", "renormalize")
"""What the teacher's mass off its stored entries becomes in the loss (``train.teacher_rest``)."""

LOSS_CHUNK_SIZE = 256
"""Default positions (fused path: label tokens) per fp32 loss chunk (``train.loss_chunk_size``)."""
