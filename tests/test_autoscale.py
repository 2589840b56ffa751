"""Waiting for an autoscaler: a fake cluster that grows, a fake clock; no Ray and no real autoscaler.

Attached to a cluster, a job whose workers do not fit waits (asking the autoscaler for
their bundles) up to ``scale.resource_timeout``; a Ray the job started itself fails at once.
"""

from __future__ import annotations

import logging

import pytest

from clman import config as C
from clman.errors import JobError
from clman.launch import resources, session


class FakeCluster:
    """cluster_resources() that grows to ``after`` once ``grow_at`` seconds have passed; a fake clock."""

    def __init__(self, before: dict, after: dict | None = None, grow_at: float = float("inf")):
        self.before, self.after, self.grow_at = before, after, grow_at
        self.now, self.asked, self.reads = 0.0, [], 0

    def read(self) -> dict:
        self.reads += 1
        return dict(self.after if self.after is not None and self.now >= self.grow_at else self.before)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds

    def ask(self, bundles: list) -> None:
        self.asked.append(bundles)

    def wait(self, need, bundles, timeout, **kw):
        return resources.wait_for_resources(
            need, bundles, timeout, read=self.read, ask=self.ask, clock=self.clock, sleep=self.sleep, **kw
        )


GPU_SCALE = C.ScaleConfig(num_workers=2, gpus_per_worker=1.0, cpus_per_worker=4.0)
DATA = C.DataConfig(decode_tasks=2, decode_cpus=0.5)


def test_needs_and_bundles():
    assert resources.resource_needs(GPU_SCALE, DATA, extra_cpus=0.01) == {"CPU": pytest.approx(9.01), "GPU": 2.0}
    assert resources.resource_bundles(GPU_SCALE, DATA, extra_cpus=0.01) == [
        {"CPU": 4.0, "GPU": 1.0},
        {"CPU": 4.0, "GPU": 1.0},
        {"CPU": pytest.approx(1.01)},
    ]
    assert resources.resource_needs(C.ScaleConfig(), DATA) == {"CPU": 1.5}  # no GPU key for CPU workers


def test_fits_now_asks_nothing():
    cluster = FakeCluster({"CPU": 16.0, "GPU": 2.0})
    assert cluster.wait({"CPU": 9.0, "GPU": 2.0}, [{"GPU": 1.0}], timeout=600) == 0.0
    assert cluster.asked == [] and cluster.reads == 1


def test_waits_for_the_autoscaler_then_withdraws_the_request(caplog):
    need = resources.resource_needs(GPU_SCALE, DATA)
    bundles = resources.resource_bundles(GPU_SCALE, DATA)
    # A head node with 4 CPUs; a GPU node (2 GPUs, 16 CPUs) joins after 95 s.
    cluster = FakeCluster({"CPU": 4.0}, {"CPU": 20.0, "GPU": 2.0}, grow_at=95.0)
    with caplog.at_level(logging.INFO, logger="clman.launch.resources"):
        waited = cluster.wait(need, bundles, timeout=600, poll_s=5.0, log_every_s=60.0)
    assert 95.0 <= waited <= 100.0
    assert cluster.asked == [bundles, []]  # asked once, withdrawn once the nodes are there
    waits = [r.getMessage() for r in caplog.records if "waiting for the autoscaler" in r.getMessage()]
    assert len(waits) == 2  # at 0 s and at 60 s: one line a minute, not one per poll
    assert "2 GPU more (needs 2, has 0), 5 CPU more (needs 9, has 4)" in waits[0]
    assert any("holds the run after" in r.getMessage() for r in caplog.records)


def test_times_out_with_one_line_naming_what_is_missing():
    cluster = FakeCluster({"CPU": 20.0, "GPU": 1.0})  # max_workers reached: never grows
    with pytest.raises(JobError) as info:
        cluster.wait({"CPU": 9.0, "GPU": 2.0}, [{"GPU": 1.0}] * 2, timeout=120, poll_s=5.0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("scale: the Ray cluster still lacks 1 GPU more (needs 2, has 1) after 120 s")
    assert "scale.resource_timeout=120" in message
    assert cluster.now == pytest.approx(120.0)
    assert cluster.asked[-1] == []  # the request does not outlive the job


def test_timeout_zero_fails_at_once():
    cluster = FakeCluster({"CPU": 1.0})
    with pytest.raises(JobError, match=r"lacks 1 CPU more \(needs 2, has 1\) after 0 s"):
        cluster.wait({"CPU": 2.0}, [{"CPU": 2.0}], timeout=0)
    assert cluster.now == 0.0


def test_check_resources_waits_only_when_attached(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    calls = []
    monkeypatch.setattr(resources, "wait_for_resources", lambda need, bundles, timeout: calls.append((need, timeout)))
    scale = C.ScaleConfig(num_workers=1, gpus_per_worker=1.0, resource_timeout=42.0)

    monkeypatch.setattr(session.SESSION, "attached", False)  # a Ray this job started: it cannot grow
    with pytest.raises(JobError, match="1 worker\\(s\\) x 1.0 GPU asked for, but the Ray cluster has 0 GPU"):
        resources.check_resources(scale, C.DataConfig())
    assert calls == []

    monkeypatch.setattr(session.SESSION, "attached", True)
    resources.check_resources(scale, C.DataConfig())
    assert calls == [({"CPU": 1.0, "GPU": 1.0}, 42.0)]

    calls.clear()
    resources.check_resources(C.ScaleConfig(num_workers=1), C.DataConfig())  # fits: no wait
    assert calls == []


def test_resource_timeout_config():
    assert C.ScaleConfig().resource_timeout == 600.0
    cfg = C.load("finetune", None, ["scale.resource_timeout=30"])
    assert cfg.scale.resource_timeout == 30.0
    with pytest.raises(C.ConfigError, match="scale.resource_timeout: must be >= 0"):
        C.load("finetune", None, ["scale.resource_timeout=-1"])


@pytest.mark.parametrize(
    "address, message",
    [
        ("127.0.0.1:1", "cannot reach the Ray cluster at 127.0.0.1:1 (--address / RAY_ADDRESS): Connection refused"),
        ("http://127.0.0.1:8265", "is a dashboard URL: ray.init needs the cluster's GCS address host:6379"),
        ("headnode", "expected host:port (e.g. 10.0.0.1:6379) or 'auto'"),
    ],
)
def test_wrong_address_is_one_line_before_ray_init(address, message):
    with pytest.raises(JobError) as info:
        session.check_address(address, timeout=2.0)
    assert message in str(info.value) and "\n" not in str(info.value)
