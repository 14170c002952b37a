"""Benchmark: generation speed of quantcli's decoders with a key/value cache beside onnxruntime-genai's builder.

One Hugging Face decoder (`--model FOLDER`; default: a random-weight Llama of SmolLM-135M's shape,
30 layers, hidden 576, 9 heads with 3 key/value heads, vocabulary 49152, with a byte-level tokenizer
trained on word pairs) goes through `quantcli run` as fp32 (every linear excluded), weight-only int8
(per channel) and int4 (RTN and GPTQ, block 32), and through `python -m onnxruntime_genai.models.builder` as
fp32 and int4 (its defaults: block 32, accuracy level 4, int4 embeddings shared with the LM head).
Each folder is then run by onnxruntime-genai (og.Generator): a 256-token prompt's prefill, then greedy
decode of `--new` tokens at batch 1 (tokens per second), with 1 and 2 intra-op threads; its peak memory
in a process of its own (one prompt and its decode, 2 threads). Also: the folder's size, and the
perplexity of each model on held-out text through onnxruntime (whole windows).

    python scripts/bench_genai.py [--model HF_FOLDER] [--work DIR [--reuse]] [--rounds 8] [--new 64]
                                  [--held TEXT] [--window 128 ...] [--folder NAME=GENAI_FOLDER ... [--only-folders]]
                                  [--json out.json] [--markdown]

`--folder` adds folders built elsewhere (e.g. quantcli's GPTQ of a real decoder, calibrated on its own
text) to the table; `--only-folders` measures those alone. `--held` is the held-out text for perplexity
(default: word pairs), `--window` its window length in tokens (repeat it for several; default 128).
Speed is measured in one process for each thread count, which loads every folder and interleaves them:
each round generates once from each folder, starting at the next folder each round, so that a change in
the machine's load falls on all alike (a process of each folder's own added its own variance: 2-4 % in
decode at 2 threads); after a warm-up round, the figures are the medians of `--rounds`.

A random-weight model's perplexity says nothing of quality; with `--model` a real decoder's does. A
benchmark, not a test: it asserts nothing, and its numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 256
SMOLLM_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}
QUANTCLI = {
    "fp32": {"weights": {"dtype": "int8"}, "exclude_names": ["*"]},
    "int8": {"weights": {"dtype": "int8"}},
    "int4": {"weights": {"dtype": "int4", "block_size": 32, "symmetric": True, "method": "rtn"}},
    "int4-gptq": {"weights": {"dtype": "int4", "block_size": 32, "symmetric": True, "method": "gptq"}},
}
BUILDER = ("fp32", "int4")


def texts() -> tuple[str, str]:
    """(calibration text, held-out text): word pairs, as the tests' decoders are trained on."""
    sys.path.insert(0, str(ROOT))
    from tests import byo

    words = byo.WORDS
    train = "\n".join(f"{a} and {b}" for a in words for b in words) + "\n"
    held = "".join(f"{b} but {a}\n" for a in words[::2] for b in words[1::2])
    return train, held


def random_model(folder: Path, train: str) -> Path:
    """A random-weight Llama of SmolLM-135M's shape with a byte-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests import hf_folders

    torch.manual_seed(0)
    tokenizer = hf_folders.bytelevel(train.splitlines(), vocab_size=2000)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(**SMOLLM_SHAPE, bos_token_id=eos, eos_token_id=eos)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build(model: Path, work: Path, reuse: bool) -> dict[str, Path]:
    """Every variant's onnxruntime-genai folder, built unless `reuse` finds it."""
    import yaml

    folders = {}
    for scheme, quantization in QUANTCLI.items():
        out = work / f"quantcli-{scheme}"
        recipe = {
            "model": {"huggingface": str(model), "task": "text-generation"},
            "calibration": {"data": str(work / "train.txt"), "windows": True, "max_length": 256, "batch_size": 1},
            "quantization": {"activations": "none", **quantization},
        }
        (work / f"{scheme}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        if not (reuse and (out / "model.genai").is_dir()):
            _call([sys.executable, "-m", "quantcli", "run", "--recipe", str(work / f"{scheme}.yaml"), "-o", str(out)])
        folders[f"quantcli {scheme}"] = out / "model.genai"
    for precision in BUILDER:
        out = work / f"builder-{precision}"
        if not (reuse and (out / "genai_config.json").is_file()):
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out)]
            _call(command + ["-p", precision, "-e", "cpu", "-c", str(work / "hf-cache")])
        folders[f"builder {precision}"] = out
    return folders


def _child(command: list[str]) -> Any:
    """The JSON a measuring process of this script prints last."""
    out = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _call(command: list[str]) -> None:
    print("+", " ".join(command), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def generate(model: Any, prompt: np.ndarray, new: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens per second) of one greedy generation of `new` tokens after `prompt`."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    length = prompt.shape[1] + new
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    middle = time.perf_counter()
    steps = 0
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    return middle - start, steps / (time.perf_counter() - middle)


def load(folder: Path, threads: int) -> tuple[Any, np.ndarray]:
    """The folder's og.Model with `threads` intra-op threads, and a 256-token prompt of its vocabulary."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
    prompt = np.random.default_rng(0).integers(10, min(vocab, 2000), (1, PROMPT_TOKENS)).astype(np.int32)
    return og.Model(config), prompt


def measure(folders: list[Path], threads: int, rounds: int, new: int) -> list[dict[str, float]]:
    """In this process: each folder's prefill seconds and decode tokens/s (medians), the folders interleaved."""
    loaded = [load(folder, threads) for folder in folders]
    runs: list[list[tuple[float, float]]] = [[] for _ in folders]
    for round_ in range(rounds + 1):  # the first round warms up
        start = round_ % len(folders)
        for index in list(range(start, len(folders))) + list(range(start)):
            result = generate(*loaded[index], new)
            if round_:
                runs[index].append(result)
    return [
        {
            "prefill_s": round(statistics.median(p for p, _ in measured), 4),
            "decode_tokens_per_s": round(statistics.median(d for _, d in measured), 1),
        }
        for measured in runs
    ]


def peak_mib(folder: Path, new: int) -> float:
    """In this process: the peak resident memory of loading the folder and one generation at 2 threads."""
    generate(*load(folder, 2), new)
    return round(peak_rss_kib() / 1024, 1)


def peak_rss_kib() -> float:
    """This process's peak resident memory: VmHWM, which exec resets (getrusage's ru_maxrss keeps the parent's)."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next((x for x in status.read_text().splitlines() if x.startswith("VmHWM:")), None)
        if line is not None:
            return float(line.split()[1])
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def perplexity(folder: Path, held: str, model_dir: Path, window: int = 128) -> float:
    """The folder's decoder's perplexity on `held` (windows of `window` tokens, whole windows) in onnxruntime."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from quantcli.numerics.metrics import Perplexity, next_tokens

    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    sess = ort.InferenceSession(str(folder / config["filename"]), providers=["CPUExecutionProvider"])
    ids = AutoTokenizer.from_pretrained(model_dir)(held)["input_ids"]
    metric = Perplexity()
    for start in range(0, len(ids) - window + 1, window):
        batch = {"input_ids": np.array([ids[start : start + window]]), "attention_mask": np.ones((1, window), np.int64)}
        feeds = {**batch, "position_ids": np.arange(window)[None]}
        for value in sess.get_inputs():  # an empty cache: the whole window at once
            if value.name.startswith("past_key_values."):
                shape = (1, config["num_key_value_heads"], 0, config["head_size"])
                feeds[value.name] = np.zeros(shape, np.float32 if "float)" in value.type else np.float16)
        names = {v.name for v in sess.get_inputs()}
        logits = sess.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]
        metric.update(logits, logits, next_tokens(batch))
    return metric.figures()["value"]


def size_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data")) / 1e6, 1)


def machine() -> dict[str, str]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if "model name" in line), "")
    return {
        "cpu": model or platform.processor(),
        "avx512_vnni": str("avx512_vnni" in flags),
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
    }


def markdown(results: dict[str, dict]) -> str:
    lines = [
        "| model | size MB | perplexity (windows) | prefill 256 s (1 / 2 threads) | decode tok/s (1 / 2 threads) "
        "| peak MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        one, two = r["threads"]["1"], r["threads"]["2"]
        lines.append(
            f"| {name} | {r['size_mb']} | {' / '.join(f'{v:.2f}' for v in r['perplexity'].values())} | "
            f"{one['prefill_s']} / {two['prefill_s']} | "
            f"{one['decode_tokens_per_s']} / {two['decode_tokens_per_s']} | {r['peak_rss_mib']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a Hugging Face decoder folder (default: random SmolLM shape)")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--reuse", action="store_true", help="keep the folders already built in --work")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--new", type=int, default=64, help="tokens decoded after the prompt")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--held", type=Path, help="held-out text for perplexity (default: word pairs)")
    parser.add_argument("--window", type=int, action="append", help="perplexity window, tokens (repeatable; 128)")
    parser.add_argument("--folder", action="append", default=[], help="NAME=FOLDER: a genai folder built elsewhere")
    parser.add_argument("--only-folders", action="store_true", help="measure the --folder folders only")
    parser.add_argument("--measure", type=Path, nargs="+", help=argparse.SUPPRESS)  # the folders, interleaved
    parser.add_argument("--peak", type=Path, help=argparse.SUPPRESS)  # one folder, in a process of its own
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.threads, args.rounds, args.new)))
        return
    if args.peak is not None:
        print(json.dumps(peak_mib(args.peak, args.new)))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-genai-"))
    work.mkdir(parents=True, exist_ok=True)
    train, held = texts()
    held = args.held.read_text() if args.held else held
    (work / "train.txt").write_text(train)
    model = args.model or work / "model"
    if args.model is None and not (args.reuse and (model / "config.json").is_file()):
        random_model(model, train)
    folders = {} if args.only_folders else build(model, work, args.reuse)
    folders.update(item.split("=", 1) for item in args.folder)
    folders = {name: Path(folder) for name, folder in folders.items()}
    windows = args.window or [128]
    results = {
        name: {"size_mb": size_mb(f), "perplexity": {str(w): perplexity(f, held, model, w) for w in windows}}
        for name, f in folders.items()
    }
    names, paths = list(folders), [str(f) for f in folders.values()]
    for name in names:
        results[name]["threads"] = {}
    for threads in ("1", "2"):
        command = [sys.executable, __file__, "--measure", *paths, "--threads", threads]
        out = _child(command + ["--rounds", str(args.rounds), "--new", str(args.new)])
        for name, figures in zip(names, out):
            results[name]["threads"][threads] = figures
    for name, path in zip(names, paths):
        results[name]["peak_rss_mib"] = _child([sys.executable, __file__, "--peak", path, "--new", str(args.new)])
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    document = {"machine": machine(), "model": str(model), "prompt_tokens": PROMPT_TOKENS, "results": results}
    if args.json:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(markdown(results) if args.markdown else json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
