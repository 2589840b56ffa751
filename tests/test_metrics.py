"""Metrics against scikit-learn, undefined cases, bootstrap CIs, and two gloo workers."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, average_precision_score, confusion_matrix, f1_score, roc_auc_score

from clman.metrics import (
    METRIC_NAMES,
    BinaryMetrics,
    UndefinedMetricWarning,
    bootstrap_ci,
    compute_metrics,
    specificity_at_sensitivity,
)


def sklearn_metrics(scores, labels, threshold=0.5):
    pred = (np.asarray(scores) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    return {
        "accuracy": accuracy_score(labels, pred),
        "ap": average_precision_score(labels, scores),
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "f1": f1_score(labels, pred),
        "auc": roc_auc_score(labels, scores),
    }


def _case(seed, n=60, decimals=None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    # Informative but overlapping scores; float32 values so the streaming class
    # (float32 states) and the functional path see the same numbers.
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1).astype(np.float32)
    if decimals is not None:
        scores = np.round(scores, decimals).astype(np.float32)  # heavy ties
    return scores.astype(np.float64), labels


def _assert_close(ours, ref):
    assert set(ours) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert ours[name] == pytest.approx(ref[name], abs=1e-6), name


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_match_sklearn(decimals, threshold):
    scores, labels = _case(0, decimals=decimals)
    ref = sklearn_metrics(scores, labels, threshold)
    _assert_close(compute_metrics(scores, labels, threshold=threshold), ref)
    m = BinaryMetrics(threshold=threshold)
    for chunk in np.array_split(np.arange(len(labels)), 3):  # streamed in batches
        m.update(torch.from_numpy(scores[chunk]), torch.from_numpy(labels[chunk]))
    _assert_close(m.compute(), ref)
    m.reset()
    m.update(scores[:10], labels[:10])
    _assert_close(m.compute(), sklearn_metrics(scores[:10], labels[:10], threshold))


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(0, 1, width=32), st.integers(0, 1)),
        min_size=2,
        max_size=40,
    ).filter(lambda d: len({y for _, y in d}) == 2),
    tied=st.booleans(),
)
def test_match_sklearn_random(data, tied):
    scores = np.array([s for s, _ in data], dtype=np.float64)
    if tied:
        scores = np.round(scores, 1)
    labels = np.array([y for _, y in data])
    _assert_close(compute_metrics(scores, labels), sklearn_metrics(scores, labels))


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_nan_with_warning(label):
    scores, labels = np.array([0.2, 0.7, 0.9]), np.full(3, label)
    undefined = {"auc", "ap", "sensitivity" if label == 0 else "specificity"}
    for compute in (
        lambda: compute_metrics(scores, labels),
        lambda: _streamed(scores, labels),
    ):
        with pytest.warns(UndefinedMetricWarning, match="no (positive|negative)") as rec:
            out = compute()
        assert all(math.isnan(out[k]) for k in undefined), out
        assert all(not math.isnan(out[k]) for k in set(METRIC_NAMES) - undefined - {"f1"}), out
        assert str(next(iter(undefined - {"auc", "ap"}))) in str(rec[0].message)
        assert out["accuracy"] == pytest.approx(np.mean((scores >= 0.5) == labels))


def test_f1_undefined_only_without_positives_and_positive_calls():
    with pytest.warns(UndefinedMetricWarning, match="f1"):
        out = compute_metrics([0.1, 0.2], [0, 0])
    assert math.isnan(out["f1"]) and out["specificity"] == 1.0


def _streamed(scores, labels):
    m = BinaryMetrics()
    m.update(scores, labels)
    return m.compute()


@pytest.mark.parametrize(
    "scores, labels, match",
    [
        ([0.1, float("nan")], [0, 1], "finite"),
        ([0.1, 1.5], [0, 1], r"\[0, 1\]"),
        ([0.1, 0.4], [0, 2], "labels must be 0"),
        ([0.1, 0.4, 0.3], [0, 1], "length"),
        ([], [], "no cases"),
        ([[0.1, 0.4]], [[0, 1]], "1-D"),
    ],
)
def test_bad_inputs_raise(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(scores, labels)
    if scores:
        with pytest.raises(ValueError, match=match):
            BinaryMetrics().update(scores, labels)


def test_specificity_at_sensitivity_from_exact_roc():
    scores, labels = _case(3, n=80, decimals=1)
    spec, thr = specificity_at_sensitivity(scores, labels, sensitivity=0.95)
    # Brute force over every candidate threshold.
    best = max(
        (sklearn_metrics(scores, labels, t)["specificity"], t)
        for t in np.unique(scores)
        if sklearn_metrics(scores, labels, t)["sensitivity"] >= 0.95
    )
    assert (spec, thr) == pytest.approx(best)
    # The threshold is an operating point for BinaryMetrics (score >= threshold is malignant).
    out = compute_metrics(scores, labels, threshold=thr)
    assert out["sensitivity"] >= 0.95 and out["specificity"] == pytest.approx(spec)
    with pytest.warns(UndefinedMetricWarning):
        assert all(math.isnan(v) for v in specificity_at_sensitivity([0.2, 0.3], [1, 1]))


def test_bootstrap_ci_contains_estimate_and_is_reproducible():
    scores, labels = _case(4, n=80)
    point = compute_metrics(scores, labels)
    ci = bootstrap_ci(scores, labels, n_boot=200, seed=7)
    assert ci == bootstrap_ci(scores, labels, n_boot=200, seed=7)
    assert ci != bootstrap_ci(scores, labels, n_boot=200, seed=8)
    for name in METRIC_NAMES:
        lo, hi = ci[name]
        assert lo <= point[name] <= hi, (name, lo, point[name], hi)
        assert hi - lo < 0.5


def test_bootstrap_counts_single_class_resamples():
    # 1 positive in 6 cases: about (5/6)^6 = 33% of resamples hold no positive.
    scores, labels = [0.1, 0.2, 0.3, 0.4, 0.6, 0.9], [0, 0, 0, 0, 0, 1]
    with pytest.warns(UndefinedMetricWarning, match="skipped"):
        ci, skipped = bootstrap_ci(scores, labels, n_boot=100, seed=0, return_skipped=True)
    assert 15 < skipped < 55
    assert set(ci) == set(METRIC_NAMES) and not any(math.isnan(v) for pair in ci.values() for v in pair)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        ci, skipped = bootstrap_ci([0.2, 0.3], [1, 1], n_boot=10, return_skipped=True)
    assert skipped == 10 and all(math.isnan(v) for pair in ci.values() for v in pair)


# Worker splits of the 60 cases: uneven batches, and a worker left without cases.
SPLITS = {"uneven": (0, 23, 60), "one-worker-empty": (0, 60, 60)}


def _worker(rank, world, init_file, out_dir, scores, labels):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = BinaryMetrics()
        results = {}
        for name, cuts in SPLITS.items():
            m.reset()
            lo, hi = cuts[rank], cuts[rank + 1]
            for start in range(lo, hi, 7):  # a few batches per worker
                stop = min(start + 7, hi)
                m.update(torch.from_numpy(scores[start:stop]), torch.from_numpy(labels[start:stop]))
            results[name] = m.compute()
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        # Both ranks done before either tears down its gloo connections: rank 1 once died of SIGABRT
        # ("terminate called without an active exception") when rank 0 destroyed the group first.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_workers_match_union(tmp_path):
    scores, labels = _case(5, decimals=2)
    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), scores, labels), nprocs=2, join=True)
    ref = sklearn_metrics(scores, labels)
    for r in range(2):
        results = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert set(results) == set(SPLITS)
        for name in SPLITS:
            _assert_close(results[name], ref)
