"""Augmentation on the training worker's device, in batch, with per-sample random draws.

The paper augments with a random combination of flip, crop, scale, brightness,
contrast and elastic deformation. Decode tasks hand over uint8 frames at a stored
size a little above the training size (``DataConfig.stored_size``); this module
turns a batch of them into normalised float tensors in a few fused passes:

1. one sampling grid per image = random resized crop (area share ``scale``, aspect
   ``ratio`` log-uniform, position uniform) x horizontal flip + a smooth elastic
   displacement (a coarse random field, bilinearly upsampled, applied with
   probability ``elastic_p``);
2. one ``grid_sample`` on the stored channels (one for grayscale B-mode);
3. brightness (x * b) and contrast (blend with the image mean by c), clamped to
   [0, 1], then normalised with ``MEAN`` / ``STD``, in one elementwise pass;
4. a grayscale batch is expanded to 3 channels last (a view: the encoder and the
   torchvision baselines keep their 3-channel stems and ImageNet-shaped weights).

Parameter ranges (today's, as the per-image torchvision v2 path had them):

=====================  =============================  =============================
draw                   finetune (one per clip)        SimCLR (one per image, view)
=====================  =============================  =============================
crop area share        U(crop_scale_min=0.5, 1)       U(simclr_scale_min=0.2, 1)
crop aspect            log-U(3/4, 4/3)                log-U(3/4, 4/3)
horizontal flip        p = 0.5                        p = 0.5
brightness factor      U(0.8, 1.2)                    U(0.6, 1.4)
contrast factor        U(0.8, 1.2)                    U(0.6, 1.4)
elastic                p = 0.2, alpha 30, sigma 5     p = 0.5, alpha 30, sigma 5
=====================  =============================  =============================

Elastic: torchvision's ``ElasticTransform(alpha, sigma)`` blurs a uniform field with a
Gaussian of ``sigma`` px and scales it by ``alpha / size``. Here the field lives on a
coarse grid with nodes ``2 * sigma`` px apart (the blur's correlation length) and is
upsampled bilinearly; the node amplitude is set so the displacement has the same
standard deviation as torchvision's (about half a pixel at alpha 30, sigma 5).

Why not a library: kornia 0.9 with per-sample draws ran 8.6k images/s at batch 128 on
an H200 (16.4k at 512), which alone would cap a 7.3k images/s SimCLR step near 0.55x;
the fused version measured there ran 392k images/s. kornia stays the reference in the
tests (same parameter distributions, output statistics compared).

Random draws come from a counter-based hash of (seed, epoch, video, view, frame) on
the device (:func:`sample_keys`, :func:`uniform`): no generator state, no host sync,
the same numbers whichever worker or process handles a video, and traceable by
``torch.compile`` (so the augmentation can run inside the compiled step). The part shared by
a batch, (seed, epoch), is hashed once per epoch in Python (:func:`epoch_key`); the steps pass
it as a one-element tensor and hash video, view and frame inside the compiled graph
(:func:`keys_at`, :func:`simclr_views`): no extra kernel launches per step, no recompiles per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Grey level statistics of B-mode ultrasound in [0, 1], rounded; simple on purpose.
MEAN = 0.5
STD = 0.25

# ---------------------------------------------------------------- counter-based random numbers

_M32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B  # "lowbias32" (C. Wellons), a well-mixing 32-bit hash


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32 in int64, without int64 overflow (16-bit halves)."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mulmod32(x, _MUL1)
    x = x ^ (x >> 15)
    x = _mulmod32(x, _MUL2)
    return x ^ (x >> 16)


_GOLDEN = 0x9E3779B9


def combine(key: torch.Tensor | int, value: torch.Tensor | int) -> torch.Tensor | int:
    """A new 32-bit key from ``key`` and ``value`` (int64 tensors or Python ints, broadcast).

    Python ints stay Python ints (the same bits as the tensor hash), so the parts of a key that
    are the same for a whole batch (seed, epoch, view) cost no kernel launches.
    """
    if isinstance(value, int):
        mixed = _hash32_int(value + _GOLDEN)
    else:
        mixed = _hash32(torch.as_tensor(value).to(torch.int64) + _GOLDEN)
    if isinstance(key, int) and isinstance(mixed, int):
        return _hash32_int(key ^ mixed)
    return _hash32(key ^ mixed)


def epoch_key(seed: int, epoch: int) -> int:
    """The key of (seed, epoch) as a Python int: the part of :func:`sample_keys` shared by a batch."""
    return combine(_hash32_int(seed & _M32), epoch)


def keys_at(
    prefix: torch.Tensor | int, video: torch.Tensor, view: int = 0, slot: torch.Tensor | int = 0
) -> torch.Tensor:
    """(N,) int64 keys from an :func:`epoch_key` (an int, or an int64 tensor of it on the device:
    then a compiled step takes it as an input and does not recompile each epoch), video indices,
    the view and the slot. ``keys_at(epoch_key(s, e), v, w, f) == sample_keys(s, e, v, w, f)``."""
    key = combine(prefix, video.to(torch.int64))
    key = combine(key, view)
    return combine(key, slot)


def epoch_prefix(seed: int, epoch: int, device: torch.device | str) -> torch.Tensor:
    """:func:`epoch_key` as a (1,) int64 tensor on ``device``: what a step passes to :func:`keys_at`
    (a tensor input, so a compiled step does not recompile each epoch)."""
    return torch.tensor([epoch_key(seed, epoch)], dtype=torch.int64, device=device)


def sample_keys(
    seed: int, epoch: int, video: torch.Tensor, view: int = 0, slot: torch.Tensor | int = 0
) -> torch.Tensor:
    """(N,) int64 keys, one per sample, from (seed, epoch, video index, view, slot).

    slot: the frame's index in its source video for SimCLR images, 0 for a finetuning
    clip (its T frames share the key, hence one draw).
    """
    return keys_at(epoch_key(seed, epoch), video, view, slot)


def _hash32_int(x: int) -> int:
    """``_hash32`` on one Python int (the same bits)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _MUL1) & _M32
    x ^= x >> 15
    x = (x * _MUL2) & _M32
    return x ^ (x >> 16)


def uniform(keys: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) keys -> (N, k) float32 uniform in [0, 1): draw j of sample i is hash(key_i, j).

    The counters' half of ``combine`` is hashed in Python and enters as a constant tensor:
    on an H100 with torch 2.11, Inductor fused ``arange(k) + 0x9E3779B9`` into a Triton kernel
    as int32 index arithmetic and failed ("Scalar 2654435769 is out of range for type int32").
    """
    counters = torch.tensor([_hash32_int(j + 0x9E3779B9) for j in range(k)], dtype=torch.int64, device=keys.device)
    bits = _hash32(keys[:, None] ^ counters[None, :]) >> 8  # (N, k), 24 random bits
    return bits.to(torch.float32) * (1.0 / (1 << 24))


# ---------------------------------------------------------------- the augmentation


@dataclass(frozen=True)
class AugmentSpec:
    """Ranges of one augmentation (see the table in the module docstring)."""

    size: int  # output side
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    elastic_p: float = 0.2
    elastic_alpha: float = 30.0
    elastic_sigma: float = 5.0

    @classmethod
    def finetune(cls, data) -> "AugmentSpec":
        """One draw per clip (``DataConfig``: size, crop_scale_min, elastic_p)."""
        return cls(data.size, scale=(data.crop_scale_min, 1.0), elastic_p=data.elastic_p)

    @classmethod
    def simclr(cls, data) -> "AugmentSpec":
        """Stronger, one draw per image and view (SimCLR's positive pair)."""
        return cls(
            data.size, scale=(data.simclr_scale_min, 1.0), brightness=0.4, contrast=0.4, elastic_p=data.simclr_elastic_p
        )

    @property
    def grid(self) -> int:
        """Nodes per side of the coarse elastic field: ``2 * sigma`` px apart."""
        return max(2, round(self.size / (2 * self.elastic_sigma)) + 1)

    @property
    def elastic_amplitude(self) -> float:
        """Node amplitude a (nodes ~ U(-a, a), normalised units) matching torchvision's displacement std:
        std(blur(U(-1, 1))) = (1/sqrt 3) / (2 sigma sqrt pi), times alpha / size; bilinear
        interpolation keeps 2/3 of the node std on average over a cell."""
        target = (1 / math.sqrt(3)) / (2 * self.elastic_sigma * math.sqrt(math.pi)) * self.elastic_alpha / self.size
        return math.sqrt(3) * target / (2 / 3)

    @property
    def draws(self) -> int:
        return 8 + 2 * self.grid * self.grid


def augment(frames: torch.Tensor, keys: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """uint8 frames (N, C, S, S) + keys (N,) -> float32 (N, 3, size, size), normalised.

    Samples with equal keys get equal draws (a clip's T frames: :func:`augment_clips`).
    """
    return _augment(frames, keys, spec, group=1)


def _augment(frames: torch.Tensor, keys: torch.Tensor, spec: AugmentSpec, group: int) -> torch.Tensor:
    """uint8 (N, G*C, S, S): G images of C channels per sample sharing one draw (a clip's frames)
    -> float32 (N*G, 3, size, size). One sampling grid per sample, applied to all its G*C channels
    by one ``grid_sample``: a clip's frames cost one grid, not T."""
    n = frames.shape[0]
    c = frames.shape[1] // group
    size = spec.size
    u = uniform(keys, spec.draws)  # (N, draws)

    # Random resized crop as an affine map of the output grid into the input, in [-1, 1] units.
    area = spec.scale[0] + (spec.scale[1] - spec.scale[0]) * u[:, 0]  # (N,)
    log_r = math.log(spec.ratio[0]) + (math.log(spec.ratio[1]) - math.log(spec.ratio[0])) * u[:, 1]
    ratio = torch.exp(log_r)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width as a share of the frame
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)  # crop centre, anywhere the crop fits
    cy = (1 - h) * (2 * u[:, 3] - 1)
    flip = torch.where(u[:, 4] < spec.flip_p, -1.0, 1.0)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * flip, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)  # (N, size, size, 2)

    if spec.elastic_p > 0:
        g = spec.grid
        field = (2 * u[:, 8:].view(n, 2, g, g) - 1) * spec.elastic_amplitude  # (N, 2, g, g)
        on = (u[:, 7] < spec.elastic_p).to(field.dtype)[:, None, None, None]
        # The field displaces the cropped image: scale it into input units by the crop's extent.
        extent = torch.stack([w, h], 1)[:, :, None, None]  # (N, 2, 1, 1)
        field = field * on * extent
        disp = F.interpolate(field, size=(size, size), mode="bilinear", align_corners=True)  # (N, 2, size, size)
        grid = grid + disp.permute(0, 2, 3, 1)

    x = F.grid_sample(frames.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x.view(n, group, c, size, size) * (1.0 / 255)  # in [0, 1]
    b = (1 - spec.brightness + 2 * spec.brightness * u[:, 5])[:, None, None, None, None]
    ct = (1 - spec.contrast + 2 * spec.contrast * u[:, 6])[:, None, None, None, None]
    x = (x * b).clamp(0, 1)
    mean = x.mean(dim=(2, 3, 4), keepdim=True)  # per image, as torchvision's adjust_contrast
    x = (ct * x + (1 - ct) * mean).clamp(0, 1)
    x = ((x - MEAN) * (1.0 / STD)).view(n * group, c, size, size)
    return x.expand(-1, 3, -1, -1) if c == 1 else x


def simclr_views(
    images: torch.Tensor, prefix: torch.Tensor | int, video: torch.Tensor, slot: torch.Tensor, spec: AugmentSpec
) -> torch.Tensor:
    """uint8 images (n, C, S, S) -> (2n, 3, size, size): view 1 of every image, then view 2.

    Keys of (epoch ``prefix``, video, view, frame ``slot``): every image and view its own draw.
    Meant to run inside the compiled step, keys included (no extra kernel launches per step).
    """
    keys = torch.cat([keys_at(prefix, video, view, slot) for view in (1, 2)])
    return augment(images.repeat(2, 1, 1, 1), keys, spec)


def resize_normalize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation: uint8 frames (N, C, S, S) -> float32 (N, 3, size, size), resized and normalised."""
    x = frames.float() * (1.0 / 255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - MEAN) * (1.0 / STD)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def augment_clips(clips: torch.Tensor, keys: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """uint8 clips (B, T, C, S, S) + one key per clip (B,) -> (B, T, 3, size, size): one draw per clip,
    one sampling grid per clip (its T frames sampled as channels of one ``grid_sample``)."""
    b, t = clips.shape[:2]
    out = _augment(clips.flatten(1, 2), keys, spec, group=t)  # (B*T, 3, size, size)
    return out.view(b, t, *out.shape[1:])


def resize_clips(clips: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 clips (B, T, C, S, S) -> (B, T, 3, size, size) for evaluation."""
    b, t = clips.shape[:2]
    out = resize_normalize(clips.flatten(0, 1), size)
    return out.view(b, t, *out.shape[1:])
