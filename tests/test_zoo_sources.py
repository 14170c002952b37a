"""torchvision and timm sources, and a broken torchvision: these need the process boundary.

torchvision and timm live in .venv/zoo, importable only with the registration stub (tests/zoo_site);
without the stub that torchvision is exactly the broken install users meet (a CUDA build beside the
CPU torch), so the error for it is tested on the real package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest

from tests.byo import ROOT, zoo_env
from tests.conftest import assert_fails, cli_env, quantcli

CONFIGS = ROOT / "configs"


def test_a_broken_torchvision_is_named_with_its_fix(tmp_path):
    env = cli_env(PYTHONPATH=os.pathsep.join([str(ROOT / ".venv" / "zoo"), str(ROOT)]))  # no stub: broken
    run = quantcli("capture", "--recipe", CONFIGS / "photos" / "torchvision.yaml", "-o", tmp_path / "c", env=env)
    torch_version = metadata.version("torch")
    assert_fails(
        run,
        3,
        f"model.torchvision: torchvision 0.28.0 does not work with torch {torch_version}: "
        "RuntimeError: operator torchvision::nms does not exist",
        "install torchvision 0.28 built for this torch (the CPU wheel, from the same package index as torch)",
        "or pip uninstall torchvision",
    )
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_hugging_face_text_model_needs_no_torchvision(tmp_path):
    env = cli_env(PYTHONPATH=os.pathsep.join([str(ROOT / ".venv" / "zoo"), str(ROOT)]))  # the broken one is there
    run = quantcli("capture", "--recipe", CONFIGS / "sentiment" / "recipe.yaml", "-o", tmp_path / "c", env=env)
    assert run.rc == 0, run.stderr


CHECKS = r"""
import json, sys
import numpy as np
from PIL import Image
import timm, timm.data, torchvision
from quantcli.errors import ModelError, RecipeError
from quantcli.loading.preprocess import transform
from quantcli.recipe import ImageOptions, Recipe
from quantcli.sources import zoo

out = {}
image = Image.open(sys.argv[1]).convert("RGB").resize((97, 75))
preset = torchvision.models.get_model_weights("resnet18").DEFAULT.transforms()
ours = transform(image, zoo.image_options(zoo._tv_defaults("resnet18", None), None))
out["torchvision"] = float(np.abs(preset(image).numpy() - ours).max())
model = timm.create_model("test_efficientnet")
theirs = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
ours = transform(image, zoo.image_options(zoo._timm_defaults("test_efficientnet", model), None))
out["timm"] = float(np.abs(theirs(image).numpy() - ours).max())
out["timm_options"] = zoo._timm_defaults("test_efficientnet", model).model_dump()
scaled = zoo.image_options(zoo._tv_defaults("resnet18", None), ImageOptions(size=112))
out["scaled"] = [scaled.size, scaled.resize]

def error(model):
    recipe = Recipe.model_validate({"model": model, "calibration": {"data": sys.argv[2]}})
    try:
        zoo.build(recipe, zoo.TORCHVISION if "torchvision" in model else zoo.TIMM)
    except (ModelError, RecipeError) as exc:
        return [type(exc).__name__, exc.exit_code, exc.line()]

out["unknown"] = error({"torchvision": "resnet81"})
out["mismatch"] = error({"torchvision": "mobilenet_v3_small", "weights": sys.argv[3], "kwargs": {"num_classes": 6}})
out["timm_unknown"] = error({"timm": "test_efficientnett"})
print(json.dumps(out))
"""


def test_zoo_preprocessing_weights_and_names(tmp_path):
    photo = next((CONFIGS / "photos" / "data" / "test" / "flower").iterdir())
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHECKS,
            str(photo),
            str(CONFIGS / "photos" / "data" / "calibration"),
            str(CONFIGS / "photos" / "mobilenet_v3_small.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=zoo_env(),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # the recorded transforms on PIL equal torchvision's weights transforms and timm's create_transform
    assert out["torchvision"] < 1e-6 and out["timm"] < 1e-6, out
    assert out["timm_options"] == {
        "size": 160,
        "resize": 168,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bicubic",
    }
    assert out["scaled"] == [112, 128]  # a new crop keeps the model's resize-to-crop ratio (256/224)
    assert out["unknown"] == ["RecipeError", 2, "model.torchvision: unknown model 'resnet81'; did you mean 'resnet18'?"]
    kind, code, line = out["mismatch"]
    assert (
        (kind, code) == ("ModelError", 3)
        and "does not fit the architecture" in line
        and "width_mult" not in line
        and "pass the constructor's keyword arguments (model.kwargs)" in line
    )
    assert (
        out["timm_unknown"][:2] == ["RecipeError", 2] and "did you mean 'test_efficientnet'?" in out["timm_unknown"][2]
    )


SAME_PROCESS = r"""
import sys
from quantcli.cli import main

for recipe, out in ((sys.argv[1], sys.argv[2]), (sys.argv[3], sys.argv[4])):
    try:
        main(["capture", "--recipe", recipe, "-o", out])
    except SystemExit as exc:
        if exc.code:
            raise
print("torchvision" in sys.modules and sys.modules["torchvision"] is not None)
"""


def test_a_text_model_leaves_torchvision_to_a_later_model_of_the_same_process(tmp_path):
    """A library user (a notebook) captures a text model, then a torchvision one, in one process."""
    args = [
        CONFIGS / "sentiment" / "recipe.yaml",
        tmp_path / "text",
        CONFIGS / "photos" / "torchvision.yaml",
        tmp_path / "vision",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", SAME_PROCESS, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=zoo_env()
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "True"  # torchvision imported, not hidden
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("text", "vision")]
    assert [m["stage"] for m in manifests] == ["captured", "captured"]
    assert manifests[1]["recipe"]["model"]["torchvision"] == "mobilenet_v3_small"
