r"""THE accumulator of minibatch CKA: :class:`CKAState` and pure ``init / update / merge / finalize``.

Every path accumulates through this module: the functional API (numpy, torch, JAX), the comparer
(:class:`cka.CKA`), the JAX streaming API (:mod:`cka.stream`), ``torch.distributed`` and
checkpoints. The per-batch math (Grams, all-pairs HSIC terms) lives in :mod:`cka.core`; this module
sums it over batches (Nguyen, Raghu & Kornblith, ICLR 2021) and owns the numerical policy of the sums:

* float64 accumulators (numpy, torch on CPU/CUDA, JAX with ``jax_enable_x64``) keep a plain
  :class:`CKAState`: one rounding of float64 per batch is far below any tolerance here;
* float32 accumulators (JAX without x64, torch on MPS) keep a :class:`CompensatedCKAState`, the sums
  plus their rounding errors (Knuth's TwoSum), and double-centre RBF Grams before the HSIC terms;
  without both, 50 batches of post-ReLU features err by ~3e-6 against float64, with both by ~1e-8.

Masks (padded rows of a ragged batch) and skipping a batch with too few valid rows are expressed with
``where``, so they work under ``jax.jit`` without a host round-trip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple

from cka._sums import (
    AnyState,
    CKAState,
    CompensatedCKAState,
    _accumulate,
    _fieldwise,
    _merge_impl,
    _sums,
    folded,
)
from cka.backends import Backend, get_backend
from cka.core import (
    _backend_of,
    _center_grams,
    _check_bandwidth,
    _check_features,
    _check_kernel,
    _check_n,
    _check_unbiased,
    _hsic_pairs,
    _safe_ratio,
    _stack_grams,
    min_examples,
    warn_skipped_batches,
)
from cka.kernels import _scaled_gram_impl
from cka.statistics import (
    CKAStatistics,
    finalize_statistics,
    replicate_counts,
    resampled_terms,
    statistics_fields,
)

Array = Any

__all__ = [
    "CKAState",
    "CKAStatistics",
    "CompensatedCKAState",
    "finalize",
    "finalize_statistics",
    "folded",
    "init_state",
    "merge_states",
    "update_state",
    "update_state_from_grams",
]


# --------------------------------------------------------------------------------------------
# Argument checks (static properties only: they also run under a trace)
# --------------------------------------------------------------------------------------------


def _check_state(state: Any, name: str = "state") -> CKAState:
    if not isinstance(state, (CKAState, CompensatedCKAState)):
        raise TypeError(
            f"{name} must be a CKAState (or CompensatedCKAState) from cka.init_state; got {type(state).__name__}."
        )
    return _sums(state)


def _layers(state: AnyState) -> tuple[int, int]:
    sums = _sums(state)
    return int(sums.hsic_xx.shape[0]), int(sums.hsic_yy.shape[0])


def _check_layer_count(state: AnyState, n_x: int, n_y: int) -> None:
    layers = _layers(state)
    if (n_x, n_y) != layers:
        raise ValueError(
            f"the state was made for {layers[0]} x {layers[1]} layers but this batch has {n_x} x {n_y}; "
            f"pass the same layers in every batch."
        )


def _check_batch_index(state: AnyState, batch_index: Any) -> None:
    if batch_index is None and replicate_counts(state) != (0, 0):
        raise ValueError(
            "this state keeps bootstrap/permutation statistics, whose random draws are keyed by the batch's position "
            "in the stream: pass batch_index= (0, 1, 2, ... over all batches, ranks and resumes) with every update."
        )


def _gram_items(grams: Sequence[Array] | Array, name: str) -> list[tuple[str, Array]]:
    """``(name, array)`` for each Gram of a sequence, or for the one stack."""
    if not isinstance(grams, (list, tuple)):
        return [(name, grams)]
    if not grams:
        raise ValueError(f"{name} holds no Gram; pass one (n, n) Gram per layer (at least one layer).")
    return [(f"{name}[{i}]", k) for i, k in enumerate(grams)]


def _gram_layers_and_size(b: Backend, grams: Sequence[Array] | Array, name: str) -> tuple[int, int]:
    """``(L, n)`` of a stack ``(L, n, n)`` or a sequence of ``(n, n)`` Grams; a ValueError with the
    shapes for a non-square one, or Grams over different numbers of examples."""
    items, stacked = _gram_items(grams, name), not isinstance(grams, (list, tuple))
    for label, k in items:
        shape = b.shape(k)
        if len(shape) != (3 if stacked else 2) or shape[-1] != shape[-2]:
            what = "an (L, n, n) stack of" if stacked else "a square (n, n)"
            raise ValueError(f"{label} must be {what} Gram matrices; got shape {shape}.")
    sizes = {b.shape(k)[-1] for _, k in items}
    if len(sizes) > 1:
        shapes = [b.shape(k) for _, k in items]
        raise ValueError(
            f"every Gram of {name} must be over the same n examples; got shapes {shapes}. Pass the Grams of one batch."
        )
    return (b.shape(grams)[0] if stacked else len(items)), sizes.pop()


# --------------------------------------------------------------------------------------------
# init / update
# --------------------------------------------------------------------------------------------


def init_state(
    n_layers_x: int,
    n_layers_y: int,
    like: Array,
    *,
    compensated: bool | None = None,
    bootstrap: int = 0,
    permutations: int = 0,
) -> AnyState:
    """An empty state for ``n_layers_x x n_layers_y`` layer pairs, with ``like``'s array type,
    device and accumulator dtype (float64 where the framework has it).

    Parameters
    ----------
    n_layers_x, n_layers_y : int
        Layers of the first and second model (rows and columns of the CKA matrix), at least 1.
    like : array
        Any array of the framework and device to accumulate on.
    compensated : bool, optional
        Keep the rounding errors of the sums (:class:`CompensatedCKAState`). Default: exactly when
        the accumulator dtype is not float64 (JAX without ``jax_enable_x64``, torch on MPS).
    bootstrap, permutations : int
        Also keep ``R`` bootstrap replicates and ``P`` permutation-null sums (:mod:`cka.statistics`;
        updates then need ``batch_index``); read them with :func:`finalize_statistics`.
    """
    for name, value in (("n_layers_x", n_layers_x), ("n_layers_y", n_layers_y)):
        if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < 1:
            raise ValueError(
                f"{name} must be a positive int (a number of layers; at least one layer per side); got {value!r}."
            )
    b = get_backend(like)
    rows, cols = int(n_layers_x), int(n_layers_y)
    shapes = ((rows, cols), (rows,), (cols,), (), ())
    extra = statistics_fields(rows, cols, like, bootstrap, permutations)
    scales = (b.zeros((rows,), like=like), b.zeros((cols,), like=like))  # the sums' scales (cka._sums)
    state = CKAState(*(b.zeros(shape, like=like) for shape in shapes), *extra, *scales)  # type: ignore[call-arg]
    if compensated is None:
        compensated = b.eps(state.hsic_xy.dtype) > 1e-10  # float32 (or narrower) accumulators
    return CompensatedCKAState(state, _fieldwise(lambda f: f + 0, state)) if compensated else state


def _double_centre(b: Backend, grams: Array, mask: Array | None, n: Any) -> Array:
    r""":math:`HKH` for each Gram of a stack ``(L, N, N)``, over the valid rows (``mask``; ``n`` of
    them), padded rows and columns kept zero.

    Every HSIC estimator here is exactly invariant to :math:`K \to K + a1^\top + 1a^\top + c11^\top`
    (DESIGN.md), and :math:`HKH` is of that form; it removes the large mean of RBF kernel entries
    (all in (0, 1]) whose squares otherwise cancel in float32 HSIC terms (error 2e-5 -> 1e-7).
    """
    if mask is None:
        return _center_grams(b, grams)
    rows = b.sum(grams, axis=-1) / n  # padded entries are zero: means over the valid ones
    total = b.sum(rows, axis=-1) / n
    centred = grams - rows[:, :, None] - rows[:, None, :] + total[:, None, None]
    valid = mask != 0
    return b.where(b.outer(valid, valid)[None], centred, b.zeros((), like=centred, dtype=centred.dtype))


def _scaled_stack(b: Backend, grams: Array, log2_factor: Any, owned: bool) -> tuple[Array, Array]:
    r"""``(G, s)``: a Gram stack ``(L, N, N)`` brought to the per-layer scales ``s (L,)`` its HSIC terms
    are summed at (:class:`cka.state.CKAState`'s ``log2_scale`` fields), with :math:`K = 2^{s} G`
    for :math:`K = 2^{f} \cdot` ``grams`` the true Gram (``log2_factor`` :math:`f`, (L,) or 0: as
    :func:`cka.kernels._scaled_gram_impl` gives them).

    :math:`s = 0` (the true Gram) while the exponent :math:`t` of a layer's largest diagonal entry
    (the largest entry of a positive semi-definite kernel matrix) stays within a quarter of the
    accumulator's exponent range (HSIC terms go as :math:`K^2 n^4` at worst), or the Gram is zero;
    beyond, :math:`s = t`.
    Powers of two only: exact. Scales in place when the stack is ``owned``.
    """
    dtype = grams.dtype
    exponent_range = b.max_exponent(dtype)  # 1024 for float64, 128 for float32
    diagonal = b.stop_gradient(b.max_abs_last(b.diagonal(grams)))
    top = b.frexp_exponent(diagonal) + log2_factor  # may exceed the dtype's own exponent range: a number
    # a zero Gram (a constant layer) keeps scale 0: its terms are zero at any scale
    scale = b.where((b.xp.abs(top) > exponent_range // 4) & (diagonal > 0), top, b.zeros((), like=top, dtype=dtype))
    shift = b.zeros((), like=top, dtype=dtype) + log2_factor - scale  # G = grams * 2^shift
    if b.branches_cheaply(grams) and not b.to_numpy(shift).any():
        return grams, scale
    # in two steps, each factor a normal number (a shift may exceed the exponent range by itself)
    half = b.xp.floor(shift / 2)
    factors = [b.pow2(part, dtype)[:, None, None] for part in (half, shift - half)]
    first = b.multiply_in_place(grams, factors[0]) if owned else grams * factors[0]
    return b.multiply_in_place(first, factors[1]), scale


class _Flags(NamedTuple):
    """What an update learnt about its batch: which layers' self terms are finite (``(L1,)``,
    ``(L2,)``), all of them at once (0-d), and whether the batch had enough examples (0-d)."""

    finite_x: Array
    finite_y: Array
    all_finite: Array
    enough: Array


def _add_batch(
    state: AnyState,
    grams_x: Sequence[Array] | Array,
    grams_y: Sequence[Array] | Array,
    n: Any,
    mask: Array | None,
    unbiased: bool,
    centre: bool,
    batch_index: Any = None,
    seed: int = 0,
    overwrite: bool = False,
    log2_factors: tuple[Any, Any] = (0.0, 0.0),
) -> tuple[AnyState, _Flags]:
    r"""Traceable core of every update: one batch's HSIC terms added to ``state`` (and, where the
    state keeps them, their bootstrap-weighted and permuted versions: :func:`cka.statistics.resampled_terms`).

    With a static int ``n`` the caller has checked it; otherwise (a mask, or ``n`` given for padded
    Grams) a batch with fewer than :func:`cka.core.min_examples` examples adds exactly nothing, by
    ``where`` (which also drops the NaN of the 0/0 such a batch computes). NaN/Inf anywhere in a
    layer's Gram off the diagonal reaches its self term :math:`\mathrm{HSIC}(K, K)`, so the
    ``L1 + L2`` flags are as strict as a pass over the Grams, at no cost.

    The unbiased estimator reads the Grams with zeroed diagonals (:math:`\tilde K`): they are zeroed
    once here for the batch's terms and its statistics, in place on stacks this function made (a
    stack of a list, a cast, a double-centred copy) or that the caller lets it ``overwrite``, else
    in one copy. (Subtracting :math:`\operatorname{diag}K\cdot\operatorname{diag}L` from
    :math:`\langle K, L\rangle_F` instead would need no copy but cancels digits.)

    ``log2_factors``: per side, :math:`f` with the true Grams :math:`2^f` times the given ones ((L,) or
    0); the terms are computed on Grams at the scales of :func:`_scaled_stack`, which the delta
    carries, so that layers far outside the accumulator's range are summed exactly too.
    """
    b = get_backend(_sums(state).hsic_xy)
    stacks, scales = [], []
    for grams, factor in ((grams_x, log2_factors[0]), (grams_y, log2_factors[1])):
        g = _stack_grams(b, grams)
        g, scale = _scaled_stack(b, g, factor, owned=overwrite or g is not grams)
        if centre:
            g = _double_centre(b, g, mask, n)
        if unbiased:
            g = b.zero_diagonal_in_place(g) if (overwrite or centre or g is not grams) else b.zero_diagonal(g)
        stacks.append(g)
        scales.append(scale)
    gx, gy = stacks
    xy, xx, yy = _hsic_pairs(b, gx, gy, n, unbiased, diagonal_zeroed=unbiased)
    zero = b.zeros((), like=xy, dtype=xy.dtype)
    extra = resampled_terms(
        b, _sums(state), gx, gy, n, unbiased, (xy, xx, yy), mask, batch_index, seed, diagonal_zeroed=unbiased
    )
    delta = CKAState(xy, xx, yy, zero + n, zero + 1, *extra, *scales)
    finite_x, finite_y = b.xp.isfinite(xx), b.xp.isfinite(yy)
    enough = zero == 0  # a 0-d True
    if not isinstance(n, int):
        enough = delta.n_examples >= min_examples(unbiased)
        delta = _fieldwise(lambda d: b.where(enough, d, b.zeros((), like=d, dtype=d.dtype)), delta)
        finite_x, finite_y = finite_x | ~enough, finite_y | ~enough
    flags = _Flags(finite_x, finite_y, b.xp.all(finite_x) & b.xp.all(finite_y), enough)
    return _accumulate(state, delta), flags


def _after_update(b: Backend, state: AnyState, flags: _Flags, unbiased: bool, may_skip: bool) -> bool:
    """Outside a trace: warn about a skipped batch; whether every self term was finite (one host
    synchronisation; two where the batch may have been skipped)."""
    if may_skip and not bool(flags.enough):
        index = round(float(b.to_numpy(folded(state).n_batches)))  # batches the state held before
        warn_skipped_batches([index], unbiased, stacklevel=3)
    return bool(flags.all_finite)


def _quiet_if_skippable(b: Backend, may_skip: bool) -> contextlib.AbstractContextManager:
    """numpy evaluates the 0/0 of a batch that ``where`` then drops, and would warn about it beside
    the skipped-batch warning: silence its floating-point warnings there (torch and JAX do not warn)."""
    if may_skip and b.name == "numpy":
        return b.xp.errstate(divide="ignore", invalid="ignore")
    return contextlib.nullcontext()


def _update_from_grams_impl(
    state: AnyState,
    grams_x: Sequence[Array] | Array,
    grams_y: Sequence[Array] | Array,
    n: Any,
    unbiased: bool,
    batch_index: Any = None,
    seed: int = 0,
    overwrite: bool = False,
) -> tuple[AnyState, _Flags]:
    centre = False
    if n is None:  # whole Grams: a static size; only these can be double-centred (no mask)
        n = get_backend(_sums(state).hsic_xy).shape(grams_x[0] if isinstance(grams_x, (list, tuple)) else grams_x)[-1]
        centre = isinstance(state, CompensatedCKAState)
    return _add_batch(state, grams_x, grams_y, n, None, unbiased, centre, batch_index, seed, overwrite)


def update_state_from_grams(
    state: AnyState,
    grams_x: Sequence[Array] | Array,
    grams_y: Sequence[Array] | Array,
    *,
    n: Any = None,
    unbiased: bool = True,
    check: bool = True,
    batch_index: Any = None,
    seed: int = 0,
    overwrite: bool = False,
) -> AnyState:
    r"""Add one batch, given its Grams, to ``state``: the entry point of the frontends, which compute
    each layer's Gram as soon as the layer has run.

    .. math:: S_{ij} \mathrel{+}= \mathrm{HSIC}(K^{(i)}, L^{(j)}),\quad
              S^{x}_i \mathrel{+}= \mathrm{HSIC}(K^{(i)}, K^{(i)}),\quad S^{y}_j \mathrel{+}= \mathrm{HSIC}(L^{(j)}, L^{(j)})

    Parameters
    ----------
    state : CKAState or CompensatedCKAState
    grams_x : (L1, n, n) array or sequence of L1 (n, n) arrays
        Kernels :math:`K^{(i)}` of the first model's layers for this batch (see :func:`cka.gram`).
    grams_y : (L2, n, n) array or sequence of L2 (n, n) arrays
        Kernels :math:`L^{(j)}` of the second model's layers, over the same examples.
    n : int or 0-d array, optional
        Number of valid examples (default: the Grams' size, which must then be at least 4, or 2 if
        biased). With padded batches the padded rows and columns of every Gram must be zero; then
        every HSIC term is unchanged and only ``n`` differs. A batch whose ``n`` is below the
        minimum adds nothing (with the skipped-batch warning outside a trace).
    unbiased : bool
        Unbiased HSIC (Nguyen et al. 2021's choice) or biased per-batch HSIC.
    check : bool
        Raise a ValueError naming the side and layer whose Gram holds NaN/Inf (one host
        synchronisation per batch; skipped under a trace). Frontends that track non-finite values
        on the device pass ``False``.
    batch_index, seed : int
        For a state with statistics (:func:`init_state`'s ``bootstrap``, ``permutations``): the
        batch's position in the whole stream (over all ranks and resumes, skipped batches included;
        a traced int32 under ``jax.jit``) and the seed, which key its random draws.
    overwrite : bool
        Let the update zero the Grams' diagonals in place (unbiased only; numpy arrays and torch
        tensors outside autograd) instead of working on a copy: saves one ``(L, n, n)`` copy per side,
        for callers that own the stacks and do not read them afterwards (the comparer).

    Returns
    -------
    CKAState or CompensatedCKAState
        A new state of the same kind. With a compensated state (float32 accumulators) whole Grams
        are double-centred first (exact for every estimator, and precise in float32).
    """
    sums = _check_state(state)
    _check_unbiased(unbiased)
    items = _gram_items(grams_x, "grams_x") + _gram_items(grams_y, "grams_y")
    b = _backend_of(sums.hsic_xy, *(k for _, k in items), names=("state", *(name for name, _ in items)))
    (layers_x, size), (layers_y, size_y) = (
        _gram_layers_and_size(b, g, name) for g, name in ((grams_x, "grams_x"), (grams_y, "grams_y"))
    )
    if size_y != size:
        raise ValueError(
            f"grams_x and grams_y must be kernels over the same n examples; got n = {size} for grams_x "
            f"(first shape {b.shape(items[0][1])}) and n = {size_y} for grams_y (first shape "
            f"{b.shape(items[-1][1])}). Pass the Grams of one batch to both."
        )
    _check_layer_count(state, layers_x, layers_y)
    _check_batch_index(state, batch_index)
    if n is None:
        _check_n(size, unbiased)
    else:
        n = b.zeros((), like=sums.hsic_xy) + n  # traced like a mask's count: a padded batch may be skipped
    with _quiet_if_skippable(b, n is not None):
        new_state, flags = b.jit(_update_from_grams_impl, static_argnames=("unbiased", "seed", "overwrite"))(
            state, grams_x, grams_y, n, unbiased, batch_index, int(seed), bool(overwrite)
        )
    if b.is_tracing(flags.all_finite) or not (check or n is not None):
        return new_state
    if not _after_update(b, state, flags, unbiased, may_skip=n is not None) and check:
        for side, ok in (("grams_x", flags.finite_x), ("grams_y", flags.finite_y)):
            bad = [i for i, good in enumerate(b.to_numpy(ok).tolist()) if not good]
            if bad:
                raise ValueError(
                    f"{side}[{bad[0]}] contains NaN or Inf values (bad layers of {side}: {bad}); check the features "
                    f"or kernel that produced them, or pass check=False to let NaN reach the result."
                )
    return new_state


def _update_impl(
    state: AnyState,
    xs: Sequence[Array],
    ys: Sequence[Array],
    mask: Array | None,
    kernel: str,
    unbiased: bool,
    sigma: Any,
    sigma_frac: Any,
    batch_index: Any = None,
    seed: int = 0,
) -> tuple[AnyState, _Flags]:
    """Traceable: one batch of features (``mask``: its valid rows) into ``state``; as :func:`_add_batch`.
    The body of :func:`update_state` and of the jitted JAX streaming updates (:mod:`cka.stream`)."""
    b = get_backend(_sums(state).hsic_xy)
    dtype = _sums(state).hsic_xy.dtype
    # the Grams of the rescaled features and their exponents: the true Grams may not fit (_scaled_stack)
    scaled_x = [_scaled_gram_impl(x, kernel, sigma, sigma_frac, mask) for x in xs]
    scaled_y = [_scaled_gram_impl(y, kernel, sigma, sigma_frac, mask) for y in ys]
    factors = tuple(
        b.stack([b.zeros((), like=_sums(state).hsic_xy, dtype=dtype) + f for _, f in s]) for s in (scaled_x, scaled_y)
    )
    n = b.shape(xs[0])[0] if mask is None else b.sum(b.cast(mask, dtype))
    # Linear Grams of centred features are centred already; RBF Grams have a large mean.
    centre = isinstance(state, CompensatedCKAState) and kernel != "linear"
    grams_x, grams_y = [k for k, _ in scaled_x], [k for k, _ in scaled_y]
    return _add_batch(state, grams_x, grams_y, n, mask, unbiased, centre, batch_index, seed, True, factors)


def update_state(
    state: AnyState,
    xs: Sequence[Array],
    ys: Sequence[Array],
    *,
    mask: Array | None = None,
    kernel: str = "linear",
    unbiased: bool = True,
    sigma: float | None = None,
    sigma_frac: float = 0.8,
    batch_index: Any = None,
    seed: int = 0,
) -> AnyState:
    r"""Add one batch of features to ``state``: one Gram per layer, all pairs in one product.

    .. math:: S_{ij} \mathrel{+}= \mathrm{HSIC}_1(K^{(i)}, L^{(j)}),\quad
              S^{x}_i \mathrel{+}= \mathrm{HSIC}_1(K^{(i)}, K^{(i)}),\quad S^{y}_j \mathrel{+}= \mathrm{HSIC}_1(L^{(j)}, L^{(j)})

    with :math:`K^{(i)}` the kernel of ``xs[i]`` and :math:`L^{(j)}` that of ``ys[j]`` (over the
    valid rows).

    Parameters
    ----------
    state : CKAState or CompensatedCKAState
        From :func:`init_state` with ``len(xs), len(ys)`` layers.
    xs : sequence of L1 (n, ...) arrays
        This batch's features of each layer of the first model.
    ys : sequence of L2 (n, ...) arrays
        The same examples through the second model.
    mask : (n,) bool array, optional
        Valid rows of a padded batch (JAX: a ragged last batch without recompiling); padded rows add
        nothing, whatever they hold, and ``n`` becomes the number of valid rows. A batch with fewer
        than 4 valid rows (2 if biased) adds nothing, with the skipped-batch warning outside a trace
        (its index is the number of batches the state held).
    kernel, unbiased, sigma, sigma_frac
        As in :func:`cka.cka`.
    batch_index, seed : int
        For a state with statistics: see :func:`update_state_from_grams`.

    Returns
    -------
    CKAState or CompensatedCKAState
        A new state of the same kind (the input is not modified). Pure; jitted on JAX. NaN/Inf in
        the (valid rows of the) features raise a ValueError naming the layer, outside a trace.
    """
    sums = _check_state(state)
    _check_kernel(kernel)
    _check_unbiased(unbiased)
    _check_bandwidth(sigma, sigma_frac)
    _check_layer_count(state, len(xs), len(ys))
    _check_batch_index(state, batch_index)
    names = ("state", *[f"xs[{i}]" for i in range(len(xs))], *[f"ys[{j}]" for j in range(len(ys))])
    b = _backend_of(sums.hsic_xy, *xs, *ys, names=names)
    n = b.shape(xs[0])[0] if len(b.shape(xs[0])) else 0
    named = list(zip(names[1:], [*xs, *ys], strict=True))
    for name, arr in named:
        if len(b.shape(arr)) == 0 or b.shape(arr)[0] != n:
            raise ValueError(
                f"every layer of a batch must hold the same examples: xs[0] has {n} but {name} has "
                f"shape {b.shape(arr)}."
            )
    if mask is None:
        _check_n(n, unbiased)
    else:
        _backend_of(sums.hsic_xy, mask, names=("state", "mask"))
        if b.shape(mask) != (n,):
            raise ValueError(f"mask must have shape ({n},) (one flag per example); got shape {b.shape(mask)}.")
    with _quiet_if_skippable(b, mask is not None):
        new_state, flags = b.jit(_update_impl, static_argnames=("kernel", "unbiased", "seed"))(
            state, list(xs), list(ys), mask, kernel, unbiased, sigma, sigma_frac, batch_index, int(seed)
        )
    if b.is_tracing(flags.all_finite):
        return new_state
    if not _after_update(b, state, flags, unbiased, may_skip=mask is not None):
        for name, arr in named:  # the slow path, only to name the culprit
            _check_features(b, arr if mask is None else arr[mask != 0], name)
    return new_state


# --------------------------------------------------------------------------------------------
# merge / finalize
# --------------------------------------------------------------------------------------------


def merge_states(a: AnyState, b: AnyState) -> AnyState:
    """The state of the union of two disjoint sets of batches: the fieldwise sum (exact up to one
    rounding; compensated if either state is). One all-reduce does the same across processes.

    Parameters
    ----------
    a, b : CKAState or CompensatedCKAState
        States over the same layers, of the same array type, device and dtype.
    """
    sums_a, sums_b = _check_state(a, "a"), _check_state(b, "b")
    kinds = [get_backend(s.hsic_xy) for s in (sums_a, sums_b)]
    if kinds[0] is not kinds[1]:
        raise TypeError(
            f"cannot merge a state of {kinds[0].name} arrays (a) with one of {kinds[1].name} arrays (b); convert "
            f"one first, e.g. cka.CKAState(*(numpy.asarray(f) for f in cka.state.folded(b))) or torch.as_tensor "
            f"in place of numpy.asarray, then merge."
        )
    backend = _backend_of(sums_a.hsic_xy, sums_b.hsic_xy, names=("a", "b"))  # the same device
    if sums_a.hsic_xy.shape != sums_b.hsic_xy.shape:
        raise ValueError(
            f"cannot merge states over different layers: {tuple(sums_a.hsic_xy.shape)} vs {tuple(sums_b.hsic_xy.shape)}."
        )
    counts = (replicate_counts(sums_a), replicate_counts(sums_b))
    if counts[0] != counts[1]:
        raise ValueError(
            f"cannot merge a state with (bootstrap, permutations) = {counts[0]} (a) and one with {counts[1]} (b); "
            f"accumulate every shard with the same bootstrap, permutations and seed."
        )
    if sums_a.hsic_xy.dtype != sums_b.hsic_xy.dtype:
        raise TypeError(
            f"cannot merge a state accumulated in {sums_a.hsic_xy.dtype} (a) with one in {sums_b.hsic_xy.dtype} (b); "
            f"make both with cka.init_state on the same framework settings (e.g. jax_enable_x64)."
        )
    return backend.jit(_merge_impl)(a, b)


def _finalize_impl(state: AnyState) -> Array:
    total = folded(state)
    return _safe_ratio(get_backend(total.hsic_xy), total.hsic_xy, total.hsic_xx, total.hsic_yy)


def finalize(state: AnyState) -> Array:
    r"""The ``(L1, L2)`` minibatch CKA matrix from accumulated sums (Nguyen et al. 2021).

    .. math:: \mathrm{CKA}_{ij} = \frac{\sum_b \mathrm{HSIC}_1(K_b^{(i)}, L_b^{(j)})}
              {\sqrt{\sum_b \mathrm{HSIC}_1(K_b^{(i)}, K_b^{(i)})\,\sum_b \mathrm{HSIC}_1(L_b^{(j)}, L_b^{(j)})}}

    NaN where a denominator is zero (a constant layer); never clipped. A compensated state's sums
    and compensation are folded first.
    """
    sums = _check_state(state)
    return get_backend(sums.hsic_xy).jit(_finalize_impl)(state)


def __getattr__(name: str) -> Any:
    # minibatch_cka and minibatch_cka_matrix, loops over this accumulator, live in cka.minibatch;
    # still reachable as cka.state.<name> (imported on first use: cka.minibatch imports this module)
    if name in ("minibatch_cka", "minibatch_cka_matrix"):
        from cka import minibatch

        return getattr(minibatch, name)
    raise AttributeError(f"module 'cka.state' has no attribute {name!r}")
