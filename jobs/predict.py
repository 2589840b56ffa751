"""Probability of malignancy for breast-ultrasound videos — no cluster needed.

    python -m jobs.predict --checkpoint s3://bucket/runs/clman-v1/model.pt clip1.mp4 s3://bucket/raw/clip2.avi scan.dcm

For each video (mp4, avi, multi-frame DICOM; a path or an s3:// URI) prints
the probability of malignancy, the label at ``--threshold`` and the frames
that weighed most in the multi-meta attention, and writes them as JSON
(``--json``, default ``predictions.json``). A video that cannot be read is
reported on its own line; the others are still scored.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import torch

from clman import cli, storage
from clman.data.sampling import all_frame_indices, segment_indices
from clman.data.frames import to_stored
from clman.data.video import VideoError, decode_frames_resized, probe_video
from clman.inference import load_classifier, score_frames

log = logging.getLogger("jobs.predict")
LABELS = ("benign", "malignant")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model.pt written by jobs.finetune")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="mp4 / avi / DICOM, paths or s3:// URIs")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="malignant when P >= threshold; the evaluate report gives the threshold at 95%% sensitivity")
    p.add_argument("--frames", choices=("all", "clip"), default="all",
                   help="score all frames, or T frames by segments as in finetuning")
    p.add_argument("--max-frames", type=int, default=512, help="at most this many frames (segment centres) per video")
    p.add_argument("--top", type=int, default=3, help="how many most-weighted frames to list")
    p.add_argument("--json", default="predictions.json", help="where to write the JSON (path or s3:// URI)")
    return p.parse_args(argv)


def read_frames(uri: str, indices_for, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(frames (T, C, size, size) uint8 as the training decode stores them, source frame indices (T,))
    of a video or DICOM file."""
    data = storage.read_bytes(uri)
    if data[128:132] == b"DICM":
        from clman.data.ingest import dicom_frames

        import torch.nn.functional as F

        frames = dicom_frames(data, name=uri)  # (N, H, W, 3) uint8
        idx = indices_for(len(frames))
        # the decoder's scaler stands in for a bilinear resize here
        x = torch.from_numpy(np.ascontiguousarray(frames[idx])).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return to_stored(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()), idx
    info = probe_video(data, name=uri)
    idx = indices_for(info.num_frames)
    return to_stored(decode_frames_resized(data, idx, size, name=uri)), idx


def main(argv=None) -> int:
    args = parse(argv)
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_classifier(args.checkpoint, device)
    if args.frames == "all":
        def indices_for(n):
            return all_frame_indices(n, args.max_frames)
    else:
        def indices_for(n):
            return segment_indices(n, cfg.data.num_frames, train=False)

    results, failed = [], 0
    for uri in args.videos:
        try:
            frames, idx = read_frames(uri, indices_for, cfg.data.stored_size)
        except (VideoError, storage.StorageError, ValueError) as e:
            print(f"{uri}: cannot be scored: {e}")
            results.append({"video": uri, "error": str(e)})
            failed += 1
            continue
        pred = score_frames(model, torch.from_numpy(frames), idx, cfg.data.size, device)
        label = LABELS[int(pred.score >= args.threshold)]
        top = pred.top_frames(args.top)
        print(f"{uri}: P(malignant) = {pred.score:.3f} -> {label} (threshold {args.threshold:g}); "
              f"frames that weighed most: {top}")
        results.append({"video": uri, "probability_malignant": pred.score, "label": label,
                        "threshold": args.threshold, "frames_scored": int(len(idx)), "top_frames": top})
    storage.write_text(args.json, json.dumps({"checkpoint": args.checkpoint, "predictions": results}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 1 if failed == len(args.videos) else 0


if __name__ == "__main__":
    cli.run_main(main)
