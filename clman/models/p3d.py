"""Pseudo-3D ResNet (Qiu, Yao & Mei, ICCV 2017), on the ResNet-50 layout.

P3D factors each 3x3x3 convolution of a bottleneck into a spatial S = 1x3x3 and a
temporal T = 3x1x1 convolution, arranged three ways (the paper's P3D-A, -B, -C blocks):

    P3D-A (cascaded):        x_{t+1} = x_t + T(S(x_t))
    P3D-B (parallel):        x_{t+1} = x_t + S(x_t) + T(x_t)
    P3D-C (cascaded + skip): x_{t+1} = x_t + S(x_t) + T(S(x_t))

inside a bottleneck (1x1x1 reduce, S/T at the reduced width, 1x1x1 expand; BN and
ReLU after each convolution, as the public implementations), and the P3D ResNet chains
A, B, C in turn over all its residual units.

Depth: the paper's P3D ResNet is built on ResNet-152 (199 layers). We build it on
ResNet-50's (3, 4, 6, 3) bottlenecks (16 P3D blocks, 66 weight layers with the stem and
fc; "P3D63" in the widely used PyTorch port): the smallest bottleneck layout. Its 27.3 M
parameters (2-class head) sit with the other Table 4 models (R3D-18 33.2 M, TSM-50
23.5 M) when all are trained from scratch on a few hundred videos, as the paper did;
one built on ResNet-152 (itself 60 M) would be the odd one out.
Stride-2 spatial downsampling sits in the first 1x1x1 conv of a stage (as in the Caffe
ResNet P3D started from), so S and T always see the same grid and P3D-B can add them.

Time is never downsampled: the 16 temporal convs see 33 frames, more than any clip, and
pad with zeros, so P3D takes any T >= 1 (and any H, W >= 1); global average pooling over
T x H x W. Input (B, 3, T, H, W), output (B, 2); wrap it in baselines.Video3D.
"""

from __future__ import annotations

import torch
from torch import nn

P3D_LAYOUT = (3, 4, 6, 3)  # ResNet-50 bottlenecks per stage
P3D_KINDS = "ABC"


class P3DBlock(nn.Module):
    """Bottleneck P3D block of kind "A", "B" or "C": (B, inplanes, T, H, W) -> (B, 4 planes, T, H/s, W/s)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, kind: str, stride: int = 1):
        super().__init__()
        if kind not in P3D_KINDS:
            raise ValueError(f"P3D block kind must be one of {tuple(P3D_KINDS)}, got {kind!r}")
        self.kind = kind
        out = planes * self.expansion
        self.conv1 = nn.Conv3d(inplanes, planes, 1, stride=(1, stride, stride), bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv_s = nn.Conv3d(planes, planes, (1, 3, 3), padding=(0, 1, 1), bias=False)  # S
        self.bn_s = nn.BatchNorm3d(planes)
        self.conv_t = nn.Conv3d(planes, planes, (3, 1, 1), padding=(1, 0, 0), bias=False)  # T
        self.bn_t = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv3d(inplanes, out, 1, stride=(1, stride, stride), bias=False), nn.BatchNorm3d(out)
            )

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn_s(self.conv_s(x)))

    def temporal(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn_t(self.conv_t(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (B, 4p, T, H', W')
        h = self.relu(self.bn1(self.conv1(x)))  # (B, p, T, H', W')
        if self.kind == "A":
            h = self.temporal(self.spatial(h))  # P3D-A: T(S(x))
        elif self.kind == "B":
            h = self.spatial(h) + self.temporal(h)  # P3D-B: S(x) + T(x)
        else:
            s = self.spatial(h)
            h = s + self.temporal(s)  # P3D-C: S(x) + T(S(x))
        return self.relu(self.bn3(self.conv3(h)) + identity)


class P3DResNet(nn.Module):
    """(B, 3, T, H, W) -> (B, num_classes): stem, 16 P3D bottlenecks A, B, C, A, ..., pool, fc."""

    def __init__(self, layout: tuple[int, ...] = P3D_LAYOUT, num_classes: int = 2, dropout: float = 0.5):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, 64, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )
        blocks, inplanes, i = [], 64, 0
        for stage, n in enumerate(layout):
            planes = 64 * 2**stage
            for j in range(n):
                stride = 2 if stage > 0 and j == 0 else 1
                blocks.append(P3DBlock(inplanes, planes, P3D_KINDS[i % 3], stride))
                inplanes, i = planes * P3DBlock.expansion, i + 1
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():  # torchvision's ResNet init
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # (B, 2048, T, H/32, W/32)
        x = self.pool(x).flatten(1)  # (B, 2048)
        return self.fc(self.dropout(x))  # (B, num_classes)
