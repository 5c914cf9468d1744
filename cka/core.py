r"""Pure CKA math on numpy, torch and JAX arrays.

Vocabulary (STYLE.md): ``x, y`` are features of shape ``(n_samples, ...)``, flattened to
``(n, d)``; ``gram_x, gram_y`` are ``(n, n)`` kernel matrices; ``hsic`` is the biased estimator of
Gretton et al. (2005), ``hsic_unbiased`` the unbiased one of Song et al. (2012); minibatch CKA is
Nguyen, Raghu & Kornblith (2021); full-batch linear and RBF CKA are Kornblith et al. (2019).

Numerical decisions, each measured (DESIGN.md):

* Features are centred per batch before the Gram. Every estimator here is exactly invariant to it
  (``HSIC_1`` to ``K + a1^T + 1a^T + c11^T``, the biased one to ``HKH``), and it removes the large
  common offset of post-ReLU activations that otherwise makes the HSIC terms cancel catastrophically.
* The Gram product runs in the input dtype (raised to at least float32); the HSIC terms and every
  accumulator are float64 on the input's device (float32 only where the framework has no float64:
  JAX without ``jax_enable_x64``, torch on MPS).
* All ``L1 x L2`` layer pairs of a batch come from one matrix product of flattened Grams
  (DESIGN.md, "Making all layer pairs cheap"), never a Python loop over pairs or ``trace(K @ L)``.

Only static properties (shapes, dtypes) are checked inside the ``_*`` implementation functions, so
they trace under ``jax.jit``; value checks (NaN/Inf, constant layers) run in the public wrappers and
only outside a trace.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from cka.backends import Backend, get_backend

Array = Any

__all__ = [
    "KERNELS",
    "BiasedCKAWarning",
    "CKANumericsWarning",
    "cka",
    "feature_space_linear_cka",
    "gram",
    "hsic",
    "hsic_unbiased",
    "linear_kernel",
    "rbf_kernel",
]

KERNELS = ("linear", "rbf")

#: A layer whose centred features hold less than this fraction of the raw features' energy
#: (``||x - mean||^2 <= CONSTANT_TOLERANCE^2 * ||x||^2``) is treated as constant: its Gram is zeroed,
#: so its CKA is NaN (0/0) instead of a number made of rounding residue.
CONSTANT_ULPS = 16.0


class BiasedCKAWarning(UserWarning):
    """Biased CKA was asked for where it is misleading (more features than examples)."""


class CKANumericsWarning(UserWarning):
    """A CKA value is NaN (undefined) or outside [-1, 1] beyond rounding."""


# --------------------------------------------------------------------------------------------
# Argument checks (boundary only)
# --------------------------------------------------------------------------------------------


def _backend_of(*arrays: Array, names: Sequence[str]) -> Backend:
    """The common backend of ``arrays``; a clear error when array types or devices are mixed.

    Mixed types are refused rather than converted: a silent numpy<->torch<->JAX conversion would
    move data between devices and cut autograd graphs behind the caller's back.
    """
    backends = [get_backend(a) for a in arrays]
    first = backends[0]
    for name, a, b in zip(names, arrays, backends):
        if b is not first:
            raise TypeError(
                f"{names[0]} is a {first.name} array but {name} is a {b.name} array; pass both as the "
                f"same type, e.g. convert with torch.as_tensor(...), numpy.asarray(...) or jax.numpy.asarray(...)."
            )
        devices = (first.device(a), first.device(arrays[0]))
        if None not in devices and devices[0] != devices[1]:
            raise ValueError(
                f"{names[0]} is on {devices[1]} but {name} is on {devices[0]}; "
                f"move both to one device first (e.g. {name}.to({names[0]}.device))."
            )
    return first


def _check_features(b: Backend, x: Array, name: str) -> None:
    shape = b.shape(x)
    if len(shape) == 0:
        raise ValueError(f"{name} must have shape (n_samples, ...); got a scalar.")
    if not b.is_tracing(x) and not b.all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf values (shape {shape}); check the model or data that produced it.")


def _check_pair_n(b: Backend, x: Array, y: Array, names: tuple[str, str] = ("x", "y")) -> int:
    nx, ny = b.shape(x)[0], b.shape(y)[0]
    if nx != ny:
        raise ValueError(
            f"{names[0]} and {names[1]} must hold the same examples in the same order, but "
            f"{names[0]} has shape {b.shape(x)} ({nx} examples) and {names[1]} has shape {b.shape(y)} "
            f"({ny} examples); pass features of the same batch for both."
        )
    return nx


def min_examples(unbiased: bool) -> int:
    """Fewest examples a batch needs: 4 for the unbiased HSIC estimator (its ``n - 3`` factor), 2 otherwise."""
    return 4 if unbiased else 2


def warn_skipped_batches(skipped: Sequence[int], unbiased: bool, stacklevel: int = 2) -> None:
    """The one warning for batches left out for having fewer than :func:`min_examples` examples."""
    if skipped:
        warnings.warn(
            f"skipped batch(es) {list(skipped)} with fewer than {min_examples(unbiased)} examples: the "
            f"{'unbiased ' if unbiased else ''}HSIC estimator is undefined there.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def _check_n(n: int, unbiased: bool, what: str = "the batch") -> None:
    if unbiased and n < 4:
        raise ValueError(
            f"the unbiased HSIC estimator needs at least 4 examples, but {what} has {n}; "
            f"use a larger batch or unbiased=False."
        )
    if n < 2:
        raise ValueError(f"CKA needs at least 2 examples, but {what} has {n}.")


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid kernels: {', '.join(KERNELS)}.")


def _check_grams(b: Backend, gram_x: Array, gram_y: Array) -> int:
    for name, k in (("gram_x", gram_x), ("gram_y", gram_y)):
        shape = b.shape(k)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"{name} must be a square (n, n) kernel matrix; got shape {shape}.")
    if b.shape(gram_x) != b.shape(gram_y):
        raise ValueError(
            f"gram_x and gram_y must be kernels over the same n examples; got shapes "
            f"{b.shape(gram_x)} and {b.shape(gram_y)}."
        )
    for name, k in (("gram_x", gram_x), ("gram_y", gram_y)):
        if not b.is_tracing(k) and not b.all_finite(k):
            raise ValueError(f"{name} contains NaN or Inf values.")
    return b.shape(gram_x)[0]


def _warn_if_biased_misleading(unbiased: bool, n: int, dx: int, dy: int) -> None:
    if not unbiased and max(dx, dy) > n:
        warnings.warn(
            f"biased CKA with more features than examples (n={n}, d={max(dx, dy)}) is biased towards 1: "
            f"independent random features score near 1 (Murphy et al. 2024). Use unbiased=True for the "
            f"debiased estimate.",
            BiasedCKAWarning,
            stacklevel=3,
        )


def _warn_about_values(b: Backend, values: Array, what: str = "CKA") -> None:
    """Warn (never clip) when a result is NaN or exceeds 1 in magnitude beyond rounding."""
    if b.is_tracing(values):
        return
    import numpy

    v = numpy.atleast_1d(b.to_numpy(values))
    if numpy.isnan(v).any():
        where = numpy.argwhere(numpy.isnan(numpy.atleast_2d(v)))
        warnings.warn(
            f"{what} is NaN at {len(where)} entr{'y' if len(where) == 1 else 'ies'} (first: index "
            f"{tuple(int(i) for i in where[0])}): a constant (zero-variance) input, or an RBF bandwidth of zero, has no CKA.",
            CKANumericsWarning,
            stacklevel=3,
        )
    if (numpy.abs(v[~numpy.isnan(v)]) > 1 + 1e-6).any():
        warnings.warn(
            f"{what} exceeds 1 in magnitude (max {numpy.nanmax(numpy.abs(v)):.9g}); in exact arithmetic "
            f"|CKA| <= 1, so this is a numerical problem; please report it with the inputs.",
            CKANumericsWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _center_features(b: Backend, x: Array, mask: Array | None = None) -> tuple[Array, Array, Any]:
    """``(x - mean(x), mean, n)`` over examples, in the Gram dtype; with ``mask`` (n,), over the valid
    rows only, padded rows set to zero and ``n`` the (traced) number of valid rows."""
    x = b.cast(b.flatten(x), b.gram_dtype(x))
    if mask is None:
        mean = b.mean(x, axis=0)
        return x - mean, mean, b.shape(x)[0]
    # ``where``, not a product with the mask: padded rows may hold anything (even NaN) without
    # reaching the result, and XLA fuses it into the Gram's operand (~25% faster on CPU than x * m).
    valid = (mask != 0)[:, None]
    zero = b.zeros((), like=x, dtype=x.dtype)
    n = b.sum(b.cast(mask, x.dtype))
    mean = b.sum(b.where(valid, x, zero), axis=0)[None, :] / n
    return b.where(valid, x - mean, zero), mean, n


def _is_constant(b: Backend, centered_energy: Array, mean: Array, n: Any, dtype: Any) -> Array:
    r"""Whether features are constant up to rounding: :math:`\lVert \bar X\rVert_F^2 \le (c\,\epsilon)^2 \lVert X\rVert_F^2`
    with ``c = CONSTANT_ULPS`` and :math:`\epsilon` the Gram dtype's machine epsilon.

    The centring of a constant layer leaves rounding residue of order :math:`\epsilon |x|` per entry,
    whose Gram would otherwise turn into a meaningless CKA value. Uses
    :math:`\lVert X\rVert_F^2 = \lVert \bar X\rVert_F^2 + n\lVert \mu\rVert^2` so that no extra pass
    over the features is needed (:math:`\lVert \bar X\rVert_F^2` is the trace of the linear Gram).
    Returns a 0-d boolean array.
    """
    mean64 = b.cast(mean, centered_energy.dtype)
    raw_energy = centered_energy + n * b.sum(mean64 * mean64)
    return centered_energy <= (CONSTANT_ULPS * b.eps(dtype)) ** 2 * raw_energy


def _gram_impl(x: Array, kernel: str, sigma: Any, sigma_frac: Any, mask: Array | None = None) -> Array:
    """The ``(n, n)`` Gram of ``x`` after centring, in the accumulator dtype."""
    b = get_backend(x)
    centered, mean, n = _center_features(b, x, mask)
    accumulate = b.accumulator_dtype(x)
    dot = b.cast(b.matmul(centered, b.transpose(centered)), accumulate)  # the product in the input dtype
    sq_norms = b.diagonal(dot)
    constant = _is_constant(b, b.sum(sq_norms), mean, n, centered.dtype)
    if kernel == "linear":
        k = dot
    else:
        # squared distances by expansion; clamp tiny negative rounding residue to 0
        sq_distances = b.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * dot, 0.0)
        if sigma is None:
            # Kornblith et al. (2019): sigma^2 = sigma_frac^2 * median of all n^2 squared distances
            # (diagonal zeros included, as in their reference code).
            valid = None if mask is None else b.outer(mask, mask)
            median = b.median(sq_distances, valid)
            two_sigma_sq = 2 * sigma_frac**2 * median
        else:
            two_sigma_sq = b.zeros((), like=dot, dtype=dot.dtype) + 2 * sigma**2  # an array, also for a float
        # A zero bandwidth (more than half the pairs coincide, e.g. a constant layer) has no kernel:
        # NaN, not a division warning; constant layers are zeroed below anyway.
        nan = b.full_like_scalar(math.nan, dot)
        k = b.exp(-sq_distances / b.where(two_sigma_sq > 0, two_sigma_sq, nan))
        if mask is not None:
            m = b.cast(mask, k.dtype)
            k = k * b.outer(m, m)
    return b.where(constant, b.zeros((), like=k, dtype=k.dtype), k)


def gram(
    x: Array, *, kernel: str = "linear", sigma: float | None = None, sigma_frac: float = 0.8, check: bool = True
) -> Array:
    r"""Kernel matrix of the centred features ``x``, in the accumulator dtype (float64).

    Parameters
    ----------
    x : (n, ...) array
        Features; flattened to ``(n, d)`` and centred (mean over examples subtracted).
    kernel : {"linear", "rbf"}
    sigma, sigma_frac : float
        RBF bandwidth: fixed ``sigma``, or ``sigma_frac`` times the square root of the median
        squared distance (Kornblith et al. 2019).
    check : bool
        Check ``x`` for NaN/Inf (a host synchronisation on GPUs). Frontends pass ``False`` and
        track non-finite values on the device instead.

    Returns
    -------
    (n, n) array, float64 where the framework has it.
    """
    _check_kernel(kernel)
    b = get_backend(x)
    if check:
        _check_features(b, x, "x")
    return b.jit(_gram_impl, static_argnames=("kernel",))(x, kernel, sigma, sigma_frac)


def linear_kernel(x: Array) -> Array:
    r"""Linear kernel :math:`K = \bar X \bar X^\top` of the centred features :math:`\bar X = X - 1\mu^\top`.

    Centring changes :math:`K` only by :math:`K \to HKH`-type terms to which every HSIC estimator
    here is exactly invariant, and it keeps the Gram precise for features with a large mean.

    Parameters
    ----------
    x : (n, ...) array

    Returns
    -------
    (n, n) array in float64.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(8, 3))
    >>> bool(np.allclose(linear_kernel(x), linear_kernel(x + 100.0)))
    True
    """
    return gram(x, kernel="linear")


def rbf_kernel(x: Array, *, sigma: float | None = None, sigma_frac: float = 0.8) -> Array:
    r"""RBF kernel :math:`K_{ab} = \exp(-\lVert x_a - x_b \rVert^2 / (2\sigma^2))`.

    With ``sigma=None``, :math:`\sigma = \text{sigma\_frac}\cdot\sqrt{\operatorname{median}_{ab}\lVert x_a - x_b\rVert^2}`
    over all :math:`n^2` pairs (Kornblith et al. 2019 use fractions 0.2-0.8).

    Parameters
    ----------
    x : (n, ...) array
    sigma : float, optional
        A fixed bandwidth; overrides ``sigma_frac``.
    sigma_frac : float
        Bandwidth as a fraction of the median distance.

    Returns
    -------
    (n, n) array in float64.
    """
    return gram(x, kernel="rbf", sigma=sigma, sigma_frac=sigma_frac)


# --------------------------------------------------------------------------------------------
# HSIC: all layer pairs from one matrix product
# --------------------------------------------------------------------------------------------


def _stack_grams(b: Backend, grams: Sequence[Array] | Array) -> Array:
    """``(L, n, n)`` float64 stack from a sequence of ``(n, n)`` Grams (or a stack already)."""
    if isinstance(grams, (list, tuple)):
        grams = b.stack([b.cast(k, b.accumulator_dtype(k)) for k in grams])
    return b.cast(grams, b.accumulator_dtype(grams))


def _unbiased_factors(b: Backend, grams: Array) -> tuple[Array, Array, Array]:
    r"""For a stack of Grams ``(L, n, n)``: the flattened :math:`\tilde K` ``(L, n^2)``, the row sums
    :math:`r = \tilde K 1` ``(L, n)`` and the totals :math:`s = 1^\top \tilde K 1` ``(L,)``."""
    zeroed = b.zero_diagonal(grams)
    row_sums = b.sum(zeroed, axis=-1)
    totals = b.sum(row_sums, axis=-1)
    flat = zeroed.reshape(zeroed.shape[0], -1)
    return flat, row_sums, totals


def _center_grams(b: Backend, grams: Array) -> Array:
    """``H K H`` for each Gram of a stack ``(L, n, n)``, ``H = I - 11^T/n``."""
    row_means = b.mean(grams, axis=-1)  # (L, n, 1)
    return grams - row_means - b.mean(grams, axis=-2) + b.mean(row_means, axis=-2)


def _hsic_pairs(b: Backend, grams_x: Array, grams_y: Array, n: Any, unbiased: bool) -> tuple[Array, Array, Array]:
    r"""HSIC for all pairs of two Gram stacks, plus the self terms.

    Unbiased (Song et al. 2012), with :math:`\tilde K` the Gram with zeroed diagonal:

    .. math::
        \mathrm{HSIC}_1(K, L) = \frac{1}{n(n-3)}\Big[\operatorname{tr}(\tilde K\tilde L)
            + \frac{1^\top\tilde K 1\, 1^\top\tilde L 1}{(n-1)(n-2)} - \frac{2}{n-2} 1^\top\tilde K\tilde L 1\Big]

    where :math:`\operatorname{tr}(\tilde K\tilde L) = \langle \tilde K, \tilde L\rangle_F` (Grams are
    symmetric), so all ``L1 x L2`` traces are one ``(L1, n^2) @ (n^2, L2)`` product and
    :math:`1^\top\tilde K\tilde L 1 = r_K \cdot r_L` another ``(L1, n) @ (n, L2)`` one.
    Biased (Gretton et al. 2005): :math:`\operatorname{tr}(KHLH)/(n-1)^2 = \langle HKH, HLH\rangle_F/(n-1)^2`.

    Returns ``(hsic_xy (L1, L2), hsic_xx (L1,), hsic_yy (L2,))``.
    """
    if unbiased:
        fx, rx, sx = _unbiased_factors(b, grams_x)
        fy, ry, sy = _unbiased_factors(b, grams_y)

        def combine(trace: Array, r_dot: Array, s_prod: Array) -> Array:
            return (trace + s_prod / ((n - 1) * (n - 2)) - 2 * r_dot / (n - 2)) / (n * (n - 3))

        xy = combine(b.matmul(fx, b.transpose(fy)), b.matmul(rx, b.transpose(ry)), b.outer(sx, sy))
        xx = combine(b.sum_of_squares(fx), b.sum(rx * rx, axis=-1), sx * sx)
        yy = combine(b.sum_of_squares(fy), b.sum(ry * ry, axis=-1), sy * sy)
        return xy, xx, yy
    if not (isinstance(n, int) and n == b.shape(grams_x)[-1]):
        return _hsic_pairs_biased_padded(b, grams_x, grams_y, n)
    cx = _center_grams(b, grams_x).reshape(grams_x.shape[0], -1)
    cy = _center_grams(b, grams_y).reshape(grams_y.shape[0], -1)
    scale = (n - 1) ** 2
    return (
        b.matmul(cx, b.transpose(cy)) / scale,
        b.sum(cx * cx, axis=-1) / scale,
        b.sum(cy * cy, axis=-1) / scale,
    )


def _hsic_pairs_biased_padded(b: Backend, grams_x: Array, grams_y: Array, n: Any) -> tuple[Array, Array, Array]:
    r"""Biased HSIC of padded Gram stacks ``(L, N, N)`` whose rows and columns past the ``n`` valid
    examples are zero (``n`` may be traced: a masked batch under ``jax.jit``).

    Centring must use :math:`H = I - 11^\top/n` over the valid rows only, so instead of forming
    :math:`HKH` (whose padded rows would not stay zero) use the expansion

    .. math:: \langle HKH, HLH\rangle_F = \langle K, L\rangle_F - \tfrac{2}{n}(K1)\cdot(L1)
              + \tfrac{1}{n^2}(1^\top K 1)(1^\top L 1),

    in which the zero padding drops out of every term. Grams of centred features have
    :math:`K1 \approx 0`, so the expansion loses nothing to cancellation there.
    """
    flat_x, flat_y = grams_x.reshape(grams_x.shape[0], -1), grams_y.reshape(grams_y.shape[0], -1)
    rx, ry = b.sum(grams_x, axis=-1), b.sum(grams_y, axis=-1)
    sx, sy = b.sum(rx, axis=-1), b.sum(ry, axis=-1)
    scale = (n - 1) ** 2

    def combine(inner: Array, r_dot: Array, s_prod: Array) -> Array:
        return (inner - 2 * r_dot / n + s_prod / n**2) / scale

    return (
        combine(b.matmul(flat_x, b.transpose(flat_y)), b.matmul(rx, b.transpose(ry)), b.outer(sx, sy)),
        combine(b.sum(flat_x * flat_x, axis=-1), b.sum(rx * rx, axis=-1), sx * sx),
        combine(b.sum(flat_y * flat_y, axis=-1), b.sum(ry * ry, axis=-1), sy * sy),
    )


def _safe_ratio(b: Backend, hsic_xy: Array, hsic_xx: Array, hsic_yy: Array) -> Array:
    r""":math:`\mathrm{HSIC}(K,L)/\sqrt{\mathrm{HSIC}(K,K)\,\mathrm{HSIC}(L,L)}`, NaN where the denominator is
    not positive (a constant input, or a negative unbiased estimate), never inf, never clipped.

    The inner ``where`` keeps ``sqrt`` away from non-positive values so gradients stay finite
    elsewhere (the double-``where`` idiom).
    """
    product = b.outer(hsic_xx, hsic_yy) if len(b.shape(hsic_xy)) == 2 else hsic_xx * hsic_yy
    positive = product > 0
    ones = b.full_like_scalar(1.0, product)
    nan = b.full_like_scalar(math.nan, product)
    return b.where(positive, hsic_xy / b.sqrt(b.where(positive, product, ones)), nan)


def _hsic_impl(gram_x: Array, gram_y: Array, unbiased: bool) -> Array:
    b = get_backend(gram_x)
    n = b.shape(gram_x)[0]
    xy, _, _ = _hsic_pairs(b, _stack_grams(b, [gram_x]), _stack_grams(b, [gram_y]), n, unbiased)
    return xy[0, 0]


def hsic(gram_x: Array, gram_y: Array) -> Array:
    r"""Biased HSIC (Gretton et al. 2005) of two kernel matrices.

    .. math:: \mathrm{HSIC}_0(K, L) = \frac{\operatorname{tr}(K H L H)}{(n-1)^2},\qquad H = I - \tfrac{1}{n}11^\top

    Parameters
    ----------
    gram_x, gram_y : (n, n) arrays
        :math:`K` and :math:`L`, kernels over the same ``n`` examples.

    Returns
    -------
    0-d array (float64) of the input's type and device.
    """
    b = _backend_of(gram_x, gram_y, names=("gram_x", "gram_y"))
    n = _check_grams(b, gram_x, gram_y)
    _check_n(n, unbiased=False, what="the kernel")
    return b.jit(_hsic_impl, static_argnames=("unbiased",))(gram_x, gram_y, False)


def hsic_unbiased(gram_x: Array, gram_y: Array) -> Array:
    r"""Unbiased HSIC estimator (Song et al. 2012) of two kernel matrices.

    With :math:`\tilde K, \tilde L` the kernels with zeroed diagonals,

    .. math::
        \mathrm{HSIC}_1(K, L) = \frac{1}{n(n-3)}\Big[\operatorname{tr}(\tilde K\tilde L)
            + \frac{1^\top\tilde K 1\, 1^\top\tilde L 1}{(n-1)(n-2)} - \frac{2}{n-2} 1^\top\tilde K\tilde L 1\Big]

    It is exactly invariant to :math:`K \to K + a1^\top + 1a^\top + c11^\top` and needs ``n >= 4``.

    Parameters
    ----------
    gram_x, gram_y : (n, n) arrays
        :math:`K` and :math:`L`.

    Returns
    -------
    0-d array (float64) of the input's type and device.
    """
    b = _backend_of(gram_x, gram_y, names=("gram_x", "gram_y"))
    n = _check_grams(b, gram_x, gram_y)
    _check_n(n, unbiased=True, what="the kernel")
    return b.jit(_hsic_impl, static_argnames=("unbiased",))(gram_x, gram_y, True)


# --------------------------------------------------------------------------------------------
# Full-batch CKA
# --------------------------------------------------------------------------------------------


def _centered_or_zero(b: Backend, x: Array) -> Array:
    """Centred features ``(n, d)``, all zero when the layer is constant (see :func:`_is_constant`)."""
    centered, mean, n = _center_features(b, x)
    energy = b.sum(b.cast(centered * centered, b.accumulator_dtype(x)))
    constant = _is_constant(b, energy, mean, n, centered.dtype)
    return b.where(constant, b.zeros((), like=centered, dtype=centered.dtype), centered)


def _feature_space_terms(b: Backend, x: Array, y: Array, unbiased: bool) -> tuple[Array, Array, Array]:
    r"""``(hsic_xy, hsic_xx, hsic_yy)`` of the linear kernel from centred features, without any Gram.

    Biased (Kornblith et al. 2019): :math:`\langle HKH, HLH\rangle = \lVert \bar Y^\top \bar X\rVert_F^2`.
    Unbiased, with :math:`q_a = \lVert x_a\rVert^2`, :math:`u = \bar X^\top 1` (zero up to rounding;
    kept so the identities are exact):
    :math:`\operatorname{tr}(\tilde K\tilde L) = \lVert \bar Y^\top\bar X\rVert_F^2 - \sum_a q^x_a q^y_a`,
    :math:`\tilde K 1 = \bar X u - q^x`, :math:`1^\top\tilde K 1 = \lVert u\rVert^2 - \sum_a q^x_a`.
    Cost :math:`O(n d_x d_y)` instead of :math:`O(n^2 (d_x + d_y))`. The common factor
    ``1/(n-1)^2`` of the biased form is dropped: it cancels in the CKA ratio.
    """
    accumulate = b.accumulator_dtype(x)
    n = b.shape(x)[0]
    xc, yc = _centered_or_zero(b, x), _centered_or_zero(b, y)

    def cross(p: Array, q: Array) -> Array:  # ||q^T p||_F^2 in float64 from a product in the input dtype
        prod = b.cast(b.matmul(b.transpose(q), p), accumulate)
        return b.sum(prod * prod)

    if not unbiased:
        return cross(xc, yc), cross(xc, xc), cross(yc, yc)

    def factors(p: Array) -> tuple[Array, Array, Array]:
        p64 = b.cast(p, accumulate)
        sq_norms = b.sum(p64 * p64, axis=1)  # q (n,)
        u = b.sum(p64, axis=0)  # (d,)
        row_sums = b.matmul(p64, u[:, None])[:, 0] - sq_norms  # K~ 1
        return sq_norms, row_sums, b.sum(u * u) - b.sum(sq_norms)

    qx, rx, sx = factors(xc)
    qy, ry, sy = factors(yc)

    def combine(frob: Array, qa: Array, qb: Array, ra: Array, rb: Array, sa: Array, sb: Array) -> Array:
        trace = frob - b.sum(qa * qb)
        return (trace + sa * sb / ((n - 1) * (n - 2)) - 2 * b.sum(ra * rb) / (n - 2)) / (n * (n - 3))

    return (
        combine(cross(xc, yc), qx, qy, rx, ry, sx, sy),
        combine(cross(xc, xc), qx, qx, rx, rx, sx, sx),
        combine(cross(yc, yc), qy, qy, ry, ry, sy, sy),
    )


def _use_feature_space(n: int, dx: int, dy: int) -> bool:
    """The feature-space form costs ``n (dx dy + dx^2 + dy^2)``, the Gram form ``n^2 (dx + dy)``;
    for equal widths the former wins when ``d < 2n/3``, i.e. whenever d is well below n."""
    return dx * dy + dx * dx + dy * dy < n * (dx + dy)


def _cka_impl(x: Array, y: Array, kernel: str, unbiased: bool, sigma: Any, sigma_frac: Any) -> Array:
    b = get_backend(x)
    n = b.shape(x)[0]
    dx, dy = b.shape(b.flatten(x))[1], b.shape(b.flatten(y))[1]
    if kernel == "linear" and _use_feature_space(n, dx, dy):
        xy, xx, yy = _feature_space_terms(b, x, y, unbiased)
        return _safe_ratio(b, xy, xx, yy)
    grams_x = _stack_grams(b, [_gram_impl(x, kernel, sigma, sigma_frac)])
    grams_y = _stack_grams(b, [_gram_impl(y, kernel, sigma, sigma_frac)])
    xy, xx, yy = _hsic_pairs(b, grams_x, grams_y, n, unbiased)
    return _safe_ratio(b, xy, xx, yy)[0, 0]


def cka(
    x: Array,
    y: Array,
    *,
    kernel: str = "linear",
    unbiased: bool = False,
    sigma: float | None = None,
    sigma_frac: float = 0.8,
) -> Array:
    r"""Centered Kernel Alignment between two representations of the same examples.

    .. math:: \mathrm{CKA}(K, L) = \frac{\mathrm{HSIC}(K, L)}{\sqrt{\mathrm{HSIC}(K, K)\,\mathrm{HSIC}(L, L)}}

    with :math:`K, L` the kernels of ``x`` and ``y`` and HSIC biased (Kornblith et al. 2019) or,
    with ``unbiased=True``, the unbiased estimator of Song et al. (2012) ("debiased CKA").
    Linear CKA uses the feature-space form :math:`\lVert Y^\top X\rVert_F^2/(\lVert X^\top X\rVert_F\lVert Y^\top Y\rVert_F)`
    (and its unbiased analogue) when it is cheaper, i.e. when the widths are below ``n``.

    Parameters
    ----------
    x : (n, ...) array
        Features of the first representation, flattened to ``(n, d_x)``.
    y : (n, ...) array
        Features of the second, same examples in the same order, flattened to ``(n, d_y)``.
    kernel : {"linear", "rbf"}
    unbiased : bool
        Use the unbiased HSIC estimator (needs ``n >= 4``). Biased CKA is misleading when
        ``d > n`` (independent Gaussians with n=50, d=5000 score 0.99; Murphy et al. 2024): a
        :class:`BiasedCKAWarning` says so.
    sigma, sigma_frac : float
        RBF bandwidth, see :func:`rbf_kernel`.

    Returns
    -------
    0-d array of the input's type, on its device, float64 where the framework has it; ``float()``
    works. Differentiable under torch autograd and ``jax.grad``; jit-able under ``jax.jit``.
    NaN (with a :class:`CKANumericsWarning`) when an input is constant.

    References
    ----------
    Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network Representations Revisited", ICML 2019.
    Song, Smola, Gretton, Bedo & Borgwardt, "Feature Selection via Dependence Maximization", JMLR 2012.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(100, 10))
    >>> q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(10, 10)))
    >>> round(float(cka(x, 3.0 * x @ q)), 12)   # invariant to rotation and isotropic scaling
    1.0
    """
    _check_kernel(kernel)
    b = _backend_of(x, y, names=("x", "y"))
    _check_features(b, x, "x")
    _check_features(b, y, "y")
    n = _check_pair_n(b, x, y)
    _check_n(n, unbiased)
    _warn_if_biased_misleading(unbiased, n, b.shape(b.flatten(x))[1], b.shape(b.flatten(y))[1])
    value = b.jit(_cka_impl, static_argnames=("kernel", "unbiased"))(x, y, kernel, unbiased, sigma, sigma_frac)
    _warn_about_values(b, value)
    return value


def feature_space_linear_cka(x: Array, y: Array, *, unbiased: bool = False) -> Array:
    r"""Linear CKA from the ``(d_x, d_y)`` cross-covariance, never forming an ``(n, n)`` Gram.

    .. math:: \mathrm{CKA} = \frac{\lVert \bar Y^\top \bar X\rVert_F^2}{\lVert \bar X^\top \bar X\rVert_F\,\lVert \bar Y^\top \bar Y\rVert_F}

    (Kornblith et al. 2019), or its unbiased analogue. Equal to ``cka(x, y)`` for every ``n, d``;
    :func:`cka` picks it by itself when it is the cheaper form.
    """
    b = _backend_of(x, y, names=("x", "y"))
    _check_features(b, x, "x")
    _check_features(b, y, "y")
    n = _check_pair_n(b, x, y)
    _check_n(n, unbiased)
    xy, xx, yy = _feature_space_terms(b, x, y, unbiased)
    value = _safe_ratio(b, xy, xx, yy)
    _warn_about_values(b, value)
    return value
