"""The result of comparing two models: a CKA matrix with its layer names, saved, loaded and plotted.

A plain record (numpy only; no framework import): every frontend returns one, so results from
PyTorch, ONNX and JAX comparisons are saved, concatenated and plotted the same way. Plotting is a
leaf: matplotlib is imported inside :meth:`CKAResult.plot`, which returns the ``Axes`` and never calls
``plt.show()``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CKAResult"]

#: Tag written into every saved file, so :meth:`CKAResult.load` can tell our files from others.
_FORMAT = "cka-result"
_FORMAT_VERSION = 1
#: Heatmaps of at most this many cells get the value written into each cell.
_ANNOTATE_MAX_CELLS = 256
#: At most this many tick labels per axis; with more layers every k-th layer is labelled.
_MAX_TICK_LABELS = 60


@dataclass(frozen=True)
class CKAResult:
    """Minibatch CKA between the layers of two models, with what is needed to read it later.

    Attributes
    ----------
    matrix : (L1, L2) float64 numpy array
        ``matrix[i, j]`` is the CKA between layer ``model1_layers[i]`` and ``model2_layers[j]``;
        NaN where it is undefined (a constant layer). Read-only.
    model1_layers, model2_layers : tuple of str
        Layer names in row and column order.
    model1_name, model2_name : str
    n_examples : int
        Examples that entered the estimate (skipped batches excluded).
    settings : dict
        How it was computed (kernel, unbiased, batches, skipped batches, datasets); JSON-serialisable.

    Examples
    --------
    >>> r = CKAResult(np.eye(2), ("a", "b"), ("c", "d"), "m1", "m2", n_examples=8)
    >>> float(r.matrix[1, 1]), r.model2_layers
    (1.0, ('c', 'd'))
    """

    matrix: np.ndarray
    model1_layers: tuple[str, ...]
    model2_layers: tuple[str, ...]
    model1_name: str = "model1"
    model2_name: str = "model2"
    n_examples: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        matrix = np.array(self.matrix, dtype=np.float64)  # a copy: the record owns its data
        layers1, layers2 = tuple(str(s) for s in self.model1_layers), tuple(str(s) for s in self.model2_layers)
        if matrix.ndim != 2 or matrix.shape != (len(layers1), len(layers2)):
            raise ValueError(
                f"matrix must have shape (len(model1_layers), len(model2_layers)) = ({len(layers1)}, "
                f"{len(layers2)}); got shape {matrix.shape}."
            )
        for side, names in (("model1_layers", layers1), ("model2_layers", layers2)):
            duplicates = sorted({s for s in names if names.count(s) > 1})
            if duplicates:
                raise ValueError(f"{side} holds duplicate names {duplicates}; each layer may appear once.")
        matrix.setflags(write=False)
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "model1_layers", layers1)
        object.__setattr__(self, "model2_layers", layers2)
        object.__setattr__(self, "n_examples", int(self.n_examples))
        object.__setattr__(self, "settings", dict(self.settings))

    @property
    def shape(self) -> tuple[int, int]:
        """``(L1, L2)``."""
        return self.matrix.shape  # type: ignore[return-value]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CKAResult):
            return NotImplemented
        return (
            self.matrix.shape == other.matrix.shape
            and bool(np.array_equal(self.matrix, other.matrix, equal_nan=True))
            and self._metadata() == other._metadata()
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking contents; compare with ==

    def __repr__(self) -> str:
        return (
            f"CKAResult({self.model1_name} x {self.model2_name}: {self.shape[0]} x {self.shape[1]} layers, "
            f"{self.n_examples} examples)"
        )

    # ----------------------------------------------------------------------------------------
    # Conversion, saving and loading
    # ----------------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return {
            "model1_name": self.model1_name,
            "model2_name": self.model2_name,
            "model1_layers": list(self.model1_layers),
            "model2_layers": list(self.model2_layers),
            "n_examples": self.n_examples,
            "settings": self.settings,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain Python: ``{"model1_name", "model2_name", "model1_layers", "model2_layers", "matrix",
        "n_examples", "settings"}`` with ``matrix`` a list of rows of floats (NaN kept as ``nan``).
        (``CKA.export()`` gives torch_cka's dict, with the matrix under ``"CKA"``.)"""
        return {**self._metadata(), "matrix": self.matrix.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CKAResult":
        """Inverse of :meth:`to_dict` (``None`` entries read as NaN); also reads ``CKA.export()``'s
        dict, whose matrix is under ``"CKA"``."""
        data = dict(data)
        if "matrix" not in data and "CKA" in data:
            data["matrix"] = data["CKA"]
        missing = [k for k in ("matrix", "model1_layers", "model2_layers") if k not in data]
        if missing:
            raise ValueError(f"not a CKA result: keys {missing} are missing (found {sorted(data)}).")
        matrix_rows = data["matrix"]
        if hasattr(matrix_rows, "tolist"):  # a tensor or array
            matrix_rows = matrix_rows.tolist()
        rows = [[math.nan if v is None else float(v) for v in row] for row in matrix_rows]
        matrix = np.array(rows, dtype=np.float64).reshape(len(data["model1_layers"]), len(data["model2_layers"]))
        return cls(
            matrix,
            tuple(data["model1_layers"]),
            tuple(data["model2_layers"]),
            data.get("model1_name", "model1"),
            data.get("model2_name", "model2"),
            int(data.get("n_examples", 0)),
            dict(data.get("settings", {})),
        )

    def save(self, path: str | Path) -> Path:
        """Write the result to ``path``; the format follows the extension.

        ``.json``: everything, NaN as ``null`` (strict JSON). ``.npz``: the matrix as a float64 array
        plus names and metadata, no pickles. ``.csv``: a table with ``model1`` layers as rows and
        ``model2`` layers as columns, preceded by one ``# cka-result {json}`` metadata line (pandas:
        ``read_csv(path, comment="#", index_col=0)``). Every format round-trips exactly through
        :meth:`load` (floats written with ``repr``).
        """
        path = Path(path)
        suffix = path.suffix.lower()
        header = {"format": _FORMAT, "version": _FORMAT_VERSION}
        if suffix == ".json":
            data = {**header, **self._metadata(), "matrix": _nan_to_none(self.matrix)}
            path.write_text(json.dumps(data, indent=1, allow_nan=False))
        elif suffix == ".npz":
            meta = json.dumps({**header, **self._metadata()}, allow_nan=False)
            np.savez(
                path,
                matrix=self.matrix,
                model1_layers=np.array(self.model1_layers, dtype=str),
                model2_layers=np.array(self.model2_layers, dtype=str),
                metadata=np.array(meta),
            )
        elif suffix == ".csv":
            meta = {**header, **self._metadata()}
            del meta["model1_layers"], meta["model2_layers"]  # they are the table's labels
            buffer = io.StringIO()
            buffer.write(f"# {_FORMAT} {json.dumps(meta, allow_nan=False)}\n")
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow([f"{self.model1_name} \\ {self.model2_name}", *self.model2_layers])
            for name, row in zip(self.model1_layers, self.matrix):
                writer.writerow([name, *(repr(float(v)) for v in row)])
            path.write_text(buffer.getvalue())
        else:
            raise ValueError(f"cannot save a CKA result as {path.name!r}: use a .json, .npz or .csv extension.")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CKAResult":
        """Read a result written by :meth:`save` (format from the extension)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            data = json.loads(path.read_text())
            _check_format(data, path)
            return cls.from_dict(data)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if "metadata" not in archive.files:
                    raise ValueError(f"{path} is not a saved CKA result (no 'metadata' entry; found {archive.files}).")
                meta = json.loads(str(archive["metadata"]))
                _check_format(meta, path)
                return cls(
                    archive["matrix"],
                    tuple(archive["model1_layers"].tolist()),
                    tuple(archive["model2_layers"].tolist()),
                    meta["model1_name"],
                    meta["model2_name"],
                    meta["n_examples"],
                    meta["settings"],
                )
        if suffix == ".csv":
            lines = path.read_text().splitlines()
            prefix = f"# {_FORMAT} "
            if not lines or not lines[0].startswith(prefix):
                raise ValueError(f"{path} is not a saved CKA result: its first line should start with {prefix!r}.")
            meta = json.loads(lines[0][len(prefix):])
            _check_format(meta, path)
            rows = list(csv.reader(lines[1:]))
            return cls(
                np.array([[float(v) for v in row[1:]] for row in rows[1:]], dtype=np.float64).reshape(
                    len(rows) - 1, len(rows[0]) - 1
                ),
                tuple(row[0] for row in rows[1:]),
                tuple(rows[0][1:]),
                meta["model1_name"],
                meta["model2_name"],
                meta["n_examples"],
                meta["settings"],
            )
        raise ValueError(f"cannot load {path.name!r}: expected a .json, .npz or .csv file written by CKAResult.save.")

    # ----------------------------------------------------------------------------------------
    # Combining runs
    # ----------------------------------------------------------------------------------------

    @classmethod
    def concat(cls, results: Sequence["CKAResult"], axis: int = 0) -> "CKAResult":
        """Join runs over disjoint layer subsets of the same models and data into one result.

        For models too big to hook every layer at once: run ``compare`` several times with a few
        layers each and concatenate. ``axis=0`` stacks rows (different ``model1_layers``, the same
        ``model2_layers``); ``axis=1`` joins columns. For a grid of runs, concatenate each row of
        runs along ``axis=1`` and the results along ``axis=0``.

        Raises
        ------
        ValueError
            If the runs differ in the shared axis's layers, model names, number of examples or
            settings (they would not be one comparison), or select a layer twice.
        """
        results = list(results)
        if axis not in (0, 1):
            raise ValueError(f"axis must be 0 (stack model1 layers) or 1 (join model2 layers); got {axis!r}.")
        if not results:
            raise ValueError("concat needs at least one CKAResult.")
        for i, r in enumerate(results):
            if not isinstance(r, CKAResult):
                raise TypeError(f"results[{i}] is a {type(r).__name__}, not a CKAResult.")
        first = results[0]
        shared = "model2_layers" if axis == 0 else "model1_layers"
        for i, r in enumerate(results[1:], start=1):
            for key in (shared, "model1_name", "model2_name", "n_examples", "settings"):
                if getattr(r, key) != getattr(first, key):
                    raise ValueError(
                        f"results[{i}] cannot be concatenated with results[0] along axis {axis}: their {key} "
                        f"differ ({getattr(first, key)!r} vs {getattr(r, key)!r}); concatenate runs of the "
                        f"same models on the same data that share {shared}."
                    )
        joined = "model1_layers" if axis == 0 else "model2_layers"
        names = [name for r in results for name in getattr(r, joined)]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"layers {repeated} appear in more than one result; concatenate disjoint layer subsets.")
        matrix = np.concatenate([r.matrix for r in results], axis=axis)
        layers = {joined: tuple(names), shared: getattr(first, shared)}
        return cls(
            matrix, layers["model1_layers"], layers["model2_layers"], first.model1_name, first.model2_name,
            first.n_examples, first.settings,
        )

    # ----------------------------------------------------------------------------------------
    # Plotting
    # ----------------------------------------------------------------------------------------

    def plot(
        self,
        ax: Any = None,
        *,
        title: str | None = None,
        annotate: bool | None = None,
        cmap: str = "magma",
        vmin: float | None = None,
        vmax: float = 1.0,
        colorbar: bool = True,
        fmt: str = ".2f",
    ) -> Any:
        """Heatmap of the CKA matrix: ``model1`` layers on the vertical axis (first layer at the
        bottom, as torch_cka draws it), ``model2`` layers on the horizontal one, model names as axis
        titles, a colorbar, NaN cells grey.

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Where to draw; by default a new figure sized to the number of layers.
        title : str, optional
            Default ``"<model1_name> vs <model2_name>"``.
        annotate : bool, optional
            Write each value into its cell; by default only when there are at most 256 cells.
        cmap, vmin, vmax, fmt
            Colormap, colour range (``vmin`` defaults to ``min(0, min value)``) and annotation format.
        colorbar : bool

        Returns
        -------
        matplotlib.axes.Axes
            Never calls ``plt.show()``; save with ``ax.figure.savefig(path)``.
        """
        plt = _pyplot()
        rows, cols = self.shape
        if ax is None:
            width = min(4.0 + 0.16 * cols, 40.0)
            height = min(3.0 + 0.16 * rows, 40.0)
            _, ax = plt.subplots(figsize=(max(width, 5.0), max(height, 4.0)), layout="constrained")
        finite = self.matrix[np.isfinite(self.matrix)]
        if vmin is None:
            vmin = min(0.0, float(finite.min())) if finite.size else 0.0
        colormap = plt.get_cmap(cmap).with_extremes(bad="lightgrey")
        image = ax.imshow(
            np.ma.masked_invalid(self.matrix), origin="lower", cmap=colormap, vmin=vmin, vmax=vmax,
            aspect="auto", interpolation="nearest",
        )
        _label_axis(ax.set_xticks, ax.set_xticklabels, self.model2_layers, rotation=90)
        _label_axis(ax.set_yticks, ax.set_yticklabels, self.model1_layers, rotation=0)
        ax.set_xlabel(f"Layers {self.model2_name}")
        ax.set_ylabel(f"Layers {self.model1_name}")
        ax.set_title(title if title is not None else f"{self.model1_name} vs {self.model2_name}")
        if annotate is None:
            annotate = rows * cols <= _ANNOTATE_MAX_CELLS
        if annotate:
            middle = (vmin + vmax) / 2
            size = max(5.0, min(10.0, 120.0 / max(rows, cols)))
            for i in range(rows):
                for j in range(cols):
                    v = self.matrix[i, j]
                    text = "nan" if math.isnan(v) else format(v, fmt)
                    color = "black" if (not math.isnan(v) and v > middle) else "white"
                    ax.text(j, i, text, ha="center", va="center", color=color, fontsize=size)
        if colorbar:
            ax.figure.colorbar(image, ax=ax, label="CKA", fraction=0.046, pad=0.02)
        return ax


    def save_plot(self, path: str | Path, *, dpi: int = 120, **plot_kwargs: Any) -> Path:
        """Draw :meth:`plot` into a new figure, save it to ``path`` (PNG, PDF, SVG by extension) and
        close the figure; returns the path."""
        plt = _pyplot()
        ax = self.plot(**plot_kwargs)
        try:
            ax.figure.savefig(path, dpi=dpi, bbox_inches="tight")
        finally:
            plt.close(ax.figure)
        return Path(path)


def _label_axis(set_ticks: Any, set_labels: Any, names: Sequence[str], rotation: int) -> None:
    """Tick every layer when there are few, every k-th when there are many (readable at 100+)."""
    step = max(1, math.ceil(len(names) / _MAX_TICK_LABELS))
    positions = list(range(0, len(names), step))
    size = max(4.0, min(9.0, 360.0 / max(len(positions), 1)))
    set_ticks(positions)
    set_labels([names[p] for p in positions], rotation=rotation, fontsize=size)


def _nan_to_none(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if math.isnan(v) else float(v) for v in row] for row in matrix.tolist()]


def _check_format(meta: Mapping[str, Any], path: Path) -> None:
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a saved CKA result (format tag {meta.get('format')!r}, expected {_FORMAT!r}).")
    if meta.get("version", 0) > _FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer cka (format version {meta['version']}); upgrade cka to read it."
        )


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or pip install 'cka[plot]').") from error
    return plt
