"""Getting an ONNX model in and out of memory: loading, external data, >2 GB, typed and edited copies.

* :func:`load` reads a ``.onnx`` file without its external data (the weights stay on disk until
  onnxruntime maps them) or takes a ``ModelProto``, and checks that every external data file exists.
* :func:`infer_types` types the values by onnx's shape inference, on a copy without the large weights.
* :func:`with_outputs` sets the graph outputs to the selected values in place and restores them after.
* :func:`model_source` is what a session is created from: the serialized bytes of a small
  self-contained model, else a temporary file (beside the original for external data, so that its
  relative references still resolve; in a temporary directory for an in-memory model over 2 GB),
  removed as soon as the session exists.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

__all__ = [
    "PROTOBUF_LIMIT",
    "external_locations",
    "infer_types",
    "load",
    "model_source",
    "with_outputs",
]

#: Largest protobuf message: a model beyond it cannot be serialised in one piece.
PROTOBUF_LIMIT = onnx.checker.MAXIMUM_PROTOBUF
#: Models over this size are typed on a copy without their large weights (inference needs their dims only).
_LIGHT_COPY_OVER = 64 * 2**20
#: Initializers up to this size stay in the light copy: shape constants, which data propagation reads.
_KEEP_INITIALIZERS_UP_TO = 4096


def _tensors(graph: onnx.GraphProto | onnx.FunctionProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a graph: initializers and attribute tensors, subgraphs included."""
    yield from getattr(graph, "initializer", ())
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _tensors(sub)


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model (graph and functions) whose data lives in an external file."""
    for graph in [model.graph, *model.functions]:
        yield from (t for t in _tensors(graph) if uses_external_data(t))


def external_locations(model: onnx.ModelProto) -> dict[str, list[str]]:
    """External data file -> names of the tensors stored in it."""
    files: dict[str, list[str]] = {}
    for tensor in _external_tensors(model):
        files.setdefault(ExternalDataInfo(tensor).location, []).append(tensor.name)
    return files


def _check_external_files(model: onnx.ModelProto, base_dir: Path, source: str) -> bool:
    """Whether ``model`` stores tensors externally; a clear error if a referenced file is missing."""
    files = external_locations(model)
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


def load(model: Any, base_dir: str | os.PathLike[str] | None) -> tuple[onnx.ModelProto, Path | None, bool, str]:
    """``(proto, directory of the file, stores weights externally, display source)`` for a path or a
    ``ModelProto``; a path is read without its external data.

    Raises
    ------
    TypeError
        Neither a path nor a ``ModelProto``.
    FileNotFoundError
        No such file, or a missing external data file.
    ValueError
        The file is not an ONNX model; a ``ModelProto`` with external data but no ``base_dir``.
    """
    if isinstance(model, onnx.ModelProto):
        source = "the given ModelProto"
        directory = Path(base_dir) if base_dir is not None else None
        if any(True for _ in _external_tensors(model)):
            if directory is None:
                raise ValueError(
                    f"{source} references external data files {sorted(external_locations(model))} but cka cannot "
                    f"tell where they are; pass the path of the .onnx file instead (OnnxModel('model.onnx')), or "
                    f"base_dir= the directory holding them."
                )
            return model, directory, _check_external_files(model, directory, source), source
        return model, directory, False, source
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"OnnxModel takes a path to a .onnx file or an onnx.ModelProto; got {type(model).__module__}."
            f"{type(model).__qualname__}."
        )
    path = Path(model)
    source = repr(str(path))
    if not path.is_file():
        raise FileNotFoundError(
            f"no ONNX model at {str(path)!r}" + (" (it is a directory)" if path.is_dir() else "") + "."
        )
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends: the file is not a ModelProto
        raise ValueError(
            f"{source} is not an ONNX model: it does not parse as an onnx.ModelProto ({type(error).__name__}: "
            f"{error}). Pass a file written by torch.onnx.export or onnx.save."
        ) from None
    if (
        not proto.HasField("graph")
        or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0)
        or proto.ir_version <= 0
    ):
        raise ValueError(
            f"{source} is not an ONNX model: it parsed as protobuf but holds no ONNX graph (ir_version "
            f"{proto.ir_version}, {len(proto.graph.node)} nodes). Pass a file written by torch.onnx.export or onnx.save."
        )
    directory = path.resolve().parent if base_dir is None else Path(base_dir)
    return proto, directory, _check_external_files(proto, directory, source), source


# --------------------------------------------------------------------------------------------
# Copies: typed, light, with other outputs
# --------------------------------------------------------------------------------------------


def infer_types(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A shape-inferred copy of the graph, for value types and shapes (``onnx.shape_inference.infer_shapes``
    with data propagation, not strict); the graph itself when inference fails (types are then unknown,
    and nothing else changes).

    A model over 64 MB is typed on a light copy (:func:`_copy_without_weights`): inference needs the
    weights' dims, not their bytes, so its memory stays that of the graph.
    """
    light = proto if proto.ByteSize() <= _LIGHT_COPY_OVER else _copy_without_weights(proto)
    try:
        return onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as error:  # best effort (InferenceError, ValidationError, ...): outputs stay untyped
        warnings.warn(
            f"ONNX shape inference failed ({error}); value shapes and types are unknown.", UserWarning, stacklevel=3
        )
        return light


def _copy_without_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose large initializers are typed placeholders: dims and type kept, bytes
    replaced by an external-data reference to a file that does not exist (never read: inference only
    reads tensor data for data propagation, which small initializers, kept, serve)."""
    graph = proto.graph
    initializers = list(graph.initializer)
    del graph.initializer[:]
    target = onnx.ModelProto()
    try:
        target.CopyFrom(proto)
    finally:
        graph.initializer.extend(initializers)
    for tensor in initializers:
        if tensor.ByteSize() <= _KEEP_INITIALIZERS_UP_TO:
            target.graph.initializer.append(tensor)
            continue
        stub = target.graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="cka-shape-inference-only")
    return target


@contextlib.contextmanager
def with_outputs(proto: onnx.ModelProto, typed: onnx.ModelProto, outputs: Sequence[str]) -> Iterator[onnx.ModelProto]:
    """``proto`` with exactly ``outputs`` as graph outputs (typed where inference knows them), edited in
    place and restored on exit: no copy of the weights, and the caller's model is left as it was."""
    known = {vi.name: vi for vi in [*typed.graph.value_info, *typed.graph.output]}
    original = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in proto.graph.output]
    existing = {o.name: o for o in original}
    del proto.graph.output[:]
    for name in outputs:
        proto.graph.output.append(existing.get(name) or known.get(name) or onnx.ValueInfoProto(name=name))
    try:
        yield proto
    finally:
        del proto.graph.output[:]
        proto.graph.output.extend(original)


@contextlib.contextmanager
def model_source(edited: onnx.ModelProto, external: bool, directory: Path | None, source: str) -> Iterator[bytes | str]:
    """What to create the session from: the serialized bytes (in memory) when the model is small and
    self-contained, else the path of a temporary file removed on exit.

    External data (``external``): the edited graph goes beside the original, in ``directory``, so that
    its relative references to the weight files still resolve. A loaded model over 2 GB: a temporary
    directory with its own copy (its weights are put back into ``edited`` afterwards).
    """
    if external:
        try:
            descriptor, temp = tempfile.mkstemp(prefix=".cka-", suffix=".onnx", dir=directory)
        except OSError as error:
            raise PermissionError(
                f"{source} keeps its weights in {sorted(external_locations(edited))}; cka creates the "
                f"session from an edited copy of the graph written for a moment next to them, in "
                f"{str(directory)!r}, which failed ({error}). Copy the .onnx file and its data file(s) to a "
                f"writable directory."
            ) from None
        try:
            with os.fdopen(descriptor, "wb") as f:
                f.write(edited.SerializeToString())
            yield temp
        finally:
            os.unlink(temp)
    elif edited.ByteSize() > PROTOBUF_LIMIT:
        with tempfile.TemporaryDirectory(prefix="cka-onnx-") as temp_dir:
            path = os.path.join(temp_dir, "model.onnx")
            onnx.save_model(edited, path, save_as_external_data=True, location="model.onnx.data")
            # save_model moved the weights out of the proto: put them back
            onnx.load_external_data_for_model(edited, temp_dir)
            yield path
    else:
        yield edited.SerializeToString()
