"""torch.distributed: each rank accumulates its shard of batches, one all-reduce combines them; the
result equals a single-process run over the same batches (gloo on 127.0.0.1, 2 processes)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import cka  # noqa: E402
from cka.distributed import all_reduce_state, shard_batches  # noqa: E402


#: per-batch factors of the first layer for the run "of mixed magnitudes": HSIC terms beyond float64,
#: so ranks keep their sums at different per-layer scales and must meet at common ones
MIXED = (1e200, 1.0, 1e-200)


def make_batches(n_batches: int, seed: int = 0, mixed: bool = False) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        x = torch.randn(16, 6, generator=g)
        first = x.double() * MIXED[b % len(MIXED)] if mixed else x
        out.append(([first, torch.relu(x @ torch.randn(6, 5, generator=g))], [x @ torch.randn(6, 3, generator=g)]))
    return out


def accumulate(batches) -> cka.CKAState:
    state = cka.init_state(2, 1, like=torch.zeros(1))
    for xs, ys in batches:
        state = cka.update_state(state, xs, ys)
    return state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, n_batches: int, mixed: bool, out: mp.Queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        state = all_reduce_state(accumulate(shard_batches(make_batches(n_batches, mixed=mixed))))
        out.put((rank, cka.finalize(state).numpy(), float(state.n_batches)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "n_batches,mixed",
    [(5, False), (4, False), (1, False), (5, True), (1, True)],
    ids=["uneven-shards", "even-shards", "a-rank-with-no-batch", "mixed-magnitudes", "mixed-magnitudes-one-batch"],
)
def test_two_gloo_ranks_equal_one_process(n_batches, mixed):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, n_batches, mixed, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = cka.finalize(accumulate(make_batches(n_batches, mixed=mixed))).numpy()
    assert np.isfinite(single).all()
    for _rank, matrix, seen in results:
        np.testing.assert_allclose(matrix, single, atol=1e-12, rtol=0)
        assert seen == n_batches  # every rank sees the count of the whole run


def test_shard_batches_splits_the_list_of_batches():
    batches = list(range(7))
    shards = [list(shard_batches(batches, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(shard_batches(batches, rank=r, world_size=3)) for r in range(3)] == [3, 2, 2]
    assert list(shard_batches(batches)) == batches  # not distributed: everything
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard_batches(batches, rank=3, world_size=3)
