"""TimeSformer with divided space-time attention (Bertasius, Wang & Torresani, ICML 2021).

A ViT over the frames' patches. With z_(p,t) the token of patch p in frame t and z_(0)
the class token, each block does (the paper's divided space-time attention)

    temporal:  z'_(p,t)  = z_(p,t) + W_t Attn_time(LN(z_(p,1..T)))_t        patch p, over frames
    spatial:   z''_(p,t) = z'_(p,t) + Attn_space(LN([z_(0), z'_(1..N,t)]))_p  within frame t
               z''_(0)   = z_(0) + mean_t Attn_space(LN([z_(0), z'_(1..N,t)]))_0
    MLP:       z'''      = z'' + MLP(LN(z''))

W_t, keeping the class token out of the temporal attention and averaging its spatial
update over frames follow the authors' code (which zero-inits W_t in every block but the
first). Embedding: z_(p,t) = E x_(p,t) + e^pos_p + e^time_t, learned; the output is
Linear(LN(z_(0))) after the last block.

Sizes: ViT-B/16 by default (768 wide, 12 blocks of 12 heads, 16 px patches), the
position embedding learned for `size` x `size` frames and the time embedding for
`frames` frames. Other frame sizes resample the position grid and other clip lengths
the time embedding, by nearest neighbour, as the authors' code does; so any T >= 1 and
any H, W >= patch (a remainder under one patch is dropped by the patch conv).

Padding (mask False): padded frames are zeroed on entry, are never keys of the temporal
attention, are left out of the class token's average, and a valid frame's time
embedding is chosen by its rank among the clip's valid frames: a padded clip's logits
equal those of the clip without its padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clman.models.baselines import check_clips


class Attention(nn.Module):
    """Multi-head self-attention (timm's ViT Attention: qkv with bias, output proj), SDPA kernel."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention heads must divide dim = {dim}, got heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_ok: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, S, D), key_ok (N, S) bool (False = not a key) -> (N, S, D)."""
        n, s, d = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (N, h, S, dh)
        attn_mask = None if key_ok is None else key_ok[:, None, None, :]  # (N, 1, 1, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, h, S, dh)
        return self.proj(y.transpose(1, 2).reshape(n, s, d))


class DividedBlock(nn.Module):
    """One TimeSformer block: temporal attention, spatial attention, MLP (see the module docstring)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_t = nn.LayerNorm(dim, eps=1e-6)
        self.attn_t = Attention(dim, heads)
        self.fc_t = nn.Linear(dim, dim)  # W_t
        self.norm_s = nn.LayerNorm(dim, eps=1e-6)
        self.attn_s = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def temporal(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, N, D) patch tokens -> (B, T, N, D): each patch attends to itself in the valid frames."""
        b, t, n, d = x.shape
        z = x.transpose(1, 2).reshape(b * n, t, d)  # (B*N, T, D): one sequence per patch position
        key_ok = mask.repeat_interleave(n, dim=0)  # (B*N, T)
        y = self.fc_t(self.attn_t(self.norm_t(z), key_ok))  # (B*N, T, D)
        return x + y.view(b, n, t, d).transpose(1, 2)

    def spatial(self, x: torch.Tensor, cls: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, N, D), cls (B, D) -> same: attention within each frame, the class token in every frame."""
        b, t, n, d = x.shape
        z = torch.cat([cls[:, None, None, :].expand(b, t, 1, d), x], dim=2)  # (B, T, 1+N, D)
        y = self.attn_s(self.norm_s(z.view(b * t, n + 1, d))).view(b, t, n + 1, d)
        m = mask[:, :, None].to(y.dtype)  # (B, T, 1)
        cls_y = (y[:, :, 0] * m).sum(dim=1) / m.sum(dim=1)  # (B, D): mean over valid frames
        return x + y[:, :, 1:], cls + cls_y

    def forward(self, x: torch.Tensor, cls: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, n, d = x.shape
        x = self.temporal(x, mask)  # (B, T, N, D)
        x, cls = self.spatial(x, cls, mask)  # (B, T, N, D), (B, D)
        z = torch.cat([cls[:, None], x.reshape(b, t * n, d)], dim=1)  # (B, 1 + T*N, D)
        z = z + self.mlp(self.norm_mlp(z))
        return z[:, 1:].view(b, t, n, d), z[:, 0]


class TimeSformer(nn.Module):
    """forward(clips (B, T, 3, H, W), mask (B, T) | None) -> logits (B, num_classes)."""

    def __init__(
        self,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        patch: int = 16,
        size: int = 224,
        frames: int = 16,
        num_classes: int = 2,
    ):
        super().__init__()
        if size < patch or patch < 1:
            raise ValueError(f"TimeSformer needs 1 <= patch <= size, got patch={patch}, size={size}")
        self.patch, self.grid = patch, size // patch
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)  # E
        self.cls_token = nn.Parameter(torch.zeros(1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1 + self.grid**2, dim))  # cls + grid x grid patches
        self.time_embed = nn.Parameter(torch.zeros(frames, dim))
        self.blocks = nn.ModuleList(DividedBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        for p in (self.cls_token, self.pos_embed, self.time_embed):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for block in list(self.blocks)[1:]:  # temporal attention starts as the identity, as the authors' code
            nn.init.zeros_(block.fc_t.weight)

    def forward(self, clips: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        clips, mask = check_clips(clips, mask)  # (B, T, 3, H, W), padded frames zeroed
        b, t, _, h, w = clips.shape
        if min(h, w) < self.patch:
            raise ValueError(f"timesformer needs frames of at least {self.patch} px (model.tf_patch), got {h} x {w}")
        x = self.patch_embed(clips.flatten(0, 1))  # (B*T, D, H/p, W/p)
        gh, gw = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # (B*T, N, D)
        d = x.shape[-1]
        pos = self.pos_embed[1:]  # (grid^2, D)
        if (gh, gw) != (self.grid, self.grid):  # nearest resampling of the learned grid
            pos = pos.T.reshape(1, d, self.grid, self.grid)
            pos = F.interpolate(pos, size=(gh, gw), mode="nearest").reshape(d, gh * gw).T  # (N, D)
        x = (x + pos).view(b, t, gh * gw, d)  # (B, T, N, D)
        x = x + self.time_embed[self._time_index(mask)][:, :, None, :]  # + e^time, (B, T, 1, D)
        cls = (self.cls_token + self.pos_embed[:1]).expand(b, d)  # (B, D)
        for block in self.blocks:
            x, cls = block(x, cls, mask)
        logits = self.head(self.norm(cls))  # (B, num_classes)
        return (logits, None) if return_weights else logits

    def _time_index(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) index into time_embed: frame rank among the valid ones, nearest-resampled to `frames`."""
        rank = mask.long().cumsum(dim=1) - 1  # (B, T)
        n = mask.sum(dim=1, keepdim=True)  # (B, 1)
        frames = self.time_embed.shape[0]
        return (rank.clamp(min=0) * frames // n).clamp(max=frames - 1)  # floor(rank * F / n): F.interpolate nearest
