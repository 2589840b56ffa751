"""Table 4 baselines through the real jobs: finetune with ``--set model.arch=X``, evaluate and predict read it.

The model-level tests (shapes, masks, parameter counts) are in test_baselines.py; here two
archs of two kinds — a torchvision 3-D CNN and TimeSformer — go through Ray Train, the feed, the
device augmentation and the checkpoints. The third kind, a 2-D-per-frame model with temporal
shifts (tsm_18), goes through the same finetune and scoring in test_study_job.py's Table 4 row.
"""

from __future__ import annotations

import json

import pytest
import ray

from clman import checkpoint as ckpt
from clman import config as C
from clman import storage
from jobs import evaluate, finetune, predict
from tests.media import synth_manifest

TINY = [
    "data.size=32",
    "data.num_frames=4",
    "scale.num_workers=1",
    "scale.cpus_per_worker=0.5",
    "finetune.epochs=1",
    "finetune.batch_size=4",
    "finetune.lr=0.01",
    "evaluate.bootstrap=20",
]
ARCHS = {
    "r3d_18": [],
    "timesformer": [
        "model.tf_dim=32",
        "model.tf_depth=1",
        "model.tf_heads=2",
        "model.tf_patch=8",
        "model.tf_size=32",
        "model.tf_frames=4",
    ],
}


@pytest.fixture(scope="module")
def dataset(s3):
    name = "arch-data"
    s3.make_bucket(name)
    manifest = synth_manifest(f"s3://{name}", 16, seed=2, frames=8)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield manifest
    ray.shutdown()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_baseline_finetunes_and_evaluate_and_predict_read_it(arch, dataset, bucket, tmp_path):
    cfg = C.load("finetune", None, TINY + [f"model.arch={arch}"] + ARCHS[arch])
    fin = finetune.run(cfg, dataset, f"{bucket}/runs", arch)
    state = ckpt.load_checkpoint(fin["model"])
    assert state["kind"] == "classifier" and state["config"]["model"]["arch"] == arch
    result = evaluate.run(fin["model"], dataset, "test", C.load("evaluate", None, TINY))
    assert 0.0 <= result["metrics"]["auc"] <= 1.0
    video = storage.read_parquet(dataset).to_pandas()["uri"].iloc[0]
    out = str(tmp_path / "pred.json")
    assert predict.main(["--checkpoint", fin["model"], video, "--json", out]) == 0
    assert 0.0 <= json.load(open(out))["predictions"][0]["probability_malignant"] <= 1.0


def test_encoder_with_a_baseline_is_a_clear_error(dataset, bucket):
    cfg = C.load("finetune", None, TINY + ["model.arch=tsm_18"])
    with pytest.raises(Exception, match=r"--encoder .*model.arch=tsm_18"):
        finetune.run(cfg, dataset, f"{bucket}/runs", "enc", encoder=f"{bucket}/runs/none/encoder.pt")
    assert storage.list_uris(f"{bucket}/runs") == []
