"""What `validate` checks inside a recipe's model folder and data files, without torch or `datasets`.

A Hugging Face folder holds a config (and a tokenizer or image processor for its task, and a
readable sentence-transformers pooling); a table has the columns the recipe names (its header read
with the standard library; a Parquet file's schema with pyarrow, imported only then); an image folder
holds images, and class subfolders where targets come from them, named after the model's labels.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from quantcli import extras
from quantcli.errors import QuantCliError
from quantcli.loading import kinds
from quantcli.numerics.names import METRICS
from quantcli.recipe import DataSource, ModelSection, Recipe
from quantcli.sources import hf_folder
from quantcli.sources.names import TASKS

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
SECTIONS = ("calibration", "training", "evaluation")  # the sections holding data


def problems(recipe: Recipe) -> list[str]:
    """Every problem found, each naming its key path (paths already resolved against the recipe's folder)."""
    found = _model_problems(recipe.model) if recipe.model.huggingface else []
    for name in SECTIONS:
        section = getattr(recipe, name)
        if section is not None:
            found += _data_problems(recipe, name, section)
    return found


def extra_problems(recipe: Recipe) -> list[str]:
    """The optional packages the recipe needs that are not installed, each with the install that provides
    it (found with importlib.util.find_spec: nothing is imported)."""
    model, needs = recipe.model, []
    if model.huggingface:
        needs.append(("transformers", "model.huggingface"))
        if model.task and TASKS[model.task].modality == "image":
            needs.append(("PIL", f"model.huggingface ({model.task})"))
    for name in SECTIONS:
        section = getattr(recipe, name)
        if section is None:
            continue
        path, kind = Path(section.data), kinds.by_name(section.data)
        if kind in ("text", "table"):
            needs.append(("datasets", f"{name}.data ({path.name})"))
            if path.suffix.lower() == ".parquet":
                needs.append(("pyarrow", f"{name}.data ({path.name})"))
        elif kind == "folder" and path.is_dir() and kinds.of_folder(path) == "images":
            needs.append(("PIL", f"{name}.data (an image folder)"))
    return [problem for module, what in needs if (problem := extras.problem(module, what))]


def _model_problems(model: ModelSection) -> list[str]:
    folder = Path(model.huggingface)
    if not folder.is_dir():
        return [f"model.huggingface: {folder} is not a folder"]
    try:
        hf_folder.config(folder)
        if model.task == "feature-extraction":
            hf_folder.pooling(folder, model.pooling, model.normalize)
    except QuantCliError as exc:
        return [exc.line()]
    inner = hf_folder.transformer_dir(folder)
    wanted = TOKENIZER_FILES if TASKS[model.task].modality == "text" else PROCESSOR_FILES
    if not any((inner / name).is_file() for name in wanted):
        what = "tokenizer" if wanted is TOKENIZER_FILES else "image processor"
        return [f"model.huggingface: {inner} holds no {what} files ({', '.join(wanted[:2])}, ...) for {model.task}"]
    return []


def columns(path: Path) -> list[str] | None:
    """The column names of a table file (None when its header cannot be told without reading it all)."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ","), [])
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with open(path, encoding="utf-8") as fh:
        first = next((line for line in fh if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return None  # a JSON array over several lines
    return list(row) if isinstance(row, dict) else None


def _wants_targets(name: str, section: DataSource) -> bool:
    if name == "training":
        return True
    return name == "evaluation" and METRICS[section.metric].needs_targets


def _data_problems(recipe: Recipe, name: str, section: DataSource) -> list[str]:
    path = Path(section.data)
    kind = kinds.by_name(section.data)
    targets = getattr(section, "targets", None) if _wants_targets(name, section) else None
    if kind == "text" and targets is not None:
        return [
            f"{name}.targets: {path.name} is one example a line and has no columns; "
            "put texts and targets in a .jsonl/.csv/.parquet file"
        ]
    if kind == "table" and path.is_file():
        return _column_problems(name, section, path, targets)
    modality = TASKS[recipe.model.task].modality if recipe.model.task else None
    if kind == "folder" and path.is_dir() and modality == "image":
        return _image_problems(recipe, name, path, _wants_targets(name, section) and targets is None)
    return []


def _column_problems(name: str, section: DataSource, path: Path, targets: str | None) -> list[str]:
    try:
        header = columns(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [f"{name}.data: cannot read the header of {path}: {exc}"]
    if header is None:
        return []
    wanted = [("text", section.text or "text"), ("text_pair", section.text_pair), ("targets", targets)]
    return [
        f"{name}.{key}: no column {column!r} in {path.name}; it has {header}"
        for key, column in wanted
        if column is not None and column not in header
    ]


def _image_problems(recipe: Recipe, name: str, path: Path, from_folders: bool) -> list[str]:
    if not kinds.image_files(path):
        return [f"{name}.data: {path} holds no image files ({', '.join(kinds.IMAGE_SUFFIXES)})"]
    if not from_folders:
        return []
    classes = kinds.class_folders(path)
    if not classes:
        return [f"{name}.data: {path} has no class subfolders to take targets from"]
    if recipe.model.huggingface:
        try:
            labels = hf_folder.labels(Path(recipe.model.huggingface))
        except QuantCliError:
            return []  # reported with the model
        unknown = [c for c in classes if c not in labels]
        if unknown:
            return [
                f"{name}.data: class folders {unknown} are not labels of the model "
                f"(its id2label: {', '.join(sorted(labels)) or 'none'})"
            ]
    return []
