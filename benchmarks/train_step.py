"""Training-step speed of CLMAN against plain torchvision resnet18 at the same sizes, in one run.

    python -m benchmarks.train_step                       # CPU, small sizes
    python -m benchmarks.train_step --device cuda --size 224 --frames 16 --batch 8 --pretrain-batch 64 --width 1.0

Finetune: clips/s of a full step (forward, cross-entropy, backward, SGD) of
CLMAN (GN + non-local encoder, multi-meta attention, linear head) on
(B, T, C, H, W) clips, against torchvision resnet18 (BatchNorm, no non-local)
applied to the same B*T frames with mean pooling and a linear head.
Pretrain: images/s of a SimCLR step (two views, NT-Xent, LARS) of the CLMAN
encoder + projector against the same step with torchvision resnet18.
Both models run at the jobs' ``scale.precision`` (``--precision``, default
``auto``: bf16 autocast on a GPU, fp32 on CPU; ``clman/amp.py``), channels_last
on a GPU. The ratio printed is CLMAN / baseline (1.0 = as fast as plain
resnet18). On a GPU, ``--compare-fp32`` adds CLMAN in bf16 against CLMAN in
fp32 (what ``precision: auto`` buys) and each row's peak GPU memory.

GroupNorm (issue 26): on a GPU the encoder's norms are ``ChannelsLastGroupNorm``
(``clman/models/groupnorm.py``), whose CUDA path ``--gn`` picks (default: ``triton``
where installed). ``--gn-compare`` adds the finetune and pretrain steps with each
path -- ``triton``, ``channels_last`` (plain ops that ``torch.compile`` fuses) and
``reference`` (``F.group_norm``: fp32 and contiguous under autocast, as before) --
against the same resnet18 steps; with ``--compile`` every model is compiled. On a
GPU: the second command above plus ``--compile --gn-compare``.
On CPU every path is the exact ``nn.GroupNorm``, so ``--gn-compare`` only says it needs CUDA.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from clman import amp
from clman.config import ModelConfig
from clman.losses import nt_xent
from clman.models.build import classifier_from, simclr_from
from clman.models.groupnorm import CUDA_IMPLS, ChannelsLastGroupNorm, effective_cuda_impl, set_cuda_impl
from clman.models.heads import ProjectionHead
from clman.optim import LARS, lars_param_groups


class PlainVideo(nn.Module):
    """torchvision resnet18 per frame + mean over frames + linear: the baseline."""

    def __init__(self):
        super().__init__()
        self.encoder = torchvision.models.resnet18(weights=None)
        self.encoder.fc = nn.Identity()
        self.head = nn.Linear(512, 2)

    def forward(self, clips, mask=None):
        b, t = clips.shape[:2]
        f = self.encoder(clips.flatten(0, 1)).view(b, t, -1)  # (B, T, 512)
        return self.head(f.mean(dim=1))


class PlainSimCLR(nn.Module):
    def __init__(self, proj_dim: int = 128):
        super().__init__()
        self.encoder = torchvision.models.resnet18(weights=None)
        self.encoder.fc = nn.Identity()
        self.projector = ProjectionHead(512, out_dim=proj_dim)

    def forward(self, x):
        return self.projector(self.encoder(x))


def _time(step, warmup: int, iters: int, device: str) -> tuple[float, float]:
    """Seconds per step, and peak GPU memory in GiB (0 on CPU)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()  # the steps are queued; wait before reading the clock
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return (time.perf_counter() - t0) / iters, peak


def _prep(model, device, channels_last: bool | None = None, compile: bool = False):
    """On ``device``; channels_last (default: on GPUs); compiled (the first warm-up steps compile)."""
    model = model.to(device)
    if channels_last if channels_last is not None else device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


def finetune_step(model, clips, labels, device, precision):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    mask = torch.ones(clips.shape[:2], dtype=torch.bool, device=device)

    def step():  # as clman/train/finetune.py
        with amp.autocast(precision, device):
            logits = model(clips, mask).float()
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def pretrain_step(model, images, device, precision):
    opt = LARS(lars_param_groups(model, 1e-6), lr=9e-3, weight_decay=1e-6)
    n = images.shape[0] // 2

    def step():  # as clman/train/pretrain.py
        with amp.autocast(precision, device):
            z = model(images).float()
        loss = nt_xent(z[:n], z[n:], temperature=0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=8, help="T")
    p.add_argument("--batch", type=int, default=4, help="clips per finetune step")
    p.add_argument("--pretrain-batch", type=int, default=32, help="frames per SimCLR step (x2 views)")
    p.add_argument("--width", type=float, default=1.0, help="CLMAN width (1.0 = same channels as resnet18)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="as scale.precision in the jobs' config (default auto)",
    )
    p.add_argument("--compare-fp32", action="store_true", help="also time CLMAN in fp32 (GPU)")
    p.add_argument(
        "--ablate",
        action="store_true",
        help="also time the finetune step of each encoder variant (norm x non-local x memory format), "
        "to find what costs time",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every model (CLMAN and baseline)")
    p.add_argument(
        "--gn",
        choices=CUDA_IMPLS,
        help="CUDA GroupNorm path of CLMAN's rows (default: triton where installed, else channels_last; "
        "reference = F.group_norm, the encoder before issue 26)",
    )
    p.add_argument(
        "--gn-compare",
        action="store_true",
        help="also time finetune and pretrain with each CUDA GroupNorm path against resnet18 (GPU)",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.gn:
        set_cuda_impl(args.gn)
    torch.manual_seed(0)
    dev = args.device
    mcfg = ModelConfig(width=args.width)
    clips = torch.randn(args.batch, args.frames, 3, args.size, args.size, device=dev)
    labels = torch.randint(0, 2, (args.batch,), device=dev)
    images = torch.randn(2 * args.pretrain_batch, 3, args.size, args.size, device=dev)
    if dev == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)

    prec = amp.resolve(args.precision, dev)
    print(
        f"device {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}), {args.size}x{args.size}, "
        f"T={args.frames}, finetune batch {args.batch}, pretrain batch {args.pretrain_batch} (x2 views), "
        f"CLMAN width {args.width}, precision {prec}, "
        f"GN {effective_cuda_impl() if dev == 'cuda' else 'nn.GroupNorm (CPU)'}, "
        f"{'compiled, ' if args.compile else ''}torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    n_clips, n_images = args.batch, images.shape[0]

    def ft(make, precision):
        return _time(
            finetune_step(_prep(make(), dev, compile=args.compile), clips, labels, dev, precision),
            args.warmup,
            args.iters,
            dev,
        )

    def pt(make, precision):
        return _time(
            pretrain_step(_prep(make(), dev, compile=args.compile), images, dev, precision),
            args.warmup,
            args.iters,
            dev,
        )

    ft_ours, ft_base = ft(lambda: classifier_from(mcfg), prec), ft(PlainVideo, prec)
    pt_ours, pt_base = pt(lambda: simclr_from(mcfg), prec), pt(PlainSimCLR, prec)
    # (step, items, CLMAN (s, GiB), baseline (s, GiB), baseline name)
    rows = [
        ("finetune clips/s", n_clips, ft_ours, ft_base, "resnet18"),
        ("pretrain images/s", n_images, pt_ours, pt_base, "resnet18"),
    ]
    if args.compare_fp32 and prec != "fp32":
        rows.append(
            (f"finetune {prec} vs fp32", n_clips, ft_ours, ft(lambda: classifier_from(mcfg), "fp32"), "CLMAN fp32")
        )
        rows.append(
            (f"pretrain {prec} vs fp32", n_images, pt_ours, pt(lambda: simclr_from(mcfg), "fp32"), "CLMAN fp32")
        )
    if args.gn_compare and dev != "cuda":
        print("--gn-compare: needs CUDA (on CPU every GroupNorm path is the exact nn.GroupNorm); no GN rows")
    elif args.gn_compare:
        default = ChannelsLastGroupNorm.cuda_impl
        for impl in CUDA_IMPLS:
            try:
                set_cuda_impl(impl)
            except ValueError as e:  # triton not installed
                print(f"--gn-compare: no {impl} rows: {e}")
                continue
            if args.compile:  # each model compiles anew; stay clear of dynamo's recompile limit
                torch._dynamo.reset()
            try:  # the forward reads the path when (re)compiled: keep it set while the rows run
                label = effective_cuda_impl()  # triton that fails to load runs channels_last
                rows.append(
                    (f"finetune GN {label}", n_clips, ft(lambda: classifier_from(mcfg), prec), ft_base, "resnet18")
                )
                rows.append(
                    (f"pretrain GN {label}", n_images, pt(lambda: simclr_from(mcfg), prec), pt_base, "resnet18")
                )
            finally:
                set_cuda_impl(default)
    if args.ablate:
        import dataclasses

        for norm in ("batch", "group"):
            for stages in ((), (3, 4)):
                for cl in (False, True):
                    cfg = dataclasses.replace(mcfg, norm=norm, nonlocal_stages=stages)
                    t, mem = _time(
                        finetune_step(_prep(classifier_from(cfg), dev, cl, args.compile), clips, labels, dev, prec),
                        args.warmup,
                        args.iters,
                        dev,
                    )
                    rows.append(
                        (
                            f"  {norm[0].upper()}N{'+NL' if stages else ''}{' cl' if cl else ''}",
                            n_clips,
                            (t, mem),
                            ft_base,
                            "resnet18",
                        )
                    )
    print(
        f"{'step':<24}{'CLMAN':>10}{'baseline':>10}{'ratio':>8}  baseline"
        + ("   peak GiB (CLMAN / baseline)" if dev == "cuda" else "")
    )
    for name, items, (ta, ma), (tb, mb), what in rows:
        mem = f"   {ma:.2f} / {mb:.2f}" if dev == "cuda" else ""
        print(f"{name:<24}{items / ta:>10.1f}{items / tb:>10.1f}{tb / ta:>8.2f}  {what}{mem}")


if __name__ == "__main__":
    main()
