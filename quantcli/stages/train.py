"""train: quantization-aware fine-tuning of a --qat prepared (or calibrated) artifact.

The recipe's `training:` section drives it (see quantcli.training.loop for the schedule and data
order). Checkpoints go to `.<out>.partial/` every `checkpoint_every` steps (default: each epoch);
`--resume` continues from the last one and ends with the same model as an uninterrupted run; a run
without it refuses to discard a checkpoint unless `--force`. The
output appears only when training completes; its observers are frozen (its ranges are final)
and the manifest records whether BN was frozen, so a reload and convert see the trained module.
Under torchrun every rank trains its shard and rank 0 writes the checkpoints and the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcli import artifacts, staging
from quantcli.errors import Interrupted, RecipeError
from quantcli.loading.headers import check_sources
from quantcli.recipe import Recipe
from quantcli.stages.base import Progress, StageResult, data_hashes, keyed, no_progress, produce, recipe_for


@dataclass
class RankResult(StageResult):
    """What a rank other than 0 returns: it trained its shard; rank 0 wrote the output."""

    writes_output = False

    def summary(self) -> str:
        return f"{self.stage}: rank {self.details['rank']} of {self.details['world_size']} done"


CACHE = "cache"  # training's preprocessed text and images, in `.<out>.partial/`: kept for --resume, removed after


def with_training(parent: artifacts.Artifact, recipe_path: str | Path | None) -> Recipe:
    """The recorded recipe with --recipe's training: section applied; it must have one."""
    recipe = recipe_for("trained", parent, recipe_path)
    if recipe.training is None:
        raise RecipeError(
            "training: missing; `quantcli train` needs a training: section",
            "add one to the recipe and pass it with --recipe",
        )
    return recipe


def _reads(recipe: Recipe) -> dict[str, str]:
    """The files training reads (hashed into the reuse key): the data, and a user loss's file."""
    from quantcli.training.objectives import LOSSES

    reads = {"training.data": recipe.training.data}
    if recipe.training.loss not in LOSSES:
        reads["training.loss"] = recipe.training.loss
    return reads


def run(
    src: str | Path,
    out: str | Path,
    *,
    recipe_path: str | Path | None = None,
    resume: bool = False,
    device: str = "cpu",
    force: bool = False,
    progress: Progress = no_progress,
) -> StageResult:
    from quantcli.training import api, distributed

    parent = api.require_qat(artifacts.open_artifact(src, ("prepared", "calibrated"), "train"))
    recipe = with_training(parent, recipe_path)
    hashes = data_hashes(_reads(recipe))
    check_sources(recipe, ("training",))
    out = Path(out)
    if not resume and not force:
        from quantcli.training import checkpoints

        checkpoints.refuse_unless_resumed(checkpoints.partial_dir(out))
    with distributed.session(device) as world:
        options = {"world_size": world.size, "device": world.device.type}
        _, key = keyed("trained", recipe, parent, options, hashes)
        details: dict[str, Any] = {}

        def body(st: Any) -> dict[str, Any]:
            details.update(_train(parent, recipe, world, out, key, resume, st and st.tmp, progress))
            return {k: details[k] for k in ("qat", "io", "bn_frozen", "observers_frozen", "steps")}

        if not world.is_main:
            existing = staging.check_output(out, key, force, "trained")
            if existing is not None:
                return StageResult("trained", out, existing, reused=True)
            body(None)
            return RankResult("trained", out, {}, details={"rank": world.rank, "world_size": world.size})
        result = produce(
            "trained", out, recipe=recipe, parent=parent, options=options, data=hashes, force=force, body=body
        )
        if not result.reused:
            from quantcli.training import checkpoints

            checkpoints.discard(checkpoints.partial_dir(out))
        result.details.update({k: details[k] for k in ("steps", "resumed_from_step", "final_loss") if k in details})
        return result


def _train(
    parent: artifacts.Artifact,
    recipe: Recipe,
    world: Any,
    out: Path,
    key: str,
    resume: bool,
    folder: Path | None,
    progress: Progress,
) -> dict[str, Any]:
    from quantcli.loading.data import load_dataset
    from quantcli.loading.files import reader
    from quantcli.training import api, checkpoints, loop

    section = recipe.training
    partial = checkpoints.partial_dir(out)
    state = checkpoints.load(partial, key, world.size) if resume else None
    if state is None and world.is_main:
        checkpoints.discard(partial)
    files = reader(recipe, "training", targets=True, cache=partial / CACHE)
    data = load_dataset(section.data, section.keys, recipe.inputs, "training", targets=section.targets, files=files)
    data.scan()  # NaN/Inf or values that do not fit fail before the first step, not in the middle of training
    schedule = loop.Schedule.of(section, data.length, world)
    if schedule.freeze_observers_at == 0 and parent.stage == "prepared":
        raise RecipeError(
            "training.freeze_observers_after: 0 freezes the observers before they see any data",
            "calibrate first (`quantcli calibrate`), or freeze them later",
        )
    model = api.from_artifact(parent)
    trainer = loop.Trainer(
        model, data, section, recipe.inputs, world, schedule, classes_last=recipe.model.task == "token-classification"
    )
    if state is not None:
        trainer.restore(state)
    try:
        summary = loop.fit(
            trainer, checkpoint=lambda st: checkpoints.save(partial, {"key": key, **st}), progress=progress
        )
    except KeyboardInterrupt as exc:
        kept = checkpoints.kept_line(partial)
        if kept is None or isinstance(exc, Interrupted):
            raise
        raise Interrupted(kept) from exc
    if folder is not None:
        api.write(model, folder)
    return {**api.trained_fields(parent, model), **summary}
