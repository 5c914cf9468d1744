"""PyTorch backend (CPU and CUDA): results stay on the input's device, no host round-trip."""

from __future__ import annotations

from typing import Any

from cka.backends._base import Array, Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.xp = torch
        self._torch = torch

    def is_appropriate_type(self, x: Any) -> bool:
        return isinstance(x, self._torch.Tensor)

    def accumulator_dtype(self, x: Array) -> Any:
        # MPS has no float64; everywhere else the accumulators are float64.
        return self._torch.float32 if x.device.type == "mps" else self._torch.float64

    def gram_dtype(self, x: Array) -> Any:
        torch = self._torch
        if x.is_floating_point():
            return torch.promote_types(x.dtype, torch.float32)
        return self.accumulator_dtype(x)

    def cast(self, x: Array, dtype: Any) -> Array:
        return x.to(dtype)

    def flatten(self, x: Array) -> Array:
        return x.reshape(x.shape[0], -1)

    def transpose(self, a: Array) -> Array:
        return a.transpose(-1, -2)

    def sum(self, x: Array, axis: Any = None) -> Array:
        return x.sum() if axis is None else x.sum(dim=axis)

    def mean(self, x: Array, axis: int) -> Array:
        return x.mean(dim=axis, keepdim=True)

    def diagonal(self, k: Array) -> Array:
        return k.diagonal(dim1=-2, dim2=-1)

    def zero_diagonal(self, k: Array) -> Array:
        n = k.shape[-1]
        eye = self._torch.eye(n, dtype=self._torch.bool, device=k.device)
        return k.masked_fill(eye, 0)

    def maximum(self, x: Array, value: float) -> Array:
        return x.clamp_min(value)

    def median(self, x: Array, valid: Array | None = None) -> Array:
        # By hand: torch.median returns the lower middle value, numpy (and Kornblith et al.) average
        # the two middle ones. Invalid entries sort last as +inf; ``count`` may be a tensor.
        torch = self._torch
        if valid is None:
            values, count = x.reshape(-1), x.numel()
        else:
            values = torch.where(valid.bool(), x, torch.full_like(x, float("inf"))).reshape(-1)
            count = valid.bool().sum()
        ordered = values.sort().values
        return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2

    def eps(self, dtype: Any) -> float:
        return float(self._torch.finfo(dtype).eps)

    def zeros(self, shape: tuple[int, ...], like: Array, dtype: Any = None) -> Array:
        dtype = dtype if dtype is not None else self.accumulator_dtype(like)
        return self._torch.zeros(shape, dtype=dtype, device=like.device)

    def full_like_scalar(self, value: float, like: Array) -> Array:
        return self._torch.tensor(value, dtype=like.dtype, device=like.device)

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        return self._torch.where(cond, a, b)

    def all_finite(self, x: Array) -> bool:
        return bool(self._torch.isfinite(x).all())

    def to_numpy(self, x: Array) -> Any:
        return x.detach().cpu().numpy()

    def device(self, x: Array) -> Any:
        return x.device
