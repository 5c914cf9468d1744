"""Checking model files before they are loaded: nothing in an untrusted file is unpickled or run.

``torch.export.load`` is not a data reader. A ``.pt2`` archive can make it unpickle weights,
constants and custom objects (``torch.load(..., weights_only=False)``, ``pickle.loads``), fall back
to full unpickling when its sample inputs are not plain tensors, load compiled AOTInductor
libraries, ``exec`` the program's ``guards_code`` strings and ``eval`` its symbolic-shape
expressions through ``sympy.sympify``: each of these ran a shell command from a crafted file in
our tests. :func:`read_exported_program` therefore reads the archive into memory once, checks it
against what ``torch.export.save`` writes for a plain model (an allow-list: known entries only,
weights and constants as raw tensor bytes, sample inputs readable by torch's ``weights_only``
unpickler, graph targets that are registered operators, guards and shape expressions made of
arithmetic on shape symbols) and only then hands the same bytes to ``torch.export.load``.
Anything else is refused with the reason, unless the caller trusts the file (``trust_code``).

TorchScript files are run by TorchScript's own interpreter, which cannot reach Python; a file that
is not TorchScript (a ``torch.save`` pickle) is refused before ``torch.jit.load`` sees it.
"""

from __future__ import annotations

import ast
import io
import json
import math
import re
import tokenize
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["UntrustedModelError", "check_torchscript_archive", "check_weights_file", "read_exported_program"]

TRUST_HINT = "if you trust whoever made the file, pass --trust-code to load it as PyTorch would (it may run code)"


class UntrustedModelError(ValueError):
    """A model file holds something that would run code when loaded (refused unless trusted)."""


def _refuse(path: Path | str, why: str, fix: str) -> UntrustedModelError:
    return UntrustedModelError(
        f"{path} is refused: {why}; loading it could run code from the file. To fix: {fix}; {TRUST_HINT}."
    )


# ------------------------------------------------------------------------------------------------
# torch.export archives (.pt2)
# ------------------------------------------------------------------------------------------------

#: Entries of a plain ``torch.export.save`` archive, relative to its root folder.
_PT2_ENTRIES = [
    re.compile(p)
    for p in (
        r"archive_format",
        r"archive_version",
        r"byteorder",
        r"version",
        r"\.data/version",
        r"\.data/serialization_id",
        r"models/[\w.-]+\.json",
        r"data/weights/[\w.-]+_weights_config\.json",
        r"data/weights/weight_\d+",
        r"data/constants/[\w.-]+_constants_config\.json",
        r"data/constants/tensor_\d+",
        r"data/sample_inputs/[\w.-]+\.pt",
        r"extra/[^/]+",
    )
]
_REEXPORT = "re-export the model with torch.export.save from a model whose weights are plain tensors"


def read_exported_program(path: Path, *, trust_code: bool = False) -> Any:
    """``torch.export.load(path)`` after :func:`check_pt2_archive` (skipped when ``trust_code``).

    The file is read once; the checked bytes are the bytes loaded (no window in which the file
    could change between the check and the load).
    """
    import torch

    data = path.read_bytes()
    if not trust_code:
        check_pt2_archive(data, path)
    try:
        return torch.export.load(io.BytesIO(data))
    except UntrustedModelError:
        raise
    except Exception as error:  # torch's own errors on a damaged or foreign archive
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"{path} could not be loaded by torch.export.load ({type(error).__name__}: {first}); save it again "
            f"with torch.export.save in torch {torch.__version__}."
        ) from None


def check_pt2_archive(data: bytes, path: Path | str) -> None:
    """Raise :class:`UntrustedModelError` unless the archive holds only what loads without running code."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except zipfile.BadZipFile:
        raise ValueError(
            f"{path} is not a torch.export archive (not a zip file); save the model with torch.export.save."
        ) from None
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise ValueError(
            f"{path} is not a torch.export archive (expected one root folder); save it with torch.export.save."
        )
    root = roots.pop()
    entries = {name[len(root) + 1 :]: name for name in names if not name.endswith("/")}
    if "archive_format" not in entries:
        raise ValueError(
            f"{path} is not a torch.export archive (no archive_format entry); save it with torch.export.save."
        )
    for entry in entries:
        if not any(p.fullmatch(entry) for p in _PT2_ENTRIES):
            kind = (
                "compiled code"
                if entry.startswith(("data/aotinductor", "data/executorch", "data/mtia"))
                or entry.endswith((".so", ".dll", ".dylib"))
                else "an entry torch.export.save does not write for a plain model"
            )
            raise _refuse(path, f"it holds {entry!r} ({kind})", _REEXPORT)
    for entry, name in entries.items():
        if entry.endswith(("_weights_config.json", "_constants_config.json")):
            _check_payload_config(_json(archive.read(name), path, entry), path, entry)
        elif entry.startswith("data/sample_inputs/"):
            _check_sample_inputs(archive.read(name), path, entry)
        elif entry.startswith("models/"):
            _check_program(_json(archive.read(name), path, entry), path, entry)


def _json(raw: bytes, path: Path | str, entry: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path}: its entry {entry!r} is not valid JSON ({error}); the archive is damaged: save it again."
        ) from None


def _check_payload_config(config: Any, path: Path | str, entry: str) -> None:
    """Weights and constants: raw tensor bytes only (``use_pickle`` false, tensor file names)."""
    items = config.get("config") if isinstance(config, dict) else None
    if not isinstance(items, dict):
        raise ValueError(
            f"{path}: {entry!r} is not a torch.export payload config; the archive is damaged: save it again."
        )
    for fqn, meta in items.items():
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: {entry!r} entry {fqn!r} is not a payload description; save the model again.")
        if meta.get("use_pickle") is not False:
            raise _refuse(
                path, f"its {fqn!r} is stored as a pickle ({entry})", _REEXPORT + " (tensor subclasses are pickled)"
            )
        if not re.fullmatch(r"(weight|tensor)_\d+", str(meta.get("path_name"))):
            raise _refuse(
                path,
                f"its {fqn!r} is a custom or opaque object ({meta.get('path_name')!r}), which is pickled",
                _REEXPORT,
            )


def _check_sample_inputs(raw: bytes, path: Path | str, entry: str) -> None:
    """torch.export.load reads these with ``weights_only=True`` and, on failure, unpickles them fully:
    they must load with the restricted unpickler (tensors and plain containers, no code)."""
    import torch

    if not raw:
        return
    try:
        torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as error:
        raise _refuse(
            path,
            f"its sample inputs ({entry}) are not plain tensors ({_unpickling_reason(error)})",
            "re-export with torch.export.export(model, (tensor_example,)) and torch.export.save",
        ) from None


#: ``operator`` module functions a graph may call (torch.export's symbolic-int arithmetic and getitem).
_OPERATOR_NAMES = {
    "getitem",
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "neg",
    "pos",
    "abs",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and_",
    "or_",
    "xor",
    "not_",
    "invert",
    "lshift",
    "rshift",
    "matmul",
}


def _check_program(program: Any, path: Path | str, entry: str) -> None:
    """Graph targets must be registered operators; guards and shape expressions plain arithmetic."""
    if not isinstance(program, dict):
        raise ValueError(f"{path}: {entry!r} is not a serialized program; the archive is damaged: save it again.")
    for guard in program.get("guards_code") or []:
        if not isinstance(guard, str) or not _is_plain_guard(guard):
            raise _refuse(
                path,
                f"its guards_code holds {str(guard)[:80]!r}, which is executed as Python on load "
                "and is not a plain shape check",
                _REEXPORT,
            )
    for key in program.get("range_constraints") or {}:
        if not _is_shape_expression(key):
            raise _refuse(
                path, f"its range constraint {key[:80]!r} is not a shape symbol (it is evaluated on load)", _REEXPORT
            )
    for key, value in _walk(program):
        if key == "target" and isinstance(value, str) and not _is_operator(value):
            raise _refuse(
                path, f"its graph calls {value[:80]!r}, which is not a registered PyTorch operator", _REEXPORT
            )
        if key == "expr_str" and isinstance(value, str) and not _is_shape_expression(value):
            raise _refuse(
                path,
                f"its shape expression {value[:80]!r} is not arithmetic on shape symbols "
                "(sympy evaluates it as Python on load)",
                _REEXPORT,
            )


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                yield key, child
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def _is_operator(target: str) -> bool:
    """``torch.ops.<ns>.<op>.<overload>`` / ``torch.ops.higher_order.<op>`` resolving to an operator,
    an arithmetic function of ``operator`` or ``math``, or one of torch's ``sym_*`` functions."""
    import torch

    parts = target.split(".")
    if any(not p.isidentifier() or p.startswith("__") for p in parts):
        return False
    if parts[0] == "_operator":
        return len(parts) == 2 and parts[1] in _OPERATOR_NAMES
    if parts[0] == "math":
        return len(parts) == 2 and not parts[1].startswith("_") and callable(getattr(math, parts[1], None))
    if parts[:2] == ["torch", "ops"] and len(parts) in (4, 5):
        resolved: Any = torch.ops
        try:
            for part in parts[2:]:
                resolved = getattr(resolved, part)
        except (AttributeError, RuntimeError):
            return False
        return isinstance(resolved, (torch._ops.OpOverload, torch._ops.HigherOrderOperator))
    if parts[0] == "torch" and len(parts) == 2:
        return re.fullmatch(r"_?sym_[a-z_]+", parts[1]) is not None and callable(getattr(torch, parts[1], None))
    return False


#: Names a symbolic-shape expression may use besides shape symbols (``s0``, ``u3``): sympy and
#: torch.utils._sympy function names (capitalised) and the assumptions of ``Symbol(...)``.
_SHAPE_KEYWORDS = {
    "positive",
    "integer",
    "real",
    "nonnegative",
    "negative",
    "finite",
    "True",
    "False",
    "oo",
    "zoo",
    "nan",
}
_SHAPE_OPERATORS = {
    "+",
    "-",
    "*",
    "/",
    "//",
    "%",
    "**",
    "(",
    ")",
    ",",
    "<",
    ">",
    "<=",
    ">=",
    "==",
    "!=",
    "=",
    "&",
    "|",
    "~",
}


def _is_shape_expression(text: str) -> bool:
    """Arithmetic on shape symbols only: numbers, operators, symbols such as ``s31``, capitalised
    sympy functions (``Max``, ``FloorDiv``, ``Symbol``), their assumptions, and quoted symbol names.
    No attribute access, subscripts, lambdas or other strings: nothing sympify's ``eval`` could
    turn into a call of Python's own functions."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return False
    for token in tokens:
        kind, value = token.type, token.string
        if kind in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER) or (
            kind == tokenize.INDENT and not value.strip()
        ):
            continue
        if kind == tokenize.NUMBER:
            continue
        if kind == tokenize.OP and value in _SHAPE_OPERATORS:
            continue
        if kind == tokenize.NAME and (
            value in _SHAPE_KEYWORDS or re.fullmatch(r"[a-z]+\d+", value) or re.fullmatch(r"[A-Z][A-Za-z0-9]*", value)
        ):
            continue
        if kind == tokenize.STRING and re.fullmatch(r"'[a-z]+\d+'|\"[a-z]+\d+\"", value):
            continue
        return False
    return True


_GUARD_NODES = (
    ast.Expression,
    ast.Compare,
    ast.BoolOp,
    ast.BinOp,
    ast.UnaryOp,
    ast.Constant,
    ast.Subscript,
    ast.Name,
    ast.Attribute,
    ast.Call,
    ast.Load,
    ast.Tuple,
    ast.List,
    ast.cmpop,
    ast.boolop,
    ast.operator,
    ast.unaryop,
)
_GUARD_ATTRIBUTES = {"size", "stride", "storage_offset", "dim", "shape", "dtype", "device", "numel", "inf", "nan"}


def _is_plain_guard(text: str) -> bool:
    """A guard such as ``L['x'].size()[0] >= 2``: comparisons and arithmetic over the inputs' sizes.
    Names are only ``L`` (the inputs), ``math``/``inf`` and capitalised sympy functions; calls only
    of size-like methods or those functions; no name or attribute with an underscore prefix."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _GUARD_NODES):
            return False
        if isinstance(node, ast.Name) and not (
            node.id in {"L", "math", "inf"} or re.fullmatch(r"[A-Z][A-Za-z0-9]*", node.id)
        ):
            return False
        if isinstance(node, ast.Attribute) and node.attr not in _GUARD_ATTRIBUTES:
            return False
        if isinstance(node, ast.Call):
            func = node.func
            if not (
                (isinstance(func, ast.Attribute) and func.attr in _GUARD_ATTRIBUTES)
                or (isinstance(func, ast.Name) and re.fullmatch(r"[A-Z][A-Za-z0-9]*", func.id))
            ):
                return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not node.value.isidentifier():
            return False
    return True


# ------------------------------------------------------------------------------------------------
# TorchScript archives and weight files
# ------------------------------------------------------------------------------------------------


def check_torchscript_archive(path: Path) -> None:
    """A TorchScript archive is a zip with ``code/`` and ``constants.pkl`` (read by TorchScript's own
    unpickler, which reaches no Python); a ``torch.save`` pickle (a whole pickled ``nn.Module``) is not."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        names = []
    if not any("/code/" in n for n in names) or not any(n.endswith("/constants.pkl") for n in names):
        raise UntrustedModelError(
            f"{path} is not a TorchScript file (it looks like a torch.save pickle); pickled models are never loaded "
            f"(unpickling runs arbitrary code): save with torch.jit.save / torch.export.save, or name a factory as "
            f"path/to/models.py:make_model."
        )


def check_weights_file(path: Path) -> None:
    """A weights file must be safetensors or load with torch's ``weights_only`` unpickler (tensors only)."""
    import torch

    if path.suffix == ".safetensors":
        return
    try:
        torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:
        raise UntrustedModelError(
            f"weights file {path} is refused: it holds more than tensors ({_unpickling_reason(error)}); loading it would unpickle "
            f"arbitrary objects. Use a safetensors file or a state_dict saved with torch.save(model.state_dict(), ...)."
        ) from None


def _unpickling_reason(error: Exception) -> str:
    """The useful part of torch's ``weights_only`` refusal: the global it would have imported."""
    text = str(error)
    found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", text)
    if found:
        return f"it would import and call {found.group(1)}"
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("Weights only load failed")]
    return (lines or [type(error).__name__])[0][:160]
