"""Training-step speed of CLMAN against plain torchvision resnet18 at the same sizes, in one run.

    python -m benchmarks.train_step                       # CPU, small sizes
    python -m benchmarks.train_step --device cuda --size 224 --frames 16 --batch 8 --pretrain-batch 64 --width 1.0

Finetune: clips/s of a full step (forward, cross-entropy, backward, SGD) of
CLMAN (GN + non-local encoder, multi-meta attention, linear head) on
(B, T, C, H, W) clips, against torchvision resnet18 (BatchNorm, no non-local)
applied to the same B*T frames with mean pooling and a linear head.
Pretrain: images/s of a SimCLR step (two views, NT-Xent, LARS) of the CLMAN
encoder + projector against the same step with torchvision resnet18.
``--device cuda`` runs under bf16 autocast with channels_last. The ratio
printed is CLMAN / baseline (1.0 = as fast as plain resnet18).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from clman.config import ModelConfig
from clman.losses import nt_xent
from clman.models.build import classifier_from, simclr_from
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


def _time(step, warmup: int, iters: int, device: str) -> float:
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()  # the steps are queued; wait before reading the clock
    return (time.perf_counter() - t0) / iters


def _prep(model, device):
    model = model.to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def finetune_step(model, clips, labels, device):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    mask = torch.ones(clips.shape[:2], dtype=torch.bool, device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = F.cross_entropy(model(clips, mask), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def pretrain_step(model, images, device):
    opt = LARS(lars_param_groups(model, 1e-6), lr=9e-3, weight_decay=1e-6)
    n = images.shape[0] // 2

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            z = model(images)
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
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.manual_seed(0)
    dev = args.device
    mcfg = ModelConfig(width=args.width)
    clips = torch.randn(args.batch, args.frames, 3, args.size, args.size, device=dev)
    labels = torch.randint(0, 2, (args.batch,), device=dev)
    images = torch.randn(2 * args.pretrain_batch, 3, args.size, args.size, device=dev)
    if dev == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)

    print(f"device {dev}, {args.size}x{args.size}, T={args.frames}, finetune batch {args.batch}, "
          f"pretrain batch {args.pretrain_batch} (x2 views), CLMAN width {args.width}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    rows = []
    base = _time(finetune_step(_prep(PlainVideo(), dev), clips, labels, dev), args.warmup, args.iters, dev)
    ours = _time(finetune_step(_prep(classifier_from(mcfg), dev), clips, labels, dev), args.warmup, args.iters, dev)
    rows.append(("finetune clips/s", args.batch / ours, args.batch / base))
    base = _time(pretrain_step(_prep(PlainSimCLR(), dev), images, dev), args.warmup, args.iters, dev)
    ours = _time(pretrain_step(_prep(simclr_from(mcfg), dev), images, dev), args.warmup, args.iters, dev)
    n = images.shape[0]
    rows.append(("pretrain images/s", n / ours, n / base))
    print(f"{'step':<20}{'CLMAN':>10}{'resnet18':>10}{'ratio':>8}")
    for name, a, b in rows:
        print(f"{name:<20}{a:>10.1f}{b:>10.1f}{a / b:>8.2f}")


if __name__ == "__main__":
    main()
