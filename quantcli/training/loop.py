"""The QAT training loop behind `quantcli train`: schedule, data order, steps, freezes, checkpoints.

Determinism: the data order of epoch e is a permutation drawn from numpy's generator seeded with
(seed, e); each rank seeds torch with seed + rank (dropout and other random ops). A global batch is
`batch_size` samples, split across ranks (rank r takes every world-th sample), and the incomplete
last batch of an epoch is dropped, so the steps are the same for any number of processes. Each
rank scales its mean loss by its share of the global batch, so the gradients DDP averages are
those of the global batch's mean loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantcli import _torch
from quantcli.errors import DataError, RecipeError
from quantcli.loading.data import TARGET_COLUMN, Dataset, to_tensors
from quantcli.recipe import InputSpec, TrainingSection
from quantcli.stages.base import Progress
from quantcli.training import distributed, objectives
from quantcli.training.api import QatModule
from quantcli.training.distributed import World

Checkpoint = Callable[[dict[str, Any]], None]


def _step_of(value: float | int | None, total: int) -> int | None:
    """A freeze point as a step index: a float is a fraction of the steps, an int a step."""
    if value is None:
        return None
    return int(round(value * total)) if isinstance(value, float) else int(value)


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total: int
    freeze_bn_at: int | None  # the first step run with BN frozen
    freeze_observers_at: int | None
    checkpoint_every: int

    @classmethod
    def of(cls, section: TrainingSection, samples: int, world: World) -> Schedule:
        if section.batch_size < world.size:
            raise RecipeError(
                f"training.batch_size {section.batch_size} is smaller than the {world.size} processes",
                "every process needs at least one sample of each global batch",
            )
        per_epoch = samples // section.batch_size
        if per_epoch == 0:
            raise DataError(f"training.data: {samples} samples, fewer than training.batch_size {section.batch_size}")
        total = per_epoch * section.epochs
        return cls(
            per_epoch,
            total,
            _step_of(section.freeze_bn_after, total),
            _step_of(section.freeze_observers_after, total),
            section.checkpoint_every or per_epoch,
        )


def epoch_order(seed: int, epoch: int, samples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(samples)


class Trainer:
    """One rank's training state: the module (DDP-wrapped if several ranks), optimizer, loss, data."""

    def __init__(
        self,
        model: QatModule,
        data: Dataset,
        section: TrainingSection,
        inputs: list[InputSpec],
        world: World,
        schedule: Schedule,
        classes_last: bool = False,
    ):
        import torch

        self.model, self.data, self.section, self.inputs = model, data, section, inputs
        self.classes_last = classes_last
        self.world, self.schedule = world, schedule
        torch.manual_seed(section.seed + world.rank)
        model.to(world.device).train()
        self.net = distributed.wrap(model, world)
        self.optimizer = objectives.optimizer(section.optimizer, model.parameters())
        self.loss = objectives.loss(section.loss)
        self.step = 0
        self.epoch = -1
        self.order = np.empty(0, dtype=np.int64)

    # -- state ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """This run's checkpoint (collective: every rank must call it at the same step)."""
        import torch

        distributed.sync_state(self.model.prepared, self.world)
        rng = {"torch": distributed.gather(torch.get_rng_state(), self.world)}
        if self.world.device.type == "cuda":
            rng["cuda"] = distributed.gather(torch.cuda.get_rng_state(self.world.device), self.world)
        return {
            "step": self.step,
            "world_size": self.world.size,
            "module": self.model.prepared_state(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "epoch": self.epoch,
            "order": torch.from_numpy(self.order),
            "bn_frozen": self.model.bn_frozen,
            "observers_frozen": self.model.observers_frozen,
        }

    def restore(self, state: dict[str, Any]) -> None:
        import torch

        self.model.prepared.load_state_dict(state["module"], strict=True)
        self.model.to(self.world.device)
        if state["bn_frozen"]:
            self.model.freeze_bn()
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"][self.world.rank])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"][self.world.rank], self.world.device)
        self.step, self.epoch, self.order = state["step"], state["epoch"], state["order"].numpy()

    # -- one step ---------------------------------------------------------------------
    def _freeze_due(self) -> None:
        s = self.schedule
        bn = s.freeze_bn_at is not None and self.step >= s.freeze_bn_at and not self.model.bn_frozen
        obs = (
            s.freeze_observers_at is not None and self.step >= s.freeze_observers_at and not self.model.observers_frozen
        )
        if bn or obs:
            distributed.sync_state(self.model.prepared, self.world)  # freeze the same values on every rank
        if bn:
            self.model.freeze_bn()
        if obs:
            self.model.freeze_observers()

    def _batch(self) -> dict[str, np.ndarray]:
        epoch, index = divmod(self.step, self.schedule.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, epoch_order(self.section.seed, epoch, self.data.length)
        size = self.section.batch_size
        picked = self.order[index * size : (index + 1) * size]
        return self.data.take(picked[self.world.rank :: self.world.size], batch=self.step)

    def run_step(self) -> float:
        import torch

        self._freeze_due()
        batch = self._batch()
        args = tuple(t.to(self.world.device) for t in to_tensors(batch, self.inputs))
        targets = torch.from_numpy(np.asarray(batch[TARGET_COLUMN])).to(self.world.device)
        output = _torch.output_leaves(self.net(*args))[0][1]
        if self.classes_last:  # token scores [batch, seq, classes]: losses take classes on axis 1
            output = output.movedim(-1, 1)
        objectives.check_targets(self.section.loss, self.section.targets, output, targets)
        try:
            loss = self.loss(output, targets)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"training.loss {self.section.loss}: failed at step {self.step}: {first}") from exc
        share = len(targets) * self.world.size / self.section.batch_size
        self.optimizer.zero_grad(set_to_none=True)
        (loss * share).backward()
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())


def fit(trainer: Trainer, *, checkpoint: Checkpoint, progress: Progress) -> dict[str, Any]:
    """Train to the end of the schedule, checkpointing every `checkpoint_every` steps; freeze ranges last."""
    schedule = trainer.schedule
    resumed_from = trainer.step
    loss = float("nan")
    if trainer.world.is_main:
        progress(trainer.step, schedule.total, {})
    while trainer.step < schedule.total:
        loss = trainer.run_step()
        if trainer.world.is_main:
            progress(trainer.step, schedule.total, {"loss": loss})
        if trainer.step % schedule.checkpoint_every == 0 and trainer.step < schedule.total:
            state = trainer.state()
            if trainer.world.is_main:
                checkpoint(state)
    distributed.sync_state(trainer.model.prepared, trainer.world)
    trainer.model.freeze_observers()
    trainer.model.train(False).to("cpu")
    return {"steps": schedule.total, "resumed_from_step": resumed_from or None, "final_loss": loss}
