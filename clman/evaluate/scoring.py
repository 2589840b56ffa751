"""Evaluation as Ray Data batch inference: decode tasks feed actors that hold the model.

The one place videos are scored for ``jobs.evaluate``, ``jobs.demo`` and the study's trials
(:func:`score_split`, :func:`score_rows`); the metrics, report and plots they write are
:func:`clman.evaluate.report.write_evaluation`.

    manifest rows ─from_items─▶ map_batches(decode, tasks): uint8 frames at the stored size, (K, T) per video
                 ─▶ map_batches(Scorer, actor pool; a GPU each when the cluster has GPUs)
                 ─▶ {video_index, score, top_frames}

A cluster's driver usually has no GPU, and scoring in it moved every decoded frame
to the driver; here the frames go from the decode tasks to the scoring actors
through the object store, and only three numbers per video come back.

Which frames: ``evaluate.frames`` / ``evaluate.clips`` through
:func:`clman.data.sampling.scoring_clips`, the function the finetune loop's validation
uses too (``clman.train.finetune.ScoredClips``), so a model is validated and tested on
the same clips of a video. ``clips`` (the default): the mean P(malignant) of K clips of T
frames at the spacing the model was trained at, for CLMAN and every Table 4 baseline alike;
``all``: every frame as one clip, for CLMAN only (:func:`check_checkpoint`).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import ray
import torch

from clman import config as C
from clman.data import frames as F
from clman.data.manifest import check_labeled_split, read_manifest
from clman.data.sampling import describe_scoring, scoring_clips
from clman.data.video import VideoError
from clman import progress, storage
from clman.errors import JobError

log = logging.getLogger(__name__)
TOP_FRAMES = 3


def scored_indices(num_frames: int, T: int, frames: str, clips: int) -> np.ndarray:
    """(K, T') source frame numbers a video of ``num_frames`` is scored on, in validation and test alike."""
    return scoring_clips(num_frames, T, frames, clips, F.MAX_CACHED_FRAMES)


def _decode(batch: dict[str, np.ndarray], size: int, num_frames: int, frames: str, clips: int) -> dict[str, np.ndarray]:
    """One video per batch: its (K, T) scored frames (:func:`scored_indices`); nothing when it fails."""
    uri, n = str(batch["uri"][0]), int(batch["num_frames"][0])
    idx = scored_indices(n, num_frames, frames, clips)  # (K, T)
    want, where = np.unique(idx.ravel(), return_inverse=True)  # each frame decoded once, in order
    try:
        decoded = F.decode_stored(uri, want, size)  # (U, C, S, S) uint8
    except (VideoError, storage.StorageError) as err:
        log.warning("skipping clip %s: %s", uri, err)
        return {
            "frames": np.zeros((0, 1, 1, 1, 1, 1), np.uint8),
            "frame_idx": np.zeros((0, 1, 1), np.int64),
            "video_index": np.zeros((0,), np.int64),
        }
    clip_frames = decoded[where].reshape(*idx.shape, *decoded.shape[1:])  # (K, T, C, S, S)
    return {"frames": clip_frames[None], "frame_idx": idx[None], "video_index": batch["video_index"]}


class Scorer:
    """An actor holding the classifier: a video's uint8 clips -> P(malignant) (their mean), the most-weighted frames."""

    def __init__(self, checkpoint: str):
        from clman.evaluate.inference import load_classifier

        torch.set_num_threads(1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.cfg = load_classifier(checkpoint, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from clman.evaluate.inference import score_clips

        scores, tops = [], []
        for frames, idx in zip(batch["frames"], batch["frame_idx"]):  # (K, T, C, S, S), (K, T): one video
            pred = score_clips(
                self.model, torch.from_numpy(np.asarray(frames)), np.asarray(idx), self.cfg.data.size, self.device
            )
            top = pred.top_frames(TOP_FRAMES)
            scores.append(pred.score)
            tops.append(np.asarray(top + [-1] * (TOP_FRAMES - len(top)), np.int64))
        return {
            "video_index": np.asarray(batch["video_index"], np.int64),
            "score": np.asarray(scores, np.float64),
            "top_frames": np.stack(tops) if tops else np.zeros((0, TOP_FRAMES), np.int64),
        }


def score_rows(checkpoint: str, rows, data, frames: str, clips: int, decode_cpus: float = 0.5) -> dict[int, tuple]:
    """{row position: (score, top_frames)} for every row of ``rows`` that decoded.

    ``data``: the checkpoint's DataConfig (stored size, T). ``frames`` / ``clips``: the scoring
    protocol (``evaluate.frames`` / ``evaluate.clips``; :func:`scored_indices`). One scoring
    actor per GPU of the cluster (at most one per video), else one CPU actor.
    """
    gpus = int(ray.cluster_resources().get("GPU", 0))
    items = [
        {"uri": str(r.uri), "num_frames": int(r.num_frames), "video_index": i}
        for i, r in enumerate(rows.itertuples(index=False))
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(
        _decode,
        batch_size=1,
        num_cpus=decode_cpus,
        fn_kwargs={"size": data.stored_size, "num_frames": data.num_frames, "frames": frames, "clips": clips},
    )
    actors = max(1, min(gpus, len(items)))
    resources = {"num_gpus": 1} if gpus else {"num_cpus": decode_cpus}
    ds = ds.map_batches(
        Scorer,
        fn_constructor_kwargs={"checkpoint": checkpoint},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        **resources,
    )
    out = {}
    for row in progress.track(ds.iter_rows(), len(items), "scoring", unit="video"):  # a bar, or a line per 10%
        out[int(row["video_index"])] = (float(row["score"]), [int(t) for t in row["top_frames"] if t >= 0])
    return out


def describe(cfg: C.EvaluateConfig, T: int) -> str:
    """The one line reports carry about how videos were scored (``evaluate.frames`` / ``clips``, T)."""
    return describe_scoring(cfg.frames, cfg.clips, T, F.MAX_CACHED_FRAMES)


def check_checkpoint(checkpoint: str, cfg: C.EvaluateConfig) -> C.FinetuneConfig:
    """The FinetuneConfig of a classifier checkpoint that ``cfg`` can score; one-line errors otherwise.

    Fails on a bad checkpoint, and on ``evaluate.frames=all`` for a Table 4 baseline (a
    ConfigError: it would be tested at stride 1 after training on T frames N / T apart).
    Warns when the run was validated with another protocol than the one scoring it now.
    No Ray: jobs call it before anything starts.
    """
    from clman import checkpoint as ckpt
    from clman.evaluate.inference import load_classifier

    state = ckpt.load_checkpoint(checkpoint)
    _, train_cfg = load_classifier(checkpoint, state=state)  # fails here, in one line, on a bad checkpoint
    try:
        C.check_scoring(cfg.frames, train_cfg.model.arch, train_cfg.data.num_frames)
    except C.ConfigError as e:
        raise C.ConfigError(f"{checkpoint}: {e}") from None

    def protocol(frames, clips):
        return (frames, clips if frames == "clips" else None)

    validated = protocol(train_cfg.val_frames, train_cfg.val_clips)
    if "val_frames" in (state.get("config") or {}) and validated != protocol(cfg.frames, cfg.clips):
        log.warning(
            "%s was validated (its checkpoint picked) with evaluate.frames=%s, clips=%s and is scored with "
            "frames=%s, clips=%s: validation and test then score different clips",
            checkpoint,
            *validated,
            cfg.frames,
            cfg.clips,
        )
    return train_cfg


def score_split(checkpoint: str, manifest: str, split: str, cfg: C.EvaluateConfig) -> dict:
    """Scores of every video in ``split``: {"video_id", "patient_id", "label", "score", "top_frames"}, manifest
    order, and "scoring": the line saying how (:func:`describe`).

    Ray Data batch inference on actors holding the model (GPU actors when the cluster has GPUs).
    The ``unlabeled`` split is refused (a ManifestError): its videos have no label to score against.
    """
    check_labeled_split(split, manifest)
    rows = read_manifest(manifest, split=split)
    if len(rows) == 0:
        raise JobError(f"{manifest}: split {split!r} is empty; nothing to evaluate")
    train_cfg = check_checkpoint(checkpoint, cfg)
    t0 = time.perf_counter()
    # Frames are prepared the way the model was trained on them (stored size, size, T), and chosen as the
    # finetune loop's validation chose them (evaluate.frames / evaluate.clips).
    scored = score_rows(checkpoint, rows, train_cfg.data, cfg.frames, cfg.clips)
    out = {
        "video_id": [],
        "patient_id": [],
        "label": [],
        "score": [],
        "top_frames": [],
        "scoring": describe(cfg, train_cfg.data.num_frames),
    }
    for i in sorted(scored):
        out["video_id"].append(str(rows["video_id"].iloc[i]))
        out["patient_id"].append(str(rows["patient_id"].iloc[i]))
        out["label"].append(int(rows["label"].iloc[i]))
        out["score"].append(scored[i][0])
        out["top_frames"].append(scored[i][1])
    log.info(
        "scored %d/%d videos of split %r in %.1f s (%s)",
        len(out["score"]),
        len(rows),
        split,
        time.perf_counter() - t0,
        out["scoring"],
    )
    if not out["score"]:
        raise JobError(f"{manifest}: no video of split {split!r} could be decoded")
    return out
