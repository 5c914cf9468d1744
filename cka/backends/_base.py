"""The backend protocol: the handful of array operations the CKA core needs."""

from __future__ import annotations

from typing import Any, Callable

Array = Any


class Backend:
    """Array operations for one framework. Subclasses set :attr:`xp` (a numpy-like namespace).

    The default implementations are written against ``self.xp`` with the numpy API, so the numpy
    and JAX backends share them; torch overrides what differs.
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

    # --- dtypes -----------------------------------------------------------------------------
    def accumulator_dtype(self, x: Array) -> Any:
        """float64 (where the framework allows it): the dtype of HSIC terms and accumulators."""
        return self.xp.float64

    def gram_dtype(self, x: Array) -> Any:
        """The dtype of the Gram product: the input's, raised to at least float32.

        Half precision inputs are raised because a float16/bfloat16 *output* Gram loses 3-4
        digits per entry; integers and booleans become float64.
        """
        xp = self.xp
        if xp.issubdtype(x.dtype, xp.floating):
            return xp.promote_types(x.dtype, xp.float32)
        return xp.float64

    def cast(self, x: Array, dtype: Any) -> Array:
        return x.astype(dtype) if x.dtype != dtype else x

    # --- shapes -----------------------------------------------------------------------------
    def shape(self, x: Array) -> tuple[int, ...]:
        return tuple(x.shape)

    def flatten(self, x: Array) -> Array:
        """``(n, ...) -> (n, d)``; a vector ``(n,)`` becomes ``(n, 1)``."""
        return self.xp.reshape(x, (x.shape[0], -1))

    def stack(self, arrays: list[Array]) -> Array:
        return self.xp.stack(arrays)

    # --- arithmetic -------------------------------------------------------------------------
    def matmul(self, a: Array, b: Array) -> Array:
        return a @ b

    def transpose(self, a: Array) -> Array:
        return self.xp.swapaxes(a, -1, -2)

    def sum(self, x: Array, axis: Any = None) -> Array:
        return self.xp.sum(x, axis=axis)

    def mean(self, x: Array, axis: int) -> Array:
        return self.xp.mean(x, axis=axis, keepdims=True)

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

    def outer(self, a: Array, b: Array) -> Array:
        return a[:, None] * b[None, :]

    def exp(self, x: Array) -> Array:
        return self.xp.exp(x)

    def sqrt(self, x: Array) -> Array:
        return self.xp.sqrt(x)

    def maximum(self, x: Array, value: float) -> Array:
        return self.xp.maximum(x, value)

    def median(self, x: Array, valid: Array | None = None) -> Array:
        """Median of all entries (of those where ``valid``); the mean of the two middle ones for an
        even count, as numpy and Kornblith et al.'s reference code."""
        if valid is None:
            return self.xp.median(x)
        return self.xp.nanmedian(self.xp.where(valid, x, self.xp.nan))

    def eps(self, dtype: Any) -> float:
        """Machine epsilon of a floating dtype."""
        return float(self.xp.finfo(dtype).eps)

    def zeros(self, shape: tuple[int, ...], like: Array, dtype: Any = None) -> Array:
        return self.xp.zeros(shape, dtype=dtype if dtype is not None else self.accumulator_dtype(like))

    def full_like_scalar(self, value: float, like: Array) -> Array:
        """A 0-d array holding ``value`` in ``like``'s dtype, on ``like``'s device."""
        return self.xp.asarray(value, dtype=like.dtype)

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        return self.xp.where(cond, a, b)

    # --- value checks (outside traces only) -------------------------------------------------
    def all_finite(self, x: Array) -> bool:
        return bool(self.xp.all(self.xp.isfinite(x)))

    def to_numpy(self, x: Array) -> Any:
        import numpy

        return numpy.asarray(x)

    def device(self, x: Array) -> Any:
        return None
