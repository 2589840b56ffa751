"""Tune sweeps: search-space files, trial tables and summaries (fast), then real sweeps on a local Ray."""

from __future__ import annotations

import io
import json
import math
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pandas as pd
import pytest

from clman import config as C
from clman import storage
from clman.errors import JobError
from clman.launch import ray_compat, resources
from clman.tune import driver, results
from clman.tune import sweep as sweeps
from clman.tune.space import SpaceError, load_space, parse_yaml, space_from_dict

DEMO = "jobs/configs/demo-cpu.yaml"


def _space_file(tmp_path, text: str, name: str = "space.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- search-space files ---------------------------------------------------------
def test_shipped_spaces_load_against_their_jobs():
    tree = C.load_tree(DEMO)
    ft = load_space("tune_spaces/finetune_lr_depth.yaml", "finetune", tree)
    assert ft.keys == ["finetune.lr", "model.mma_depth"]
    assert ft.get("finetune.lr").kind == "loguniform" and ft.get("finetune.lr").args == (1e-5, 1e-2)
    assert ft.get("model.mma_depth").args == (1, 4)
    pt = load_space("tune_spaces/pretrain_lr_temperature.yaml", "pretrain", tree)
    assert pt.keys == ["pretrain.lr", "pretrain.temperature"]


def test_randint_includes_both_ends():
    space = space_from_dict({"model.mma_depth": {"randint": [1, 4]}}, "finetune")
    domain = driver.param_space(space)["model.mma_depth"]
    drawn = set(np.asarray(domain.sample(size=400, random_state=np.random.RandomState(0))).tolist())
    assert drawn == {1, 2, 3, 4}


def test_space_converts_to_ray_domains():
    from ray.tune.search.sample import Categorical, Float

    space = space_from_dict(
        {
            "finetune.lr": {"loguniform": [1e-5, 1e-2]},
            "finetune.momentum": {"uniform": [0.8, 0.99]},
            "model.aggregator": {"choice": ["mma", "mean"]},
            "finetune.batch_size": {"grid": [4, 8]},
        },
        "finetune",
    )
    d = driver.param_space(space)
    assert isinstance(d["finetune.lr"], Float) and isinstance(d["finetune.lr"].get_sampler(), Float._LogUniform)
    assert isinstance(d["finetune.momentum"].get_sampler(), Float._Uniform)
    assert isinstance(d["model.aggregator"], Categorical) and d["model.aggregator"].categories == ["mma", "mean"]
    assert d["finetune.batch_size"] == {"grid_search": [4, 8]}
    assert space.has_grid
    samples = d["finetune.lr"].sample(size=200, random_state=np.random.RandomState(0))
    assert min(samples) >= 1e-5 and max(samples) <= 1e-2
    # The trial's values land in the right sections; 1e-4 written YAML-1.1 style is a number.
    tree = space.apply({"finetune": {"epochs": 3}}, {"finetune.lr": np.float64(3e-4), "model.aggregator": "mean"})
    cfg = C.job_config(tree, "finetune")
    assert cfg.lr == 3e-4 and cfg.model.aggregator == "mean" and cfg.epochs == 3
    parsed = parse_yaml("finetune.lr: {loguniform: [1e-5, 1e-2]}")  # YAML 1.1 alone reads strings here
    assert space_from_dict(parsed, "finetune").get("finetune.lr").args == (1e-5, 1e-2)


@pytest.mark.parametrize(
    "text, match",
    [
        ("finetune.lrr: {loguniform: [1.0e-5, 1.0e-2]}", r"space.yaml: finetune.lrr: unknown key.*'lr'"),
        ("modell.mma_depth: {randint: [1, 4]}", r"space.yaml: modell.mma_depth: unknown key: section 'modell'"),
        ("pretrain.lr: {loguniform: [1.0e-5, 1.0e-2]}", r"space.yaml: pretrain.lr: unknown key: section 'pretrain'"),
        ("lr: {loguniform: [1.0e-5, 1.0e-2]}", r"space.yaml: key 'lr': expected <section>.<field>"),
        (
            "model.mma_depth: {choice: [one, two]}",
            r"space.yaml: model.mma_depth: choice value 'one' is not valid"
            r".*expected an integer",
        ),
        ("model.mma_depth: {uniform: [1, 4]}", r"space.yaml: model.mma_depth: uniform value 1.0 is not valid"),
        ("model.mma_depth: {randint: [0, 3]}", r"space.yaml: model.mma_depth: randint value 0 is not valid.*>= 1"),
        ("model.aggregator: {choice: [mma, transformer]}", r"model.aggregator: choice value 'transformer'.*one of"),
        ("model.mma_depth: {choice: []}", r"space.yaml: model.mma_depth: empty choice"),
        ("finetune.batch_size: {grid: []}", r"space.yaml: finetune.batch_size: empty grid"),
        ("finetune.lr: {loguniform: [1.0e-2, 1.0e-5]}", r"space.yaml: finetune.lr: loguniform lo > hi"),
        ("model.mma_depth: {randint: [4, 1]}", r"space.yaml: model.mma_depth: randint lo > hi"),
        ("finetune.lr: {loguniform: [-1.0e-3, 1.0e-2]}", r"space.yaml: finetune.lr: loguniform needs 0 < lo"),
        (
            "finetune.lr: {uniform: [-1.0e-3, 1.0e-2]}",
            r"space.yaml: finetune.lr: uniform value -0.001 is not valid.*> 0",
        ),
        ("finetune.lr: {choice: [1.0e-3, -1.0e-3]}", r"finetune.lr: choice value -0.001 is not valid.*> 0"),
        ("finetune.lr: {uniform: [1.0e-3, 1.0e-3]}", r"single value; fix it with --set finetune.lr"),
        ("finetune.lr: {loguniform: [1.0e-3]}", r"finetune.lr: loguniform takes \[lo, hi\]"),
        ("finetune.lr: {loguniform: [a, b]}", r"finetune.lr: bounds must be numbers"),
        ("model.mma_depth: {randint: [1.5, 4]}", r"randint bounds must be integers"),
        ("finetune.lr: {normal: [0, 1]}", r"finetune.lr: unknown distribution 'normal'"),
        ("finetune.lr: 1.0e-3", r"finetune.lr: expected one of \['loguniform'"),
        ("scale.num_workers: {choice: [1, 2]}", r"scale.num_workers: sets the resources of every trial"),
        ("data.decode_cpus: {choice: [0.5, 1.0]}", r"data.decode_cpus: sets the resources"),
        ("finetune.lr: {loguniform: [1.0e-5, 1.0e-2]}\nfinetune.lr: {choice: [1.0e-3]}", r"space.yaml: duplicate key"),
        ("[1, 2]", r"space.yaml: expected a mapping"),
        ("", r"space.yaml: expected a mapping"),
        ("finetune.lr: {loguniform: [1.0e-5, 1.0e-2]", r"space.yaml: not valid YAML"),
    ],
)
def test_bad_space_files_fail_with_one_line_naming_file_and_key(tmp_path, text, match):
    path = _space_file(tmp_path, text)
    with pytest.raises(SpaceError, match=match) as info:
        load_space(path, "finetune", C.load_tree(DEMO))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, C.ConfigError)  # the CLI prints it as one line, exit status 2


def test_candidates_are_checked_on_top_of_the_base_config(tmp_path):
    # data.num_frames 2 is fine alone; frames_per_clip 1 in the base makes no difference, but a
    # base config that is itself invalid for a candidate shows up in the message.
    path = _space_file(tmp_path, "data.size: {choice: [4, 32]}")
    with pytest.raises(SpaceError, match=r"data.size: choice value 4 is not valid: data.size: must be >= 8"):
        load_space(path, "finetune", C.load_tree(DEMO))


def test_missing_space_file_is_a_clear_error(tmp_path):
    with pytest.raises(SpaceError, match=r"nope.yaml: no such search-space file"):
        load_space(str(tmp_path / "nope.yaml"), "finetune")


# -- the sweep's arguments --------------------------------------------------------
def _sweep(tmp_path, job="finetune", space="tune_spaces/finetune_lr_depth.yaml", **kw) -> sweeps.Sweep:
    return sweeps.new_sweep(
        job, space, 4, "manifest.parquet", str(tmp_path), kw.pop("run_name", "s1"), DEMO, ["finetune.epochs=4"], **kw
    )


def test_sweep_round_trips_through_json(tmp_path):
    sweep = _sweep(tmp_path, scheduler="fifo", seed=3)
    again = sweeps.Sweep.from_dict(json.loads(json.dumps(sweep.to_dict())))
    assert again == sweep
    assert again.base_config().epochs == 4 and again.max_epochs() == 4
    cfg = again.trial_config({"finetune.lr": 2e-3, "model.mma_depth": 3})
    assert cfg.lr == 2e-3 and cfg.model.mma_depth == 3 and cfg.model.width == 0.25  # preset kept
    # trials keep checkpoints by each epoch's val_auc, what the sweep ranks and ASHA compares; said once
    assert again.base_config().select_window == 5 and cfg.select_window == 1
    assert again.window_note().startswith("finetune.select_window=5 is not used by the trials")
    assert (
        sweeps.new_sweep(
            "finetune",
            "tune_spaces/finetune_lr_depth.yaml",
            4,
            "m",
            str(tmp_path),
            "s2",
            DEMO,
            ["finetune.select_window=1"],
        ).window_note()
        == ""
    )


def test_sweep_checks_its_options(tmp_path):
    with pytest.raises(C.ConfigError, match="--grace-period 9 is more than the 4 epoch"):
        _sweep(tmp_path, grace_period=9)
    with pytest.raises(SpaceError, match="'grid' needs --search random"):
        path = _space_file(tmp_path, "finetune.lr: {grid: [1.0e-3, 1.0e-2]}")
        _sweep(tmp_path, space=path, search="optuna")
    with pytest.raises(C.ConfigError, match="--samples must be >= 1"):
        sweeps.new_sweep("finetune", "tune_spaces/finetune_lr_depth.yaml", 0, "m", str(tmp_path), "x", DEMO)
    with pytest.raises(SpaceError, match="unknown job 'evaluate'"):
        sweeps.new_sweep("evaluate", "tune_spaces/finetune_lr_depth.yaml", 2, "m", str(tmp_path), "x", DEMO)
    with pytest.raises(SpaceError, match="section 'finetune' is not part of a pretrain sweep"):
        _sweep(tmp_path, job="pretrain")


def test_max_concurrent_trials_from_cluster_resources():
    cfg = C.load("finetune", DEMO, ["scale.num_workers=1"])  # 0.5 CPU worker + 0.5 CPU decoder + driver
    assert resources.max_concurrent_trials({"CPU": 2.0}, cfg) == 1
    assert resources.max_concurrent_trials({"CPU": 16.0}, cfg) == 15
    gpu = C.load("finetune", DEMO, ["scale.num_workers=2", "scale.gpus_per_worker=1", "scale.cpus_per_worker=2"])
    assert resources.max_concurrent_trials({"CPU": 64.0, "GPU": 8.0}, gpu) == 4  # GPUs limit: 8 / 2
    assert resources.max_concurrent_trials({"CPU": 10.0, "GPU": 8.0}, gpu) == 2  # CPUs limit: 10 / 4.51
    with pytest.raises(
        JobError, match=r"one trial needs 4.51 CPU\(s\) and 2 GPU\(s\) but the Ray cluster has 64 CPU\(s\) and 1 GPU"
    ):
        resources.max_concurrent_trials({"CPU": 64.0, "GPU": 1.0}, gpu)


# -- result tables and the summary, from fake trial histories --------------------
def _history(aucs, lr, depth, t0=1000.0, ckpt_every=2):
    rows = []
    for e, auc in enumerate(aucs):
        rows.append(
            {
                "epoch": e,
                "epochs_done": e + 1,
                "step": 3 * (e + 1),
                "train_loss": 0.7 - 0.01 * e,
                "lr": lr,
                "clips_per_s": 5.0,
                "val_auc": auc,
                "val_accuracy": 0.6 + 0.01 * e,
                "val_ap": auc - 0.05,
                "val_sensitivity": 0.5,
                "val_specificity": 0.7,
                "val_f1": 0.55,
                "val_loss": 0.69 - 0.02 * e,
                "time_this_iter_s": 2.0,
                "time_total_s": 2.0 * (e + 1),
                "timestamp": t0 + e,
                "training_iteration": e + 1,
                "done": False,
                "trial_id": "x",
                "pid": 1,
                "hostname": "h",
                "node_ip": "1",
                "date": "d",
                "checkpoint_path": f"/ck/{e}" if (e + 1) % ckpt_every == 0 else None,
                "config/finetune.lr": lr,
                "config/model.mma_depth": depth,
            }
        )
    return pd.DataFrame(rows)


def _records():
    R = results.TrialRecord
    return [
        R("t1", "TERMINATED", {"finetune.lr": 1e-3, "model.mma_depth": 1}, _history([0.6, 0.7, 0.8, 0.75], 1e-3, 1)),
        R("t2", "TERMINATED", {"finetune.lr": 1e-2, "model.mma_depth": 2}, _history([0.5, 0.55], 1e-2, 2)),
        # Restarted after a driver failure: epochs 1-2 reported twice, the last report wins.
        R(
            "t3",
            "TERMINATED",
            {"finetune.lr": 1e-4, "model.mma_depth": 4},
            pd.concat([_history([0.7, 0.9, 0.85], 1e-4, 4), _history([0.7, 0.91, 0.88, 0.86], 1e-4, 4).iloc[1:]]),
        ),
        R(
            "t4",
            "ERROR",
            {"finetune.lr": 9e-3, "model.mma_depth": 3},
            _history([0.4], 9e-3, 3),
            "FloatingPointError: non-finite loss nan at epoch 1, step 4: lower the learning rate",
        ),
        R("t5", "PENDING", {"finetune.lr": 5e-5, "model.mma_depth": 1}, None),
    ]


KEYS = ["finetune.lr", "model.mma_depth"]
SIX = ["val_auc", "val_accuracy", "val_ap", "val_sensitivity", "val_specificity", "val_f1"]


def test_tables_keep_every_metric_of_every_trial_and_epoch():
    records = _records()
    epochs = results.epochs_table(records, KEYS)
    assert set(SIX + ["val_loss", "train_loss", "epoch", "epochs_done", "timestamp"] + KEYS) <= set(epochs.columns)
    assert not any(c.startswith("config/") for c in epochs.columns) and "pid" not in epochs.columns
    assert epochs.groupby("trial_id").size().to_dict() == {"t1": 4, "t2": 2, "t3": 4, "t4": 1}
    assert epochs[(epochs.trial_id == "t3") & (epochs.epoch == 1)]["val_auc"].item() == 0.91

    trials = results.trials_table(records, "finetune", KEYS, {r.trial_id: 4 for r in records})
    assert trials["trial_id"].tolist() == ["t3", "t1", "t2", "t4", "t5"]  # by val_auc, unscored last
    by = trials.set_index("trial_id")
    assert by.loc["t3", "best_epoch"] == 1 and by.loc["t3", "val_auc"] == 0.91 and by.loc["t3", "val_ap"] == 0.91 - 0.05
    assert by.loc["t3", "val_loss"] == pytest.approx(0.67) and by.loc["t3", "status"] == "completed"
    assert by.loc["t1", "best_epoch"] == 2 and by.loc["t1", "val_accuracy"] == pytest.approx(0.62)
    assert by.loc["t2", "status"] == "stopped" and by.loc["t2", "epochs_done"] == 2
    assert by.loc["t4", "status"] == "error" and "non-finite loss" in by.loc["t4", "error"]
    assert by.loc["t5", "status"] == "pending" and math.isnan(by.loc["t5", "val_auc"])
    assert by.loc["t1", "checkpoint"] == "" and by.loc["t3", "checkpoint"] == "/ck/1"
    assert by.loc["t1", "seconds"] == 8.0
    for m in SIX + ["val_loss"]:
        assert by.loc[["t1", "t2", "t3", "t4"], m].notna().all(), m


def test_ties_on_val_auc_go_to_the_lower_val_loss():
    """val AUC saturates at 1.0 on easy data: between epochs and between trials tied on it, the lower val
    loss wins (the demo sweep of 2026-12-07 ranked an early-stopped trial first by listing order alone)."""
    R = results.TrialRecord
    early = _history([0.9, 1.0], 5e-3, 4)  # val loss 0.69 - 0.02 e: 0.67 at its 1.0
    late = _history([0.8, 1.0, 0.99, 1.0], 1e-3, 1)  # 1.0 at epochs 1 (0.67) and 3 (0.63)
    records = [R("early", "TERMINATED", {}, early), R("late", "TERMINATED", {}, late)]
    trials = results.trials_table(records, "finetune", KEYS, {"early": 2, "late": 4})
    assert trials["trial_id"].tolist() == ["late", "early"]
    by = trials.set_index("trial_id")
    assert by.loc["late", "best_epoch"] == 3 and by.loc["late", "val_loss"] == pytest.approx(0.63)
    assert by.loc["early", "best_epoch"] == 1 and by.loc["early", "val_auc"] == 1.0
    # without a val loss to break it, the tie keeps the listing order
    no_loss = [R(r.trial_id, r.status, r.config, r.history.drop(columns="val_loss")) for r in records]
    assert results.trials_table(no_loss, "finetune", KEYS, {"early": 2, "late": 4})["trial_id"].tolist() == [
        "early",
        "late",
    ]


def test_write_results_makes_tables_summary_best_preset_and_plot(tmp_path):
    sweep = _sweep(tmp_path, run_name="fake")
    uris = results.write_results(sweep, _records())
    run = tmp_path / "fake"
    for name in ("trials.parquet", "trials.csv", "epochs.parquet", "summary.md", "best.yaml", "auc_vs_lr.png"):
        assert (run / name).stat().st_size > 0, name
    assert uris["summary.md"] == str(run / "summary.md")
    trials = storage.read_parquet(str(run / "trials.parquet")).to_pandas()
    assert trials["trial_id"].tolist()[0] == "t3" and set(SIX) <= set(trials.columns)
    assert pd.read_csv(run / "trials.csv")["trial_id"].tolist() == trials["trial_id"].tolist()
    assert len(storage.read_parquet(str(run / "epochs.parquet"))) == 11
    # best.yaml is a preset: the demo config with the best trial's values.
    best = C.load("finetune", str(run / "best.yaml"))
    assert best.lr == 1e-4 and best.model.mma_depth == 4 and best.epochs == 4 and best.model.width == 0.25
    summary = (run / "summary.md").read_text()
    assert "![val_auc against learning rate](auc_vs_lr.png)" in summary
    assert summary.index("| t3 |") < summary.index("| t1 |") < summary.index("| t2 |")
    assert "```yaml" in summary and "mma_depth: 4" in summary
    assert "non-finite loss" in summary and "randint [1, 4] (both included)" in summary
    assert (run / "auc_vs_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_results_raises_when_every_trial_failed(tmp_path):
    sweep = _sweep(tmp_path, run_name="bad")
    records = [results.TrialRecord("t1", "ERROR", {"finetune.lr": 1e-3, "model.mma_depth": 1}, None, "boom")]
    with pytest.raises(JobError, match="all 1 trial\\(s\\) failed; first error: boom"):
        results.write_results(sweep, records)
    assert (tmp_path / "bad" / "trials.csv").exists() and not (tmp_path / "bad" / "best.yaml").exists()
    assert "No trial reported a finite" in (tmp_path / "bad" / "summary.md").read_text()


def test_cli_requires_sweep_args_or_resume(capsys):
    from jobs import tune as job

    with pytest.raises(SystemExit):
        job.parse(["--out", "x", "--job", "finetune"])
    assert "--space is required (or --resume RUN_NAME)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        job.parse(["--out", "x", "--resume", "s1", "--samples", "3"])
    assert "drop --samples" in capsys.readouterr().err
    args = job.parse(["--out", "x", "--resume", "s1", "--restart-errored"])
    assert args.resume == "s1" and args.restart_errored


def test_resumed_asha_replays_stored_results_into_its_rungs(tmp_path):
    sched = driver.ResumableASHA(
        str(tmp_path), "none", time_attr="epochs_done", max_t=4, grace_period=1, reduction_factor=2
    )
    sched.set_search_properties("val_auc", "max")
    assert sched.replay(_records()) == 11  # t1..t4's stored epochs (t5 never reported)
    new = driver._StoredTrial("t9")
    sched.on_trial_add(None, new)  # nothing stored under tmp_path/none: no second replay, no error
    # At rung 1 the stored trials reported 0.6, 0.5, 0.7 and 0.4: the median is 0.55.
    assert sched.on_trial_result(None, new, {"epochs_done": 1, "val_auc": 0.52}) == "STOP"
    other = driver._StoredTrial("t10")
    sched.on_trial_add(None, other)
    assert sched.on_trial_result(None, other, {"epochs_done": 1, "val_auc": 0.8}) == "CONTINUE"
    fresh = driver.ResumableASHA(str(tmp_path), "none", time_attr="epochs_done", max_t=4, grace_period=1)
    fresh.set_search_properties("val_auc", "max")
    fresh.on_trial_add(None, new)  # a fresh sweep: nothing to replay
    assert fresh.on_trial_result(None, new, {"epochs_done": 1, "val_auc": 0.1}) == "CONTINUE"


# -- real sweeps: jobs.tune in a subprocess (its own local Ray), data on the real local S3 --
# 0.45 + 0.45 + 0.01 CPUs a trial: two trials at once on a 2-CPU Ray.
TINY = [
    "scale.num_workers=1",
    "scale.cpus_per_worker=0.45",
    "data.decode_cpus=0.45",
    "data.size=32",
    "data.num_frames=4",
    "model.width=0.125",
    "model.gn_groups=4",
    "finetune.batch_size=4",
    "finetune.checkpoint_every=1",
]


@pytest.fixture(scope="module")
def tiny_data(s3):
    """24 synthetic sweeps of 8 frames at 32x32 on S3, ingested: 12 train / 12 val videos, both classes."""
    from clman.data import ingest as I
    from clman.data.synth import SynthConfig, write_dataset

    root = s3.make_bucket(f"tune-{uuid.uuid4().hex[:8]}")
    write_dataset(f"{root}/videos", 24, seed=0, cfg=SynthConfig(size=32, frames=8), workers=1, progress=False)
    I.ingest(
        I.labeled_items(f"{root}/videos", f"{root}/videos/labels.csv"),
        f"{root}/data",
        ratios=(0.5, 0.5, 0.0),
        seed=0,
        workers=2,
        keep_ids=True,
    )
    manifest = f"{root}/data/manifest.parquet"
    rows = storage.read_parquet(manifest).to_pandas()
    assert set(rows["split"]) == {"train", "val"} and rows.groupby("split")["label"].nunique().min() == 2
    return manifest, root


def _tune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.tune", *args]


def _sets(items) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _env():
    # The s3 fixture put the AWS_* variables in os.environ; the driver and its Ray workers inherit them.
    return {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}


def _tail(path, n=60) -> str:
    lines = open(path, errors="replace").read().splitlines()
    return "\n".join(ln for ln in lines if "PlacementGroupCleaner" not in ln)[-6000:] if lines else ""


@pytest.mark.slow
def test_asha_sweep_records_every_metric_of_every_trial(tiny_data, tmp_path):
    manifest, root = tiny_data
    out = f"{root}/sweeps"
    # A learning rate this small leaves each model at its seeded initialisation, so each depth's
    # validation AUC after epoch 1 is fixed whatever order the shuffled batches take: 0.69, 0.60,
    # 0.46, 0.23 for depths 3, 4, 2, 1 at the time of writing. Two trials run at once, so depths 2
    # and 1 report after 3 or 4 has, and ASHA (keeping the top quarter) stops them. Should a model
    # change reorder these AUCs, put the grid back in decreasing order of its epoch-1 AUC.
    space = _space_file(
        tmp_path, "finetune.lr: {loguniform: [1.0e-8, 1.0e-7]}\nmodel.mma_depth: {grid: [3, 4, 2, 1]}\n"
    )
    log_path = tmp_path / "tune.log"
    t0 = time.time()
    with open(log_path, "w") as logf:
        proc = subprocess.run(
            _tune_cmd(
                "--job",
                "finetune",
                "--space",
                space,
                "--samples",
                "1",
                "--reduction-factor",
                "4",
                "--grace-period",
                "1",
                "--manifest",
                manifest,
                "--out",
                out,
                "--run-name",
                "asha",
                "--config",
                DEMO,
                *_sets(TINY + ["finetune.epochs=2"]),
            ),
            env=_env(),
            stdout=logf,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    seconds = time.time() - t0
    assert proc.returncode == 0, _tail(log_path)
    print(f"4-trial ASHA sweep: {seconds:.0f} s")

    trials = storage.read_parquet(f"{out}/asha/trials.parquet").to_pandas()
    assert sorted(trials["model.mma_depth"]) == [1, 2, 3, 4]
    assert trials["finetune.lr"].between(1e-8, 1e-7).all()
    assert set(trials["status"]) <= {"completed", "stopped"}, trials[["trial_id", "status", "error"]]
    stopped = trials[trials["status"] == "stopped"]
    assert len(stopped) >= 1, trials[["model.mma_depth", "val_auc", "status"]]
    log_text = log_path.read_text()
    assert "up to 2 trial(s) at once" in log_text
    assert "frames of train and val for every trial ready" in log_text  # decoded once, not per trial
    # Train's placement-group cleaner works on the local Ray without a dashboard (ray_compat.setup_local_worker):
    # no failed State API polls, and the stopped trials' placement groups are released by it.
    assert "Failed to query Ray Train Controller actor state" not in log_text
    assert "Cleaning up placement group" in log_text
    assert (stopped["epochs_done"] == 1).all() and (trials.loc[trials.status == "completed", "epochs_done"] == 2).all()
    for m in SIX + ["val_loss", "train_loss"]:
        assert trials[m].notna().all(), m
    assert trials["val_auc"].is_monotonic_decreasing
    assert (trials["checkpoint"].str.len() > 0).all()
    csv = pd.read_csv(io.StringIO(storage.read_text(f"{out}/asha/trials.csv")))
    assert csv["trial_id"].tolist() == trials["trial_id"].tolist()

    epochs = storage.read_parquet(f"{out}/asha/epochs.parquet").to_pandas()
    assert epochs.groupby("trial_id").size().to_dict() == dict(zip(trials["trial_id"], trials["epochs_done"]))
    for m in SIX + ["val_loss", "train_loss", "epoch", "finetune.lr", "model.mma_depth"]:
        assert epochs[m].notna().all(), m

    summary = storage.read_text(f"{out}/asha/summary.md")
    assert "](auc_vs_lr.png)" in summary and "```yaml" in summary
    assert storage.read_bytes(f"{out}/asha/auc_vs_lr.png")[:4] == b"\x89PNG"
    best = C.load("finetune", f"{out}/asha/best.yaml")
    assert best.model.mma_depth == int(trials.iloc[0]["model.mma_depth"]) and best.model.width == 0.125
    assert json.loads(storage.read_text(f"{out}/asha/sweep.json"))["run_name"] == "asha"


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(tiny_data, tmp_path):
    manifest, root = tiny_data
    out, name = f"{root}/sweeps", "killed"
    space = _space_file(tmp_path, "model.mma_depth: {grid: [1, 2]}\n")
    log_path = tmp_path / "tune.log"
    logf = open(log_path, "w")
    # Its own session: the driver's local Ray (GCS, raylet) shares its process group.
    proc = subprocess.Popen(
        _tune_cmd(
            "--job",
            "finetune",
            "--space",
            space,
            "--samples",
            "1",
            "--scheduler",
            "fifo",
            "--manifest",
            manifest,
            "--out",
            out,
            "--run-name",
            name,
            "--config",
            DEMO,
            # One trial at a time, so the second is still running when the first has finished.
            *_sets(TINY + ["finetune.epochs=1", "scale.cpus_per_worker=0.5", "data.decode_cpus=0.5"]),
        ),
        env=_env(),
        stdout=logf,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        finished: set[str] = set()
        while not finished:
            assert proc.poll() is None, f"the sweep ended before it could be killed:\n{_tail(log_path)}"
            assert time.time() < deadline, f"no trial finished in 600 s:\n{_tail(log_path)}"
            time.sleep(2)
            statuses = results.trial_statuses(out, name)
            finished = {t for t, s in statuses.items() if s == "TERMINATED"}
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: no chance to save anything more
        killed_at = time.time()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        time.sleep(3)
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of the killed driver's Ray
        logf.close()
    assert len(statuses) == 2 and len(finished) == 1, statuses

    resume_log = tmp_path / "resume.log"
    with open(resume_log, "w") as f:
        again = subprocess.run(
            _tune_cmd("--resume", name, "--out", out), env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=600
        )
    assert again.returncode == 0, _tail(resume_log)
    assert "1 finished trial(s) kept" in resume_log.read_text()

    trials = storage.read_parquet(f"{out}/{name}/trials.parquet").to_pandas()
    assert sorted(trials["trial_id"]) == sorted(statuses) and (trials["status"] == "completed").all()
    for m in SIX:
        assert trials[m].notna().all(), m
    # The finished trial was not run again: its one epoch was reported once, before the kill.
    records = {r.trial_id: r for r in driver.collect(out, name, ["model.mma_depth"])}
    (done,) = finished
    h = records[done].history
    assert len(h) == 1 and float(h["timestamp"].max()) < killed_at
    other = next(t for t in statuses if t != done)
    assert float(records[other].history["timestamp"].max()) > killed_at


def test_pretrain_sweeps_rank_by_lowest_loss(tmp_path):
    sweep = sweeps.new_sweep(
        "pretrain",
        "tune_spaces/pretrain_lr_temperature.yaml",
        2,
        "m.parquet",
        str(tmp_path),
        "pre",
        DEMO,
        ["pretrain.epochs=3"],
    )

    def history(losses):
        return pd.DataFrame(
            [
                {
                    "epoch": e,
                    "epochs_done": e + 1,
                    "loss": v,
                    "lr": 0.1,
                    "images_per_s": 9.0,
                    "time_this_iter_s": 1.0,
                    "timestamp": 100.0 + e,
                }
                for e, v in enumerate(losses)
            ]
        )

    records = [
        results.TrialRecord(
            "a", "TERMINATED", {"pretrain.lr": 0.1, "pretrain.temperature": 0.5}, history([5.0, 4.0, 4.5])
        ),
        results.TrialRecord(
            "b", "TERMINATED", {"pretrain.lr": 0.01, "pretrain.temperature": 0.2}, history([5.5, 3.5, 3.0])
        ),
        results.TrialRecord("c", "TERMINATED", {"pretrain.lr": 0.5, "pretrain.temperature": 0.1}, history([6.0])),
    ]
    uris = results.write_results(sweep, records)
    trials = storage.read_parquet(uris["trials.parquet"]).to_pandas()
    assert trials["trial_id"].tolist() == ["b", "a", "c"]
    assert trials["best_epoch"].tolist() == [2, 1, 0] and trials["status"].tolist() == [
        "completed",
        "completed",
        "stopped",
    ]
    assert "loss_vs_lr.png" in uris and (tmp_path / "pre" / "loss_vs_lr.png").stat().st_size > 0
    best = C.load("pretrain", uris["best.yaml"])
    assert best.lr == 0.01 and best.temperature == 0.2 and best.epochs == 3
    assert "## Trials by loss (lowest first)" in (tmp_path / "pre" / "summary.md").read_text()


@pytest.mark.slow
def test_reaper_frees_placement_groups_of_dead_actors_only():
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", configure_logging=False)
    try:
        ours = placement_group([{"CPU": 0.5}])  # made by the driver, as Tune makes its trials'
        ray.get(ours.ready())

        @ray.remote(num_cpus=0)
        class Controller:  # stands in for a Ray Train controller
            def reserve(self):
                pg = placement_group([{"CPU": 0.5}])
                ray.get(pg.ready())
                return pg.id.hex()

        alive, dead = Controller.remote(), Controller.remote()
        kept, orphan = ray.get(alive.reserve.remote()), ray.get(dead.reserve.remote())
        ray.kill(dead)
        deadline = time.time() + 30
        while ray_compat.reap_orphaned_placement_groups() == 0:
            assert time.time() < deadline, "the dead actor's placement group was never released"
            time.sleep(0.5)
        table = placement_group_table()
        assert table[orphan]["state"] == "REMOVED"
        assert table[kept]["state"] == "CREATED" and table[ours.id.hex()]["state"] == "CREATED"
        assert ray_compat.reap_orphaned_placement_groups() == 0
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("search, scheduler", [("optuna", "asha"), ("random", "fifo")])
def test_tuner_runs_each_search_and_scheduler_and_tables_come_from_tune_storage(tmp_path, search, scheduler):
    import ray

    six = list(SIX)

    def fake_trial(config):
        """A trial without Ray Train: reports what the finetune loop reports, from its sampled values.

        Defined here so that Ray pickles it by value (Ray's workers cannot import this test module).
        """
        from ray import tune

        for epoch in range(3):
            auc = (
                1.0 - abs(math.log10(config["finetune.lr"]) + 3.5) / 4 - 0.01 * config["model.mma_depth"] + 0.01 * epoch
            )
            tune.report(
                {
                    "epoch": epoch,
                    "epochs_done": epoch + 1,
                    "val_auc": auc,
                    "val_loss": 1 - auc,
                    "train_loss": 1 - auc,
                    "timestamp": time.time(),
                    "time_this_iter_s": 0.1,
                    **{m: 0.5 for m in six if m != "val_auc"},
                }
            )

    sweep = sweeps.new_sweep(
        "finetune",
        "tune_spaces/finetune_lr_depth.yaml",
        6,
        "m.parquet",
        str(tmp_path),
        "fake",
        DEMO,
        ["finetune.epochs=3"],
        search=search,
        scheduler=scheduler,
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", configure_logging=False)
    try:
        driver._tuner(sweep, fake_trial, concurrent=2).fit()
        records = driver.collect(sweep.out, sweep.run_name, ["finetune.lr", "model.mma_depth"])
        uris = results.write_results(sweep, records)
    finally:
        ray.shutdown()
    trials = storage.read_parquet(uris["trials.parquet"]).to_pandas()
    assert len(trials) == 6 and trials["val_auc"].notna().all()
    assert trials["model.mma_depth"].between(1, 4).all() and trials["finetune.lr"].between(1e-5, 1e-2).all()
    assert set(trials["status"]) <= ({"completed", "stopped"} if scheduler == "asha" else {"completed"})
    epochs = storage.read_parquet(uris["epochs.parquet"]).to_pandas()
    assert len(epochs) == trials["epochs_done"].sum()
    assert results.trial_statuses(sweep.out, sweep.run_name) == dict.fromkeys(trials["trial_id"], "TERMINATED")
