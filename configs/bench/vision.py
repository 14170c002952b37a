"""Zoo CNNs for the benchmark (scripts/bench.py): torchvision and timm models, 224 px, random weights.

`build(name)` is the recipe factory of `vision.yaml` (`model.kwargs.name` picks the model). It
imports torchvision or timm, which are not on the project's default path: run it in a process
whose PYTHONPATH starts with `tests/zoo_site:.venv/zoo` (bench.py does that for its vision
builds; see tests/zoo_site/sitecustomize.py for why).

Weights are the libraries' own random initialisation; normalisation statistics are redrawn in the
ranges of trained networks (with the default mean 0 / var 1 / gamma 1 / beta 0 deep
random CNNs have vanishing outputs): BatchNorm mean and beta uniform in +-0.2, var in 0.5-2, gamma
in 0.6-1.4; LayerNorm gamma/beta likewise; ConvNeXt's layer scale (initialised to 1e-6, which
would make every block a no-op) uniform in 0.1-0.5.

`calibration()` and `photos()` need neither torch nor torchvision: crops of scikit-learn's two
bundled photographs (`load_sample_images`: a Chinese temple and a flower, 427x640), randomly
placed, sized and mirrored, resized to 224 px and ImageNet-normalised.
"""

from __future__ import annotations

import numpy as np

SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)

TORCHVISION = (
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "shufflenet_v2_x1_0",
    "regnet_x_400mf",
    "convnext_tiny",
)
TIMM = ("tf_efficientnet_lite0",)
MODELS = TORCHVISION + TIMM


def build(name: str = "resnet18", seed: int = 0):
    """The named zoo model in eval mode, seeded, with realistic normalisation statistics."""
    import torch

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _zoo_model(name)
        _realistic_statistics(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def _zoo_model(name: str):
    if name in TIMM:
        import timm

        return timm.create_model(name, pretrained=False)
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def _realistic_statistics(model, g) -> None:
    import torch
    from torch import nn

    def uniform(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.empty(t.shape).uniform_(low, high, generator=g))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                uniform(m.running_mean, -0.2, 0.2)
                uniform(m.running_var, 0.5, 2.0)
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                uniform(m.weight, 0.6, 1.4)
                uniform(m.bias, -0.2, 0.2)
            if isinstance(getattr(m, "layer_scale", None), nn.Parameter):  # torchvision ConvNeXt blocks
                uniform(m.layer_scale, 0.1, 0.5)


def photos(count: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """`count` normalised crops (N, 3, size, size) float32 of the two scikit-learn sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        image = images[i % len(images)]
        h, w = image.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(image[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
        pixels = np.asarray(crop, np.float32).transpose(2, 0, 1) / 255.0
        out[i] = pixels[:, :, ::-1] if rng.random() < 0.5 else pixels
    return (out - MEAN) / STD


def calibration(batches: int = 4, batch_size: int = 8, seed: int = 0):
    """Calibration batches {"x": (batch_size, 3, 224, 224)} of photo crops."""
    data = photos(batches * batch_size, seed)
    for i in range(batches):
        yield {"x": data[i * batch_size : (i + 1) * batch_size]}
