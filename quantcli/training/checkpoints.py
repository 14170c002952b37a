"""Training checkpoints in `.<out>.partial/`, a hidden sibling of the output that is never an artifact.

A checkpoint holds everything the rest of the run depends on: the prepared module's state_dict
(weights, BN running statistics, observer ranges and enabled flags, fake-quant scales), whether BN
is frozen (graph state, not in the state_dict), the optimizer state, every rank's RNG state, and
the current epoch's data order. It is written atomically by rank 0 and read with
`torch.load(weights_only=True)`: tensors, numbers, strings and containers only. The folder
survives an interrupted run (that is its purpose) and is removed once the output is committed.
A run without `--resume` refuses to start over a checkpoint unless `--force` says to discard it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from quantcli import artifacts, staging
from quantcli.errors import ArtifactError

FORMAT = 1


def partial_dir(out: Path) -> Path:
    return staging.hidden_sibling(Path(out), "partial")


def save(partial: Path, state: dict[str, Any]) -> None:
    from quantcli import _torch

    partial.mkdir(parents=True, exist_ok=True)
    tmp = partial / (artifacts.CHECKPOINT + ".tmp")
    _torch.save_state({"format": FORMAT, **state}, tmp)
    os.replace(tmp, partial / artifacts.CHECKPOINT)


def load(partial: Path, key: str, world_size: int) -> dict[str, Any] | None:
    """The checkpoint of this run (same stage key and process count), or None if there is none."""
    from quantcli import _torch

    path = partial / artifacts.CHECKPOINT
    if not path.is_file():
        return None
    restart = "rerun with --force instead of --resume to start over"
    try:
        state = _torch.load_state(path)
    except Exception as exc:
        raise ArtifactError(f"{path} is unreadable: {type(exc).__name__}: {exc}", restart) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a quantcli {FORMAT=} checkpoint", restart)
    if state["key"] != key:
        raise ArtifactError(f"{path} is the checkpoint of another run (other input, recipe or options)", restart)
    if state["world_size"] != world_size:
        raise ArtifactError(
            f"{path} was written by {state['world_size']} process(es); this run has {world_size}",
            f"resume with --nproc_per_node {state['world_size']}, or {restart}",
        )
    return state


def refuse_unless_resumed(partial: Path) -> None:
    """A checkpoint left by an interrupted run is never thrown away silently: continue it or say so."""
    if (partial / artifacts.CHECKPOINT).is_file():
        raise ArtifactError(
            f"{partial} holds the checkpoint of an interrupted training",
            "pass --resume to continue it, or --force to discard it and start over",
        )


def kept_line(partial: Path) -> str | None:
    """What an interrupt leaves to resume from, said in the interrupt's line; None when nothing."""
    if not (partial / artifacts.CHECKPOINT).is_file():
        return None
    return f"the training checkpoint is kept in {partial}: rerun the same command with --resume to continue"


def discard(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)
