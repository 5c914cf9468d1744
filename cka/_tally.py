"""The running record of one comparison: the accumulated sums and what the run noticed on the way.

:class:`Tally` holds the :mod:`cka.state` accumulator of a :class:`cka.CKA` run in the backend of
the Grams it receives (torch on their device, numpy, JAX), the batches skipped for having too few
examples, and per layer the first batch whose features held NaN or Inf — tracked on the device, so
that no batch waits for the host. It also combines itself over ``torch.distributed`` ranks (one
all-reduce) and converts to and from the plain numbers a checkpoint stores.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Any

import numpy as np

from cka import core
from cka import state as engine
from cka.backends import get_backend
from cka.statistics import CoarseStatisticsWarning, replicate_counts

__all__ = ["Tally"]

Array = Any


class Tally:
    """The sums and bookkeeping of one comparison of ``n_layers1 x n_layers2`` layer pairs.

    Attributes
    ----------
    state : CKAState or None
        The accumulator (None before the first batch with enough examples).
    first_bad : list of two int arrays (L1,), (L2,) or None
        Per layer, the first batch index whose Gram held NaN/Inf, or -1.
    skipped : list of int
        Batches with fewer than :func:`cka.core.min_examples` examples.
    backend : str or None
        The backend the sums are kept in (``"torch"``, ``"numpy"``, ``"jax"``).
    world_size : int
        Ranks combined by :meth:`all_reduce` (1 before), to decode bad-batch indices.
    sequences : int
        Sequences (batch rows) in the batches counted: the examples, except with token features
        (``tokens="all"``), where the examples are the real tokens of these sequences.
    """

    def __init__(
        self, n_layers1: int, n_layers2: int, unbiased: bool, bootstrap: int = 0, permutations: int = 0, seed: int = 0
    ) -> None:
        self.shape, self.unbiased = (n_layers1, n_layers2), unbiased
        # statistics (cka.statistics): their draws are keyed by the batch's global index, which under
        # torch.distributed is ``local_index * world_size + rank`` (cka.distributed.shard_batches' split)
        self.resample, self.seed = {"bootstrap": bootstrap, "permutations": permutations}, seed
        from cka.distributed import rank_and_world_size

        self._rank, self._ranks = rank_and_world_size()
        self.min_n = core.min_examples(unbiased)
        self.state: Any = None
        self.first_bad: list[Array] | None = None
        self.skipped: list[int] = []
        self.backend: str | None = None
        self.world_size = 1
        self.sequences = 0

    def add(self, index: int, grams1: Array, grams2: Array, sequences: int | None = None) -> None:
        """Add batch ``index`` given its Gram stacks ``(L1, n, n)`` and ``(L2, n, n)`` (one backend);
        ``sequences``: the batch's rows when the Grams' rows are its tokens (default ``n``)."""
        if grams1.shape[-1] < self.min_n:
            self.skipped.append(index)
            return
        self.sequences += int(grams1.shape[-1]) if sequences is None else int(sequences)
        b = get_backend(grams1)
        with _no_autograd(b):
            if self.state is None:
                self.state = _init_quietly(self.shape, grams1, self.resample)
            elif not _same_place(self.state.hsic_xy, grams1):  # restored from a checkpoint elsewhere
                self.state = _moved(self.state, grams1)
            if self.first_bad is None or not _same_place(self.first_bad[0], grams1):
                self.first_bad = [_as_index_array(b, bad, grams1) for bad in self._first_bad_or_none()]
            self.backend = b.name
            previous = self.state
            self.state = engine.update_state_from_grams(
                self.state,
                grams1,
                grams2,
                unbiased=self.unbiased,
                check=False,
                batch_index=index * self._ranks + self._rank,
                seed=self.seed,
                overwrite=True,  # the comparer's stacks: their diagonals are zeroed in place, no copy
            )
            # NaN/Inf anywhere in a layer's Gram reaches its self term HSIC(K, K) (a sum over all its
            # off-diagonal entries): the L1 + L2 self-term increments flag the bad layers, with no
            # extra pass over the (L, n, n) Grams and no host synchronisation
            increments = (self.state.hsic_xx - previous.hsic_xx, self.state.hsic_yy - previous.hsic_yy)
            for k, increment in enumerate(increments):
                bad = ~b.xp.isfinite(increment)
                self.first_bad[k] = b.where(bad & (self.first_bad[k] < 0), index, self.first_bad[k])

    def first_bad_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """The first bad batch per layer of each side, on the host (-1: none)."""
        return tuple(np.asarray(_to_numpy(bad), dtype=np.int64) for bad in self._first_bad_or_none())  # type: ignore[return-value]

    def _first_bad_or_none(self) -> list[Array]:
        if self.first_bad is not None:
            return self.first_bad
        return [np.full((size,), -1, dtype=np.int64) for size in self.shape]

    # -- torch.distributed ---------------------------------------------------------------------

    def all_reduce(self, like: Array) -> None:
        """Sum the state over all ranks (one all-reduce) and combine the NaN bookkeeping: a bad batch is
        encoded as ``local_index * world_size + rank`` and the smallest code over ranks is kept. A rank
        with no batch takes part with zeros of ``like``'s type and device."""
        import torch
        import torch.distributed as dist

        from cka.distributed import all_reduce_state, rank_and_world_size

        rank, self.world_size = rank_and_world_size()
        if self.state is None:
            self.state = _init_quietly(self.shape, like, self.resample)
            self.backend = get_backend(like).name
        self.state = all_reduce_state(self.state)
        never = torch.iinfo(torch.int64).max
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        combined = []
        for bad in self.first_bad_numpy():
            code = torch.as_tensor(np.where(bad >= 0, bad * self.world_size + rank, never), device=device)
            dist.all_reduce(code, op=dist.ReduceOp.MIN)
            code = code.cpu().numpy()
            combined.append(np.where(code == never, -1, code))
        self.first_bad = combined
        total = torch.tensor([self.sequences], dtype=torch.int64, device=device)
        dist.all_reduce(total)
        self.sequences = int(total.item())
        if float(_to_numpy(self.state.n_batches)) == 0:
            self.state = None

    # -- checkpoints ---------------------------------------------------------------------------

    def to_record(self) -> tuple[Any, dict[str, Any]]:
        """``(state or None, extra)``: what a checkpoint stores (the extra is JSON-serialisable)."""
        extra = {
            "skipped": list(self.skipped),
            "sequences": self.sequences,
            "backend": self.backend,
            "device": str(self.state.hsic_xy.device) if self.backend == "torch" else None,
            "first_bad": [b.tolist() for b in self.first_bad_numpy()],
        }
        return self.state, extra

    def from_record(self, state: Any, extra: dict[str, Any]) -> None:
        """Restore from a checkpoint: ``state`` as float64 numpy (or None), ``extra`` from :meth:`to_record`.
        The sums move to the Grams' backend and device at the next :meth:`add`; torch sums are placed
        on their recorded device if it exists here."""
        self.skipped = [int(i) for i in extra.get("skipped", [])]
        self.sequences = int(extra.get("sequences", 0))
        self.backend = extra.get("backend")
        self.first_bad = [np.asarray(b, dtype=np.int64) for b in extra.get("first_bad", [])] or None
        self.state = state
        torch = sys.modules.get("torch") if self.backend == "torch" else None
        if state is not None and torch is not None:
            device = torch.device(extra.get("device") or "cpu")
            if device.type == "cuda" and not torch.cuda.is_available():
                device = torch.device("cpu")
            self.state = _moved(state, torch.zeros((), device=device))


def _no_autograd(b: Any) -> Any:
    """``torch.inference_mode()`` for torch sums (no graph, no version counters), else nothing."""
    if b.name == "torch":
        return sys.modules["torch"].inference_mode()
    return contextlib.nullcontext()


def _same_place(a: Array, b: Array) -> bool:
    """Whether two arrays share backend and device."""
    ba, bb = get_backend(a), get_backend(b)
    return ba is bb and ba.device(a) == bb.device(b)


def _to_numpy(a: Array) -> np.ndarray:
    return np.asarray(get_backend(a).to_numpy(a))


def _moved(state: Any, like: Array) -> Any:
    """``state`` in ``like``'s backend, device and accumulator dtype (through the host), as the kind of
    accumulator :func:`cka.state.init_state` makes there (compensated for float32 sums)."""
    from cka.checkpoint import state_like, state_to_numpy

    plain = state_like(state_to_numpy(state), like)
    bootstrap, permutations = replicate_counts(plain)
    empty = _init_quietly(plain.hsic_xy.shape, like, {"bootstrap": bootstrap, "permutations": permutations})
    return engine.merge_states(empty, plain)


def _init_quietly(shape: tuple[int, int], like: Array, resample: dict[str, Any]) -> Any:
    """:func:`cka.state.init_state` without a second warning about few replicates (the comparer warned)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoarseStatisticsWarning)
        return engine.init_state(*shape, like=like, **resample)


def _as_index_array(b: Any, values: Array, like: Array) -> Array:
    """Integer per-layer bookkeeping in ``like``'s backend and device (int64 where it exists)."""
    values = _to_numpy(values)
    if b.name == "torch":
        return sys.modules["torch"].as_tensor(values, dtype=sys.modules["torch"].int64, device=like.device)
    return b.xp.asarray(values)
