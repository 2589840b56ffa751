"""Clips/s per core of the CPU data path S3 -> decode to uint8 at the stored size, against two baselines in the same run.

    python -m benchmarks.data_pipeline [--videos 6] [--frames 240] [--size 128] [--T 16] [--rounds 3]

Every variant runs in this process on one thread (torch and decord), so its
rate is clips per second per core. For each clip, T frames are drawn by
segments (random offset, as in finetuning) and decoded by decord to uint8 at the
stored size (``clman.data.frames.decode_stored_bytes``; the augmentation runs on the
training worker's device since the input path moved there, see benchmarks/feed.py):

- memory (ceiling): the short-GOP clip's bytes already in memory;
- s3: the same clip read from S3 first (the pipeline's path; the local
  SeaweedFS unless --bucket names another store);
- s3 long-GOP source: the untranscoded source (keyframe every 250 frames) read
  from S3 — what the pipeline would cost without ingest's transcode.

All variants decode the same frame indices, clip by clip in turn (so load
from other processes hits them alike). Prints a table and two ratios:
s3 / memory (what reading from S3 costs) and s3 / long-GOP (what the short
GOP buys).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid

import numpy as np
import torch


def synth_videos(n: int, frames: int, size: int, seed: int) -> list[np.ndarray]:
    """(frames, size, size) uint8 speckled ultrasound-like sweeps from clman.data.synth."""
    from clman.data.synth import SynthConfig, generate_case

    cfg = SynthConfig(size=size, frames=frames)
    return [generate_case(seed, i, i % 2, cfg).frames for i in range(n)]


def measure(variants: dict, num_frames: list[int], T: int, rounds: int, size: int, seed: int) -> list[dict]:
    """variants: name -> (fetch(i) -> bytes). Interleaved clip by clip, so load from
    other processes on a shared machine hits every variant alike."""
    from clman.data.frames import decode_stored_bytes
    from clman.data.sampling import segment_indices

    rng = np.random.default_rng(seed)
    times = {name: np.zeros(2) for name in variants}  # fetch, decode (s)
    clips = 0
    for _ in range(rounds):
        for i, n in enumerate(num_frames):
            idx = segment_indices(n, T, train=True, rng=rng)  # the same frames for every variant
            for name, fetch in variants.items():
                t0 = time.perf_counter()
                data = fetch(i)
                t1 = time.perf_counter()
                clip = decode_stored_bytes(data, idx, size)  # (T, C, S, S) uint8
                t2 = time.perf_counter()
                assert clip.shape[0] == T and clip.shape[2:] == (size, size)
                times[name] += (t1 - t0, t2 - t1)
            clips += 1
    return [
        {
            "variant": name,
            "clips": clips,
            "clips_per_s": clips / t.sum(),
            "fetch_ms": 1e3 * t[0] / clips,
            "decode_ms": 1e3 * t[1] / clips,
        }
        for name, t in times.items()
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=6)
    p.add_argument("--frames", type=int, default=240, help="frames per video")
    p.add_argument("--size", type=int, default=128, help="video height = width")
    p.add_argument("--crop", type=int, default=128, help="stored frame size (data.stored_size: 128 for a 112 crop)")
    p.add_argument("--T", type=int, default=16, help="frames per clip")
    p.add_argument("--rounds", type=int, default=3, help="passes over the videos per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bucket", help="s3://bucket/prefix to use (AWS_* env); default: start a local SeaweedFS")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    from clman import storage
    from clman.data.video import encode_mp4, transcode
    from clman.local_s3 import LocalS3

    t0 = time.perf_counter()
    videos = synth_videos(args.videos, args.frames, args.size, args.seed)
    long_gop = [encode_mp4(v, fps=15, gop=250) for v in videos]
    short_gop = [transcode(b, gop=8) for b in long_gop]
    print(
        f"made {args.videos} videos of {args.frames} frames {args.size}x{args.size} in "
        f"{time.perf_counter() - t0:.1f} s; mean size long-GOP {np.mean([len(b) for b in long_gop]) / 1e3:.0f} kB, "
        f"short-GOP {np.mean([len(b) for b in short_gop]) / 1e3:.0f} kB"
    )

    server = None
    if args.bucket:
        base = args.bucket.rstrip("/") + f"/bench-{uuid.uuid4().hex[:8]}"
    else:
        server = LocalS3(tempfile.mkdtemp(prefix="clman-bench-s3-")).start()
        os.environ.update(server.env())
        base = server.make_bucket("bench")
    try:
        keys_long, keys_short = [], []
        for i, (lg, sg) in enumerate(zip(long_gop, short_gop)):
            keys_long.append(storage.join(base, "source", f"v{i}.mp4"))
            keys_short.append(storage.join(base, "clips", f"v{i}.mp4"))
            storage.write_bytes(keys_long[-1], lg)
            storage.write_bytes(keys_short[-1], sg)
        n = [args.frames] * args.videos
        variants = {
            "memory, short GOP (ceiling)": lambda i: short_gop[i],
            "s3, short GOP (pipeline)": lambda i: storage.read_bytes(keys_short[i]),
            "s3, long-GOP source": lambda i: storage.read_bytes(keys_long[i]),
        }
        measure(variants, n[:1], args.T, 1, args.crop, args.seed)  # warm-up: imports, first S3 connection
        results = measure(variants, n, args.T, args.rounds, args.crop, args.seed)
    finally:
        if server is not None:
            server.stop(timeout=3.0)

    print(f"\n{'variant':<30}{'clips/s/core':>13}{'fetch ms':>10}{'decode ms':>11}")
    for r in results:
        print(f"{r['variant']:<30}{r['clips_per_s']:>13.1f}{r['fetch_ms']:>10.1f}{r['decode_ms']:>11.1f}")
    mem, s3, long = (r["clips_per_s"] for r in results)
    print(f"\ns3 / memory ceiling      = {s3 / mem:.2f}")
    print(f"s3 short GOP / long GOP  = {s3 / long:.2f}x")
    print(
        f"(T={args.T} frames per clip from {args.frames}-frame videos, {args.size}px -> {args.crop}px, "
        f"{args.videos} videos x {args.rounds} rounds per variant, one thread)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
