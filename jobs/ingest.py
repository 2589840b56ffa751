"""Ingest videos and labels into clips + manifest for training.

    export CLMAN_PATIENT_SALT=...   # a secret, the same on every run: keys the pseudonyms
    python -m jobs.ingest --out s3://bucket/data --videos ./videos --labels labels.csv
    python -m jobs.ingest --out s3://bucket/data --layout buv --videos ./BUV
    python -m jobs.ingest --out s3://bucket/data --dicom ./dicom --labels labels.csv
    python -m jobs.ingest --out s3://bucket/data --videos ./sweeps --labels sweeps.csv --unlabeled

labels.csv (UTF-8): columns ``video`` (path relative to --videos / --dicom),
``label`` (benign | malignant | 0 | 1, or empty: unlabelled), optional ``patient_id``
(default: each video its own patient) and ``split`` (train | val | test, used as given).

Unlabelled videos feed contrastive pretraining only (``jobs.pretrain --splits``, the study's
SimCLR): an empty label, --unlabeled (labels.csv then needs only ``video``), or a BUV
``rawframes/unlabeled/`` folder. They go to split ``unlabeled`` (label -1, no fold) and never
to finetuning, validation or testing; the labelled patients' split is the same with or without
them. A patient's videos are all labelled or all unlabelled: an unlabelled video of a patient
with labelled ones is rejected (``mixed_patient``), so no test patient's sweep is pretrained on.

Patient and video ids are HMAC-SHA256 pseudonyms under the salt; no file name,
path or source id is stored anywhere (--id-map writes the mapping to one place,
only when asked; --keep-ids keeps ids that are already pseudonymous). DICOM frames
are cropped to the scan region (burned-in text) unless --scan-region says otherwise.

Writes ``<out>/clips/<video_id>.mp4`` (H.264, a keyframe every --gop frames so
clip sampling decodes little), ``<out>/manifest.parquet`` (splits by patient,
stratified by label, the same for the same --seed) and ``<out>/rejects.parquet``
(labels.csv line, video_id, reason, detail) for items that could not be used.
An --out that holds a manifest is merged into: its rows are kept, its patients
keep their split, videos already ingested with the same content are skipped.
Exit status 1 only when no usable video remains; 2 for unusable arguments or labels.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from clman import cli
from clman.data import ingest as I
from clman.data.manifest import ManifestError, parse_ratios
from clman.data.scan_region import ScanRegionError, parse_scan_region

log = logging.getLogger("jobs.ingest")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.ingest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", help="folder or s3:// prefix of videos (with --labels), or the BUV root")
    src.add_argument("--dicom", help="folder or s3:// prefix of multi-frame DICOM files (with --labels)")
    p.add_argument("--labels", help="labels.csv (path or s3:// URI)")
    p.add_argument(
        "--layout",
        choices=("labels", "buv"),
        default="labels",
        help="buv: --videos holds rawframes/{benign,malignant,unlabeled}/<video-id>/<frame>.png",
    )
    p.add_argument(
        "--unlabeled",
        action="store_true",
        help="every video in --labels is unlabelled (split 'unlabeled', for pretraining); the file "
        "may then have no label column. Mixed files need no flag: leave those labels empty",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--split", help="train,val,test patient fractions (default 0.6,0.0,0.4, the paper's 6:4); stratified by label"
    )
    how.add_argument(
        "--folds", type=int, default=0, help="K-fold cross-validation instead: a fold 0..K-1 per patient, split 'train'"
    )
    p.add_argument("--seed", type=int, default=0, help="split seed; the same seed gives the same split")
    p.add_argument(
        "--salt",
        help=f"secret key of the id pseudonyms (default: ${I.SALT_ENV}); prefer the "
        "variable, arguments show up in process lists; never written anywhere",
    )
    p.add_argument(
        "--keep-ids",
        action="store_true",
        help="keep the labels' video and patient ids (only for ids that are already pseudonyms)",
    )
    p.add_argument(
        "--id-map",
        metavar="URI",
        help="write the pseudonym <-> source file / patient mapping (CSV) here; it names "
        "patients: keep it with the source data, not with the outputs",
    )
    p.add_argument(
        "--scan-region",
        default=None,
        metavar="auto|off|crop=x,y,w,h",
        help="crop frames to the scan region, cutting burned-in text and banners: auto = "
        "the area that changes over the sweep (default for DICOM; off otherwise)",
    )
    p.add_argument("--max-bytes", type=int, default=I.Limits.max_bytes, help="reject larger source files")
    p.add_argument("--max-frames", type=int, default=I.Limits.max_frames, help="reject longer videos")
    p.add_argument(
        "--max-side",
        type=int,
        default=I.Limits.max_side,
        help="reject frames wider or taller than this (pixels; read from the header)",
    )
    p.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="videos transcoded in parallel (threads)"
    )
    p.add_argument(
        "--gop", type=int, default=8, help="keyframe interval of the clips; small = cheap random access, larger files"
    )
    p.add_argument(
        "--crf",
        type=int,
        default=18,
        help="x264 quality (lower = better, bigger); 18 is visually lossless for ultrasound",
    )
    p.add_argument("--fps", type=float, default=30.0, help="frame rate for frame folders and DICOM without timing tags")
    return p.parse_args(argv)


def collect(args: argparse.Namespace) -> list[I.SourceItem]:
    unlabeled = getattr(args, "unlabeled", False)
    if args.dicom:
        if not args.labels:
            raise I.IngestError("--dicom needs --labels (columns video,label[,patient_id][,split])")
        if args.layout != "labels":
            raise I.IngestError("--layout buv does not apply to --dicom")
        return I.dicom_items(args.dicom, args.labels, unlabeled)
    if args.layout == "buv":
        if args.labels:
            raise I.IngestError("--layout buv takes labels from the folder names; drop --labels")
        if unlabeled:
            raise I.IngestError(
                "--layout buv takes labels from the folder names: put unlabelled videos in "
                "rawframes/unlabeled/ and drop --unlabeled"
            )
        return I.buv_items(args.videos)
    if not args.labels:
        raise I.IngestError("--videos needs --labels (or --layout buv)")
    return I.labeled_items(args.videos, args.labels, unlabeled)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        if args.workers < 1:
            raise I.IngestError(f"--workers must be >= 1, got {args.workers}")
        if args.gop < 1:
            raise I.IngestError(f"--gop must be >= 1, got {args.gop}")
        for flag in ("max_bytes", "max_frames", "max_side"):
            if getattr(args, flag) < 1:
                raise I.IngestError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        ratios = parse_ratios(args.split) if args.split else None
        region = parse_scan_region(args.scan_region) if args.scan_region else None
        limits = I.Limits(max_bytes=args.max_bytes, max_frames=args.max_frames, max_side=args.max_side)
        I.Pseudonyms(I.resolve_salt(args.salt), args.keep_ids)  # no salt: say so before reading anything
        items = collect(args)
        log.info("ingesting %d item(s) into %s", len(items), args.out)
        result = I.ingest(
            items,
            args.out,
            ratios=ratios,
            folds=args.folds,
            seed=args.seed,
            salt=args.salt,
            keep_ids=args.keep_ids,
            id_map=args.id_map,
            scan_region=region,
            limits=limits,
            workers=args.workers,
            gop=args.gop,
            crf=args.crf,
            fps=args.fps,
        )
    except (I.IngestError, ManifestError, ScanRegionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(I.summary_table(result))
    if not result.usable:
        print(f"error: no usable video in {len(items)} item(s); see {args.out}/rejects.parquet", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run_main(main)
