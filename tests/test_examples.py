"""The bring-your-own-model examples under configs/, end to end through the real CLI, offline.

Each runs `quantcli run` in its own process with HOME pointing at an empty folder and the hub
offline (HF_HUB_OFFLINE=1): nothing may be downloaded and nothing written to ~/.cache. The
torchvision and timm examples import those packages from .venv/zoo with the registration stub
(tests/zoo_site). Each example's ONNX inputs are listed here (names, dtypes, dynamic axes), and the
int8 metric in its export report is held against chance and against fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import yaml
from filelock import FileLock

from quantcli.recipe import load
from tests.byo import ROOT, zoo_env
from tests.conftest import cli_env, quantcli, session_dir
from tests.tolerances import EXAMPLE_METRIC, QUANTIZATION, TARGET

pytestmark = pytest.mark.slow

CONFIGS = ROOT / "configs"
TEXT_INPUTS = [
    ("input_ids", "int64", ["batch", "seq"]),
    ("token_type_ids", "int64", ["batch", "seq"]),
    ("attention_mask", "int64", ["batch", "seq"]),
]
IMAGE_INPUTS = [("pixel_values", "float32", ["batch", 3, 64, 64])]
# recipe -> (ONNX inputs, output, metric, zoo); the metric's floors depend on the target: tests/tolerances.py
EXAMPLES = {
    "sentiment/recipe.yaml": (TEXT_INPUTS, "logits", "accuracy", False),
    "embedding/recipe.yaml": (TEXT_INPUTS, "sentence_embedding", "cosine", False),
    "photos/hf.yaml": (IMAGE_INPUTS, "logits", "accuracy", False),
    "photos/torchvision.yaml": (IMAGE_INPUTS, "logits", "accuracy", True),
    "photos/timm.yaml": (IMAGE_INPUTS, "logits", "accuracy", True),
}


def for_target(name: str, folder: Path) -> Path:
    """configs/<name> built for tests/tolerances.py's target (its paths made absolute by the loader), in `folder`."""
    recipe = load(CONFIGS / name)
    recipe = recipe.model_copy(update={"quantization": recipe.quantization.model_copy(update=QUANTIZATION)})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / Path(name).name
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return path


def run_example(shared: Path, name: str) -> tuple[Path, Path]:
    """`quantcli run` on configs/<name> once per session: (work folder, the HOME it ran with)."""
    slug = name.replace("/", "-").removesuffix(".yaml")
    work, home = shared / f"example-{slug}", shared / f"example-{slug}-home"
    with FileLock(str(shared / f"example-{slug}.lock")):
        if not (work / "run.json").exists():
            home.mkdir(exist_ok=True)
            extra = {"HOME": str(home), "HF_HUB_OFFLINE": "1"}
            env = zoo_env(**extra) if EXAMPLES[name][-1] else cli_env(**extra)
            recipe = for_target(name, shared / f"example-{slug}-recipe")
            run = quantcli("run", "--recipe", recipe, "-o", work, "--json", env=env)
            assert run.rc == 0, run.stderr
            (work / "run.json").write_text(json.dumps({"stderr": run.stderr}))
    return work, home


@pytest.fixture(scope="session")
def shared(tmp_path_factory, worker_id):
    return session_dir(tmp_path_factory, worker_id)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_offline_and_keeps_its_metric(shared, name):
    inputs, output, metric, _ = EXAMPLES[name]
    floor, drop = EXAMPLE_METRIC[name]
    work, home = run_example(shared, name)
    assert list(home.iterdir()) == []  # nothing written under HOME (no ~/.cache)
    report = json.loads((work / "model.report.json").read_text())
    assert report["u8s8"]["target_cpu"] == TARGET and report["u8s8"]["saturable_pairs"] == 0, report["u8s8"]
    evaluation = report["evaluation"]
    assert evaluation["metric"] == metric
    assert evaluation["int8_onnx"] >= floor, evaluation
    assert evaluation["int8_onnx"] >= evaluation["fp32_torch"] - drop, evaluation
    model = onnx.load(str(work / "model.onnx"))
    listed = [
        (
            i.name,
            onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name,
            [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim],
        )
        for i in model.graph.input
    ]
    assert listed == inputs
    assert [o.name for o in model.graph.output] == [output]
    stderr = json.loads((work / "run.json").read_text())["stderr"].splitlines()
    # quantcli's closing lines and notes only: no progress bars, no transformers or datasets messages
    stages = ("captured", "prepared", "calibrated", "converted", "exported")
    assert all(line.startswith(("note: ", *(f"{s}: wrote " for s in stages))) for line in stderr), stderr


def test_sentence_embedding_example_says_its_pooling(shared):
    work, _ = run_example(shared, "embedding/recipe.yaml")
    stderr = json.loads((work / "run.json").read_text())["stderr"]
    assert (
        "note: model.huggingface: the embedding is mean pooling over the attention mask, L2-normalized "
        "(modules.json and 1_Pooling/config.json)" in stderr
    )
    manifest = json.loads((work / "captured" / "manifest.json").read_text())
    assert manifest["recipe"]["inputs"][0]["shape"] == [1, 64]  # the recipe's max_length


def test_zoo_examples_record_their_preprocessing(shared):
    for name, interpolation in (("photos/torchvision.yaml", "bilinear"), ("photos/timm.yaml", "bicubic")):
        work, _ = run_example(shared, name)
        image = json.loads((work / "captured" / "manifest.json").read_text())["recipe"]["model"]["image"]
        assert image == {
            "size": 64,
            "resize": 72,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "interpolation": interpolation,
        }, name
