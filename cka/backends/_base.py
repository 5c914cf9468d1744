"""The backend protocol: the handful of array operations the CKA core needs, and the one dtype rule."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

Array = Any

#: The precisions of the Gram product (:func:`cka.gram`'s ``gram_precision``): full precision of the
#: Gram dtype, TensorFloat-32 products (CUDA / JAX on GPUs; the same as "highest" elsewhere), or
#: inputs rounded to bfloat16 with float32 accumulation.
PRECISIONS = ("highest", "tf32", "bf16")


class Backend:
    """Array operations for one framework. Subclasses set :attr:`xp` (a numpy-like namespace).

    The default implementations are written against ``self.xp`` with the numpy API, so the numpy
    and JAX backends share them; torch overrides what differs.

    The one dtype rule of the library lives here and nowhere else:

    * :meth:`gram_dtype` -- the dtype the features are centred in and the Gram product runs in: the
      input's floating dtype raised to at least float32 (integers and booleans: the accumulator dtype);
    * :meth:`accumulator_dtype` -- the dtype of Grams handed on, HSIC terms and every accumulator:
      float64, except float32 where the framework has no float64 (JAX without ``jax_enable_x64``,
      torch on MPS).
    """

    name: str = "abstract"
    xp: Any = None

    # --- type and tracing -------------------------------------------------------------------
    def is_appropriate_type(self, x: Any) -> bool:
        raise NotImplementedError

    def is_tracing(self, x: Array) -> bool:
        """True while ``x`` is an abstract value inside a trace (``jax.jit``), where values can't be read."""
        return False

    def jit(self, fn: Callable, static_argnames: tuple[str, ...] = ()) -> Callable:
        """``fn`` compiled for this backend; the identity where there is no compiler."""
        return fn

    def branches_cheaply(self, x: Array) -> bool:
        """Whether values computed from ``x`` can be read on the host for free (:meth:`host_floats`), so
        that a Python branch on them costs nothing: numpy, torch on the CPU. Not on accelerators (a
        synchronisation) nor under ``jax.jit`` (a trace)."""
        return True

    def host_floats(self, *values: Array) -> tuple[float, ...] | None:
        """The 0-d ``values`` as Python floats where reading them is free (no device synchronisation,
        no trace), else ``None``. Called only where :meth:`branches_cheaply` holds for their source."""
        return tuple(float(v) for v in values)

    def stop_gradient(self, x: Array) -> Array:
        """``x`` cut from automatic differentiation (a value used only to pick a scale)."""
        return x

    def ignore_float_errors(self) -> contextlib.AbstractContextManager[Any]:
        """A context in which overflow/underflow in a tentative computation raises no warning."""
        return contextlib.nullcontext()

    # --- dtypes: the one rule ---------------------------------------------------------------
    def accumulator_dtype(self, like: Any) -> Any:
        """float64 (where the framework allows it): the dtype of Grams handed on, HSIC terms and accumulators."""
        return self.xp.float64

    def gram_dtype(self, x: Array) -> Any:
        """The dtype of the centring and of the Gram product: the input's, raised to at least float32.

        Half precision inputs are raised because a float16/bfloat16 *output* Gram loses 3-4
        digits per entry; integers and booleans take the accumulator dtype.
        """
        xp = self.xp
        if xp.issubdtype(x.dtype, xp.floating):
            return xp.promote_types(x.dtype, xp.float32)
        return self.accumulator_dtype(x)

    def promote_types(self, a: Any, b: Any) -> Any:
        return self.xp.promote_types(a, b)

    def is_complex(self, x: Array) -> bool:
        return bool(self.xp.iscomplexobj(x))

    def is_real_numeric(self, x: Array) -> bool:
        """Real floating, integer or boolean dtype (what features and Grams may hold)."""
        xp = self.xp
        return bool(
            xp.issubdtype(x.dtype, xp.floating)
            or xp.issubdtype(x.dtype, xp.integer)
            or xp.issubdtype(x.dtype, xp.bool_)
        )

    def cast(self, x: Array, dtype: Any) -> Array:
        return x.astype(dtype) if x.dtype != dtype else x

    def as_array(self, value: Array) -> Array:
        """``value`` as an array of this backend (a numpy scalar from indexing becomes a 0-d array)."""
        return value

    # --- shapes -----------------------------------------------------------------------------
    def shape(self, x: Array) -> tuple[int, ...]:
        return tuple(x.shape)

    def flatten(self, x: Array) -> Array:
        """``(n, ...) -> (n, d)``; a vector ``(n,)`` becomes ``(n, 1)``."""
        return self.xp.reshape(x, (x.shape[0], -1))

    def stack(self, arrays: list[Array]) -> Array:
        return self.xp.stack(arrays)

    # --- products ---------------------------------------------------------------------------
    def matmul(self, a: Array, b: Array) -> Array:
        """A full-precision product (the HSIC terms, in the accumulator dtype)."""
        return a @ b

    def product(self, a: Array, b: Array, precision: str) -> Array:
        """The product ``a @ b`` of two 2-d arrays at the Gram precision (see :data:`PRECISIONS`);
        at least float32. ``"tf32"`` is ``"highest"`` where there are no TF32 units (numpy)."""
        if precision == "bf16":
            return self.round_to_bfloat16(a) @ self.round_to_bfloat16(b)
        return a @ b

    def round_to_bfloat16(self, x: Array) -> Array:
        """``x`` rounded to the nearest bfloat16 (ties to even), held in float32."""
        raise NotImplementedError

    def centred_product(self, x: Array, mean: Array, precision: str, scale: Array | None = None) -> Array:
        r""":math:`\bar X \bar X^\top` with :math:`\bar X = s X - \mu` (``mu`` the column mean of ``s X``,
        ``s = scale`` or 1), a ``(n, n)`` product at ``precision``. The centred copy is a temporary."""
        centred = (x if scale is None else x * scale) - mean
        return self.product(centred, self.transpose(centred), precision)

    def transpose(self, a: Array) -> Array:
        return self.xp.swapaxes(a, -1, -2)

    # --- reductions -------------------------------------------------------------------------
    def sum(self, x: Array, axis: Any = None) -> Array:
        return self.xp.sum(x, axis=axis)

    def mean(self, x: Array, axis: int, scale: Array | None = None) -> Array:
        """Mean over ``axis`` (kept) of ``x``, or of ``scale * x``."""
        return self.xp.mean(x if scale is None else x * scale, axis=axis, keepdims=True)

    def max(self, x: Array) -> Array:
        return self.xp.max(x)

    def max_abs(self, x: Array) -> Array:
        """``max |x|`` over all entries, a 0-d array (0 for an empty array)."""
        return self.xp.max(self.xp.abs(x), initial=0)

    def max_abs_last(self, x: Array) -> Array:
        """``max |x|`` over the last axis (NaN where a NaN is there)."""
        return self.xp.max(self.xp.abs(x), axis=-1)

    def sum_of_squares(self, x: Array) -> Array:
        """``sum(x**2)`` over the last axis."""
        return self.xp.sum(x * x, axis=-1)

    def diagonal(self, k: Array) -> Array:
        """The diagonals of ``(..., n, n)`` as ``(..., n)``."""
        return self.xp.diagonal(k, axis1=-2, axis2=-1)

    def zero_diagonal(self, k: Array) -> Array:
        """``(..., n, n)`` with the diagonal set to zero, out of place (autograd- and jit-safe)."""
        xp = self.xp
        n = k.shape[-1]
        return xp.where(xp.eye(n, dtype=bool), xp.zeros((), dtype=k.dtype), k)

    def multiply_in_place(self, x: Array, factor: Array) -> Array:
        """``x * factor`` (broadcast), written into ``x`` where the array type allows it, as
        :meth:`zero_diagonal_in_place`."""
        return x * factor

    def zero_diagonal_in_place(self, k: Array) -> Array:
        """``k`` with its diagonals set to zero, in place where the array type allows it (no ``L n^2``
        copy), else a copy (immutable JAX arrays). Only for arrays the caller owns and no graph needs."""
        return self.zero_diagonal(k)

    def median(self, x: Array, valid: Array | None = None) -> Array:
        """Median of all entries (of those where ``valid``); the mean of the two middle ones for an
        even count, as numpy and Kornblith et al.'s reference code."""
        if valid is None:
            return self.xp.median(x)
        return self.xp.nanmedian(self.xp.where(valid, x, self.xp.nan))

    # --- elementwise ------------------------------------------------------------------------
    def outer(self, a: Array, b: Array) -> Array:
        return a[:, None] * b[None, :]

    def exp(self, x: Array) -> Array:
        return self.xp.exp(x)

    def sqrt(self, x: Array) -> Array:
        return self.xp.sqrt(x)

    def maximum(self, x: Array, value: float) -> Array:
        return self.xp.maximum(x, value)

    def clip(self, x: Array, low: float, high: float) -> Array:
        return self.xp.clip(x, low, high)

    def frexp_exponent(self, x: Array) -> Array:
        """The binary exponent ``e`` of ``x = m 2^e``, ``0.5 <= |m| < 1`` (0 for 0), as a float array."""
        return self.xp.frexp(x)[1].astype(x.dtype)

    def pow2(self, exponent: Array, dtype: Any) -> Array:
        """``2 ** exponent`` (an integer-valued array) in ``dtype``, exact; ``exponent`` within the
        normal range of ``dtype`` (callers split larger ones)."""
        xp = self.xp
        return xp.ldexp(xp.ones((), dtype=dtype), exponent.astype(xp.int32))

    def eps(self, dtype: Any) -> float:
        """Machine epsilon of a floating dtype."""
        return float(self.xp.finfo(dtype).eps)

    def finfo(self, dtype: Any) -> Any:
        """``finfo`` of a floating dtype (``.max``, ``.tiny``, ``.eps``)."""
        return self.xp.finfo(dtype)

    def max_exponent(self, dtype: Any) -> float:
        """The ``e`` with ``finfo(dtype).max`` just below ``2^e``: 1024 for float64, 128 for float32
        (``2^(e - 2)`` and ``2^-(e - 2)`` are normal numbers)."""
        return float(math.frexp(float(self.finfo(dtype).max))[1])

    def zeros(self, shape: tuple[int, ...], like: Array, dtype: Any = None) -> Array:
        return self.xp.zeros(shape, dtype=dtype if dtype is not None else self.accumulator_dtype(like))

    def full_like_scalar(self, value: float, like: Array) -> Array:
        """A 0-d array holding ``value`` in ``like``'s dtype, on ``like``'s device."""
        return self.xp.asarray(value, dtype=like.dtype)

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        return self.xp.where(cond, a, b)

    def zero_if(self, flag: Any, k: Array) -> Array:
        """``k``, or zeros shaped like it where ``flag`` (a Python bool or a 0-d boolean array) holds."""
        if isinstance(flag, bool):
            return self.xp.zeros_like(k) if flag else k
        return self.xp.where(flag, self.xp.zeros((), dtype=k.dtype), k)

    # --- value checks (outside traces only) -------------------------------------------------
    def all_finite(self, x: Array) -> bool:
        return bool(self.xp.all(self.xp.isfinite(x)))

    def to_numpy(self, x: Array) -> Any:
        import numpy

        return numpy.asarray(x)

    def device(self, x: Array) -> Any:
        return None
