"""Numeric precision of training and inference steps: bf16 autocast on GPUs, fp32 elsewhere.

``scale.precision`` picks it: ``auto`` (bf16 where the device supports it,
i.e. CUDA with bf16; fp32 on CPU, where bf16 autocast is slower than fp32 for
these convolutions), ``bf16`` (fails on a device without bf16) or ``fp32``.
Weights, optimizer state and losses stay fp32; only the model's forward runs
under autocast, so no loss scaling is needed (bf16 has fp32's exponent range).
"""

from __future__ import annotations

import contextlib

import torch

from clman.config import PRECISIONS


def resolve(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` on a CUDA device with bf16 support, else ``fp32``; checks the others."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    cuda_bf16 = kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if cuda_bf16 else "fp32"
    if precision == "bf16" and kind == "cuda" and not cuda_bf16:
        raise ValueError(f"precision 'bf16': the GPU {torch.cuda.get_device_name()} has no bf16; use 'fp32'")
    return precision


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in; ``precision`` as returned by :func:`resolve`."""
    kind = torch.device(device).type
    if precision == "bf16":
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_mode(mode: str, device: torch.device | str) -> str:
    """``scale.compile_mode`` for ``torch.compile``: ``auto`` is ``reduce-overhead`` on CUDA devices and
    ``default`` elsewhere. The steps at the paper's sizes are bound by the host's kernel launches (on an
    H200: ~11 ms of kernels in a 20-30 ms compiled step); replaying the step's forward and backward as
    CUDA graphs took the SimCLR step from ~7,200-8,400 to ~9,900-10,100 images/s there and let the fed
    steps keep up with synthetic input (``benchmarks/feed.py --compile-mode``, docs/input-path.md)."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


def compile_step(fn, scale, device: torch.device | str):
    """``fn`` compiled when ``scale.compile`` (a ``ScaleConfig``), in ``scale.compile_mode`` (:func:`compile_mode`)."""
    if not scale.compile:
        return fn
    return torch.compile(fn, mode=compile_mode(scale.compile_mode, device))
