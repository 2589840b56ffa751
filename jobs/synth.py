"""Write a synthetic breast-ultrasound data set: sweeps as videos + labels.csv.

    python -m jobs.synth --out s3://bucket/synth --cases 268 --seed 0 [--difficulty hard] [--size 128] [--workers K]

Writes ``<out>/case_0001.mp4`` ... (H.264, GOP 8; with --difficulty hard also
.avi and .mkv in other codecs), ``<out>/labels.csv`` (video, label, patient_id;
1 = malignant) and ``<out>/synth_cases.csv`` (per-case stats: focal, aspect
ratio, lesion and sign frame counts). The same --seed gives the same bytes.
Feed it to ``python -m jobs.ingest --keep-ids --videos <out> --labels <out>/labels.csv``.
What the images contain, which knobs exist and what hard changes: the
docstring of clman/data/synth.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from clman import cli
from clman.data.synth import DIFFICULTY_KNOBS, PAPER_CASES, SynthConfig, write_dataset

log = logging.getLogger("jobs.synth")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.synth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument(
        "--cases", type=int, default=PAPER_CASES, help=f"number of sweeps (default {PAPER_CASES}, as the paper)"
    )
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes")
    p.add_argument(
        "--difficulty",
        choices=sorted(DIFFICULTY_KNOBS),
        default="default",
        help="default: the project's phantom (128 px square, 48 frames, H.264 mp4). hard: "
        "overlapping classes (aspect, margin, shadowing each only partly telling), focal "
        "signs in half the malignant cases, clutter, electronic noise and gain drift, "
        "~96x118 px frames varying per case, 22-38 frames, mp4/avi/mkv in H.264, MJPEG, "
        "MPEG-4 and FFV1, two sweeps per patient. Tune presets on both",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="frame height (even, >= 32; default 128, hard 96 and varying +-10%% with width 1.1-1.35x)",
    )
    p.add_argument("--frames", type=int, default=None, help="frames per sweep (default 48, hard 30 +- 8)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    p.add_argument(
        "--malignant-fraction",
        type=float,
        default=SynthConfig().malignant_fraction,
        help="share of malignant patients (default 152/268, the paper's balance)",
    )
    p.add_argument(
        "--focal-fraction",
        type=float,
        default=None,
        help="share of malignant cases whose signs show only in a few frames (default 0.3, "
        "hard 0.5); higher makes frame aggregation matter more (0 = every malignant "
        "frame is telling)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.cases < 1:
        raise cli.C.ConfigError(f"--cases must be >= 1, got {args.cases}")
    try:
        cfg = SynthConfig(
            difficulty=args.difficulty,
            size=args.size,
            frames=args.frames,
            malignant_fraction=args.malignant_fraction,
            focal_fraction=args.focal_fraction,
        )
    except ValueError as e:
        raise cli.C.ConfigError(str(e)) from None
    t0 = time.perf_counter()
    rows = write_dataset(
        args.out, args.cases, seed=args.seed, cfg=cfg, workers=args.workers, progress=not args.no_progress
    )
    seconds = time.perf_counter() - t0
    malignant = sum(r["label"] for r in rows)
    focal = sum(bool(r["focal"]) for r in rows)
    patients = len({r["patient_id"] for r in rows})
    megabytes = sum(r["bytes"] for r in rows) / 1e6
    print(f"{'cases':>10} {'malignant':>10} {'focal':>6} {'patients':>9} {'MB':>7} {'seconds':>8}")
    print(f"{len(rows):>10} {malignant:>10} {focal:>6} {patients:>9} {megabytes:>7.1f} {seconds:>8.1f}")
    formats = sorted({r["format"] for r in rows})
    log.info("wrote %d sweeps (%s) and labels.csv to %s", len(rows), ", ".join(formats), args.out)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
