"""Does the input path keep the device busy? The training steps fed by the real path against their ceiling.

    python -m benchmarks.feed                                   # this CPU machine, small step sizes
    python -m benchmarks.feed --device cuda --size 224 --frames 16 --batch 8 --pretrain-batch 64 \\
        --width 1.0 --procs 16 --compile --media media/        # a GPU node: the paper's sizes

(a) ceiling: the pretrain (SimCLR, two views, NT-Xent, LARS) and finetune (CLMAN on T-frame
    clips, cross-entropy, SGD) steps on synthetic float tensors already on the device;
(b) fed: the same steps fed by the real path: video bytes -> ``clman.data.frames.decode_stored_bytes``
    in ``--procs`` processes -> uint8 batches at the stored size -> pinned memory -> device ->
    ``clman.data.augment`` inside the (compiled) step. Two variants: ``stream`` decodes every
    batch's frames (``data.cache: off``); ``cache`` decodes every video once and draws the
    batches' frames from memory (``data.cache: auto`` when the data set fits);
then the ratio (b)/(a) of each. A third variant, ``device``, feeds one uint8 batch already on the
device every step: the cost of the augmentation alone, without the input path. ``--variants`` picks
and orders them; ``device-old`` and ``cache-old`` are the steps and the batch stacking as they were
before (keys made outside the compiled graph, a sampling grid per frame; numpy stacking then
pinning), for a same-run comparison. ``--compile-mode`` as ``scale.compile_mode`` (``auto``: CUDA
graphs on GPUs); ``--profile N`` then profiles N steps of each (device time against wall time, top
kernels). Last, the SimCLR input path's images/s per decode CPU: the
old path (decode at the source size + per-image torchvision v2 augmentation on the CPU,
``benchmarks/legacy_augment.py``) against the new one (decode to uint8 at the stored size;
the views are made on the device), one process each, ending with the line
``feed: simclr per-core new/old = X.XX``.

No Ray, no S3 client: a bare GPU node may have torch and CUDA only. The jobs run the same
decode function in Ray tasks (``clman/train/feed.py``). PyAV is needed only to make the test
videos; on a node without it, make them elsewhere with ``--save-media DIR`` and pass ``--media DIR``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clman import amp
from clman.config import DataConfig, ModelConfig, ScaleConfig
from clman.data import augment as A
from clman.data import frames as FR
from clman.data.sampling import segment_indices
from clman.losses import nt_xent
from clman.models.build import classifier_from, simclr_from
from clman.optim import LARS, lars_param_groups


# ---------------------------------------------------------------- test videos


def make_media(folder: Path, n: int, frames: int, size: int, seed: int = 0) -> None:
    """``n`` grayscale sweeps with moving speckle-like texture, short-GOP H.264 as ingest writes them."""
    from clman.data.video import encode_mp4

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        base = rng.random((size // 4, size // 4)).astype(np.float32)
        tex = np.kron(base, np.ones((4, 4), np.float32))
        out = np.empty((frames, size, size), np.uint8)
        for t in range(frames):
            blob = np.exp(-((x - size / 2 - 10 * np.sin(t / 7)) ** 2 + (y - size / 2) ** 2) / (size / 6) ** 2)
            img = 40 + 150 * np.roll(tex, t, axis=1) * (1 - 0.8 * blob) + 20 * rng.random((size, size))
            out[t] = img.clip(0, 255).astype(np.uint8)
        (folder / f"sweep_{i:03d}.mp4").write_bytes(encode_mp4(out, fps=20, gop=8))


def load_media(folder: Path) -> list[tuple[str, int]]:
    from clman.data.video import probe_video

    files = sorted(folder.glob("*.mp4"))
    if not files:
        raise SystemExit(f"{folder}: no .mp4 files")
    return [(str(f), probe_video(f.read_bytes(), name=str(f)).num_frames) for f in files]


# ---------------------------------------------------------------- decode processes (no Ray)


def _decode(task):
    path, indices, size = task
    with open(path, "rb") as f:  # stands in for the S3 read
        return FR.decode_stored_bytes(f.read(), indices, size, name=path)


def simclr_tasks(media, steps, per_step, m, size, seed=0):
    """Decode tasks for ``steps`` SimCLR batches of ``per_step`` frames, M frames per video."""
    videos_per_step = max(1, per_step // m)
    out, k = [], 0
    for step in range(steps):
        for _ in range(videos_per_step):
            path, n = media[k % len(media)]
            out.append((path, FR.simclr_indices(n, m, FR.draw_rng(seed, step, k, FR.SIMCLR_FRAMES)), size))
            k += 1
    return out, videos_per_step


def clip_tasks(media, steps, batch, t, size, seed=0):
    out, k = [], 0
    for step in range(steps):
        for _ in range(batch):
            path, n = media[k % len(media)]
            out.append((path, segment_indices(n, t, True, FR.draw_rng(seed, step, k, FR.CLIP_FRAMES)), size))
            k += 1
    return out, batch


def prefetch(batches, device, depth=2):
    """Batches assembled (and pinned) on a background thread, as the jobs' Feed does; yields device tensors."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    pin = device.type == "cuda"

    def run():
        for b in batches:
            t = b if isinstance(b, torch.Tensor) else torch.from_numpy(b)
            q.put(t.pin_memory() if pin and not t.is_pinned() else t)
        q.put(None)

    threading.Thread(target=run, daemon=True).start()
    while (item := q.get()) is not None:
        yield item.to(device, non_blocking=True)


def _items(arrays, per_frame: bool):
    """SimCLR batches are frames from several videos (per_frame); finetune batches are clips."""
    return [(a, r) for a in arrays for r in range(len(a))] if per_frame else list(arrays)


def streamed(pool, tasks, per_batch, per_frame: bool, pin: bool):
    """Batches of ``per_batch`` decoded items, in task order, from the pool, stacked as the jobs do."""
    it = pool.imap(_decode, tasks, chunksize=1)
    while True:
        items = []
        try:
            for _ in range(per_batch):
                items.append(next(it))
        except StopIteration:
            return
        yield FR.stack_frames(_items(items, per_frame), pin)


def cached(decoded, tasks, per_batch, per_frame: bool, pin: bool, old: bool = False):
    """The same batches drawn from whole videos decoded once (``decoded[path] = (frames, indices)``),
    gathered straight into (pinned) memory as the jobs' Feed does; old: numpy fancy indexing and
    np.stack / np.concatenate, pinned after (the Feed before, variant ``cache-old``)."""
    for i in range(0, len(tasks) - per_batch + 1, per_batch):
        picked = [(decoded[path][0], FR.pick(decoded[path][1], want)) for path, want, _ in tasks[i : i + per_batch]]
        if old:
            arrays = [frames[rows] for frames, rows in picked]
            yield (np.concatenate if per_frame else np.stack)(arrays)
        elif per_frame:
            yield FR.stack_frames([(frames, r) for frames, rows in picked for r in rows], pin)
        else:
            yield FR.stack_frames(picked, pin)


# ---------------------------------------------------------------- steps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, inputs, warmup, device):
    """Items/s of ``step`` over ``inputs`` (an iterator of (batch, count)) after ``warmup`` steps."""
    n, t0 = 0, None
    for i, (batch, count) in enumerate(inputs):
        if i == warmup:
            sync(device)
            t0, n = time.perf_counter(), 0
        step(batch)
        n += count
    sync(device)
    return n / (time.perf_counter() - t0)


def eager_keys(seed: int, epoch: int, video: torch.Tensor, view: int = 0) -> torch.Tensor:
    """The draws' keys as the steps made them before (variant ``device-old``): outside the compiled
    graph, every part a tensor op, the ints copied to the device one by one. Same bits as
    ``A.sample_keys``."""
    key = A._hash32(torch.full_like(video, seed & A._M32, dtype=torch.int64))
    for value in (epoch, video, view, 0):
        key = A.combine(key, torch.as_tensor(value, dtype=torch.int64, device=video.device))
    return key


def compiled(fn, args):
    """``fn`` compiled as the jobs compile their steps (``scale.compile``, ``scale.compile_mode``)."""
    return amp.compile_step(fn, ScaleConfig(compile=args.compile, compile_mode=args.compile_mode), args.device)


def pretrain_step(args, device, precision, fed: bool, old: bool = False):
    """The SimCLR step. fed: uint8 frames in, both views made inside the (compiled) forward with their
    keys, as ``clman/train/pretrain.py`` does; old: keys and the views' copy made outside it."""
    model = simclr_from(ModelConfig(width=args.width, gn_groups=args.gn_groups)).to(device)
    opt = LARS(lars_param_groups(model, 1e-6), lr=0.1, weight_decay=1e-6)
    spec = A.AugmentSpec.simclr(DataConfig(size=args.size))
    n = args.pretrain_batch
    video, slot = torch.arange(n, device=device), torch.zeros(n, dtype=torch.int64, device=device)
    # a new epoch key every step (fresh draws), made before the timing: the jobs make one per epoch
    prefixes = [A.epoch_prefix(0, i, device) for i in range(args.warmup + args.steps)]

    def forward(x, video, slot, prefix):
        with amp.autocast(precision, device):
            return model(A.simclr_views(x, prefix, video, slot, spec)).float()

    def forward_old(x, keys):
        with amp.autocast(precision, device):
            return model(A.augment(x, keys, spec) if fed else x).float()

    fwd = compiled(forward if fed and not old else forward_old, args)
    i = [0]

    def step(x):
        if fed and not old:
            z = fwd(x, video, slot, prefixes[i[0] % len(prefixes)])
        elif fed:
            keys = torch.cat([eager_keys(0, i[0], video, v) for v in (1, 2)])
            z = fwd(x.repeat(2, 1, 1, 1), keys)
        else:
            z = fwd(x, None)
        loss = nt_xent(z[:n], z[n:], temperature=0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        i[0] += 1

    return step


def finetune_step(args, device, precision, fed: bool, old: bool = False):
    """The CLMAN step. fed: uint8 clips in, keys and augmentation (one grid per clip) inside the (compiled)
    forward, as ``clman/train/finetune.py`` does; old: keys made outside, one grid per frame."""
    model = classifier_from(ModelConfig(width=args.width, gn_groups=args.gn_groups)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4, foreach=True)
    spec = A.AugmentSpec.finetune(DataConfig(size=args.size))
    labels = torch.arange(args.batch, device=device) % 2
    video = torch.arange(args.batch, device=device)
    prefixes = [A.epoch_prefix(0, i, device) for i in range(args.warmup + args.steps)]

    def forward(x, video, prefix):
        with amp.autocast(precision, device):
            return model(A.augment_clips(x, A.keys_at(prefix, video), spec), None).float()

    def forward_old(x, keys):
        with amp.autocast(precision, device):
            if fed:
                b, t = x.shape[:2]
                x = A.augment(x.flatten(0, 1), keys.repeat_interleave(t), spec)
                x = x.view(b, t, *x.shape[1:])
            return model(x, None).float()

    fwd = compiled(forward if fed and not old else forward_old, args)
    i = [0]

    def step(x):
        if fed and not old:
            logits = fwd(x, video, prefixes[i[0] % len(prefixes)])
        else:
            logits = fwd(x, eager_keys(0, i[0], video) if fed else None)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        i[0] += 1

    return step


# ---------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.feed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=64, help="training frame size (paper: 224)")
    p.add_argument("--frames", type=int, default=8, help="T frames per finetuning clip (paper: 16)")
    p.add_argument("--batch", type=int, default=8, help="finetune clips per step (paper: 8)")
    p.add_argument("--pretrain-batch", type=int, default=64, help="SimCLR frames per step, 2 views each")
    p.add_argument("--m", type=int, default=4, help="SimCLR frames per video (data.frames_per_clip)")
    p.add_argument("--width", type=float, default=0.25, help="encoder width (paper: 1.0)")
    p.add_argument("--gn-groups", type=int, default=8)
    p.add_argument("--procs", type=int, default=os.cpu_count(), help="decode processes")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the steps (scale.compile)")
    p.add_argument(
        "--compile-mode",
        default="auto",
        help="torch.compile mode (scale.compile_mode): auto = reduce-overhead (CUDA graphs) on CUDA, "
        "default on CPU; or default, max-autotune, ...",
    )
    p.add_argument("--only", choices=("pretrain", "finetune"), help="time one of the two steps")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        help="then profile this many steps of the synthetic and each fed variant (torch.profiler): "
        "device time per step and the top kernels",
    )
    p.add_argument(
        "--variants",
        default="device,cache,stream",
        help="fed variants, in order: device, device-old (keys outside the graph, a grid per frame: "
        "the steps before), cache, cache-old (batches stacked by numpy and pinned after: the "
        "Feed before), stream",
    )
    p.add_argument("--media", type=Path, help="folder of pre-encoded .mp4 sweeps (else made here with PyAV)")
    p.add_argument("--save-media", type=Path, help="make the sweeps into this folder and stop")
    p.add_argument("--videos", type=int, default=24, help="sweeps to make")
    p.add_argument("--video-frames", type=int, default=100, help="frames per sweep made")
    p.add_argument("--src-size", type=int, default=256, help="side of the sweeps made")
    p.add_argument("--percore-size", type=int, default=224, help="training size of the per-core comparison")
    p.add_argument("--percore-seconds", type=float, default=10.0)
    p.add_argument("--skip-steps", action="store_true", help="only the per-core comparison")
    return p.parse_args(argv)


def per_core(media, size, m, seconds):
    """SimCLR input images/s of one process: old (full decode + per-image CPU augmentation) vs new."""
    from benchmarks.legacy_augment import SimCLRAugment
    from clman.data.video import decode_frames

    torch.set_num_threads(1)
    stored = DataConfig(size=size).stored_size
    old_aug = SimCLRAugment(size)

    def old(path, idx):
        with open(path, "rb") as f:
            frames = decode_frames(f.read(), idx, name=path)  # (M, H, W, 3)
        old_aug(frames)

    def new(path, idx):
        _decode((path, idx, stored))

    rates = {}
    for name, fn in (("old", old), ("new", new)):
        rng, n, t0 = np.random.default_rng(0), 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            path, frames = media[n % len(media)]
            fn(path, FR.simclr_indices(frames, m, rng))
            n += 1
        rates[name] = 2 * m * n / (time.perf_counter() - t0)  # two views per decoded frame
    return rates


def profile(step, inputs, steps, label):
    """Device time per step (kernels summed) against wall time per step, and the top kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    inputs = list(inputs)[:steps]
    sync(inputs[0].device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for x in inputs:
            step(x)
        sync(inputs[0].device)
        wall = (time.perf_counter() - t0) / len(inputs)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = sum(e.self_device_time_total for e in events) / len(inputs)
    print(f"\nprofile {label}: wall {wall * 1e3:.2f} ms/step, kernels {device_us / 1e3:.2f} ms/step")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"  {e.self_device_time_total / len(inputs) / 1e3:7.3f} ms  x{e.count // len(inputs):<4} {e.key[:90]}")


def main(argv=None):
    args = parse(argv)
    if args.save_media:
        make_media(args.save_media, args.videos, args.video_frames, args.src_size)
        print(f"wrote {args.videos} sweeps to {args.save_media}")
        return
    if args.media is None:
        import tempfile

        args.media = Path(tempfile.mkdtemp(prefix="clman-feed-"))
        make_media(args.media, args.videos, args.video_frames, args.src_size)
    media = load_media(args.media)
    device = torch.device(args.device)
    precision = amp.resolve("auto", device)
    stored = DataConfig(size=args.size).stored_size
    total = args.warmup + args.steps
    mode = amp.compile_mode(args.compile_mode, device) if args.compile else "off"
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
        f"precision {precision}, compile {mode}, {args.procs} decode processes, "
        f"{len(media)} sweeps in {args.media}"
    )

    if not args.skip_steps:
        b, s, t, pb = args.batch, args.size, args.frames, args.pretrain_batch
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.procs) as pool:
            # decode every video once for the cache variant (timed apart: once per run)
            t0 = time.perf_counter()
            whole = pool.map(_decode, [(p, FR.whole_video_indices(n), stored) for p, n in media])
            decoded = {p: (f, FR.whole_video_indices(n)) for (p, n), f in zip(media, whole)}
            cache_s = time.perf_counter() - t0
            print(f"\n(cache: {len(media)} sweeps decoded once in {cache_s:.1f} s)")
            print(f"{'step':<9} {'input':<7} {'(a) synthetic':>16} {'(b) fed':>14} {'(b)/(a)':>8}", flush=True)
            for name, count, make_step, synthetic, tasks_fn in (
                (
                    "pretrain",
                    2 * pb,
                    pretrain_step,
                    lambda: torch.randn(2 * pb, 3, s, s, device=device),
                    lambda: simclr_tasks(media, total, pb, args.m, stored),
                ),
                (
                    "finetune",
                    b,
                    finetune_step,
                    lambda: torch.randn(b, t, 3, s, s, device=device),
                    lambda: clip_tasks(media, total, b, t, stored),
                ),
            ):
                if args.only and name != args.only:
                    continue
                unit = "images/s" if name == "pretrain" else "clips/s"
                x = synthetic()
                synthetic_step = make_step(args, device, precision, fed=False)
                ceiling = timed(synthetic_step, ((x, count) for _ in range(total)), args.warmup, device)
                if args.profile:
                    profile(synthetic_step, (x for _ in range(args.profile)), args.profile, f"{name} synthetic")
                tasks, per_batch = tasks_fn()
                per_frame, pin = name == "pretrain", device.type == "cuda"
                step = make_step(args, device, precision, fed=True)  # one (compiled) step for all inputs
                resident = next(cached(decoded, tasks, per_batch, per_frame, False)).to(device)
                sources = {
                    "device": lambda: (resident for _ in range(total)),  # augmentation only
                    "device-old": lambda: (resident for _ in range(total)),
                    "stream": lambda: prefetch(streamed(pool, tasks, per_batch, per_frame, pin), device),
                    "cache": lambda: prefetch(cached(decoded, tasks, per_batch, per_frame, pin), device),
                    "cache-old": lambda: prefetch(cached(decoded, tasks, per_batch, per_frame, pin, old=True), device),
                }
                for variant in args.variants.split(","):
                    run = make_step(args, device, precision, fed=True, old=True) if variant == "device-old" else step
                    fed = timed(run, ((xb, count) for xb in sources[variant]()), args.warmup, device)
                    print(f"{name:<9} {variant:<7} {ceiling:>8.1f} {unit:<8}{fed:>14.1f} {fed / ceiling:>8.2f}")
                    print(f"feed: {name} {variant} fed/synthetic = {fed / ceiling:.2f}", flush=True)
                    if args.profile:
                        profile(run, sources[variant](), args.profile, f"{name} {variant}")

    if args.percore_seconds <= 0:
        return
    rates = per_core(media, args.percore_size, args.m, args.percore_seconds)
    print(
        f"\nSimCLR input path, one process, {args.percore_size} px from {args.src_size} px sweeps: "
        f"old {rates['old']:.1f} images/s, new {rates['new']:.1f} images/s (2 views per decoded frame)"
    )
    print(f"feed: simclr per-core new/old = {rates['new'] / rates['old']:.2f}")


if __name__ == "__main__":
    main()
