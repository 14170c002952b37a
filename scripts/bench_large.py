"""Benchmark: a decoder whose fp32 ONNX is over protobuf's 2 GB limit, through `quantcli run`, with external data.

A random-weight Llama (fixed seed, float32) of 596M parameters, 2.38 GB: a 128000-token vocabulary with
untied embeddings (two 1 GB tables) and 2 layers 2048 wide (16 heads, 4 key/value heads, MLP 4096), so
that tracing stays cheap while the tensors exceed what one protobuf holds. With a byte-level tokenizer
trained on word pairs (scripts/bench_genai.py's texts), it goes through `quantcli run` twice, each a
process of its own: fp32 (every linear excluded, the ONNX over 2 GB, its tensors in `model.onnx.data`)
and int4 weight-only (RTN, block 32), each with a perplexity evaluation on held-out text. For each:
the exit status, each stage's seconds, the child's peak resident memory (wait4), the files written
(`model.onnx`, `model.onnx.data`), whether ONNX Runtime loads the model, the export report's parity and
evaluation; for fp32 the largest difference between ONNX Runtime's logits and the PyTorch model's on
one short input; and whether onnxruntime-genai loads each `model.genai/` folder and generates tokens.

    python scripts/bench_large.py [--work DIR] [--json out.json] [--markdown]

Needs about 14 GB of memory (the export stage's peak) and 16 GB of disk (`--work`, default a temporary
folder removed after; each run's stage folders are removed once it is measured).
A benchmark, not a test: it asserts nothing, and its times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_genai import QUANTCLI, machine, texts  # noqa: E402

SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 4096,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 128000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}
SCHEMES = {"fp32": QUANTCLI["fp32"], "int4": QUANTCLI["int4"]}
STAGES = ("captured", "prepared", "calibrated", "converted", "exported")  # the stages' results, as `run` names them
WINDOW = 64  # tokens a calibration and evaluation window holds
PROMPT = "the film was good and"
NEW_TOKENS = 8  # decoded greedily by onnxruntime-genai (and, for fp32, by PyTorch to compare)


def random_model(folder: Path, train: str) -> int:
    """The random-weight Llama with its tokenizer, written with save_pretrained; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests import hf_folders

    torch.manual_seed(0)
    tokenizer = hf_folders.bytelevel(train.splitlines(), vocab_size=2000)
    eos = tokenizer.eos_token_id
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, bos_token_id=eos, eos_token_id=eos))
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return count


def recipe(model: Path, work: Path, scheme: str) -> Path:
    import yaml

    text = {"windows": True, "max_length": WINDOW, "batch_size": 1}
    document = {
        "model": {"huggingface": str(model), "task": "text-generation"},
        "calibration": {"data": str(work / "train.txt"), **text, "num_batches": 4},
        "evaluation": {"data": str(work / "held.txt"), **text, "metric": "perplexity"},
        "quantization": {"activations": "none", **SCHEMES[scheme]},
    }
    path = work / f"{scheme}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def quantcli_run(recipe_path: Path, out: Path) -> dict:
    """`quantcli run` in a process of its own: exit status, wall seconds, each stage's seconds, peak RSS."""
    command = [sys.executable, "-m", "quantcli", "run", "--recipe", str(recipe_path), "-o", str(out), "--json"]
    print("+", " ".join(command), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stdout:
        child = subprocess.Popen(command, env=env, stdout=stdout)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest of every child's
        seconds = time.perf_counter() - start
        stdout.seek(0)
        text = stdout.read().decode()
    code = os.waitstatus_to_exitcode(status)
    stages = {}
    try:
        document = json.loads(text)
        results = document.get("stages", [document])
        stages = {r["stage"]: r["seconds"] for r in results if isinstance(r, dict) and "stage" in r}
    except (json.JSONDecodeError, AttributeError, KeyError):
        print(text[-2000:], file=sys.stderr)
    return {
        "exit_code": code,
        "wall_s": round(seconds, 1),
        "stage_s": {k: round(v, 1) for k, v in stages.items()},
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
    }


def files(onnx_path: Path) -> dict:
    data = onnx_path.with_name(onnx_path.name + ".data")
    return {
        "model_onnx_bytes": onnx_path.stat().st_size if onnx_path.exists() else None,
        "model_onnx_data_bytes": data.stat().st_size if data.exists() else None,
    }


def report_figures(onnx_path: Path) -> dict:
    """The export report's parity, SQNR, evaluation and kv-cache check, as the report records them."""
    path = onnx_path.with_name(onnx_path.stem + ".report.json")
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    parity, evaluation = report.get("parity", {}), report.get("evaluation", {})
    return {
        "parity_passed": parity.get("passed"),
        "sqnr_vs_float_db": report.get("sqnr_vs_float_db"),
        "external_data": report.get("onnx", {}).get("external_data"),
        "perplexity": {k: evaluation.get(k) for k in ("fp32_torch", "fp32_onnx", "int8_onnx")},
        "cache_max_logit_diff": report.get("kv_cache", {}).get("max_logit_diff"),
        "export_s": report.get("seconds"),
    }


def ort_logits(onnx_path: Path, ids: np.ndarray) -> tuple[float, np.ndarray]:
    """(seconds to load the model in ONNX Runtime, its logits of `ids` with an empty cache)."""
    sys.path.insert(0, str(ROOT))
    from quantcli.onnx import runtime

    start = time.perf_counter()
    sess = runtime.session(onnx_path)
    loaded = time.perf_counter() - start
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return loaded, runtime.run(sess, batch)[0]


def torch_reference(model_dir: Path, ids: np.ndarray, new: int) -> tuple[np.ndarray, list[int]]:
    """The PyTorch model's logits of `ids` and the `new` tokens it decodes greedily after them."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids)).logits.numpy()
        tokens = model.generate(torch.from_numpy(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return logits, [int(t) for t in tokens[0, ids.shape[1] :]]


def generate(folder: Path, ids: list[int], new: int) -> dict:
    """onnxruntime-genai loads `folder` and decodes `new` tokens greedily after `ids`."""
    import onnxruntime_genai as og

    start = time.perf_counter()
    model = og.Model(str(folder))
    loaded = time.perf_counter() - start
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([ids], np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    tokens = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
    return {"load_s": round(loaded, 1), "generated": tokens}


def bench(work: Path) -> dict:
    train, held = texts()
    (work / "train.txt").write_text(train)
    (work / "held.txt").write_text(held)
    model_dir = work / "model"
    params = random_model(model_dir, train)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    prompt = np.array([ids], np.int64)
    results = {}
    for scheme in SCHEMES:
        out = work / scheme
        row = quantcli_run(recipe(model_dir, work, scheme), out)
        onnx_path = out / "model.onnx"
        row.update(files(onnx_path))
        row.update(report_figures(onnx_path))
        reference, greedy = None, None
        if onnx_path.exists():
            loaded, logits = ort_logits(onnx_path, prompt)
            row["ort_load_s"] = round(loaded, 1)
            if scheme == "fp32":
                reference, greedy = torch_reference(model_dir, prompt, NEW_TOKENS)
                row["max_abs_logit_diff_vs_torch"] = float(np.abs(logits - reference).max())
            del logits, reference
        genai = out / "model.genai"
        row["genai"] = generate(genai, ids, NEW_TOKENS) if (genai / "genai_config.json").is_file() else None
        if row["genai"] and scheme == "fp32":
            row["genai"]["same_as_torch_greedy"] = row["genai"]["generated"] == greedy
        results[scheme] = row
        print(scheme, json.dumps(row), file=sys.stderr, flush=True)
        shutil.rmtree(out / "captured", ignore_errors=True)  # the stages' programs: the disk the next run needs
        for stage in ("prepared", "calibrated", "converted"):
            shutil.rmtree(out / stage, ignore_errors=True)
    return {"parameters": params, "shape": SHAPE, "prompt_tokens": len(ids), "results": results}


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.2f}"


def markdown(document: dict) -> str:
    lines = [
        "| run | exit | wall s | stages s (capture / prepare / calibrate / convert / export) | peak RSS GiB | "
        "model.onnx MB | model.onnx.data MB | parity | perplexity torch / ONNX | ORT vs PyTorch logits | genai |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in document["results"].items():
        stages = " / ".join(str(r["stage_s"].get(s, "-")) for s in STAGES)
        ppl = r.get("perplexity") or {}
        torch_ppl, onnx_ppl = ppl.get("fp32_torch"), ppl.get("int8_onnx")
        ppl_text = f"{torch_ppl:.1f} / {onnx_ppl:.1f}" if torch_ppl and onnx_ppl else "-"
        diff = r.get("max_abs_logit_diff_vs_torch")
        genai = f"{len(r['genai']['generated'])} tokens" if r.get("genai") else "-"
        if r.get("genai") and "same_as_torch_greedy" in r["genai"]:
            genai += ", as PyTorch's" if r["genai"]["same_as_torch_greedy"] else ", unlike PyTorch's"
        lines.append(
            f"| {name} | {r['exit_code']} | {r['wall_s']} | {stages} | {r['peak_rss_mib'] / 1024:.1f} | "
            f"{mb(r['model_onnx_bytes'])} | {mb(r['model_onnx_data_bytes'])} | "
            f"{'passed' if r.get('parity_passed') else 'failed'} | {ppl_text} | "
            f"{'-' if diff is None else f'{diff:.1e}'} | "
            f"{genai} |"
        )
    return "\n".join(lines)


def vnni_count() -> int:
    """`grep -c avx512_vnni /proc/cpuinfo`: the logical CPUs that have it (0 on AVX2-only machines)."""
    cpuinfo = Path("/proc/cpuinfo")
    return sum("avx512_vnni" in line for line in cpuinfo.read_text().splitlines()) if cpuinfo.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="where the model and runs go (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-large-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        document = {"machine": {**machine(), "avx512_vnni_count": vnni_count()}, **bench(work)}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(markdown(document) if args.markdown else json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
