r"""THE accumulator of minibatch CKA: :class:`CKAState` and pure ``init / update / merge / finalize``.

Every path accumulates through this module: the functional API (numpy, torch, JAX), the comparer
(:class:`cka.CKA`), the JAX streaming API, ``torch.distributed`` and checkpoints. The per-batch math
(Grams, all-pairs HSIC terms) lives in :mod:`cka.core`; this module only sums it over batches
(Nguyen, Raghu & Kornblith, ICLR 2021).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from cka.backends import get_backend
from cka.core import (
    _backend_of,
    _check_features,
    _check_kernel,
    _check_n,
    _gram_impl,
    _hsic_pairs,
    _safe_ratio,
    _stack_grams,
    _warn_about_values,
    min_examples,
    warn_skipped_batches,
)

Array = Any

__all__ = [
    "CKAState",
    "finalize",
    "init_state",
    "merge_states",
    "minibatch_cka",
    "minibatch_cka_matrix",
    "update_state",
    "update_state_from_grams",
]

# --------------------------------------------------------------------------------------------
# Minibatch CKA: a pure accumulator (init / update / merge / finalize)
# --------------------------------------------------------------------------------------------


class CKAState(NamedTuple):
    r"""Sufficient statistics of minibatch CKA (Nguyen et al. 2021): sums over batches ``b``.

    A NamedTuple of arrays, hence a JAX pytree; every field merges by addition, so combining the
    states of shards (devices, ranks) is one sum (an all-reduce).

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
    """

    hsic_xy: Array
    hsic_xx: Array
    hsic_yy: Array
    n_examples: Array
    n_batches: Array


def init_state(n_layers_x: int, n_layers_y: int, like: Array) -> CKAState:
    """An empty :class:`CKAState` for ``n_layers_x x n_layers_y`` pairs, with ``like``'s array type,
    device and accumulator dtype (float64 where the framework has it)."""
    b = get_backend(like)
    zeros = lambda *shape: b.zeros(shape, like=like)  # noqa: E731
    return CKAState(zeros(n_layers_x, n_layers_y), zeros(n_layers_x), zeros(n_layers_y), zeros(), zeros())


def _update_from_grams_impl(state: CKAState, grams_x: Array, grams_y: Array, n: Any, unbiased: bool) -> CKAState:
    b = get_backend(state.hsic_xy)
    xy, xx, yy = _hsic_pairs(b, _stack_grams(b, grams_x), _stack_grams(b, grams_y), n, unbiased)
    return CKAState(
        state.hsic_xy + xy,
        state.hsic_xx + xx,
        state.hsic_yy + yy,
        state.n_examples + n,
        state.n_batches + 1,
    )


def update_state_from_grams(
    state: CKAState,
    grams_x: Sequence[Array] | Array,
    grams_y: Sequence[Array] | Array,
    *,
    n: Any = None,
    unbiased: bool = True,
) -> CKAState:
    r"""Add one batch, given its Grams, to ``state``: the entry point of the frontends, which compute
    each layer's Gram as soon as the layer has run.

    Parameters
    ----------
    state : CKAState
    grams_x : (L1, n, n) array or sequence of L1 (n, n) arrays
        Kernels of the first model's layers for this batch (see :func:`gram`).
    grams_y : (L2, n, n) array or sequence of L2 (n, n) arrays
    n : int or 0-d array, optional
        Number of valid examples (default: the Grams' size). With padded batches the padded rows and
        columns of every Gram must be zero; then every HSIC term is unchanged and only ``n`` differs.
    unbiased : bool
        Unbiased HSIC (Nguyen et al. 2021's choice) or biased per-batch HSIC.
    """
    b = get_backend(state.hsic_xy)
    size = b.shape(grams_x[0])[-1]
    if n is None:
        n = size
        _check_n(n, unbiased)
    return b.jit(_update_from_grams_impl, static_argnames=("unbiased",))(state, grams_x, grams_y, n, unbiased)


def _update_impl(
    state: CKAState, xs: Sequence[Array], ys: Sequence[Array], mask: Array | None,
    kernel: str, unbiased: bool, sigma: Any, sigma_frac: Any,
) -> tuple[CKAState, Array]:
    """The updated state and whether the batch was finite (one flag, checked once by the caller).

    NaN/Inf in example ``a`` of a layer reaches every entry of row ``a`` of its Gram, hence that
    layer's self term ``HSIC(K, K)`` (a sum over all off-diagonal entries): checking the ``L1 + L2``
    self terms is as strict as checking the ``(L, n, n)`` Grams, at no cost."""
    b = get_backend(state.hsic_xy)
    grams_x = _stack_grams(b, [_gram_impl(x, kernel, sigma, sigma_frac, mask) for x in xs])
    grams_y = _stack_grams(b, [_gram_impl(y, kernel, sigma, sigma_frac, mask) for y in ys])
    n = b.shape(xs[0])[0] if mask is None else b.sum(b.cast(mask, state.hsic_xy.dtype))
    new_state = _update_from_grams_impl(state, grams_x, grams_y, n, unbiased)
    delta_xx, delta_yy = new_state.hsic_xx - state.hsic_xx, new_state.hsic_yy - state.hsic_yy
    finite = b.xp.all(b.xp.isfinite(delta_xx)) & b.xp.all(b.xp.isfinite(delta_yy))
    return new_state, finite


def update_state(
    state: CKAState,
    xs: Sequence[Array],
    ys: Sequence[Array],
    *,
    mask: Array | None = None,
    kernel: str = "linear",
    unbiased: bool = True,
    sigma: float | None = None,
    sigma_frac: float = 0.8,
) -> CKAState:
    r"""Add one batch of features to ``state``: one Gram per layer, all pairs in one product.

    Parameters
    ----------
    state : CKAState
        From :func:`init_state` with ``len(xs), len(ys)`` layers.
    xs : sequence of L1 (n, ...) arrays
        This batch's features of each layer of the first model.
    ys : sequence of L2 (n, ...) arrays
        The same examples through the second model.
    mask : (n,) bool array, optional
        Valid rows of a padded batch (JAX: a ragged last batch without recompiling); padded rows add
        nothing and ``n`` becomes the number of valid rows.
    kernel, unbiased, sigma, sigma_frac
        As in :func:`cka`.

    Returns
    -------
    CKAState
        A new state (the input is not modified). Pure; jitted on JAX.
    """
    _check_kernel(kernel)
    if len(xs) != _len0(state.hsic_xx) or len(ys) != _len0(state.hsic_yy):
        raise ValueError(
            f"the state was made for {_len0(state.hsic_xx)} x {_len0(state.hsic_yy)} layers but this batch has "
            f"{len(xs)} x {len(ys)}; pass the same layers in every batch."
        )
    b = _backend_of(state.hsic_xy, *xs, *ys, names=("state", *[f"xs[{i}]" for i in range(len(xs))],
                                                    *[f"ys[{j}]" for j in range(len(ys))]))
    n = b.shape(xs[0])[0]
    named = [*((f"xs[{i}]", a) for i, a in enumerate(xs)), *((f"ys[{j}]", a) for j, a in enumerate(ys))]
    for name, arr in named:
        if len(b.shape(arr)) == 0 or b.shape(arr)[0] != n:
            raise ValueError(
                f"every layer of a batch must hold the same examples: xs[0] has {n} but {name} has "
                f"shape {b.shape(arr)}."
            )
    if mask is None:
        _check_n(n, unbiased)
    new_state, finite = b.jit(_update_impl, static_argnames=("kernel", "unbiased"))(
        state, list(xs), list(ys), mask, kernel, unbiased, sigma, sigma_frac
    )
    if not b.is_tracing(finite) and not bool(finite):
        for name, arr in named:  # the slow path, only to name the culprit
            _check_features(b, arr, name)
    return new_state


def _len0(a: Array) -> int:
    """Length of the first axis of an array of any backend (a static shape, safe under jit)."""
    return int(a.shape[0])


def merge_states(a: CKAState, b: CKAState) -> CKAState:
    """The state of the union of two disjoint sets of batches: the fieldwise sum (exact up to float64
    rounding; order-independent up to it). One all-reduce does the same across processes."""
    if a.hsic_xy.shape != b.hsic_xy.shape:
        raise ValueError(f"cannot merge states over different layers: {tuple(a.hsic_xy.shape)} vs {tuple(b.hsic_xy.shape)}.")
    return CKAState(*(p + q for p, q in zip(a, b)))


def finalize(state: CKAState) -> Array:
    r"""The ``(L1, L2)`` minibatch CKA matrix from accumulated sums (Nguyen et al. 2021).

    .. math:: \mathrm{CKA}_{ij} = \frac{\sum_b \mathrm{HSIC}_1(K_b^{(i)}, L_b^{(j)})}
              {\sqrt{\sum_b \mathrm{HSIC}_1(K_b^{(i)}, K_b^{(i)})\,\sum_b \mathrm{HSIC}_1(L_b^{(j)}, L_b^{(j)})}}

    NaN where a denominator is zero (a constant layer); never clipped.
    """
    b = get_backend(state.hsic_xy)
    return _safe_ratio(b, state.hsic_xy, state.hsic_xx, state.hsic_yy)


def _as_layer_list(batch: Any) -> list[Array]:
    if isinstance(batch, (list, tuple)):
        return list(batch)
    if isinstance(batch, dict):
        return list(batch.values())
    return [batch]


def minibatch_cka_matrix(
    xs: Iterable[Sequence[Array]],
    ys: Iterable[Sequence[Array]],
    *,
    kernel: str = "linear",
    unbiased: bool = True,
    sigma: float | None = None,
    sigma_frac: float = 0.8,
) -> Array:
    r"""Minibatch CKA between every layer of one model and every layer of another.

    .. math:: \mathrm{CKA}_{ij} = \frac{\sum_b \mathrm{HSIC}_1(K_b^{(i)}, L_b^{(j)})}
              {\sqrt{\sum_b \mathrm{HSIC}_1(K_b^{(i)}, K_b^{(i)})\,\sum_b \mathrm{HSIC}_1(L_b^{(j)}, L_b^{(j)})}}

    (Nguyen, Raghu & Kornblith, ICLR 2021), computed with one Gram per layer per batch and one
    matrix product for all pairs, accumulated in float64.

    Parameters
    ----------
    xs : iterable over batches; each a sequence of L1 arrays (n_b, ...)
        Features of the first model's layers (a single array counts as one layer).
    ys : iterable over the same batches; each a sequence of L2 arrays (n_b, ...)
    kernel, unbiased, sigma, sigma_frac
        As in :func:`cka`.

    Returns
    -------
    (L1, L2) array of the inputs' type and device.

    Batches with fewer than 4 examples (undefined for the unbiased estimator) are skipped with a
    warning; an error if none is left. Batches may differ in size.
    """
    state = None
    skipped: list[int] = []
    batches_x, batches_y = iter(xs), iter(ys)
    index = -1
    for index, batch_x in enumerate(batches_x):
        try:
            batch_y = next(batches_y)
        except StopIteration:
            raise ValueError(f"xs has more batches than ys (ys ended after {index}); pass the same batches to both.") from None
        layers_x, layers_y = _as_layer_list(batch_x), _as_layer_list(batch_y)
        b = get_backend(layers_x[0])
        n = b.shape(layers_x[0])[0]
        if n != b.shape(layers_y[0])[0]:
            raise ValueError(
                f"batch {index}: xs has {n} examples but ys has {b.shape(layers_y[0])[0]}; both sides must see "
                f"the same examples in the same order."
            )
        if n < min_examples(unbiased):
            skipped.append(index)
            continue
        if state is None:
            state = init_state(len(layers_x), len(layers_y), like=layers_x[0])
        try:
            state = update_state(state, layers_x, layers_y, kernel=kernel, unbiased=unbiased,
                                 sigma=sigma, sigma_frac=sigma_frac)
        except ValueError as error:
            raise ValueError(f"batch {index}: {error}") from None
    if next(batches_y, None) is not None:
        raise ValueError(f"ys has more batches than xs ({index + 1}); pass the same batches to both.")
    warn_skipped_batches(skipped, unbiased, stacklevel=2)
    if state is None:
        raise ValueError(
            "no batch with at least 4 examples to compute minibatch CKA from; pass larger batches."
            if skipped else "xs is empty: pass at least one batch of features."
        )
    matrix = finalize(state)
    _warn_about_values(get_backend(matrix), matrix, what="minibatch CKA")
    return matrix


def minibatch_cka(
    xs: Iterable[Array],
    ys: Iterable[Array],
    *,
    kernel: str = "linear",
    unbiased: bool = True,
    sigma: float | None = None,
    sigma_frac: float = 0.8,
) -> Array:
    r"""Minibatch CKA between two representations streamed in batches (Nguyen et al. 2021).

    .. math:: \mathrm{CKA} = \frac{\sum_b \mathrm{HSIC}_1(K_b, L_b)}{\sqrt{\sum_b \mathrm{HSIC}_1(K_b, K_b)\,\sum_b \mathrm{HSIC}_1(L_b, L_b)}}

    Parameters
    ----------
    xs, ys : iterables of (n_b, ...) arrays
        Per-batch features of the two representations, same examples in the same order.

    Returns
    -------
    0-d array of the inputs' type. With a single batch it equals ``cka(x, y, unbiased=True)``.
    """
    matrix = minibatch_cka_matrix(
        ([x] for x in xs), ([y] for y in ys), kernel=kernel, unbiased=unbiased, sigma=sigma, sigma_frac=sigma_frac
    )
    return matrix[0, 0]
