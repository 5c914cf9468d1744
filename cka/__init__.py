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
from cka.minibatch import minibatch_cka, minibatch_cka_matrix
from cka.state import (
    CKAState,
    CKAStatistics,
    finalize,
    finalize_statistics,
    init_state,
    merge_states,
    update_state,
    update_state_from_grams,
)
from cka.statistics import CoarseStatisticsWarning

__version__ = "0.1.0"

__all__ = [
    "CKA",
    "KERNELS",
    "BiasedCKAWarning",
    "CKANumericsWarning",
    "CKAResult",
    "CKAState",
    "CKAStatistics",
    "CoarseStatisticsWarning",
    "cka",
    "feature_space_linear_cka",
    "finalize",
    "finalize_statistics",
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

#: Public names loaded on first access (PEP 562): the comparer (cka.compare imports no framework; a torch
#: model given to it loads the torch frontend then) and the result record (matplotlib when plotting).
#: ``import cka`` imports neither torch nor matplotlib, while ``from cka import CKA`` still works.
_LAZY = {"CKA": "cka.compare", "CKAResult": "cka.result"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cka' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# pytorch-cka installs a top-level `cka` module too: say so here, with the fix, rather than fail deep
# (a directory listing per sys.path entry; see cka/_install.py). -- added by H-cli13 (issue 13)
from cka._install import warn_about_conflicts as _warn_about_conflicts  # noqa: E402

_warn_about_conflicts()
