"""Tune sweeps: search-space files, trial tables and summaries (fast), then real sweeps on a local Ray."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from clman import config as C
from clman import storage, tuning
from clman.train.runner import JobError
from clman.tune_space import SpaceError, load_space, parse_yaml, space_from_dict

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
    domain = space.to_tune()["model.mma_depth"]
    drawn = set(np.asarray(domain.sample(size=400, random_state=np.random.RandomState(0))).tolist())
    assert drawn == {1, 2, 3, 4}


def test_space_converts_to_ray_domains():
    from ray.tune.search.sample import Categorical, Float

    space = space_from_dict({
        "finetune.lr": {"loguniform": [1e-5, 1e-2]},
        "finetune.momentum": {"uniform": [0.8, 0.99]},
        "model.aggregator": {"choice": ["mma", "mean"]},
        "finetune.batch_size": {"grid": [4, 8]},
    }, "finetune")
    d = space.to_tune()
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


@pytest.mark.parametrize("text, match", [
    ("finetune.lrr: {loguniform: [1.0e-5, 1.0e-2]}", r"space.yaml: finetune.lrr: unknown key.*'lr'"),
    ("modell.mma_depth: {randint: [1, 4]}", r"space.yaml: modell.mma_depth: unknown key: section 'modell'"),
    ("pretrain.lr: {loguniform: [1.0e-5, 1.0e-2]}", r"space.yaml: pretrain.lr: unknown key: section 'pretrain'"),
    ("lr: {loguniform: [1.0e-5, 1.0e-2]}", r"space.yaml: key 'lr': expected <section>.<field>"),
    ("model.mma_depth: {choice: [one, two]}", r"space.yaml: model.mma_depth: choice value 'one' is not valid"
                                               r".*expected an integer"),
    ("model.mma_depth: {uniform: [1, 4]}", r"space.yaml: model.mma_depth: uniform value 1.0 is not valid"),
    ("model.mma_depth: {randint: [0, 3]}", r"space.yaml: model.mma_depth: randint value 0 is not valid.*>= 1"),
    ("model.aggregator: {choice: [mma, transformer]}", r"model.aggregator: choice value 'transformer'.*one of"),
    ("model.mma_depth: {choice: []}", r"space.yaml: model.mma_depth: empty choice"),
    ("finetune.batch_size: {grid: []}", r"space.yaml: finetune.batch_size: empty grid"),
    ("finetune.lr: {loguniform: [1.0e-2, 1.0e-5]}", r"space.yaml: finetune.lr: loguniform lo > hi"),
    ("model.mma_depth: {randint: [4, 1]}", r"space.yaml: model.mma_depth: randint lo > hi"),
    ("finetune.lr: {loguniform: [-1.0e-3, 1.0e-2]}", r"space.yaml: finetune.lr: loguniform needs 0 < lo"),
    ("finetune.lr: {uniform: [-1.0e-3, 1.0e-2]}", r"space.yaml: finetune.lr: uniform value -0.001 is not valid.*> 0"),
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
])
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
def _sweep(tmp_path, job="finetune", space="tune_spaces/finetune_lr_depth.yaml", **kw) -> tuning.Sweep:
    return tuning.new_sweep(job, space, 4, "manifest.parquet", str(tmp_path), kw.pop("run_name", "s1"),
                            DEMO, ["finetune.epochs=4"], **kw)


def test_sweep_round_trips_through_json(tmp_path):
    sweep = _sweep(tmp_path, scheduler="fifo", seed=3)
    again = tuning.Sweep.from_dict(json.loads(json.dumps(sweep.to_dict())))
    assert again == sweep
    assert again.base_config().epochs == 4 and again.max_epochs() == 4
    cfg = again.trial_config({"finetune.lr": 2e-3, "model.mma_depth": 3})
    assert cfg.lr == 2e-3 and cfg.model.mma_depth == 3 and cfg.model.width == 0.25  # preset kept


def test_sweep_checks_its_options(tmp_path):
    with pytest.raises(C.ConfigError, match="--grace-period 9 is more than the 4 epoch"):
        _sweep(tmp_path, grace_period=9)
    with pytest.raises(SpaceError, match="'grid' needs --search random"):
        path = _space_file(tmp_path, "finetune.lr: {grid: [1.0e-3, 1.0e-2]}")
        _sweep(tmp_path, space=path, search="optuna")
    with pytest.raises(C.ConfigError, match="--samples must be >= 1"):
        tuning.new_sweep("finetune", "tune_spaces/finetune_lr_depth.yaml", 0, "m", str(tmp_path), "x", DEMO)
    with pytest.raises(SpaceError, match="unknown job 'evaluate'"):
        tuning.new_sweep("evaluate", "tune_spaces/finetune_lr_depth.yaml", 2, "m", str(tmp_path), "x", DEMO)
    with pytest.raises(SpaceError, match="section 'finetune' is not part of a pretrain sweep"):
        _sweep(tmp_path, job="pretrain")


def test_max_concurrent_trials_from_cluster_resources():
    cfg = C.load("finetune", DEMO, ["scale.num_workers=1"])  # 0.5 CPU worker + 0.5 CPU decoder + driver
    assert tuning.max_concurrent_trials({"CPU": 2.0}, cfg) == 1
    assert tuning.max_concurrent_trials({"CPU": 16.0}, cfg) == 15
    gpu = C.load("finetune", DEMO, ["scale.num_workers=2", "scale.gpus_per_worker=1", "scale.cpus_per_worker=2"])
    assert tuning.max_concurrent_trials({"CPU": 64.0, "GPU": 8.0}, gpu) == 4  # GPUs limit: 8 / 2
    assert tuning.max_concurrent_trials({"CPU": 10.0, "GPU": 8.0}, gpu) == 2  # CPUs limit: 10 / 4.51
    with pytest.raises(JobError, match=r"one trial needs 4.51 CPU\(s\) and 2 GPU\(s\) but the Ray cluster has 64 CPU\(s\) and 1 GPU"):
        tuning.max_concurrent_trials({"CPU": 64.0, "GPU": 1.0}, gpu)


# -- result tables and the summary, from fake trial histories --------------------
def _history(aucs, lr, depth, t0=1000.0, ckpt_every=2):
    rows = []
    for e, auc in enumerate(aucs):
        rows.append({"epoch": e, "epochs_done": e + 1, "step": 3 * (e + 1), "train_loss": 0.7 - 0.01 * e,
                     "lr": lr, "clips_per_s": 5.0, "val_auc": auc, "val_accuracy": 0.6 + 0.01 * e,
                     "val_ap": auc - 0.05, "val_sensitivity": 0.5, "val_specificity": 0.7, "val_f1": 0.55,
                     "val_loss": 0.69 - 0.02 * e, "time_this_iter_s": 2.0, "time_total_s": 2.0 * (e + 1),
                     "timestamp": t0 + e, "training_iteration": e + 1, "done": False, "trial_id": "x",
                     "pid": 1, "hostname": "h", "node_ip": "1", "date": "d",
                     "checkpoint_path": f"/ck/{e}" if (e + 1) % ckpt_every == 0 else None,
                     "config/finetune.lr": lr, "config/model.mma_depth": depth})
    return pd.DataFrame(rows)


def _records():
    R = tuning.TrialRecord
    return [
        R("t1", "TERMINATED", {"finetune.lr": 1e-3, "model.mma_depth": 1}, _history([0.6, 0.7, 0.8, 0.75], 1e-3, 1)),
        R("t2", "TERMINATED", {"finetune.lr": 1e-2, "model.mma_depth": 2}, _history([0.5, 0.55], 1e-2, 2)),
        # Restarted after a driver failure: epochs 1-2 reported twice, the last report wins.
        R("t3", "TERMINATED", {"finetune.lr": 1e-4, "model.mma_depth": 4},
          pd.concat([_history([0.7, 0.9, 0.85], 1e-4, 4), _history([0.7, 0.91, 0.88, 0.86], 1e-4, 4).iloc[1:]])),
        R("t4", "ERROR", {"finetune.lr": 9e-3, "model.mma_depth": 3}, _history([0.4], 9e-3, 3),
          "FloatingPointError: non-finite loss nan at epoch 1, step 4: lower the learning rate"),
        R("t5", "PENDING", {"finetune.lr": 5e-5, "model.mma_depth": 1}, None),
    ]


KEYS = ["finetune.lr", "model.mma_depth"]
SIX = ["val_auc", "val_accuracy", "val_ap", "val_sensitivity", "val_specificity", "val_f1"]


def test_tables_keep_every_metric_of_every_trial_and_epoch():
    records = _records()
    epochs = tuning.epochs_table(records, KEYS)
    assert set(SIX + ["val_loss", "train_loss", "epoch", "epochs_done", "timestamp"] + KEYS) <= set(epochs.columns)
    assert not any(c.startswith("config/") for c in epochs.columns) and "pid" not in epochs.columns
    assert epochs.groupby("trial_id").size().to_dict() == {"t1": 4, "t2": 2, "t3": 4, "t4": 1}
    assert epochs[(epochs.trial_id == "t3") & (epochs.epoch == 1)]["val_auc"].item() == 0.91

    trials = tuning.trials_table(records, "finetune", KEYS, {r.trial_id: 4 for r in records})
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


def test_write_results_makes_tables_summary_best_preset_and_plot(tmp_path):
    sweep = _sweep(tmp_path, run_name="fake")
    uris = tuning.write_results(sweep, _records())
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
    records = [tuning.TrialRecord("t1", "ERROR", {"finetune.lr": 1e-3, "model.mma_depth": 1}, None, "boom")]
    with pytest.raises(JobError, match="all 1 trial\\(s\\) failed; first error: boom"):
        tuning.write_results(sweep, records)
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
