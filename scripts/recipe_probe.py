"""Compare finetune recipes on a held-out set, in one process (docs/recipes.md).

A demo's test split (~108 videos) cannot tell two recipes 0.05 AUC apart, and choosing on it
would tune on the test split. This trains as ``clman.train.finetune`` does (the same model,
encoder, optimizer groups, schedule, segment sampling, augmentation, loss, class weights and
carved validation split) on one demo data set's training split, in this process: no Ray, one
process instead of two DDP workers, seeded draws of its own (not the job's clips bit for bit),
a recipe in 1-4 minutes on 2 cores. After every epoch it scores the val split (T centre frames,
what the job ranks on), the demo's test split (all frames, as ``jobs.evaluate``) and a held-out
set (T centre frames); at the end, the checkpoint each selection rule would keep.

    # a demo data set (its ingested sweeps and SimCLR encoder) and a held-out set of 400 sweeps:
    python -m jobs.demo --config jobs/configs/demo-cpu.yaml --difficulty hard --workdir .demo-hard
    python -m clman.local_s3 start --data-dir .held-out-hard/s3 --bucket clman-demo
    set -a; source .held-out-hard/s3/s3.env; set +a
    python -m jobs.synth --out s3://clman-demo/raw --cases 400 --seed 7 --difficulty hard
    python -m jobs.ingest --out s3://clman-demo/data --videos s3://clman-demo/raw \\
        --labels s3://clman-demo/raw/labels.csv --split 0,0,1 --seed 7
    infra/local_s3/stop.sh .held-out-hard/s3
    # then, per recipe (OMP_NUM_THREADS=1 runs two side by side on 2 cores):
    python scripts/recipe_probe.py .demo-hard --held-out .held-out-hard --set finetune.epochs=40

Each workdir's S3 server is started (``clman.local_s3.LocalS3``), its videos decoded once at the stored size into
``--cache-dir`` and the server stopped; later runs read the cache (delete it after re-running a demo
in the same workdir). ``--clips-per-video K``
trains K clips of each video per epoch; ``--frame-train`` trains on single frames (the issue's
probe: each of a clip's frames a sample, scores averaged over frames); ``--frame-loss W`` adds a
per-frame cross-entropy beside the clip's; ``--scratch`` leaves the encoder untrained.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clman import cli  # noqa: E402
from clman import config as C  # noqa: E402
from clman import optim, storage  # noqa: E402
from clman.data import augment  # noqa: E402
from clman.data import frames as FR  # noqa: E402
from clman.data.manifest import read_manifest  # noqa: E402
from clman.data.sampling import segment_indices  # noqa: E402
from clman.evaluate.inference import score_frames  # noqa: E402
from clman.local_s3 import LocalS3  # noqa: E402
from clman.metrics import compute_metrics  # noqa: E402
from clman.models.build import classifier_from  # noqa: E402
from clman.train import finetune as loop  # noqa: E402

BUCKET = "s3://clman-demo"  # what jobs.demo writes to


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", help="a jobs.demo --workdir: its ingested sweeps and runs/pretrain/encoder.pt")
    p.add_argument("--held-out", default="", help="a workdir whose manifest's test split is the held-out set")
    p.add_argument("--config", default=str(ROOT / "jobs/configs/demo-cpu.yaml"))
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--clips-per-video", type=int, default=1)
    p.add_argument("--frame-train", action="store_true")
    p.add_argument("--frame-loss", type=float, default=0.0)
    p.add_argument("--scratch", action="store_true")
    p.add_argument("--windows", default="1,3,5", help="selection windows to report (mean val AUC of N epochs)")
    p.add_argument("--cache-dir", default=str(ROOT / ".recipe-probe"))
    return p.parse_args(argv)


def decoded(workdir: str, splits: tuple[str, ...], size: int, cache_dir: str, encoder: bool) -> dict:
    """{split: {"rows", "frames": [uint8 (N, C, S, S)]}, "encoder": bytes}: decoded once, then cached."""
    cache = Path(cache_dir) / f"{Path(workdir).resolve().name}-{size}px.pt"
    if not cache.exists():
        _decode_to(cache, workdir, splits, size, encoder)
    out = torch.load(cache, weights_only=True)  # tensors, strings and lists only
    for split in splits:
        out[split]["rows"] = pd.read_json(io.StringIO(out[split]["rows"]), orient="records", dtype=False)
    if encoder:
        out["encoder"] = out["encoder"].numpy().tobytes()
    return out


def _decode_to(cache: Path, workdir: str, splits: tuple[str, ...], size: int, encoder: bool) -> None:
    with LocalS3(Path(workdir) / "s3") as server:  # the demo's server, its stored credentials
        os.environ.update(server.env())
        out: dict = {}
        for split in splits:
            rows = read_manifest(f"{BUCKET}/data/manifest.parquet", split=split)
            frames = [
                torch.from_numpy(FR.decode_stored(r.uri, FR.whole_video_indices(int(r.num_frames)), size))
                for r in rows.itertuples(index=False)
            ]
            out[split] = {"rows": rows.to_json(orient="records"), "frames": frames}
        if encoder:
            out["encoder"] = torch.frombuffer(
                bytearray(storage.read_bytes(f"{BUCKET}/runs/pretrain/encoder.pt")), dtype=torch.uint8
            )
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)


def centre_clips(videos: list[torch.Tensor], t: int) -> torch.Tensor:
    return torch.stack([v[torch.as_tensor(segment_indices(v.shape[0], t, train=False))] for v in videos])


def main(argv=None) -> int:
    a = parse(argv)
    for workdir in filter(None, (a.workdir, a.held_out)):
        if not (Path(workdir) / "s3").is_dir():
            raise C.ConfigError(f"{workdir}: no s3/ folder of a jobs.demo --workdir (or of a held-out set) in it")
    cfg = C.job_config(C.load_tree(a.config, a.overrides), "finetune")
    data, T, B = cfg.data, cfg.data.num_frames, cfg.batch_size
    D = decoded(a.workdir, ("train", "test"), data.stored_size, a.cache_dir, encoder=True)
    held = decoded(a.held_out, ("test",), data.stored_size, a.cache_dir, encoder=False)["test"] if a.held_out else None

    rows, frames = D["train"]["rows"], D["train"]["frames"]
    labels = torch.tensor(rows["label"].to_numpy().astype(np.int64))
    where = {v: i for i, v in enumerate(rows["video_id"])}
    tr, va, info = loop.validation_split(rows, rows.iloc[:0], cfg.val_fraction, seed=cfg.seed)
    train_idx, val_idx = [where[v] for v in tr["video_id"]], [where[v] for v in va["video_id"]]
    print(info["note"], flush=True)

    torch.manual_seed(cfg.seed)
    model = classifier_from(cfg.model)
    if not a.scratch:
        enc = Path(a.cache_dir) / f"encoder-{os.getpid()}.pt"
        enc.write_bytes(D["encoder"])
        loop.load_encoder(model, str(enc))
        enc.unlink()
    opt = loop.make_optimizer(model, cfg)
    K = a.clips_per_video
    steps_per_epoch = len(train_idx) * K // B
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    weight = loop.class_weights(labels[train_idx].tolist(), cfg.class_weights)
    spec = augment.AugmentSpec.finetune(data)

    def logits_of(clips: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, s, s) -> (B, 2); with --frame-train, each frame alone, probabilities averaged."""
        if not a.frame_train:
            return torch.softmax(model(clips), 1)[:, 1]
        b, t = clips.shape[:2]
        return torch.softmax(model(clips.flatten(0, 1)[:, None]), 1)[:, 1].view(b, t).mean(1)

    @torch.no_grad()
    def auc_of(videos: list[torch.Tensor], y: np.ndarray, whole: bool) -> float:
        model.eval()
        if whole and a.frame_train:  # all frames of each video, each alone, averaged
            scores = [
                torch.softmax(model(augment.resize_clips(v[:, None], data.size)), 1)[:, 1].mean().item() for v in videos
            ]
        elif whole:  # as jobs.evaluate: all frames of each video
            scores = [score_frames(model, v, np.arange(v.shape[0]), data.size).score for v in videos]
        else:
            scores = torch.cat(
                [
                    logits_of(augment.resize_clips(centre_clips(videos[j : j + 50], T), data.size))
                    for j in range(0, len(videos), 50)
                ]
            ).tolist()
        return compute_metrics(np.asarray(scores), y)["auc"] if len(scores) else math.nan

    history, step, t0 = [], 0, time.time()
    for epoch in range(cfg.epochs):
        model.train()
        items = [(i, k) for k in range(K) for i in train_idx]
        items = [items[j] for j in FR.draw_rng(cfg.seed, epoch, 0, FR.SHUFFLE).permutation(len(items))]
        prefix = augment.epoch_prefix(cfg.seed, epoch, "cpu")
        loss_sum, scores, targets = 0.0, [], []
        for s in range(steps_per_epoch):
            batch = items[s * B : (s + 1) * B]
            clips = torch.stack(
                [
                    frames[i][
                        torch.as_tensor(
                            segment_indices(
                                frames[i].shape[0],
                                T,
                                train=True,
                                rng=FR.draw_rng(cfg.seed, epoch * 97 + k, i, FR.CLIP_FRAMES),
                            )
                        )
                    ]
                    for i, k in batch
                ]
            )
            y = labels[[i for i, _ in batch]]
            video = torch.tensor([i * 16 + k for i, k in batch])
            lr = optim.schedule(cfg.schedule, step, total, cfg.lr, warmup)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            if a.frame_train:
                b, t = clips.shape[:2]
                keys = augment.keys_at(prefix, video.repeat_interleave(t) * 64 + torch.arange(t).repeat(b))
                logits = model(augment.augment(clips.flatten(0, 1), keys, spec)[:, None])
                y = y.repeat_interleave(t)
                loss = F.cross_entropy(logits, y, weight=weight, label_smoothing=cfg.label_smoothing)
            else:
                x = augment.augment_clips(clips, augment.keys_at(prefix, video), spec)
                if not a.frame_loss:
                    logits = model(x)
                else:
                    feats = model.encoder(x.flatten(0, 1)).view(*x.shape[:2], -1)
                    logits = model.head(model.aggregator(feats, None))
                loss = F.cross_entropy(logits, y, weight=weight, label_smoothing=cfg.label_smoothing)
                if a.frame_loss:
                    per_frame = model.head(feats.flatten(0, 1))
                    loss = loss + a.frame_loss * F.cross_entropy(
                        per_frame, y.repeat_interleave(x.shape[1]), weight=weight, label_smoothing=cfg.label_smoothing
                    )
            opt.zero_grad()
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            loss_sum += loss.item()
            scores.append(torch.softmax(logits.detach(), 1)[:, 1])
            targets.append(y)
        train_auc = compute_metrics(torch.cat(scores).numpy(), torch.cat(targets).numpy())["auc"]
        val = auc_of([frames[i] for i in val_idx], labels[val_idx].numpy(), whole=False)
        test = auc_of(D["test"]["frames"], D["test"]["rows"]["label"].to_numpy().astype(int), whole=True)
        out = (
            auc_of(held["frames"], held["rows"]["label"].to_numpy().astype(int), whole=False)
            if held is not None
            else math.nan
        )
        history.append((val, test, out))
        print(
            f"epoch {epoch + 1:2d}  loss {loss_sum / steps_per_epoch:.4f}  train AUC {train_auc:.3f}  "
            f"val {val:.3f}  test {test:.3f}  held-out {out:.3f}  {time.time() - t0:.0f} s",
            flush=True,
        )

    vals = [h[0] for h in history]
    for window in sorted({min(int(w), len(vals)) for w in a.windows.split(",")}):
        score = [loop.val_score(vals[: e + 1], window) for e in range(len(vals))]
        kept = max((e for e in range(len(vals)) if score[e] == score[e]), key=lambda e: score[e], default=len(vals) - 1)
        print(
            f"kept by the mean val AUC of {window} epoch(s): epoch {kept + 1}  val score {score[kept]:.3f}  "
            f"test {history[kept][1]:.3f}  held-out {history[kept][2]:.3f}"
        )
    print(f"last epoch: test {history[-1][1]:.3f}  held-out {history[-1][2]:.3f}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
