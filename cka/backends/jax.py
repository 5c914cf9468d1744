"""JAX backend: the numpy implementation with ``jax.numpy`` swapped in, plus ``jax.jit``.

Accumulators are float64 when ``jax_enable_x64`` is on, float32 otherwise (JAX has no float64
without it); the float32 path is documented in the README with its measured error. Every product
names its precision (``lax.Precision``), so the global ``jax_default_matmul_precision`` neither
changes our numbers nor is changed by us.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from cka.backends._base import Array, Backend


class JaxBackend(Backend):
    name = "jax"

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        self._jax = jax
        self.xp = jnp

    def is_appropriate_type(self, x: Any) -> bool:
        return isinstance(x, self._jax.Array)

    def is_tracing(self, x: Array) -> bool:
        return isinstance(x, self._jax.core.Tracer)

    def jit(self, fn: Callable, static_argnames: tuple[str, ...] = ()) -> Callable:
        return _jitted(fn, static_argnames)

    def branches_cheaply(self, x: Array) -> bool:
        # Everything runs under jax.jit: rescaling unconditionally (a fused max reduction and a scale) is
        # cheaper to compile and run than a lax.cond keeping both products (measured: 50 layers, 128 x 512).
        return False

    def host_floats(self, *values: Array) -> tuple[float, ...] | None:
        return None  # the Gram runs under jax.jit: decisions stay on the device (lax.cond)

    def stop_gradient(self, x: Array) -> Array:
        return self._jax.lax.stop_gradient(x)

    def accumulator_dtype(self, like: Any) -> Any:
        return self.xp.float64 if self._jax.config.jax_enable_x64 else self.xp.float32

    def matmul(self, a: Array, b: Array) -> Array:
        # HIGHEST: on GPUs the default precision of a float32 product is TF32 (float32 accumulators)
        return self.xp.matmul(a, b, precision=self._jax.lax.Precision.HIGHEST)

    def product(self, a: Array, b: Array, precision: str) -> Array:
        jnp, lax = self.xp, self._jax.lax
        if precision == "bf16":
            return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return jnp.matmul(a, b, precision=lax.Precision.HIGH if precision == "tf32" else lax.Precision.HIGHEST)

    def frexp_exponent(self, x: Array) -> Array:
        # From the bits (jnp.frexp is a long chain of selects, slow to compile): floor(log2 |x|) + 1 for
        # normal numbers; -(bias - 1) for zeros and subnormals, bias + 1 for inf/NaN (callers clip).
        jnp, lax = self.xp, self._jax.lax
        mantissa, bias, uint = (23, 127, jnp.uint32) if x.dtype == jnp.float32 else (52, 1023, jnp.uint64)
        field = (lax.bitcast_convert_type(x, uint) >> mantissa) & (2 * bias + 1)
        return field.astype(x.dtype) - (bias - 1)

    def pow2(self, exponent: Array, dtype: Any) -> Array:
        # From the bits: the biased exponent in the exponent field, a zero mantissa (exact by construction).
        jnp, lax = self.xp, self._jax.lax
        mantissa, bias, sint = (23, 127, jnp.int32) if dtype == jnp.float32 else (52, 1023, jnp.int64)
        return lax.bitcast_convert_type((exponent.astype(sint) + bias) << mantissa, dtype)

    def all_finite(self, x: Array) -> bool:
        # A concrete array can still be staged inside a transformation (jax.grad of a closure):
        # there the value can't be read, and the check is skipped like under jit.
        if self.is_tracing(x):
            return True
        try:
            return bool(self.xp.all(self.xp.isfinite(x)))
        except self._jax.errors.ConcretizationTypeError:
            return True

    def to_numpy(self, x: Array) -> Any:
        import numpy

        return numpy.asarray(self._jax.device_get(x))

    def device(self, x: Array) -> Any:
        if self.is_tracing(x):  # placement is not known inside a trace; jax checks it itself
            return None
        return frozenset(x.devices())


@functools.cache
def _jitted(fn: Callable, static_argnames: tuple[str, ...]) -> Callable:
    import jax

    return jax.jit(fn, static_argnames=static_argnames)
