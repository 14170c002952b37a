"""Tiny models built in code, shared by every test (no downloads, < 1M parameters each).

Each factory is a module-level function returning an nn.Module in eval mode with seeded
random weights (BatchNorm statistics randomized too, so folding matters). `MODELS` maps a
name to (factory, inputs) where inputs are recipe `inputs` entries; `example_batch` makes
realistic values for them (token ids below VOCAB, padding masks).

Usable from a recipe as "tests.models:resnet" or "tests/models.py:resnet".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 128
SEQ = 16


def _finish(model: nn.Module, seed: int) -> nn.Module:
    """Randomize BatchNorm statistics/affine (seeded) and return the model in eval mode."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 0.8 + 0.6)
                m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
    return model.eval()


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _finish(build(), seed)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


# ---------------------------------------------------------------- CNNs
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, act=None)
        self.down = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return F.relu(self.conv2(self.conv1(x)) + identity)


class ResNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = conv_bn(3, width, 3)
        self.pool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.pool(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(num_classes: int = 10, width: int = 16, seed: int = 0) -> nn.Module:
    """ResNet-style: conv-bn-relu, maxpool, residual adds, 1x1 downsample, adaptive pool, linear."""
    return _seeded(lambda: ResNet(num_classes, width), seed)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden, 1, act=nn.ReLU6),
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            conv_bn(hidden, cout, 1, act=None),
        )

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act=nn.ReLU6),
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4),
            conv_bn(32, 128, 1, act=nn.ReLU6),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """MobileNetV2-style: depthwise-separable convs, ReLU6, inverted residuals."""
    return _seeded(lambda: MobileNetV2(num_classes), seed)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class MBConv3(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int, se: bool, act: type):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers = [conv_bn(cin, hidden, 1, act=act), conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act)]
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV3(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act=nn.Hardswish),
            MBConv3(16, 16, 16, 2, True, nn.ReLU),
            MBConv3(16, 64, 24, 2, False, nn.ReLU),
            MBConv3(24, 72, 24, 1, False, nn.ReLU),
            MBConv3(24, 96, 40, 2, True, nn.Hardswish),
            MBConv3(40, 120, 40, 1, True, nn.Hardswish),
            conv_bn(40, 160, 1, act=nn.Hardswish),
        )
        self.head = nn.Sequential(nn.Linear(160, 256), nn.Hardswish(), nn.Linear(256, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.head(torch.flatten(x, 1))


def mobilenet_v3(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """MobileNetV3-style: Hardswish, squeeze-excite (hardsigmoid gate, Mul), residuals."""
    return _seeded(lambda: MobileNetV3(num_classes), seed)


class UNet(nn.Module):
    def __init__(self, cin: int = 3, classes: int = 2, w: int = 8):
        super().__init__()
        self.enc1 = nn.Sequential(conv_bn(cin, w), conv_bn(w, w))
        self.enc2 = nn.Sequential(conv_bn(w, 2 * w), conv_bn(2 * w, 2 * w))
        self.mid = nn.Sequential(conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w))
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = nn.Sequential(conv_bn(4 * w, 2 * w), conv_bn(2 * w, 2 * w))
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec1 = nn.Sequential(conv_bn(3 * w, w), conv_bn(w, w))
        self.out = nn.Conv2d(w, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


def unet(classes: int = 2, seed: int = 0) -> nn.Module:
    """UNet-style: encoder/decoder, ConvTranspose and nearest upsampling, skip concats."""
    return _seeded(lambda: UNet(3, classes), seed)


class AudioNet(nn.Module):
    def __init__(self, num_classes: int = 8):
        super().__init__()

        def block(cin, cout, k, stride):
            return nn.Sequential(nn.Conv1d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm1d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(1, 16, 9, 4),
            nn.MaxPool1d(2),
            block(16, 32, 5, 1),
            nn.MaxPool1d(2),
            block(32, 32, 3, 1),
            block(32, 64, 3, 2),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def audio(num_classes: int = 8, seed: int = 0) -> nn.Module:
    """Conv1d audio classifier on a raw waveform (batch, 1, 1600)."""
    return _seeded(lambda: AudioNet(num_classes), seed)


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, num_classes: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_features, hidden), nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def mlp(in_features: int = 64, hidden: int = 256, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """Three Linear layers with ReLU."""
    return _seeded(lambda: MLP(in_features, hidden, num_classes), seed)


def mlp_outlier(channels: tuple[int, ...] = (3, 17, 40), factor: float = 300.0, seed: int = 0) -> nn.Module:
    """The MLP with outlier channels planted in fc1's output, the same function in fp32.

    fc1's rows `channels` are scaled by `factor` and fc2's matching columns divided by it (ReLU
    commutes with a positive scale): per-tensor uint8 activations of fc1's output leave the other
    channels a step or two of range, and plain PTQ loses the output (1.3 dB SQNR).
    """
    model = mlp(seed=seed)
    with torch.no_grad():
        for c in channels:
            model.fc1.weight[c] *= factor
            model.fc1.bias[c] *= factor
            model.fc2.weight[:, c] /= factor
    return model


# ---------------------------------------------------------------- transformers
class SelfAttention(nn.Module):
    """Multi-head attention written out: Linear q/k/v, matmul, softmax with additive mask, matmul."""

    def __init__(self, dim: int, heads: int, sdpa: bool = False):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def split(self, x):
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, mask=None, causal: bool = False):
        b, t, d = x.shape
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d // self.heads)
            if mask is not None:
                scores = scores + mask
            y = torch.matmul(scores.softmax(-1), v)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, sdpa: bool = False, pre_norm: bool = False):
        super().__init__()
        self.pre_norm = pre_norm
        self.attention = SelfAttention(dim, heads, sdpa)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.intermediate, self.output = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def ffn(self, x):
        return self.output(F.gelu(self.intermediate(x)))

    def forward(self, x, mask=None, causal: bool = False):
        if self.pre_norm:
            x = x + self.attention(self.norm1(x), mask, causal)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attention(x, mask, causal))
        return self.norm2(x + self.ffn(x))


class TinyBert(nn.Module):
    """BERT-style encoder: word/position embeddings, post-norm layers, GELU FFN, tanh pooler."""

    def __init__(
        self,
        vocab: int = VOCAB,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        ffn: int = 256,
        max_len: int = 64,
        num_labels: int = 0,
    ):
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn) for _ in range(layers))
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, num_labels) if num_labels else None

    def encode(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.word(input_ids) + self.position(positions)[None])
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask)
        return torch.tanh(self.pooler(x[:, 0]))

    def forward(self, input_ids, attention_mask):
        pooled = self.encode(input_ids, attention_mask)
        return self.classifier(pooled) if self.classifier is not None else pooled


def bert(num_labels: int = 0, layers: int = 2, seed: int = 0) -> nn.Module:
    """BERT-style encoder (int64 input_ids + attention_mask); pooled output or logits."""
    return _seeded(lambda: TinyBert(num_labels=num_labels, layers=layers), seed)


class TinyGPT(nn.Module):
    """GPT-style decoder: pre-norm block, causal mask built from arange/tril (bool path), LM head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 64, heads: int = 4, layers: int = 2, max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(EncoderLayer(dim, heads, 4 * dim, pre_norm=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids):
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.embed(input_ids) + self.position(pos)[None]
        causal = pos[None, :] > pos[:, None]
        mask = torch.zeros(t, t, dtype=x.dtype).masked_fill(causal, float("-inf"))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def gpt(layers: int = 2, seed: int = 0) -> nn.Module:
    """GPT-style decoder with a causal mask (int64 input_ids -> logits)."""
    return _seeded(lambda: TinyGPT(layers=layers), seed)


class TinyViT(nn.Module):
    """ViT-style: patch-embedding conv, class token, position embedding, SDPA encoder, head."""

    def __init__(self, num_classes: int = 10, dim: int = 64, layers: int = 2, patch: int = 4, image: int = 32):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(EncoderLayer(dim, 4, 2 * dim, sdpa=True, pre_norm=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def vit(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """ViT-style image classifier (scaled_dot_product_attention)."""
    return _seeded(lambda: TinyViT(num_classes), seed)


# ---------------------------------------------------------------- multiple inputs/outputs, HF
class TwoInTwoOut(nn.Module):
    """An image and a feature vector in; a dict with logits and an embedding out."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(conv_bn(3, 16, 3, 2), conv_bn(16, 32, 3, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.vector = nn.Sequential(nn.Linear(20, 32), nn.ReLU())
        self.fuse = nn.Linear(64, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, image, features):
        z = torch.relu(self.fuse(torch.cat([self.image(image), self.vector(features)], dim=1)))
        return {"logits": self.head(z), "embedding": z}


def two_io(seed: int = 0) -> nn.Module:
    """Two inputs (image, features) and two outputs (dict: logits, embedding)."""
    return _seeded(TwoInTwoOut, seed)


class HFBert(nn.Module):
    """A transformers BertModel returning (last_hidden_state, pooler_output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bert = model

    def forward(self, input_ids, attention_mask):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output


def hf_bert(layers: int = 2, seed: int = 0) -> nn.Module:
    """Hugging Face BertModel from a tiny BertConfig with random weights (no download)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return _seeded(lambda: HFBert(BertModel(config, add_pooling_layer=True)), seed)


def hf_bert_outlier(
    layer: int = 1, channels: tuple[int, ...] = (5, 40, 77), factor: float = 300.0, seed: int = 0
) -> nn.Module:
    """The Hugging Face BertModel with outlier channels at one FFN down-projection's input: rows
    `channels` of `encoder.layer.<layer>.intermediate.dense` scaled by `factor` (a different model
    in fp32 too, since GELU does not commute with a scale)."""
    model = hf_bert(seed=seed)
    dense = model.bert.encoder.layer[layer].intermediate.dense
    with torch.no_grad():
        for c in channels:
            dense.weight[c] *= factor
            dense.bias[c] = dense.bias[c].abs() * factor
    return model


def _image(shape: list[int]) -> list[dict[str, Any]]:
    return [{"name": "x", "shape": shape, "dtype": "float32"}]


_TEXT = [
    {"name": "input_ids", "shape": [2, SEQ], "dtype": "int64"},
    {"name": "attention_mask", "shape": [2, SEQ], "dtype": "int64"},
]

MODELS: dict[str, tuple[Callable[..., nn.Module], list[dict[str, Any]]]] = {
    "resnet": (resnet, _image([2, 3, 32, 32])),
    "mobilenet_v2": (mobilenet_v2, _image([2, 3, 32, 32])),
    "mobilenet_v3": (mobilenet_v3, _image([2, 3, 32, 32])),
    "unet": (unet, _image([2, 3, 32, 32])),
    "audio": (audio, _image([2, 1, 1600])),
    "mlp": (mlp, _image([2, 64])),
    "vit": (vit, _image([2, 3, 32, 32])),
    "bert": (bert, _TEXT),
    "gpt": (gpt, [{"name": "input_ids", "shape": [2, SEQ], "dtype": "int64"}]),
    "two_io": (
        two_io,
        [
            {"name": "image", "shape": [2, 3, 32, 32], "dtype": "float32"},
            {"name": "features", "shape": [2, 20], "dtype": "float32"},
        ],
    ),
    "hf_bert": (hf_bert, _TEXT),
}


def example_batch(name: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for MODELS[name] with `batch` rows: token ids < VOCAB, masks with tail padding."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in MODELS[name][1]:
        shape = [batch, *spec["shape"][1:]]
        if spec["name"] == "attention_mask":
            lengths = torch.randint(shape[1] // 2, shape[1] + 1, (batch,), generator=g)
            lengths[0] = shape[1]
            out[spec["name"]] = (torch.arange(shape[1])[None, :] < lengths[:, None]).long()
        elif spec["dtype"] == "int64":
            out[spec["name"]] = torch.randint(0, VOCAB, shape, generator=g)
        else:
            out[spec["name"]] = torch.randn(shape, generator=g)
    return out


def _calibration(name: str, batches: int = 4, batch_size: int = 8):
    """Calibration batches for MODELS[name] (a data factory for the recipes under configs/)."""
    for seed in range(batches):
        yield {k: v.numpy() for k, v in example_batch(name, batch=batch_size, seed=100 + seed).items()}


def image_batches():
    return _calibration("resnet")


def audio_batches():
    return _calibration("audio")


def text_batches():
    return _calibration("bert")


def token_batches():
    return _calibration("gpt")


def mlp_batches():
    return _calibration("mlp")
