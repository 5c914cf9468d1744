r"""ONNX frontend: compare a PyTorch model with its ONNX deployment (or two ONNX graphs) layer by layer.

The package's public names; each job lives in its own module: :mod:`.runtime` (onnxruntime, providers,
sessions), :mod:`.loading` (files, external data, edited copies), :mod:`.graph` (the graph index),
:mod:`.naming` (exporter names to module calls), :mod:`.probe` (the check against the PyTorch model),
:mod:`.model` (:class:`OnnxModel`), :mod:`.errors` (what it raises and warns).

>>> from cka import CKA
>>> from cka.frontends.onnx import OnnxModel
>>> deployed = OnnxModel("model.onnx")              # or an onnx.ModelProto  # doctest: +SKIP
>>> deployed.layers()[:3]                           # candidate values, shapes where known  # doctest: +SKIP
>>> cka = CKA(torch_model, deployed, model1_layers=["layer1", "fc"], model2_layers=["layer1", "fc"])  # doctest: +SKIP
>>> cka.compare(loader).matrix.diagonal()           # ~1.0 where the export is faithful  # doctest: +SKIP

**Layer names.** ``layers=`` (or ``model2_layers=`` in :class:`cka.CKA`) takes PyTorch module names,
mapped to the ONNX value that is the module's output, and raw ONNX value names (see :meth:`OnnxModel.layers`;
:meth:`OnnxModel.available_layers` lists both kinds); glob patterns (``"layer1.*"``) and callables
``name -> bool`` expand over that list. A name that is both is read as the module. The mapping reads what
the exporters record:

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

from cka.frontends.onnx.errors import INSTALL_HINT

try:
    import onnx  # noqa: F401  (every module of the package reads graphs with it)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(f"the ONNX frontend needs the onnx package: {INSTALL_HINT}.") from error

from cka.frontends.onnx.errors import (
    REMEDIES,
    MappingProblem,
    OnnxMappingError,
    OnnxRuntimeSetupWarning,
    UncheckedMappingWarning,
)
from cka.frontends.onnx.graph import OnnxValue
from cka.frontends.onnx.model import OnnxModel, SelectableLayer
from cka.frontends.onnx.naming import CALL_SEPARATOR
from cka.frontends.onnx.probe import MISMATCH_TOLERANCE
from cka.frontends.onnx.runtime import (
    ORT_DISTRIBUTIONS,
    default_providers,
    installed_onnxruntime_distributions,
)

__all__ = [
    "CALL_SEPARATOR",
    "INSTALL_HINT",
    "MISMATCH_TOLERANCE",
    "ORT_DISTRIBUTIONS",
    "REMEDIES",
    "MappingProblem",
    "OnnxMappingError",
    "OnnxModel",
    "OnnxRuntimeSetupWarning",
    "OnnxValue",
    "SelectableLayer",
    "UncheckedMappingWarning",
    "default_providers",
    "installed_onnxruntime_distributions",
]
