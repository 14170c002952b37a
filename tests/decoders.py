"""The weight-only decoders more than one test module reads, made once a session for all pytest-xdist workers.

The Hugging Face folders (Llama and Qwen2 with the large norm channels of a trained LLM, GPT-2) and the Llama
int4 RTN `quantcli run` (with a perplexity evaluation): tests/test_weight_only_chain.py compares GPTQ and AWQ
with it, tests/test_genai.py generates from its onnxruntime-genai folder. Tests read them, never write them.
"""

from __future__ import annotations

import json
from pathlib import Path

from filelock import FileLock

from tests import byo, hf_folders
from tests.conftest import cli

TEXTS = [f"{a} and {b}" for a in byo.WORDS for b in byo.WORDS]  # 256 lines, about 2300 tokens
INT4 = {"dtype": "int4", "block_size": 32, "symmetric": True}


def folders(shared: Path) -> Path:
    """text.txt (calibration), eval.txt (held-out text) and the llama, qwen2 and gpt2 folders, under `shared`."""
    root = shared / "weight-only-decoders"
    with FileLock(str(shared / "weight-only-decoders.lock")):
        if not (root / "done").exists():
            root.mkdir(exist_ok=True)
            (root / "text.txt").write_text("\n".join(TEXTS) + "\n")
            (root / "eval.txt").write_text("".join(f"{b} but {a}\n" for a in byo.WORDS[::2] for b in byo.WORDS[1::2]))
            for family in ("llama", "qwen2"):  # large activation channels, as trained LLMs have
                hf_folders.decoder_folder(root / family, TEXTS, family, outliers=20.0)
            hf_folders.gpt2_folder(root / "gpt2", TEXTS)
            (root / "done").touch()
    return root


def evaluation(root: Path) -> dict:
    """Perplexity on token windows of the held-out text."""
    return {"data": str(root / "eval.txt"), "windows": True, "max_length": 32, "metric": "perplexity"}


def run(root: Path, family: str, work: Path, quantization: dict, **sections) -> dict:
    """`quantcli run` into `work` (an earlier capture there is reused); the export report."""
    recipe = {
        "model": {"huggingface": str(root / family), "task": "text-generation"},
        # windows of 32 tokens; 12 batches of 4 calibrate: export's parity sample (batch 12) is one they did not see
        "calibration": {
            "data": str(root / "text.txt"),
            "windows": True,
            "max_length": 32,
            "batch_size": 4,
            "num_batches": 12,
        },
        "quantization": {"activations": "none", **quantization},
        **sections,
    }
    path = byo.write_recipe(work.parent, recipe, f"{work.name}.yaml")
    result = cli("run", "--recipe", path, "-o", work)
    assert result.rc == 0, result.stderr
    return json.loads((work / "model.report.json").read_text())


def llama_rtn(shared: Path) -> tuple[dict, Path]:
    """The Llama folder through `quantcli run` with int4 RTN and the evaluation: (export report, model.onnx).

    Its recipe is `<work>.yaml` beside the work folder, `<work>/captured` the capture other methods reuse.
    """
    root = folders(shared)
    work = shared / "weight-only-llama" / "rtn"
    with FileLock(str(shared / "weight-only-llama.lock")):
        if not (work / "model.report.json").exists():
            run(root, "llama", work, {"weights": {**INT4, "method": "rtn"}}, evaluation=evaluation(root))
    return json.loads((work / "model.report.json").read_text()), work / "model.onnx"
