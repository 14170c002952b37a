"""Tiny Hugging Face model folders, written the way real ones are (save_pretrained, tokenizer files).

Tokenizers are built locally with the `tokenizers` library (WordPiece trained on the given texts) and
wrapped in transformers' fast tokenizer classes; nothing is downloaded. scripts/make_byo_examples.py
uses these too, for the bundled examples.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece(texts: Iterable[str], vocab_size: int = 400) -> Any:
    """A BERT-style fast tokenizer (lower-case WordPiece, [CLS] ... [SEP]) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        list(texts), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def bytelevel(texts: Iterable[str], vocab_size: int = 400) -> Any:
    """A GPT-2-style byte-level BPE fast tokenizer (no pad token, as GPT-2's) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        list(texts), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"],
    )


def bert_config(vocab: int, **extra: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        **extra,
    )


def labelled(labels: list[str]) -> dict[str, Any]:
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}


def bert_folder(
    folder: Path,
    texts: list[str],
    task: str = "feature-extraction",
    labels: list[str] | None = None,
    seed: int = 0,
    model: Any = None,
    vocab_size: int = 400,
) -> Path:
    """A BERT folder for `task` (random weights unless `model` is given) with its WordPiece tokenizer."""
    import torch
    from transformers import BertForSequenceClassification, BertForTokenClassification, BertModel

    torch.manual_seed(seed)
    tokenizer = wordpiece(texts, vocab_size)
    if model is None:
        config = bert_config(len(tokenizer), **(labelled(labels) if labels else {}))
        cls = {
            "feature-extraction": BertModel,
            "text-classification": BertForSequenceClassification,
            "token-classification": BertForTokenClassification,
        }[task]
        model = cls(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentence_transformers_files(folder: Path, pooling: str = "mean", normalize: bool = True, dim: int = 64) -> None:
    """modules.json, 1_Pooling/config.json (and 2_Normalize) as sentence-transformers writes them."""
    modes = {
        "cls": "pooling_mode_cls_token",
        "mean": "pooling_mode_mean_tokens",
        "max": "pooling_mode_max_tokens",
        "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
        "weightedmean": "pooling_mode_weightedmean_tokens",
        "lasttoken": "pooling_mode_lasttoken",
    }
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    config = {
        "word_embedding_dimension": dim,
        **{key: name == pooling for name, key in modes.items()},
        "include_prompt": True,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps(
            {
                "__version__": {"sentence_transformers": "3.0.0"},
                "prompts": {},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
            indent=2,
        )
    )


def gpt2_folder(folder: Path, texts: list[str], seed: int = 0) -> Path:
    """A GPT-2 causal LM folder (2 layers, 64 wide) with a byte-level BPE tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = bytelevel(texts)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=eos, eos_token_id=eos
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def decoder_folder(
    folder: Path, texts: list[str], family: str = "llama", seed: int = 0, outliers: float = 1.0, **extra: Any
) -> Path:
    """A Llama or Qwen2 causal LM folder (2 layers, 64 wide, tied embeddings) with a byte-level BPE tokenizer.

    Its MLP is 176 wide: down_proj's K is no multiple of 32 (a short last block), and gate/up hold more
    weights than the exporter folds a transpose of (a MatMul reading a Transpose of the weight). `outliers`
    scales a few channels of every RMS norm's weight: the large activation channels of a trained LLM,
    which the projections after the norms read.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tokenizer = bytelevel(texts)
    eos = tokenizer.eos_token_id
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        family
    ]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
        **extra,
    )
    model = model_class(config)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("layernorm.weight"):
                weight[[3, 17, 40]] *= outliers
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def resnet_config(labels: list[str], **extra: Any) -> Any:
    from transformers import ResNetConfig

    return ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32, 64],
        depths=[1, 1, 1],
        layer_type="basic",
        **labelled(labels),
        **extra,
    )


def image_processor(size: int = 64) -> Any:
    """A ConvNeXt-style processor: shorter side to size / 0.875, centre crop `size`, ImageNet mean/std."""
    from transformers import ConvNextImageProcessor

    return ConvNextImageProcessor(size={"shortest_edge": size}, crop_pct=0.875)


def resnet_folder(folder: Path, labels: list[str], seed: int = 0, model: Any = None, size: int = 64) -> Path:
    """A Hugging Face ResNet image classifier folder with its image processor."""
    import torch
    from transformers import ResNetForImageClassification

    torch.manual_seed(seed)
    model = model or ResNetForImageClassification(resnet_config(labels))
    model.save_pretrained(folder)
    image_processor(size).save_pretrained(folder)
    return folder


def write_images(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (80, 72)) -> list[Path]:
    """`count` random-texture RGB JPEG files in `folder` (for tests that need images, not meaning)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        paths.append(folder / f"img_{i:03d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths
