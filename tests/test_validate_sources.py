"""`quantcli validate` on the new recipe sections: one test per kind of mistake, and no torch imported.

Runs in-process through the console script's `main`, as tests/test_validate_fuzz.py does; the test
on imports starts a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.byo import ROOT, write_texts
from tests.hf_folders import sentence_transformers_files
from tests.test_validate_fuzz import validate

CONFIGS = ROOT / "configs"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A model folder made of JSON files only (validate never loads weights) and data files."""
    root = tmp_path_factory.mktemp("validate")
    model = root / "model"
    model.mkdir()
    labels = {"id2label": {"0": "negative", "1": "positive"}, "label2id": {"negative": 0, "positive": 1}}
    (model / "config.json").write_text(json.dumps({"model_type": "bert", **labels}))
    (model / "tokenizer.json").write_text("{}")
    images = root / "model-images"
    images.mkdir()
    (images / "config.json").write_text(json.dumps({"model_type": "resnet", "id2label": {"0": "cat", "1": "dog"}}))
    (images / "preprocessor_config.json").write_text("{}")
    data = write_texts(root / "data")
    for label in ("cat", "dog"):
        (root / "photos" / label).mkdir(parents=True)
        (root / "photos" / label / "a.jpg").write_bytes(b"\xff\xd8\xff")  # validate reads names, not pixels
    (root / "empty").mkdir()
    return root, data


def check(tmp_path, recipe, code, *fragments):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    rc, out, err = validate(path)
    assert rc == code, err
    line = err.strip()
    assert len(err.splitlines()) == 1 and line.startswith("error: "), err
    for fragment in fragments:
        assert fragment in line, line
    return line


def text_recipe(root, files_, **evaluation):
    recipe = {
        "model": {"huggingface": str(root / "model"), "task": "text-classification"},
        "calibration": {"data": str(files_["txt"])},
    }
    if evaluation:
        recipe["evaluation"] = evaluation
    return recipe


def test_a_good_recipe_passes(files, tmp_path):
    root, data = files
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(text_recipe(root, data, data=str(data["csv"]), text="sentence", targets="label")))
    rc, out, err = validate(path)
    assert rc == 0, err


def test_unknown_task_has_a_did_you_mean(files, tmp_path):
    root, data = files
    recipe = text_recipe(root, data)
    recipe["model"]["task"] = "text-clasification"
    check(tmp_path, recipe, 2, "model.task: unknown task 'text-clasification'; did you mean 'text-classification'?")


def test_misspelled_new_keys_have_a_did_you_mean(files, tmp_path):
    root, data = files
    recipe = text_recipe(root, data)
    recipe["model"]["hugingface"] = recipe["model"].pop("huggingface")
    recipe["calibration"]["max_lenght"] = 64
    check(
        tmp_path,
        recipe,
        2,
        "model.hugingface: unknown key; did you mean 'huggingface'?",
        "calibration.max_lenght: unknown key; did you mean 'max_length'?",
    )


def test_a_metric_the_task_cannot_have(files, tmp_path):
    root, data = files
    recipe = text_recipe(root, data, data=str(data["txt"]), metric="accuracy")
    recipe["model"]["task"] = "feature-extraction"
    check(tmp_path, recipe, 2, "evaluation.metric: accuracy does not fit task feature-extraction; valid: cosine")


def test_an_unknown_metric(files, tmp_path):
    root, data = files
    check(
        tmp_path,
        text_recipe(root, data, data=str(data["csv"]), text="sentence", targets="label", metric="acc"),
        2,
        "evaluation.metric: unknown metric 'acc'",
    )


def test_accuracy_without_targets(files, tmp_path):
    root, data = files
    check(
        tmp_path,
        text_recipe(root, data, data=str(data["csv"]), text="sentence"),
        2,
        "evaluation.targets: missing; accuracy needs targets",
    )


def test_two_sources_and_a_misplaced_weights_key(files, tmp_path):
    root, data = files
    recipe = text_recipe(root, data)
    recipe["model"]["torchvision"] = "resnet18"
    check(
        tmp_path,
        recipe,
        2,
        "model: set exactly one of factory, huggingface, torchvision, timm (got huggingface, torchvision)",
    )
    check(
        tmp_path,
        {"model": {"timm": "resnet10t", "weights": "w.pt"}, "calibration": {"data": str(root / "photos")}},
        2,
        "model: weights: does not apply to a timm model; timm takes checkpoint:",
    )


def test_inputs_are_required_with_a_factory(tmp_path):
    check(
        tmp_path,
        {"model": {"factory": "m.py:build"}, "calibration": {"data": "d.npz"}},
        2,
        "inputs: required with a model factory",
    )


def test_text_column_keys_need_a_table(files, tmp_path):
    root, data = files
    recipe = text_recipe(root, data)
    recipe["calibration"]["text"] = "sentence"
    check(
        tmp_path,
        recipe,
        2,
        "calibration: text/text_pair: name columns of a .jsonl/.csv/.tsv/.parquet file; "
        "a .txt file holds one example a line",
    )


def test_text_data_for_an_image_task(files, tmp_path):
    root, data = files
    recipe = {
        "model": {"huggingface": str(root / "model-images"), "task": "image-classification"},
        "calibration": {"data": str(data["txt"])},
    }
    check(tmp_path, recipe, 2, "calibration.data: ", "is text, but a image-classification model takes images")


def test_the_model_folder_is_missing(files, tmp_path):
    root, data = files
    recipe = text_recipe(root, data)
    recipe["model"]["huggingface"] = str(root / "no-such-model")
    check(tmp_path, recipe, 3, f"model.huggingface: file not found: {root / 'no-such-model'}")


def test_the_model_folder_has_no_config(files, tmp_path):
    root, data = files
    recipe = text_recipe(root, data)
    recipe["model"]["huggingface"] = str(root / "empty")
    check(tmp_path, recipe, 3, f"model.huggingface: {root / 'empty'} holds no config.json")


def test_the_model_folder_has_no_tokenizer(files, tmp_path):
    root, data = files
    recipe = text_recipe(root, data)
    recipe["model"]["huggingface"] = str(root / "model-images")
    check(
        tmp_path,
        recipe,
        3,
        "holds no tokenizer files (tokenizer.json, tokenizer_config.json, ...) for text-classification",
    )


def test_a_sentence_transformers_pooling_quantcli_cannot_apply(files, tmp_path):
    root, data = files
    import shutil

    folder = tmp_path / "st"
    shutil.copytree(root / "model", folder)
    sentence_transformers_files(folder, pooling="weightedmean")
    recipe = {
        "model": {"huggingface": str(folder), "task": "feature-extraction"},
        "calibration": {"data": str(data["txt"])},
    }
    check(tmp_path, recipe, 3, "1_Pooling/config.json asks for pooling [None]", "set model.pooling")


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_a_column_not_in_the_header(files, tmp_path, kind):
    root, data = files
    check(
        tmp_path,
        text_recipe(root, data, data=str(data[kind]), text="text", targets="labels"),
        3,
        f"evaluation.text: no column 'text' in labelled.{kind}; it has ['sentence', 'label']",
        f"evaluation.targets: no column 'labels' in labelled.{kind}",
    )


def test_targets_for_a_txt_file(files, tmp_path):
    root, data = files
    check(
        tmp_path,
        text_recipe(root, data, data=str(data["txt"]), targets="label"),
        3,
        "evaluation.targets: sentences.txt is one example a line and has no columns",
    )


def test_an_empty_image_folder(files, tmp_path):
    root, data = files
    recipe = {
        "model": {"huggingface": str(root / "model-images"), "task": "image-classification"},
        "calibration": {"data": str(root / "empty")},
    }
    check(tmp_path, recipe, 3, f"calibration.data: {root / 'empty'} holds no image files")


def test_class_folders_that_are_not_the_model_s_labels(files, tmp_path):
    root, data = files
    recipe = {
        "model": {"huggingface": str(root / "model"), "task": "image-classification"},
        "calibration": {"data": str(root / "photos")},
        "evaluation": {"data": str(root / "photos")},
    }
    recipe["model"]["huggingface"] = str(root / "model-images")
    (root / "model-images" / "config.json").write_text(json.dumps({"id2label": {"0": "cat", "1": "wolf"}}))
    try:
        check(
            tmp_path,
            recipe,
            3,
            "evaluation.data: class folders ['dog'] are not labels of the model (its id2label: cat, wolf)",
        )
    finally:
        (root / "model-images" / "config.json").write_text(json.dumps({"id2label": {"0": "cat", "1": "dog"}}))


def test_every_bring_your_own_example_validates():
    recipes = sorted(p for name in ("sentiment", "embedding", "photos") for p in (CONFIGS / name).glob("*.yaml"))
    assert len(recipes) == 5
    for path in recipes:
        rc, out, err = validate(path)
        assert rc == 0, (path, err)


IMPORTS = """
import sys
from quantcli.cli import main
try:
    main(["validate", sys.argv[1], "--quiet"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print(sorted(m for m in ("torch", "transformers", "datasets", "pyarrow", "PIL") if m in sys.modules))
"""


def test_validate_imports_no_torch_datasets_or_pyarrow(files, tmp_path):
    root, data = files
    imported = {}
    for kind in ("csv", "parquet"):
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(text_recipe(root, data, data=str(data[kind]), text="sentence", targets="label")))
        proc = subprocess.run([sys.executable, "-c", IMPORTS, str(path)], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        imported[kind] = proc.stdout.strip().splitlines()[-1]
    assert imported == {"csv": "[]", "parquet": "['pyarrow']"}  # pyarrow only to read a Parquet schema
