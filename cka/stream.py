r"""Jitted JAX streaming names over :mod:`cka.state` (import them from :mod:`cka.frontends.jax`).

``init / update / scan_update / merge / psum / finalize`` on a :class:`~cka.state.CompensatedCKAState`
(the sums plus their rounding errors, float64 with ``jax_enable_x64``, else float32), and
``pad_batch`` / ``stack_batches`` for ragged batches. Every update is :func:`cka.state._update_impl`,
the body of :func:`cka.update_state`: the same Grams, HSIC terms, double-centring, compensation
and skip-by-``where``. This module adds only what is JAX's own: ``jax.jit``, ``lax.scan``, the
``shard_map`` collective, an always-present mask (one compiled program for ragged batches), and
no value check before :func:`finalize` (no host round-trip per batch).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from cka import core
from cka import state as engine
from cka.state import CKAState, CKAStatistics, CompensatedCKAState

Array = Any

__all__ = [
    "CompensatedCKAState",
    "finalize",
    "finalize_statistics",
    "init",
    "merge",
    "pad_batch",
    "psum",
    "scan_update",
    "stack_batches",
    "to_core_state",
    "update",
]


def _accumulator_dtype() -> Any:
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def init(n_layers_x: int, n_layers_y: int, *, bootstrap: int = 0, permutations: int = 0) -> CompensatedCKAState:
    """An empty state for ``n_layers_x x n_layers_y`` layer pairs (zeros in the accumulator dtype).

    Parameters
    ----------
    n_layers_x, n_layers_y : int
        Layers of the first and second model (rows and columns of the CKA matrix), at least 1.
    bootstrap, permutations : int
        Also keep bootstrap replicates and permutation-null sums (:mod:`cka.statistics`): then every
        update needs ``batch_index``, and :func:`finalize_statistics` reads intervals and p-values.
    """
    like = jnp.zeros((), _accumulator_dtype())
    state = engine.init_state(
        n_layers_x, n_layers_y, like=like, compensated=True, bootstrap=bootstrap, permutations=permutations
    )
    return cast(CompensatedCKAState, state)


def to_core_state(state: CompensatedCKAState) -> CKAState:
    """The compensated sums folded into a plain :class:`cka.state.CKAState` (``sums + compensation``),
    e.g. to merge with a state from PyTorch (after ``numpy.asarray``) or to save it."""
    _check_state(state)
    return engine.folded(state)


def _check_state(state: Any, name: str = "state") -> None:
    if not isinstance(state, CompensatedCKAState):
        hint = (
            " It is a cka.state.CKAState: the JAX functions keep compensated sums; start from "
            "cka.frontends.jax.init(L1, L2), or use cka.state.update_state with core states."
            if isinstance(state, CKAState)
            else " Start from cka.frontends.jax.init(L1, L2)."
        )
        raise TypeError(f"{name} must be a CompensatedCKAState; got {type(state).__name__}.{hint}")


# --------------------------------------------------------------------------------------------
# update / scan_update
# --------------------------------------------------------------------------------------------


def _step(
    state: CompensatedCKAState,
    xs: Sequence[Array],
    ys: Sequence[Array],
    mask: Array,
    kernel: str,
    unbiased: bool,
    sigma: Any,
    sigma_frac: Any,
    batch_index: Any = None,
    seed: int = 0,
) -> CompensatedCKAState:
    """One masked batch into ``state``: :func:`cka.state._update_impl` without its flags."""
    new_state, _ = engine._update_impl(state, xs, ys, mask, kernel, unbiased, sigma, sigma_frac, batch_index, seed)
    return cast(CompensatedCKAState, new_state)  # a compensated state stays compensated


@functools.partial(jax.jit, static_argnames=("kernel", "unbiased", "seed"))
def _update_jit(
    state: CompensatedCKAState,
    xs: list[Array],
    ys: list[Array],
    mask: Array,
    kernel: str,
    unbiased: bool,
    sigma: Any,
    sigma_frac: Any,
    batch_index: Any = None,
    seed: int = 0,
) -> CompensatedCKAState:
    return _step(state, xs, ys, mask, kernel, unbiased, sigma, sigma_frac, batch_index, seed)


@functools.partial(jax.jit, static_argnames=("kernel", "unbiased", "seed"))
def _scan_jit(
    state: CompensatedCKAState,
    xs: list[Array],
    ys: list[Array],
    masks: Array,
    kernel: str,
    unbiased: bool,
    sigma: Any,
    sigma_frac: Any,
    batch_indices: Array,
    seed: int = 0,
) -> CompensatedCKAState:
    def body(carry: CompensatedCKAState, batch: tuple[Any, Any, Any, Any]) -> tuple[CompensatedCKAState, None]:
        bx, by, m, index = batch
        return _step(carry, bx, by, m, kernel, unbiased, sigma, sigma_frac, index, seed), None

    inputs = (list(xs), list(ys), masks, batch_indices)
    state, _ = jax.lax.scan(body, _vary_like(state, inputs), inputs)
    return state


def _vary_like(state: CompensatedCKAState, inputs: Any) -> CompensatedCKAState:
    """Inside ``shard_map``: mark the state as varying over every mesh axis the inputs vary over.

    ``lax.scan`` needs its carry's type to be the same before and after a step; a state made by
    :func:`init` (replicated) becomes device-varying once it has seen a device's batches.
    """
    axes: set[Any] = set()
    for leaf in jax.tree.leaves(inputs):
        axes |= _varying_axes(leaf)
    if not axes:
        return state

    def vary(a: Array) -> Array:
        missing = tuple(sorted(axes - _varying_axes(a), key=str))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(vary, state)


def _varying_axes(x: Array) -> set[Any]:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (empty outside): ``typeof(x).vma``
    in JAX 0.6-0.9, ``typeof(x).mat.varying`` from 0.10."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "mat", None), "varying", None)
    return set(vma or ())


def _check_batch(
    state: CompensatedCKAState,
    xs: Sequence[Array],
    ys: Sequence[Array],
    mask: Array | None,
    kernel: str,
    unbiased: Any,
    leading: int,
) -> tuple[int, ...]:
    """Static checks of one (``leading=0``) or a stack of (``leading=1``) batches; returns the
    leading shape ``(n,)`` or ``(B, n)``. Only shapes are read, so this also runs under a trace."""
    _check_state(state)
    core._check_kernel(kernel)
    core._check_unbiased(unbiased)
    if not isinstance(xs, (list, tuple)) or not isinstance(ys, (list, tuple)):
        raise TypeError(
            f"xs and ys must be lists (or tuples) of per-layer arrays; got {type(xs).__name__} and "
            f"{type(ys).__name__}. Wrap a single layer as [x]."
        )
    layers = engine._layers(state)
    if (len(xs), len(ys)) != layers:
        raise ValueError(
            f"the state was made for {layers[0]} x {layers[1]} layers but this batch has {len(xs)} x "
            f"{len(ys)}; pass the same layers in every batch (init(len(xs), len(ys)))."
        )
    what = "(n, ...)" if leading == 0 else "(n_batches, n, ...)"
    expected: tuple[int, ...] | None = None
    for side, arrays in (("xs", xs), ("ys", ys)):
        for i, a in enumerate(arrays):
            shape = tuple(np.shape(a))
            if len(shape) < leading + 1:
                raise ValueError(f"{side}[{i}] must have shape {what}; got shape {shape}.")
            if expected is None:
                expected = shape[: leading + 1]
            elif shape[: leading + 1] != expected:
                raise ValueError(
                    f"every layer must hold the same examples: xs[0] has leading shape {expected} but "
                    f"{side}[{i}] has shape {shape}; pass features of the same batch{'es' if leading else ''}."
                )
    if expected is None:  # unreachable: init() refuses zero layers, and the counts matched
        raise ValueError("xs and ys must hold at least one layer each.")
    if mask is not None and tuple(np.shape(mask)) != expected:
        raise ValueError(
            f"mask must have shape {expected} (one flag per {'example' if not leading else 'batch and example'}); "
            f"got shape {tuple(np.shape(mask))}."
        )
    return expected


def update(
    state: CompensatedCKAState,
    xs: Sequence[Array],
    ys: Sequence[Array],
    mask: Array | None = None,
    *,
    kernel: str = "linear",
    unbiased: bool = True,
    sigma: float | None = None,
    sigma_frac: float = 0.8,
    batch_index: Any = None,
    seed: int = 0,
) -> CompensatedCKAState:
    r"""Add one batch to ``state``: one Gram per layer, all pairs from one matrix product, jitted.

    .. math:: S_{ij} \mathrel{+}= \mathrm{HSIC}_1(K^{(i)}, L^{(j)}),\quad
              S^{x}_i \mathrel{+}= \mathrm{HSIC}_1(K^{(i)}, K^{(i)}),\quad S^{y}_j \mathrel{+}= \mathrm{HSIC}_1(L^{(j)}, L^{(j)})

    with :math:`K^{(i)}` the kernel of ``xs[i]`` over the valid rows (Nguyen et al. 2021); the same
    computation as :func:`cka.update_state`.

    Parameters
    ----------
    state : CompensatedCKAState
        From :func:`init` with ``len(xs), len(ys)`` layers.
    xs : list of L1 (n, ...) arrays
        This batch's features of the first model's layers (flattened per example).
    ys : list of L2 (n, ...) arrays
        The same examples through the second model.
    mask : (n,) bool array, optional
        Valid rows of a padded batch (see :func:`pad_batch`); default all valid. Always the same
        compiled program whether given or not, so a ragged last batch padded to ``n`` does not
        recompile. Padded rows may hold anything (zeros, stale data, even NaN). A batch with
        fewer than 4 valid rows (2 if biased) adds nothing.
    kernel, unbiased, sigma, sigma_frac
        As in :func:`cka.cka`; ``kernel`` and ``unbiased`` are static (one compilation each).
    batch_index, seed : int
        For a state with statistics (:func:`init`'s ``bootstrap``, ``permutations``): the batch's
        position in the whole stream (over all devices, hosts and resumes; may be a traced int32)
        and the seed (static), which key its bootstrap weights and permutations.

    Returns
    -------
    CompensatedCKAState
        A new state. Pure: works under ``jax.jit``, ``jax.vmap`` (bind the keyword arguments with a
        lambda first) and inside ``lax.scan`` (or use :func:`scan_update`). No host transfer, no
        value checks: NaN/Inf features surface in :func:`finalize`.
    """
    (n,) = _check_batch(state, xs, ys, mask, kernel, unbiased, leading=0)
    core._check_bandwidth(sigma, sigma_frac)
    engine._check_batch_index(state, batch_index)
    if mask is None:
        mask = jnp.ones((n,), dtype=bool)
    return _update_jit(
        state, list(xs), list(ys), mask, kernel, bool(unbiased), sigma, sigma_frac, batch_index, int(seed)
    )


def scan_update(
    state: CompensatedCKAState,
    xs: Sequence[Array],
    ys: Sequence[Array],
    masks: Array | None = None,
    *,
    kernel: str = "linear",
    unbiased: bool = True,
    sigma: float | None = None,
    sigma_frac: float = 0.8,
    batch_index: Any = None,
    seed: int = 0,
) -> CompensatedCKAState:
    """Add ``B`` stacked batches to ``state`` with one ``jax.lax.scan`` (one compiled loop, no host
    round-trip between batches). Equal to ``B`` calls of :func:`update`.

    Parameters
    ----------
    state : CompensatedCKAState
    xs : list of L1 (B, n, ...) arrays
        Layer ``i``'s features of all ``B`` batches, stacked (see :func:`stack_batches`).
    ys : list of L2 (B, n, ...) arrays
    masks : (B, n) bool array, optional
        Valid rows of each batch; default all valid.
    kernel, unbiased, sigma, sigma_frac
        As in :func:`update`.
    batch_index : int or (B,) int array, optional
        For a state with statistics: the stream position of the first stacked batch (the others
        follow: ``batch_index + arange(B)``), or each batch's position (e.g. a device's share of the
        batches under ``shard_map``).
    seed : int
        As in :func:`update`.

    Returns
    -------
    CompensatedCKAState
    """
    shape = _check_batch(state, xs, ys, masks, kernel, unbiased, leading=1)
    core._check_bandwidth(sigma, sigma_frac)
    engine._check_batch_index(state, batch_index)
    if masks is None:
        masks = jnp.ones(shape, dtype=bool)
    indices = jnp.zeros((), jnp.int32) if batch_index is None else jnp.asarray(batch_index, jnp.int32)
    if indices.ndim == 0:
        indices = indices + jnp.arange(shape[0], dtype=jnp.int32)
    elif indices.shape != shape[:1]:
        raise ValueError(
            f"batch_index must be an int or hold one index per batch, shape {shape[:1]}; got {indices.shape}."
        )
    return _scan_jit(state, list(xs), list(ys), masks, kernel, bool(unbiased), sigma, sigma_frac, indices, int(seed))


# --------------------------------------------------------------------------------------------
# merge / psum / finalize
# --------------------------------------------------------------------------------------------


def merge(a: CompensatedCKAState, b: CompensatedCKAState) -> CompensatedCKAState:
    """The state of the union of two disjoint sets of batches (compensated: as exact as one pass);
    :func:`cka.merge_states`.

    Parameters
    ----------
    a, b : CompensatedCKAState
        States over the same layers (e.g. of two devices or two runs).
    """
    _check_state(a, "a")
    _check_state(b, "b")
    return cast(CompensatedCKAState, engine.merge_states(a, b))


def psum(state: CompensatedCKAState, axis_name: Any) -> CompensatedCKAState:
    """Merge the per-device states over a mapped axis, inside ``jax.shard_map`` or ``jax.pmap``.

    One collective (a ``psum`` of the small ``O(L1 L2)`` states, one slot per device), then a
    compensated sum over the devices in a fixed order, so every device gets the same state and it
    equals one device's pass over all batches up to one rounding. Shard the *batches* over devices,
    not the examples of a batch: minibatch CKA depends on which examples share a batch (DESIGN.md).

    Parameters
    ----------
    state : CompensatedCKAState
        This device's state.
    axis_name : hashable
        The mapped axis (the mesh axis of ``shard_map``, the ``axis_name`` of ``pmap``).

    Examples
    --------
    >>> from jax.sharding import PartitionSpec as P
    >>> def shard(state, xs, ys, masks):                                    # doctest: +SKIP
    ...     return psum(scan_update(state, xs, ys, masks), "data")
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))              # doctest: +SKIP
    >>> run = jax.shard_map(shard, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")),
    ...                     out_specs=P())                                   # doctest: +SKIP
    """
    _check_state(state)
    # An exact all-gather made of one psum: each device writes its state into its own slot of a
    # (devices, ...) array of zeros, and adding zeros is exact. (A psum of the sums themselves
    # would round once per device; lax.all_gather's result is not marked replicated by shard_map.)
    size = jax.lax.axis_size(axis_name) if hasattr(jax.lax, "axis_size") else jax.lax.psum(1, axis_name)
    slot = jnp.arange(size) == jax.lax.axis_index(axis_name)

    def spread(a: Array) -> Array:
        return jnp.where(slot.reshape((size,) + (1,) * a.ndim), a[None], jnp.zeros((), a.dtype))

    gathered = jax.lax.psum(jax.tree.map(spread, state), axis_name)
    merged = jax.tree.map(lambda a: a[0], gathered)
    for k in range(1, size):
        merged = engine._merge_impl(merged, jax.tree.map(lambda a, k=k: a[k], gathered))
    return merged


def finalize(state: CompensatedCKAState) -> Array:
    r"""The ``(L1, L2)`` minibatch CKA matrix of the accumulated sums (Nguyen et al. 2021);
    :func:`cka.finalize`.

    .. math:: \mathrm{CKA}_{ij} = \frac{\sum_b \mathrm{HSIC}_1(K_b^{(i)}, L_b^{(j)})}
              {\sqrt{\sum_b \mathrm{HSIC}_1(K_b^{(i)}, K_b^{(i)})\,\sum_b \mathrm{HSIC}_1(L_b^{(j)}, L_b^{(j)})}}

    NaN where a denominator is not positive (a constant layer), never clipped. Traceable; called
    outside a trace it also checks the sums and raises if any is NaN/Inf (features with NaN/Inf
    entered some batch) and warns (:class:`cka.CKANumericsWarning`) about NaN results.
    """
    _check_state(state)
    matrix = engine.finalize(state)
    if not isinstance(matrix, jax.core.Tracer):
        _raise_if_not_finite(engine.folded(state))
        core._warn_about_values(core.get_backend(matrix), matrix, what="minibatch CKA")
    return matrix


def finalize_statistics(state: CompensatedCKAState, *, confidence: float = 0.95) -> CKAStatistics:
    """The matrix of :func:`finalize` with its intervals, p-values, null means and calibrated scores
    (:func:`cka.finalize_statistics`), for a state made by :func:`init` with ``bootstrap`` and/or
    ``permutations``. Checks the sums as :func:`finalize` does outside a trace."""
    return engine.finalize_statistics(state, confidence=confidence, matrix=finalize(state))


def _raise_if_not_finite(total: CKAState) -> None:
    bad_x = np.flatnonzero(~np.isfinite(np.asarray(total.hsic_xx)))
    bad_y = np.flatnonzero(~np.isfinite(np.asarray(total.hsic_yy)))
    if bad_x.size or bad_y.size or not np.isfinite(np.asarray(total.hsic_xy)).all():
        raise ValueError(
            f"the accumulated HSIC sums hold NaN or Inf (layers xs{bad_x.tolist()} ys{bad_y.tolist()}): some "
            f"batch's features had NaN or Inf values. Find it with jax.debug_nans or by checking the features "
            f"(e.g. cka.state.update_state checks every batch)."
        )


# --------------------------------------------------------------------------------------------
# Padding and stacking
# --------------------------------------------------------------------------------------------


def pad_batch(arrays: Sequence[Array], size: int) -> tuple[list[Array], Array]:
    """Zero-pad every ``(n, ...)`` array to ``(size, ...)`` and return the ``(size,)`` mask of valid rows.

    The ragged last batch of a loader, padded to the static batch size, reuses the compiled update.

    Parameters
    ----------
    arrays : list of (n, ...) arrays
        One batch's features (one per layer), or the model inputs.
    size : int
        The static batch size, ``>= n``.

    Returns
    -------
    padded : list of (size, ...) JAX arrays
    mask : (size,) bool JAX array, true on the first ``n`` rows.
    """
    arrays = list(arrays)
    if not arrays:
        raise ValueError("pad_batch needs at least one array.")
    n = int(np.shape(arrays[0])[0])
    if n > size:
        raise ValueError(f"a batch of {n} examples does not fit the static size {size}; raise size to at least {n}.")
    padded = []
    for i, a in enumerate(arrays):
        a = jnp.asarray(a)
        if a.shape[0] != n:
            raise ValueError(f"arrays[{i}] has {a.shape[0]} rows but arrays[0] has {n}; pass one batch's arrays.")
        padded.append(jnp.pad(a, [(0, size - n)] + [(0, 0)] * (a.ndim - 1)))
    return padded, jnp.arange(size) < n


def stack_batches(batches: Sequence[Sequence[Array]], size: int | None = None) -> tuple[list[Array], Array]:
    """Stack batches of per-layer features into the ``(B, size, ...)`` arrays of :func:`scan_update`.

    Parameters
    ----------
    batches : sequence of B batches, each a list of L (n_b, ...) arrays
    size : int, optional
        The padded batch size; default the largest ``n_b``.

    Returns
    -------
    stacked : list of L (B, size, ...) JAX arrays
    masks : (B, size) bool JAX array
    """
    if not batches:
        raise ValueError("stack_batches needs at least one batch.")
    size = size if size is not None else max(int(np.shape(b[0])[0]) for b in batches)
    padded, masks = zip(*(pad_batch(b, size) for b in batches), strict=True)
    layers = len(padded[0])
    if any(len(p) != layers for p in padded):
        raise ValueError(f"every batch must hold the same layers; got {sorted({len(p) for p in padded})} layers.")
    return [jnp.stack([p[i] for p in padded]) for i in range(layers)], jnp.stack(masks)
