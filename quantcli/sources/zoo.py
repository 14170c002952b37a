"""torchvision and timm architectures as models: constructor keyword arguments, a weights file, defaults.

A torchvision that does not match the installed torch is common (a CUDA build beside a CPU torch
fails while registering its C++ operators); importing it is checked here and a failure is one input
error naming the versions found and what to install. The model's default image preprocessing
(torchvision's weights transforms, timm's `resolve_data_config`) is resolved at capture, merged with
the recipe's `model.image`, and recorded, so later stages preprocess without importing torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from quantcli import extras
from quantcli.errors import InputError, ModelError, RecipeError
from quantcli.recipe import ImageOptions, InputSpec, Recipe, did_you_mean

IMAGE_INPUT = "pixel_values"  # the ONNX input of a zoo model, named as Hugging Face image models name theirs
# torchvision's and timm's fallbacks when an architecture has no default weights to take transforms from
IMAGENET = ImageOptions(
    size=224, resize=256, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], interpolation="bilinear"
)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def paired_torchvision(torch_version: str) -> str:
    """The torchvision release made for a torch release (2.13 -> 0.28: minor + 15 since torch 2.0)."""
    major, minor = (int(p) for p in torch_version.split("+")[0].split(".")[:2])
    return f"0.{minor + 15}" if major == 2 else "the release paired with your torch"


def import_torchvision(key: str) -> Any:
    """torchvision.models, or an input error naming the installed versions and the fix."""
    torch_version = _version("torch")
    pair = paired_torchvision(torch_version)
    build = (
        "the CPU wheel, from the same package index as torch"
        if "+cpu" in torch_version
        else "the build for your torch's CUDA version, from the same package index as torch"
    )
    try:
        models = extras.require(
            "torchvision.models", f"{key} (torch {torch_version})", hint=f"pip install torchvision=={pair}.* ({build})"
        )
    except InputError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"{key}: torchvision {_version('torchvision')} does not work with torch {torch_version}: "
            f"{type(exc).__name__}: {first}",
            f"install torchvision {pair} built for this torch ({build}), e.g. "
            f"pip install --force-reinstall --no-deps torchvision=={pair}.*; "
            "or pip uninstall torchvision if you need no torchvision/timm model",
        ) from exc
    return models


@dataclass(frozen=True)
class Zoo:
    """How one model zoo lists, constructs and loads its models, and its default preprocessing."""

    key: str  # the recipe key naming the architecture
    weights_key: str  # the recipe key naming a weights file
    names: Callable[[], list[str]]
    construct: Callable[[str, dict[str, Any]], Any]
    defaults: Callable[[str, Any], ImageOptions]


def _tv_names() -> list[str]:
    return list(import_torchvision("model.torchvision").list_models())


def _tv_construct(name: str, kwargs: dict[str, Any]) -> Any:
    return import_torchvision("model.torchvision").get_model(name, weights=None, **kwargs)


def _tv_defaults(name: str, model: Any) -> ImageOptions:
    """The transforms of the architecture's default weights (resize, crop, mean, std, interpolation)."""
    models = import_torchvision("model.torchvision")
    try:
        preset = models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, AttributeError, KeyError):
        return IMAGENET
    return ImageOptions(
        size=int(preset.crop_size[0]),
        resize=int(preset.resize_size[0]),
        mean=list(preset.mean),
        std=list(preset.std),
        interpolation=preset.interpolation.value,
    )


def _timm() -> Any:
    import_torchvision("model.timm")  # timm imports torchvision: name that cause first
    timm = extras.require("timm", "model.timm")
    extras.require("timm.data", "model.timm")  # resolve_data_config, as timm.data
    return timm


def _timm_construct(name: str, kwargs: dict[str, Any]) -> Any:
    return _timm().create_model(name, pretrained=False, **kwargs)


def _timm_defaults(name: str, model: Any) -> ImageOptions:
    """timm's resolve_data_config: input size, crop_pct (the resize before the centre crop), mean, std."""
    config = _timm().data.resolve_data_config({}, model=model)
    size = int(config["input_size"][-1])
    interpolation = config.get("interpolation", "bilinear")
    return ImageOptions(
        size=size,
        resize=math.floor(size / (config.get("crop_pct") or 0.875)),
        mean=list(config["mean"]),
        std=list(config["std"]),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear",
    )


TORCHVISION = Zoo("torchvision", "weights", _tv_names, _tv_construct, _tv_defaults)
TIMM = Zoo("timm", "checkpoint", lambda: list(_timm().list_models()), _timm_construct, _timm_defaults)


def load_weights(model: Any, path: str, key: str) -> None:
    """A state_dict from .safetensors or a torch file (never unpickling code), loaded strictly.

    Training checkpoints that wrap it ({"state_dict": ...}, {"model": ...}, DDP's "module." prefix) are unwrapped.
    """
    import torch

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model.{key}: cannot read {path} as weights: {type(exc).__name__}: {first}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ModelError(f"model.{key}: {path} holds {type(state).__name__}, not a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"model.{key}: {path} does not fit the architecture: {first}",
            "pass the constructor's keyword arguments (model.kwargs) the weights were trained with",
        ) from exc


def image_options(defaults: ImageOptions, override: ImageOptions | None) -> ImageOptions:
    """The model's defaults with the recipe's keys applied; a new crop size scales the resize with it."""
    values = defaults.model_dump()
    given = override.model_dump(exclude_none=True) if override is not None else {}
    values.update(given)
    if "size" in given and "resize" not in given:
        values["resize"] = round(given["size"] * defaults.resize / defaults.size)
    return ImageOptions(**values)


def build(recipe: Recipe, zoo: Zoo) -> Any:
    """Construct the architecture with the recipe's kwargs, load its weights, resolve its preprocessing."""
    from quantcli.sources.base import Built

    section = recipe.model
    name = getattr(section, zoo.key)
    known = zoo.names()
    if name not in known:
        raise RecipeError(f"model.{zoo.key}: unknown model {name!r}{did_you_mean(name, known)}")
    try:
        model = zoo.construct(name, dict(section.kwargs))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model.{zoo.key}: {name}(**model.kwargs) failed: {type(exc).__name__}: {first}") from exc
    weights = getattr(section, zoo.weights_key)
    if weights is not None:
        load_weights(model, weights, zoo.weights_key)
    image = image_options(zoo.defaults(name, model), section.image)
    inputs = recipe.inputs or [
        InputSpec(name=IMAGE_INPUT, shape=[1, 3, image.size, image.size], dtype="float32", dynamic_axes={0: "batch"})
    ]
    resolved = recipe.model_copy(update={"inputs": inputs, "model": section.model_copy(update={"image": image})})
    details = {"task": section.task, "weights": Path(weights).name if weights else "random"}
    return Built(model.eval(), resolved, None, ["logits"], details)
