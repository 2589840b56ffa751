"""Output people expect: tracking to MLflow / TensorBoard read back, no Ray report lines, progress in logs.

The finetune runs as a standalone job (its own local Ray, output captured: not a terminal) with
``--track`` to a local MLflow file store and a TensorBoard folder; both are read back with their
own readers (``MlflowClient``, TensorBoard's ``EventAccumulator``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from clman import config as C
from clman import progress, storage, tracking
from tests.media import synth_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.width=0.125",
    "model.gn_groups=4",
    "data.size=32",
    "data.num_frames=4",
    "data.frames_per_clip=2",
    "scale.num_workers=1",
    "scale.cpus_per_worker=0.5",
    "finetune.epochs=2",
    "finetune.batch_size=4",
    "finetune.lr=0.01",
]


def _mlflow_client(uri: str):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def manifest(s3):
    """16 tiny synthetic sweeps with train/val/test splits."""
    name = "tracking-data"
    s3.make_bucket(name)
    return synth_manifest(f"s3://{name}", 16, seed=3, frames=8)


def test_standalone_finetune_tracked_without_ray_report_lines(manifest, bucket, tmp_path):
    mlruns, tb = f"file://{tmp_path / 'mlruns'}", str(tmp_path / "tb")
    runs = f"{bucket}/runs"
    cmd = [
        sys.executable,
        "-m",
        "jobs.finetune",
        "--manifest",
        manifest,
        "--out",
        runs,
        "--run-name",
        "tracked",
        "--track",
        f"mlflow:{mlruns}",
        "--track",
        f"tensorboard:{tb}",
        *sum((["--set", o] for o in TINY), []),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=dict(os.environ, RAY_ADDRESS=""), capture_output=True, text=True, timeout=400
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]

    # Ray's per-report line is gone; the workers' one line per epoch is the progress of a job log
    assert "Reporting training result" not in out
    assert "TrainingReport(" not in out
    assert "finetune epoch 1/2" in out and "finetune epoch 2/2" in out

    client = _mlflow_client(mlruns)
    experiment = client.get_experiment_by_name("finetune")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    cfg = C.from_dict("finetune", yaml.safe_load(storage.read_text(f"{runs}/tracked/config.yaml")))
    assert run.data.params == tracking.config_params(cfg)  # the whole config, named as --set names it
    assert run.data.params["finetune.epochs"] == "2" and run.data.params["model.width"] == "0.125"
    shown = " ".join(
        [
            *run.data.params.values(),
            *run.data.params,
            *run.data.tags.values(),
            open(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "a"))).read(),
        ]
    )
    # (the local server's key id is "clman", also model.arch's value: only the secret can be checked)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in shown
    artifact = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert open(artifact).read() == C.to_yaml(cfg)

    history = {
        k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
        for k in ("train_loss", "train_auc", "val_auc", "val_loss", "lr")
    }
    for key, points in history.items():
        assert [step for step, _ in points] == [0, 1], (key, points)
    last = storage.read_text(f"{runs}/tracked/metrics.json")
    assert f"{history['train_loss'][1][1]:.6f}"[:6] in last  # the epoch's own loss, as metrics.json has it

    scalars = _scalars(os.path.join(tb, "finetune", "tracked"))
    assert [s for s, _ in scalars["val_auc"]] == [0, 1]
    assert [s for s, _ in scalars["train_loss"]] == [0, 1]
    assert [v for _, v in scalars["train_loss"]] == pytest.approx([v for _, v in history["train_loss"]])


def test_tune_callback_logs_a_run_per_trial(tmp_path):
    """TrackTrials as Tune drives it: one MLflow run per trial in the sweep's experiment, the trial's config,
    every epoch at its step and a closing line without an epoch at the last one; TensorBoard alike."""
    from clman.launch.grid import TrackTrials

    mlruns, tb = f"file://{tmp_path / 'mlruns'}", str(tmp_path / "tb")
    targets = tracking.parse_targets([f"mlflow:{mlruns}", f"tensorboard:{tb}"])
    base = C.load("finetune", None, TINY)
    callback = TrackTrials(
        targets, "sweep-1", lambda config: C.load("finetune", None, TINY + [f"finetune.lr={config['finetune.lr']}"])
    )
    trials = [SimpleNamespace(trial_id=f"t{i}", config={"finetune.lr": lr}) for i, lr in enumerate((0.1, 0.01))]
    for epoch in range(3):
        for i, trial in enumerate(trials):
            callback.on_trial_result(
                epoch,
                trials,
                trial,
                {
                    "epoch": epoch,
                    "val_auc": 0.5 + 0.1 * epoch + i,
                    "training_iteration": epoch + 1,
                    "trial_id": trial.trial_id,
                    "val_scoring": "3 clips",
                    "done": False,
                },
            )
    callback.on_trial_result(3, trials, trials[0], {"auc": 0.9})  # a study trial's closing line
    callback.on_trial_complete(3, trials, trials[0])
    callback.on_trial_error(3, trials, trials[1])

    client = _mlflow_client(mlruns)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("sweep-1").experiment_id])}
    assert set(runs) == {"t0", "t1"}
    assert runs["t0"].info.status == "FINISHED" and runs["t1"].info.status == "FAILED"
    assert runs["t1"].data.params["finetune.lr"] == "0.01" and runs["t0"].data.params["finetune.lr"] == "0.1"
    assert runs["t0"].data.params["model.width"] == str(base.model.width)
    assert set(runs["t0"].data.metrics) == {"val_auc", "auc"}  # Tune's bookkeeping and text are not metrics
    steps = [(m.step, round(m.value, 6)) for m in client.get_metric_history(runs["t1"].info.run_id, "val_auc")]
    assert steps == [(0, 1.5), (1, 1.6), (2, 1.7)]
    assert [m.step for m in client.get_metric_history(runs["t0"].info.run_id, "auc")] == [2]
    assert [s for s, _ in _scalars(os.path.join(tb, "sweep-1", "t0"))["val_auc"]] == [0, 1, 2]


@pytest.mark.parametrize(
    "spec, error",
    [
        ("wandb:x", "expected mlflow:<tracking URI> or tensorboard:<folder>"),
        ("mlflow:", "expected mlflow"),
        ("mlflow:https://me:hunter2@mlflow.example", "MLFLOW_TRACKING_PASSWORD"),
        ("tensorboard:s3://bucket/tb", "a local folder"),
    ],
)
def test_bad_track_targets_are_one_line(spec, error):
    with pytest.raises(C.ConfigError, match=error) as e:
        tracking.parse_targets([spec])
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value)


def test_config_params_are_named_like_set_keys():
    params = tracking.config_params(C.load("finetune", None, TINY))
    assert params["finetune.lr"] == "0.01" and params["model.width"] == "0.125" and params["scale.num_workers"] == "1"
    assert params["model.nonlocal_stages"].startswith("[") and len(params) == len(
        tracking.flatten(C.to_dict(C.load("finetune", None, TINY)))
    )


def test_track_targets(tmp_path):
    assert tracking.parse_targets([f"mlflow:{tmp_path}", "tensorboard:tb"]) == (
        tracking.Target("mlflow", f"file://{tmp_path}"),
        tracking.Target("tensorboard", os.path.abspath("tb")),
    )
    assert tracking.parse_targets(["mlflow:http://mlflow:5000"])[0].uri == "http://mlflow:5000"
    assert tracking.flatten({"a": {"b": 1, "c": (1, 2)}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def test_progress_in_a_log_is_a_line_per_tenth(caplog):
    with caplog.at_level(logging.INFO, logger="clman.progress"):
        assert list(progress.track(range(25), 25, "scoring", unit="video")) == list(range(25))
    lines = [r.getMessage() for r in caplog.records if r.name == "clman.progress"]
    assert len(lines) == 10 and lines[0].startswith("scoring: 3/25 video(s) (12%)")
    assert lines[-1].startswith("scoring: 25/25 video(s) (100%)")


def test_quiet_terminal_gives_the_terminal_back_for_errors(tmp_path, capfd):
    from clman.launch import session

    log_file = tmp_path / "ray.log"
    with pytest.raises(RuntimeError):
        with session.quiet_terminal(str(log_file), force=True):
            os.write(2, b"(RayTrainWorker pid=1) a worker line\n")
            raise RuntimeError("boom")
    print("error: the one line", file=sys.stderr)  # what cli.run_main prints after the job failed
    captured = capfd.readouterr()
    assert "a worker line" in log_file.read_text() and "a worker line" not in captured.err
    assert "error: the one line" in captured.err and "error: the one line" not in log_file.read_text()
    assert progress.terminal() is sys.stderr


def test_report_line_logger_is_where_ray_logs_it():
    """Fails when a Ray upgrade moves "Reporting training result" (clman.launch.ray_compat.quiet_report_lines)."""
    import importlib
    import inspect

    from clman.launch import ray_compat

    logger = ray_compat.quiet_report_lines()
    assert logger.level == logging.WARNING
    assert "Reporting training result" in inspect.getsource(importlib.import_module(ray_compat.TRAIN_CONTEXT))
