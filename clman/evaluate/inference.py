"""A trained CLMAN classifier applied to videos: scores and the frames that weighed most.

Shared by ``jobs.evaluate`` (over a manifest split) and ``jobs.predict`` (over
files given on the command line, no cluster needed). A video is scored as one clip
(:func:`score_frames`) or as the mean P(malignant) of K clips (:func:`score_clips`,
the ``evaluate.frames=clips`` protocol of ``clman.data.sampling``); the finetune loop's
validation averages its clips with the same :func:`mean_log_probs`.

What a deployed model carries beside its weights (``extra`` of the classifier checkpoint, written
by the finetune loop at every saved epoch, so ``model.pt`` holds the kept epoch's):
``threshold`` (:func:`choose_threshold`: the score threshold reaching ``evaluate.target_sensitivity``
on the validation videos, with the sensitivity / specificity it gave there) and ``preprocessing``
(:func:`preprocessing`: how a video becomes the model's input). :func:`stored_threshold` and
:func:`stored_preprocessing` read them back; a model.pt written before them has neither, and
``jobs.predict`` then falls back to :data:`DEFAULT_THRESHOLD`, saying so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from clman import checkpoint as ckpt
from clman import config as C
from clman.data import augment
from clman.data.augment import resize_clips
from clman.data.frames import MAX_CACHED_FRAMES
from clman.models.build import classifier_from

DEFAULT_THRESHOLD = 0.5  # what predict applies to a model.pt without a stored threshold (and says so)


@dataclass(frozen=True)
class Prediction:
    score: float  # P(malignant)
    frame_weight: np.ndarray  # (T,) mean attention weight per frame (sums to 1 for mma); uniform otherwise
    frame_index: np.ndarray  # (T,) index of each scored frame in the source video

    def top_frames(self, k: int = 3) -> list[int]:
        order = np.argsort(-self.frame_weight, kind="stable")[:k]
        return [int(self.frame_index[i]) for i in order]


def load_classifier(uri: str, device: torch.device | str = "cpu", state: dict | None = None):
    """(model in eval mode, its FinetuneConfig) from a classifier checkpoint (``state``: its contents, read already)."""
    state = ckpt.load_checkpoint(uri) if state is None else state
    if state.get("kind") != "classifier":
        raise ckpt.CheckpointError(
            f"{uri}: a {state.get('kind')!r} checkpoint; evaluate/predict need a finetuned classifier "
            "(the model.pt written by jobs.finetune)"
        )
    cfg = C.from_dict("finetune", state["config"])
    model = classifier_from(cfg.model)
    ckpt.load_model_state(model, state["model"], what=f"classifier checkpoint {uri}")
    return model.to(device).eval(), cfg


@torch.no_grad()
def score_frames(
    model, frames: torch.Tensor, frame_idx: np.ndarray, size: int, device: torch.device | str = "cpu"
) -> Prediction:
    """One video: uint8 frames (T, C, S, S) as decoded (``clman.data.frames``) -> its Prediction."""
    clip = resize_clips(frames.to(device)[None], size)  # (1, T, 3, size, size)
    mask = torch.ones(clip.shape[:2], dtype=torch.bool, device=device)
    return predict_clips(model, clip, mask, torch.as_tensor(frame_idx)[None])[0]


def mean_log_probs(logits: torch.Tensor, clips: int) -> torch.Tensor:
    """logits (B * K, 2) of K consecutive clips per video -> (B, 2) log of each video's mean class probabilities.

    exp(...)[:, 1] is the mean P(malignant) of a video's K clips; with K = 1 this is log_softmax.
    """
    logp = torch.log_softmax(logits.float(), dim=1)  # (B * K, 2)
    return torch.logsumexp(logp.reshape(-1, clips, 2), dim=1) - math.log(clips)  # (B, 2)


@torch.no_grad()
def score_clips(
    model, frames: torch.Tensor, frame_idx: np.ndarray, size: int, device: torch.device | str = "cpu"
) -> Prediction:
    """One video as K clips: uint8 frames (K, T, C, S, S), frame_idx (K, T) -> its Prediction.

    score: the mean P(malignant) of the K clips (:func:`mean_log_probs`); frame_weight: each
    clip's weights / K, summed over the clips a source frame is in (so they sum to 1 for mma);
    frame_index: the distinct source frames, ascending. K = 1 scores like :func:`score_frames`.
    """
    k, t = frames.shape[:2]
    clips = resize_clips(frames.to(device), size)  # (K, T, 3, size, size)
    logits, weights = model(clips, None, return_weights=True)  # (K, 2), (K, T, D) or None
    score = float(mean_log_probs(logits, k)[0, 1].exp())
    if weights is not None:
        w = weights.float().mean(dim=-1).cpu().numpy() / k  # (K, T) mean over feature dimensions
    else:
        w = np.full((k, t), 1.0 / (k * t))
    index, where = np.unique(np.asarray(frame_idx).ravel(), return_inverse=True)
    return Prediction(score, np.bincount(where, weights=w.ravel(), minlength=len(index)), index)


@torch.no_grad()
def predict_clips(model, clips: torch.Tensor, mask: torch.Tensor, frame_idx: torch.Tensor) -> list[Prediction]:
    """Score a batch: clips (B, T, C, H, W), mask (B, T) bool, frame_idx (B, T) source frame numbers."""
    logits, weights = model(clips, mask, return_weights=True)  # (B, 2), (B, T, D) or None
    scores = torch.softmax(logits.float(), dim=1)[:, 1]
    out = []
    for b in range(clips.shape[0]):
        valid = mask[b].bool()
        if weights is not None:
            w = weights[b].float().mean(dim=-1)[valid]  # (T_valid,) mean over feature dimensions
        else:
            w = torch.full((int(valid.sum()),), 1.0 / float(valid.sum()))
        out.append(Prediction(float(scores[b]), w.cpu().numpy(), frame_idx[b][valid].cpu().numpy()))
    return out


# ---------------------------------------------------------------- what a deployed model carries


def choose_threshold(scores, labels, target_sensitivity: float) -> dict | None:
    """The operating point to deploy: the highest score threshold whose sensitivity on these (validation)
    videos is at least ``target_sensitivity`` (``clman.metrics.specificity_at_sensitivity``, as the study's
    ``op_threshold``), and what it gave there. None when the videos hold one class only.

    {"value", "chosen_on": "validation", "target_sensitivity", "videos", "malignant", "sensitivity",
    "specificity"}: plain values, checkpoint-safe. Call a video malignant when its score >= value.
    """
    import warnings

    from clman.metrics import UndefinedMetricWarning, compute_metrics, specificity_at_sensitivity

    y = np.asarray(labels, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # one class: None says it
        spec, thr = specificity_at_sensitivity(scores, y, sensitivity=target_sensitivity)
    if math.isnan(thr):
        return None
    sens = compute_metrics(scores, y, threshold=thr)["sensitivity"]
    return {
        "value": float(thr),
        "chosen_on": "validation",
        "target_sensitivity": float(target_sensitivity),
        "videos": int(len(y)),
        "malignant": int(y.sum()),
        "sensitivity": float(sens),
        "specificity": float(spec),
    }


def describe_threshold(record: dict | None) -> str:
    """One line on where a threshold came from (``record``: :func:`choose_threshold`'s, None: the default)."""
    if record is None:
        return (
            f"threshold {DEFAULT_THRESHOLD:g}: the default; this model.pt stores no threshold chosen on "
            "validation (written before thresholds were stored, or finetuned without validation)"
        )
    return (
        f"threshold {record['value']:.4g}: chosen on the {record['videos']} validation videos "
        f"({record['malignant']} malignant) for {100 * record['target_sensitivity']:.0f}% sensitivity "
        f"(sensitivity {100 * record['sensitivity']:.1f}%, specificity {100 * record['specificity']:.1f}% "
        "there), not on the test split"
    )


def preprocessing(cfg: C.FinetuneConfig) -> dict:
    """How a video becomes the model's input, as training validated it: stored in model.pt, so that
    predict and an exported model need no config (plain values, checkpoint-safe)."""
    return {
        "decode": "frames to uint8, one channel when every frame is grey (B-mode), resized to stored_size",
        "stored_size": cfg.data.stored_size,
        "size": cfg.data.size,  # the model's input side
        "num_frames": cfg.data.num_frames,  # T
        "frames": cfg.val_frames,  # clips: K clips of T frames by segments; all: one clip of every frame
        "clips": cfg.val_clips,  # K
        "max_frames": MAX_CACHED_FRAMES,  # frames=all: at most this many (segment centres)
        "scale": 1.0 / 255,  # x * scale, bilinear antialiased resize to size, (x - mean) / std, grey -> 3 channels
        "mean": augment.MEAN,
        "std": augment.STD,
        "input": "float32 (B, T, 3, size, size)",
        "video_score": "mean P(malignant) of the video's K clips",
    }


def stored_threshold(state: dict) -> dict | None:
    """The threshold record a classifier checkpoint stores (:func:`choose_threshold`), or None."""
    record = (state.get("extra") or {}).get("threshold")
    return dict(record) if isinstance(record, dict) and record.get("value") is not None else None


def stored_preprocessing(state: dict) -> dict:
    """The preprocessing a classifier checkpoint stores; for one written before it, derived from its config."""
    stored = (state.get("extra") or {}).get("preprocessing")
    return dict(stored) if isinstance(stored, dict) else preprocessing(C.from_dict("finetune", state["config"]))


class ClipProbability(torch.nn.Module):
    """The classifier as deployed programs run it: float clips (B, T, 3, size, size), preprocessed as
    :func:`preprocessing` says (``resize_clips``) -> P(malignant) (B,). A video's score is the mean over its clips."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        logits = self.model(clips, None)  # (B, 2)
        return torch.softmax(logits.float(), dim=1)[:, 1]  # (B,)
