"""The Ray Data pipeline: clips from the real local S3, decoded by Ray Data tasks, local Ray."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from clman import storage
from clman.config import DataConfig
from clman.data import manifest as M
from clman.data import pipeline
from clman.data.video import encode_mp4
from tests.media import frames

SIZE, T, M_FRAMES = 24, 4, 3
LENGTHS = {"v0": 12, "v1": 9, "v2": 3, "v3": 12}  # v2 is shorter than T


@pytest.fixture(scope="module")
def ray_local(s3):
    import ray

    # The s3 fixture has put the AWS_* variables in os.environ: the Ray workers inherit them.
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data_set(s3, ray_local):
    """Four good clips, one corrupt object and one missing object, with a manifest."""
    name = "pipeline-data"
    s3.make_bucket(name)
    root = f"s3://{name}"
    rows = []
    for i, (vid, n) in enumerate({**LENGTHS, "bad": 12, "gone": 12}.items()):
        uri = f"{root}/clips/{vid}.mp4"
        if vid == "bad":
            storage.write_bytes(uri, b"\x00\x00\x00\x18ftypmp42" + b"\x07" * 500)
        elif vid != "gone":
            storage.write_bytes(uri, encode_mp4(frames(n, 32, 40, seed=i), fps=10))
        rows.append({"video_id": vid, "patient_id": vid, "label": i % 2, "split": "train", "fold": -1,
                     "uri": uri, "num_frames": n, "fps": 10.0, "height": 32, "width": 40,
                     "sha256": f"{i:064d}", "source": "test"})
    M.write_manifest(pd.DataFrame(rows), f"{root}/manifest.parquet")
    return f"{root}/manifest.parquet"


CFG = DataConfig(size=SIZE, num_frames=T, frames_per_clip=M_FRAMES, decode_tasks=2, decode_cpus=0.5)


def test_finetune_batches_have_the_right_shapes_and_skip_bad_clips(data_set):
    ds = pipeline.finetune_dataset(data_set, "train", CFG, train=True, seed=0)
    batches = list(ds.iter_torch_batches(batch_size=2))
    rows = M.read_manifest(data_set, split="train")
    seen = torch.cat([b["video_index"] for b in batches]).tolist()
    assert sorted(rows["video_id"][seen]) == sorted(LENGTHS)  # bad and gone dropped
    for b in batches:
        n = len(b["label"])
        assert b["clip"].shape == (n, T, 3, SIZE, SIZE) and b["clip"].dtype == torch.float32
        assert b["mask"].shape == (n, T) and b["mask"].dtype == torch.bool and b["mask"].all()
        assert b["frame_idx"].shape == (n, T) and b["label"].dtype == torch.int64
        assert torch.isfinite(b["clip"]).all()
        for idx, vi in zip(b["frame_idx"], b["video_index"]):
            assert int(idx.max()) < LENGTHS[rows["video_id"][int(vi)]]


def test_training_order_changes_every_epoch_with_cpus_taken(data_set, ray_local):
    """Train workers with fractional CPUs leave 0.5 CPU: decoding must still run there."""
    from concurrent.futures import ThreadPoolExecutor

    @ray_local.remote(num_cpus=1)
    class Workers:  # stands in for two Ray Train workers at 0.5 CPU each
        def ready(self):
            return True

    hog = Workers.remote()
    ray_local.get(hog.ready.remote())
    ds = pipeline.finetune_dataset(data_set, "train", CFG, train=True, seed=0, repeats=3)

    def epoch():
        return [int(v) for b in ds.iter_torch_batches(batch_size=4) for v in b["video_index"]]

    pool = ThreadPoolExecutor(1)
    try:
        # A plan that needs a whole free CPU (e.g. random_shuffle tasks) hangs here.
        first, second = pool.submit(lambda: (epoch(), epoch())).result(timeout=240)
    finally:
        pool.shutdown(wait=False)
        ray_local.kill(hog)
    assert sorted(first) == sorted(second) and len(first) == 3 * len(LENGTHS)
    assert first != second


def test_eval_clip_is_deterministic(data_set):
    ds = pipeline.eval_dataset(data_set, "train", CFG, frames="clip")

    def run():
        out = {}
        for b in ds.iter_torch_batches(batch_size=4):
            for i, vi in enumerate(b["video_index"].tolist()):
                out[vi] = (b["clip"][i], b["frame_idx"][i])
        return out

    a, b = run(), run()
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
    v2 = M.read_manifest(data_set)["video_id"].tolist().index("v2")
    assert a[v2][1].tolist() == [0, 0, 1, 2]  # 3 frames, T=4: repeated in order


def test_eval_all_frames_gives_every_frame_and_pads_with_a_mask(data_set):
    rows = M.read_manifest(data_set)
    ds = pipeline.eval_dataset(data_set, "train", CFG, frames="all")
    lengths = {}
    for b in ds.iter_torch_batches(batch_size=1):
        vid = rows["video_id"][int(b["video_index"][0])]
        assert b["clip"].shape == (1, LENGTHS[vid], 3, SIZE, SIZE)
        assert b["frame_idx"][0].tolist() == list(range(LENGTHS[vid]))
        lengths[vid] = b["clip"].shape[1]
    assert lengths == LENGTHS

    padded = list(ds.iter_torch_batches(batch_size=4, collate_fn=pipeline.PadClips()))
    assert sum(len(b["label"]) for b in padded) == 4
    for b in padded:
        n_valid = b["mask"].sum(dim=1).tolist()
        for i, vi in enumerate(b["video_index"].tolist()):
            n = LENGTHS[rows["video_id"][vi]]
            assert n_valid[i] == n
            assert (b["clip"][i, n:] == 0).all() and (b["frame_idx"][i, n:] == -1).all()
        assert b["clip"].shape[1] == max(n_valid)


def test_pretrain_views(data_set):
    ds = pipeline.pretrain_dataset(data_set, "train", CFG, seed=0)
    batches = list(ds.iter_torch_batches(batch_size=4))
    total = sum(len(b["view1"]) for b in batches)
    assert total == sum(min(M_FRAMES, n) for n in LENGTHS.values())  # 3 frames per clip
    for b in batches:
        assert b["view1"].shape == b["view2"].shape == (len(b["view1"]), 3, SIZE, SIZE)
        assert not torch.equal(b["view1"], b["view2"])


def test_decode_actor_logs_and_drops_a_corrupt_object(data_set, caplog):
    rows = M.read_manifest(data_set)
    batch = {"uri": rows["uri"].to_numpy(), "num_frames": rows["num_frames"].to_numpy(),
             "label": rows["label"].to_numpy(), "video_index": np.arange(len(rows))}
    with caplog.at_level(logging.WARNING, logger="clman.data.pipeline"):
        out = pipeline.DecodeClips("eval", SIZE, num_frames=T)(batch)
    assert out["clip"].shape == (4, T, 3, SIZE, SIZE)
    bad = rows.set_index("video_id")["uri"]
    assert f"skipping clip {bad['bad']}" in caplog.text and f"skipping clip {bad['gone']}" in caplog.text
    empty = pipeline.DecodeClips("simclr", SIZE)({k: v[4:] for k, v in batch.items()})
    assert empty["view1"].shape == (0, 3, SIZE, SIZE)


def test_bad_arguments_fail_clearly(data_set):
    with pytest.raises(ValueError, match="frames='some'; valid"):
        pipeline.eval_dataset(data_set, "test", CFG, frames="some")
    with pytest.raises(ValueError, match="split 'test' has no videos"):
        pipeline.finetune_dataset(data_set, "test", CFG, train=False)
