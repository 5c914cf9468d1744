"""The comparer (cka.compare.CKA), as a specification: pairing, bad input, the backends it accumulates
in, extractors of every framework (with torch absent), the data it records, the torch_cka API.

Numeric checks on torch models compare against features captured independently with plain hooks
(tests/test_torch_frontend.py's helpers); the engine harness holds every comparer path to the float64
reference (tests/test_compare_engine.py).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import cka
from cka import CKA, CKAResult
from cka.core import CKANumericsWarning
from cka.frontends import _common
from cka.frontends.base import FeatureExtractor
from cka.frontends.torch import TorchModel
from tests import reference
from tests.models import ResidualCNN, mlp
from tests.test_torch_frontend import BLOCKS1, BLOCKS2, images, loader_of, trained_like

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cnns():
    torch.manual_seed(0)
    x = images(64, seed=1)
    return trained_like(ResidualCNN(8, (2, 1)), x), trained_like(ResidualCNN(8, (1, 2)), x)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_mismatched_batch_sizes_name_the_batch_and_both_sizes(cnns):
    m1, m2 = cnns
    run = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False)
    first = [images(16), images(16), images(16)]
    second = [images(16), images(12), images(16)]
    with pytest.raises(ValueError, match=r"batch 1: model1 \(ResidualCNN\) got 16 examples but model2 \(ResidualCNN\) got 12"):
        run.compare(first, second)


def test_loaders_of_different_lengths_are_refused(cnns):
    m1, m2 = cnns
    run = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False)
    with pytest.raises(ValueError, match="dataloader1 has 3 batches but dataloader2 has 2"):
        run.compare(loader_of(images(48)), loader_of(images(32)))
    gen = lambda k: (images(8, seed=i) for i in range(k))  # noqa: E731  (no len(): found while iterating)
    with pytest.raises(ValueError, match="dataloader2 ended after 2 batches"):
        run.compare(gen(3), gen(2))
    with pytest.raises(ValueError, match=r"dataloader2 has more batches than dataloader1 \(2\)"):
        run.compare(gen(2), gen(3))


def test_a_trailing_batch_below_four_is_skipped_with_a_warning(cnns):
    m1, m2 = cnns
    x = images(51)  # 16, 16, 16, 3
    run = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False)
    with pytest.warns(UserWarning, match=r"skipped batch\(es\) \[3\] with fewer than 4 examples"):
        result = run.compare(loader_of(x))
    full = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False).compare(loader_of(x[:48]))
    np.testing.assert_array_equal(result.matrix, full.matrix)
    assert result.n_examples == 48 and result.settings["skipped_batches"] == [3]
    with pytest.warns(UserWarning, match="skipped"), pytest.raises(ValueError, match=r"no batch with at least 4 examples \(skipped \[0, 1\]\)"):
        run.compare([images(3), images(2)])


def test_nan_or_inf_features_name_the_layer_and_batch(cnns):
    m1, m2 = cnns
    batches = [images(16, seed=i) for i in range(3)]
    batches[2] = batches[2].clone()
    batches[2][5, 0, 0, 0] = float("nan")
    run = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False)
    with pytest.raises(ValueError, match=r"layer 'conv1' of model1 \(ResidualCNN\) produced NaN or Inf features in batch 2"):
        run.compare(batches)
    batches[2][5, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer 'conv1' of model1 .* in batch 2"):
        run.compare(batches)


def test_a_constant_layer_gives_nan_with_a_warning():
    class WithConstant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)
            self.const = nn.Linear(4, 3)
            nn.init.zeros_(self.const.weight)

        def forward(self, x):
            return self.linear(x) + self.const(x)

    torch.manual_seed(0)
    model = WithConstant()
    with pytest.warns(CKANumericsWarning, match=r"NaN for layer\(s\) \['const', 'const'\].*constant"):
        result = CKA(model, model, model1_layers=["linear", "const"], model2_layers=["linear", "const"],
                     progress=False).compare([torch.randn(16, 4)])
    assert np.isnan(result.matrix[1]).all() and np.isnan(result.matrix[:, 1]).all()
    assert result.matrix[0, 0] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("scale", [1e150, 1e-150])
def test_layers_of_any_magnitude_compare_as_their_unscaled_selves(scale):
    """A float64 model whose layer outputs' HSIC terms (about |x|^4) sit far outside float64: the
    comparer's sums are kept at per-layer powers of two, so its matrix is the unscaled model's,
    without a warning. (Its Grams are kept at their true scale: entries below float64's normal
    range, from features below about 1e-154, lose digits; see the README.)"""

    class Scale(nn.Module):
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

    def model(factor: float) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), Scale(factor), nn.Linear(8, 5)).double()

    batches = [torch.randn(16, 6, dtype=torch.float64) for _ in range(3)]
    settings = {"model1_layers": ["0", "2"], "model2_layers": ["0", "1", "2", "3"], "progress": False}
    expected = CKA(model(1.0), model(1.0), **settings).compare(batches).matrix
    with warnings.catch_warnings():
        warnings.simplefilter("error", CKANumericsWarning)
        got = CKA(model(scale), model(1.0), **settings).compare(batches).matrix
    np.testing.assert_allclose(got, expected, atol=1e-9)


# --------------------------------------------------------------------------------------------
# Other frameworks plug in as FeatureExtractors
# --------------------------------------------------------------------------------------------


class NumpyLinear(FeatureExtractor):
    """A non-torch model: numpy features of a fixed linear map; takes its layers from CKA via bind."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.weights, self.selected, self.bound_to = weights, list(weights), None
        self.name = "NumpyLinear"

    def bind(self, *, layers=None, other=None) -> None:
        self.bound_to = other
        if layers is not None:
            self.selected = list(layers)

    def layer_names(self) -> list[str]:
        return self.selected

    def features(self, batch):
        x = np.asarray(batch[0] if isinstance(batch, (tuple, list)) else batch, dtype=np.float64)
        return {name: x @ self.weights[name] for name in self.selected}


def test_a_feature_extractor_from_another_framework_plugs_in_as_model2():
    torch.manual_seed(0)
    model = mlp((6, 5, 4))
    w = model[0].weight.detach().double().numpy().T
    other = NumpyLinear({"first": w, "random": np.random.default_rng(0).normal(size=(6, 3))})
    x = torch.randn(32, 6)
    run = CKA(model, other, model1_layers=["0", "2"], model2_layers=["random", "first"], progress=False)
    assert isinstance(other.bound_to, TorchModel) and other.bound_to.module is model  # torch names resolvable
    result = run.compare(loader_of(x))
    assert result.model2_layers == ("random", "first") and result.model2_name == "NumpyLinear"
    assert result.matrix[0, 1] == pytest.approx(1.0, abs=1e-6)  # layer "0" = the same linear map
    with torch.no_grad():
        xs = [[model[0](b).double(), model(b).double()] for b in x.split(16)]
    expected = cka.minibatch_cka_matrix(
        xs,
        [[torch.from_numpy(b.double().numpy() @ other.weights[k]) for k in ("random", "first")] for b in x.split(16)],
    ).numpy()
    np.testing.assert_allclose(result.matrix, expected, atol=1e-6)


def test_an_extractor_without_bind_refuses_a_layer_selection():
    class Plain(FeatureExtractor):
        def layer_names(self):
            return ["x"]

        def features(self, batch):
            return {"x": np.asarray(batch, dtype=np.float64) ** 2}

    with pytest.raises(TypeError, match="Plain does not take a layer selection from CKA"):
        CKA(mlp(), Plain(), model2_layers=["x"])
    result = CKA(mlp((6, 4)), Plain(), progress=False).compare([torch.randn(8, 6)] * 2)
    assert result.model2_layers == ("x",)


# --------------------------------------------------------------------------------------------
# torch_cka's API and compatibility
# --------------------------------------------------------------------------------------------


def test_export_and_plot_results_keep_torch_cka_api(cnns, tmp_path):
    m1, m2 = cnns
    run = CKA(m1, m2, "R-a", "R-b", BLOCKS1, BLOCKS2, "cpu")  # positional, as torch_cka allows
    with pytest.raises(RuntimeError, match=r"call compare\(dataloader\) first"):
        run.export()
    returned = run.compare(loader_of(images(32)))
    out = run.export()
    assert set(out) == {"model1_name", "model2_name", "CKA", "model1_layers", "model2_layers", "dataset1_name", "dataset2_name"}
    assert out["model1_name"] == "R-a" and out["model2_layers"] == BLOCKS2
    assert isinstance(out["CKA"], torch.Tensor) and out["CKA"].shape == (5, 5)
    np.testing.assert_array_equal(out["CKA"].numpy(), returned.matrix)
    path = tmp_path / "cka.png"
    ax = run.plot_results(save_path=str(path), title="blocks")
    assert ax.get_title() == "blocks" and path.stat().st_size > 1000
    import matplotlib.image
    import matplotlib.pyplot as plt

    assert matplotlib.image.imread(path).ndim == 3
    plt.close("all")


def test_compatible_with_torch_cka_where_it_is_correct():
    torch_cka = pytest.importorskip("torch_cka")
    torch.manual_seed(0)
    m1, m2 = mlp((6, 12, 10, 4), seed=1), mlp((6, 9, 4), seed=2)
    x = torch.randn(64, 6) * 0.5
    loader = loader_of(x, batch_size=32)
    layers1, layers2 = ["0", "2", "4"], ["0", "1", "2"]  # named_modules() order = hook order: torch_cka is right
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch_cka.CKA(m1, m2, model1_name="A", model2_name="B", model1_layers=layers1, model2_layers=layers2)
        theirs.compare(loader)
        import matplotlib.pyplot as plt

        plt.close("all")
    try:
        ours = CKA(m1, m2, model1_name="A", model2_name="B", model1_layers=layers1, model2_layers=layers2, progress=False)
        ours.compare(loader)
        a, b = ours.export(), theirs.export()
        assert set(a) == set(b)
        for key in ("model1_name", "model2_name", "model1_layers", "model2_layers", "dataset1_name", "dataset2_name"):
            assert a[key] == b[key], key
        assert a["CKA"].shape == b["CKA"].shape
        np.testing.assert_allclose(a["CKA"].numpy(), b["CKA"].double().numpy(), atol=1e-4)
    finally:
        for m in (m1, m2):  # torch_cka never removes its hooks
            for module in m.modules():
                module._forward_hooks.clear()


# --------------------------------------------------------------------------------------------
# Packaging
# --------------------------------------------------------------------------------------------


def test_import_cka_does_not_import_torch_but_from_cka_import_CKA_works():
    code = (
        "import sys, cka; assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules; "
        "assert 'CKA' in cka.__all__ and 'CKAResult' in dir(cka); "
        "from cka import CKAResult; assert 'torch' not in sys.modules; "
        "from cka import CKA; assert 'torch' not in sys.modules; "
        "import cka.frontends.torch as t; assert CKA is t.CKA"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))


# --------------------------------------------------------------------------------------------
# Without torch: ONNX and JAX models, numpy or JAX arrays all the way
# --------------------------------------------------------------------------------------------

#: Runs first in a fresh interpreter: makes torch impossible to import, as if it were not installed
#: ("blocked"), or marks it absent the way test suites usually do ("none": sys.modules["torch"] = None).
_NO_TORCH = {
    "blocked": textwrap.dedent(
        """
        import importlib.abc, sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

        sys.meta_path.insert(0, NoTorch())
        """
    ),
    "none": 'import sys; sys.modules["torch"] = None\n',
}

_TINY_ONNX = textwrap.dedent(
    """
    import numpy as np, onnx
    from onnx import TensorProto, helper, numpy_helper

    def tiny_onnx(path, seed):
        rng = np.random.default_rng(seed)
        w1, w2 = rng.normal(size=(4, 6)), rng.normal(size=(6, 3))
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["h2"]),
                 helper.make_node("MatMul", ["h2", "w2"], ["y"])]
        graph = helper.make_graph(nodes, f"tiny{seed}", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["n", 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["n", 3])],
                                  [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, path)
        return lambda x: {"h1": x @ w1, "h2": np.maximum(x @ w1, 0), "y": np.maximum(x @ w1, 0) @ w2}
    """
)


def _run_without_torch(mode: str, body: str) -> str:
    code = _NO_TORCH[mode] + textwrap.dedent(body) + textwrap.dedent(
        """
        assert sys.modules.get("torch") is None, "torch was imported"
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("mode", sorted(_NO_TORCH))
def test_two_onnx_models_compare_without_torch(tmp_path, mode):
    body = _TINY_ONNX + textwrap.dedent(
        f"""
        import sys
        from cka import CKA
        from cka.frontends.onnx import OnnxModel
        from tests import reference

        forward_a = tiny_onnx({str(tmp_path / "a.onnx")!r}, 0)
        forward_b = tiny_onnx({str(tmp_path / "b.onnx")!r}, 1)
        a = OnnxModel({str(tmp_path / "a.onnx")!r}, ["h1", "h2", "y"], providers=["CPUExecutionProvider"])
        b = OnnxModel({str(tmp_path / "b.onnx")!r}, ["h1", "y"], providers=["CPUExecutionProvider"])
        x = np.random.default_rng(2).normal(size=(40, 4)) + 3.0
        batches = [x[:16], x[16:32], x[32:]]
        comparison = CKA(a, b, progress=False)
        result = comparison.compare(batches)
        expected = reference.minibatch_cka_matrix([list(forward_a(v).values()) for v in batches],
                                                  [[forward_b(v)["h1"], forward_b(v)["y"]] for v in batches])
        assert np.abs(result.matrix - expected).max() <= 1e-10, (result.matrix, expected)
        assert isinstance(comparison.hsic_matrix, np.ndarray)  # numpy all the way
        """
    )
    assert "ok" in _run_without_torch(mode, body)


@pytest.mark.parametrize("mode", sorted(_NO_TORCH))
def test_two_jax_models_compare_without_torch(mode):
    body = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        import numpy as np
        from cka import CKA
        from cka.frontends.jax import JaxModel
        from tests import reference

        rng = np.random.default_rng(0)
        w1, w2, v = (jnp.asarray(rng.normal(size=s)) for s in ((5, 7), (7, 3), (5, 4)))
        first = JaxModel(lambda x: {"h": x @ w1, "r": jax.nn.relu(x @ w1) @ w2}, ["h", "r"], name="first")
        second = JaxModel(lambda x: {"t": jnp.tanh(x @ v)}, ["t"], name="second")
        x = rng.normal(size=(30, 5)) + 2.0
        batches = [x[:12], x[12:24], x[24:]]
        result = CKA(first, second, progress=False).compare(batches)
        h = [np.asarray(b @ w1) for b in batches]
        expected = reference.minibatch_cka_matrix(
            [[a, np.maximum(a, 0) @ np.asarray(w2)] for a in h], [[np.tanh(b @ np.asarray(v))] for b in batches])
        assert np.abs(result.matrix - expected).max() <= 1e-10, (result.matrix, expected)
        """
    )
    assert "ok" in _run_without_torch(mode, body)


def test_the_comparer_imports_torch_only_for_a_torch_model(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import cka.compare, cka.checkpoint, cka.distributed
        from cka import CKA
        from cka.frontends.base import FeatureExtractor

        assert CKA is cka.compare.CKA
        assert not {"torch", "jax", "onnxruntime", "matplotlib"} & set(sys.modules)

        class Squares(FeatureExtractor):
            name = "squares"
            def layer_names(self):
                return ["x", "x2"]
            def features(self, batch):
                return {"x": batch, "x2": batch ** 2}

        batches = [np.random.default_rng(i).normal(size=(8, 3)) for i in range(3)]
        result = CKA(Squares(), Squares(), progress=False).compare(batches, checkpoint="run.ckpt")
        assert result.matrix.shape == (2, 2)
        assert "torch" not in sys.modules, "a numpy comparison imported torch"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path), env=_env_with_root())


def _env_with_root() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


# --------------------------------------------------------------------------------------------
# The backend of the sums: the Grams' own, one backend when the sides differ
# --------------------------------------------------------------------------------------------


class ArrayFeatures(FeatureExtractor):
    """The batch's arrays are the layers' features, converted by ``convert`` (numpy, JAX, torch)."""

    def __init__(self, n_layers: int, convert, name: str) -> None:
        self.n_layers, self.convert, self.name = n_layers, convert, name

    def layer_names(self) -> list[str]:
        return [f"l{i}" for i in range(self.n_layers)]

    def features(self, batch):
        return {f"l{i}": self.convert(a) for i, a in enumerate(batch)}


def _feature_batches(n_batches: int = 3, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[np.maximum(rng.normal(size=(12, 5)), 0) + 1, rng.normal(size=(12, 2, 3))] for _ in range(n_batches)]


@pytest.fixture
def seen_by_the_accumulator(monkeypatch):
    """The Gram stacks each update of the comparer's accumulator received."""
    import cka._tally

    seen: list[tuple] = []
    original = cka._tally.engine.update_state_from_grams

    def spy(state, grams_x, grams_y, **kwargs):
        seen.append((grams_x, grams_y))
        return original(state, grams_x, grams_y, **kwargs)

    monkeypatch.setattr(cka._tally.engine, "update_state_from_grams", spy)
    return seen


@pytest.mark.parametrize(("first", "second", "expected"), [
    ("numpy", "numpy", np.ndarray),
    ("jax", "jax", jax.Array),
    ("jax", "numpy", jax.Array),
    ("numpy", "torch", torch.Tensor),
    ("jax", "torch", torch.Tensor),
], ids=lambda v: v if isinstance(v, str) else "")
def test_the_sums_stay_in_the_grams_backend_and_mixed_sides_meet_in_one(first, second, expected, seen_by_the_accumulator):
    convert = {"numpy": np.asarray, "jax": jnp.asarray, "torch": torch.as_tensor}
    batches = _feature_batches()
    comparison = CKA(ArrayFeatures(2, convert[first], "a"), ArrayFeatures(2, convert[second], "b"), progress=False)
    result = comparison.compare(batches)
    assert len(seen_by_the_accumulator) == 3
    for grams_x, grams_y in seen_by_the_accumulator:
        assert isinstance(grams_x, expected) and isinstance(grams_y, expected)
        assert grams_x.shape == (2, 12, 12) and str(grams_x.dtype).endswith("float64")
    assert isinstance(comparison.hsic_matrix, torch.Tensor if expected is torch.Tensor else np.ndarray)
    np.testing.assert_allclose(result.matrix, reference.minibatch_cka_matrix(batches, batches), atol=1e-10, rtol=0)


def test_hooked_grams_reach_the_accumulator_in_place(cnns, seen_by_the_accumulator):
    # one preallocated (L, n, n) stack per side, filled in place by the hooks and handed to the
    # accumulator as is: no list of Grams, no stacked copy, the same storage for every batch
    m1, m2 = cnns
    CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False).compare(loader_of(images(48)))
    pointers = {(gx.data_ptr(), gy.data_ptr()) for gx, gy in seen_by_the_accumulator}
    assert len(seen_by_the_accumulator) == 3 and len(pointers) == 1
    # the same model on both sides, same layers: one stack serves both sides
    seen_by_the_accumulator.clear()
    CKA(m1, m1, model1_layers=BLOCKS1, model2_layers=BLOCKS1, progress=False).compare(loader_of(images(48)))
    assert all(gx.data_ptr() == gy.data_ptr() for gx, gy in seen_by_the_accumulator)


def test_a_model_compared_with_itself_on_two_loaders_keeps_each_side(cnns):
    # one extractor, two loaders: its stack is reused by the second pass, so the first side's is copied
    m1, _ = cnns
    x1, x2 = images(32, seed=3), images(32, seed=4)
    result = CKA(m1, m1, model1_layers=["conv1"], model2_layers=["conv1"], progress=False).compare(
        loader_of(x1), loader_of(x2))
    same = CKA(m1, m1, model1_layers=["conv1"], model2_layers=["conv1"], progress=False).compare(loader_of(x1))
    assert result.matrix[0, 0] < 0.99 and same.matrix[0, 0] == pytest.approx(1.0, abs=1e-9)


def test_settings_that_would_be_silently_misread_are_refused():
    with pytest.raises(TypeError, match=r"unbiased must be True or False; got 'no'"):
        CKA(mlp(), mlp(), unbiased="no")
    with pytest.raises(ValueError, match=r"sigma_frac must be a positive, finite number"):
        CKA(mlp(), mlp(), kernel="rbf", sigma_frac=-0.5)
    with pytest.raises(ValueError, match=r"sigma must be a positive, finite number"):
        CKA(mlp(), mlp(), kernel="rbf", sigma=-1.0)
    with pytest.raises(ValueError, match=r"checkpoint_every must be a positive number of batches; got 0"):
        CKA(mlp(), mlp(), progress=False).compare([torch.randn(8, 6)], checkpoint="unused.ckpt", checkpoint_every=0)


# --------------------------------------------------------------------------------------------
# What a result records about its data
# --------------------------------------------------------------------------------------------


def test_results_record_the_data_without_memory_addresses(cnns):
    m1, m2 = cnns
    x = images(48)
    first = CKA(m1, m2, model1_layers=["conv1"], model2_layers=BLOCKS2, progress=False).compare(loader_of(x))
    second = CKA(m1, m2, model1_layers=["layer1.0"], model2_layers=BLOCKS2, progress=False).compare(loader_of(x))
    assert first.settings["dataset1"] == "TensorDataset of 48 examples, batch size 16, SequentialSampler"
    assert "0x" not in repr(first.settings)
    assert first.settings == second.settings  # two runs on the same data record the same
    joined = CKAResult.concat([first, second], axis=0)
    assert joined.model1_layers == ("conv1", "layer1.0")
    named = CKA(m1, m2, model1_layers=["conv1"], model2_layers=BLOCKS2, progress=False).compare(
        loader_of(x), dataset1_name="synthetic:3x8x8")
    assert named.settings["dataset1"] == named.settings["dataset2"] == "synthetic:3x8x8"
    assert CKA(m1, m2, progress=False).compare(list(x.split(16))).settings["dataset2"] == "list of 3 batches"


# --------------------------------------------------------------------------------------------
# Shared frontend helpers: selection wording, the Gram stack, the torch lifecycle
# --------------------------------------------------------------------------------------------


def test_one_wording_for_layer_selection_errors():
    names = ["conv1", "block.0", "block.1", "fc"]
    select = _common.select_names
    assert select(names, ["fc", "block.*"]) == ["fc", "block.0", "block.1"]
    assert select(names, lambda n: n.startswith("b")) == ["block.0", "block.1"]
    with pytest.raises(ValueError, match=r"^layers: M has no layer named 'blok\.0'; close matches: \['block\.0'"):
        select(names, ["blok.0"], owner="M")
    with pytest.raises(ValueError, match=r"^layers: 'x\*' selects no layer of M; "):
        select(names, "x*", owner="M")
    with pytest.raises(ValueError, match=r"layer 'fc' is selected twice \(by 'fc' and 'f\*'\)"):
        select(names, ["fc", "f*"])
    with pytest.raises(ValueError, match="is empty"):
        select(names, [])
    with pytest.raises(TypeError, match=r"each entry must be .*; got int 3"):
        select(names, [3])
    error = _common.never_ran_error(["fc"], "M", "select layers that run.")
    assert isinstance(error, RuntimeError) and "selected layer(s) ['fc'] of M never ran" in str(error)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_the_gram_stack_is_filled_in_place_and_reused(kind):
    make = {"torch": lambda a: torch.as_tensor(a), "numpy": np.asarray}[kind]
    stack = _common.GramStack(["a", "b"])
    grams = [make(np.full((4, 4), float(i))) for i in range(2)]
    stack.start()
    stack.put(1, grams[1])
    stack.put(0, grams[0])
    first = stack.result()
    assert tuple(first.shape) == (2, 4, 4) and float(first[1, 0, 0]) == 1.0 and float(first[0, 3, 3]) == 0.0
    stack.start()  # a smaller batch: a prefix of the same storage
    stack.put(0, make(np.ones((3, 3))))
    stack.put(1, make(np.ones((3, 3))))
    smaller = stack.result()
    if kind == "torch":
        assert smaller.data_ptr() == first.data_ptr()
    else:
        assert np.shares_memory(smaller, first)
    stack.start()
    stack.put(0, make(np.ones((3, 3))))
    with pytest.raises(cka.compare.GramShapeError, match=r"layer 'b' gave a Gram of shape \(5, 5\) while layer 'a' gave 3"):
        stack.put(1, make(np.ones((5, 5))))


def test_torch_inference_restores_the_module_even_when_the_run_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    model[1].eval()
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with _common.torch_inference(model, hooks=[(model[0], lambda m, a, o: seen.append(o.is_inference()))]) as forward:
            assert not model.training
            forward(torch.randn(5, 3))
            raise RuntimeError("boom")
    assert seen == [True]  # ran under inference_mode
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_synchronisation_per_batch_on_cuda(cnns, tmp_path):
    # the synchronisations of a run (setting up, the final read-out, the last checkpoint) do not grow
    # with the number of batches: the sums, NaN tracking and the data digests stay on the GPU
    m1, m2 = (model.cuda() for model in cnns)
    counts = []
    for n_batches in (2, 6):
        batches = [images(16, seed=i).cuda() for i in range(n_batches)]  # CUDA batches: device checksums
        run = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run.compare(batches, checkpoint=tmp_path / f"run{n_batches}.ckpt", checkpoint_every=1000)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts
