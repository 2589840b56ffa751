"""Finetuning recipes (issue 13): the carved validation split, schedules, class weights, config
errors, the not-learning warning, and a learning test of the demo recipe on the hard phantom.

The unit tests run in milliseconds; the job runs use a local Ray (2 CPU workers) and tiny
synthetic data on the real SeaweedFS, as tests/test_jobs.py.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd
import pytest
import ray
import torch
import torch.nn.functional as F

from clman import config as C
from clman import optim, storage
from clman.metrics import compute_metrics
from clman.train import finetune as loop
from clman.errors import JobError

# ---------------------------------------------------------------- the carved validation split


def _rows(patients: int, videos_per_patient: int = 2, malignant_every: int = 3) -> pd.DataFrame:
    """A training split: patient p malignant when p % malignant_every == 0, a few videos each."""
    rows = [
        {
            "video_id": f"v{p:03d}_{k}",
            "patient_id": f"p{p:03d}",
            "label": int(p % malignant_every == 0),
            "split": "train",
            "fold": -1,
        }
        for p in range(patients)
        for k in range(videos_per_patient)
    ]
    return pd.DataFrame(rows)


def _patients(rows: pd.DataFrame, label: int | None = None) -> set:
    return set(rows["patient_id"] if label is None else rows.loc[rows["label"] == label, "patient_id"])


def test_carve_is_by_patient_stratified_and_deterministic():
    train = _rows(60)  # 20 malignant, 40 benign patients, 2 videos each
    t, v, info = loop.validation_split(train, train.iloc[:0], 0.2, seed=0)
    assert not _patients(t) & _patients(v), "a patient on both sides"
    assert len(t) + len(v) == len(train) and set(t["video_id"]) | set(v["video_id"]) == set(train["video_id"])
    # stratified: each label's share of patients within one of its quota
    assert len(_patients(v, 1)) in (4,) and len(_patients(v, 0)) in (8,)
    assert info["source"] == "carved" and info["videos"] == len(v) == 24 and info["patients"] == 12
    assert info["note"].startswith("no val split: 24 of 120 training videos (by patient")
    again = loop.validation_split(train.sample(frac=1.0, random_state=3), train.iloc[:0], 0.2, seed=0)[1]
    assert sorted(again["video_id"]) == sorted(v["video_id"]), "the carve depends on row order"
    other = loop.validation_split(train, train.iloc[:0], 0.2, seed=1)[1]
    assert sorted(other["video_id"]) != sorted(v["video_id"])
    assert (v["split"] == "val").all() and (t["split"] == "train").all()


def test_manifest_val_split_is_used_and_fraction_0_keeps_todays_behaviour():
    train, val = _rows(20), _rows(10).assign(split="val", patient_id=lambda d: "q" + d["patient_id"])
    t, v, info = loop.validation_split(train, val, 0.2, seed=0)
    assert t is train and v is val and info["source"] == "manifest"
    t, v, info = loop.validation_split(train, train.iloc[:0], 0.0, seed=0)
    assert t is train and len(v) == 0 and info["source"] == "none"


def test_carve_that_leaves_a_class_out_names_the_counts():
    with pytest.raises(
        JobError,
        match=r"finetune.val_fraction=0.2 leaves a class out: the 2 benign and 1 "
        r"malignant training patients would split into .* for validation",
    ):
        loop.validation_split(_rows(3), _rows(3).iloc[:0], 0.2, seed=0)
    one_class_val = _rows(4).assign(split="val", label=0)
    with pytest.raises(JobError, match=r"split 'val' holds 8 benign and 0 malignant videos"):
        loop.validation_split(_rows(10), one_class_val, 0.2, seed=0)


# ---------------------------------------------------------------- schedule, weights, optimizer


def test_schedule_is_a_pure_function_of_the_step():
    const = [optim.schedule("constant", s, 10, 0.1, 4) for s in range(12)]
    assert const == pytest.approx([0.025, 0.05, 0.075, 0.1] + [0.1] * 8)
    assert [optim.schedule("constant", s, 10, 0.1) for s in (0, 9)] == [0.1, 0.1]
    cos = [optim.schedule("cosine", s, 10, 0.1, 2) for s in range(11)]
    assert cos == [optim.warmup_cosine(s, 10, 0.1, 2) for s in range(11)]
    assert cos[1] == pytest.approx(0.1) and cos[6] == pytest.approx(0.05) and cos[10] == 0.0
    with pytest.raises(ValueError, match=r"unknown learning-rate schedule 'step'; valid: \['constant', 'cosine'\]"):
        optim.schedule("step", 0, 10, 0.1)
    assert tuple(C.SCHEDULES) == optim.SCHEDULES


def test_balanced_class_weights_equalise_the_classes():
    w = loop.class_weights([0, 0, 0, 1], "balanced")  # n / (2 n_c)
    assert w.tolist() == pytest.approx([4 / 6, 4 / 2])
    assert loop.class_weights([0, 1, 0, 1], "balanced").tolist() == [1.0, 1.0]
    assert loop.class_weights([0, 0, 1], "none") is None
    # each class then contributes the same total to the summed loss
    logits, labels = torch.zeros(4, 2), torch.tensor([0, 0, 0, 1])
    per = F.cross_entropy(logits, labels, weight=w, reduction="none")
    assert per[labels == 0].sum().item() == pytest.approx(per[labels == 1].sum().item())


def test_optimizers_and_lr_groups():
    from clman.models.build import classifier_from

    base = C.load("finetune", None, ["model.width=0.125", "model.gn_groups=4", "finetune.encoder_lr_scale=0.1"])
    sgd = loop.make_optimizer(classifier_from(base.model), base)
    assert isinstance(sgd, torch.optim.SGD) and [g["lr"] for g in sgd.param_groups] == pytest.approx([1e-4, 1e-5])
    cfg = C.load(
        "finetune",
        None,
        [
            "model.width=0.125",
            "model.gn_groups=4",
            "finetune.optimizer=adamw",
            "finetune.lr=1e-3",
            "finetune.weight_decay=0.05",
        ],
    )
    adamw = loop.make_optimizer(classifier_from(cfg.model), cfg)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.optimizer=adam", "finetune.optimizer: 'adam' is not one of ['sgd', 'adamw']"),
        ("finetune.schedule=step", "finetune.schedule: 'step' is not one of ['constant', 'cosine']"),
        ("finetune.class_weights=auto", "finetune.class_weights: 'auto' is not one of ['none', 'balanced']"),
        ("finetune.lr=-1", "finetune.lr: must be > 0 to learn (0 is accepted"),
        ("finetune.val_fraction=1", "finetune.val_fraction: must be in [0.0, 0.9]"),
        ("finetune.warmup_epochs=11", "finetune.warmup_epochs: must be in [0, 10]"),
        ("finetune.label_smoothing=0.5", "finetune.label_smoothing: must be in [0.0, 0.49]"),
        ("finetune.grad_clip=-1", "finetune.grad_clip: must be >= 0.0"),
        ("finetune.patience=-1", "finetune.patience: must be >= 0"),
        ("finetune.select_window=0", "finetune.select_window: must be >= 1"),
    ],
)
def test_recipe_config_errors_name_the_key_and_the_valid_values(override, message):
    with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        C.load("finetune", None, ["finetune.epochs=10", override])


def test_presets_keep_the_papers_recipe_and_the_demo_recipe_is_valid():
    paper = C.load("finetune", "jobs/configs/paper.yaml")
    assert (
        paper.optimizer,
        paper.lr,
        paper.momentum,
        paper.weight_decay,
        paper.schedule,
        paper.warmup_epochs,
        paper.grad_clip,
        paper.label_smoothing,
        paper.class_weights,
    ) == ("sgd", 1e-4, 0.9, 5e-4, "constant", 0, 0.0, 0.0, "none")
    assert C.load("finetune", None, ["finetune.lr=0"]).lr == 0.0
    C.load("finetune", "jobs/configs/demo-cpu.yaml")


def test_val_score_is_the_mean_val_auc_of_the_last_window_epochs():
    aucs = [0.70, 0.99, 0.75, 0.85, 0.90, 0.92]
    assert math.isnan(loop.val_score(aucs[:2], 3)), "no score before the window is full"
    assert loop.val_score(aucs[:3], 3) == pytest.approx(0.8133, abs=1e-4) and loop.val_score(aucs, 3) == pytest.approx(
        0.89
    )
    assert loop.val_score(aucs, 1) == 0.92 and loop.val_score(aucs[:2], 1) == 0.99  # 1 = that epoch's AUC
    assert (
        math.isnan(loop.val_score([0.8, float("nan"), 0.9], 2)) and loop.val_score([0.8, float("nan"), 0.9], 1) == 0.9
    )
    # the spike of epoch 2 (0.99) wins by one epoch's AUC and loses to the later, steadier epochs by a mean of 3
    best = max(range(2, len(aucs)), key=lambda e: loop.val_score(aucs[: e + 1], 3))
    assert best == 5 and max(range(len(aucs)), key=lambda e: aucs[e]) == 1
    # what a resumed run recomputes from the val AUCs in its checkpoint (the first of equal scores wins)
    assert loop.best_score(aucs, 3) == (pytest.approx(0.89), 5) and loop.best_score(aucs, 1) == (0.99, 1)
    assert loop.best_score(aucs[:2], 3) == (None, -1) and loop.best_score([0.7, 0.8, 0.8], 1) == (0.8, 1)


def test_not_learning_fires_on_a_flat_loss_or_chance_val_auc_only():
    assert loop.check_epoch(12) == 3 and loop.check_epoch(2) == 1 and loop.check_epoch(320) == 106
    flat = loop.loss_stalled([0.694, 0.693, 0.695])  # lr 0
    assert flat == "training loss 0.694 -> 0.695 in 3 epochs (best 0.693, not 4% below 0.694)"
    assert loop.loss_stalled([0.75, 0.8, 0.86]).startswith("training loss 0.750 -> 0.860")  # the run
    assert loop.loss_stalled([0.73, 0.70, 0.69, 0.67]) == ""  # slow (the hard phantom), but falling
    assert loop.loss_stalled([0.5, 0.45, 0.47]) == ""  # a good encoder: below chance from the start
    assert loop.val_at_chance([0.52, 0.48, float("nan"), 0.55]) == "best val AUC 0.550 in 4 epochs (chance 0.5)"
    assert loop.val_at_chance([0.52, 0.61]) == ""
    line = loop.not_learning([flat, "best val AUC 0.550 in 4 epochs (chance 0.5)"], lr=0.0)
    assert line.startswith("finetune is not learning: training loss 0.694 -> 0.695 in 3 epochs") and "\n" not in line
    assert "(now 0)" in line and "finetune.lr" in line and "epochs" in line and "data.size" in line
    assert loop.not_learning([], lr=1e-3) == ""


# ---------------------------------------------------------------- job runs: local Ray, hard phantom

HARD_CASES = 200  # 120 train (24 of them carved for validation) / 80 test videos, 100 patients
# The demo recipe's finetune section as it is; only the model is made small (and T = 8 at 64 px, as the demo).
SMALL = ["model.width=0.125", "model.gn_groups=4", "data.size=64", "scale.num_workers=2", "scale.cpus_per_worker=0.5"]
# What is stable here (docs/recipes.md). The 10-epoch recipe before, on the first hard phantom:
# training loss 16-18 % below its first epoch's (0.73 -> 0.60 and 0.61), test AUC 0.65-0.72 on this draw
# but 0.39-0.45 on another (that phantom could not be learnt at this size). The 40-epoch recipe with
# its checkpoint picked by a 5-epoch mean, on the phantom as it is now: loss 0.728 -> 0.394, training
# AUC 0.95, test AUC 0.756 (80 videos, 58 s). With lr 0 the loss moves 2 %.
MIN_LOSS_FALL = 0.10
MIN_TEST_AUC = 0.65


@pytest.fixture(scope="module")
def local_ray():
    from clman.launch.session import init_ray

    init_ray(num_cpus=2)  # as the jobs start it: Train's placement-group cleaner works, so runs free their CPUs
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def hard_manifest(s3):
    """HARD_CASES hard-phantom sweeps (64 px high, 22-38 frames), ingested 60/40 by patient, no val split."""
    from clman.data.ingest import ingest, labeled_items
    from clman.data.synth import SynthConfig, write_dataset

    name = "recipe-hard"
    s3.make_bucket(name)
    write_dataset(
        f"s3://{name}/raw", HARD_CASES, seed=0, cfg=SynthConfig(difficulty="hard", size=64), workers=2, progress=False
    )
    ingest(
        labeled_items(f"s3://{name}/raw", f"s3://{name}/raw/labels.csv"),
        f"s3://{name}/data",
        ratios=(0.6, 0.0, 0.4),
        seed=0,
        workers=2,
        keep_ids=True,
    )
    return f"s3://{name}/data/manifest.parquet"


def _scored_auc(model: str, manifest: str) -> tuple[float, int]:
    from clman.evaluate import scoring

    scored = scoring.score_split(model, manifest, "test", C.EvaluateConfig(bootstrap=0))
    return compute_metrics(np.asarray(scored["score"]), np.asarray(scored["label"]))["auc"], len(scored["score"])


@pytest.mark.slow
def test_demo_recipe_learns_the_hard_phantom(hard_manifest, bucket, local_ray):
    from jobs import finetune

    t0 = time.time()
    cfg = C.load("finetune", "jobs/configs/demo-cpu.yaml", SMALL)
    assert (cfg.optimizer, cfg.schedule, cfg.class_weights, cfg.val_fraction) == ("adamw", "cosine", "balanced", 0.2)
    fin = finetune.run(cfg, hard_manifest, f"{bucket}/runs", "demo-recipe")
    saved = json.loads(storage.read_text(f"{bucket}/runs/demo-recipe/metrics.json"))
    assert saved["validation"]["source"] == "carved" and saved["validation"]["videos"] > 0
    assert saved["kept"] == "best val_score (mean val AUC of 5 epochs)", saved["kept"]
    kept, aucs = saved["metrics"], saved["history"]["val_auc"]
    assert (
        kept["val_score"]
        == kept["best_val_score"]
        == pytest.approx(np.mean(aucs[kept["epoch"] - 4 : kept["epoch"] + 1]))
    )
    assert kept["epoch"] >= 4 and kept["best_epoch"] == kept["epoch"]
    assert saved["warnings"] == [] and saved["last_metrics"]["warning"] == "", saved["warnings"]  # it learns
    last, losses = saved["last_metrics"], saved["history"]["train_loss"]
    assert len(losses) == last["epoch"] + 1 and 0.0 <= last["train_auc"] <= 1.0
    auc, videos = _scored_auc(fin["model"], hard_manifest)
    print(
        f"demo recipe on the hard phantom: training loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"train AUC {last['train_auc']:.3f}, test AUC {auc:.3f} ({videos} videos), "
        f"kept epoch {fin['metrics']['epoch']}, {time.time() - t0:.0f} s"
    )
    assert min(losses) <= (1 - MIN_LOSS_FALL) * losses[0], f"training loss {losses}"
    assert auc >= MIN_TEST_AUC, f"test AUC {auc:.3f} < {MIN_TEST_AUC}"


@pytest.mark.slow
def test_lr_zero_warns_once_and_stops_early_with_a_checkpoint(hard_manifest, bucket, local_ray):
    """lr 0 learns nothing: the one-line warning, in metrics.json; the val AUC never improves, so
    patience 1 stops the run after its second epoch, whose report still carries a checkpoint."""
    from jobs import finetune

    # 32 px, T = 4: what is checked does not depend on the size
    cfg = C.load(
        "finetune",
        "jobs/configs/demo-cpu.yaml",
        SMALL
        + [
            "data.size=32",
            "data.num_frames=4",
            "finetune.lr=0",
            "finetune.epochs=4",
            "finetune.patience=1",
            "finetune.select_window=1",
        ],
    )
    fin = finetune.run(cfg, hard_manifest, f"{bucket}/runs", "lr0")
    saved = json.loads(storage.read_text(f"{bucket}/runs/lr0/metrics.json"))
    assert saved["stopped_early"] and saved["last_metrics"]["epoch"] == 1 and saved["metrics"]["epoch"] == 0
    (warning,) = saved["warnings"]
    assert warning.startswith("finetune is not learning: training loss "), warning
    assert "\n" not in warning and "finetune.lr" in warning and "(now 0)" in warning
    assert storage.exists(fin["model"])
