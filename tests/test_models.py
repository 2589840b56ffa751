"""Models: encoder (ResNet-18 + GN + non-local), aggregators, heads, whole models. CPU only.

Everything uses width 0.125 (8/16/32/64 channels) and 32x32 frames except the
parameter-count tests (no forward at full size) and one forward/backward pass of
the paper-size model on a (2, 16, 3, 224, 224) clip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from clman.models import (
    AGGREGATORS,
    EMSAPool,
    LinearHead,
    MeanPool,
    MultiMetaAttention,
    NonLocalBlock,
    ProjectionHead,
    SimCLRModel,
    VideoClassifier,
    build_aggregator,
    build_encoder,
)
from clman.models.encoder import gn_group_count, make_norm_layer

PARAM_COUNTS_FILE = Path("/tmp/clman_param_counts.txt")
TINY = 0.125  # width multiplier: 8/16/32/64 channels, D = 64
D = 64


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def nonlocal_params_formula(c: int) -> int:
    """theta, phi, g: C -> C/2 (weight + bias); W: C/2 -> C (weight + bias); norm gamma + beta."""
    ci = c // 2
    return 3 * (c * ci + ci) + (ci * c + c) + 2 * c


def tiny_encoder(**kw) -> nn.Module:
    torch.manual_seed(kw.pop("seed", 0))
    return build_encoder(width=TINY, **kw)


# ---------------------------------------------------------------- encoder


def test_parameter_counts_match_torchvision_resnet18_plus_nonlocal():
    tv = torchvision.models.resnet18(weights=None)
    tv_no_fc = sum(p.numel() for name, p in tv.named_parameters() if not name.startswith("fc."))
    bn = build_encoder(norm="batch", nonlocal_stages=())
    gn = build_encoder(norm="group", nonlocal_stages=())
    gn_nl = build_encoder(norm="group", nonlocal_stages=(3, 4))

    nl3, nl4 = n_params(gn_nl.nonlocal3), n_params(gn_nl.nonlocal4)
    assert (nl3, nl4) == (nonlocal_params_formula(256), nonlocal_params_formula(512))
    assert n_params(bn) == tv_no_fc
    assert n_params(gn) == tv_no_fc  # GN has the same affine parameters as BN
    assert n_params(gn_nl) == tv_no_fc + nl3 + nl4
    assert bn.out_dim == gn_nl.out_dim == 512

    PARAM_COUNTS_FILE.write_text(
        "clman frame encoder parameter counts (ResNet-18 trunk without fc, width 1.0, 3 input channels)\n"
        f"torchvision resnet18 without fc: {tv_no_fc}\n"
        f"vanilla (BN, no non-local):      {n_params(bn)}\n"
        f"GN (no non-local):               {n_params(gn)}\n"
        f"GN + non-local (stages 3, 4):    {n_params(gn_nl)}"
        f"  (non-local blocks: {nl3} at 256 ch + {nl4} at 512 ch = {nl3 + nl4})\n"
    )


def test_vanilla_bn_encoder_is_torchvision_resnet18():
    """Same state-dict keys (minus fc) and the same function as torchvision's resnet18."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None).eval()
    tv.fc = nn.Identity()
    enc = build_encoder(norm="batch", nonlocal_stages=()).eval()
    enc.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}, strict=True)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), tv(x))


def test_group_norm_in_every_block_including_stem():
    enc = tiny_encoder(norm="group", nonlocal_stages=(3, 4), gn_groups=32)
    norms = [m for m in enc.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    # resnet18: stem 1 + 8 blocks x 2 + 3 downsample = 20, plus one per non-local block
    assert len(norms) == 22 and all(isinstance(m, nn.GroupNorm) for m in norms)
    assert isinstance(enc.bn1, nn.GroupNorm) and enc.bn1.num_groups == 8  # 8 stem channels: 32 clipped to 8
    for m in norms:
        assert m.num_channels % m.num_groups == 0
    assert build_encoder(norm="group", nonlocal_stages=()).bn1.num_groups == 32  # full width: the paper's 32
    assert gn_group_count(64, 32) == 32
    assert gn_group_count(8, 32) == 8
    assert gn_group_count(12, 8) == 6
    assert gn_group_count(7, 4) == 1


def test_fresh_nonlocal_block_is_exact_identity_but_trainable():
    torch.manual_seed(0)
    for norm in ("batch", "group"):
        block = NonLocalBlock(16, make_norm_layer(norm))
        x = torch.randn(2, 16, 5, 7)
        for train in (True, False):
            block.train(train)
            assert torch.equal(block(x), x)
        # not a dead block: the zero-initialised norm scale gets a gradient at once
        block.train()
        block(x).square().sum().backward()
        assert block.norm.weight.grad.abs().sum() > 0


def test_nonlocal_block_computes_embedded_gaussian():
    """Against the formula z = x + Norm(W softmax(theta^T phi) g), once the block is switched on."""
    torch.manual_seed(0)
    block = NonLocalBlock(8, make_norm_layer("group", 4)).eval()
    with torch.no_grad():
        nn.init.normal_(block.norm.weight)
        nn.init.normal_(block.norm.bias)
    x = torch.randn(2, 8, 3, 4)
    theta, phi, g = (conv(x).flatten(2) for conv in (block.theta, block.phi, block.g))  # (B, 4, 12)
    f = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # (B, 12, 12)
    y = (g @ f.transpose(1, 2)).view(2, 4, 3, 4)  # y_i = sum_j f_ij g_j
    expected = x + block.norm(block.out(y))
    torch.testing.assert_close(block(x), expected)
    # non-local: one position's input reaches every other position's output
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0
    changed = (block(x2) - block(x)).abs().sum(dim=1)  # (B, 3, 4)
    assert (changed[:, 1:, 1:] > 0).all()


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_nonlocal_encoder_equals_vanilla_encoder_at_init(norm):
    with_nl = tiny_encoder(norm=norm, nonlocal_stages=(3, 4), seed=1)
    vanilla = tiny_encoder(norm=norm, nonlocal_stages=(), seed=2)
    shared = {k: v for k, v in with_nl.state_dict().items() if not k.startswith("nonlocal")}
    assert len(shared) < len(with_nl.state_dict())
    vanilla.load_state_dict(shared, strict=True)
    x = torch.randn(4, 3, 64, 64)
    assert torch.equal(with_nl(x), vanilla(x))  # train mode
    assert torch.equal(with_nl.eval()(x), vanilla.eval()(x))
    # both blocks sit in the forward path: switching either one on changes the features
    for block in (with_nl.nonlocal3, with_nl.nonlocal4):
        with torch.no_grad():
            block.norm.weight.fill_(1.0)
            assert not torch.allclose(with_nl(x), vanilla(x))
            block.norm.weight.zero_()


def test_encoder_width_input_size_and_channels():
    enc = tiny_encoder()
    assert enc.out_dim == D
    assert [
        enc.layer1[0].conv1.out_channels,
        enc.layer2[0].conv1.out_channels,
        enc.layer3[0].conv1.out_channels,
        enc.layer4[0].conv1.out_channels,
    ] == [8, 16, 32, 64]
    for h, w in [(32, 32), (45, 61), (17, 100)]:
        out = enc(torch.randn(3, 3, h, w))
        assert out.shape == (3, D) and torch.isfinite(out).all()
    gray = tiny_encoder(in_channels=1, nonlocal_stages=(4,))
    assert isinstance(gray.nonlocal3, nn.Identity) and isinstance(gray.nonlocal4, NonLocalBlock)
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, D)


def test_encoder_bad_input_and_options():
    enc = tiny_encoder()
    with pytest.raises(ValueError, match=r"frames must be \(N, C, H, W\) with C = 3, got \(3, 32, 32\)"):
        enc(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"with C = 3, got \(2, 1, 32, 32\)"):
        enc(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="float tensor, got torch.uint8"):
        enc(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"norm must be one of \('batch', 'group'\), got 'layer'"):
        build_encoder(norm="layer")
    with pytest.raises(ValueError, match=r"nonlocal_stages must be a subset of \(3, 4\), got \(2,\)"):
        build_encoder(nonlocal_stages=(2,))
    with pytest.raises(ValueError, match="width"):
        build_encoder(width=0.01)
    with pytest.raises(ValueError, match="gn_groups must be >= 1, got 0"):
        build_encoder(gn_groups=0)


# ---------------------------------------------------------------- multi-meta attention


def mma_reference(x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """Eq. 4-6 written out per frame and per feature dimension (one clip, no padding)."""
    t, m = x.shape
    e = [x[i] for i in range(t)]
    for lin in linears:
        e = [torch.tanh(lin.weight @ e_t + lin.bias) for e_t in e]  # Eq. 4
    out = torch.zeros(m)
    for k in range(m):
        denom = sum(torch.exp(e[j][k]) for j in range(t))
        for i in range(t):
            out[k] += torch.exp(e[i][k]) / denom * x[i, k]  # Eq. 5, 6
    return out


def test_mma_matches_equations_4_to_6():
    torch.manual_seed(0)
    mma = MultiMetaAttention(6, depth=2)
    x = torch.randn(2, 5, 6)
    linears = [m for m in mma.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        out = mma(x)
        for b in range(2):
            torch.testing.assert_close(out[b], mma_reference(x[b], linears))


@pytest.mark.parametrize("depth", [1, 3])
def test_mma_equals_mean_pooling_when_scores_are_equal(depth):
    torch.manual_seed(0)
    mma = MultiMetaAttention(D, depth=depth)
    x = torch.randn(3, 7, D)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1] = False
    mean = MeanPool()(x, mask)
    assert not torch.allclose(mma(x, mask), mean, atol=1e-4)  # random scores are not all equal
    last = [m for m in mma.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    torch.testing.assert_close(mma(x, mask), mean)


def test_mma_does_not_depend_on_frame_order():
    torch.manual_seed(0)
    mma = MultiMetaAttention(D, depth=2)
    x = torch.randn(2, 9, D)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    perm = torch.randperm(9)
    torch.testing.assert_close(mma(x[:, perm], mask[:, perm]), mma(x, mask))


def test_mma_weights_softmax_over_frames_per_dimension():
    torch.manual_seed(0)
    mma = MultiMetaAttention(D)
    x = torch.randn(2, 6, D)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    out, w = mma(x, mask, return_weights=True)
    assert out.shape == (2, D) and w.shape == (2, 6, D)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2, D))
    assert (w[0, 4:] == 0).all()  # padded frames: exactly zero weight
    assert (w[mask] > 0).all()
    # fine-grained: different dimensions weigh the frames differently
    assert not torch.allclose(w[1, :, 0], w[1, :, 1])
    torch.testing.assert_close(out, (w * x).sum(dim=1))


def test_mma_one_frame_and_many_frames():
    torch.manual_seed(0)
    mma = MultiMetaAttention(D, depth=2)
    x1 = torch.randn(2, 1, D)
    torch.testing.assert_close(mma(x1), x1[:, 0])  # one frame: its own feature
    x300 = torch.randn(2, 300, D)
    out, w = mma(x300, return_weights=True)
    assert out.shape == (2, D) and torch.isfinite(out).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2, D))
    # a convex combination per dimension stays within the frames' range
    assert (out <= x300.amax(dim=1) + 1e-5).all() and (out >= x300.amin(dim=1) - 1e-5).all()


def test_mma_gradients_reach_every_layer():
    torch.manual_seed(0)
    mma = MultiMetaAttention(D, depth=3)
    x = torch.randn(2, 5, D)
    (mma(x) * torch.randn(2, D)).sum().backward()
    linears = [m for m in mma.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for lin in linears:
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
        assert lin.bias.grad.abs().sum() > 0


def test_mma_depth_must_be_positive():
    with pytest.raises(ValueError, match="mma depth must be >= 1, got 0"):
        MultiMetaAttention(D, depth=0)


# ---------------------------------------------------------------- every aggregator

ORDER_FREE = [a for a in AGGREGATORS if a != "emsa"]  # emsa reduces neighbouring frames: end padding only


def make_aggregator(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_aggregator(name, D, depth=2).eval()


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_shapes_and_weights(name):
    agg = make_aggregator(name)
    for t in (1, 2, 16, 33):
        x = torch.randn(3, t, D)
        assert agg(x).shape == (3, D)
        out, w = agg(x, torch.ones(3, t, dtype=torch.bool), return_weights=True)
        assert out.shape == (3, D) and torch.isfinite(out).all()
        assert (w.shape == (3, t, D)) if name == "mma" else (w is None)


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("garbage", [1e3, float("nan")])
def test_aggregator_ignores_padded_frames_at_the_end(name, garbage):
    agg = make_aggregator(name)
    torch.manual_seed(1)
    x = torch.randn(2, 5, D)
    lengths = torch.tensor([5, 3])
    mask = torch.arange(5) < lengths[:, None]  # (2, 5)
    ref = agg(x, mask)
    padded = torch.cat([x, torch.full((2, 4, D), garbage)], dim=1)  # (2, 9, D)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    padded[1, 3:] = garbage  # also garbage in the already padded slots
    torch.testing.assert_close(agg(padded, padded_mask), ref)
    # and a short clip alone gives what it gives inside a batch
    torch.testing.assert_close(agg(x[1:, :3]), ref[1:])


@pytest.mark.parametrize("name", ORDER_FREE)
def test_aggregator_ignores_padded_frames_anywhere(name):
    agg = make_aggregator(name)
    torch.manual_seed(1)
    x = torch.randn(2, 4, D)
    ref = agg(x)
    holes = torch.randn(2, 7, D) * 100
    mask = torch.tensor([[False, True, True, False, True, True, False]] * 2)
    holes[mask] = x.reshape(-1, D)
    torch.testing.assert_close(agg(holes, mask), ref)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_output_depends_on_valid_frames_and_trains(name):
    agg = make_aggregator(name).train()
    torch.manual_seed(1)
    x = torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    x2 = x.clone()
    x2[0, 2] += torch.randn(D)
    out, out2 = agg(x, mask), agg(x2, mask)
    assert not torch.allclose(out[0], out2[0])
    torch.testing.assert_close(out[1], out2[1])  # clips do not mix
    xg = x.clone().requires_grad_(True)
    (agg(xg, mask) * torch.randn(2, D)).sum().backward()
    assert xg.grad[mask].abs().sum() > 0 and (xg.grad[~mask] == 0).all()
    for pname, p in agg.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_bad_input(name):
    agg = make_aggregator(name)
    x = torch.randn(2, 16, D)
    with pytest.raises(ValueError, match=r"features must be \(B, T, D\), got \(16, 64\)"):
        agg(x[0])
    with pytest.raises(ValueError, match=r"at least one frame \(T >= 1\), got \(2, 0, 64\)"):
        agg(x[:, :0])
    with pytest.raises(ValueError, match=r"mask must be \(B, T\) = \(2, 16\), got \(2, 15\)"):
        agg(x, torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor .*, got torch.int64"):
        agg(x, torch.ones(2, 16, dtype=torch.long))
    empty = torch.ones(2, 16, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match="mask row 1 has no valid frame"):
        agg(x, empty)
    bad = x.clone()
    bad[0, 3, 5] = float("inf")
    with pytest.raises(ValueError, match="non-finite values"):
        agg(bad)
    if name not in ("mean", "max"):  # parameterised aggregators know their D
        with pytest.raises(ValueError, match=r"with D = 64, got \(2, 16, 32\)"):
            agg(x[..., :32])


def test_build_aggregator_names():
    assert isinstance(build_aggregator("mma", D, depth=3), MultiMetaAttention)
    assert len([m for m in build_aggregator("mma", D, depth=3).modules() if isinstance(m, nn.Linear)]) == 3
    with pytest.raises(ValueError, match=r"aggregator must be one of \('mma', 'mean', .*'emsa'\), got 'attention'"):
        build_aggregator("attention", D)
    with pytest.raises(ValueError, match="emsa heads must divide dim = 10, got heads=4"):
        EMSAPool(10)


# ---------------------------------------------------------------- heads and whole models


def test_projection_and_linear_heads():
    proj = ProjectionHead(D)
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(D, D), (D, 128)]
    assert proj(torch.randn(5, D)).shape == (5, 128)
    deep = ProjectionHead(D, hidden_dim=32, out_dim=16, num_layers=3)
    assert [(m.in_features, m.out_features) for m in deep if isinstance(m, nn.Linear)] == [(D, 32), (32, 32), (32, 16)]
    assert sum(isinstance(m, nn.ReLU) for m in deep) == 2
    assert [type(m) for m in ProjectionHead(D, num_layers=1)] == [nn.Linear]
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        ProjectionHead(D, num_layers=0)
    assert LinearHead(D)(torch.randn(3, D)).shape == (3, 2)


def tiny_classifier(aggregator: str = "mma") -> VideoClassifier:
    enc = tiny_encoder(norm="group", nonlocal_stages=(3, 4))
    with torch.no_grad():  # switch the non-local blocks on so they take part in the checks
        for block in (enc.nonlocal3, enc.nonlocal4):
            nn.init.normal_(block.norm.weight)
    return VideoClassifier(enc, build_aggregator(aggregator, enc.out_dim, depth=2), LinearHead(enc.out_dim))


def test_video_classifier_folds_frames_into_the_batch():
    model = tiny_classifier().eval()
    torch.manual_seed(3)
    clips = torch.randn(2, 5, 3, 32, 32)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        logits, w = model(clips, mask, return_weights=True)
        assert logits.shape == (2, 2) and w.shape == (2, 5, D)
        # clip by clip, frame by frame: the same numbers
        feats = torch.stack([torch.stack([model.encoder(f[None])[0] for f in clip]) for clip in clips])  # (B, T, D)
        torch.testing.assert_close(logits, model.head(model.aggregator(feats, mask)), rtol=1e-4, atol=1e-5)
        # padded frames (any content) do not change the clip's logits
        clips2 = clips.clone()
        clips2[1, 3:] = 100.0
        torch.testing.assert_close(model(clips2, mask), logits, rtol=1e-4, atol=1e-5)
        # any T
        assert model(torch.randn(3, 1, 3, 32, 32)).shape == (3, 2)
        assert model(torch.randn(1, 20, 3, 40, 24)).shape == (1, 2)
    logits_mean, w_mean = VideoClassifier(model.encoder, build_aggregator("mean", D), model.head)(
        clips, mask, return_weights=True
    )
    assert logits_mean.shape == (2, 2) and w_mean is None
    keys = set(model.state_dict())
    assert {k.split(".")[0] for k in keys} == {"encoder", "aggregator", "head"}
    assert "encoder.nonlocal3.theta.weight" in keys and "aggregator.layers.2.weight" in keys


def test_video_classifier_bad_input():
    model = tiny_classifier()
    clips = torch.randn(2, 16, 3, 32, 32)
    with pytest.raises(ValueError, match=r"clips must be \(B, T, C, H, W\), got \(16, 3, 32, 32\)"):
        model(clips[0])
    with pytest.raises(ValueError, match=r"at least one frame \(T >= 1\), got \(2, 0, 3, 32, 32\)"):
        model(clips[:, :0])
    with pytest.raises(ValueError, match=r"^mask must be \(B, T\) = \(2, 16\), got \(2, 15\)$"):
        model(clips, torch.ones(2, 15, dtype=torch.bool))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0] = False
    with pytest.raises(ValueError, match="mask row 0 has no valid frame"):
        model(clips, mask)
    with pytest.raises(ValueError, match=r"with C = 3, got \(32, 1, 32, 32\)"):
        model(clips[:, :, :1])


def test_simclr_model():
    enc = tiny_encoder()
    model = SimCLRModel(enc, ProjectionHead(enc.out_dim, out_dim=16))
    x = torch.randn(4, 3, 32, 32)
    z = model(x)
    assert z.shape == (4, 16)
    torch.testing.assert_close(z, model.projector(model.encoder(x)))
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "projector"}


def test_paper_size_model_forward_backward_on_cpu():
    """Full-width ResNet-18 + GN + non-local, mma, a (2, 16, 3, 224, 224) clip: the paper's setting."""
    torch.manual_seed(0)
    enc = build_encoder(norm="group", nonlocal_stages=(3, 4))
    model = VideoClassifier(enc, build_aggregator("mma", enc.out_dim), LinearHead(enc.out_dim)).train()
    clips = torch.randn(2, 16, 3, 224, 224)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 12:] = False
    logits, w = model(clips, mask, return_weights=True)
    assert logits.shape == (2, 2) and w.shape == (2, 16, 512) and torch.isfinite(logits).all()
    assert (w[1, 12:] == 0).all()
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for name in (
        "encoder.conv1.weight",
        "encoder.nonlocal3.norm.weight",
        "encoder.nonlocal4.norm.weight",
        "aggregator.layers.0.weight",
        "head.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
