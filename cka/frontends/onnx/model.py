"""OnnxModel: an ONNX graph as one side of a comparison, orchestrating the package's parts.

Loading and the edited copy (:mod:`~cka.frontends.onnx.loading`), the graph index
(:mod:`~cka.frontends.onnx.graph`), module names (:mod:`~cka.frontends.onnx.naming`), the onnxruntime
session (:mod:`~cka.frontends.onnx.runtime`) and the probe check against the PyTorch model
(:mod:`~cka.frontends.onnx.probe`) each live in their own module; this one wires them to the
:class:`~cka.frontends.base.FeatureExtractor` interface.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from cka.frontends._common import (
    GramStack,
    is_pattern,
    per_layer,
    reduce_features,
    select_names,
)
from cka.frontends.base import FeatureExtractor
from cka.frontends.onnx import loading, probe
from cka.frontends.onnx.errors import UncheckedMappingWarning
from cka.frontends.onnx.graph import OnnxValue, index, numpy_dtype
from cka.frontends.onnx.naming import Layer, ModuleMap, resolve
from cka.frontends.onnx.runtime import (
    InputSpec,
    Session,
    check_input,
    feeds_from_batch,
    loaded_torch,
    no_grad,
    to_array,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["OnnxModel", "SelectableLayer"]

Array = Any


class SelectableLayer(NamedTuple):
    """A name :class:`OnnxModel` accepts in ``layers=`` (see :meth:`OnnxModel.available_layers`):
    ``kind`` is ``"module"`` (a PyTorch module call, ``"layer1.0.relu@1"``) or ``"value"`` (a raw ONNX
    value name); ``value`` is the ONNX value it reads (for a value, its own name)."""

    name: str
    kind: str
    value: str


class OnnxModel(FeatureExtractor):
    """An ONNX graph as one side of a comparison, run through onnxruntime.

    Parameters
    ----------
    model : str, os.PathLike or onnx.ModelProto
        The ``.onnx`` file (external data files beside it are found as the exporter wrote them) or a
        loaded model.
    layers : str, callable or a sequence of them, optional
        PyTorch module names (``"layer1.0.conv1"``; ``"layer1.0.relu@1"`` for a second call) and/or ONNX
        value names; glob patterns (``"layer1.*"``) and callables ``name -> bool`` expand over
        :meth:`available_layers`. Default: in :class:`cka.CKA` next to a PyTorch model, the same names as that model's
        layers; otherwise the outputs of the exported model's repeated blocks (``layers.0``, ``layer1.1``,
        ...), or every candidate value (:meth:`layers`) when the graph carries no module names.
    name : str, optional
        Display name; default the file name without ``.onnx`` (or the graph's name).
    providers : sequence, optional
        onnxruntime execution providers, e.g. ``["CPUExecutionProvider"]`` or
        ``[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]``; default
        :func:`~cka.frontends.onnx.default_providers`.
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
        same tensor in the reference check; default by the graph's arithmetic
        (:data:`~cka.frontends.onnx.MISMATCH_TOLERANCE`).

    Raises
    ------
    FileNotFoundError
        No file, or a missing external data file.
    ValueError
        Not an ONNX model; :class:`~cka.frontends.onnx.OnnxMappingError` for names the graph does not
        hold (close matches listed), values inside If/Loop/Scan subgraphs, and (with the PyTorch model)
        fused, unmapped or mismatched modules; a batch whose shape the graph rejects (expected vs given,
        batch index).
    TypeError
        A batch whose dtype the graph rejects (expected vs given, batch index).
    """

    def __init__(
        self,
        model: Any,
        layers: Any = None,
        *,
        name: str | None = None,
        providers: Sequence[Any] | None = None,
        session_options: Any = None,
        reference: Any = None,
        inputs: Callable[[Any], Any] | None = None,
        reduce: str | Mapping[str, str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        tolerance: float | None = None,
    ) -> None:
        if inputs is not None and not callable(inputs):
            raise TypeError(f"inputs must be a callable batch -> model inputs; got {type(inputs).__name__}.")
        if reduce is not None and not isinstance(reduce, (str, Mapping)):
            raise TypeError(
                f"reduce must be an einops pattern (str) or a dict layer -> pattern; got {type(reduce).__name__}."
            )
        self._proto, self._directory, self._external, self._source = loading.load(model, base_dir)
        path = Path(model) if isinstance(model, (str, os.PathLike)) else None
        self.name = (
            name
            if name is not None
            else (path.name.removesuffix(".onnx") if path is not None else (self._proto.graph.name or "onnx"))
        )
        self._typed = loading.infer_types(self._proto)
        self._graph = index(self._proto, self._typed)
        self._modules = ModuleMap(self._graph)
        self._providers = list(providers) if providers is not None else None
        self._session_options = session_options
        self._inputs = inputs
        self._reduce = reduce
        self._tolerance = tolerance
        #: The PyTorch model the module names are checked against (``None`` until one is at hand).
        self.reference: Any = None
        self._reference_side: FeatureExtractor | None = None
        self._session: Session | None = None
        self._input_specs: dict[str, InputSpec] = {}
        self._checked = False
        self._batch_index = 0
        self._layers: list[Layer] = []
        self._reductions: list[str | None] = []
        self._stack = GramStack([])
        self._unchecked: list[str] = []
        self._requested = _as_selection(layers)
        if reference is not None:
            self._set_reference(_wrap_reference(reference))
        self._select(self._requested)

    # -- What the graph offers -----------------------------------------------------------------

    @property
    def exporter(self) -> str | None:
        """``"torchscript"`` (``dynamo=False``), ``"dynamo"``, or ``None`` when the graph carries no
        module names."""
        return self._modules.exporter

    @property
    def input_names(self) -> list[str]:
        return list(self._graph.inputs)

    def layers(self) -> list[OnnxValue]:
        """Every value that can be selected: outputs of top-level nodes that depend on the inputs and
        are floating-point tensors (shape-only and constant values left out), in graph order, with the
        PyTorch module call each is the output of, where the graph records it."""
        owners: dict[str, list[str]] = {}
        for call, value in self.modules().items():
            owners.setdefault(value, []).append(call)
        return [v._replace(module=", ".join(owners[v.name])) if v.name in owners else v for v in self._graph.values()]

    def modules(self) -> dict[str, str]:
        """PyTorch module call -> the ONNX value that is its output, for every module the graph records
        (``"layer1.0.relu@1"`` is the second call). Modules with no node of their own (folded, removed)
        are absent."""
        return self._modules.mapping()

    def available_layers(self) -> list[SelectableLayer]:
        """Every name ``layers=`` accepts: first the PyTorch module calls the graph records (from the
        dynamo exporter's metadata or the TorchScript exporter's scopes, refined by the PyTorch model's
        module names when one is at hand), in graph order, then the raw ONNX values (:meth:`layers`)
        whose names are not also module names (such a name is read as the module).

        >>> for layer in OnnxModel("model.onnx").available_layers():  # doctest: +SKIP
        ...     print(f"{layer.kind:<6} {layer.name}")
        module layer1.0.relu
        module layer1.0.relu@1
        value  /layer1/layer1.0/relu/Relu_output_0
        """
        mapping = self.modules()
        modules = [SelectableLayer(call, "module", value) for call, value in mapping.items()]
        module_names = set(self._modules.modules)
        values = [SelectableLayer(v.name, "value", v.name) for v in self._graph.values() if v.name not in module_names]
        return modules + values

    # -- FeatureExtractor ----------------------------------------------------------------------

    def fingerprint(self) -> str:
        """SHA-256 of the graph as loaded (its weights when they are inside the file; for external data,
        the graph plus the data files' names and sizes)."""
        small = self._proto.ByteSize() < loading.PROTOBUF_LIMIT
        digest = hashlib.sha256(self._proto.SerializeToString() if small else b"")
        for location in sorted(loading.external_locations(self._proto)):
            file = (self._directory or Path(".")) / location
            digest.update(f"{location}:{file.stat().st_size if file.exists() else -1};".encode())
        return f"onnx:{self.name}:{digest.hexdigest()[:32]}:{','.join(self.layer_names())}"

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    def bind(self, *, layers: Any = None, other: FeatureExtractor | None = None) -> None:
        """Take the selection from :class:`cka.CKA` and, when the other side is a PyTorch model (its
        ``module`` is an ``nn.Module``), use it as the reference for module names (and mirror its layer
        names when ``layers`` is None)."""
        torch_side = (
            other
            if other is not None and other is not self and _is_torch_module(getattr(other, "module", None))
            else None
        )
        if torch_side is not None and self.reference is None:
            self._set_reference(torch_side)
        if layers is None and self._requested is None and torch_side is not None:
            layers = torch_side.layer_names()
        if layers is not None:
            self._requested = _as_selection(layers)
        self._select(self._requested)

    def features(self, batch: Any) -> dict[str, Array]:
        """Selected layer -> value for one batch (torch tensors through DLPack when torch is loaded,
        else numpy arrays), after the optional reduction, from one onnxruntime run."""
        values = self._run(batch)
        return {layer.name: values[i] for i, layer in enumerate(self._layers)}

    def grams(self, batch: Any, gram_fn: Callable[[Array], Array]) -> Array:
        """The ``(L, n, n)`` stack of the selected layers' Grams from one onnxruntime run, written into this
        extractor's one preallocated stack (reused by the next call: copy the result to keep it); each
        value is dropped as soon as its Gram exists."""
        values: list[Any] = self._run(batch)
        self._stack.start()
        with no_grad():
            for i in range(len(values)):
                self._stack.put(i, gram_fn(values[i]))
                values[i] = None
        return self._stack.result()

    def home_device(self) -> Any:
        """Where :meth:`grams` leaves its Grams: ``torch.device("cuda", id)`` for a CUDA session and the CPU
        otherwise when torch is loaded (values go to torch through DLPack); ``None`` without torch (numpy)."""
        torch = loaded_torch()
        if torch is None:
            return None
        session = self._ensure_session()
        return torch.device("cuda", session.device_id) if session.on_cuda else torch.device("cpu")

    def __enter__(self) -> Self:
        self._ensure_session()
        self._batch_index = 0
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.release()

    def __repr__(self) -> str:
        return (
            f"OnnxModel({self._source}, exporter={self.exporter}, inputs={self.input_names}, "
            f"layers={self.layer_names()})"
        )

    # -- Selection -----------------------------------------------------------------------------

    def _set_reference(self, side: FeatureExtractor) -> None:
        """Check module names against ``side`` (an extractor whose ``module`` is the PyTorch model)."""
        self._reference_side = side
        self.reference = side.module  # type: ignore[attr-defined]
        self._modules = ModuleMap(self._graph, {n for n, _ in self.reference.named_modules() if n})
        self._checked = False

    def _select(self, requested: Sequence[Any] | None) -> None:
        """Resolve the selection to values; raise one :class:`OnnxMappingError` listing every name that fails."""
        if requested is None:
            names = self._modules.blocks() or [v.name for v in self._graph.values()]
            if not names:
                raise ValueError(f"{self.name}: the graph computes no floating-point value to compare.")
        else:
            names = self._expand(requested)
        torch_modules = (
            {n: type(m).__name__ for n, m in self.reference.named_modules() if n}
            if self.reference is not None
            else None
        )
        layers, unchecked = resolve(names, self._modules, torch_modules, self.name)
        self._reductions = per_layer(self._reduce, names, f"{self.name}: reduce")
        self._stack = GramStack(names)
        self._layers = layers
        self._unchecked = unchecked
        self._session = None
        self._checked = False

    def _expand(self, requested: Sequence[Any]) -> list[str]:
        """Names from a selection: a plain name passes through (:func:`~cka.frontends.onnx.naming.resolve`
        names every one it cannot map, with the reason); a glob pattern (``"layer1.*"``) or a callable
        ``name -> bool`` expands over :meth:`available_layers`; duplicates, entries that select nothing and
        an empty selection are refused in the wording every frontend uses
        (:func:`cka.frontends._common.select_names`)."""
        plain = [spec for spec in requested if isinstance(spec, str) and not is_pattern(spec)]
        offered = [layer.name for layer in self.available_layers()] if len(plain) < len(requested) else []
        return select_names(
            list(dict.fromkeys([*offered, *plain])),
            requested,
            what="layers",
            owner=self.name,
            match=_match_callable,
            accepted="a module or value name or glob pattern (str) or a callable name -> bool",
            listing="List them with OnnxModel.available_layers().",
        )

    # -- Session and runs ----------------------------------------------------------------------

    def _output_names(self) -> list[str]:
        return list(dict.fromkeys(v for layer in self._layers for v in layer.candidates))

    def _ensure_session(self) -> Session:
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
            outputs = self._output_names()
            with (
                loading.with_outputs(self._proto, self._typed, outputs) as edited,
                loading.model_source(edited, self._external, self._directory, self._source) as source,
            ):
                session = Session(source, outputs, self._providers, self._session_options)
            self._input_specs = {
                name: InputSpec(numpy_dtype(elem), shape, session.input_types.get(name, "?"))
                for name in self.input_names
                for shape, elem in [self._graph.types.get(name, (None, None))]
            }
            self._session = session
        return self._session

    def _run(self, batch: Any) -> list[Array]:
        """One onnxruntime run for ``batch``; the selected layers' values (reduced), in order."""
        session = self._ensure_session()
        index = self._batch_index
        self._batch_index += 1
        where = f"{self.name}: batch {index}"
        feeds = feeds_from_batch(batch, self.input_names, self._inputs, where)
        feeds = {
            n: check_input(a, self._input_specs[n], session.on_cuda, f"{where}, input {n!r}") for n, a in feeds.items()
        }
        outputs = dict(zip(session.outputs, session.run(feeds, self.name, index), strict=True))
        side = self._reference_side
        if side is not None and not self._checked and any(layer.module is not None for layer in self._layers):
            self._check(side, batch, {n: v.numpy() for n, v in outputs.items()})
        values = []
        for layer, pattern in zip(self._layers, self._reductions, strict=True):
            value = to_array(outputs[layer.value])
            values.append(reduce_features(value, pattern, layer.name) if pattern is not None else value)
        return values

    def _check(self, side: FeatureExtractor, batch: Any, outputs: Mapping[str, Any]) -> None:
        """The probe check (:mod:`~cka.frontends.onnx.probe`) of every module-mapped layer on ``batch``
        against the PyTorch side ``side``."""
        selected = {layer.module for layer in self._layers if layer.module is not None}
        record = probe.trace(side, batch, selected, set(self._modules.modules))
        precision = self._graph.precision
        tolerance = self._tolerance if self._tolerance is not None else probe.MISMATCH_TOLERANCE[precision]
        self._layers = probe.check(self._layers, outputs, record, tolerance, precision, self.name)
        self._checked = True


def _as_selection(layers: Any) -> list[Any] | None:
    """``layers=`` as a list of entries: a str or a callable is one entry (as for the torch frontend)."""
    if layers is None:
        return None
    if isinstance(layers, str) or callable(layers):
        return [layers]
    if not isinstance(layers, Iterable):
        raise TypeError(
            f"layers for an ONNX model must be module or value names, glob patterns or callables name -> bool "
            f"(one, or a list); got {type(layers).__name__} {layers!r}."
        )
    return list(layers)


def _match_callable(spec: Any, names: Sequence[str]) -> list[str] | None:
    """A selection entry ``name -> bool`` (not a class) resolved over ``names``; None for anything else."""
    if callable(spec) and not isinstance(spec, type):
        return [name for name in names if spec(name)]
    return None


def _is_torch_module(value: Any) -> bool:
    """Whether ``value`` is a ``torch.nn.Module`` (torch is not imported: a module implies it is loaded)."""
    torch = loaded_torch()
    return torch is not None and isinstance(value, torch.nn.Module)


def _wrap_reference(module: Any) -> FeatureExtractor:
    """The ``reference=`` model as an extractor that runs it as :class:`cka.CKA` would (default inputs,
    eval and inference mode, flags restored): a :class:`cka.frontends.torch.TorchModel` of the whole model."""
    if not _is_torch_module(module):
        raise TypeError(
            f"reference must be the torch.nn.Module the graph was exported from; got {type(module).__name__}."
        )
    from cka.frontends.torch import TorchModel

    return TorchModel(module, [""], name=type(module).__name__)
