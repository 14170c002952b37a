"""Write recipes and calibration data for the models in tests/models.py into a test folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tests.models import MODELS, example_batch
from tests.tolerances import QUANTIZATION

MODELS_FILE = Path(__file__).with_name("models.py")


def write_data(folder: Path, name: str, samples: int = 24, seed: int = 1) -> Path:
    batch = example_batch(name, batch=samples, seed=seed)
    path = folder / f"{name}.npz"
    np.savez(path, **{k: v.numpy() for k, v in batch.items()})
    return path


def write_recipe(folder: Path, name: str, *, batch_size: int = 8, **sections: Any) -> Path:
    """A recipe for MODELS[name], built for tests/tolerances.py's target, with calibration data beside it;
    `sections` override keys (a quantization section given here names its own target)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = write_data(folder, name)
    recipe = {
        "model": {"factory": f"{MODELS_FILE}:{name}"},
        "inputs": MODELS[name][1],
        "calibration": {"data": data.name, "batch_size": batch_size},
        "quantization": QUANTIZATION,
    }
    recipe.update(sections)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
