"""Data as files, read the model's way: text (.txt), tables (.jsonl/.csv/.tsv/.parquet), image folders.

Tables and text are read by Hugging Face `datasets` in streaming mode (offline, bounded memory,
its cache in a temporary folder, never `~/.cache`, its progress bars off); images by Pillow, in
sorted order, an ImageNet-style folder's class subfolders giving the labels. Calibration and
evaluation stream batches; training takes `dataset()`: the preprocessed arrays, made once into a
hashed, memory-mapped cache in the training output's hidden `.<out>.partial/` folder, so that
samples can be indexed (shuffled, split across ranks, their order saved for --resume). Batches are
the same `input name -> array` dicts (targets under TARGET_COLUMN) as every other source's.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from quantcli import __version__, extras
from quantcli.errors import DataError
from quantcli.loading import kinds
from quantcli.loading.data import TARGET_COLUMN, Dataset, check_batch
from quantcli.loading.preprocess import ImageEncoder, Labels, TextEncoder
from quantcli.recipe import DataSource, Recipe
from quantcli.sources.names import TASKS

_DATASETS_TMP: list[str] = []


def _datasets() -> tuple[Any, str]:
    """`datasets`, quiet and offline, and a temporary cache folder for it (removed at exit)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    datasets = extras.require("datasets", "reading text and table files", DataError)

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    if not _DATASETS_TMP:
        _DATASETS_TMP.append(tempfile.mkdtemp(prefix="quantcli-datasets-"))
        atexit.register(shutil.rmtree, _DATASETS_TMP[0], True)
    return datasets, _DATASETS_TMP[0]


def table_rows(path: Path, what: str) -> Iterator[dict[str, Any]]:
    """The rows of a text or table file, streamed; a .txt file's non-blank lines as {"text": line}."""
    datasets, cache = _datasets()
    suffix = path.suffix.lower()
    options = {"sep": "\t"} if suffix == ".tsv" else {}
    try:
        stream = datasets.load_dataset(
            kinds.TEXT_SUFFIXES[suffix], data_files=str(path), split="train", streaming=True, cache_dir=cache, **options
        )
        for row in stream:
            if suffix != ".txt" or row["text"].strip():
                yield row
    except DataError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{what}.data: cannot read {path}: {type(exc).__name__}: {first}") from exc


def _column(row: dict[str, Any], name: str, key: str, what: str, path: Path) -> Any:
    if name not in row:
        raise DataError(f"{what}.{key}: no column {name!r} in {path.name}; it has {list(row)}")
    return row[name]


class FileReader:
    """One data section's files, preprocessed the model's way into batches of the recipe's inputs."""

    def __init__(self, recipe: Recipe, section: DataSource, what: str, kind: str, targets: bool, cache: Path | None):
        self.recipe, self.section, self.what, self.kind = recipe, section, what, kind
        self.targets, self.cache = targets, cache
        self.path = Path(section.data)
        self.task = recipe.model.task
        modality = TASKS[self.task].modality if self.task else None
        if (kind == "images") != (modality == "image"):
            has = "images" if kind == "images" else "text"
            raise DataError(
                f"{what}.data: {self.path} holds {has}, but the {recipe.model.source} model "
                f"({self.task or 'a factory'}) takes {modality or 'arrays'}"
            )
        self.labels = Labels(recipe, what, "targets")

    # -- streaming ------------------------------------------------------------------
    def iter_batches(
        self, batch_size: int, num_batches: int | None, fixed_width: bool = False
    ) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
        """(number of batches, or 0 where unknown before reading; the batches), a final partial one included."""
        targets = self.targets
        if self.kind == "images":
            files = kinds.image_files(self.path)
            if not files:
                raise DataError(
                    f"{self.what}.data: {self.path} holds no image files ({', '.join(kinds.IMAGE_SUFFIXES)})"
                )
            total = -(-len(files) // batch_size)
            count = min(total, num_batches) if num_batches else total
            return count, self._image_batches(files, batch_size, count, targets)
        return (num_batches or 0), self._text_batches(batch_size, num_batches, targets, fixed_width)

    def _text_batches(
        self, batch_size: int, num_batches: int | None, targets: bool, fixed_width: bool
    ) -> Iterator[dict[str, np.ndarray]]:
        encode = TextEncoder(self.recipe, self.section, self.what, fixed_width)
        if self.section.windows:
            yield from self._window_batches(encode, batch_size, num_batches)
            return
        text_key = self.section.text or "text"
        rows: list[dict[str, Any]] = []
        done = 0
        for row in table_rows(self.path, self.what):
            rows.append(row)
            if len(rows) == batch_size:
                yield self._text_batch(encode, rows, text_key, targets)
                rows, done = [], done + 1
                if num_batches and done >= num_batches:
                    return
        if rows:
            yield self._text_batch(encode, rows, text_key, targets)
        elif done == 0:
            raise DataError(f"{self.what}.data: {self.path} holds no examples")

    def _window_batches(
        self, encode: TextEncoder, batch_size: int, num_batches: int | None
    ) -> Iterator[dict[str, np.ndarray]]:
        """The texts' tokens, one after another, cut into windows of max_length; the last, shorter one dropped."""
        width, tokens, windows, done = encode.max_length, [], [], 0
        for row in table_rows(self.path, self.what):
            tokens += encode.ids(_column(row, self.section.text or "text", "text", self.what, self.path))
            while len(tokens) >= width:
                windows.append(tokens[:width])
                tokens = tokens[width:]
            while len(windows) >= batch_size:
                yield encode.windows(windows[:batch_size])
                windows, done = windows[batch_size:], done + 1
                if num_batches and done >= num_batches:
                    return
        if windows:
            yield encode.windows(windows)
        elif done == 0:
            raise DataError(
                f"{self.what}.data: {self.path} holds fewer than max_length ({width}) tokens: not one window",
                "lower max_length or add text",
            )

    def _text_batch(
        self, encode: TextEncoder, rows: list[dict[str, Any]], text_key: str, targets: bool
    ) -> dict[str, np.ndarray]:
        texts = [_column(r, text_key, "text", self.what, self.path) for r in rows]
        pairs = None
        if self.section.text_pair is not None:
            pairs = [_column(r, self.section.text_pair, "text_pair", self.what, self.path) for r in rows]
        batch, encoding = encode(texts, pairs)
        if targets:
            values = [_column(r, self.section.targets, "targets", self.what, self.path) for r in rows]
            width = next(iter(batch.values())).shape[1]
            batch[TARGET_COLUMN] = (
                self.labels.tokens(values, encoding, width)
                if self.task == "token-classification"
                else self.labels.sequence(values)
            )
        return batch

    def _image_batches(
        self, files: list[Path], batch_size: int, count: int, targets: bool
    ) -> Iterator[dict[str, np.ndarray]]:
        Image = extras.require("PIL.Image", f"{self.what}.data: reading images", DataError)
        encode = ImageEncoder(self.recipe, self.what)
        classes = kinds.class_folders(self.path)
        index = self.labels.folders(classes, self.recipe.model.source) if targets else {}
        if targets and not classes:
            raise DataError(
                f"{self.what}.data: {self.path} has no class subfolders to take targets from",
                "put each class's images in a subfolder named after it",
            )
        for start in range(0, count * batch_size, batch_size):
            images, labels = [], []
            for path in files[start : start + batch_size]:
                try:
                    with Image.open(path) as img:
                        images.append(img.convert("RGB"))
                except Exception as exc:
                    raise DataError(f"{self.what}.data: cannot read image {path}: {type(exc).__name__}: {exc}") from exc
                if targets:
                    folder = path.relative_to(self.path).parts[0]
                    if folder not in index:
                        raise DataError(f"{self.what}.data: image {path} is not in a class subfolder")
                    labels.append(index[folder])
            batch = encode(images)
            if targets:
                batch[TARGET_COLUMN] = np.asarray(labels, dtype=np.int64)
            yield batch

    # -- indexed (training) -------------------------------------------------------------
    def dataset(self) -> Dataset:
        """All samples preprocessed once into memory-mapped arrays under `<cache>/<hash>` (reused)."""
        if self.cache is None:
            raise ValueError("FileReader.dataset needs a cache folder")
        folder = self.cache / self._cache_key(self.targets)[:24]
        if not (folder / "complete").is_file():
            self._write_cache(folder)
        columns = {path.stem: np.load(path, mmap_mode="r") for path in sorted(folder.glob("*.npy"))}
        length = len(next(iter(columns.values())))
        check_batch({k: v for k, v in columns.items() if k != TARGET_COLUMN}, self.recipe.inputs, self.what)
        return Dataset(columns, length, self.recipe.inputs, self.what)

    def _cache_key(self, targets: bool) -> str:
        from quantcli.artifacts import sha256_path

        settings = {
            "data": sha256_path(self.path),
            "section": self.section.model_dump(mode="json", exclude={"data"}),
            "inputs": [i.model_dump(mode="json") for i in self.recipe.inputs],
            "targets": targets,
            "model": _preprocessing_identity(self.recipe),
            "quantcli": __version__,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def _write_cache(self, folder: Path) -> None:
        """Stream batches into chunk files, join them into one .npy per column; rename into place."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            chunks: dict[str, list[Path]] = {}
            _, batches = self.iter_batches(256, None, fixed_width=True)
            for number, batch in enumerate(batches):
                for name, array in batch.items():
                    chunks.setdefault(name, []).append(tmp / f"{name}.{number}.part.npy")
                    np.save(chunks[name][-1], array)
            for name, parts in chunks.items():
                _join(parts, tmp / f"{name}.npy")
            (tmp / "complete").write_text("")
            try:
                tmp.rename(folder)
            except OSError:  # another process (a torchrun rank) made it first: same key, same arrays
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _join(parts: list[Path], out: Path) -> None:
    """Concatenate .npy chunks into one file through a memory map (memory stays bounded by a chunk)."""
    arrays = [np.load(p, mmap_mode="r") for p in parts]
    total = sum(len(a) for a in arrays)
    joined = np.lib.format.open_memmap(out, mode="w+", dtype=arrays[0].dtype, shape=(total, *arrays[0].shape[1:]))
    start = 0
    for part, array in zip(parts, arrays):
        joined[start : start + len(array)] = array
        start += len(array)
        part.unlink()
    joined.flush()
    del joined


def _preprocessing_identity(recipe: Recipe) -> Any:
    """What decides the preprocessing besides the data: a zoo model's recorded transforms, or the
    folder's tokenizer/processor files (weights excluded: they do not change the arrays)."""
    if recipe.model.source != "huggingface":
        return recipe.model.image.model_dump(mode="json") if recipe.model.image else None
    from quantcli.artifacts import sha256_file

    folder = Path(recipe.model.huggingface)
    weights = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx")
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(weights)
    }


def reader(
    recipe: Recipe, what: str, section: DataSource | None = None, *, targets: bool = False, cache: Path | None = None
) -> FileReader | None:
    """A FileReader when the section's data is text, a table or an image folder; None for arrays/callables.

    `targets`: batches carry the targets under TARGET_COLUMN; `cache`: where training's arrays are kept.
    """
    section = section if section is not None else getattr(recipe, what)
    if section is None:
        return None
    kind = kinds.by_name(section.data)
    if kind == "folder" and Path(section.data).is_dir():
        kind = kinds.of_folder(Path(section.data))
        if kind == "images" and recipe.model.source == "factory" and not kinds.image_files(Path(section.data)):
            return None  # an empty folder: the .npy folder's error says what is missing
    if kind not in ("text", "table", "images"):
        return None
    if recipe.model.source == "factory":
        raise DataError(
            f"{what}.data: {section.data} holds {'images' if kind == 'images' else 'text'}; files are "
            "preprocessed the model's way, which a factory model does not tell",
            "use a huggingface, torchvision or timm model, or give .npz/.npy arrays",
        )
    return FileReader(recipe, section, what, kind, targets, cache)
