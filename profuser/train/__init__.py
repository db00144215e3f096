"""Progressive two-mode fusion training: dataset, collator, FusionTrainer, arguments and the recipe.

    from profuser.train import train          # train(cfg, data=None, callbacks=()) -> FusionTrainer

Importing it must never import torch: the recipe imports the heavy libraries when it runs.
"""
from profuser.train.run import train

__all__ = ["train"]
