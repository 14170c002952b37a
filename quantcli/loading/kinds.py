"""What kind of data a recipe's `data:` names, from its name and (for folders) its entries, torch-free.

The schema judges keys against the kind by name alone (`text:` fits a table, not an .npz file);
`validate` and the loaders look inside folders. No datasets, pyarrow or torch here.
"""

from __future__ import annotations

import os
from pathlib import Path

TEXT_SUFFIXES = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}  # suffix -> Hugging Face datasets' packaged builder
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")  # files with named columns
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npz",)


def by_name(spec: str) -> str:
    """ "text", "table", "arrays", "callable" or "folder" (images or .npy files: `of_folder` tells)."""
    from quantcli.references import split_callable

    suffix = Path(spec).suffix.lower()
    if suffix == ".txt":
        return "text"
    if suffix in TABLE_SUFFIXES:
        return "table"
    if suffix in ARRAY_SUFFIXES:
        return "arrays"
    if split_callable(spec) is not None:
        return "callable"
    return "folder"


def is_file_data(spec: str) -> bool:
    """Text, tables or (possibly) an image folder: data quantcli preprocesses the model's way."""
    return by_name(spec) in ("text", "table")


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (class subfolders included), sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [Path(root) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return found


def class_folders(folder: Path) -> list[str]:
    """The subfolders holding images, sorted: ImageNet-style class names (empty for a flat folder)."""
    return sorted(
        d.name
        for d in folder.iterdir()
        if d.is_dir()
        and not d.name.startswith(".")
        and any(p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir() if p.is_file())
    )


def of_folder(folder: Path) -> str:
    """ "arrays" when the folder holds .npy files, else "images" (directly or in class subfolders)."""
    return "arrays" if any(p.suffix.lower() == ".npy" for p in folder.iterdir()) else "images"
