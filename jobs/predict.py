"""Probability of malignancy for breast-ultrasound videos — no cluster needed.

    python -m jobs.predict --checkpoint s3://bucket/runs/clman-v1/model.pt clip1.mp4 s3://bucket/raw/clip2.avi scan.dcm

For each video (mp4, avi, multi-frame DICOM; a path or an s3:// URI) prints
the probability of malignancy, the label at the threshold and the frames
that weighed most in the multi-meta attention, and writes them as JSON
(``--json``, default ``predictions.json``). A video that cannot be read is
reported on its own line; the others are still scored.

The threshold is the one model.pt stores: chosen by jobs.finetune on the validation videos
for ``evaluate.target_sensitivity`` (never on the test split); a model.pt written before
thresholds were stored gets 0.5, and a line says so. Videos are scored as validation scored
them (the clips and frame size model.pt stores), so the threshold means what it meant there.

Inputs are named by their position on the command line ("video 3") and the first
16 hex digits of the SHA-256 of their bytes; their paths and URIs are neither
printed nor written (clinical file names often carry patient names or ids)
unless ``--show-paths`` asks for them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math

import numpy as np
import torch

from clman import checkpoint as ckpt
from clman import cli, storage
from clman.config import ConfigError
from clman.data.sampling import all_frame_indices, scoring_clips, segment_indices
from clman.data.frames import to_stored
from clman.data.video import VideoError, decode_frames_resized, probe_video
from clman.evaluate.inference import (
    DEFAULT_THRESHOLD,
    describe_threshold,
    load_classifier,
    score_clips,
    stored_preprocessing,
    stored_threshold,
)

log = logging.getLogger("jobs.predict")
LABELS = ("benign", "malignant")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="model.pt written by jobs.finetune")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="mp4 / avi / DICOM, paths or s3:// URIs")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="malignant when P >= threshold, in [0, 1]. Default: the one model.pt stores, chosen on "
        "the validation videos for evaluate.target_sensitivity (0.5 for a model.pt without one). "
        "To use another, choose it on validation data, never on the test split the model is "
        "judged on",
    )
    p.add_argument(
        "--frames",
        choices=("model", "all", "clip"),
        default="model",
        help="model (default): as validation scored videos, the protocol model.pt stores (the mean "
        "of K clips of T frames), which is what its threshold was chosen on; all: one clip of "
        "every frame (up to --max-frames); clip: the T segment centres",
    )
    p.add_argument(
        "--max-frames",
        type=int,
        default=512,
        help="at most this many frames (segment centres) per video, >= 1 (--frames all)",
    )
    p.add_argument("--top", type=int, default=3, help="how many most-weighted frames to list, >= 0")
    p.add_argument("--json", default="predictions.json", help="where to write the JSON (path or s3:// URI)")
    p.add_argument(
        "--show-paths",
        action="store_true",
        help="also print and write each video's path or URI. Off by default because the "
        "file names of clinical videos often carry patient names or ids; without it "
        'a video is named by its position ("video 3") and the SHA-256 of its bytes',
    )
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Bad numbers fail here, in one line, before the checkpoint is read."""
    if args.threshold is not None and not (math.isfinite(args.threshold) and 0.0 <= args.threshold <= 1.0):
        raise ConfigError(f"--threshold: must be a number in [0, 1], got {args.threshold!r}")
    if args.max_frames < 1:
        raise ConfigError(f"--max-frames: must be >= 1, got {args.max_frames}")
    if args.top < 0:
        raise ConfigError(f"--top: must be >= 0, got {args.top}")


def read_frames(data: bytes, indices_for, size: int, name: str = "video") -> tuple[np.ndarray, np.ndarray]:
    """(frames (K, T, C, size, size) uint8 as the training decode stores them, source frame indices (K, T))
    of a video or DICOM file's bytes, ``indices_for(num_frames)`` giving the (K, T) indices; ``name`` stands
    for the file in error messages. Each distinct frame is decoded once."""
    if data[128:132] == b"DICM":
        from clman.data.ingest import dicom_frames

        import torch.nn.functional as F

        frames = dicom_frames(data, name=name)  # (N, H, W, 3) uint8
        idx = indices_for(len(frames))
        want, where = np.unique(idx.ravel(), return_inverse=True)
        # the decoder's scaler stands in for a bilinear resize here
        x = torch.from_numpy(np.ascontiguousarray(frames[want])).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        decoded = to_stored(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    else:
        idx = indices_for(probe_video(data, name=name).num_frames)
        want, where = np.unique(idx.ravel(), return_inverse=True)
        decoded = to_stored(decode_frames_resized(data, want, size, name=name))  # (U, C, S, S)
    return decoded[where].reshape(*idx.shape, *decoded.shape[1:]), idx


def _without(message: str, uri: str, name: str) -> str:
    """``message`` with ``uri`` replaced by ``name`` (storage errors begin with the URI they failed on)."""
    if message.startswith(uri):
        message = name + message[len(uri) :]
    return message.replace(uri, name) if len(uri) >= 6 else message


def main(argv=None) -> int:
    args = parse(argv)
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = ckpt.load_checkpoint(args.checkpoint)
    model, _ = load_classifier(args.checkpoint, device, state=state)
    prep, stored = stored_preprocessing(state), stored_threshold(state)
    if args.threshold is not None:
        threshold = {"value": args.threshold, "source": "--threshold"}
    else:
        threshold = {"value": stored["value"] if stored else DEFAULT_THRESHOLD, "source": describe_threshold(stored)}
    print(threshold["source"] if args.threshold is None else f"threshold {args.threshold:g}: from --threshold")
    if args.frames == "model":

        def indices_for(n):  # (K, T), as validation and jobs.evaluate scored the video
            return scoring_clips(n, prep["num_frames"], prep["frames"], prep["clips"], args.max_frames)
    elif args.frames == "all":

        def indices_for(n):
            return all_frame_indices(n, args.max_frames)[None]
    else:

        def indices_for(n):
            return segment_indices(n, prep["num_frames"], train=False)[None]

    results, failed = [], 0
    for position, uri in enumerate(args.videos, 1):
        # {"video": "video 3", "position": 3, "sha256": first 16 hex digits of the file's SHA-256
        #  (None when it cannot be read)[, "uri": only with --show-paths]}
        name = f"video {position}"
        entry: dict = {"video": name, "position": position, "sha256": None}
        if args.show_paths:
            entry["uri"] = uri
        try:
            data = storage.read_bytes(uri)
            entry["sha256"] = hashlib.sha256(data).hexdigest()[:16]
            name += f" (sha256 {entry['sha256']})"
            frames, idx = read_frames(data, indices_for, prep["stored_size"], name=uri if args.show_paths else name)
        except (VideoError, storage.StorageError, ValueError) as e:
            why = cli.one_line(e) if args.show_paths else _without(cli.one_line(e), uri, name)
            print(f"{f'{name} {uri}' if args.show_paths else name}: cannot be scored: {why}")
            results.append({**entry, "error": why})
            failed += 1
            continue
        pred = score_clips(model, torch.from_numpy(frames), idx, prep["size"], device)
        label = LABELS[int(pred.score >= threshold["value"])]
        top = pred.top_frames(args.top)
        print(
            f"{f'{name} {uri}' if args.show_paths else name}: P(malignant) = {pred.score:.3f} -> {label} "
            f"(threshold {threshold['value']:.4g}); frames that weighed most: {top}"
        )
        results.append(
            {
                **entry,
                "probability_malignant": pred.score,
                "label": label,
                "threshold": threshold["value"],
                "frames_scored": int(len(pred.frame_index)),
                "top_frames": top,
            }
        )
    storage.write_text(
        args.json,
        json.dumps({"checkpoint": args.checkpoint, "threshold": threshold, "predictions": results}, indent=2) + "\n",
    )
    print(f"wrote {args.json}")
    return 1 if failed == len(args.videos) else 0


if __name__ == "__main__":
    cli.run_main(main)
