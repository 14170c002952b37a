"""The losses and optimizers a recipe may name, without importing torch.

`quantcli.recipe` validates `training.loss` and `training.optimizer.name` against these;
`quantcli.training.objectives` maps each to its torch function or class.
"""

from __future__ import annotations

LOSSES: tuple[str, ...] = ("cross_entropy", "mse")
OPTIMIZERS: dict[str, str] = {"sgd": "SGD", "adamw": "AdamW"}  # recipe name -> torch.optim class
