"""The paper's Table 4 comparison methods (and three newer torchvision ones) as clman classifiers.

Every baseline has VideoClassifier's interface, so the finetune loop, inference and
checkpoints treat all archs alike:

    forward(clips (B, T, C=3, H, W) float, mask (B, T) bool | None, return_weights=False)
        -> logits (B, 2), or (logits, None) with return_weights (no per-frame weights)

and none has an ``.encoder`` (there is no contrastive pretraining for them: the paper
trains them from the data alone). Padded frames (mask False) are zeroed on entry in
every arch, so what a padded frame holds, even NaN, never reaches the logits. Beyond
that, each family defines what padding means:

- 3-D networks (`Video3D`: r3d_18, mc3_18, r2plus1d_18, s3d, swin3d_t, p3d): a batch with
  padding is run clip by clip on each clip's valid frames, so a clip's logits are those
  of the clip without its padding, whatever else shares the batch (evaluation pads a
  batch to its longest video). Training batches come unpadded and run in one call.
  mvit_v2_s takes exactly 16 frames, so its padded frames stay in as zero frames.
- 2-D-per-frame networks (TSM, TIN, `clman.models.tsm.FrameResNet`): padded frames are
  zeroed again before every temporal shift / interlace, so they act like the zero
  padding at a clip's ends, and the clip's logits are the mean of its valid frames'
  logits (TSN's average consensus). Eval-mode logits of a clip with trailing padding
  equal those of the clip without it. In training mode BatchNorm's batch statistics
  include padded frames, as with any padded batch.
- TimeSformer: padded frames are never keys of the temporal attention and are left out
  of the class token's average over frames; the time embedding indexes a frame by its
  rank among the valid frames. Its logits equal those of the clip without the padding.

Facts that shaped this module (torch 2.14 / torchvision 0.29, measured on the CPU):
- torchvision's S3D ends in a fixed AvgPool3d((2, 7, 7)), so it rejects anything under
  13 frames or 209 px. `ClippedAvgPool3d` takes its place: the same window where the
  feature map is large enough (identical outputs for every input torchvision accepts),
  the whole map where it is smaller; S3D's pooling then allows 5 frames and 17 px. We
  require 6 frames: at T = 5 (batch >= 2) the backward of its first conv (7x1x1, stride 2)
  corrupts the heap on the CPU (oneDNN in torch 2.14; every other T in 1..40 is fine).
- mvit_v2_s builds its token grid for 16 x 224 x 224 at construction (thw is fixed in
  its forward), so other clip sizes are refused here with one line.
- r3d_18 / mc3_18 / r2plus1d_18 / swin3d_t zero-pad (convolutions) or pad to the window
  (swin), so they run on any T >= 1 and any H, W >= 1; their temporal receptive fields
  exceed a short clip, which is then seen with zero frames around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clman.models.aggregators import check_mask

TORCHVISION_3D = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d", "swin3d_t", "mvit_v2_s")


def check_clips(clips: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate (B, T, 3, H, W) float clips; return them with padded frames zeroed, and the (B, T) mask."""
    if clips.ndim != 5 or clips.shape[2] != 3:
        raise ValueError(f"clips must be (B, T, C=3, H, W), got {tuple(clips.shape)}")
    if not clips.is_floating_point():
        raise ValueError(f"clips must be a float tensor, got {clips.dtype}")
    b, t = clips.shape[:2]
    if t == 0:
        raise ValueError(f"clips must have at least one frame (T >= 1), got {tuple(clips.shape)}")
    mask = check_mask(mask, b, t, clips.device)
    clips = clips.masked_fill(~mask[:, :, None, None, None], 0.0)  # padded frames may hold anything, even NaN
    return clips, mask


class ClippedAvgPool3d(nn.Module):
    """AvgPool3d(kernel, stride=1) whose window is clipped to the feature map's size.

    Equal to nn.AvgPool3d(kernel, stride=1) whenever the map is at least the kernel;
    on a smaller map it averages the whole extent of the too-small dimensions.
    """

    def __init__(self, kernel_size: tuple[int, int, int]):
        super().__init__()
        self.kernel_size = tuple(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        kernel = tuple(min(k, s) for k, s in zip(self.kernel_size, x.shape[2:]))
        return F.avg_pool3d(x, kernel, stride=1)


class Video3D(nn.Module):
    """A network over the clip as one (B, C, T, H, W) volume, as a clman classifier.

    `net` maps (B, 3, T, H, W) to (B, 2). `min_frames` / `min_size` are the smallest
    T and H, W it runs on; `fixed` = (T, H, W) for a network that takes one size only.
    """

    def __init__(
        self,
        net: nn.Module,
        name: str,
        min_frames: int = 1,
        min_size: int = 1,
        fixed: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        self.net = net
        self.name = name
        self.min_frames, self.min_size, self.fixed = min_frames, min_size, fixed

    def forward(self, clips: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        clips, mask = check_clips(clips, mask)  # (B, T, C, H, W), padded frames zeroed
        if self.fixed is None and not bool(mask.all()):  # CPU-GPU sync; only padded (evaluation) batches loop
            logits = torch.cat([self._logits(clip[valid][None]) for clip, valid in zip(clips, mask)])
        else:
            logits = self._logits(clips)  # (B, 2)
        return (logits, None) if return_weights else logits

    def _logits(self, clips: torch.Tensor) -> torch.Tensor:
        t, (h, w) = clips.shape[1], clips.shape[3:]
        if self.fixed is not None and (t, h, w) != self.fixed:
            raise ValueError(
                f"{self.name} takes clips of exactly T x H x W = {' x '.join(map(str, self.fixed))} "
                f"(set data.num_frames and data.size), got {t} x {h} x {w}"
            )
        if t < self.min_frames or min(h, w) < self.min_size:
            raise ValueError(
                f"{self.name} needs clips of at least {self.min_frames} frames and {self.min_size} px, "
                f"got {t} frames of {h} x {w}"
            )
        return self.net(clips.transpose(1, 2))  # (B, C, T, H, W) -> (B, 2)


def torchvision_video(arch: str) -> Video3D:
    """A torchvision.models.video network, random init (weights=None), 2-class head."""
    from torchvision.models import video

    if arch == "r3d_18":  # Tran et al. 2018: 3x3x3 convs throughout
        return Video3D(video.r3d_18(weights=None, num_classes=2), arch)
    elif arch == "mc3_18":  # Tran et al. 2018: 3-D convs in the stem and layer1, 2-D (1x3x3) above
        return Video3D(video.mc3_18(weights=None, num_classes=2), arch)
    elif arch == "r2plus1d_18":  # Tran et al. 2018: each 3x3x3 conv factored into 1x3x3 then 3x1x1
        return Video3D(video.r2plus1d_18(weights=None, num_classes=2), arch)
    elif arch == "s3d":  # Xie et al. 2018: separable 3-D Inception
        net = video.s3d(weights=None, num_classes=2)
        net.avgpool = ClippedAvgPool3d(net.avgpool.kernel_size)  # see the module docstring
        return Video3D(net, arch, min_frames=6, min_size=17)
    elif arch == "swin3d_t":  # Liu et al. 2022: Video Swin Transformer, tiny
        return Video3D(video.swin3d_t(weights=None, num_classes=2), arch)
    elif arch == "mvit_v2_s":  # Li et al. 2022: MViTv2, small; its token grid is fixed at 16 x 224 x 224
        return Video3D(video.mvit_v2_s(weights=None, num_classes=2), arch, fixed=(16, 224, 224))
    else:
        raise ValueError(f"torchvision video arch must be one of {TORCHVISION_3D}, got {arch!r}")
