r"""ONNX frontend: compare a PyTorch model with its ONNX deployment (or two ONNX graphs) layer by layer.

>>> from cka import CKA
>>> from cka.frontends.onnx import OnnxModel
>>> deployed = OnnxModel("model.onnx")              # or an onnx.ModelProto  # doctest: +SKIP
>>> deployed.layers()[:3]                           # candidate values, shapes where known  # doctest: +SKIP
>>> cka = CKA(torch_model, deployed, model1_layers=["layer1", "fc"], model2_layers=["layer1", "fc"])  # doctest: +SKIP
>>> cka.compare(loader).matrix.diagonal()           # ~1.0 where the export is faithful  # doctest: +SKIP

**Layer names.** ``layers=`` (or ``model2_layers=`` in :class:`cka.CKA`) takes PyTorch module names,
mapped to the ONNX value that is the module's output, and raw ONNX value names (see :meth:`OnnxModel.layers`).
A name that is both is read as the module. The mapping reads what the exporters record:

* ``torch.onnx.export(..., dynamo=False)`` (TorchScript exporter) names nodes by the call scope,
  ``/layer1/layer1.0/relu/Relu`` with the value ``/layer1/layer1.0/relu/Relu_output_0``; each scope
  component is the module's name from its last non-numeric atom (``layer1.0``, ``relu``), and a
  second call of a module gets ``_1`` (``relu_1``).
* ``torch.onnx.export(..., dynamo=True)`` names values after FX nodes (``relu_3``) and stores the module
  path in each node's metadata ``pkg.torch.onnx.name_scopes`` (``['', 'layer1', 'layer1.0', 'layer1.0.relu', 'relu_3']``);
  the calls of a module that runs twice share the scope and are told apart by position in the graph.

A module's call is the set of nodes in its scope; its output is the value those nodes compute that is
used outside them (or is a graph output). A module that runs several times maps to its calls in order:
``"layer1.0.relu"`` is the first call (what :class:`cka.CKA` records for a PyTorch module) and
``"layer1.0.relu@1"`` the second (the ``@k`` of ``torch.export``'s module stack).

**Fusion.** Both exporters fold BatchNorm into the preceding Conv by default: the TorchScript exporter's
value named after the conv holds conv+BN and the BatchNorm has no node; the dynamo exporter files the
fused Conv under the BatchNorm and keeps no conv value. A mapping must never hand back a different
tensor under a module's name, so when the PyTorch model is at hand (the other side of ``CKA``, or
``reference=``) the first batch is also run through it and every mapped value is checked against the
module's hooked output; fused, unmapped and mismatched layers raise :class:`OnnxMappingError` with the
reason. Two remedies: compare at fusion-safe boundaries (activations such as ``"layer1.0.relu"``, block
outputs such as ``"layer1.0"``), or re-export a copy for analysis without fusion,
``torch.onnx.export(..., dynamo=False, do_constant_folding=False)`` or
``torch.onnx.export(..., dynamo=True, optimize=False)``.

**Running.** The chosen values become extra graph outputs (typed by shape inference) of an edited copy
of the graph (never written over the original), and one onnxruntime run per batch reads them all.
Inputs are fed by the model's input names. Outputs are bound to the session's device and handed to
torch through DLPack (no copy); without torch they are numpy arrays.

**Providers.** ``CUDAExecutionProvider`` when onnxruntime-gpu is installed and a GPU is present, else
CPU; ``providers=`` overrides. ``onnxruntime`` and ``onnxruntime-gpu`` install the same module and must
not be installed together (the ``onnx`` and ``onnx-gpu`` extras are exclusive): two installed
distributions get an :class:`OnnxRuntimeSetupWarning`, and so does a CUDA session that onnxruntime
silently created on the CPU (missing CUDA libraries).

**Large models.** A model with external data (``model.onnx`` + ``model.onnx.data``, the dynamo exporter's
default) or over 2 GB is read without its weights; the edited graph is written to a temporary file beside
the original, referencing the same weight files, the session is created from that path, and the file is
removed at once.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.metadata
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cka.frontends.base import FeatureExtractor

__all__ = [
    "OnnxMappingError",
    "OnnxModel",
    "OnnxRuntimeSetupWarning",
    "OnnxValue",
    "UncheckedMappingWarning",
    "default_providers",
    "installed_onnxruntime_distributions",
]

Array = Any

INSTALL_HINT = 'pip install "cka[onnx]" (CPU) or pip install "cka[onnx-gpu]" (CUDA), never both'

#: How to avoid fused values; quoted in docstrings and in every mapping error.
REMEDIES = (
    "Remedies: (1) compare at fusion-safe boundaries, i.e. activations (e.g. 'layer1.0.relu') and block "
    "outputs (e.g. 'layer1.0'), which the exporters keep as values; or (2) re-export a copy for analysis "
    "without fusion: torch.onnx.export(..., dynamo=False, do_constant_folding=False) or "
    "torch.onnx.export(..., dynamo=True, optimize=False)."
)

#: Distributions that all install the module ``onnxruntime``; more than one installed is broken.
ORT_DISTRIBUTIONS = (
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn",
    "onnxruntime-training",
)

#: Largest protobuf message: a model beyond it cannot be serialised in one piece.
_PROTOBUF_LIMIT = 2**31 - 1
#: Separates a module name from its call index: ``"layer1.0.relu@1"`` is the second call.
CALL_SEPARATOR = "@"
#: Ops whose outputs are never features.
_NON_FEATURE_OPS = frozenset({"Constant", "Shape", "Size", "ConstantOfShape"})
#: Ops that quantize a float value for the next op (dynamic and QDQ quantization).
_QUANTIZERS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})
#: Op types that mark a quantized graph (QDQ, dynamic, QOperator formats).
_QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm", "QAttention", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearConcat",
})
#: Relative difference ``||onnx - torch||_F / ||torch||_F`` up to which a mapped value counts as the
#: module's output, by the graph's arithmetic. Measured on the test ResNet: float32 onnxruntime vs
#: PyTorch on the CPU differ by ~1e-7; TF32 convolutions on GPUs (on by default in both) by up to
#: ~1e-3; a folded BatchNorm or a neighbouring op changes the value by O(1) (1.08 for the test model's
#: conv+BN). int8 dynamic quantization drifts legitimately (0.003-0.14 there; that drift is what the
#: comparison measures), so the bound is loose for quantized graphs and the structural check (a module
#: without a node of its own ran on the value, and the value matches its output) gives the fused verdict.
MISMATCH_TOLERANCE = {"float": 1e-2, "float16": 5e-2, "quantized": 0.35}


class OnnxRuntimeSetupWarning(UserWarning):
    """onnxruntime is installed or set up so that it silently runs elsewhere than asked (e.g. on CPU)."""


class UncheckedMappingWarning(UserWarning):
    """PyTorch module names were mapped to ONNX values without the PyTorch model to check them."""


@dataclass(frozen=True)
class MappingProblem:
    """Why one selected layer cannot be read from the graph: ``kind`` is ``"unknown"``, ``"subgraph"``,
    ``"unmapped"``, ``"fused"`` or ``"mismatched"``; ``reason`` says why, in a sentence."""

    layer: str
    kind: str
    reason: str


class OnnxMappingError(ValueError):
    """Selected layers that the graph does not hold as asked; ``.problems`` lists each with its reason."""

    def __init__(self, problems: Sequence[MappingProblem], model: str, remedies: bool = True) -> None:
        self.problems = list(problems)
        lines = [f"{model}: {len(self.problems)} selected layer(s) cannot be read from the ONNX graph:"]
        lines += [f"  - {p.layer!r} ({p.kind}): {p.reason}" for p in self.problems]
        if remedies and any(p.kind in ("fused", "unmapped", "mismatched") for p in self.problems):
            lines.append(REMEDIES)
        super().__init__("\n".join(lines))


class OnnxValue(NamedTuple):
    """A candidate intermediate value of an ONNX graph (see :meth:`OnnxModel.layers`).

    ``shape`` holds ints and dimension names (``"n"``) where shape inference knows them, else ``None``;
    ``module`` names the PyTorch module call(s) whose output it is (``"layer1.0.relu@1"``), if any.
    """

    name: str
    shape: tuple[int | str | None, ...] | None
    dtype: str | None
    op_type: str
    module: str | None


# --------------------------------------------------------------------------------------------
# Imports and installation
# --------------------------------------------------------------------------------------------


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(f"the ONNX frontend needs the onnx package: {INSTALL_HINT}.") from error
    return onnx


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(f"the ONNX frontend needs onnxruntime: {INSTALL_HINT}.") from error
    return onnxruntime


def installed_onnxruntime_distributions() -> list[str]:
    """Installed distributions (``importlib.metadata``) that provide the module ``onnxruntime``."""
    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            found.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _warn_if_several_distributions(found: Sequence[str]) -> None:
    if len(found) > 1:
        warnings.warn(
            f"several onnxruntime distributions are installed ({', '.join(found)}). They install the same "
            f"module `onnxruntime`: the last one installed wins, and uninstalling one breaks the other, so "
            f"GPU support may be silently missing. Keep exactly one: pip uninstall -y "
            f"{' '.join(f.split('==')[0] for f in found)} && pip install onnxruntime-gpu (or onnxruntime); "
            f"with cka use the extra onnx or onnx-gpu, not both.",
            OnnxRuntimeSetupWarning,
            stacklevel=3,
        )


def _gpu_present() -> bool:
    """Whether a CUDA GPU is visible: torch's answer when torch is loaded, else the NVIDIA device nodes
    (Linux); where neither tells, assume yes and let the post-creation provider check warn."""
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    if sys.platform.startswith("linux"):
        return os.path.exists("/dev/nvidiactl") or os.path.isdir("/proc/driver/nvidia/gpus")
    return True


def default_providers(available: Sequence[str] | None = None) -> list[str]:
    """``["CUDAExecutionProvider", "CPUExecutionProvider"]`` when onnxruntime offers CUDA (the
    onnxruntime-gpu build) and a GPU is present, else ``["CPUExecutionProvider"]``."""
    if available is None:
        available = _import_ort().get_available_providers()
    if "CUDAExecutionProvider" in available and _gpu_present():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _provider_name(provider: Any) -> str:
    return provider[0] if isinstance(provider, (tuple, list)) else str(provider)


def _check_session_providers(requested: Sequence[Any], session: Any) -> None:
    """Warn when onnxruntime dropped a requested accelerator provider (it falls back to the CPU silently
    when e.g. the CUDA or cuDNN libraries are missing)."""
    active = session.get_providers()
    dropped = [
        _provider_name(p) for p in requested
        if _provider_name(p) != "CPUExecutionProvider" and _provider_name(p) not in active
    ]
    if dropped:
        ort = _import_ort()
        warnings.warn(
            f"onnxruntime {ort.__version__} was asked for {dropped} but created the session on {active}: it "
            f"fell back silently, usually because the CUDA/cuDNN libraries that onnxruntime-gpu needs are "
            f"missing or of another version (pip install 'onnxruntime-gpu[cuda,cudnn]', or see "
            f"onnxruntime.preload_dlls()). Pass providers=['CPUExecutionProvider'] to run on the CPU on purpose.",
            OnnxRuntimeSetupWarning,
            stacklevel=4,
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _external_tensors(model: Any) -> Iterator[Any]:
    """Every tensor of the model (initializers and attributes, subgraphs included) stored externally."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return (t for t in _get_all_tensors(model) if uses_external_data(t))


def _external_locations(model: Any) -> dict[str, list[str]]:
    """External data file -> names of the tensors stored in it."""
    from onnx.external_data_helper import ExternalDataInfo

    files: dict[str, list[str]] = {}
    for tensor in _external_tensors(model):
        files.setdefault(ExternalDataInfo(tensor).location, []).append(tensor.name)
    return files


def _check_external_files(model: Any, base_dir: Path, source: str) -> bool:
    """Whether ``model`` stores tensors externally; a clear error if a referenced file is missing."""
    files = _external_locations(model)
    missing = {loc: names for loc, names in files.items() if not (base_dir / loc).is_file()}
    if missing:
        details = "; ".join(
            f"{str(base_dir / loc)!r} (tensors {names[:3]}{' ...' if len(names) > 3 else ''})"
            for loc, names in missing.items()
        )
        raise FileNotFoundError(
            f"{source} keeps its weights in external data file(s) that do not exist: {details}. Keep the data "
            f"file(s) next to the .onnx file under the names the exporter gave them (torch.onnx.export with "
            f"dynamo=True writes '<model>.onnx.data'), or re-export with external_data=False for models under 2 GB."
        )
    return bool(files)


def _load(model: Any, base_dir: str | os.PathLike | None) -> tuple[Any, Path | None, bool, str]:
    """``(proto, directory of the file, stores weights externally, display source)``.

    A path is read without its external data (the weights stay on disk until onnxruntime maps them).
    """
    onnx = _import_onnx()
    if isinstance(model, onnx.ModelProto):
        source = "the given ModelProto"
        proto = model
        directory = Path(base_dir) if base_dir is not None else None
        if any(True for _ in _external_tensors(proto)):
            if directory is None:
                raise ValueError(
                    f"{source} references external data files {sorted(_external_locations(proto))} but cka cannot "
                    f"tell where they are; pass the path of the .onnx file instead (OnnxModel('model.onnx')), or "
                    f"base_dir= the directory holding them."
                )
            return proto, directory, _check_external_files(proto, directory, source), source
        return proto, directory, False, source
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"OnnxModel takes a path to a .onnx file or an onnx.ModelProto; got {type(model).__module__}."
            f"{type(model).__qualname__}."
        )
    path = Path(model)
    source = repr(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {str(path)!r}" + (" (it is a directory)" if path.is_dir() else "") + ".")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends: the file is not a ModelProto
        raise ValueError(
            f"{source} is not an ONNX model: it does not parse as an onnx.ModelProto ({type(error).__name__}: "
            f"{error}). Pass a file written by torch.onnx.export or onnx.save."
        ) from None
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0) or proto.ir_version <= 0:
        raise ValueError(
            f"{source} is not an ONNX model: it parsed as protobuf but holds no ONNX graph (ir_version "
            f"{proto.ir_version}, {len(proto.graph.node)} nodes). Pass a file written by torch.onnx.export or onnx.save."
        )
    directory = path.resolve().parent if base_dir is None else Path(base_dir)
    return proto, directory, _check_external_files(proto, directory, source), source


_DTYPE_NAMES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
    10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}
_FLOAT_TYPES = {1, 10, 11, 16}
#: onnxruntime's type strings -> numpy dtypes, for checking inputs.
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


def _shape_of(value_info: Any) -> tuple[tuple[int | str | None, ...] | None, int | None]:
    """``(shape, element type)`` of a ValueInfoProto; ``None`` where unknown."""
    t = value_info.type
    if not t.HasField("tensor_type"):
        return None, None
    elem = t.tensor_type.elem_type or None
    if not t.tensor_type.HasField("shape"):
        return None, elem
    dims = tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim
    )
    return dims, elem


# --------------------------------------------------------------------------------------------
# The graph: values, scopes, module calls
# --------------------------------------------------------------------------------------------

_CALL_SUFFIX = re.compile(r"^(.*)_(\d+)$")


def _unqualified_tail(component: str) -> str:
    """The last atom of a TorchScript scope component (``"layer1.0"`` -> ``"0"``, ``"relu"`` -> ``"relu"``)."""
    return component.rsplit(".", 1)[-1]


@dataclass
class _Call:
    """One call of a module in the graph: its nodes (indices, graph order) and output candidates."""

    module: str
    index: int
    nodes: tuple[int, ...]
    outputs: tuple[str, ...]  # candidate output values, best first


@dataclass
class _Graph:
    """What cka reads from a graph: node order, producers and consumers, data-dependent values, types,
    subgraph values and the PyTorch module scope of every node."""

    proto: Any
    exporter: str | None = None
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, set[int]] = field(default_factory=dict)
    data_values: set[str] = field(default_factory=set)
    types: dict[str, tuple[Any, int | None]] = field(default_factory=dict)
    subgraph_values: dict[str, tuple[int, str]] = field(default_factory=dict)
    graph_inputs: list[str] = field(default_factory=list)
    graph_outputs: list[str] = field(default_factory=list)
    # per node: the module path, one (qualified module name, call key) per level, outermost first
    scopes: list[tuple[tuple[str, Any], ...]] = field(default_factory=list)
    precision: str = "float"

    @property
    def nodes(self) -> Any:
        return self.proto.graph.node

    def is_feature(self, value: str) -> bool:
        """A node output that depends on the inputs, of floating type and rank >= 1 where known."""
        if value not in self.data_values:
            return False
        shape, elem = self.types.get(value, (None, None))
        if elem is not None and elem not in _FLOAT_TYPES:
            return False
        return shape is None or len(shape) >= 1


def _analyse(proto: Any, typed: Any, module_names: set[str] | None) -> _Graph:
    """Index ``proto`` (types from the shape-inferred ``typed`` copy) and parse module scopes."""
    g = _Graph(proto=proto)
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    g.graph_inputs = [v.name for v in graph.input if v.name not in initializers]
    g.graph_outputs = [v.name for v in graph.output]
    for vi in [*typed.graph.value_info, *typed.graph.output, *typed.graph.input]:
        g.types[vi.name] = _shape_of(vi)
    data = set(g.graph_inputs)
    float16 = any(t.data_type in (10, 16) for t in graph.initializer)
    quantized = False
    for i, node in enumerate(graph.node):
        quantized |= node.op_type in _QUANTIZED_OPS
        for name in node.input:
            if name:
                g.consumers.setdefault(name, set()).add(i)
        subgraphs = [a for a in node.attribute if a.type in (5, 10)]  # GRAPH, GRAPHS
        depends = any(name in data for name in node.input) or bool(subgraphs)
        for name in node.output:
            if name:
                g.producer[name] = i
                if depends and node.op_type not in _NON_FEATURE_OPS:
                    data.add(name)
        for attribute in subgraphs:
            for sub in [attribute.g] if attribute.type == 5 else list(attribute.graphs):
                for inner in _subgraph_value_names(sub):
                    g.subgraph_values.setdefault(inner, (i, attribute.name))
    g.data_values = data
    g.precision = "quantized" if quantized else ("float16" if float16 else "float")
    g.exporter, g.scopes = _parse_scopes(graph, module_names)
    return g


def _subgraph_value_names(graph: Any) -> Iterator[str]:
    for node in graph.node:
        yield from (name for name in node.output if name)
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.type == 5 else list(attribute.graphs) if attribute.type == 10 else []:
                yield from _subgraph_value_names(sub)


def _parse_scopes(graph: Any, module_names: set[str] | None) -> tuple[str | None, list[tuple[tuple[str, Any], ...]]]:
    """Per node, the PyTorch module path ``((qualified name, call key), ...)``, outermost first.

    dynamo exporter: ``pkg.torch.onnx.name_scopes`` is ``['', 'layer1', 'layer1.0', ..., fx_node]``;
    the call key is ``None`` (calls are separated by position, see :func:`_calls_of`).
    TorchScript exporter: the node name ``/layer1/layer1.0/relu_1/Relu``; a component is the module's
    name from its last non-numeric atom plus ``_k`` for its (k+1)-th call, so the qualified name is the
    parent's plus the component's last atom, and the call key is the path of raw components.
    """
    metadata = [{p.key: p.value for p in node.metadata_props} for node in graph.node]
    if any("pkg.torch.onnx.name_scopes" in m for m in metadata):
        scopes = []
        for m in metadata:
            raw = m.get("pkg.torch.onnx.name_scopes")
            try:
                names = ast.literal_eval(raw) if raw else []
            except (ValueError, SyntaxError):
                names = []
            scopes.append(tuple((name, None) for name in names[1:-1] if name))
        return "dynamo", scopes
    raw_paths = [
        tuple(node.name.split("/")[1:-1]) if node.name.startswith("/") else () for node in graph.node
    ]
    if not any(raw_paths):
        return None, [() for _ in graph.node]
    # A component "x_k" is the (k+1)-th call of "x" when "x" is a sibling scope (the first call has no
    # suffix) and, where the PyTorch module names are known, "parent.x_k" is not itself a module.
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
                candidate = _join(parent, _unqualified_tail(component))
                if module_names is None or candidate not in module_names:
                    base = match.group(1)
            qualified = _join(parent, _unqualified_tail(base))
            if module_names is not None and qualified not in module_names:
                # a module called from outside its parent: find it by its unqualified name
                owners = [m for m in module_names if m == base or m.endswith("." + base)]
                if len(owners) == 1:
                    qualified = owners[0]
            levels.append((qualified, path[: depth + 1]))
            parent = qualified
        scopes.append(tuple(levels))
    return "torchscript", scopes


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _module_names_in(g: _Graph) -> list[str]:
    """Every module that owns at least one node, in order of first appearance."""
    return list(dict.fromkeys(name for scope in g.scopes for name, _ in scope))


def _calls_of(g: _Graph, module: str) -> list[_Call]:
    """The calls of ``module`` in graph order, each with its output candidates."""
    groups: dict[Any, list[int]] = {}
    if g.exporter == "torchscript":
        for i, scope in enumerate(g.scopes):
            for name, key in scope:
                if name == module:
                    groups.setdefault(key, []).append(i)
                    break
        node_groups = sorted(groups.values(), key=lambda nodes: nodes[0])
    else:
        # dynamo: every call shares the scope; a call is a run of the module's nodes that no other
        # data-path node interrupts (ops on shapes and constants do not separate calls)
        member = [any(name == module for name, _ in scope) for scope in g.scopes]
        node_groups, current = [], []
        for i, node in enumerate(g.nodes):
            if member[i]:
                current.append(i)
            elif current and any(g.is_feature(o) for o in node.output if o):
                node_groups.append(current)
                current = []
        if current:
            node_groups.append(current)
    return [_Call(module, k, tuple(nodes), _call_outputs(g, nodes)) for k, nodes in enumerate(node_groups)]


def _call_outputs(g: _Graph, nodes: Sequence[int]) -> tuple[str, ...]:
    """Values computed by ``nodes`` and used outside them (or graph outputs): the call's outputs,
    features only, last produced first (a module's result is computed last). Quantizers count as
    outside, so a quantized graph maps a module to the float value its quantizer reads."""
    # a quantizer inserted after the module (named after its value) reads the module's output, so it
    # counts as outside: the float value it quantizes is the output
    inside = {i for i in nodes if g.nodes[i].op_type not in _QUANTIZERS}
    outputs = []
    for i in nodes:
        for name in g.nodes[i].output:
            if not name or not g.is_feature(name):
                continue
            if name in g.graph_outputs or (g.consumers.get(name, set()) - inside):
                outputs.append(name)
    return tuple(reversed(outputs))


def _label(module: str, call: int) -> str:
    return module if call == 0 else f"{module}{CALL_SEPARATOR}{call}"


def _split_call(name: str) -> tuple[str, int]:
    module, sep, call = name.rpartition(CALL_SEPARATOR)
    if sep and call.isdigit():
        return module, int(call)
    return name, 0


def _close_matches(name: str, names: Sequence[str]) -> list[str]:
    matches = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if not matches:
        tail = name.rsplit(".", 1)[-1].rsplit("/", 1)[-1]
        matches = [n for n in names if tail and tail in n][:5]
    return matches


# --------------------------------------------------------------------------------------------
# The extractor
# --------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """A selected layer: its name, the module call it stands for (if any) and its ONNX value(s)."""

    name: str
    candidates: tuple[str, ...]
    module: str | None = None
    call: int = 0

    @property
    def value(self) -> str:
        return self.candidates[0]


class OnnxModel(FeatureExtractor):
    """An ONNX graph as one side of a comparison, run through onnxruntime.

    Parameters
    ----------
    model : str, os.PathLike or onnx.ModelProto
        The ``.onnx`` file (external data files beside it are found as the exporter wrote them) or a
        loaded model.
    layers : sequence of str, optional
        PyTorch module names (``"layer1.0.conv1"``; ``"layer1.0.relu@1"`` for a second call) and/or ONNX
        value names. Default: in :class:`cka.CKA` next to a PyTorch model, the same names as that model's
        layers; otherwise the outputs of the exported model's repeated blocks (``layers.0``, ``layer1.1``,
        ...), or every candidate value (:meth:`layers`) when the graph carries no module names.
    name : str, optional
        Display name; default the file name without ``.onnx`` (or the graph's name).
    providers : sequence, optional
        onnxruntime execution providers, e.g. ``["CPUExecutionProvider"]`` or
        ``[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]``; default
        :func:`default_providers`.
    session_options : onnxruntime.SessionOptions, optional
        Default: onnxruntime's, with ``session.intra_op.allow_spinning`` off (its threads would spin
        while torch computes the Grams).
    reference : torch.nn.Module, optional
        The PyTorch model the graph was exported from, to check the mapping of module names on the first
        batch (set automatically from the other side of :class:`cka.CKA`).
    inputs : callable, optional
        ``batch -> model inputs``: an array (the only input), a tuple/list (inputs in the graph's order)
        or a dict ``{input name: array}``. Default: a dict batch is read by input name (other keys are
        ignored); a tuple/list batch is ``(inputs, targets, ...)`` as in :class:`cka.CKA`; an array is the
        input. The reference model is called as :class:`cka.CKA` calls it (the torch side's ``inputs=``
        hook, else :func:`cka.frontends.torch.default_inputs`).
    reduce : str or {layer: str}, optional
        An einops reduction (mean) applied to a layer's value before the Gram, as in :class:`cka.CKA`.
    base_dir : path, optional
        Where a ModelProto's external data files are.
    tolerance : float, optional
        Largest relative difference ``||value - module output|| / ||module output||`` that counts as the
        same tensor in the reference check; default by the graph's arithmetic (:data:`MISMATCH_TOLERANCE`).

    Raises
    ------
    FileNotFoundError
        No file, or a missing external data file.
    ValueError
        Not an ONNX model; :class:`OnnxMappingError` for names the graph does not hold (close matches
        listed), values inside If/Loop/Scan subgraphs, and (with the PyTorch model) fused, unmapped or
        mismatched modules; a batch whose shape the graph rejects (expected vs given, batch index).
    TypeError
        A batch whose dtype the graph rejects (expected vs given, batch index).
    """

    def __init__(
        self,
        model: Any,
        layers: Sequence[str] | None = None,
        *,
        name: str | None = None,
        providers: Sequence[Any] | None = None,
        session_options: Any = None,
        reference: Any = None,
        inputs: Callable[[Any], Any] | None = None,
        reduce: str | Mapping[str, str] | None = None,
        base_dir: str | os.PathLike | None = None,
        tolerance: float | None = None,
    ) -> None:
        onnx = _import_onnx()
        if inputs is not None and not callable(inputs):
            raise TypeError(f"inputs must be a callable batch -> model inputs; got {type(inputs).__name__}.")
        if reduce is not None and not isinstance(reduce, (str, Mapping)):
            raise TypeError(f"reduce must be an einops pattern (str) or a dict layer -> pattern; got {type(reduce).__name__}.")
        self._proto, self._directory, self._external, self._source = _load(model, base_dir)
        self._path = Path(model) if isinstance(model, (str, os.PathLike)) else None
        self.name = name if name is not None else (
            self._path.name.removesuffix(".onnx") if self._path is not None else (self._proto.graph.name or "onnx")
        )
        self._typed = _infer_types(onnx, self._proto)
        self._providers = list(providers) if providers is not None else None
        self._session_options = session_options
        self._inputs = inputs
        self._reduce = reduce
        self._tolerance = tolerance
        self.reference = None
        self._reference_inputs: Callable[[Any], Any] | None = None
        self._reference_device: Any = None
        self._graph = _analyse(self._proto, self._typed, None)
        self._calls: dict[str, list[_Call]] = {}
        self._session: Any = None
        self._checked = False
        self._batch_index = 0
        self._layers: list[_Layer] = []
        self._unchecked: list[str] = []
        self._requested = list(layers) if layers is not None else None
        if reference is not None:
            self._set_reference(reference, inputs=None, device=None)
        self._select(self._requested)

    # -- What the graph offers -----------------------------------------------------------------

    @property
    def exporter(self) -> str | None:
        """``"torchscript"`` (``dynamo=False``), ``"dynamo"``, or ``None`` when the graph carries no
        module names."""
        return self._graph.exporter

    @property
    def input_names(self) -> list[str]:
        return list(self._graph.graph_inputs)

    def layers(self) -> list[OnnxValue]:
        """Every value that can be selected: outputs of top-level nodes that depend on the inputs and
        are floating-point tensors (shape-only and constant values left out), in graph order, with the
        PyTorch module call each is the output of, where the graph records it."""
        owners: dict[str, list[str]] = {}
        for module in _module_names_in(self._graph):
            for call in self._module_calls(module):
                if call.outputs:
                    owners.setdefault(call.outputs[0], []).append(_label(module, call.index))
        found = []
        for node in self._graph.nodes:
            for value in node.output:
                if value and self._graph.is_feature(value):
                    shape, elem = self._graph.types.get(value, (None, None))
                    module = ", ".join(owners[value]) if value in owners else None
                    found.append(OnnxValue(value, shape, _DTYPE_NAMES.get(elem) if elem else None, node.op_type, module))
        return found

    def modules(self) -> dict[str, str]:
        """PyTorch module call -> the ONNX value that is its output, for every module the graph records
        (``"layer1.0.relu@1"`` is the second call). Modules with no node of their own (folded, removed)
        are absent."""
        mapping = {}
        for module in _module_names_in(self._graph):
            for call in self._module_calls(module):
                if call.outputs:
                    mapping[_label(module, call.index)] = call.outputs[0]
        return mapping

    # -- FeatureExtractor ----------------------------------------------------------------------

    def fingerprint(self) -> str:
        """SHA-256 of the graph as loaded (its weights when they are inside the file; for external data,
        the graph plus the data files' names and sizes)."""
        import hashlib

        digest = hashlib.sha256(self._proto.SerializeToString() if self._proto.ByteSize() < 2**31 - 1 else b"")
        for location in sorted(_external_locations(self._proto)):
            file = (self._directory or Path(".")) / location
            digest.update(f"{location}:{file.stat().st_size if file.exists() else -1};".encode())
        return f"onnx:{self.name}:{digest.hexdigest()[:32]}:{','.join(self.layer_names())}"

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    def bind(self, *, layers: Any = None, other: FeatureExtractor | None = None) -> None:
        """Take the selection from :class:`cka.CKA` and, when the other side is a PyTorch model, use it as
        the reference for module names (and mirror its layer names when ``layers`` is None)."""
        torch_module = getattr(other, "module", None) if other is not None and other is not self else None
        is_torch = "torch" in sys.modules and isinstance(torch_module, sys.modules["torch"].nn.Module)
        torch_side = other if is_torch else None
        if torch_side is not None and self.reference is None:
            self._set_reference(
                torch_side.module,
                inputs=getattr(torch_side, "_inputs", None),
                device=torch_side.input_device() if hasattr(torch_side, "input_device") else None,
            )
        if layers is None and self._requested is None and torch_side is not None:
            layers = torch_side.layer_names()
        if layers is not None:
            if isinstance(layers, str) or not isinstance(layers, Iterable):
                raise TypeError(
                    f"model2_layers / layers for an ONNX model must be a list of module or value names; got {layers!r}."
                )
            self._requested = list(layers)
        self._select(self._requested)

    def features(self, batch: Any) -> dict[str, Array]:
        """Selected layer -> value for one batch (torch tensors through DLPack when torch is loaded,
        else numpy arrays), after the optional reduction, from one onnxruntime run."""
        values = self._run(batch)
        return {layer.name: values[i] for i, layer in enumerate(self._layers)}

    def grams(self, batch: Any, gram_fn: Callable[[Array], Array]) -> list[Array]:
        """One Gram per selected layer from one onnxruntime run; each value is dropped once its Gram exists."""
        values = self._run(batch)
        grams = []
        with _no_grad():
            for i in range(len(values)):
                grams.append(gram_fn(values[i]))
                values[i] = None
        return grams

    def __enter__(self) -> "OnnxModel":
        self._ensure_session()
        self._batch_index = 0
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None

    def __repr__(self) -> str:
        return (
            f"OnnxModel({self._source}, exporter={self.exporter}, inputs={self.input_names}, "
            f"layers={self.layer_names()})"
        )

    # -- Selection -----------------------------------------------------------------------------

    def _set_reference(self, module: Any, inputs: Callable[[Any], Any] | None, device: Any) -> None:
        import torch

        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"reference must be the torch.nn.Module the graph was exported from; got {type(module).__name__}.")
        self.reference = module
        self._reference_inputs = inputs
        self._reference_device = device
        names = {n for n, _ in module.named_modules() if n}
        self._graph = _analyse(self._proto, self._typed, names)
        self._calls = {}
        self._checked = False

    def _module_calls(self, module: str) -> list[_Call]:
        if module not in self._calls:
            self._calls[module] = _calls_of(self._graph, module)
        return self._calls[module]

    def _default_layers(self) -> list[str]:
        """The outputs of the exported model's repeated blocks (modules named by a number, such as
        ``layers.0`` or ``layer1.1``, that own submodules; outermost only), as in
        :func:`cka.frontends.torch.default_layers`; every candidate value when there are none."""
        modules = _module_names_in(self._graph)
        parents = {m.rsplit(".", 1)[0] for m in modules if "." in m} | {
            name for m in modules for name in [m] if any(o.startswith(m + ".") for o in modules)
        }
        blocks = [m for m in modules if _unqualified_tail(m).isdigit() and m in parents]
        outermost = [b for b in blocks if not any(b.startswith(o + ".") for o in blocks)]
        outermost = [b for b in outermost if any(c.outputs for c in self._module_calls(b))]
        return outermost or [v.name for v in self.layers()]

    def _select(self, requested: Sequence[str] | None) -> None:
        """Resolve names to values; raise one :class:`OnnxMappingError` listing every name that fails."""
        names = list(requested) if requested is not None else self._default_layers()
        if not names:
            raise ValueError(f"{self.name}: the layer selection is empty; select at least one layer, or pass None for the default.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"{self.name}: layers {duplicates} are selected more than once; each may appear once.")
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"{self.name}: ONNX layers are selected by name (str); got {n!r} of type {type(n).__name__}.")
        graph_modules = set(_module_names_in(self._graph))
        torch_modules = (
            {n: type(m).__name__ for n, m in self.reference.named_modules() if n} if self.reference is not None else {}
        )
        values = {v for v in self._graph.data_values if v in self._graph.producer}
        layers, problems, unchecked = [], [], []
        for name in names:
            module, call = _split_call(name)
            if module in graph_modules or module in torch_modules:
                calls = self._module_calls(module) if module in graph_modules else []
                if call < len(calls) and calls[call].outputs:
                    layers.append(_Layer(name, calls[call].outputs, module, call))
                    if self.reference is None:
                        unchecked.append(name)
                    continue
                problems.append(MappingProblem(name, "unmapped", self._unmapped_reason(module, call, calls, torch_modules)))
            elif name in values:
                layers.append(_Layer(name, (name,)))
            elif name in self._graph.subgraph_values:
                problems.append(MappingProblem(name, "subgraph", self._subgraph_reason(name)))
            elif name in self._graph.graph_inputs:
                problems.append(MappingProblem(name, "unknown", "it is a graph input, not a computed value; inputs are the data you feed."))
            else:
                pool = sorted(graph_modules | set(torch_modules) | values)
                matches = _close_matches(name, pool)
                hint = f"close matches: {matches}" if matches else f"for example: {sorted(graph_modules)[:6] or sorted(values)[:6]}"
                problems.append(MappingProblem(
                    name, "unknown",
                    f"neither a PyTorch module recorded in the graph nor an ONNX value; {hint}. List the candidates "
                    f"with OnnxModel.layers() (values) and OnnxModel.modules() (module names)."
                    + ("" if self.reference is not None else
                       " A module without a node of its own was folded (BatchNorm) or removed (Dropout) by the "
                       "exporter; pass reference=<the PyTorch model> to have it named as such."),
                ))
        if problems:
            raise OnnxMappingError(problems, self.name)
        if isinstance(self._reduce, Mapping):
            unknown = [k for k in self._reduce if k not in names]
            if unknown:
                raise ValueError(
                    f"{self.name}: reduce names layer(s) {unknown} that are not selected; selected: {names}."
                )
        self._layers = layers
        self._unchecked = unchecked
        self._session = None
        self._checked = False

    def _unmapped_reason(self, module: str, call: int, calls: Sequence[_Call], torch_modules: Mapping[str, str]) -> str:
        type_name = torch_modules.get(module, "")
        kind = f" ({type_name})" if type_name else ""
        if not calls:
            if type_name.startswith("BatchNorm"):
                why = (
                    "the exporter folded this BatchNorm into the preceding Conv, whose value therefore holds conv+BN "
                    "(TorchScript exporter); select the module after it (e.g. the activation) or the block"
                )
            elif type_name.startswith(("Conv", "Linear")) and self.exporter == "dynamo" and self._sibling_batchnorm(module, torch_modules):
                why = (
                    "the dynamo exporter fused it with the BatchNorm after it and filed the fused op under that "
                    "BatchNorm, which maps to conv+BN; select the BatchNorm or the activation after it"
                )
            elif type_name in ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "Identity", "Flatten"):
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
                f"the graph holds {len(calls)} call(s) of {module!r} (names {[_label(module, c.index) for c in calls]}), "
                f"so there is no call {call}; an optimiser may have merged or removed calls."
            )
        return f"call {call} of {module!r} computes no floating-point value used outside it (nodes {[self._graph.nodes[i].name for i in calls[call].nodes][:4]})."

    def _sibling_batchnorm(self, module: str, torch_modules: Mapping[str, str]) -> bool:
        """Whether a BatchNorm next to ``module`` (same parent) owns nodes: where dynamo files a fused Conv."""
        parent = module.rsplit(".", 1)[0] if "." in module else ""
        graph_modules = set(_module_names_in(self._graph))
        return any(
            kind.startswith("BatchNorm") and name in graph_modules
            and (name.rsplit(".", 1)[0] if "." in name else "") == parent
            for name, kind in torch_modules.items()
        )

    def _subgraph_reason(self, name: str) -> str:
        index, attribute = self._graph.subgraph_values[name]
        node = self._graph.nodes[index]
        outputs = [o for o in node.output if o]
        inputs = [i for i in node.input if i and i in self._graph.data_values]
        return (
            f"it is computed inside the {attribute!r} subgraph of the {node.op_type} node {node.name!r}; onnxruntime "
            f"returns top-level values only. Nearest top-level values: the {node.op_type}'s outputs {outputs}"
            + (f", or its inputs {inputs}" if inputs else "") + "."
        )

    # -- Session -------------------------------------------------------------------------------

    def _output_names(self) -> list[str]:
        return list(dict.fromkeys(v for layer in self._layers for v in layer.candidates))

    def _ensure_session(self) -> Any:
        if self._session is None:
            if self._unchecked and self.reference is None:
                warnings.warn(
                    f"{self.name}: layers {self._unchecked} were mapped from PyTorch module names without the PyTorch "
                    f"model, so the mapped values are not checked (an exporter may have folded a neighbour into "
                    f"them, e.g. BatchNorm into Conv). Pass reference=<the PyTorch model>, or compare next to it "
                    f"in CKA, to check them.",
                    UncheckedMappingWarning,
                    stacklevel=4,
                )
            self._session = self._make_session(self._output_names())
        return self._session

    def _make_session(self, outputs: Sequence[str]) -> Any:
        """An onnxruntime session of the graph with ``outputs`` as its outputs (nothing else), made from an
        edited copy that never replaces the original file."""
        ort = _import_ort()
        _warn_if_several_distributions(installed_onnxruntime_distributions())
        providers = self._providers if self._providers is not None else default_providers(ort.get_available_providers())
        options = self._session_options
        if options is None:
            options = ort.SessionOptions()
            # onnxruntime's intra-op threads spin for a while after each run, taking the CPU from the
            # Gram products that follow it; without spinning the ONNX path ran 10% faster on 2 cores
            # (benchmarks/onnx_bench.py)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        with _with_outputs(self._proto, self._typed, outputs) as edited:
            with self._model_source(edited) as source:
                session = ort.InferenceSession(source, sess_options=options, providers=providers)
        _check_session_providers(providers, session)
        self._on_cuda = "CUDAExecutionProvider" in session.get_providers()
        self._device_id = _device_id(providers) if self._on_cuda else 0
        self._session_inputs = {i.name: i for i in session.get_inputs()}
        return session

    @contextlib.contextmanager
    def _model_source(self, edited: Any) -> Iterator[Any]:
        """What to create the session from: the serialized bytes (in memory) when the model is small and
        self-contained, else a temporary file removed right after the session exists.

        External data: the edited graph goes beside the original, so its relative references to the
        weight files still resolve. A loaded model over 2 GB: a temporary directory with its own copy.
        """
        if self._external:
            try:
                descriptor, temp = tempfile.mkstemp(prefix=".cka-", suffix=".onnx", dir=self._directory)
            except OSError as error:
                raise PermissionError(
                    f"{self._source} keeps its weights in {sorted(_external_locations(self._proto))}; cka creates the "
                    f"session from an edited copy of the graph written for a moment next to them, in "
                    f"{str(self._directory)!r}, which failed ({error}). Copy the .onnx file and its data file(s) to a "
                    f"writable directory."
                ) from None
            try:
                with os.fdopen(descriptor, "wb") as f:
                    f.write(edited.SerializeToString())
                yield temp
            finally:
                os.unlink(temp)
        elif edited.ByteSize() > _PROTOBUF_LIMIT:
            onnx = _import_onnx()
            with tempfile.TemporaryDirectory(prefix="cka-onnx-") as directory:
                path = os.path.join(directory, "model.onnx")
                onnx.save_model(edited, path, save_as_external_data=True, location="model.onnx.data")
                # save_model moved the weights out of the proto: put them back
                onnx.load_external_data_for_model(edited, directory)
                yield path
        else:
            yield edited.SerializeToString()

    # -- Running -------------------------------------------------------------------------------

    def _run(self, batch: Any) -> list[Array]:
        """One onnxruntime run for ``batch``; the selected layers' values (reduced), in order."""
        session = self._ensure_session()
        index = self._batch_index
        self._batch_index += 1
        feeds = self._feeds(batch, index)
        binding = session.io_binding()
        for name, array in feeds.items():  # bound in place: feeds keeps the arrays alive for the run
            self._bind_input(binding, name, array)
        device = "cuda" if self._on_cuda else "cpu"
        names = self._output_names()
        for name in names:
            binding.bind_output(name, device, self._device_id if self._on_cuda else 0)
        try:
            session.run_with_iobinding(binding)
        except Exception as error:
            shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in feeds.items()}
            raise RuntimeError(
                f"{self.name}: onnxruntime failed on batch {index} with inputs {shapes}: {error}"
            ) from None
        outputs = dict(zip(names, binding.get_outputs()))
        if self.reference is not None and not self._checked and any(l.module is not None for l in self._layers):
            self._check_against_reference(batch, {n: _to_numpy(v) for n, v in outputs.items()})
        values = []
        for layer in self._layers:
            value = _to_array(outputs[layer.value])
            if self._reduce is not None:
                value = self._apply_reduce(layer.name, value)
            values.append(value)
        return values

    def _apply_reduce(self, layer: str, value: Array) -> Array:
        pattern = self._reduce if isinstance(self._reduce, str) else self._reduce.get(layer)
        if pattern is None:
            return value
        from einops import reduce

        try:
            return reduce(value, pattern, "mean")
        except Exception as error:  # einops.EinopsError: re-raise with the layer and shape
            raise ValueError(
                f"layer {layer!r}: reduce pattern {pattern!r} does not fit its value of shape {tuple(value.shape)}: {error}"
            ) from None

    def _feeds(self, batch: Any, index: int) -> dict[str, Any]:
        """``{input name: array}`` for ``batch``, each checked against the input's type and shape."""
        names = self.input_names
        value = self._inputs(batch) if self._inputs is not None else batch
        if self._inputs is None and isinstance(value, (tuple, list)):
            if not value:
                raise ValueError(f"{self.name}: batch {index} is an empty tuple/list; expected (inputs, targets, ...).")
            if len(names) == 1 or isinstance(value[0], (Mapping, tuple, list)):
                value = value[0]
            else:
                value = value[: len(names)]
        if isinstance(value, Mapping):
            missing = [n for n in names if n not in value]
            if missing:
                hints = {n: _close_matches(n, [str(k) for k in value]) for n in missing}
                raise ValueError(
                    f"{self.name}: batch {index} has no entry for input(s) {missing} (given keys {list(value)}; "
                    f"close matches {hints}); the graph's inputs are {names}. Name the batch's keys after them, or pass "
                    f"inputs=<batch -> dict>."
                )
            feeds = {n: value[n] for n in names}
        elif isinstance(value, (tuple, list)):
            if len(value) != len(names):
                raise ValueError(
                    f"{self.name}: batch {index} gives {len(value)} inputs but the graph takes {len(names)} ({names}); pass "
                    f"a dict {{input name: array}} or inputs=<batch -> inputs>."
                )
            feeds = dict(zip(names, value))
        else:
            if len(names) != 1:
                raise ValueError(
                    f"{self.name}: batch {index} is a single array but the graph takes {len(names)} inputs ({names}); "
                    f"pass a dict {{input name: array}} per batch."
                )
            feeds = {names[0]: value}
        return {n: self._check_input(n, a, index) for n, a in feeds.items()}

    def _check_input(self, name: str, array: Any, index: int) -> Any:
        """The array as numpy (or a contiguous CUDA tensor for a CUDA session); a clear error when its
        dtype or shape is not what input ``name`` takes."""
        spec = self._session_inputs[name]
        if "torch" in sys.modules and isinstance(array, sys.modules["torch"].Tensor):
            tensor = array.detach()
            if not (self._on_cuda and tensor.is_cuda):
                tensor = tensor.cpu()
            given_dtype, shape = str(tensor.dtype).replace("torch.", ""), tuple(tensor.shape)
            converted = tensor.contiguous() if tensor.is_cuda else tensor.contiguous().numpy()
        else:
            converted = np.ascontiguousarray(np.asarray(array))
            given_dtype, shape = str(converted.dtype), converted.shape
        expected = _ORT_TYPES.get(spec.type)
        if expected is not None and given_dtype != np.dtype(expected).name:
            raise TypeError(
                f"{self.name}: batch {index}, input {name!r}: the graph expects {np.dtype(expected).name} "
                f"({spec.type}) but the batch gives {given_dtype}; convert it (x.float() in torch, "
                f"x.astype(numpy.{np.dtype(expected).name}) in numpy) or with inputs=<batch -> inputs>."
            )
        dims = spec.shape
        if dims is not None and (len(dims) != len(shape) or any(
            isinstance(d, int) and d != s for d, s in zip(dims, shape)
        )):
            shown = tuple(d if isinstance(d, int) else (d or "?") for d in dims)
            raise ValueError(
                f"{self.name}: batch {index}, input {name!r}: the graph expects shape {shown} (names: any size) but the "
                f"batch gives {shape}."
            )
        return converted

    def _bind_input(self, binding: Any, name: str, array: Any) -> None:
        """Bind a numpy array (CPU) or a contiguous CUDA tensor (CUDA session) to input ``name``, no copy."""
        if isinstance(array, np.ndarray):
            binding.bind_cpu_input(name, array)
        else:  # a contiguous CUDA tensor, bound in place
            binding.bind_input(
                name, "cuda", array.device.index or 0, _numpy_dtype_of(array), tuple(array.shape), array.data_ptr()
            )

    # -- The reference check -------------------------------------------------------------------

    def _check_against_reference(self, batch: Any, outputs: Mapping[str, np.ndarray]) -> None:
        """Run the PyTorch model on ``batch`` and check each module-mapped layer's value against the
        module's output in that call (choosing, where a call has several candidate values, the one that
        matches). A value is *fused* when it is closer to the output of a module that ran on this
        module's output and has no node of its own than to this module's output; *mismatched* when it
        differs from the module's output by more than the tolerance."""
        graph_modules = set(_module_names_in(self._graph))
        selected = {layer.module for layer in self._layers if layer.module is not None}
        record = _trace_reference(
            self.reference, batch, self._reference_call_inputs(), self._reference_device, selected, graph_modules
        )
        tolerance = self._tolerance if self._tolerance is not None else MISMATCH_TOLERANCE[self._graph.precision]
        problems = []
        for i, layer in enumerate(self._layers):
            if layer.module is None:
                continue
            calls = record.calls.get(layer.module, [])
            if layer.call >= len(calls):
                problems.append(MappingProblem(
                    layer.name, "unmapped",
                    f"the PyTorch module ran {len(calls)} time(s) on the first batch, so it has no call {layer.call}.",
                ))
                continue
            expected = calls[layer.call].output
            if expected is None:
                problems.append(MappingProblem(layer.name, "unmapped", "the PyTorch module's output holds no tensor to compare."))
                continue
            difference, best = min((_relative_difference(outputs[c], expected), c) for c in layer.candidates)
            value = outputs[best]
            folded = self._folded_into(value, difference, record.followers.get((layer.module, layer.call), []))
            if folded:
                problems.append(MappingProblem(
                    layer.name, "fused",
                    f"its ONNX value {best!r} also holds {folded}: that module ran on this module's output in PyTorch, "
                    f"has no node of its own, and the value matches its output, not this module's (relative "
                    f"difference {difference:.3g}).",
                ))
            elif difference > tolerance or math.isnan(difference):
                what = (
                    f"shape {tuple(value.shape)} vs the module's {tuple(expected.shape)}"
                    if tuple(value.shape) != tuple(expected.shape)
                    else f"relative difference {difference:.3g} > {tolerance:g} (tolerance for a {self._graph.precision} graph)"
                )
                problems.append(MappingProblem(
                    layer.name, "mismatched", f"its ONNX value {best!r} is not the module's output on the first batch: {what}.",
                ))
            else:
                others = tuple(c for c in layer.candidates if c != best)
                self._layers[i] = _Layer(layer.name, (best, *others), layer.module, layer.call)
        if problems:
            raise OnnxMappingError(problems, self.name)
        self._checked = True

    @staticmethod
    def _folded_into(value: np.ndarray, difference: float, followers: Sequence[_ModuleCall]) -> str | None:
        """The follower chain (``"'stem.1' (BatchNorm2d)"``) whose output ``value`` matches clearly better
        than the module's own output (relative difference ``difference``), if any."""
        if difference <= MISMATCH_TOLERANCE["float"]:
            return None  # the value is the module's output (to float32 rounding): nothing was folded in
        chain = []
        for follower in followers:
            chain.append(f"{follower.name!r} ({follower.type_name})")
            if _relative_difference(value, follower.output) < 0.5 * difference:
                return " and ".join(chain)
        return None

    def _reference_call_inputs(self) -> Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]]:
        """``batch -> (args, kwargs)`` for the PyTorch model: the other side's ``inputs=`` hook when
        bound through :class:`cka.CKA`, else :func:`cka.frontends.torch.default_inputs`."""
        from cka.frontends._common import call_arguments, default_inputs

        user = self._reference_inputs
        if user is not None:
            return lambda batch: call_arguments(user(batch))
        return default_inputs


# --------------------------------------------------------------------------------------------
# Helpers: editing the graph, arrays, the reference trace
# --------------------------------------------------------------------------------------------


def _infer_types(onnx: Any, proto: Any) -> Any:
    """A shape-inferred copy of the graph, for value types and shapes (the weights are left out of the
    copy for models over 64 MB: inference needs their dims only); the graph itself when inference fails
    (types are then unknown, and nothing else changes)."""
    if proto.ByteSize() > 64 * 2**20:
        light = onnx.ModelProto()
        _copy_without_weights(proto, light)
    else:
        light = proto
    try:
        return onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as error:  # inference is best effort: shapes decorate layers(), outputs stay untyped
        warnings.warn(f"ONNX shape inference failed ({error}); value shapes and types are unknown.", UserWarning, stacklevel=3)
        return light


def _copy_without_weights(proto: Any, target: Any) -> None:
    """Copy ``proto`` into ``target`` with the initializers' data dropped (dims and types kept)."""
    graph = proto.graph
    initializers = list(graph.initializer)
    del graph.initializer[:]
    try:
        target.CopyFrom(proto)
    finally:
        graph.initializer.extend(initializers)
    for tensor in initializers:
        stub = target.graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = 1  # EXTERNAL: a typed placeholder whose bytes are not here
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "cka-shape-inference-only"


@contextlib.contextmanager
def _with_outputs(proto: Any, typed: Any, outputs: Sequence[str]) -> Iterator[Any]:
    """``proto`` with exactly ``outputs`` as graph outputs (typed where inference knows them), edited in
    place and restored on exit: no copy of the weights, and the caller's model is left as it was."""
    onnx = _import_onnx()
    known = {vi.name: vi for vi in [*typed.graph.value_info, *typed.graph.output]}
    original = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in proto.graph.output]
    existing = {o.name: o for o in original}
    del proto.graph.output[:]
    for name in outputs:
        info = existing.get(name) or known.get(name) or onnx.ValueInfoProto(name=name)
        proto.graph.output.append(info)
    try:
        yield proto
    finally:
        del proto.graph.output[:]
        proto.graph.output.extend(original)


def _no_grad() -> contextlib.AbstractContextManager[Any]:
    """``torch.inference_mode()`` when torch is loaded (features are inference tensors, as the torch
    frontend's, and its Gram buffers may be too), else nothing."""
    if "torch" in sys.modules:
        return sys.modules["torch"].inference_mode()
    return contextlib.nullcontext()


def _device_id(providers: Sequence[Any]) -> int:
    for provider in providers:
        if _provider_name(provider) == "CUDAExecutionProvider" and isinstance(provider, (tuple, list)):
            return int(dict(provider[1]).get("device_id", 0))
    return 0


def _numpy_dtype_of(tensor: Any) -> Any:
    """The numpy scalar type (``numpy.float32``) of a torch tensor, as onnxruntime's binding takes it."""
    return np.dtype(str(tensor.dtype).replace("torch.", "")).type


def _to_array(ort_value: Any) -> Array:
    """An onnxruntime output as a torch tensor without a copy (DLPack) when torch is loaded, else numpy."""
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        try:
            return torch.utils.dlpack.from_dlpack(ort_value._ortvalue.to_dlpack())
        except (AttributeError, RuntimeError, TypeError, BufferError):  # builds without DLPack
            return torch.from_numpy(ort_value.numpy())
    return ort_value.numpy()


def _to_numpy(ort_value: Any) -> np.ndarray:
    return ort_value.numpy()


def _relative_difference(value: np.ndarray, expected: np.ndarray) -> float:
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
class _ModuleCall:
    """One call of a PyTorch module in the probe run."""

    name: str
    type_name: str
    output: np.ndarray | None  # kept for selected calls and their folded followers only


@dataclass
class _Record:
    """What the probe run of the PyTorch model saw: the calls of the selected modules, in order, and for
    each of them the chain of *followers*: modules that ran directly on its output, changed it, and own
    no node in the graph (candidates for having been folded into its value, e.g. BatchNorm into Conv)."""

    calls: dict[str, list[_ModuleCall]]
    followers: dict[tuple[str, int], list[_ModuleCall]]


def _tensor_key(value: Any) -> Any:
    """Identity of a tensor's contents: storage pointer, shape, strides, dtype."""
    if value is None:
        return None
    return (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)


def _as_numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().float().cpu().numpy().copy()


def _trace_reference(
    model: Any, batch: Any, call_inputs: Callable[[Any], Any], device: Any, selected: set[str], graph_modules: set[str]
) -> _Record:
    """Run ``model`` once on ``batch`` (eval and inference mode; training flags restored, hooks removed)
    with hooks on every module, recording the outputs of the ``selected`` modules' calls and of their
    followers (see :class:`_Record`)."""
    import torch

    from cka.frontends._common import first_tensor, module_device, to_device

    calls: dict[str, list[_ModuleCall]] = {}
    followers: dict[tuple[str, int], list[_ModuleCall]] = {}
    watched: dict[Any, tuple[str, int]] = {}  # output identity -> the selected call it came from
    pending: dict[int, list[Any]] = {}

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, kwargs: Any = None) -> None:
            tensor = first_tensor(args) if args else (first_tensor(kwargs) if kwargs else None)
            key = _tensor_key(tensor)
            # a module without nodes that runs on a watched output: keep its input to see if it changes it
            copy = tensor.detach().clone() if key in watched and name not in graph_modules else None
            pending.setdefault(id(module), []).append((key, copy))
        return hook

    def post_hook(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            key, before = pending[id(module)].pop()
            tensor = first_tensor(output)
            out_key = _tensor_key(tensor)
            if name in selected:
                call = _ModuleCall(name, type(module).__name__, _as_numpy(tensor) if tensor is not None else None)
                calls.setdefault(name, []).append(call)
                if tensor is not None:
                    watched[out_key] = (name, len(calls[name]) - 1)
            if before is not None and tensor is not None and key in watched:
                changes = tensor.shape != before.shape or not torch.equal(tensor, before)
                if changes:
                    root = watched[key]
                    followers.setdefault(root, []).append(_ModuleCall(name, type(module).__name__, _as_numpy(tensor)))
                    watched[out_key] = root
        return hook

    training = {m: m.training for m in model.modules()}
    handles = []
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
                handles.append(module.register_forward_hook(post_hook(name)))
        model.eval()
        args, kwargs = call_inputs(batch)
        target = device if device is not None else module_device(model)
        args, kwargs = to_device(args, target), to_device(kwargs, target)
        with torch.inference_mode():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag
    return _Record(calls, followers)
