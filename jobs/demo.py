"""The whole CLMAN pipeline on one machine: embedded S3 + synthetic sweeps (what `make demo` runs).

    python -m jobs.demo --config jobs/configs/demo-cpu.yaml
    python -m jobs.demo --config jobs/configs/demo-cpu.yaml --difficulty hard --workdir .demo-hard

1. starts SeaweedFS on loopback (data in ``<workdir>/s3``) and points the AWS_* variables at it;
2. makes 268 synthetic breast-ultrasound sweeps like the paper's data set (152 malignant);
3. ingests them (short-GOP H.264 + manifest.parquet, patient-level 60/40 split as in the paper);
4. pretrains the encoder with SimCLR, then finetunes CLMAN from it and CLMAN from scratch side by
   side: two Ray Train runs at once, each on half of ``scale.num_workers`` (at least one);
5. evaluates both on the test split and writes the comparison (the paper's Table 2 layout)
   with 95% CIs and ROC curves to ``s3://<bucket>/runs/demo-report/``, copied to
   ``<workdir>/report/``;
6. stops the S3 server (also on Ctrl-C or an error).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from clman import checkpoint as ckpt
from clman import cli, storage, tracking
from clman.evaluate import inference, report
from clman import config as C
from clman.data import manifest as M
from clman.data.ingest import ingest, labeled_items
from clman.data.synth import DIFFICULTY_KNOBS, SynthConfig, write_dataset
from clman.local_s3 import LocalS3
from clman.launch import session

log = logging.getLogger("jobs.demo")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_config_args(p)
    p.add_argument("--workdir", default=".demo", help="local folder for the S3 data and the copied report")
    p.add_argument("--cases", type=int, default=268, help="synthetic sweeps (the paper has 268)")
    p.add_argument(
        "--difficulty",
        choices=sorted(DIFFICULTY_KNOBS),
        default="default",
        help="which phantom: default, or hard (overlapping classes, focal signs, five codecs; clman.data.synth)",
    )
    p.add_argument("--frames", type=int, default=None, help="frames per synthetic sweep (default 24; hard: 30 +- 8)")
    p.add_argument(
        "--synth-size",
        type=int,
        default=None,
        help="synthetic frame size in pixels (default 64; hard: 96 high, 1.1-1.35x as wide)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bucket", default="clman-demo")
    tracking.add_args(p)  # the three runs in MLflow experiment (TensorBoard folder) "demo"
    return p.parse_args(argv)


def synth_config(args: argparse.Namespace) -> SynthConfig:
    """The demo's phantom: 24 frames at 64 px by default; the hard phantom at its own sizes unless given."""
    if args.difficulty == "default":
        return SynthConfig(size=args.synth_size or 64, frames=args.frames or 24)
    given = {k: v for k, v in (("size", args.synth_size), ("frames", args.frames)) if v}
    return SynthConfig(difficulty=args.difficulty, **given)


def one_line_summary(result) -> str:
    """The ingest summary in one line: outcomes, then videos (patients, malignant) per split."""
    outcomes = ", ".join(f"{v} {k}" for k, v in result.counts.items() if v)
    if not result.usable:
        return outcomes
    splits = "; ".join(
        f"{split} {int(r.videos)} videos ({int(r.patients)} patients, {int(r.malignant)} malignant)"
        for split, r in M.summarize(result.manifest).iterrows()
    )
    return f"{outcomes}: {splits}"


SIMCLR_KEYS = ("loss", "loss_chance", "loss_ratio", "loss_trend", "loss_window", "loss_curve")  # in metrics.json


def stage(n: int, text: str) -> None:
    log.info("==== [%d/6] %s", n, text)


def run(args: argparse.Namespace) -> dict:
    track = tracking.parse_targets(args.track)
    tree = C.load_tree(args.config, args.overrides)
    pre_cfg, fin_cfg, eval_cfg = (C.job_config(tree, job) for job in ("pretrain", "finetune", "evaluate"))
    workdir = Path(args.workdir).resolve()
    t0 = time.time()

    stage(1, f"starting the embedded S3 server (SeaweedFS) in {workdir / 's3'}")
    if (workdir / "s3").exists():
        # A run name that exists resumes; the demo always starts from nothing, so two runs match.
        log.info("removing the previous demo's data and runs in %s", workdir / "s3")
        shutil.rmtree(workdir / "s3")
    (workdir / "ray.log").unlink(missing_ok=True)
    with LocalS3(workdir / "s3") as s3, contextlib.ExitStack() as ray_out:
        os.environ.update(s3.env())
        root = s3.make_bucket(args.bucket)
        raw, data, runs = f"{root}/raw", f"{root}/data", f"{root}/runs"

        synth = synth_config(args)
        stage(
            2,
            f"making {args.cases} synthetic sweeps ({args.difficulty} phantom, {synth.frames} frames, "
            f"{synth.size}px) -> {raw}",
        )
        if not storage.exists(storage.join(raw, "labels.csv")):
            write_dataset(raw, args.cases, seed=args.seed, cfg=synth, workers=os.cpu_count())
        else:
            log.info("already there; skipping")

        stage(3, f"ingesting -> {data}/manifest.parquet")
        result = ingest(
            labeled_items(raw, storage.join(raw, "labels.csv")),
            data,
            ratios=(0.6, 0.0, 0.4),
            seed=args.seed,
            workers=os.cpu_count() or 1,
            keep_ids=True,
        )
        log.info("%s", one_line_summary(result))
        manifest = storage.join(data, "manifest.parquet")

        stage(
            4,
            "SimCLR pretraining, then CLMAN finetuning with and without it, side by side "
            f"({pair_workers(fin_cfg)} worker(s) each)",
        )
        from clman.evaluate import scoring
        from jobs import pretrain

        # Ray's own output (and the workers' warnings) to a file; stages, epochs, the table here.
        session.init_ray(log_file=str(workdir / "ray.log"))
        ray_out.enter_context(session.ray_stdout_to(str(workdir / "ray.log")))
        pre = pretrain.run(pre_cfg, manifest, runs, "pretrain", track=track, experiment="demo")
        with_cl, without_cl = finetune_pair(fin_cfg, manifest, runs, pre["encoder"], track)

        stage(5, "evaluating both on the test split")
        out = storage.join(runs, "demo-report")
        rows, curves, scored_of = {}, {}, {}
        runs_of = {"Without CL guided": without_cl, "With CL (CLMAN)": with_cl}
        both = scoring.score_splits([r["model"] for r in runs_of.values()], manifest, "test", eval_cfg)
        for (name, run_), scored in zip(runs_of.items(), both):  # each test video decoded once for both
            sub = storage.join(out, "with-cl" if "With" in name else "without-cl")
            deployed = inference.stored_threshold(ckpt.load_checkpoint(run_["model"]))  # chosen on validation
            rows[name] = report.write_evaluation(sub, name, scored, eval_cfg, deployed)
            rows[name]["scoring"] = scored["scoring"]  # which protocol scored it (and validated it): metrics.json
            curves[name] = (scored["score"], scored["label"], rows[name]["metrics"]["auc"])
            scored_of[name] = scored
        storage.write_bytes(storage.join(out, "roc.png"), report.roc_png(curves))
        paired = paired_difference(scored_of, eval_cfg)
        minutes = (time.time() - t0) / 60
        notes = [
            f"Synthetic data ({args.difficulty} phantom): {args.cases} sweeps, {synth.frames} frames at "
            f"{synth.size}px, seed {args.seed}. "
            f"Config: `{args.config}`. Whole demo: {minutes:.1f} min.",
            f"{rows['With CL (CLMAN)']['scoring']}.",
            f"SimCLR ({pre_cfg.epochs} epochs): {pre['convergence']}.",
            paired,
        ]
        storage.write_text(
            storage.join(out, "report.md"),
            report.markdown(rows, title="CLMAN demo: effect of contrastive pretraining", notes=notes),
        )
        report.write_json(
            storage.join(out, "metrics.json"),
            {**rows, "paired_difference": paired, "simclr": {k: pre["metrics"].get(k) for k in SIMCLR_KEYS}},
        )
        local = workdir / "report"
        local.mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "roc.png", "metrics.json"):
            (local / name).write_bytes(storage.read_bytes(storage.join(out, name)))

        stage(6, "stopping the S3 server")
        s3.stop(timeout=0)  # what it acknowledged is on disk: no need to wait ~15 s for the filer's clean exit
    print()
    print(report.table_rows(rows))
    print(f"\n{rows['With CL (CLMAN)']['scoring']}")
    print(f"SimCLR ({pre_cfg.epochs} epochs): {pre['convergence']}")
    print(paired)
    print(f"\nreport: {local / 'report.md'}\nROC plot: {local / 'roc.png'}\n(also in {out}/)")
    print(f"demo finished in {(time.time() - t0) / 60:.1f} min")
    return rows


def pair_workers(cfg: C.FinetuneConfig) -> int:
    """Train workers of each of the two finetunes that run side by side: half of ``scale.num_workers``."""
    return max(1, cfg.scale.num_workers // 2)


def finetune_pair(cfg: C.FinetuneConfig, manifest: str, runs: str, encoder: str, track) -> tuple[dict, dict]:
    """(CLMAN from ``encoder``, CLMAN from scratch): two Ray Train runs at once, each on half the workers.

    They are independent, and side by side they share one wait for Ray Train to start; on 2 CPU cores two
    1-worker runs also beat two 2-worker runs one after the other, which spend a step's gradient exchange
    on every batch (docs/recipes.md, "The demo's finetune length"). Each run is seeded as before: the
    numbers do not depend on which run is ahead.
    """
    from jobs import finetune

    half = dataclasses.replace(cfg.scale, num_workers=pair_workers(cfg))
    cfg = dataclasses.replace(cfg, scale=half)
    with ThreadPoolExecutor(2, thread_name_prefix="finetune") as pool:
        with_cl = pool.submit(
            finetune.run, cfg, manifest, runs, "clman-cl", encoder=encoder, track=track, experiment="demo"
        )
        without_cl = pool.submit(
            finetune.run, cfg, manifest, runs, "clman-scratch", encoder=None, track=track, experiment="demo"
        )
        return with_cl.result(), without_cl.result()


def paired_difference(scored: dict, eval_cfg) -> str:
    """AUC with CL minus without, on the same test videos: the paired patient bootstrap (clman.metrics)."""
    import numpy as np

    from clman.metrics import paired_bootstrap_auc

    a, b = scored["With CL (CLMAN)"], scored["Without CL guided"]
    order = {v: i for i, v in enumerate(b["video_id"])}
    common = [i for i, v in enumerate(a["video_id"]) if v in order]  # both scored (a video may fail to decode)
    pick_b = [order[a["video_id"][i]] for i in common]
    res = paired_bootstrap_auc(
        np.asarray(a["score"])[common],
        np.asarray(b["score"])[pick_b],
        np.asarray(a["label"])[common],
        groups=np.asarray(a["patient_id"])[common],
        n_boot=eval_cfg.bootstrap,
        seed=eval_cfg.seed,
    )
    return (
        f"AUC with CL - without CL: {100 * res.diff:+.2f} points (95% CI {100 * res.lo:+.2f} to "
        f"{100 * res.hi:+.2f}), p = {res.p:.3f}: paired patient bootstrap, {res.resamples} resamples, "
        f"{len(common)} test videos"
    )


def main(argv=None) -> int:
    try:
        run(parse(argv))
    finally:  # the terminal back from Ray's log file: an error's line is printed there
        session.restore_stderr()
    return 0


if __name__ == "__main__":
    cli.run_main(main)
