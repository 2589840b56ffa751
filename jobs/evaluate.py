"""Evaluate a finetuned CLMAN classifier on a manifest split.

    python -m jobs.evaluate --checkpoint s3://bucket/runs/clman-v1/model.pt \\
        --manifest s3://bucket/data/manifest.parquet --split test [--out s3://bucket/runs/clman-v1/eval-test]

Scores every video of the split (all frames by default; ``--set evaluate.frames=clip``
for T centre-of-segment frames) and writes to ``--out`` (default: beside the
checkpoint, ``eval-<split>/``): ``metrics.json`` (the six metrics with 95% CIs,
specificity at 95% sensitivity), ``predictions.parquet`` (video_id, label,
score, predicted, top_frames), ``roc.png`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from clman import cli, report, storage
from clman import config as C
from clman.data import pipeline
from clman.data.manifest import read_manifest
from clman.inference import load_classifier, predict_clips
from clman.train import runner
from clman.train.runner import JobError

log = logging.getLogger("jobs.evaluate")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model.pt written by jobs.finetune")
    p.add_argument("--manifest", required=True, help="manifest.parquet written by jobs.ingest")
    p.add_argument("--split", default="test", help="train | val | test (default: test)")
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/eval-<split>)")
    p.add_argument("--name", default="CLMAN", help="row name in report.md")
    p.add_argument("--address", help="Ray cluster address; default: RAY_ADDRESS, else start Ray here")
    cli.add_config_args(p)
    return p.parse_args(argv)


def score_split(checkpoint: str, manifest: str, split: str, cfg: C.EvaluateConfig) -> dict:
    """Scores of every video in ``split``: {"video_id", "label", "score", "top_frames"}."""
    rows = read_manifest(manifest, split=split)
    if len(rows) == 0:
        raise JobError(f"{manifest}: split {split!r} is empty; nothing to evaluate")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, train_cfg = load_classifier(checkpoint, device)
    # Frames are prepared the way the model was trained on them (size, T).
    data = train_cfg.data
    ds = pipeline.eval_dataset(rows, None, data, frames=cfg.frames)
    out = {"video_id": [], "label": [], "score": [], "top_frames": []}
    t0 = time.perf_counter()
    # One video per batch: all-frames videos differ in length, and nothing is padded.
    for batch in ds.iter_torch_batches(batch_size=1, device=device):
        pred = predict_clips(model, batch["clip"], batch["mask"], batch["frame_idx"])[0]
        out["video_id"].append(str(rows["video_id"].iloc[int(batch["video_index"][0])]))
        out["label"].append(int(batch["label"][0]))
        out["score"].append(pred.score)
        out["top_frames"].append(pred.top_frames(3))
    log.info("scored %d/%d videos of split %r in %.1f s", len(out["score"]), len(rows), split,
             time.perf_counter() - t0)
    if not out["score"]:
        raise JobError(f"{manifest}: no video of split {split!r} could be decoded")
    return out


def write_outputs(out_dir: str, name: str, scored: dict, cfg: C.EvaluateConfig) -> dict:
    scores = np.asarray(scored["score"], dtype=np.float64)
    labels = np.asarray(scored["label"], dtype=np.int64)
    result = report.evaluate_scores(scores, labels, threshold=cfg.threshold,
                                    target_sensitivity=cfg.target_sensitivity, n_boot=cfg.bootstrap, seed=cfg.seed)
    report.write_predictions(storage.join(out_dir, "predictions.parquet"), scored["video_id"], labels, scores,
                             cfg.threshold, scored["top_frames"])
    storage.write_bytes(storage.join(out_dir, "roc.png"),
                        report.roc_png({name: (scores, labels, result["metrics"]["auc"])}))
    report.write_json(storage.join(out_dir, "metrics.json"), result)
    storage.write_text(storage.join(out_dir, "report.md"), report.markdown({name: result}))
    return result


def run(checkpoint: str, manifest: str, split: str, cfg: C.EvaluateConfig, out: str | None = None,
        name: str = "CLMAN", address: str | None = None) -> dict:
    runner.init_ray(address)
    out = out or storage.join(checkpoint.rsplit("/", 1)[0], f"eval-{split}")
    scored = score_split(checkpoint, manifest, split, cfg)
    result = write_outputs(out, name, scored, cfg)
    result["out"] = out
    return result


def main(argv=None) -> int:
    args = parse(argv)
    cfg = C.load("evaluate", args.config, args.overrides)
    result = run(args.checkpoint, args.manifest, args.split, cfg, args.out, args.name, args.address)
    print(report.table_rows({args.name: result}))
    print(f"\nspecificity at {100 * cfg.target_sensitivity:.0f}% sensitivity: "
          f"{report.fmt_pct(result['specificity_at_sensitivity']['specificity'])}%")
    print(f"outputs: {result['out']}/ (report.md, roc.png, metrics.json, predictions.parquet)")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
