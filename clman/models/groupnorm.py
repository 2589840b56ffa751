"""GroupNorm that keeps a GPU step channels_last and bf16; exactly ``nn.GroupNorm`` on CPU.

``ChannelsLastGroupNorm`` is an ``nn.GroupNorm`` (same ``weight``/``bias``, so checkpoints load
strictly either way) whose forward on a CUDA (N, C, H, W) input runs one of:

- ``"triton"`` -- :func:`group_norm_triton`: one Triton kernel each way that reads the input in
  its own layout (channels_last or contiguous) and dtype, keeps statistics in fp32 and writes
  the output in the input's dtype and layout. Default where ``triton`` is installed.
- ``"channels_last"`` -- :func:`group_norm_channels_last`: the same math as plain PyTorch ops in
  an autograd Function, on a view of the input (no permute to contiguous): what ``torch.compile``
  fuses into its own kernels. Default on CUDA without triton.
- ``"reference"`` -- ``torch.nn.functional.group_norm``, as ``nn.GroupNorm``.

On any other device (or input rank) the forward *is* ``nn.GroupNorm.forward``, so CPU results
are bit-identical to ``nn.GroupNorm`` (tests/test_groupnorm.py checks the bits).
:func:`set_cuda_impl` picks the CUDA path for every instance (benchmarks/train_step.py --gn).

Facts that shaped this module:
- CLMAN's step ran at 0.59x a torchvision ResNet-18's on a GPU (issue 26). ResNet's BatchNorm
  runs in bf16 on channels_last tensors under autocast; ``group_norm`` is on autocast's fp32 list,
  and the CUDA kernel behind it wants contiguous input, so each of the encoder's 22 GroupNorms
  converted bf16 channels_last -> fp32 contiguous and back, forward and backward.
- The statistics stay fp32 in both fast paths, and the normalisation is computed in fp32 before
  the one rounding to the input dtype: ``x * scale + shift`` in bf16 cancels catastrophically
  when a group's mean is large against its spread (bf16 keeps 8 bits).
- The output dtype is the input's (bf16 under autocast), where ``F.group_norm`` under autocast
  returns fp32: what follows (ReLU, the residual add, the next conv) then runs in bf16, as in the
  BatchNorm ResNet-18 it is compared with.
- Triton is imported only where CUDA is available (0.7 s to import on a busy CPU machine), when a
  ``ChannelsLastGroupNorm`` is built or unpickled, so that ``torch.compile`` never traces an import
  and CPU-only machines never pay for it. The kernel tile sizes below are a first guess, not tuned
  on a GPU: one program per (sample, block of >= 16 channels) reads its slice of x twice (statistics,
  then normalise; dy and x twice in the backward), with no cross-program reduction but dw, db's
  per-sample partials. Statistics: per-tile mean and M2 merged as in Chan et al., of x minus the
  group's first element. Without a GPU the kernels still run, under ``TRITON_INTERPRET=1`` on CPU
  tensors: that is how the CPU tests check their numerics.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import ClassVar

import torch
from torch import nn

CUDA_IMPLS = ("triton", "channels_last", "reference")


class ChannelsLastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with a channels_last, bf16-friendly forward on CUDA (module docstring)."""

    cuda_impl: ClassVar[str] = "triton" if importlib.util.find_spec("triton") is not None else "channels_last"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _load_triton_if_cuda()

    def __setstate__(self, state):  # unpickled in a Ray worker: load the kernels there too
        super().__setstate__(state)
        _load_triton_if_cuda()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self.cuda_impl
        if x.device.type != "cuda" or x.ndim != 4 or impl == "reference":
            return super().forward(x)  # the exact nn.GroupNorm: CPU results do not change by a bit
        if impl == "triton" and _TRITON is not None:
            return group_norm_triton(x, self.num_groups, self.weight, self.bias, self.eps)
        return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps)


def set_cuda_impl(impl: str) -> str:
    """Pick the CUDA path of every ``ChannelsLastGroupNorm``; returns the previous one."""
    if impl not in CUDA_IMPLS:
        raise ValueError(f"GroupNorm CUDA impl must be one of {CUDA_IMPLS}, got {impl!r}")
    if impl == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError("GroupNorm CUDA impl 'triton': triton is not installed")
    previous, ChannelsLastGroupNorm.cuda_impl = ChannelsLastGroupNorm.cuda_impl, impl
    return previous


def effective_cuda_impl() -> str:
    """The path a CUDA forward takes: ``cuda_impl``, or ``channels_last`` where triton would not load."""
    _load_triton_if_cuda()
    impl = ChannelsLastGroupNorm.cuda_impl
    return "channels_last" if impl == "triton" and _TRITON is None else impl


def _check(x: torch.Tensor, num_groups: int) -> None:
    assert x.ndim == 4, f"expected (N, C, H, W), got {tuple(x.shape)}"
    assert x.shape[1] % num_groups == 0, f"{x.shape[1]} channels do not split into {num_groups} groups"


# ---------------------------------------------------------------- plain PyTorch ops, channels_last


def _grouped(x: torch.Tensor, num_groups: int):
    """A grouped view of x without a copy for channels_last or contiguous x.

    Returns (xg, red, hw_dim, param_shape, to_nchw): xg is (N, HW, G, C/G) for channels_last
    memory (reduce over dims (1, 3)) or (N, G, C/G, HW) for contiguous memory (dims (2, 3));
    param_shape broadcasts a (C,) weight against xg; to_nchw maps a tensor shaped like xg back to
    (N, C, H, W) in x's layout. Any other layout is made contiguous first.
    """
    n, c, h, w = x.shape
    cg = c // num_groups
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        xg = x.permute(0, 2, 3, 1).reshape(n, h * w, num_groups, cg)  # (N, HW, G, C/G), a view
        return xg, (1, 3), 1, (1, 1, num_groups, cg), lambda t: t.reshape(n, h, w, c).permute(0, 3, 1, 2)
    xg = x.contiguous().reshape(n, num_groups, cg, h * w)  # (N, G, C/G, HW), a view when contiguous
    return xg, (2, 3), 3, (1, num_groups, cg, 1), lambda t: t.reshape(n, c, h, w)


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t in x's memory layout (a gradient can arrive in another one than its input's)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


class _GroupNormChannelsLast(torch.autograd.Function):
    """y = (x - mean_g) * rstd_g * w_c + b_c with fp32 statistics, in x's dtype and layout.

    An explicit backward so eager mode saves x, mean and rstd (not an fp32 copy of x):
        dx = rstd * (w dy - mean_g(w dy) - xhat * mean_g(w dy * xhat)),
        dw = sum_{n,hw} dy * xhat, db = sum_{n,hw} dy.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups: int, eps: float):
        xg, red, _, pshape, to_nchw = _grouped(x, num_groups)
        xf = xg.float()
        var, mean = torch.var_mean(xf, dim=red, correction=0, keepdim=True)  # (N, 1, G, 1) | (N, G, 1, 1)
        rstd = torch.rsqrt(var + eps)
        y = (xf - mean) * rstd
        if weight is not None:
            y = y * weight.float().view(pshape)
        if bias is not None:
            y = y + bias.float().view(pshape)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.num_groups = num_groups
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _like(to_nchw(y.to(x.dtype)), x)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        xg, red, hw_dim, pshape, to_nchw = _grouped(x, ctx.num_groups)
        dyg = _grouped(_like(dy, x), ctx.num_groups)[0].float()
        xhat = (xg.float() - mean) * rstd
        dx = dw = db = None
        if ctx.needs_input_grad[1]:
            dw = (dyg * xhat).sum(dim=(0, hw_dim)).reshape(-1).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            db = dyg.sum(dim=(0, hw_dim)).reshape(-1).to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            wdy = dyg * weight.float().view(pshape) if weight is not None else dyg
            c1 = (wdy * xhat).mean(dim=red, keepdim=True)
            c2 = wdy.mean(dim=red, keepdim=True)
            dx = _like(to_nchw(((wdy - c2 - xhat * c1) * rstd).to(x.dtype)), x)
        return dx, dw, db, None, None


def group_norm_channels_last(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """F.group_norm's result for (N, C, H, W) x in plain ops: fp32 statistics, x's dtype and layout out."""
    _check(x, num_groups)
    return _GroupNormChannelsLast.apply(x, weight, bias, num_groups, eps)


# ---------------------------------------------------------------- Triton

_TRITON = None  # the registered ops, once loaded: (forward, backward)
_TRITON_FAILED = False


def _load_triton_if_cuda() -> None:
    """Load the kernels where they can run; if triton fails to import, say so once and go on with
    the channels_last ops (the forward takes them while ``_TRITON`` is None)."""
    global _TRITON_FAILED
    if (
        _TRITON is None
        and not _TRITON_FAILED
        and ChannelsLastGroupNorm.cuda_impl == "triton"
        and torch.cuda.is_available()
    ):
        try:
            load_triton()
        except Exception as e:  # a broken triton install must not stop a training run
            _TRITON_FAILED = True
            logging.getLogger(__name__).warning(
                "GroupNorm: triton kernels unavailable (%s: %s); using the channels_last ops path", type(e).__name__, e
            )


def load_triton():
    """Import triton, define the kernels and register them as ``torch.ops.clman.group_norm_*``.

    Idempotent. Called where CUDA is available, or by tests with ``TRITON_INTERPRET=1``.
    """
    global _TRITON
    if _TRITON is None:
        _TRITON = _define_triton()
    return _TRITON


def group_norm_triton(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """F.group_norm's result for (N, C, H, W) x by the Triton kernels; x's dtype and layout out."""
    _check(x, num_groups)
    fwd, _ = load_triton() if _TRITON is None else _TRITON
    y, _, _ = fwd(x, weight, bias, num_groups, eps)
    return y


def _hw_stride(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t, s) with element (n, c, hw) of t at n * stride(0) + c * stride(1) + hw * s, hw = h * W + w.

    channels_last and contiguous tensors collapse H and W so; others are made contiguous. A size-1
    dim's stride can be anything, hence the cases."""
    h, w = t.shape[2:]
    if w == 1:
        return t, t.stride(2)
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t, t.stride(3)
    return _hw_stride(t.contiguous())


def _blocks(num_groups: int, cpg: int, hw: int):
    """(BLOCK_HW, BLOCK_G, BLOCK_C): >= 16 channels a program (32 contiguous bytes of a bf16
    channels_last row), ~2048 elements a tile. A first guess, not tuned on a GPU."""
    import triton

    block_c = triton.next_power_of_2(cpg)
    block_g = min(triton.next_power_of_2(num_groups), max(1, 16 // block_c))
    block_hw = min(triton.next_power_of_2(hw), max(1, 2048 // (block_g * block_c)))
    return block_hw, block_g, block_c


def _define_triton():
    import triton
    import triton.language as tl

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    wrap = (lambda k: k) if interpret else torch.library.wrap_triton

    @triton.jit
    def _fwd_kernel(
        X,
        Y,
        W,
        B,
        MEAN,
        RSTD,
        sxn,
        sxc,
        sxhw,
        syn,
        syc,
        syhw,
        HW,
        G,
        CPG,
        eps,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        n = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)  # (BG,) groups of this program
        ci = tl.arange(0, BLOCK_C)
        gmask = g < G
        cmask = gmask[:, None] & (ci[None, :] < CPG)  # (BG, BC)
        ch = g[:, None] * CPG + ci[None, :]  # (BG, BC) channel index
        xb = X + n * sxn + ch[None, :, :] * sxc  # (1, BG, BC)
        # one pass: each (BLOCK_HW, BG, BC) tile's mean and M2, merged as in Chan et al., of x minus
        # the group's first element (a fp32 sum of values far from 0 would lose the mean's low bits)
        pivot = tl.load(X + n * sxn + g * CPG * sxc, mask=gmask, other=0.0).to(tl.float32)  # (BG,)
        count = tl.zeros([BLOCK_G], dtype=tl.float32)  # elements merged so far (the same for every group)
        mean = tl.zeros([BLOCK_G], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
        for start in range(0, HW, BLOCK_HW):
            hw = start + tl.arange(0, BLOCK_HW)
            m = (hw < HW)[:, None, None] & cmask[None, :, :]
            x = tl.load(xb + hw[:, None, None] * sxhw, mask=m, other=0.0).to(tl.float32)
            x = tl.where(m, x - pivot[None, :, None], 0.0)
            cnt = tl.minimum(HW - start, BLOCK_HW) * CPG * 1.0  # * 1.0: HW or CPG may be a constexpr 1
            t_mean = tl.sum(tl.sum(x, axis=2), axis=0) / cnt
            d = tl.where(m, x - t_mean[None, :, None], 0.0)
            t_m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
            total = count + cnt
            delta = t_mean - mean
            mean += delta * (cnt / total)
            m2 += t_m2 + delta * delta * (count * cnt / total)
            count = total
        mean += pivot
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        tl.store(MEAN + n * G + g, mean, mask=gmask)
        tl.store(RSTD + n * G + g, rstd, mask=gmask)
        scale = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32) + rstd[:, None]  # (BG, BC)
        if HAS_W:
            scale = scale * tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
        shift = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
        if HAS_B:
            shift += tl.load(B + ch, mask=cmask, other=0.0).to(tl.float32)
        yb = Y + n * syn + ch[None, :, :] * syc
        for start in range(0, HW, BLOCK_HW):
            hw = start + tl.arange(0, BLOCK_HW)
            m = (hw < HW)[:, None, None] & cmask[None, :, :]
            x = tl.load(xb + hw[:, None, None] * sxhw, mask=m, other=0.0).to(tl.float32)
            # (x - mean) first: x * scale - mean * scale cancels when the mean is far from 0
            y = (x - mean[None, :, None]) * scale[None, :, :] + shift[None, :, :]
            tl.store(yb + hw[:, None, None] * syhw, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _bwd_kernel(
        X,
        DY,
        DX,
        W,
        MEAN,
        RSTD,
        DWP,
        DBP,
        sxn,
        sxc,
        sxhw,
        sdn,
        sdc,
        sdhw,
        sgn,
        sgc,
        sghw,
        C,
        HW,
        G,
        CPG,
        HAS_W: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        n = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        ci = tl.arange(0, BLOCK_C)
        gmask = g < G
        cmask = gmask[:, None] & (ci[None, :] < CPG)
        ch = g[:, None] * CPG + ci[None, :]
        mean = tl.load(MEAN + n * G + g, mask=gmask, other=0.0)  # (BG,)
        rstd = tl.load(RSTD + n * G + g, mask=gmask, other=0.0)
        w = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32) + 1.0
        if HAS_W:
            w = tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
        xb = X + n * sxn + ch[None, :, :] * sxc
        db_ = DY + n * sdn + ch[None, :, :] * sdc
        # pass 1: per-group sums of w dy xhat and w dy, per-channel partials of dw and db
        s1 = tl.zeros([BLOCK_G], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_G], dtype=tl.float32)
        dw = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
        dbias = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
        for start in range(0, HW, BLOCK_HW):
            hw = start + tl.arange(0, BLOCK_HW)
            m = (hw < HW)[:, None, None] & cmask[None, :, :]
            x = tl.load(xb + hw[:, None, None] * sxhw, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(db_ + hw[:, None, None] * sdhw, mask=m, other=0.0).to(tl.float32)
            xhat = (x - mean[None, :, None]) * rstd[None, :, None]
            dw += tl.sum(dy * xhat, axis=0)  # dy is 0 where masked
            dbias += tl.sum(dy, axis=0)
            wdy = dy * w[None, :, :]
            s1 += tl.sum(tl.sum(wdy * xhat, axis=2), axis=0)
            s2 += tl.sum(tl.sum(wdy, axis=2), axis=0)
        tl.store(DWP + n * C + ch, dw, mask=cmask)
        tl.store(DBP + n * C + ch, dbias, mask=cmask)
        cnt = HW * CPG * 1.0
        c1 = s1 / cnt
        c2 = s2 / cnt
        # pass 2: dx = rstd * (w dy - c2 - xhat * c1)
        gb = DX + n * sgn + ch[None, :, :] * sgc
        for start in range(0, HW, BLOCK_HW):
            hw = start + tl.arange(0, BLOCK_HW)
            m = (hw < HW)[:, None, None] & cmask[None, :, :]
            x = tl.load(xb + hw[:, None, None] * sxhw, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(db_ + hw[:, None, None] * sdhw, mask=m, other=0.0).to(tl.float32)
            xhat = (x - mean[None, :, None]) * rstd[None, :, None]
            dx = (dy * w[None, :, :] - c2[None, :, None] - xhat * c1[None, :, None]) * rstd[None, :, None]
            tl.store(gb + hw[:, None, None] * sghw, dx.to(DX.dtype.element_ty), mask=m)

    def _launch_fwd(x, weight, bias, num_groups, eps):
        x, sx = _hw_stride(x)
        n, c, h, w = x.shape
        hw, cpg = h * w, c // num_groups
        y, sy = _hw_stride(torch.empty_like(x))  # keeps x's layout (channels_last or contiguous)
        mean = torch.empty(n, num_groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        bhw, bg, bc = _blocks(num_groups, cpg, hw)
        grid = (n, triton.cdiv(num_groups, bg))
        wt = weight if weight is not None else mean  # a placeholder pointer, never read
        bs = bias if bias is not None else mean
        wrap(_fwd_kernel)[grid](
            x,
            y,
            wt,
            bs,
            mean,
            rstd,
            x.stride(0),
            x.stride(1),
            sx,
            y.stride(0),
            y.stride(1),
            sy,
            hw,
            num_groups,
            cpg,
            eps,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            BLOCK_HW=bhw,
            BLOCK_G=bg,
            BLOCK_C=bc,
            num_warps=4,
        )
        return y, mean, rstd

    def _launch_bwd(dy, x, weight, mean, rstd, num_groups):
        (x, sx), (dy, sd) = _hw_stride(x), _hw_stride(dy)
        n, c, h, w = x.shape
        hw, cpg = h * w, c // num_groups
        dx, sg = _hw_stride(torch.empty_like(x))
        dwp = torch.empty(n, c, device=x.device, dtype=torch.float32)  # per-sample partials of dw, db
        dbp = torch.empty_like(dwp)
        bhw, bg, bc = _blocks(num_groups, cpg, hw)
        grid = (n, triton.cdiv(num_groups, bg))
        wt = weight if weight is not None else mean
        wrap(_bwd_kernel)[grid](
            x,
            dy,
            dx,
            wt,
            mean,
            rstd,
            dwp,
            dbp,
            x.stride(0),
            x.stride(1),
            sx,
            dy.stride(0),
            dy.stride(1),
            sd,
            dx.stride(0),
            dx.stride(1),
            sg,
            c,
            hw,
            num_groups,
            cpg,
            HAS_W=weight is not None,
            BLOCK_HW=bhw,
            BLOCK_G=bg,
            BLOCK_C=bc,
            num_warps=4,
        )
        return dx, dwp.sum(0), dbp.sum(0)

    def setup_context(ctx, inputs, output):
        x, weight, bias, num_groups, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.num_groups = num_groups
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward(ctx, dy, _dmean, _drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = (bwd_op if not interpret else _launch_bwd)(dy, x, weight, mean, rstd, ctx.num_groups)
        dw = None if weight is None else dw.to(weight.dtype)
        db = None if ctx.bias_dtype is None else db.to(ctx.bias_dtype)
        return dx, dw, db, None, None

    if interpret:  # the interpreter's kernels are not traceable ops: a plain autograd Function

        class _Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, weight, bias, num_groups, eps):
                y, mean, rstd = _launch_fwd(x, weight, bias, num_groups, eps)
                ctx.mark_non_differentiable(mean, rstd)
                setup_context(ctx, (x, weight, bias, num_groups, eps), (y, mean, rstd))
                return y, mean, rstd

            @staticmethod
            def backward(ctx, dy, _dmean, _drstd):
                return backward(ctx, dy, _dmean, _drstd)

        return _Fn.apply, _launch_bwd

    # torch.ops.clman.group_norm_fwd / _bwd: ops torch.compile and CUDA graphs take as they are
    @torch.library.triton_op("clman::group_norm_fwd", mutates_args=())
    def fwd_op(
        x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _launch_fwd(x, weight, bias, num_groups, eps)

    @torch.library.triton_op("clman::group_norm_bwd", mutates_args=())
    def bwd_op(
        dy: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        num_groups: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _launch_bwd(dy, x, weight, mean, rstd, num_groups)

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return fwd_op, bwd_op
