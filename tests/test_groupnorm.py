"""ChannelsLastGroupNorm: CPU bits unchanged, checkpoints unchanged, both fast paths numerically right.

The Triton kernels need a GPU to run compiled; here they run in Triton's interpreter on CPU
tensors (``TRITON_INTERPRET=1``, set before triton defines a kernel, so in a subprocess:
``test_triton_kernels_in_the_interpreter``). The interpreter rounds fp32 -> bf16 by truncation
where a GPU rounds to nearest, so its bf16 tolerance is one bf16 ulp, not half.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clman.models import build_encoder
from clman.models.groupnorm import (
    CUDA_IMPLS,
    ChannelsLastGroupNorm,
    group_norm_channels_last,
    set_cuda_impl,
)

ROOT = Path(__file__).resolve().parents[1]
# (N, C, H, W, G): the encoder's (stem, 32 groups of 2, 1x1 at layer 4) and odd ones
SHAPES = [
    (2, 8, 5, 7, 4),
    (3, 6, 4, 4, 3),
    (1, 64, 3, 3, 32),
    (2, 12, 1, 1, 3),
    (2, 5, 3, 2, 5),
    (4, 32, 9, 11, 8),
    (2, 30, 2, 13, 2),
]
LAYOUTS = ("contiguous", "channels_last")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def _input(shape, dtype, layout, device="cpu", seed=0, loc=1.0, scale=3.0):
    n, c, h, w, _ = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * scale + loc).to(dtype)  # values exact in dtype
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()


def _params(c, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, generator=g).to(device), torch.randn(c, generator=g).to(device)


def _against_reference(fn, shape, dtype, layout, device="cpu", affine=True, loc=1.0, scale=3.0):
    """fn's output and gradients vs F.group_norm in fp64 on the same (dtype-exact) values.

    fp64, not fp32: with a group's mean 100 std away, fp32 F.group_norm on CPU is itself off by ~1e-3."""
    x = _input(shape, dtype, layout, device, loc=loc, scale=scale).requires_grad_()
    w, b = _params(shape[1], device=device) if affine else (None, None)
    if affine:
        w.requires_grad_()
        b.requires_grad_()
    y = fn(x, shape[4], w, b, 1e-5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    y.backward(dy)

    xr = x.detach().double().requires_grad_()
    wr, br = (w.detach().double().requires_grad_(), b.detach().double().requires_grad_()) if affine else (None, None)
    yr = F.group_norm(xr, shape[4], wr, br, 1e-5)
    yr.backward(dy.double())
    got = {"y": y, "dx": x.grad} | ({"dw": w.grad, "db": b.grad} if affine else {})
    ref = {"y": yr, "dx": xr.grad} | ({"dw": wr.grad, "db": br.grad} if affine else {})
    return x, got, ref


def _assert_close(got, ref, dtype, ulps=0.5):
    for k in got:
        if k in ("y", "dx"):
            assert got[k].dtype == dtype, (k, got[k].dtype)
        if k in ("y", "dx") and dtype == torch.bfloat16:
            # one rounding to bf16 (8 significant bits) after fp32 math: <= ulps bf16 ulp, plus fp32 noise
            torch.testing.assert_close(got[k].double(), ref[k], rtol=ulps * 2**-7, atol=1e-4, msg=k)
        else:  # fp32 throughout (dw, db accumulate bf16-exact values in fp32)
            torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-4, atol=1e-5, msg=k)


def _assert_layout(t, layout, shape):
    if layout == "channels_last" and shape[2] * shape[3] > 1 and shape[1] > 1:
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    else:
        assert t.is_contiguous()


# ---------------------------------------------------------------- the module on CPU: nn.GroupNorm exactly


@pytest.mark.parametrize("impl", CUDA_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_forward_and_backward_are_bitwise_nn_groupnorm(impl, dtype, layout):
    """Whatever the CUDA path, a CPU input takes nn.GroupNorm.forward: same bits out, same grads."""
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    previous = set_cuda_impl(impl)
    try:
        for shape in SHAPES:
            ours, ref = ChannelsLastGroupNorm(shape[4], shape[1]), nn.GroupNorm(shape[4], shape[1])
            w, b = _params(shape[1])
            for m in (ours, ref):
                with torch.no_grad():
                    m.weight.copy_(w)
                    m.bias.copy_(b)
            x1 = _input(shape, dtype, layout).requires_grad_()
            x2 = x1.detach().clone().requires_grad_()
            y1, y2 = ours(x1), ref(x2)
            assert torch.equal(y1, y2) and y1.dtype == y2.dtype and y1.stride() == y2.stride()
            dy = torch.randn_like(y1)
            y1.backward(dy)
            y2.backward(dy)
            assert torch.equal(x1.grad, x2.grad)
            assert torch.equal(ours.weight.grad, ref.weight.grad) and torch.equal(ours.bias.grad, ref.bias.grad)
    finally:
        set_cuda_impl(previous)


def test_is_an_nn_groupnorm_with_the_same_state_dict():
    ours, ref = ChannelsLastGroupNorm(4, 8), nn.GroupNorm(4, 8)
    assert isinstance(ours, nn.GroupNorm)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert ChannelsLastGroupNorm(2, 4, affine=False).weight is None


def test_set_cuda_impl_checks_the_name():
    with pytest.raises(ValueError, match="one of"):
        set_cuda_impl("apex")
    previous = set_cuda_impl("reference")
    assert set_cuda_impl(previous) == "reference"


def _with_plain_groupnorm(encoder: nn.Module) -> nn.Module:
    """The same encoder with every ChannelsLastGroupNorm swapped for an nn.GroupNorm (same weights)."""
    for _name, m in list(encoder.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, ChannelsLastGroupNorm):
                plain = nn.GroupNorm(child.num_groups, child.num_channels, child.eps)
                plain.load_state_dict(child.state_dict())
                setattr(m, child_name, plain)
    return encoder


def test_encoder_uses_it_and_stays_bitwise_on_cpu_and_checkpoint_compatible():
    torch.manual_seed(0)
    enc = build_encoder(width=0.125)
    norms = [m for m in enc.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 22 and all(type(m) is ChannelsLastGroupNorm for m in norms)
    plain = _with_plain_groupnorm(build_encoder(width=0.125))
    plain.load_state_dict(enc.state_dict(), strict=True)  # a new checkpoint loads into the old modules
    enc.load_state_dict(plain.state_dict(), strict=True)  # and an old one into the new
    with torch.no_grad():  # non-local norms start at zero: give them weights so they count
        for m in norms:
            m.weight.normal_()
            m.bias.normal_()
    plain.load_state_dict(enc.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for layout in (torch.contiguous_format, torch.channels_last):
        a = enc.to(memory_format=layout)(x.contiguous(memory_format=layout))
        b = plain.to(memory_format=layout)(x.contiguous(memory_format=layout))
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the channels_last ops path


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_channels_last_ops_match_group_norm(shape, dtype, layout):
    x, got, ref = _against_reference(group_norm_channels_last, shape, dtype, layout)
    _assert_close(got, ref, dtype)
    _assert_layout(got["y"], layout, shape)
    _assert_layout(got["dx"], layout, shape)


def test_channels_last_ops_without_affine_and_with_a_far_off_mean():
    """affine=False; and a group whose mean is 100 std away: fp32 statistics, no bf16 cancellation."""
    shape = (2, 16, 6, 5, 4)
    for dtype in (torch.float32, torch.bfloat16):
        _, got, ref = _against_reference(group_norm_channels_last, shape, dtype, "channels_last", affine=False)
        _assert_close(got, ref, dtype)
        _, got, ref = _against_reference(group_norm_channels_last, shape, dtype, "channels_last", loc=300.0)
        _assert_close(got, ref, dtype)


def test_channels_last_ops_take_a_gradient_in_another_layout():
    shape = (2, 8, 5, 4, 4)
    x = _input(shape, torch.float32, "channels_last").requires_grad_()
    y = group_norm_channels_last(x, 4)
    y.backward(torch.ones_like(y).contiguous())  # contiguous dy for a channels_last y
    xr = x.detach().clone().requires_grad_()
    F.group_norm(xr, 4).backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_channels_last_ops_compile_without_graph_breaks():
    """fullgraph=True fails on any graph break: the autograd Function traces whole, forward and backward."""
    torch._dynamo.reset()
    m = ChannelsLastGroupNorm(4, 8)

    def f(x):
        return group_norm_channels_last(x, 4, m.weight, m.bias, m.eps)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x = _input((2, 8, 4, 4, 4), torch.float32, "channels_last").requires_grad_()
    xr = x.detach().clone().requires_grad_()
    compiled(x).sum().backward()
    f(xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


# ---------------------------------------------------------------- the Triton kernels


needs_triton_run = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRET or torch.cuda.is_available()),
    reason="needs triton and a GPU, or TRITON_INTERPRET=1 (test_triton_kernels_in_the_interpreter sets it)",
)


@needs_triton_run
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_matches_group_norm(shape, dtype, layout):
    from clman.models.groupnorm import group_norm_triton

    x, got, ref = _against_reference(group_norm_triton, shape, dtype, layout, device=TRITON_DEVICE)
    _assert_close(got, {k: v.to(TRITON_DEVICE) for k, v in ref.items()}, dtype, ulps=1.0 if INTERPRET else 0.5)
    _assert_layout(got["y"], layout, shape)
    _assert_layout(got["dx"], layout, shape)


@needs_triton_run
def test_triton_without_affine_with_a_far_off_mean_and_a_contiguous_gradient():
    from clman.models.groupnorm import group_norm_triton

    ulps = 1.0 if INTERPRET else 0.5
    shape = (2, 16, 6, 5, 4)
    for dtype in (torch.float32, torch.bfloat16):
        _, got, ref = _against_reference(group_norm_triton, shape, dtype, "channels_last", TRITON_DEVICE, affine=False)
        _assert_close(got, ref, dtype, ulps)
        _, got, ref = _against_reference(group_norm_triton, shape, dtype, "channels_last", TRITON_DEVICE, loc=300.0)
        _assert_close(got, ref, dtype, ulps)
    x = _input(shape, torch.float32, "channels_last", TRITON_DEVICE).requires_grad_()
    group_norm_triton(x, 4).backward(torch.ones(x.shape, device=TRITON_DEVICE))  # contiguous dy
    xr = x.detach().clone().requires_grad_()
    F.group_norm(xr, 4).backward(torch.ones_like(xr))
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(INTERPRET or torch.cuda.is_available(), reason="the tests above ran the kernels directly")
def test_triton_kernels_in_the_interpreter():
    """The Triton tests above, in a process where TRITON_INTERPRET=1 makes triton run them on CPU."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "triton_matches or triton_without",
            str(Path(__file__)),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-1000:]


# ---------------------------------------------------------------- the module on a GPU (skipped here)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("impl", [i for i in CUDA_IMPLS if i != "triton" or HAS_TRITON])
def test_module_on_cuda_under_autocast_keeps_bf16_channels_last(impl):
    previous = set_cuda_impl(impl)
    try:
        m = ChannelsLastGroupNorm(32, 64).cuda()
        with torch.no_grad():
            m.weight.normal_()
            m.bias.normal_()
        x = torch.randn(4, 64, 14, 14, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        ref = F.group_norm(x.float(), 32, m.weight, m.bias, m.eps)
        if impl == "reference":  # what autocast does to F.group_norm: fp32 out
            assert y.dtype == torch.float32
        else:
            assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-4)
    finally:
        set_cuda_impl(previous)
