"""Weight-only quantization's recipe keys and numerics: the grid, GPTQ against a plain reimplementation of
the paper's algorithm, AWQ against a brute-force scale search, each against round to nearest on layers
with correlated inputs and outlier channels, on data they were not fitted to."""

from __future__ import annotations

import pytest
import torch
import yaml

from quantcli import recipe as recipes
from quantcli.quantizers.names import BLOCK_SIZES, WEIGHT_METHODS
from quantcli.weightonly.awq import GRID_POINTS, awq, candidate, clip, search
from quantcli.weightonly.clipping import candidates, clipped_fit
from quantcli.weightonly.gptq import gptq
from quantcli.weightonly.grid import Grid, dequantize, fit, per_column, quantize
from quantcli.weightonly.methods import METHODS
from quantcli.weightonly.rtn import rtn
from tests.conftest import assert_fails, cli

MODEL = {"huggingface": "folder", "task": "text-generation"}
ISSUE_KEYS = {
    "activations": "none",
    "weights": {"dtype": "int4", "block_size": 32, "symmetric": True, "method": "gptq"},
}


def problems(quantization, **sections) -> list[str]:
    sections.setdefault("calibration", {"data": "text.txt"})
    return recipes.schema_problems({"model": MODEL, "quantization": quantization, **sections})[1]


def test_the_issue_keys_validate_and_weight_only_gets_opset_21():
    recipe, found = recipes.schema_problems(
        {"model": MODEL, "calibration": {"data": "t.txt"}, "quantization": {"target": "onnxruntime", **ISSUE_KEYS}}
    )
    assert found == []
    q = recipe.quantization
    assert q.weight_only and q.needs_data and recipe.export.opset == 21
    assert (q.weights.dtype, q.weights.block_size, q.weights.symmetric, q.weights.method) == ("int4", 32, True, "gptq")
    assert recipes.Recipe.model_validate(recipe.model_dump(mode="json")) == recipe  # a recorded recipe reloads
    assert METHODS.keys() == set(WEIGHT_METHODS)


@pytest.mark.parametrize(
    ("quantization", "sections", "expected"),
    [
        ({"activations": "none", "weights": {"dtype": "int4", "block_size": 48}}, {}, "block_size: 48 is not a block"),
        ({"activations": "none", "weights": {"dtype": "int4"}}, {}, "int4 needs a block size"),
        ({"weights": {"dtype": "int4", "block_size": 32}}, {}, "set quantization.activations: none"),
        ({"weights": {"method": "gptq"}}, {}, "method gptq is weight-only"),
        ({"activations": "nothing"}, {}, "must be none (weight-only) or a mapping"),
        ({"activations": "none", "observer": "minmax"}, {}, "observer: weight-only quantization"),
        ({"activations": "none", "weights": {"method": "gptqq"}}, {}, "did you mean 'gptq'"),
        ({"activations": "none", "weights": {"granularity": "per_tensor"}}, {}, "per channel or per block"),
        (
            {"activations": "none", "overrides": [{"names": ["head"], "activations": {"dtype": "int8"}}]},
            {},
            "overrides.0.activations: activations stay float",
        ),
        ({"activations": "none", "weights": {"method": "awq"}}, {"calibration": None}, "method awq collects"),
        ({"activations": "none"}, {"export": {"opset": 18}}, "needs 21 or higher"),
    ],
)
def test_bad_weight_only_keys_name_their_key(quantization, sections, expected):
    sections = {"calibration": {"data": "text.txt"}, **sections}
    if sections["calibration"] is None:
        del sections["calibration"]
        found = recipes.schema_problems({"model": MODEL, "quantization": quantization, **sections})[1]
    else:
        found = problems(quantization, **sections)
    assert any(expected in p for p in found), found


def test_per_channel_spellings_and_rtn_needs_no_calibration():
    for spelling in ({}, {"block_size": 0}, {"block_size": None}):
        recipe, found = recipes.schema_problems(
            {"model": MODEL, "quantization": {"activations": "none", "weights": {"dtype": "int8", **spelling}}}
        )
        assert found == [] and recipe.quantization.weights.block_size is None
        assert not recipe.quantization.needs_data  # rtn everywhere: no calibration section needed


def test_validate_a_bad_block_size_exits_2_with_one_line(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}")
    bad = {**ISSUE_KEYS, "weights": {**ISSUE_KEYS["weights"], "block_size": 24, "method": "rtn"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "quantization": bad}))
    line = assert_fails(cli("validate", path), 2, "quantization.weights.block_size: 24")
    assert ", ".join(map(str, BLOCK_SIZES)) in line


# ---------------------------------------------------------------- the grid


def test_the_grid_rounds_every_weight_within_half_a_step_with_a_short_last_block():
    w = torch.randn(6, 80, generator=torch.Generator().manual_seed(0))
    grids = [(Grid(4, True, 32), False), (Grid(4, True, 32), True), (Grid(4, False, 32), False)]
    grids += [(Grid(8, True, None), False), (Grid(8, True, None), True), (Grid(8, False, 16), False)]
    for grid, exact_extreme in grids:
        scale, zero = fit(w, grid, exact_extreme=exact_extreme)
        assert scale.shape == (6, grid.blocks(80)) and (zero is None) == grid.symmetric
        codes = quantize(w, scale, zero, grid)
        assert codes.dtype == grid.dtype and grid.qmin <= int(codes.min()) and int(codes.max()) <= grid.qmax
        error = (dequantize(codes, scale, zero, grid) - w).abs()
        step = per_column(scale, 80, grid).abs()
        # the extreme on the grid: a value of the other sign may lie beyond qmax, a step at most
        clipped = (codes == grid.qmax) if exact_extreme else torch.zeros_like(codes, dtype=torch.bool)
        assert bool((error <= torch.where(clipped, step, step / 2) + 1e-6).all())
    grid = Grid(4, True, 32)
    scale, _ = fit(w, grid)  # the last block holds columns 64..79 only: its own largest magnitude
    assert torch.allclose(scale[:, 2], w[:, 64:].abs().amax(1) / 7.5)
    scale, _ = fit(w, grid, exact_extreme=True)  # round to nearest's: its extreme lands exactly on -8
    last = w[:, 64:]
    extreme = last.gather(1, last.abs().argmax(1, keepdim=True)).squeeze(1)
    assert torch.allclose(scale[:, 2], extreme / -8)
    codes = quantize(w, scale, None, grid)
    assert bool((codes[:, 64:].gather(1, last.abs().argmax(1, keepdim=True)) == -8).all())


# ---------------------------------------------------------------- GPTQ


def correlated(samples: int, k: int, seed: int) -> torch.Tensor:
    """Inputs whose channels are correlated, a few of them large (as a transformer's are)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=torch.Generator().manual_seed(99)) * 0.3 + torch.eye(k)
    magnitude = torch.ones(k)
    magnitude[::7] = 8.0
    return (torch.randn(samples, k, generator=g, dtype=torch.float64) @ mixing.double()) * magnitude.double()


def output_error(w: torch.Tensor, result, x: torch.Tensor) -> float:
    """||X W^T - (X / s) Wq^T||^2 computed on the samples themselves."""
    xs = x if result.input_scale is None else x / result.input_scale.double()
    return float(((x @ w.double().T - xs @ result.weight().double().T) ** 2).sum())


def reference_gptq(w: torch.Tensor, h: torch.Tensor, grid: Grid, damp: float = 0.01) -> torch.Tensor:
    """GPTQ written out plainly: act-order, damping, each column's error spread over the rest through the
    inverse Hessian of the columns not yet quantized (updated by elimination, no Cholesky, no lazy batches),
    on the grids of the clip search (tested below against a brute force)."""
    w, h = w.double().clone(), h.double().clone()
    scale, zero = clipped_fit(w.float(), h, grid)
    s, z = per_column(scale, w.shape[1], grid), None if zero is None else per_column(zero, w.shape[1], grid)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    h = h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(len(h), dtype=h.dtype)
    inverse = torch.linalg.inv(h)
    codes = torch.empty(w.shape, dtype=grid.dtype)
    for j, column in enumerate(order.tolist()):
        zj = None if z is None else z[:, column : column + 1]
        q = quantize(w[:, column : column + 1], s[:, column : column + 1], zj, grid)
        codes[:, column] = q[:, 0]
        err = (w[:, column] - dequantize(q, s[:, column : column + 1], zj, grid)[:, 0].double()) / inverse[j, j]
        rest = order[j:]
        w[:, rest] -= err[:, None] * inverse[j, j:][None, :]
        inverse = inverse - inverse[:, j : j + 1] @ inverse[j : j + 1, :] / inverse[j, j]
    return codes


@pytest.mark.parametrize("grid", [Grid(4, True, 32), Grid(4, False, 16), Grid(8, True, None)])
def test_gptq_equals_a_plain_reimplementation_of_the_algorithm(grid):
    x = correlated(256, 72, seed=1)  # 72 columns: lazy batches of 32 (a short last one), a short last block
    w = torch.randn(24, 72, generator=torch.Generator().manual_seed(2))
    h = x.T @ x
    result = gptq(w, h, grid, lazy=32)
    assert torch.equal(result.codes, reference_gptq(w, h, grid))
    assert torch.equal(gptq(w, h, grid, lazy=32).codes, result.codes)  # deterministic


@pytest.mark.parametrize("grid", [Grid(4, True, 32), Grid(4, False, 32), Grid(8, True, None)])
def test_gptq_has_less_output_error_than_rtn_on_data_it_did_not_see(grid):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(3))
    seen, unseen = correlated(512, 96, seed=4), correlated(512, 96, seed=5)
    result = gptq(w, seen.T @ seen, grid)
    baseline = rtn(w, grid)
    assert output_error(w, result, seen) < 0.5 * output_error(w, baseline, seen)
    assert output_error(w, result, unseen) < 0.6 * output_error(w, baseline, unseen)  # measured 0.20-0.28


def test_gptq_zeroes_the_weights_of_inputs_that_were_always_zero():
    x = correlated(128, 40, seed=6)
    x[:, 5] = 0
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(7))
    result = gptq(w, x.T @ x, Grid(4, True, 16))
    assert bool((result.weight()[:, 5] == 0).all())


# ---------------------------------------------------------------- AWQ


def test_awq_picks_the_scale_a_brute_force_search_on_the_samples_picks():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(8))
    x = correlated(384, 64, seed=9)
    grid = Grid(4, True, 32)
    magnitude = x.abs().mean(0).float()
    _, alpha = search([w], x.T @ x, magnitude, [grid])
    errors = [group_errors([w], [grid], magnitude, x, point) for point in range(GRID_POINTS)]
    assert alpha == min(range(GRID_POINTS), key=errors.__getitem__) / GRID_POINTS and alpha > 0


def group_errors(ws: list, grids: list, magnitude: torch.Tensor, x: torch.Tensor, point: int) -> float:
    """The output error on the samples, summed over the linears reading x, at alpha = point / GRID_POINTS
    (point 0: round to nearest on the half-span grid the search uses)."""
    return sum(
        output_error(
            w, rtn(w, g, exact_extreme=False) if point == 0 else candidate(w, magnitude, point / GRID_POINTS, g), x
        )
        for w, g in zip(ws, grids)
    )


def test_the_linears_of_one_input_share_the_scale_of_least_summed_error_never_worse_than_rtn():
    g = torch.Generator().manual_seed(16)
    ws = [torch.randn(n, 64, generator=g) for n in (32, 16, 16)]  # q, k, v
    grids = [Grid(4, True, 32), Grid(4, True, 32), Grid(4, False, 16)]
    x = correlated(384, 64, seed=17)
    magnitude = x.abs().mean(0).float()
    results, alpha = search(ws, x.T @ x, magnitude, grids)
    errors = [group_errors(ws, grids, magnitude, x, point) for point in range(GRID_POINTS)]
    assert alpha == min(range(GRID_POINTS), key=errors.__getitem__) / GRID_POINTS and alpha > 0
    assert all(torch.equal(r.input_scale, results[0].input_scale) for r in results)  # one scale for the three
    assert sum(output_error(w, r, x) for w, r in zip(ws, results)) < 0.9 * errors[0]
    alone = [search([w], x.T @ x, magnitude, [grid])[1] for w, grid in zip(ws, grids)]
    assert len(set(alone)) > 1  # each alone would pick another alpha: the shared one is a choice for the group
    final, chosen = awq(ws, x.T @ x, magnitude, grids)
    assert chosen == alpha and all(torch.equal(r.input_scale, results[0].input_scale) for r in final)
    assert [r.grid for r in final] == grids
    # misleading magnitudes (small where the inputs are large): every alpha > 0 does worse, alpha 0 is RTN
    results, alpha = search(ws, x.T @ x, 1 / magnitude, grids)
    assert alpha == 0 and all(r.input_scale is None for r in results)
    rounded = [rtn(w, grid, exact_extreme=False) for w, grid in zip(ws, grids)]
    assert all(torch.equal(r.codes, q.codes) for r, q in zip(results, rounded))


@pytest.mark.parametrize("grid", [Grid(4, True, 32), Grid(4, False, 16)])
def test_awq_clips_each_block_where_a_brute_force_search_on_the_samples_does(grid):
    w = torch.randn(16, 80, generator=torch.Generator().manual_seed(14))  # a short last block
    x = correlated(256, 80, seed=15)
    result = clip(w, x.T @ x, grid)
    size = grid.block_size
    block = lambda t: torch.nn.functional.pad(t, (0, grid.blocks(80) * size - 80)).reshape(len(t), -1, size)  # noqa: E731
    xs = block(x)  # [samples, blocks, size]: each block's own inputs
    errors, scales = [], []
    spans = (False, True) if grid.symmetric else (False,)
    for exact in spans:  # each block's own output error on the samples, for every range factor and span
        for shrink in [1 - point / 20 for point in range(10)]:
            scale, zero = fit(w, grid, torch.full(scale_shape(w, grid), shrink), exact_extreme=exact)
            e = block(w.double() - dequantize(quantize(w, scale, zero, grid), scale, zero, grid).double())
            errors.append(torch.einsum("tkb,nkb->tnk", xs, e).pow(2).sum(0))
            scales.append(scale)
    assert len(errors) == len(candidates(grid))
    best = torch.stack(errors).argmin(0)  # [N, blocks]
    assert torch.equal(result.scale, torch.stack(scales).gather(0, best[None])[0])
    if grid.symmetric:  # blocks of both spans chosen: the value of largest magnitude on the grid's end, or not
        assert 0 < int((best >= 10).sum()) < best.numel()


def scale_shape(w: torch.Tensor, grid: Grid) -> tuple[int, int]:
    return w.shape[0], grid.blocks(w.shape[1])


def test_awq_has_less_output_error_than_rtn_on_data_it_did_not_see():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(10))
    seen, unseen = correlated(512, 96, seed=11), correlated(512, 96, seed=12)
    grid = Grid(4, True, 32)
    (result,), _ = awq([w], seen.T @ seen, seen.abs().mean(0).float(), [grid])
    half_span = output_error(w, rtn(w, grid, exact_extreme=False), unseen)  # the grid AWQ searches on
    assert output_error(w, result, unseen) < 0.45 * half_span  # measured 0.38 (0.48 clipped on one span)
    assert output_error(w, result, unseen) < 0.55 * output_error(w, rtn(w, grid), unseen)  # measured 0.49
    (scaled_only,), _ = search([w], seen.T @ seen, seen.abs().mean(0).float(), [grid])
    assert output_error(w, scaled_only, unseen) < 0.8 * half_span  # measured 0.71


# ---------------------------------------------------------------- token windows


def test_text_cut_into_token_windows_without_padding(tmp_path):
    from quantcli.loading.files import reader
    from tests import hf_folders

    texts = [f"line {i} of some calibration text for a decoder" for i in range(30)]
    tokenizer = hf_folders.bytelevel(texts)
    tokenizer.save_pretrained(tmp_path / "decoder")
    (tmp_path / "decoder" / "config.json").write_text('{"model_type": "llama"}')  # the tokenizer is what is read
    (tmp_path / "text.txt").write_text("\n".join(texts) + "\n")
    inputs = [{"name": n, "shape": [1, 8], "dtype": "int64"} for n in ("input_ids", "attention_mask")]
    recipe = recipes.resolve_paths(
        recipes.parse(
            {
                "model": {"huggingface": "decoder", "task": "text-generation"},
                "inputs": inputs,
                "calibration": {"data": "text.txt", "windows": True, "max_length": 8, "batch_size": 4},
            }
        ),
        tmp_path,
    )
    _, batches = reader(recipe, "calibration").iter_batches(4, None)
    batches = list(batches)
    joined = [t for text in texts for t in tokenizer(text)["input_ids"]]
    ids = [row for b in batches for row in b["input_ids"].tolist()]
    assert len(ids) == len(joined) // 8 and [t for row in ids for t in row] == joined[: len(ids) * 8]
    assert all(b["attention_mask"].all() and b["input_ids"].shape[1] == 8 for b in batches)
    assert [len(b["input_ids"]) for b in batches[:-1]] == [4] * (len(batches) - 1)
    assert problems({"activations": "none"}, calibration={"data": "d.npz", "windows": True})  # arrays: no windows


# ---------------------------------------------------------------- perplexity


def test_perplexity_is_exp_of_the_mean_next_token_cross_entropy_over_attended_positions():
    import numpy as np

    from quantcli.numerics.metrics import IGNORE, METRICS, next_tokens

    g = torch.Generator().manual_seed(13)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    logits = torch.randn(3, 7, 50, generator=g) * 3
    targets = next_tokens({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert (targets[:, -1] == IGNORE).all() and (targets[1, 4:] == IGNORE).all() and (targets[2, :2] == IGNORE).all()
    assert targets[0, 0] == ids[0, 1] and targets[2, 2] == ids[2, 3]
    labelled = torch.from_numpy(targets) != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[labelled].double(), torch.from_numpy(targets)[labelled]).exp()
    accumulator = METRICS["perplexity"].accumulator()
    for row in range(3):  # batch by batch
        accumulator.update(logits[row : row + 1].numpy(), logits[row : row + 1].numpy(), targets[row : row + 1])
    result = accumulator.result()
    assert result["value"] == pytest.approx(float(expected), rel=1e-4) and result["tokens"] == int(labelled.sum())
    assert np.isclose(float(expected), result["value"], rtol=1e-4)


def test_perplexity_fits_decoders_only_and_takes_no_targets():
    section = {"data": "eval.txt", "metric": "perplexity", "windows": True}
    assert problems({"activations": "none"}, evaluation=section) == []
    assert any("scores each next token" in p for p in problems({}, evaluation={**section, "targets": "label"}))
    found = recipes.schema_problems(
        {"model": {"huggingface": "f", "task": "text-classification"}, "evaluation": section}
    )[1]
    assert any("perplexity does not fit task text-classification" in p for p in found), found


def test_synthetic_inputs_attend_every_token():
    """RTN needs no data; without any, export's parity sample is synthetic, and a mask hiding every token
    (where PyTorch and ONNX Runtime differ even in fp32) would fail it."""
    from quantcli.loading.inputs import synthetic

    specs = [recipes.InputSpec(name=n, shape=[2, 4], dtype="int64") for n in ("input_ids", "attention_mask")]
    batch = synthetic(specs)
    assert (batch["attention_mask"] == 1).all() and (batch["input_ids"] == 0).all()


def test_tune_refuses_a_weight_only_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "quantization": {"activations": "none"}}))
    assert_fails(
        cli("tune", "--recipe", path, "-o", tmp_path / "t", "--min-sqnr", "20"), 2, "this recipe is weight-only"
    )
