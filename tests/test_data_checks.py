"""The one loading path in-process: the dtype policy, NaN/Inf, sample counts, empty sources, the
data headers `validate` reads, bounded dynamic axes in the schema, and the forward() signature
check. No torch is imported here: these are the checks that run before it.

test_fail_early.py runs the same problems through the real CLI.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from quantcli import pipeline
from quantcli import recipe as recipes
from quantcli.diagnose import signature_problem
from quantcli.errors import DataError, InputError
from quantcli.loading import data as loading
from quantcli.loading import headers
from quantcli.loading.dtypes import RANGE, SAFE, SAME, UNSAFE, cast_kind
from quantcli.loading.inputs import capture_example, example_batch, export_example
from quantcli.recipe import InputSpec

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits"
BASE = yaml.safe_load((DIGITS / "recipe.yaml").read_text())
X = [InputSpec(name="x", shape=[4, 3], dtype="float32")]
IDS = [InputSpec(name="ids", shape=[4, 5], dtype="int64"), InputSpec(name="mask", shape=[4, 5], dtype="bool")]


@pytest.mark.parametrize(
    "have, want, kind",
    [
        ("float32", "float32", SAME),
        ("float64", "float32", SAFE),
        ("float64", "float16", SAFE),
        ("int32", "float32", SAFE),
        ("uint8", "float32", SAFE),
        ("bool", "float32", SAFE),
        ("int32", "int64", SAFE),
        ("uint8", "int64", SAFE),
        ("bool", "int64", SAFE),
        ("int64", "int32", RANGE),
        ("uint64", "int64", RANGE),
        ("float32", "int64", UNSAFE),
        ("float64", "int32", UNSAFE),
        ("int64", "bool", UNSAFE),
        ("float32", "bool", UNSAFE),
        ("<U3", "float32", UNSAFE),
        ("complex64", "float32", UNSAFE),
    ],
)
def test_the_dtype_policy(have, want, kind):
    assert cast_kind(np.dtype(have), np.dtype(want)) == kind


def _write(folder: Path, **arrays) -> str:
    path = folder / "d.npz"
    np.savez(path, **arrays)
    return str(path)


def _all(spec: str, inputs, batch_size=2, num_batches=None, targets=None, what="calibration"):
    count, batches = loading.iter_batches(spec, {}, inputs, batch_size, num_batches, what, targets)
    return count, list(batches)


def test_a_safe_cast_is_applied_to_every_batch_and_said_once(tmp_path, caplog):
    spec = _write(tmp_path, x=np.arange(24, dtype=np.float64).reshape(8, 3))
    with caplog.at_level(logging.WARNING, "quantcli"):
        count, batches = _all(spec, X)
    assert count == 4 and all(b["x"].dtype == np.float32 for b in batches)
    assert np.array_equal(np.concatenate([b["x"] for b in batches]), np.arange(24, dtype=np.float32).reshape(8, 3))
    assert [r.getMessage() for r in caplog.records] == [
        "calibration: input 'x' is float64 in the data; cast to float32, the recipe's dtype"
    ]


def test_token_ids_and_masks_stay_as_they_are_or_widen(tmp_path, caplog):
    spec = _write(tmp_path, ids=np.arange(20, dtype=np.int32).reshape(4, 5), mask=np.ones((4, 5), bool))
    with caplog.at_level(logging.WARNING, "quantcli"):
        _, (batch, _) = _all(spec, IDS)
    assert batch["ids"].dtype == np.int64 and batch["mask"].dtype == np.bool_
    assert [r.getMessage() for r in caplog.records] == [
        "calibration: input 'ids' is int32 in the data; cast to int64, the recipe's dtype"
    ]


@pytest.mark.parametrize(
    "arrays, inputs, fragment",
    [
        (
            {"ids": np.full((4, 5), 1.5), "mask": np.ones((4, 5), bool)},
            IDS,
            "calibration: input 'ids' is float64 in the data but the recipe declares int64; "
            "a cast would change its values",
        ),
        (
            {"ids": np.zeros((4, 5), np.int64), "mask": np.ones((4, 5), np.int64)},
            IDS,
            "calibration: input 'mask' is int64 in the data but the recipe declares bool",
        ),
    ],
)
def test_an_unsafe_dtype_is_an_input_error(tmp_path, arrays, inputs, fragment):
    with pytest.raises(DataError, match=fragment):
        _all(_write(tmp_path, **arrays), inputs)


def test_integer_narrowing_is_checked_on_the_values(tmp_path):
    narrow = [InputSpec(name="ids", shape=[2, 2], dtype="int32")]
    ok = np.array([[1, 2], [3, 4], [5, 6]], np.int64)
    _, batches = _all(_write(tmp_path, ids=ok), narrow)
    assert batches[0]["ids"].dtype == np.int32
    big = ok.copy()
    big[2, 1] = 2**40
    with pytest.raises(
        DataError,
        match=r"calibration batch 1: input 'ids' is int64 with values in \[5, "
        r"1099511627776\], outside the recipe's int32",
    ):
        _all(_write(tmp_path, ids=big), narrow)


@pytest.mark.parametrize("value, kind", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_a_non_finite_value_names_the_input_the_batch_and_the_sample(tmp_path, value, kind):
    x = np.zeros((8, 3), np.float32)
    x[5, 2] = value
    with pytest.raises(DataError, match=f"^calibration batch 2: input 'x' holds {kind} at sample 5 of the data$"):
        _all(_write(tmp_path, x=x), X)


def test_a_float64_value_too_large_for_float16_is_caught_after_the_cast(tmp_path):
    half = [InputSpec(name="x", shape=[4, 3], dtype="float16")]
    x = np.zeros((4, 3))
    x[3, 0] = 1e6
    with pytest.raises(DataError, match="calibration batch 1: input 'x' holds Inf at sample 3 of the data"):
        _all(_write(tmp_path, x=x), half)


def test_non_finite_targets_are_named_too(tmp_path):
    y = np.zeros(4)
    y[1] = np.nan
    with pytest.raises(DataError, match="^evaluation batch 0: the targets hold NaN at sample 1 of the data$"):
        _all(_write(tmp_path, x=np.zeros((4, 3), np.float32), y=y), X, targets="y", what="evaluation")


def test_sample_counts_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match=r"arrays disagree on the number of samples: \{'ids': 4, 'mask': 3\}"):
        _all(_write(tmp_path, ids=np.zeros((4, 5), np.int64), mask=np.ones((3, 5), bool)), IDS)
    with pytest.raises(DataError, match="calibration: the data holds no samples"):
        _all(_write(tmp_path, x=np.zeros((0, 3), np.float32)), X)


FACTORIES = """
import numpy as np

def nothing():
    return iter(())

def ragged():
    yield {"x": np.zeros((4, 3), np.float32), "y": np.zeros(3)}

def empty_batch():
    yield {"x": np.zeros((0, 3), np.float32)}

def nan_later():
    yield {"x": np.zeros((4, 3), np.float32)}
    bad = np.zeros((4, 3))
    bad[2, 1] = np.nan
    yield {"x": bad}

def two():
    for _ in range(2):
        yield {"x": np.zeros((4, 3), np.float32)}
"""


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("nothing", "yielded no batches"),
        ("ragged", r"calibration batch 0: arrays disagree on the number of samples: \{'x': 4, 'targets': 3\}"),
        ("empty_batch", "calibration batch 0: holds no samples"),
        ("nan_later", "^calibration batch 1: input 'x' holds NaN at sample 2 of that batch$"),
    ],
)
def test_a_data_callable_is_checked_batch_by_batch(tmp_path, name, fragment):
    (tmp_path / "batches.py").write_text(FACTORIES)
    targets = "y" if name == "ragged" else None
    with pytest.raises(DataError, match=fragment):
        _all(f"{tmp_path / 'batches.py'}:{name}", X, targets=targets)


def test_asking_for_more_batches_than_exist_or_a_batch_larger_than_the_data_is_said(tmp_path, caplog):
    spec = _write(tmp_path, x=np.zeros((8, 3), np.float32))
    (tmp_path / "batches.py").write_text(FACTORIES)
    with caplog.at_level(logging.WARNING, "quantcli"):
        assert _all(spec, X, batch_size=2, num_batches=100)[0] == 4
        assert _all(spec, X, batch_size=64)[0] == 1
        assert len(_all(f"{tmp_path / 'batches.py'}:two", X, num_batches=5)[1]) == 2
        assert _all(spec, X, batch_size=2, num_batches=3)[0] == 3  # within the data: nothing said
    assert [r.getMessage() for r in caplog.records] == [
        "calibration: 100 batches asked for, the data holds 4 (8 samples at batch_size 2): using 4",
        "calibration: batch_size 64 is larger than the data (8 samples): one batch of 8",
        f"calibration: 5 batches asked for, {tmp_path / 'batches.py'}:two yielded 2: using 2",
    ]


def test_a_training_scan_finds_a_bad_sample_before_any_step(tmp_path):
    x = np.zeros((10, 3))
    x[7, 0] = np.nan
    data = loading.load_dataset(_write(tmp_path, x=x, y=np.zeros(10)), {}, X, "training", targets="y")
    with pytest.raises(DataError, match="^training: input 'x' holds NaN at sample 7 of the data$"):
        data.scan(chunk=4)
    assert data.take(np.array([3, 1]), batch=5)["x"].dtype == np.float32  # the same policy per step


# --- the headers validate reads ---------------------------------------------------------------------


def _recipe(tmp_path: Path, **sections) -> Path:
    doc = copy.deepcopy(BASE)
    doc["model"]["factory"] = f"{DIGITS / 'model.py'}:build"
    doc.pop("evaluation")
    doc.update(sections)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _validate_problem(recipe: Path) -> str:
    with pytest.raises(InputError) as info:
        pipeline.validate(recipe)
    assert type(info.value) is InputError  # exit 3, kind "input": validate's data problems
    return info.value.line()


def test_headers_of_npz_and_npy_folders_are_read_without_the_data(tmp_path):
    np.savez_compressed(tmp_path / "c.npz", x=np.zeros((5, 2, 3), np.float64), y=np.arange(5))
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "folder" / "x.npy", np.zeros((7, 3), np.int32))
    found = {name: (str(h.dtype), h.shape) for name, h in headers.headers(tmp_path / "c.npz").items()}
    assert found == {"x": ("float64", (5, 2, 3)), "y": ("int64", (5,))}
    assert {n: (str(h.dtype), h.shape) for n, h in headers.headers(tmp_path / "folder").items()} == {
        "x": ("int32", (7, 3))
    }


DTYPE_ZOO = [
    "float16",
    "float32",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "bool",
    "complex64",
    ">f4",
    ">i8",
    "<U3",
    "S2",
    "object",
    "datetime64[ns]",
    [("a", "<f4"), ("b", "<i2")],
]


@pytest.mark.parametrize("dtype", DTYPE_ZOO, ids=str)
@pytest.mark.parametrize("version", [1, 2])
def test_npy_headers_parse_as_numpy_reads_them(tmp_path, dtype, version):
    """The header parser gives numpy's dtype name, kind and size, and the policy numpy's dtypes get."""
    from numpy.lib import format as npy

    from quantcli.loading.dtypes import DTYPES, cast_kind

    want = np.dtype(dtype)
    path = tmp_path / "a.npy"
    write = npy.write_array_header_1_0 if version == 1 else npy.write_array_header_2_0
    with open(path, "wb") as fh:
        write(fh, {"descr": npy.dtype_to_descr(want), "fortran_order": False, "shape": (3, 2)})
    with open(path, "rb") as fh:
        header = headers._read_header(fh)
    assert header.shape == (3, 2)
    if want.fields is None:
        assert (str(header.dtype), header.dtype.kind) == (str(want), want.kind)
    if want.kind in "biufcUS":  # the sizes the policy reads (an object's pointer size it does not)
        assert header.dtype.itemsize == want.itemsize
    for name in DTYPES:
        assert cast_kind(header.dtype, DTYPES[name]) == cast_kind(want, np.dtype(name)), name


@pytest.mark.filterwarnings("ignore:Stored array in format 3.0")
def test_a_version_3_npy_header_is_read(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(4, dtype=[("\u03b1", "<f4")]))  # a non-latin-1 field name: format 3.0
    assert (tmp_path / "x.npy").read_bytes()[6] == 3
    assert headers.headers(tmp_path)["x"].shape == (4,)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x93NUMPY", b"not numpy at all", b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'", b"\x93NUMPY\x09\x00\x00\x00"],
)
def test_a_bad_npy_header_is_a_value_error(tmp_path, content):
    (tmp_path / "x.npy").write_bytes(content)
    with pytest.raises((ValueError, EOFError)):
        headers.headers(tmp_path)


@pytest.mark.parametrize("case", ["targets", "key", "npy-folder", "dtype", "shape", "counts", "empty"])
def test_validate_checks_every_sections_arrays_from_their_headers(tmp_path, case):
    x = np.zeros((6, 1, 8, 8), np.float32)
    arrays = {
        "targets": {"x": x, "t": np.zeros(6)},
        "key": {"calib_x": x},
        "dtype": {"x": x.astype("U1")},
        "shape": {"x": np.zeros((6, 1, 7, 8), np.float32)},
        "counts": {"x": x, "t": np.zeros(5)},
        "empty": {"x": x[:0], "t": np.zeros(0)},
    }.get(case, {})
    np.savez(tmp_path / "d.npz", **arrays)
    sections = {"calibration": {"data": "d.npz"}}
    if case in ("targets", "counts", "empty"):
        sections["evaluation"] = {"data": "d.npz", "targets": "t" if case != "targets" else "y"}
    if case == "key":
        sections["calibration"]["keys"] = {"x": "calib_y"}
    if case == "npy-folder":
        (tmp_path / "npy").mkdir()
        np.save(tmp_path / "npy" / "other.npy", x)
        sections["calibration"] = {"data": "npy"}
    recipe = _recipe(tmp_path, **sections)
    expected = {
        "targets": "evaluation: no array 'y' in the data; it has ['t', 'x'] (for the targets, evaluation.targets)",
        "key": "calibration: no array 'calib_y' in the data; it has ['calib_x'] (for input 'x', mapped by "
        "calibration.keys)",
        "npy-folder": "calibration: no array 'x' in the data; it has ['other'] (for input 'x')",
        "dtype": "calibration: input 'x' is <U1 in the data but the recipe declares float32",
        "shape": "calibration: input 'x' has shape [6, 1, 7, 8]; axis 2 must be 8 (static in the recipe)",
        "counts": "evaluation: arrays disagree on the number of samples: {'x': 6, 't': 5}",
        "empty": "calibration: the data holds no samples",
    }[case]
    line = _validate_problem(recipe)
    assert line.startswith(f"{recipe}: ") and expected in line, line


def test_validate_checks_data_against_bounded_axes(tmp_path):
    np.savez(tmp_path / "d.npz", ids=np.zeros((4, 80), np.int64))
    recipe = _recipe(
        tmp_path,
        inputs=[
            {
                "name": "ids",
                "shape": [2, 16],
                "dtype": "int64",
                "dynamic_axes": {0: "batch", 1: {"name": "seq", "min": 1, "max": 64}},
            }
        ],
        calibration={"data": "d.npz"},
    )
    assert (
        "calibration: input 'ids' has shape [4, 80]; axis 1 (seq) must be within 1..64 (its bounds in the recipe)"
        in _validate_problem(recipe)
    )


def test_validate_leaves_data_callables_alone_and_passes_safe_casts(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 1, 8, 8), np.float64))
    (tmp_path / "b.py").write_text("raise SystemExit('user code ran')\n")
    recipe = _recipe(tmp_path, calibration={"data": "d.npz"}, evaluation={"data": "b.py:batches", "targets": "y"})
    assert pipeline.validate(recipe)["valid"] is True  # b.py, imported, would have raised SystemExit


# --- bounded dynamic axes in the schema --------------------------------------------------------------


def _inputs_problems(inputs) -> list[str]:
    doc = copy.deepcopy(BASE)
    doc.pop("calibration"), doc.pop("evaluation")
    doc["inputs"] = inputs
    return recipes.schema_problems(doc)[1]


def test_bounded_and_plain_axes_are_both_valid_and_share_a_symbol():
    spec = {
        "name": "ids",
        "shape": [2, 16],
        "dtype": "int64",
        "dynamic_axes": {0: "batch", 1: {"name": "seq", "min": 1, "max": 512}},
    }
    mask = {"name": "mask", "shape": [2, 16], "dtype": "int64", "dynamic_axes": {0: "batch", 1: "seq"}}
    assert _inputs_problems([spec, mask]) == []
    doc = copy.deepcopy(BASE)
    doc.pop("calibration"), doc.pop("evaluation")
    doc["inputs"] = [spec, mask]
    recipe = recipes.parse(doc)
    assert recipe.inputs[1].axes() == {0: "batch", 1: "seq"}
    assert recipes.Recipe.model_validate(recipe.model_dump(mode="json")) == recipe  # the recorded form reloads
    example = export_example(recipe.inputs)
    assert example["ids"].shape == (2, 16) and example["mask"].shape == (2, 16)


@pytest.mark.parametrize(
    "axes, expected",
    [
        ({1: {"name": "seq", "max": 8}}, "inputs.0: dynamic_axes: axis 1 (seq) is bounded ..8, but shape gives it 16"),
        ({1: {"name": "seq", "min": 9, "max": 8}}, "inputs.0.dynamic_axes: axis 1: min 9 is larger than max 8"),
        ({1: {"name": "seq", "mx": 8}}, "inputs.0.dynamic_axes: axis 1: mx: unknown key; did you mean 'max'?"),
        ({1: 5}, "inputs.0.dynamic_axes: axis 1: must be a symbol name or {name, min, max}, got int"),
        ({1: {"max": 64}}, "inputs.0.dynamic_axes: axis 1: name: Field required"),
    ],
)
def test_bad_bounds_name_their_key(axes, expected):
    found = _inputs_problems([{"name": "ids", "shape": [2, 16], "dtype": "int64", "dynamic_axes": axes}])
    assert any(expected in p for p in found), found


def test_one_symbol_with_two_ranges_is_a_recipe_error():
    found = _inputs_problems(
        [
            {"name": "a", "shape": [2, 16], "dynamic_axes": {1: {"name": "seq", "max": 64}}},
            {"name": "b", "shape": [2, 16], "dynamic_axes": {1: {"name": "seq", "max": 512}}},
        ]
    )
    assert found == [
        "inputs: symbol 'seq' is bounded ..512 at inputs.1.dynamic_axes.1 but ..64 at "
        "inputs.0.dynamic_axes.1; one symbol is one size, give it one range"
    ]


def test_example_inputs_are_the_first_calibration_batch(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.arange(6 * 64, dtype=np.float32).reshape(6, 1, 8, 8))
    recipe = recipes.load(_recipe(tmp_path, calibration={"data": "d.npz", "batch_size": 5}))
    batch = example_batch(recipe)  # the recipe's shape says 32 samples; the first batch has 5
    assert batch["x"].shape == (5, 1, 8, 8) and batch["x"][0, 0, 0, 1] == 1


def test_capture_example_keeps_two_rows_of_a_batch_axis_and_every_other_axis(tmp_path):
    """capture runs the model once on its example: of the batch axis only 2 rows (or the axis's lower bound);
    a symbol that stands on another axis too (a sequence) keeps its length."""
    np.savez(tmp_path / "d.npz", x=np.arange(6 * 64, dtype=np.float32).reshape(6, 1, 8, 8))
    recipe = recipes.load(_recipe(tmp_path, calibration={"data": "d.npz", "batch_size": 5}))
    assert capture_example(recipe)["x"].shape == (2, 1, 8, 8)
    assert capture_example(recipe)["x"][1, 0, 0, 0] == 64  # the data's first rows
    bounded = [{**recipe.inputs[0].model_dump(), "dynamic_axes": {0: {"name": "batch", "min": 3}}}]
    recipe3 = recipe.model_copy(update={"inputs": [InputSpec.model_validate(i) for i in bounded]})
    assert capture_example(recipe3)["x"].shape == (3, 1, 8, 8)
    shared = [{**recipe.inputs[0].model_dump(), "dynamic_axes": {0: "n", 2: "n"}, "shape": [1, 1, 8, 8]}]
    recipe_n = recipe.model_copy(update={"inputs": [InputSpec.model_validate(i) for i in shared]})
    assert capture_example(recipe_n)["x"].shape == (5, 1, 8, 8)  # "n" is not only a batch axis: kept


# --- forward() signatures -------------------------------------------------------------------------------


def _kw_only(self, *, x): ...
def _two(self, x, mask): ...
def _defaults(self, x, mask=None, *, flag=False): ...
def _varargs(self, *xs): ...
def _kwargs_only(self, **inputs): ...


@pytest.mark.parametrize(
    "forward, names, expected",
    [
        (
            _kw_only,
            ["x"],
            "forward() takes keyword-only argument(s) 'x', but quantcli passes the recipe's inputs (x) "
            "positionally, in order",
        ),
        (_two, ["x"], "forward() requires 2 positional arguments (x, mask), but the recipe declares 1 input(s) (x)"),
        (
            _two,
            ["x", "mask", "extra"],
            "forward() takes 2 positional argument(s) (x, mask), but the recipe declares 3 input(s) (x, mask, extra)",
        ),
        (_kwargs_only, ["x"], "forward() takes 0 positional argument(s), but the recipe declares 1 input(s) (x)"),
        (_defaults, ["x"], None),
        (_defaults, ["x", "mask"], None),
        (_varargs, ["a", "b", "c"], None),
    ],
)
def test_forward_signatures(forward, names, expected):
    bound = forward.__get__(object())
    assert signature_problem(bound, [InputSpec(name=n, shape=[1]) for n in names]) == expected


def test_capture_reads_only_the_first_batch_of_a_data_callable(tmp_path):
    from quantcli.stages.capture import scan_calibration

    (tmp_path / "b.py").write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    yield {'x': np.ones((3, 1, 8, 8), np.float32)}\n"
        "    raise RuntimeError('the second batch was read')\n"
    )
    recipe = recipes.load(_recipe(tmp_path, calibration={"data": "b.py:batches"}))
    scan_calibration(recipe)  # user code: not scanned
    assert example_batch(recipe)["x"].shape == (3, 1, 8, 8)


def test_a_sources_sample_count_is_not_a_static_batch_axis(tmp_path):
    """dynamic_axes: {} makes axis 0 static at the recipe's 32; the file's 200 samples are not a batch."""
    recipe = _recipe(
        tmp_path,
        inputs=[{"name": "x", "shape": [32, 1, 8, 8], "dynamic_axes": {}}],
        calibration={"data": str(DIGITS / "digits.npz"), "keys": {"x": "calib_x"}},
    )
    assert pipeline.validate(recipe)["valid"] is True
