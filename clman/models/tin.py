"""Temporal Interlacing Network (Shao, Qian & Liu, AAAI 2020) on torchvision ResNet-18/34/50.

TIN replaces TSM's fixed one-frame shift with learned, fractional ones. At the start of
every residual branch (where TSM shifts), a quarter of the C channels (X, c = C // 4)
is split into 2G = 4 groups; group g is moved along time by a learned offset o_g and
scaled per frame by a learned weight w_{t,g}, interpolating linearly between frames
(the paper's differentiable temporal-wise frame sampling):

    Y_{t,g} = w_{t,g} * sum_s max(0, 1 - |s - (t - o_g)|) * X_{s,g}            (1)
            = w_{t,g} * ((1 - l) X_{t - floor(o_g), g} + l X_{t - floor(o_g) - 1, g}),  l = o_g - floor(o_g)

with X = 0 outside the clip. The other 3/4 of the channels pass unchanged.

Offsets and weights come from the clip itself, from D (B, c, T), the
interlaced channels averaged over H, W:
- offset network: a Conv1d(c -> 1, k=3) over time, then FC(L -> L), ReLU, FC(L -> G),
  o = 4 (sigmoid - 1/2), in (-2, 2); the groups use (o_1, ..., o_G, -o_1, ..., -o_G):
  symmetric offsets, as in the paper;
- weight network: a Conv1d(c -> G, k=3) over time, w = 2 sigmoid, in (0, 2), the same
  G weights for the two halves.
The offset network's FCs read a length-L descriptor; TIN fixes L = T (8 in the paper).
Here L = TIN_SEGMENTS = 16, the CLMAN paper's clip length, and a clip's valid frames
are linearly resampled to L (the identity when T = 16 and nothing is padded), so TIN
takes any T >= 1 and its offsets do not depend on a clip's padding.

Special cases of Eq. (1), tested: o = 0 and w = 1 is the identity; o = -1 for all
groups and w = 1 is TSM's shift (the first C/8 channels one frame back, the next C/8
one frame forward). Init as the official code: weight-net bias 0 (w starts near 1),
offset-net last bias 0.5108 (o starts near +-0.5).

Padding (mask False): as TSM (clman/models/tsm.py): padded frames are zeroed before
every interlace, and the consensus averages valid frames only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clman.models.tsm import FrameResNet, zero_padded

TIN_SEGMENTS = 16  # L: the offset network's input length (TIN: num_segments; CLMAN paper: T = 16)
TIN_DEPTHS = (18, 34, 50)
MAX_OFFSET = 2.0  # |o| < 2 (4 * (sigmoid - 1/2))


def interlace(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Eq. (1): x (B, T, K, ...) moved by offset (B, K) along T, linear interpolation, zero outside,
    then scaled by weight (B, T, K). |offset| < MAX_OFFSET."""
    b, t, k = x.shape[:3]
    pad = int(MAX_OFFSET) + 1  # floor(o) + 1 reaches at most 3 frames away
    xp = F.pad(x.flatten(3), (0, 0, 0, 0, pad, pad))  # (B, T + 2 pad, K, R), zero frames at both ends
    base = offset.floor()  # (B, K)
    frac = (offset - base)[:, None, :, None]  # (B, 1, K, 1), l in Eq. (1); offsets get gradients through it
    time = torch.arange(t, device=x.device)[None, :, None]  # (1, T, 1)

    def frames_at(shift: torch.Tensor) -> torch.Tensor:  # (B, T, K, R): frame t - shift of each group
        idx = (time - shift[:, None, :]).long() + pad  # (B, T, K)
        return xp.gather(1, idx[..., None].expand(-1, -1, -1, xp.shape[-1]))

    y = (1 - frac) * frames_at(base) + frac * frames_at(base + 1)  # (B, T, K, R)
    return (y * weight[..., None]).view_as(x)


def resample_valid(d: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T) values, (B, T) mask -> (B, length): each row's valid values, in order, linearly
    resampled to `length` (F.interpolate(mode="linear", align_corners=False) on the valid ones)."""
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # valid frames first, in order
    d = d.gather(1, order)  # (B, T)
    n = mask.sum(dim=1, keepdim=True)  # (B, 1) valid frames, >= 1
    pos = ((torch.arange(length, device=d.device) + 0.5) * n / length - 0.5).clamp(min=0)  # (B, L)
    lo = pos.floor().long().clamp(max=n - 1)  # (B, L)
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo
    return d.gather(1, lo) * (1 - frac) + d.gather(1, hi) * frac


class TemporalInterlace(nn.Module):
    """TIN's module: forward(x (B*T, C, H, W), t, mask (B, T)) -> same shape. C must be a multiple of 16."""

    def __init__(self, channels: int, groups: int = 2, div: int = 4, segments: int = TIN_SEGMENTS):
        super().__init__()
        if channels % (div * 2 * groups):
            raise ValueError(f"TIN needs channels divisible by {div * 2 * groups}, got {channels}")
        self.c = channels // div  # interlaced channels
        self.groups, self.segments = groups, segments
        self.offset_conv = nn.Conv1d(self.c, 1, kernel_size=3, padding=1)
        self.offset_fc1 = nn.Linear(segments, segments)
        self.offset_fc2 = nn.Linear(segments, groups)
        self.weight_conv = nn.Conv1d(self.c, groups, kernel_size=3, padding=1)
        nn.init.constant_(self.offset_fc2.bias, 0.5108)
        nn.init.zeros_(self.weight_conv.bias)

    def offsets_and_weights(self, desc: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """desc (B, c, T) -> offsets (B, 2G), weights (B, T, 2G)."""
        d = self.offset_conv(desc).squeeze(1)  # (B, T)
        d = resample_valid(d, mask, self.segments)  # (B, L)
        o = MAX_OFFSET * 2 * (torch.sigmoid(self.offset_fc2(F.relu(self.offset_fc1(d)))) - 0.5)  # (B, G)
        w = 2 * torch.sigmoid(self.weight_conv(desc)).transpose(1, 2)  # (B, T, G)
        return torch.cat([o, -o], dim=1), torch.cat([w, w], dim=2)

    def forward(self, x: torch.Tensor, t: int, mask: torch.Tensor) -> torch.Tensor:
        x = zero_padded(x, t, mask)  # (B, T, C, H, W)
        b, _, ch, h, w = x.shape
        xi = x[:, :, : self.c]  # (B, T, c, H, W) the interlaced quarter
        desc = xi.mean(dim=(3, 4)).transpose(1, 2)  # (B, c, T)
        offset, weight = self.offsets_and_weights(desc, mask)  # (B, 2G), (B, T, 2G)
        k = 2 * self.groups
        y = interlace(xi.reshape(b, t, k, self.c // k, h, w), offset, weight)  # (B, T, 2G, c/2G, H, W)
        return torch.cat([y.reshape(b, t, self.c, h, w), x[:, :, self.c :]], dim=2).flatten(0, 1)


def tin(depth: int) -> FrameResNet:
    """TIN on torchvision ResNet-18/34/50 (random init): a TemporalInterlace in every residual branch."""
    from torchvision import models

    if depth == 18:
        resnet = models.resnet18(weights=None, num_classes=2)
    elif depth == 34:
        resnet = models.resnet34(weights=None, num_classes=2)
    elif depth == 50:
        resnet = models.resnet50(weights=None, num_classes=2)
    else:
        raise ValueError(f"TIN depth must be one of {TIN_DEPTHS}, got {depth}")
    return FrameResNet(resnet, TemporalInterlace)
