"""Turning command-line model and data specs into objects, without running code from data files.

Models: ``path/to/models.py:make_model`` (a factory returning an ``nn.Module``: Python code the user
chose to run), ``torchvision:NAME``, ``timm:NAME``, ``hf:NAME_OR_PATH`` (a Hugging Face ``AutoModel``
from a local folder or the local cache, never downloaded: :mod:`cka.frontends.hf`), ``model.onnx``, ``model.pt2`` (a
``torch.export`` program, checked by :mod:`cka.model_files` before it is loaded), ``model.pt`` /
``model.ts`` (TorchScript). Data: an image folder with class subfolders (decoded lazily), a
``.npy``/``.npz`` array file (``allow_pickle=False``), or ``synthetic:CxHxW`` (seeded Gaussian
examples). Every problem is an exception whose message names the spec and the fix.
"""

from __future__ import annotations

import importlib.util
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cka.model_files import check_torchscript_archive, check_weights_file, read_exported_program

__all__ = ["SYNTHETIC_DEFAULT_SIZE", "LoadedModel", "UserCodeError", "load_data", "load_model"]

SYNTHETIC_DEFAULT_SIZE = 512
#: Seed of the image-folder sample taken by ``--limit``.
IMAGE_SAMPLE_SEED = 0
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_MODEL_FORMS = (
    "path/to/models.py:make_model, torchvision:resnet18, timm:NAME, hf:NAME_OR_PATH, model.onnx, "
    "model.pt2 (torch.export) or model.pt (TorchScript)"
)


class UserCodeError(Exception):
    """The user's own code (a models file, its factory) raised: shown as one line with its type."""


@dataclass
class LoadedModel:
    """A model from a spec, with what the file says about it.

    Attributes
    ----------
    spec : str
        As given on the command line.
    model : nn.Module or OnnxModel
    kind : str
        ``"factory"``, ``"torchvision"``, ``"timm"``, ``"hf"``, ``"onnx"``, ``"exported"`` or ``"torchscript"``.
    default_layers : list of str or None
        The layers compared when none are named (``None``: the comparer's default).
    input_shape : tuple or None
        A ``torch.export`` program's input shape, an int per static dimension, ``None`` per dynamic one.
    min_batch : int
        The smallest batch the program accepts (``torch.export`` dimension bounds).
    """

    spec: str
    model: Any
    kind: str
    default_layers: list[str] | None = None
    input_shape: tuple[int | None, ...] | None = None
    min_batch: int = 1

    @property
    def static_batch(self) -> int | None:
        """The batch size a program was exported with when it is fixed, else ``None``."""
        return self.input_shape[0] if self.input_shape else None


def load_model(spec: str, *, weights: str | None = None, trust_code: bool = False) -> LoadedModel:
    """The model named by ``spec``, in eval mode; see the module docstring for the forms.

    ``trust_code`` loads a ``.pt2`` file as ``torch.export.load`` does, without refusing what would
    run code from it (pickled objects, compiled libraries, Python in the program).
    """
    lowered = spec.lower()
    if lowered.endswith(".onnx"):
        from cka.frontends.onnx import OnnxModel

        return LoadedModel(spec, OnnxModel(_existing_file(spec)), "onnx")
    if lowered.endswith(".pt2"):
        return _exported_model(spec, _existing_file(spec), trust_code)
    if lowered.endswith((".pt", ".ts", ".pth")):
        path = _existing_file(spec)
        check_torchscript_archive(path)
        import torch

        try:
            script = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as error:
            raise ValueError(
                f"{spec} is not a loadable TorchScript file ({_first_line(error)}); save it again with torch.jit.save."
            ) from None
        # ScriptModules refuse forward hooks: only the output (through an Identity) can be compared
        return LoadedModel(spec, TorchScriptOutput(script), "torchscript", default_layers=["output"])
    prefix, sep, name = spec.partition(":")
    if sep and prefix == "torchvision":
        return LoadedModel(spec, _torchvision_model(name, weights), "torchvision")
    if sep and prefix == "timm":
        return LoadedModel(spec, _timm_model(name, weights), "timm")
    if sep and prefix == "hf":
        from cka.frontends.hf import load_local_model

        return LoadedModel(spec, load_local_model(name), "hf")
    if sep and prefix.endswith(".py"):
        return LoadedModel(spec, _factory_model(prefix, name), "factory")
    raise ValueError(f"unknown model spec {spec!r}; use one of: {_MODEL_FORMS}.")


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


def _existing_file(path: str) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"model file {path} does not exist; check the path.")
    return Path(path)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# ------------------------------------------------------------------------------------------------
# torch.export programs
# ------------------------------------------------------------------------------------------------


def _exported_model(spec: str, path: Path, trust_code: bool) -> LoadedModel:
    import torch

    program = read_exported_program(path, trust_code=trust_code)
    shape, min_batch = _program_input(program)
    # unflatten restores the module hierarchy (and so the layer names and hooks) of the program
    model = torch.export.unflatten(program)
    return LoadedModel(spec, model, "exported", _exported_default_layers(program, model), shape, min_batch)


def _program_input(program: Any) -> tuple[tuple[int | None, ...] | None, int]:
    """The first user input's shape (``None`` for a dynamic dimension) and the smallest batch."""
    import torch

    names = list(program.graph_signature.user_inputs)
    node = next((n for n in program.graph.nodes if n.op == "placeholder" and n.name in names[:1]), None)
    value = node.meta.get("val") if node is not None else None
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None, 1
    shape = tuple(int(s) if isinstance(s, int) else None for s in value.shape)
    min_batch = 1
    first = value.shape[0]
    if isinstance(first, torch.SymInt):
        bounds = program.range_constraints.get(first.node.expr)
        lower = getattr(bounds, "lower", 1)
        min_batch = int(lower) if isinstance(lower, int) or str(lower).isdigit() else 1
    return shape, min_batch


def _exported_default_layers(program: Any, model: Any) -> list[str]:
    """The comparer's default layers computed on the *original* module types.

    ``unflatten`` rebuilds the hierarchy from ``InterpreterModule``s, which are neither
    ``nn.Sequential`` nor ``ModuleList``, so the block rule would fall back to leaves. The program's
    ``nn_module_stack`` metadata records each module's original type: a skeleton of empty modules
    of those ``torch.nn`` container types lets the same rule (``default_layers``) pick the blocks.
    """
    import torch

    from cka.frontends.torch import default_layers

    types: dict[str, str] = {}
    for node in program.graph.nodes:
        for path, type_name in (node.meta.get("nn_module_stack") or {}).values():
            types.setdefault(
                str(path), type_name if isinstance(type_name, str) else getattr(type_name, "__qualname__", "")
            )

    def skeleton_module(name: str) -> torch.nn.Module:
        class_name = types.get(name, "").rsplit(".", 1)[-1]
        cls = getattr(torch.nn, class_name, None) if types.get(name, "").startswith("torch.nn.") else None
        if cls in (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Identity) or (
            isinstance(cls, type) and issubclass(cls, torch.nn.modules.dropout._DropoutNd)
        ):
            return cls()
        return torch.nn.Module()

    root = skeleton_module("")
    built = {"": root}
    for name, _ in model.named_modules():
        if not name:
            continue
        parent, _, leaf = name.rpartition(".")
        module = skeleton_module(name)
        built[parent].add_module(leaf, module)
        built[name] = module
    return default_layers(root)


# ------------------------------------------------------------------------------------------------
# Python factories, torchvision, timm
# ------------------------------------------------------------------------------------------------


def _factory_model(path: str, factory: str) -> Any:
    """Import ``path`` (code the user chose to run) and call ``factory()``; their errors are the user's."""
    import torch

    file = _existing_file(path)
    module_name = f"_cka_user_models_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path} as a Python module; name a .py file.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ValueError(f"{path} has a syntax error at line {error.lineno}: {error.msg}; fix the file.") from None
    except Exception as error:
        raise UserCodeError(
            f"importing {path} raised {type(error).__name__}: {_first_line(error)}; fix the file (python {path} shows the traceback)."
        ) from error
    if not factory or not callable(getattr(module, factory, None)):
        available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"{path} defines no {factory!r}; callables there: {', '.join(available) or 'none'}.")
    try:
        model = getattr(module, factory)()
    except Exception as error:
        raise UserCodeError(
            f"{path}:{factory}() raised {type(error).__name__}: {_first_line(error)}; fix the factory (it is called "
            f"without arguments)."
        ) from error
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{path}:{factory}() returned a {type(model).__name__}, not a torch.nn.Module.")
    return model.eval()


def _import_optional(name: str) -> Any:
    """Import torchvision or timm, telling a missing package from one that is broken."""
    broken: BaseException
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if getattr(error, "name", None) == name:
            raise ImportError(f"{name}:NAME needs {name}: pip install {name}") from None
        broken = error
    except Exception as error:  # an installed package that fails at import (a torch/torchvision mismatch)
        broken = error
    import torch

    raise ImportError(
        f"{name} is installed but fails to import ({type(broken).__name__}: {_first_line(broken)}); reinstall the {name} "
        f"release built for torch {torch.__version__} (pip install --force-reinstall {name})."
    ) from None


def _torchvision_model(name: str, weights: str | None) -> Any:
    torchvision = _import_optional("torchvision")
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        close = [n for n in torchvision.models.list_models() if name.lower() in n or n in name.lower()][:5]
        raise ValueError(
            f"torchvision has no model {name!r}; close: {', '.join(close) or 'see torchvision.models.list_models()'}."
        ) from None
    if weights is None:
        return builder(weights=None).eval()
    enum = torchvision.models.get_model_weights(name)
    try:
        resolved = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError:
        raise ValueError(
            f"torchvision has no weights {weights!r} for {name}; choose one of: DEFAULT, {', '.join(enum.__members__)}."
        ) from None
    cached = Path(torch_hub_dir()) / "checkpoints" / Path(resolved.url).name
    if not cached.is_file():
        raise FileNotFoundError(
            f"weights {resolved} are not cached at {cached}; this tool never downloads: fetch them once "
            f"elsewhere (torchvision.models.{name}(weights='{weights}')) and copy the file there."
        )
    _check_published_hash(cached)
    check_weights_file(cached)  # torchvision unpickles the cached file without weights_only
    return builder(weights=resolved).eval()


def _check_published_hash(path: Path) -> None:
    """torchvision file names end in the first hex digits of the file's SHA-256 (checked only when
    downloading): check them here too, so a replaced cache file is noticed."""
    import hashlib

    found = re.search(r"-([a-f0-9]{6,})\.", path.name)
    if found is None:
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(found.group(1)):
        raise ValueError(
            f"cached weights {path} do not match their published checksum (sha256 {digest[:12]}..., name says "
            f"{found.group(1)}); delete the file and fetch it again."
        )


def torch_hub_dir() -> str:
    import torch

    return torch.hub.get_dir()


def _timm_model(name: str, weights: str | None) -> Any:
    timm = _import_optional("timm")
    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:5]
        raise ValueError(f"timm has no model {name!r}; close: {', '.join(close) or 'see timm.list_models()'}.")
    if weights is None:
        return timm.create_model(name, pretrained=False).eval()
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {weights} is not a local file; this tool never downloads weights.")
    check_weights_file(path)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}).eval()


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def load_data(spec: str, *, limit: int | None = None, image_size: int | None = None) -> Any:
    """A ``torch.utils.data.Dataset`` of float32 examples (and labels where there are any).

    Array files keep their order (``--limit`` takes the first N); an image folder is sampled across
    all its classes with a fixed seed and decoded only when a batch needs the image.
    """
    import torch

    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be positive; got {limit}.")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be positive; got {image_size}.")
    if spec.startswith("synthetic:"):
        shape = _parse_shape(spec.partition(":")[2], spec)
        n = limit if limit is not None else SYNTHETIC_DEFAULT_SIZE
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.TensorDataset(torch.randn(n, *shape, generator=g))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"data {spec} does not exist; give an image folder, a .npy/.npz file or synthetic:CxHxW."
        )
    if path.is_dir():
        return ImageFolder(path, limit=limit, image_size=image_size)
    if path.suffix.lower() not in (".npy", ".npz"):
        raise ValueError(f"cannot read data {spec}: give an image folder, a .npy/.npz file or synthetic:CxHxW.")
    x, y = _read_arrays(path)
    if x.ndim == 0:
        raise ValueError(
            f"data {spec} holds a single number (a 0-d array); save the examples as an array of shape (n, ...)."
        )
    if len(x) == 0:
        raise ValueError(f"data {spec} holds no examples (its first axis is empty).")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise ValueError(f"data {spec} holds {x.dtype} values; real numeric arrays are needed.")
    if limit is not None:
        x = x[:limit]
        y = y[:limit] if y is not None else None
    tensors = [torch.as_tensor(np.asarray(x, dtype=np.float32))]
    if y is not None:
        tensors.append(torch.as_tensor(np.asarray(y)))
    return torch.utils.data.TensorDataset(*tensors)


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The examples (and labels ``y`` of the same length, if any) of a .npy/.npz file; never unpickles."""
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False, mmap_mode="r"), None
        with np.load(path, allow_pickle=False) as arrays:
            keys = list(arrays.keys())
            if not keys:
                raise ValueError(f"data {path} holds no arrays.")
            key = next((k for k in ("x", "data", "images", "inputs") if k in keys), keys[0])
            x = arrays[key]
            labels = arrays["y"] if "y" in keys and key != "y" else None
            y = labels if labels is not None and labels.ndim >= 1 and x.ndim >= 1 and len(labels) == len(x) else None
            return x, y
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as error:
        if str(error).startswith(f"data {path}"):
            raise
        reason = (
            "it holds Python objects, which are never unpickled"
            if re.search("allow_pickle|Python objects", str(error))
            else _first_line(error)
        )
        raise ValueError(
            f"cannot read data {path}: {reason}; the file is damaged or not written by numpy.save/savez: write it again."
        ) from None


def _parse_shape(text: str, spec: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"cannot read the shape in {spec!r}; write it like synthetic:3x224x224.") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"the shape in {spec!r} must be positive integers, like synthetic:3x224x224.")
    return shape


class ImageFolder:
    """Images under ``root/<class>/`` as ``(3, H, W)`` float32 in [0, 1] with the class index as label.

    A map-style dataset (``__len__`` and ``__getitem__``), as ``torch.utils.data.DataLoader`` takes.

    With ``limit``, a seeded sample of ``limit`` images across all classes (in folder order);
    every image is decoded when a batch asks for it, never before. ``image_size`` resizes to a
    square; by default all images take the size of the first one sampled.
    """

    def __init__(self, root: Path, *, limit: int | None = None, image_size: int | None = None) -> None:
        from PIL import Image

        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"image folder {root} has no class subfolders (expected {root}/<class>/<image>).")
        files = [
            (file, label)
            for label, cls in enumerate(self.classes)
            for file in sorted((root / cls).iterdir())
            if file.suffix.lower() in _IMAGE_SUFFIXES
        ]
        if not files:
            raise ValueError(f"image folder {root} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))}).")
        if limit is not None and limit < len(files):
            chosen = np.random.default_rng(IMAGE_SAMPLE_SEED).choice(len(files), size=limit, replace=False)
            files = [files[i] for i in sorted(chosen)]
        self.files = files
        if image_size is not None:
            self.size = (image_size, image_size)
        else:
            try:
                with Image.open(files[0][0]) as first:  # reads the header only
                    self.size = first.size
            except Exception as error:
                raise self._decode_error(files[0][0], error) from None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import torch
        from PIL import Image

        file, label = self.files[index]
        try:
            with Image.open(file) as img:
                img = img.convert("RGB")
                if img.size != self.size:
                    img = img.resize(self.size)
                pixels = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        except Exception as error:
            raise self._decode_error(file, error) from None
        return torch.from_numpy(np.ascontiguousarray(pixels)), torch.tensor(label)

    @staticmethod
    def _decode_error(file: Path, error: Exception) -> ValueError:
        return ValueError(
            f"cannot decode image {file} ({type(error).__name__}: {_first_line(error)}); remove or replace the file."
        )
