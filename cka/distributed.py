"""Scaling out over ``torch.distributed``: shard the batches, accumulate, one all-reduce of the sums.

The minibatch CKA sums (:class:`~cka.state.CKAState`) are additive, so each rank accumulates the
batches of its shard and one all-reduce (sum) of the small accumulators gives every rank the state of
the whole run — equal to a single process over the same batches up to float64 rounding.

Minibatch CKA depends on *which examples share a batch*: it is a sum of per-batch estimates. Two
consequences (see README, "Large runs"):

* :func:`shard_batches` splits the *list of batches* of one loader (batch ``k`` goes to rank
  ``k mod world_size``), so the distributed result equals the single-process one exactly;
  re-batching the examples per rank (what a ``DistributedSampler`` does) forms other batches and
  gives a (statistically equivalent but) different estimate;
* ``DistributedSampler`` pads the data set by repeating examples so that every rank gets the same
  number; those repeats are counted twice. Use ``drop_last=True`` or :func:`shard_batches`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from cka._sums import _SCALES, NO_SCALE, _rescaled, _scales, held_scales
from cka.state import CKAState
from cka.statistics import replicate_counts

__all__ = ["all_reduce_state", "is_distributed", "rank_and_world_size", "shard_batches"]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and initialised in this process (torch not imported
    if the caller has not imported it)."""
    import sys

    if sys.modules.get("torch") is None:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)``, ``(0, 1)`` outside a distributed run."""
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


class ShardedBatches(Iterable[T]):
    """Every ``world_size``-th batch of ``batches``, starting at ``rank``; ``len()`` where known."""

    def __init__(self, batches: Iterable[T], rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator[T]:
        for index, batch in enumerate(self.batches):
            if index % self.world_size == self.rank:
                yield batch

    def __len__(self) -> int:
        total = len(self.batches)  # type: ignore[arg-type]
        return max(0, (total - self.rank + self.world_size - 1) // self.world_size)


def shard_batches(batches: Iterable[T], rank: int | None = None, world_size: int | None = None) -> ShardedBatches[T]:
    """This rank's share of a loader's batches: batch ``k`` goes to rank ``k mod world_size``.

    Every rank must build the same loader (same order: no shuffling, or a shuffle seeded identically
    on all ranks). A rank may get no batch at all; the all-reduce still includes it.

    Parameters
    ----------
    batches : iterable
        A ``DataLoader`` (or any iterable of batches), the same on every rank.
    rank, world_size : int, optional
        Default: from the initialised process group, else ``(0, 1)``.
    """
    if rank is None or world_size is None:
        detected_rank, detected_world = rank_and_world_size()
        rank = detected_rank if rank is None else rank
        world_size = detected_world if world_size is None else world_size
    return ShardedBatches(batches, rank, world_size)


def all_reduce_state(state: Any, group: Any = None) -> Any:
    """The sum of ``state`` over all ranks, on every rank: one all-reduce of one flat float64 buffer,
    after one MAX all-reduce of the ``L1 + L2`` per-layer scales (:class:`cka.state.CKAState`'s
    ``log2_scale`` fields) that brings every rank's sums to common powers of two first.

    Works with NCCL (the buffer on this rank's CUDA device) and gloo (on the CPU), for states of any
    backend: the result has the input's array type, device and kind (a compensated state is folded
    into its sums first and comes back compensated, :func:`cka.state.folded`).
    """
    import torch
    import torch.distributed as dist

    from cka import state as engine
    from cka.backends import get_backend

    folded = getattr(engine, "folded", None)
    plain = folded(state) if folded is not None else state
    backend = get_backend(plain.hsic_xy)
    was_plain, scales = plain is state, None
    if plain.log2_scale_x is not None:  # sums kept at per-layer scales: first bring every rank to common ones
        plain, scales = _at_common_scales(plain, group)
    # a state built by hand may lack the statistics (or scale) fields
    present = [f for name, f in zip(CKAState._fields, plain, strict=True) if f is not None and name not in _SCALES]
    fields = [f if backend.name == "torch" else torch.from_numpy(np.asarray(backend.to_numpy(f))) for f in present]
    flat = torch.cat([f.reshape(-1).to(torch.float64) for f in fields])
    if dist.get_backend(group) == "nccl" and flat.device.type != "cuda":
        flat = flat.cuda()
    elif dist.get_backend(group) == "gloo" and flat.device.type != "cpu":
        flat = flat.cpu()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, offset = [], 0
    for f, original in zip(fields, present, strict=True):
        value = flat[offset : offset + f.numel()].reshape(f.shape)
        offset += f.numel()
        if backend.name == "torch":
            out.append(value.to(device=f.device, dtype=f.dtype))
        else:
            out.append(backend.cast(backend.xp.asarray(value.cpu().numpy()), original.dtype))
    reduced = CKAState(*out, *[None] * (len(CKAState._fields) - len(_SCALES) - len(out)), *(scales or (None, None)))
    if was_plain:
        return reduced
    n1, n2 = reduced.hsic_xy.shape
    bootstrap, permutations = replicate_counts(reduced)
    empty = engine.init_state(n1, n2, like=reduced.hsic_xy, bootstrap=bootstrap, permutations=permutations)
    return engine.merge_states(empty, reduced)


def _at_common_scales(state: CKAState, group: Any) -> tuple[CKAState, tuple[Any, Any]]:
    """``state`` rescaled to the per-layer scales common to all ranks (the largest of the ranks whose
    sums of the layer are not zero: one MAX all-reduce of ``L1 + L2`` numbers), and those scales, in
    its array type."""
    import torch
    import torch.distributed as dist

    from cka.backends import get_backend

    backend = get_backend(state.hsic_xy)
    scale_x, _ = _scales(state)
    own = np.concatenate([np.asarray(backend.to_numpy(a), dtype=np.float64) for a in held_scales(state)])
    held = torch.as_tensor(own, device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(held, op=dist.ReduceOp.MAX, group=group)
    top = held.cpu().numpy()
    common = np.where(top > NO_SCALE, top, 0.0)
    rows = int(backend.shape(scale_x)[0])
    if backend.name == "torch":
        parts = [torch.as_tensor(p, dtype=scale_x.dtype, device=scale_x.device) for p in (common[:rows], common[rows:])]
    else:
        parts = [backend.cast(backend.xp.asarray(p), scale_x.dtype) for p in (common[:rows], common[rows:])]
    return _rescaled(state, parts[0], parts[1]), (parts[0], parts[1])
