"""Losses and optimizers by recipe name, and the target checks that turn shape errors into one line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quantcli.errors import DataError, InputError, RecipeError
from quantcli.loading.factory import load_callable
from quantcli.numerics.metrics import IGNORE  # torch's cross_entropy ignore_index (-100)
from quantcli.training.names import OPTIMIZERS

Loss = Callable[[Any, Any], Any]  # (output, targets) -> scalar tensor, a mean over the batch


def _cross_entropy(output: Any, targets: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(output, targets if targets.is_floating_point() else targets.long())


def _mse(output: Any, targets: Any) -> Any:
    import torch.nn.functional as F

    return F.mse_loss(output, targets.to(output.dtype))


def _cross_entropy_shape(output: Any, targets: Any) -> str | None:
    if not targets.is_floating_point():
        want = (*output.shape[:1], *output.shape[2:])
        if tuple(targets.shape) != want:
            return f"class indices of shape {list(want)}"
        labelled = targets[targets != IGNORE]  # cross_entropy's ignore_index: unlabelled sub-tokens
        if labelled.numel() and (int(labelled.min()) < 0 or int(labelled.max()) >= output.shape[1]):
            return f"class indices in [0, {output.shape[1]}) (or {IGNORE}: ignored)"
    elif targets.shape != output.shape:
        return f"probabilities of shape {list(output.shape)}"
    return None


def _mse_shape(output: Any, targets: Any) -> str | None:
    return None if targets.shape == output.shape else f"the output's shape {list(output.shape)}"


LOSSES: dict[str, tuple[Loss, Callable[[Any, Any], str | None]]] = {
    "cross_entropy": (_cross_entropy, _cross_entropy_shape),
    "mse": (_mse, _mse_shape),
}


def loss(spec: str) -> Loss:
    """The recipe's loss: a registered name or "file.py:callable" (user code, given (output, targets))."""
    if spec in LOSSES:
        return LOSSES[spec][0]
    if ":" not in spec:
        raise RecipeError(f"training.loss: unknown loss {spec!r}", f'valid: {", ".join(LOSSES)}, or "file.py:callable"')
    return load_callable(spec, "training.loss", InputError)


def check_targets(spec: str, targets_key: str | None, output: Any, targets: Any) -> None:
    """Raise DataError when the targets cannot go with the model's output under a registered loss."""
    if spec not in LOSSES:
        return
    need = LOSSES[spec][1](output, targets)
    if need is not None:
        raise DataError(
            f"training.targets {targets_key or '(the class folders)'!r}: a batch of targets has shape "
            f"{list(targets.shape)} "
            f"({str(targets.dtype).removeprefix('torch.')}), but the model's output is {list(output.shape)} "
            f"and {spec} needs {need}"
        )


def optimizer(config: dict[str, Any], params: Any) -> Any:
    """torch.optim.<name>(params, **rest of the config), e.g. {name: sgd, lr: 0.01, momentum: 0.9}."""
    import torch

    options = dict(config)
    name = options.pop("name", "sgd")
    if name not in OPTIMIZERS:
        raise RecipeError(f"training.optimizer.name: unknown optimizer {name!r}", f"valid: {', '.join(OPTIMIZERS)}")
    try:
        return getattr(torch.optim, OPTIMIZERS[name])(params, **options)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"training.optimizer: {name}: {exc}") from None
