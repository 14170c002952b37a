"""`report --plot`: per-layer SQNR along the depth of the network, PyTorch int8 and ORT side by side.

`series` is what gets drawn, taken from the report's JSON document; `plot` draws it and returns
it, so a test can hold the picture to the JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELLED = 3  # the worst layers (by local SQNR) get their names on the plot


def series(doc: dict[str, Any]) -> dict[str, Any]:
    """x: depth; y per series: the layers' SQNR in dB (None where not measured); the worst layers."""
    layers = doc["layers"]
    drawn = {"local": [d["local_db"] for d in layers], "accumulated": [d["accumulated_db"] for d in layers]}
    if doc.get("onnx"):
        drawn["ort_vs_fp32"] = [d.get("ort_vs_fp32_db") for d in layers]
        drawn["ort_vs_int8"] = [d.get("ort_vs_int8_db") for d in layers]
    return {"depth": [d["depth"] for d in layers], "names": [d["name"] for d in layers], "series": drawn,
            "labelled": doc["worst"][:LABELLED]}


def plot(doc: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Write a PNG of `doc`'s per-layer SQNRs to `path`; returns the series drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    drawn = series(doc)
    x, names = drawn["depth"], drawn["names"]
    panels = 2 if "ort_vs_int8" in drawn["series"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), squeeze=False)
    left = axes[0][0]
    _line(left, x, drawn["series"]["local"], "local (fp32 input)", "o-")
    _line(left, x, drawn["series"]["accumulated"], "accumulated (int8 input)", "s-")
    left.set_title("PyTorch int8 vs fp32")
    for name in drawn["labelled"]:
        i = names.index(name)
        left.annotate(name, (x[i], drawn["series"]["local"][i]), textcoords="offset points", xytext=(4, -12),
                      fontsize=8, color="tab:red")
    if panels == 2:
        right = axes[0][1]
        _line(right, x, drawn["series"]["ort_vs_fp32"], "ORT vs fp32", "^-")
        _line(right, x, drawn["series"]["ort_vs_int8"], "ORT vs PyTorch int8", "v-")
        right.set_title("ONNX Runtime (full optimizations)")
    for ax in axes[0]:
        ax.set_xlabel("depth (quantized op, graph order)")
        ax.set_ylabel("SQNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=100)
    plt.close(fig)
    return drawn


def _line(ax: Any, x: list[int], y: list[float | None], label: str, style: str) -> None:
    ax.plot(x, [float("nan") if v is None else min(v, 120.0) for v in y], style, label=label, markersize=3)
