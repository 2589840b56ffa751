"""Device augmentation: per-sample draws, one draw per clip, today's ranges, kornia / torchvision as references."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import v2

from clman.config import DataConfig
from clman.data import augment as A


def pattern(n: int = 1, s: int = 40, channels: int = 1) -> torch.Tensor:
    """(n, C, s, s) uint8: a diagonal gradient with a bright off-centre square (asymmetric on purpose)."""
    y, x = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    img = (x * 3 + y).float() / (4 * (s - 1)) * 160 + 20
    img[s // 6 : s // 2, s // 5 : s // 2] = 235
    return img.round().to(torch.uint8).expand(n, channels, s, s).contiguous()


def keys(n: int, epoch: int = 0, view: int = 0) -> torch.Tensor:
    return A.sample_keys(0, epoch, torch.arange(n), view)


def test_uniform_draws_are_uniform_and_independent_of_the_batch():
    u = A.uniform(keys(20000), 3)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003
    assert abs(torch.corrcoef(u.T)[0, 1].item()) < 0.03
    # a sample's draws depend on its key only, not on which batch it came in
    assert torch.equal(A.uniform(keys(20000)[5:7], 3), u[5:7])


def test_counters_hashed_in_python_match_the_tensor_hash():
    """uniform() hashes its counters in Python (Inductor cannot compile them on CUDA); same bits."""
    xs = [0, 1, 17, 2**31 - 1, 2**31, 2**32 - 1, 0x9E3779B9, 123456789012]
    want = A._hash32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert [A._hash32_int(x) for x in xs] == want
    keys = A.sample_keys(3, 2, torch.arange(5))
    u = A.uniform(keys, 4)
    ref = (A.combine(keys[:, None], torch.arange(4)[None, :]) >> 8).float() / (1 << 24)
    assert torch.equal(u, ref)


def test_keys_separate_seed_epoch_video_view_and_frame():
    video = torch.tensor([3, 3, 4])
    base = A.sample_keys(0, 1, video, 1, torch.tensor([7, 8, 7]))
    assert len(set(base.tolist())) == 3
    for other in (
        A.sample_keys(1, 1, video, 1, torch.tensor([7, 8, 7])),
        A.sample_keys(0, 2, video, 1, torch.tensor([7, 8, 7])),
        A.sample_keys(0, 1, video, 2, torch.tensor([7, 8, 7])),
    ):
        assert not (other == base).any()


def test_keys_from_an_epoch_key_are_the_sample_keys():
    """The steps make (seed, epoch)'s part once per epoch (a Python int, or a device tensor of it)."""
    video, slot = torch.tensor([0, 5, 9, 2**40]), torch.tensor([3, 0, 7, 1])
    for seed, epoch in ((0, 0), (7, 3), (2**33 + 1, 999)):
        prefix = A.epoch_key(seed, epoch)
        for view in (0, 1, 2):
            want = A.sample_keys(seed, epoch, video, view, slot)
            assert torch.equal(A.keys_at(prefix, video, view, slot), want)
            assert torch.equal(A.keys_at(torch.tensor([prefix]), video, view, slot), want)
        assert torch.equal(A.keys_at(prefix, video), A.sample_keys(seed, epoch, video))


def test_simclr_views_are_two_independent_views_of_every_image():
    x, video, slot = pattern(6), torch.arange(6) + 10, torch.arange(6) % 3
    spec = A.AugmentSpec.simclr(DataConfig(size=32))
    want = A.augment(x.repeat(2, 1, 1, 1), torch.cat([A.sample_keys(1, 4, video, view, slot) for view in (1, 2)]), spec)
    assert torch.equal(A.simclr_views(x, torch.tensor([A.epoch_key(1, 4)]), video, slot, spec), want)


def test_per_sample_draws_differ_within_a_batch():
    x = pattern(16)
    out = A.augment(x, keys(16), A.AugmentSpec.simclr(DataConfig(size=32)))
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    flat = out.flatten(1)
    for i in range(16):
        for j in range(i):
            assert not torch.allclose(flat[i], flat[j]), f"samples {i} and {j} got the same draw"


def test_same_keys_same_output_and_views_differ():
    x = pattern(8)
    spec = A.AugmentSpec.simclr(DataConfig(size=32))
    assert torch.equal(A.augment(x, keys(8), spec), A.augment(x, keys(8), spec))
    v1, v2 = A.augment(x, keys(8, view=1), spec), A.augment(x, keys(8, view=2), spec)
    assert all(not torch.allclose(v1[i], v2[i]) for i in range(8))


def test_a_clip_gets_one_draw_for_all_its_frames():
    clips = pattern(1).unsqueeze(0).expand(3, 8, 1, 40, 40).contiguous()  # 3 clips of 8 identical frames
    spec = A.AugmentSpec(32, elastic_p=1.0)  # elastic always on: the hardest case
    out = A.augment_clips(clips, keys(3), spec)
    assert out.shape == (3, 8, 3, 32, 32)
    for b in range(3):
        assert torch.equal(out[b], out[b, :1].expand_as(out[b])), "frames of one clip got different draws"
    assert not torch.allclose(out[0], out[1])


def test_one_grid_per_clip_equals_augmenting_every_frame_with_the_clip_key():
    """augment_clips samples a clip's T frames as channels of one grid_sample: the same numbers as
    augmenting each frame on its own with the clip's key, brightness / contrast per frame included."""
    gen = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (3, 5, 1, 40, 40), generator=gen, dtype=torch.uint8)
    for channels in (1, 3):
        x = clips.expand(3, 5, channels, 40, 40).contiguous() if channels == 3 else clips
        spec = A.AugmentSpec(32, elastic_p=1.0)
        out = A.augment_clips(x, keys(3), spec)
        per_frame = A.augment(x.flatten(0, 1), keys(3).repeat_interleave(5), spec).view(3, 5, 3, 32, 32)
        assert torch.allclose(out, per_frame, atol=1e-5), channels


def test_values_are_normalised_like_before():
    out = A.augment(pattern(64), keys(64), A.AugmentSpec(32))
    lo, hi = (0 - A.MEAN) / A.STD, (1 - A.MEAN) / A.STD
    assert out.min() >= lo - 1e-5 and out.max() <= hi + 1e-5
    grey = torch.full((2, 1, 40, 40), 128, dtype=torch.uint8)
    ev = A.resize_normalize(grey, 32)
    assert ev.shape == (2, 3, 32, 32)
    assert torch.allclose(ev, torch.full_like(ev, (128 / 255 - A.MEAN) / A.STD), atol=1e-5)
    # 3-channel sources stay 3 channels through the same pass
    assert A.augment(pattern(2, channels=3), keys(2), A.AugmentSpec(32)).shape == (2, 3, 32, 32)


def test_intensity_pass_equals_torchvision_brightness_then_contrast():
    """With the crop pinned to the whole frame, the output is torchvision's adjust_brightness then
    adjust_contrast with the factors this sample drew."""
    spec = A.AugmentSpec(
        40, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, elastic_p=0.0, brightness=0.4, contrast=0.4
    )
    x, k = pattern(6), keys(6)
    out = A.augment(x, k, spec)[:, :1]
    u = A.uniform(k, spec.draws)
    for i in range(6):
        img = x[i].float() / 255
        img = TF.adjust_brightness(img, 1 - 0.4 + 0.8 * u[i, 5].item())
        img = TF.adjust_contrast(img, 1 - 0.4 + 0.8 * u[i, 6].item())
        assert torch.allclose(out[i], (img - A.MEAN) / A.STD, atol=2e-3), i


def test_crop_and_flip_statistics_match_kornia():
    """Same parameter distributions as kornia's RandomResizedCrop + RandomHorizontalFlip: the batch-mean
    image and the spread of per-image means and stds agree over 2,000 draws. (Intensity is checked
    against torchvision above: kornia's ColorJiggle shifts brightness additively and scales contrast,
    where torchvision, and clman before and now, multiply brightness and blend contrast with the mean.)"""
    kornia = pytest.importorskip("kornia")
    K = kornia.augmentation
    n, size = 2000, 24
    x = pattern(n)
    spec = A.AugmentSpec(size, scale=(0.3, 1.0), elastic_p=0.0, brightness=0.0, contrast=0.0)
    ours = A.augment(x, keys(n), spec)[:, 0] * A.STD + A.MEAN  # back to [0, 1]
    torch.manual_seed(0)
    ref = K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), p=1.0),
        K.RandomHorizontalFlip(p=0.5),
    )(x.float() / 255)[:, 0]
    assert (ours.mean(0) - ref.mean(0)).abs().max() < 0.04
    for stat in (lambda t: t.mean((1, 2)), lambda t: t.std((1, 2))):
        a, b = stat(ours), stat(ref)
        assert abs(a.mean() - b.mean()) < 0.01 and abs(a.std() - b.std()) < 0.01


def test_elastic_displacement_matches_torchvision_in_size():
    """The coarse field's displacement has torchvision ElasticTransform(alpha=30, sigma=5)'s std (in px)."""
    size = 64
    ramp = torch.arange(size, dtype=torch.float32).expand(size, size)  # x coordinate as the value
    x = (ramp * 2.0)[None, None].expand(128, 1, size, size)  # 0..126: inside [0, 255], no clamping
    spec = A.AugmentSpec(
        size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, brightness=0.0, contrast=0.0, elastic_p=1.0
    )
    ours = (A.augment(x, keys(128), spec)[:, 0] * A.STD + A.MEAN) * 255 / 2.0  # back to x in px
    torch.manual_seed(0)
    tv = torch.stack([v2.ElasticTransform(alpha=30.0, sigma=5.0)(ramp[None])[0] for _ in range(128)])
    inner = (slice(None), slice(8, -8), slice(8, -8))  # away from the zero-filled border
    d_ours = (ours - ramp)[inner].std().item()
    d_tv = (tv - ramp)[inner].std().item()
    assert 0.2 < d_tv < 1.0
    assert 0.67 < d_ours / d_tv < 1.5, (d_ours, d_tv)


def test_elastic_grid_and_amplitude_follow_sigma():
    spec = A.AugmentSpec(224)
    assert spec.grid == round(224 / 10) + 1
    assert math.isclose(A.AugmentSpec(224, elastic_alpha=60).elastic_amplitude, 2 * spec.elastic_amplitude)
