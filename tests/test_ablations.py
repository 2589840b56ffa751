"""Method options for the ablations (issue 23 item 5), on CPU.

- ``pretrain.same_video``: NT-Xent with an anchor's other same-video frames as negatives (the
  paper's reading, unchanged bit for bit), left out of the denominator (``mask``) or as extra
  positives (``positive``, SupCon's L_out), each against a loop written from its formula, in one
  process and across two gloo workers (the video ids are gathered with the projections).
- ``model.mma_bound``: multi-meta attention with (the paper's) or without the tanh on its last
  layer; the Table 3 ablation row that sets it.
- The pretrain loop's ``loss_chance`` / ``loss_ratio``, through the real loop and SimCLR feed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from clman import config as C
from clman import losses
from clman.distributed import all_gather_sizes, all_gather_with_grad, get_rank
from clman.losses import nt_xent, nt_xent_chance
from clman.models import aggregators
from clman.models.aggregators import MultiMetaAttention, build_aggregator

MODES = ("negative", "mask", "positive")


# ---------------------------------------------------------------- NT-Xent: references


def old_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """``clman.losses._nt_xent_fp32`` as it was before ``same_video`` (commit b9a58e4), verbatim."""
    n, dim = z1.shape
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    gathered = all_gather_with_grad(torch.cat([z1, z2], dim=1))
    n_global = gathered.shape[0]
    keys = torch.cat([gathered[:, :dim], gathered[:, dim:]], dim=0)
    queries = torch.cat([z1, z2], dim=0)
    offset = sum(all_gather_sizes(n, z1.device)[: get_rank()])
    local = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([local, local + n_global])
    pos_idx = torch.cat([local + n_global, local])
    logits = queries @ keys.T / temperature
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * n, device=z1.device), self_idx] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    return F.cross_entropy(logits, pos_idx)


def loop_nt_xent(z1: torch.Tensor, z2: torch.Tensor, groups: list[int], t: float, mode: str) -> float:
    """The three losses written out anchor by anchor, in float64: rows 0..N-1 view 1, N..2N-1 view 2."""
    z = torch.cat([z1, z2]).double()
    z = [row / row.norm() for row in z]
    n = len(groups)
    g = list(groups) * 2
    total = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        s = {k: float(z[i] @ z[k]) / t for k in range(2 * n) if k != i}  # every key but the anchor itself
        if mode == "negative":
            den = sum(math.exp(v) for v in s.values())
            total += -(s[pos] - math.log(den))
        elif mode == "mask":  # the positive + the frames of other videos
            den = math.exp(s[pos]) + sum(math.exp(v) for k, v in s.items() if g[k] != g[i])
            total += -(s[pos] - math.log(den))
        else:  # positive: every same-video key, each against the full denominator, averaged
            den = sum(math.exp(v) for v in s.values())
            ps = [k for k in s if g[k] == g[i]]
            assert pos in ps
            total += -sum(s[p] - math.log(den) for p in ps) / len(ps)
    return total / (2 * n)


def batch(seed: int = 0, groups=(3, 3, 7, 3, 7, 1, 5, 5), d: int = 6):
    """z1, z2 (N, d) and (N,) video ids with repeats (three frames of video 3, two of 7 and 5, one of 1)."""
    g = torch.Generator().manual_seed(seed)
    n = len(groups)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.tensor(groups)


# ---------------------------------------------------------------- NT-Xent: one process


@pytest.mark.parametrize("t", [0.5, 0.1])
def test_negative_is_the_old_loss_bit_for_bit(t):
    z1, z2, groups = batch(1)
    old = old_nt_xent(z1, z2, t)
    assert torch.equal(nt_xent(z1, z2, temperature=t), old)
    assert torch.equal(nt_xent(z1, z2, temperature=t, groups=groups), old)  # the ids are ignored
    assert torch.equal(nt_xent(z1, z2, temperature=t, groups=groups, same_video="negative"), old)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("t", [0.5, 0.1])
def test_each_mode_matches_its_loop(mode, t):
    z1, z2, groups = batch(2)
    got = nt_xent(z1, z2, temperature=t, groups=groups, same_video=mode)
    assert float(got) == pytest.approx(loop_nt_xent(z1, z2, groups.tolist(), t, mode), rel=1e-5)


def test_modes_differ_when_videos_repeat_and_agree_when_they_do_not():
    z1, z2, groups = batch(3)
    vals = [float(nt_xent(z1, z2, groups=groups, same_video=m)) for m in MODES]
    assert len({round(v, 6) for v in vals}) == 3, vals
    distinct = torch.arange(len(groups)) * 10 + 4  # any distinct ids
    ref = nt_xent(z1, z2)
    for m in MODES:
        torch.testing.assert_close(nt_xent(z1, z2, groups=distinct, same_video=m), ref, rtol=1e-6, atol=1e-6)
    # mask never scores below negative: it only removes terms from the denominator
    assert vals[1] <= vals[0]


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_every_row(mode):
    z1, z2, groups = batch(4)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    nt_xent(z1, z2, temperature=0.2, groups=groups, same_video=mode).backward()
    for g in (z1.grad, z2.grad):
        assert torch.isfinite(g).all() and (g.abs().sum(dim=1) > 0).all()
    # against float64 finite differences of the loop reference
    a1, a2, _ = batch(4)
    a1, a2 = a1.double().requires_grad_(True), a2.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, y: nt_xent(x, y, temperature=0.2, groups=groups, same_video=mode).double(),
        (a1, a2),
        eps=1e-3,
        atol=1e-3,
        rtol=1e-2,
    )


def test_what_each_mode_does_with_a_videos_other_frame():
    """Frames 0 and 1 of one video at angle theta, two other videos orthogonal to both (similarity 0):
    bringing frame 1 closer costs under negative, pays under positive, and does not matter under mask."""

    def loss(theta: float, mode: str) -> float:
        z = torch.zeros(4, 8)
        z[0, 0] = 1.0
        z[1, 0], z[1, 1] = math.cos(theta), math.sin(theta)
        z[2, 5] = z[3, 6] = 1.0
        return float(nt_xent(z, z, temperature=0.1, groups=torch.tensor([0, 0, 1, 2]), same_video=mode))

    close, far = 0.2, 1.5
    assert loss(close, "negative") > loss(far, "negative")
    assert loss(close, "positive") < loss(far, "positive")
    assert loss(close, "mask") == pytest.approx(loss(far, "mask"), rel=1e-6)


def test_float32_under_autocast_in_every_mode():
    z1, z2, groups = batch(5)
    for m in MODES:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            loss = nt_xent(z1.bfloat16(), z2.bfloat16(), temperature=0.1, groups=groups, same_video=m)
        assert loss.dtype == torch.float32
        assert float(loss) == pytest.approx(
            loop_nt_xent(z1.bfloat16().float(), z2.bfloat16().float(), groups.tolist(), 0.1, m), rel=1e-5
        )


def test_bad_same_video_or_groups_fail_in_one_line():
    z1, z2, groups = batch(6)
    with pytest.raises(ValueError, match=r"same_video must be one of \['negative', 'mask', 'positive'\], got 'both'"):
        nt_xent(z1, z2, groups=groups, same_video="both")
    with pytest.raises(ValueError, match="same_video='mask' needs groups"):
        nt_xent(z1, z2, same_video="mask")
    with pytest.raises(ValueError, match=r"groups must be an \(N,\) = \(8,\) integer tensor, got \(7,\)"):
        nt_xent(z1, z2, groups=groups[:7], same_video="positive")
    with pytest.raises(ValueError, match="integer tensor, got .* torch.float32"):
        nt_xent(z1, z2, groups=groups.float(), same_video="positive")


# ---------------------------------------------------------------- chance level


@pytest.mark.parametrize("mode", MODES)
def test_chance_is_the_loss_of_uninformative_projections(mode):
    """Every projection equal: all similarities 1, the loss is ln(keys in the denominator)."""
    groups = torch.tensor([3, 3, 7, 3, 7, 1, 5, 5])
    z = torch.ones(8, 4)
    got = nt_xent(z, z, temperature=0.5, groups=groups, same_video=mode)
    chance = nt_xent_chance(8, mode, groups)
    assert float(got) == pytest.approx(float(chance), rel=1e-6)
    if mode != "mask":
        assert float(chance) == pytest.approx(math.log(15))
    # the demo's batch: N = 64 frames, 2N - 1 = 127 keys per anchor
    assert float(nt_xent_chance(64)) == pytest.approx(math.log(127)) == pytest.approx(4.844, abs=1e-3)
    with pytest.raises(ValueError, match="needs groups"):
        nt_xent_chance(8, "mask")


def test_chance_metrics():
    from clman.train.pretrain import chance_metrics

    got = chance_metrics(4.47, math.log(127))
    assert got == {"loss_chance": math.log(127), "loss_ratio": pytest.approx(4.47 / math.log(127))}
    assert got["loss_ratio"] == pytest.approx(0.923, abs=1e-3)


def test_loss_trend_compares_the_last_window_with_the_one_before():
    from clman.train.pretrain import loss_trend, trend_window

    assert [trend_window(e) for e in (1, 8, 16, 24, 32, 100)] == [2, 2, 2, 3, 4, 12]
    assert loss_trend([4.0, 3.0, 2.0], 2) is None  # fewer than two windows
    assert loss_trend([9.0, 4.0, 4.0, 3.0, 3.0], 2) == pytest.approx(-0.25)  # (3+3)/(4+4) - 1; epoch 0 not used
    assert loss_trend([2.0, 2.0, 3.0], 1) == pytest.approx(0.5)


def test_convergence_line_says_against_chance_and_whether_it_levelled_off():
    from clman.train.pretrain import convergence_line

    chance = math.log(127)
    flat = {
        "loss": 2.7557,
        "loss_chance": chance,
        "loss_ratio": 2.7557 / chance,
        "loss_trend": -0.013,
        "loss_window": 4,
    }
    line = convergence_line(flat)
    assert line.startswith("loss 2.7557 against chance 4.8442 (ratio 0.569)")
    assert "the last 4 epochs 1.3% below the 4 before: levelled off" in line and "barely" not in line
    falling = {**flat, "loss_trend": -0.06}
    assert "6.0% below the 4 before: still falling, a longer schedule would lower it" in convergence_line(falling)
    barely = {"loss": 4.429, "loss_chance": chance, "loss_ratio": 4.429 / chance}  # no trend yet: said as such
    assert convergence_line(barely) == "loss 4.4290 against chance 4.8442 (ratio 0.914) — barely trained: " + (
        "more epochs (docs/recipes.md)"
    )
    assert convergence_line({"loss": 1.5}) == "loss 1.5000"  # an old run's metrics: no chance level


# ---------------------------------------------------------------- NT-Xent: two gloo workers


def _worker(rank, world, init_file, out_dir, z1, z2, groups, t):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = z1.shape[0] // world
        rows = slice(rank * n, (rank + 1) * n)
        out = {}
        for mode in MODES:
            mine1 = z1[rows].clone().requires_grad_(True)
            mine2 = z2[rows].clone().requires_grad_(True)
            loss = nt_xent(mine1, mine2, temperature=t, groups=groups[rows], same_video=mode)
            loss.backward()
            out[mode] = {"loss": loss.detach(), "g1": mine1.grad, "g2": mine2.grad}
        torch.save(out, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # both ranks done before either tears down its gloo connections
    finally:
        dist.destroy_process_group()


def test_two_workers_match_one_process_in_every_mode(tmp_path):
    """Video 3 has frames on both ranks: its frames on the other rank are still masked / positives."""
    world, t = 2, 0.5
    z1, z2, _ = batch(7)
    groups = torch.tensor([3, 3, 7, 1, 3, 7, 5, 5])  # rank 0: 3 3 7 1, rank 1: 3 7 5 5
    mp.spawn(_worker, args=(world, str(tmp_path / "pg"), str(tmp_path), z1, z2, groups, t), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    n = z1.shape[0] // world
    for mode in MODES:
        a1, a2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        single = nt_xent(a1, a2, temperature=t, groups=groups, same_video=mode)
        single.backward()
        single = single.detach()
        assert float(sum(r[mode]["loss"] for r in ranks) / world) == pytest.approx(float(single), rel=1e-5), mode
        assert float(single) == pytest.approx(loop_nt_xent(z1, z2, groups.tolist(), t, mode), rel=1e-5)
        for r, out in enumerate(ranks):  # the gather's backward: world x the single-process gradient
            rows = slice(r * n, (r + 1) * n)
            torch.testing.assert_close(out[mode]["g1"], world * a1.grad[rows], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(out[mode]["g2"], world * a2.grad[rows], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- multi-meta attention


class OldMMA(nn.Module):
    """``MultiMetaAttention`` as it was before ``bound`` (commit b9a58e4), verbatim but for the checks."""

    def __init__(self, dim: int, depth: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(dim, dim), nn.Tanh()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x, mask):
        x, mask = aggregators.check_frames(x, mask)
        scores = self.layers(x)
        scores = scores.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        weights = torch.softmax(scores, dim=1)
        return (weights * x).sum(dim=1), weights


@pytest.mark.parametrize("depth", [1, 3])
def test_mma_tanh_is_the_old_module_bit_for_bit(depth):
    torch.manual_seed(0)
    new = MultiMetaAttention(16, depth)  # bound defaults to tanh
    torch.manual_seed(0)
    old = OldMMA(16, depth)
    assert new.state_dict().keys() == old.state_dict().keys()
    for k, v in old.state_dict().items():
        assert torch.equal(new.state_dict()[k], v)  # same initialisation draws
    x = torch.randn(3, 9, 16)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    out, w = new(x, mask, return_weights=True)
    old_out, old_w = old(x, mask)
    assert torch.equal(out, old_out) and torch.equal(w, old_w)
    torch.manual_seed(0)
    built = build_aggregator("mma", 16, depth, "tanh")
    assert torch.equal(built(x, mask), out)


def one_salient_frame(bound: str, t: int = 100, d: int = 8):
    """(pooled, weights) of MMA (depth 1) where frame 0's attention logit is 20 in every dimension, the rest 0."""
    mma = MultiMetaAttention(d, depth=1, bound=bound)
    with torch.no_grad():
        lin = mma.layers[0]
        lin.weight.copy_(20.0 * torch.eye(d))  # logit = 20 x feature
        lin.bias.zero_()
    x = torch.zeros(1, t, d)
    x[0, 0] = 1.0  # the salient frame
    return mma(x, return_weights=True)


def test_mma_none_lets_one_frame_dominate_tanh_does_not():
    _, w_none = one_salient_frame("none")
    assert (w_none[0, 0] > 0.9).all()  # e^20 / (e^20 + 99) = 1 - 2e-7
    _, w_tanh = one_salient_frame("tanh")
    bound = math.exp(2) / (math.exp(2) + 99)  # logits in [-1, 1]: tanh(20) ~ 1 against tanh(0) = 0 -> e / (e + 99)
    assert (w_tanh[0, 0] <= bound + 1e-6).all() and (w_tanh[0, 0] < 0.07).all()
    torch.testing.assert_close(w_tanh[0, 0], torch.full((8,), math.e / (math.e + 99)))


def test_mma_none_is_eq4_without_the_last_tanh():
    torch.manual_seed(1)
    mma = MultiMetaAttention(6, depth=2, bound="none")
    lin1, lin2 = [m for m in mma.modules() if isinstance(m, nn.Linear)]
    assert isinstance(mma.layers[-1], nn.Linear) and isinstance(mma.layers[1], nn.Tanh)
    x = torch.randn(2, 5, 6)
    e = lin2(torch.tanh(lin1(x)))  # E_1 = tanh(W_1 F + b_1), E_2 = W_2 E_1 + b_2
    a = torch.softmax(e, dim=1)  # Eq. 5
    torch.testing.assert_close(mma(x), (a * x).sum(dim=1))  # Eq. 6
    # same keys as the tanh module: checkpoints load into either
    assert mma.state_dict().keys() == MultiMetaAttention(6, depth=2).state_dict().keys()
    # padded frames still get weight exactly 0
    mask = torch.tensor([[True] * 3 + [False] * 2] * 2)
    _, w = mma(x, mask, return_weights=True)
    assert (w[:, 3:] == 0).all()
    with pytest.raises(ValueError, match=r"mma bound must be one of \['tanh', 'none'\], got 'relu'"):
        MultiMetaAttention(6, bound="relu")


# ---------------------------------------------------------------- config and the Table 3 row


@pytest.mark.parametrize(
    "job, key, allowed",
    [
        ("pretrain", "pretrain.same_video", r"\['negative', 'mask', 'positive'\]"),
        ("finetune", "model.mma_bound", r"\['tanh', 'none'\]"),
        ("pretrain", "model.mma_bound", r"\['tanh', 'none'\]"),
    ],
)
def test_config_rejects_bad_values_naming_key_and_allowed(job, key, allowed):
    with pytest.raises(C.ConfigError, match=rf"^{key}: 'sometimes' is not one of {allowed}$"):
        C.load(job, None, [f"{key}=sometimes"])


def test_config_defaults_and_choices():
    assert C.PretrainConfig().same_video == "negative"  # the paper's reading: results unchanged
    assert C.ModelConfig().mma_bound == "tanh"
    assert C.load("pretrain", None, ["pretrain.same_video=mask"]).same_video == "mask"
    assert C.load("finetune", None, ["model.mma_bound=none"]).model.mma_bound == "none"
    assert C.SAME_VIDEO == losses.SAME_VIDEO and C.MMA_BOUNDS == aggregators.MMA_BOUNDS
    # a saved config from before these keys still loads, with the defaults
    old = C.to_dict(C.PretrainConfig())
    del old["same_video"], old["model"]["mma_bound"]
    cfg = C.from_dict("pretrain", old)
    assert (cfg.same_video, cfg.model.mma_bound) == ("negative", "tanh")


def test_unbounded_row_is_in_table_3_and_builds_its_model():
    from clman import study
    from clman.models.build import classifier_from, ignored_fields
    from clman.study import tables

    r = study.rows.row("mma_unbounded")
    assert r in study.table_rows(3) and r.tables == (3,) and r.title(3) == "CLMAN (MMA, unbounded)"
    assert r.pretrained and r.ablation and all(math.isnan(v) for v in r.paper_metrics.values())
    assert tables.fmt_pct(r.paper_metrics["auc"]) == "n/a"
    # opt-in: the default study is the paper's rows; naming it trains it (and CLMAN, the reference)
    assert r not in study.select_rows() and r not in study.select_rows("3")
    assert [x.name for x in study.select_rows("3", "mma_unbounded")] == ["mma_unbounded", "clman"]
    clman = C.load("finetune", None, list(study.rows.row("clman").sets)).model
    m = C.load("finetune", None, list(r.sets)).model
    assert m == dataclasses.replace(clman, mma_bound="none")  # CLMAN but for the bound
    assert ignored_fields(m) == []
    torch.manual_seed(0)
    model = classifier_from(dataclasses.replace(m, width=0.125, gn_groups=8))
    assert isinstance(model.aggregator, MultiMetaAttention) and model.aggregator.bound == "none"
    assert not any(isinstance(x, nn.Tanh) for x in model.aggregator.modules())  # depth 1: no tanh at all
    logits, w = model(torch.randn(2, 3, 3, 32, 32), return_weights=True)
    assert logits.shape == (2, 2) and w.shape == (2, 3, 64)
    # a baseline warns that it leaves mma_bound unused
    with pytest.warns(UserWarning, match="model.mma_bound"):
        classifier_from(C.ModelConfig(arch="mc3_18", mma_bound="none"))


# ---------------------------------------------------------------- the pretrain loop


class _NoRay:
    """``ray.get`` for a feed whose "cache" holds (frames, available) tuples in memory."""

    @staticmethod
    def get(x):
        return x


@pytest.mark.parametrize("mode", MODES)
def test_pretrain_loop_passes_video_ids_and_reports_chance(monkeypatch, mode):
    """The real per-worker loop and SimCLR feed, in this process: Ray Train's parts stubbed."""
    from clman.train import feed, pretrain, worker

    seen, reports = [], []
    real_nt_xent = pretrain.nt_xent

    def spy(z1, z2, **kw):
        seen.append(kw["groups"].clone())
        return real_nt_xent(z1, z2, **kw)

    videos = [feed.Video(i, f"mem://{i}", 6, i % 2) for i in range(6)]
    rng = np.random.default_rng(0)
    cache = [(rng.integers(0, 255, (6, 1, 20, 20), dtype=np.uint8), np.arange(6)) for _ in videos]
    monkeypatch.setattr(feed, "ray", _NoRay)
    monkeypatch.setattr(pretrain, "nt_xent", spy)
    monkeypatch.setattr(worker, "restore", lambda model, opt: None)
    monkeypatch.setattr(worker, "prepare", lambda model, scale: (model, torch.device("cpu"), "fp32"))
    monkeypatch.setattr(worker, "report", lambda metrics, *a, **k: reports.append(metrics))
    cfg = C.load(
        "pretrain",
        None,
        [
            "model.width=0.125",
            "model.gn_groups=8",
            "model.nonlocal_stages=[]",
            "model.proj_dim=16",
            "data.size=16",
            "data.store_size=20",
            "data.frames_per_clip=3",
            "pretrain.batch_size=6",
            "pretrain.epochs=2",
            "pretrain.lr=0.5",
            f"pretrain.same_video={mode}",
        ],
    )
    pretrain.train_loop_per_worker(worker.LoopInputs(cfg, {"videos": videos, "cache": cache}))

    assert len(reports) == 2 and len(seen) == 2 * 3  # 6 videos x 3 frames / 6 per batch = 3 steps per epoch
    for g in seen:  # three frames of each of two videos per batch, as ints
        assert g.dtype == torch.int64 and sorted(torch.bincount(g).tolist())[-2:] == [3, 3]
    for m in reports:
        assert math.isfinite(m["loss"])
        expected = math.log(11) if mode != "mask" else math.log(11 - 4)  # 2N - 1 = 11 keys, 4 masked
        assert m["loss_chance"] == pytest.approx(expected, rel=1e-6)
        assert m["loss_ratio"] == pytest.approx(m["loss"] / m["loss_chance"])
