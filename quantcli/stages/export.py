"""export: converted program -> one self-contained ONNX QDQ file, checked, shape-inferred, parity-tested."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from quantcli import artifacts, genai
from quantcli.errors import NumericsError, RecipeError
from quantcli.loading.data import is_callable_source, to_tensors
from quantcli.loading.headers import check_sources
from quantcli.loading.inputs import held_out_batch
from quantcli.numerics import parity
from quantcli.onnx import export as onnx_export
from quantcli.onnx import external, fusion, runtime
from quantcli.recipe import WEIGHT_ONLY_OPSET, Recipe
from quantcli.stages.base import StageResult, callable_digest, data_hashes, produce, recipe_for

log = logging.getLogger("quantcli")


def outputs(program: Any, recipe: Recipe, sample: dict[str, Any]) -> list[Any]:
    """The flattened outputs of `program` run in PyTorch on `sample`, as numpy arrays."""
    from quantcli import _torch

    with _torch.torch.no_grad():
        result = _torch.runnable(program)(*to_tensors(sample, recipe.inputs))
    return [t.numpy() for _, t in _torch.output_leaves(result)]


def onnx_model(
    parent: artifacts.Artifact, recipe: Recipe, opset: int, path: Path, limit: int = external.LIMIT_BYTES
) -> tuple[Any, Any]:
    """(the converted program, its checked and shape-inferred ONNX model, saved at `path`: with external data
    beside it where its tensors exceed `limit` bytes)."""
    from quantcli import _torch

    program = _torch.load_program(parent.file(artifacts.PROGRAM))
    io = parent.manifest["io"]
    if genai.enabled(recipe):  # a decoder with a key/value cache, traced anew with what convert produced
        model = genai.decoder_model(parent, recipe, opset)
    else:
        model = onnx_export.to_onnx(program, opset=opset, input_names=io["inputs"], output_names=io["outputs"])
    if "weight_only" in parent.manifest:  # int4/int8 codes where the float weights were (MatMulNBits' layout)
        from quantcli.onnx import blocked
        from quantcli.weightonly import apply

        codes = _torch.load_state(parent.file(artifacts.WEIGHT_CODES))
        layers = apply.load(parent.manifest["weight_only"], codes)
        blocked.store(model, layers, runtime_form=genai.enabled(recipe))  # the decoder: only ORT runs it
    onnx_export.tidy(model)
    if not genai.enabled(recipe):  # the decoder names its own (quantcli.onnx.decoder.name_dims)
        onnx_export.rename_dims(model, recipe.inputs)
    return program, external.checked(model, path, limit)


def source(src: str | Path, opset: int | None, recipe_path: str | Path | None) -> tuple[artifacts.Artifact, Recipe]:
    """The converted artifact and its recipe with --recipe's export/evaluation and --opset applied."""
    parent = artifacts.open_artifact(src, ("converted",), "export")
    recipe = recipe_for("exported", parent, recipe_path)
    if opset is not None:
        recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update={"opset": opset})})
    if recipe.quantization.weight_only and recipe.export.opset < WEIGHT_ONLY_OPSET:
        raise RecipeError(
            f"--opset {recipe.export.opset}: weight-only quantization needs opset {WEIGHT_ONLY_OPSET} or higher "
            "(int4 and blocked DequantizeLinear)",
            f"use --opset {WEIGHT_ONLY_OPSET}",
        )
    return parent, recipe


def measure(parent: artifacts.Artifact, recipe: Recipe, program: Any, model: Any, path: Path) -> dict[str, Any]:
    """The report of the ONNX file at `path`: parity (on a batch calibration did not see), SQNR against fp32,
    graph summary, integer-kernel coverage and float islands in ORT's optimized graph (a warning when under
    half), evaluation."""
    from quantcli import _torch
    from quantcli.report import evaluate

    sample, sample_of = held_out_batch(recipe)
    float_program = _torch.load_program(parent.file(artifacts.FLOAT_PROGRAM))
    names = parent.manifest["io"]["outputs"]
    fp32, int8 = outputs(float_program, recipe, sample), outputs(program, recipe, sample)
    weight_only = recipe.quantization.weight_only  # float activations: no u8 x s8 kernel, nothing saturates
    target_cpu = recipe.quantization.target_cpu
    saturation = None if weight_only else target_arithmetic(model, target_cpu)
    arithmetic = saturation["parity_arithmetic"] if saturation else "this cpu"
    limits = {"max_excess_db": recipe.export.parity_max_excess_db, "min_sqnr_db": recipe.export.parity_min_sqnr_db}
    check = parity.verdict(names, fp32, int8, runtime.run(runtime.session(path), sample), **limits)
    if arithmetic == "emulated":  # this CPU cannot saturate: the target's arithmetic decides, this ORT must agree too
        from quantcli.onnx import u8s8

        target = parity.verdict(names, fp32, int8, runtime.run_model(u8s8.emulate(model)[0], sample), **limits)
        check = parity.with_local(target, check, target_cpu)
    elif arithmetic == "unfused":  # this CPU saturates what the target computes exactly: ORT unfused computes that
        target = parity.verdict(names, fp32, int8, runtime.run(runtime.session(path, optimize=False), sample), **limits)
        check = parity.on_target(target, check, target_cpu)
        log.warning(
            f"this CPU's u8 x s8 kernels saturate {saturation['saturable_pairs']} weight pairs of this model for "
            f"{target_cpu}, which computes them exactly: ONNX Runtime here gives other outputs than on {target_cpu}; "
            "parity and evaluation ran it unfused (graph optimizations off), as the target computes it",
            extra={"warning": True},
        )
    kernels = fusion.analyze(path, weight_only=weight_only)
    warning = fusion.coverage_warning(kernels)
    if warning is not None:
        log.warning(warning, extra={"warning": True})
    report = {
        "parity": {**check, "data": sample_of},
        "u8s8": saturation,
        "sqnr_vs_float_db": {name: figures["ort_vs_fp32_db"] for name, figures in check["per_output"].items()},
        "onnx": {
            **onnx_export.graph_summary(model),
            "shapes": onnx_export.shape_coverage(model),
            "size_bytes": external.file_bytes(path),
            "external_data": artifacts.data_path(path).exists(),
        },
        "kernels": {**kernels, "warning": warning},
    }
    if weight_only:
        from quantcli.weightonly.apply import kind, sizes

        layers = parent.manifest["weight_only"]
        report["weight_only"] = {
            "layers": sum(kind(r) == "linear" for r in layers),
            "embeddings": sum(kind(r) == "embedding" for r in layers),
            "linear_weight_bytes": sizes(layers),
            "embedding_bytes": sizes(layers, "embedding"),
        }
    if genai.enabled(recipe):
        report["kv_cache"] = cache_check(path, sample)
    if recipe.evaluation is not None:
        float_file = parent.file(artifacts.FLOAT_PROGRAM)
        report["evaluation"] = evaluate.evaluate(
            recipe, float_program, path, parent.manifest["io"], float_file, unfused=arithmetic == "unfused"
        )
    return report


CACHE_STEPS = 64  # the most tokens export's cache check decodes one by one (a run of the whole model each)


def cache_check(path: Path, sample: dict[str, Any]) -> dict[str, Any]:
    """The decoder run through its cache (half the sample's tokens at once, at most CACHE_STEPS then one a run)
    against the whole sequence at once: the largest logit difference and the sample's perplexity each way."""
    from quantcli.numerics.metrics import Perplexity, next_tokens
    from quantcli.onnx import decoder

    sess = runtime.session(path)
    full = runtime.run(sess, sample)[0]
    length = sample["input_ids"].shape[1]
    prefill = max(1, length // 2, length - CACHE_STEPS)
    stepwise = decoder.stepwise_logits(sess, sample, prefill)
    targets = next_tokens(sample)
    figures = {}
    for name, logits in (("full_sequence", full), ("cache", stepwise)):
        metric = Perplexity()
        metric.update(logits, logits, targets)
        figures[name] = metric.figures()["value"]
    return {
        "prefill_tokens": prefill,
        "steps": length - prefill,
        "max_logit_diff": float(abs(full - stepwise).max()),
        "perplexity": figures,
    }


def target_arithmetic(model: Any, target_cpu: str) -> dict[str, Any]:
    """The report's u8s8 section: per layer ORT runs in a pairing u8 x s8 kernel, the int8 weight pairs some uint8
    input can saturate on x86 without VNNI (zero expected for a model built for such a target), and on which
    arithmetic parity judges the model (`parity_arithmetic`):

    - "emulated": the target saturates and this CPU does not, so ORT here cannot show what the target computes;
      the emulated model (quantcli.onnx.u8s8) does, run with graph optimizations off;
    - "unfused": this CPU saturates pairs the target (VNNI, arm64) computes exactly; ORT with graph optimizations
      off dequantizes and runs the float op, which computes the target's products without saturation;
    - "this cpu": ORT here computes what the target does.
    """
    from quantcli.onnx import u8s8
    from quantcli.quantizers.cpu import detect_cpu, saturates_only_here, saturates_u8s8

    here = detect_cpu()
    counts = u8s8.saturable_pairs(model)
    pairs = sum(counts.values())
    if saturates_u8s8(target_cpu) and not saturates_u8s8(here):
        arithmetic = "emulated"
    elif pairs and saturates_only_here(target_cpu, here):
        arithmetic = "unfused"
    else:
        arithmetic = "this cpu"
    return {
        "target_cpu": target_cpu,
        "target_saturates": saturates_u8s8(target_cpu),
        "this_cpu": here,
        "parity_arithmetic": arithmetic,
        "saturable_pairs": pairs,
        "layers": counts,
    }


def _callable_keys(recipe: Recipe) -> dict[str, str]:
    """A data callable is keyed by what it yields: every evaluation batch; the calibration batches up to
    the parity sample (loading.inputs.held_out_batch)."""
    keys = {}
    ev, cal = recipe.evaluation, recipe.calibration
    if ev is not None and is_callable_source(ev.data):
        keys["evaluation.data"] = callable_digest(recipe, "evaluation", None)
    if cal is not None and is_callable_source(cal.data):
        keys["calibration.data"] = callable_digest(recipe, "calibration", (cal.num_batches or 0) + 1)
    return keys


def run(
    src: str | Path,
    out: str | Path,
    *,
    opset: int | None = None,
    recipe_path: str | Path | None = None,
    force: bool = False,
    external_above: int = external.LIMIT_BYTES,
) -> StageResult:
    """Export; a model whose tensors exceed `external_above` bytes keeps them in `<out>.data` beside it."""
    parent, recipe = source(src, opset, recipe_path)
    out = Path(out)
    check_sources(recipe, ("calibration", "evaluation"))  # the parity sample and evaluation data, before work
    # the parity sample is data the ranges were not fitted to (loading.inputs.held_out_batch)
    data = data_hashes(
        {
            f"{name}.data": getattr(recipe, name).data
            for name in ("calibration", "evaluation")
            if getattr(recipe, name) is not None
        }
    )
    data.update(_callable_keys(recipe))

    def body(st: Any) -> dict[str, Any]:
        program, model = onnx_model(parent, recipe, recipe.export.opset, st.tmp, external_above)
        st.report = measure(parent, recipe, program, model, st.tmp)
        return {"io": parent.manifest["io"], "status": "ok" if st.report["parity"]["passed"] else "parity_failed"}

    result = produce("exported", out, recipe=recipe, parent=parent, options={}, data=data, force=force, body=body)
    if result.manifest["status"] != "ok":
        raise NumericsError(
            f"parity failed: {parity.failure(result.details['report']['parity'])} (model and report written to {out})",
            f"`quantcli report {src} --onnx {out}` shows the layer where ONNX Runtime diverges",
        )
    if genai.enabled(recipe) and not genai.current(out):  # the runtime folder of this very model
        result.details["genai"] = str(genai.write_folder(out, recipe))
    return result
