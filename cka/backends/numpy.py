"""numpy backend: the reference implementation of the protocol."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy

from cka.backends._base import Array, Backend


class NumpyBackend(Backend):
    name = "numpy"
    xp = numpy

    def is_appropriate_type(self, x: Any) -> bool:
        return isinstance(x, (numpy.ndarray, numpy.generic))

    def ignore_float_errors(self) -> contextlib.AbstractContextManager[Any]:
        return numpy.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore")

    def as_array(self, value: Array) -> Array:
        return numpy.asarray(value)

    def zero_diagonal(self, k: Array) -> Array:
        out = numpy.array(k, copy=True)
        idx = numpy.arange(k.shape[-1])
        out[..., idx, idx] = 0
        return out

    def multiply_in_place(self, x: Array, factor: Array) -> Array:
        if not (isinstance(x, numpy.ndarray) and x.flags.writeable):
            return x * factor
        x *= factor
        return x

    def zero_diagonal_in_place(self, k: Array) -> Array:
        if not (isinstance(k, numpy.ndarray) and k.flags.writeable):
            return self.zero_diagonal(k)
        idx = numpy.arange(k.shape[-1])
        k[..., idx, idx] = 0
        return k

    def round_to_bfloat16(self, x: Array) -> Array:
        return round_to_bfloat16(x)


def round_to_bfloat16(x: Array) -> numpy.ndarray:
    """``x`` rounded to the nearest bfloat16 value (ties to even), returned as float32.

    numpy has no bfloat16 type. ``ml_dtypes`` has one, but it is a JAX dependency, not one of cka's,
    and a numpy-only install must give the same ``gram_precision="bf16"`` numbers; so this is the
    rounding itself: bfloat16 is the upper 16 bits of a float32, and adding ``0x7FFF`` plus the lowest
    kept bit before truncating the lower 16 bits rounds to nearest, ties to even (as torch's and
    ml_dtypes' conversions do; the tests compare all three bit for bit). Overflow goes to +-inf as
    IEEE rounding does; NaN stays NaN. float64 input is rounded to float32 first; that double rounding
    can differ from a direct rounding only within 2^-24 relative of a bfloat16 tie, by one bfloat16 ulp.
    """
    single = numpy.asarray(x, dtype=numpy.float32)
    bits = single.view(numpy.uint32)
    rounded = (bits + numpy.uint32(0x7FFF) + ((bits >> numpy.uint32(16)) & numpy.uint32(1))) & numpy.uint32(0xFFFF0000)
    return numpy.where(numpy.isnan(single), single, rounded.view(numpy.float32))
