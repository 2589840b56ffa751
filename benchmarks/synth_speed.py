"""How long the synthetic data set takes, against its budget.

    python benchmarks/synth_speed.py [--cases 268] [--frames 48] [--size 128] [--workers 2] [--budget 120]

Budget: the paper-sized set (268 sweeps x 48 frames x 128 px) in 120 s on 2
cores, encoding and writing included. Also prints the per-case cost of
rendering frames vs encoding the mp4, measured serially in this process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from clman.data.synth import PAPER_CASES, SynthConfig, generate_case, plan_cases, write_dataset
from clman.data.video import encode_mp4


def per_case_costs(cfg: SynthConfig, n: int, seed: int = 0) -> tuple[float, float]:
    """Mean seconds per case to render and to encode, one process."""
    gen, enc = [], []
    generate_case(seed, 0, 1, cfg)  # warm-up (imports, FFT plans)
    for plan in plan_cases(n, seed, cfg):
        t0 = time.perf_counter()
        case = generate_case(seed, plan.index, plan.label, cfg)
        t1 = time.perf_counter()
        encode_mp4(case.frames, fps=cfg.fps, gop=cfg.gop, crf=cfg.crf)
        t2 = time.perf_counter()
        gen.append(t1 - t0)
        enc.append(t2 - t1)
    return float(np.mean(gen)), float(np.mean(enc))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=PAPER_CASES)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--budget", type=float, default=120.0, help="seconds allowed for the whole set")
    p.add_argument("--sample", type=int, default=8, help="cases timed serially for the per-case split")
    args = p.parse_args()
    cfg = SynthConfig(size=args.size, frames=args.frames)

    gen_s, enc_s = per_case_costs(cfg, args.sample)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        write_dataset(out, args.cases, seed=0, cfg=cfg, workers=args.workers, progress=False)
        total = time.perf_counter() - t0

    print(f"synthetic set: {args.cases} cases x {args.frames} frames x {args.size}px, {args.workers} workers")
    print(f"{'measure':<34} {'value':>10}")
    print(f"{'total seconds':<34} {total:>10.1f}")
    print(f"{'budget seconds':<34} {args.budget:>10.1f}")
    print(f"{'total / budget':<34} {total / args.budget:>10.2f}")
    print(f"{'render s/case (serial)':<34} {gen_s:>10.3f}")
    print(f"{'encode s/case (serial)':<34} {enc_s:>10.3f}")
    print(f"{'encode / render':<34} {enc_s / gen_s:>10.2f}")


if __name__ == "__main__":
    main()
