r"""Kernel (Gram) matrices of one layer's features: centring, rescaling, the product's precision.

The only Gram implementation of the library: the functional API, the accumulator and every frontend
call :func:`gram` (or its traced core :func:`_gram_impl`). Numerical decisions, each measured
(DESIGN.md):

* Features are centred per batch before the product. Every HSIC estimator is exactly invariant to it
  (``HSIC_1`` to ``K + a1^T + 1a^T + c11^T``, the biased one to ``HKH``), and it removes the large
  common offset of post-ReLU activations that otherwise makes the HSIC terms cancel catastrophically.
* The product runs in the Gram dtype (the input's, at least float32; :meth:`Backend.gram_dtype`) at
  the chosen precision (:data:`PRECISIONS`); the result is handed on in the accumulator dtype
  (float64 where the framework has it; :meth:`Backend.accumulator_dtype`).
* Rescaling by a power of two. Features around 1e20 or 1e-25 in float32 (1e150 or 1e-160 in float64)
  overflow or underflow in the product, or later in the HSIC terms (squares of Gram entries). CKA is
  invariant to scaling each layer, so such features are multiplied by :math:`2^{-e}`, :math:`2^e` the
  power of two just above :math:`\max|x|`, before the product. A power of two is exact: with features
  in the normal range the rescaled computation gives the same bits. Where reading a value is free
  (numpy, torch on the CPU) it is done only where the unscaled product's diagonal says it is needed;
  on accelerators and under ``jax.jit`` always (one more read of the features, no synchronisation;
  cheaper to compile and run than a ``lax.cond``). :func:`_scaled_gram_impl` returns the Gram of the
  rescaled features with its exponent; :func:`gram` scales it back exactly when asked for the Gram itself.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

from cka._checks import (
    CKANumericsWarning,
    _check_bandwidth,
    _check_features,
    _check_flag,
    _check_kernel,
    _check_precision,
)
from cka.backends import PRECISIONS, Backend, get_backend

Array = Any

__all__ = ["CONSTANT_ULPS", "PRECISIONS", "gram", "linear_kernel", "rbf_kernel"]

#: A layer whose centred features hold at most ``(CONSTANT_ULPS * eps)^2`` of the raw features' energy
#: (``||x - mean||^2 <= (CONSTANT_ULPS * eps)^2 * ||x||^2``, ``eps`` of the Gram dtype) is treated as
#: constant: its Gram is zeroed, so its CKA is NaN (0/0) instead of a number made of rounding residue.
CONSTANT_ULPS = 16.0


# --------------------------------------------------------------------------------------------
# Guards: constant layers and the range where the product is exact
# --------------------------------------------------------------------------------------------


def _is_constant(b: Backend, centered_energy: Array, mean: Array, n: Any, dtype: Any) -> Array:
    r"""Whether features are constant up to rounding: :math:`\lVert \bar X\rVert_F^2 \le (c\,\epsilon)^2 \lVert X\rVert_F^2`
    with ``c = CONSTANT_ULPS`` and :math:`\epsilon` the Gram dtype's machine epsilon.

    The centring of a constant layer leaves rounding residue of order :math:`\epsilon |x|` per entry,
    whose Gram would otherwise turn into a meaningless CKA value. Uses
    :math:`\lVert X\rVert_F^2 = \lVert \bar X\rVert_F^2 + n\lVert \mu\rVert^2` so that no extra pass
    over the features is needed (:math:`\lVert \bar X\rVert_F^2` is the trace of the linear Gram).
    Scale-invariant. Returns a 0-d boolean array.
    """
    mean64 = b.cast(mean, centered_energy.dtype)
    raw_energy = centered_energy + n * b.sum(mean64 * mean64)
    return centered_energy <= (CONSTANT_ULPS * b.eps(dtype)) ** 2 * raw_energy


@functools.lru_cache(maxsize=256)
def _safe_range(b: Backend, gram_dtype: Any, accumulate: Any, n: int, d: int) -> tuple[float, float, float]:
    r"""``(low, high, constant_threshold)``: bounds on the largest diagonal entry
    :math:`D = \max_a\lVert\bar x_a\rVert^2` of a Gram inside which nothing over- or underflows, with
    a factor 16 of headroom each way, and the ratio :func:`_is_constant` compares energies with:

    * high: every entry is at most :math:`D` (Cauchy-Schwarz) and squared distances at most :math:`4D`
      in the Gram dtype; the HSIC terms, sums of :math:`n^2` products of entries, at most
      :math:`n^2 D^2` in the accumulator dtype (with room for :math:`10^6` batches of them);
    * low: products below the Gram dtype's smallest normal number lose digits (below
      ``d * tiny / eps`` their :math:`d` rounding errors reach :math:`\epsilon D`), and so do squares of
      entries below :math:`\sqrt{\text{tiny}/\epsilon}` in the accumulator dtype.
    """
    g, a = b.finfo(gram_dtype), b.finfo(accumulate)
    high = min(float(g.max) / 16, math.sqrt(float(a.max)) / (1024 * max(n, 1)))
    low = max(16 * d * float(g.tiny) / float(g.eps), 16 * math.sqrt(float(a.tiny) / float(a.eps)))
    return low, high, (CONSTANT_ULPS * float(g.eps)) ** 2


def _exponent_of_max(b: Backend, x: Array, valid: Array | None = None) -> Array:
    r"""The exponent :math:`e` with :math:`\max|x| = f\,2^e`, :math:`0.5 \le f < 1` (0 for zeros), as a
    0-d float array in ``x``'s dtype, clipped so that :math:`2^{\pm e}` stay normal numbers there.
    ``valid`` (n, 1) leaves padded rows out (they may hold anything). Cut from autodiff: a scale."""
    if valid is not None:
        x = b.where(valid, x, b.zeros((), like=x, dtype=x.dtype))
    exponent = b.frexp_exponent(b.stop_gradient(b.max_abs(x)))
    limit = b.max_exponent(x.dtype) - 2  # 126 for float32, 1022 for float64
    return b.clip(exponent, -limit, limit)


# --------------------------------------------------------------------------------------------
# The centred product
# --------------------------------------------------------------------------------------------


def _centred_product(
    b: Backend, x: Array, mask: Array | None, n: Any, precision: str, exponent: Array | None
) -> tuple[Array, Array]:
    r"""``(dot, mean)``: :math:`\bar X\bar X^\top` ``(n, n)`` in the accumulator dtype (the product itself
    at ``precision``) and the column mean ``(1, d)`` of :math:`2^{-e}X`, with :math:`\bar X = 2^{-e}X - 1\mu^\top`
    (``exponent`` :math:`e`, or no scaling). With ``mask`` (n,), over the valid rows only: padded rows
    are set to zero and ``n`` is the (traced) number of valid rows."""
    scale = None if exponent is None else b.pow2(-exponent, x.dtype)
    if mask is None:
        mean = b.mean(x, 0, scale)
        dot = b.centred_product(x, mean, precision, scale)
    else:
        # ``where``, not a product with the mask: padded rows may hold anything (even NaN) without
        # reaching the result, and XLA fuses it into the product's operand (~25% faster on CPU than x * m).
        xs = x if scale is None else x * scale
        valid = (mask != 0)[:, None]
        zero = b.zeros((), like=x, dtype=x.dtype)
        mean = b.sum(b.where(valid, xs, zero), axis=0)[None, :] / n
        centred = b.where(valid, xs - mean, zero)
        dot = b.product(centred, b.transpose(centred), precision)
    return b.cast(dot, b.accumulator_dtype(x)), mean


def _constant_flag(b: Backend, dot: Array, mean: Array, n: Any, dtype: Any) -> tuple[Array, Array]:
    """``(constant, raw_energy)`` of :func:`_is_constant`, the centred energy read off the Gram's trace."""
    energy = b.sum(b.diagonal(dot))
    mean64 = b.cast(mean, dot.dtype)
    raw = energy + n * b.sum(mean64 * mean64)
    return energy <= (CONSTANT_ULPS * b.eps(dtype)) ** 2 * raw, raw


def _scaled_product(b: Backend, x: Array, mask: Array | None, n: Any, precision: str) -> tuple[Array, Any, Any]:
    """``(dot, exponent, constant)``: the product of :func:`_centred_product`, rescaled by ``2^-exponent``
    where the unscaled one leaves the safe range (see the module docstring), and whether the layer is
    constant.

    Where values can be read on the host for free (numpy, torch on the CPU), the unscaled product is
    tried first and kept when its largest diagonal entry lies inside :func:`_safe_range`, or when the
    layer is constant by a test whose inputs are inside it; it then comes with the Python numbers
    ``0.0`` and ``constant``, which spare later passes over the Gram. Anything else (overflow to inf,
    underflow towards zero, NaN) is redone on rescaled features. Elsewhere (accelerators, ``jax.jit``)
    the features are always rescaled: one more read of them, no synchronisation.
    """
    accumulate = b.accumulator_dtype(x)

    def rescaled() -> tuple[Array, Array, Array]:
        exponent = _exponent_of_max(b, x, None if mask is None else (mask != 0)[:, None])
        dot, mean = _centred_product(b, x, mask, n, precision, exponent)
        return dot, b.cast(exponent, accumulate), _constant_flag(b, dot, mean, n, x.dtype)[0]

    size, width = b.shape(x)
    if not (b.branches_cheaply(x) and size > 0):
        return rescaled()
    with b.ignore_float_errors():  # overflow here is detected and redone, not worth a warning
        dot, mean = _centred_product(b, x, mask, n, precision, None)
        diagonal, mean64 = b.diagonal(dot), b.cast(mean, dot.dtype)
        on_host = b.host_floats(b.sum(diagonal), b.max(diagonal), b.sum(mean64 * mean64), n)
    if on_host is None:
        return rescaled()
    energy, top, mean_sq, count = on_host
    low, high, threshold = _safe_range(b, x.dtype, accumulate, size, width)
    raw = energy + count * mean_sq
    constant = energy <= threshold * raw
    if low <= top <= high or (constant and low <= raw <= high * size):
        return dot, 0.0, constant
    return rescaled()


def _times_pow2(b: Backend, value: Any, exponent: Any, dtype: Any) -> Any:
    """``value * 2**exponent`` (exact, or inf/0 beyond the range of ``dtype``), ``exponent`` an
    integer-valued 0-d array within the normal range of ``dtype``, or the Python ``0.0`` (nothing to do)."""
    if isinstance(exponent, float) and exponent == 0:
        return value
    return value * b.pow2(exponent, dtype)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _scaled_gram_impl(
    x: Array, kernel: str, sigma: Any, sigma_frac: Any, mask: Array | None = None, precision: str = "highest"
) -> tuple[Array, Array]:
    r"""``(K, log2_factor)``: the ``(n, n)`` kernel matrix of the centred, rescaled features in the
    accumulator dtype, and the 0-d exponent with :math:`K_{\text{true}} = 2^{\text{log2\_factor}} K`
    (:math:`2e` for the linear kernel, 0 for RBF, whose values do not depend on the scale; the Python
    ``0.0`` where that is known on the host). Traceable."""
    b = get_backend(x)
    x = b.cast(b.flatten(x), b.gram_dtype(x))
    n = b.shape(x)[0] if mask is None else b.sum(b.cast(mask, x.dtype))
    dot, exponent, constant = _scaled_product(b, x, mask, n, precision)
    sq_norms = b.diagonal(dot)
    if kernel == "linear":
        k, log2_factor = dot, 2 * exponent
    else:
        # squared distances by expansion; clamp tiny negative rounding residue to 0
        sq_distances = b.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * dot, 0.0)
        if sigma is None:
            # Kornblith et al. (2019): sigma^2 = sigma_frac^2 * median of all n^2 squared distances
            # (diagonal zeros included, as in their reference code); the same on rescaled features.
            valid = None if mask is None else b.outer(mask, mask)
            two_sigma_sq = 2 * sigma_frac**2 * b.median(sq_distances, valid)
        else:  # the fixed bandwidth in the units of the rescaled features
            scaled_sigma = _times_pow2(b, sigma, -exponent, dot.dtype)
            two_sigma_sq = b.zeros((), like=dot, dtype=dot.dtype) + 2 * scaled_sigma * scaled_sigma  # an array
        # A zero bandwidth (more than half the pairs coincide, e.g. a constant layer) has no kernel:
        # NaN, not a division warning; constant layers are zeroed below anyway.
        nan = b.full_like_scalar(math.nan, dot)
        k = b.exp(-sq_distances / b.where(two_sigma_sq > 0, two_sigma_sq, nan))
        if mask is not None:
            m = b.cast(mask, k.dtype)
            k = k * b.outer(m, m)
        log2_factor = 0.0
    return b.zero_if(constant, k), log2_factor


def _gram_impl(
    x: Array, kernel: str, sigma: Any, sigma_frac: Any, mask: Array | None = None, precision: str = "highest"
) -> Array:
    """The ``(n, n)`` Gram of ``x`` after centring, at its true scale, in the accumulator dtype.

    Exact (bit for bit what an unscaled computation gives) wherever that fits in the accumulator
    dtype: always for float32 features with float64 accumulators; float64 features beyond about
    1e75 or below 1e-75 have Grams (or HSIC terms) outside float64, for which see :func:`_scaled_gram_impl`.
    """
    b = get_backend(x)
    k, log2_factor = _scaled_gram_impl(x, kernel, sigma, sigma_frac, mask, precision)
    return _scale_back(b, k, log2_factor)


def _scale_back_impl(k: Array, log2_factor: Array) -> Array:
    return _scale_back(get_backend(k), k, log2_factor)


def _scale_back(b: Backend, k: Array, log2_factor: Any) -> Array:
    """``k * 2**log2_factor`` for a factor of :func:`_scaled_gram_impl` (``2e``, or 0): in two steps of ``2^e``,
    each a normal number, so that a true scale beyond the dtype's range comes out inf or 0, never wrapped;
    no pass over ``k`` where the factor is known to be 0."""
    if isinstance(log2_factor, float) and log2_factor == 0:
        return k
    half = log2_factor / 2
    return _times_pow2(b, _times_pow2(b, k, half, k.dtype), half, k.dtype)


def gram(
    x: Array,
    *,
    kernel: str = "linear",
    sigma: float | None = None,
    sigma_frac: float = 0.8,
    check: bool = True,
    gram_precision: str = "highest",
    return_exponent: bool = False,
) -> Array:
    r"""Kernel matrix of the centred features ``x``, in the accumulator dtype (float64).

    Parameters
    ----------
    x : (n, ...) array
        Features; flattened to ``(n, d)`` and centred (mean over examples subtracted).
    kernel : {"linear", "rbf"}
    sigma, sigma_frac : float
        RBF bandwidth: fixed ``sigma``, or ``sigma_frac`` times the square root of the median
        squared distance (Kornblith et al. 2019). Positive.
    check : bool
        Check ``x`` for NaN/Inf (a host synchronisation on GPUs), and warn when its Gram does not fit
        in the accumulator dtype. Frontends pass ``False`` and track non-finite values on the device.
    gram_precision : {"highest", "tf32", "bf16"}
        Precision of the product :math:`\bar X\bar X^\top`: ``"highest"`` (the features' dtype, at least
        float32, whatever the global TF32 settings); ``"tf32"`` (TensorFloat-32 products on GPUs that
        have them, the same as ``"highest"`` elsewhere); ``"bf16"`` (the centred features rounded to
        bfloat16, products accumulated in float32; also on CPUs). The flags are switched only around
        this product and restored afterwards. Everything after the product is in the accumulator dtype.
    return_exponent : bool
        Return ``(K, log2_factor)``: the Gram of the features rescaled by a power of two, and the
        exponent with ``K * 2**log2_factor`` the Gram of ``x`` (0 for RBF kernels and for features in the
        normal range). For features whose Gram does not fit in the accumulator dtype (float64 beyond
        about 1e75 or below 1e-75; float32 accumulators: JAX without x64, torch on MPS, much sooner).

    Returns
    -------
    (n, n) array, float64 where the framework has it; with ``return_exponent``, also a 0-d array.

    Notes
    -----
    The product runs on features rescaled by a power of two where they would over- or underflow
    (float32 around 1e20 or 1e-25): exact, so the Gram is the same number as without rescaling, where
    that one is representable.
    """
    _check_kernel(kernel)
    _check_bandwidth(sigma, sigma_frac)
    _check_precision(gram_precision)
    _check_flag("check", check)
    _check_flag("return_exponent", return_exponent)
    b = get_backend(x)
    _check_features(b, x, "x", values=check)
    k, log2_factor = b.jit(_scaled_gram_impl, static_argnames=("kernel", "precision"))(
        x, kernel, sigma, sigma_frac, None, gram_precision
    )
    if return_exponent:
        return k, b.as_array(b.zeros((), like=k, dtype=k.dtype) + log2_factor)
    full = b.jit(_scale_back_impl)(k, log2_factor)
    if check and not b.is_tracing(full):
        _warn_if_out_of_range(b, k, full, log2_factor)
    return full


def _warn_if_out_of_range(b: Backend, k: Array, full: Array, log2_factor: Array) -> None:
    """Say so (never blame the features) when the true-scale Gram over- or underflowed."""
    import numpy

    top_scaled, top = float(b.to_numpy(b.max_abs(k))), float(b.to_numpy(b.max_abs(full)))
    tiny = float(b.finfo(full.dtype).tiny) / float(b.eps(full.dtype))
    if top_scaled > 0 and not (numpy.isfinite(top) and top >= tiny):
        warnings.warn(
            f"the Gram of x is about 2^{float(b.to_numpy(log2_factor)):.0f} x {top_scaled:.3g}, outside the range of "
            f"{full.dtype}: its entries {'overflow' if not numpy.isfinite(top) or top > 1 else 'underflow'}. CKA is "
            f"invariant to scaling a layer: use gram(..., return_exponent=True) for the Gram of the rescaled "
            f"features, or cka(), which rescales internally.",
            CKANumericsWarning,
            stacklevel=3,
        )


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
