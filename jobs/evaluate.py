"""Evaluate a finetuned CLMAN classifier on a manifest split.

    python -m jobs.evaluate --checkpoint s3://bucket/runs/clman-v1/model.pt \\
        --manifest s3://bucket/data/manifest.parquet --split test [--out s3://bucket/runs/clman-v1/eval-test]

Scores every video of the split as the finetune job validated it: by default the mean
P(malignant) of ``evaluate.clips`` (4) clips of T frames at the spacing the model was
trained at (``--set evaluate.clips=1``: the T segment centres); ``--set evaluate.frames=all``
scores every frame (up to 512), for CLMAN only: a Table 4 baseline is refused. Use the
``--config`` the model was finetuned with, so that validation and test score the same clips.
Writes to ``--out`` (default: beside the checkpoint, ``eval-<split>/``): ``metrics.json`` (the
six metrics with 95% CIs at ``evaluate.threshold``, specificity at 95% sensitivity read off this
split (descriptive), ``operating_point``: the metrics at the threshold model.pt stores, chosen on
the validation videos (what jobs.predict applies), ``calibration``: Brier score and ECE with CIs,
``scoring``: how videos were scored), ``predictions.parquet`` (video_id, label, score, predicted at
``evaluate.threshold``, top_frames), ``roc.png`` (with a patient-bootstrap 95% band and the
operating point), ``reliability.png`` and ``report.md``.
"""

from __future__ import annotations

import argparse

from clman import checkpoint as ckpt
from clman import cli, storage
from clman import config as C
from clman.data.manifest import check_labeled_split, read_manifest
from clman.evaluate import inference, report, scoring
from clman.launch import session


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="model.pt written by jobs.finetune")
    p.add_argument("--manifest", required=True, help="manifest.parquet written by jobs.ingest")
    p.add_argument("--split", default="test", help="train | val | test (default: test)")
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/eval-<split>)")
    p.add_argument("--name", default="CLMAN", help="row name in report.md")
    cli.add_address_arg(p)
    cli.add_config_args(p)
    return p.parse_args(argv)


def run(
    checkpoint: str,
    manifest: str,
    split: str,
    cfg: C.EvaluateConfig,
    out: str | None = None,
    name: str = "CLMAN",
    address: str | None = None,
) -> dict:
    # A manifest of another version, a missing column, an unknown split or the unlabelled one (no
    # labels to score against) fails here, before Ray starts.
    check_labeled_split(split, manifest)
    read_manifest(manifest, split=split)
    scoring.check_checkpoint(checkpoint, cfg)  # a bad checkpoint, or frames=all for a baseline: before Ray
    session.init_ray(address)
    out = out or storage.join(checkpoint.rsplit("/", 1)[0], f"eval-{split}")
    scored = scoring.score_split(checkpoint, manifest, split, cfg)
    deployed = inference.stored_threshold(ckpt.load_checkpoint(checkpoint))  # chosen on validation, never here
    result = report.write_evaluation(
        out, name, scored, cfg, deployed, notes=[f"Deployed threshold: {inference.describe_threshold(deployed)}."]
    )
    result["scoring"] = scored["scoring"]
    report.write_json(storage.join(out, "metrics.json"), result)  # again, saying how the videos were scored
    result["out"] = out
    return result


def main(argv=None) -> int:
    args = parse(argv)
    cfg = C.load("evaluate", args.config, args.overrides)
    result = run(args.checkpoint, args.manifest, args.split, cfg, args.out, args.name, args.address)
    print(report.table_rows({args.name: result}))
    print(
        f"\nspecificity at {100 * cfg.target_sensitivity:.0f}% sensitivity: "
        f"{report.fmt_pct(result['specificity_at_sensitivity']['specificity'])}%"
    )
    print(result["scoring"])
    op = result["operating_point"]
    print(inference.describe_threshold(op["validation"] if op else None))
    if op:
        print(
            f"at it on split {args.split}: sensitivity {report.fmt_pct(op['sensitivity'])}%, "
            f"specificity {report.fmt_pct(op['specificity'])}%"
        )
    cal = result["calibration"]
    print(f"calibration: Brier {cal['brier']:.3f}, ECE {cal['ece']:.3f} ({cal['ece_bins']} bins)")
    print(f"outputs: {result['out']}/ (report.md, roc.png, reliability.png, metrics.json, predictions.parquet)")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
