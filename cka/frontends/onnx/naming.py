"""Exporter name mapping: which PyTorch module call each ONNX value is the output of, and name resolution.

What the exporters record:

* ``torch.onnx.export(..., dynamo=False)`` (TorchScript exporter) names nodes by the call scope,
  ``/layer1/layer1.0/relu_1/Relu``; a component is the module's name from its last non-numeric atom
  (``layer1.0``, ``relu``) plus ``_k`` for its (k+1)-th call.
* ``torch.onnx.export(..., dynamo=True)`` stores the module path in each node's metadata
  ``pkg.torch.onnx.name_scopes`` (``['', 'layer1', 'layer1.0', 'layer1.0.relu', 'relu_3']``); the
  calls of a module that runs twice share the scope and are told apart by position in the graph.

A module's call is the set of nodes in its scope; its output is the value those nodes compute that is
used outside them (or is a graph output). Calls are numbered in graph order: ``"layer1.0.relu"`` is the
first, ``"layer1.0.relu@1"`` the second (the ``@k`` of ``torch.export``'s module stack).
:func:`resolve` turns a selection of module and value names into the values to read, or one
:class:`~cka.frontends.onnx.errors.OnnxMappingError` that lists every name it cannot map and why.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cka.frontends._common import close_matches
from cka.frontends.onnx.errors import MappingProblem, OnnxMappingError
from cka.frontends.onnx.graph import Graph

__all__ = ["CALL_SEPARATOR", "Call", "Layer", "ModuleMap", "label", "resolve", "split_call"]

#: Separates a module name from its call index: ``"layer1.0.relu@1"`` is the second call.
CALL_SEPARATOR = "@"
#: The dynamo exporter's node metadata key holding the module path.
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
#: Ops that quantize a float value for the next op (dynamic and QDQ quantization).
_QUANTIZERS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})
#: Module types that an exporter removes in eval mode (the identity or a free reshape).
_REMOVED_TYPES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "Identity", "Flatten")
_CALL_SUFFIX = re.compile(r"^(.*)_(\d+)$")

#: Per node, the module path: one ``(qualified module name, call key)`` per level, outermost first.
Scope = tuple[tuple[str, Any], ...]


def label(module: str, call: int) -> str:
    """``"layer1.0.relu"`` for the first call, ``"layer1.0.relu@1"`` for the second."""
    return module if call == 0 else f"{module}{CALL_SEPARATOR}{call}"


def split_call(name: str) -> tuple[str, int]:
    """The inverse of :func:`label`: ``"layer1.0.relu@1"`` -> ``("layer1.0.relu", 1)``."""
    module, sep, call = name.rpartition(CALL_SEPARATOR)
    if sep and call.isdigit():
        return module, int(call)
    return name, 0


def _tail(component: str) -> str:
    """The last atom of a module name or scope component (``"layer1.0"`` -> ``"0"``)."""
    return component.rsplit(".", 1)[-1]


def _parent(module: str) -> str:
    return module.rsplit(".", 1)[0] if "." in module else ""


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def parse_scopes(graph: Any, module_names: set[str] | None) -> tuple[str | None, list[Scope]]:
    """``(exporter, per node the PyTorch module path)``; exporter ``"dynamo"``, ``"torchscript"`` or None.

    dynamo: the call key is ``None`` (calls are separated by position, see :meth:`ModuleMap.calls`).
    TorchScript: a component ``x_k`` is the (k+1)-th call of ``x`` when ``x`` is a sibling scope (the
    first call has no suffix) and, where the PyTorch module names are known (``module_names``),
    ``parent.x_k`` is not itself a module; the qualified name is the parent's plus the component's last
    atom, and the call key is the path of raw components.
    """
    metadata = [{p.key: p.value for p in node.metadata_props} for node in graph.node]
    if any(NAME_SCOPES_KEY in m for m in metadata):
        scopes = []
        for m in metadata:
            raw = m.get(NAME_SCOPES_KEY)
            try:
                names = ast.literal_eval(raw) if raw else []
            except (ValueError, SyntaxError):
                names = []
            scopes.append(tuple((name, None) for name in names[1:-1] if name))
        return "dynamo", scopes
    raw_paths = [tuple(node.name.split("/")[1:-1]) if node.name.startswith("/") else () for node in graph.node]
    if not any(raw_paths):
        return None, [() for _ in graph.node]
    siblings: dict[tuple[str, ...], set[str]] = {}
    for path in raw_paths:
        for depth in range(len(path)):
            siblings.setdefault(path[:depth], set()).add(path[depth])
    scopes = []
    for path in raw_paths:
        levels: list[tuple[str, Any]] = []
        parent = ""
        for depth, component in enumerate(path):
            base = component
            match = _CALL_SUFFIX.match(component)
            if match and match.group(1) in siblings.get(path[:depth], ()):
                candidate = _join(parent, _tail(component))
                if module_names is None or candidate not in module_names:
                    base = match.group(1)
            qualified = _join(parent, _tail(base))
            if module_names is not None and qualified not in module_names:
                # a module called from outside its parent: find it by its unqualified name
                owners = [m for m in module_names if m == base or m.endswith("." + base)]
                if len(owners) == 1:
                    qualified = owners[0]
            levels.append((qualified, path[: depth + 1]))
            parent = qualified
        scopes.append(tuple(levels))
    return "torchscript", scopes


@dataclass
class Call:
    """One call of a module in the graph: its nodes (positions, graph order) and output candidates."""

    module: str
    index: int
    nodes: tuple[int, ...]
    outputs: tuple[str, ...]  # candidate output values, best first


class ModuleMap:
    """The PyTorch modules a graph records and their calls.

    Parameters
    ----------
    graph : Graph
    module_names : set of str, optional
        The PyTorch model's module names, when it is at hand: they settle which ``x_1`` scope
        components are second calls and where a module called from outside its parent belongs.
    """

    def __init__(self, graph: Graph, module_names: set[str] | None = None) -> None:
        self.graph = graph
        self.exporter, self.scopes = parse_scopes(graph.proto.graph, module_names)
        #: Every module that owns at least one node, in order of first appearance.
        self.modules = list(dict.fromkeys(name for scope in self.scopes for name, _ in scope))
        self._calls: dict[str, list[Call]] = {}

    def calls(self, module: str) -> list[Call]:
        """The calls of ``module`` in graph order, each with its output candidates (cached)."""
        if module not in self._calls:
            self._calls[module] = self._find_calls(module)
        return self._calls[module]

    def _find_calls(self, module: str) -> list[Call]:
        g = self.graph
        if self.exporter == "torchscript":
            groups: dict[Any, list[int]] = {}
            for position, scope in enumerate(self.scopes):
                for name, key in scope:
                    if name == module:
                        groups.setdefault(key, []).append(position)
                        break
            node_groups = sorted(groups.values(), key=lambda nodes: nodes[0])
        else:
            # dynamo: every call shares the scope; a call is a run of the module's nodes that no other
            # data-path node interrupts (ops on shapes and constants do not separate calls)
            member = [any(name == module for name, _ in scope) for scope in self.scopes]
            node_groups, current = [], []
            for position, node in enumerate(g.nodes):
                if member[position]:
                    current.append(position)
                elif current and any(g.is_feature(o) for o in node.output if o):
                    node_groups.append(current)
                    current = []
            if current:
                node_groups.append(current)
        return [Call(module, k, tuple(nodes), self._call_outputs(nodes)) for k, nodes in enumerate(node_groups)]

    def _call_outputs(self, nodes: Sequence[int]) -> tuple[str, ...]:
        """Values computed by ``nodes`` and used outside them (or graph outputs): the call's outputs,
        features only, last produced first (a module's result is computed last). A quantizer inserted
        after the module (named after its value) reads the module's output, so it counts as outside:
        a quantized graph maps a module to the float value its quantizer reads."""
        g = self.graph
        inside = {i for i in nodes if g.nodes[i].op_type not in _QUANTIZERS}
        outputs = []
        for i in nodes:
            for name in g.nodes[i].output:
                if name and g.is_feature(name) and (name in g.outputs or (g.consumers.get(name, set()) - inside)):
                    outputs.append(name)
        return tuple(reversed(outputs))

    def mapping(self) -> dict[str, str]:
        """Module call label -> the ONNX value that is its output, for every call with an output."""
        return {
            label(module, call.index): call.outputs[0]
            for module in self.modules
            for call in self.calls(module)
            if call.outputs
        }

    def blocks(self) -> list[str]:
        """The exported model's repeated blocks: modules named by a number (``layers.0``, ``layer1.1``)
        that own submodules, outermost only, with an output in the graph."""
        modules = self.modules
        parents = {_parent(m) for m in modules if "." in m} | {
            m for m in modules if any(o.startswith(m + ".") for o in modules)
        }
        blocks = [m for m in modules if _tail(m).isdigit() and m in parents]
        outermost = [b for b in blocks if not any(b.startswith(o + ".") for o in blocks)]
        return [b for b in outermost if any(c.outputs for c in self.calls(b))]


# --------------------------------------------------------------------------------------------
# Resolving a selection
# --------------------------------------------------------------------------------------------


@dataclass
class Layer:
    """A selected layer: its name, the module call it stands for (if any) and its ONNX value(s)."""

    name: str
    candidates: tuple[str, ...]
    module: str | None = None
    call: int = 0

    @property
    def value(self) -> str:
        return self.candidates[0]


def resolve(
    names: Sequence[str], modules: ModuleMap, torch_modules: Mapping[str, str] | None, model: str
) -> tuple[list[Layer], list[str]]:
    """``(layers, module-mapped names left unchecked)`` for the selection ``names``: module call labels
    (a name that is both a module and a value is read as the module) and raw value names.

    ``torch_modules`` maps the PyTorch model's module names to their type names, when it is at hand
    (then nothing is left unchecked); ``model`` names the model in errors.

    Raises
    ------
    OnnxMappingError
        Every name that is unknown (with close matches), inside a subgraph, a graph input, or a module
        without a value of its own (why, by the module's type and the exporter).
    """
    g = modules.graph
    graph_modules = set(modules.modules)
    known = dict(torch_modules or {})
    values = g.computed()
    layers, problems, unchecked = [], [], []
    for name in names:
        module, call = split_call(name)
        if module in graph_modules or module in known:
            calls = modules.calls(module) if module in graph_modules else []
            if call < len(calls) and calls[call].outputs:
                layers.append(Layer(name, calls[call].outputs, module, call))
                if torch_modules is None:
                    unchecked.append(name)
                continue
            problems.append(MappingProblem(name, "unmapped", _unmapped_reason(modules, module, call, calls, known)))
        elif name in values:
            layers.append(Layer(name, (name,)))
        elif name in g.subgraph_values:
            problems.append(MappingProblem(name, "subgraph", g.subgraph_reason(name)))
        elif name in g.inputs:
            problems.append(
                MappingProblem(
                    name, "unknown", "it is a graph input, not a computed value; inputs are the data you feed."
                )
            )
        else:
            pool = sorted(graph_modules | set(known)) + sorted(values)
            problems.append(
                MappingProblem(
                    name,
                    "unknown",
                    f"neither a PyTorch module recorded in the graph nor an ONNX value; {close_matches(name, pool)}. "
                    f"List the candidates with OnnxModel.layers() (values) and OnnxModel.modules() (module names)."
                    + (
                        ""
                        if torch_modules is not None
                        else " A module without a node of its own was folded (BatchNorm) or removed (Dropout) by the "
                        "exporter; pass reference=<the PyTorch model> to have it named as such."
                    ),
                )
            )
    if problems:
        raise OnnxMappingError(problems, model)
    return layers, unchecked


def _unmapped_reason(
    modules: ModuleMap, module: str, call: int, calls: Sequence[Call], torch_modules: Mapping[str, str]
) -> str:
    """Why module ``module`` (call ``call``) has no value: folded, removed, or fewer calls in the graph."""
    type_name = torch_modules.get(module, "")
    kind = f" ({type_name})" if type_name else ""
    if not calls:
        if type_name.startswith("BatchNorm"):
            why = (
                "the exporter folded this BatchNorm into the preceding Conv, whose value therefore holds conv+BN "
                "(TorchScript exporter); select the module after it (e.g. the activation) or the block"
            )
        elif (
            type_name.startswith(("Conv", "Linear"))
            and modules.exporter == "dynamo"
            and _sibling_batchnorm(modules, module, torch_modules)
        ):
            why = (
                "the dynamo exporter fused it with the BatchNorm after it and filed the fused op under that "
                "BatchNorm, which maps to conv+BN; select the BatchNorm or the activation after it"
            )
        elif type_name in _REMOVED_TYPES:
            why = "the exporter removed it (it is the identity, or a free reshape, in eval mode); select the module before it"
        else:
            why = (
                "the exporter folded it into a neighbouring op (BatchNorm into the preceding Conv; with "
                "dynamo=True the fused Conv is filed under the BatchNorm) or removed it (Dropout, Identity), "
                "or a later tool rewrote its nodes without their names (onnxruntime's quantizers drop the "
                "dynamo exporter's node metadata); select its value by ONNX name (see OnnxModel.layers())"
            )
        return f"module{kind} has no node of its own in the graph: {why}."
    if call >= len(calls):
        return (
            f"the graph holds {len(calls)} call(s) of {module!r} (names {[label(module, c.index) for c in calls]}), "
            f"so there is no call {call}; an optimiser may have merged or removed calls."
        )
    nodes = [modules.graph.nodes[i].name for i in calls[call].nodes][:4]
    return f"call {call} of {module!r} computes no floating-point value used outside it (nodes {nodes})."


def _sibling_batchnorm(modules: ModuleMap, module: str, torch_modules: Mapping[str, str]) -> bool:
    """Whether a BatchNorm next to ``module`` (same parent) owns nodes: where dynamo files a fused Conv."""
    parent = _parent(module)
    graph_modules = set(modules.modules)
    return any(
        kind.startswith("BatchNorm") and name in graph_modules and _parent(name) == parent
        for name, kind in torch_modules.items()
    )
