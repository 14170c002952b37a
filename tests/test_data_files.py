"""Data as files, preprocessed the model's way: text and table formats, labels, class folders, the cache."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from quantcli.errors import DataError
from quantcli.loading.data import TARGET_COLUMN
from quantcli.loading.files import reader
from quantcli.numerics.metrics import IGNORE
from quantcli.recipe import Recipe
from tests import byo
from tests.conftest import session_dir

TEXT_INPUTS = [
    {"name": n, "shape": [1, 16], "dtype": "int64", "dynamic_axes": {0: "batch", 1: "seq"}}
    for n in ("input_ids", "token_type_ids", "attention_mask")
]


@pytest.fixture(scope="session")
def hf(tmp_path_factory, worker_id):
    return byo.folders(session_dir(tmp_path_factory, worker_id))


def recipe(hf, folder="cls", task="text-classification", inputs=TEXT_INPUTS, **evaluation) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"huggingface": str(hf / folder), "task": task},
            "inputs": inputs,
            "evaluation": {"batch_size": 5, "max_length": 16, **evaluation},
        }
    )


def batches(r: Recipe, targets=True, **kw):
    files = reader(r, "evaluation", targets=targets, **kw)
    assert files is not None
    count, it = files.iter_batches(r.evaluation.batch_size, None)
    return count, list(it)


def test_every_text_format_gives_the_same_batches(hf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf / "cls")
    expected = tok(byo.WORDS, max_length=16, padding="max_length", truncation=True, return_tensors="np")
    _, txt = batches(recipe(hf, data=str(hf / "text" / "sentences.txt"), metric="cosine"), targets=False)
    got = {k: np.concatenate([b[k] for b in txt]) for k in txt[0]}
    assert [len(b["input_ids"]) for b in txt] == [5, 5, 5, 1]  # 16 sentences; the blank line is no example
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        assert got[name].dtype == np.int64 and np.array_equal(got[name], expected[name])
    for kind in ("jsonl", "csv", "tsv", "parquet"):
        _, table = batches(recipe(hf, data=str(hf / "text" / f"labelled.{kind}"), text="sentence", targets="label"))
        assert all(np.array_equal(a[k], b[k]) for a, b in zip(txt, table) for k in a), kind
        targets = np.concatenate([b[TARGET_COLUMN] for b in table])
        assert targets.tolist() == byo.SENTIMENT, kind  # "positive"/"negative" through the model's label2id


def test_integer_targets_pass_and_unknown_labels_are_named(hf, tmp_path):
    (tmp_path / "ints.csv").write_text("text,label\ngood,1\nbad,0\n")
    _, got = batches(recipe(hf, data=str(tmp_path / "ints.csv"), targets="label"))
    assert got[0][TARGET_COLUMN].tolist() == [1, 0]
    (tmp_path / "odd.csv").write_text("text,label\ngood,positive\nbad,neutral\n")
    with pytest.raises(
        DataError,
        match=r"evaluation.targets: label 'neutral' is not one of the model's labels "
        r"\(negative, positive\)",
    ):
        batches(recipe(hf, data=str(tmp_path / "odd.csv"), targets="label"))


def test_a_missing_column_names_the_key(hf):
    with pytest.raises(
        DataError, match=r"evaluation.text: no column 'text' in labelled.csv; it has \['sentence', 'label'\]"
    ):
        batches(recipe(hf, data=str(hf / "text" / "labelled.csv"), targets="label"))


def test_token_labels_go_to_each_word_s_first_sub_token(hf):
    from transformers import AutoTokenizer

    r = recipe(
        hf,
        "tok",
        "token-classification",
        data=str(hf / "text" / "tags.jsonl"),
        text="tokens",
        targets="tags",
        metric="token_accuracy",
        max_length=40,
    )
    _, got = batches(r)
    tok = AutoTokenizer.from_pretrained(hf / "tok")
    rows = [row for b in got for row in zip(b["input_ids"], b[TARGET_COLUMN])]
    assert len(rows) == len(byo.WORDS)
    split = 0
    for (ids, labels), text in zip(rows, byo.WORDS):
        words = text.split()
        labelled = labels[labels != IGNORE]
        assert labelled.tolist() == [
            byo.TAGS.index("B-THING") if w in ("film", "book", "meal", "hotel") else 0 for w in words
        ]
        assert labels[0] == IGNORE  # [CLS]
        pieces = tok.convert_ids_to_tokens(ids)
        for position in np.flatnonzero(labels != IGNORE):
            assert not pieces[position].startswith("##")  # a word's first piece
        split += sum(p.startswith("##") for p in pieces)
    assert split > 0  # some words are split into several pieces, whose later pieces stay unlabelled


def test_class_folders_become_the_model_s_label_indices(hf, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(hf / "images", images)
    inputs = [{"name": "pixel_values", "shape": [1, 3, 64, 64]}]
    r = recipe(hf, "resnet", "image-classification", inputs, data=str(images))
    count, got = batches(r)
    assert count == 3 and np.concatenate([b[TARGET_COLUMN] for b in got]).tolist() == [0] * 6 + [1] * 6
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(hf / "resnet")
    first = [Image.open(p).convert("RGB") for p in sorted((images / "cat").iterdir())[:5]]
    assert np.array_equal(got[0]["pixel_values"], processor(images=first, return_tensors="np")["pixel_values"])
    (images / "dog").rename(images / "wolf")
    with pytest.raises(
        DataError, match=r"class folders \['wolf'\] are not labels of the model \(its id2label: cat, dog\)"
    ):
        batches(r)


def test_training_cache_is_hashed_memory_mapped_and_reused(hf, tmp_path):
    r = Recipe.model_validate(
        {
            "model": {"huggingface": str(hf / "cls"), "task": "text-classification"},
            "inputs": TEXT_INPUTS,
            "training": {
                "data": str(hf / "text" / "labelled.csv"),
                "text": "sentence",
                "targets": "label",
                "max_length": 16,
                "padding": "longest",
            },
        }
    )
    data = reader(r, "training", targets=True, cache=tmp_path / "cache").dataset()
    assert data.length == 16 and isinstance(data.columns["input_ids"], np.memmap)
    assert data.columns["input_ids"].shape == (16, 16)  # fixed width in the cache, whatever the padding
    assert data.columns[TARGET_COLUMN].tolist() == byo.SENTIMENT
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and (folders[0] / "complete").is_file()
    stamp = (folders[0] / "input_ids.npy").stat().st_mtime_ns
    again = reader(r, "training", targets=True, cache=tmp_path / "cache").dataset()
    assert (folders[0] / "input_ids.npy").stat().st_mtime_ns == stamp and again.length == 16
    longer = r.model_copy(update={"training": r.training.model_copy(update={"max_length": 24})})
    reader(longer, "training", targets=True, cache=tmp_path / "cache").dataset()
    assert len(list((tmp_path / "cache").iterdir())) == 2
    picked = data.take(np.array([3, 1]))
    assert picked[TARGET_COLUMN].tolist() == [byo.SENTIMENT[1], byo.SENTIMENT[3]]
