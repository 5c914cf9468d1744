"""Helpers every frontend shares: layer-name matching, batch to model inputs, per-layer options, einops reduction.

One wording for every frontend's errors about layer names (unknown, duplicate, close matches), one
rule for turning a batch into model inputs. No framework is imported at module level: the torch
helpers import torch inside the function, so ONNX-only and JAX-only comparisons never need it.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "call_arguments",
    "close_matches",
    "default_inputs",
    "describe_spec",
    "first_tensor",
    "module_device",
    "per_layer",
    "reduce_features",
    "to_device",
]


def describe_spec(spec: Any) -> str:
    if isinstance(spec, type):
        return spec.__name__
    if isinstance(spec, str):
        return repr(spec)
    return getattr(spec, "__name__", repr(spec))


def close_matches(name: str, names: Sequence[str]) -> str:
    matches = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if not matches:  # module paths: also try the last component, e.g. "conv" -> "layer1.0.conv1"
        tail = name.rsplit(".", 1)[-1]
        matches = [n for n in names if n.rsplit(".", 1)[-1].startswith(tail)][:5]
    return f"close matches: {matches}" if matches else f"no close matches; some names: {list(names[:8])}"


def call_arguments(value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Model inputs as ``(args, kwargs)``: a tensor is one positional argument, a mapping keyword
    arguments (as Hugging Face models expect), a tuple or list positional arguments."""
    if isinstance(value, Mapping):
        return (), dict(value)
    if isinstance(value, (tuple, list)):
        return tuple(value), {}
    return (value,), {}


def default_inputs(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Model inputs from a batch: a tensor is the input itself (never unpacked along the batch
    axis); a dict is passed as keyword arguments; a tuple or list is ``(inputs, targets, ...)``, and
    its first element is the input (a tensor, or a dict of keyword arguments)."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty tuple/list as a batch; expected (inputs, targets, ...).")
        first = batch[0]
        return ((), dict(first)) if isinstance(first, Mapping) else ((first,), {})
    return call_arguments(batch)


def to_device(value: Any, device: Any) -> Any:
    """Move every tensor inside nested tuples, lists and dicts to ``device`` (asynchronously)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def first_tensor(output: Any) -> Any:
    """The first tensor in a module output, depth first: the tensor itself, or the first one inside
    a tuple, list, dict or Hugging Face ``ModelOutput`` (a dict of its non-``None`` fields in
    declaration order, so ``last_hidden_state`` or ``logits``). ``None`` if there is none."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        values: Iterable[Any] = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        return None
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def module_device(module: Any) -> Any:
    """The device of a module's first parameter (or buffer); CPU for a module without either."""
    import torch

    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def per_layer(value: Any, layers: Sequence[str], what: str) -> list[Any]:
    """A setting given once for all layers, or as ``{layer name: setting}`` (others get None)."""
    if not isinstance(value, Mapping):
        return [value] * len(layers)
    unknown = [k for k in value if k not in layers]
    if unknown:
        raise ValueError(
            f"{what} names layer(s) {unknown} that are not selected; {close_matches(str(unknown[0]), layers)}."
        )
    return [value.get(name) for name in layers]


@functools.lru_cache(maxsize=None)
def _einops_reduce() -> Callable[..., Any]:
    from einops import reduce

    return reduce


def reduce_features(tensor: Any, pattern: str, layer: str) -> Any:
    """``einops.reduce(tensor, pattern, "mean")`` with the layer and shape in any error."""
    try:
        return _einops_reduce()(tensor, pattern, "mean")
    except Exception as error:  # einops raises EinopsError; re-raise at the boundary with context
        raise ValueError(
            f"layer {layer!r}: reduce pattern {pattern!r} does not fit its output of shape "
            f"{tuple(tensor.shape)}: {error}"
        ) from None
