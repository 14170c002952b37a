"""The model's own preprocessing: its tokenizer, its image processor or its zoo transforms; and its labels.

An encoder turns raw examples (texts, word lists, PIL images) into the recipe's inputs, as numpy
arrays of the recorded dtypes; `Labels` turns targets (indices, label strings, class folders, per-word
labels) into class indices the way the model counts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.errors import DataError
from quantcli.numerics.metrics import IGNORE
from quantcli.recipe import DataSource, ImageOptions, Recipe
from quantcli.sources import hf_folder

_PIL_FILTERS = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image.Resampling values


class TextEncoder:
    """The model folder's tokenizer with the section's max_length, padding and truncation."""

    def __init__(self, recipe: Recipe, section: DataSource, what: str, fixed_width: bool = False):
        from quantcli.sources import huggingface

        self.tokenizer = huggingface.tokenizer(recipe.model)
        self.inputs, self.what = recipe.inputs, what
        seq = [i.shape[1] for i in recipe.inputs if len(i.shape) == 2]
        self.max_length = section.max_length or (seq[0] if seq else huggingface.DEFAULT_MAX_LENGTH)
        self.padding = "max_length" if fixed_width else section.padding
        self.truncation = section.truncation

    def __call__(self, texts: list[Any], pairs: list[Any] | None) -> tuple[dict[str, np.ndarray], Any]:
        """(inputs, the tokenizer's encoding: word_ids for token labels). Word lists are pre-split words."""
        words = bool(texts) and isinstance(texts[0], list)
        try:
            encoding = self.tokenizer(
                texts,
                text_pair=pairs,
                max_length=self.max_length,
                padding=self.padding,
                truncation=self.truncation,
                is_split_into_words=words,
                return_tensors="np",
            )
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"{self.what}: the tokenizer failed: {type(exc).__name__}: {first}") from exc
        return _as_inputs(dict(encoding), self.inputs, self.what, "the tokenizer"), encoding

    def ids(self, text: str) -> list[int]:
        """A text's token ids, whole (no padding, no truncation), special tokens as the tokenizer adds them."""
        try:
            return list(self.tokenizer(text, verbose=False)["input_ids"])
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"{self.what}: the tokenizer failed: {type(exc).__name__}: {first}") from exc

    def windows(self, windows: list[list[int]]) -> dict[str, np.ndarray]:
        """A batch of full token windows (max_length ids each, every position attended)."""
        ids = np.asarray(windows, dtype=np.int64)
        return _as_inputs({"input_ids": ids, "attention_mask": np.ones_like(ids)}, self.inputs, self.what, "windows")


class ImageEncoder:
    """The Hugging Face folder's image processor, or a zoo model's recorded transforms (PIL + numpy)."""

    def __init__(self, recipe: Recipe, what: str):
        self.inputs, self.what = recipe.inputs, what
        self.processor = None
        if recipe.model.source == "huggingface":
            from quantcli.sources import huggingface

            self.processor = huggingface.image_processor(recipe.model)
        self.options = recipe.model.image

    def __call__(self, images: list[Any]) -> dict[str, np.ndarray]:
        if self.processor is not None:
            arrays = dict(self.processor(images=images, return_tensors="np"))
        else:
            arrays = {self.inputs[0].name: np.stack([transform(img, self.options) for img in images])}
        return _as_inputs(arrays, self.inputs, self.what, "the image preprocessing")


def transform(image: Any, options: ImageOptions) -> np.ndarray:
    """torchvision's eval preset on a PIL image: shorter side to `resize`, centre crop `size`, scale, normalize.

    The same PIL operations torchvision's Resize/CenterCrop apply to PIL images, so the arrays equal
    theirs (a test compares with torchvision and timm transforms).
    """
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = options.resize, int(options.resize * long / short)
    image = image.resize(
        (new_short, new_long) if w <= h else (new_long, new_short), _PIL_FILTERS[options.interpolation]
    )
    w, h = image.size
    top, left = int(round((h - options.size) / 2.0)), int(round((w - options.size) / 2.0))
    image = image.crop((left, top, left + options.size, top + options.size))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(options.mean, np.float32)) / np.asarray(options.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _as_inputs(arrays: dict[str, Any], inputs: Sequence[Any], what: str, maker: str) -> dict[str, np.ndarray]:
    """The recipe's inputs from what the preprocessing made, in the recorded dtypes."""
    missing = [i.name for i in inputs if i.name not in arrays]
    if missing:
        raise DataError(f"{what}: {maker} makes {sorted(arrays)}, not the model input {missing[0]!r}")
    return {i.name: np.ascontiguousarray(np.asarray(arrays[i.name]), dtype=i.dtype) for i in inputs}


class Labels:
    """Targets as the model's class indices: integers as given, label strings through its label2id."""

    def __init__(self, recipe: Recipe, what: str, key: str):
        self.what, self.key = what, key
        self.label2id = hf_folder.labels(Path(recipe.model.huggingface)) if recipe.model.source == "huggingface" else {}

    def index(self, value: Any) -> int:
        if isinstance(value, (bool, np.bool_)) or value is None:
            raise DataError(f"{self.what}.{self.key}: target {value!r} is not a class index or label")
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, str) and value in self.label2id:
            return self.label2id[value]
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        known = ", ".join(sorted(self.label2id)) or "none: the model's config.json has no id2label"
        raise DataError(f"{self.what}.{self.key}: label {value!r} is not one of the model's labels ({known})")

    def sequence(self, values: list[Any]) -> np.ndarray:
        return np.asarray([self.index(v) for v in values], dtype=np.int64)

    def tokens(self, values: list[Any], encoding: Any, width: int) -> np.ndarray:
        """Per-word labels aligned to sub-tokens: a word's first sub-token labelled, the rest IGNORE."""
        out = np.full((len(values), width), IGNORE, dtype=np.int64)
        for row, words in enumerate(values):
            if not isinstance(words, list):
                raise DataError(
                    f"{self.what}.{self.key}: token-classification targets are a list of labels a "
                    f"word, got {type(words).__name__}"
                )
            previous = None
            for position, word in enumerate(encoding.word_ids(row)):
                if word is not None and word != previous and word < len(words):
                    out[row, position] = self.index(words[word])
                previous = word
        return out

    def folders(self, names: list[str], source: str) -> dict[str, int]:
        """Class folder -> index: through the model's id2label (an error where they disagree), else sorted."""
        if source != "huggingface":
            return {name: index for index, name in enumerate(names)}
        unknown = [n for n in names if n not in self.label2id]
        if unknown:
            raise DataError(
                f"{self.what}.data: class folders {unknown} are not labels of the model "
                f"(its id2label: {', '.join(sorted(self.label2id)) or 'none'})",
                "name each class folder after the label the model predicts for it",
            )
        return {name: self.label2id[name] for name in names}
