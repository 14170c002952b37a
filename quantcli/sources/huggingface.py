"""A local Hugging Face folder as a model: the task's Auto class, offline, wrapped so the task picks the output.

Never a download: `local_files_only=True` and the hub's offline switch are set before transformers is
imported; `trust_remote_code` only when the recipe says so. transformers' own logging and progress
bars are silenced: quantcli reports what matters (newly initialized weights, the pooling) as notes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantcli import extras
from quantcli.errors import ModelError, RecipeError
from quantcli.recipe import InputSpec, ModelSection, Recipe
from quantcli.sources import hf_folder
from quantcli.sources.names import TASKS

log = logging.getLogger("quantcli")
DEFAULT_MAX_LENGTH = 128
_OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}


@contextlib.contextmanager
def transformers(images: bool = False) -> Iterator[Any]:
    """transformers, imported offline and quiet (torch first, through quantcli's silenced import), for the
    time of a `with` block that loads from it.

    A text model needs no torchvision, and transformers imports it when it finds it (a broken one
    then breaks BertModel's import): it is hidden unless images are processed, and then only if broken,
    and only within the block, so that a torchvision model built later in the same process still finds it.
    """
    from quantcli import _torch  # noqa: F401  (silences torchao's import noise, which transformers triggers)

    hidden = _without_broken_torchvision(images)
    try:
        yield _imported()
    finally:
        if hidden is not None:
            sys.modules.pop("torchvision", None)
            sys.modules.update(hidden)


def _imported() -> Any:
    for key, value in _OFFLINE.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", module=r"transformers\..*")
    tf = extras.require("transformers", "model.huggingface", ModelError)

    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    return tf


def _without_broken_torchvision(images: bool) -> dict[str, Any] | None:
    """Hide torchvision (sys.modules[name] = None: find_spec answers None, import fails) when text models
    are loaded, or when it is installed but does not import (a build for another torch). Returns the
    `torchvision.*` entries it took out of sys.modules (stubs a site may have put there), None if it hid nothing."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return None
    if images:
        try:
            import torchvision  # noqa: F401

            return None
        except Exception as exc:
            from quantcli.sources.zoo import _version, paired_torchvision

            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning(
                f"torchvision {_version('torchvision')} does not import beside torch {_version('torch')} "
                f"({first}); image processors run without it (install torchvision "
                f"{paired_torchvision(_version('torch'))} built for this torch, or uninstall it)"
            )
    taken = {name: sys.modules.pop(name) for name in [m for m in sys.modules if m.startswith("torchvision.")]}
    sys.modules["torchvision"] = None  # type: ignore[assignment]
    return taken


def _loaded(what: str, folder: Path, load: Any) -> Any:
    """Run a from_pretrained call; any failure is one ModelError naming the folder."""
    try:
        return load()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"model.huggingface: cannot load the {what} from {folder}: {type(exc).__name__}: {first}"
        ) from exc


def tokenizer(section: ModelSection, pad: bool = True) -> Any:
    """The folder's own tokenizer; a decoder's without a pad token pads with its end-of-sequence token
    (unless `pad` is false: the tokenizer as the folder has it)."""
    folder = hf_folder.transformer_dir(Path(section.huggingface))
    with transformers() as tf:
        tok = _loaded(
            "tokenizer",
            folder,
            lambda: tf.AutoTokenizer.from_pretrained(
                folder, local_files_only=True, trust_remote_code=section.trust_remote_code
            ),
        )
    if pad and tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
        log.warning("model.huggingface: the tokenizer has no pad token; padding with its end-of-sequence token")
    return tok


def load_config(section: ModelSection) -> Any:
    """The folder's model configuration (config.json)."""
    folder = hf_folder.transformer_dir(Path(section.huggingface))
    with transformers() as tf:
        return _loaded(
            "configuration",
            folder,
            lambda: tf.AutoConfig.from_pretrained(
                folder, local_files_only=True, trust_remote_code=section.trust_remote_code
            ),
        )


def image_processor(section: ModelSection) -> Any:
    folder = Path(section.huggingface)
    with transformers(images=True) as tf:
        return _loaded(
            "image processor",
            folder,
            lambda: tf.AutoImageProcessor.from_pretrained(
                folder, local_files_only=True, trust_remote_code=section.trust_remote_code
            ),
        )


def load(section: ModelSection) -> Any:
    """The folder's model as the task's Auto class, fp32, eval mode, without a KV cache."""
    import torch

    folder = hf_folder.transformer_dir(Path(section.huggingface))
    hf_folder.config(Path(section.huggingface))  # a clear error for a folder without config.json
    with transformers(images=TASKS[section.task].modality == "image") as tf:
        auto = getattr(tf, TASKS[section.task].auto_class)
        model, info = _loaded(
            "model",
            folder,
            lambda: auto.from_pretrained(
                folder,
                local_files_only=True,
                trust_remote_code=section.trust_remote_code,
                dtype=torch.float32,
                output_loading_info=True,
                **section.kwargs,
            ),
        )
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        log.warning(
            f"model.huggingface: {len(missing)} weight(s) are not in {folder} and were initialized at random "
            f"for {section.task} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
        )
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval()


def max_length(recipe: Recipe, model: Any) -> int:
    """The recipe's max_length (calibration's, else training's, else evaluation's; default 128), within the model's."""
    sections = [getattr(recipe, n) for n in ("calibration", "training", "evaluation")]
    length = next((s.max_length for s in sections if s is not None and s.max_length), DEFAULT_MAX_LENGTH)
    limit = next(
        (
            getattr(model.config, k)
            for k in ("max_position_embeddings", "n_positions")
            if isinstance(getattr(model.config, k, None), int)
        ),
        None,
    )
    if limit is not None and length > limit:
        raise RecipeError(f"max_length {length} exceeds the model's {limit} positions", f"use max_length <= {limit}")
    return length


def accepted(model: Any) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def text_inputs(section: ModelSection, model: Any, length: int) -> list[InputSpec]:
    """The tokenizer's model_input_names the model takes: int64 [batch, seq], both axes dynamic."""
    names = [n for n in tokenizer(section).model_input_names if n in accepted(model)]
    if "input_ids" not in names:
        raise ModelError(f"model.huggingface: the tokenizer's inputs {names} do not include input_ids")
    return [InputSpec(name=n, shape=[1, length], dtype="int64", dynamic_axes={0: "batch", 1: "seq"}) for n in names]


def image_inputs(section: ModelSection) -> list[InputSpec]:
    """The image processor's inputs, shaped as it makes them (it runs on a blank image), dynamic batch."""
    Image = extras.require("PIL.Image", "model.huggingface: an image model", ModelError)
    processor = image_processor(section)
    out = processor(images=[Image.new("RGB", (640, 480))], return_tensors="np")
    names = list(getattr(processor, "model_input_names", None) or ["pixel_values"])
    return [InputSpec(name=n, shape=[1, *out[n].shape[1:]], dtype="float32", dynamic_axes={0: "batch"}) for n in names]


def _task_module() -> type:
    import torch

    class _TaskModule(torch.nn.Module):
        """The Hugging Face model called with named inputs, returning the one tensor the task uses."""

        def __init__(self, model: Any, task: str, names: list[str], pooling: Any, positions: bool):
            super().__init__()
            self.model, self.task, self.names, self.pooling, self.positions = model, task, names, pooling, positions

        def forward(self, *args: Any) -> Any:
            kwargs = dict(zip(self.names, args))
            if (
                self.positions
            ):  # the model's default, written out: no slice of a fixed-size buffer, so seq stays dynamic
                ids = kwargs["input_ids"]
                kwargs["position_ids"] = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
            out = self.model(**kwargs, return_dict=True)
            if self.task != "feature-extraction":
                return out.logits
            return pool(out[0], kwargs.get("attention_mask"), self.pooling.mode, self.pooling.normalize)

    return _TaskModule


def pool(hidden: Any, mask: Any, mode: str, normalize: bool) -> Any:
    """sentence-transformers' poolings over the attention mask, for either padding side.

    `cls` takes the first token the mask keeps and `lasttoken` the last one, wherever the
    tokenizer put its padding (decoder tokenizers often pad on the left)."""
    import torch

    if mode == "none":
        return hidden
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode in ("cls", "lasttoken"):
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rank = positions if mode == "lasttoken" else hidden.shape[1] - positions  # the largest where wanted
        index = ((mask > 0).to(positions.dtype) * rank).argmax(dim=1)
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
    elif mode == "max":
        out = torch.where(m > 0, hidden, torch.full_like(hidden, -1e9)).amax(dim=1)
    else:
        total = (hidden * m).sum(dim=1)
        count = m.sum(dim=1).clamp(min=1e-9)
        out = total / (count.sqrt() if mode == "mean_sqrt_len" else count)
    return torch.nn.functional.normalize(out, p=2, dim=1) if normalize else out


def named(module: Any, names: list[str]) -> Any:
    """`module` with forward's signature naming the inputs, so torch.export and ONNX see those names."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]

    base = type(module)

    def forward(self: Any, *args: Any) -> Any:
        return base.forward(self, *args)

    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    module.__class__ = type(base.__name__, (base,), {"forward": forward})
    return module


def _positions_are_default(model: Any, names: list[str]) -> bool:
    """Whether passing position_ids = arange(seq) gives the model's own outputs (not so for RoBERTa's offsets)."""
    import torch

    if "position_ids" not in accepted(model) or "position_ids" in names or "input_ids" not in names:
        return False
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    gen = torch.Generator().manual_seed(0)
    feeds = {n: torch.ones(2, 8, dtype=torch.long) for n in names}
    feeds["input_ids"] = torch.randint(0, vocab, (2, 8), generator=gen)
    if "token_type_ids" in feeds:
        feeds["token_type_ids"] = torch.zeros(2, 8, dtype=torch.long)
    with torch.no_grad():
        own = model(**feeds, return_dict=True)[0]
        arange = model(**feeds, position_ids=torch.arange(8).unsqueeze(0).expand(2, 8), return_dict=True)[0]
    return bool(torch.equal(own, arange))


def build(recipe: Recipe) -> Any:
    """The wrapped model, the recipe with its inputs resolved, and a static-sequence fallback."""
    from quantcli.sources.base import Built

    section = recipe.model
    task = TASKS[section.task]
    model = load(section)
    details: dict[str, Any] = {"task": section.task}
    pooling = None
    if section.task == "feature-extraction":
        pooling = hf_folder.pooling(Path(section.huggingface), section.pooling, section.normalize)
        details["embedding"] = pooling.describe()
        log.warning(f"model.huggingface: the embedding is {pooling.describe()}")
    inputs = recipe.inputs
    if inputs is None:
        inputs = (
            text_inputs(section, model, max_length(recipe, model)) if task.modality == "text" else image_inputs(section)
        )
    names = [i.name for i in inputs]
    module = named(_task_module()(model, section.task, names, pooling, _positions_are_default(model, names)), names)
    resolved = recipe.model_copy(update={"inputs": inputs})
    fallback = None
    if recipe.inputs is None and task.modality == "text":  # a model that specializes the sequence: static seq
        fallback = recipe.model_copy(
            update={"inputs": [i.model_copy(update={"dynamic_axes": {0: "batch"}}) for i in inputs]}
        )
    output = "last_hidden_state" if pooling is not None and pooling.mode == "none" else task.output
    return Built(module.eval(), resolved, fallback, [output], details)
