"""clman.train.selection: checkpoint selection, early stopping and the not-learning check, in pure Python."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest

from clman.train.selection import Selection, best_score, val_score


def _run(aucs, losses=None, *, epochs=None, window=1, patience=0, every=1, lr=1e-3, has_val=True, resume_at=None):
    """The decisions of a run fed ``aucs`` (and ``losses``), resumed from ``state()`` after ``resume_at``."""
    epochs = epochs or len(aucs)
    losses = losses or [0.7 - 0.05 * e for e in range(len(aucs))]
    sel = Selection(epochs, window, patience, every, lr, has_val)
    out = []
    for e in range(len(aucs)):
        if resume_at is not None and e == resume_at + 1:  # what a checkpoint keeps, through its serializer
            sel = Selection(epochs, window, patience, every, lr, has_val, json.loads(json.dumps(sel.state())))
        d = sel.update(e, losses[e], 0.5, aucs[e] if has_val else None)
        out.append((d, sel.best, sel.score()))
        if d.stop:
            break
    return out, sel


def test_best_mean_over_the_window_is_kept_and_patience_stops():
    aucs = [0.6, 0.9, 0.7, 0.75, 0.9, 0.5, 0.5, 0.95]
    out, sel = _run(aucs, window=2, patience=2)
    improved = [e for e, (d, _, _) in enumerate(out) if d.improved]
    assert improved == [1, 2, 4]  # the window's means: nan, 0.75, 0.8, 0.725, 0.825, 0.7, 0.5
    assert [d.stop for d, _, _ in out] == [False] * 6 + [True]  # 2 epochs after epoch 4 without better
    assert out[-1][0].last and out[-1][0].save and len(out) == 7
    assert sel.best == (pytest.approx(0.825), 4) and sel.state()["best_epoch"] == 4
    assert math.isnan(out[0][2]) and out[1][2] == pytest.approx(0.75)
    _, sel = _run([0.7, 0.8, 0.8])
    assert sel.best == (0.8, 1)  # of equal scores the first is kept: a later epoch must be better


def test_patience_counts_from_the_end_of_the_first_window():
    # no score before epoch window - 1 = 2; patience 1 waits from epoch 1, so a NaN AUC run stops at epoch 2
    out, _ = _run([float("nan")] * 5, window=3, patience=1)
    assert [d.stop for d, _, _ in out] == [False, False, True]
    out, _ = _run([0.5, 0.6, 0.7, 0.8], window=3, patience=1)
    assert not any(d.stop for d, _, _ in out) and [d.improved for d, _, _ in out] == [False, False, True, True]


def test_saves_every_n_epochs_a_new_best_and_the_last():
    out, _ = _run([0.9, 0.8, 0.7, 0.95, 0.6, 0.5], every=2)
    assert [d.save for d, _, _ in out] == [True, True, False, True, False, True]


def test_without_validation_nothing_is_selected_or_stopped():
    out, sel = _run([None] * 4, has_val=False, patience=1, every=3)
    assert not any(d.improved or d.stop for d, _, _ in out)
    assert [d.save for d, _, _ in out] == [False, False, True, True]
    assert sel.best == (None, -1) and sel.state()["val_aucs"] == [] and sel.state()["best_val_score"] is None


def test_not_learning_warns_once_and_the_line_stays():
    flat = [0.694, 0.693, 0.695, 0.694, 0.693, 0.694]
    out, sel = _run([0.8] * 6, flat)
    warnings = [d.warning for d, _, _ in out]
    assert warnings[:2] == ["", ""] and warnings[2].startswith("finetune is not learning: training loss 0.694")
    assert warnings[3:] == [warnings[2]] * 3 and [d.new_warning for d, _, _ in out] == [0, 0, 1, 0, 0, 0]
    assert len(sel.state()["problems"]) == 1
    out, _ = _run([0.52, 0.55, 0.5, 0.58])  # the loss falls, the val AUC stays near chance: judged at the end
    assert [bool(d.warning) for d, _, _ in out] == [False] * 3 + [True]
    assert "best val AUC 0.580 in 4 epochs (chance 0.5)" in out[-1][0].warning
    out, _ = _run([0.52, 0.55, 0.5, 0.58], has_val=False)
    assert not any(d.warning for d, _, _ in out)


def test_an_early_stop_before_the_check_epoch_still_judges_the_loss():
    out, _ = _run([0.8, 0.7, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6], [0.7] * 10, patience=1)
    assert out[-1][0].stop and len(out) == 2 and "training loss 0.700 -> 0.700 in 2 epochs" in out[-1][0].warning


@pytest.mark.parametrize("seed", range(6))
def test_a_resumed_run_decides_as_the_uninterrupted_one(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 12)
    aucs = [rng.choice([float("nan"), round(rng.random(), 2), 0.9]) for _ in range(n)]
    losses = [0.7 + rng.uniform(-0.05, 0.02) for _ in range(n)]
    kw = {
        "epochs": n + rng.randint(0, 3),
        "window": rng.randint(1, 3),
        "patience": rng.randint(0, 3),
        "every": rng.randint(1, 3),
        "has_val": rng.random() < 0.8,
    }
    whole, sel = _run(aucs, losses, **kw)
    for k in range(len(whole) - 1):
        resumed, again = _run(aucs, losses, resume_at=k, **kw)
        assert [d for d, _, _ in resumed] == [d for d, _, _ in whole]
        assert json.dumps(again.state()) == json.dumps(sel.state())


def test_state_round_trips_and_the_best_is_derived_never_trusted():
    sel = Selection(
        10,
        2,
        0,
        1,
        0.01,
        True,
        {
            "val_aucs": [0.5, 0.7, 0.9],
            "best_val_score": 0.1,
            "best_epoch": 0,
            "losses": [0.7] * 3,
            "train_aucs": [0.5] * 3,
            "problems": [],
        },
    )
    assert sel.best == (pytest.approx(0.8), 2) and sel.state()["best_epoch"] == 2
    assert Selection(10, 2, 0, 1, 0.01, True, sel.state()).state() == sel.state()
    assert val_score([0.5, 0.7], 2) == pytest.approx(0.6) and best_score([0.5, 0.7, 0.6], 1) == (0.7, 1)


def test_selection_imports_neither_torch_nor_ray():
    code = (
        "import sys, clman.train.selection; "
        "print(sorted(m for m in ('torch', 'ray', 'numpy', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
