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

from clman import cli, report, storage
from clman import config as C
from clman.data.manifest import read_manifest
from clman.inference import load_classifier
from clman.train import runner, scoring
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
    """Scores of every video in ``split``: {"video_id", "patient_id", "label", "score", "top_frames"}, manifest order.

    Ray Data batch inference on actors holding the model (GPU actors when the cluster has GPUs).
    """
    rows = read_manifest(manifest, split=split)
    if len(rows) == 0:
        raise JobError(f"{manifest}: split {split!r} is empty; nothing to evaluate")
    _, train_cfg = load_classifier(checkpoint)  # fails here, in one line, on a bad checkpoint
    t0 = time.perf_counter()
    # Frames are prepared the way the model was trained on them (stored size, size, T).
    scored = scoring.score_rows(checkpoint, rows, train_cfg.data, whole=cfg.frames == "all")
    out = {"video_id": [], "patient_id": [], "label": [], "score": [], "top_frames": []}
    for i in sorted(scored):
        out["video_id"].append(str(rows["video_id"].iloc[i]))
        out["patient_id"].append(str(rows["patient_id"].iloc[i]))
        out["label"].append(int(rows["label"].iloc[i]))
        out["score"].append(scored[i][0])
        out["top_frames"].append(scored[i][1])
    log.info("scored %d/%d videos of split %r in %.1f s", len(out["score"]), len(rows), split,
             time.perf_counter() - t0)
    if not out["score"]:
        raise JobError(f"{manifest}: no video of split {split!r} could be decoded")
    return out


def write_outputs(out_dir: str, name: str, scored: dict, cfg: C.EvaluateConfig) -> dict:
    scores = np.asarray(scored["score"], dtype=np.float64)
    labels = np.asarray(scored["label"], dtype=np.int64)
    result = report.evaluate_scores(scores, labels, threshold=cfg.threshold,
                                    target_sensitivity=cfg.target_sensitivity, n_boot=cfg.bootstrap, seed=cfg.seed,
                                    patients=scored.get("patient_id"))  # the bootstrap resamples patients
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
