"""The ecosystem's model zoo: torchvision, timm and Hugging Face transformers models as users write them.

Random seeded weights, small configs and inputs (no downloads). Every entry of `ZOO` is a recipe
model factory (`"tests/zoo.py:NAME"`) and has a calibration data factory (`"tests/zoo.py:NAME_data"`,
a callable returning batches). Random BatchNorm statistics get the ranges of trained nets (mean,
beta +-0.2; var 0.5-2; gamma 0.6-1.4): with the defaults (0, 1, 1, 0) deep random CNNs have
vanishing outputs, and re-estimated statistics make them chaotic (FIELD-NOTES). The deep, narrow
ones (MobileNets, EfficientNet, ShuffleNet) still give every input the same output; `unit_signal`
scales them so that their output depends on the input and their SQNR tests the quantizer.

torchvision and timm live in `.venv/zoo`, off the default path (the registry's torchvision breaks
transformers where both are importable), so their models are built only in a process started with
`vision_env()`: `python tests/zoo.py OUT.json WORK [NAME...]` runs each vision model through
`quantcli.pipeline.run` at default settings there and writes what tests/test_zoo.py asserts.
Transformers models are built in the test process itself.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ZOO_FILE = Path(__file__).resolve()
VISION_PATH = (ROOT / "tests" / "zoo_site", ROOT / ".venv" / "zoo")
VOCAB = 128
SEQ = 16


RUN_VARIABLE = "QUANTCLI_ZOO_RUN"


def name_test_run() -> None:
    """Give this test run a name its pytest-xdist workers inherit (they start after this is called)."""
    os.environ.setdefault(RUN_VARIABLE, uuid.uuid4().hex)


def vision_run_dir() -> Path:
    """The folder of this test run's background vision runner, the same in every pytest-xdist worker."""
    run = os.environ.get(RUN_VARIABLE) or f"solo-{os.getpid()}"
    return Path(tempfile.gettempdir()) / f"quantcli-zoo-{run}"


def start_vision_runner(names: Sequence[str] = ()) -> None:
    """Run the vision models `names` (all of VISION if none) in one background process, once per test run.

    The first caller starts it; it writes results.json, then its exit code to `rc`, then deletes the
    models it built. Its process group id is in `pid`, for `stop_vision_runner`.
    """
    from filelock import FileLock

    folder = vision_run_dir()
    folder.mkdir(exist_ok=True)
    with FileLock(str(folder / "start.lock")):
        if (folder / "pid").exists():
            return
        selected = " ".join(f'"{name}"' for name in names)
        script = (
            f'"{sys.executable}" "{ZOO_FILE}" "{folder / "results.json"}" "{folder / "work"}" {selected} '
            f'2> "{folder / "stderr.txt"}"; echo $? > "{folder / "rc"}"; rm -rf "{folder / "work"}"'
        )
        proc = subprocess.Popen(
            ["sh", "-c", script],
            env=vision_env(),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        (folder / "pid").write_text(str(proc.pid))


def stop_vision_runner() -> None:
    """End this test run's vision runner if it is still running, and delete its folder."""
    folder = vision_run_dir()
    if not folder.exists():
        return
    if (folder / "pid").exists() and not (folder / "rc").exists():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int((folder / "pid").read_text()), signal.SIGTERM)
    shutil.rmtree(folder, ignore_errors=True)


def vision_results(poll: float = 2.0) -> dict[str, Any]:
    """The background runner's {name: result} once it has finished (starting it if nobody has);
    {"failed": why} when it exited without results."""
    start_vision_runner()
    folder = vision_run_dir()
    while not (folder / "rc").exists():
        time.sleep(poll)
    results = folder / "results.json"
    if (folder / "rc").read_text().strip() != "0" or not results.exists():
        return {
            "failed": f"the zoo runner failed with exit {(folder / 'rc').read_text().strip()}:\n"
            f"{(folder / 'stderr.txt').read_text()[-4000:]}"
        }
    return json.loads(results.read_text())


def vision_env() -> dict[str, str]:
    """The environment of a process that may import torchvision and timm (and this worktree's quantcli)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, VISION_PATH), str(ROOT)])
    env["OMP_NUM_THREADS"] = "1"
    return env


@dataclass(frozen=True)
class Entry:
    """One zoo model: its builder, the recipe's inputs, where it comes from, how its SQNR is measured."""

    build: Callable[[], Any]
    inputs: list[dict[str, Any]]
    source: str  # torchvision | timm | transformers
    centered: bool  # CNN with random weights: compare the input-dependent part (minus the batch mean)


# ------------------------------------------------------------------ building
def realistic_bn(model, seed: int):
    """BatchNorm statistics and affine parameters in the ranges of trained networks, seeded."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) * 0.8 + 0.6)
                    m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
    return model


def seeded(build: Callable[[], Any], seed: int = 0) -> Any:
    """Build under a fixed seed, with realistic BN statistics, in eval mode."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return realistic_bn(build(), seed).eval()


def unit_signal(model, seed: int = 0, size: int = 64):
    """Scale a CNN so its signal survives depth (a data-dependent, LSUV-style init), in one forward pass.

    Seeded random weights collapse the input in deep, narrow CNNs (MobileNet, EfficientNet, ShuffleNet):
    their output is the same for every input, to 1e-5 of its energy, so no SQNR there tests the
    quantizer. On a fixed batch of standard normal images (seed 50: neither calibration nor test
    data), each conv and linear layer's weight is scaled so its output, less bias, has unit std; each
    BatchNorm's running variance becomes the layer's mean channel variance times 0.5-2 (one scale a
    layer: a near-constant channel is not blown up to unit variance) and its running mean its input's
    channel means less 0.4-0.6 std, so that most activations are on, as in trained nets (centred,
    the deeper ones turn chaotic: int8 rounding grows to 7 dB output SQNR). The input-dependent share
    of the output becomes 2-14 % (tests/tolerances.py). Deterministic: a fixed batch and generator.
    """
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    g = torch.Generator().manual_seed(seed + 2)

    def unit_std(layer, args, out):
        bias = 0 if layer.bias is None else layer.bias.view(-1, *[1] * (out.dim() - 2))
        scale = (out - bias).std()
        layer.weight.div_(scale)
        return (out - bias) / scale + bias

    def centre(layer, args):
        x, n = args[0], layer.num_features
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims)
        layer.running_mean.copy_(mean - (torch.rand(n, generator=g) * 0.2 + 0.4) * var.mean().sqrt())
        layer.running_var.copy_(var.mean() * (torch.rand(n, generator=g) * 1.5 + 0.5))

    hooks = [
        m.register_forward_hook(unit_std) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    hooks += [m.register_forward_pre_hook(centre) for m in model.modules() if isinstance(m, _BatchNorm)]
    images = np.random.default_rng(50).standard_normal((16, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        model(torch.from_numpy(images))
    for hook in hooks:
        hook.remove()
    return model


def _torchvision(name: str, **kw):
    import torchvision.models as tvm

    return seeded(lambda: getattr(tvm, name)(weights=None, num_classes=10, **kw))


def _timm(name: str, **kw):
    import timm

    return seeded(lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw))


def tv_resnet():
    """torchvision's ResNet with one BasicBlock a stage (resnet18 has two)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return seeded(lambda: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10))


# Smaller configurations of torchvision's own classes (its builders only scale the classifier):
# the same blocks and ops as the published models, a fraction of the export time.
def tv_mobilenet_v2():
    from torchvision.models import MobileNetV2

    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 1, 2]]
    return unit_signal(seeded(lambda: MobileNetV2(num_classes=10, width_mult=0.5, inverted_residual_setting=setting)))


def tv_mobilenet_v3():
    """mobilenet_v3_small's first blocks: ReLU and Hardswish, squeeze-excitation (Hardsigmoid)."""
    from torchvision.models.mobilenetv3 import InvertedResidualConfig as Block
    from torchvision.models.mobilenetv3 import MobileNetV3

    setting = [
        Block(16, 3, 16, 16, True, "RE", 2, 1, 1.0),
        Block(16, 3, 72, 24, False, "RE", 2, 1, 1.0),
        Block(24, 5, 96, 40, True, "HS", 2, 1, 1.0),
        Block(40, 5, 240, 40, True, "HS", 1, 1, 1.0),
    ]
    return unit_signal(seeded(lambda: MobileNetV3(setting, last_channel=256, num_classes=10)))


def tv_efficientnet():
    """efficientnet_b0's first stages: MBConv with SiLU, squeeze-excitation (Sigmoid), stochastic depth."""
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    setting = [MBConvConfig(1, 3, 1, 32, 16, 1), MBConvConfig(6, 3, 2, 16, 24, 2), MBConvConfig(6, 5, 2, 24, 40, 1)]
    return unit_signal(seeded(lambda: EfficientNet(setting, dropout=0.2, num_classes=10)))


def tv_regnet():
    """A 3-block RegNetY: grouped convs, squeeze-excitation (Sigmoid), residual adds."""
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(depth=3, w_0=24, w_a=24.48, w_m=2.54, group_width=8, se_ratio=0.25)
    return seeded(lambda: RegNet(params, num_classes=10))


def tv_shufflenet():
    """ShuffleNetV2, fewer units: channel split (in stride-1 units), concat, channel shuffle."""
    from torchvision.models import ShuffleNetV2

    return unit_signal(seeded(lambda: ShuffleNetV2([2, 1, 1], [24, 48, 96, 192, 256], num_classes=10)))


def tv_convnext():
    """A 3-stage ConvNeXt; layer scale drawn in 0.1-0.5 (1e-6 at init would mute every block)."""
    import torch
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    def build():
        model = ConvNeXt(
            [CNBlockConfig(32, 64, 2), CNBlockConfig(64, 128, 2), CNBlockConfig(128, None, 2)], num_classes=10
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layer_scale"):
                    p.copy_(torch.rand(p.shape) * 0.4 + 0.1)
        return model

    return seeded(build)


def tv_vit():
    """A 2-layer VisionTransformer; its head is drawn at random (torchvision zeroes it, so the output is 0)."""
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    def build():
        model = VisionTransformer(
            image_size=64, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
        )
        torch.nn.init.normal_(model.heads.head.weight, std=0.1)
        return model

    return seeded(build)


def tv_swin():
    """A 2-stage Swin: shifted windows (roll, masks), patch merging, relative position bias."""
    from torchvision.models.swin_transformer import SwinTransformer

    return seeded(
        lambda: SwinTransformer(
            patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10
        )
    )


def timm_tf_efficientnet_lite0():
    """TF "same" padding (an explicit pad before strided and depthwise convs), ReLU6."""
    return _timm("tf_efficientnet_lite0")


def timm_tf_mobilenetv3():
    """TF "same" padding, Hardswish, squeeze-excitation by x.mean((2, 3)) and Hardsigmoid."""
    return unit_signal(_timm("tf_mobilenetv3_small_100"))


def timm_resnet10t():
    """timm's ResNet with a deep stem and average-pool downsampling."""
    return _timm("resnet10t")


# ------------------------------------------------------------------ transformers (small configs)
def _hf():
    import torch

    class MaskedMean(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask[..., None].to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1)

    class Hidden(torch.nn.Module):
        """The encoder's last_hidden_state for one keyword input."""

        def __init__(self, encoder, key: str):
            super().__init__()
            self.encoder, self.key = encoder, key

        def forward(self, x):
            return self.encoder(**{self.key: x}).last_hidden_state

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).logits

    return MaskedMean, Hidden, Logits


_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def hf_bert():
    """BertModel with its pooler (unused): the masked mean of last_hidden_state, as sentence encoders do."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **_SMALL)
    return seeded(lambda: _hf()[0](BertModel(config)))


def hf_distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(
        vocab_size=VOCAB, max_position_embeddings=64, dim=64, n_layers=2, n_heads=4, hidden_dim=128
    )
    return seeded(lambda: _hf()[0](DistilBertModel(config)))


def hf_roberta():
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(vocab_size=VOCAB, max_position_embeddings=64, **_SMALL)
    return seeded(lambda: _hf()[0](RobertaModel(config, add_pooling_layer=False)))


def hf_gpt2():
    """GPT2LMHeadModel (Conv1D layers, tied LM head) -> logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=2,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        use_cache=False,
    )  # logits only: no empty key/value cache concatenated in
    return seeded(lambda: _hf()[2](GPT2LMHeadModel(config)))


def hf_t5_encoder():
    """T5EncoderModel (RMS norm, relative position bias, tied `shared` embedding)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    return seeded(lambda: _hf()[0](T5EncoderModel(config)))


def hf_vit():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=32, patch_size=8, **_SMALL)
    return seeded(lambda: _hf()[1](ViTModel(config, add_pooling_layer=False), "pixel_values"))


WHISPER_MELS, WHISPER_FRAMES = 16, 64


def hf_whisper_encoder():
    """Whisper's encoder: two conv1d + GELU, then pre-norm layers, on (batch, mels, frames)."""
    import torch
    from transformers import WhisperConfig, WhisperModel

    config = WhisperConfig(
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        num_mel_bins=WHISPER_MELS,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=128,
        max_source_positions=WHISPER_FRAMES // 2,
        max_target_positions=16,
    )

    def build():
        encoder = WhisperModel(config).get_encoder()
        with torch.no_grad():  # at init (std 0.02) the convs' output is ~1 % of the sinusoidal positions
            for conv in (encoder.conv1, encoder.conv2):
                conv.weight.mul_(8.0)
        return _hf()[1](encoder, "input_features")

    return seeded(build)


def hf_wav2vec2():
    """Wav2Vec2Model: conv feature extractor (GroupNorm), weight-normed positional conv, post-norm layers."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(
        vocab_size=VOCAB,
        conv_dim=(32, 32, 32),
        conv_kernel=(10, 3, 3),
        conv_stride=(5, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        **_SMALL,
    )
    return seeded(lambda: _hf()[1](Wav2Vec2Model(config), "input_values"))


# ------------------------------------------------------------------ the table
def _image(size: int) -> list[dict[str, Any]]:
    return [{"name": "x", "shape": [2, 3, size, size], "dtype": "float32"}]


_TEXT = [
    {"name": "input_ids", "shape": [2, SEQ], "dtype": "int64"},
    {"name": "attention_mask", "shape": [2, SEQ], "dtype": "int64"},
]
_IDS = [{"name": "input_ids", "shape": [2, SEQ], "dtype": "int64"}]

ZOO: dict[str, Entry] = {
    "tv_resnet": Entry(tv_resnet, _image(64), "torchvision", True),
    "tv_mobilenet_v2": Entry(tv_mobilenet_v2, _image(64), "torchvision", True),
    "tv_mobilenet_v3": Entry(tv_mobilenet_v3, _image(64), "torchvision", True),
    "tv_efficientnet": Entry(tv_efficientnet, _image(64), "torchvision", True),
    "tv_regnet": Entry(tv_regnet, _image(64), "torchvision", True),
    "tv_shufflenet": Entry(tv_shufflenet, _image(64), "torchvision", True),
    "tv_convnext": Entry(tv_convnext, _image(64), "torchvision", True),
    "tv_vit": Entry(tv_vit, _image(64), "torchvision", False),
    "tv_swin": Entry(tv_swin, _image(64), "torchvision", False),
    "timm_tf_efficientnet_lite0": Entry(timm_tf_efficientnet_lite0, _image(64), "timm", True),
    "timm_tf_mobilenetv3": Entry(timm_tf_mobilenetv3, _image(64), "timm", True),
    "timm_resnet10t": Entry(timm_resnet10t, _image(64), "timm", True),
    "hf_bert": Entry(hf_bert, _TEXT, "transformers", False),
    "hf_distilbert": Entry(hf_distilbert, _TEXT, "transformers", False),
    "hf_roberta": Entry(hf_roberta, _TEXT, "transformers", False),
    "hf_gpt2": Entry(hf_gpt2, _IDS, "transformers", False),
    "hf_t5_encoder": Entry(hf_t5_encoder, _TEXT, "transformers", False),
    "hf_vit": Entry(hf_vit, [{"name": "x", "shape": [2, 3, 32, 32], "dtype": "float32"}], "transformers", False),
    "hf_whisper_encoder": Entry(
        hf_whisper_encoder,
        [{"name": "x", "shape": [2, WHISPER_MELS, WHISPER_FRAMES], "dtype": "float32"}],
        "transformers",
        False,
    ),
    "hf_wav2vec2": Entry(hf_wav2vec2, [{"name": "x", "shape": [2, 1600], "dtype": "float32"}], "transformers", False),
}
VISION = [name for name, e in ZOO.items() if e.source != "transformers"]
TRANSFORMERS = [name for name, e in ZOO.items() if e.source == "transformers"]


# ------------------------------------------------------------------ data
def batch(name: str, size: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs for ZOO[name]: floats standard normal, token ids < VOCAB, masks with tail padding."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in ZOO[name].inputs:
        shape = [size, *spec["shape"][1:]]
        if spec["name"] == "attention_mask":
            lengths = rng.integers(shape[1] // 2, shape[1] + 1, size)
            lengths[0] = shape[1]
            out[spec["name"]] = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        elif spec["dtype"] == "int64":
            out[spec["name"]] = rng.integers(1, VOCAB, shape).astype(np.int64)
        else:
            out[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
    return out


CALIBRATION_BATCHES, CALIBRATION_SIZE = 4, 8


def calibration(name: str):
    """Calibration batches for ZOO[name] (seeds 100+), disjoint from the test batch (seed 7)."""
    return [batch(name, CALIBRATION_SIZE, 100 + i) for i in range(CALIBRATION_BATCHES)]


def held_out(name: str) -> dict[str, np.ndarray]:
    return batch(name, 16, 7)


for _name in ZOO:  # "tests/zoo.py:NAME_data" for recipes
    globals()[f"{_name}_data"] = functools.partial(calibration, _name)


def recipe(name: str, folder: Path) -> Path:
    """A default-settings recipe for ZOO[name] in `folder`: the model, its inputs, calibration data, and
    tests/tolerances.py's target."""
    import yaml

    from tests.tolerances import QUANTIZATION

    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "model": {"factory": f"{ZOO_FILE}:{name}"},
        "inputs": ZOO[name].inputs,
        "calibration": {"data": f"{ZOO_FILE}:{name}_data"},
        "quantization": QUANTIZATION,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ------------------------------------------------------------------ running and measuring
def _sqnr(reference: np.ndarray, other: np.ndarray, centered: bool) -> float:
    from quantcli.numerics.parity import sqnr_db

    if centered:  # the input-dependent part: a random CNN's output is mostly the same for every input
        reference, other = reference - reference.mean(0), other - other.mean(0)
    return sqnr_db(reference, other)


def measure(name: str, work: Path) -> dict[str, Any]:
    """What the tests assert of a finished run in `work`: ORT's integer kernels and float islands, and SQNRs.

    SQNRs on the held-out batch: ORT (full optimizations) vs the converted PyTorch module, that
    module vs fp32, ORT vs fp32; for CNNs on the input-dependent part (minus the batch mean) and
    raw, with the input-dependent share of the fp32 output's energy.
    """
    import torch

    from quantcli import _torch
    from quantcli.onnx import runtime

    entry, data = ZOO[name], held_out(name)
    args = tuple(torch.from_numpy(data[i["name"]]) for i in entry.inputs)
    outputs = {}
    with torch.no_grad():
        for key, file in (("fp32", "float.pt2"), ("int8", "program.pt2")):
            result = _torch.load_program(work / "converted" / file).module()(*args)
            outputs[key] = torch.utils._pytree.tree_leaves(result)[0].numpy()
    outputs["ort"] = runtime.run(runtime.session(work / "model.onnx"), data)[0]
    fp32 = outputs["fp32"]
    result = {"share": round(float(((fp32 - fp32.mean(0)) ** 2).sum() / max((fp32**2).sum(), 1e-30)), 6)}
    for label, (a, b) in {
        "ort_vs_int8": ("int8", "ort"),
        "int8_vs_fp32": ("fp32", "int8"),
        "ort_vs_fp32": ("fp32", "ort"),
    }.items():
        result[f"{label}_db"] = _sqnr(outputs[a], outputs[b], entry.centered)
        result[f"{label}_raw_db"] = _sqnr(outputs[a], outputs[b], False)
    report = json.loads((work / "model.report.json").read_text())
    kernels = report["kernels"]  # the export report's own analysis of ORT's optimized graph
    result.update(
        coverage=kernels["coverage"],
        islands=kernels["islands"],
        warning=kernels["warning"],
        parity_db=report["parity"]["min_sqnr_db"],
        excess_db=report["parity"]["excess_db"],
        saturable_pairs=report["u8s8"]["saturable_pairs"],
    )
    return result


def run(name: str, work: Path) -> dict[str, Any]:
    """quantcli's whole pipeline at default settings (quantcli.pipeline.run), then `measure`."""
    import time

    from quantcli import pipeline
    from quantcli.errors import QuantCliError

    start, cpu = time.perf_counter(), time.process_time()
    try:
        pipeline.run(recipe(name, work), work)
        result: dict[str, Any] = {"rc": 0, "error": ""}
    except QuantCliError as exc:
        result = {"rc": exc.exit_code, "error": str(exc).splitlines()[0]}
    result.update(seconds=round(time.perf_counter() - start, 1), cpu_seconds=round(time.process_time() - cpu, 1))
    if (work / "model.onnx").exists():
        result.update(measure(name, work))
    return result


def main(out: str, work: str, *names: str) -> int:
    """Run each vision model (all of VISION by default) in this process; write {name: result} to `out`."""
    results = {}
    for name in names or VISION:
        try:
            results[name] = run(name, Path(work) / name)
        except Exception as exc:  # recorded for the test that reads it, which fails with the traceback
            results[name] = {"rc": 1, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'islands'})}", file=sys.stderr)
    Path(out).write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
