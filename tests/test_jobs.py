"""Smoke runs of every job with a local Ray (2 CPU workers) against the real SeaweedFS, tiny sizes.

Also: bad input fails before any worker starts, a SIGKILLed Train worker is
recovered from the last checkpoint (and the run is the uninterrupted one, bit for bit),
and a restarted driver continues its run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import ray
import torch

from clman import checkpoint as ckpt
from clman import config as C
from clman import storage
from clman.errors import JobError
from clman.evaluate import scoring
from clman.launch import resources
from jobs import demo, evaluate, finetune, predict, pretrain
from tests.media import synth_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.width=0.125",
    "model.gn_groups=4",
    "data.size=32",
    "data.num_frames=4",
    "data.frames_per_clip=2",
    "scale.num_workers=2",
    "scale.cpus_per_worker=0.5",
    "scale.max_failures=2",
    "pretrain.epochs=2",
    "pretrain.batch_size=8",
    "pretrain.lr=0.5",
    "finetune.epochs=2",
    "finetune.batch_size=4",
    "finetune.lr=0.01",
    "evaluate.bootstrap=50",
]


@pytest.fixture(scope="module")
def local_ray():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(s3, tmp_path_factory):
    """24 tiny synthetic sweeps ingested with train/val/test splits: the manifest URI."""
    name = "jobs-data"
    s3.make_bucket(name)
    return synth_manifest(f"s3://{name}", 24, seed=1, frames=10)


def test_pretrain_finetune_evaluate_predict(dataset, bucket, local_ray, tmp_path):
    t0 = time.time()
    runs = f"{bucket}/runs"
    pre = pretrain.run(C.load("pretrain", None, TINY), dataset, runs, "pre")
    state = torch.load(_local_copy(pre["encoder"], tmp_path), weights_only=True)
    assert state["kind"] == "simclr" and state["epoch"] == 1
    assert set(ckpt.encoder_state_dict(state)) and pre["metrics"]["loss"] > 0
    # every epoch's loss reaches the driver and metrics.json; the done line says it against chance
    assert pre["metrics"]["loss_curve"][-1] == pre["metrics"]["loss"] and len(pre["metrics"]["loss_curve"]) == 2
    assert pre["convergence"].startswith(f"loss {pre['metrics']['loss']:.4f} against chance ")
    assert (
        json.loads(storage.read_text(f"{runs}/pre/metrics.json"))["metrics"]["loss_curve"]
        == pre["metrics"]["loss_curve"]
    )

    # bf16 autocast (what GPUs run by default) on CPU, so CI covers that path too
    fin_cfg = C.load("finetune", None, TINY + ["scale.precision=bf16"])
    fin = finetune.run(fin_cfg, dataset, runs, "fin", encoder=pre["encoder"])
    assert fin["kept"] == "best val_auc"
    for key in ("val_accuracy", "val_ap", "val_sensitivity", "val_specificity", "val_f1", "val_auc", "val_loss"):
        assert key in fin["metrics"]
    saved = C.from_dict("finetune", __import__("yaml").safe_load(storage.read_text(f"{runs}/fin/config.yaml")))
    assert saved == fin_cfg
    assert json.loads(storage.read_text(f"{runs}/fin/metrics.json"))["model"] == fin["model"]
    # model.pt carries what deploying it needs: the kept epoch's threshold, chosen on the val videos
    kept = torch.load(_local_copy(fin["model"], tmp_path), weights_only=True)["extra"]
    n_val = len(pd.read_parquet(_local_copy(dataset, tmp_path)).query("split == 'val'"))
    threshold = kept["threshold"]
    assert threshold["chosen_on"] == "validation" and threshold["videos"] == n_val
    assert threshold["sensitivity"] >= threshold["target_sensitivity"] == 0.95
    assert threshold["value"] == fin["metrics"]["val_threshold"]
    assert (kept["preprocessing"]["size"], kept["preprocessing"]["num_frames"], kept["preprocessing"]["clips"]) == (
        32,
        4,
        4,
    )

    result = evaluate.run(fin["model"], dataset, "test", C.load("evaluate", None, TINY))
    out = result["out"]
    metrics = json.loads(storage.read_text(f"{out}/metrics.json"))
    assert set(metrics["metrics"]) == {"accuracy", "ap", "sensitivity", "specificity", "f1", "auc"}
    assert set(metrics["ci95"]) == set(metrics["metrics"])
    assert "specificity" in metrics["specificity_at_sensitivity"]
    preds = storage.read_parquet(f"{out}/predictions.parquet").to_pandas()
    test_rows = pd.read_parquet(_local_copy(dataset, tmp_path)).query("split == 'test'")
    assert sorted(preds["video_id"]) == sorted(test_rows["video_id"])
    assert preds["score"].between(0, 1).all() and (preds["top_frames"].map(len) > 0).all()
    assert storage.read_bytes(f"{out}/roc.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Method | Acc | AP | Sens | Spec | F1 | AUC |" in storage.read_text(f"{out}/report.md")
    assert metrics["operating_point"]["threshold"] == threshold["value"]  # the validation one, not the test's
    assert {"brier", "ece", "ci95"} <= set(metrics["calibration"])
    assert storage.read_bytes(f"{out}/reliability.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"chosen on the {n_val} validation videos" in storage.read_text(f"{out}/report.md")

    # Two models scored in one pass (the demo's): each video decoded once, each model's scores as alone
    other = _shifted_classifier(fin["model"], f"{runs}/other/model.pt", tmp_path)
    eval_cfg = C.load("evaluate", None, TINY)
    both = scoring.score_splits([fin["model"], other], dataset, "test", eval_cfg)
    alone = [scoring.score_split(m, dataset, "test", eval_cfg) for m in (fin["model"], other)]
    assert both == alone and both[0]["score"] != both[1]["score"]
    assert dict(zip(preds["video_id"], preds["score"])) == dict(zip(both[0]["video_id"], both[0]["score"]))

    # The demo's two finetunes side by side (two Ray Train runs at once, half the workers each): the runs
    # do not touch each other; the one from scratch gives, epoch for epoch, what it gives run alone
    tiny = C.load("finetune", None, TINY)
    with_cl, without_cl = demo.finetune_pair(tiny, dataset, runs, pre["encoder"], ())
    alone = finetune.run(
        dataclasses.replace(tiny, scale=dataclasses.replace(tiny.scale, num_workers=1)), dataset, runs, "alone"
    )
    assert without_cl["history"] == alone["history"] and without_cl["metrics"]["val_auc"] == alone["metrics"]["val_auc"]
    assert with_cl["history"] != without_cl["history"]
    assert json.loads(storage.read_text(f"{runs}/clman-cl/metrics.json"))["model"] == f"{runs}/clman-cl/model.pt"
    assert (
        C.from_dict(
            "finetune", __import__("yaml").safe_load(storage.read_text(f"{runs}/clman-scratch/config.yaml"))
        ).scale.num_workers
        == 1
    )

    video = test_rows["uri"].iloc[0]
    out_json = str(tmp_path / "pred.json")
    with pytest.raises(SystemExit) as exit_:
        predict.cli.run_main(
            predict.main, ["--checkpoint", fin["model"], video, "s3://nope-bucket/x.mp4", "--json", out_json]
        )
    assert exit_.value.code == 0  # one unreadable video does not stop the others
    preds = json.load(open(out_json))["predictions"]
    assert 0.0 <= preds[0]["probability_malignant"] <= 1.0 and preds[0]["top_frames"]
    assert preds[0]["threshold"] == threshold["value"]  # predict applies the stored threshold by default
    assert "error" in preds[1]
    print(f"pretrain -> finetune -> evaluate -> predict: {time.time() - t0:.0f} s")


def _local_copy(uri: str, tmp_path) -> str:
    path = tmp_path / uri.rsplit("/", 1)[-1]
    path.write_bytes(storage.read_bytes(uri))
    return str(path)


# ---------------------------------------------------------------- bad input, before any worker starts


def _shifted_classifier(model_uri: str, to: str, tmp_path) -> str:
    """A copy of a classifier checkpoint whose last bias is moved: other scores, the same frames."""
    state = torch.load(_local_copy(model_uri, tmp_path), weights_only=True)
    last_bias = [k for k in state["model"] if k.endswith(".bias")][-1]
    state["model"][last_bias] = state["model"][last_bias] + torch.tensor([0.5, -0.5])
    path = tmp_path / "shifted.pt"
    torch.save(state, path)
    storage.write_bytes(to, path.read_bytes())
    return to


def _no_new_runs(bucket):
    return storage.list_uris(f"{bucket}/runs") == []


def test_missing_encoder_checkpoint(dataset, bucket):
    with pytest.raises(ckpt.CheckpointError, match="nope/encoder.pt"):
        finetune.run(
            C.load("finetune", None, TINY), dataset, f"{bucket}/runs", "x", encoder=f"{bucket}/nope/encoder.pt"
        )
    assert _no_new_runs(bucket)


def test_encoder_of_another_architecture(dataset, bucket, tmp_path):
    from clman.models.build import simclr_from

    other = C.load("pretrain", None, TINY + ["model.width=0.25"])
    uri = f"{bucket}/other/encoder.pt"
    ckpt.save_checkpoint(uri, simclr_from(other.model), kind="simclr", config=C.to_dict(other), step=0)
    with pytest.raises(ckpt.CheckpointError, match="model.width is 0.25 there, 0.125 here"):
        finetune.run(C.load("finetune", None, TINY), dataset, f"{bucket}/runs", "x", encoder=uri)
    assert _no_new_runs(bucket)


def test_empty_split(dataset, bucket, tmp_path):
    rows = pd.read_parquet(_local_copy(dataset, tmp_path))
    from clman.data.manifest import write_manifest

    no_test = f"{bucket}/data/manifest.parquet"
    write_manifest(rows[rows["split"] != "test"].reset_index(drop=True), no_test)
    with pytest.raises(JobError, match="split 'test' is empty"):
        scoring.score_split(f"{bucket}/none.pt", no_test, "test", C.EvaluateConfig())


def test_missing_classifier_checkpoint(dataset, bucket):
    with pytest.raises(ckpt.CheckpointError, match="nope.pt"):
        scoring.score_split(f"{bucket}/nope.pt", dataset, "test", C.EvaluateConfig())


def test_gpu_asked_where_none(local_ray):
    with pytest.raises(JobError, match="GPU asked for, but the Ray cluster has 0 GPU"):
        resources.check_resources(C.ScaleConfig(num_workers=1, gpus_per_worker=1.0), C.DataConfig())


def test_unknown_config_key_is_one_line_before_work(dataset, bucket):
    env = dict(os.environ)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.finetune",
            "--manifest",
            dataset,
            "--out",
            f"{bucket}/runs",
            "--set",
            "finetune.lrr=0.1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: finetune: unknown key 'lrr'")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert _no_new_runs(bucket)


# ---------------------------------------------------------------- fault tolerance


def _checkpoints(run_uri: str) -> list[str]:
    return sorted({u.split("/checkpoint_")[1].split("/")[0] for u in storage.list_uris(run_uri) if "/checkpoint_" in u})


def registered_checkpoint(run_uri: str) -> bool:
    """True once Ray Train has recorded a checkpoint in the run's snapshot (what a restart reads).

    A checkpoint folder appears in storage a moment before the controller registers it.
    """
    snapshot = f"{run_uri}/checkpoint_manager_snapshot.json"
    return storage.exists(snapshot) and "checkpoint_" in storage.read_text(snapshot)


def finetune_until_checkpoint(
    cfg, manifest: str, runs: str, name: str, timeout: float
) -> tuple[threading.Thread, dict]:
    """Start ``finetune.run(cfg, manifest, runs, name)`` in a thread; return (thread, done) once Ray Train has
    registered a checkpoint of the run. ``done`` gets "result" or "error" when the run ends. Fails if none is
    registered within ``timeout`` seconds (or the run ends first), with the run's error if it has one."""
    done: dict = {}

    def fit():
        try:
            done["result"] = finetune.run(cfg, manifest, runs, name)
        except BaseException as e:  # surfaced by the caller, or below
            done["error"] = e

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.time() + timeout
    # Registered, not only written: a worker killed in between restarts from scratch.
    while not registered_checkpoint(f"{runs}/{name}") and time.time() < deadline and thread.is_alive():
        time.sleep(0.5)
    assert registered_checkpoint(f"{runs}/{name}"), done.get("error", "no checkpoint was registered")
    return thread, done


def _train_worker_pids() -> list[int]:
    # The GCS actor table: works without the dashboard (ray.util.state needs it).
    from ray._private import state

    return [
        a["Pid"] for a in state.actors().values() if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"
    ]


def test_killed_worker_resumes_bit_for_bit_and_the_seed_decides(dataset, bucket, local_ray):
    """A SIGKILLed Train worker: the run goes on from its last registered checkpoint and ends with the
    metrics of an uninterrupted run of the same command, bit for bit, though other worker and decode
    processes (other pids, another clock) drew its frames. Clips are streamed (decoded every epoch), the
    path whose RNG once mixed in the pid; so this is also "same seed, same numbers". Another seed differs."""
    cfg = C.load("finetune", None, TINY + ["finetune.epochs=4", "finetune.checkpoint_every=1", "data.cache=off"])
    runs = f"{bucket}/runs"
    thread, done = finetune_until_checkpoint(cfg, dataset, runs, "killed", timeout=240)
    victims = _train_worker_pids()
    assert victims, "no live Ray Train worker to kill"
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive(), "run did not finish after the worker was killed"
    assert "error" not in done, done.get("error")
    killed = done["result"]
    assert killed["metrics"]["epoch"] >= 0

    baseline = finetune.run(cfg, dataset, runs, "uninterrupted")
    final = json.loads(storage.read_text(f"{runs}/killed/metrics.json"))
    last, base = final["last_metrics"], baseline["last_metrics"]
    # The new worker group continued from a checkpoint (not from scratch) with its step counter,
    # and ran the same epochs and optimizer steps as the uninterrupted run.
    assert last["start_epoch"] >= 1 and base["start_epoch"] == 0, (last, base)
    assert last["epoch"] == base["epoch"] == 3 and last["step"] == base["step"], (last, base)
    # Every draw derives from (seed, epoch, video, view): the resumed run is the uninterrupted
    # one, bit for bit, whichever worker or decode task handled which video.
    keys = [k for k in base if k.startswith(("val_", "train_"))]
    assert keys and {k: last[k] for k in keys} == {k: base[k] for k in keys}, (last, base)
    assert all(math.isfinite(last[k]) for k in keys if not isinstance(last[k], str)), last  # val_scoring: text
    assert final["history"]["train_loss"] == baseline["history"]["train_loss"]

    other = finetune.run(
        C.load("finetune", None, TINY + ["finetune.epochs=1", "data.cache=off", "finetune.seed=1"]),
        dataset,
        runs,
        "other-seed",
    )
    assert other["history"]["train_loss"][0] != baseline["history"]["train_loss"][0], "finetune.seed changed nothing"


def _kill_session(sid: int, timeout: float = 30.0) -> None:
    """SIGKILL every live process of session ``sid`` until none is left.

    Not ``killpg``: Ray puts each worker in a process group of its own, and a worker outlives its
    raylet by up to a second or two, time enough to train and register another epoch.
    """
    deadline = time.time() + timeout
    while True:
        alive = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:  # state, session id
                alive.append(int(entry))
        if not alive:
            return
        assert time.time() < deadline, f"processes {alive} of session {sid} survive SIGKILL"
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):  # gone since the listing
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def test_restarted_driver_continues_the_run(dataset, bucket):
    runs = f"{bucket}/runs"
    # 16 epochs of ~0.2 s: the kill lands mid-run (with 4, the first driver had sometimes trained them
    # all between the poll that saw its first checkpoint and the kill, and the second had nothing to resume)
    epochs = 16
    cmd = [
        sys.executable,
        "-m",
        "jobs.finetune",
        "--manifest",
        dataset,
        "--out",
        runs,
        "--run-name",
        "driver",
        *sum((["--set", o] for o in TINY + [f"finetune.epochs={epochs}", "scale.num_workers=1"]), []),
    ]
    env = dict(os.environ, RAY_ADDRESS="")  # each driver starts its own local Ray
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    while not registered_checkpoint(f"{runs}/driver") and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    assert first.poll() is None, "the first driver finished before it could be killed"
    _kill_session(first.pid)  # the driver and the local Ray it started, workers included
    first.wait()
    assert _checkpoints(f"{runs}/driver")
    snapshot = json.loads(storage.read_text(f"{runs}/driver/checkpoint_manager_snapshot.json"))
    registered = snapshot["latest_checkpoint_result"]["metrics"]["epoch"]
    assert registered < epochs - 1, f"the first driver trained all {epochs} epochs before the kill"
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    final = json.loads(storage.read_text(f"{runs}/driver/metrics.json"))
    assert final["last_metrics"]["epoch"] == epochs - 1
    assert final["last_metrics"]["start_epoch"] == registered + 1, (
        f"the restarted driver started at epoch {final['last_metrics']['start_epoch']}, not after the last "
        f"registered checkpoint (epoch {registered})"
    )
