"""The ecosystem's models (tests/zoo.py) through `quantcli.pipeline.run` at default settings.

Each model must finish (exit 0), run every Conv/MatMul/Gemm of ORT's optimized graph as an integer
kernel, leave no float island but the allowed kinds (quantcli.onnx.fusion.ALLOWED: ops ORT has no
CPU integer kernel for, and Softmax), and keep an SQNR floor against fp32 a few dB under the value
measured on the reference machine. The torchvision and timm models run in one subprocess for the
whole session (they must not share a process with transformers, see tests/zoo_site), started in
the background as the session begins so that no worker waits for it; transformers models run
here, one test each.

For CNNs with random weights the SQNR floor applies to the raw output, and to its input-dependent
part (the output minus its batch mean) where that part is more than 0.1 % of the output's energy:
below that it is float rounding (FIELD-NOTES: random-weight CNN outputs hardly depend on the input).
"""

from __future__ import annotations

import pytest

from tests import zoo

# name -> (integer kernels ORT runs, SQNR floor ORT vs fp32 in dB (for CNNs: of the input-dependent
# part, None where that part is below 0.1 % of the output), raw-output floor (CNNs) or None).
# Measured values are in the comments.
EXPECTED: dict[str, tuple[int, float | None, float | None]] = {
    "tv_resnet": (13, 12, 31),  # 16.5 (input-dependent share 1.2 %), raw 34.6
    "tv_mobilenet_v2": (14, None, 35),  # raw 38.9
    "tv_mobilenet_v3": (21, None, 28),  # raw 31.7
    "tv_efficientnet": (22, None, 37),  # raw 40.9
    "tv_regnet": (19, 10, 35),  # 14.0 (share 0.16 %), raw 39.2
    "tv_shufflenet": (21, None, 45),  # raw 48.9
    "tv_convnext": (22, 25, 25),  # 28.8 (share 96 %), raw 28.4
    "tv_vit": (14, 26, None),  # 29.6
    "tv_swin": (27, 23, None),  # 26.1
    "timm_tf_efficientnet_lite0": (50, 5, 26),  # 8.8 (share 0.63 %), raw 29.4
    "timm_tf_mobilenetv3": (54, None, 27),  # raw 30.5
    "timm_resnet10t": (15, 7, 34),  # 11.3 (share 0.12 %), raw 37.3
    "hf_bert": (16, 45, None),  # 48.4
    "hf_distilbert": (16, 39, None),  # 42.0
    "hf_roberta": (16, 44, None),  # 47.9
    "hf_gpt2": (13, 33, None),  # 36.7 (8 of its 13 are Conv1D's addmm, QGemm)
    "hf_t5_encoder": (16, 34, None),  # 37.6
    "hf_vit": (17, 33, None),  # 36.1
    "hf_whisper_encoder": (18, 29, None),  # 32.9
    "hf_wav2vec2": (21, 26, None),  # 29.3 (the weight-normed positional conv included)
}

def test_expected_covers_the_zoo():
    assert set(EXPECTED) == set(zoo.ZOO)


def assert_result(name: str, result: dict) -> None:
    integer, floor, raw_floor = EXPECTED[name]
    assert result["rc"] == 0, result.get("traceback", result["error"])
    coverage = result["coverage"]
    assert coverage["integer"] == coverage["total"] == integer, coverage
    assert result["warning"] is None
    defects = [(i["op_type"], i["module"], i["torch_op"]) for i in result["islands"] if not i["allowed"]]
    assert not defects, defects
    if floor is None:  # nothing input-dependent to measure: the output is the same for every input
        assert result["share"] < 1e-3, result
    else:
        assert result["ort_vs_fp32_db"] >= floor, result
    if raw_floor is not None:
        assert result["ort_vs_fp32_raw_db"] >= raw_floor, result


# ------------------------------------------------------------------ torchvision and timm
@pytest.fixture(scope="session")
def vision_results() -> dict:
    """tests/zoo.py's runner over the selected vision models: started in the background when the
    session selected these tests (conftest), read here once it has finished."""
    results = zoo.vision_results()
    if "failed" in results:
        pytest.fail(results["failed"])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.VISION)
def test_vision_model(name, vision_results):
    assert_result(name, vision_results[name])


# ------------------------------------------------------------------ transformers
@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.TRANSFORMERS)
def test_transformers_model(name, tmp_path):
    """pipeline.run goes stage by stage through the files each stage writes, as separate processes do:
    BertModel's pooler nobody reads, T5's tied embedding and GPT-2's tied LM head must survive it."""
    assert_result(name, zoo.run(name, tmp_path / name))

