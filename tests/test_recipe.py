"""The recipe schema in-process: every problem at once with its dotted key path, did-you-mean,
path resolution, and which sections a later stage may change."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from quantcli import pipeline, references
from quantcli import recipe as recipes
from quantcli.errors import ArtifactError, InputError, RecipeError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits"
BASE = yaml.safe_load((DIGITS / "recipe.yaml").read_text())


def problems(data) -> list[str]:
    recipe, found = recipes.schema_problems(data)
    assert (recipe is None) == bool(found)
    return found


def edited(**sections) -> dict:
    data = copy.deepcopy(BASE)
    data.update(sections)
    return data


def write(folder: Path, data, name: str = "r.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def test_every_recipe_under_configs_validates():
    configs = ROOT / "configs"
    found = sorted(p for p in configs.rglob("*") if p.suffix in (".yaml", ".yml"))
    expected = {DIGITS / "recipe.yaml", configs / "families" / "outlier_mlp.yaml", configs / "bench" / "vision.yaml"}
    assert expected <= set(found)
    for path in found:
        doc = pipeline.validate(path)
        assert doc["valid"] and all(Path(p).exists() for p in doc["files"]), path


def test_the_digits_recipe_is_valid_and_its_defaults_are_filled():
    recipe = recipes.parse(BASE)
    assert recipe.quantization.observer == "auto" and recipe.export.opset == 21
    assert recipe.inputs[0].axes() == {0: "batch"}


def test_every_problem_is_reported_at_once_with_its_dotted_key_path():
    data = edited(
        inputs=[{"name": "x", "shape": [0, 1, 8, 8], "dtyp": "float32"}],
        quantization={
            "observer": "minmx",
            "weights": {"granularity": "per_row"},
            "overrides": [{"names": ["fc"], "weight": {}}],
        },
        export={"opset": 99},
    )
    data["calibraton"] = data.pop("calibration")
    found = problems(data)
    assert found == [
        "inputs.0.shape: every dimension must be a positive integer",
        "inputs.0.dtyp: unknown key; did you mean 'dtype'?",
        "quantization.weights.granularity: Input should be 'per_channel' or 'per_tensor'",
        "quantization.observer: unknown observer 'minmx'; did you mean 'minmax'?; "
        "valid: auto, minmax, moving_average_minmax, histogram, mse, percentile, entropy",
        "quantization.overrides.0.weight: unknown key; did you mean 'weights'?",
        "export.opset: Input should be less than or equal to 23",
        "calibraton: unknown key; did you mean 'calibration'?",
    ]
    with pytest.raises(RecipeError) as info:
        recipes.parse(data, "r.yaml")
    assert info.value.line() == "r.yaml: 7 problem(s): " + "; ".join(found)
    assert info.value.exit_code == 2


def test_an_unknown_key_with_no_close_match_lists_the_valid_ones():
    assert problems(edited(export={"zzz": 1})) == [
        "export.zzz: unknown key; valid keys: kv_cache, opset, parity_max_excess_db, parity_min_sqnr_db"
    ]


def test_an_unknown_quantization_target_gets_a_did_you_mean():
    assert problems(edited(quantization={"target": "onnxruntim"})) == [
        "quantization.target: unknown target 'onnxruntim'; did you mean 'onnxruntime'?; valid: onnxruntime, "
        "x86_inductor"
    ]
    from quantcli import quantizers

    assert set(quantizers.TARGETS) == {"onnxruntime", "x86_inductor"}  # the registry the schema checks against


@pytest.mark.parametrize(
    "data, expected",
    [
        (None, "the recipe is empty"),
        ([1, 2], "the recipe must be a YAML mapping, got list"),
        ("model", "the recipe must be a YAML mapping, got str"),
        ({}, "model: Field required"),
        (
            {"model": {"factory": "model.py"}, "inputs": [{"name": "x", "shape": [1]}]},
            'model.factory: must look like "file.py:callable" or "package.module:callable"',
        ),
        (  # no callable's name after the colon (a path that resolving would turn into another value)
            {"model": {"factory": "0:/"}, "inputs": [{"name": "x", "shape": [1]}]},
            'model.factory: must look like "file.py:callable" or "package.module:callable"',
        ),
        (edited(inputs=[]), "inputs: Value should have at least 1 item after validation, not 0"),
        (
            edited(inputs=[{"name": "x", "shape": [2, 3], "dynamic_axes": {2: "n"}}]),
            "inputs.0: dynamic_axes: axis 2 is outside shape [2, 3]",
        ),
        (edited(inputs=[{"name": "x", "shape": [2]}, {"name": "x", "shape": [2]}]), "inputs: duplicate names ['x']"),
        (edited(calibration={"data": "d.npz", "keys": {"y": "a"}}), "keys name unknown inputs ['y']; inputs are ['x']"),
        (edited(calibration={"data": ""}), "calibration.data: String should have at least 1 character"),
        (
            edited(calibration={"data": "d.npz", "batch_size": 0}),
            "calibration.batch_size: Input should be greater than 0",
        ),
        (
            edited(training={"data": "d.npz", "targets": "y", "freeze_bn_after": 1.5}),
            "training.freeze_bn_after: a float must be a fraction of the steps in (0, 1); an int is a step",
        ),
        (
            edited(training={"data": "d.npz", "targets": "y", "optimizer": {"name": "lion"}}),
            "training.optimizer: unknown optimizer 'lion'; valid: sgd, adamw",
        ),
        (edited(quantization={"reduce_range": "pairs"}), "quantization.reduce_range"),
        (edited(quantization={"target_cpu": "sse4"}), "quantization.target_cpu"),
    ],
)
def test_invalid_values_name_their_key(data, expected):
    assert any(expected in p for p in problems(data)), problems(data)


@pytest.mark.parametrize("reduce_range", ["auto", "pair_safe", True, False])
def test_reduce_range_takes_auto_pair_safe_or_a_bool(reduce_range):
    assert not problems(edited(quantization={"target_cpu": "avx2", "reduce_range": reduce_range}))


def test_paths_resolve_against_the_recipe_folder(tmp_path):
    data = edited(
        model={"factory": "model.py:build"},
        calibration={"data": "sub/data.npz"},
        evaluation={"data": "mypkg.data:batches", "targets": "y"},
    )
    recipe = recipes.load(write(tmp_path, data))
    assert recipe.model.factory == f"{tmp_path / 'model.py'}:build"
    assert recipe.calibration.data == str(tmp_path / "sub" / "data.npz")
    assert recipe.evaluation.data == "mypkg.data:batches"  # package.module:callable is left as written


@pytest.mark.parametrize(
    "value, expected",
    [
        ("model.py:build", ("model.py", "build")),
        ("pkg.models:build", ("pkg.models", "build")),
        ("/abs/model.py:build", ("/abs/model.py", "build")),
        ("data.npz", None),
        ("dir/with:colon", None),
        ("model.py:not-an-identifier", None),
    ],
)
def test_split_callable(value, expected):
    assert references.split_callable(value) == expected


def test_file_problems_come_from_the_raw_document_even_when_it_is_invalid(tmp_path):
    (tmp_path / "model.py").write_text("")
    data = {
        "model": {"factory": "model.py:build", "kwarg": 1},
        "calibration": {"data": "missing.npz"},
        "evaluation": {"data": "no_such_package_xyz.sub:fn"},
        "training": {"data": "t.npz", "loss": "loss.py:fn"},
    }
    assert references.file_problems(data, tmp_path) == [
        f"calibration.data: file not found: {tmp_path / 'missing.npz'}",
        f"training.data: file not found: {tmp_path / 't.npz'}",
        f"training.loss: file not found: {tmp_path / 'loss.py'}",
        "evaluation.data: no module named 'no_such_package_xyz.sub'",
    ]
    assert references.file_problems({"model": {"factory": "json.decoder:JSONDecoder"}}, tmp_path) == []
    assert references.file_problems(["not", "a", "mapping"], tmp_path) == []


def test_validate_lists_schema_and_file_problems_together_exit_2(tmp_path):
    data = edited(model={"factory": "nowhere.py:build"}, export={"opset": 5})
    with pytest.raises(RecipeError) as info:
        pipeline.validate(write(tmp_path, data))
    assert info.value.line() == (
        f"{tmp_path / 'r.yaml'}: 4 problem(s): export.opset: Input should be greater than or equal to 7; "
        f"model.factory: file not found: {tmp_path / 'nowhere.py'}; "
        f"calibration.data: file not found: {tmp_path / 'digits.npz'}; "
        f"evaluation.data: file not found: {tmp_path / 'digits.npz'}"
    )


def test_validate_reports_only_missing_files_as_an_input_error_exit_3(tmp_path):
    data = edited(model={"factory": "nowhere.py:build"})
    with pytest.raises(InputError) as info:
        pipeline.validate(write(tmp_path, data))
    assert info.value.exit_code == 3 and "model.factory: file not found" in info.value.line()
    assert "calibration.data: file not found" in info.value.line()  # every missing file, not just the first


@pytest.mark.parametrize(
    "content, error, fragment",
    [
        ("model: [unclosed\n  x: 1\n", RecipeError, "invalid YAML at line 2, column 4"),
        (b"\xff\xfe\x00garbage", RecipeError, "invalid YAML: not UTF-8 text"),
        ("", RecipeError, "the recipe is empty"),
    ],
)
def test_read_errors(tmp_path, content, error, fragment):
    path = tmp_path / "r.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(error) as info:
        recipes.load(path)
    assert fragment in info.value.line()


def test_a_missing_recipe_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="recipe not found"):
        recipes.load(tmp_path / "none.yaml")
    with pytest.raises(InputError, match="recipe not found"):
        recipes.load(tmp_path)  # a folder


def test_digest_follows_content_not_formatting(tmp_path):
    a = recipes.parse(BASE).digest()
    assert recipes.parse(yaml.safe_load(yaml.safe_dump(BASE, default_flow_style=True))).digest() == a
    assert recipes.parse(edited(export={"opset": 17})).digest() != a


# --- later stages: --recipe may change only their own sections ------------------------------------


def _recorded():
    """A recipe as recorded by prepare: "auto" values resolved."""
    recipe = recipes.parse(BASE)
    return recipe.model_copy(
        update={"quantization": recipe.quantization.model_copy(update={"target_cpu": "avx2", "reduce_range": True})}
    )


FIXED_BEFORE_CALIBRATE = {"model": "capture", "inputs": "capture", "outputs": "capture", "quantization": "prepare"}


def test_a_later_stage_takes_its_own_sections_from_the_new_recipe():
    new = recipes.parse(edited(calibration={"data": "other.npz", "batch_size": 8}, export={"opset": 17}))
    merged = recipes.merge(_recorded(), new, takes=("calibration",), fixed=FIXED_BEFORE_CALIBRATE, command="calibrate")
    assert merged.calibration.batch_size == 8 and merged.calibration.data == "other.npz"
    assert merged.export.opset == 21  # not calibrate's to change
    assert merged.quantization.target_cpu == "avx2"  # "auto" in the new recipe means: as resolved


@pytest.mark.parametrize(
    "change, named, fixed_at",
    [
        ({"inputs": [{"name": "x", "shape": [16, 1, 8, 8]}]}, "inputs", "capture"),
        ({"model": {"factory": "model.py:build"}}, "model", "capture"),
        ({"quantization": {"observer": "minmax"}}, "quantization", "prepare"),
    ],
)
def test_a_recipe_that_changes_earlier_sections_is_refused_naming_the_stage(change, named, fixed_at):
    with pytest.raises(ArtifactError) as info:
        recipes.merge(
            _recorded(),
            recipes.parse(edited(**change)),
            takes=("export", "evaluation"),
            fixed=FIXED_BEFORE_CALIBRATE,
            command="export",
        )
    assert info.value.exit_code == 4
    assert info.value.line() == (
        f"--recipe changes {named}, fixed when the artifact was made (at {fixed_at}); `quantcli export --recipe` "
        f"may only change export, evaluation (rerun the chain from `quantcli {fixed_at}` with this recipe)"
    )


# --- names come from the registries that execute them --------------------------------------------


def test_an_option_the_target_ignores_is_an_error_where_written_but_a_recorded_recipe_reloads():
    problem = problems(
        edited(quantization={"target": "x86_inductor", "exclude_names": ["head.*"], "observer": "minmax"})
    )
    assert problem == [
        "quantization: target 'x86_inductor' ignores exclude_names, observer; remove them or use the onnxruntime target"
    ]
    written = recipes.parse(edited(quantization={"target": "x86_inductor"}))
    recorded = written.model_dump(mode="json")  # every default, as a manifest records it
    assert recipes.Recipe.model_validate(recorded).quantization.target == "x86_inductor"


@pytest.mark.parametrize(
    "section, value, message",
    [
        (
            "loss",
            "cross_entropi",
            "unknown loss 'cross_entropi'; did you mean 'cross_entropy'?; valid: cross_entropy, mse",
        ),
        ("optimizer", {"name": "adam"}, "unknown optimizer 'adam'; did you mean 'adamw'?; valid: sgd, adamw"),
    ],
)
def test_training_names_come_from_the_objectives_registry(section, value, message):
    from quantcli.training import names, objectives

    assert set(objectives.LOSSES) == set(names.LOSSES) == {"cross_entropy", "mse"}
    assert set(names.OPTIMIZERS) == {"sgd", "adamw"}
    training = {"data": "d.npz", "targets": "y", section: value}
    assert any(message in p for p in problems(edited(training=training))), problems(edited(training=training))


def test_a_training_data_callable_is_refused_at_validation_with_the_reason():
    found = problems(edited(training={"data": "data.py:batches", "targets": "y"}))
    assert found == [
        "training.data: must be an .npz file or a folder of .npy files, not a callable: training needs "
        "indexed samples (shuffled, split across processes, its order saved for --resume)"
    ]


def test_input_dtypes_are_the_loaders():
    from quantcli.loading.dtypes import DTYPES

    names = [repr(n) for n in DTYPES]
    assert problems(edited(inputs=[{"name": "x", "shape": [1], "dtype": "float64"}])) == [
        f"inputs.0.dtype: Input should be {', '.join(names[:-1])} or {names[-1]}"
    ]
