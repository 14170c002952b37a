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
from tests.tolerances import ZOO_SQNR_DB

# name -> integer kernels ORT runs. The SQNR floors, which depend on the target: tests/tolerances.py.
EXPECTED: dict[str, int] = {
    "tv_resnet": 13,
    "tv_mobilenet_v2": 14,
    "tv_mobilenet_v3": 21,
    "tv_efficientnet": 22,
    "tv_regnet": 19,
    "tv_shufflenet": 21,
    "tv_convnext": 22,
    "tv_vit": 14,
    "tv_swin": 27,
    "timm_tf_efficientnet_lite0": 50,
    "timm_tf_mobilenetv3": 54,
    "timm_resnet10t": 15,
    "hf_bert": 16,
    "hf_distilbert": 16,
    "hf_roberta": 16,
    "hf_gpt2": 13,  # 8 of its 13 are Conv1D's addmm, QGemm
    "hf_t5_encoder": 16,
    "hf_vit": 17,
    "hf_whisper_encoder": 18,
    "hf_wav2vec2": 21,
}


def test_expected_covers_the_zoo():
    assert set(EXPECTED) == set(zoo.ZOO) == set(ZOO_SQNR_DB)


def assert_result(name: str, result: dict) -> None:
    integer, (floor, raw_floor) = EXPECTED[name], ZOO_SQNR_DB[name]
    assert result["rc"] == 0, result.get("traceback", result["error"])
    assert result["saturable_pairs"] == 0, result  # built for avx2: no int16 pair sum can saturate
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
