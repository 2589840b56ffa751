"""Evaluation as Ray Data batch inference: decode tasks feed actors that hold the model.

The one place videos are scored for ``jobs.evaluate``, ``jobs.demo`` and the study's trials
(:func:`score_split`, :func:`score_splits`, :func:`score_rows`); the metrics, report and plots they write are
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
    """An actor holding one or more classifiers: a video's uint8 clips -> each one's P(malignant) (the mean
    over its clips) and most-weighted frames. Several models share one decode of every video
    (:func:`score_splits`: the demo's two runs); they must take the same frames (:func:`decode_key`)."""

    def __init__(self, checkpoints: tuple[str, ...]):
        from clman.evaluate.inference import load_classifier

        torch.set_num_threads(1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models = [load_classifier(c, self.device) for c in checkpoints]  # [(model, cfg)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from clman.evaluate.inference import score_clips

        scores, tops = [], []  # per video: (M,), (M, TOP_FRAMES)
        for frames, idx in zip(batch["frames"], batch["frame_idx"]):  # (K, T, C, S, S), (K, T): one video
            clips = torch.from_numpy(np.asarray(frames))
            preds = [score_clips(m, clips, np.asarray(idx), cfg.data.size, self.device) for m, cfg in self.models]
            scores.append([p.score for p in preds])
            tops.append([_padded(p.top_frames(TOP_FRAMES)) for p in preds])
        m = len(self.models)
        return {
            "video_index": np.asarray(batch["video_index"], np.int64),
            "score": np.asarray(scores, np.float64).reshape(-1, m),
            "top_frames": np.asarray(tops, np.int64).reshape(-1, m, TOP_FRAMES),
        }


def _padded(top: list[int]) -> list[int]:
    return top + [-1] * (TOP_FRAMES - len(top))


def decode_key(data) -> tuple:
    """What the decode step takes of a run's DataConfig: models agreeing on it can share one decode."""
    return (data.stored_size, data.num_frames)


def score_rows(checkpoint: str, rows, data, frames: str, clips: int, decode_cpus: float = 0.5) -> dict[int, tuple]:
    """{row position: (score, top_frames)} for every row of ``rows`` that decoded.

    ``data``: the checkpoint's DataConfig (stored size, T). ``frames`` / ``clips``: the scoring
    protocol (``evaluate.frames`` / ``evaluate.clips``; :func:`scored_indices`). One scoring
    actor per GPU of the cluster (at most one per video), else one CPU actor.
    """
    return score_rows_of((checkpoint,), rows, data, frames, clips, decode_cpus)[0]


def score_rows_of(checkpoints, rows, data, frames: str, clips: int, decode_cpus: float = 0.5) -> list[dict[int, tuple]]:
    """:func:`score_rows` for several checkpoints at once, each video decoded once: one dict per checkpoint."""
    checkpoints = tuple(checkpoints)
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
        fn_constructor_kwargs={"checkpoints": checkpoints},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        **resources,
    )
    out = [{} for _ in checkpoints]
    for row in progress.track(ds.iter_rows(), len(items), "scoring", unit="video"):  # a bar, or a line per 10%
        for m, (score, top) in enumerate(zip(row["score"], row["top_frames"])):
            out[m][int(row["video_index"])] = (float(score), [int(t) for t in top if t >= 0])
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
    return score_splits([checkpoint], manifest, split, cfg)[0]


def score_splits(checkpoints, manifest: str, split: str, cfg: C.EvaluateConfig) -> list[dict]:
    """:func:`score_split` of each checkpoint, in order; checkpoints that take the same frames
    (:func:`decode_key`: the demo's runs with and without CL) share one decode of each video."""
    check_labeled_split(split, manifest)
    rows = read_manifest(manifest, split=split)
    if len(rows) == 0:
        raise JobError(f"{manifest}: split {split!r} is empty; nothing to evaluate")
    train_cfgs = [check_checkpoint(c, cfg) for c in checkpoints]
    groups: dict[tuple, list[int]] = {}
    for i, train_cfg in enumerate(train_cfgs):
        groups.setdefault(decode_key(train_cfg.data), []).append(i)
    out: list[dict] = [{} for _ in checkpoints]
    for members in groups.values():
        t0 = time.perf_counter()
        # Frames are prepared the way the models were trained on them (stored size, size, T), and chosen as the
        # finetune loop's validation chose them (evaluate.frames / evaluate.clips).
        data = train_cfgs[members[0]].data
        scored_of = score_rows_of([checkpoints[i] for i in members], rows, data, cfg.frames, cfg.clips)
        for i, scored in zip(members, scored_of):
            out[i] = _in_manifest_order(rows, scored, describe(cfg, data.num_frames))
        first = out[members[0]]
        log.info(
            "scored %d/%d videos of split %r in %.1f s%s (%s)",
            len(first["score"]),
            len(rows),
            split,
            time.perf_counter() - t0,
            f" by {len(members)} models, each video decoded once" if len(members) > 1 else "",
            first["scoring"],
        )
        if not first["score"]:
            raise JobError(f"{manifest}: no video of split {split!r} could be decoded")
    return out


def _in_manifest_order(rows, scored: dict[int, tuple], scoring: str) -> dict:
    out = {"video_id": [], "patient_id": [], "label": [], "score": [], "top_frames": [], "scoring": scoring}
    for i in sorted(scored):
        out["video_id"].append(str(rows["video_id"].iloc[i]))
        out["patient_id"].append(str(rows["patient_id"].iloc[i]))
        out["label"].append(int(rows["label"].iloc[i]))
        out["score"].append(scored[i][0])
        out["top_frames"].append(scored[i][1])
    return out
