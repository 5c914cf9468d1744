"""The result of comparing two models: a CKA matrix with its layer names, saved, loaded and plotted.

A plain record (numpy only; no framework import): every frontend returns one, so results from
PyTorch, ONNX and JAX comparisons are saved, concatenated and plotted the same way. Besides the
matrix it can carry per-cell statistics (confidence intervals, permutation p-values, the null mean
and the calibrated score) and the best-match p-values of each row and column; they are plain fields
here, computed by the comparer. Reading and writing the files lives in :mod:`cka._result_files`.
Plotting is a leaf: matplotlib is imported inside :meth:`CKAResult.plot`, which returns the
``Axes`` and never calls ``plt.show()``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BEST_MATCH_P_VALUES", "STATISTICS", "CKAResult"]

#: Per-cell statistics, each an ``(L1, L2)`` float64 array like ``matrix`` (or ``None``).
STATISTICS = ("ci_low", "ci_high", "p_value", "null_mean", "calibrated")
#: Best-match p-values: of each row's maximum ``(L1,)`` and of each column's maximum ``(L2,)``.
BEST_MATCH_P_VALUES = ("p_value_best_row", "p_value_best_col")
#: Heatmaps of at most this many cells get the value written into each cell.
_ANNOTATE_MAX_CELLS = 256
#: ... and at most this many get the confidence interval written under the value.
_INTERVAL_MAX_CELLS = 64
#: At most this many tick labels per axis; with more layers every k-th layer is labelled.
_MAX_TICK_LABELS = 60
#: ``repr`` of an object without its own: ``<Foo object at 0x7f...>``; the address is not data.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


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
        How it was computed (kernel, unbiased, batches, skipped batches, what identifies the data).
        Stored as plain Python: numpy scalars and arrays, tensors and tuples become numbers and
        lists; NaN and infinities are kept (and saved explicitly, as JSON has neither); any other
        object becomes its ``str``, without a memory address.
    ci_low, ci_high : (L1, L2) float64 numpy array or None, keyword-only
        Bounds of each cell's confidence interval (bootstrap over batches).
    p_value : (L1, L2) float64 numpy array or None, keyword-only
        Each cell's permutation p-value (the null: the two layers are independent).
    null_mean : (L1, L2) float64 numpy array or None, keyword-only
        Each cell's mean CKA under the permutation null.
    calibrated : (L1, L2) float64 numpy array or None, keyword-only
        ``(matrix - null_mean) / (1 - null_mean)``: 0 in expectation under the null, 1 at 1.
    p_value_best_row : (L1,) float64 numpy array or None, keyword-only
        P-value of each row's best match against the null distribution of the row's maximum.
    p_value_best_col : (L2,) float64 numpy array or None, keyword-only
        The same for each column.

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
    _: KW_ONLY
    ci_low: np.ndarray | None = None
    ci_high: np.ndarray | None = None
    p_value: np.ndarray | None = None
    null_mean: np.ndarray | None = None
    calibrated: np.ndarray | None = None
    p_value_best_row: np.ndarray | None = None
    p_value_best_col: np.ndarray | None = None

    def __post_init__(self) -> None:
        layers1, layers2 = tuple(str(s) for s in self.model1_layers), tuple(str(s) for s in self.model2_layers)
        shape = (len(layers1), len(layers2))
        for side, names in (("model1_layers", layers1), ("model2_layers", layers2)):
            duplicates = sorted({s for s in names if names.count(s) > 1})
            if duplicates:
                raise ValueError(f"{side} holds duplicate names {duplicates}; each layer may appear once.")
        expected: dict[str, tuple[int, ...]] = {"matrix": shape, **dict.fromkeys(STATISTICS, shape)}
        expected.update(p_value_best_row=shape[:1], p_value_best_col=shape[1:])
        for key, key_shape in expected.items():
            value = getattr(self, key)
            if value is not None or key == "matrix":
                object.__setattr__(self, key, _read_only_float64(value, key, key_shape))
        object.__setattr__(self, "model1_layers", layers1)
        object.__setattr__(self, "model2_layers", layers2)
        object.__setattr__(self, "model1_name", str(self.model1_name))
        object.__setattr__(self, "model2_name", str(self.model2_name))
        object.__setattr__(self, "n_examples", int(self.n_examples))
        if not isinstance(self.settings, Mapping):
            raise TypeError(f"settings must be a dict; got a {type(self.settings).__name__}.")
        object.__setattr__(self, "settings", plain(self.settings))

    @property
    def shape(self) -> tuple[int, int]:
        """``(L1, L2)``."""
        return (self.matrix.shape[0], self.matrix.shape[1])

    @property
    def statistics(self) -> dict[str, np.ndarray]:
        """The statistics this result holds, by field name (per-cell and best-match ones)."""
        return {k: getattr(self, k) for k in (*STATISTICS, *BEST_MATCH_P_VALUES) if getattr(self, k) is not None}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CKAResult):
            return NotImplemented
        return (
            _same_array(self.matrix, other.matrix)
            and all(_same_array(getattr(self, k), getattr(other, k)) for k in (*STATISTICS, *BEST_MATCH_P_VALUES))
            and encode_floats(self._metadata()) == encode_floats(other._metadata())
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking contents; compare with ==

    def __repr__(self) -> str:
        extra = f", statistics: {', '.join(self.statistics)}" if self.statistics else ""
        return (
            f"CKAResult({self.model1_name} x {self.model2_name}: {self.shape[0]} x {self.shape[1]} layers, "
            f"{self.n_examples} examples{extra})"
        )

    # ----------------------------------------------------------------------------------------
    # Conversion, saving and loading (the formats: cka._result_files)
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
        "n_examples", "settings"}`` with ``matrix`` a list of rows of floats (NaN kept as ``nan``),
        plus each statistic this result holds, in the same form. (``CKA.export()`` gives
        torch_cka's dict, with the matrix under ``"CKA"``.)"""
        return {
            **self._metadata(),
            "matrix": self.matrix.tolist(),
            **{k: v.tolist() for k, v in self.statistics.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CKAResult:
        """Inverse of :meth:`to_dict` (``None`` entries read as NaN); also reads ``CKA.export()``'s
        dict, whose matrix is under ``"CKA"``.

        Raises
        ------
        ValueError
            If a key is missing or holds the wrong kind of value, or an array's shape disagrees with
            the layer names; the message names the key.
        """
        from cka._result_files import record_fields

        if not isinstance(data, Mapping):
            raise TypeError(f"from_dict takes a dict (as made by to_dict); got a {type(data).__name__}.")
        data = dict(data)
        if "matrix" not in data and "CKA" in data:
            data["matrix"] = data["CKA"]
        return cls(**record_fields(data, "CKAResult.from_dict"))

    def save(self, path: str | Path) -> Path:
        """Write the result to ``path``; the format follows the extension.

        ``.json``: everything, NaN as ``null`` (strict JSON; NaN and infinities inside ``settings``
        as ``{"__float__": "nan"}``). ``.npz``: the matrix and statistics as float64 arrays plus
        names and metadata, no pickles. ``.csv``: a table with ``model1`` layers as rows and
        ``model2`` layers as columns, preceded by one ``# cka-result {json}`` metadata line that also
        holds the statistics (pandas: ``read_csv(path, comment="#", index_col=0)``). Every format
        round-trips exactly through :meth:`load` (floats written with ``repr``), layer names with
        commas, quotes and line breaks included; a name that a format cannot hold (a lone surrogate
        in a ``.csv``) is refused before anything is written.

        Raises
        ------
        ValueError
            For an unknown extension, a directory, or a name the format cannot hold.
        """
        from cka._result_files import save_result

        return save_result(self, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> CKAResult:
        """Read a result written by :meth:`save` (format from the extension).

        Raises
        ------
        FileNotFoundError
            If there is no file at ``path``.
        ValueError
            If ``path`` is a directory, or the file is not a readable CKA result: not ours, truncated,
            a key missing or of the wrong kind, or an array whose shape disagrees with the recorded
            layers. The message names the file and what is wrong.
        """
        from cka._result_files import load_fields

        return cls(**load_fields(Path(path)))

    # ----------------------------------------------------------------------------------------
    # Combining runs
    # ----------------------------------------------------------------------------------------

    @classmethod
    def concat(cls, results: Sequence[CKAResult], axis: int = 0) -> CKAResult:
        """Join runs over disjoint layer subsets of the same models and data into one result.

        For models too big to hook every layer at once: run ``compare`` several times with a few
        layers each and concatenate. ``axis=0`` stacks rows (different ``model1_layers``, the same
        ``model2_layers``); ``axis=1`` joins columns. For a grid of runs, concatenate each row of
        runs along ``axis=1`` and the results along ``axis=0``.

        The runs must be one comparison: the same models, examples and settings (compared as data:
        a memory address in a recorded ``repr`` is ignored). Per-cell statistics are joined like the
        matrix. A best-match p-value depends on its whole row or column and on the permutation null of
        one run, so both ``p_value_best_row`` and ``p_value_best_col`` are set to ``None``, with a
        warning when a run had them.

        Raises
        ------
        ValueError
            If the runs differ in the shared axis's layers, model names, number of examples or
            settings (the message names the first differing setting), select a layer twice, or
            hold different statistics.
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
        advice = f"concatenate runs of the same models on the same data that share {shared}."
        for i, r in enumerate(results[1:], start=1):
            for key in (shared, "model1_name", "model2_name", "n_examples"):
                if getattr(r, key) != getattr(first, key):
                    raise ValueError(
                        f"results[{i}] cannot be concatenated with results[0] along axis {axis}: their {key} "
                        f"differ ({getattr(first, key)!r} vs {getattr(r, key)!r}); {advice}"
                    )
            difference = _first_difference(data_identity(first.settings), data_identity(r.settings), "settings")
            if difference is not None:
                where, a, b = difference
                raise ValueError(
                    f"results[{i}] cannot be concatenated with results[0] along axis {axis}: their settings "
                    f"differ at {where} ({a!r} vs {b!r}); {advice}"
                )
        joined = "model1_layers" if axis == 0 else "model2_layers"
        names = [name for r in results for name in getattr(r, joined)]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"layers {repeated} appear in more than one result; concatenate disjoint layer subsets.")
        statistics: dict[str, Any] = {}
        for key in STATISTICS:
            statistics[key] = _join_statistic(results, key, axis)
        present = [key for key in BEST_MATCH_P_VALUES if any(getattr(r, key) is not None for r in results)]
        if present:
            warnings.warn(
                f"concat drops {present}: a best-match p-value is read against the null distribution of the "
                f"maximum over a whole row or column, computed within one run; the joined matrix's rows and "
                f"columns span several runs with separate permutation nulls. Compare all the layers in one "
                f"run to get them.",
                UserWarning,
                stacklevel=2,
            )
        for key in BEST_MATCH_P_VALUES:
            statistics[key] = None
        matrix = np.concatenate([r.matrix for r in results], axis=axis)
        layers = {joined: tuple(names), shared: getattr(first, shared)}
        return cls(
            matrix,
            layers["model1_layers"],
            layers["model2_layers"],
            first.model1_name,
            first.model2_name,
            first.n_examples,
            first.settings,
            **statistics,
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
        alpha: float | None = None,
        intervals: bool | None = None,
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
        alpha : float in (0, 1), optional
            Significance level: cells whose permutation ``p_value`` exceeds ``alpha`` are hatched
            and a legend says so. Needs ``p_value`` (compare with ``permutations=``).
        intervals : bool, optional
            Write each cell's confidence interval under its value (``0.83`` / ``[0.80, 0.86]``);
            by default when the result has intervals, values are annotated and there are at most 64
            cells. Needs ``ci_low`` and ``ci_high`` (compare with ``bootstrap=``).

        Returns
        -------
        matplotlib.axes.Axes
            Never calls ``plt.show()``; save with ``ax.figure.savefig(path)``.
        """
        plt = _pyplot()
        rows, cols = self.shape
        if alpha is not None:
            if self.p_value is None:
                raise ValueError(
                    "alpha= marks cells by their p-value, but this result has none; compare with permutations=N."
                )
            if not 0 < alpha < 1:
                raise ValueError(f"alpha must be a significance level in (0, 1); got {alpha!r}.")
        has_intervals = self.ci_low is not None and self.ci_high is not None
        if intervals and not has_intervals:
            raise ValueError(
                "intervals=True writes confidence intervals, but this result has none; compare with bootstrap=N."
            )
        if ax is None:
            width = min(4.0 + 0.16 * cols, 40.0)
            height = min(3.0 + 0.16 * rows, 40.0)
            _, ax = plt.subplots(figsize=(max(width, 5.0), max(height, 4.0)), layout="constrained")
        finite = self.matrix[np.isfinite(self.matrix)]
        if vmin is None:
            vmin = min(0.0, float(finite.min())) if finite.size else 0.0
        colormap = plt.get_cmap(cmap).with_extremes(bad="lightgrey")
        image = ax.imshow(
            np.ma.masked_invalid(self.matrix),
            origin="lower",
            cmap=colormap,
            vmin=vmin,
            vmax=vmax,
            aspect="auto",
            interpolation="nearest",
        )
        _label_axis(ax.set_xticks, ax.set_xticklabels, self.model2_layers, rotation=90)
        _label_axis(ax.set_yticks, ax.set_yticklabels, self.model1_layers, rotation=0)
        ax.set_xlabel(f"Layers {self.model2_name}")
        ax.set_ylabel(f"Layers {self.model1_name}")
        ax.set_title(title if title is not None else f"{self.model1_name} vs {self.model2_name}")
        if annotate is None:
            annotate = rows * cols <= _ANNOTATE_MAX_CELLS
        if intervals is None:
            intervals = has_intervals and annotate and rows * cols <= _INTERVAL_MAX_CELLS
        if annotate:
            middle = (vmin + vmax) / 2
            size = max(5.0, min(10.0, 120.0 / max(rows, cols)))
            for i in range(rows):
                for j in range(cols):
                    v = self.matrix[i, j]
                    text = "nan" if math.isnan(v) else format(v, fmt)
                    if intervals and self.ci_low is not None and self.ci_high is not None:
                        text += f"\n[{format(self.ci_low[i, j], fmt)}, {format(self.ci_high[i, j], fmt)}]"
                    color = "black" if (not math.isnan(v) and v > middle) else "white"
                    ax.text(
                        j, i, text, ha="center", va="center", color=color, fontsize=size * (0.8 if intervals else 1)
                    )
        if alpha is not None and self.p_value is not None:
            _hatch_insignificant(ax, self.p_value, alpha)
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


# ------------------------------------------------------------------------------------------------
# Plain values: what settings hold, how NaN travels through JSON, what identifies the data
# ------------------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """``value`` as plain Python (dict with str keys, list, str, int, float, bool, None).

    numpy scalars become Python numbers, arrays and tensors (anything with ``__array__``) nested
    lists, tuples lists; any other object its ``str`` without a memory address (a ``repr`` such as
    ``<Foo object at 0x7f...>`` identifies nothing once the process ends).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value if type(value) in (int, float) else (int(value) if isinstance(value, int) else float(value))
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, Mapping):
        return {_plain_key(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "__array__") or hasattr(value, "detach"):
        if hasattr(value, "detach"):  # a torch tensor: off the autograd graph and the device first
            value = value.detach().cpu()
        return plain(np.asarray(value).tolist())
    return _ADDRESS.sub("", str(value))


def _plain_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    return str(plain(key))


def encode_floats(value: Any) -> Any:
    """Plain Python with NaN and infinities as ``{"__float__": "nan" | "inf" | "-inf"}`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, dict):
        return {k: encode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [encode_floats(v) for v in value]
    return value


def decode_floats(value: Any) -> Any:
    """Inverse of :func:`encode_floats`."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in ("nan", "inf", "-inf"):
            return float(value["__float__"])
        return {k: decode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_floats(v) for v in value]
    return value


def data_identity(settings: Mapping[str, Any]) -> Any:
    """``settings`` as compared by :meth:`CKAResult.concat`: JSON-encoded floats, no memory addresses
    (files written before the data was recorded by value hold ``<... object at 0x...>`` reprs)."""

    def strip(value: Any) -> Any:
        if isinstance(value, str):
            return _ADDRESS.sub("", value)
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(encode_floats(plain(settings)))


def _first_difference(a: Any, b: Any, where: str) -> tuple[str, Any, Any] | None:
    """Where two plain values first differ (``settings['dataset1']``), with both values; or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if key not in a or key not in b:
                return f"{where}[{key!r}]", a.get(key, "<absent>"), b.get(key, "<absent>")
            found = _first_difference(a[key], b[key], f"{where}[{key!r}]")
            if found is not None:
                return found
        return None
    return None if a == b else (where, a, b)


# ------------------------------------------------------------------------------------------------
# Arrays
# ------------------------------------------------------------------------------------------------


def _read_only_float64(value: Any, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float64 copy of ``value`` of exactly ``shape`` (never broadcast), made read-only."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    array = np.array(value)  # a copy: the record owns its data
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{key} must hold real numbers; got an array of dtype {array.dtype}.")
    array = array.astype(np.float64)
    if array.shape != shape:
        described = (
            "(len(model1_layers), len(model2_layers))"
            if len(shape) == 2
            else ("(len(model1_layers),)" if key.endswith("_row") else "(len(model2_layers),)")
        )
        raise ValueError(f"{key} must have shape {described} = {shape}; got shape {array.shape}.")
    array.setflags(write=False)
    return array


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


def _join_statistic(results: Sequence[CKAResult], key: str, axis: int) -> np.ndarray | None:
    values = [getattr(r, key) for r in results]
    present = [i for i, v in enumerate(values) if v is not None]
    if not present:
        return None
    if len(present) != len(values):
        missing = next(i for i, v in enumerate(values) if v is None)
        raise ValueError(
            f"results[{missing}] has no {key} but results[{present[0]}] has; concatenate runs computed with the "
            f"same statistics (the same bootstrap= and permutations=)."
        )
    return np.concatenate(values, axis=axis)


# ------------------------------------------------------------------------------------------------
# Plot helpers
# ------------------------------------------------------------------------------------------------


def _label_axis(set_ticks: Any, set_labels: Any, names: Sequence[str], rotation: int) -> None:
    """Tick every layer when there are few, every k-th when there are many (readable at 100+)."""
    step = max(1, math.ceil(len(names) / _MAX_TICK_LABELS))
    positions = list(range(0, len(names), step))
    size = max(4.0, min(9.0, 360.0 / max(len(positions), 1)))
    set_ticks(positions)
    set_labels([names[p] for p in positions], rotation=rotation, fontsize=size)


#: How a cell that is not significant at the chosen level is marked.
_HATCH = "///"


def _hatch_insignificant(ax: Any, p_value: np.ndarray, alpha: float) -> None:
    """Hatch (and grey) each cell whose p-value exceeds ``alpha``; add a legend entry saying so."""
    from matplotlib.patches import Patch, Rectangle

    style: dict[str, Any] = {
        "hatch": _HATCH,
        "edgecolor": "0.55",
        "facecolor": (0.85, 0.85, 0.85, 0.45),
        "linewidth": 0.0,
    }
    cells = np.argwhere(p_value > alpha)  # NaN p-values (constant layers) are left as they are
    for i, j in cells:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1.0, 1.0, **style))
    ax.legend(
        handles=[Patch(**style, label=f"p > {alpha:g}: not significant ({len(cells)} cells)")],
        loc="upper left",
        bbox_to_anchor=(0.0, -0.12 if len(ax.get_xticklabels()) else -0.05),
        fontsize=8,
        frameon=False,
    )


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or the plot extra).") from error
    return plt
