"""Decoders with a key/value cache through `quantcli run`, run by onnxruntime-genai from the folder export writes.

Llama and Qwen2 (grouped-query attention: 4 heads, 2 key/value heads), random weights drawn wide enough
(initializer_range 0.2) that greedy decoding wanders over the vocabulary instead of repeating one token.
The fp32 export (every linear excluded) generates PyTorch's greedy tokens exactly through og.Generator,
which loads the folder with no quantcli code; the int4 export keeps every linear MatMulNBits and
generates too (the session's Llama int4 RTN run of tests/decoders.py, which test_weight_only_chain.py reads
too); the cache path's perplexity equals the whole sequence's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from quantcli import recipe as recipes
from quantcli.onnx import decoder, runtime
from tests import byo, hf_folders
from tests.conftest import cli

TEXTS = [f"{a} and {b}" for a in byo.WORDS for b in byo.WORDS]
PROMPTS = ["apple and", "river but stone", "cold", "the light and the dark"]
NEW_TOKENS = 40
INT4 = {"weights": {"dtype": "int4", "block_size": 32, "symmetric": True, "method": "rtn"}}
FP32 = {**INT4, "exclude_names": ["*"]}  # weight-only with every linear excluded: the float decoder


def recipe(folders: Path, family: str, quantization: dict) -> dict:
    return {
        "model": {"huggingface": str(folders / family), "task": "text-generation"},
        "calibration": {"data": str(folders / "text.txt"), "windows": True, "max_length": 32, "batch_size": 4},
        "quantization": {"activations": "none", **quantization},
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    (root / "text.txt").write_text("\n".join(TEXTS) + "\n")
    for family in ("llama", "qwen2"):
        hf_folders.decoder_folder(root / family, TEXTS, family, initializer_range=0.2)
    return root


@pytest.fixture(scope="module")
def exports(folders, tmp_path_factory):
    """family -> the exported fp32 model.onnx."""
    root = tmp_path_factory.mktemp("exports")
    found = {}
    for family in ("llama", "qwen2"):
        work = root / f"{family}-fp32"
        path = byo.write_recipe(root, recipe(folders, family, FP32), f"{work.name}.yaml")
        result = cli("run", "--recipe", path, "-o", work)
        assert result.rc == 0, result.stderr
        found[family] = work / "model.onnx"
    return found


def greedy(folder: Path, prompt_ids: list[int]) -> list[int]:
    """onnxruntime-genai's greedy tokens after `prompt_ids`, from the folder alone."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    total = len(prompt_ids) + NEW_TOKENS
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt_ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt_ids) :]


def torch_greedy(hf_folder: Path, prompt_ids: list[int]) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fp32_decoder_generates_pytorch_greedy_tokens_through_onnxruntime_genai(folders, exports, family):
    from transformers import AutoTokenizer

    folder = exports[family].with_name("model.genai")
    tokenizer = AutoTokenizer.from_pretrained(folders / family)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        expected = torch_greedy(folders / family, ids)
        assert len(set(expected)) > 5, expected  # a sequence that wanders: a broken cache would show
        assert greedy(folder, ids) == expected, prompt


@pytest.mark.slow
def test_a_decoder_over_the_size_limit_runs_from_its_folder_with_the_data_file_linked(exports, tmp_path):
    """The limit at 0 bytes: model.onnx.data holds every tensor, the folder links it beside the model, and
    onnxruntime-genai generates the one-file model's tokens from the folder."""
    from quantcli import stages

    one_file = exports["llama"]
    out = tmp_path / "model.onnx"
    stages.export.run(one_file.parent / "converted", out, external_above=0)
    folder = out.with_name("model.genai")
    assert folder.joinpath("model.onnx.data").samefile(out.with_name("model.onnx.data"))
    assert folder.joinpath("model.onnx").stat().st_size < 100_000  # the graph only
    ids = [5, 17, 3]
    assert greedy(folder, ids) == greedy(one_file.with_name("model.genai"), ids)


@pytest.mark.slow
def test_a_gpt2_decoder_runs_as_onnxruntime_genais_generic_decoder(folders, tmp_path):
    """GPT-2 (absolute positions, LayerNorm, Conv1D, one key/value head a head): onnxruntime-genai's own gpt2
    type reads another cache layout, so the folder names the generic decoder; greedy tokens as PyTorch's."""
    import onnx
    from transformers import AutoTokenizer

    from quantcli import genai
    from quantcli.sources import huggingface

    hf_folders.gpt2_folder(tmp_path / "gpt2", TEXTS, initializer_range=0.2)
    model_recipe = recipes.Recipe.model_validate(
        {**recipe(folders, "llama", FP32), "model": {"huggingface": str(tmp_path / "gpt2"), "task": "text-generation"}}
    )
    model = huggingface.load(model_recipe.model)
    with huggingface.transformers():
        onnx.save(decoder.export(model, 21), str(tmp_path / "model.onnx"))
    folder = genai.write_folder(tmp_path / "model.onnx", model_recipe)
    assert json.loads((folder / "genai_config.json").read_text())["model"]["type"] == "decoder"
    ids = AutoTokenizer.from_pretrained(tmp_path / "gpt2")(PROMPTS[1])["input_ids"]
    expected = torch_greedy(tmp_path / "gpt2", ids)
    assert len(set(expected)) > 5 and greedy(folder, ids) == expected


@pytest.mark.slow
def test_the_decoder_has_onnxruntime_genai_inputs_outputs_and_grouped_query_heads(exports):
    path = exports["llama"]
    sess = runtime.session(path)
    inputs = {i.name: i for i in sess.get_inputs()}
    past = [f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")]
    # no position_ids: the fused attention computes positions from the cache's length (the builder's inputs)
    assert list(inputs) == ["input_ids", "attention_mask", *past]
    assert inputs["attention_mask"].shape == ["batch", "total_seq"]
    assert all(inputs[n].shape == ["batch", 2, "past_seq", 16] and inputs[n].type == "tensor(float)" for n in past)
    outputs = {o.name: o.shape for o in sess.get_outputs()}
    assert outputs["logits"][:2] == ["batch", "seq"]
    assert [n for n in outputs if n != "logits"] == [n.replace("past_key_values", "present") for n in past]
    assert outputs["present.0.key"] == ["batch", 2, "total_seq", 16]
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # each layer's attention one fused node (rotary inside), each residual Add one with the norm that reads it
    assert ops.count("GroupQueryAttention") == 2 and ops.count("SkipSimplifiedLayerNormalization") == 4
    assert not {"Softmax", "Concat", "Neg"} & set(ops), ops
    config = json.loads((path.with_name("model.genai") / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2 and config["model"]["type"] == "llama"
    # GroupQueryAttention writes the new tokens into the past's buffer: the runtime keeps one of the context length
    assert config["search"]["past_present_share_buffer"] is True
    # one model for prefill and decode: a batch of 2 through the cache, 5 tokens at once then one by one
    ids = np.random.default_rng(0).integers(0, 200, (2, 12))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    full = runtime.run(sess, batch)[0]
    np.testing.assert_allclose(decoder.stepwise_logits(sess, batch, 5), full, atol=1e-4)


@pytest.mark.slow
def test_int4_decoder_keeps_matmul_nbits_and_its_cache_perplexity_equals_the_whole_sequences(llama_rtn, exports):
    report, path = llama_rtn
    # 2 layers x (q/k/v packed, o, gate and up packed, down) + the LM head, whose codes the embedding reads
    assert report["kernels"]["weight_only"] == {"matmul_nbits": 9, "gather_block_quantized": 1, "float_linears": []}
    model = onnx.load(str(path))
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert [n.input[1:3] for n in gqa] == [["", ""]] * 2  # the packed projections: key and value inside
    assert report["parity"]["passed"]
    check = report["kv_cache"]
    assert check["steps"] >= 16
    assert check["perplexity"]["cache"] == pytest.approx(check["perplexity"]["full_sequence"], rel=1e-3)
    fp32 = json.loads(exports["llama"].with_name("model.report.json").read_text())["kv_cache"]
    assert fp32["perplexity"]["cache"] == pytest.approx(fp32["perplexity"]["full_sequence"], rel=1e-5)
    assert fp32["max_logit_diff"] < 1e-3
    from transformers import AutoTokenizer

    recorded = yaml.safe_load(path.parent.with_name(f"{path.parent.name}.yaml").read_text())
    ids = AutoTokenizer.from_pretrained(recorded["model"]["huggingface"])(PROMPTS[0])["input_ids"]
    tokens = greedy(path.with_name("model.genai"), ids)
    assert len(tokens) == NEW_TOKENS and len(set(tokens)) > 1


@pytest.mark.slow
def test_kv_cache_false_exports_the_full_sequence_model_and_no_folder(llama_rtn, tmp_path):
    work = llama_rtn[1].parent
    edited = yaml.safe_load(work.with_name(f"{work.name}.yaml").read_text())  # the recipe of the run
    edited.pop("evaluation")  # export takes evaluation from --recipe: none here
    path = byo.write_recipe(tmp_path, {**edited, "export": {"kv_cache": False}})
    result = cli("export", work / "converted", "-o", tmp_path / "full.onnx", "--recipe", path)
    assert result.rc == 0, result.stderr
    sess = runtime.session(tmp_path / "full.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.onnx", "full.report.json", "recipe.yaml"]


@pytest.mark.slow
def test_inspect_shows_the_folder_and_a_rerun_reuses_the_model_and_rewrites_a_missing_folder(folders, exports):
    path = exports["qwen2"]
    folder = path.with_name("model.genai")
    shown = cli("inspect", folder)
    assert shown.rc == 0, shown.stderr
    assert "qwen2 decoder model.onnx" in shown.stdout and "2 layers, hidden 64, 4 heads (2 key/value)" in shown.stdout
    doc = cli("inspect", folder, "--json").json()
    assert doc["genai"]["files"] == ["genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    model_shown = cli("inspect", path).stdout
    assert "key/value cache:" in model_shown and f"onnxruntime-genai folder: {folder}" in model_shown
    shutil.rmtree(folder)
    again = cli("run", "--recipe", path.parent.with_name(f"{path.parent.name}.yaml"), "-o", path.parent)
    assert again.rc == 0, again.stderr
    assert "exported: reused" in again.stderr
    assert folder.joinpath("model.onnx").samefile(path)


def test_a_key_value_cache_needs_float_activations_and_a_text_generation_model():
    base = {"model": {"huggingface": "folder", "task": "text-generation"}, "export": {"kv_cache": True}}
    with pytest.raises(ValueError, match="static int8 activations export the full-sequence model only"):
        recipes.Recipe.model_validate({**base, "calibration": {"data": "t.txt"}})
    with pytest.raises(ValueError, match="task text-generation"):
        recipes.Recipe.model_validate({**base, "model": {"huggingface": "folder", "task": "text-classification"}})
    weight_only = recipes.Recipe.model_validate({**base, "quantization": {"activations": "none", **INT4}})
    assert weight_only.export.kv_cache


def test_the_attention_check_allows_float_rounding_at_a_trained_models_scale():
    import torch

    logits = torch.linspace(-30, 30, 101)  # a trained model's logits reach tens; some lie near zero
    assert decoder.computes_the_same((logits,), (logits + 2e-4,))  # rounding: 7e-6 of the largest
    assert not decoder.computes_the_same((logits,), (logits + 1e-2,))
    assert not decoder.computes_the_same((logits,), (logits[:-1],))
