"""What a Hugging Face model folder says about itself, read as JSON: no torch, no transformers.

`validate` checks folders with these, and the loaders take labels and a sentence-transformers
folder's pooling from here, so both agree on what the files mean.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcli.errors import ModelError

CONFIG = "config.json"
MODULES = "modules.json"  # a sentence-transformers folder: its modules in order
# sentence-transformers' Pooling config keys -> quantcli's pooling names (one mode at a time)
POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": None,
}
_TRANSFORMER, _POOLING, _NORMALIZE = (
    f"sentence_transformers.models.{n}" for n in ("Transformer", "Pooling", "Normalize")
)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{what}: cannot read {path}: {exc}") from None


def config(folder: Path) -> dict[str, Any]:
    """The folder's config.json (of the transformer inside a sentence-transformers folder)."""
    path = transformer_dir(folder) / CONFIG
    if not path.is_file():
        raise ModelError(
            f"model.huggingface: {folder} holds no {CONFIG}",
            "point it at a folder written by save_pretrained (config.json, weights, tokenizer)",
        )
    data = read_json(path, "model.huggingface")
    if not isinstance(data, dict):
        raise ModelError(f"model.huggingface: {path} is not a JSON object")
    return data


def labels(folder: Path) -> dict[str, int]:
    """label -> class index from config.json's id2label (empty when it has none)."""
    id2label = config(folder).get("id2label") or {}
    return {str(name): int(index) for index, name in id2label.items()}


def _modules(folder: Path) -> list[dict[str, Any]] | None:
    path = folder / MODULES
    if not path.is_file():
        return None
    modules = read_json(path, "model.huggingface")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelError(f"model.huggingface: {path} is not a list of modules")
    return sorted(modules, key=lambda m: m.get("idx", 0))


def transformer_dir(folder: Path) -> Path:
    """Where the transformer's files are: the folder, or a sentence-transformers module's own path."""
    for module in _modules(folder) or []:
        if module.get("type") == _TRANSFORMER and module.get("path"):
            return folder / module["path"]
    return folder


@dataclass(frozen=True)
class Pooling:
    """A sentence embedding's pooling and normalization, and where they came from."""

    mode: str  # one of sources.names.POOLINGS but "auto"
    normalize: bool
    origin: str

    def describe(self) -> str:
        what = "the last hidden state" if self.mode == "none" else f"{self.mode} pooling over the attention mask"
        return f"{what}{', L2-normalized' if self.normalize else ''} ({self.origin})"


def pooling(folder: Path, mode: str, normalize: bool | None) -> Pooling:
    """The recipe's pooling, or the sentence-transformers folder's (modules.json, 1_Pooling), else mean."""
    modules = _modules(folder)
    if modules is None:
        return Pooling(
            "mean" if mode == "auto" else mode,
            bool(normalize),
            "the recipe" if mode != "auto" else "no modules.json: mean pooling by default",
        )
    types = [m.get("type") for m in modules]
    folder_normalize = _NORMALIZE in types
    if mode != "auto":
        return Pooling(mode, folder_normalize if normalize is None else normalize, "the recipe")
    unknown = [t for t in types if t not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
    if unknown:
        raise ModelError(
            f"model.huggingface: {folder / MODULES} holds {unknown[0]}, which quantcli does not apply",
            "set model.pooling (and normalize) to export the transformer with that pooling only",
        )
    pool = next((m for m in modules if m.get("type") == _POOLING), None)
    if pool is None:
        raise ModelError(f"model.huggingface: {folder / MODULES} has no Pooling module", "set model.pooling")
    settings = read_json(folder / pool.get("path", "") / "config.json", "model.huggingface")
    modes = [POOLING_MODES.get(key, key) for key, on in settings.items() if key.startswith("pooling_mode_") and on]
    if len(modes) != 1 or modes[0] is None:
        raise ModelError(
            f"model.huggingface: {pool.get('path')}/config.json asks for pooling {modes or 'none'}; "
            f"quantcli supports one of {', '.join(m for m in POOLING_MODES.values() if m)}",
            "set model.pooling",
        )
    return Pooling(
        modes[0], folder_normalize if normalize is None else normalize, f"{MODULES} and {pool.get('path')}/config.json"
    )
