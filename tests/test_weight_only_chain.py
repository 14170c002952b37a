"""Weight-only decoders through `quantcli run`, in this process (tests/test_cli_contract.py covers the process):
Llama (tied embeddings, a K the block does not divide, weights the exporter leaves behind a Transpose) with
int4 RTN, GPTQ and AWQ, Qwen2 (biased q/k/v) and GPT-2 (Conv1D, weights stored [K, N]). Every quantized
linear runs as MatMulNBits in ONNX Runtime and every embedding as GatherBlockQuantized, the linear weights
shrink 6x, GPTQ and AWQ have less error than RTN on a batch calibration did not read."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from quantcli.onnx import fusion
from tests.conftest import assert_fails, cli
from tests.decoders import INT4, evaluation, run

pytestmark = pytest.mark.slow

# GPT-2's runs here are about its Conv1D linears; its cache export (a third of a run) is tests/test_genai.py's
NO_CACHE = {"kv_cache": False}


@pytest.fixture(scope="module")
def llama(decoder_folders, llama_rtn, tmp_path_factory):
    """The Llama chain with each method (GPTQ and AWQ reuse the session's RTN capture): method -> (report, model)."""
    root = tmp_path_factory.mktemp("llama")
    found = {"rtn": llama_rtn}
    for method in ("gptq", "awq"):
        shutil.copytree(llama_rtn[1].parent / "captured", root / method / "captured")
        quantization = {"weights": {**INT4, "method": method}}
        report = run(decoder_folders, "llama", root / method, quantization, evaluation=evaluation(decoder_folders))
        found[method] = (report, root / method / "model.onnx")
    return found


def test_every_llama_linear_runs_as_matmul_nbits_and_the_weights_shrink_6x(llama):
    for method, (report, _) in llama.items():
        # 2 layers x 7 linears + the LM head; the embedding reads the head's codes (tied), as GatherBlockQuantized
        assert report["weight_only"]["layers"] == 15 and report["weight_only"]["embeddings"] == 1, method
        # q, k and v one MatMulNBits, gate and up one (AWQ's share one input scale, folded into the norm before)
        assert report["kernels"]["weight_only"] == {
            "matmul_nbits": 9,
            "gather_block_quantized": 1,
            "float_linears": [],
        }, method
        assert report["parity"]["passed"], method
        sizes = report["weight_only"]["linear_weight_bytes"]
        assert sizes["float32"] / sizes["stored"] > 6.0  # 6.4: 4 bits a weight and a float32 scale per 32
        assert report["weight_only"]["embedding_bytes"]["stored"] == 0  # one table in the file, the head's
    model = onnx.load(str(llama["rtn"][1]))
    stored = sum(
        len(t.raw_data) for t in model.graph.initializer if t.name.endswith(("weight_packed", "weight_scales"))
    )
    # the decoder only ORT runs: each linear written as the MatMulNBits ORT would fuse, no DequantizeLinear
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 9 and ops.count("GatherBlockQuantized") == 1 and ops.count("Split") == 2
    assert not {"Gather", "DequantizeLinear", "MatMul"} & set(ops)
    linears = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 32 for n in linears)
    packed = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8}
    assert all(packed[n.input[1]].dims[-1] == 16 for n in linears)  # 32 codes of 4 bits a block
    shapes = [(a["N"], -(-a["K"] // 32), a["K"]) for a in ({a.name: a.i for a in n.attribute} for n in linears)]
    assert stored == sum(n * blocks * (16 + 4) for n, blocks, _ in shapes)  # codes and a float32 scale a block
    padding = sum(n * (blocks * 32 - k) // 2 for n, blocks, k in shapes)  # a short last block's, in packed rows
    assert stored - padding == llama["rtn"][0]["weight_only"]["linear_weight_bytes"]["stored"]
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    # no float table or weight left: the scales, and the rotary embedding's cos and sin the attention reads
    assert all(t.name.endswith(("_scale", "_scales")) or t.name in ("rotary_cos", "rotary_sin") for t in floats)
    line = assert_fails(cli("report", llama["rtn"][1].parent / "converted"), 2, "is weight-only")
    assert "model.report.json" in line  # where the weight-only model's figures are
    optimized = fusion.optimized_graph(llama["rtn"][1])
    fused = [n for n in optimized.node if n.op_type == "MatMulNBits"]
    assert {dict((a.name, a.i) for a in n.attribute)["K"] for n in fused} == {64, 176}  # 176 = 5.5 blocks of 32


def test_awqs_input_scales_fold_into_the_norms_and_q_k_v_stay_packed(llama):
    records = json.loads((llama["awq"][1].parent / "converted" / "manifest.json").read_text())["weight_only"]
    scaling = {r["module"].removeprefix("model.model."): r.get("input_scale") for r in records}
    for i in (0, 1):
        for name, norm in (("self_attn.q_proj", "input_layernorm"), ("mlp.up_proj", "post_attention_layernorm")):
            assert scaling[f"layers.{i}.{name}"] == {"folded_into": [f"model.model.layers.{i}.{norm}.weight"]}
        assert scaling[f"layers.{i}.self_attn.o_proj"] is None  # the attention's output: nothing to fold into
        assert scaling[f"layers.{i}.mlp.down_proj"] == {"folded_into": [f"model.model.layers.{i}.mlp.up_proj.weight"]}
    assert scaling["model.lm_head"] == {"folded_into": ["model.model.norm.weight"]}
    # the decoder traced anew computes the converted program's logits: measured 37.1 dB; 22.0 where its tied
    # table's rows (the head's W * s) were not divided by the head's scale, which parity's 6 dB excess allowed
    assert llama["awq"][0]["parity"]["per_output"]["logits"]["ort_vs_int8_db"] > 30
    model = onnx.load(str(llama["awq"][1]))
    producer = {out: n for n in model.graph.node for out in n.output}
    constants = {t.name for t in model.graph.initializer}
    for attention in [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]:
        assert attention.input[1] == attention.input[2] == ""  # q, k and v packed in one
        qkv = producer[attention.input[0]]
        assert qkv.op_type == "MatMulNBits"
        assert producer[qkv.input[0]].op_type in ("Mul", "SkipSimplifiedLayerNormalization")
    divided = [n for n in model.graph.node if n.op_type == "Div" and n.input[1] in constants]
    # the tied table's rows (the head's W * s) alone: no Div in front of any linear
    assert [producer[n.input[0]].op_type for n in divided] == ["GatherBlockQuantized"]


def test_the_weights_take_no_more_bytes_than_the_onnxruntime_genai_builders(decoder_folders, llama, tmp_path):
    """The builder's int4 (block 32, embeddings and LM head as one int4 table) on the same Llama folder."""
    pytest.importorskip("onnxruntime_genai")
    import subprocess
    import sys

    builder = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(decoder_folders / "llama")]
    builder += ["-o", str(tmp_path / "genai"), "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")]
    subprocess.run(builder, check=True, capture_output=True)
    theirs = onnx.load(str(tmp_path / "genai" / "model.onnx"))
    ours = onnx.load(str(llama["rtn"][1]))
    weight_bytes = {
        name: sum(len(t.raw_data) for t in m.graph.initializer) for name, m in (("theirs", theirs), ("ours", ours))
    }
    # measured: ours 76,040 (8,192 the rotary tables), theirs 77,792 (its padded blocks; the graphs differ besides)
    assert weight_bytes["ours"] <= weight_bytes["theirs"], weight_bytes
    assert [n.op_type for n in theirs.graph.node].count("GatherBlockQuantized") == 1


def test_gptq_and_awq_have_less_error_than_rtn_on_a_batch_they_did_not_see(llama, decoder_folders, tmp_path):
    sqnr = {method: report["sqnr_vs_float_db"]["logits"] for method, (report, _) in llama.items()}
    assert llama["gptq"][0]["parity"]["data"] == "evaluation batch 0"
    # measured: rtn 12.1, gptq 12.4, awq 15.2 dB; GPTQ's lead is small: the table it shares with the head holds
    # GPTQ's codes, which trade the rows' own error for the head's output error (with a table of its own, below)
    assert sqnr["awq"] > sqnr["rtn"] + 1, sqnr
    own_table = [{"names": ["*embed_tokens"], "weights": {**INT4, "method": "rtn"}}]  # a table of its own
    shutil.copytree(llama["rtn"][1].parent / "captured", tmp_path / "gptq" / "captured")
    quantization = {"weights": {**INT4, "method": "gptq"}, "overrides": own_table}
    report = run(decoder_folders, "llama", tmp_path / "gptq", quantization)
    assert report["weight_only"]["embedding_bytes"]["stored"] > 0
    assert report["sqnr_vs_float_db"]["logits"] > sqnr["rtn"] + 1, sqnr  # measured 13.7 dB


def test_perplexity_on_token_windows_of_held_out_text(llama):
    evaluations = {method: report["evaluation"] for method, (report, _) in llama.items()}
    for method, ev in evaluations.items():
        assert ev["metric"] == "perplexity" and ev["tokens"]["fp32_torch"] > 500, method
        assert ev["fp32_onnx"] == pytest.approx(ev["fp32_torch"], rel=1e-3)
        assert ev["drop"] == pytest.approx(ev["int8_onnx"] - ev["fp32_torch"], abs=1e-4)  # a rise, in perplexity
    # measured (fp32 244.93): rtn 246.32, gptq 245.63, awq 244.88
    assert (
        evaluations["gptq"]["drop"] < evaluations["rtn"]["drop"]
        and evaluations["awq"]["drop"] < evaluations["rtn"]["drop"]
    )


def test_qwen2_with_biased_projections_an_int8_head_and_excluded_layers(decoder_folders, tmp_path):
    overrides = [{"names": ["*lm_head"], "weights": {"dtype": "int8"}}]  # per channel
    quantization = {"weights": {**INT4, "method": "rtn"}, "overrides": overrides, "exclude_names": ["*mlp.down_proj"]}
    report = run(decoder_folders, "qwen2", tmp_path / "work", quantization)
    left = report["kernels"]["weight_only"]["float_linears"]
    assert sorted(n["module"] for n in left) == [f"model.model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    # 15 less the two excluded: each layer's q, k and v one call (their biases added after), gate and up one
    assert report["kernels"]["weight_only"]["matmul_nbits"] == 7
    assert report["kernels"]["weight_only"]["gather_block_quantized"] == 1
    assert report["parity"]["passed"]
    optimized = fusion.optimized_graph(tmp_path / "work" / "model.onnx")
    bits = sorted(
        dict((a.name, a.i) for a in n.attribute)["bits"] for n in optimized.node if n.op_type == "MatMulNBits"
    )
    assert bits == [4] * 6 + [8]  # the int8 head per channel


def test_gpt2_conv1d_layers_stored_k_by_n_run_as_matmul_nbits(decoder_folders, tmp_path):
    """GPT-2's Conv1D (addmm of a weight stored [K, N]): quantized as the linears they are, GPTQ's Hessians
    collected on their inputs; the token table shared with the tied head, the position table its own."""
    reports = {}
    for method in ("rtn", "gptq"):  # AWQ's folding into a LayerNorm behind a Conv1D: test_weight_only_graph
        if method != "rtn":
            shutil.copytree(tmp_path / "rtn" / "captured", tmp_path / method / "captured")
        reports[method] = run(
            decoder_folders, "gpt2", tmp_path / method, {"weights": {**INT4, "method": method}}, export=NO_CACHE
        )
    for method, report in reports.items():
        # 2 layers x 4 Conv1D + the LM head; wte (tied to the head) and wpe
        assert report["weight_only"]["layers"] == 9 and report["weight_only"]["embeddings"] == 2, method
        assert report["kernels"]["weight_only"] == {
            "matmul_nbits": 9,
            "gather_block_quantized": 2,
            "float_linears": [],
        }, method
        assert report["parity"]["passed"], method
    records = json.loads((tmp_path / "gptq" / "converted" / "manifest.json").read_text())["weight_only"]
    assert [r["shape"] for r in records if r["module"].endswith("mlp.c_fc")] == [[256, 64]] * 2  # [N, K]
    sqnr = {method: report["sqnr_vs_float_db"]["logits"] for method, report in reports.items()}
    assert sqnr["gptq"] > sqnr["rtn"], sqnr  # measured: rtn 17.4, gptq 19.1 dB
