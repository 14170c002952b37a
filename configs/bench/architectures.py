"""The architectures of the sweep (scripts/sweep.py): timm, torchvision and transformers, small inputs, random weights.

`ARCHITECTURES` is the one list: `source:name` -> `Arch` (the input kind, its size, constructor or
config keyword arguments). `build(name)` is the recipe factory (`model.kwargs.name` picks one);
`inputs(name, count, seed)` makes its inputs with numpy only, so the driver writes calibration and
held-out data without importing torch.

- timm and torchvision: the library's own builder (`timm.create_model`, `torchvision.models.get_model`),
  at 64-96 px, classifier as published. They import torchvision, which must not share a process with
  transformers (tests/zoo_site): the driver gives them the zoo PYTHONPATH.
- transformers: a small config of the architecture (hidden 64, 2 layers, 4 heads, FFN 128, vocabulary
  1024 so the word embedding is about as large a share of the model as in MiniLM), as an encoder
  (ids + attention mask, mean-pooled), a decoder (ids -> logits), a vision tower (pixels -> last
  hidden state) or an audio tower (waveform or mel features -> last hidden state).

Random weights, seeded, with the ranges of trained networks where initialisation leaves something
degenerate (tests/zoo.py `seeded`: BatchNorm mean and beta +-0.2, var 0.5-2, gamma 0.6-1.4), and
layer scales initialised to a tiny constant (1e-6, 1e-5: every block a no-op) drawn in 0.1-0.5,
unfused re-parameterizable blocks (RepVGG, MobileOne: three branches summed, no norm after the sum) scaled
to unit signal layer by layer (tests/zoo.py `unit_signal`, as the bench's CNNs are),
weights initialised to zero (classifier heads of MLP-mixers: a constant output) drawn as
`nn.Linear` draws its own, and learnable scalars at an identity (a scale of 1, a shift or a gate of 0:
HGNetV2's affine after each activation) moved by up to 0.2.
Images are crops of scikit-learn's two sample photos (configs/bench/vision.py `photos`); tokens
uniform over the vocabulary with tail padding; audio standard normal.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
VOCAB, SEQ = 1024, 32
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TEXT = dict(SMALL, vocab_size=VOCAB, max_position_embeddings=128)


@dataclass(frozen=True)
class Arch:
    """One architecture: what it reads and how it is built.

    kind: image (timm/torchvision), encoder, decoder, pixels, audio (waveform) or mels (features);
    size: image side, sequence length, audio samples or mel frames; kwargs: constructor or config
    keyword arguments; model: the transformers class (default by kind); note: what the sweep probes;
    unit_signal: scale the signal to unit variance layer by layer (tests/zoo.py `unit_signal`), for nets whose
    random branches add up without a norm after them (their activations grow to 1e14 otherwise)."""

    kind: str
    size: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    note: str = ""
    unit_signal: bool = False


def _img(size: int = 64, note: str = "", unit_signal: bool = False, **kwargs: Any) -> Arch:
    return Arch("image", size, kwargs, note=note, unit_signal=unit_signal)


def _hf(kind: str, model: str, note: str = "", size: int = 0, small: bool = True, **kwargs: Any) -> Arch:
    """A transformers architecture: `small` starts its config from TEXT (encoder, decoder) or SMALL."""
    sizes = {"encoder": SEQ, "decoder": SEQ, "pixels": 32, "audio": 1600, "mels": 64}
    base = (TEXT if kind in ("encoder", "decoder") else SMALL) if small else {}
    return Arch(kind, size or sizes[kind], {**base, **kwargs}, model, note)


_VIT = dict(img_size=64)  # timm ViT-likes: position embeddings resized to 64 px
# wav2vec2-style audio towers: a three-layer conv feature encoder (20x down), a small positional conv
_WAVE = dict(
    conv_dim=(32, 32, 32),
    conv_kernel=(10, 3, 3),
    conv_stride=(5, 2, 2),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)

ARCHITECTURES: dict[str, Arch] = {
    # ---- timm convnets
    "timm:resnet18": _img(),
    "timm:resnet26d": _img(note="deep stem, average-pool shortcut"),
    "timm:resnext26ts": _img(note="grouped convs, SiLU"),
    "timm:seresnext26t_32x4d": _img(note="squeeze-excitation"),
    "timm:res2net50_26w_4s": _img(note="split into scales, concat"),
    "timm:densenet121": _img(note="pre-activation: BatchNorm with no conv before it, concat"),
    "timm:dla34": _img(note="aggregation nodes: concat"),
    "timm:dpn48b": _img(note="dual path: split, add and concat"),
    "timm:cspresnet50": _img(note="cross-stage partial: split, concat"),
    "timm:cs3darknet_s": _img(),
    "timm:hrnet_w18_small": _img(note="parallel resolutions: upsample, add"),
    "timm:ese_vovnet19b_dw": _img(note="one-shot aggregation, effective SE (hard sigmoid)"),
    "timm:selecsls42b": _img(note="concat of stage features"),
    "timm:gernet_s": _img(),
    "timm:regnetx_002": _img(),
    "timm:regnety_002": _img(note="squeeze-excitation"),
    "timm:regnetz_005": _img(note="SiLU, SE, no residual activation"),
    "timm:nf_resnet26": _img(note="normalizer-free: weight standardization, scaled activations"),
    "timm:hgnetv2_b0": _img(note="learnable affine after activations, concat"),
    "timm:convnext_atto": _img(note="depthwise 7x7, LayerNorm, layer scale"),
    "timm:convnextv2_atto": _img(note="global response normalization"),
    "timm:inception_next_atto": _img(note="split into depthwise branches, concat, BatchNorm after the mixer"),
    "timm:mambaout_femto": _img(note="gated conv: split, multiply"),
    "timm:starnet_s050": _img(note="element-wise product of two branches"),
    "timm:fasternet_t0": _img(note="partial conv: split, concat"),
    # ---- timm mobile nets
    "timm:efficientnet_b0": _img(),
    "timm:efficientnet_lite0": _img(),
    "timm:mixnet_s": _img(note="mixed-kernel depthwise: split, per-group convs, concat"),
    "timm:mnasnet_small": _img(),
    "timm:fbnetc_100": _img(),
    "timm:mobilenetv2_050": _img(),
    "timm:mobilenetv3_large_100": _img(note="Hardswish, SE (hard sigmoid)"),
    "timm:mobilenetv4_conv_small": _img(),
    "timm:lcnet_050": _img(note="Hardswish, depthwise"),
    "timm:hardcorenas_a": _img(),
    "timm:tinynet_e": _img(),
    "timm:rexnet_100": _img(note="SiLU, partial residual (channel padding by concat)"),
    "timm:ghostnet_100": _img(note="ghost modules: cheap depthwise features concatenated"),
    "timm:repvgg_a0": _img(note="unfused re-parameterizable blocks: BatchNorm-only identity branch", unit_signal=True),
    "timm:mobileone_s0": _img(note="unfused re-parameterizable blocks: BatchNorm-only branches", unit_signal=True),
    "timm:repvit_m1": _img(note="re-parameterizable depthwise with BatchNorm-only branch"),
    # ---- timm hybrids
    "timm:fastvit_t8": _img(note="re-parameterizable mixers, attention in the last stage"),
    "timm:mobilevit_xxs": _img(note="unfold/fold into transformer blocks"),
    "timm:mobilevitv2_050": _img(note="separable linear attention"),
    "timm:edgenext_xx_small": _img(note="split depthwise attention (SDTA), transposed attention"),
    "timm:efficientformerv2_s0": _img(**_VIT, note="attention with talking heads, BatchNorm on linears"),
    "timm:levit_128s": _img(**_VIT, note="attention with BatchNorm-fused linears, Hardswish"),
    "timm:efficientvit_b0": _img(note="ReLU linear attention, Hardswish"),
    "timm:efficientvit_m0": _img(**_VIT, note="cascaded group attention, BatchNorm on linears"),
    "timm:coat_lite_tiny": _img(**_VIT, note="factorized attention, convolutional relative positions"),
    "timm:poolformer_s12": _img(note="average pool as the token mixer, GroupNorm"),
    "timm:botnet26t_256": _img(**_VIT, note="self-attention in a ResNet bottleneck, relative positions"),
    # ---- timm ViTs and MLP-mixers
    "timm:vit_tiny_patch16_224": _img(**_VIT),
    "timm:deit_tiny_distilled_patch16_224": _img(**_VIT, note="two tokens: class and distillation"),
    "timm:cait_xxs24_224": _img(**_VIT, note="talking-heads attention, class attention, layer scale"),
    "timm:xcit_nano_12_p16_224": _img(**_VIT, note="cross-covariance attention, conv patch embedding with BN"),
    "timm:pit_ti_224": _img(**_VIT, note="pooling by depthwise conv between stages"),
    "timm:convit_tiny": _img(**_VIT, note="gated positional self-attention"),
    "timm:eva02_tiny_patch14_224": _img(56, img_size=56, note="rotary embeddings, SwiGLU"),
    "timm:swin_tiny_patch4_window7_224": _img(img_size=64, window_size=4, note="shifted windows"),
    "timm:pvt_v2_b0": _img(note="spatial-reduction attention, depthwise conv in the MLP"),
    "timm:mixer_s16_224": _img(**_VIT, note="MLP-mixer: token-mixing linears on the transposed tensor"),
    "timm:resmlp_12_224": _img(**_VIT, note="affine normalization, cross-patch linear"),
    "timm:gmlp_ti16_224": _img(**_VIT, note="spatial gating unit: split, multiply"),
    # ---- torchvision
    "torchvision:resnet18": _img(),
    "torchvision:mobilenet_v2": _img(),
    "torchvision:mobilenet_v3_large": _img(note="Hardswish, SE (Hardsigmoid)"),
    "torchvision:mobilenet_v3_small": _img(note="Hardswish, SE (Hardsigmoid)"),
    "torchvision:mnasnet0_5": _img(),
    "torchvision:shufflenet_v2_x0_5": _img(note="channel split and shuffle"),
    "torchvision:squeezenet1_1": _img(note="fire modules: concat"),
    "torchvision:googlenet": _img(note="inception branches: concat"),
    "torchvision:densenet121": _img(note="pre-activation: BatchNorm with no conv before it, concat"),
    "torchvision:efficientnet_b0": _img(),
    "torchvision:efficientnet_v2_s": _img(note="fused MBConv"),
    "torchvision:regnet_y_400mf": _img(),
    "torchvision:convnext_tiny": _img(),
    "torchvision:swin_t": _img(note="shifted windows, padded"),
    # ---- transformers encoders
    "transformers:bert": _hf("encoder", "BertModel"),
    "transformers:distilbert": _hf("encoder", "DistilBertModel", dim=64, hidden_dim=128, n_layers=2, n_heads=4),
    "transformers:roberta": _hf("encoder", "RobertaModel"),
    "transformers:albert": _hf("encoder", "AlbertModel", embedding_size=32, note="one layer's weights shared by all"),
    "transformers:electra": _hf("encoder", "ElectraModel", embedding_size=32, note="embedding projection"),
    "transformers:deberta-v2": _hf("encoder", "DebertaV2Model", note="disentangled relative attention"),
    "transformers:mpnet": _hf("encoder", "MPNetModel", note="relative position bias"),
    "transformers:convbert": _hf("encoder", "ConvBertModel", embedding_size=64, note="span-based dynamic conv"),
    "transformers:mobilebert": _hf(
        "encoder",
        "MobileBertModel",
        embedding_size=32,
        intra_bottleneck_size=32,
        true_hidden_size=32,
        num_feedforward_networks=2,
        note="bottlenecks, NoNorm (element-wise affine)",
    ),
    "transformers:roformer": _hf("encoder", "RoFormerModel", embedding_size=64, note="rotary positions"),
    "transformers:t5-encoder": _hf(
        "encoder", "T5EncoderModel", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, note="RMS norm"
    ),
    # ---- transformers decoders
    "transformers:gpt2": _hf(
        "decoder", "GPT2LMHeadModel", bos_token_id=1, eos_token_id=2, use_cache=False, note="Conv1D linears, tied head"
    ),
    "transformers:gpt_neo": _hf(
        "decoder", "GPTNeoForCausalLM", attention_types=[[["global", "local"], 1]], window_size=16, use_cache=False
    ),
    "transformers:opt": _hf("decoder", "OPTForCausalLM", ffn_dim=128, word_embed_proj_dim=64, use_cache=False),
    "transformers:bloom": _hf("decoder", "BloomForCausalLM", n_head=4, use_cache=False, note="ALiBi"),
    "transformers:llama": _hf(
        "decoder", "LlamaForCausalLM", num_key_value_heads=2, use_cache=False, note="RoPE, RMS norm, SwiGLU, GQA"
    ),
    "transformers:qwen2": _hf("decoder", "Qwen2ForCausalLM", num_key_value_heads=2, use_cache=False),
    "transformers:phi": _hf("decoder", "PhiForCausalLM", use_cache=False, note="partial rotary, parallel block"),
    "transformers:gemma": _hf("decoder", "GemmaForCausalLM", head_dim=16, num_key_value_heads=1, use_cache=False),
    "transformers:gpt_neox": _hf("decoder", "GPTNeoXForCausalLM", use_cache=False, note="parallel residual"),
    "transformers:falcon": _hf("decoder", "FalconForCausalLM", use_cache=False, note="multi-query attention"),
    # ---- transformers vision towers
    "transformers:vit": _hf("pixels", "ViTModel", image_size=32, patch_size=8, add_pooling_layer=False),
    "transformers:deit": _hf("pixels", "DeiTModel", image_size=32, patch_size=8, add_pooling_layer=False),
    "transformers:beit": _hf(
        "pixels", "BeitModel", image_size=32, patch_size=8, use_relative_position_bias=True, note="relative bias"
    ),
    "transformers:clip-vision": _hf("pixels", "CLIPVisionModel", image_size=32, patch_size=8, note="quick GELU"),
    "transformers:siglip-vision": _hf("pixels", "SiglipVisionModel", image_size=32, patch_size=8),
    "transformers:dinov2": _hf("pixels", "Dinov2Model", image_size=32, patch_size=8, note="layer scale"),
    "transformers:swin": _hf(
        "pixels",
        "SwinModel",
        size=64,
        small=False,
        image_size=64,
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
    ),
    "transformers:convnext": _hf(
        "pixels",
        "ConvNextModel",
        size=64,
        small=False,
        hidden_sizes=[32, 64, 96, 128],
        depths=[1, 1, 2, 1],
        note="HF ConvNeXt",
    ),
    "transformers:segformer": _hf(
        "pixels",
        "SegformerModel",
        size=64,
        small=False,
        hidden_sizes=[16, 32, 64, 96],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 4, 4],
        note="efficient attention (spatial reduction), Mix-FFN",
    ),
    "transformers:mobilevit": _hf(
        "pixels",
        "MobileViTModel",
        size=64,
        small=False,
        image_size=64,
        hidden_sizes=[48, 64, 80],
        neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320],
        note="unfold/fold into transformer blocks",
    ),
    # ---- transformers audio towers
    "transformers:wav2vec2": _hf(
        "audio", "Wav2Vec2Model", **_WAVE, note="GroupNorm feature encoder, weight-normed conv"
    ),
    "transformers:hubert": _hf("audio", "HubertModel", **_WAVE),
    "transformers:wavlm": _hf("audio", "WavLMModel", **_WAVE, note="gated relative position bias"),
    "transformers:whisper-encoder": _hf(
        "mels",
        "WhisperModel",
        num_mel_bins=16,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        max_source_positions=32,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=128,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        note="conv1d stem (the encoder of a WhisperModel)",
    ),
}
MELS = 16


def source(name: str) -> str:
    """timm, torchvision or transformers: the part of `name` before the colon."""
    return name.split(":", 1)[0]


def input_specs(name: str) -> list[dict[str, Any]]:
    """The recipe's inputs of an architecture (batch dynamic)."""
    arch = ARCHITECTURES[name]
    if arch.kind in ("encoder", "decoder"):
        names = ["input_ids", "attention_mask"] if arch.kind == "encoder" else ["input_ids"]
        return [{"name": n, "shape": [1, arch.size], "dtype": "int64"} for n in names]
    shape = {
        "image": [1, 3, arch.size, arch.size],
        "pixels": [1, 3, arch.size, arch.size],
        "audio": [1, arch.size],
        "mels": [1, MELS, arch.size],
    }[arch.kind]
    return [{"name": "x", "shape": shape, "dtype": "float32"}]


def _vision():
    spec = importlib.util.spec_from_file_location("bench_vision", HERE / "vision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # numpy only at import time
    return module


def inputs(name: str, count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` inputs of an architecture: photo crops, tokens with tail padding, or standard normal audio."""
    arch, rng = ARCHITECTURES[name], np.random.default_rng(seed)
    if arch.kind in ("image", "pixels"):
        return {"x": _vision().photos(count, seed, arch.size)}
    if arch.kind in ("encoder", "decoder"):
        ids = rng.integers(4, VOCAB, (count, arch.size)).astype(np.int64)
        if arch.kind == "decoder":
            return {"input_ids": ids}
        lengths = rng.integers(arch.size // 2, arch.size + 1, count)
        lengths[0] = arch.size
        return {"input_ids": ids, "attention_mask": (np.arange(arch.size) < lengths[:, None]).astype(np.int64)}
    shape = (count, arch.size) if arch.kind == "audio" else (count, MELS, arch.size)
    return {"x": rng.standard_normal(shape).astype(np.float32)}


# ------------------------------------------------------------------ building (torch from here on)
def build(name: str = "timm:resnet18", seed: int = 0):
    """The architecture in eval mode: seeded random weights and biases, realistic normalisation, no no-op scales."""
    import torch

    from tests.zoo import seeded, unit_signal

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    builder = {"timm": _timm, "torchvision": _torchvision, "transformers": _transformers}[source(name)]
    spec = ARCHITECTURES[name]
    model = seeded(lambda: builder(name.split(":", 1)[1], spec), seed)
    if spec.unit_signal:
        model = unit_signal(model, seed, spec.size)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.numel() > 1 and bool((p == p[0]).all()) and 0 < float(p[0]) < 1e-4:
                p.copy_(torch.empty(p.shape).uniform_(0.1, 0.5, generator=g))  # a layer scale at its init
            elif p.numel() == 1 and float(p) in (0.0, 1.0):  # a learnable scalar at its init: an identity
                p.add_(torch.empty(p.shape).uniform_(-0.2, 0.2, generator=g))
            elif p.dim() >= 2 and not p.any():
                bound = p[0].numel() ** -0.5  # nn.Linear's own: uniform in +-1/sqrt(fan_in)
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))
        for m in model.modules():  # a bias at its init of zeros, as nn.Linear and nn.Conv2d draw their own
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if (
                isinstance(w, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and w.dim() >= 2
                and b.numel() > 1
                and not b.any()
            ):
                bound = (w.numel() / b.numel()) ** -0.5
                b.copy_(torch.empty(b.shape).uniform_(-bound, bound, generator=g))
    return model


def _timm(arch: str, spec: Arch):
    import timm

    return timm.create_model(arch, pretrained=False, **spec.kwargs)


def _torchvision(arch: str, spec: Arch):
    import torchvision

    return torchvision.models.get_model(arch, weights=None, **spec.kwargs)


def _transformers(arch: str, spec: Arch):
    import transformers

    from tests.zoo import _hf as wrappers  # the zoo's wrappers: masked mean, last hidden state, logits

    masked_mean, hidden, logits = wrappers()
    kwargs = dict(spec.kwargs)
    add_pooling = kwargs.pop("add_pooling_layer", None)
    model_class = getattr(transformers, spec.model)
    config = model_class.config_class(**kwargs)
    model = model_class(config) if add_pooling is None else model_class(config, add_pooling_layer=add_pooling)
    if spec.kind == "mels":  # a speech model's encoder
        model = model.get_encoder()
    if spec.kind == "encoder":
        return masked_mean(model)
    if spec.kind == "decoder":
        return logits(model)
    return hidden(model, {"pixels": "pixel_values", "audio": "input_values", "mels": "input_features"}[spec.kind])
