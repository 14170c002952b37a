"""A decoder with a key/value cache in ONNX: the inputs, outputs and layout onnxruntime-genai runs.

One model serves prefill and decode: it takes `input_ids` [batch, seq], `attention_mask`
[batch, total_seq] (the past and the new tokens), `position_ids` [batch, seq] where the model reads
them, and `past_key_values.{i}.key/value` [batch, kv_heads, past_seq, head_dim] (grouped-query heads
as the model has them; past_seq 0 at prefill); it returns `logits` [batch, seq, vocab] and
`present.{i}.key/value` [batch, kv_heads, total_seq, head_dim], the past with the new tokens
appended. These are the names onnxruntime-genai's model builder writes, and genai_config.json maps
them (quantcli.genai). A session fed only input_ids and attention_mask runs it as the full-sequence
model (`feeds`: an empty cache, positions 0..seq-1), which is how parity and evaluation run it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"
PRESENT_PREFIX = "present."
POSITIONS = "position_ids"
KINDS = ("key", "value")


@dataclass(frozen=True)
class Cache:
    """The shape of a decoder's key/value cache, from its Hugging Face config."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int

    @classmethod
    def of(cls, config: Any) -> Cache:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, heads, kv_heads, head_dim, config.hidden_size)

    def past_names(self) -> list[str]:
        return [PAST.format(i, kind) for i in range(self.layers) for kind in KINDS]

    def present_names(self) -> list[str]:
        return [PRESENT.format(i, kind) for i in range(self.layers) for kind in KINDS]


def input_names(cache: Cache, positions: bool) -> list[str]:
    return ["input_ids", "attention_mask", *([POSITIONS] if positions else []), *cache.past_names()]


def output_names(cache: Cache) -> list[str]:
    return ["logits", *cache.present_names()]


def wrapper(model: Any, positions: bool, tables: tuple[Any, Any] | None = None) -> Any:
    """`model` (a transformers causal LM) called with its cache as flat tensors, returning logits and the cache.

    The wrapped model is the attribute `model`, as in the full-sequence capture, so that nodes carry the
    same module paths (`model.model.layers.0.self_attn.q_proj`) as the weight-only plan names them. With
    `tables` (the rotary embedding's cos and sin, quantcli.onnx.attention.rotary_tables) the attention
    layers take the cache from this forward and compute with the fused op (within attention.fused).
    """
    import torch
    from transformers import DynamicCache

    from quantcli.onnx import attention

    cache = Cache.of(model.config)
    cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            if tables is not None:
                self.register_buffer("rotary_cos", tables[0])
                self.register_buffer("rotary_sin", tables[1])

        def forward(self, input_ids: Any, attention_mask: Any, *rest: Any) -> Any:
            position_ids, past = (rest[0], rest[1:]) if positions else (None, rest)
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(cache.layers)]
            if tables is None:  # transformers' own cache, grown by the model
                kv = DynamicCache(config=self.model.config)
                for i, (key, value) in enumerate(pairs):
                    kv.update(key, value, i)
                extra = {cache_key: kv, "use_cache": True}
            else:  # each layer's fused attention takes its pair from attention.STEP and leaves its present there
                step = attention.STEP
                step.past, step.present = pairs, {}
                step.seqlens_k = (attention_mask.sum(dim=-1) - 1).to(torch.int32)
                step.total = torch.scalar_tensor(attention_mask.shape[1], dtype=torch.int32)
                step.cos, step.sin = self.rotary_cos, self.rotary_sin
                extra = {"use_cache": False}
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **extra
            )
            if tables is None:
                present = [t for layer in out[cache_key].layers for t in (layer.keys, layer.values)]
            else:
                present = [t for i in range(cache.layers) for t in attention.STEP.present[i]]
                attention.STEP.past, attention.STEP.present = [], {}
            return (out.logits, *present)

    from quantcli.sources.huggingface import named

    identifiers = [n.replace(".", "_") for n in input_names(cache, positions)]  # ONNX gets the dotted names
    return named(Decoder(), identifiers).eval()  # one parameter a tensor: torch.export sees them one by one


GROUPED = "quantcli_grouped_query"  # the attention implementation the decoder is traced with


def grouped_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float, dropout: float = 0.0, **_: Any
) -> tuple[Any, None]:
    """Attention with each key/value head read by its group of query heads through broadcasting: the queries
    [batch, heads, seq, dim] viewed as [batch, kv_heads, group, seq, dim]. transformers' eager and sdpa paths
    repeat the keys and values to every head first (repeat_kv), which in ONNX copies the whole cache on every
    decoded token; this computes the same without the copy."""
    import torch

    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, seq, dim)
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)) * scaling
    if attention_mask is not None:  # [batch, 1, seq, total] additive
        scores = scores + attention_mask[:, :, None, :, : key.shape[-2]]
    probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value.unsqueeze(2)).reshape(batch, heads, seq, dim)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_attention(model: Any) -> bool:
    """Switch `model` to grouped_attention where it computes what the model's own attention does (checked on a
    random batch with a cache); False, and the model unchanged, where it does not (softcapping, attention sinks...)."""
    import torch
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(GROUPED, grouped_attention)
    AttentionMaskInterface.register(GROUPED, eager_mask)
    cache = Cache.of(model.config)
    positions = accepts_positions(model)
    args = example(cache, int(model.config.vocab_size), positions)
    own = model.config._attn_implementation
    with torch.no_grad():
        expected = wrapper(model, positions)(*args)
        model.config._attn_implementation = GROUPED
        try:
            got = wrapper(model, positions)(*args)
            same = computes_the_same(expected, got)
        except Exception:  # an attention that calls it with other arguments
            same = False
    if not same:
        model.config._attn_implementation = own
    return same


def fused_attention(model: Any) -> tuple[list[Any], tuple[Any, Any]] | None:
    """(the attention layers, the rotary tables) where quantcli.onnx.attention's fused op computes what the
    model's own attention does (checked on a random batch with a cache, as `use_grouped_attention`); else None."""
    import torch

    from quantcli.onnx import attention

    cache = Cache.of(model.config)
    modules = attention.attention_modules(model)
    tables = attention.rotary_tables(model, cache.head_dim) if modules else None
    if tables is None or len(modules) != cache.layers or cache.heads % cache.kv_heads:
        return None
    positions = accepts_positions(model)
    args = example(cache, int(model.config.vocab_size), positions)
    with torch.no_grad():
        expected = wrapper(model, positions)(*args)
        try:
            with attention.fused(modules):
                got = wrapper(model, positions, tables)(*args)
            same = computes_the_same(expected, got)
        except Exception:  # an attention the fused form does not fit
            same = False
    return (modules, tables) if same else None


def computes_the_same(expected: tuple, got: tuple) -> bool:
    """Each output within float rounding of the expected one: 1e-4 of its largest magnitude (a trained model's
    logits reach tens, where an element-wise relative tolerance fails on the ones near zero)."""
    return all(
        a.shape == b.shape and float((a - b).abs().max()) <= 1e-5 + 1e-4 * float(a.abs().max())
        for a, b in zip(expected, got)
    )


def example(cache: Cache, vocab: int, positions: bool, batch: int = 2, seq: int = 3, past: int = 5) -> tuple:
    """Arguments to trace with: every size distinct and above 1, so none is specialized to a constant."""
    import torch

    gen = torch.Generator().manual_seed(0)
    args = [torch.randint(0, vocab, (batch, seq), generator=gen), torch.ones(batch, past + seq, dtype=torch.long)]
    if positions:
        args.append(torch.arange(past, past + seq).expand(batch, seq))
    shape = (batch, cache.kv_heads, past, cache.head_dim)
    args += [torch.randn(*shape, generator=gen) for _ in range(2 * cache.layers)]
    return tuple(args)


def export(model: Any, opset: int) -> Any:
    """The ONNX model (onnx.ModelProto) of `model` with its cache, dimensions named batch, seq, past_seq, total_seq."""
    from quantcli import _torch
    from quantcli.onnx import attention
    from quantcli.onnx.export import to_onnx

    cache = Cache.of(model.config)
    positions = accepts_positions(model)
    found = fused_attention(model)
    if found is None:
        use_grouped_attention(model)
    modules, tables = found or ([], None)
    module = wrapper(model, positions, tables)
    args = example(cache, int(model.config.vocab_size), positions)
    auto = _torch.torch.export.Dim.AUTO
    shapes = tuple({0: auto, 1: auto} if a.dim() == 2 else {0: auto, 2: auto} for a in args)
    with _torch.torch.no_grad(), attention.fused(modules):
        program = _torch.export_program(module, args, shapes)
    names = input_names(cache, positions)
    onnx_model = to_onnx(  # float activations: nothing for the integer rewrites to do, and ORT fuses the norms
        program,
        opset=opset,
        input_names=names,
        output_names=output_names(cache),
        integer_rewrites=False,
        translations={attention.OP: attention.onnx_translation()} if found else None,
    )
    norms_as_division(onnx_model)
    if found:  # the residual stream of the usual decoder layer (attention's form is checked, the norms' not needed)
        skip_norms(onnx_model)
    unused_positions(onnx_model)
    name_dims(onnx_model)
    return onnx_model


def unused_positions(model: Any) -> bool:
    """Drop the position_ids input where no node reads it (the fused attention computes positions from the
    cache's length, as the builder's model does): onnxruntime-genai then neither builds nor feeds it each step.
    genai_config.json lists the inputs the model has (quantcli.genai.config)."""
    graph = model.graph
    found = [i for i in graph.input if i.name == POSITIONS]
    if not found or any(POSITIONS in node.input for node in graph.node):
        return False
    graph.input.remove(found[0])
    return True


def norms_as_division(model: Any) -> int:
    """x * Reciprocal(Sqrt(v)) -> x / Sqrt(v) (an RMS norm's rsqrt, as torch.rsqrt exports), the form ORT fuses
    into SimplifiedLayerNormalization; the count rewritten."""
    from quantcli.onnx.graph import Graph

    g = Graph(model.graph)
    done = 0
    for reciprocal in [n for n in g.graph.node if n.op_type == "Reciprocal"]:
        sqrt = g.producer.get(reciprocal.input[0])
        readers = g.consumers.get(reciprocal.output[0], [])
        if reciprocal.output[0] in g.outputs or sqrt is None or sqrt.op_type != "Sqrt":
            continue
        if len(readers) != 1 or readers[0].op_type != "Mul":
            continue
        mul = readers[0]
        x = mul.input[0] if mul.input[1] == reciprocal.output[0] else mul.input[1]
        mul.op_type = "Div"
        del mul.input[:]
        mul.input.extend([x, sqrt.output[0]])
        g.graph.node.remove(reciprocal)
        done += 1
    return done


def skip_norms(model: Any) -> int:
    """Each residual Add read by an RMS norm (x / Sqrt(ReduceMean(x^2) + eps) * w), as
    com.microsoft::SkipSimplifiedLayerNormalization, which gives the norm and the sum in one node (ORT fuses
    a residual Add only into LayerNormalization, and only where the sum has no other reader); the count."""
    from onnx import helper

    from quantcli.onnx.graph import Graph, insert

    g = Graph(model.graph)
    done = 0
    for add in [n for n in g.graph.node if n.op_type == "Add"]:
        norm = _rms_norm(g, add.output[0])
        if norm is None or add.output[0] in g.outputs:
            continue
        chain, gamma, eps, out = norm
        others = [n for n in g.consumers.get(add.output[0], []) if n not in chain]
        fused = helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [add.input[0], add.input[1], gamma],
            [out, "", "", add.output[0]] if others else [out],
            name=g.fresh(f"{add.name}_skip_norm"),
            domain="com.microsoft",
            epsilon=eps,
        )
        insert(g.graph, fused, replacing=[add, *chain])
        done += 1
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def _rms_norm(g: Any, x: str) -> tuple[list[Any], str, float, str] | None:
    """(its nodes, the weight, epsilon, its output) of the RMS norm over the last axis that reads `x`, or None."""
    readers = g.consumers.get(x, [])
    pow_ = next((n for n in readers if n.op_type == "Pow" and n.input[0] == x), None)
    div = next((n for n in readers if n.op_type == "Div" and n.input[0] == x), None)
    if pow_ is None or div is None or _value(g, pow_.input[1]) != 2.0:
        return None
    mean = _only_reader(g, pow_.output[0], "ReduceMean")
    plus = _only_reader(g, mean.output[0], "Add") if mean is not None else None
    sqrt = _only_reader(g, plus.output[0], "Sqrt") if plus is not None else None
    if sqrt is None or div.input[1] != sqrt.output[0] or _axes(g, mean) != [-1]:
        return None
    eps = _value(g, plus.input[1] if plus.input[0] == mean.output[0] else plus.input[0])
    mul = _only_reader(g, div.output[0], "Mul")
    if eps is None or mul is None:
        return None
    gamma = mul.input[0] if mul.input[1] == div.output[0] else mul.input[1]
    weight = g.constant(gamma)
    if weight is None or weight.ndim != 1:
        return None
    return [pow_, mean, plus, sqrt, div, mul], gamma, eps, mul.output[0]


def _only_reader(g: Any, name: str, op_type: str) -> Any:
    readers = g.consumers.get(name, [])
    return readers[0] if len(readers) == 1 and readers[0].op_type == op_type and name not in g.outputs else None


def _value(g: Any, name: str) -> float | None:
    value = g.constant(name)
    return float(value) if value is not None and value.size == 1 else None


def _axes(g: Any, node: Any) -> list[int] | None:
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("keepdims", 1) != 1:
        return None
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1:
        value = g.constant(node.input[1])
        axes = None if value is None else [int(v) for v in value.reshape(-1)]
    rank = g.rank(node.input[0])
    return [a - rank if a >= 0 and rank is not None else a for a in axes] if axes is not None else None


def accepts_positions(model: Any) -> bool:
    return POSITIONS in inspect.signature(model.forward).parameters


def name_dims(model: Any) -> None:
    """batch, seq, past_seq and total_seq in place of the exporter's symbols (s0, s12 + s7, ...)."""
    axes = {"input_ids": ("batch", "seq"), "attention_mask": ("batch", "total_seq"), POSITIONS: ("batch", "seq")}
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.name in axes:
            names = axes[value.name]
        elif value.name == "logits":
            names = ("batch", "seq")
        elif value.name.startswith(("past_key_values.", PRESENT_PREFIX)):
            names = ("batch", None, "past_seq" if value.name.startswith("past") else "total_seq")
        else:
            continue
        for dim, name in zip(dims, names):
            if name is not None and not dim.HasField("dim_value"):
                dim.dim_param = name
    del model.graph.value_info[:]  # the exporter's symbols live on there; shape inference writes them anew


def is_decoder(sess: Any) -> bool:
    return any(i.name.startswith("past_key_values.") for i in sess.get_inputs())


def feeds(sess: Any, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The session's inputs from `batch`; a decoder's cache empty and its positions 0..seq-1 where `batch`
    has none: the full-sequence model."""
    out = {}
    ids = batch.get("input_ids")
    for value in sess.get_inputs():
        if value.name in batch:
            out[value.name] = batch[value.name]
        elif value.name.startswith("past_key_values.") and ids is not None:
            _, heads, _, dim = value.shape
            out[value.name] = np.zeros((ids.shape[0], heads, 0, dim), np.float32)
        elif value.name == POSITIONS and ids is not None:
            out[value.name] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        else:
            out[value.name] = batch[value.name]  # a KeyError naming the input, as for any model
    return out


def stepwise_logits(sess: Any, batch: Mapping[str, np.ndarray], prefill: int) -> np.ndarray:
    """Logits of `batch` (input_ids and attention_mask [batch, seq]) through the cache: the first `prefill`
    tokens at once, then one token a run, each feeding the last run's present as its past."""
    ids, mask = batch["input_ids"], batch.get("attention_mask", np.ones_like(batch["input_ids"]))
    names = [o.name for o in sess.get_outputs()]
    first = {"input_ids": ids[:, :prefill], "attention_mask": mask[:, :prefill]}
    out = dict(zip(names, sess.run(None, feeds(sess, first))))
    logits = [out["logits"]]
    inputs = {i.name for i in sess.get_inputs()}
    past = [name for name in inputs if name.startswith("past_key_values.")]
    for t in range(prefill, ids.shape[1]):
        step = {"input_ids": ids[:, t : t + 1], "attention_mask": mask[:, : t + 1]}
        step.update({name: out[name.replace("past_key_values.", PRESENT_PREFIX)] for name in past})
        if POSITIONS in inputs:
            step[POSITIONS] = np.full((ids.shape[0], 1), t, np.int64)
        out = dict(zip(names, sess.run(None, step)))
        logits.append(out["logits"])
    return np.concatenate(logits, axis=1)
