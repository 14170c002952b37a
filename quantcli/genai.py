"""A decoder for LLM runtimes: the exported model with a key/value cache, and the folder onnxruntime-genai loads.

`export.kv_cache` (default: on for a Hugging Face text-generation model with float activations, that is
fp32 or weight-only) makes export write the decoder of quantcli.onnx.decoder instead of the
full-sequence model, and beside `<name>.onnx` the folder `<name>.genai/`: the model (a hard link),
`genai_config.json` (the layout, the model's shape and special tokens, search defaults from its
generation_config.json) and the tokenizer files, written into a hidden sibling and renamed into
place. `og.Model("<name>.genai")` runs it; nothing of quantcli is needed to load it.

The decoder is traced anew from the Hugging Face model, with what convert produced put in: each
weight-only linear reads its dequantized weight (the tied LM head its own copy) and, where AWQ
scaled its input channels, the parameters convert folded 1/s into (a norm's weight, an up projection's
rows) take their converted values, as in the converted program. Export then stores the codes as it
does for any model (quantcli.onnx.blocked), so every quantized linear still runs as MatMulNBits.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from quantcli import artifacts, staging
from quantcli.errors import ArtifactError
from quantcli.recipe import Recipe

log = logging.getLogger("quantcli")


def enabled(recipe: Recipe) -> bool:
    """Whether export writes a decoder with a cache (the recipe validates that `kv_cache: true` can)."""
    if recipe.export.kv_cache is not None:
        return recipe.export.kv_cache
    model = recipe.model
    return model.task == "text-generation" and model.huggingface is not None and recipe.quantization.weight_only


def decoder_model(parent: artifacts.Artifact, recipe: Recipe, opset: int) -> Any:
    """The ONNX decoder with a cache of the converted artifact `parent` (float weights where it quantized none)."""
    from quantcli.onnx import decoder
    from quantcli.sources import huggingface

    model = huggingface.load(recipe.model)
    if "weight_only" in parent.manifest:
        _put_weight_only(model, parent)
    with huggingface.transformers():
        return decoder.export(model, opset)


def _put_weight_only(model: Any, parent: artifacts.Artifact) -> None:
    """Each quantized linear of `model` reads its dequantized weight; where AWQ scaled its input, the parameters
    convert folded 1/s into take their converted values; an embedding reading a tied head's W * s divides its
    rows by s."""
    import torch

    from quantcli import _torch
    from quantcli.weightonly import apply

    codes = _torch.load_state(parent.file(artifacts.WEIGHT_CODES))
    state = _torch.load_program(parent.file(artifacts.PROGRAM)).state_dict
    for record, q in apply.load(parent.manifest["weight_only"], codes):
        layer = model.get_submodule(_own(record["module"]))
        weight = q.weight()  # [N, K]; GPT-2's Conv1D stores [K, N] (quantcli.weightonly.plan)
        if type(layer).__name__ == "Conv1D":
            weight = weight.T.contiguous()
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)  # a tied head gets its own copy
        scaling = record.get("input_scale", {})
        for target in scaling.get("folded_into", []):
            model.get_parameter(_own(target)).data = state[target].clone()
        head_scale = state.get(f"{apply.INPUT_SCALE}{record['tied_to']}") if "tied_to" in record else None
        if head_scale is not None:
            layer.register_forward_hook(_divide_output_by(head_scale.clone()))


def _own(target: str) -> str:
    """A module or parameter path of the converted program in the Hugging Face model (the task wrapper's `model.`)."""
    return target.removeprefix("model.")


def _divide_output_by(scale: Any) -> Any:
    """A forward hook dividing an embedding's rows (its tied head's W * s) by AWQ's channel scales."""

    def hook(_: Any, args: tuple, output: Any) -> Any:
        return output / scale

    return hook


def config(recipe: Recipe, model_config: Any, onnx_model: Any, filename: str) -> dict[str, Any]:
    """genai_config.json for the decoder `onnx_model` saved as `filename`, as onnxruntime-genai's builder writes it."""
    from quantcli.onnx import decoder

    cache = decoder.Cache.of(model_config)
    names = {i.name for i in onnx_model.graph.input}
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if decoder.POSITIONS in names:
        inputs[decoder.POSITIONS] = decoder.POSITIONS
    context = int(getattr(model_config, "max_position_embeddings", 0) or getattr(model_config, "n_positions", 2048))
    generation = _generation(recipe)
    eos = generation.get("eos_token_id", model_config.eos_token_id)
    pad = generation.get("pad_token_id", model_config.pad_token_id)
    return {
        "model": {
            "bos_token_id": generation.get("bos_token_id", model_config.bos_token_id),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": cache.head_dim,
                "hidden_size": cache.hidden,
                "inputs": {
                    **inputs,
                    "past_key_names": decoder.PAST.replace("{}", "%d", 1).format("key"),
                    "past_value_names": decoder.PAST.replace("{}", "%d", 1).format("value"),
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": decoder.PRESENT.replace("{}", "%d", 1).format("key"),
                    "present_value_names": decoder.PRESENT.replace("{}", "%d", 1).format("value"),
                },
                "num_attention_heads": cache.heads,
                "num_hidden_layers": cache.layers,
                "num_key_value_heads": cache.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": "decoder" if model_config.model_type in OWN_LAYOUT else model_config.model_type,
            "vocab_size": model_config.vocab_size,
        },
        "search": {
            **SEARCH,
            **{k: v for k, v in generation.items() if k in SEARCH},
            "max_length": context,
            "past_present_share_buffer": shares_buffer(onnx_model, cache.layers),
        },
    }


def shares_buffer(onnx_model: Any, layers: int) -> bool:
    """Whether the runtime may give each layer one cache buffer of the context length, read as the past and
    written as the present: where every layer's attention is GroupQueryAttention, which writes the new tokens
    into the past's buffer (quantcli.onnx.attention) instead of returning a grown copy each token."""
    fused = sum(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft" for n in onnx_model.graph.node)
    return fused == layers


# model types onnxruntime-genai runs with a cache layout of their own (GPT-2: one past_%d of keys and values
# stacked); written as its generic "decoder", which reads past_key_values.%d.key/value as this decoder has them
OWN_LAYOUT = ("gpt2",)

# onnxruntime-genai's search options and the values they take where the model's generation_config says nothing
# (transformers' defaults); past_present_share_buffer: `shares_buffer`.
SEARCH: dict[str, Any] = {
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": True,
    "length_penalty": 1.0,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
}


def _generation(recipe: Recipe) -> dict[str, Any]:
    """The model folder's generation_config.json, the values it sets (none where there is no such file)."""
    from quantcli.sources import hf_folder

    path = hf_folder.transformer_dir(Path(recipe.model.huggingface)) / "generation_config.json"
    if not path.is_file():
        return {}
    values = json.loads(path.read_text())
    return {k: v for k, v in values.items() if v is not None and not k.startswith("_")}


def write_folder(onnx_path: Path, recipe: Recipe) -> Path:
    """`<name>.genai/` beside the exported decoder `onnx_path`: the model (and its external data file) linked,
    genai_config.json, the tokenizer.

    Written into a hidden sibling and renamed into place; an existing folder is replaced only if it is
    one (it holds genai_config.json), never a folder quantcli did not write.
    """
    import onnx

    from quantcli.sources import huggingface

    out = artifacts.genai_path(onnx_path)
    if out.exists() and not (out / artifacts.GENAI_CONFIG).is_file():
        raise ArtifactError(f"{out} exists and is not an onnxruntime-genai folder", staging.NEVER)
    model = onnx.load(str(onnx_path), load_external_data=False)
    model_config = huggingface.load_config(recipe.model)
    with staging.staging(out) as st:
        staging.link_or_copy(onnx_path, st.tmp / onnx_path.name)
        data = artifacts.data_path(onnx_path)  # a model over 2 GB reads its tensors from the file beside it
        if data.exists():
            staging.link_or_copy(data, st.tmp / data.name)
        tokenizer = huggingface.tokenizer(recipe.model, pad=False)
        tokenizer.save_pretrained(st.tmp)
        document = config(recipe, model_config, model, onnx_path.name)
        (st.tmp / artifacts.GENAI_CONFIG).write_text(json.dumps(document, indent=2) + "\n")
    return out


def current(onnx_path: Path) -> bool:
    """Whether `<name>.genai/` holds this very file (the hard link export made), not an earlier export's."""
    linked = artifacts.genai_path(onnx_path) / onnx_path.name
    try:
        return os.path.samefile(linked, onnx_path) and (linked.parent / artifacts.GENAI_CONFIG).is_file()
    except OSError:
        return False


def describe(folder: Path) -> dict[str, Any]:
    """What `quantcli inspect` shows of an onnxruntime-genai folder: its config's essentials and its files."""
    document = json.loads((folder / artifacts.GENAI_CONFIG).read_text())
    model, dec = document.get("model", {}), document.get("model", {}).get("decoder", {})
    keys = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_size", "hidden_size")
    return {
        "path": str(folder),
        "genai": {
            "type": model.get("type"),
            "model": dec.get("filename"),
            **{k: dec.get(k) for k in keys},
            "context_length": model.get("context_length"),
            "inputs": dec.get("inputs"),
            "outputs": dec.get("outputs"),
            "search": document.get("search"),
            "files": sorted(p.name for p in folder.iterdir() if p.is_file()),
        },
    }
