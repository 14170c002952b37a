"""A decoder's attention as ONNX Runtime's fused `com.microsoft::GroupQueryAttention`, with the rotary embedding inside.

Traced from transformers, one attention layer is some 40 small ONNX nodes (the projections' reshapes and
transposes, the rotary embedding's Split/Neg/Concat/Mul/Add, the cache's Concat, the scores, mask and
softmax); at batch 1 ORT spends longer dispatching them than computing them. Where a model's attention
has the usual form (q/k/v/o projections, a rotary embedding with positions only, no per-head norms,
windows or soft-capping) `fused` replaces each layer's attention by one custom op,
`quantcli::group_query_attention`, whose PyTorch implementation computes what GroupQueryAttention does
and which export writes as that node: the projections' outputs go in as they are ([batch, seq, heads x
dim]), the cache in and out as onnxruntime-genai keeps it ([batch, kv_heads, seq, dim]), the rotary
embedding from cos/sin tables of every position, and the mask as each row's length (`seqlens_k`, the
attention mask's sum less one) and the longest (`total_sequence_length`).

Positions are those of unpadded rows (past length + i), as the kernel computes them; the model is checked
against its own attention with a cache before it is used (quantcli.onnx.decoder), and stays as traced
where the check fails.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

OP = "quantcli::group_query_attention"
ROPE_TYPES = ("default", "linear", "llama3")  # cos/sin depend on the position only


@torch.library.custom_op(OP, mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention (do_rotary=1, rotary halves not interleaved, causal) on unpadded rows: (output
    [batch, seq, heads x dim], present key, present value [batch, kv_heads, past + seq, dim])."""
    batch, seq, _ = query.shape
    dim = past_key.shape[-1]
    past = past_key.shape[2]
    positions = torch.arange(past, past + seq, device=query.device)
    cos = torch.cat([cos_cache[positions]] * 2, dim=-1)  # [seq, dim]
    sin = torch.cat([sin_cache[positions]] * 2, dim=-1)

    def heads(x: torch.Tensor, count: int) -> torch.Tensor:
        return x.reshape(batch, seq, count, dim).transpose(1, 2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    q = rotate(heads(query, num_heads))
    present_key = torch.cat([past_key, rotate(heads(key, kv_num_heads))], dim=2)
    present_value = torch.cat([past_value, heads(value, kv_num_heads)], dim=2)
    total = past + seq
    keys = torch.arange(total, device=query.device)
    allowed = keys[None, :] <= positions[:, None]  # causal, by absolute position
    allowed = allowed[None] & (keys[None, None, :] <= seqlens_k.to(torch.long)[:, None, None])  # [batch, seq, total]
    grouped = q.reshape(batch, kv_num_heads, num_heads // kv_num_heads, seq, dim)
    scores = torch.matmul(grouped, present_key.unsqueeze(2).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, present_value.unsqueeze(2)).reshape(batch, num_heads, seq, dim)
    return out.transpose(1, 2).reshape(batch, seq, num_heads * dim), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache, *_):
    batch, seq, hidden = query.shape
    kv_heads, past, dim = past_key.shape[1:]
    present = past_key.new_empty((batch, kv_heads, past + seq, dim))
    return query.new_empty((batch, seq, hidden)), present, present.clone()


def onnx_translation() -> Any:
    """The ONNX function export writes `quantcli::group_query_attention` as: one GroupQueryAttention node."""
    import inspect

    import onnx
    import onnxscript

    def translate(
        query,
        key,
        value,
        past_key,
        past_value,
        seqlens_k,
        total_sequence_length,
        cos_cache,
        sin_cache,
        num_heads: int,
        kv_num_heads: int,
        scale: float,
    ):
        tensors = (query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache)
        return node(*tensors, num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, do_rotary=1)

    schema_of = onnx.defs.OpSchema
    inputs = [n for n, p in inspect.signature(translate).parameters.items() if p.annotation is inspect.Parameter.empty]
    types = {"seqlens_k": "tensor(int32)", "total_sequence_length": "tensor(int32)"}  # the rest float
    attributes = {"num_heads": "INT", "kv_num_heads": "INT", "scale": "FLOAT", "do_rotary": "INT"}
    schema = schema_of(
        "GroupQueryAttention",
        "com.microsoft",
        1,
        inputs=[schema_of.FormalParameter(n, types.get(n, "tensor(float)")) for n in inputs],
        outputs=[schema_of.FormalParameter(n, "tensor(float)") for n in ("output", "present_key", "present_value")],
        attributes=[schema_of.Attribute(n, getattr(schema_of.AttrType, t), "") for n, t in attributes.items()],
    )
    node = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", schema)
    return translate


class _Step(threading.local):
    """What the decoder's forward gives each layer's fused attention, and what the layers give back."""

    def __init__(self) -> None:
        self.past: list[tuple[Any, Any]] = []
        self.present: dict[int, tuple[Any, Any]] = {}
        self.seqlens_k: Any = None
        self.total: Any = None
        self.cos: Any = None
        self.sin: Any = None


STEP = _Step()


def attention_modules(model: Any) -> list[Any]:
    """The model's attention layers, in layer order, where every one has the usual form; else []."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    usual = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
    unusual = ("q_norm", "k_norm", "sliding_window", "attn_logit_softcapping", "sinks")
    if not found or any(not all(hasattr(m, a) for a in usual) for m in found):
        return []
    if any(getattr(m, a, None) is not None for m in found for a in unusual):
        return []
    return sorted(found, key=lambda m: m.layer_idx)


def rotary_tables(model: Any, dim: int) -> tuple[Any, Any] | None:
    """cos and sin [max_positions, dim / 2] of the model's rotary embedding; None where they are not a
    function of the position alone or do not span the head."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in ROPE_TYPES:
        return None
    count = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if count <= 0:
        return None
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(count)[None])
    if cos.shape[-1] != dim:  # partial rotary
        return None
    half = dim // 2
    if not (torch.equal(cos[0, :, :half], cos[0, :, half:]) and torch.equal(sin[0, :, :half], sin[0, :, half:])):
        return None  # interleaved or another layout
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


def _forward(self: Any, hidden_states: Any, *_: Any, **__: Any) -> tuple[Any, None]:
    past_key, past_value = STEP.past[self.layer_idx]
    heads = self.config.num_attention_heads
    kv_heads = past_key.shape[1]
    out, present_key, present_value = torch.ops.quantcli.group_query_attention(
        self.q_proj(hidden_states),
        self.k_proj(hidden_states),
        self.v_proj(hidden_states),
        past_key,
        past_value,
        STEP.seqlens_k,
        STEP.total,
        STEP.cos,
        STEP.sin,
        heads,
        kv_heads,
        float(self.scaling),
    )
    STEP.present[self.layer_idx] = (present_key, present_value)
    return self.o_proj(out), None


@contextlib.contextmanager
def fused(modules: list[Any]) -> Iterator[None]:
    """Each of `modules` computes its attention with the fused op while this lasts."""
    import types

    for module in modules:
        module.forward = types.MethodType(_forward, module)
    try:
        yield
    finally:
        for module in modules:
            del module.forward
