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
    defaults = dict(model1_name="M1", model2_name="M2", n_examples=96,
                    settings={"kernel": "linear", "unbiased": True, "skipped_batches": [3]})
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
