"""Frame aggregators: (B, T, D) frame features + (B, T) mask -> (B, D) clip feature.

`MultiMetaAttention` is the paper's module (Sec. 3.3, Eq. 4-6); the others are the
baselines of its ablation (Table 3). Every aggregator takes
`forward(x, mask=None, return_weights=False)`: mask is bool, True = valid frame,
None = all valid. Padded frames never change the output: they are zeroed on entry,
take no part in any softmax, and are left out of every pooling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from clman.config import AGGREGATORS  # the names config checks; build_aggregator builds each


def check_mask(mask: torch.Tensor | None, b: int, t: int, device: torch.device) -> torch.Tensor:
    """(B, T) bool mask with at least one valid frame per row; None -> all valid."""
    if mask is None:
        return torch.ones(b, t, dtype=torch.bool, device=device)
    if tuple(mask.shape) != (b, t):
        raise ValueError(f"mask must be (B, T) = ({b}, {t}), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = valid frame), got {mask.dtype}")
    empty = (~mask.any(dim=1)).nonzero().flatten()  # CPU-GPU sync; cheap next to the encoder
    if len(empty):
        raise ValueError(f"mask row {int(empty[0])} has no valid frame; every clip needs at least one")
    return mask


def check_frames(
    x: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate (B, T, D) features; return them with padded frames zeroed, and the mask."""
    if x.ndim != 3:
        raise ValueError(f"features must be (B, T, D), got {tuple(x.shape)}")
    b, t, d = x.shape
    if t == 0:
        raise ValueError(f"features must have at least one frame (T >= 1), got {tuple(x.shape)}")
    if dim is not None and d != dim:
        raise ValueError(f"features must be (B, T, D) with D = {dim}, got {tuple(x.shape)}")
    mask = check_mask(mask, b, t, x.device)
    x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # padded frames may hold anything, even NaN
    if not torch.isfinite(x).all():
        raise ValueError(f"features {tuple(x.shape)} have non-finite values (NaN or Inf) in valid frames")
    return x, mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, T) -> (B, D) mean over valid frames."""
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1)


def _out(pooled: torch.Tensor, weights: torch.Tensor | None, return_weights: bool):
    return (pooled, weights) if return_weights else pooled


MMA_BOUNDS = ("tanh", "none")


class MultiMetaAttention(nn.Module):
    """Multi-meta attention: a softmax over frames for every feature dimension.

    E_l = tanh(W_l E_{l-1} + b_l), E_0 = F (Eq. 4); A = softmax over t of E_L,
    separately per dimension (Eq. 5); output sum_t A^t * F^t (Eq. 6).

    bound: ``tanh`` is Eq. 4 for every layer, the paper's: the logits E_L lie in
    [-1, 1], so two frames' weights differ by at most a factor e^2 = 7.4 (one
    salient frame among 100 gets at most e^2 / (e^2 + 99) = 7 %). ``none`` drops
    the tanh of the last layer only, E_L = W_L E_{L-1} + b_L: the softmax of Eq. 5
    is then unbounded and can pick one frame. Same parameters (same state-dict
    keys) either way.
    """

    def __init__(self, dim: int, depth: int = 1, bound: str = "tanh"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"mma depth must be >= 1, got {depth}")
        if bound not in MMA_BOUNDS:
            raise ValueError(f"mma bound must be one of {list(MMA_BOUNDS)}, got {bound!r}")
        self.dim, self.bound = dim, bound
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(dim, dim), nn.Tanh()]  # Eq. 4
        if bound == "none":
            layers.pop()  # E_L = W_L E_{L-1} + b_L: Eq. 4 without sigma on the last layer
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        x, mask = check_frames(x, mask, self.dim)  # (B, T, D)
        scores = self.layers(x)  # (B, T, D), Eq. 4 (the last layer linear with bound none)
        scores = scores.masked_fill(~mask.unsqueeze(-1), float("-inf"))  # padded frames get weight exactly 0
        weights = torch.softmax(scores, dim=1)  # (B, T, D): over frames, per dimension, Eq. 5
        pooled = (weights * x).sum(dim=1)  # (B, D), Eq. 6
        return _out(pooled, weights, return_weights)


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        x, mask = check_frames(x, mask)
        return _out(masked_mean(x, mask), None, return_weights)


class MaxPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        x, mask = check_frames(x, mask)
        pooled = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)  # (B, D)
        return _out(pooled, None, return_weights)


class LSTMAggregator(nn.Module):
    """One-layer LSTM over the valid frames in order; the clip feature is its last hidden state."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.lstm = nn.LSTM(dim, dim, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        x, mask = check_frames(x, mask, self.dim)  # (B, T, D)
        # valid frames to the front, keeping their order, so the packed sequence is each clip's own frames
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # (B, T)
        x = x.gather(1, order.unsqueeze(-1).expand_as(x))
        lengths = mask.sum(dim=1).cpu()  # pack needs lengths on the CPU
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: (1, B, D), already in the input's batch order
        return _out(h[-1], None, return_weights)


class SelfAttentionPool(nn.Module):
    """Single-head scaled dot-product self-attention over frames (residual), then a masked mean."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        x, mask = check_frames(x, mask, self.dim)  # (B, T, D)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, T, D) each
        # (B, T, D); padded frames are never keys
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))
        x = x + self.proj(y)
        return _out(masked_mean(x, mask), None, return_weights)


class ExternalAttentionPool(nn.Module):
    """External attention (Guo et al. 2021): two linear memories M_k, M_v with double
    normalisation (softmax over frames, then l1 over memory slots), residual, masked mean."""

    def __init__(self, dim: int, memory: int = 64):
        super().__init__()
        self.dim = dim
        self.mk = nn.Linear(dim, memory, bias=False)
        self.mv = nn.Linear(memory, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        x, mask = check_frames(x, mask, self.dim)  # (B, T, D)
        attn = self.mk(x).masked_fill(~mask.unsqueeze(-1), float("-inf"))  # (B, T, S)
        attn = torch.softmax(attn, dim=1)  # over frames; padded frames -> 0
        attn = attn / (attn.sum(dim=-1, keepdim=True) + 1e-9)  # l1 over memory slots
        x = x + self.mv(attn)  # (B, T, D)
        return _out(masked_mean(x, mask), None, return_weights)


class EMSAPool(nn.Module):
    """ResT efficient multi-head self-attention (Zhang & Yang 2021) over the frame axis,
    residual, then a masked mean.

    Keys/values come from frames reduced by a depthwise conv (stride sr_ratio) + LayerNorm;
    a 1x1 conv mixes the heads' logits, and the attention maps are instance-normalised
    per head. The reduction windows do not overlap (kernel = stride, ResT uses
    kernel = stride + 1) so that padded frames at the end of a clip only ever fall into
    windows the clip's own zero padding would fill; windows with no valid frame are masked.
    """

    def __init__(self, dim: int, heads: int = 4, sr_ratio: int = 2):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"emsa heads must divide dim = {dim}, got heads={heads}")
        if sr_ratio < 1:
            raise ValueError(f"emsa sr_ratio must be >= 1, got {sr_ratio}")
        self.dim, self.heads, self.sr_ratio = dim, heads, sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        if sr_ratio > 1:
            self.sr = nn.Conv1d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, groups=dim)
            self.sr_norm = nn.LayerNorm(dim)
        self.transform = nn.Conv2d(heads, heads, kernel_size=1) if heads > 1 else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        x, mask = check_frames(x, mask, self.dim)  # (B, T, D), padded frames are zeros
        b, t, d = x.shape
        h, dk = self.heads, d // self.heads
        q = self.q(x).view(b, t, h, dk).transpose(1, 2)  # (B, h, T, dk)
        kv_in, kv_mask = x, mask
        if self.sr_ratio > 1:
            pad = (-t) % self.sr_ratio
            z = F.pad(x.transpose(1, 2), (0, pad))  # (B, D, T + pad)
            kv_in = self.sr_norm(self.sr(z).transpose(1, 2))  # (B, T', D)
            kv_mask = F.pad(mask, (0, pad)).view(b, -1, self.sr_ratio).any(dim=-1)  # (B, T')
        k, v = self.kv(kv_in).view(b, -1, 2, h, dk).permute(2, 0, 3, 1, 4)  # (B, h, T', dk) each
        key_ok = kv_mask[:, None, None, :]  # (B, 1, 1, T')
        logits = q @ k.transpose(-2, -1) / math.sqrt(dk)  # (B, h, T, T')
        if self.transform is None:
            attn = torch.softmax(logits.masked_fill(~key_ok, float("-inf")), dim=-1)
        else:
            logits = self.transform(logits)  # mixes heads per (query, key) position
            attn = torch.softmax(logits.masked_fill(~key_ok, float("-inf")), dim=-1)
            attn = _masked_instance_norm(attn, mask[:, None, :, None] & key_ok)
            attn = attn.masked_fill(~key_ok, 0.0)
        y = (attn @ v).transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        x = x + self.proj(y)
        return _out(masked_mean(x, mask), None, return_weights)


def _masked_instance_norm(a: torch.Tensor, valid: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """InstanceNorm2d (no affine) of (B, h, T, T') maps, statistics over valid positions only."""
    valid = valid.to(a.dtype)  # (B, 1, T, T')
    count = valid.sum(dim=(-2, -1), keepdim=True)  # (B, 1, 1, 1)
    mean = (a * valid).sum(dim=(-2, -1), keepdim=True) / count
    var = ((a - mean).square() * valid).sum(dim=(-2, -1), keepdim=True) / count
    return (a - mean) / torch.sqrt(var + eps)


def build_aggregator(name: str, dim: int, depth: int = 1, mma_bound: str = "tanh") -> nn.Module:
    """Aggregator by name; depth (cascaded layers) and mma_bound (the last layer's tanh or none)
    are multi-meta attention's (others ignore them)."""
    if name == "mma":
        return MultiMetaAttention(dim, depth, mma_bound)
    elif name == "mean":
        return MeanPool()
    elif name == "max":
        return MaxPool()
    elif name == "lstm":
        return LSTMAggregator(dim)
    elif name == "self_attention":
        return SelfAttentionPool(dim)
    elif name == "external_attention":
        return ExternalAttentionPool(dim)
    elif name == "emsa":
        return EMSAPool(dim)
    else:
        raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {name!r}")
