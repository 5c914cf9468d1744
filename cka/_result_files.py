"""Reading and writing :class:`~cka.result.CKAResult` files (.json, .npz, .csv), never trusting them.

A file is data from outside: every value read is checked for its kind and shape before a record
is built, and anything wrong (not our format, a truncated archive, a missing key, a list where a
number belongs, a matrix whose shape disagrees with the recorded layers) is a ``ValueError`` that
names the file and what is wrong, never an error from deep inside or a silent broadcast. No format
holds pickles (``np.load(..., allow_pickle=False)``).
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cka.result import BEST_MATCH_P_VALUES, STATISTICS, decode_floats, encode_floats

if TYPE_CHECKING:
    from cka.result import CKAResult

__all__ = ["load_fields", "record_fields", "save_result"]

#: Tag written into every saved file, so that loading can tell our files from others.
FORMAT = "cka-result"
FORMAT_VERSION = 1
_SUFFIXES = (".json", ".npz", ".csv")
_CSV_PREFIX = f"# {FORMAT} "
#: Characters that make a csv cell need quotes (csv's own minimal quoting misses a lone ``\r``).
_CSV_SPECIAL = (",", '"', "\r", "\n")


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------


def save_result(result: CKAResult, path: Path) -> Path:
    """Write ``result`` to ``path`` in the format its extension names; returns ``path``."""
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"cannot save a CKA result as {path.name!r}: use a .json, .npz or .csv extension.")
    if path.is_dir():
        raise ValueError(
            f"cannot save a CKA result to {path}: it is a directory; give a file name such as {path / ('cka' + suffix)}."
        )
    header = {"format": FORMAT, "version": FORMAT_VERSION}
    metadata = encode_floats(result._metadata())
    statistics = {key: _encode_array(value) for key, value in result.statistics.items()}
    if suffix == ".json":
        data = {**header, **metadata, "matrix": _encode_array(result.matrix), **statistics}
        path.write_text(json.dumps(data, indent=1, allow_nan=False), encoding="utf-8")
    elif suffix == ".npz":
        # names also as str arrays for np.load users; the metadata keeps them exactly (a str array
        # drops trailing NUL characters)
        arrays: dict[str, Any] = {
            "matrix": result.matrix,
            "model1_layers": np.array(result.model1_layers, dtype=str),
            "model2_layers": np.array(result.model2_layers, dtype=str),
            "metadata": np.array(json.dumps({**header, **metadata}, allow_nan=False)),
            **result.statistics,
        }
        np.savez(path, **arrays)
    else:
        _check_csv_names(result)
        meta = {**header, **metadata, "shape": list(result.shape), "statistics": statistics}
        del meta["model1_layers"], meta["model2_layers"]  # they are the table's labels
        lines = [f"{_CSV_PREFIX}{json.dumps(meta, allow_nan=False)}"]
        lines.append(
            ",".join(
                [_csv_cell(f"{result.model1_name} \\ {result.model2_name}"), *map(_csv_cell, result.model2_layers)]
            )
        )
        for name, row in zip(result.model1_layers, result.matrix, strict=True):
            lines.append(",".join([_csv_cell(name), *(repr(float(v)) for v in row)]))
        with open(path, "w", encoding="utf-8", newline="") as file:
            file.write("\n".join(lines) + "\n")
    return path


def _encode_array(array: np.ndarray) -> list[Any]:
    """Nested lists of floats; NaN as ``None``, infinities as ``"inf"`` / ``"-inf"`` (strict JSON)."""

    def cell(v: float) -> float | str | None:
        return None if math.isnan(v) else (repr(v) if math.isinf(v) else v)

    return [cell(v) for v in array.tolist()] if array.ndim == 1 else [[cell(v) for v in row] for row in array.tolist()]


def _csv_cell(text: str) -> str:
    if any(c in text for c in _CSV_SPECIAL):
        return '"' + text.replace('"', '""') + '"'
    return text


def _check_csv_names(result: CKAResult) -> None:
    """A .csv file is UTF-8 text: a lone surrogate (possible in a Python str) cannot be written."""
    for side in ("model1_layers", "model2_layers"):
        for name in getattr(result, side):
            bad = next((c for c in name if 0xD800 <= ord(c) <= 0xDFFF), None)
            if bad is not None:
                raise ValueError(
                    f"cannot save layer {name!r} of {side} in a .csv file: it holds the lone surrogate "
                    f"{bad!r}, which UTF-8 text cannot hold; save as .json or .npz, or rename the layer."
                )


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def load_fields(path: Path) -> dict[str, Any]:
    """The checked constructor arguments of the result saved at ``path``."""
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"cannot load {path.name!r}: expected a .json, .npz or .csv file written by CKAResult.save.")
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory, not a CKA result file; give the path of the file written by CKAResult.save."
        )
    if not path.exists():
        raise FileNotFoundError(f"no CKA result file at {path}; check the path.")
    source = f"CKA result file {path}"
    if suffix == ".json":
        data = _json_object(_read_text(path, source), source, "the file")
        _check_format(data, source)
        return record_fields(data, source)
    if suffix == ".npz":
        return _npz_fields(path, source)
    return _csv_fields(path, source)


def _read_text(path: Path, source: str) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as file:
            return file.read()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{source} is not UTF-8 text ({error.reason} at byte {error.start}); it is not a saved CKA result."
        ) from None


def _json_object(text: str, source: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{source}: {what} is not valid JSON ({error.msg} at line {error.lineno}, column "
            f"{error.colno}); the file may be truncated: save the result again."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{source}: {what} holds a JSON {type(data).__name__}, not an object; it is not a saved CKA result."
        )
    return data


def _check_format(meta: Mapping[str, Any], source: str) -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{source} is not a saved CKA result (format tag {meta.get('format')!r}, expected {FORMAT!r})."
        )
    version = meta.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{source}: 'version' must be an integer; got {version!r}.")
    if version > FORMAT_VERSION:
        raise ValueError(f"{source} was written by a newer cka (format version {version}); upgrade cka to read it.")


def _npz_fields(path: Path, source: str) -> dict[str, Any]:
    wanted = {"matrix", "metadata", "model1_layers", "model2_layers", *STATISTICS, *BEST_MATCH_P_VALUES}
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array (a .npy file), not an archive")
        with archive:
            arrays = {key: archive[key] for key in archive.files if key in wanted}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"{source} is not a readable .npz archive ({error}); it may be truncated: save the result again."
        ) from None
    if "metadata" not in arrays:
        raise ValueError(f"{source} is not a saved CKA result (no 'metadata' entry).")
    meta_array = arrays.pop("metadata")
    if meta_array.shape != () or meta_array.dtype.kind != "U":
        raise ValueError(
            f"{source}: 'metadata' must be a single string; got an array of shape {meta_array.shape}, dtype {meta_array.dtype}."
        )
    meta = _json_object(str(meta_array), source, "its 'metadata' entry")
    _check_format(meta, source)
    names = {
        side: meta.get(side, arrays.get(side)) for side in ("model1_layers", "model2_layers")
    }  # older files: arrays only
    return record_fields({**meta, **arrays, **{k: v for k, v in names.items() if v is not None}}, source)


def _csv_fields(path: Path, source: str) -> dict[str, Any]:
    import csv

    text = _read_text(path, source)
    first, _, body = text.partition("\n")
    first = first.removesuffix("\r")
    if not first.startswith(_CSV_PREFIX):
        raise ValueError(f"{source} is not a saved CKA result: its first line should start with {_CSV_PREFIX!r}.")
    meta = _json_object(first[len(_CSV_PREFIX) :], source, "its metadata line")
    _check_format(meta, source)
    if not body:
        raise ValueError(
            f"{source} has no table after its metadata line; the file may be truncated: save the result again."
        )
    if not body.endswith("\n"):  # every table we write ends with a line break: a cut file does not
        raise ValueError(f"{source} ends in the middle of a line: it is truncated; save the result again.")
    try:
        rows = list(csv.reader(io.StringIO(body, newline="")))
    except csv.Error as error:
        raise ValueError(f"{source}: the table is not valid csv ({error}).") from None
    header, rows = rows[0], rows[1:]
    for number, row in enumerate(rows, start=3):
        if len(row) != len(header):
            raise ValueError(
                f"{source}: line {number} has {len(row)} cells but the header has {len(header)}; the file "
                f"is truncated or was edited: save the result again."
            )
    matrix: list[list[Any]] = []
    for number, row in enumerate(rows, start=3):
        try:
            matrix.append([float(v) for v in row[1:]])
        except ValueError:
            raise ValueError(f"{source}: line {number} holds a cell that is not a number: {row[1:]!r}.") from None
    recorded = meta.pop("shape", None)
    if recorded is not None and recorded != [len(rows), len(header) - 1]:
        raise ValueError(
            f"{source}: the table has {len(rows)} x {len(header) - 1} cells but the file records {recorded}; it is "
            f"truncated or was edited: save the result again."
        )
    statistics = meta.pop("statistics", {})
    if not isinstance(statistics, dict):
        raise ValueError(f"{source}: 'statistics' must be an object; got {type(statistics).__name__}.")
    fields = {**meta, **statistics, "model1_layers": [row[0] for row in rows], "model2_layers": header[1:]}
    fields["matrix"] = np.array(matrix, dtype=np.float64).reshape(len(rows), len(header) - 1)
    return record_fields(fields, source)


# ------------------------------------------------------------------------------------------------
# From plain values to checked constructor arguments
# ------------------------------------------------------------------------------------------------


def record_fields(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check the values of a saved (or ``to_dict``) result and return ``CKAResult``'s arguments."""
    missing = [k for k in ("matrix", "model1_layers", "model2_layers") if k not in data]
    if missing:
        raise ValueError(f"{source} is not a CKA result: keys {missing} are missing (found {sorted(map(str, data))}).")
    layers1 = _names(data["model1_layers"], "model1_layers", source)
    layers2 = _names(data["model2_layers"], "model2_layers", source)
    shape = (len(layers1), len(layers2))
    fields: dict[str, Any] = {
        "matrix": _array(data["matrix"], "matrix", shape, source),
        "model1_layers": layers1,
        "model2_layers": layers2,
        "model1_name": _text(data.get("model1_name", "model1"), "model1_name", source),
        "model2_name": _text(data.get("model2_name", "model2"), "model2_name", source),
        "n_examples": _count(data.get("n_examples", 0), "n_examples", source),
    }
    settings = data.get("settings", {})
    if not isinstance(settings, Mapping):
        raise ValueError(f"{source}: 'settings' must be an object (a dict); got {type(settings).__name__}.")
    fields["settings"] = decode_floats(dict(settings))
    for key in STATISTICS:
        if data.get(key) is not None:
            fields[key] = _array(data[key], key, shape, source)
    for key, length in zip(BEST_MATCH_P_VALUES, shape, strict=True):
        if data.get(key) is not None:
            fields[key] = _array(data[key], key, (length,), source)
    return fields


def _names(value: Any, key: str, source: str) -> tuple[str, ...]:
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{source}: {key!r} must be a list of layer names (strings); got {_describe(value)}.")
    return tuple(value)


def _text(value: Any, key: str, source: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{source}: {key!r} must be a string; got {_describe(value)}.")
    return value


def _count(value: Any, key: str, source: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{source}: {key!r} must be a non-negative integer; got {_describe(value)}.")
    return int(value)


def _array(value: Any, key: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    """A float64 array of exactly ``shape`` from an array, a tensor or nested lists (NaN as None)."""
    if hasattr(value, "detach"):  # a tensor (CKA.export()'s "CKA")
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise ValueError(f"{source}: {key!r} must hold numbers; got an array of dtype {value.dtype}.")
        array = value.astype(np.float64)
    else:
        cells = _cells(value, key, len(shape), source)
        array = np.array(cells, dtype=np.float64) if cells else np.empty((0, *shape[1:]))
    if array.shape != shape:
        layers = "the recorded layers (model1_layers x model2_layers)" if len(shape) == 2 else "the recorded layers"
        raise ValueError(
            f"{source}: {key!r} has shape {array.shape} but {layers} make {shape}; the file is inconsistent."
        )
    return array


def _cells(value: Any, key: str, ndim: int, source: str) -> Any:
    """Nested lists of floats of depth ``ndim`` from JSON values (``None`` and ``"nan"`` as NaN)."""
    if ndim == 0:
        if value is None:
            return math.nan
        if isinstance(value, str) and value in ("nan", "inf", "-inf"):
            return float(value)
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{source}: {key!r} holds {_describe(value)} where a number belongs.")
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"{source}: {key!r} must be {'a list of rows' if ndim == 2 else 'a list'} of numbers; got {_describe(value)}."
        )
    rows = [_cells(v, key, ndim - 1, source) for v in value]
    if ndim == 2 and len({len(r) for r in rows}) > 1:
        raise ValueError(f"{source}: the rows of {key!r} have different lengths {sorted({len(r) for r in rows})}.")
    return rows


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
