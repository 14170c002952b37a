"""Small conv-bn-relu CNN for scikit-learn's 8x8 handwritten digits.

This module is imported by quantcli at run time, so it depends on torch only.
Input: ``x`` of shape [B, 1, 8, 8] float32 (pixels scaled to [0, 1]).
Output: logits of shape [B, 10].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["DigitsNet", "build"]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=False),
    )


class ResidualBlock(nn.Module):
    """Bottleneck residual block: 1x1 reduce -> 3x3 -> 1x1 expand, identity skip.

    Each conv is followed by BatchNorm; ReLU after the first two convs and
    after the residual add.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu3(y + x)


class DigitsNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, 16),  # [B,16,8,8]
            _conv_bn_relu(16, 32),  # [B,32,8,8]
            nn.MaxPool2d(2),  # [B,32,4,4]
            _conv_bn_relu(32, 64),  # [B,64,4,4]
            ResidualBlock(64, 16),  # [B,64,4,4]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x)
        x = self.flatten(x)
        return self.fc(x)


def build(checkpoint: str | None = None) -> nn.Module:
    """Build DigitsNet, optionally load a state_dict, return it in eval mode.

    A relative ``checkpoint`` path is resolved against this file's directory,
    not the current working directory.
    """
    model = DigitsNet()
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_absolute():
            path = Path(__file__).resolve().parent / path
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    model.eval()
    return model
