"""NT-Xent against a per-pair reference, in one process and across two gloo workers."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clman.distributed import (
    all_gather_object,
    all_gather_with_grad,
    all_reduce_mean,
    get_rank,
    get_world_size,
    is_main_process,
)
from clman.losses import nt_xent


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR's loss written out pair by pair: rows 0..N-1 view 1, N..2N-1 view 2."""
    z = torch.cat([z1, z2]).double()
    z = [row / row.norm() for row in z]
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = i + n if i < n else i - n
        num = math.exp(float(z[i] @ z[pos]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(num / den)
    return total / n2


@pytest.mark.parametrize("t", [0.5, 0.1])
def test_nt_xent_matches_reference(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert float(nt_xent(z1, z2, temperature=t)) == pytest.approx(reference_nt_xent(z1, z2, t), rel=1e-5)


def test_nt_xent_low_when_views_agree():
    z = torch.randn(8, 16)
    assert nt_xent(z, z, temperature=0.1) < nt_xent(z, torch.randn(8, 16), temperature=0.1)


def test_nt_xent_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0)


def test_single_process_helpers():
    assert (get_world_size(), get_rank(), is_main_process()) == (1, 0, True)
    t = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(t) is t
    assert all_gather_object({"a": 1}) == [{"a": 1}]
    assert torch.equal(all_reduce_mean(torch.tensor([2, 4])), torch.tensor([2.0, 4.0]))


def _worker(rank: int, world: int, init_file: str, out_dir: str, z1: torch.Tensor, z2: torch.Tensor, t: float):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = z1.shape[0] // world
        mine1 = z1[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        mine2 = z2[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        loss = nt_xent(mine1, mine2, temperature=t)
        loss.backward()
        mean = all_reduce_mean(loss)
        # Unequal batches (a short last batch): rank 0 takes 1 row, rank 1 the rest.
        rows = slice(0, 1) if rank == 0 else slice(1, None)
        uneven = nt_xent(z1[rows], z2[rows], temperature=t)
        torch.save(
            {
                "loss": loss.detach(),
                "mean": mean,
                "g1": mine1.grad,
                "g2": mine2.grad,
                "world": get_world_size(),
                "uneven": uneven.detach(),
                "uneven_n": z1[rows].shape[0],
            },
            f"{out_dir}/rank{rank}.pt",
        )
        # Both ranks done before either tears down its gloo connections: rank 1 once died of SIGABRT
        # ("terminate called without an active exception") when rank 0 destroyed the group first.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_nt_xent_two_workers_match_one_process(tmp_path):
    world, n_local, t = 2, 3, 0.5
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(world * n_local, 4, generator=g), torch.randn(world * n_local, 4, generator=g)
    mp.spawn(_worker, args=(world, str(tmp_path / "pg"), str(tmp_path), z1, z2, t), nprocs=world, join=True)

    a1, a2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    single = nt_xent(a1, a2, temperature=t)
    single.backward()
    single = single.detach()

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert all(r["world"] == world for r in ranks)
    # Each rank's loss is the mean over its own 2N rows, so with equal N the mean over ranks is the global mean.
    assert float(sum(r["loss"] for r in ranks) / world) == pytest.approx(float(single), rel=1e-5)
    assert float(ranks[0]["mean"]) == pytest.approx(float(single), rel=1e-5)
    # The gather's backward sums the ranks' gradients, so rank r holds d(sum_r' L_r')/dz_r
    # = world * d(mean_r' L_r')/dz_r = world * (single-process gradient of rank r's rows).
    # DDP's averaging over ranks then divides the parameter gradients by world again.
    for r, out in enumerate(ranks):
        rows = slice(r * n_local, (r + 1) * n_local)
        torch.testing.assert_close(out["g1"], world * a1.grad[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out["g2"], world * a2.grad[rows], rtol=1e-4, atol=1e-6)
    # With unequal batches each rank still sees every negative; the row-weighted mean is the global loss.
    weighted = sum(r["uneven"] * r["uneven_n"] for r in ranks) / z1.shape[0]
    assert float(weighted) == pytest.approx(float(single), rel=1e-5)


def test_nt_xent_is_float32_under_autocast():
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = nt_xent(z1.bfloat16(), z2.bfloat16(), temperature=0.1)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(reference_nt_xent(z1.bfloat16().float(), z2.bfloat16().float(), 0.1), rel=1e-5)
