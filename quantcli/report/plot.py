"""`report --plot`: per-layer SQNR along the depth of the network, PyTorch int8 and ORT side by side.

`series` is what gets drawn, taken from the report's JSON document; `plot` draws it and returns
what its axes hold (each line's points, the labels written), read back from the figure, so a test
can hold the picture to the JSON. The PNG says it was written by quantcli (a text
chunk); an existing file at the path that does not is refused unless `--force` (`check_path`),
and the picture is written to a hidden sibling and renamed into place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELLED = 3  # the worst layers (by local SQNR) get their names on the plot
SOFTWARE = "quantcli report"  # the PNG's Software text chunk


def check_path(path: Path, force: bool) -> None:
    """Refuse to replace a file at `path` that quantcli's report did not write, unless `force`."""
    from quantcli import staging
    from quantcli.errors import ArtifactError

    if path.is_dir():
        raise ArtifactError(f"--plot {path} is a folder", "name a .png file")
    if path.exists() and not force and not _ours(path):
        raise ArtifactError(f"--plot {path} exists and was not written by quantcli report", staging.FORCE)


def _ours(path: Path) -> bool:
    marker = b"tEXtSoftware\x00" + SOFTWARE.encode()
    with open(path, "rb") as fh:
        return marker in fh.read(1 << 16)


def series(doc: dict[str, Any]) -> dict[str, Any]:
    """x: depth; y per series: the layers' SQNR in dB (None where not measured); the worst layers."""
    layers = doc["layers"]
    drawn = {"local": [d["local_db"] for d in layers], "accumulated": [d["accumulated_db"] for d in layers]}
    if doc.get("onnx"):
        drawn["ort_vs_fp32"] = [d.get("ort_vs_fp32_db") for d in layers]
        drawn["ort_vs_int8"] = [d.get("ort_vs_int8_db") for d in layers]
    return {
        "depth": [d["depth"] for d in layers],
        "names": [d["name"] for d in layers],
        "series": drawn,
        "labelled": doc["worst"][:LABELLED],
    }


def plot(doc: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Write a PNG of `doc`'s per-layer SQNRs to `path`; returns what the figure holds (`drawn`)."""
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
        left.annotate(
            name,
            (x[i], drawn["series"]["local"][i]),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
            color="tab:red",
        )
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
    _save(fig, Path(path))
    held = drawn_on(fig)
    plt.close(fig)
    return held


def drawn_on(fig: Any) -> dict[str, Any]:
    """What the figure's axes hold: per panel title, each line's label -> (x, y) and the annotations' texts."""
    panels = {}
    for ax in fig.axes:
        lines = {
            line.get_label(): ([float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()])
            for line in ax.get_lines()
        }
        panels[ax.get_title()] = {"lines": lines, "texts": [t.get_text() for t in ax.texts]}
    return {"panels": panels, "size_px": [int(v) for v in fig.get_size_inches() * fig.dpi]}


def _save(fig: Any, path: Path) -> None:
    from quantcli import staging

    tmp = staging.tmp_sibling(path)
    try:
        fig.savefig(str(tmp), format="png", dpi=100, metadata={"Software": SOFTWARE})
        staging.replace_into(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _line(ax: Any, x: list[int], y: list[float | None], label: str, style: str) -> None:
    ax.plot(x, [float("nan") if v is None else min(v, 120.0) for v in y], style, label=label, markersize=3)
