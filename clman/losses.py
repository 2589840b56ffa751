"""Contrastive loss for the SimCLR pretraining phase (paper Section 3.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clman.distributed import all_gather_sizes, all_gather_with_grad, get_rank


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020) with negatives from every worker.

    z1, z2: (N, D) projections of two augmented views of this worker's N frames;
    row i of z1 and row i of z2 are a positive pair. Both views are gathered from
    all workers (2 * N_global keys). For each of this worker's 2N rows q,

        loss(q) = -log( exp(sim(q, q+) / t) / sum_{k != q} exp(sim(q, k) / t) )

    with sim the cosine similarity, q+ the other view of the same frame and the
    sum over the 2 * N_global - 1 other rows. Returns the mean over this worker's
    2N rows, so with the same N on every worker the mean of the workers' losses is
    the single-process loss on the concatenated batch, and DDP's gradient
    averaging gives that loss's gradient.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent needs two (N, D) tensors of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] == 0:
        raise ValueError("nt_xent got an empty batch (N = 0)")
    if not temperature > 0:
        raise ValueError(f"nt_xent temperature must be > 0, got {temperature}")

    # Similarities in float32 even under autocast: bf16 logits at t = 0.1 lose the
    # small differences between negatives that the loss is about.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        return _nt_xent_fp32(z1.float(), z2.float(), temperature)


def _nt_xent_fp32(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    n, dim = z1.shape
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    # One gather for both views; rows stay paired.
    gathered = all_gather_with_grad(torch.cat([z1, z2], dim=1))  # (N_global, 2D), rank order
    n_global = gathered.shape[0]
    keys = torch.cat([gathered[:, :dim], gathered[:, dim:]], dim=0)  # (2 N_global, D): all view 1, then all view 2
    queries = torch.cat([z1, z2], dim=0)  # (2N, D): this worker's rows

    # Our rows follow those of lower ranks (ranks may hold different N).
    offset = sum(all_gather_sizes(n, z1.device)[: get_rank()])
    local = torch.arange(n, device=z1.device) + offset  # (N,) our rows' index in view 1
    self_idx = torch.cat([local, local + n_global])  # (2N,)
    pos_idx = torch.cat([local + n_global, local])  # (2N,) the other view of the same frame

    logits = queries @ keys.T / temperature  # (2N, 2 N_global)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * n, device=z1.device), self_idx] = True
    logits = logits.masked_fill(is_self, float("-inf"))  # a row is never its own negative
    return F.cross_entropy(logits, pos_idx)
