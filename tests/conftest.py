"""Shared fixtures: the array backends every public function is tested on.

JAX runs with ``jax_enable_x64`` on for the whole suite, so float64 inputs stay float64 (the
float32-accumulator path without x64 is tested in subprocesses, where the flag is off).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None

if HAS_JAX:
    import jax

    jax.config.update("jax_enable_x64", True)


def _cuda_available() -> bool:
    if not HAS_TORCH:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


BACKENDS = ["numpy"] + (["torch"] if HAS_TORCH else []) + (["jax"] if HAS_JAX else [])


class Namespace:
    """Converts float64 numpy test data to one backend's arrays and back."""

    def __init__(self, name: str, device: str = "cpu") -> None:
        self.name = name
        self.device = device

    def asarray(self, a, dtype: str = "float64"):
        a = np.asarray(a, dtype=dtype)
        if self.name == "numpy":
            return a
        if self.name == "torch":
            import torch

            return torch.from_numpy(a).to(self.device)
        import jax.numpy as jnp

        return jnp.asarray(a)

    def to_numpy(self, a) -> np.ndarray:
        if self.name == "torch":
            return a.detach().cpu().numpy()
        return np.asarray(a)

    def is_native(self, a) -> bool:
        if self.name == "numpy":
            return isinstance(a, (np.ndarray, np.generic))
        if self.name == "torch":
            import torch

            return isinstance(a, torch.Tensor) and a.device.type == self.device
        import jax

        return isinstance(a, jax.Array)

    def __repr__(self) -> str:
        return f"xp[{self.name}]"


@pytest.fixture(params=BACKENDS)
def xp(request) -> Namespace:
    return Namespace(request.param)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
