"""numpy backend: the reference implementation of the protocol."""

from __future__ import annotations

from typing import Any

import numpy

from cka.backends._base import Array, Backend


class NumpyBackend(Backend):
    name = "numpy"
    xp = numpy

    def is_appropriate_type(self, x: Any) -> bool:
        return isinstance(x, (numpy.ndarray, numpy.generic))

    def zero_diagonal(self, k: Array) -> Array:
        out = numpy.array(k, copy=True)
        idx = numpy.arange(k.shape[-1])
        out[..., idx, idx] = 0
        return out
