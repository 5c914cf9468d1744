"""The probe-batch reference check: is each module-mapped ONNX value really that PyTorch module's output?

Both exporters fold BatchNorm into the preceding Conv, so a value filed under a module's name may hold
a neighbour too. On the first batch, the PyTorch side runs once with a hook on every submodule
(:func:`trace`) and each mapped value is compared with the output of its module call (:func:`check`):

* *mismatched*: the value differs from the module's output by more than :data:`MISMATCH_TOLERANCE`;
* *fused*: it differs, and matches clearly better the output of a *follower*, a module that ran on
  this module's output, changed it, and owns no node in the graph (BatchNorm after Conv);
* where a call has several candidate values, the one that matches is kept.

The PyTorch side is reached only through the :class:`~cka.frontends.base.FeatureExtractor` interface:
its ``module`` (an ``nn.Module``) is hooked and its :meth:`~cka.frontends.base.FeatureExtractor.features`
runs the batch, so the model is called exactly as the comparison calls it (its inputs hook, device, eval
mode, inference mode), and the extractor restores whatever it changed. torch is imported only here,
inside :func:`trace`, which runs only when a PyTorch model is at hand.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cka.frontends._common import first_tensor
from cka.frontends.base import FeatureExtractor
from cka.frontends.onnx.errors import MappingProblem, OnnxMappingError
from cka.frontends.onnx.naming import Layer

__all__ = ["MISMATCH_TOLERANCE", "Record", "check", "relative_difference", "trace"]

#: Relative difference ``||onnx - torch||_F / ||torch||_F`` up to which a mapped value counts as the
#: module's output, by the graph's arithmetic. Measured on the test ResNet: float32 onnxruntime vs
#: PyTorch on the CPU differ by ~1e-7; TF32 convolutions on GPUs (on by default in both) by up to
#: ~1e-3; a folded BatchNorm or a neighbouring op changes the value by O(1) (1.08 for the test model's
#: conv+BN). int8 dynamic quantization drifts legitimately (0.003-0.14 there; that drift is what the
#: comparison measures), so the bound is loose for quantized graphs and the structural check (a module
#: without a node of its own ran on the value, and the value matches its output) gives the fused verdict.
MISMATCH_TOLERANCE = {"float": 1e-2, "float16": 5e-2, "quantized": 0.35}
#: A follower "explains" a value when it matches it this many times better than the module's own output.
_CLEARLY_BETTER = 0.5


def relative_difference(value: np.ndarray, expected: np.ndarray) -> float:
    """``||value - expected||_F / ||expected||_F`` in float64 (inf for other shapes; the absolute norm of
    the difference when the module's output is all zeros)."""
    if tuple(value.shape) != tuple(expected.shape):
        return math.inf
    a = np.asarray(value, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    scale = float(np.linalg.norm(b))
    difference = float(np.linalg.norm(a - b))
    return difference / scale if scale > 0 else difference


@dataclass
class ModuleCall:
    """One call of a PyTorch module in the probe run."""

    name: str
    type_name: str
    output: np.ndarray | None  # kept for selected calls and their followers only


@dataclass
class Record:
    """What the probe run of the PyTorch model saw: the calls of the selected modules, in order, and for
    each of them the chain of *followers*: modules that ran directly on its output, changed it, and own
    no node in the graph (candidates for having been folded into its value, e.g. BatchNorm into Conv)."""

    calls: dict[str, list[ModuleCall]]
    followers: dict[tuple[str, int], list[ModuleCall]]


def _tensor_key(value: Any) -> Any:
    """Identity of a tensor's contents: storage pointer, shape, strides, dtype."""
    if value is None:
        return None
    return (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)


def _as_numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().float().cpu().numpy().copy()


def trace(reference: FeatureExtractor, batch: Any, selected: set[str], graph_modules: set[str]) -> Record:
    """Run ``reference`` (an extractor with an ``nn.Module`` as ``.module``) once on ``batch`` through its
    :meth:`~cka.frontends.base.FeatureExtractor.features`, with hooks on every submodule (removed on exit,
    also when the run raises), recording the outputs of the ``selected`` modules' calls and of their
    followers (see :class:`Record`); ``graph_modules`` are the modules that own nodes in the graph."""
    import torch

    calls: dict[str, list[ModuleCall]] = {}
    followers: dict[tuple[str, int], list[ModuleCall]] = {}
    watched: dict[Any, tuple[str, int]] = {}  # output identity -> the selected call it came from
    pending: dict[int, list[Any]] = {}

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, kwargs: Any = None) -> None:
            tensor = first_tensor(args) if args else (first_tensor(kwargs) if kwargs else None)
            key = _tensor_key(tensor)
            # a module without nodes that runs on a watched output: keep its input to see if it changes it
            copy = (
                tensor.detach().clone() if tensor is not None and key in watched and name not in graph_modules else None
            )
            pending.setdefault(id(module), []).append((key, copy))

        return hook

    def post_hook(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            key, before = pending[id(module)].pop()
            tensor = first_tensor(output)
            out_key = _tensor_key(tensor)
            if name in selected:
                call = ModuleCall(name, type(module).__name__, _as_numpy(tensor) if tensor is not None else None)
                calls.setdefault(name, []).append(call)
                if tensor is not None:
                    watched[out_key] = (name, len(calls[name]) - 1)
            changed = (
                before is not None
                and tensor is not None
                and key in watched
                and (tensor.shape != before.shape or not torch.equal(tensor, before))
            )
            if changed:
                root = watched[key]
                followers.setdefault(root, []).append(ModuleCall(name, type(module).__name__, _as_numpy(tensor)))
                watched[out_key] = root

        return hook

    with contextlib.ExitStack() as hooks:
        for name, module in reference.module.named_modules():  # type: ignore[attr-defined]
            if name:
                hooks.callback(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True).remove)
                hooks.callback(module.register_forward_hook(post_hook(name)).remove)
        reference.features(batch)
    return Record(calls, followers)


def check(
    layers: Sequence[Layer],
    outputs: Mapping[str, np.ndarray],
    record: Record,
    tolerance: float,
    precision: str,
    model: str,
) -> list[Layer]:
    """The layers, each module-mapped one with the candidate value that matches its module call's output
    first; ``outputs`` holds every candidate's value on the probe batch.

    Raises
    ------
    OnnxMappingError
        Every layer whose module did not run that call, returned no tensor, or whose value is fused or
        mismatched (``tolerance`` for a ``precision`` graph), each with the reason.
    """
    problems, checked = [], []
    for layer in layers:
        checked.append(layer)
        if layer.module is None:
            continue
        calls = record.calls.get(layer.module, [])
        if layer.call >= len(calls):
            problems.append(
                MappingProblem(
                    layer.name,
                    "unmapped",
                    f"the PyTorch module ran {len(calls)} time(s) on the first batch, so it has no call {layer.call}.",
                )
            )
            continue
        expected = calls[layer.call].output
        if expected is None:
            problems.append(
                MappingProblem(layer.name, "unmapped", "the PyTorch module's output holds no tensor to compare.")
            )
            continue
        difference, best = min((relative_difference(outputs[c], expected), c) for c in layer.candidates)
        value = outputs[best]
        folded = _folded_into(value, difference, record.followers.get((layer.module, layer.call), []))
        if folded:
            problems.append(
                MappingProblem(
                    layer.name,
                    "fused",
                    f"its ONNX value {best!r} also holds {folded}: that module ran on this module's output in PyTorch, "
                    f"has no node of its own, and the value matches its output, not this module's (relative "
                    f"difference {difference:.3g}).",
                )
            )
        elif difference > tolerance or math.isnan(difference):
            what = (
                f"shape {tuple(value.shape)} vs the module's {tuple(expected.shape)}"
                if tuple(value.shape) != tuple(expected.shape)
                else f"relative difference {difference:.3g} > {tolerance:g} (tolerance for a {precision} graph)"
            )
            problems.append(
                MappingProblem(
                    layer.name,
                    "mismatched",
                    f"its ONNX value {best!r} is not the module's output on the first batch: {what}.",
                )
            )
        else:
            others = tuple(c for c in layer.candidates if c != best)
            checked[-1] = Layer(layer.name, (best, *others), layer.module, layer.call)
    if problems:
        raise OnnxMappingError(problems, model)
    return checked


def _folded_into(value: np.ndarray, difference: float, followers: Sequence[ModuleCall]) -> str | None:
    """The follower chain (``"'stem.1' (BatchNorm2d)"``) whose output ``value`` matches clearly better
    than the module's own output (relative difference ``difference``), if any."""
    if difference <= MISMATCH_TOLERANCE["float"]:
        return None  # the value is the module's output (to float32 rounding): nothing was folded in
    chain = []
    for follower in followers:
        chain.append(f"{follower.name!r} ({follower.type_name})")
        if follower.output is not None and relative_difference(value, follower.output) < _CLEARLY_BETTER * difference:
            return " and ".join(chain)
    return None
