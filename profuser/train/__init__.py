"""Progressive two-mode fusion training: dataset, collator, FusionTrainer, arguments and the recipe.

    from profuser.train import train          # train(cfg, data=None, callbacks=()) -> FusionTrainer
"""
from profuser.train.run import train

__all__ = ["train"]
