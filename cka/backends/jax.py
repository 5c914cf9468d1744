"""JAX backend: the numpy implementation with ``jax.numpy`` swapped in, plus ``jax.jit``.

Accumulators are float64 when ``jax_enable_x64`` is on, float32 otherwise (JAX has no float64
without it); the float32 path is documented in the README with its measured error.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

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

    def accumulator_dtype(self, x: Array) -> Any:
        return self.xp.float64 if self._jax.config.jax_enable_x64 else self.xp.float32

    def gram_dtype(self, x: Array) -> Any:
        jnp = self.xp
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.promote_types(x.dtype, jnp.float32)
        return self.accumulator_dtype(x)

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


@functools.lru_cache(maxsize=None)
def _jitted(fn: Callable, static_argnames: tuple[str, ...]) -> Callable:
    import jax

    return jax.jit(fn, static_argnames=static_argnames)
