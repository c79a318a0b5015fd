"""The ResNet trunks (to layer3) that encode frames and masks.

torchvision is not a dependency, so the blocks are written here; their attribute names
(`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ...) are torchvision's, which
is what the published checkpoints use. Only the stem and layers 1-3 exist: the network
stops at stride 16 and layer4 never ran, so it has no weights to load.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "ResNetTrunk"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + skip)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (ResNet-50 and up)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + skip)


_LAYOUT: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6)),
}


class ResNetTrunk(nn.Module):
    """Stem + layer1..3 of a ResNet; `in_channels` > 3 for the mask encoder (RGB + mask)."""

    def __init__(self, kind: str, base_width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        block, counts = _LAYOUT[kind]
        w = base_width
        self.conv1 = nn.Conv2d(in_channels, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._in = w
        self.layer1 = self._stage(block, w, counts[0], 1)
        self.layer2 = self._stage(block, w * 2, counts[1], 2)
        self.layer3 = self._stage(block, w * 4, counts[2], 2)
        self.out_channels = self._in

    def _stage(
        self, block: type[BasicBlock] | type[Bottleneck], width: int, count: int, stride: int
    ) -> nn.Sequential:
        out = width * block.expansion
        down = None
        if stride != 1 or self._in != out:
            down = nn.Sequential(
                nn.Conv2d(self._in, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        blocks = [block(self._in, width, stride, down)]
        self._in = out
        blocks += [block(out, width, 1, None) for _ in range(count - 1)]
        return nn.Sequential(*blocks)
