r"""The sums of minibatch CKA and their exact arithmetic: :class:`CKAState`, :class:`CompensatedCKAState`.

Private to :mod:`cka.state` (import the types from there). Every operation here is fieldwise over
the additive fields of :class:`CKAState`, so a further additive field needs no change to adding,
merging, compensating or folding. Compensated summation (Knuth's TwoSum) keeps float32
accumulators (JAX without ``jax_enable_x64``, torch on MPS) as exact as one rounding of the total.

Layers whose HSIC terms would leave the accumulator's range (float64 features beyond about 1e75 or
below 1e-75; float32 accumulators much sooner) are summed at a power-of-two scale per layer, kept
in the two scale fields; two states are brought to common scales before they are added
(:func:`_common_scales`, :func:`_at_scales`), exactly, since only powers of two are involved. In the normal range every scale
is 0 and the sums are the plain sums.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from cka.backends import get_backend

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
    log2_scale_x, log2_scale_y : (L1,), (L2,) arrays or None
        Per layer, the power of two :math:`s` the sums are kept at: the true sums are
        ``hsic_xy * 2**(s_x[:, None] + s_y[None, :])``, ``hsic_xx * 2**(2 s_x)``, ``hsic_yy * 2**(2 s_y)``
        (the statistics fields likewise). 0 (``None``: all 0) in the normal range; not additive:
        states are aligned to common scales before they are added. CKA, a ratio, does not depend on them.
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
    log2_scale_x: Array = None
    log2_scale_y: Array = None


_SCALES = ("log2_scale_x", "log2_scale_y")

# How each additive field scales with the layers' scales: (power of 2^s_x, power of 2^s_y); an
# "xy" field (..., L1, L2) takes one of each, an "xx" field (..., L1) two of s_x, "yy" two of s_y.
_SCALE_POWERS = {
    "hsic_xy": (1, 1),
    "hsic_xx": (2, 0),
    "hsic_yy": (0, 2),
    "boot_xy": (1, 1),
    "boot_xx": (2, 0),
    "boot_yy": (0, 2),
    "null_xy": (1, 1),
}


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
    """``fn`` applied field by field to the additive fields of states of one layout and one scale
    (:func:`_at_scales`); a field that is ``None`` (absent) stays ``None``; the scales are the first state's."""
    return CKAState(
        *(
            fields[0] if name in _SCALES or fields[0] is None else fn(*fields)
            for name, fields in zip(CKAState._fields, zip(*states, strict=True), strict=True)
        )
    )


def _scales(state: CKAState) -> tuple[Array, Array]:
    """``(s_x (L1,), s_y (L2,))`` of a state (zeros where it has none)."""
    if state.log2_scale_x is not None:
        return state.log2_scale_x, state.log2_scale_y
    b = get_backend(state.hsic_xy)
    rows, cols = b.shape(state.hsic_xy)[-2:]
    return b.zeros((rows,), like=state.hsic_xy), b.zeros((cols,), like=state.hsic_xy)


#: The scale of a layer whose sums are zero: below any exponent, so it loses every max.
NO_SCALE = -float(2**20)


def held_scales(state: CKAState) -> tuple[Array, Array]:
    """``(s_x, s_y)`` where the layer's sums are not zero, :data:`NO_SCALE` where they are (a fresh
    state, a skipped batch, a constant layer's zero terms: their scale says nothing). Combining
    states (here and over ranks, :func:`cka.distributed.all_reduce_state`) keeps the per-layer max."""
    b = get_backend(state.hsic_xy)
    return tuple(
        b.where(sums != 0, scale, b.full_like_scalar(NO_SCALE, scale))
        for sums, scale in zip((state.hsic_xx, state.hsic_yy), _scales(state), strict=True)
    )


def _rescaled(state: CKAState, scale_x: Array, scale_y: Array) -> CKAState:
    """``state`` kept at the scales ``scale_x (L1,), scale_y (L2,)``: its sums multiplied by the powers of
    two :math:`2^{s - \text{scale}}` (exact, down to negligible underflow; only a state without batches,
    whose sums are zero, is ever raised)."""
    b = get_backend(state.hsic_xy)
    dtype = state.hsic_xy.dtype
    limit = b.max_exponent(dtype) - 2  # 2^+-limit are normal numbers
    own_x, own_y = _scales(state)
    fx, fy = (
        b.pow2(b.clip(own - target, -limit, limit), dtype) for own, target in ((own_x, scale_x), (own_y, scale_y))
    )
    fields = {}
    for name, value in zip(CKAState._fields, state, strict=True):
        powers = _SCALE_POWERS.get(name, (0, 0))
        if value is not None and powers == (1, 1):
            value = value * fx[:, None] * fy[None, :]
        elif value is not None and powers[0]:
            value = value * fx * fx  # in two steps: (2^-s)^2 alone may underflow where the product does not
        elif value is not None and powers[1]:
            value = value * fy * fy
        fields[name] = value
    fields.update(log2_scale_x=scale_x, log2_scale_y=scale_y)
    return CKAState(**fields)


def _common_scales(*states: CKAState) -> tuple[Array, Array] | None:
    """Per layer, the largest scale among the states whose sums of that layer are not zero (a fresh
    state, a skipped batch, a constant layer's zero terms take the others' scale); ``None`` where
    nothing needs rescaling (no scale fields, or all scales 0 where that is free to check: numpy,
    torch on the CPU)."""
    if all(s.log2_scale_x is None for s in states):
        return None
    b = get_backend(states[0].hsic_xy)
    held = [held_scales(s) for s in states]
    common = []
    for side in (0, 1):
        top = held[0][side]
        for other in held[1:]:
            top = b.xp.maximum(top, other[side])
        common.append(b.where(top > NO_SCALE, top, b.zeros((), like=top, dtype=top.dtype)))
    if b.branches_cheaply(states[0].hsic_xy):
        own = (a for s in states for a in _scales(s))
        if not any(b.to_numpy(a).any() for a in (*common, *own)):
            return None
    return common[0], common[1]


def _at_scales(state: AnyState, scale_x: Array, scale_y: Array) -> AnyState:
    """:func:`_rescaled` for either kind of state (a compensated one: its sums and their errors alike)."""
    if isinstance(state, CompensatedCKAState):
        return CompensatedCKAState(
            _rescaled(state.sums, scale_x, scale_y), _rescaled(state.compensation, scale_x, scale_y)
        )
    return _rescaled(state, scale_x, scale_y)


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
    common = _common_scales(_sums(state), delta)
    if common is not None:
        state, delta = _at_scales(state, *common), _rescaled(delta, *common)
        if delta_compensation is not None:
            delta_compensation = _rescaled(delta_compensation, *common)
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
