"""One scoring protocol for validation and test (issue 23 item 4).

``evaluate.frames`` / ``evaluate.clips`` decide how the finetune loop validates and how
``jobs.evaluate``, the demo and the study's trials score: the same frames of a video
(``clman.data.sampling.scoring_clips``), the mean P(malignant) of its K clips, and ``all``
(every frame) refused for a fixed-T Table 4 baseline in one line before any worker starts.
CPU, no Ray: the scoring functions and the loop are called directly on tiny real mp4 files.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from clman import checkpoint as ckpt
from clman import config as C
from clman.data import frames as F
from clman.data.sampling import SCORING, clip_indices, scoring_clips, segment_indices
from clman.evaluate.inference import score_clips, score_frames
from clman.metrics import compute_metrics
from clman.models.build import classifier_from
from clman.evaluate import scoring
from clman.train import feed
from clman.train import finetune as loop

# A tiny CLMAN: what is checked does not depend on the size.
TINY = ["model.width=0.125", "model.gn_groups=4", "data.size=32", "data.num_frames=4"]


def _video(n: int, seed: int) -> np.ndarray:
    """(n, 32, 32, 3) grey uint8 frames whose content differs by seed."""
    from tests.media import frames

    grey = frames(n, seed=seed, gray=True)
    return np.repeat(grey[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    """Six real mp4 files (13-30 frames) on local disk: {"uri": [...], "frames": [...]}."""
    from tests.media import pyav_mp4

    d = tmp_path_factory.mktemp("clips")
    uris, counts = [], [30, 13, 24, 17, 3, 21]
    for i, n in enumerate(counts):
        path = d / f"v{i}.mp4"
        path.write_bytes(pyav_mp4(_video(n, seed=i), gop=4))
        uris.append(str(path))
    return {"uri": uris, "frames": counts}


# ---------------------------------------------------------------- the index selection


def test_clip_indices_are_fixed_phases_of_the_training_segments():
    for n in (1, 3, 7, 8, 24, 80, 81, 1000):
        for T in (1, 4, 8, 16):
            assert clip_indices(n, T, 1)[0].tolist() == segment_indices(n, T, train=False).tolist(), (n, T)
            for K in (2, 3, 4):
                idx = clip_indices(n, T, K)
                assert idx.shape == (K, T) and idx.dtype == np.int64
                assert (idx >= 0).all() and (idx < n).all()
                assert (np.diff(idx, axis=1) >= 0).all(), "a clip is in time order"
                assert np.array_equal(idx, clip_indices(n, T, K)), "no randomness"
                if n >= T:  # clip k's i-th frame is the one at phase (k + 1/2) / K of segment i
                    edges = np.arange(T + 1) * n / T
                    at = edges[:-1][None] + np.diff(edges)[None] * ((np.arange(K)[:, None] + 0.5) / K)  # (K, T)
                    assert ((idx <= at) & (at < idx + 1)).all(), (n, T, K, idx)
                    assert ((idx + 1 > edges[:-1]) & (idx < edges[1:])).all(), "a frame of its segment"
                    assert (np.diff(idx, axis=0) >= 0).all(), "later clips sit later in each segment"
    assert clip_indices(24, 8, 3).tolist() == [list(range(k, 24, 3)) for k in range(3)]  # every frame once
    assert clip_indices(3, 8, 2).tolist() == [[0, 0, 0, 1, 1, 1, 2, 2]] * 2  # shorter than T: repeated
    assert scoring_clips(600, 8, "all", 4, 512).tolist() == [segment_indices(600, 512, train=False).tolist()]
    assert scoring_clips(20, 8, "all", 4, 512).tolist() == [list(range(20))]
    with pytest.raises(ValueError, match="'clip' is not one of"):
        scoring_clips(20, 8, "clip", 1, 512)
    assert SCORING == C.EVAL_FRAMES


@pytest.mark.parametrize("frames,clips", [("clips", 1), ("clips", 3), ("clips", 4), ("all", 4)])
def test_validation_and_test_scoring_read_the_same_frames(clips_dir, frames, clips):
    """The finetune loop's ScoredClips feed and test scoring's decode task pick and decode the same frames."""
    data = C.load("finetune", None, TINY).data
    videos = [feed.Video(i, u, n, i % 2) for i, (u, n) in enumerate(zip(clips_dir["uri"], clips_dir["frames"]))]
    cfg = C.load("finetune", None, TINY + [f"evaluate.frames={frames}", f"evaluate.clips={clips}"])
    val = loop.validation_feed({"videos": videos, "cache": None}, cfg, 4, rank=0, world=1, pin=False)
    for v in videos:
        batch = {"uri": np.array([v.uri]), "num_frames": np.array([v.num_frames]), "video_index": np.array([v.index])}
        scored = scoring._decode(batch, data.stored_size, data.num_frames, frames, clips)
        idx = scored["frame_idx"][0]  # (K, T)
        expected = scoring_clips(v.num_frames, data.num_frames, frames, clips, F.MAX_CACHED_FRAMES)
        assert np.array_equal(idx, expected)
        for epoch in (0, 7):  # the same frames in every epoch
            assert np.array_equal(val.indices(v, epoch), idx.ravel()), (v.num_frames, epoch)
        decoded = F.decode_stored(v.uri, idx.ravel(), data.stored_size)  # what validation streams / picks
        assert np.array_equal(scored["frames"][0], decoded.reshape(*idx.shape, *decoded.shape[1:]))
    assert val.batch_size == (4 if frames == "clips" else 1)  # whole videos differ in length: one per batch


def test_finetune_validates_with_the_evaluate_section():
    cfg = C.load("finetune", None, TINY + ["evaluate.clips=3"])
    assert (cfg.val_frames, cfg.val_clips) == ("clips", 3)
    assert (C.load("finetune", None, TINY).val_frames, C.load("finetune", None, TINY).val_clips) == ("clips", 4)
    assert C.load("finetune", None, TINY + ["evaluate.frames=all"]).val_frames == "all"  # CLMAN takes any length
    same = C.load("finetune", None, TINY + ["evaluate.clips=2", "finetune.val_clips=2"])
    assert same.val_clips == 2
    with pytest.raises(
        C.ConfigError,
        match=r"^finetune.val_clips=2 differs from evaluate.clips=4: validation "
        r"scores videos as evaluation does; set evaluate.clips alone$",
    ):
        C.load("finetune", None, TINY + ["finetune.val_clips=2"])
    with pytest.raises(C.ConfigError, match=r"^evaluate.frames: 'clip' is now 'clips' with evaluate.clips=1"):
        C.load("finetune", None, ["evaluate.frames=clip"])
    for preset in ("jobs/configs/demo-cpu.yaml", "jobs/configs/paper.yaml"):
        tree = C.load_tree(preset)
        fin, ev = C.job_config(tree, "finetune"), C.job_config(tree, "evaluate")
        assert (fin.val_frames, fin.val_clips) == (ev.frames, ev.clips) and ev.frames == "clips", preset


# ---------------------------------------------------------------- K-clip averaging


def _model(sets=()):
    torch.manual_seed(0)
    cfg = C.load("finetune", None, TINY + list(sets))
    return classifier_from(cfg.model).eval(), cfg


def test_k_clip_score_is_the_mean_of_single_clip_scores(clips_dir):
    model, cfg = _model()
    uri, n = clips_dir["uri"][0], clips_dir["frames"][0]
    idx = clip_indices(n, cfg.data.num_frames, 4)  # (4, T)
    decoded = F.decode_stored(uri, idx.ravel(), cfg.data.stored_size)  # (4 * T, C, S, S)
    frames = torch.from_numpy(decoded).reshape(*idx.shape, *decoded.shape[1:])  # (4, T, C, S, S)
    singles = [score_frames(model, frames[k], idx[k], cfg.data.size).score for k in range(4)]
    assert len({round(s, 6) for s in singles}) > 1, "the clips should differ"
    pred = score_clips(model, frames, idx, cfg.data.size)
    assert pred.score == pytest.approx(float(np.mean(singles)), abs=1e-6)
    assert score_clips(model, frames[:1], idx[:1], cfg.data.size).score == pytest.approx(singles[0], abs=1e-6)
    # frame weights: each clip's (mma, sums to 1) / K, summed per distinct source frame
    assert pred.frame_index.tolist() == sorted(set(idx.ravel().tolist()))
    assert pred.frame_weight.sum() == pytest.approx(1.0, abs=1e-5)
    assert set(pred.top_frames(3)) <= set(idx.ravel().tolist())


def _scored_by_test(model, cfg, uris, counts, frames: str, clips: int) -> list[float]:
    """Each video's score as test scoring computes it (scoring._decode, then the Scorer's score_clips)."""
    out = []
    for i, (u, n) in enumerate(zip(uris, counts)):
        batch = {"uri": np.array([u]), "num_frames": np.array([n]), "video_index": np.array([i])}
        d = scoring._decode(batch, cfg.data.stored_size, cfg.data.num_frames, frames, clips)
        out.append(score_clips(model, torch.from_numpy(d["frames"][0]), d["frame_idx"][0], cfg.data.size).score)
    return out


def _expected(scores, labels) -> dict:
    p = np.asarray(scores)
    nll = -np.mean([math.log(s if y == 1 else 1 - s) for s, y in zip(p, labels)])
    return {"val_loss": nll, "val_auc": compute_metrics(p, np.asarray(labels))["auc"]}


@pytest.mark.parametrize("clips", [1, 3])
def test_validate_averages_k_clips_as_test_scoring_does(clips_dir, clips):
    """finetune.validate on (B, K * T) batches = the mean of each video's K clip probabilities (score_clips)."""
    model, cfg = _model()
    uris, counts = clips_dir["uri"][:4], clips_dir["frames"][:4]
    labels = [0, 1, 1, 0]
    want = _expected(_scored_by_test(model, cfg, uris, counts, "clips", clips), labels)
    stacked = []
    for u, n in zip(uris, counts):  # the batch the ScoredClips feed assembles: clip-major (K * T) frames per video
        idx = scoring.scored_indices(n, cfg.data.num_frames, "clips", clips).ravel()
        stacked.append(F.decode_stored(u, idx, cfg.data.stored_size))
    batches = [
        {"frames": torch.from_numpy(np.stack(stacked[i : i + 2])), "label": torch.tensor(labels[i : i + 2])}
        for i in (0, 2)
    ]
    got = loop.validate(model, batches, torch.device("cpu"), cfg.data.size, "fp32", clips)
    assert got["val_loss"] == pytest.approx(want["val_loss"], abs=1e-5)
    assert got["val_auc"] == pytest.approx(want["val_auc"])


class _TrainFeed:
    """One training batch per epoch, from the first two clips (no Ray)."""

    def __init__(self, clips_dir, data):
        self.videos = [feed.Video(i, clips_dir["uri"][i], clips_dir["frames"][i], i % 2) for i in range(2)]
        self.frames = np.stack(
            [
                F.decode_stored(v.uri, segment_indices(v.num_frames, data.num_frames, train=False), data.stored_size)
                for v in self.videos
            ]
        )

    def steps(self, epoch: int = 0) -> int:
        return 1

    def order(self, epoch: int) -> list[int]:
        return [0, 1]

    def batches(self, epoch: int):
        yield {"frames": torch.from_numpy(self.frames), "video": torch.arange(2), "label": torch.tensor([0, 1])}


def test_finetune_loop_validates_with_evaluates_protocol(clips_dir, monkeypatch):
    """The training loop builds its ScoredClips feed from evaluate.frames / clips (via finetune.val_*), and the
    val loss / AUC it reports are those of test scoring's scores of the same videos (lr 0: the model stays)."""
    from clman.train import worker

    cfg = C.load(
        "finetune",
        None,
        TINY
        + [
            "evaluate.clips=3",
            "finetune.epochs=1",
            "finetune.lr=0",
            "finetune.batch_size=2",
            "finetune.optimizer=adamw",
        ],
    )
    made, reported = [], []

    real_validation_feed = loop.validation_feed

    def validation_feed(source, cfg, *args, **kwargs):
        made.append((cfg.val_frames, cfg.val_clips))
        return real_validation_feed(source, cfg, *args, **kwargs)

    def local_fetch(self, positions, epoch):
        """The real feed (indices, batch assembly) with local decoding in place of Ray tasks."""
        for p in positions:
            v, want = self.videos[p], self.indices(self.videos[p], epoch)
            yield v, (F.decode_stored(v.uri, want, self.data.stored_size), None), want

    val_videos = [
        feed.Video(i, clips_dir["uri"][i], clips_dir["frames"][i], y) for i, y in zip(range(2, 6), (0, 1, 1, 0))
    ]
    monkeypatch.setattr(loop, "validation_feed", validation_feed)
    monkeypatch.setattr(feed.Feed, "_fetch", local_fetch)
    monkeypatch.setattr(worker, "restore", lambda model, optimizer: None)
    monkeypatch.setattr(worker, "prepare", lambda model, scale: (model, torch.device("cpu"), "fp32"))
    monkeypatch.setattr(loop, "training_feed", lambda source, cfg, *a, **kw: _TrainFeed(clips_dir, cfg.data))
    monkeypatch.setattr(worker, "report", lambda metrics, model, *a, **kw: reported.append((metrics, model)))
    loop.train_loop_per_worker(worker.LoopInputs(cfg, {}, {"videos": val_videos, "cache": None}))
    assert made == [("clips", 3)]
    ((metrics, model),) = reported
    assert metrics["val_scoring"] == "clips: mean of 3 clip(s) of T=4"
    scores = _scored_by_test(
        model.eval(), cfg, [v.uri for v in val_videos], [v.num_frames for v in val_videos], "clips", 3
    )
    want = _expected(scores, [v.label for v in val_videos])
    assert metrics["val_loss"] == pytest.approx(want["val_loss"], abs=1e-5)
    assert metrics["val_auc"] == pytest.approx(want["val_auc"])


# ---------------------------------------------------------------- all: CLMAN only


ALL_FOR_BASELINE = (
    r"evaluate.frames=all: model.arch=timesformer is trained on clips of data.num_frames=4 frames "
    r"spread over the video and is scored on such clips; use evaluate.frames=clips \('all', every "
    r"frame at stride 1, is for CLMAN only\)"
)
TINY_TIMESFORMER = [
    "model.arch=timesformer",
    "model.tf_dim=16",
    "model.tf_depth=1",
    "model.tf_heads=1",
    "model.tf_patch=8",
    "model.tf_size=32",
    "model.tf_frames=4",
    "data.size=32",
    "data.num_frames=4",
]


def _manifest(tmp_path, clips_dir) -> str:
    from clman.data.manifest import write_manifest

    n = len(clips_dir["uri"])
    rows = pd.DataFrame(
        {
            "video_id": [f"v{i}" for i in range(n)],
            "patient_id": [f"p{i}" for i in range(n)],
            "label": [i % 2 for i in range(n)],
            "split": ["train", "train", "val", "val", "test", "test"],
            "fold": [-1] * n,
            "uri": clips_dir["uri"],
            "num_frames": clips_dir["frames"],
            "fps": [10.0] * n,
            "height": [32] * n,
            "width": [32] * n,
            "sha256": ["0" * 64] * n,
            "source": ["test"] * n,
        }
    )
    uri = str(tmp_path / "manifest.parquet")
    write_manifest(rows, uri)
    return uri


def test_all_frames_for_a_fixed_t_baseline_is_refused_in_one_line_before_any_worker(tmp_path, clips_dir, capsys):
    import ray

    from jobs import evaluate, finetune
    from tests.test_bad_input import run_job

    with pytest.raises(C.ConfigError, match=f"^{ALL_FOR_BASELINE}$"):
        C.load("finetune", None, TINY_TIMESFORMER + ["evaluate.frames=all"])
    manifest = _manifest(tmp_path, clips_dir)
    line = run_job(
        finetune,
        [
            "--manifest",
            manifest,
            "--out",
            str(tmp_path / "runs"),
            "--set",
            "evaluate.frames=all",
            *[a for s in TINY_TIMESFORMER for a in ("--set", s)],
        ],
        capsys,
    )
    assert line == "error: " + ALL_FOR_BASELINE.replace("\\", "")
    # evaluate: the checkpoint says which arch; refused before Ray starts
    cfg = C.load("finetune", None, TINY_TIMESFORMER)
    model = classifier_from(cfg.model)
    path = str(tmp_path / "model.pt")
    ckpt.save_checkpoint(path, model, kind="classifier", config=C.to_dict(cfg), step=0, epoch=0)
    line = run_job(evaluate, ["--checkpoint", path, "--manifest", manifest, "--set", "evaluate.frames=all"], capsys)
    assert line == f"error: {path}: " + ALL_FOR_BASELINE.replace("\\", "")
    assert not ray.is_initialized(), "a worker could have started"
    assert scoring.check_checkpoint(path, C.EvaluateConfig()).model.arch == "timesformer"  # clips are fine


def test_a_study_with_all_frames_and_a_baseline_row_fails_at_planning(tmp_path, clips_dir):
    from clman.study import StudyError
    from clman.study.driver import plan_study

    manifest = _manifest(tmp_path, clips_dir)
    with pytest.raises(StudyError, match=r"^row timesformer: evaluate.frames=all: model.arch=timesformer is trained"):
        plan_study(
            manifest,
            str(tmp_path / "out"),
            "s",
            tables="4",
            rows="timesformer",
            holdout=True,
            sets=["evaluate.frames=all", "data.num_frames=4"],
        )
