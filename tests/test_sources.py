"""Models by source: Hugging Face folders by task (in-process capture), registries, recorded inputs, merge.

Each capture runs the real transformers model through torch.export; its output is checked against
the same computation written out here from the transformers model itself.
"""

from __future__ import annotations

import json
import logging

import pytest

from quantcli import recipe as recipes
from quantcli import stages
from quantcli.errors import ArtifactError, DataError
from quantcli.numerics.metrics import METRICS, fits
from quantcli.sources.build import BUILDERS
from quantcli.sources.names import SOURCES, TASKS
from tests import byo
from tests.conftest import session_dir


@pytest.fixture(scope="session")
def hf(tmp_path_factory, worker_id):
    return byo.folders(session_dir(tmp_path_factory, worker_id))


def test_registries_agree():
    assert tuple(BUILDERS) == SOURCES
    for name, task in TASKS.items():
        assert task.default_metric in METRICS and fits(task.default_metric, name)
    assert not fits("accuracy", "feature-extraction") and fits("cosine", "feature-extraction")
    assert fits("token_accuracy", "token-classification") and not fits("accuracy", "token-classification")


def capture(tmp_path, hf, model, data="text/sentences.txt", **calibration):
    """Capture in this process; (the captured manifest, the loaded program)."""
    from quantcli import _torch

    recipe = {
        "model": {k: str(hf / v) if k == "huggingface" else v for k, v in model.items()},
        "calibration": {"data": str(hf / data), "batch_size": 4, **calibration},
    }
    result = stages.capture.run(byo.write_recipe(tmp_path, recipe), tmp_path / "captured")
    return result.manifest, _torch.load_program(tmp_path / "captured" / "program.pt2")


def tokenized(folder, texts, length=16):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return {
        k: v
        for k, v in tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").items()
    }


def run_program(program, manifest, enc):
    import torch

    with torch.no_grad():
        return program.module()(*[enc[name] for name in manifest["io"]["inputs"]])


def test_sentence_transformers_folder_pooling_and_recorded_inputs(tmp_path, hf, caplog):
    import torch
    from transformers import BertModel

    with caplog.at_level(logging.WARNING, "quantcli"):
        manifest, program = capture(tmp_path, hf, {"huggingface": "st", "task": "feature-extraction"}, max_length=16)
    assert "mean pooling over the attention mask, L2-normalized (modules.json and 1_Pooling/config.json)" in caplog.text
    inputs = manifest["recipe"]["inputs"]
    assert [(i["name"], i["dtype"], i["shape"], i["dynamic_axes"]) for i in inputs] == [
        (n, "int64", [1, 16], {"0": "batch", "1": "seq"}) for n in ("input_ids", "token_type_ids", "attention_mask")
    ]
    assert manifest["io"]["outputs"] == ["sentence_embedding"]
    # the pooling, written out from the transformers model: mean over the mask, then L2 normalization
    enc = tokenized(hf / "st", ["a truly great meal", "the film"], 12)  # another length: seq is dynamic
    with torch.no_grad():
        hidden = BertModel.from_pretrained(hf / "st").eval()(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    got = run_program(program, manifest, enc)
    assert got.shape == (2, 64) and torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got[1], torch.nn.functional.normalize(hidden[1].mean(0), dim=0), atol=1e-3)


@pytest.mark.slow
def test_plain_folder_means_mean_pooling_and_says_so(tmp_path, hf, caplog):
    with caplog.at_level(logging.WARNING, "quantcli"):
        manifest, _ = capture(tmp_path, hf, {"huggingface": "plain", "task": "feature-extraction"})
    assert "no modules.json: mean pooling by default" in caplog.text
    assert manifest["source"]["embedding"].startswith("mean pooling over the attention mask (no modules.json")
    assert manifest["recipe"]["inputs"][0]["shape"] == [1, 128]  # the default max_length


def test_cls_pooling_from_the_recipe(tmp_path, hf):
    import torch
    from transformers import BertModel

    manifest, program = capture(
        tmp_path,
        hf,
        {"huggingface": "st", "task": "feature-extraction", "pooling": "cls", "normalize": False},
        max_length=16,
    )
    enc = tokenized(hf / "st", ["an excellent album", "the book was not bad"])
    with torch.no_grad():
        expected = BertModel.from_pretrained(hf / "st").eval()(**enc).last_hidden_state[:, 0]
    assert torch.allclose(run_program(program, manifest, enc), expected, atol=1e-5)


def test_classifier_logits_and_no_unused_outputs(tmp_path, hf):
    import torch
    from transformers import BertForSequenceClassification

    manifest, program = capture(tmp_path, hf, {"huggingface": "cls", "task": "text-classification"}, max_length=16)
    assert manifest["io"]["outputs"] == ["logits"]
    assert len([n for n in program.graph.nodes if n.op == "output"][0].args[0]) == 1  # only the task's tensor
    enc = tokenized(hf / "cls", byo.WORDS[:3])
    with torch.no_grad():
        expected = BertForSequenceClassification.from_pretrained(hf / "cls").eval()(**enc).logits
    assert torch.allclose(run_program(program, manifest, enc), expected, atol=1e-5)


def test_decoder_logits_without_cache_and_pad_token_note(tmp_path, hf, caplog):
    import torch
    from transformers import GPT2LMHeadModel

    with caplog.at_level(logging.WARNING, "quantcli"):
        manifest, program = capture(tmp_path, hf, {"huggingface": "gpt2", "task": "text-generation"}, max_length=16)
    assert "the tokenizer has no pad token; padding with its end-of-sequence token" in caplog.text
    assert [i["name"] for i in manifest["recipe"]["inputs"]] == ["input_ids", "attention_mask"]
    assert not any("past_key" in str(n.target) for n in program.graph.nodes)
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = GPT2LMHeadModel.from_pretrained(hf / "gpt2").eval()(input_ids=ids, attention_mask=mask).logits
        got = program.module()(ids, mask)
    assert got.shape == (2, 9, expected.shape[-1]) and torch.allclose(got, expected, atol=1e-4)


def test_decoder_last_hidden_state(tmp_path, hf):
    manifest, program = capture(
        tmp_path, hf, {"huggingface": "gpt2", "task": "feature-extraction", "pooling": "none"}, max_length=16
    )
    assert manifest["io"]["outputs"] == ["last_hidden_state"]
    out = [n for n in program.graph.nodes if n.op == "output"][0].args[0][0].meta["val"]
    assert out.shape[-1] == 64 and len(out.shape) == 3


def test_image_classifier_inputs_from_the_processor(tmp_path, hf):
    manifest, _ = capture(tmp_path, hf, {"huggingface": "resnet", "task": "image-classification"}, data="images")
    assert manifest["recipe"]["inputs"] == [
        {"name": "pixel_values", "shape": [1, 3, 64, 64], "dtype": "float32", "dynamic_axes": {"0": "batch"}}
    ]
    assert manifest["io"]["outputs"] == ["logits"]


def test_explicit_inputs_win(tmp_path, hf):
    inputs = [
        {"name": "input_ids", "shape": [2, 8], "dtype": "int64", "dynamic_axes": {0: "batch"}},
        {"name": "attention_mask", "shape": [2, 8], "dtype": "int64", "dynamic_axes": {0: "batch"}},
    ]
    recipe = {
        "model": {"huggingface": str(hf / "cls"), "task": "text-classification"},
        "inputs": inputs,
        "calibration": {"data": str(hf / "text" / "sentences.txt"), "batch_size": 4, "max_length": 8},
    }
    result = stages.capture.run(byo.write_recipe(tmp_path, recipe), tmp_path / "captured")
    assert [i["name"] for i in result.manifest["recipe"]["inputs"]] == ["input_ids", "attention_mask"]
    assert result.manifest["io"]["inputs"] == ["input_ids", "attention_mask"]


def test_later_recipe_without_inputs_means_as_resolved(tmp_path, hf):
    recipe = {
        "model": {"huggingface": str(hf / "cls"), "task": "text-classification"},
        "calibration": {"data": str(hf / "text" / "sentences.txt"), "batch_size": 4, "max_length": 16},
    }
    path = byo.write_recipe(tmp_path, recipe)
    stages.capture.run(path, tmp_path / "captured")
    prepared = stages.prepare.run(tmp_path / "captured", tmp_path / "prepared", recipe_path=path)
    assert prepared.manifest["recipe"]["inputs"][0]["shape"] == [1, 16]
    # the same recipe with explicit, different inputs changes a section fixed at capture
    changed = dict(recipe, inputs=[{"name": "input_ids", "shape": [1, 16], "dtype": "int64"}])
    with pytest.raises(ArtifactError, match="changes inputs"):
        stages.prepare.run(
            tmp_path / "captured",
            tmp_path / "prepared2",
            recipe_path=byo.write_recipe(tmp_path, changed, "changed.yaml"),
        )


@pytest.mark.slow
def test_model_folder_files_enter_the_capture_key(tmp_path, hf):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(hf / "cls", folder)
    recipe = {
        "model": {"huggingface": str(folder), "task": "text-classification"},
        "calibration": {"data": str(hf / "text" / "sentences.txt"), "batch_size": 4, "max_length": 16},
    }
    path = byo.write_recipe(tmp_path, recipe)
    first = stages.capture.run(path, tmp_path / "captured")
    assert stages.capture.run(path, tmp_path / "captured").reused
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "bad", "1": "good"}
    config["label2id"] = {"bad": 0, "good": 1}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="other inputs|another key|different"):
        stages.capture.run(path, tmp_path / "captured")
    assert (
        first.manifest["data"]["model.huggingface"]
        != stages.capture.run(path, tmp_path / "captured2").manifest["data"]["model.huggingface"]
    )


def test_text_data_for_an_image_model_is_a_data_error(tmp_path, hf):
    from quantcli.loading.files import reader

    recipe = recipes.Recipe.model_validate(
        {
            "model": {"huggingface": str(hf / "resnet"), "task": "image-classification"},
            "inputs": [{"name": "pixel_values", "shape": [1, 3, 64, 64]}],
            "calibration": {"data": str(hf / "images" / "cat")},
        }
    )
    assert reader(recipe, "calibration") is not None
    recipe = recipe.model_copy(
        update={
            "model": recipe.model.model_copy(update={"huggingface": str(hf / "cls"), "task": "text-classification"})
        }
    )
    with pytest.raises(DataError, match="holds images, but the huggingface model"):
        reader(recipe, "calibration")


def test_missing_task_weights_are_named(hf, caplog):
    from quantcli.recipe import ModelSection
    from quantcli.sources import huggingface

    section = ModelSection(huggingface=str(hf / "plain"), task="text-classification", kwargs={"num_labels": 3})
    with caplog.at_level(logging.WARNING, "quantcli"):
        model = huggingface.load(section)
    assert model.config.num_labels == 3 and not model.training  # kwargs reach from_pretrained
    assert (
        f"are not in {hf / 'plain'} and were initialized at random for text-classification (classifier.bias"
        in caplog.text
    )


def test_a_model_that_specializes_the_sequence_is_captured_with_it_static(caplog):
    import torch

    from quantcli.sources.base import Built
    from quantcli.stages.capture import _capture

    class Positions(torch.nn.Module):
        """Slices a fixed-size buffer by the sequence length, as BERT's position ids do."""

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)
            self.register_buffer("pos", torch.arange(32).unsqueeze(0))

        def forward(self, input_ids):
            return self.emb(input_ids) + self.pos[:, : input_ids.shape[1]].unsqueeze(-1)

    spec = {"name": "input_ids", "shape": [1, 16], "dtype": "int64", "dynamic_axes": {0: "batch", 1: "seq"}}
    dynamic = recipes.Recipe.model_validate({"model": {"factory": "m.py:build"}, "inputs": [spec]})
    static = recipes.Recipe.model_validate(
        {"model": {"factory": "m.py:build"}, "inputs": [dict(spec, dynamic_axes={0: "batch"})]}
    )
    with caplog.at_level(logging.WARNING, "quantcli"):
        program, _, used = _capture(Built(Positions().eval(), dynamic, static))
    assert used is static
    assert "the sequence axis is static (16 tokens): torch.export cannot keep it dynamic for this model" in caplog.text
    shape = [n for n in program.graph.nodes if n.op == "placeholder"][-1].meta["val"].shape
    assert shape[1] == 16 and not isinstance(shape[0], int)


@pytest.mark.parametrize("mode", ["cls", "lasttoken"])
def test_first_and_last_token_poolings_follow_the_mask_with_a_left_padding_tokenizer(tmp_path, mode):
    """A tokenizer that pads on the left (as decoder tokenizers often do): `cls` is the first token the mask
    keeps and `lasttoken` the last, not position 0 or the mask's length - 1."""
    import torch
    from transformers import AutoTokenizer, BertModel

    from quantcli import _torch
    from tests import hf_folders
    from tests.conftest import cli

    folder = hf_folders.bert_folder(tmp_path / "left", byo.WORDS)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    (tmp_path / "sentences.txt").write_text("\n".join(byo.WORDS) + "\n")
    recipe = byo.write_recipe(
        tmp_path,
        {
            "model": {"huggingface": str(folder), "task": "feature-extraction", "pooling": mode, "normalize": False},
            "calibration": {"data": str(tmp_path / "sentences.txt"), "batch_size": 4, "max_length": 16},
        },
    )
    run = cli("capture", "--recipe", recipe, "-o", tmp_path / "captured")
    assert run.rc == 0, run.stderr
    texts = ["the film", "the book was not bad at all"]
    enc = dict(AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt"))
    assert enc["attention_mask"][0, 0] == 0  # padded on the left
    with torch.no_grad():
        hidden = BertModel.from_pretrained(folder).eval()(**enc).last_hidden_state
    real = [row.nonzero().flatten() for row in enc["attention_mask"]]
    index = [int(r[0] if mode == "cls" else r[-1]) for r in real]
    expected = hidden[torch.arange(2), torch.tensor(index)]
    manifest = json.loads((tmp_path / "captured" / "manifest.json").read_text())
    got = run_program(_torch.load_program(tmp_path / "captured" / "program.pt2"), manifest, enc)
    assert torch.allclose(got, expected, atol=1e-5)
