"""Model sources, tasks and poolings by name, without importing torch (the recipe schema reads them).

A source is the `model:` key naming where the model comes from. A task decides what a Hugging Face
model is loaded as (its Auto class), which tensor becomes the ONNX output and under what name, what
its data looks like (text or images) and how evaluation targets are shaped; the metrics each task
can have are the metrics registry's (`quantcli.numerics.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

# The `model:` keys that name a source; exactly one of them is set.
SOURCES: tuple[str, ...] = ("factory", "huggingface", "torchvision", "timm")


@dataclass(frozen=True)
class Task:
    """What a task loads and returns, and what its data and targets are."""

    modality: str  # "text" or "image": what the data files hold
    auto_class: str  # the transformers Auto class a Hugging Face folder is loaded with
    output: str  # the ONNX output's name (the recipe's `outputs:` may rename it); sentence-transformers' for embeddings
    targets: str  # "none", "sequence" (one class a sample) or "token" (one class a word)
    default_metric: str


TASKS: dict[str, Task] = {
    # a sentence embedding: pooled (sentence-transformers folder's pooling, else the mask's mean), or the
    # last hidden state with `pooling: none`
    "feature-extraction": Task("text", "AutoModel", "sentence_embedding", "none", "cosine"),
    "text-classification": Task("text", "AutoModelForSequenceClassification", "logits", "sequence", "accuracy"),
    "token-classification": Task("text", "AutoModelForTokenClassification", "logits", "token", "token_accuracy"),
    "text-generation": Task("text", "AutoModelForCausalLM", "logits", "none", "cosine"),  # a decoder's logits
    "image-classification": Task("image", "AutoModelForImageClassification", "logits", "sequence", "accuracy"),
}

# Sentence-embedding poolings (sentence-transformers' modes, by short name); "auto" follows the folder's
# 1_Pooling/config.json, else mean; "none" outputs the last hidden state [batch, seq, hidden].
POOLINGS: tuple[str, ...] = ("auto", "mean", "cls", "max", "lasttoken", "mean_sqrt_len", "none")

# The tasks torchvision and timm models are (their constructors build classifiers).
ZOO_TASK = "image-classification"
