"""Shared helpers for the bring-your-own-model tests: tiny Hugging Face folders and text files, once per session.

Folders are written with save_pretrained (tests/hf_folders.py) into a folder every pytest-xdist worker
shares, under a file lock, so that each exists once per session.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from tests import hf_folders

ROOT = Path(__file__).resolve().parents[1]
ZOO_PATH = [ROOT / "tests" / "zoo_site", ROOT / ".venv" / "zoo"]
WORDS = [
    "the film was good",
    "the book was not bad",
    "a truly great meal",
    "the service was awful",
    "our hotel room was quite nice",
    "the plot is dull but the acting is fine",
    "what a boring show",
    "the concert felt wonderful",
    "lovely staff and tasty food",
    "the trip turned out terrible",
    "an excellent album",
    "the museum seemed rather tedious",
    "unbelievably charming sequel",
    "the lecture was never engaging",
    "fantastic soundtrack",
    "mediocre interview",
]
LABELS = ["negative", "positive"]
SENTIMENT = [1, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0]
TAGS = ["O", "B-THING", "I-THING"]


def zoo_env(**extra: str) -> dict[str, str]:
    """A CLI environment that imports torchvision and timm from .venv/zoo with the registration stub."""
    from tests.conftest import cli_env

    paths = [str(p) for p in ZOO_PATH] + [str(ROOT)]
    return cli_env(PYTHONPATH=os.pathsep.join(paths), **extra)


def write_recipe(folder: Path, recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_texts(folder: Path) -> dict[str, Path]:
    """The same labelled sentences as .txt, .jsonl, .csv, .tsv and .parquet (+ token-tagged .jsonl)."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"sentence": t, "label": LABELS[y]} for t, y in zip(WORDS, SENTIMENT)]
    paths = {
        "txt": folder / "sentences.txt",
        "jsonl": folder / "labelled.jsonl",
        "csv": folder / "labelled.csv",
        "tsv": folder / "labelled.tsv",
        "parquet": folder / "labelled.parquet",
        "tokens": folder / "tags.jsonl",
    }
    paths["txt"].write_text("".join(f"{t}\n" for t in WORDS) + "\n")  # a blank line is not an example
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    for kind, delimiter in (("csv", ","), ("tsv", "\t")):
        with open(paths[kind], "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["sentence", "label"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    pd.DataFrame(rows).to_parquet(paths["parquet"])
    with open(paths["tokens"], "w") as fh:
        for text in WORDS:
            words = text.split()
            tags = ["B-THING" if w in ("film", "book", "meal", "hotel") else "O" for w in words]
            fh.write(json.dumps({"tokens": words, "tags": tags}) + "\n")
    return paths


def _make(root: Path) -> None:
    texts = WORDS * 4
    hf_folders.sentence_transformers_files(hf_folders.bert_folder(root / "st", texts), pooling="mean", normalize=True)
    hf_folders.bert_folder(root / "plain", texts, seed=1)
    hf_folders.bert_folder(root / "cls", texts, "text-classification", labels=LABELS, seed=2)
    hf_folders.bert_folder(root / "tok", texts, "token-classification", labels=TAGS, seed=3, vocab_size=90)
    hf_folders.gpt2_folder(root / "gpt2", texts)
    hf_folders.resnet_folder(root / "resnet", ["cat", "dog"])
    write_texts(root / "text")
    hf_folders.write_images(root / "images" / "cat", 6, seed=1)
    hf_folders.write_images(root / "images" / "dog", 6, seed=2)
    (root / "complete").write_text("")


def folders(shared: Path) -> Path:
    """The session's tiny model folders and data (made once, under a lock)."""
    root = shared / "byo-folders"
    with FileLock(str(shared / "byo-folders.lock")):
        if not (root / "complete").exists():
            _make(root)
    return root
