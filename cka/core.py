r"""Pure CKA math on numpy, torch and JAX arrays: HSIC estimators, all-pairs HSIC terms, full-batch CKA.

Vocabulary (STYLE.md): ``x, y`` are features of shape ``(n_samples, ...)``, flattened to
``(n, d)``; ``gram_x, gram_y`` are ``(n, n)`` kernel matrices; ``hsic`` is the biased estimator of
Gretton et al. (2005), ``hsic_unbiased`` the unbiased one of Song et al. (2012); full-batch linear and
RBF CKA are Kornblith et al. (2019). Grams come from :mod:`cka.kernels` (re-exported here), the
argument checks from :mod:`cka._checks`, the sums over batches from :mod:`cka.state`.

Numerical decisions, each measured (DESIGN.md):

* Grams of centred features, the product in the Gram dtype (at least float32, at the chosen
  ``gram_precision``), rescaled by a power of two where the features would over- or underflow
  (:mod:`cka.kernels`); the HSIC terms and every accumulator in float64 on the input's device
  (float32 only where the framework has no float64: JAX without ``jax_enable_x64``, torch on MPS).
* All ``L1 x L2`` layer pairs of a batch come from one matrix product of flattened Grams
  (DESIGN.md, "Making all layer pairs cheap"), never a Python loop over pairs or ``trace(K @ L)``.
* The feature-space form of linear CKA rescales each side by a power of two, centres in two passes,
  and removes the column sums that are still left in float64 (on the ``(d_y, d_x)`` product), so a
  large common offset costs it no digits either: both forms stay within 1e-6 of the float64 value.

Only static properties (shapes, dtypes) are checked inside the ``_*`` implementation functions, so
they trace under ``jax.jit``; value checks (NaN/Inf, constant layers) run in the public wrappers and
only outside a trace.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cka._checks import (
    KERNELS,
    BiasedCKAWarning,
    CKANumericsWarning,
    _backend_of,
    _check_bandwidth,
    _check_features,
    _check_grams,
    _check_kernel,
    _check_n,
    _check_pair_n,
    _check_precision,
    _check_unbiased,
    _warn_about_values,
    _warn_if_biased_misleading,
)

# Re-exported for the modules that import them from ``cka.core`` (state, statistics, compare, stream,
# frontends): the explicit ``name as name`` form marks them as part of this module's interface.
from cka._checks import _check_dtype as _check_dtype
from cka._checks import _check_flag as _check_flag
from cka._checks import min_examples as min_examples
from cka._checks import warn_skipped_batches as warn_skipped_batches
from cka.backends import PRECISIONS, Backend, get_backend
from cka.kernels import CONSTANT_ULPS as CONSTANT_ULPS
from cka.kernels import _exponent_of_max, _is_constant, _scaled_gram_impl, gram, linear_kernel, rbf_kernel
from cka.kernels import _gram_impl as _gram_impl

Array = Any

__all__ = [
    "KERNELS",
    "PRECISIONS",
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


# --------------------------------------------------------------------------------------------
# HSIC: all layer pairs from one matrix product
# --------------------------------------------------------------------------------------------


def _stack_grams(b: Backend, grams: Sequence[Array] | Array) -> Array:
    """``(L, n, n)`` float64 stack from a sequence of ``(n, n)`` Grams (or a stack already)."""
    if isinstance(grams, (list, tuple)):
        grams = b.stack([b.cast(k, b.accumulator_dtype(k)) for k in grams])
    return b.cast(grams, b.accumulator_dtype(grams))


def _unbiased_factors(b: Backend, grams: Array, diagonal_zeroed: bool = False) -> tuple[Array, Array, Array]:
    r"""For a stack of Grams ``(L, n, n)``: the flattened :math:`\tilde K` ``(L, n^2)``, the row sums
    :math:`r = \tilde K 1` ``(L, n)`` and the totals :math:`s = 1^\top \tilde K 1` ``(L,)``.
    ``diagonal_zeroed``: ``grams`` is :math:`\tilde K` already (no zeroed copy is made)."""
    zeroed = grams if diagonal_zeroed else b.zero_diagonal(grams)
    row_sums = b.sum(zeroed, axis=-1)
    totals = b.sum(row_sums, axis=-1)
    flat = zeroed.reshape(zeroed.shape[0], -1)
    return flat, row_sums, totals


def _center_grams(b: Backend, grams: Array) -> Array:
    """``H K H`` for each Gram of a stack ``(L, n, n)``, ``H = I - 11^T/n``."""
    row_means = b.mean(grams, axis=-1)  # (L, n, 1)
    return grams - row_means - b.mean(grams, axis=-2) + b.mean(row_means, axis=-2)


def _hsic_pairs(
    b: Backend, grams_x: Array, grams_y: Array, n: Any, unbiased: bool, diagonal_zeroed: bool = False
) -> tuple[Array, Array, Array]:
    r"""HSIC for all pairs of two Gram stacks, plus the self terms.

    Unbiased (Song et al. 2012), with :math:`\tilde K` the Gram with zeroed diagonal:

    .. math::
        \mathrm{HSIC}_1(K, L) = \frac{1}{n(n-3)}\Big[\operatorname{tr}(\tilde K\tilde L)
            + \frac{1^\top\tilde K 1\, 1^\top\tilde L 1}{(n-1)(n-2)} - \frac{2}{n-2} 1^\top\tilde K\tilde L 1\Big]

    where :math:`\operatorname{tr}(\tilde K\tilde L) = \langle \tilde K, \tilde L\rangle_F` (Grams are
    symmetric), so all ``L1 x L2`` traces are one ``(L1, n^2) @ (n^2, L2)`` product and
    :math:`1^\top\tilde K\tilde L 1 = r_K \cdot r_L` another ``(L1, n) @ (n, L2)`` one.
    Biased (Gretton et al. 2005): :math:`\operatorname{tr}(KHLH)/(n-1)^2 = \langle HKH, HLH\rangle_F/(n-1)^2`.

    Returns ``(hsic_xy (L1, L2), hsic_xx (L1,), hsic_yy (L2,))``. ``diagonal_zeroed`` (unbiased only):
    the stacks are :math:`\tilde K, \tilde L` already.
    """
    if unbiased:

        def combine(trace: Array, r_dot: Array, s_prod: Array) -> Array:
            return (trace + s_prod / ((n - 1) * (n - 2)) - 2 * r_dot / (n - 2)) / (n * (n - 3))

        # zero the diagonal first (a copy): subtracting diag(K).diag(L) from <K, L> instead cancels digits
        fx, rx, sx = _unbiased_factors(b, grams_x, diagonal_zeroed)
        fy, ry, sy = _unbiased_factors(b, grams_y, diagonal_zeroed)
        trace_xy, trace_xx, trace_yy = b.matmul(fx, b.transpose(fy)), b.sum_of_squares(fx), b.sum_of_squares(fy)
        xy = combine(trace_xy, b.matmul(rx, b.transpose(ry)), b.outer(sx, sy))
        xx = combine(trace_xx, b.sum(rx * rx, axis=-1), sx * sx)
        yy = combine(trace_yy, b.sum(ry * ry, axis=-1), sy * sy)
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


def _rescaled_grams(b: Backend, k: Array) -> tuple[Array, Array]:
    """``(2^-e K, e)`` for a Gram ``K`` in the accumulator dtype, ``2^e`` just above ``max |K|``: HSIC
    is bilinear, so its terms are computed on Grams of order one and scaled back once (exactly)."""
    k = b.cast(k, b.accumulator_dtype(k))
    exponent = _exponent_of_max(b, k)
    return k * b.pow2(-exponent, k.dtype), exponent


def _hsic_impl(gram_x: Array, gram_y: Array, unbiased: bool) -> Array:
    b = get_backend(gram_x)
    n = b.shape(gram_x)[0]
    (kx, ex), (ky, ey) = _rescaled_grams(b, gram_x), _rescaled_grams(b, gram_y)
    xy, _, _ = _hsic_pairs(b, _stack_grams(b, [kx]), _stack_grams(b, [ky]), n, unbiased)
    return xy[0, 0] * b.pow2(ex, xy.dtype) * b.pow2(ey, xy.dtype)


def hsic(gram_x: Array, gram_y: Array) -> Array:
    r"""Biased HSIC (Gretton et al. 2005) of two kernel matrices.

    .. math:: \mathrm{HSIC}_0(K, L) = \frac{\operatorname{tr}(K H L H)}{(n-1)^2},\qquad H = I - \tfrac{1}{n}11^\top

    Parameters
    ----------
    gram_x, gram_y : (n, n) arrays
        :math:`K` and :math:`L`, real kernels over the same ``n`` examples.

    Returns
    -------
    0-d array (float64) of the input's type and device. Computed on the Grams rescaled by powers of
    two and scaled back, so Grams of any magnitude whose HSIC is representable give it.
    """
    b = _backend_of(gram_x, gram_y, names=("gram_x", "gram_y"))
    n = _check_grams(b, gram_x, gram_y)
    _check_n(n, unbiased=False, what="the kernel")
    return b.as_array(b.jit(_hsic_impl, static_argnames=("unbiased",))(gram_x, gram_y, False))


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
        :math:`K` and :math:`L`, real.

    Returns
    -------
    0-d array (float64) of the input's type and device (rescaled internally, as :func:`hsic`).
    """
    b = _backend_of(gram_x, gram_y, names=("gram_x", "gram_y"))
    n = _check_grams(b, gram_x, gram_y)
    _check_n(n, unbiased=True, what="the kernel")
    return b.as_array(b.jit(_hsic_impl, static_argnames=("unbiased",))(gram_x, gram_y, True))


# --------------------------------------------------------------------------------------------
# Full-batch CKA
# --------------------------------------------------------------------------------------------


def _centred_features(b: Backend, x: Array, dtype: Any) -> Array:
    """Features ``(n, d)`` in ``dtype``, rescaled by a power of two to ``max|x| < 1`` (exact; CKA is
    invariant to it) and centred, all zero when the layer is constant (see :func:`_is_constant`)."""
    x = b.cast(b.flatten(x), dtype)
    x = x * b.pow2(-_exponent_of_max(b, x), dtype)
    mean = b.mean(x, 0)
    # Two passes: the mean of n values of a large common offset rounds to ~log2(n) eps |offset| in the
    # features' dtype (0.08 for n = 16384 at 1e5 in float32), and the mean of the centred values
    # removes most of that residual, cheaply (n d against the products' n d^2).
    centred = x - mean
    centred = centred - b.mean(centred, 0)
    energy = b.sum(b.cast(centred * centred, b.accumulator_dtype(x)))
    constant = _is_constant(b, energy, mean, b.shape(x)[0], dtype)
    return b.where(constant, b.zeros((), like=centred, dtype=dtype), centred)


def _feature_space_terms(b: Backend, x: Array, y: Array, unbiased: bool, precision: str) -> tuple[Array, Array, Array]:
    r"""``(hsic_xy, hsic_xx, hsic_yy)`` of the linear kernel from centred features, without any Gram.

    Biased (Kornblith et al. 2019): :math:`\langle HKH, HLH\rangle = \lVert \bar Y^\top H \bar X\rVert_F^2`
    with :math:`\bar Y^\top H\bar X = \bar Y^\top\bar X - u_y u_x^\top / n`, :math:`u = \bar X^\top 1`
    summed in float64: the centring in the features' dtype leaves column sums of order
    :math:`n\epsilon|\mu|` (large for a large common offset :math:`\mu`), and this second pass removes
    them exactly, so the form is as accurate as the Gram form (float32, offset :math:`10^5` times the
    spread, n = 256: 3e-4 error without it, 2e-7 with it; the features are also centred in two passes,
    which keeps those sums small at large n).
    Unbiased, with :math:`q_a = \lVert x_a\rVert^2`:
    :math:`\operatorname{tr}(\tilde K\tilde L) = \lVert \bar Y^\top\bar X\rVert_F^2 - \sum_a q^x_a q^y_a`,
    :math:`\tilde K 1 = \bar X u - q^x`, :math:`1^\top\tilde K 1 = \lVert u\rVert^2 - \sum_a q^x_a`
    (exact identities for any :math:`u`).
    Cost :math:`O(n d_x d_y)` instead of :math:`O(n^2 (d_x + d_y))`. The common factor
    ``1/(n-1)^2`` of the biased form is dropped: it cancels in the CKA ratio, and so do the powers of
    two each side is rescaled by.
    """
    accumulate = b.accumulator_dtype(x)
    n = b.shape(x)[0]
    dtype = b.promote_types(b.gram_dtype(x), b.gram_dtype(y))  # torch would refuse mixed float dtypes
    xc, yc = _centred_features(b, x, dtype), _centred_features(b, y, dtype)
    ux, uy = b.sum(b.cast(xc, accumulate), axis=0), b.sum(b.cast(yc, accumulate), axis=0)

    def cross(p: Array, q: Array) -> Array:  # q^T p in float64 from a product at the Gram precision
        return b.cast(b.product(b.transpose(q), p, precision), accumulate)

    if not unbiased:

        def frob(p: Array, q: Array, up: Array, uq: Array) -> Array:
            c = cross(p, q) - b.outer(uq, up) / n
            return b.sum(c * c)

        return frob(xc, yc, ux, uy), frob(xc, xc, ux, ux), frob(yc, yc, uy, uy)

    def factors(p: Array, u: Array) -> tuple[Array, Array, Array]:
        p64 = b.cast(p, accumulate)
        sq_norms = b.sum(p64 * p64, axis=1)  # q (n,)
        row_sums = b.matmul(p64, u[:, None])[:, 0] - sq_norms  # K~ 1
        return sq_norms, row_sums, b.sum(u * u) - b.sum(sq_norms)

    qx, rx, sx = factors(xc, ux)
    qy, ry, sy = factors(yc, uy)

    def combine(frob: Array, qa: Array, qb: Array, ra: Array, rb: Array, sa: Array, sb: Array) -> Array:
        trace = frob - b.sum(qa * qb)
        return (trace + sa * sb / ((n - 1) * (n - 2)) - 2 * b.sum(ra * rb) / (n - 2)) / (n * (n - 3))

    def squared(p: Array, q: Array) -> Array:
        c = cross(p, q)
        return b.sum(c * c)

    return (
        combine(squared(xc, yc), qx, qy, rx, ry, sx, sy),
        combine(squared(xc, xc), qx, qx, rx, rx, sx, sx),
        combine(squared(yc, yc), qy, qy, ry, ry, sy, sy),
    )


def _use_feature_space(n: int, dx: int, dy: int) -> bool:
    """The feature-space form costs ``n (dx dy + dx^2 + dy^2)``, the Gram form ``n^2 (dx + dy)``;
    for equal widths the former wins when ``d < 2n/3``, i.e. whenever d is well below n."""
    return dx * dy + dx * dx + dy * dy < n * (dx + dy)


def _cka_impl(x: Array, y: Array, kernel: str, unbiased: bool, sigma: Any, sigma_frac: Any, precision: str) -> Array:
    b = get_backend(x)
    n = b.shape(x)[0]
    dx, dy = b.shape(b.flatten(x))[1], b.shape(b.flatten(y))[1]
    if kernel == "linear" and _use_feature_space(n, dx, dy):
        xy, xx, yy = _feature_space_terms(b, x, y, unbiased, precision)
        return _safe_ratio(b, xy, xx, yy)
    # The Grams of the rescaled features: their powers of two cancel in the ratio, so features of any
    # magnitude give the CKA of the unscaled ones (and the same bits in the normal range).
    grams_x = _stack_grams(b, [_scaled_gram_impl(x, kernel, sigma, sigma_frac, None, precision)[0]])
    grams_y = _stack_grams(b, [_scaled_gram_impl(y, kernel, sigma, sigma_frac, None, precision)[0]])
    if kernel == "rbf":
        # Double-centred (HKH; every estimator is exactly invariant to it): RBF entries are 1 - O(d^2/sigma^2),
        # and the HSIC terms of the raw kernel would cancel down to that O() (4e-4 lost at sigma = 1000 x median).
        grams_x, grams_y = _center_grams(b, grams_x), _center_grams(b, grams_y)
    xy, xx, yy = _hsic_pairs(b, grams_x, grams_y, n, unbiased)
    return _safe_ratio(b, xy, xx, yy)[0, 0]


def _check_cka_arguments(x: Array, y: Array, unbiased: Any, gram_precision: Any) -> tuple[Backend, int]:
    """The checks shared by :func:`cka` and :func:`feature_space_linear_cka`; the backend and ``n``."""
    _check_unbiased(unbiased)
    _check_precision(gram_precision)
    b = _backend_of(x, y, names=("x", "y"))
    _check_features(b, x, "x")
    _check_features(b, y, "y")
    n = _check_pair_n(b, x, y)
    _check_n(n, unbiased)
    return b, n


def cka(
    x: Array,
    y: Array,
    *,
    kernel: str = "linear",
    unbiased: bool = False,
    sigma: float | None = None,
    sigma_frac: float = 0.8,
    gram_precision: str = "highest",
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
        Features of the first representation (real), flattened to ``(n, d_x)``.
    y : (n, ...) array
        Features of the second, same examples in the same order, flattened to ``(n, d_y)``. May
        differ from ``x`` in dtype (promoted).
    kernel : {"linear", "rbf"}
    unbiased : bool
        Use the unbiased HSIC estimator (needs ``n >= 4``). Biased CKA is misleading when
        ``d > n`` (independent Gaussians with n=50, d=5000 score 0.99; Murphy et al. 2024): a
        :class:`BiasedCKAWarning` says so.
    sigma, sigma_frac : float
        RBF bandwidth, see :func:`rbf_kernel`. Positive.
    gram_precision : {"highest", "tf32", "bf16"}
        Precision of the feature products (Grams, or the cross-covariances of the feature-space form),
        see :func:`gram`; the HSIC terms are float64 in every case.

    Returns
    -------
    0-d array of the input's type, on its device, float64 where the framework has it; ``float()``
    works. Differentiable under torch autograd and ``jax.grad``; jit-able under ``jax.jit``.
    NaN (with a :class:`CKANumericsWarning`) when an input is constant. Features of any magnitude
    (float32 around 1e20 or 1e-25 included) give the value of the unscaled features: CKA is invariant
    to scaling, and the products run on features rescaled by exact powers of two.

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
    _check_bandwidth(sigma, sigma_frac)
    b, n = _check_cka_arguments(x, y, unbiased, gram_precision)
    _warn_if_biased_misleading(unbiased, n, b.shape(b.flatten(x))[1], b.shape(b.flatten(y))[1])
    value = b.jit(_cka_impl, static_argnames=("kernel", "unbiased", "precision"))(
        x, y, kernel, unbiased, sigma, sigma_frac, gram_precision
    )
    _warn_about_values(b, value)
    return b.as_array(value)


def feature_space_linear_cka(x: Array, y: Array, *, unbiased: bool = False, gram_precision: str = "highest") -> Array:
    r"""Linear CKA from the ``(d_x, d_y)`` cross-covariance, never forming an ``(n, n)`` Gram.

    .. math:: \mathrm{CKA} = \frac{\lVert \bar Y^\top \bar X\rVert_F^2}{\lVert \bar X^\top \bar X\rVert_F\,\lVert \bar Y^\top \bar Y\rVert_F}

    (Kornblith et al. 2019), or its unbiased analogue. Equal to ``cka(x, y)`` for every ``n, d``;
    :func:`cka` picks it by itself when it is the cheaper form. Same arguments, checks and accuracy
    as :func:`cka`.
    """
    b, _ = _check_cka_arguments(x, y, unbiased, gram_precision)
    xy, xx, yy = _feature_space_terms(b, x, y, unbiased, gram_precision)
    value = _safe_ratio(b, xy, xx, yy)
    _warn_about_values(b, value)
    return b.as_array(value)
