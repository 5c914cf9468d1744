"""One small protocol, one implementation per array library, imported lazily.

Modelled on einops' ``_backends.py``: :func:`get_backend` only considers a backend whose
framework is already in ``sys.modules`` (so ``import cka`` imports neither torch nor jax), caches
the choice per array type, and each backend imports its framework inside its constructor.
JAX reuses the numpy implementation with ``jax.numpy`` swapped in and adds ``jax.jit``.

The protocol is CKA-shaped: flatten, center, matmul (at a chosen Gram precision), sums, zero the
diagonal, exp/sqrt, casts to the accumulator dtype, and a few value checks that the public API runs
outside traces only. The one dtype rule (:meth:`Backend.gram_dtype`, :meth:`Backend.accumulator_dtype`)
lives in the backends and nowhere else.
"""

from __future__ import annotations

import sys
from typing import Any

from cka.backends._base import PRECISIONS, Backend

__all__ = ["PRECISIONS", "Backend", "backend_for", "get_backend"]

# module name in sys.modules -> (import path of the backend module, class name)
_REGISTRY: dict[str, tuple[str, str]] = {
    "numpy": ("cka.backends.numpy", "NumpyBackend"),
    "torch": ("cka.backends.torch", "TorchBackend"),
    "jax": ("cka.backends.jax", "JaxBackend"),
}
_instances: dict[str, Backend] = {}
_type_cache: dict[type, Backend] = {}


def backend_for(framework: str) -> Backend:
    """The backend instance for ``framework`` (``"numpy"``, ``"torch"`` or ``"jax"``), imported on demand."""
    if framework not in _REGISTRY:
        raise ValueError(f"unknown backend {framework!r}; valid backends: {sorted(_REGISTRY)}")
    if framework not in _instances:
        import importlib

        module_path, class_name = _REGISTRY[framework]
        _instances[framework] = getattr(importlib.import_module(module_path), class_name)()
    return _instances[framework]


def get_backend(x: Any) -> Backend:
    """The backend for array ``x``: numpy arrays, torch tensors or JAX arrays (tracers included).

    Only frameworks the caller has already imported are tried; the answer is cached per type.
    """
    backend = _type_cache.get(type(x))
    if backend is not None:
        return backend
    # jax before numpy: a numpy scalar is never a jax array, but check the specific ones first.
    for framework in ("torch", "jax", "numpy"):
        if sys.modules.get(framework) is not None:
            candidate = backend_for(framework)
            if candidate.is_appropriate_type(x):
                _type_cache[type(x)] = candidate
                return candidate
    raise TypeError(
        f"cka accepts numpy arrays, torch tensors and JAX arrays; got {type(x).__module__}."
        f"{type(x).__qualname__}. Convert it first, e.g. with numpy.asarray(x)."
    )
