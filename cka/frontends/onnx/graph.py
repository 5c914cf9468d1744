"""The index of an ONNX graph that the frontend reads: nodes, producers and consumers, types, features.

:func:`index` walks the top-level graph once and records which node produces and which nodes consume
each value, which values depend on the inputs (features, as opposed to constants and shapes), their
types from the shape-inferred copy, the values that exist only inside ``If`` / ``Loop`` / ``Scan``
subgraphs, and the graph's arithmetic (float, float16, quantized). Types and enums are onnx's own
(``onnx.TensorProto``, ``onnx.helper.tensor_dtype_to_np_dtype``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx.helper import tensor_dtype_to_np_dtype

__all__ = ["FLOAT_TYPES", "Graph", "OnnxValue", "dtype_name", "index", "numpy_dtype"]

Shape = tuple[int | str | None, ...]

#: Element types of floating-point tensors: the only values that are features.
FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
)
#: Element types of half-precision weights: a graph holding them is compared with a looser tolerance.
_HALF_TYPES = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})
#: Ops whose outputs are never features.
_NON_FEATURE_OPS = frozenset({"Constant", "Shape", "Size", "ConstantOfShape"})
#: Op types that mark a quantized graph (QDQ, dynamic, QOperator formats).
_QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "ConvInteger",
        "MatMulInteger",
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QGemm",
        "QAttention",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
    }
)


class OnnxValue(NamedTuple):
    """A candidate intermediate value of an ONNX graph (see :meth:`OnnxModel.layers`).

    ``shape`` holds ints and dimension names (``"n"``) where shape inference knows them, else ``None``;
    ``module`` names the PyTorch module call(s) whose output it is (``"layer1.0.relu@1"``), if any.
    """

    name: str
    shape: Shape | None
    dtype: str | None
    op_type: str
    module: str | None


def numpy_dtype(elem_type: int | None) -> np.dtype | None:
    """The numpy dtype of an ONNX element type (``onnx.TensorProto.FLOAT`` -> ``float32``); None when
    unknown (0) or without a numpy equivalent."""
    if not elem_type:
        return None
    try:
        return np.dtype(tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None


def dtype_name(elem_type: int | None) -> str | None:
    """``"float32"`` for ``onnx.TensorProto.FLOAT``, ...; None when unknown."""
    dtype = numpy_dtype(elem_type)
    return dtype.name if dtype is not None else None


def _shape_of(value_info: onnx.ValueInfoProto) -> tuple[Shape | None, int | None]:
    """``(shape, element type)`` of a ValueInfoProto; ``None`` where unknown."""
    t = value_info.type
    if not t.HasField("tensor_type"):
        return None, None
    elem = t.tensor_type.elem_type or None
    if not t.tensor_type.HasField("shape"):
        return None, elem
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim)
    return dims, elem


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """``(attribute name, subgraph)`` for every graph-valued attribute of a node (If, Loop, Scan)."""
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            for sub in attribute.graphs:
                yield attribute.name, sub


def _subgraph_value_names(graph: onnx.GraphProto) -> Iterator[str]:
    for node in graph.node:
        yield from (name for name in node.output if name)
        for _, sub in _subgraphs(node):
            yield from _subgraph_value_names(sub)


@dataclass
class Graph:
    """What cka reads from a graph: node order, producers and consumers, data-dependent values, types,
    subgraph values and the arithmetic (``precision``: ``"float"``, ``"float16"`` or ``"quantized"``)."""

    proto: onnx.ModelProto
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, set[int]] = field(default_factory=dict)
    data_values: set[str] = field(default_factory=set)
    types: dict[str, tuple[Shape | None, int | None]] = field(default_factory=dict)
    subgraph_values: dict[str, tuple[int, str]] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    precision: str = "float"

    @property
    def nodes(self) -> Any:
        return self.proto.graph.node

    def is_feature(self, value: str) -> bool:
        """A node output that depends on the inputs, of floating type and rank >= 1 where known."""
        if value not in self.data_values:
            return False
        shape, elem = self.types.get(value, (None, None))
        if elem is not None and elem not in FLOAT_TYPES:
            return False
        return shape is None or len(shape) >= 1

    def values(self) -> list[OnnxValue]:
        """Every feature value computed by a top-level node, in graph order (``module`` left None)."""
        found = []
        for node in self.nodes:
            for value in node.output:
                if value and self.is_feature(value):
                    shape, elem = self.types.get(value, (None, None))
                    found.append(OnnxValue(value, shape, dtype_name(elem), node.op_type, None))
        return found

    def computed(self) -> set[str]:
        """Names of the data-dependent values that a top-level node computes (selectable by name)."""
        return {v for v in self.data_values if v in self.producer}

    def subgraph_reason(self, name: str) -> str:
        """Why the subgraph value ``name`` cannot be read, and the nearest top-level values."""
        position, attribute = self.subgraph_values[name]
        node = self.nodes[position]
        outputs = [o for o in node.output if o]
        inputs = [i for i in node.input if i and i in self.data_values]
        return (
            f"it is computed inside the {attribute!r} subgraph of the {node.op_type} node {node.name!r}; onnxruntime "
            f"returns top-level values only. Nearest top-level values: the {node.op_type}'s outputs {outputs}"
            + (f", or its inputs {inputs}" if inputs else "")
            + "."
        )


def index(proto: onnx.ModelProto, typed: onnx.ModelProto) -> Graph:
    """Index ``proto``, with value types and shapes from its shape-inferred copy ``typed``."""
    g = Graph(proto=proto)
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    g.inputs = [v.name for v in graph.input if v.name not in initializers]
    g.outputs = [v.name for v in graph.output]
    for vi in [*typed.graph.value_info, *typed.graph.output, *typed.graph.input]:
        g.types[vi.name] = _shape_of(vi)
    data = set(g.inputs)
    half = any(t.data_type in _HALF_TYPES for t in graph.initializer)
    quantized = False
    for position, node in enumerate(graph.node):
        quantized |= node.op_type in _QUANTIZED_OPS
        for name in node.input:
            if name:
                g.consumers.setdefault(name, set()).add(position)
        subgraphs = list(_subgraphs(node))
        depends = bool(subgraphs) or any(name in data for name in node.input)
        for name in node.output:
            if name:
                g.producer[name] = position
                if depends and node.op_type not in _NON_FEATURE_OPS:
                    data.add(name)
        for attribute, sub in subgraphs:
            for inner in _subgraph_value_names(sub):
                g.subgraph_values.setdefault(inner, (position, attribute))
    g.data_values = data
    g.precision = "quantized" if quantized else ("float16" if half else "float")
    return g
