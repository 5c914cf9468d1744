"""cka: Centered Kernel Alignment between neural network representations.

Pure functions on numpy, torch and JAX arrays (``cka``, ``hsic_unbiased``, ``minibatch_cka``, ...),
a streaming accumulator (``init_state / update_state / merge_states / finalize``), and frontends
that compare whole models layer by layer (``CKA`` for PyTorch modules, ``cka.frontends.onnx``,
``cka.frontends.jax``). ``import cka`` imports neither torch nor jax.
"""

from __future__ import annotations

from typing import Any

from cka.core import (
    KERNELS,
    BiasedCKAWarning,
    CKANumericsWarning,
    cka,
    feature_space_linear_cka,
    gram,
    hsic,
    hsic_unbiased,
    linear_kernel,
    rbf_kernel,
)
from cka.state import (
    CKAState,
    finalize,
    init_state,
    merge_states,
    minibatch_cka,
    minibatch_cka_matrix,
    update_state,
    update_state_from_grams,
)

__version__ = "0.1.0"

__all__ = [
    "CKA",
    "CKAResult",
    "KERNELS",
    "BiasedCKAWarning",
    "CKANumericsWarning",
    "CKAState",
    "cka",
    "feature_space_linear_cka",
    "finalize",
    "gram",
    "hsic",
    "hsic_unbiased",
    "init_state",
    "linear_kernel",
    "merge_states",
    "minibatch_cka",
    "minibatch_cka_matrix",
    "rbf_kernel",
    "update_state",
    "update_state_from_grams",
]

#: Public names whose modules import optional frameworks: loaded on first access (PEP 562), so that
#: ``import cka`` imports neither torch nor matplotlib, while ``from cka import CKA`` still works.
_LAZY = {"CKA": "cka.frontends.torch", "CKAResult": "cka.result"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cka' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
