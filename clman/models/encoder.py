"""Frame encoder: ResNet-18 with GroupNorm and non-local blocks (paper Sec. 3.1, Fig. 2).

The stem and the four stages are torchvision's ResNet-18 pieces (`BasicBlock`,
`conv1x1`) under torchvision's attribute names (`conv1`, `bn1`, `layer1..4`), so a
full-width batch-norm encoder loads a torchvision `resnet18` state dict (minus
`fc`) strictly. Non-local blocks live beside the stages as `nonlocal3` /
`nonlocal4` and start as the exact identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clman.models.groupnorm import ChannelsLastGroupNorm

NORMS = ("batch", "group")
NONLOCAL_STAGES = (3, 4)
STAGE_BLOCKS = (2, 2, 2, 2)  # ResNet-18


def gn_group_count(channels: int, gn_groups: int) -> int:
    """Largest group count <= gn_groups that divides channels (narrow widths have < 32 channels)."""
    groups = min(gn_groups, channels)
    while channels % groups:
        groups -= 1
    return groups


def make_norm_layer(norm: str, gn_groups: int = 32) -> Callable[[int], nn.Module]:
    """channels -> normalisation module; "group" is the paper's GN in every block."""
    if norm == "batch":
        return nn.BatchNorm2d
    elif norm == "group":
        if gn_groups < 1:
            raise ValueError(f"gn_groups must be >= 1, got {gn_groups}")
        # an nn.GroupNorm (same state dict); on CUDA it stays channels_last and bf16 (models/groupnorm.py)
        return lambda channels: ChannelsLastGroupNorm(gn_group_count(channels, gn_groups), channels)
    else:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018), z = x + Norm(W y).

    y_i = sum_j softmax_j(theta(x_i)^T phi(x_j)) g(x_j), with theta/phi/g 1x1 convs
    to C/2 channels. As in Wang et al., W is followed by a norm layer whose scale
    (and shift) start at zero, so a fresh block is the exact identity while W keeps
    a random init: zeroing W as well would leave both with zero gradients forever.
    """

    def __init__(self, channels: int, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        if channels < 2:
            raise ValueError(f"non-local block needs >= 2 channels, got {channels}")
        inner = channels // 2
        self.theta = nn.Conv2d(channels, inner, kernel_size=1)
        self.phi = nn.Conv2d(channels, inner, kernel_size=1)
        self.g = nn.Conv2d(channels, inner, kernel_size=1)
        self.out = nn.Conv2d(inner, channels, kernel_size=1)
        self.norm = norm_layer(channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.theta, self.phi, self.g, self.out):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, 1, HW, C/2): one "head", every spatial position is a token
        q = self.theta(x).flatten(2).transpose(1, 2).unsqueeze(1)
        k = self.phi(x).flatten(2).transpose(1, 2).unsqueeze(1)
        v = self.g(x).flatten(2).transpose(1, 2).unsqueeze(1)
        # embedded Gaussian: softmax(theta^T phi) without the 1/sqrt(d) scaling
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, 1, HW, C/2)
        y = y.squeeze(1).transpose(1, 2).reshape(b, c // 2, h, w)  # (B, C/2, H, W)
        return x + self.norm(self.out(y))


class FrameEncoder(nn.Module):
    """ResNet-18 trunk: (N, C, H, W) float frames -> (N, D) features, D = 512 * width."""

    def __init__(
        self,
        norm: str = "group",
        nonlocal_stages: Sequence[int] = (3, 4),
        width: float = 1.0,
        gn_groups: int = 32,
        in_channels: int = 3,
    ):
        super().__init__()
        stages = tuple(sorted(set(nonlocal_stages)))
        if any(s not in NONLOCAL_STAGES for s in stages):
            raise ValueError(f"nonlocal_stages must be a subset of {NONLOCAL_STAGES}, got {tuple(nonlocal_stages)}")
        base = int(round(64 * width))
        if width <= 0 or base < 2:
            raise ValueError(f"width must give >= 2 stem channels (64 * width), got width={width}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        norm_layer = make_norm_layer(norm, gn_groups)
        self.norm = norm
        self.nonlocal_stages = stages
        self.in_channels = in_channels
        widths = (base, 2 * base, 4 * base, 8 * base)
        self.out_dim = widths[-1]

        self.conv1 = nn.Conv2d(in_channels, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = base
        layers = []
        for i, (planes, blocks) in enumerate(zip(widths, STAGE_BLOCKS)):
            layers.append(_make_stage(inplanes, planes, blocks, 1 if i == 0 else 2, norm_layer))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

        # torchvision's ResNet init, applied before the non-local blocks exist so
        # it cannot overwrite their zero-initialised output norms
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        self.nonlocal3 = NonLocalBlock(widths[2], norm_layer) if 3 in stages else nn.Identity()
        self.nonlocal4 = NonLocalBlock(widths[3], norm_layer) if 4 in stages else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"frames must be (N, C, H, W) with C = {self.in_channels}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"frames must be a float tensor, got {x.dtype}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, w, H/4, W/4)
        x = self.layer2(self.layer1(x))  # (N, 2w, H/8, W/8)
        x = self.nonlocal3(self.layer3(x))  # (N, 4w, H/16, W/16)
        x = self.nonlocal4(self.layer4(x))  # (N, 8w, H/32, W/32)
        return torch.flatten(self.avgpool(x), 1)  # (N, 8w); any H, W


def _make_stage(
    inplanes: int, planes: int, blocks: int, stride: int, norm_layer: Callable[[int], nn.Module]
) -> nn.Sequential:
    """torchvision's ResNet._make_layer for BasicBlock, at any width."""
    from torchvision.models.resnet import BasicBlock, conv1x1  # here: torchvision costs ~1.4 s to import

    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(conv1x1(inplanes, planes, stride), norm_layer(planes))
    layers = [BasicBlock(inplanes, planes, stride, downsample, norm_layer=norm_layer)]
    layers += [BasicBlock(planes, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def build_encoder(
    norm: str = "group",
    nonlocal_stages: Sequence[int] = (3, 4),
    width: float = 1.0,
    gn_groups: int = 32,
    in_channels: int = 3,
) -> FrameEncoder:
    """The paper's encoder by default: ResNet-18 + GN + non-local after stages 3 and 4."""
    return FrameEncoder(norm, nonlocal_stages, width, gn_groups, in_channels)
