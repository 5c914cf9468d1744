"""Both sides' Gram stacks for one batch, checked and brought to one backend: the shapes a layer's
Gram must have (:class:`GramShapeError`), one ``(L, n, n)`` stack per side in the extractor's own
array type, and the conversion to a common backend and device (torch if either side is torch, else
JAX) that :class:`cka.CKA` accumulates in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cka.backends import backend_for, get_backend

if TYPE_CHECKING:
    from cka.frontends.base import FeatureExtractor

__all__ = ["GramShapeError"]


class GramShapeError(ValueError):
    """A layer's Gram does not fit the batch: not square, or another number of examples than the
    other layers (its output's first axis is not the batch axis)."""

    def __init__(self, layer: str, shape: tuple[int, ...], first_layer: str, n: int) -> None:
        self.layer, self.shape, self.first_layer, self.n = layer, tuple(shape), first_layer, n
        super().__init__(self.describe())

    def describe(self, where: str = "") -> str:
        """The message, with ``where`` (e.g. ``" of model1"``) after the layer's name."""
        return (
            f"layer {self.layer!r}{where} gave a Gram of shape {self.shape} while layer {self.first_layer!r} gave "
            f"{self.n} examples; its output's first axis is not the batch axis. Pick the right tensor with "
            f"output= or move the batch axis first with reduce= (einops)."
        )


class _Side:
    """One side of a comparison: an extractor, this side's layers, and their indices in the extractor's
    output (two sides share one extractor when they hook the same model)."""

    def __init__(
        self, extractor: FeatureExtractor, layers: list[str], indices: list[int], what: str, wrapped: bool
    ) -> None:
        self.extractor, self.layers, self.indices, self.what, self.wrapped = extractor, layers, indices, what, wrapped


def _side_stack(side: _Side, raw: Any, index: int) -> Any:
    """This side's Grams as one ``(L, n, n)`` array in the extractor's own backend, accumulator dtype."""
    expected = len(side.extractor.layer_names())
    if isinstance(raw, (list, tuple)):
        if len(raw) != expected:
            raise RuntimeError(f"{side.extractor.name} returned {len(raw)} Grams for {expected} layers.")
        names = side.extractor.layer_names()
        first = tuple(raw[0].shape)
        for layer, gram in zip(names, raw, strict=True):
            shape = tuple(gram.shape)
            if len(shape) != 2 or shape[0] != shape[1] or shape[0] != first[0]:
                error = GramShapeError(layer, shape, names[0], first[0])
                raise ValueError(f"batch {index}: {error.describe(' of ' + side.what)}")
        b = get_backend(raw[0])
        stack = b.stack([b.cast(g, b.accumulator_dtype(g)) for g in raw])
    else:
        stack = raw
        if len(stack.shape) != 3 or stack.shape[0] != expected or stack.shape[1] != stack.shape[2]:
            raise RuntimeError(
                f"{side.extractor.name} returned Grams of shape {tuple(stack.shape)} for {expected} layers."
            )
        b = get_backend(stack)
        stack = b.cast(stack, b.accumulator_dtype(stack))
    indices = side.indices
    if indices == list(range(expected)):
        return stack
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return stack[indices[0] : indices[0] + len(indices)]  # a view: no copy
    return stack[indices]  # a copy of this side's share of a shared extractor's stack


def _to_common_backend(stack1: Any, stack2: Any, device: Any) -> tuple[Any, Any]:
    """Both stacks in one backend: torch if either is torch (on ``device``, default the first torch
    stack's), else JAX if either is JAX, else numpy; in that backend's accumulator dtype."""
    names = (get_backend(stack1).name, get_backend(stack2).name)
    if "torch" in names:
        if device is None:
            device = (stack1 if names[0] == "torch" else stack2).device
        return _to_torch(stack1, device), _to_torch(stack2, device)
    if "jax" in names and names[0] != names[1]:
        import jax.numpy as jnp

        stack1, stack2 = jnp.asarray(stack1), jnp.asarray(stack2)
        b = get_backend(stack1)
        return b.cast(stack1, b.accumulator_dtype(stack1)), b.cast(stack2, b.accumulator_dtype(stack2))
    return stack1, stack2


def _copy(stack: Any) -> Any:
    """A copy of a stack an extractor will overwrite (JAX arrays are immutable: no copy needed)."""
    name = get_backend(stack).name
    return stack.clone() if name == "torch" else (stack.copy() if name == "numpy" else stack)


def _to_torch(stack: Any, device: Any) -> Any:
    """A stack of any backend as a torch tensor on ``device`` in torch's accumulator dtype there (the
    backends' dtype rule: float64, float32 on MPS); JAX arrays by DLPack (no copy on a shared device)."""
    import torch

    if not isinstance(stack, torch.Tensor):
        if get_backend(stack).name == "jax":
            try:
                stack = torch.from_dlpack(stack)
            except (RuntimeError, TypeError, ValueError, BufferError):  # no DLPack route: one copy through the host
                stack = torch.from_numpy(np.asarray(get_backend(stack).to_numpy(stack)))
        else:
            stack = torch.from_numpy(np.ascontiguousarray(stack))
    device = torch.device(device)
    dtype = backend_for("torch").accumulator_dtype(device)
    # asynchronous only host -> GPU: a non-blocking copy to the host may be read before it lands
    return stack.to(device=device, dtype=dtype, non_blocking=device.type == "cuda")
