"""CKAResult: a plain record that saves, loads, concatenates and plots exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cka.result import CKAResult

ODD_NAMES = ("layer1.0", 'quote"d', "comma,name", "ünïcode", "#hash", " spaced ")


def make(rows=("a", "b", "c"), cols=("x", "y"), seed=0, **kwargs) -> CKAResult:
    matrix = np.random.default_rng(seed).uniform(-0.05, 1.0, size=(len(rows), len(cols)))
    defaults = {"model1_name": "M1", "model2_name": "M2", "n_examples": 96,
                    "settings": {"kernel": "linear", "unbiased": True, "skipped_batches": [3]}}
    return CKAResult(matrix, rows, cols, **{**defaults, **kwargs})


@pytest.mark.parametrize("suffix", [".json", ".npz", ".csv"])
def test_save_load_round_trips_exactly_with_nan_and_odd_names(tmp_path, suffix):
    result = make(rows=ODD_NAMES, cols=("x", "y", "z"))
    matrix = result.matrix.copy()
    matrix[2, 1] = math.nan
    matrix[0, 0] = 0.1 + 0.2  # needs all 17 digits
    result = CKAResult(matrix, ODD_NAMES, ("x", "y", "z"), "M1", "M2", 96, result.settings)
    path = result.save(tmp_path / f"r{suffix}")
    loaded = CKAResult.load(path)
    assert loaded == result
    assert loaded.matrix[0, 0] == 0.1 + 0.2 and math.isnan(loaded.matrix[2, 1])
    assert loaded.model1_layers == ODD_NAMES and loaded.settings == result.settings


def test_json_is_strict_json_and_csv_reads_as_a_table(tmp_path):
    result = CKAResult(np.array([[1.0, math.nan]]), ("a",), ("x", "y"), "M1", "M2", 8)
    text = result.save(tmp_path / "r.json").read_text()
    assert "NaN" not in text and json.loads(text)["matrix"] == [[1.0, None]]
    lines = result.save(tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("# cka-result {") and lines[1] == "M1 \\ M2,x,y" and lines[2] == "a,1.0,nan"


def test_to_dict_from_dict():
    result = make()
    data = result.to_dict()
    assert set(data) == {"model1_name", "model2_name", "model1_layers", "model2_layers", "matrix", "n_examples", "settings"}
    assert data["matrix"] == result.matrix.tolist() and data["model2_layers"] == ["x", "y"]
    json.dumps(data)  # plain Python
    assert CKAResult.from_dict(data) == result
    exported = {k: v for k, v in data.items() if k != "matrix"} | {"CKA": np.array(data["matrix"])}
    assert CKAResult.from_dict(exported) == result  # CKA.export()'s dict reads too


def test_bad_paths_and_files_are_explained(tmp_path):
    with pytest.raises(ValueError, match=r"cannot save a CKA result as 'r\.txt': use a \.json, \.npz or \.csv extension"):
        make().save(tmp_path / "r.txt")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="is not a saved CKA result"):
        CKAResult.load(tmp_path / "other.json")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="first line should start with '# cka-result '"):
        CKAResult.load(tmp_path / "other.csv")
    with pytest.raises(ValueError, match=r"cannot load 'r\.pkl'"):
        CKAResult.load(tmp_path / "r.pkl")


def test_shape_and_names_are_validated_and_matrix_is_read_only():
    with pytest.raises(ValueError, match=r"shape \(len\(model1_layers\), len\(model2_layers\)\) = \(3, 2\); got shape \(2, 2\)"):
        CKAResult(np.eye(2), ("a", "b", "c"), ("x", "y"))
    with pytest.raises(ValueError, match=r"model2_layers holds duplicate names \['x'\]"):
        CKAResult(np.eye(2), ("a", "b"), ("x", "x"))
    result = make()
    with pytest.raises(ValueError):
        result.matrix[0, 0] = 2.0
    assert result.shape == (3, 2) and "M1 x M2: 3 x 2 layers, 96 examples" in repr(result)


def test_concat_rows_and_columns_of_disjoint_runs():
    full = make(rows=("a", "b", "c", "d"), cols=("x", "y", "z"))
    top = CKAResult(full.matrix[:2], ("a", "b"), full.model2_layers, "M1", "M2", 96, full.settings)
    bottom = CKAResult(full.matrix[2:], ("c", "d"), full.model2_layers, "M1", "M2", 96, full.settings)
    assert CKAResult.concat([top, bottom], axis=0) == full
    left = CKAResult(full.matrix[:, :1], full.model1_layers, ("x",), "M1", "M2", 96, full.settings)
    right = CKAResult(full.matrix[:, 1:], full.model1_layers, ("y", "z"), "M1", "M2", 96, full.settings)
    assert CKAResult.concat([left, right], axis=1) == full


def test_concat_refuses_results_that_are_not_one_comparison():
    a, b = make(rows=("a",)), make(rows=("b",))
    with pytest.raises(ValueError, match=r"layers \['a'\] appear in more than one result"):
        CKAResult.concat([a, a])
    with pytest.raises(ValueError, match=r"results\[1\] cannot be concatenated .* their model2_layers differ"):
        CKAResult.concat([a, make(rows=("b",), cols=("x", "w"))])
    with pytest.raises(ValueError, match=r"their n_examples differ \(96 vs 50\)"):
        CKAResult.concat([a, make(rows=("b",), n_examples=50)])
    with pytest.raises(ValueError, match="their settings differ"):
        CKAResult.concat([a, make(rows=("b",), settings={"kernel": "rbf"})])
    with pytest.raises(ValueError, match="axis must be 0"):
        CKAResult.concat([a, b], axis=2)
    with pytest.raises(ValueError, match="at least one"):
        CKAResult.concat([])


def test_plot_small_is_annotated_and_saves_a_png(tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt

    result = make()
    matrix = result.matrix.copy()
    matrix[1, 1] = math.nan
    result = CKAResult(matrix, result.model1_layers, result.model2_layers, "M1", "M2", 96)
    ax = result.plot()
    try:
        assert ax.get_xlabel() == "Layers M2" and ax.get_ylabel() == "Layers M1" and ax.get_title() == "M1 vs M2"
        assert len(ax.texts) == 6 and "nan" in [t.get_text() for t in ax.texts]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
        assert len(ax.figure.axes) == 2  # the heatmap and its colorbar
        path = tmp_path / "small.png"
        ax.figure.savefig(path)
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image[..., :3].std() > 0.05  # not blank
    finally:
        plt.close("all")


def test_plot_with_many_layers_stays_readable_and_draws_into_a_given_axes():
    import matplotlib.pyplot as plt

    names = tuple(f"block{i}.conv" for i in range(150))
    big = CKAResult(np.random.default_rng(1).uniform(size=(150, 120)), names, names[:120], "Big", "Other", 10)
    fig, given = plt.subplots()
    try:
        ax = big.plot(ax=given, title="t", colorbar=False)
        assert ax is given and not ax.texts  # no annotations at 18000 cells
        assert len(ax.get_yticklabels()) <= 60 and len(ax.get_xticklabels()) <= 60
        assert ax.get_yticklabels()[1].get_text() == "block3.conv"  # every 3rd of 150
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Files from outside: malformed, crafted or truncated files are ValueErrors naming the file
# ------------------------------------------------------------------------------------------------

GOOD = {"format": "cka-result", "version": 1, "model1_name": "M1", "model2_name": "M2", "n_examples": 8,
        "settings": {}, "model1_layers": ["a", "b"], "model2_layers": ["x"], "matrix": [[0.5], [0.25]]}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"__whole__": []}, "holds a JSON list, not an object"),
        ({"matrix": 3}, "'matrix' must be a list of rows of numbers; got int 3"),
        ({"matrix": [[0.5, 0.1], [0.25, 0.2]]}, r"'matrix' has shape \(2, 2\) but the recorded layers .* make \(2, 1\)"),
        ({"matrix": [[0.5]]}, r"'matrix' has shape \(1, 1\)"),
        ({"matrix": [[0.5], [0.25, 1.0]]}, "the rows of 'matrix' have different lengths"),
        ({"matrix": [[0.5], ["high"]]}, "'matrix' holds str 'high' where a number belongs"),
        ({"matrix": [[0.5], [True]]}, "'matrix' holds bool True where a number belongs"),
        ({"model1_layers": "ab"}, "'model1_layers' must be a list of layer names"),
        ({"model2_layers": [1]}, "'model2_layers' must be a list of layer names"),
        ({"model2_layers": None}, "'model2_layers' must be a list of layer names"),
        ({"model1_name": 5}, "'model1_name' must be a string"),
        ({"n_examples": "8"}, "'n_examples' must be a non-negative integer"),
        ({"n_examples": -1}, "'n_examples' must be a non-negative integer"),
        ({"settings": []}, "'settings' must be an object"),
        ({"version": "1"}, "'version' must be an integer"),
        ({"version": 99}, "written by a newer cka"),
        ({"format": "other"}, "is not a saved CKA result"),
        ({"p_value": [[0.5]]}, r"'p_value' has shape \(1, 1\)"),
        ({"p_value_best_col": [0.1, 0.2]}, r"'p_value_best_col' has shape \(2,\)"),
        ({"ci_low": {"a": 1}}, "'ci_low' must be a list of rows"),
    ],
)
def test_malformed_json_files_are_value_errors_naming_the_file_and_the_fault(tmp_path, change, message):
    data = change["__whole__"] if "__whole__" in change else {**GOOD, **change}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as raised:
        CKAResult.load(path)
    assert str(path) in str(raised.value)


def test_missing_keys_and_directories_are_value_errors(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({k: v for k, v in GOOD.items() if k != "model2_layers"}))
    with pytest.raises(ValueError, match=r"keys \['model2_layers'\] are missing"):
        CKAResult.load(path)
    folder = tmp_path / "folder.json"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        CKAResult.load(folder)
    with pytest.raises(ValueError, match="is a directory"):
        make().save(folder)
    with pytest.raises(FileNotFoundError, match="no CKA result file at"):
        CKAResult.load(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00garbage")
        CKAResult.load(tmp_path / "binary.csv")


@pytest.mark.parametrize("suffix", [".json", ".npz", ".csv"])
def test_every_truncation_of_a_saved_file_is_a_value_error(tmp_path, suffix):
    good = make(rows=("a", "b", "c"), cols=("x", "y", "z")).save(tmp_path / f"good{suffix}").read_bytes()
    path = tmp_path / f"cut{suffix}"
    step = max(1, len(good) // 150)
    for cut in range(0, len(good), step):
        path.write_bytes(good[:cut])
        with pytest.raises(ValueError) as raised:
            CKAResult.load(path)
        assert str(path) in str(raised.value), (cut, raised.value)


def test_crafted_npz_archives_are_refused(tmp_path):
    good = make(rows=("a", "b"), cols=("x", "y"))
    good.save(tmp_path / "good.npz")
    with np.load(tmp_path / "good.npz") as archive:
        arrays = {k: archive[k] for k in archive.files}
    cases = {
        "shape": ({**arrays, "matrix": np.zeros((3, 3))}, r"'matrix' has shape \(3, 3\)"),
        "dtype": ({**arrays, "matrix": np.array([["a", "b"], ["c", "d"]])}, "must hold numbers"),
        "meta": ({**arrays, "metadata": np.arange(3)}, "'metadata' must be a single string"),
        "nometa": ({k: v for k, v in arrays.items() if k != "metadata"}, "no 'metadata' entry"),
        "json": ({**arrays, "metadata": np.array("{not json")}, "its 'metadata' entry is not valid JSON"),
        "stat": ({**arrays, "p_value": np.zeros(4)}, r"'p_value' has shape \(4,\)"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **content)
        with pytest.raises(ValueError, match=message):
            CKAResult.load(path)
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(ValueError, match="holds a single array"):
        CKAResult.load(tmp_path / "single.npz")
    objects = tmp_path / "objects.npz"
    np.savez(objects, **{**arrays, "matrix": np.array([[{}, 1], [2, 3]], dtype=object)})
    with pytest.raises(ValueError, match=r"not a readable \.npz archive"):  # never unpickled
        CKAResult.load(objects)


@pytest.mark.parametrize(
    "text,message",
    [
        ('# cka-result {"format": "cka-result", "version": 1}\nM1 \\ M2,x\na,0.5\nb\n', "line 4 has 1 cells but the header has 2"),
        ('# cka-result {"format": "cka-result", "version": 1}\nM1 \\ M2,x\na,zero\n', "line 3 holds a cell that is not a number"),
        ('# cka-result {"format": "cka-result"\nM1 \\ M2,x\na,0.5\n', "its metadata line is not valid JSON"),
        ('# cka-result {"format": "cka-result", "version": 1}\n', "has no table"),
        ('# cka-result {"format": "cka-result", "version": 1, "shape": [2, 1]}\nM1 \\ M2,x\na,0.5\n', r"records \[2, 1\]"),
        ('# cka-result {"format": "cka-result", "version": 1, "statistics": []}\nM1 \\ M2,x\na,0.5\n', "'statistics' must be an object"),
        ('# cka-result {"format": "cka-result", "version": 1}\nM1 \\ M2,x\na,0.5', "truncated"),
    ],
)
def test_malformed_csv_files_are_value_errors(tmp_path, text, message):
    path = tmp_path / "r.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        CKAResult.load(path)


def test_from_dict_checks_its_input():
    with pytest.raises(ValueError, match=r"CKAResult.from_dict: 'matrix' has shape \(1, 2\)"):
        CKAResult.from_dict({"matrix": [[1.0, 2.0]], "model1_layers": ["a", "b"], "model2_layers": ["x"]})
    with pytest.raises(TypeError, match="from_dict takes a dict"):
        CKAResult.from_dict([("matrix", 1)])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Names, settings and statistics that must survive every format exactly
# ------------------------------------------------------------------------------------------------

HARD_NAMES = ("a\rb", "line\nbreak", "crlf\r\nname", "nul\x00", "sep\u2028arated", "next\x85line", "", "tab\there",
              '"', ",", "trailing\x00\x00", "\x0b\x0c\x1c\x1d\x1e")


@pytest.mark.parametrize("suffix", [".json", ".npz", ".csv"])
def test_layer_names_with_line_breaks_and_separators_round_trip_exactly(tmp_path, suffix):
    result = make(rows=HARD_NAMES, cols=HARD_NAMES[::-1])
    loaded = CKAResult.load(result.save(tmp_path / f"r{suffix}"))
    assert loaded == result and loaded.model1_layers == HARD_NAMES and loaded.model2_layers == HARD_NAMES[::-1]


def test_a_name_a_format_cannot_hold_is_refused_at_save_time_naming_it(tmp_path):
    result = make(rows=("ok", "bad\ud800"), cols=("x",))
    with pytest.raises(ValueError, match=r"layer 'bad\\ud800' of model1_layers .* lone surrogate '\\ud800'"):
        result.save(tmp_path / "r.csv")
    assert not (tmp_path / "r.csv").exists()
    for suffix in (".json", ".npz"):
        assert CKAResult.load(result.save(tmp_path / f"r{suffix}")) == result


@pytest.mark.parametrize("suffix", [".json", ".npz", ".csv"])
def test_settings_with_numpy_scalars_tensors_and_non_finite_numbers_save_and_load(tmp_path, suffix):
    torch = pytest.importorskip("torch")
    settings = {
        "sigma": np.float32(0.5), "batches": np.int64(3), "flag": np.bool_(True), "grid": np.arange(3),
        "weights": torch.tensor([1.0, 2.5], requires_grad=True), "nan": float("nan"), "inf": np.inf,
        "nested": {"pair": (1, -math.inf), 7: "int key"}, "dtype": torch.float32, "none": None,
        "dataset": "<torch.utils.data.dataset.TensorDataset object at 0x7f3a2b1c>",
    }
    result = make(settings=settings)
    assert result.settings["sigma"] == 0.5 and type(result.settings["batches"]) is int
    assert result.settings["weights"] == [1.0, 2.5] and result.settings["nested"]["7"] == "int key"
    assert result.settings["dtype"] == "torch.float32"
    path = result.save(tmp_path / f"r{suffix}")
    if suffix == ".json":  # strict JSON: no NaN / Infinity tokens
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    loaded = CKAResult.load(path)
    assert loaded == result
    assert math.isnan(loaded.settings["nan"]) and loaded.settings["inf"] == math.inf
    assert loaded.settings["nested"]["pair"] == [1, -math.inf]


def test_statistics_fields_are_checked_copied_and_compared():
    result = make(rows=("a", "b"), cols=("x", "y", "z"))
    ci = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"ci_low must have shape .* = \(2, 3\); got shape \(3, 2\)"):
        CKAResult(result.matrix, ("a", "b"), ("x", "y", "z"), ci_low=ci.T)
    with pytest.raises(ValueError, match=r"p_value_best_row must have shape \(len\(model1_layers\),\) = \(2,\)"):
        CKAResult(result.matrix, ("a", "b"), ("x", "y", "z"), p_value_best_row=np.zeros(3))
    with_ci = CKAResult(result.matrix, ("a", "b"), ("x", "y", "z"), ci_low=ci, ci_high=ci + 1)
    ci[0, 0] = 5.0
    assert with_ci.ci_low[0, 0] == 0.0 and not with_ci.ci_low.flags.writeable
    assert with_ci != CKAResult(result.matrix, ("a", "b"), ("x", "y", "z"), ci_low=np.zeros((2, 3)))
    assert set(with_ci.statistics) == {"ci_low", "ci_high"} and "statistics: ci_low, ci_high" in repr(with_ci)


def with_statistics(rows=("a", "b", "c"), cols=("x", "y"), seed=0, best=True) -> CKAResult:
    base = make(rows=rows, cols=cols, seed=seed)
    rng = np.random.default_rng(seed + 100)
    shape = base.shape
    low = base.matrix - rng.uniform(0.01, 0.05, shape)
    p_value = rng.uniform(0, 0.2, shape)
    p_value[0, 0] = math.nan
    stats = {"ci_low": low, "ci_high": base.matrix + 0.03, "p_value": p_value, "null_mean": rng.uniform(0, 0.1, shape)}
    stats["calibrated"] = (base.matrix - stats["null_mean"]) / (1 - stats["null_mean"])
    if best:
        stats.update(p_value_best_row=rng.uniform(0, 1, shape[0]), p_value_best_col=rng.uniform(0, 1, shape[1]))
    return CKAResult(base.matrix, rows, cols, "M1", "M2", 96, base.settings, **stats)


@pytest.mark.parametrize("suffix", [".json", ".npz", ".csv"])
def test_statistics_round_trip_in_every_format_and_absent_ones_stay_none(tmp_path, suffix):
    full = with_statistics()
    loaded = CKAResult.load(full.save(tmp_path / f"full{suffix}"))
    assert loaded == full and math.isnan(loaded.p_value[0, 0])
    for key in ("ci_low", "ci_high", "p_value", "null_mean", "calibrated", "p_value_best_row", "p_value_best_col"):
        assert np.array_equal(getattr(loaded, key), getattr(full, key), equal_nan=True), key
    partial = CKAResult(full.matrix, full.model1_layers, full.model2_layers, p_value=full.p_value)
    back = CKAResult.load(partial.save(tmp_path / f"partial{suffix}"))
    assert back == partial and back.ci_low is None and back.p_value_best_row is None
    assert CKAResult.from_dict(full.to_dict()) == full


def test_concat_joins_statistics_and_drops_the_best_match_p_values():
    top, bottom = with_statistics(rows=("a", "b")), with_statistics(rows=("c",), seed=1)
    with pytest.warns(UserWarning, match="drops \\['p_value_best_row', 'p_value_best_col'\\]"):
        rows = CKAResult.concat([top, bottom], axis=0)
    assert np.array_equal(rows.p_value, np.vstack([top.p_value, bottom.p_value]), equal_nan=True)
    assert np.array_equal(rows.ci_high, np.vstack([top.ci_high, bottom.ci_high]))
    assert rows.p_value_best_row is None and rows.p_value_best_col is None
    left, right = with_statistics(cols=("x",)), with_statistics(cols=("y", "z"), seed=2)
    with pytest.warns(UserWarning, match="drops"):
        columns = CKAResult.concat([left, right], axis=1)
    assert columns.p_value_best_row is None and columns.p_value_best_col is None
    assert columns.calibrated.shape == (left.matrix.shape[0], 3)
    plain_bottom = CKAResult(bottom.matrix, ("c",), bottom.model2_layers, "M1", "M2", 96, bottom.settings)
    with pytest.raises(ValueError, match="results\\[1\\] has no ci_low but results\\[0\\] has"):
        CKAResult.concat([top, plain_bottom])


def test_concat_compares_the_data_not_memory_addresses():
    def run(rows, dataset):
        return make(rows=rows, settings={"kernel": "linear", "dataset1": dataset, "batch_size": 32})

    a = run(("a",), "<torch.utils.data.dataset.TensorDataset object at 0x7f00aa>")
    b = run(("b",), "<torch.utils.data.dataset.TensorDataset object at 0x7f00bb>")
    assert CKAResult.concat([a, b]).model1_layers == ("a", "b")  # same data, other process
    other = run(("b",), "synthetic:3x8x8")
    with pytest.raises(ValueError, match=r"their settings differ at settings\['dataset1'\] \('<torch.*TensorDataset object>' vs 'synthetic:3x8x8'\)"):
        CKAResult.concat([a, other])
    missing = make(rows=("b",), settings={"kernel": "linear", "batch_size": 32})
    with pytest.raises(ValueError, match=r"settings\['dataset1'\]"):
        CKAResult.concat([a, missing])


def test_plot_marks_insignificant_cells_with_hatches_and_a_legend():
    import matplotlib.pyplot as plt

    result = with_statistics()
    alpha = 0.1
    try:
        ax = result.plot(alpha=alpha)
        hatched = [p for p in ax.patches if p.get_hatch() == "///"]
        assert len(hatched) == int(np.sum(result.p_value > alpha)) > 0  # NaN p-values are not marked
        corners = {(round(p.get_x() + 0.5), round(p.get_y() + 0.5)) for p in hatched}
        assert corners == {(int(j), int(i)) for i, j in np.argwhere(result.p_value > alpha)}
        legend = ax.get_legend()
        assert legend is not None and "p > 0.1" in legend.get_texts()[0].get_text()
        texts = [t.get_text() for t in ax.texts]  # 6 cells: the intervals are written too
        low, high = result.ci_low[1, 0], result.ci_high[1, 0]
        assert f"{result.matrix[1, 0]:.2f}\n[{low:.2f}, {high:.2f}]" in texts
        plain_ax = make().plot()
        assert not [p for p in plain_ax.patches if p.get_hatch()] and plain_ax.get_legend() is None
        assert "[" not in "".join(t.get_text() for t in plain_ax.texts)
        assert "[" not in "".join(t.get_text() for t in result.plot(intervals=False).texts)
    finally:
        plt.close("all")
    with pytest.raises(ValueError, match="this result has none; compare with permutations=N"):
        make().plot(alpha=0.05)
    with pytest.raises(ValueError, match=r"alpha must be a significance level in \(0, 1\)"):
        result.plot(alpha=5)
    with pytest.raises(ValueError, match="compare with bootstrap=N"):
        make().plot(intervals=True)


def test_save_plot_with_significance_writes_a_png(tmp_path):
    path = with_statistics().save_plot(tmp_path / "sig.png", alpha=0.1)
    assert path.stat().st_size > 1000
