"""Contrastive loss for the SimCLR pretraining phase (paper Section 3.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clman.distributed import all_gather_sizes, all_gather_with_grad, get_rank


SAME_VIDEO = ("negative", "mask", "positive")


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.5,
    groups: torch.Tensor | None = None,
    same_video: str = "negative",
) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020) with negatives from every worker.

    z1, z2: (N, D) projections of two augmented views of this worker's N frames;
    row i of z1 and row i of z2 are a positive pair. Both views are gathered from
    all workers (2 * N_global keys). With sim the cosine similarity, s(q, k) =
    sim(q, k) / t, q+ the other view of q's frame and K(q) the 2 * N_global - 1 rows
    other than q, each of this worker's 2N rows q has the loss

    negative (SimCLR, the paper's reading: every other frame is a negative, also
    the other frames of q's video):

        loss(q) = -log( exp s(q, q+) / sum_{k in K(q)} exp s(q, k) )

    mask (the other frames of q's video, both views, leave the denominator; the
    negatives are the frames of other videos):

        loss(q) = -log( exp s(q, q+) / (exp s(q, q+) + sum_{k in K(q), g(k) != g(q)} exp s(q, k)) )

    positive (multi-positive NT-Xent, SupCon's L_out (Khosla et al. 2020, Eq. 2):
    P(q) = {k in K(q) : g(k) = g(q)}, which holds q+ and both views of the other
    frames of q's video; each positive is scored against the whole denominator,
    and the log-probabilities are averaged over P(q)):

        loss(q) = -1/|P(q)| sum_{p in P(q)} log( exp s(q, p) / sum_{k in K(q)} exp s(q, k) )

    g(k) is the group (video) id of key k: ``groups`` (N,) int, this worker's
    frames' video ids, gathered from all workers like the projections. The modes
    need it except ``negative``, which ignores it; with all ids distinct the three
    modes are the same loss. Returns the mean over this worker's 2N rows, so with
    the same N on every worker the mean of the workers' losses is the
    single-process loss on the concatenated batch, and DDP's gradient averaging
    gives that loss's gradient.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"nt_xent needs two (N, D) tensors of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] == 0:
        raise ValueError("nt_xent got an empty batch (N = 0)")
    if not temperature > 0:
        raise ValueError(f"nt_xent temperature must be > 0, got {temperature}")
    if same_video not in SAME_VIDEO:
        raise ValueError(f"nt_xent same_video must be one of {list(SAME_VIDEO)}, got {same_video!r}")
    if same_video != "negative":
        if groups is None:
            raise ValueError(f"nt_xent same_video={same_video!r} needs groups: each row's video id")
        if groups.shape != (z1.shape[0],) or groups.is_floating_point() or groups.is_complex():
            raise ValueError(
                f"nt_xent groups must be an (N,) = ({z1.shape[0]},) integer tensor, "
                f"got {tuple(groups.shape)} {groups.dtype}"
            )

    # Similarities in float32 even under autocast: bf16 logits at t = 0.1 lose the
    # small differences between negatives that the loss is about.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        return _nt_xent_fp32(
            z1.float(),
            z2.float(),
            temperature,
            None if same_video == "negative" else groups.to(z1.device, torch.long),
            same_video,
        )


def _nt_xent_fp32(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, groups: torch.Tensor | None, same_video: str
) -> torch.Tensor:
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
    if groups is None:  # negative
        return F.cross_entropy(logits, pos_idx)

    # The ids travel like the projections (an integer tensor: the gather passes no gradient).
    key_groups = all_gather_with_grad(groups).repeat(2)  # (2 N_global,): view 1's rows, then view 2's
    same = groups.repeat(2)[:, None] == key_groups[None, :]  # (2N, 2 N_global): same video, self and q+ included
    if same_video == "mask":
        is_pos = torch.zeros_like(same)
        is_pos[torch.arange(2 * n, device=z1.device), pos_idx] = True
        return F.cross_entropy(logits.masked_fill(same & ~is_pos, float("-inf")), pos_idx)
    # positive: log-softmax over K(q), averaged over P(q) = same video minus self
    positives = same & ~is_self  # (2N, 2 N_global), >= 1 per row (q+)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (2N, 2 N_global), -inf at self
    per_row = log_prob.masked_fill(~positives, 0.0).sum(dim=1) / positives.sum(dim=1)  # (2N,)
    return -per_row.mean()


def nt_xent_chance(n_global: int, same_video: str = "negative", groups: torch.Tensor | None = None) -> torch.Tensor:
    """NT-Xent of uninformative projections (every similarity equal): the loss a run must get below.

    negative and positive: ln(2 N_global - 1), every row's denominator holds 2 N_global - 1 keys and
    every positive scores the same (N = 64 frames: ln 127 = 4.84). mask: the mean over this worker's
    2N rows of ln(2 N_global - 1 - 2 (c(q) - 1)), c(q) the frames of q's video in the batch; this
    counts only the frames of ``groups`` (N,), which is exact when no other worker holds q's video
    (``clman.train.feed`` gives every video of an epoch to one rank).
    """
    if same_video not in SAME_VIDEO:
        raise ValueError(f"same_video must be one of {list(SAME_VIDEO)}, got {same_video!r}")
    if same_video != "mask":
        return torch.tensor(math.log(2 * n_global - 1))
    if groups is None:
        raise ValueError("nt_xent_chance same_video='mask' needs groups: each row's video id")
    count = (groups[:, None] == groups[None, :]).sum(dim=1)  # (N,) frames of each row's video, itself included
    return torch.log((2 * n_global - 1 - 2 * (count - 1)).double()).mean().float()
