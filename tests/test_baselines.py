"""Table 4 baselines (model.arch): sizes, the temporal operators' math, padding, weights. CPU only.

Parameter counts are taken at full size on the meta device (no memory, no init).
Forward/backward passes use 32x32 frames, T = 4 (s3d: 6, its minimum) and a tiny
TimeSformer; the CNNs run at full width (width is a CLMAN setting). mvit_v2_s takes
only 16 x 224 x 224 clips: one forward without gradients at that size (about 2 s on
2 cores), no backward (a minute on 2 busy cores); its padding rule is tested on the
wrapper with a stub network.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from clman import config as C
from clman.checkpoint import CheckpointError, save_checkpoint
from clman.models.baselines import Video3D
from clman.models.build import classifier_from, ignored_fields, is_clman, load_weights, simclr_from
from clman.models.timesformer import DividedBlock
from clman.models.tin import TemporalInterlace, interlace, resample_valid
from clman.models.tsm import TemporalBlock, TemporalShift, temporal_shift

BASELINES = tuple(a for a in C.ARCHS if a != "clman")
TINY_TF = dict(tf_dim=32, tf_depth=2, tf_heads=2, tf_patch=8, tf_size=32, tf_frames=4)
MIN_FRAMES = {"s3d": 6}  # every other arch but mvit_v2_s takes T >= 1

# Full size, 2-class head. The torchvision ones are checked against torchvision below too.
PARAMS = {
    "clman": 12_099_010,
    "r3d_18": 33_167_298,
    "mc3_18": 11_491_266,
    "r2plus1d_18": 31_301_151,
    "p3d": 27_292_098,
    "timesformer": 121_266_434,
    "tin_18": 11_183_322,
    "tin_34": 21_298_130,
    "tin_50": 23_546_594,
    "tsm_18": 11_177_538,
    "tsm_50": 23_512_130,
    "s3d": 7_912_098,
    "swin3d_t": 27_852_008,
    "mvit_v2_s": 34_231_682,
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_config(arch: str, **kw) -> C.ModelConfig:
    extra = TINY_TF if arch == "timesformer" else {"width": 0.125, "gn_groups": 8} if arch == "clman" else {}
    return C.ModelConfig(arch=arch, **{**extra, **kw})


@functools.cache
def tiny(arch: str) -> nn.Module:
    """One model per arch for the whole file (tests set train/eval themselves)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return classifier_from(model_config(arch))


def clips(b: int, t: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- config and build


def test_parameter_counts_at_full_size():
    counts = {}
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch in C.ARCHS:
            counts[arch] = n_params(classifier_from(C.ModelConfig(arch=arch)))
        video, models = torchvision.models.video, torchvision.models
        for arch in ("r3d_18", "mc3_18", "r2plus1d_18", "s3d", "swin3d_t", "mvit_v2_s"):
            assert counts[arch] == n_params(getattr(video, arch)(weights=None, num_classes=2)), arch
        # TSM's shift has no parameters: exactly torchvision's ResNet with a 2-class fc
        assert counts["tsm_18"] == n_params(models.resnet18(weights=None, num_classes=2))
        assert counts["tsm_50"] == n_params(models.resnet50(weights=None, num_classes=2))
        # TIN adds to every block an offset net (Conv1d c -> 1, FC 16 -> 16, FC 16 -> 2) and a
        # weight net (Conv1d c -> 2) on its c = C/4 interlaced channels: 9 c + 309 parameters
        for c in (64, 128, 256, 512):
            assert n_params(TemporalInterlace(c)) == 9 * (c // 4) + 309
        block_inputs = [64] * 4 + [128] * 4 + [256] * 6 + [512] * 2  # conv1 inputs of ResNet-34's 16 blocks
        resnet34 = n_params(models.resnet34(weights=None, num_classes=2))
        assert counts["tin_34"] == resnet34 + sum(9 * (c // 4) + 309 for c in block_inputs)
    assert counts == PARAMS


def test_unknown_arch_lists_the_valid_names():
    with pytest.raises(C.ConfigError, match=r"model.arch: 'tsm18' is not one of \['clman', 'r3d_18'"):
        C.load("finetune", None, ["model.arch=tsm18"])
    assert C.load("finetune", None, ["model.arch=tin_50"]).model.arch == "tin_50"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.weights=https://example.org/w.pt", "model.weights: must be a local path or s3:// URI"),
        ("model.weights=''", "model.weights: must be a local path or s3:// URI"),
        ("model.tf_heads=5", "model.tf_heads: must divide tf_dim = 768, got 5"),
        ("model.tf_size=8", "model.tf_size: must be >= 16"),
        ("model.tf_depth=0", "model.tf_depth: must be >= 1"),
    ],
)
def test_bad_baseline_settings_name_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load("finetune", None, [override])


def test_weights_accepts_paths_and_s3():
    for uri in ("/data/w.pt", "w.pt", "s3://bucket/w.pt", "file:///data/w.pt"):
        assert C.load("finetune", None, [f"model.weights={uri}"]).model.weights == uri
    assert C.ModelConfig().weights is None


def test_demo_preset_with_a_baseline_warns_once_about_unused_clman_settings():
    cfg = C.load("finetune", "jobs/configs/demo-cpu.yaml", ["model.arch=tsm_18"])
    assert ignored_fields(cfg.model) == ["model.width", "model.gn_groups"]
    with pytest.warns(UserWarning, match=r"arch=tsm_18 leaves these settings unused: model.width, model.gn_groups"):
        classifier_from(cfg.model)
    assert ignored_fields(C.ModelConfig(arch="clman", tf_dim=64, tf_heads=4)) == ["model.tf_dim", "model.tf_heads"]
    assert ignored_fields(C.ModelConfig(arch="timesformer", tf_dim=64, tf_heads=4)) == []


def test_only_clman_has_an_encoder_and_pretrains():
    assert is_clman(C.ModelConfig()) and hasattr(tiny("clman"), "encoder")
    for arch in BASELINES:
        assert not is_clman(C.ModelConfig(arch=arch))
    for arch in ("tsm_18", "timesformer", "r3d_18", "p3d"):
        assert not hasattr(tiny(arch), "encoder"), arch
    with pytest.raises(ValueError, match="model.arch=tsm_18: contrastive pretraining applies to CLMAN only"):
        simclr_from(C.ModelConfig(arch="tsm_18"))


# ---------------------------------------------------------------- TSM


def shift_reference(x: torch.Tensor, fold_div: int = 8) -> torch.Tensor:
    """TSM's shift as plain loops over (b, t, c)."""
    b, t, c = x.shape[:3]
    fold = c // fold_div
    out = torch.zeros_like(x)
    for i in range(b):
        for j in range(t):
            for k in range(c):
                if k < fold:
                    src = j + 1  # back: frame j takes frame j + 1
                elif k < 2 * fold:
                    src = j - 1  # forward: frame j takes frame j - 1
                else:
                    src = j
                if 0 <= src < t:
                    out[i, j, k] = x[i, src, k]
    return out


@pytest.mark.parametrize("t", [1, 2, 5])
def test_tsm_shift_equals_a_loop_reference(t):
    x = torch.randn(2, t, 16, 3, 2)
    torch.testing.assert_close(temporal_shift(x), shift_reference(x), rtol=0, atol=0)


def test_tsm_padded_frames_shift_in_as_zeros():
    x = torch.randn(2, 5, 16, 3, 3)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    y = TemporalShift()(x.flatten(0, 1), 5, mask).view_as(x)
    x_zeroed = x.clone()
    x_zeroed[1, 3:] = 0
    torch.testing.assert_close(y, shift_reference(x_zeroed), rtol=0, atol=0)
    assert (y[1, 2, :2] == 0).all()  # the last valid frame's "back" channels read the padded frame: zero


class NoTemporal(nn.Module):
    def forward(self, x, t, mask):
        return x


def test_temporal_block_is_torchvisions_block_around_its_temporal_module():
    from torchvision.models.resnet import BasicBlock, Bottleneck

    torch.manual_seed(0)
    x = torch.randn(6, 16, 8, 8)
    mask = torch.ones(2, 3, dtype=torch.bool)
    for kind, planes in ((BasicBlock, 32), (Bottleneck, 8)):
        out = planes * kind.expansion
        down = nn.Sequential(nn.Conv2d(16, out, 1, stride=2), nn.BatchNorm2d(out))
        block = kind(16, planes, stride=2, downsample=down).eval()
        torch.testing.assert_close(TemporalBlock(block, NoTemporal())(x, 3, mask), block(x))


# ---------------------------------------------------------------- TIN


def interlace_reference(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Eq. (1) of clman/models/tin.py as loops: Y_t,g = w_t,g sum_s max(0, 1 - |s - (t - o_g)|) X_s,g."""
    b, t, k = x.shape[:3]
    out = torch.zeros_like(x)
    for i in range(b):
        for g in range(k):
            for j in range(t):
                for s in range(t):
                    hat = max(0.0, 1.0 - abs(s - (j - float(offset[i, g]))))
                    out[i, j, g] += weight[i, j, g] * hat * x[i, s, g]
    return out


def test_tin_interlace_equals_its_equation():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 3, 2, 2)
    offset = torch.tensor([[0.3, -1.7, 1.99, -0.5], [1.0, -1.0, 0.0, 1.5]])
    weight = torch.rand(2, 6, 4) * 2
    torch.testing.assert_close(interlace(x, offset, weight), interlace_reference(x, offset, weight))


def test_tin_special_cases_identity_and_tsm():
    x = torch.randn(2, 5, 4, 2, 3, 3)  # (B, T, 2G groups, channels per group, H, W)
    ones = torch.ones(2, 5, 4)
    # zero offsets, unit weights: the identity
    torch.testing.assert_close(interlace(x, torch.zeros(2, 4), ones), x, rtol=0, atol=0)
    # uniform weight w: w * x
    torch.testing.assert_close(interlace(x, torch.zeros(2, 4), 0.5 * ones), 0.5 * x, rtol=0, atol=0)
    # offset -1 on every group (the first half one frame back, the second half forward once
    # the module adds the symmetric -o): TSM's shift with fold = C/8 of the 1/4 interlaced channels
    y = interlace(x, torch.tensor([[-1.0, -1.0, 1.0, 1.0]] * 2), ones).flatten(2, 3)  # (B, T, 8, H, W)
    torch.testing.assert_close(y, temporal_shift(x.flatten(2, 3), fold_div=2), rtol=0, atol=0)


def test_tin_module_with_zero_offsets_and_unit_weights_is_the_identity_on_valid_frames():
    m = TemporalInterlace(64)
    with torch.no_grad():
        for p in (m.offset_fc2.weight, m.offset_fc2.bias, m.weight_conv.weight, m.weight_conv.bias):
            p.zero_()  # o = 4 (sigmoid(0) - 1/2) = 0, w = 2 sigmoid(0) = 1
    x = torch.randn(2 * 5, 64, 4, 4)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    y = m(x, 5, mask).view(2, 5, 64, 4, 4)
    expected = x.view(2, 5, 64, 4, 4).clone()
    expected[1, 3:] = 0  # padded frames are zeroed on entry
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_tin_offsets_ignore_padding_and_resample_like_interpolate():
    d = torch.randn(3, 16)
    full = torch.ones(3, 16, dtype=torch.bool)
    torch.testing.assert_close(resample_valid(d, full, 16), d)
    upsampled = F.interpolate(d[:, None, :8], 16, mode="linear")[:, 0]
    torch.testing.assert_close(resample_valid(d[:, :8], full[:, :8], 16), upsampled)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, [1, 4, 5, 9]] = True  # any pattern: the valid values, in order
    torch.testing.assert_close(resample_valid(d, mask, 16), resample_valid(d[:, [1, 4, 5, 9]], full[:, :4], 16))


# ---------------------------------------------------------------- TimeSformer


def test_timesformer_temporal_attention_mixes_only_the_same_patch_across_frames():
    torch.manual_seed(0)
    block = DividedBlock(dim=16, heads=2)  # block 0: W_t is not zero-initialised
    x = torch.randn(2, 4, 6, 16)  # (B, T, N patches, D)
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    y = block.temporal(x, mask)
    x2 = x.clone()
    x2[0, 2, 3] += torch.randn(16)  # clip 0, frame 2, patch 3 (not a constant: LayerNorm removes those)
    moved = (block.temporal(x2, mask) - y).abs().amax(dim=-1) > 1e-6  # (B, T, N)
    expected = torch.zeros_like(moved)
    expected[0, :, 3] = True  # patch 3 in every frame of clip 0, nothing else
    assert torch.equal(moved, expected)
    # a padded frame is no key: perturbing it moves only its own tokens
    x3 = x.clone()
    x3[1, 3, 1] += torch.randn(16)
    moved = (block.temporal(x3, mask) - y).abs().amax(dim=-1) > 1e-6
    expected = torch.zeros_like(moved)
    expected[1, 3, 1] = True
    assert torch.equal(moved, expected)


def test_timesformer_spatial_attention_stays_within_the_frame():
    torch.manual_seed(0)
    block = DividedBlock(dim=16, heads=2)
    x, cls = torch.randn(1, 4, 6, 16), torch.randn(1, 16)
    mask = torch.ones(1, 4, dtype=torch.bool)
    y, c = block.spatial(x, cls, mask)
    x2 = x.clone()
    x2[0, 1, 2] += torch.randn(16)
    y2, c2 = block.spatial(x2, cls, mask)
    moved = (y2 - y).abs().amax(dim=-1) > 1e-6  # (1, T, N)
    assert moved[0, 1].all() and not moved[0, [0, 2, 3]].any()
    assert not torch.allclose(c, c2)  # the class token sees every frame


# ---------------------------------------------------------------- every arch


@pytest.mark.parametrize("arch", [a for a in C.ARCHS if a != "mvit_v2_s"])
def test_forward_and_backward_at_tiny_size(arch):
    model = tiny(arch).train()
    model.zero_grad()
    t = MIN_FRAMES.get(arch, 4)
    logits = model(clips(2, t))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"{arch}: no gradient for {no_grad[:3]}"
    out, weights = model(clips(2, t), return_weights=True)
    assert out.shape == (2, 2) and (weights is None) == (arch != "clman")


@pytest.mark.parametrize("arch", [a for a in C.ARCHS if a != "mvit_v2_s"])
def test_any_clip_length_the_design_allows(arch):
    model = tiny(arch).eval()
    lo = MIN_FRAMES.get(arch, 1)
    with torch.no_grad():
        for t in (lo, 9):  # 9: also the padded test's length (new shapes cost oneDNN set-up time)
            assert model(clips(1, t)).shape == (1, 2), (arch, t)


@pytest.mark.parametrize("arch", [a for a in C.ARCHS if a != "mvit_v2_s"])
def test_padded_clip_scores_as_the_clip_without_its_padding(arch):
    """Trailing padding (as evaluation batches have): logits equal the unpadded clip's, and
    NaN in the padded frames changes nothing."""
    model = tiny(arch).eval()
    t, n = 9, MIN_FRAMES.get(arch, 4) + 1
    x = clips(2, t, seed=1)
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[0, n:] = False
    x[0, n:] = float("nan")
    with torch.no_grad():
        padded = model(x, mask)
        alone = torch.cat([model(x[:1, :n]), model(x[1:])])
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def test_mvit_takes_16_frames_of_224_only():
    model = tiny("mvit_v2_s").eval()
    with pytest.raises(ValueError, match=r"mvit_v2_s takes clips of exactly T x H x W = 16 x 224 x 224 .* got 8 x 224"):
        model(clips(1, 8, size=224))
    with torch.no_grad():
        assert model(clips(1, 16, size=224)).shape == (1, 2)


def test_too_small_clips_fail_with_one_line():
    with pytest.raises(ValueError, match=r"s3d needs clips of at least 6 frames and 17 px, got 5 frames of 32 x 32"):
        tiny("s3d")(clips(1, 5))
    with pytest.raises(ValueError, match=r"timesformer needs frames of at least 8 px \(model.tf_patch\), got 4 x 4"):
        tiny("timesformer")(clips(1, 2, size=4))
    with pytest.raises(ValueError, match=r"clips must be \(B, T, C=3, H, W\)"):
        tiny("tsm_18")(torch.randn(1, 4, 1, 32, 32))


class Recorder(nn.Module):
    """A stub 3-D network: records the (B, C, T, H, W) volumes it is given."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x)
        return x.sum(dim=(1, 2, 3, 4))[:, None].expand(-1, 2)


def test_video3d_runs_padded_clips_alone_or_zero_fills_fixed_size_nets():
    x = clips(2, 5, size=4)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    x[0, 3:] = float("nan")
    net = Recorder()
    Video3D(net, "stub")(x, mask)  # padding: one call per clip, on its valid frames
    assert [v.shape[2] for v in net.seen] == [3, 5]
    torch.testing.assert_close(net.seen[0][0], x[0, :3].transpose(0, 1))
    net = Recorder()
    Video3D(net, "stub", fixed=(5, 4, 4))(x, mask)  # fixed size: one call, padded frames zeroed
    assert len(net.seen) == 1 and (net.seen[0][0, :, 3:] == 0).all()
    net = Recorder()
    Video3D(net, "stub")(x[1:])  # no padding: one call
    assert len(net.seen) == 1


# ---------------------------------------------------------------- weights


def test_weights_load_strictly_from_a_state_dict_or_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    cfg = model_config("timesformer")
    src = classifier_from(cfg)
    torch.save(src.state_dict(), tmp_path / "state.pt")
    save_checkpoint(tmp_path / "ckpt.pt", src, kind="classifier", config={"model": {"arch": "timesformer"}}, step=3)
    for name in ("state.pt", "ckpt.pt"):
        torch.manual_seed(2)
        dst = classifier_from(cfg)
        load_weights(dst, str(tmp_path / name))
        for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
            assert torch.equal(a, b), k


def one_line_error(model: nn.Module, uri: str) -> str:
    with pytest.raises(CheckpointError) as e:
        load_weights(model, uri)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_weights_errors_are_one_line(tmp_path):
    model = classifier_from(model_config("timesformer"))
    wider = classifier_from(model_config("timesformer", tf_dim=48))
    torch.save(wider.state_dict(), tmp_path / "wider.pt")
    assert "shape mismatch" in one_line_error(model, str(tmp_path / "wider.pt"))
    torch.save(tiny("clman").state_dict(), tmp_path / "clman.pt")
    msg = one_line_error(model, str(tmp_path / "clman.pt"))
    assert f"weights {tmp_path / 'clman.pt'} does not match this architecture: missing keys" in msg
    assert one_line_error(model, str(tmp_path / "nope.pt")) == f"weights not found: {tmp_path / 'nope.pt'}"
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    msg = one_line_error(model, str(tmp_path / "junk.pt"))
    assert "junk.pt: not loadable as weights (torch.load(weights_only=True) failed" in msg
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    assert "expected a state dict (name -> tensor) or a clman checkpoint, got list" in one_line_error(
        model, str(tmp_path / "list.pt")
    )
