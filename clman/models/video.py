"""Whole models, given their parts: the CLMAN clip classifier and the SimCLR pretraining model."""

from __future__ import annotations

import torch
from torch import nn

from clman.models.aggregators import check_mask


class VideoClassifier(nn.Module):
    """CLMAN (paper Fig. 1): per-frame encoder -> frame aggregator -> linear head.

    forward(clips (B, T, C, H, W), mask (B, T) bool | None) -> logits (B, num_classes);
    softmax(logits)[:, 1] is P(malignant). With return_weights also the aggregator's
    (B, T, D) frame weights (None for aggregators without per-frame weights).
    """

    def __init__(self, encoder: nn.Module, aggregator: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.aggregator = aggregator
        self.head = head

    def forward(self, clips: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        if clips.ndim != 5:
            raise ValueError(f"clips must be (B, T, C, H, W), got {tuple(clips.shape)}")
        b, t = clips.shape[:2]
        if t == 0:
            raise ValueError(f"clips must have at least one frame (T >= 1), got {tuple(clips.shape)}")
        mask = check_mask(mask, b, t, clips.device)  # fail before the encoder's work
        feats = self.encoder(clips.flatten(0, 1))  # (B*T, C, H, W) -> (B*T, D)
        feats = feats.view(b, t, -1)  # (B, T, D)
        pooled, weights = self.aggregator(feats, mask, return_weights=True)  # (B, D), (B, T, D) | None
        logits = self.head(pooled)  # (B, num_classes)
        return (logits, weights) if return_weights else logits


class SimCLRModel(nn.Module):
    """SimCLR pretraining model (paper Sec. 3.2): (N, C, H, W) -> (N, out_dim) projections,
    not normalised (the NT-Xent loss normalises them)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(images))  # (N, D) -> (N, out_dim)
