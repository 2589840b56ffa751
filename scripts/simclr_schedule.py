"""Is a preset's SimCLR schedule long enough? Its pretraining at 1x, 2x and 4x its epochs on the demo's data.

    .venv/bin/python scripts/simclr_schedule.py                       # the demo preset, x1 x2 x4 (~12 min, 2 cores)
    .venv/bin/python scripts/simclr_schedule.py --multiples 1,3 --set pretrain.lr=6.0

1. starts the embedded S3 in ``<workdir>/s3`` and makes the demo's data there once (268 sweeps of the
   default phantom, seed 0, the demo's 60/40 patient split);
2. runs ``jobs.pretrain`` with the preset (and ``--set`` overrides) at each multiple of its epochs,
   every run the same but for ``pretrain.epochs`` (its cosine schedule stretched to the new length);
3. writes ``<workdir>/schedule.md`` (each run's last loss against chance ln(2N - 1), its own trend, and
   how much lower it ends than the preset's run) and ``<workdir>/loss_curves.png``.

A schedule has converged for its purpose when a longer one ends little lower: SimCLR's loss keeps
falling slowly with more epochs (the paper trains 8192), so the table says how much is left.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from clman import cli, storage
from clman import config as C
from clman.data.ingest import ingest, labeled_items
from clman.data.synth import SynthConfig, write_dataset
from clman.launch import session
from clman.local_s3 import LocalS3

log = logging.getLogger("simclr_schedule")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_args(p)
    p.set_defaults(config="jobs/configs/demo-cpu.yaml")
    p.add_argument("--multiples", default="1,2,4", help="multiples of the preset's pretrain.epochs to run")
    p.add_argument("--workdir", default=".demo/simclr-schedule")
    return p.parse_args(argv)


def demo_data(root: str) -> str:
    """The demo's manifest under ``root`` (made once): 268 default-phantom sweeps, 60/40 patient split."""
    raw, data = f"{root}/raw", f"{root}/data"
    if not storage.exists(storage.join(raw, "labels.csv")):
        write_dataset(raw, 268, seed=0, cfg=SynthConfig(size=64, frames=24), workers=os.cpu_count())
    manifest = storage.join(data, "manifest.parquet")
    if not storage.exists(manifest):
        items = labeled_items(raw, storage.join(raw, "labels.csv"))
        ingest(items, data, ratios=(0.6, 0.0, 0.4), seed=0, workers=os.cpu_count() or 1, keep_ids=True)
    return manifest


def table(results: list[dict]) -> str:
    base = results[0]["loss"]
    lines = [
        "| epochs | steps | loss | chance ln(2N-1) | ratio | last-window trend | vs the first run | minutes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        trend = f"{100 * r['loss_trend']:+.1f}%" if r.get("loss_trend") is not None else "-"
        lines.append(
            f"| {r['epochs']} | {r['step']} | {r['loss']:.4f} | {r['loss_chance']:.4f} | {r['loss_ratio']:.3f} "
            f"| {trend} | {100 * (r['loss'] / base - 1):+.1f}% | {r['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        curve = r["loss_curve"]
        ax.plot([(i + 1) / len(curve) for i in range(len(curve))], curve, label=f"{r['epochs']} epochs")
    ax.axhline(results[0]["loss_chance"], color="grey", ls="--", label="chance ln(2N-1)")
    ax.set(xlabel="share of the schedule", ylabel="NT-Xent loss (epoch mean)", title="SimCLR loss by schedule")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    base = C.load("pretrain", args.config, cli.overrides(args))
    try:
        multiples = [int(m) for m in args.multiples.split(",")]
    except ValueError:
        raise C.ConfigError(f"--multiples: whole numbers separated by commas, got {args.multiples!r}") from None
    if not multiples or min(multiples) < 1:
        raise C.ConfigError(f"--multiples: each at least 1, got {args.multiples!r}")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    with LocalS3(workdir / "s3") as s3:
        os.environ.update(s3.env())
        root = s3.make_bucket("clman-schedule")
        manifest = demo_data(root)
        session.init_ray(log_file=str(workdir / "ray.log"))
        from jobs import pretrain

        for m in multiples:
            cfg = C.load("pretrain", args.config, [*cli.overrides(args), f"pretrain.epochs={base.epochs * m}"])
            name = f"simclr-{cfg.epochs}ep"
            t0 = time.time()
            out = pretrain.run(cfg, manifest, f"{root}/runs", name)
            results.append({"epochs": cfg.epochs, **out["metrics"], "seconds": time.time() - t0})
            log.info("%d epochs: %s", cfg.epochs, out["convergence"])
        s3.stop(timeout=0)
    overrides = " ".join(cli.overrides(args)) or "none"
    text = (
        f"# SimCLR schedule: {args.config} at {args.multiples} x its {base.epochs} epochs\n\n"
        f"Overrides: {overrides}. Demo data: 268 default-phantom sweeps, the 161 training ones pretrained on.\n\n"
        f"{table(results)}\n\n"
        "trend: the mean loss of the run's last eighth of epochs against the eighth before.\n"
    )
    (workdir / "schedule.md").write_text(text)
    plot(results, workdir / "loss_curves.png")
    print(text)
    print(f"written: {workdir / 'schedule.md'}, {workdir / 'loss_curves.png'}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
