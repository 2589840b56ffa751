"""Temporal Shift Module (Lin, Gan & Han, ICCV 2019) and the per-frame ResNet it lives in.

TSM runs a 2-D ResNet on every frame and makes it temporal by shifting part of the
channels along time at the start of every residual branch ("residual shift", the
paper's Fig. 3b): with X (B, T, C, H, W) and fold = C // 8,

    Y[:, t, :fold]        = X[:, t + 1, :fold]          one frame back in time
    Y[:, t, fold:2*fold]  = X[:, t - 1, fold:2*fold]    one frame forward
    Y[:, t, 2*fold:]      = X[:, t, 2*fold:]            the other 3/4 unchanged

with zeros where t + 1 or t - 1 falls outside the clip. The shift has no parameters,
so TSM-18/50 have exactly torchvision ResNet-18/50's parameters. Clip logits are the
mean of the frames' logits (TSN's average consensus, used by TSM).

Padding (mask False): padded frames are zeroed before every shift, so a valid frame
next to one reads zeros as at a clip's end; the consensus averages valid frames only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from clman.models.aggregators import masked_mean
from clman.models.baselines import check_clips

if TYPE_CHECKING:
    from torchvision.models.resnet import ResNet


def temporal_shift(x: torch.Tensor, fold_div: int = 8) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T, C, H, W): C // fold_div channels one frame back, as many forward."""
    fold = x.shape[2] // fold_div
    zero = torch.zeros_like(x[:, :1, :fold])  # (B, 1, fold, H, W)
    back = torch.cat([x[:, 1:, :fold], zero], dim=1)  # frame t gets frame t + 1
    fwd = torch.cat([zero, x[:, :-1, fold : 2 * fold]], dim=1)  # frame t gets frame t - 1
    return torch.cat([back, fwd, x[:, :, 2 * fold :]], dim=2)


def zero_padded(x: torch.Tensor, t: int, mask: torch.Tensor) -> torch.Tensor:
    """(B*T, C, H, W) frame features -> (B, T, C, H, W) with padded frames zeroed."""
    x = x.view(-1, t, *x.shape[1:])  # (B, T, C, H, W)
    return x.masked_fill(~mask[:, :, None, None, None], 0.0)


class TemporalShift(nn.Module):
    """TSM's shift as a temporal module: forward(x (B*T, C, H, W), t, mask (B, T)) -> same shape."""

    def __init__(self, fold_div: int = 8):
        super().__init__()
        self.fold_div = fold_div

    def forward(self, x: torch.Tensor, t: int, mask: torch.Tensor) -> torch.Tensor:
        return temporal_shift(zero_padded(x, t, mask), self.fold_div).flatten(0, 1)


class TemporalBlock(nn.Module):
    """A torchvision BasicBlock / Bottleneck with a temporal module at the start of its residual branch."""

    def __init__(self, block: nn.Module, temporal: nn.Module):
        from torchvision.models.resnet import Bottleneck

        super().__init__()
        self.block = block
        self.temporal = temporal
        self.bottleneck = isinstance(block, Bottleneck)

    def forward(self, x: torch.Tensor, t: int, mask: torch.Tensor) -> torch.Tensor:  # (B*T, C, H, W)
        b = self.block
        identity = x if b.downsample is None else b.downsample(x)  # the shortcut is not shifted
        out = b.relu(b.bn1(b.conv1(self.temporal(x, t, mask))))
        if self.bottleneck:
            out = b.relu(b.bn2(b.conv2(out)))
            out = b.bn3(b.conv3(out))
        else:  # BasicBlock
            out = b.bn2(b.conv2(out))
        return b.relu(out + identity)


class FrameResNet(nn.Module):
    """A torchvision ResNet on every frame, `temporal(channels)` in each residual branch, average consensus.

    `resnet` must have a 2-class fc (it is used as the frame classifier). Any T >= 1
    and any H, W >= 1 (the stem and strides pad).
    """

    def __init__(self, resnet: ResNet, temporal: Callable[[int], nn.Module], dropout: float = 0.5):
        super().__init__()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        layers = (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        self.blocks = nn.ModuleList(
            TemporalBlock(block, temporal(block.conv1.in_channels)) for layer in layers for block in layer
        )
        self.dropout = nn.Dropout(dropout)  # TSM's default before the classifier
        self.fc = resnet.fc

    def forward(self, clips: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        clips, mask = check_clips(clips, mask)  # (B, T, C, H, W), padded frames zeroed
        b, t = clips.shape[:2]
        x = self.stem(clips.flatten(0, 1))  # (B*T, 64, H/4, W/4)
        for block in self.blocks:
            x = block(x, t, mask)  # (B*T, C', H', W')
        feats = x.mean(dim=(2, 3))  # (B*T, D) global average pool
        frame_logits = self.fc(self.dropout(feats)).view(b, t, -1)  # (B, T, 2)
        logits = masked_mean(frame_logits, mask)  # (B, 2): consensus over valid frames
        return (logits, None) if return_weights else logits


def tsm(depth: int) -> FrameResNet:
    """TSM on torchvision ResNet-18 or -50 (random init), 1/8 + 1/8 channels shifted in every block."""
    from torchvision import models

    if depth == 18:
        resnet = models.resnet18(weights=None, num_classes=2)
    elif depth == 50:
        resnet = models.resnet50(weights=None, num_classes=2)
    else:
        raise ValueError(f"TSM depth must be one of (18, 50), got {depth}")
    return FrameResNet(resnet, lambda channels: TemporalShift(fold_div=8))
