"""Synthetic breast-ultrasound sweeps: one B-mode video per lesion, benign or malignant.

A stand-in for the paper's private data set (268 sweeps, 152 malignant), good
enough to exercise the whole pipeline and to make frame aggregation matter.

Image model (all vectorised numpy over (T, H, W), float32)
-----------------------------------------------------------
- Tissue is a reflectivity map R in tissue coordinates: skin (bright entry line
  and dermis), subcutaneous fat (dark, lobular texture) crossed by Cooper's
  ligaments (thin bright arcs), fibroglandular tissue (bright, textured),
  retromammary fat and pectoralis muscle (striated) with a bright fascia.
  Layer boundaries undulate laterally and drift with the elevation of the scan
  plane.
- The lesion is a 3-D ellipsoid-ish body (semi-axes a lateral, b axial, c
  elevational) whose margin radius r(angle) carries harmonics (lobulation /
  irregularity) and narrow spikes (spiculation). Frame t cuts it at elevation
  y_t: the in-plane section scales by s_t = sqrt(1 - ((y_t - y0) / c)^2), so
  the lesion grows, shrinks and is absent in the first and last frames.
  Inside: a low echo level, heterogeneous for malignant cases. Around it: an
  optional echogenic halo. Below it: posterior enhancement or shadowing, an
  exponential of the lesion path length along each beam line
  (cumsum over depth), so it starts at the lesion and runs to the bottom.
  Malignant cases may carry microcalcifications: bright points at an elevation.
- Speckle: complex Gaussian scatterers weighted by sqrt(R), convolved with a
  separable Gaussian PSF (finer axially than laterally) by FFT; the envelope
  |.| is Rayleigh-distributed. Scatterers are a mix of a persistent field
  (fixed in tissue, rotating slowly to an independent one over the sweep) and
  a fresh field per frame, so speckle decorrelates partly from frame to frame.
- Depth gain: a residual exponential attenuation after an imperfect TGC, and
  a mild focal-zone brightening. Log compression to a dynamic range in dB.
- Probe jitter: a mean-reverting random walk of integer pixel shifts (lateral
  and axial) applied to everything in tissue coordinates.

Class features (per case, overlapping distributions; `DEFAULT_LESIONS`, `sample_case`)
--------------------------------------------------------------------------------------
====================  ================================  ==================================
feature               benign                            malignant
====================  ================================  ==================================
size (a, of width)    0.09-0.2                          0.09-0.2
aspect (b / a)        lognormal, median 0.62, sd 0.22   lognormal, median 1.5, sd 0.25
margin irregularity   0-0.06, harmonics 3-5             0.04-0.2, harmonics 3-8
                      (30 %: gentle 2-3 lobes)
spiculation           5 %: 1-3 short spikes             70 %: 4-14 spikes
edge blur (px @128)   0.6-1.5                           0.8-2.2
posterior (log gain)  N(+0.6, 0.45): enhancement        N(-0.9, 0.5): shadowing
heterogeneity         0-0.3                             0.2-0.8
echo level            0.004-0.08 (cyst to hypoechoic)   0.015-0.08  (gland 1, fat 0.1)
echogenic halo        10 %: 0.1-0.3                     60 %: 0.3-1.0
tilt                  N(0, 8 deg): parallel to skin     N(0, 15 deg)
microcalcifications   5 %: 1-3                          40 %: 3-10
====================  ================================  ==================================

In a share of malignant cases (`SynthConfig.focal_fraction`, default 30 %)
the lesion body is drawn benign-like, and the telling signs — spicules,
shadowing, halo, heterogeneity and calcifications — show only where the plane
passes a small elevation window (`focal_extent` of the sweep, ~10 of 48
frames) off the lesion's centre (`focal_offset`), so the key frame through
the widest section rarely shows them. A classifier that looks at a single
frame misses them; one that aggregates over the sweep can find them. Focal cases draw the body with
aspect median 0.85, benign irregularity and edge, posterior N(+0.1, 0.4) and
no halo; inside the window: 4-14 spikes, posterior N(-1.2, 0.4), halo 0.5-1.0,
heterogeneity 0.4-0.8.

Hard mode (`SynthConfig(difficulty="hard")`, `jobs.synth --difficulty hard`)
----------------------------------------------------------------------------
A second phantom, so that training presets are tuned on more than one kind of
data: class distributions that overlap (`HARD_LESIONS`), focal signs in half of
the malignant cases, more noise, and the formats and sizes of an export from
another scanner. The knobs it changes (SynthConfig, marked (*)) and the class
distributions:

====================  ================================  ==================================
knob                  default                           hard
====================  ================================  ==================================
frame size            128 x 128                         height 96 +-10 %, width 1.1-1.35 x
                                                        height, per case (~96 x 118)
frames per sweep      48                                22-38, per case
formats               H.264 .mp4                        mix of five: H.264 .mp4, MJPEG .avi,
                                                        FFV1 .mkv, MPEG-4 .avi and .mp4
                                                        (`FORMATS`)
videos per patient    1 (8 %: next case same patient)  2: the same lesion swept in two
                                                        orthogonal planes (`other_plane`)
focal malignant       30 %, window 0.2 of the sweep     50 %, window 1/3 of the sweep
speckle persistence   0.7                               0.5 (more frame-to-frame flicker)
probe jitter          0.8 px                            1.2 px
clutter               none                              near-field haze + reverberation, 0.4
electronic noise      none                              0.003 of the 99th percentile
gain drift            none                              1.5 dB std, slow, per frame
====================  ================================  ==================================

====================  ================================  ==================================
feature (hard)        benign                            malignant (focal: body / window)
====================  ================================  ==================================
aspect (b / a)        lognormal, median 0.75, sd 0.3    median 1.05, sd 0.3 (focal 0.85)
margin irregularity   0-0.09, harmonics 3-6             0.02-0.14, harmonics 3-8 (focal
                      (30 %: gentle 2-3 lobes)          benign-like; 10 % lobulated)
spiculation           15 %: 1-4 spikes, 0.1-0.35 r      45 %: 2-10 spikes, 0.15-0.55 r
                                                        (focal 70 %, in the window)
edge blur (px @128)   0.6-1.9                           0.7-2.2 (focal 0.6-2.0)
posterior (log gain)  N(+0.4, 0.5)                      N(-0.6, 0.5) (focal N(+0.3, 0.5) /
                                                        N(-0.8, 0.5))
heterogeneity         0-0.5                             0.15-0.7 (focal 0-0.5 / 0.3-0.7)
echo level            0.004-0.08                        0.008-0.08 (focal 0.004-0.08)
echogenic halo        20 %: 0.1-0.6                     40 %: 0.2-0.8 (focal none / 0.3-0.8)
tilt                  N(0, 10 deg)                      N(0, 14 deg)
microcalcifications   12 %: 1-4                         30 %: 2-8
====================  ================================  ==================================

Measured on 2000 `sample_case` draws (seed 5), AUC of each true parameter alone,
signs at their most telling over the sweep (default phantom in brackets):
aspect 0.72 (0.95), margin irregularity 0.66 (0.84), spicule count 0.75 (0.90),
posterior shadowing 0.94 (0.99), heterogeneity 0.83 (0.98), halo 0.80 (0.85),
edge blur 0.60 (0.73), echo level 0.55 (0.66); a logistic regression on all of
them (5-fold) 0.99 (1.00): the class is there, and no sign but shadowing comes
near giving it away. Shadowing is as telling as in the other generator of issue 13
(0.93 alone there). It was 0.82 at first (posterior N(+0.3, 0.6) / N(-0.3, 0.6),
focal N(+0.2, 0.5) / N(-0.6, 0.5)), and then nothing learnt this phantom at `make
demo`'s size: trained on the 128 training videos of a demo data set (seeds 0 and 1),
the 10-epoch demo recipe reached AUC 0.53 and 0.48 on 400 held-out hard sweeps and
the issue's own probe (single frames, AdamW, 30 epochs; 0.73 on that generator)
0.58 and 0.49; now the probe reaches 0.71 (docs/recipes.md).
Writing 200 hard cases (`jobs.synth --difficulty hard --workers 2`) took 24 s on
2 shared cores (0.19 s/case rendering, 0.03 s/case encoding, 19 MB); every file
decodes with decord and PyAV and goes through `clman.data.ingest` without a reject.

Frame geometry: pixels are square and lengths are in image widths, so a wide
frame images less depth (a shallower depth setting): the lesion's depth range
scales with height / width. A patient's sweeps share frame size and lesion depth.

Determinism: case `index` of a data set with seed `seed` draws everything from
`np.random.default_rng([seed, index])` (a later sweep of a patient also draws its
lesion from the patient's first case's generator), so its frames and video bytes
are the same in any process, worker count or order (Matroska is written bitexact;
otherwise its segment UID is random). Labels, patients and formats come from
`plan_cases(n, seed, cfg)`. Knobs that a config leaves at "off" take no random
draws, so the default data set is the same bytes as before hard mode existed.
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import scipy.fft

logger = logging.getLogger(__name__)

PAPER_CASES = 268
PAPER_MALIGNANT = 152


# -- class distributions -------------------------------------------------------------
@dataclass(frozen=True)
class LesionKind:
    """Distributions of one kind of lesion body: one column of a class-feature table above."""

    aspect: tuple[float, float]  # b / a: lognormal (median, sd of the log), clipped to 0.35-2
    lobulated: float  # chance of 2-3 gentle lobes (harmonics 2, 3; amplitude 0.04-0.11)
    irregularity: tuple[float, float]  # uniform: amplitude scale of the margin harmonics
    harmonics: tuple[int, ...]  # orders k of those harmonics
    spiculated: float  # chance of spicules
    spicules: tuple[int, int]  # count, inclusive
    spicule_length: tuple[float, float]  # uniform, in margin radii
    edge_px: tuple[float, float]  # uniform, pixels at 128
    posterior: tuple[float, float]  # normal (mean, sd): log gain below, > 0 enhancement
    heterogeneity: tuple[float, float]  # uniform
    halo: float  # chance of an echogenic halo
    halo_strength: tuple[float, float]  # uniform
    tilt_deg: float  # sd of the long axis' angle to the skin
    level: tuple[float, float]  # log-uniform echo level (gland 1, fat 0.1)
    calcs: float  # chance of microcalcifications
    calc_count: tuple[int, int]  # inclusive


@dataclass(frozen=True)
class LesionModel:
    """Benign, malignant and focal-malignant bodies, and the signs inside a focal window."""

    benign: LesionKind
    malignant: LesionKind
    focal: LesionKind  # the body of a focal malignant case: drawn benign-like
    sign_posterior: tuple[float, float]  # normal
    sign_halo: tuple[float, float]  # uniform
    sign_heterogeneity: tuple[float, float]  # uniform


# The first table of the module docstring. Draws with chance 0 or 1 take no random
# number, so these reproduce the default data set draw for draw.
DEFAULT_LESIONS = LesionModel(
    benign=LesionKind(
        aspect=(0.62, 0.22),
        lobulated=0.3,
        irregularity=(0.0, 0.06),
        harmonics=(3, 4, 5),
        spiculated=0.05,
        spicules=(1, 3),
        spicule_length=(0.1, 0.25),
        edge_px=(0.6, 1.5),
        posterior=(0.6, 0.45),
        heterogeneity=(0.0, 0.3),
        halo=0.1,
        halo_strength=(0.1, 0.3),
        tilt_deg=8.0,
        level=(0.004, 0.08),
        calcs=0.05,
        calc_count=(1, 3),
    ),
    malignant=LesionKind(
        aspect=(1.5, 0.25),
        lobulated=0.0,
        irregularity=(0.04, 0.2),
        harmonics=(3, 4, 5, 6, 7, 8),
        spiculated=0.7,
        spicules=(4, 14),
        spicule_length=(0.25, 0.7),
        edge_px=(0.8, 2.2),
        posterior=(-0.9, 0.5),
        heterogeneity=(0.2, 0.8),
        halo=0.6,
        halo_strength=(0.3, 1.0),
        tilt_deg=15.0,
        level=(0.015, 0.08),
        calcs=0.4,
        calc_count=(3, 10),
    ),
    focal=LesionKind(
        aspect=(0.85, 0.22),
        lobulated=0.3,
        irregularity=(0.0, 0.06),
        harmonics=(3, 4, 5),
        spiculated=1.0,
        spicules=(4, 14),
        spicule_length=(0.25, 0.7),
        edge_px=(0.6, 1.8),
        posterior=(0.1, 0.4),
        heterogeneity=(0.0, 0.3),
        halo=0.0,
        halo_strength=(0.0, 0.0),
        tilt_deg=8.0,
        level=(0.004, 0.08),
        calcs=0.4,
        calc_count=(3, 10),
    ),
    sign_posterior=(-1.2, 0.4),
    sign_halo=(0.5, 1.0),
    sign_heterogeneity=(0.4, 0.8),
)

# The hard table of the module docstring: every feature overlaps between the classes.
HARD_LESIONS = LesionModel(
    benign=LesionKind(
        aspect=(0.75, 0.3),
        lobulated=0.3,
        irregularity=(0.0, 0.09),
        harmonics=(3, 4, 5, 6),
        spiculated=0.15,
        spicules=(1, 4),
        spicule_length=(0.1, 0.35),
        edge_px=(0.6, 1.9),
        posterior=(0.4, 0.5),
        heterogeneity=(0.0, 0.5),
        halo=0.2,
        halo_strength=(0.1, 0.6),
        tilt_deg=10.0,
        level=(0.004, 0.08),
        calcs=0.12,
        calc_count=(1, 4),
    ),
    malignant=LesionKind(
        aspect=(1.05, 0.3),
        lobulated=0.1,
        irregularity=(0.02, 0.14),
        harmonics=(3, 4, 5, 6, 7, 8),
        spiculated=0.45,
        spicules=(2, 10),
        spicule_length=(0.15, 0.55),
        edge_px=(0.7, 2.2),
        posterior=(-0.6, 0.5),
        heterogeneity=(0.15, 0.7),
        halo=0.4,
        halo_strength=(0.2, 0.8),
        tilt_deg=14.0,
        level=(0.008, 0.08),
        calcs=0.3,
        calc_count=(2, 8),
    ),
    focal=LesionKind(
        aspect=(0.85, 0.3),
        lobulated=0.3,
        irregularity=(0.0, 0.09),
        harmonics=(3, 4, 5, 6),
        spiculated=0.7,
        spicules=(2, 10),
        spicule_length=(0.15, 0.55),
        edge_px=(0.6, 2.0),
        posterior=(0.3, 0.5),
        heterogeneity=(0.0, 0.5),
        halo=0.0,
        halo_strength=(0.0, 0.0),
        tilt_deg=10.0,
        level=(0.004, 0.08),
        calcs=0.3,
        calc_count=(2, 8),
    ),
    sign_posterior=(-0.8, 0.5),
    sign_halo=(0.3, 0.8),
    sign_heterogeneity=(0.3, 0.7),
)


def lesion_model(difficulty: str) -> LesionModel:
    if difficulty == "default":
        return DEFAULT_LESIONS
    elif difficulty == "hard":
        return HARD_LESIONS
    raise ValueError(f"unknown difficulty {difficulty!r}; valid: {sorted(DIFFICULTY_KNOBS)}")


# -- video formats ----------------------------------------------------------------
# name: (extension, PyAV container, encoder, pixel format, encoder options). Without an
# explicit qmin/qmax, mjpeg and mpeg4 run at 200 kb/s (mean |decoded - frames| ~10 on
# 96x118 phantom frames: blocks everywhere). Tried and left out, with PyAV 18.1:
# VP9 (libvpx fails to open, EINVAL, once decord's bundled FFmpeg is loaded, which
# clman.data.video does) and HEVC (libx265 corrupts the heap on 48x48 frames).
FORMATS = {
    "h264-mp4": (".mp4", "mp4", "libx264", "yuv420p", {}),  # clman.data.video.encode_mp4
    "mjpeg-avi": (".avi", "avi", "mjpeg", "yuvj420p", {"qmin": "4", "qmax": "6"}),
    "ffv1-mkv": (".mkv", "matroska", "ffv1", "gray", {"threads": "1"}),  # lossless
    "mpeg4-avi": (".avi", "avi", "mpeg4", "yuv420p", {"qmin": "4", "qmax": "6", "bf": "0"}),
    "mpeg4-mp4": (".mp4", "mp4", "mpeg4", "yuv420p", {"qmin": "4", "qmax": "6", "bf": "0"}),
}

# What each difficulty gives the SynthConfig knobs left None (the module docstring's tables).
DIFFICULTY_KNOBS = {
    "default": dict(
        size=128,
        size_jitter=0.0,
        frame_aspect=(1.0, 1.0),
        frames=48,
        frames_jitter=0,
        formats=("h264-mp4",),
        focal_fraction=0.3,
        focal_extent=0.2,
        videos_per_patient=1,
        repeat_patient_prob=0.08,
        speckle_persistence=0.7,
        jitter_px=0.8,
        clutter=0.0,
        noise_floor=0.0,
        frame_gain_db=0.0,
    ),
    "hard": dict(
        size=96,
        size_jitter=0.1,
        frame_aspect=(1.1, 1.35),
        frames=30,
        frames_jitter=8,
        formats=tuple(FORMATS),
        focal_fraction=0.5,
        focal_extent=1 / 3,
        videos_per_patient=2,
        repeat_patient_prob=0.0,
        speckle_persistence=0.5,
        jitter_px=1.2,
        clutter=0.4,
        noise_floor=0.003,
        frame_gain_db=1.5,
    ),
}


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the synthetic data set (defaults: the paper's size and class balance).

    difficulty: "default" or "hard" (module docstring). It picks the class
        distributions and the values of the knobs marked (*) that are left None:
        "default / hard" below. dataclasses.replace(cfg, difficulty="hard") keeps
        cfg's knobs as they are; build SynthConfig(difficulty="hard", ...) instead.
    size (*): frame height in pixels (even, >= 32), 128 / 96. Pixel-scale
        features (PSF, edge blur, halo width) scale with the width / 128.
    size_jitter (*): per-case frame height drawn in size x (1 +- size_jitter),
        rounded to even, 0 / 0.1.
    frame_aspect (*): (low, high) of the per-case frame width / height (width
        rounded to even), (1, 1) / (1.1, 1.35). Pixels stay square: a wide frame
        images less depth (lengths are in widths), as a shallower depth setting.
    frames (*): frames per sweep, 48 / 30.
    frames_jitter (*): per-case frame count drawn in frames +- frames_jitter, 0 / 8.
    formats (*): video formats, one per case (a balanced, seeded mix), names
        of `FORMATS`: ("h264-mp4",) / all five.
    fps: frame rate written to the videos.
    crf, gop: H.264 quality and keyframe interval (short GOP: cheap random access);
        gop is also the keyframe interval of mpeg4.
    malignant_fraction: share of malignant patients, 152 / 268 as in the paper.
    focal_fraction (*): share of malignant cases whose signs show only in a few
        frames (0 makes every malignant case obvious in all lesion frames), 0.3 / 0.5.
    focal_extent (*): width (full width at half maximum) of the elevation window
        where focal signs show, as a fraction of the sweep (0.2 ~ 10 of 48 frames), 0.2 / 1/3.
    focal_offset: (low, high) distance of that window's centre from the lesion
        centre, in elevational semi-axes, to either side. Off-centre windows keep
        the signs out of the middle frames, where a single-frame reader looks
        ((0, 0.5) puts them anywhere near the centre, and a middle frame shows
        them in ~40 % of focal cases).
    videos_per_patient (*): consecutive cases sharing a patient, label and lesion:
        later ones sweep the lesion in the orthogonal plane, 1 / 2.
    repeat_patient_prob (*): chance that a patient is the previous patient again
        (possibly with another lesion and label), 0.08 / 0.
    speckle_persistence (*): share of speckle variance fixed in tissue between
        consecutive frames (0 = fresh speckle each frame, 1 = frozen), 0.7 / 0.5.
    sweep_decorrelation: how far the persistent speckle rotates to an
        independent field over the whole sweep (1 = fully independent at the end).
    jitter_px (*): probe jitter, std of the per-frame shift step in pixels at 128, 0.8 / 1.2.
    clutter (*): near-field haze and reverberation bands of the subcutaneous
        interface, in reflectivity units (fat 0.1, gland 1), 0 / 0.4.
    noise_floor (*): electronic noise, mean intensity as a fraction of the sweep's
        99th-percentile tissue intensity, 0 / 0.003 (about -25 dB).
    frame_gain_db (*): std of a slow per-frame gain drift in dB (probe contact), 0 / 1.5.
    dynamic_range_db: log-compression range mapped to 0..255.
    sweep_overshoot: (low, high) of the sweep half-range over the lesion's
        elevation semi-axis; > 1 leaves frames without lesion at both ends.
    visible_section: lesion frames are those whose section scale s_t is at
        least this (the `visible` mask).
    """

    difficulty: str = "default"
    size: int | None = None
    size_jitter: float | None = None
    frame_aspect: tuple[float, float] | None = None
    frames: int | None = None
    frames_jitter: int | None = None
    formats: tuple[str, ...] | None = None
    fps: float = 15.0
    crf: int = 20
    gop: int = 8
    malignant_fraction: float = PAPER_MALIGNANT / PAPER_CASES
    focal_fraction: float | None = None
    focal_extent: float | None = None
    focal_offset: tuple[float, float] = (0.45, 0.7)
    videos_per_patient: int | None = None
    repeat_patient_prob: float | None = None
    speckle_persistence: float | None = None
    sweep_decorrelation: float = 1.0
    jitter_px: float | None = None
    clutter: float | None = None
    noise_floor: float | None = None
    frame_gain_db: float | None = None
    dynamic_range_db: float = 40.0
    sweep_overshoot: tuple[float, float] = (1.3, 1.8)
    visible_section: float = 0.3

    def __post_init__(self):
        if self.difficulty not in DIFFICULTY_KNOBS:
            raise ValueError(f"SynthConfig.difficulty={self.difficulty!r}: must be one of {sorted(DIFFICULTY_KNOBS)}")
        for name, value in DIFFICULTY_KNOBS[self.difficulty].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: resolve once, here
        if isinstance(self.formats, str):
            object.__setattr__(self, "formats", (self.formats,))
        smallest = self.size * (1 - self.size_jitter)
        checks = [
            (self.size % 2 == 0 and smallest >= 32, "size", "an even integer >= 32 (also after size_jitter)"),
            (0.0 <= self.size_jitter < 0.5, "size_jitter", "in [0, 0.5)"),
            (0.5 <= self.frame_aspect[0] <= self.frame_aspect[1] <= 2.0, "frame_aspect", "0.5 <= low <= high <= 2"),
            (self.frames - self.frames_jitter >= 2, "frames", ">= 2 (also after frames_jitter)"),
            (self.frames_jitter >= 0, "frames_jitter", ">= 0"),
            (
                len(self.formats) > 0 and all(f in FORMATS for f in self.formats),
                "formats",
                f"a non-empty tuple of {list(FORMATS)}",
            ),
            (self.fps > 0, "fps", "> 0"),
            (0 <= self.crf <= 51, "crf", "in [0, 51]"),
            (self.gop >= 1, "gop", ">= 1"),
            (0.0 <= self.malignant_fraction <= 1.0, "malignant_fraction", "in [0, 1]"),
            (0.0 <= self.focal_fraction <= 1.0, "focal_fraction", "in [0, 1]"),
            (0.0 < self.focal_extent <= 1.0, "focal_extent", "in (0, 1]"),
            (0.0 <= self.focal_offset[0] <= self.focal_offset[1] <= 1.0, "focal_offset", "0 <= low <= high <= 1"),
            (self.videos_per_patient >= 1, "videos_per_patient", ">= 1"),
            (0.0 <= self.repeat_patient_prob < 1.0, "repeat_patient_prob", "in [0, 1)"),
            (0.0 <= self.speckle_persistence <= 1.0, "speckle_persistence", "in [0, 1]"),
            (0.0 <= self.sweep_decorrelation <= 1.0, "sweep_decorrelation", "in [0, 1]"),
            (0.0 <= self.jitter_px <= 4.0, "jitter_px", "in [0, 4]"),
            (0.0 <= self.clutter <= 2.0, "clutter", "in [0, 2]"),
            (0.0 <= self.noise_floor <= 0.1, "noise_floor", "in [0, 0.1]"),
            (0.0 <= self.frame_gain_db <= 6.0, "frame_gain_db", "in [0, 6]"),
            (10.0 <= self.dynamic_range_db <= 90.0, "dynamic_range_db", "in [10, 90]"),
            (1.0 <= self.sweep_overshoot[0] <= self.sweep_overshoot[1], "sweep_overshoot", "1 <= low <= high"),
            (0.0 < self.visible_section < 1.0, "visible_section", "in (0, 1)"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ValueError(f"SynthConfig.{name}={getattr(self, name)!r}: must be {allowed}")


@dataclass(frozen=True)
class CaseParams:
    """One lesion and its surroundings, drawn by `sample_case`. Lengths are in
    units of the image width (x lateral, z depth, y elevation)."""

    label: int  # 0 benign, 1 malignant
    focal: bool  # malignant signs only in an elevation window
    # lesion body
    x0: float
    z0: float
    a: float  # lateral semi-axis
    aspect: float  # b / a: > 1 is taller-than-wide
    c: float  # elevational semi-axis
    tilt: float  # radians, 0 = long axis parallel to the skin
    y0: float  # elevation of the lesion centre
    harmonics: tuple[tuple[int, float, float, float], ...]  # (k, amplitude, phase, phase drift per unit y)
    spicules: tuple[tuple[float, float, float], ...]  # (angle, length / radius, angular width)
    edge_px: float
    level: float  # lesion reflectivity (tissue ~0.3 fat, ~0.8 gland)
    heterogeneity: float
    halo: float  # echogenic halo strength (0 = none)
    halo_px: float
    posterior: float  # log gain below the lesion: > 0 enhancement, < 0 shadow
    calcs: tuple[tuple[float, float, float], ...]  # (u, v, y) in lesion units / elevation
    # Focal cases: signs in an elevation window at y_sign (others: sign_* == the plain values).
    sign_posterior: float  # posterior log gain inside the window
    sign_halo: float
    sign_heterogeneity: float
    y_sign: float
    # tissue
    z_skin: float
    z_fat_gland: float
    z_gland_retro: float
    layer_waves: tuple[tuple[float, float, float, float], ...]  # (amplitude, cycles, phase, drift) x 6
    ligaments: tuple[tuple[float, float, float, float], ...]  # (centre x, half-width, height frac, drift)
    attenuation: float  # residual after TGC, per unit depth
    focus_z: float
    gain_db: float
    psf_ax_px: float
    psf_lat_px: float
    overshoot: float
    # frame geometry (cfg.size, cfg.size, cfg.frames unless the config varies them)
    height: int
    width: int
    frames: int


@dataclass
class SynthCase:
    """A rendered sweep: frames (T, H, W) uint8, per-frame masks (T,) bool, and stats.

    stats: label, focal, aspect_ratio (mean lesion-mask height / width over
    near-full sections, > 1 = taller-than-wide), visible_frames, sign_frames,
    posterior (mean log gain below the lesion over lesion frames), spicules.
    """

    frames: np.ndarray
    visible: np.ndarray  # lesion section present (s_t >= visible_section)
    signs: np.ndarray  # malignant signs visible in this frame
    params: CaseParams
    stats: dict = field(default_factory=dict)


# -- drawing case parameters -----------------------------------------------------
def _frame_geometry(rng: np.random.Generator, cfg: SynthConfig) -> tuple[int, int, int]:
    """(height, width, frames) of one case; no draws when the config fixes them."""
    height = cfg.size
    if cfg.size_jitter:
        height = 2 * round(cfg.size * rng.uniform(1 - cfg.size_jitter, 1 + cfg.size_jitter) / 2)
    lo, hi = cfg.frame_aspect
    width = 2 * round(height * (lo if lo == hi else rng.uniform(lo, hi)) / 2)
    frames = cfg.frames
    if cfg.frames_jitter:
        frames += int(rng.integers(-cfg.frames_jitter, cfg.frames_jitter + 1))
    return int(height), int(width), int(frames)


def sample_case(label: int, rng: np.random.Generator, cfg: SynthConfig) -> CaseParams:
    """Draw one case's lesion and tissue from the class's (overlapping) distributions."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (benign) or 1 (malignant), got {label!r}")
    malignant = label == 1
    height, width, frames = _frame_geometry(rng, cfg)
    focal = malignant and rng.random() < cfg.focal_fraction
    model = lesion_model(cfg.difficulty)
    kind = model.focal if focal else model.malignant if malignant else model.benign

    def chance(p: float) -> bool:
        # No draw when certain either way: keeps the default data set's draws as they were.
        return p >= 1.0 or (p > 0.0 and rng.random() < p)

    depth = height / width  # image depth in widths (square pixels)
    a = rng.uniform(0.09, 0.2)
    aspect = math.exp(rng.normal(math.log(kind.aspect[0]), kind.aspect[1]))
    aspect = float(np.clip(aspect, 0.35, 2.0))
    b = min(a * aspect, 0.26 * min(depth, 1.0))  # tall lesions shrink to stay in the field of view
    a = b / aspect
    z_skin = rng.uniform(0.035, 0.06)
    z_fat_gland = rng.uniform(0.16, 0.3)
    z_gland_retro = rng.uniform(0.68, 0.95)
    z_lo = max(z_fat_gland, z_skin + 1.2 * b + 0.03)
    z0 = rng.uniform(z_lo, max(z_lo + 0.02, 0.8 * depth - 1.1 * b))

    harmonics = []
    if chance(kind.lobulated):  # macrolobulated (fibroadenoma-like)
        for k in (2, 3):
            harmonics.append((k, rng.uniform(0.04, 0.11), rng.uniform(0, 2 * math.pi), rng.normal(0, 4)))
    irregularity = rng.uniform(*kind.irregularity)
    for k in kind.harmonics:
        amp = irregularity * rng.uniform(0.3, 1.0) / math.sqrt(k / 3)
        harmonics.append((k, amp, rng.uniform(0, 2 * math.pi), rng.normal(0, 8)))

    spicules = ()
    if chance(kind.spiculated):
        n = int(rng.integers(kind.spicules[0], kind.spicules[1] + 1))
        spicules = tuple(
            (rng.uniform(-math.pi, math.pi), rng.uniform(*kind.spicule_length), rng.uniform(0.04, 0.09))
            for _ in range(n)
        )

    edge_px = rng.uniform(*kind.edge_px)
    posterior = rng.normal(*kind.posterior)
    heterogeneity = rng.uniform(*kind.heterogeneity)
    halo = rng.uniform(*kind.halo_strength) if chance(kind.halo) else 0.0
    tilt = math.radians(rng.normal(0, kind.tilt_deg))
    level = math.exp(rng.uniform(math.log(kind.level[0]), math.log(kind.level[1])))

    c = a * rng.uniform(0.8, 1.3)
    y0 = rng.uniform(-0.15, 0.15) * c
    u = rng.uniform(-1.0, 1.0)  # one draw: side and distance of the sign window
    lo, hi = cfg.focal_offset
    y_sign = y0 + math.copysign(lo + (hi - lo) * abs(u), u) * c
    n_calcs = int(rng.integers(kind.calc_count[0], kind.calc_count[1] + 1)) if chance(kind.calcs) else 0
    calc_list = []
    for _ in range(n_calcs):
        r, t = 0.75 * math.sqrt(rng.random()), rng.uniform(-math.pi, math.pi)
        # Focal cases keep their calcifications inside the sign window.
        y = y_sign + rng.normal(0, 0.15 * c) if focal else y0 + rng.uniform(-0.7, 0.7) * c
        calc_list.append((r * math.cos(t), r * math.sin(t), y))

    layer_waves = tuple(
        (rng.uniform(0.005, 0.03), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * math.pi), rng.normal(0, 6))
        for _ in range(6)
    )
    ligaments = tuple(
        (rng.uniform(-0.1, 1.1), rng.uniform(0.08, 0.25), rng.uniform(0.4, 0.95), rng.normal(0, 0.5))
        for _ in range(int(rng.integers(3, 7)))
    )
    return CaseParams(
        label=label,
        focal=bool(focal),
        x0=rng.uniform(0.3, 0.7),
        z0=z0,
        a=a,
        aspect=aspect,
        c=c,
        tilt=tilt,
        y0=y0,
        harmonics=tuple(harmonics),
        spicules=spicules,
        edge_px=edge_px,
        level=level,
        heterogeneity=heterogeneity,
        halo=halo,
        halo_px=rng.uniform(2.0, 5.0),
        posterior=posterior,
        calcs=tuple(calc_list),
        sign_posterior=rng.normal(*model.sign_posterior) if focal else posterior,
        sign_halo=rng.uniform(*model.sign_halo) if focal else halo,
        sign_heterogeneity=rng.uniform(*model.sign_heterogeneity) if focal else heterogeneity,
        y_sign=y_sign,
        z_skin=z_skin,
        z_fat_gland=z_fat_gland,
        z_gland_retro=z_gland_retro,
        layer_waves=layer_waves,
        ligaments=ligaments,
        attenuation=rng.uniform(-0.3, 1.0),
        focus_z=rng.uniform(0.3, 0.6),
        gain_db=rng.uniform(-3.0, 3.0),
        psf_ax_px=rng.uniform(0.7, 1.0),
        psf_lat_px=rng.uniform(1.4, 2.1),
        overshoot=rng.uniform(*cfg.sweep_overshoot),
        height=height,
        width=width,
        frames=frames,
    )


def other_plane(lesion: CaseParams, view: CaseParams, rng: np.random.Generator) -> CaseParams:
    """The same lesion swept in the orthogonal plane, in the tissue and probe of `view`.

    Frame size and lesion depth are the first sweep's (one scanner preset per patient);
    the frame count, position, tilt, tissue layers and probe motion are the view's.
    Its lateral and elevational semi-axes swap (the depth b stays), so the aspect
    ratio changes by a / c; margin phases and spicule directions are redrawn (another
    cut through the same shape); everything that makes the class is kept: irregularity
    amplitudes, spicule count and lengths, echo, posterior, halo, heterogeneity,
    calcifications and, for focal cases, the signs and the window's side and distance.
    """
    b = lesion.a * lesion.aspect
    a, c = lesion.c, lesion.a
    to_view = c / lesion.c  # elevations in lesion semi-axes, carried to the new c
    return replace(
        view,
        label=lesion.label,
        focal=lesion.focal,
        a=a,
        aspect=b / a,
        c=c,
        z0=lesion.z0,
        z_skin=lesion.z_skin,
        z_fat_gland=lesion.z_fat_gland,
        height=lesion.height,
        width=lesion.width,
        harmonics=tuple((k, amp, rng.uniform(0, 2 * math.pi), drift) for k, amp, _, drift in lesion.harmonics),
        spicules=tuple((rng.uniform(-math.pi, math.pi), length, width) for _, length, width in lesion.spicules),
        edge_px=lesion.edge_px,
        level=lesion.level,
        heterogeneity=lesion.heterogeneity,
        halo=lesion.halo,
        halo_px=lesion.halo_px,
        posterior=lesion.posterior,
        calcs=tuple((cu, cv, view.y0 + (cy - lesion.y0) * to_view) for cu, cv, cy in lesion.calcs),
        sign_posterior=lesion.sign_posterior,
        sign_halo=lesion.sign_halo,
        sign_heterogeneity=lesion.sign_heterogeneity,
        y_sign=view.y0 + (lesion.y_sign - lesion.y0) * to_view,
    )


# -- rendering ------------------------------------------------------------------
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _complex_normal(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """Unit-variance circular complex Gaussian, complex64."""
    pairs = rng.standard_normal((*shape, 2), dtype=np.float32)
    pairs *= np.float32(math.sqrt(0.5))
    return pairs.view(np.complex64)[..., 0]  # (re, im) pairs read as complex, no copy


def _smooth_fields(rng: np.random.Generator, k: int, shape: tuple, sigma_px: float) -> np.ndarray:
    """k Gaussian-smoothed noise fields (k, *shape), zero mean, unit std."""
    noise = rng.standard_normal((k, *shape), dtype=np.float32)
    fz = scipy.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = scipy.fft.fftfreq(shape[1]).astype(np.float32)[None, :]
    kernel = np.exp(-2 * math.pi**2 * sigma_px**2 * (fz**2 + fx**2))
    fields = scipy.fft.ifft2(scipy.fft.fft2(noise) * kernel).real.astype(np.float32)
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-6
    return fields


def _gain_drift(rng: np.random.Generator, frames: int, sd_db: float) -> np.ndarray:
    """Slow per-frame gain offsets in dB, (frames,) float32: a stationary AR(1) with std sd_db."""
    steps = rng.normal(0.0, sd_db * math.sqrt(1 - 0.8**2), frames)
    walk = np.zeros(frames)
    walk[0] = steps[0] / math.sqrt(1 - 0.8**2)
    for t in range(1, frames):
        walk[t] = 0.8 * walk[t - 1] + steps[t]
    return walk.astype(np.float32)


def _fast_padded(n: int, margin: int) -> int:
    """Smallest FFT-friendly length >= n + margin with an even pad on both sides."""
    m = n + margin
    while scipy.fft.next_fast_len(m) != m or (m - n) % 2:
        m += 1
    return m


def _jitter(rng: np.random.Generator, frames: int, step_px: float, limit: int) -> np.ndarray:
    """Mean-reverting random walk of integer pixel shifts, (frames,) int."""
    steps = rng.normal(0.0, step_px, frames)
    walk = np.zeros(frames)
    for t in range(1, frames):  # T scalar steps, not a per-pixel loop
        walk[t] = 0.8 * walk[t - 1] + steps[t]
    return np.clip(np.round(walk), -limit, limit).astype(np.int64)


def render_case(p: CaseParams, cfg: SynthConfig, rng: np.random.Generator) -> SynthCase:
    """Render the sweep of one case: (T, H, W) uint8 frames plus per-frame masks and stats."""
    T, H, W = p.frames, p.height, p.width
    scale = W / 128.0  # pixels per image width / 128; pixels are square, depth is H / W widths
    psf_ax, psf_lat = p.psf_ax_px * scale, p.psf_lat_px * scale
    # Circular FFT convolution wraps within the pad only; the padded sizes are FFT-friendly.
    margin = 2 * int(math.ceil(4 * psf_lat)) + 4
    Hp, Wp = _fast_padded(H, margin), _fast_padded(W, margin)
    pad, padx = (Hp - H) // 2, (Wp - W) // 2  # rows, columns
    J = int(math.ceil(4 * cfg.jitter_px * scale)) + 1  # largest jitter shift
    Hg, Wg = Hp + 2 * J, Wp + 2 * J  # tissue grid: the frame plus room to jitter

    # Probe motion: elevation sweep and in-plane jitter.
    y_half = p.c * p.overshoot
    y = np.linspace(-y_half, y_half, T).astype(np.float32)  # (T,) plane elevation
    dz = _jitter(rng, T, cfg.jitter_px * scale * 0.5, J)  # axial jitter is smaller (probe pressure)
    dx = _jitter(rng, T, cfg.jitter_px * scale, J)
    rows_px = np.arange(Hp, dtype=np.float32) - pad
    cols_px = np.arange(Wp, dtype=np.float32) - padx
    Z = (rows_px[None, :, None] + dz.astype(np.float32)[:, None, None]) / W  # (T, Hp, 1) depth, in widths
    X = (cols_px[None, None, :] + dx.astype(np.float32)[:, None, None]) / W  # (T, 1, Wp) lateral
    yy = y[:, None, None]  # (T, 1, 1)

    def crop(fields: np.ndarray) -> np.ndarray:
        """Tissue-fixed fields (K, Hg, Wg) -> what each jittered frame sees (K, T, Hp, Wp)."""
        out = np.empty((fields.shape[0], T, Hp, Wp), fields.dtype)
        for t in range(T):  # one window copy per frame
            r0, c0 = J + dz[t], J + dx[t]
            out[:, t] = fields[:, r0 : r0 + Hp, c0 : c0 + Wp]
        return out

    # Elevation blend: the persistent fields rotate towards independent ones over the sweep.
    theta = (0.5 * math.pi * cfg.sweep_decorrelation * np.linspace(0, 1, T)).astype(np.float32)[:, None, None]
    cos_t, sin_t = np.cos(theta), np.sin(theta)

    # Tissue texture (fat lobules, glandular texture, lesion heterogeneity): (5, T, Hp, Wp).
    tex = crop(
        np.concatenate(
            [
                _smooth_fields(rng, 2, (Hg, Wg), 5.0 * scale),
                _smooth_fields(rng, 2, (Hg, Wg), 1.8 * scale),
                _smooth_fields(rng, 1, (Hg, Wg), 2.5 * scale),
            ]
        )
    )
    fat_tex = cos_t * tex[0] + sin_t * tex[1]
    gland_tex = cos_t * tex[2] + sin_t * tex[3]
    het_tex = tex[4]

    # Layers: boundaries undulate in x and drift with elevation. (T, 1, Wp) each.
    def boundary(base: float, waves) -> np.ndarray:
        out = np.full(X.shape, base, np.float32)
        for amp, cycles, phase, drift in waves:
            out = out + amp * np.sin(2 * math.pi * cycles * X + phase + drift * yy)
        return out

    z_fg = boundary(p.z_fat_gland, p.layer_waves[:3])
    z_gr = boundary(p.z_gland_retro, p.layer_waves[3:])
    z_pm = z_gr + 0.06
    s_skin = _sigmoid((Z - p.z_skin) / 0.006)
    s_fg = _sigmoid((Z - z_fg) / 0.012)
    s_gr = _sigmoid((Z - z_gr) / 0.012)
    s_pm = _sigmoid((Z - z_pm) / 0.006)
    fat = 0.1 * np.exp(0.5 * fat_tex)
    gland = np.exp(0.45 * gland_tex + 0.35 * fat_tex)  # fibrous strands and fat islands
    septa = np.sin(2 * math.pi * 28.0 * (Z - 0.12 * X)) ** 2
    muscle = 0.15 * (1.0 + 3.0 * (septa * septa) ** 2)  # bright fibre septa (sin^8)
    R = s_fg * (gland * (1 - s_gr) + s_gr * (0.1 * (1 - s_pm) + s_pm * muscle)) + (1 - s_fg) * fat
    R = R * s_skin + (1 - s_skin) * 0.8
    R = R + 4.0 * np.exp(-(((Z - 0.012) / 0.008) ** 2))  # skin entry line
    R = R + 1.5 * np.exp(-(((Z - z_pm) / 0.005) ** 2))  # pectoral fascia

    # Cooper's ligaments: bright arcs from the gland surface towards the skin, in the fat only.
    rows = int(min(Hp, (float(z_fg.max()) * W + pad + J + 2)))
    Zf, fat_weight = Z[:, :rows], s_skin[:, :rows] * (1 - s_fg[:, :rows])
    lig = np.zeros((T, rows, Wp), np.float32)
    for cx, half_w, height, drift in p.ligaments:
        rel = (X - (cx + drift * yy)) / half_w
        curve = z_fg - height * (z_fg - p.z_skin) * (1 - rel**2)
        lig += np.where(np.abs(rel) < 1, np.exp(-(((Zf - curve) / 0.006) ** 2)), 0.0)
    R[:, :rows] += 2.5 * np.minimum(lig, 1.0) * fat_weight

    # Lesion section in frame t: scale s_t of the in-plane ellipse.
    s = np.sqrt(np.clip(1 - ((y - p.y0) / p.c) ** 2, 0, None)).astype(np.float32)  # (T,)
    sign_w = np.ones(T, np.float32)
    if p.focal:
        fwhm = cfg.focal_extent * 2 * y_half
        sign_w = np.exp(-4 * math.log(2) * ((y - p.y_sign) / fwhm) ** 2).astype(np.float32)
    b = p.a * p.aspect
    ddx, ddz = X - p.x0, Z - p.z0
    u = (ddx * math.cos(p.tilt) + ddz * math.sin(p.tilt)) / p.a
    v = (-ddx * math.sin(p.tilt) + ddz * math.cos(p.tilt)) / b
    rho = np.sqrt(u**2 + v**2)  # (T, Hp, Wp), 1 = the full-size margin
    ang = np.arctan2(v, u)
    # Margin radius as a table over angle per frame: (T, NB), looked up per pixel.
    NB = 360
    phi = np.linspace(-math.pi, math.pi, NB, endpoint=False, dtype=np.float32)[None, :]
    yt = y[:, None]
    r_tab = np.ones((T, NB), np.float32)
    for k, amp, phase, drift in p.harmonics:
        r_tab += amp * np.cos(k * phi + phase + drift * yt)
    spike_gain = sign_w[:, None] if p.focal else 1.0
    for angle, length, width in p.spicules:
        dphi = np.angle(np.exp(1j * (phi - angle))).astype(np.float32)
        r_tab += spike_gain * length * np.exp(-((dphi / width) ** 2))
    idx = ((ang + math.pi) * (NB / (2 * math.pi))).astype(np.int64) % NB
    r = np.take_along_axis(r_tab, idx.reshape(T, -1), axis=1).reshape(ang.shape)
    px_per_unit = math.sqrt(p.a * b) * W  # pixels per unit of rho, roughly
    d_px = (rho - s[:, None, None] * r) * px_per_unit  # > 0 outside the margin
    fade = np.clip(s / 0.15, 0, 1)[:, None, None]  # no half-lit dot where the plane grazes the tip
    m = _sigmoid(-d_px / (p.edge_px * scale)) * fade  # (T, Hp, Wp) lesion occupancy

    het = p.heterogeneity + (p.sign_heterogeneity - p.heterogeneity) * sign_w
    inside = p.level * np.exp(0.9 * het[:, None, None] * het_tex)
    R = R * (1 - m) + inside * m
    halo_strength = (p.halo + (p.sign_halo - p.halo) * sign_w)[:, None, None]
    hw = p.halo_px * scale
    R = R + 2.0 * halo_strength * fade * np.exp(-(((d_px - hw / 2) / (hw / 2)) ** 2))

    # Posterior enhancement / shadowing along each beam line (image columns).
    post = (p.posterior + (p.sign_posterior - p.posterior) * sign_w)[:, None, None]
    path = np.cumsum(m, axis=1) / (2 * b * W)  # lesion path length above, in lesion depths
    R = R * np.exp(post * np.minimum(path, 1.0))

    # Depth gain: residual attenuation after TGC, mild focal-zone brightening.
    R = R * np.exp(-p.attenuation * Z) * (1 + 0.3 * np.exp(-(((Z - p.focus_z) / 0.15) ** 2)))
    if cfg.clutter:
        # Near-field haze, and reverberation between the probe and the subcutaneous interface
        # (echoes at 2, 3, 4 times its depth); they fill dark lesions and shadows near the top.
        haze = np.exp(-Z / 0.12)
        reverb = sum(0.6**k * np.exp(-(((Z - k * p.z_skin) / 0.006) ** 2)) for k in (2, 3, 4))
        R = R + np.float32(cfg.clutter) * (haze + reverb)
    R = np.maximum(R, 1e-4)

    # Speckle: persistent (tissue-fixed, slowly rotating) + fresh scatterers, weighted by sqrt(R).
    persistent = crop(_complex_normal(rng, (2, Hg, Wg)))
    keep = math.sqrt(cfg.speckle_persistence)
    scat = keep * (cos_t * persistent[0] + sin_t * persistent[1])
    scat += math.sqrt(1 - cfg.speckle_persistence) * _complex_normal(rng, (T, Hp, Wp))
    field_ = np.sqrt(R) * scat
    if p.calcs:  # microcalcifications: strong point reflectors where the plane passes them
        for cu, cv, cy in p.calcs:
            hit = np.abs(y - cy) < 0.012 + 0.02 * p.c
            if not hit.any():
                continue
            xc = p.x0 + cu * p.a * math.cos(p.tilt) - cv * b * math.sin(p.tilt)
            zc = p.z0 + cu * p.a * math.sin(p.tilt) + cv * b * math.cos(p.tilt)
            ts = np.flatnonzero(hit)
            ii = np.clip(np.round(zc * W + pad - dz[ts]).astype(np.int64), 0, Hp - 1)
            jj = np.clip(np.round(xc * W + padx - dx[ts]).astype(np.int64), 0, Wp - 1)
            field_[ts, ii, jj] += np.float32(5.0)
    fz = scipy.fft.fftfreq(Hp).astype(np.float32)[:, None]
    fx = scipy.fft.fftfreq(Wp).astype(np.float32)[None, :]
    psf = np.exp(-2 * math.pi**2 * ((psf_ax * fz) ** 2 + (psf_lat * fx) ** 2)).astype(np.float32)
    intensity = np.abs(scipy.fft.ifft2(scipy.fft.fft2(field_) * psf)) ** 2  # (T, Hp, Wp), Rayleigh envelope^2
    if cfg.noise_floor:  # electronic noise: white, after the beamformer, exponential intensity
        floor = np.float32(cfg.noise_floor * np.percentile(intensity[:, ::3, ::3], 99.0))
        intensity += floor * np.abs(_complex_normal(rng, (T, Hp, Wp))) ** 2
    # The display pixel integrates over a patch of speckle (the scanner's image is finer than 128 px):
    # a small Gaussian on the intensity lowers speckle contrast the way downsampling does.
    rfx = scipy.fft.rfftfreq(Wp).astype(np.float32)[None, :]
    blur = np.exp(-2 * math.pi**2 * (0.8 * scale) ** 2 * (fz**2 + rfx**2))
    intensity = scipy.fft.irfft2(scipy.fft.rfft2(intensity) * blur, s=(Hp, Wp))[:, pad : pad + H, padx : padx + W]

    # Log compression: white is 8 dB above the sweep's 99th percentile (bright speckle of gland).
    ref = np.percentile(intensity[:, ::3, ::3], 99.0) * 10 ** ((8.0 - p.gain_db) / 10)
    db = 10 * np.log10(np.maximum(intensity, 0) / ref + 1e-9)
    if cfg.frame_gain_db:
        db += _gain_drift(rng, T, cfg.frame_gain_db)[:, None, None]
    assert db.dtype == np.float32, f"render_case computed in {db.dtype}, expected float32 throughout"
    frames = np.clip((db + cfg.dynamic_range_db) * (255.0 / cfg.dynamic_range_db), 0, 255).astype(np.uint8)

    visible = s >= cfg.visible_section
    if p.label == 0:
        signs = np.zeros(T, bool)
    elif p.focal:
        signs = visible & (sign_w > 0.5)
    else:
        signs = visible.copy()
    mask = m[:, pad : pad + H, padx : padx + W] > 0.5  # (T, H, W)
    heights = mask.any(axis=2).sum(axis=1)
    widths = mask.any(axis=1).sum(axis=1)
    # Shape stats from near-full sections: grazing cuts look round whatever the lesion.
    ok = (s >= 0.7) & (widths > 0) & (heights > 0)
    if not ok.any():
        ok = visible & (widths > 0) & (heights > 0)
    stats = {
        "label": p.label,
        "focal": p.focal,
        "aspect_ratio": float(np.mean(heights[ok] / widths[ok])) if ok.any() else float("nan"),
        "visible_frames": int(visible.sum()),
        "sign_frames": int(signs.sum()),
        "posterior": float(np.mean(post[visible, 0, 0])) if visible.any() else float(p.posterior),
        "spicules": len(p.spicules),
    }
    return SynthCase(frames=frames, visible=visible, signs=signs, params=p, stats=stats)


def generate_case(seed: int, index: int, label: int, cfg: SynthConfig = SynthConfig()) -> SynthCase:
    """Case `index` of the data set with `seed`: same frames for the same arguments.

    With videos_per_patient k, cases k*j .. k*j+k-1 are one patient's sweeps of one
    lesion: the first draws it from case k*j's generator, later ones sweep it in the
    orthogonal plane (`other_plane`) with their own tissue, probe and speckle.
    """
    rng = np.random.default_rng([seed, index])
    p = sample_case(label, rng, cfg)
    first = index - index % cfg.videos_per_patient
    if first != index:
        p = other_plane(sample_case(label, np.random.default_rng([seed, first]), cfg), p, rng)
    return render_case(p, cfg, rng)


# -- data sets --------------------------------------------------------------------
@dataclass(frozen=True)
class CasePlan:
    index: int
    video: str  # file name, e.g. "case_0001.mp4" (the extension follows the format)
    label: int
    patient_id: str
    format: str = "h264-mp4"  # a name of FORMATS


def plan_cases(n: int, seed: int, cfg: SynthConfig = SynthConfig()) -> list[CasePlan]:
    """Labels, patients and video formats for n cases.

    Patients hold videos_per_patient consecutive cases (one lesion, one label; the
    last patient may hold fewer): round(patients * malignant_fraction) of them,
    shuffled, are malignant. Formats: a seeded shuffle of cfg.formats repeated, so
    each format gets n / len(formats) cases, +-1.
    """
    if n < 1:
        raise ValueError(f"number of cases must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 0x5EED])
    per = cfg.videos_per_patient
    slots = -(-n // per)  # lesions
    n_mal = int(round(slots * cfg.malignant_fraction))
    labels = rng.permutation(np.array([1] * n_mal + [0] * (slots - n_mal)))
    patients, patient = [], 0
    for i in range(n):
        if i % per == 0 and (i == 0 or rng.random() >= cfg.repeat_patient_prob):
            patient += 1
        patients.append(f"P{patient:04d}")
    formats = [cfg.formats[0]] * n
    if len(cfg.formats) > 1:  # drawn after the rest: plans of one-format configs are as before
        formats = [cfg.formats[k] for k in rng.permutation(np.arange(n) % len(cfg.formats))]
    return [
        CasePlan(i, f"case_{i + 1:04d}{FORMATS[formats[i]][0]}", int(labels[i // per]), patients[i], formats[i])
        for i in range(n)
    ]


def encode_video(frames: np.ndarray, fmt: str, cfg: SynthConfig, name: str = "video") -> bytes:
    """(T, H, W) uint8 frames -> bytes of the video format `fmt` (a name of FORMATS)."""
    from fractions import Fraction

    import av

    from clman.data.video import encode_mp4

    if fmt == "h264-mp4":  # the project's writer: the default data set's bytes
        return encode_mp4(frames, fps=cfg.fps, gop=cfg.gop, crf=cfg.crf, name=name)
    if fmt not in FORMATS:
        raise ValueError(f"{name}: unknown video format {fmt!r}; valid: {list(FORMATS)}")
    _, container, encoder, pix_fmt, options = FORMATS[fmt]
    buf = io.BytesIO()
    # bitexact: Matroska otherwise writes a random segment UID, so the same frames
    # would give other bytes on every run.
    with av.open(buf, mode="w", format=container, options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(encoder, rate=Fraction(cfg.fps).limit_denominator(1001), options=dict(options))
        stream.pix_fmt = pix_fmt
        stream.height, stream.width = frames.shape[1:]
        stream.codec_context.gop_size = cfg.gop
        for t, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="gray")
            vf.pts = t
            out.mux(stream.encode(vf))
        out.mux(stream.encode(None))
    return buf.getvalue()


def _make_case(args: tuple) -> dict:
    """Worker: render, encode and write one case; returns its labels row and stats."""
    from clman import storage

    out_uri, plan, seed, cfg = args
    t0 = time.perf_counter()
    case = generate_case(seed, plan.index, plan.label, cfg)
    t1 = time.perf_counter()
    data = encode_video(case.frames, plan.format, cfg, name=plan.video)
    t2 = time.perf_counter()
    storage.write_bytes(storage.join(out_uri, plan.video), data)
    frames, height, width = case.frames.shape
    return {
        **asdict(plan),
        **case.stats,
        "frames": frames,
        "height": height,
        "width": width,
        "bytes": len(data),
        "generate_s": t1 - t0,
        "encode_s": t2 - t1,
    }


def write_dataset(
    out_uri: str,
    n_cases: int,
    seed: int = 0,
    cfg: SynthConfig = SynthConfig(),
    workers: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Write `n_cases` sweeps (videos in cfg.formats) plus labels.csv (video, label, patient_id).

    Also writes synth_cases.csv (per-case stats: focal, aspect ratio, lesion and
    sign frame counts; format, frames, height, width where they vary). labels.csv
    is written last, so an interrupted run never leaves a labels file that lists
    missing videos. Returns the per-case rows.
    """
    import pandas as pd
    from tqdm import tqdm

    from clman import storage

    plans = plan_cases(n_cases, seed, cfg)
    workers = max(1, min(workers or os.cpu_count() or 1, n_cases))
    jobs = [(out_uri, plan, seed, cfg) for plan in plans]
    bar = tqdm(total=n_cases, desc="synth", unit="case", disable=not progress)
    rows = []
    if workers == 1:
        for job in jobs:
            rows.append(_make_case(job))
            bar.update()
    else:
        # spawn, not fork: the caller may hold threads or S3 clients.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for row in pool.imap_unordered(_make_case, jobs, chunksize=2):
                rows.append(row)
                bar.update()
    bar.close()
    rows.sort(key=lambda r: r["index"])
    logger.info(
        "rendered %d sweeps: %.3f s/case rendering, %.3f s/case encoding",
        len(rows),
        float(np.mean([r["generate_s"] for r in rows])),
        float(np.mean([r["encode_s"] for r in rows])),
    )
    table = pd.DataFrame(rows)
    # No timings: same seed, same file. Format and frame geometry only where they vary
    # (hard): a default data set's synth_cases.csv stays as it was.
    fixed = [c for c in ("format", "frames", "height", "width") if table[c].nunique() == 1]
    stats = table.drop(columns=["index", "generate_s", "encode_s", *fixed])
    storage.write_text(storage.join(out_uri, "synth_cases.csv"), stats.to_csv(index=False))
    storage.write_text(storage.join(out_uri, "labels.csv"), table[["video", "label", "patient_id"]].to_csv(index=False))
    return rows
