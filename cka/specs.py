"""Turning command-line model and data specs into objects: never unpickles arbitrary objects.

Models: ``path/to/models.py:make_model`` (a factory returning an ``nn.Module``), ``torchvision:NAME``,
``timm:NAME``, ``model.onnx``, ``model.pt2`` (a ``torch.export`` ExportedProgram), ``model.pt`` /
``model.ts`` (TorchScript). Data: an image folder with class subfolders, a ``.npy``/``.npz`` array
file, or ``synthetic:CxHxW`` (seeded Gaussian examples).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_model", "load_data", "SYNTHETIC_DEFAULT_SIZE"]

SYNTHETIC_DEFAULT_SIZE = 512
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_MODEL_FORMS = (
    "path/to/models.py:make_model, torchvision:resnet18, timm:NAME, model.onnx, model.pt2 (torch.export) "
    "or model.pt (TorchScript)"
)


def _spec_error(message: str) -> ValueError:
    return ValueError(message)


def load_model(spec: str, *, weights: str | None = None) -> Any:
    """An ``nn.Module`` (in eval mode) or an :class:`~cka.frontends.onnx.OnnxModel` from ``spec``."""
    lowered = spec.lower()
    if lowered.endswith(".onnx"):
        _require_file(spec)
        from cka.frontends.onnx import OnnxModel

        return OnnxModel(spec)
    if lowered.endswith(".pt2"):
        _require_file(spec)
        import torch

        # unflatten restores the module hierarchy (and so the layer names and hooks) of the program
        return torch.export.unflatten(torch.export.load(spec))
    if lowered.endswith((".pt", ".ts", ".pth")):
        _require_file(spec)
        import torch

        try:
            return TorchScriptOutput(torch.jit.load(spec, map_location="cpu").eval())
        except RuntimeError as error:
            raise _spec_error(
                f"{spec} is not a TorchScript file ({str(error).splitlines()[0]}); pickled models are never "
                f"loaded (unpickling runs arbitrary code): save with torch.jit.save / torch.export.save, or "
                f"name a factory as path/to/models.py:make_model."
            ) from None
    prefix, sep, name = spec.partition(":")
    if sep and prefix == "torchvision":
        return _torchvision_model(name, weights)
    if sep and prefix == "timm":
        return _timm_model(name, weights)
    if sep and prefix.endswith(".py"):
        return _factory_model(prefix, name)
    raise _spec_error(f"unknown model spec {spec!r}; use one of: {_MODEL_FORMS}.")


def TorchScriptOutput(script_module: Any) -> Any:  # noqa: N802 - builds an nn.Module
    """A TorchScript model as an ``nn.Module`` whose only selectable layer is ``output``.

    ScriptModules refuse forward hooks, so their inner layers cannot be read; the model's output
    passes through an ``nn.Identity`` named ``output`` that can be hooked. To compare inner layers,
    save the model with ``torch.export.save`` (a ``.pt2`` file) instead.
    """
    import torch

    class _TorchScriptOutput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.__dict__["script"] = script_module  # not registered: named_modules() must not list it
            self.output = torch.nn.Identity()

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.output(self.script(*args, **kwargs))

    return _TorchScriptOutput().eval()


def is_torchscript_output(model: Any) -> bool:
    return type(model).__name__ == "_TorchScriptOutput"


def _require_file(path: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"model file {path} does not exist; check the path.")


def _factory_model(path: str, factory: str) -> Any:
    import torch

    _require_file(path)
    module_name = f"_cka_user_models_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise _spec_error(f"cannot import {path} as a Python module.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not factory or not hasattr(module, factory):
        available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise _spec_error(f"{path} defines no {factory!r}; callables there: {', '.join(available) or 'none'}.")
    model = getattr(module, factory)()
    if not isinstance(model, torch.nn.Module):
        raise _spec_error(f"{path}:{factory}() returned a {type(model).__name__}, not a torch.nn.Module.")
    return model.eval()


def _torchvision_model(name: str, weights: str | None) -> Any:
    try:
        import torchvision
    except ImportError:
        raise ImportError("torchvision:NAME needs torchvision: pip install torchvision") from None
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        close = [n for n in torchvision.models.list_models() if name.lower() in n or n in name.lower()][:5]
        raise _spec_error(f"torchvision has no model {name!r}; close: {', '.join(close) or 'see torchvision.models.list_models()'}.") from None
    if weights is None:
        return builder(weights=None).eval()
    resolved = torchvision.models.get_model_weights(name)[weights] if weights != "DEFAULT" else (
        torchvision.models.get_model_weights(name).DEFAULT)
    cached = Path(torch_hub_dir()) / "checkpoints" / Path(resolved.url).name
    if not cached.is_file():
        raise FileNotFoundError(
            f"weights {resolved} are not cached at {cached}; this tool never downloads: fetch them once "
            f"elsewhere (torchvision.models.{name}(weights='{weights}')) and copy the file there."
        )
    return builder(weights=resolved).eval()


def torch_hub_dir() -> str:
    import torch

    return torch.hub.get_dir()


def _timm_model(name: str, weights: str | None) -> Any:
    try:
        import timm
    except ImportError:
        raise ImportError("timm:NAME needs timm: pip install timm") from None
    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:5]
        raise _spec_error(f"timm has no model {name!r}; close: {', '.join(close) or 'see timm.list_models()'}.")
    if weights is None:
        return timm.create_model(name, pretrained=False).eval()
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {weights} is not a local file; this tool never downloads weights.")
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}).eval()


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def load_data(spec: str, *, limit: int | None = None, image_size: int | None = None) -> Any:
    """A ``torch.utils.data.TensorDataset`` of float32 examples (and labels where there are any)."""
    import torch

    if limit is not None and limit < 1:
        raise _spec_error(f"--limit must be positive; got {limit}.")
    if spec.startswith("synthetic:"):
        shape = _parse_shape(spec.partition(":")[2], spec)
        n = limit if limit is not None else SYNTHETIC_DEFAULT_SIZE
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.TensorDataset(torch.randn(n, *shape, generator=g))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"data {spec} does not exist; give an image folder, a .npy/.npz file or synthetic:CxHxW.")
    if path.is_dir():
        x, y = _image_folder(path, image_size)
    elif path.suffix == ".npy":
        x, y = np.load(path, allow_pickle=False), None
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            keys = list(arrays.keys())
            if not keys:
                raise _spec_error(f"{spec} holds no arrays.")
            key = next((k for k in ("x", "data", "images", "inputs") if k in keys), keys[0])
            x = arrays[key]
            y = arrays["y"] if "y" in keys and len(arrays["y"]) == len(x) else None
    else:
        raise _spec_error(f"cannot read data {spec}: give an image folder, a .npy/.npz file or synthetic:CxHxW.")
    if limit is not None:
        x = x[:limit]
        y = y[:limit] if y is not None else None
    if not np.issubdtype(np.asarray(x).dtype, np.number):
        raise _spec_error(f"data {spec} holds {np.asarray(x).dtype} values; numeric arrays are needed.")
    tensors = [torch.as_tensor(np.asarray(x, dtype=np.float32))]
    if y is not None:
        tensors.append(torch.as_tensor(np.asarray(y)))
    return torch.utils.data.TensorDataset(*tensors)


def _parse_shape(text: str, spec: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise _spec_error(f"cannot read the shape in {spec!r}; write it like synthetic:3x224x224.") from None
    if not shape or any(s < 1 for s in shape):
        raise _spec_error(f"the shape in {spec!r} must be positive integers, like synthetic:3x224x224.")
    return shape


def _image_folder(root: Path, image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Images under ``root/<class>/`` as ``(n, 3, H, W)`` floats in [0, 1], labels by sorted class name."""
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise _spec_error(f"image folder {root} has no class subfolders (expected {root}/<class>/<image>).")
    images, labels, size = [], [], None
    for label, cls in enumerate(classes):
        for file in sorted((root / cls).iterdir()):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            with Image.open(file) as img:
                img = img.convert("RGB")
                if size is None:
                    size = (image_size, image_size) if image_size else img.size
                if img.size != size:
                    img = img.resize(size)
                images.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
                labels.append(label)
    if not images:
        raise _spec_error(f"image folder {root} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))}).")
    return np.stack(images), np.asarray(labels)
