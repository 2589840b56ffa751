"""Cross-worker helpers.

Every helper works without a process group: it then reports world size 1 /
rank 0 and gathers are identities, so the losses, metrics and tests run in one
CPU process. Models never call these; training loops and losses do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's `n` (e.g. its batch size), in rank order ([n] in one process).

    `device` must suit the backend: the CUDA device for NCCL, CPU for gloo.
    """
    if get_world_size() == 1:
        return [n]
    mine = torch.tensor([n], device=device, dtype=torch.long)
    parts = [torch.zeros_like(mine) for _ in range(get_world_size())]
    dist.all_gather(parts, mine)
    return [int(p.item()) for p in parts]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather + cat whose backward sends each rank the gradient of its own slice.

    Rank r's loss L_r depends on every rank's rows through the gathered tensor.
    The gradient that reaches rank r's rows must be d(sum_r' L_r')/d(rows_r), so the
    backward sums the incoming gradients over ranks (all_reduce SUM) and keeps
    this rank's slice — the SimCLR / pytorchvideo pattern. DDP then averages
    parameter gradients over ranks, which turns sum_r' L_r' into mean_r' L_r'.
    Ranks may hold different numbers of rows (e.g. a short last batch).
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        rank = dist.get_rank()
        t = t.contiguous()
        # all_gather needs equal shapes: pad every rank's rows to the largest count.
        sizes = all_gather_sizes(t.shape[0], t.device)
        n_max = max(sizes)
        padded = t
        if t.shape[0] < n_max:
            pad = t.new_zeros((n_max - t.shape[0],) + tuple(t.shape[1:]))
            padded = torch.cat([t, pad], dim=0)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.sizes = sizes
        ctx.rank = rank
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)  # (sum_r N_r, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (N_r, ...) from all ranks along dim 0, rank order.

    Gradients flow back to each rank's own rows (see _GatherWithGrad). Identity
    when the world size is 1.
    """
    if get_world_size() == 1:
        return t
    return _GatherWithGrad.apply(t)


def all_gather_object(obj: Any) -> list:
    """List of `obj` from every rank, in rank order ([obj] in one process)."""
    if get_world_size() == 1:
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks, as a new detached tensor (counts and totals; no gradient)."""
    out = t.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks, as a new detached tensor (for logging; no gradient).

    Integer tensors come back as float32.
    """
    out = t.detach().clone()
    if not out.is_floating_point():
        out = out.float()
    if get_world_size() == 1:
        return out
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()
