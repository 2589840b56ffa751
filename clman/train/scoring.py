"""Evaluation as Ray Data batch inference: decode tasks feed actors that hold the model.

The one place videos are scored for ``jobs.evaluate``, ``jobs.demo`` and the study's trials
(:func:`score_split`, :func:`score_rows`); the metrics, report and plots they write are
:func:`clman.report.write_evaluation`.

    manifest rows ─from_items─▶ map_batches(decode, tasks): uint8 frames at the stored size
                 ─▶ map_batches(Scorer, actor pool; a GPU each when the cluster has GPUs)
                 ─▶ {video_index, score, top_frames}

A cluster's driver usually has no GPU, and scoring in it moved every decoded frame
to the driver; here the frames go from the decode tasks to the scoring actors
through the object store, and only three numbers per video come back.
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
from clman.data.sampling import segment_indices
from clman.data.video import VideoError
from clman import storage
from clman.errors import JobError

log = logging.getLogger(__name__)
TOP_FRAMES = 3


def _decode(batch: dict[str, np.ndarray], size: int, num_frames: int, whole: bool) -> dict[str, np.ndarray]:
    """One video per batch: all its frames (up to the cap) or T segment centres; nothing when it fails."""
    uri, n = str(batch["uri"][0]), int(batch["num_frames"][0])
    idx = F.whole_video_indices(n) if whole else segment_indices(n, num_frames, train=False)
    try:
        frames = F.decode_stored(uri, idx, size)  # (N, C, S, S) uint8
    except (VideoError, storage.StorageError) as err:
        log.warning("skipping clip %s: %s", uri, err)
        return {"frames": np.zeros((0, 1, 1, 1, 1), np.uint8), "frame_idx": np.zeros((0, 1), np.int64),
                "video_index": np.zeros((0,), np.int64)}
    return {"frames": frames[None], "frame_idx": idx[None], "video_index": batch["video_index"]}


class Scorer:
    """An actor holding the classifier: uint8 frames -> P(malignant) and the most-weighted frames."""

    def __init__(self, checkpoint: str):
        from clman.inference import load_classifier

        torch.set_num_threads(1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.cfg = load_classifier(checkpoint, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from clman.inference import score_frames

        scores, tops = [], []
        for frames, idx in zip(batch["frames"], batch["frame_idx"]):
            pred = score_frames(self.model, torch.from_numpy(np.asarray(frames)), np.asarray(idx),
                                self.cfg.data.size, self.device)
            top = pred.top_frames(TOP_FRAMES)
            scores.append(pred.score)
            tops.append(np.asarray(top + [-1] * (TOP_FRAMES - len(top)), np.int64))
        return {"video_index": np.asarray(batch["video_index"], np.int64),
                "score": np.asarray(scores, np.float64),
                "top_frames": np.stack(tops) if tops else np.zeros((0, TOP_FRAMES), np.int64)}


def score_rows(checkpoint: str, rows, data, whole: bool, decode_cpus: float = 0.5) -> dict[int, tuple]:
    """{row position: (score, top_frames)} for every row of ``rows`` that decoded.

    ``data``: the checkpoint's DataConfig (stored size, T). One scoring actor per GPU of
    the cluster (at most one per video), else one CPU actor.
    """
    gpus = int(ray.cluster_resources().get("GPU", 0))
    items = [{"uri": str(r.uri), "num_frames": int(r.num_frames), "video_index": i}
             for i, r in enumerate(rows.itertuples(index=False))]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(_decode, batch_size=1, num_cpus=decode_cpus,
                        fn_kwargs={"size": data.stored_size, "num_frames": data.num_frames, "whole": whole})
    actors = max(1, min(gpus, len(items)))
    resources = {"num_gpus": 1} if gpus else {"num_cpus": decode_cpus}
    ds = ds.map_batches(Scorer, fn_constructor_kwargs={"checkpoint": checkpoint}, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=actors), **resources)
    out = {}
    for row in ds.iter_rows():
        out[int(row["video_index"])] = (float(row["score"]), [int(t) for t in row["top_frames"] if t >= 0])
    return out


def score_split(checkpoint: str, manifest: str, split: str, cfg: C.EvaluateConfig) -> dict:
    """Scores of every video in ``split``: {"video_id", "patient_id", "label", "score", "top_frames"}, manifest order.

    Ray Data batch inference on actors holding the model (GPU actors when the cluster has GPUs).
    The ``unlabeled`` split is refused (a ManifestError): its videos have no label to score against.
    """
    from clman.inference import load_classifier

    check_labeled_split(split, manifest)
    rows = read_manifest(manifest, split=split)
    if len(rows) == 0:
        raise JobError(f"{manifest}: split {split!r} is empty; nothing to evaluate")
    _, train_cfg = load_classifier(checkpoint)  # fails here, in one line, on a bad checkpoint
    t0 = time.perf_counter()
    # Frames are prepared the way the model was trained on them (stored size, size, T).
    scored = score_rows(checkpoint, rows, train_cfg.data, whole=cfg.frames == "all")
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
