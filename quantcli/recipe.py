"""The YAML recipe: one pydantic schema, loading, path resolution and did-you-mean errors.

This module must not import torch: `quantcli validate` and `--help` stay instant.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WrapSerializer,
    field_validator,
    model_validator,
)

from quantcli.errors import ArtifactError, InputError, RecipeError

# Layer 0 only: errors, file references and the torch-free name registries beside their owners
# (tests/test_layers.py checks it); nothing here imports numpy or torch.
from quantcli.loading import kinds
from quantcli.loading.dtypes import DTYPES
from quantcli.numerics.names import METRICS, fits, fitting
from quantcli.quantizers.names import (
    BLOCK_SIZES,
    OBSERVERS,
    TARGETS,
    WEIGHT_DTYPES,
    WEIGHT_METHODS,
    WEIGHT_METHODS_WITH_DATA,
)
from quantcli.references import file_values, resolve_path, split_callable
from quantcli.sources.names import POOLINGS, SOURCES, TASKS, ZOO_TASK
from quantcli.training.names import LOSSES, OPTIMIZERS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ImageOptions(_Section):
    """A torchvision/timm model's image preprocessing; unset keys come from the model's own defaults.

    Resolved at capture (torchvision's weights transforms, timm's resolve_data_config) and recorded,
    so every later stage preprocesses the same way without importing torchvision.
    """

    size: int | None = Field(default=None, gt=0, description="side of the square centre crop fed to the model")
    resize: int | None = Field(default=None, gt=0, description="the shorter side is resized to this before the crop")
    mean: list[float] | None = Field(
        default=None, min_length=3, max_length=3, description="per-channel mean (0-1 scale)"
    )
    std: list[float] | None = Field(default=None, min_length=3, max_length=3, description="per-channel std (0-1 scale)")
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(x <= 0 for x in v):
            raise ValueError("every std must be positive")
        return v


class ModelSection(_Section):
    factory: str | None = Field(
        default=None, description='"file.py:callable" or "package.module:callable" returning an nn.Module'
    )
    huggingface: str | None = Field(
        default=None,
        description="a local Hugging Face model folder (config.json, weights, tokenizer or image processor)",
    )
    torchvision: str | None = Field(default=None, description="a torchvision.models architecture name, e.g. resnet18")
    timm: str | None = Field(default=None, description="a timm architecture name, e.g. resnet10t")
    task: str | None = Field(
        default=None, description="what a Hugging Face model is loaded as; decides inputs, outputs and metrics"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments for the factory, the torchvision/timm constructor or from_pretrained",
    )
    weights: str | None = Field(
        default=None, description="torchvision: a state_dict file (.pt/.pth/.safetensors); null: random weights"
    )
    checkpoint: str | None = Field(
        default=None, description="timm: a checkpoint file for create_model(checkpoint_path=...); null: random weights"
    )
    trust_remote_code: bool = Field(default=False, description="huggingface: run the model folder's own Python code")
    pooling: str = Field(
        default="auto",
        description="feature-extraction: auto (the folder's 1_Pooling, else mean) | mean | cls | max | lasttoken | "
        "mean_sqrt_len | none (last hidden state)",
    )
    normalize: bool | None = Field(
        default=None,
        description="feature-extraction: L2-normalize the embedding; default: as the folder's modules.json says",
    )
    image: ImageOptions | None = Field(default=None, description="torchvision/timm: preprocessing overrides")

    @field_validator("factory")
    @classmethod
    def _has_callable(cls, v: str | None) -> str | None:
        if v is None:
            return v
        _no_nul(v)
        module, sep, attr = v.rpartition(":")
        if not sep or not module or not attr.isidentifier():  # the callable's name, as references.split_callable
            raise ValueError('must look like "file.py:callable" or "package.module:callable"')
        return v

    @field_validator("huggingface", "torchvision", "timm", "weights", "checkpoint")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        if v is not None and not v:
            raise ValueError("must not be empty")
        return v if v is None else _no_nul(v)

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | None) -> str | None:
        return v if v is None else one_of(v, TASKS, "task")

    @field_validator("pooling")
    @classmethod
    def _known_pooling(cls, v: str) -> str:
        return one_of(v, POOLINGS, "pooling")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        """Exactly one source; each source's own keys only with it; torchvision/timm are image classifiers."""
        given = [name for name in SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"set exactly one of {', '.join(SOURCES)}" + (f" (got {', '.join(given)})" if given else "")
            )
        source = given[0]
        if source in ("torchvision", "timm"):
            if self.task not in (None, ZOO_TASK):
                raise ValueError(f"task: a {source} model is an {ZOO_TASK} model, not {self.task}")
            self.task = ZOO_TASK
        if source == "huggingface" and self.task is None:
            raise ValueError(f"task: required with huggingface; valid: {', '.join(TASKS)}")
        if source == "factory" and self.task is not None:
            raise ValueError(
                "task: only with huggingface, torchvision or timm (a factory's model returns what it returns)"
            )
        misplaced = [
            key
            for key, owner in (("weights", "torchvision"), ("checkpoint", "timm"), ("image", "torchvision or timm"))
            if getattr(self, key) is not None and source not in owner.split(" or ")
        ]
        misplaced += ["trust_remote_code"] if self.trust_remote_code and source != "huggingface" else []
        if misplaced:
            raise ValueError(
                f"{misplaced[0]}: does not apply to a {source} model"
                + ("; timm takes checkpoint:" if misplaced[0] == "weights" else "")
                + ("; torchvision takes weights:" if misplaced[0] == "checkpoint" else "")
            )
        if (self.pooling != "auto" or self.normalize is not None) and self.task != "feature-extraction":
            raise ValueError("pooling/normalize: only with task feature-extraction")
        return self

    @property
    def source(self) -> str:
        """Which of SOURCES this model comes from."""
        return next(name for name in SOURCES if getattr(self, name) is not None)


class DynamicAxis(_Section):
    """A dynamic axis with bounds: torch.export.Dim(name, min=, max=)."""

    name: str = Field(min_length=1, description="symbol; axes with the same name share one size")
    min: int | None = Field(default=None, ge=0, description="smallest size the model accepts (default: torch's)")
    max: int | None = Field(default=None, ge=1, description="largest size, e.g. max_position_embeddings")

    @model_validator(mode="after")
    def _ordered(self) -> DynamicAxis:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is larger than max {self.max}")
        return self

    def range(self) -> str:
        return f"{'' if self.min is None else self.min}..{'' if self.max is None else self.max}"


class InputSpec(_Section):
    name: str = Field(description="input name, in forward() order; becomes the ONNX input name")
    shape: list[int] = Field(description="example shape used at capture")
    dtype: Literal[tuple(DTYPES)] = "float32"  # type: ignore[valid-type]
    dynamic_axes: dict[int, str | DynamicAxis] | None = Field(
        default=None,
        description='axis -> symbol, or {name, min, max}; default {0: "batch"}; {} makes every axis static',
    )

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(d <= 0 for d in v):
            raise ValueError("every dimension must be a positive integer")
        return v

    @field_validator("dynamic_axes", mode="before")
    @classmethod
    def _axis_forms(cls, v: Any) -> Any:
        """One message per bad axis, instead of one per branch of the str-or-bounds union."""
        for axis, value in v.items() if isinstance(v, dict) else ():
            if isinstance(value, dict):
                try:
                    DynamicAxis.model_validate(value)
                except ValidationError as exc:
                    problems = [m.removeprefix("(top level): ") for m in format_errors(exc, DynamicAxis)]
                    raise ValueError(f"axis {axis}: " + "; ".join(problems)) from None
            elif not isinstance(value, str):
                raise ValueError(
                    f"axis {axis}: must be a symbol name or {{name, min, max}}, got {type(value).__name__}"
                )
        return v

    def axes(self) -> dict[int, str]:
        """The dynamic axes' symbols with the default applied."""
        if self.dynamic_axes is None:
            return {0: "batch"} if self.shape else {}
        return {axis: a if isinstance(a, str) else a.name for axis, a in self.dynamic_axes.items()}

    def bounds(self) -> dict[int, DynamicAxis]:
        """Every dynamic axis as a DynamicAxis (unbounded where the recipe names only the symbol)."""
        if self.dynamic_axes is None:
            return {axis: DynamicAxis(name=name) for axis, name in self.axes().items()}
        return {axis: a if isinstance(a, DynamicAxis) else DynamicAxis(name=a) for axis, a in self.dynamic_axes.items()}

    @model_validator(mode="after")
    def _axes_in_range(self) -> InputSpec:
        for axis, dim in self.bounds().items():
            if not 0 <= axis < len(self.shape):
                raise ValueError(f"dynamic_axes: axis {axis} is outside shape {self.shape}")
            size = self.shape[axis]
            if (dim.min is not None and size < dim.min) or (dim.max is not None and size > dim.max):
                raise ValueError(
                    f"dynamic_axes: axis {axis} ({dim.name}) is bounded {dim.range()}, but shape gives it {size}"
                )
        return self


def _shared_bounds(inputs: list[InputSpec]) -> list[InputSpec]:
    """One symbol, one size: axes that share a name must not declare different bounds."""
    seen: dict[str, tuple[str, DynamicAxis]] = {}
    for i, spec in enumerate(inputs):
        for axis, dim in spec.bounds().items():
            where = f"inputs.{i}.dynamic_axes.{axis}"
            first = seen.setdefault(dim.name, (where, dim))
            bounded = [d for d in (first[1], dim) if d.min is not None or d.max is not None]
            if len(bounded) == 2 and (first[1].min, first[1].max) != (dim.min, dim.max):
                raise ValueError(
                    f"symbol {dim.name!r} is bounded {dim.range()} at {where} but "
                    f"{first[1].range()} at {first[0]}; one symbol is one size, give it one range"
                )
            if dim.min is not None or dim.max is not None:
                seen[dim.name] = (where, dim)
    return inputs


class DataSource(_Section):
    data: str = Field(
        min_length=1,
        description=".npz, folder of .npy files, file.py:callable yielding dicts; or "
        ".txt/.jsonl/.csv/.parquet text, or a folder of images (class subfolders: the labels)",
    )
    keys: dict[str, str] = Field(default_factory=dict, description="input name -> array name in the data")
    text: str | None = Field(
        default=None, description='the text column of a .jsonl/.csv/.parquet file (default "text")'
    )
    text_pair: str | None = Field(default=None, description="the second text column of sentence pairs")
    max_length: int | None = Field(
        default=None, gt=0, description="tokenizer: pad/truncate to this many tokens (default 128)"
    )
    padding: Literal["max_length", "longest"] = Field(default="max_length", description="tokenizer padding")
    truncation: bool = Field(default=True, description="tokenizer: cut longer texts at max_length")
    windows: bool = Field(
        default=False,
        description="text-generation: the texts' tokens joined and cut into windows of max_length tokens, no "
        "padding (how a decoder is calibrated and its perplexity measured)",
    )

    @field_validator("data")
    @classmethod
    def _path_like(cls, v: str) -> str:
        return _no_nul(v)

    @model_validator(mode="after")
    def _keys_fit_the_kind(self, info: ValidationInfo) -> DataSource:
        """Tokenizer keys need text; `keys:` maps arrays, which text and images do not have.

        Tokenizer settings are judged where the user wrote them, other than their defaults (recorded
        recipes hold every default, and a user may rerun one).
        """
        kind = kinds.by_name(self.data)
        if (self.text is not None or self.text_pair is not None) and kind != "table":
            raise ValueError(
                "text/text_pair: name columns of a .jsonl/.csv/.tsv/.parquet file; "
                + ("a .txt file holds one example a line" if kind == "text" else f"{self.data} has none")
            )
        tokenizer = {
            k
            for k in {"max_length", "padding", "truncation", "windows"} & self.model_fields_set
            if getattr(self, k) != type(self).model_fields[k].default
        }  # a recorded default is no setting
        if tokenizer and (info.context or {}).get("written") and kind in ("arrays", "callable"):
            raise ValueError(f"{sorted(tokenizer)[0]}: tokenizer settings apply to text files, not to {self.data}")
        if self.keys and kind in ("text", "table"):
            raise ValueError("keys: maps array names; text files are tokenized into the model's inputs")
        if self.windows and self.text_pair is not None:
            raise ValueError("windows: joins single texts; it takes no text_pair")
        return self


def _no_nul(v: str) -> str:
    if "\0" in v:
        raise ValueError("must not contain a NUL character")
    return v


class CalibrationSection(DataSource):
    batch_size: int = Field(default=32, gt=0)
    num_batches: int | None = Field(default=None, gt=0, description="default: all the data")
    bias_correction: bool = Field(
        default=True,
        description="on the first batch, take the mean shift quantization adds to each conv's (and a 2-D linear's) "
        "output back from its bias; static activations, not QAT",
    )


class EvaluationSection(DataSource):
    targets: str | None = Field(
        default=None,
        description="the targets: an array, or a column of a text file; an image folder's class subfolders give them",
    )
    metric: str | None = Field(default=None, description="default: the task's (accuracy for a factory model)")
    batch_size: int = Field(default=64, gt=0)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str | None) -> str | None:
        return v if v is None else one_of(v, METRICS, "metric")


class WeightsConfig(_Section):
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    symmetric: bool = True
    dtype: str = Field(default="int8", description="int8 | int4 (int4: weight-only, with activations: none)")
    block_size: int | None = Field(
        default=None,
        description="weight-only: input elements (K) sharing one scale, "
        f"{', '.join(map(str, BLOCK_SIZES))}; omitted or 0: one scale per output channel (int8)",
    )
    method: str = Field(default="rtn", description="weight-only: rtn | gptq | awq (docs/weight-only.md)")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        return one_of(v, WEIGHT_DTYPES, "weight dtype")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return one_of(v, WEIGHT_METHODS, "method")

    @field_validator("block_size")
    @classmethod
    def _block_ort_runs(cls, v: int | None) -> int | None:
        if not v:
            return None  # 0 is the spelled-out "per channel"
        if v not in BLOCK_SIZES:
            raise ValueError(
                f"{v} is not a block size ONNX Runtime's MatMulNBits runs; valid: "
                f"{', '.join(map(str, BLOCK_SIZES))} (0 or omitted: per output channel)"
            )
        return v

    def weight_only_problems(self, where: str) -> list[str]:
        """What is wrong with these weights for weight-only quantization (`where`: their key path)."""
        problems = []
        if self.granularity != "per_channel":
            problems.append(f"{where}.granularity: weight-only weights are per channel or per block (block_size)")
        if self.dtype == "int4" and self.block_size is None:
            problems.append(
                f"{where}.block_size: int4 needs a block size, e.g. 32; valid: {', '.join(map(str, BLOCK_SIZES))}"
            )
        return problems

    def static_problems(self, where: str) -> list[str]:
        """What is wrong with these weights beside quantized activations (int8 per channel or tensor only)."""
        wrong = [
            f"{key} {getattr(self, key)}"
            for key, default in (("dtype", "int8"), ("block_size", None), ("method", "rtn"))
            if getattr(self, key) != default
        ]
        if not wrong:
            return []
        return [f"{where}: {', '.join(wrong)} is weight-only quantization; set quantization.activations: none"]


class ActivationsConfig(_Section):
    dtype: Literal["uint8", "int8"] = "uint8"
    symmetric: bool = False


NO_ACTIVATIONS = "none"  # `activations: none`: weight-only quantization, activations stay float


def _activations_form(v: Any) -> Any:
    """`none` (held as None: a nullable field reports a bad mapping's keys by their own path), or a mapping."""
    if v == NO_ACTIVATIONS:
        return None
    if v is None or not isinstance(v, (dict, ActivationsConfig)):
        raise ValueError(f"must be none (weight-only) or a mapping {{dtype, symmetric}}, got {v!r}")
    return v


def _overridden_activations(v: Any) -> Any:
    if v == NO_ACTIVATIONS:
        raise ValueError(
            "none (weight-only) applies to the whole model (quantization.activations), not to some modules"
        )
    return v


Activations = Annotated[
    ActivationsConfig | None,
    BeforeValidator(_activations_form),
    WrapSerializer(lambda v, dump: NO_ACTIVATIONS if v is None else dump(v)),
]


def _known_observer(v: str) -> str:
    return one_of(v, OBSERVERS, "observer")


Observer = Annotated[
    str,
    AfterValidator(_known_observer),
    Field(description="activation calibration method; see docs/recipe.md, Quantization targets"),
]


class OverrideConfig(_Section):
    """Settings for the modules `names` matches; overrides matching one module merge field by field, the
    last that sets a field winning (quantcli.quantizers.policy)."""

    names: list[str] = Field(min_length=1, description="module-name globs this override applies to")
    weights: WeightsConfig | None = None
    activations: Annotated[ActivationsConfig | None, BeforeValidator(_overridden_activations)] = None
    observer: Observer | None = None
    reduce_range: bool | None = None
    exclude: bool = Field(default=False, description="keep these modules in float")


class QuantizationSection(_Section):
    target: str = Field(default="onnxruntime", description="quantizer registry name")
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    activations: Activations = Field(
        default_factory=ActivationsConfig,
        description="static activations {dtype, symmetric}, or none: weight-only (activations stay float)",
    )
    observer: Observer = "auto"
    target_cpu: Literal["auto", "avx2", "avx512", "vnni", "arm64"] = Field(
        default="auto", description="the CPU class the model is built for; auto: this machine's, resolved at prepare"
    )
    reduce_range: Literal["auto", "pair_safe"] | bool = Field(
        default="auto",
        description="weight range: false 8-bit; true 7-bit everywhere (ORT's reduce_range); "
        "pair_safe 8-bit narrowed per channel only as far as int16 pair sums need; auto: pair_safe on "
        "avx2/avx512 targets, false elsewhere (docs/cpu-targets.md)",
    )
    exclude_names: list[str] = Field(default_factory=list)
    exclude_types: list[str] = Field(default_factory=list)
    overrides: list[OverrideConfig] = Field(default_factory=list)
    equalize: bool = Field(default=True, description="SmoothQuant-style equalization of outlier activations")

    @field_validator("target")
    @classmethod
    def _registered(cls, v: str) -> str:
        return one_of(v, TARGETS, "target")

    @model_validator(mode="after")
    def _options_the_target_reads(self, info: ValidationInfo) -> QuantizationSection:
        """An option the target ignores is an error where the user wrote it (recorded recipes hold every
        default and the resolved values, so they are not judged)."""
        options = TARGETS.get(self.target)  # None: unknown (reported above) or every option
        if not (info.context or {}).get("written") or options is None:
            return self
        ignored = sorted(self.model_fields_set - {"target"} - options)
        if ignored:
            raise ValueError(
                f"target {self.target!r} ignores {', '.join(ignored)}; remove "
                f"{'them' if len(ignored) > 1 else 'it'} or use the onnxruntime target"
            )
        return self

    @model_validator(mode="after")
    def _weight_only_consistent(self, info: ValidationInfo) -> QuantizationSection:
        """Weight-only keys only with `activations: none`, and what weight-only quantization reads only there.

        Activation options (observer, reduce_range, equalize) are errors where the user wrote them
        beside `activations: none`; recorded recipes hold their defaults.
        """
        if not self.weight_only:
            problems = self.weights.static_problems("weights")
            problems += [
                p
                for i, o in enumerate(self.overrides)
                if o.weights is not None
                for p in o.weights.static_problems(f"overrides.{i}.weights")
            ]
        else:
            problems = self.weights.weight_only_problems("weights")
            for i, o in enumerate(self.overrides):
                problems += o.weights.weight_only_problems(f"overrides.{i}.weights") if o.weights else []
                written = [k for k in ("activations", "observer", "reduce_range") if getattr(o, k) is not None]
                problems += [f"overrides.{i}.{k}: activations stay float (activations: none)" for k in written]
            if (info.context or {}).get("written"):
                ignored = sorted(self.model_fields_set & {"observer", "reduce_range", "equalize"})
                problems += [f"{k}: weight-only quantization (activations: none) ignores it" for k in ignored]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def weight_only(self) -> bool:
        """Whether activations stay float and only weights are quantized (`activations: none`)."""
        return self.activations is None

    def methods(self) -> set[str]:
        """The weight-only methods the section names, its overrides' included."""
        return {self.weights.method} | {o.weights.method for o in self.overrides if o.weights is not None}

    @property
    def needs_data(self) -> bool:
        """Whether calibration must stream data: static ranges, or a weight-only method that collects statistics."""
        return not self.weight_only or bool(self.methods() & WEIGHT_METHODS_WITH_DATA)


def one_of(value: str, names: Any, what: str) -> str:
    """`value` if it is one of `names`, else a ValueError naming the closest and every valid one."""
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}{did_you_mean(value, names)}; valid: {', '.join(names)}")
    return value


def did_you_mean(word: str, valid: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(v) for v in valid], n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


class TrainingSection(DataSource):
    targets: str | None = Field(
        default=None,
        description="the targets: an array, or a column of a text file; an image folder's class subfolders give them",
    )

    @field_validator("data")
    @classmethod
    def _indexed(cls, v: str) -> str:
        if split_callable(v) is not None:
            raise ValueError(
                "must be an .npz file or a folder of .npy files, not a callable: training needs "
                "indexed samples (shuffled, split across processes, its order saved for --resume)"
            )
        return v

    loss: str = Field(default="cross_entropy", description='a built-in loss (cross_entropy, mse) or "file.py:callable"')
    optimizer: dict[str, Any] = Field(default_factory=lambda: {"name": "sgd", "lr": 0.01, "momentum": 0.9})
    epochs: int = Field(default=1, gt=0)
    batch_size: int = Field(default=64, gt=0)
    freeze_bn_after: float | int | None = None
    freeze_observers_after: float | int | None = None
    checkpoint_every: int | None = Field(default=None, gt=0)
    seed: int = 0

    @field_validator("freeze_bn_after", "freeze_observers_after")
    @classmethod
    def _fraction_or_step(cls, v: float | int | None) -> float | int | None:
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError("a float must be a fraction of the steps in (0, 1); an int is a step")
        if isinstance(v, int) and not isinstance(v, bool) and v < 0:
            raise ValueError("a step must be >= 0")
        return v

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        _no_nul(v)
        if v not in LOSSES and ":" not in v:
            raise ValueError(
                f'unknown loss {v!r}{did_you_mean(v, LOSSES)}; valid: {", ".join(LOSSES)}, or "file.py:callable"'
            )
        return v

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: dict[str, Any]) -> dict[str, Any]:
        name = v.get("name", "sgd")
        if name not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {name!r}{did_you_mean(name, OPTIMIZERS)}; valid: {', '.join(OPTIMIZERS)}"
            )
        return v


WEIGHT_ONLY_OPSET = 21  # the first opset with int4 and blocked DequantizeLinear
# The default: from opset 20 the exporter writes GELU as one Gelu, which ORT runs fused (with a Linear's bias:
# BiasGelu), where opset 18's Div, Erf, Add, Mul, Mul stayed float between DequantizeLinear and QuantizeLinear
# (ConvNeXt-atto: 95 -> 47 float ops, 0.87x / 0.60x the latency at batch 1 / 32); 21 also serves weight-only.
DEFAULT_OPSET = WEIGHT_ONLY_OPSET


class ExportSection(_Section):
    opset: int = Field(default=DEFAULT_OPSET, ge=7, le=23)
    parity_max_excess_db: float = Field(
        default=6.0,
        ge=0,
        description="how much more error against fp32 (dB of noise power) ONNX Runtime may have "
        "than the PyTorch int8 model; above it, export fails with exit 5",
    )
    parity_min_sqnr_db: float | None = Field(
        default=None, description="optional fixed floor: ONNX Runtime (full optimizations) vs the PyTorch int8 model"
    )
    kv_cache: bool | None = Field(
        default=None,
        description="text-generation: a decoder with a key/value cache (past_key_values.* in, present.* out) and "
        "an onnxruntime-genai folder <name>.genai/ beside the model; default: on for a Hugging Face "
        "text-generation model with float activations (fp32 or weight-only), off otherwise (docs/genai.md)",
    )


class Recipe(_Section):
    model: ModelSection
    inputs: Annotated[list[InputSpec], AfterValidator(_shared_bounds)] | None = Field(
        default=None,
        min_length=1,
        description="default: from the model source (resolved at capture and recorded); required with a factory",
    )
    outputs: list[str] | None = None
    calibration: CalibrationSection | None = None
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    training: TrainingSection | None = None
    evaluation: EvaluationSection | None = None
    export: ExportSection = Field(default_factory=ExportSection)

    @model_validator(mode="after")
    def _inputs_consistent(self) -> Recipe:
        if self.inputs is None:
            if self.model.source == "factory":
                raise ValueError(
                    "inputs: required with a model factory (a Hugging Face, torchvision or timm model knows its own)"
                )
            return self
        names = [i.name for i in self.inputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"inputs: duplicate names {dupes}")
        for section in (self.calibration, self.training, self.evaluation):
            if section is not None:
                unknown = sorted(set(section.keys) - set(names))
                if unknown:
                    raise ValueError(f"keys name unknown inputs {unknown}; inputs are {names}")
        return self

    @model_validator(mode="after")
    def _weight_only_chain(self) -> Recipe:
        """Weight-only: no training, calibration data where a method collects statistics, opset 21 (int4, blocks)."""
        q = self.quantization
        if not q.weight_only:
            return self
        problems = []
        if self.training is not None:
            problems.append("training: weight-only quantization (activations: none) has no quantization-aware training")
        if self.calibration is None and q.needs_data:
            method = sorted(q.methods() & WEIGHT_METHODS_WITH_DATA)[0]
            problems.append(
                f"calibration: missing; method {method} collects each linear's input statistics from calibration data"
            )
        if self.export.opset < WEIGHT_ONLY_OPSET:
            problems.append(
                f"export.opset: {self.export.opset}; weight-only quantization needs {WEIGHT_ONLY_OPSET} or higher "
                "(int4 and blocked DequantizeLinear)"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _kv_cache_applies(self) -> Recipe:
        """`export.kv_cache: true` only for a Hugging Face text-generation model with float activations."""
        if not self.export.kv_cache:
            return self
        if self.model.task != "text-generation" or self.model.huggingface is None:
            raise ValueError("export.kv_cache: a key/value cache is for a Hugging Face model with task text-generation")
        if not self.quantization.weight_only:
            raise ValueError(
                "export.kv_cache: static int8 activations export the full-sequence model only; "
                "use activations: none (weight-only) or export.kv_cache: false"
            )
        return self

    @model_validator(mode="after")
    def _data_fits_the_model(self) -> Recipe:
        """Each data section's kind fits the model's source and task; the metric fits the task; defaults by task.

        Judged by names only (no file is opened): `validate` looks inside the files and folders.
        """
        task = self.model.task
        problems = []
        for name in ("calibration", "training", "evaluation"):
            section = getattr(self, name)
            if section is not None:
                problems += [f"{name}.{p}" for p in _data_problems(section, self.model)]
        if self.evaluation is not None:
            ev = self.evaluation
            ev.metric = ev.metric or (TASKS[task].default_metric if task else "accuracy")
            if not fits(ev.metric, task):
                problems.append(
                    f"evaluation.metric: {ev.metric} does not fit task {task}; valid: {', '.join(fitting(task))}"
                )
            elif METRICS[ev.metric].next_token and ev.targets is not None:
                problems.append(f"evaluation.targets: {ev.metric} scores each next token of the inputs; remove it")
            elif METRICS[ev.metric].needs_targets and ev.targets is None and kinds.by_name(ev.data) != "folder":
                problems.append(
                    f"evaluation.targets: missing; {ev.metric} needs targets (an array or a column; an "
                    "image folder's class subfolders give them)"
                )
        if (
            self.training is not None
            and self.training.targets is None
            and kinds.by_name(self.training.data) != "folder"
        ):
            problems.append(
                "training.targets: missing (an array or a column; an image folder's class subfolders give them)"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def digest(self) -> str:
        return hash_json(self.model_dump(mode="json"))

    def sections(self, *names: str) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        return {n: data[n] for n in names}


def _data_problems(section: DataSource, model: ModelSection) -> list[str]:
    """What is wrong with a data section for this model, judged from names (no file is read)."""
    kind = kinds.by_name(section.data)
    if kind not in ("text", "table"):
        return [f"windows: cuts text files into token windows; {section.data} holds no text"] if section.windows else []
    if model.source == "factory":
        return [
            f"data: {section.data} is text; text files need a model that knows its tokenizer "
            "(model.huggingface); a factory takes .npz, .npy folders or a callable"
        ]
    if TASKS[model.task].modality != "text":
        return [f"data: {section.data} is text, but a {model.task} model takes images (a folder of image files)"]
    if section.windows and model.task != "text-generation":
        return [f"windows: cuts text into token windows for a decoder (task text-generation), not {model.task}"]
    return []


def hash_json(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _model_for(loc: tuple[Any, ...], root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """Walk the schema along `loc` to the model holding the last key (for did-you-mean)."""
    model: Any = root or Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = _unwrap(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    for arg in getattr(annotation, "__args__", ()) or ():
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def format_errors(exc: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """One line per problem, each naming its dotted key path (and a did-you-mean for unknown keys)."""
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        if err["type"] == "extra_forbidden":
            owner = _model_for(loc, root)
            valid = sorted(owner.model_fields) if owner else []
            hint = did_you_mean(loc[-1], valid) or (f"; valid keys: {', '.join(valid)}" if valid else "")
            lines.append(f"{_loc(loc)}: unknown key{hint}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines += msg.split("\n") if not loc and _NAMES_KEY.match(msg) else [f"{_loc(loc)}: {msg}"]
    return lines


# A message of a validator across sections starts with the key path it is about ("evaluation.metric: ...").
_NAMES_KEY = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)*: ")


def schema_problems(data: Any) -> tuple[Recipe | None, list[str]]:
    """(the recipe, []) when `data` is valid, else (None, one line per problem)."""
    if data is None:
        return None, ["the recipe is empty"]
    if not isinstance(data, dict):
        return None, [f"the recipe must be a YAML mapping, got {type(data).__name__}"]
    try:
        return Recipe.model_validate(data, context={"written": True}), []
    except ValidationError as exc:
        return None, format_errors(exc)


def parse(data: Any, source: str = "recipe") -> Recipe:
    """Validate a parsed YAML document; raise RecipeError listing every problem at once."""
    recipe, problems = schema_problems(data)
    if recipe is None:
        raise RecipeError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems))
    return recipe


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"recipe not found: {path}", "pass an existing YAML file with --recipe")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise InputError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: invalid YAML: not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise RecipeError(f"{path}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{path}: invalid YAML: nested too deeply") from None


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Return a copy whose file references are absolute, relative to `base` (the recipe's folder)."""
    data = recipe.model_dump(mode="json")
    for key, value in file_values(data):
        section, field = key.split(".")
        data[section][field] = resolve_path(value, base)
    return Recipe.model_validate(data)


def load(path: str | Path) -> Recipe:
    """Read, validate and resolve a recipe file."""
    path = Path(path)
    return resolve_paths(parse(read_yaml(path), str(path)), path.resolve().parent)


def referenced_files(recipe: Recipe) -> list[tuple[str, str]]:
    """(key path, filesystem path) of every file the recipe refers to."""
    refs = []
    for key, value in file_values(recipe.model_dump(mode="json")):
        target = split_callable(value)
        if target is None:
            refs.append((key, value))
        elif target[0].endswith(".py"):
            refs.append((key, target[0]))
    return refs


def merge(recorded: Recipe, new: Recipe, *, takes: tuple[str, ...], fixed: dict[str, str], command: str) -> Recipe:
    """The recorded recipe with the `takes` sections from `new`.

    `fixed` maps each section an earlier stage consumed to that stage's command: `new` must agree
    with the recorded recipe there, else the artifact would not be what `new` describes.
    """
    old_data, new_data = recorded.model_dump(mode="json"), new.model_dump(mode="json")
    if "inputs" in fixed:
        _as_resolved_at_capture(old_data, new_data)
    if "quantization" in fixed:
        for key in ("target_cpu", "reduce_range"):  # "auto" means: as resolved at prepare
            if new_data["quantization"][key] == "auto":
                new_data["quantization"][key] = old_data["quantization"][key]
    changed = [k for k in fixed if old_data[k] != new_data[k]]
    if changed:
        first = fixed[changed[0]]
        raise ArtifactError(
            f"--recipe changes {', '.join(changed)}, fixed when the artifact was made (at {first}); "
            f"`quantcli {command} --recipe` may only change {', '.join(takes) or 'nothing'}",
            f"rerun the chain from `quantcli {first}` with this recipe",
        )
    for key in takes:
        old_data[key] = new_data[key]
    return Recipe.model_validate(old_data)


def _as_resolved_at_capture(old: dict[str, Any], new: dict[str, Any]) -> None:
    """What `new` leaves to the model source (inputs, image preprocessing) means: as capture resolved it.

    Capture records the inputs and a torchvision/timm model's image preprocessing it resolved from the
    model; a later stage's --recipe that leaves them out agrees with the recorded values.
    """
    if new["inputs"] is None:
        new["inputs"] = old["inputs"]
    old_image, new_image = old["model"].get("image"), new["model"].get("image")
    if old_image is not None:
        new["model"]["image"] = {
            k: old_image[k] if (new_image or {}).get(k) is None else new_image[k] for k in old_image
        }
