"""Human-readable text of command results (the CLI layer; `--json` prints the documents themselves)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any


def plan(doc: dict[str, Any]) -> str:
    """`run --dry-run`: the resolved recipe as YAML, then the stages it would run."""
    import yaml

    lines = [yaml.safe_dump(doc["recipe"], sort_keys=False).rstrip(), "# plan:"]
    lines += [f"#   quantcli {step['command']} -> {step['out']}" for step in doc["steps"]]
    return "\n".join(lines)


def validated(doc: dict[str, Any]) -> str:
    return f"{doc['recipe']}: valid"


def _ranges(choice: dict[str, Any]) -> str:
    """`observer: auto`'s choice (quantcli.quantizers.range_choice) in words."""
    if "why" in choice:
        return f"{choice['rule']} ({choice['why']})"
    scores = ", ".join(f"{rule} {db} dB" for rule, db in choice["sqnr_db"].items())
    return f"{choice['rule']} (SQNR on {choice['held_out_samples']} held-out samples: {scores})"


def inspected(doc: dict[str, Any]) -> str:
    """`inspect`: the manifest's essentials, the graph's ops and the export report."""
    if "genai" in doc:
        return _genai(doc["path"], doc["genai"])
    manifest = doc["manifest"]
    lines = [f"{doc['path']}: {manifest.get('stage', '?')} artifact ({manifest.get('status', 'ok')})"]
    for key in ("quantcli_version", "recipe_hash", "parent", "options"):
        if key in manifest:
            lines.append(f"  {key}: {json.dumps(manifest[key], sort_keys=True)}")
    if "target" in doc:
        lines.append(f"  target: {doc['target']}")
    if "samples" in manifest:
        lines.append(f"  calibration: {manifest['batches']} batches, {manifest['samples']} samples")
    if "ranges" in manifest:
        lines.append(f"  activation ranges: {_ranges(manifest['ranges'])}")
    for name, info in manifest.get("files", {}).items():
        lines.append(f"  file {name}: {info['size']} bytes sha256 {info['sha256'][:12]}")
    for kind in ("inputs", "outputs"):
        for value in doc.get("io", {}).get(kind, []):
            lines.append(f"  {kind[:-1]} {value['name']}: {value['dtype']} [{', '.join(map(str, value['shape']))}]")
    ops = doc.get("graph", {}).get("ops", {})
    if ops:
        lines.append("  ops: " + ", ".join(f"{k}={v}" for k, v in ops.items()))
    if "report" in doc:
        lines += _report(doc["report"])
    if "report_mismatch" in doc:
        lines.append(f"  report: not shown: {doc['report_mismatch']} (rerun `quantcli export`)")
    if "genai_folder" in doc:
        lines.append(f"  onnxruntime-genai folder: {doc['genai_folder']} (`quantcli inspect` it)")
    return "\n".join(lines)


def _genai(path: str, info: dict[str, Any]) -> str:
    """An onnxruntime-genai folder: the decoder's shape, its inputs and outputs, the search defaults, the files."""
    heads = f"{info['num_attention_heads']} heads ({info['num_key_value_heads']} key/value) of {info['head_size']}"
    search = info.get("search") or {}
    return "\n".join(
        [
            f"{path}: onnxruntime-genai folder, {info['type']} decoder {info['model']}",
            f"  {info['num_hidden_layers']} layers, hidden {info['hidden_size']}, {heads}; "
            f"context {info['context_length']}",
            "  inputs: " + ", ".join(str(v) for v in (info.get("inputs") or {}).values()),
            "  outputs: " + ", ".join(str(v) for v in (info.get("outputs") or {}).values()),
            "  search: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(search.items())),
            "  files: " + ", ".join(info["files"]),
        ]
    )


def _kv_cache(check: dict[str, Any] | None) -> list[str]:
    if not check:
        return []
    ppl = check["perplexity"]
    return [
        f"  key/value cache: {check['prefill_tokens']} tokens at once then {check['steps']} one by one: "
        f"perplexity {ppl['cache']:.3f} (whole sequence {ppl['full_sequence']:.3f}), "
        f"logits within {check['max_logit_diff']:.2g}"
    ]


def _report(report: dict[str, Any]) -> list[str]:
    parity = report["parity"]
    floor = f", floor {parity['threshold_db']} dB" if parity["threshold_db"] is not None else ""
    on = f" on {parity['data']}" if parity.get("data") else ""
    verdict = "passed" if parity["passed"] else "FAILED"
    lines = [
        f"  parity{on}: {verdict}: ONNX Runtime adds {parity['excess_db']:.1f} dB of error to the int8 "
        f"model's (at most {parity['max_excess_db']}); ORT vs PyTorch int8 {parity['min_sqnr_db']:.1f} dB{floor}",
        "  SQNR vs fp32: " + ", ".join(f"{k} {v:.1f} dB" for k, v in report["sqnr_vs_float_db"].items()),
    ]
    if "emulated" in parity:
        lines.append(
            f"  parity on {parity['emulated']}'s arithmetic, emulated (this CPU cannot saturate); "
            f"this CPU's ONNX Runtime: {'passed' if parity['local']['passed'] else 'FAILED'}, "
            f"{parity['local']['excess_db']:.1f} dB"
        )
    if "unfused" in parity:
        lines.append(
            f"  parity on {parity['unfused']}'s arithmetic, unfused (this CPU saturates what {parity['unfused']} "
            f"computes exactly); this CPU's ONNX Runtime adds {parity['local']['excess_db']:.1f} dB"
        )
    lines += _u8s8(report.get("u8s8"))
    lines += _kernels(report.get("kernels"))
    lines += _kv_cache(report.get("kv_cache"))
    ev = report.get("evaluation")
    if not ev:
        return lines
    from quantcli.numerics.metrics import METRICS

    sizes = ev["size_bytes"]
    if not METRICS[ev["metric"]].higher_is_better:  # perplexity: the values themselves
        line = (
            f"  {ev['metric']} on {ev['samples']} samples ({ev['tokens']['fp32_torch']} tokens): fp32 "
            f"{ev['fp32_torch']:.3f}  fp32 ONNX {ev['fp32_onnx']:.3f}  quantized ONNX {ev['int8_onnx']:.3f} "
            f"(+{ev['drop']:.3f})"
        )
    elif METRICS[ev["metric"]].percent:
        line = (
            f"  {ev['metric']} on {ev['samples']} held-out samples: fp32 {100 * ev['fp32_torch']:.2f}%  "
            f"int8 ONNX {100 * ev['int8_onnx']:.2f}%  (drop {100 * ev['drop']:.2f} points)"
        )
    else:  # a similarity to the fp32 PyTorch model
        worst = f" (worst sample {ev['worst']['int8_onnx']:.4f})" if "worst" in ev else ""
        line = (
            f"  {ev['metric']} to fp32 PyTorch on {ev['samples']} samples: fp32 ONNX {ev['fp32_onnx']:.4f}  "
            f"int8 ONNX {ev['int8_onnx']:.4f}{worst}"
        )
    if ev.get("int8_arithmetic") == "unfused":
        line += " (int8 unfused: the target's arithmetic)"
    lines += [
        line,
        f"  size: fp32 ONNX {sizes['fp32_onnx'] / 1024:.1f} KiB, int8 ONNX {sizes['int8_onnx'] / 1024:.1f} KiB",
    ]
    for batch, t in ev["ort_latency"].items():
        lines.append(
            f"  ORT latency {batch.replace('_', ' ')}: fp32 {t['fp32_ms']:.3f} ms, int8 {t['int8_ms']:.3f} ms "
            f"({t['fp32_ms'] / t['int8_ms']:.2f}x)"
        )
    return lines


def _u8s8(section: dict[str, Any] | None) -> list[str]:
    """Per layer, the int8 weight pairs an x86 CPU without VNNI can saturate (reports before 0.3 have none)."""
    if section is None:
        return []
    layers = section["layers"]
    exposed = {k: v for k, v in layers.items() if v}
    head = (
        f"  int16 pair saturation (x86 without VNNI): {section['saturable_pairs']} saturable weight pairs in "
        f"{len(exposed)} of {len(layers)} u8 x s8 layers"
    )
    if section["target_saturates"]:
        head += f" (target {section['target_cpu']}: 0 expected)"
    else:
        head += f" (target {section['target_cpu']} does not saturate)"
    shown = sorted(exposed.items(), key=lambda kv: -kv[1])[:SHOWN_LAYERS]
    return [head] + [f"    {name}: {count}" for name, count in shown]


def _kernels(kernels: dict[str, Any] | None) -> list[str]:
    """Integer-kernel coverage and each float island with its source module (reports before 0.2 have none)."""
    if kernels is None:
        return []
    cov = kernels["coverage"]
    lines = [
        f"  integer kernels in ONNX Runtime: {cov['integer']} of {cov['total']} convs/matmuls"
        + (f" (float: {', '.join(f'{n} {t}' for t, n in cov['float_ops'].items())})" if cov["float_ops"] else "")
    ]
    if kernels.get("warning"):
        lines.append(f"  warning: {kernels['warning']}")
    if "weight_only" in kernels:
        left = kernels["weight_only"]["float_linears"]
        lines.append(
            f"  weight-only: {kernels['weight_only']['matmul_nbits']} MatMulNBits, "
            f"{kernels['weight_only'].get('gather_block_quantized', 0)} GatherBlockQuantized; "
            f"{len(left)} linears left float"
            + (f": {', '.join(str(n['module'] or n['name']) for n in left[:SHOWN_LAYERS])}" if left else "")
        )
    islands = kernels["islands"]
    expected = Counter(i["op_type"] for i in islands if i["allowed"])
    looked = [i for i in islands if not i["allowed"]]
    lines.append(
        f"  float islands: {len(looked)} avoidable"
        + (f"; expected: {', '.join(f'{n} {t}' for t, n in expected.most_common())}" if expected else "")
    )
    for island in looked:
        kind = f" [{island['module_type']}]" if island["module_type"] else ""
        lines.append(f"    {island['op_type']:<16} {island['module'] or '(no module)'}{kind}")
    return lines


SHOWN_LAYERS = 25  # rows of the per-layer table; --json has every layer


def layer_report(doc: dict[str, Any]) -> str:
    """`report`: the per-layer table, worst local SQNR first, then the whole-model figures."""
    import io

    from rich.console import Console
    from rich.table import Table

    ort = bool(doc.get("onnx"))
    table = Table(
        title=f"per-layer SQNR against fp32 on {doc['data']['samples']} {doc['data']['section']} samples "
        "(dB, higher is better)"
    )
    columns = ("#", "layer", "type", "op", "local", "accumulated") + (("ORT vs int8", "ORT vs fp32") if ort else ())
    for column in columns:
        table.add_column(column, justify="right" if column not in ("layer", "type", "op") else "left")
    by_name = {d["name"]: d for d in doc["layers"]}
    for name in doc["worst"][:SHOWN_LAYERS]:
        d = by_name[name]
        row = [str(d["depth"]), name, d["module_type"], d["op"], _db(d["local_db"]), _db(d["accumulated_db"])]
        if ort:
            row += [_db(d.get("ort_vs_int8_db")), _db(d.get("ort_vs_fp32_db"))]
        table.add_row(*row)
    buffer = io.StringIO()
    width = 100 + max((len(name) for name in doc["worst"][:SHOWN_LAYERS]), default=0)  # names never cut
    Console(file=buffer, width=width, no_color=True, highlight=False).print(table)
    lines = [buffer.getvalue().rstrip()]
    if len(doc["worst"]) > SHOWN_LAYERS:
        lines.append(f"({len(doc['worst']) - SHOWN_LAYERS} more layers: --json lists them all)")
    lines += _model_lines(doc)
    return "\n".join(lines)


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _model_lines(doc: dict[str, Any]) -> list[str]:
    lines = []
    for name, out in doc["model"]["outputs"].items():
        line = f"output {name}: int8 vs fp32 {out['int8_vs_fp32_db']:.1f} dB, max abs error {out['max_abs_error']:.4g}"
        if "ort_vs_fp32_db" in out:
            line += f"; ORT vs fp32 {out['ort_vs_fp32_db']:.1f} dB, ORT vs PyTorch int8 {out['ort_vs_int8_db']:.1f} dB"
        lines.append(line)
    ev = doc.get("evaluation")
    if ev:
        models = ", ".join(f"{k} {ev[k]:.4f}" for k in ("fp32_torch", "int8_torch", "int8_onnx") if k in ev)
        agree = ", ".join(f"{k} {v:.4f}" for k, v in ev.get("top1_agreement", {}).items())
        lines.append(
            f"{ev['metric']}: {models} (drop {ev['drop']:.4f})"
            + (f"; top-1 agreement with fp32: {agree}" if agree else "")
        )
    sizes = doc["sizes"]
    lines.append("size: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in sizes.items()))
    if "kernels" in doc:
        lines += [line.strip() for line in _kernels(doc["kernels"])]
    if doc.get("plot"):
        lines.append(f"plot: {doc['plot']}")
    return lines


def tuned(doc: dict[str, Any]) -> str:
    """`tune`: the goal, baseline and best trial, then every trial."""

    def measured(m: dict[str, Any]) -> str:
        metric = f"{doc['metric']} {m['int8_onnx']:.4f} (drop {m['drop']:.4f}), " if "int8_onnx" in m else ""
        return f"{metric}output SQNR {m['sqnr_db']:.1f} dB, {m['latency_ms']:.3f} ms"

    goal = ", ".join(f"{k} {v}" for k, v in doc["goal"].items())
    lines = [
        f"goal {goal}: {'met' if doc['achieved'] else 'NOT met'}",
        f"baseline: {measured(doc['baseline'])}",
        f"best: trial {doc['best']['trial']}: {measured(doc['best'])}; layers changed: "
        f"{', '.join(doc['layers_changed']) or 'none'}",
    ]
    for t in doc["trials"]:
        status = "" if t["status"] == "ok" else f" {t['status']}"
        lines.append(f"  trial {t['trial']:2d} {t['change']:<40} {measured(t)}{status}")
    lines.append(f"wrote {doc['model']} and {doc['recipe']} in {doc['seconds']:.0f}s")
    return "\n".join(lines)
