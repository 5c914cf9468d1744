r"""Error bars and a null for every cell of a minibatch CKA matrix, in the same single pass.

Minibatch CKA (Nguyen, Raghu & Kornblith, ICLR 2021) is a ratio of sums of per-batch HSIC terms,

.. math:: \mathrm{CKA}_{ij} = \frac{\sum_b h^{xy}_{b,ij}}{\sqrt{\sum_b h^{xx}_{b,i}\,\sum_b h^{yy}_{b,j}}},

so everything here is more sums over batches, merged by addition (shards, ranks, resumed runs):

* **Confidence intervals: a Poisson bootstrap over batches.** Replicate ``r`` weights batch ``b`` by
  :math:`w_{rb} \sim \mathrm{Poisson}(1)` and keeps :math:`\sum_b w_{rb} h_b` for the three kinds of
  terms: ``R x (L1 L2 + L1 + L2)`` sums. The replicate's CKA is the ratio of its sums; the interval
  is the *expanded* percentile interval of the ``R`` replicates (Hesterberg 2015: tails widened for
  the number of batches, :func:`expanded_alpha`), which covered at the nominal rate in the
  simulation of tests/test_statistics.py where the plain percentile interval and BCa undercovered
  with 10-20 batches. The Poisson bootstrap
  (Hanley & MacGibbon 2006; Chamandy et al. 2012) is the streaming form of the multinomial one:
  each batch's weight is drawn on its own, without knowing how many batches there will be.
* **A permutation null.** Replicate ``p`` permutes the example order of the second model's Grams in
  every batch, :math:`L_b \to P_{pb} L_b P_{pb}^\top`, with one permutation per batch and replicate
  shared by every layer pair, so the null of an aggregate (a row's best match) is calibrated too.
  Only the cross terms change, :math:`\sum_b \mathrm{HSIC}(K_b^{(i)}, P L_b^{(j)} P^\top)`: the self
  terms are permutation invariant. ``P x L1 x L2`` sums.

**Why batches and not examples are resampled.** Resampling examples with replacement duplicates
rows of the features; a duplicated example is a perfectly matched pair that the unbiased HSIC
estimator (which only removes the diagonal, i.e. an example paired with *itself*) counts as
signal, so CKA is biased upward in every replicate. Batches are the independent units of the
minibatch estimator, its terms are sums over them, and weighting a whole batch keeps each
per-batch estimate intact. The price: intervals are only as good as the number of batches
(warned about below 10), and permutations shuffle examples *within* a batch, which presumes the
examples of a batch are exchangeable (not true for the tokens of one sequence).

**Random numbers that do not depend on sharding, ranks or resume.** Every draw comes from the
counter-based generator Philox4x32-10 (Salmon, Moraes, Dror & Shaw, SC 2011) keyed by ``seed`` and
counting ``(replicate, global batch index, example)``: batch 17's weights and permutations are the
same whether it is seen in one pass, on rank 3 of 8, or after a resume. The generator is written
once on uint32 arrays for numpy and ``jax.numpy`` (bit-identical results; traceable, so a JAX
batch index may be a traced value inside ``jit``/``scan``). For torch the ``R`` weights and ``P``
permutations of a batch are drawn on the host with numpy (microseconds) and copied to the device
with ``non_blocking=True``: a host-to-device copy, never a device-to-host one, so no sync.

References
----------
Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993 (percentile intervals).
Hesterberg, "What teachers should know about the bootstrap", The American Statistician, 2015
(the expanded percentile interval).
Chamandy, Muralidharan, Najmi & Naidu, "Estimating uncertainty for massive data streams", 2012.
Hanley & MacGibbon, "Creating non-parametric bootstrap samples using Poisson frequencies", 2006.
Phipson & Smyth, "Permutation p-values should never be zero", 2010 (the add-one p-value).
Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011 (Philox).
Gröger, Wen & Brbić, "Revisiting the Platonic Representation Hypothesis: An Aristotelian View",
arXiv:2602.14486, 2026 (permutation null calibration of similarity scores).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy

from cka._sampling import batch_permutations, bootstrap_weights, expanded_alpha, philox4x32
from cka._sums import folded
from cka.backends import Backend, get_backend
from cka.core import _safe_ratio, _unbiased_factors

Array = Any

__all__ = [
    "CKAStatistics",
    "CoarseStatisticsWarning",
    "batch_permutations",
    "bootstrap_weights",
    "check_statistics_options",
    "expanded_alpha",
    "finalize_statistics",
    "philox4x32",
    "replicate_counts",
    "resampled_terms",
    "statistics_fields",
]

#: Fewer replicates than this give coarse intervals (each tail of a 95% interval rests on
#: ``R/40`` replicates) or coarse p-values (the smallest is ``1/(P+1)``): warned, never refused.
MIN_REPLICATES = 100
#: Fewer batches than this make the bootstrap over batches unreliable: warned, never refused.
MIN_BATCHES = 10
#: Upper bound on the bytes of permuted Grams gathered at once (the permutations of a batch are
#: processed in chunks below it), so memory stays O(L n^2) whatever the number of permutations.
PERMUTATION_CHUNK_BYTES = 64 * 2**20


class CoarseStatisticsWarning(UserWarning):
    """Few bootstrap replicates, permutations or batches: intervals and p-values are coarse."""


class CKAStatistics(NamedTuple):
    r"""A minibatch CKA matrix with its bootstrap interval and permutation null, cell by cell.

    Fields are arrays of the input's type (``None`` where the statistic was not asked for).

    Attributes
    ----------
    matrix : (L1, L2) array
        The point estimate, bit for bit the matrix computed without statistics.
    ci_low, ci_high : (L1, L2) arrays or None
        Expanded percentile bootstrap interval (over batches) at the requested ``confidence``.
    p_value : (L1, L2) array or None
        :math:`(1 + \#\{p : \mathrm{CKA}^{(p)}_{ij} \ge \mathrm{CKA}_{ij}\}) / (1 + P)`: one-sided,
        against the null of no relation between the two models' representations of an example.
    null_mean : (L1, L2) array or None
        Mean CKA under the permutation null: about 0 for the unbiased estimator, the familiar
        positive bias for the biased one (Murphy, Zylberberg & Fyshe 2024).
    calibrated : (L1, L2) array or None
        :math:`(\mathrm{CKA} - \bar c_0) / (1 - \bar c_0)`, with :math:`\bar c_0` the null mean.
    p_value_best_row : (L1,) array or None
        For each layer of the first model, the p-value of its best match
        :math:`\max_j \mathrm{CKA}_{ij}` against the null distribution of :math:`\max_j \mathrm{CKA}^{(p)}_{ij}`
        (corrects for having searched the row).
    p_value_best_col : (L2,) array or None
        The same for each layer of the second model (maximum over the column).
    """

    matrix: Array
    ci_low: Array = None
    ci_high: Array = None
    p_value: Array = None
    null_mean: Array = None
    calibrated: Array = None
    p_value_best_row: Array = None
    p_value_best_col: Array = None


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def check_statistics_options(
    bootstrap: int = 0, permutations: int = 0, confidence: float = 0.95, seed: int = 0, *, stacklevel: int = 2
) -> None:
    """Validate the statistics keywords; warn (:class:`CoarseStatisticsWarning`) when few replicates are asked for.

    Raises
    ------
    ValueError
        A count that is not a non-negative int, a ``confidence`` outside (0, 1), or a ``seed`` that is
        not an int in ``[0, 2**64)``.
    """
    for name, value in (("bootstrap", bootstrap), ("permutations", permutations)):
        if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 0:
            raise ValueError(
                f"{name} must be a non-negative int (a number of replicates; 0 turns it off); got {value!r}. "
                f"Use e.g. {name}=1000."
            )
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, (int, float, numpy.floating))
        or not 0 < confidence < 1
    ):
        raise ValueError(f"confidence must be a number strictly between 0 and 1 (e.g. 0.95); got {confidence!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64); got {seed!r}.")
    coarse = [
        f"{name}={value}"
        for name, value in (("bootstrap", bootstrap), ("permutations", permutations))
        if 0 < value < MIN_REPLICATES
    ]
    if coarse:
        warnings.warn(
            f"{' and '.join(coarse)}: with fewer than {MIN_REPLICATES} replicates the intervals and p-values are "
            f"coarse (the smallest p-value is 1/(permutations+1), a 95% interval's tails rest on bootstrap/40 "
            f"replicates); use 1000 or more for results to report.",
            CoarseStatisticsWarning,
            stacklevel=stacklevel + 1,
        )


def _concrete_count(n_batches: Any) -> int | None:
    """The number of batches as an int, or None when it is unknown or a traced value under ``jax.jit``."""
    if n_batches is None:
        return None
    try:
        return round(float(n_batches))
    except (TypeError, ValueError):  # a tracer (ConcretizationTypeError is a TypeError)
        return None


def _check_batch_count(count: int | None, bootstrap: int) -> None:
    """Warn when the bootstrap rests on fewer than :data:`MIN_BATCHES` batches (when the count is known)."""
    if bootstrap and count is not None and count < MIN_BATCHES:
        warnings.warn(
            f"the bootstrap resamples batches, and only {count} were seen: intervals from fewer than "
            f"{MIN_BATCHES} batches are unreliable. Use more, smaller batches (each still >= 4 examples).",
            CoarseStatisticsWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Small array operations the backend protocol does not have
# --------------------------------------------------------------------------------------------


def _is_torch(b: Backend) -> bool:
    return b.name == "torch"


def _concat(b: Backend, parts: list[Array]) -> Array:
    return b.xp.cat(parts) if _is_torch(b) else b.xp.concatenate(parts)


def _take_columns(b: Backend, a: Array, index: Array) -> Array:
    """``a[:, index]`` for ``a`` (L, M) and a flat integer ``index``: a gather, no copy of ``a``."""
    return a.index_select(1, index) if _is_torch(b) else b.xp.take(a, index, axis=1)


def _permute_axes(b: Backend, x: Array, axes: tuple[int, ...]) -> Array:
    return x.permute(*axes) if _is_torch(b) else b.xp.transpose(x, axes)


def _amax(b: Backend, x: Array, axis: int) -> Array:
    return x.amax(dim=axis) if _is_torch(b) else b.xp.max(x, axis=axis)


def _nanquantile(b: Backend, x: Array, qs: tuple[float, float]) -> Array:
    """Quantiles ``qs`` over axis 0, ignoring NaN replicates (linear interpolation, numpy's default)."""
    if _is_torch(b):
        return b.xp.nanquantile(x, b.xp.tensor(qs, dtype=x.dtype, device=x.device), dim=0)
    with warnings.catch_warnings():  # an all-NaN cell (a constant layer) is NaN, as it should be
        warnings.simplefilter("ignore", RuntimeWarning)
        return b.xp.nanquantile(x, b.xp.asarray(qs, dtype=x.dtype), axis=0)


def _to_backend(b: Backend, array: numpy.ndarray, like: Array, dtype: Any = None) -> Array:
    """A host numpy array as ``like``'s array type and device (torch: an asynchronous host-to-device copy)."""
    if _is_torch(b):
        tensor = b.xp.from_numpy(numpy.ascontiguousarray(array))
        return tensor.to(device=like.device, dtype=dtype if dtype is not None else tensor.dtype, non_blocking=True)
    if b.name == "jax":
        return b.xp.asarray(array, dtype=dtype)
    return array if dtype is None else array.astype(dtype)


# --------------------------------------------------------------------------------------------
# The per-batch terms
# --------------------------------------------------------------------------------------------


def _pair_factors(
    b: Backend, grams: Array, unbiased: bool, diagonal_zeroed: bool = False
) -> tuple[Array, Array, Array]:
    r"""``(flat (L, N^2), row sums (L, N), totals (L,))`` of a Gram stack for the all-pairs form.

    Unbiased: of :math:`\tilde K` (zeroed diagonal, :func:`cka.core._unbiased_factors`). Biased: of
    :math:`K` itself, for the expansion :math:`\langle HKH, HLH\rangle = \langle K, L\rangle -
    \tfrac{2}{n}(K1)\cdot(L1) + \tfrac{1}{n^2}(1^\top K1)(1^\top L1)`, which holds for padded batches
    too (zero rows drop out) and, like the unbiased form, commutes with permutations.
    ``diagonal_zeroed`` (unbiased only): ``grams`` is :math:`\tilde K` already.
    """
    if unbiased:
        return _unbiased_factors(b, grams, diagonal_zeroed)
    rows = b.sum(grams, axis=-1)
    return grams.reshape(grams.shape[0], -1), rows, b.sum(rows, axis=-1)


def _combine(unbiased: bool, inner: Array, r_dot: Array, s_prod: Array, n: Any) -> Array:
    r"""HSIC from the three all-pairs pieces :math:`\langle A, B\rangle_F`, :math:`r_A\cdot r_B`, :math:`s_A s_B`.

    Unbiased (Song et al. 2012): :math:`[\mathrm{inner} + s_A s_B/((n-1)(n-2)) - 2 r_A\cdot r_B/(n-2)] / (n(n-3))`;
    biased (Gretton et al. 2005): :math:`[\mathrm{inner} - 2 r_A\cdot r_B/n + s_A s_B/n^2] / (n-1)^2`.
    """
    if unbiased:
        return (inner + s_prod / ((n - 1) * (n - 2)) - 2 * r_dot / (n - 2)) / (n * (n - 3))
    return (inner - 2 * r_dot / n + s_prod / n**2) / (n - 1) ** 2


def _permuted_cross_terms(
    b: Backend, fx: tuple, fy: tuple, perms: Array, inverse: Array, n: Any, unbiased: bool
) -> Array:
    r"""``(P, L1, L2)``: :math:`\mathrm{HSIC}(K^{(i)}, P_p L^{(j)} P_p^\top)` for every permutation ``p``.

    With :math:`\pi_p(B)_{ac} = B_{\pi_p(a)\pi_p(c)}`, the pieces are
    :math:`\langle A_i, \pi_p(B_j)\rangle_F = \langle \pi_p^{-1}(A_i), B_j\rangle_F` and
    :math:`r_{A_i}\cdot \pi_p(r_{B_j})`; the totals :math:`s` do not change. The smaller of the two
    stacks is gathered (the second model's with ``perms``, the first's with ``inverse``), and all
    ``P x L1 x L2`` inner products are one matrix product per chunk of permutations.

    Grams are symmetric, so only the strict upper triangle is gathered:
    :math:`\langle A, B'\rangle_F = \sum_{a<c} (A_{ac} + A_{ca}) B'_{ac} + \sum_a A_{aa} B'_{aa}`, half the
    copies and products (the diagonal term is zero for the unbiased estimator's zeroed diagonals).
    Chunks keep the gathered copies under :data:`PERMUTATION_CHUNK_BYTES`.
    """
    (ax, rx, sx), (ay, ry, sy) = fx, fy
    l1, l2 = ax.shape[0], ay.shape[0]
    size = rx.shape[-1]
    gather_x = l1 < l2  # permute the first model's Grams by the inverse: same values, less copying
    moving_flat, moving_rows, fixed_flat, fixed_rows = (ax, rx, ay, ry) if gather_x else (ay, ry, ax, rx)
    index = inverse if gather_x else perms
    rows, cols = (_to_backend(b, i.astype(numpy.int64), moving_flat) for i in numpy.triu_indices(size, 1))
    upper, lower = rows * size + cols, cols * size + rows
    fixed_pairs = _take_columns(b, fixed_flat, upper) + _take_columns(b, fixed_flat, lower)  # (Lf, T)
    diagonal = None if unbiased else _to_backend(b, numpy.arange(size, dtype=numpy.int64) * (size + 1), moving_flat)
    lm, lf, n_pairs = moving_flat.shape[0], fixed_flat.shape[0], size * (size - 1) // 2
    itemsize = 8 if ax.dtype == b.xp.float64 else 4
    chunk = max(1, PERMUTATION_CHUNK_BYTES // (lm * max(n_pairs, 1) * itemsize))
    s_prod = b.outer(sx, sy)
    parts = []
    for start in range(0, index.shape[0], chunk):
        pi = index[start : start + chunk]  # (c, N)
        c = pi.shape[0]
        moved = _take_columns(b, moving_flat, (pi[:, rows] * size + pi[:, cols]).reshape(-1))
        inner = b.matmul(moved.reshape(lm * c, n_pairs), b.transpose(fixed_pairs))  # (Lm * c, Lf)
        if diagonal is not None:
            moved_diagonal = _take_columns(b, moving_flat, (pi * (size + 1)).reshape(-1)).reshape(lm * c, size)
            inner = inner + b.matmul(moved_diagonal, b.transpose(_take_columns(b, fixed_flat, diagonal)))
        moved_rows = _take_columns(b, moving_rows, pi.reshape(-1)).reshape(lm * c, size)
        r_dot = b.matmul(moved_rows, b.transpose(fixed_rows))
        inner, r_dot = inner.reshape(lm, c, lf), r_dot.reshape(lm, c, lf)
        axes = (1, 0, 2) if gather_x else (1, 2, 0)  # -> (c, L1, L2)
        parts.append(_combine(unbiased, _permute_axes(b, inner, axes), _permute_axes(b, r_dot, axes), s_prod, n))
    return parts[0] if len(parts) == 1 else _concat(b, parts)


# --------------------------------------------------------------------------------------------
# init / update / merge
# --------------------------------------------------------------------------------------------


def statistics_fields(
    n_layers_x: int, n_layers_y: int, like: Array, bootstrap: int = 0, permutations: int = 0
) -> tuple[Array, Array, Array, Array]:
    """Zeros for the statistics fields of :class:`cka.state.CKAState` (``boot_xy, boot_xx, boot_yy,
    null_xy``) in ``like``'s array type, device and accumulator dtype. Without statistics they are
    empty (``R = 0`` or ``P = 0`` rows), not absent, so that every field of every state is an array
    (iterating, converting, merging, all-reducing and saving a state need no special case)."""
    check_statistics_options(bootstrap, permutations, stacklevel=3)
    b = get_backend(like)

    def zeros(*shape: int) -> Array:
        return b.zeros(shape, like=like)

    r, p = int(bootstrap), int(permutations)
    return (
        zeros(r, n_layers_x, n_layers_y),
        zeros(r, n_layers_x),
        zeros(r, n_layers_y),
        zeros(p, n_layers_x, n_layers_y),
    )


def replicate_counts(state: Any) -> tuple[int, int]:
    """``(bootstrap, permutations)`` a state accumulates (0 for an empty or absent field: a
    :class:`cka.state.CKAState` built by hand from its first five fields)."""
    sums = getattr(state, "sums", state)  # a CompensatedCKAState's fields, without folding them
    return tuple(0 if f is None else int(f.shape[0]) for f in (sums.boot_xy, sums.null_xy))  # type: ignore[return-value]


def resampled_terms(
    b: Backend,
    sums: Any,
    grams_x: Array,
    grams_y: Array,
    n: Any,
    unbiased: bool,
    terms: tuple[Array, Array, Array],
    mask: Array | None,
    batch_index: Any,
    seed: int,
    diagonal_zeroed: bool = False,
) -> tuple[Array, Array, Array, Array]:
    r"""One batch's increments of the statistics fields of ``sums`` (a :class:`cka.state.CKAState`).

    .. math::
        \Delta B^{xy}_{rij} = w_{rb}\,h^{xy}_{b,ij},\quad \Delta B^{xx}_{ri} = w_{rb}\,h^{xx}_{b,i},\quad
        \Delta B^{yy}_{rj} = w_{rb}\,h^{yy}_{b,j},\quad
        \Delta N_{pij} = \mathrm{HSIC}(K_b^{(i)}, P_{pb} L_b^{(j)} P_{pb}^\top)

    Traceable (the body of the state's update). ``terms`` are the batch's ``(xy, xx, yy)``
    (:math:`h_b`); ``grams_x, grams_y`` its ``(L, N, N)`` Gram stacks (padded rows and columns zero
    with ``mask``); ``batch_index`` the batch's position in the whole stream, counted over every rank
    and across resumes (skipped batches included): the generator's counter, a Python int, or a traced
    int32 under ``jax.jit``. The draws: JAX in the trace; numpy and torch on the host (microseconds),
    copied to the device without a sync. An empty field's increment is the (empty) field itself,
    an absent one's ``None``. Padded Grams given with a count
    ``n`` but no ``mask`` are taken to hold their valid rows first (as :func:`cka.stream.pad_batch`
    makes them; on torch this reads ``n`` on the host). ``diagonal_zeroed`` (unbiased only): the
    stacks' diagonals are zero already (:func:`cka.state` zeroes them once per batch).
    """
    n_boot, n_perm = replicate_counts(sums)
    dtype = sums.hsic_xy.dtype
    size = b.shape(grams_x)[-1]
    boot: tuple[Array, Array, Array] = (sums.boot_xy, sums.boot_xx, sums.boot_yy)  # empty or absent: adds nothing
    null = sums.null_xy
    if n_boot:
        weights = bootstrap_weights(seed, batch_index, n_boot, b.xp if b.name == "jax" else None)
        w = b.cast(weights if b.name == "jax" else _to_backend(b, weights, sums.hsic_xy), dtype)
        xy, xx, yy = (b.cast(t, dtype) for t in terms)
        boot = (w[:, None, None] * xy[None], w[:, None] * xx[None], w[:, None] * yy[None])
    if n_perm:
        if mask is None and not isinstance(n, int):  # padded Grams and their count: padding comes last
            mask = b.xp.arange(size) < (b.to_numpy(n) if b.name == "torch" else n)
        if b.name == "jax":
            perms = batch_permutations(seed, batch_index, n_perm, size, mask, b.xp)
            inverse = b.xp.argsort(perms, axis=-1)
        else:
            host = batch_permutations(seed, batch_index, n_perm, size, None if mask is None else b.to_numpy(mask))
            perms = _to_backend(b, host.astype(numpy.int64), sums.hsic_xy)
            inverse = _to_backend(b, numpy.argsort(host, axis=-1).astype(numpy.int64), sums.hsic_xy)
        gx, gy = b.cast(grams_x, dtype), b.cast(grams_y, dtype)
        factors = (_pair_factors(b, gx, unbiased, diagonal_zeroed), _pair_factors(b, gy, unbiased, diagonal_zeroed))
        null = _permuted_cross_terms(b, *factors, perms, inverse, n, unbiased)
    return (*boot, null)


# --------------------------------------------------------------------------------------------
# finalize
# --------------------------------------------------------------------------------------------


def _ratio3(b: Backend, xy: Array, xx: Array, yy: Array) -> Array:
    """CKA of stacked sums: ``xy (R, L1, L2) / sqrt(xx (R, L1, 1) * yy (R, 1, L2))``, NaN where not positive."""
    product = xx[..., :, None] * yy[..., None, :]
    positive = product > 0
    ones, nan = b.full_like_scalar(1.0, product), b.full_like_scalar(math.nan, product)
    return b.where(positive, xy / b.sqrt(b.where(positive, product, ones)), nan)


def _add_one_p_value(b: Backend, null: Array, observed: Array) -> Array:
    r""":math:`(1 + \#\{p : \mathrm{null}_p \ge \mathrm{obs}\}) / (1 + P)` over axis 0; NaN where ``observed`` is."""
    count = b.sum(b.cast(null >= observed[None], observed.dtype), axis=0)
    value = (1 + count) / (1 + null.shape[0])
    return b.where(~b.xp.isnan(observed), value, b.full_like_scalar(math.nan, observed))


def _max_ignoring_nan(b: Backend, x: Array, axis: int) -> Array:
    """Maximum over ``axis`` skipping NaN cells; NaN where all are NaN."""
    minus_inf = b.full_like_scalar(-math.inf, x)
    best = _amax(b, b.where(b.xp.isnan(x), minus_inf, x), axis)
    return b.where(best == -math.inf, b.full_like_scalar(math.nan, best), best)


def finalize_statistics(state: Any, *, confidence: float = 0.95, matrix: Array | None = None) -> CKAStatistics:
    r"""The CKA matrix with intervals, p-values, null means and calibrated scores.

    Parameters
    ----------
    state : CKAState or CompensatedCKAState
        Accumulated with ``bootstrap`` and/or ``permutations`` (:func:`cka.init_state`); a state
        without them gives ``matrix`` alone.
    matrix : (L1, L2) array, optional
        The point estimate as the caller computed it (:func:`cka.state.finalize`), returned as is, so
        asking for statistics never changes it, not even by a rounding; default :func:`cka.finalize`'s ratio.
    confidence : float in (0, 1)
        Coverage of the interval: the ``alpha'/2`` and ``1 - alpha'/2`` quantiles of the bootstrap
        replicates (linear interpolation), with ``alpha'`` of the expanded percentile interval over
        the ``B = state.n_batches`` batches (:func:`expanded_alpha`; ``1 - confidence`` when ``B`` is
        unknown, e.g. traced under ``jax.jit``). NaN with fewer than 2 batches.

    Returns
    -------
    CKAStatistics
        ``matrix`` is the given one (or the ratio of the sums). With ``P`` permutations:
        ``p_value`` the add-one p-value :math:`(1 + \#\{c^{(p)} \ge c\})/(1 + P)` (never 0: Phipson &
        Smyth 2010; valid, conservative by at most ``1/(P+1)``); ``null_mean`` :math:`\bar c_0`; and
        ``calibrated`` :math:`(c - \bar c_0)/(1 - \bar c_0)`, which is 0 in expectation under the null,
        1 at ``c = 1``, and linear in between, so scores from models of different widths, depths or
        biased/unbiased estimators land on one scale. This is the mean-centred form of the
        permutation null calibration of Gröger, Wen & Brbić (2026), who show raw similarity
        inflating with width and with the search over layers; the latter is what ``p_value_best_row``
        and ``p_value_best_col`` account for, comparing each row's (column's) best match with the
        null of the row's (column's) maximum, built from the same permutation shared by all cells.

    Notes
    -----
    The intervals were checked by simulation (a Gaussian model with known population CKA,
    tests/test_statistics.py): about nominal coverage from 10-20 batches on. They describe the
    sampling variability of batches drawn like the ones seen; they are least reliable with few
    batches and for estimates against the boundary 1.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be strictly between 0 and 1 (e.g. 0.95); got {confidence!r}.")
    sums = folded(state)
    b = get_backend(sums.hsic_xy)
    batches = _concrete_count(sums.n_batches)
    _check_batch_count(batches, replicate_counts(sums)[0])
    alpha = 1 - float(confidence) if batches is None else expanded_alpha(float(confidence), batches)
    one_batch = batches is not None and batches < 2  # nothing to resample: no interval
    if matrix is None:
        matrix = _safe_ratio(b, sums.hsic_xy, sums.hsic_xx, sums.hsic_yy)
    statistics = b.jit(_finalize_impl, static_argnames=("alpha", "one_batch"))(
        matrix, sums, alpha=alpha, one_batch=one_batch
    )
    return statistics._replace(matrix=matrix)  # the caller's array itself, not a copy out of jit


def _finalize_impl(matrix: Array, sums: Any, alpha: float, one_batch: bool) -> CKAStatistics:
    """Traceable body of :func:`finalize_statistics` (jitted on JAX), the interval's tail level given."""
    b = get_backend(matrix)
    fields: dict[str, Array] = {}
    n_boot, n_perm = replicate_counts(sums)
    if n_boot:
        replicates = _ratio3(b, sums.boot_xy, sums.boot_xx, sums.boot_yy)
        bounds = _nanquantile(b, replicates, (alpha / 2, 1 - alpha / 2))
        nan = b.full_like_scalar(math.nan, matrix)
        defined = ~b.xp.isnan(matrix)
        if one_batch:
            defined = defined & b.xp.isnan(matrix)
        fields["ci_low"], fields["ci_high"] = b.where(defined, bounds[0], nan), b.where(defined, bounds[1], nan)
    if n_perm:
        null = _ratio3(b, sums.null_xy, sums.hsic_xx[None], sums.hsic_yy[None])  # self terms unchanged
        null_mean = b.sum(null, axis=0) / n_perm
        spread = 1 - null_mean
        safe = spread > 0
        calibrated = b.where(
            safe,
            (matrix - null_mean) / b.where(safe, spread, b.full_like_scalar(1.0, spread)),
            b.full_like_scalar(math.nan, spread),
        )
        fields.update(
            p_value=_add_one_p_value(b, null, matrix),
            null_mean=null_mean,
            calibrated=calibrated,
            p_value_best_row=_add_one_p_value(b, _max_ignoring_nan(b, null, 2), _max_ignoring_nan(b, matrix, 1)),
            p_value_best_col=_add_one_p_value(b, _max_ignoring_nan(b, null, 1), _max_ignoring_nan(b, matrix, 0)),
        )
    return CKAStatistics(matrix, **fields)
