"""Weight-only int4 on a real decoder: quantcli's models against onnxruntime-genai's builder and ORT's RTN.

    python scripts/bench_weight_only.py --model HF_FOLDER --text held-out.txt --work DIR \
        --quantcli rtn=W/rtn/model.onnx gptq=W/gptq/model.onnx awq=W/awq/model.onnx [--max-length 256]

Builds the anchors in DIR from the same Hugging Face folder: the builder's int4 (`-p int4`, its defaults:
block 32, symmetric, embeddings and LM head one int4 table) and its fp32 model, and ORT's
`matmul_nbits_quantizer` RTN (block 32, symmetric) of that fp32 model. Then, for every model, on the
same token windows (the text's non-blank lines tokenized one after another and cut into windows of
max_length, as quantcli's `windows: true`): perplexity (exp of the mean next-token cross-entropy), the
files' bytes, and the median ORT latency at batch 1 of a 1-token and a 128-token input, 1 and 2
threads (the builder's models with an empty key/value cache). A benchmark, not a test: the latency
depends on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def windows(model: Path, text: Path, width: int) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokens: list[int] = []
    for line in text.read_text().splitlines():
        if line.strip():
            tokens += tokenizer(line)["input_ids"]
    return [np.asarray(tokens[i : i + width], dtype=np.int64)[None] for i in range(0, len(tokens) - width + 1, width)]


def anchors(model: Path, work: Path) -> dict[str, Path]:
    """The builder's int4 and fp32 models and ORT's RTN of the fp32 one (made once, reused)."""
    made = {}
    for precision in ("int4", "fp32"):
        out = work / f"genai_{precision}"
        if not (out / "model.onnx").exists():
            command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out)]
            command += ["-p", precision, "-e", "cpu", "-c", str(work / "cache")]
            subprocess.run(command, check=True, capture_output=True)
        made[f"builder {precision}"] = out / "model.onnx"
    rtn = work / "ort_rtn" / "model.onnx"
    if not rtn.exists():
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, RTNWeightOnlyQuantConfig

        rtn.parent.mkdir(parents=True, exist_ok=True)
        config = RTNWeightOnlyQuantConfig()
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(made["builder fp32"])), block_size=32, is_symmetric=True, algo_config=config
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(rtn), use_external_data_format=True)
    made["ORT matmul_nbits_quantizer rtn"] = rtn
    return made


class Runner:
    """Feeds a model its inputs: the builder's with an empty key/value cache, quantcli's as exported."""

    def __init__(self, path: Path, threads: int, head_dim: int = 64):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.logits = next(o.name for o in self.session.get_outputs() if o.name == "logits")
        self.head_dim = head_dim

    def feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        batch, length = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(length, dtype=np.int64)[None].repeat(batch, 0)
        for name, spec in self.inputs.items():
            if name.startswith("past_key_values"):
                _, heads, _, size = spec.shape
                size = size if isinstance(size, int) else self.head_dim
                dtype = np.float16 if "float16" in spec.type else np.float32
                feeds[name] = np.zeros((batch, heads, 0, size), dtype=dtype)
        return {k: v for k, v in feeds.items() if k in self.inputs}

    def logits_of(self, ids: np.ndarray) -> np.ndarray:
        return self.session.run([self.logits], self.feeds(ids))[0]


def perplexity(runner: Runner, batches: list[np.ndarray]) -> float:
    total, count = 0.0, 0
    for ids in batches:
        logits = runner.logits_of(ids)[0, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= log_probs[np.arange(len(logits)), ids[0, 1:]].sum()
        count += len(logits)
    return float(np.exp(total / count))


def latency_ms(runner: Runner, ids: np.ndarray, runs: int = 10) -> float:
    feeds = runner.feeds(ids)
    runner.session.run([runner.logits], feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.session.run([runner.logits], feeds)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def measure(name: str, path: Path, batches: list[np.ndarray], head_dim: int, quality: bool = True) -> dict:
    row = {"model": name, "bytes": file_bytes(path)}
    if quality:
        row["perplexity"] = round(perplexity(Runner(path, 2, head_dim), batches), 2)
    for threads in (1, 2):
        runner = Runner(path, threads, head_dim)
        for tokens in (1, 128):
            row[f"ms_{tokens}tok_{threads}t"] = latency_ms(runner, batches[0][:, :tokens])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--quantcli", nargs="*", default=[], help="name=model.onnx")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--no-anchors", action="store_true", help="measure the --quantcli models only")
    parser.add_argument("--latency-only", action="store_true", help="no perplexity: every model timed in one go")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    batches = windows(args.model, args.text, args.max_length)
    models = {f"quantcli {n}": Path(p) for n, p in (item.split("=", 1) for item in args.quantcli)}
    if not args.no_anchors:
        models.update(anchors(args.model, args.work))
    config = json.loads((args.model / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rows = [measure(name, path, batches, head_dim, not args.latency_only) for name, path in models.items()]
    print(json.dumps({"windows": len(batches), "max_length": args.max_length, "rows": rows}, indent=2))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
