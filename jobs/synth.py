"""Write a synthetic breast-ultrasound data set: sweeps as mp4 + labels.csv.

    python -m jobs.synth --out s3://bucket/synth --cases 268 --seed 0 [--size 128] [--frames 48] [--workers K]

Writes ``<out>/case_0001.mp4`` ... (H.264, GOP 8), ``<out>/labels.csv``
(video, label, patient_id; 1 = malignant) and ``<out>/synth_cases.csv``
(per-case stats: focal, aspect ratio, lesion and sign frame counts). The same
--seed gives the same frames. Feed it to ``python -m jobs.ingest --videos <out>
--labels <out>/labels.csv``. What the images contain and which knobs exist:
the docstring of clman/data/synth.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from clman import cli
from clman.data.synth import PAPER_CASES, SynthConfig, write_dataset

log = logging.getLogger("jobs.synth")


def parse(argv=None) -> argparse.Namespace:
    defaults = SynthConfig()
    p = argparse.ArgumentParser(prog="python -m jobs.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--cases", type=int, default=PAPER_CASES,
                   help=f"number of sweeps (default {PAPER_CASES}, as the paper)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same frames")
    p.add_argument("--size", type=int, default=defaults.size, help="frame height = width (even, >= 32)")
    p.add_argument("--frames", type=int, default=defaults.frames, help="frames per sweep")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    p.add_argument("--malignant-fraction", type=float, default=defaults.malignant_fraction,
                   help="share of malignant cases (default 152/268, the paper's balance)")
    p.add_argument("--focal-fraction", type=float, default=defaults.focal_fraction,
                   help="share of malignant cases whose signs show only in a few frames; higher makes "
                        "frame aggregation matter more (0 = every malignant frame is telling)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.cases < 1:
        raise cli.C.ConfigError(f"--cases must be >= 1, got {args.cases}")
    try:
        cfg = SynthConfig(size=args.size, frames=args.frames, malignant_fraction=args.malignant_fraction,
                          focal_fraction=args.focal_fraction)
    except ValueError as e:
        raise cli.C.ConfigError(str(e)) from None
    t0 = time.perf_counter()
    rows = write_dataset(args.out, args.cases, seed=args.seed, cfg=cfg, workers=args.workers,
                         progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    malignant = sum(r["label"] for r in rows)
    focal = sum(bool(r["focal"]) for r in rows)
    patients = len({r["patient_id"] for r in rows})
    megabytes = sum(r["bytes"] for r in rows) / 1e6
    print(f"{'cases':>10} {'malignant':>10} {'focal':>6} {'patients':>9} {'MB':>7} {'seconds':>8}")
    print(f"{len(rows):>10} {malignant:>10} {focal:>6} {patients:>9} {megabytes:>7.1f} {seconds:>8.1f}")
    log.info("wrote %d sweeps and labels.csv to %s", len(rows), args.out)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
