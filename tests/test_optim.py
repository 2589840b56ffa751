"""LARS against its definition worked by hand; warmup + cosine at key steps."""

import math

import pytest
import torch
from torch import nn

from clman.optim import LARS, finetune_sgd, lars_param_groups, warmup_cosine


def _hand_lars(w, grad, v, lr, momentum, wd, eta, eps):
    """One LARS step from the docstring's formula, in float64."""
    w_norm, g_norm = w.norm().item(), grad.norm().item()
    local_lr = eta * w_norm / (g_norm + wd * w_norm + eps) if w_norm > 0 and g_norm > 0 else 1.0
    v = momentum * v + lr * local_lr * (grad + wd * w)
    return w - v, v


def _hand_sgd(w, grad, v, lr, momentum):
    v = momentum * v + lr * grad
    return w - v, v


def test_lars_two_steps_match_hand_computation():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    groups = lars_param_groups(model, weight_decay=0.1)
    assert [g["lars_exclude"] for g in groups] == [False, True]
    assert groups[0]["params"][0] is model.weight and groups[1]["params"][0] is model.bias
    assert groups[1]["weight_decay"] == 0.0
    lr, momentum, eta, eps = 0.5, 0.9, 0.02, 1e-8
    opt = LARS(groups, lr=lr, momentum=momentum, trust_coefficient=eta, eps=eps)

    w, b = model.weight.detach().double().clone(), model.bias.detach().double().clone()
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    x = torch.randn(5, 4)
    for _ in range(2):  # the second step exercises the momentum buffer
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        gw, gb = model.weight.grad.double(), model.bias.grad.double()
        w, vw = _hand_lars(w, gw, vw, lr, momentum, 0.1, eta, eps)
        b, vb = _hand_sgd(b, gb, vb, lr, momentum)
        opt.step()
        torch.testing.assert_close(model.weight.detach().double(), w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(model.bias.detach().double(), b, rtol=1e-5, atol=1e-7)


def test_lars_trust_ratio_falls_back_to_one_for_zero_weights():
    w = nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    LARS([w], lr=0.1, trust_coefficient=0.001).step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.1))


def test_lars_param_groups_skip_frozen_and_norm_params():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay, excluded = lars_param_groups(model, weight_decay=1e-6)
    assert [p.shape for p in decay["params"]] == [model[0].weight.shape]
    assert len(excluded["params"]) == 4  # conv bias, GN weight and bias, linear bias


def test_lars_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="momentum"):
        LARS([nn.Parameter(torch.ones(1))], lr=0.1, momentum=1.5)


def test_warmup_cosine_key_steps():
    kw = dict(total_steps=110, base_lr=1.0, warmup_steps=10, final_lr=0.1)
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)
    assert warmup_cosine(4, **kw) == pytest.approx(0.5)
    assert warmup_cosine(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)  # cosine starts at base_lr
    assert warmup_cosine(60, **kw) == pytest.approx(0.55)  # halfway: (base + final) / 2
    assert warmup_cosine(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(110, **kw) == pytest.approx(0.1)
    assert warmup_cosine(10_000, **kw) == pytest.approx(0.1)
    lrs = [warmup_cosine(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_warmup_cosine_without_warmup_and_bad_args():
    assert warmup_cosine(0, 100, 9e-3) == pytest.approx(9e-3)
    assert warmup_cosine(50, 100, 9e-3) == pytest.approx(4.5e-3)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, 10, 1.0, warmup_steps=11)
    with pytest.raises(ValueError, match="step"):
        warmup_cosine(-1, 10, 1.0)


def test_finetune_sgd_defaults_are_the_papers():
    opt = finetune_sgd(nn.Linear(2, 2).parameters())
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (1e-4, 0.9, 5e-4)
