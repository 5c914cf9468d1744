r"""The sums of minibatch CKA and their exact arithmetic: :class:`CKAState`, :class:`CompensatedCKAState`.

Private to :mod:`cka.state` (import the types from there). Every operation here is fieldwise over
the additive fields of :class:`CKAState`, so a further additive field needs no change to adding,
merging, compensating or folding. Compensated summation (Knuth's TwoSum) keeps float32
accumulators (JAX without ``jax_enable_x64``, torch on MPS) as exact as one rounding of the total.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

Array = Any

__all__ = ["AnyState", "CKAState", "CompensatedCKAState", "folded"]


# --------------------------------------------------------------------------------------------
# The state
# --------------------------------------------------------------------------------------------


class CKAState(NamedTuple):
    r"""Sufficient statistics of minibatch CKA (Nguyen et al. 2021): sums over batches ``b``.

    A NamedTuple of arrays, hence a JAX pytree; every field merges by addition, so combining the
    states of shards (devices, ranks) is one sum (an all-reduce). Every function here treats the
    fields alike (``_fieldwise``), so a further additive field (e.g. bootstrap replicates of the
    sums) needs no change to merging, compensation or skipping.

    Attributes
    ----------
    hsic_xy : (L1, L2) array
        :math:`\sum_b \mathrm{HSIC}(K_b^{(i)}, L_b^{(j)})`.
    hsic_xx : (L1,) array
        :math:`\sum_b \mathrm{HSIC}(K_b^{(i)}, K_b^{(i)})`.
    hsic_yy : (L2,) array
        :math:`\sum_b \mathrm{HSIC}(L_b^{(j)}, L_b^{(j)})`.
    n_examples : 0-d array
        Examples seen (for reporting).
    n_batches : 0-d array
        Batches seen.
    boot_xy, boot_xx, boot_yy : (R, L1, L2), (R, L1), (R, L2) arrays or None
        The three sums again with batch ``b`` weighted by :math:`w_{rb} \sim \mathrm{Poisson}(1)` in
        each of ``R`` bootstrap replicates (:mod:`cka.statistics`); ``None`` without ``bootstrap``.
    null_xy : (P, L1, L2) array or None
        :math:`\sum_b \mathrm{HSIC}(K_b^{(i)}, P_{pb} L_b^{(j)} P_{pb}^\top)` for ``P`` permutations of
        each batch's examples (:mod:`cka.statistics`); ``None`` without ``permutations``.
    """

    hsic_xy: Array
    hsic_xx: Array
    hsic_yy: Array
    n_examples: Array
    n_batches: Array
    boot_xy: Array = None
    boot_xx: Array = None
    boot_yy: Array = None
    null_xy: Array = None


class CompensatedCKAState(NamedTuple):
    r"""A :class:`CKAState` with the rounding error of every addition kept: the exact sums are
    ``sums + compensation``. What :func:`init_state` makes for float32 accumulators.

    Plain float32 sums drift by about ``eps * n_batches`` (1e-4 relative after 10^6 batches); with
    the compensation they are as exact as one rounding of the true total. Reading a field of
    :class:`CKAState` (``state.hsic_xx``, ``state.n_batches``) gives the folded value
    ``sums.field + compensation.field``.

    Attributes
    ----------
    sums : CKAState
        The running (rounded) sums.
    compensation : CKAState
        The accumulated rounding errors, same shapes.
    """

    sums: CKAState
    compensation: CKAState

    def __getattr__(self, name: str) -> Any:
        if name in CKAState._fields:
            return getattr(folded(self), name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


AnyState = CKAState | CompensatedCKAState


def _fieldwise(fn: Callable[..., Array], *states: CKAState) -> CKAState:
    """``fn`` applied field by field to states of one layout; a field that is ``None`` (absent)
    stays ``None``."""
    return CKAState(*(None if fields[0] is None else fn(*fields) for fields in zip(*states, strict=True)))


def _sums(state: AnyState) -> CKAState:
    return state.sums if isinstance(state, CompensatedCKAState) else state


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    r"""``s = fl(a + b)`` and its exact rounding error ``e``: :math:`a + b = s + e` exactly.

    Knuth's branch-free TwoSum (TAOCP vol. 2, 4.2.2), valid for any magnitudes of ``a`` and ``b``
    (unlike Kahan's FastTwoSum, which needs ``|a| >= |b|``; per-batch HSIC terms may be negative).
    numpy, torch and XLA keep IEEE semantics (no reassociation), so the error term survives jit.
    """
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _accumulate(state: AnyState, delta: CKAState, delta_compensation: CKAState | None = None) -> AnyState:
    """``state + delta`` (plus ``delta_compensation``, the errors of a merged state), compensated
    where ``state`` is."""
    if not isinstance(state, CompensatedCKAState):
        return _fieldwise(lambda s, d: s + d, state, delta)
    pairs = _fieldwise(_two_sum, state.sums, delta)
    extra = delta_compensation if delta_compensation is not None else _fieldwise(lambda d: 0.0, delta)
    return CompensatedCKAState(
        _fieldwise(lambda p: p[0], pairs),
        _fieldwise(lambda c, p, x: c + p[1] + x, state.compensation, pairs, extra),
    )


def folded(state: AnyState) -> CKAState:
    """The plain :class:`CKAState` of ``state``: ``sums + compensation`` (one rounding) for a
    :class:`CompensatedCKAState`, ``state`` itself otherwise. Use it before iterating over the
    fields of a state (saving, all-reducing); :func:`cka.merge_states` with a fresh
    :func:`cka.init_state` turns it back into an accumulator of the same kind."""
    if isinstance(state, CompensatedCKAState):
        return _fieldwise(lambda s, c: s + c, state.sums, state.compensation)
    return state


def _merge_impl(a: AnyState, b: AnyState) -> AnyState:
    """Traceable ``a + b``: compensated if either is (a plain state merges in as a delta)."""
    if not isinstance(a, CompensatedCKAState) and isinstance(b, CompensatedCKAState):
        a, b = b, a
    if isinstance(b, CompensatedCKAState):
        return _accumulate(a, b.sums, b.compensation)
    return _accumulate(a, b)
