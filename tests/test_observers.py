"""Calibration methods: `mse` against a brute-force MSE optimum, `entropy` against ONNX Runtime.

The brute force measures the real uint8 quantize-dequantize error (torch's fake_quantize) of
every clipping range on a grid; ORT's side is its own `create_calibrator(CalibrationMethod.Entropy)`
run on a tiny ONNX graph with the same batches the observer sees.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from quantcli import _torch
from quantcli.quantizers.entropy import EntropyObserver
from quantcli.quantizers.names import OBSERVERS
from quantcli.quantizers.observers import ACTIVATION_OBSERVERS
from tests.models import MODELS
from tests.test_quantizer import ROOT, leaves, model_data, prepare, section, sqnr_db

torch = _torch.torch
BINS, LEVELS = 2048, 128  # EntropyObserver's defaults; ORT is given the same


# ------------------------------------------------------------------ names
def test_the_registry_serves_exactly_the_names_recipes_accept():
    assert tuple(ACTIVATION_OBSERVERS) == OBSERVERS
    assert ACTIVATION_OBSERVERS["mse"] is ACTIVATION_OBSERVERS["histogram"]  # an alias: same observer, same state
    assert ACTIVATION_OBSERVERS["entropy"] is EntropyObserver


def test_validation_knows_the_observers_without_importing_torch():
    code = (
        "import sys; from quantcli.recipe import QuantizationSection, format_errors\n"
        "QuantizationSection(observer='entropy', overrides=[{'names': ['a'], 'observer': 'mse'}])\n"
        "try: QuantizationSection(overrides=[{'names': ['a'], 'observer': 'entorpy'}])\n"
        "except Exception as e: print(format_errors(e)[0])\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.splitlines() == [
        "overrides.0.observer: unknown observer 'entorpy'; did you mean 'entropy'?; "
        "valid: auto, minmax, moving_average_minmax, histogram, mse, percentile, entropy",
        "False",
    ]


# ------------------------------------------------------------------ mse (HistogramObserver) vs brute force
def uint8_mse(x: torch.Tensor, lo: float, hi: float) -> float:
    """Mean squared error of x quantized to uint8 over [lo, hi] (widened to hold 0) and dequantized."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    zero_point = int(min(max(round(-lo / scale), 0), 255))
    return float((torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255) - x).pow(2).mean())


def brute_force_range(x: torch.Tensor) -> tuple[float, float]:
    """The (lo, hi) of least uint8 MSE: a 25x25 grid over [min, 0] x [0, max], refined twice around the
    best point (final steps below 1/2000 of the range, finer than a 2048-bin histogram), or a
    240-point line search over hi when x has no negative values."""
    xmin, xmax = float(x.min()), float(x.max())
    if xmin >= 0:
        his = np.linspace(xmax / 200, xmax, 200)
        best = min(his, key=lambda h: uint8_mse(x, 0.0, h))
        return 0.0, min(np.linspace(best - xmax / 200, best + xmax / 200, 41), key=lambda h: uint8_mse(x, 0.0, h))
    los, his = np.linspace(xmin, 0, 25), np.linspace(xmax / 25, xmax, 25)
    for _ in range(3):
        lo, hi = min(((a, b) for a in los for b in his), key=lambda r: uint8_mse(x, *r))
        dl, dh = los[1] - los[0], his[1] - his[0]
        los, his = np.linspace(lo - dl, min(lo + dl, 0), 25), np.linspace(max(hi - dh, dh), hi + dh, 25)
    return lo, hi


def observed_range(observer) -> tuple[float, float]:
    """The float range an observer's uint8 (scale, zero point) represents."""
    scale, zero_point = (float(v) for v in observer.calculate_qparams())
    return -int(zero_point) * scale, (255 - int(zero_point)) * scale


def gaussian_with_outliers(g: torch.Generator) -> torch.Tensor:
    x = torch.randn(100_000, generator=g)
    x[torch.randperm(len(x), generator=g)[:5]] = torch.tensor([9.0, -11.0, 12.0, -14.0, 15.0])
    return x


def half_laplace(g: torch.Generator) -> torch.Tensor:
    return torch.empty(100_000).exponential_(1.0, generator=g)  # |Laplace(0, 1)|: a ReLU output's non-zero part


def relu_laplace(g: torch.Generator) -> torch.Tensor:
    """ReLU(Laplace(0, 1)): half the values exact zeros."""
    sign = torch.rand(100_000, generator=g) < 0.5
    return torch.where(sign, 0.0, torch.empty(100_000).exponential_(1.0, generator=g))


@pytest.mark.parametrize(
    "make,mse_bound,hi_tolerance",
    [
        (gaussian_with_outliers, 1.15, 0.05),
        (half_laplace, 1.05, 0.10),
        (relu_laplace, 1.03, 0.05),
    ],
)
@pytest.mark.slow
def test_mse_observer_range_is_near_the_brute_force_optimum(make, mse_bound, hi_tolerance):
    """HistogramObserver (`mse`) searches its histogram greedily, one end at a time, and stops at the
    first rise of its error estimate; seeds 0-4 measured its uint8 MSE at 1.107-1.117x the optimum
    (Gaussian with outliers; it keeps the -14 outlier where the optimum clips at -11) and
    1.002-1.036x (half-Laplace), minmax at 1.26x and 1.08-1.13x. On a ReLU output (half exact zeros)
    torchao's estimate counted the zeros as error and clipped short (1.10x at seed 0, 1.02-1.19x over
    seeds 0-4); with no error for them, 1.012x (1.007-1.068x), minmax 1.042x. The bounds sit between, so
    minmax, percentile or entropy passed off as `mse` fail; the upper end lands within
    2 %, 6.5 % and 2 % of the optimum's (0.24 and 0.75 of 12 and 11.5, 0.15 of 8.9)."""
    x = make(torch.Generator().manual_seed(0))
    observer = ACTIVATION_OBSERVERS["mse"](dtype=torch.uint8)
    for batch in x.chunk(8):
        observer(batch)
    lo, hi = observed_range(observer)
    best_lo, best_hi = brute_force_range(x)
    optimum = uint8_mse(x, best_lo, best_hi)
    assert uint8_mse(x, float(x.min()), float(x.max())) > mse_bound * optimum  # the data tells minmax apart
    assert uint8_mse(x, lo, hi) <= mse_bound * optimum
    assert abs(hi - best_hi) <= hi_tolerance * best_hi


def gelu_of_growing_batches(g: torch.Generator) -> torch.Tensor:
    """GELU of normal batches whose spread doubles batch to batch: the histogram is re-binned as it grows."""
    return torch.cat([torch.nn.functional.gelu(torch.randn(12_500, generator=g) * 2**k) for k in range(8)])


def sparse_normal(g: torch.Generator) -> torch.Tensor:
    return torch.randn(100_000, generator=g) * (torch.rand(100_000, generator=g) < 0.05)


@pytest.mark.parametrize("make", [gaussian_with_outliers, relu_laplace, gelu_of_growing_batches, sparse_normal])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_mse_search_finds_torchaos_range_to_the_bit(make, seed):
    """quantcli's loop over the cumulative histogram (Python floats, each bound rounded as torch compares it) ends
    where torchao's tensor-indexing loop does."""
    from torchao.quantization.pt2e.observer import HistogramObserver as TorchaoHistogramObserver

    observer = ACTIVATION_OBSERVERS["mse"](dtype=torch.uint8)
    for batch in make(torch.Generator().manual_seed(seed)).chunk(8):
        observer(batch)
    lo, hi = observer._non_linear_param_search()
    assert (lo, hi) != (observer.min_val, observer.max_val)  # the search narrowed the range
    expected = TorchaoHistogramObserver._non_linear_param_search(observer)
    assert torch.equal(lo, expected[0]) and torch.equal(hi, expected[1])


def test_the_mse_search_compares_counts_in_float32_as_torch_does():
    """A first bin holding float32(1e-5 * total), which is under the first quantile step's bound in float64 but
    equal to it in float32: torch's comparison keeps the start there, a float64 comparison would move it."""
    from torchao.quantization.pt2e.observer import HistogramObserver as TorchaoHistogramObserver

    observer = ACTIVATION_OBSERVERS["mse"](dtype=torch.uint8)
    histogram = torch.full((observer.bins,), 20.0)
    histogram[-2:] = 1.0
    for _ in range(5):  # the first bin's count and the total it is part of, to a fixed point
        histogram[0] = float(np.float32(1e-5 * histogram.sum().item()))
    total = histogram.sum().item()
    assert float(histogram[0]) < 1e-5 * total and float(histogram[0]) == float(np.float32(1e-5 * total))
    observer.histogram, observer.min_val, observer.max_val = histogram, torch.tensor(-1.0), torch.tensor(1.0)
    lo, hi = observer._non_linear_param_search()
    expected = TorchaoHistogramObserver._non_linear_param_search(observer)
    assert float(lo) == -1.0 and torch.equal(lo, expected[0]) and torch.equal(hi, expected[1])


# ------------------------------------------------------------------ entropy vs ONNX Runtime
def laplace_batches(outliers: dict[int, list[float]]) -> list[np.ndarray]:
    """8 batches of 16384 Laplace(0, 1) values (largest |x| 9.7-12), with `outliers` {batch: values}."""
    rng = np.random.default_rng(0)
    batches = [rng.laplace(0, 1, 16_384).astype(np.float32) for _ in range(8)]
    for k, values in outliers.items():
        batches[k][: len(values)] = values
    return batches


def ort_entropy_ranges(batches: list[np.ndarray], folder) -> dict[str, tuple[float, float]]:
    """ORT's entropy (lo, hi) for a Relu's input `z` and output `r`, calibrated on `batches`."""
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    graph = helper.make_graph(
        [helper.make_node("Relu", ["z"], ["r"])],
        "relu",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["n"])],
    )
    path = folder / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rest = iter(batches)

        def get_next(self):
            return {"z": b} if (b := next(self.rest, None)) is not None else None

    calibrator = create_calibrator(
        str(path),
        ["Relu"],
        augmented_model_path=str(folder / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": BINS, "num_quantized_bins": LEVELS},
    )
    calibrator.collect_data(Reader())
    data = calibrator.compute_data()
    return {name: tuple(float(v) for v in data[name].range_value) for name in ("z", "r")}


def observer_ranges(batches: list[np.ndarray]) -> dict[str, EntropyObserver]:
    """EntropyObservers fed the same batches as ORT's `z` and `r` tensors."""
    observers = {"z": EntropyObserver(dtype=torch.uint8), "r": EntropyObserver(dtype=torch.uint8)}
    for batch in batches:
        z = torch.from_numpy(batch)
        observers["z"](z)
        observers["r"](torch.relu(z))
    return observers


def test_entropy_equals_onnxruntime_on_the_same_histogram(tmp_path):
    """With the largest |x| in the first batch the histogram never re-bins: it holds the counts ORT's
    np.histogram finds over the same [-T, T] (bar values within float rounding of an edge), and the
    scoring is ORT's, so the range is ORT's up to float32 rounding of the bin edge (1e-6 T; a bin is
    T/1024). Both ranges clip well inside the data, so minmax or percentile would not pass."""
    batches = laplace_batches({0: [-13.0, 14.5, 11.0]})
    ort = ort_entropy_ranges(batches, tmp_path)
    for name, observer in observer_ranges(batches).items():
        lo, hi = (float(v) for v in observer.threshold())
        half = max(-float(observer.min_val), float(observer.max_val))
        assert lo == pytest.approx(ort[name][0], abs=1e-6 * half), name
        assert hi == pytest.approx(ort[name][1], abs=1e-6 * half), name
        assert hi < 0.75 * float(observer.max_val), name
    assert ort["r"][0] == 0.0 and ort["z"][0] < -5.0  # a ReLU output's range starts at its minimum, 0


def test_entropy_after_range_growth_stays_near_onnxruntime(tmp_path):
    """Outliers in later batches: the observer re-bins its histogram (ORT histograms all batches at once).

    Each re-binning moves a count by less than one (final) bin and rounds the cumulative counts, so
    after g re-binnings the cumulative histogram lies within g bins and g/2 counts of the exact one.
    ORT's KL argmin is itself a jumpy function of the histogram: over 20 seeds of 8 Laplace batches,
    adding one value at 1.02 T (2 % wider bins) moved ORT's threshold by up to 141 bins (0.14 T);
    the observer is held to that, 0.15 T. Measured here: 2 bins off on the Relu's input (3 re-binnings),
    0 on its output (2)."""
    batches = laplace_batches({2: [12.5], 4: [-13.5], 6: [-13.0, 14.5, 11.0]})  # the range grows 3 times
    ort = ort_entropy_ranges(batches, tmp_path)
    for name, observer in observer_ranges(batches).items():
        values = [np.maximum(b, 0) if name == "r" else b for b in batches]
        half = max(float(np.abs(v).max()) for v in values)
        exact = torch.histc(torch.from_numpy(np.concatenate(values)), BINS, -half, half).double()
        growths = sum(np.abs(v).max() > max(np.abs(u).max() for u in values[:k]) for k, v in enumerate(values) if k)
        cdf, true_cdf = observer.histogram.cumsum(0), exact.cumsum(0)
        k = torch.arange(BINS)
        assert growths >= 1, name
        assert (cdf >= true_cdf[(k - growths).clamp(min=0)] * (k >= growths) - growths / 2).all(), name
        assert (cdf <= true_cdf[(k + growths).clamp(max=BINS - 1)] + growths / 2).all(), name
        lo, hi = (float(v) for v in observer.threshold())
        assert abs(lo - ort[name][0]) <= 0.15 * half and abs(hi - ort[name][1]) <= 0.15 * half, name
        assert hi < 0.75 * half, name


# ------------------------------------------------------------------ entropy state and memory
def test_entropy_state_loads_strictly_into_a_new_observer():
    g = torch.Generator().manual_seed(0)
    first = EntropyObserver(dtype=torch.uint8)
    for scale in (1.0, 3.0, 2.0):  # the range grows once
        first(torch.randn(4096, generator=g) * scale)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = EntropyObserver(dtype=torch.uint8)
    assert second.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert set(second.state_dict()) == {"eps", "histogram", "min_val", "max_val"}
    for a, b in zip(first.calculate_qparams(), second.calculate_qparams()):
        assert torch.equal(a, b)
    more = torch.randn(4096, generator=g) * 5.0  # calibrating on continues the same way
    first(more), second(more)
    assert torch.equal(first.histogram, second.histogram)
    assert torch.equal(first.calculate_qparams()[0], second.calculate_qparams()[0])


def test_entropy_memory_is_a_fixed_number_of_bins():
    g = torch.Generator().manual_seed(0)
    observer = EntropyObserver(dtype=torch.uint8)
    sizes = {}
    for step in range(1, 41):
        observer(torch.randn(1000, generator=g) * step)  # a wider range every batch: 39 re-binnings
        sizes[step] = {name: tuple(b.shape) for name, b in observer.named_buffers()}
    assert sizes[1] == sizes[40] == {"eps": (1,), "histogram": (BINS,), "min_val": (), "max_val": ()}
    assert float(observer.histogram.sum()) == 40 * 1000  # every count kept through the re-binnings
    assert torch.equal(observer.histogram, observer.histogram.round())


# ------------------------------------------------------------------ end to end
def calibrated(q, name: str = "resnet"):
    """MODELS[name] prepared with `q` and calibrated in process on 3 batches of 16; also a test batch."""
    calib, test = model_data(name, batches=3, batch=16)
    prepared = prepare(MODELS[name][0](), calib[0], q)
    with torch.no_grad():
        for batch in calib:
            prepared(*batch.values())
    return prepared, test


def activation_observers(prepared) -> list[tuple[str, type]]:
    """(top-level module of the node whose value it observes, or "input"/"root", type) per activation observer."""
    from quantcli.quantizers.policy import module_scope

    found = []
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target.startswith("activation_post_process_"):
            module = prepared.get_submodule(node.target)
            if getattr(module, "ch_axis", None) is None and not hasattr(module, "obs_or_fqs"):  # not weights, not bias
                paths = module_scope(node.args[0])[0]
                top = paths[0] if paths else "input" if node.args[0].op == "placeholder" else "root"
                found.append((top, type(module)))
    return found


def output_sqnr(prepared, test: dict, name: str = "resnet") -> float:
    """Output SQNR (dB) of the converted model against fp32 on `test`."""
    with torch.no_grad():
        converted = _torch.convert(prepared, fold_quantize=True)
        return sqnr_db(leaves(MODELS[name][0]()(*test.values()))[0], leaves(converted(*test.values()))[0])


@pytest.mark.slow
def test_an_entropy_recipe_calibrates_and_quantizes_a_model():
    prepared, test = calibrated(section(observer="entropy"))
    assert {kind for _, kind in activation_observers(prepared)} == {EntropyObserver}
    state = prepared.state_dict()  # a fresh prepare (another process) takes the calibrated state strictly
    second = prepare(
        MODELS["resnet"][0](), model_data("resnet", batches=1, batch=16)[0][0], section(observer="entropy")
    )
    second.load_state_dict(state, strict=True)
    assert output_sqnr(prepared, test) == output_sqnr(second, test) > 34  # measured 37.8 dB; histogram: 45


@pytest.mark.slow
def test_an_entropy_override_calibrates_the_named_modules_only():
    from quantcli.quantizers.observers import ChosenRangeObserver

    prepared, test = calibrated(section(overrides=[{"names": ["layer2.*"], "observer": "entropy"}]))
    kinds = {}
    for top, kind in activation_observers(prepared):
        if top != "root" and top != "avgpool":  # the pooled output and the flatten share layer2's output qparams
            kinds.setdefault(top == "layer2", set()).add(kind)
    assert kinds == {True: {EntropyObserver}, False: {ChosenRangeObserver}}  # the others: the default, auto
    assert output_sqnr(prepared, test) > 35  # measured 38.9 dB


# ------------------------------------------------------------------ counts past float32's 2**24
@pytest.mark.parametrize("name", ["histogram", "entropy"])
def test_a_bin_holding_more_than_2_to_the_24_values_counts_them_all(name):
    """torch.histc counts in float32, where adding 1 to 2**24 gives 2**24: a ReLU output's zero bin in a
    large batch came out short, by an amount that depended on the thread count."""
    from quantcli.quantizers.observers import ACTIVATION_OBSERVERS

    n = 2**24 + 3 * 2**20
    x = torch.zeros(n)
    x[:1000] = torch.linspace(0.01, 6.0, 1000)  # a ReLU output: mostly exact zeros
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        observer = ACTIVATION_OBSERVERS[name]()
        observer(x)
    finally:
        torch.set_num_threads(threads)
    assert float(observer.histogram.double().sum()) == n


# ------------------------------------------------------------------ histogram counts: torch.histc's, bin for bin
def edge_values(lo: float, hi: float, bins: int, dtype) -> torch.Tensor:
    """Values at every bin edge of [lo, hi] as torch's float arithmetic places them, and their float neighbours on
    both sides: where a bin index computed any other way (a reciprocal's product, float64) lands elsewhere."""
    left, right = torch.tensor(lo, dtype=dtype), torch.tensor(hi, dtype=dtype)
    edges = left + (right - left) * torch.arange(bins + 1, dtype=dtype) / bins
    return torch.cat([edges, torch.nextafter(edges, right), torch.nextafter(edges, left)]).clamp(left, right)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (-3.7, 11.3), (-1e-3, 2.5e-4), (0.1, 0.1)])
def test_the_counts_are_torch_histcs_bin_for_bin(dtype, lo, hi):
    from quantcli.quantizers.counting import CHUNK, histc

    g = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            edge_values(lo, hi, 2048, dtype),
            lo + (hi - lo) * torch.rand(2 * CHUNK + 123, generator=g, dtype=dtype),  # several chunks, a partial one
            torch.tensor([lo - 1.0, hi + 1.0, lo, hi], dtype=dtype),  # outside [lo, hi]: not counted
        ]
    )
    if lo < hi:
        values = torch.cat([values, torch.tensor([float("nan")], dtype=dtype)])  # not counted either
    else:  # histc's range is then the values' own: NaN has none
        with pytest.raises(RuntimeError, match="not finite"):
            torch.histc(torch.tensor([lo, float("nan")], dtype=dtype), 2048, lo, hi)
        with pytest.raises(ValueError, match="not finite"):
            histc(torch.tensor([lo, float("nan")], dtype=dtype), 2048, lo, hi)
    counts = histc(values, 2048, lo, hi)
    assert counts.dtype == torch.int64
    assert torch.equal(counts.to(dtype), torch.histc(values, 2048, lo, hi))
    assert int(counts.sum()) == (int(((values >= lo) & (values <= hi)).sum()) if lo < hi else values.numel())
    if dtype == torch.float32:  # binned in float64 as asked, whatever the values' dtype
        assert torch.equal(
            histc(values, 2048, lo, hi, torch.float64).double(), torch.histc(values.double(), 2048, lo, hi)
        )


def test_the_histogram_observer_keeps_torchaos_state_batch_after_batch(monkeypatch):
    """The same histogram, range and qparams as torchao's own forward after each batch: a first batch, one inside
    the range, ones that widen it either way (the histograms combined), a constant one, one with an inf (torchao's
    own path); and a tensor over EXACT_FLOAT32_COUNTS values, binned in float64 as torchao bins it given float64."""
    from torchao.quantization.pt2e.observer import HistogramObserver as TorchaoHistogramObserver

    from quantcli.quantizers import observers

    monkeypatch.setattr(observers, "EXACT_FLOAT32_COUNTS", 5000)  # the float64 binning, on small tensors
    g = torch.Generator().manual_seed(1)
    batches = [
        torch.relu(torch.randn(64, 50, generator=g)),
        edge_values(0.0, 2.0, 2048, torch.float32),
        torch.randn(3000, generator=g) * 3,
        torch.randn(40, 200, generator=g) * 5 + 2,  # 8000 values: over the (patched) threshold
        torch.full((100,), 0.25),
        torch.tensor([1.0, float("inf"), -2.0]),
    ]
    for start in (0, 4):  # the constant batch first: a range of one value
        ours, theirs = observers.HistogramObserver(), TorchaoHistogramObserver()
        for x in batches[start:] + batches[:start]:
            assert ours(x) is x
            theirs(x.double() if x.numel() > 5000 else x)
            for name in ("histogram", "min_val", "max_val"):
                assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        assert ours.histogram.dtype == torch.float32 and float(ours.histogram.sum()) == sum(
            int(torch.isfinite(x).sum()) for x in batches
        )
        assert all(torch.equal(a, b) for a, b in zip(ours.calculate_qparams(), theirs.calculate_qparams()))
