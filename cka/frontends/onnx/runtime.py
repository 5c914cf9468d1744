"""onnxruntime for the ONNX frontend: its import, the providers, one session with I/O binding, the outputs.

* **Installation.** onnxruntime is imported on first use with the install hint; ``onnxruntime`` and
  ``onnxruntime-gpu`` install the same module, and two installed distributions get a warning.
* **Providers.** CUDA when the build offers it and a GPU is present, else CPU; a session that
  onnxruntime silently created on the CPU although CUDA was asked for gets a warning.
* **Running.** :class:`Session` feeds a batch by input name (checking dtype and shape against the graph),
  binds inputs in place (numpy on the CPU, CUDA tensors on the GPU), binds outputs on the session's
  device, and hands them to torch through DLPack (no copy) when torch is loaded, else as numpy arrays.

Nothing here imports torch: a torch tensor is recognised through ``sys.modules``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cka.frontends._common import close_matches
from cka.frontends.onnx.errors import INSTALL_HINT, OnnxRuntimeSetupWarning

__all__ = [
    "ORT_DISTRIBUTIONS",
    "InputSpec",
    "Session",
    "default_providers",
    "import_ort",
    "installed_onnxruntime_distributions",
    "loaded_torch",
    "no_grad",
    "to_array",
]

Array = Any

#: Distributions that all install the module ``onnxruntime``; more than one installed is broken.
ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "onnxruntime-training",
)
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


# --------------------------------------------------------------------------------------------
# Installation and providers
# --------------------------------------------------------------------------------------------


def import_ort() -> Any:
    """The ``onnxruntime`` module, or an ImportError that says which extra to install."""
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


def warn_if_several_distributions(found: Sequence[str]) -> None:
    """Warn when more than one of :data:`ORT_DISTRIBUTIONS` is installed (``found`` as listed by
    :func:`installed_onnxruntime_distributions`)."""
    if len(found) > 1:
        warnings.warn(
            f"several onnxruntime distributions are installed ({', '.join(found)}). They install the same "
            f"module `onnxruntime`: the last one installed wins, and uninstalling one breaks the other, so "
            f"GPU support may be silently missing. Keep exactly one: pip uninstall -y "
            f"{' '.join(f.split('==')[0] for f in found)} && pip install onnxruntime-gpu (or onnxruntime); "
            f"with cka use the extra onnx or onnx-gpu, not both.",
            OnnxRuntimeSetupWarning,
            stacklevel=6,
        )


def _gpu_present() -> bool:
    """Whether a CUDA GPU is visible: torch's answer when torch is loaded, else the NVIDIA device nodes
    (Linux); where neither tells, assume yes and let the post-creation provider check warn."""
    torch = loaded_torch()
    if torch is not None:
        return bool(torch.cuda.is_available())
    if sys.platform.startswith("linux"):
        return os.path.exists("/dev/nvidiactl") or os.path.isdir("/proc/driver/nvidia/gpus")
    return True


def default_providers(available: Sequence[str] | None = None) -> list[str]:
    """``["CUDAExecutionProvider", "CPUExecutionProvider"]`` when onnxruntime offers CUDA (the
    onnxruntime-gpu build) and a GPU is present, else ``["CPUExecutionProvider"]``."""
    if available is None:
        available = import_ort().get_available_providers()
    if CUDA in available and _gpu_present():
        return [CUDA, CPU]
    return [CPU]


def _provider_name(provider: Any) -> str:
    """``"CUDAExecutionProvider"`` for ``"CUDAExecutionProvider"`` and for ``("CUDAExecutionProvider", {...})``."""
    return provider[0] if isinstance(provider, (tuple, list)) else str(provider)


def _check_session_providers(requested: Sequence[Any], active: Sequence[str]) -> None:
    """Warn when onnxruntime dropped a requested accelerator provider (it falls back to the CPU silently
    when e.g. the CUDA or cuDNN libraries are missing)."""
    dropped = [_provider_name(p) for p in requested if _provider_name(p) not in (CPU, *active)]
    if dropped:
        warnings.warn(
            f"onnxruntime {import_ort().__version__} was asked for {dropped} but created the session on {list(active)}: "
            f"it fell back silently, usually because the CUDA/cuDNN libraries that onnxruntime-gpu needs are "
            f"missing or of another version (pip install 'onnxruntime-gpu[cuda,cudnn]', or see "
            f"onnxruntime.preload_dlls()). Pass providers=['CPUExecutionProvider'] to run on the CPU on purpose.",
            OnnxRuntimeSetupWarning,
            stacklevel=6,
        )


def _cuda_device_id(providers: Sequence[Any]) -> int:
    """The ``device_id`` option of the CUDA provider (0 when not given)."""
    for provider in providers:
        if _provider_name(provider) == CUDA and isinstance(provider, (tuple, list)):
            return int(dict(provider[1]).get("device_id", 0))
    return 0


# --------------------------------------------------------------------------------------------
# Arrays: torch tensors are recognised without importing torch
# --------------------------------------------------------------------------------------------


def loaded_torch() -> Any:
    """The torch module if the process has imported it, else None (also where it is blocked by
    ``sys.modules["torch"] = None``); never imports it."""
    return sys.modules.get("torch")


def _is_torch_tensor(value: Any) -> bool:
    torch = loaded_torch()
    return torch is not None and isinstance(value, torch.Tensor)


def no_grad() -> contextlib.AbstractContextManager[Any]:
    """``torch.inference_mode()`` when torch is loaded (features are inference tensors, as the torch
    frontend's, and its Gram buffers may be too), else nothing."""
    torch = loaded_torch()
    if torch is not None:
        return torch.inference_mode()
    return contextlib.nullcontext()


def to_array(ort_value: Any) -> Array:
    """An onnxruntime output as a torch tensor without a copy (DLPack) when torch is loaded, else numpy."""
    torch = loaded_torch()
    if torch is not None:
        try:
            return torch.utils.dlpack.from_dlpack(ort_value._ortvalue.to_dlpack())
        except (AttributeError, RuntimeError, TypeError, BufferError):  # builds without DLPack
            return torch.from_numpy(ort_value.numpy())
    return ort_value.numpy()


def _numpy_type_of(tensor: Any) -> Any:
    """The numpy scalar type (``numpy.float32``) of a torch tensor, as onnxruntime's binding takes it."""
    return np.dtype(str(tensor.dtype).removeprefix("torch.")).type


# --------------------------------------------------------------------------------------------
# Batches to feeds
# --------------------------------------------------------------------------------------------


class InputSpec:
    """A graph input as the feeds are checked against it: numpy ``dtype`` (None: unknown), ``shape``
    (ints, dimension names or None; None: unknown) and onnxruntime's ``type`` string for messages."""

    __slots__ = ("dtype", "shape", "type")

    def __init__(self, dtype: np.dtype | None, shape: tuple[Any, ...] | None, type: str) -> None:
        self.dtype, self.shape, self.type = dtype, shape, type


def feeds_from_batch(
    batch: Any, names: Sequence[str], inputs: Callable[[Any], Any] | None, where: str
) -> dict[str, Any]:
    """``{input name: array}`` for a batch: ``inputs(batch)`` when given; else a dict batch is read by
    input name (other keys ignored), a tuple/list batch is ``(inputs, targets, ...)`` and an array is
    the only input. ``where`` (``"model: batch 3"``) starts every error."""
    value = inputs(batch) if inputs is not None else batch
    if inputs is None and isinstance(value, (tuple, list)):
        if not value:
            raise ValueError(f"{where} is an empty tuple/list; expected (inputs, targets, ...).")
        if len(names) == 1 or isinstance(value[0], (Mapping, tuple, list)):
            value = value[0]
        else:
            value = value[: len(names)]
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing:
            keys = [str(k) for k in value]
            hints = "; ".join(f"{n!r}: {close_matches(n, keys)}" for n in missing)
            raise ValueError(
                f"{where} has no entry for input(s) {missing} (given keys {list(value)}; {hints}); the graph's "
                f"inputs are {list(names)}. Name the batch's keys after them, or pass inputs=<batch -> dict>."
            )
        return {n: value[n] for n in names}
    if isinstance(value, (tuple, list)):
        if len(value) != len(names):
            raise ValueError(
                f"{where} gives {len(value)} inputs but the graph takes {len(names)} ({list(names)}); pass "
                f"a dict {{input name: array}} or inputs=<batch -> inputs>."
            )
        return dict(zip(names, value, strict=True))
    if len(names) != 1:
        raise ValueError(
            f"{where} is a single array but the graph takes {len(names)} inputs ({list(names)}); "
            f"pass a dict {{input name: array}} per batch."
        )
    return {names[0]: value}


def check_input(array: Any, spec: InputSpec, on_cuda: bool, where: str) -> Any:
    """The array as numpy (or a contiguous CUDA tensor for a CUDA session); a clear error when its
    dtype or shape is not what the input (``spec``) takes. ``where``: ``"model: batch 3, input 'x'"``."""
    if _is_torch_tensor(array):
        tensor = array.detach()
        if not (on_cuda and tensor.is_cuda):
            tensor = tensor.cpu()
        given_dtype, shape = str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)
        converted = tensor.contiguous() if tensor.is_cuda else tensor.contiguous().numpy()
    else:
        converted = np.ascontiguousarray(np.asarray(array))
        given_dtype, shape = str(converted.dtype), converted.shape
    if spec.dtype is not None and given_dtype != spec.dtype.name:
        expected = spec.dtype.name
        raise TypeError(
            f"{where}: the graph expects {expected} ({spec.type}) but the batch gives {given_dtype}; convert it "
            f"(x.float() in torch, x.astype(numpy.{expected}) in numpy) or with inputs=<batch -> inputs>."
        )
    dims = spec.shape
    if dims is not None and (
        len(dims) != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape, strict=True))
    ):
        shown = tuple(d if isinstance(d, int) else (d or "?") for d in dims)
        raise ValueError(f"{where}: the graph expects shape {shown} (names: any size) but the batch gives {shape}.")
    return converted


# --------------------------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------------------------


def session_options(ort: Any) -> Any:
    """onnxruntime's default options with ``session.intra_op.allow_spinning`` off."""
    options = ort.SessionOptions()
    # onnxruntime's intra-op threads spin for a while after each run, taking the CPU from the Gram
    # products that follow it; without spinning the ONNX path ran 10% faster on 2 cores
    # (benchmarks/onnx_bench.py)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class Session:
    """One onnxruntime session whose outputs are exactly the selected values, run through I/O binding.

    Parameters
    ----------
    source : bytes or str
        The serialized model or the path of a model file (see :func:`cka.frontends.onnx.loading.model_source`).
    outputs : sequence of str
        The values to read, in the order :meth:`run` returns them.
    providers : sequence, optional
        Default :func:`default_providers`.
    options : onnxruntime.SessionOptions, optional
        Default :func:`session_options`.
    """

    def __init__(self, source: Any, outputs: Sequence[str], providers: Sequence[Any] | None, options: Any) -> None:
        ort = import_ort()
        warn_if_several_distributions(installed_onnxruntime_distributions())
        providers = list(providers) if providers is not None else default_providers(ort.get_available_providers())
        self.session = ort.InferenceSession(
            source, sess_options=options if options is not None else session_options(ort), providers=providers
        )
        active = self.session.get_providers()
        _check_session_providers(providers, active)
        self.on_cuda = CUDA in active
        self.device_id = _cuda_device_id(providers) if self.on_cuda else 0
        self.outputs = list(outputs)
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}

    def run(self, feeds: Mapping[str, Any], model: str, index: int) -> list[Any]:
        """The outputs (onnxruntime ``OrtValue`` s on the session's device) for ``feeds`` (checked arrays,
        see :func:`check_input`), bound in place: ``feeds`` keeps the arrays alive during the run. ``model``
        and ``index`` (the batch) name the run in an error."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            if isinstance(array, np.ndarray):
                binding.bind_cpu_input(name, array)
            else:  # a contiguous CUDA tensor, bound in place
                binding.bind_input(
                    name, "cuda", array.device.index or 0, _numpy_type_of(array), tuple(array.shape), array.data_ptr()
                )
        device = "cuda" if self.on_cuda else "cpu"
        for name in self.outputs:
            binding.bind_output(name, device, self.device_id)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as error:  # onnxruntime's errors share no other base: add the batch and the shapes
            shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in feeds.items()}
            raise RuntimeError(f"{model}: onnxruntime failed on batch {index} with inputs {shapes}: {error}") from None
        return list(binding.get_outputs())
