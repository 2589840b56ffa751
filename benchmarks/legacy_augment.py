"""The per-image CPU augmentation clman used before it augmented on the device (kept as the benchmarks' baseline).

The paper augments with a random combination of flip, crop, scale,
brightness, contrast and elastic deformation. For finetuning one random draw
is applied to every frame of a clip (a v2 transform samples its parameters
once per call, and a Video is one call), so the clip stays temporally
coherent. For SimCLR each frame gets two independent draws: the two views.
Outputs are float32, normalised with fixed per-channel constants: ultrasound
is grayscale (replicated to 3 channels), so ImageNet statistics do not apply.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

# Grey level statistics of B-mode ultrasound in [0, 1], rounded; simple on purpose.
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def to_video(frames: np.ndarray | torch.Tensor) -> tv_tensors.Video:
    """(T, H, W, 3) uint8 numpy (decord's layout) or (T, C, H, W) tensor -> Video (T, C, H, W)."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}")
        frames = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if frames.ndim != 4:
        raise ValueError(f"frames must be (T, C, H, W), got {tuple(frames.shape)}")
    return tv_tensors.Video(frames)


def _train_transform(
    size: int,
    scale: tuple[float, float],
    brightness: float,
    contrast: float,
    elastic_p: float,
    elastic_alpha: float,
    elastic_sigma: float,
) -> v2.Compose:
    steps = [
        # Crop first: everything after runs on the small image.
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.ColorJitter(brightness=brightness, contrast=contrast),
    ]
    if elastic_p > 0:
        steps.append(v2.RandomApply([v2.ElasticTransform(alpha=elastic_alpha, sigma=elastic_sigma)], p=elastic_p))
    steps.append(v2.Normalize(MEAN, STD))
    return v2.Compose(steps)


def _eval_transform(size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


class ClipAugment:
    """(T, H, W, 3) uint8 clip -> (T, C, size, size) float32, one random draw for all frames.

    ``train=False`` is resize + normalise only. Defaults are mild: a clip must
    keep its lesion (scale >= 0.6).
    """

    def __init__(
        self,
        size: int,
        train: bool,
        scale: tuple[float, float] = (0.6, 1.0),
        brightness: float = 0.2,
        contrast: float = 0.2,
        elastic_p: float = 0.2,
        elastic_alpha: float = 30.0,
        elastic_sigma: float = 5.0,
    ):
        self.size, self.train = size, train
        self.transform = (
            _train_transform(size, scale, brightness, contrast, elastic_p, elastic_alpha, elastic_sigma)
            if train
            else _eval_transform(size)
        )

    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        out = self.transform(to_video(frames))
        return out.as_subclass(torch.Tensor)  # (T, C, size, size) float32


class SimCLRAugment:
    """Frames (M, H, W, 3) uint8 -> two views, each (M, C, size, size) float32.

    Every frame and every view gets its own random draw (SimCLR's positive
    pair is two augmentations of one image). Stronger than ClipAugment.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        brightness: float = 0.4,
        contrast: float = 0.4,
        elastic_p: float = 0.5,
        elastic_alpha: float = 30.0,
        elastic_sigma: float = 5.0,
    ):
        self.size = size
        self.transform = _train_transform(size, scale, brightness, contrast, elastic_p, elastic_alpha, elastic_sigma)

    def __call__(self, frames: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        video = to_video(frames)  # (M, C, H, W)
        views = []
        for _ in range(2):
            views.append(
                torch.stack([self.transform(tv_tensors.Image(frame)).as_subclass(torch.Tensor) for frame in video])
            )  # (M, C, size, size)
        return views[0], views[1]
