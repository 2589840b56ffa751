"""Optimisers and learning-rate schedules of the paper's recipe (Section 4.3).

Pretraining: LARS (You et al. 2017), lr 9e-3, weight decay 1e-6, cosine annealing.
Finetuning: SGD, lr 1e-4, momentum 0.9, weight decay 5e-4, constant (``schedule``
picks warmup + constant or warmup + cosine for other recipes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) with heavy-ball momentum.

    For each parameter w with gradient grad in a normal group:

        g        = grad + weight_decay * w
        local_lr = trust_coefficient * ||w|| / (||grad|| + weight_decay * ||w|| + eps)
                   (1.0 when ||w|| == 0 or ||grad|| == 0)
        v        = momentum * v + lr * local_lr * g        (v starts at 0)
        w        = w - v

    In a group with `lars_exclude=True` (biases and normalisation parameters;
    see `lars_param_groups`) there is no weight decay and no adaptation, i.e.
    plain momentum SGD: v = momentum * v + lr * grad; w = w - v. Any
    `weight_decay` set on such a group is ignored.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ):
        if not lr >= 0:
            raise ValueError(f"LARS lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"LARS weight_decay must be >= 0, got {weight_decay}")
        if not trust_coefficient > 0:
            raise ValueError(f"LARS trust_coefficient must be > 0, got {trust_coefficient}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter, as ``torch._foreach`` ops over each group: a handful of
        kernels per group instead of ~10 per parameter (GPU steps at these sizes are bound by
        the host's kernel launches), and no host-device sync."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients")
            grads = [p.grad for p in params]
            lr, momentum = group["lr"], group["momentum"]
            wd, eta, eps = group["weight_decay"], group["trust_coefficient"], group["eps"]
            if group["lars_exclude"]:
                updates = torch._foreach_mul(grads, lr)
            else:
                w_norm = torch.stack(torch._foreach_norm(params))  # (P,)
                g_norm = torch.stack(torch._foreach_norm(grads))
                local_lr = (
                    torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        eta * w_norm / (g_norm + wd * w_norm + eps),
                        torch.ones_like(w_norm),
                    )
                    * lr
                )
                updates = torch._foreach_add(grads, params, alpha=wd)
                torch._foreach_mul_(updates, list(local_lr.unbind()))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)  # m * 0 + update = update on the first step
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, updates)
            torch._foreach_sub_(params, bufs)
        return loss


def lars_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two LARS param groups: weights (decayed, adapted) and biases / norm params (excluded).

    A parameter with ndim <= 1 (biases, BatchNorm/GroupNorm/LayerNorm affine) goes
    to the group with `lars_exclude=True` and weight_decay 0. Frozen parameters
    (requires_grad False) are left out. Empty groups are dropped.
    """
    decay, exclude = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (exclude if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": exclude, "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, final_lr: float = 0.0) -> float:
    """Learning rate at `step` (0-based): linear warmup, then cosine annealing.

    step < warmup_steps:    base_lr * (step + 1) / warmup_steps  (reaches base_lr on the last warmup step)
    warmup <= step < total: final_lr + (base_lr - final_lr) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2
    step >= total_steps:    final_lr
    """
    if total_steps <= 0:
        raise ValueError(f"warmup_cosine total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_cosine warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < 0:
        raise ValueError(f"warmup_cosine step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return final_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES = ("constant", "cosine")


def schedule(name: str, step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Learning rate at `step` (0-based) of schedule `name`: a pure function of the step.

    constant: base_lr * (step + 1) / warmup_steps during warmup, then base_lr.
    cosine:   warmup_cosine(step, total_steps, base_lr, warmup_steps) (anneals to 0 at total_steps).
    """
    if name == "constant":
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"schedule warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if step < 0:
            raise ValueError(f"schedule step must be >= 0, got {step}")
        return base_lr * (step + 1) / warmup_steps if step < warmup_steps else base_lr
    elif name == "cosine":
        return warmup_cosine(step, total_steps, base_lr, warmup_steps)
    raise ValueError(f"unknown learning-rate schedule {name!r}; valid: {list(SCHEDULES)}")


def finetune_sgd(
    params: Iterable, lr: float = 1e-4, momentum: float = 0.9, weight_decay: float = 5e-4
) -> torch.optim.SGD:
    """The paper's finetuning optimiser: SGD, lr 1e-4, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
