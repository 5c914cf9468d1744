"""The functional core, as a specification: every public function on every backend against the
float64 reference (tests/reference.py), published values, errors and warnings."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

import cka
from cka import BiasedCKAWarning, CKANumericsWarning
from tests import reference as ref

TOL = {"float64": 1e-10, "float32": 1e-6}


def kornblith_demo_data():
    """The inputs of Kornblith et al.'s CKA demo notebook (google-research representation_similarity)."""
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


# ---------------------------------------------------------------------------------------------
# Published values
# ---------------------------------------------------------------------------------------------


def test_published_values_of_kornblith_demo(xp):
    x, y = kornblith_demo_data()
    X, Y = xp.asarray(x), xp.asarray(y)
    assert float(cka.cka(X, Y)) == pytest.approx(0.55761, abs=5e-6)
    assert float(cka.cka(X, Y, kernel="rbf", sigma_frac=0.5)) == pytest.approx(0.65483, abs=5e-6)
    debiased = float(cka.cka(X, Y, unbiased=True))
    assert debiased == pytest.approx(0.51346, abs=5e-6)
    assert float(cka.minibatch_cka([X], [Y])) == pytest.approx(debiased, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Every public function against the reference, float64 and float32, on every backend
# ---------------------------------------------------------------------------------------------


def post_relu_features(rng, n: int, d: int, mean: float = 1.0) -> np.ndarray:
    """Activations like a trained ReLU layer's: non-negative, with a large common offset."""
    return np.maximum(rng.normal(loc=mean, scale=1.0, size=(n, d)), 0.0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("shape", [(40, 7), (40, 300)], ids=["d<n", "d>n"])
def test_cka_matches_reference(xp, rng, dtype, kernel, unbiased, shape):
    x = rng.normal(size=shape)
    y = x @ rng.normal(size=(shape[1], 5)) + 0.5 * rng.normal(size=(shape[0], 5))
    expected = ref.cka(x.astype(dtype), y.astype(dtype), kernel, unbiased)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiasedCKAWarning)
        got = cka.cka(xp.asarray(x, dtype), xp.asarray(y, dtype), kernel=kernel, unbiased=unbiased)
    assert xp.is_native(got)
    assert float(got) == pytest.approx(expected, abs=TOL[dtype])


def test_rbf_with_fixed_sigma_matches_reference(xp, rng):
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 6))
    got = cka.cka(xp.asarray(x), xp.asarray(y), kernel="rbf", sigma=1.5)
    assert float(got) == pytest.approx(ref.cka(x, y, "rbf", sigma=1.5), abs=1e-10)


@pytest.mark.parametrize("d", [1, 16, 512, 65536])
def test_float32_post_relu_features_with_large_mean_stay_within_1e6(xp, rng, d):
    n = 128
    x = post_relu_features(rng, n, d, mean=1.0)
    y = 0.5 * x + post_relu_features(rng, n, d, mean=2.0)
    for unbiased in (False, True):
        expected = ref.cka(x.astype(np.float32), y.astype(np.float32), unbiased=unbiased)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BiasedCKAWarning)
            got = float(cka.cka(xp.asarray(x, "float32"), xp.asarray(y, "float32"), unbiased=unbiased))
        assert got == pytest.approx(expected, abs=1e-6), (unbiased, d)


def test_near_constant_float32_layer_is_exact(xp, rng):
    """50 + 1e-3 noise in float32: without centring HSIC(K, K) < 0 and |CKA| > 1; centred, exact."""
    noise = rng.normal(size=(64, 256))
    x = (50 + 1e-3 * noise).astype(np.float32)
    y = (noise + rng.normal(size=(64, 256))).astype(np.float32)
    expected = ref.cka(x.astype(np.float64) - 50, y.astype(np.float64), unbiased=True)
    got = float(cka.cka(xp.asarray(x, "float32"), xp.asarray(y, "float32"), unbiased=True))
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_kernels_and_hsic_match_reference(xp, rng, dtype):
    x, y = rng.normal(size=(20, 6)), rng.normal(size=(20, 3))
    k_lin = xp.to_numpy(cka.linear_kernel(xp.asarray(x, dtype)))
    # the linear kernel is of centred features: equal to H K H of the raw one
    h = np.eye(20) - 1 / 20
    np.testing.assert_allclose(k_lin, h @ ref.linear_gram(x) @ h, atol=1e-5 if dtype == "float32" else 1e-12)
    k_rbf = xp.to_numpy(cka.rbf_kernel(xp.asarray(x, dtype), sigma_frac=0.6))
    np.testing.assert_allclose(k_rbf, ref.rbf_gram(x, 0.6), atol=1e-6 if dtype == "float32" else 1e-12)
    k, l = ref.rbf_gram(x), ref.linear_gram(y)
    got_b = cka.hsic(xp.asarray(k, dtype), xp.asarray(l, dtype))
    got_u = cka.hsic_unbiased(xp.asarray(k, dtype), xp.asarray(l, dtype))
    assert xp.is_native(got_b) and xp.is_native(got_u)
    scale = abs(ref.hsic_biased(k, l)) + abs(ref.hsic_unbiased(k, l))
    tol = TOL[dtype] * max(scale, 1.0)
    assert float(got_b) == pytest.approx(ref.hsic_biased(k, l), abs=tol)
    assert float(got_u) == pytest.approx(ref.hsic_unbiased(k, l), abs=tol)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_minibatch_matrix_matches_reference(xp, rng, dtype):
    sizes = [32, 32, 17]  # batches may differ in size
    batches_x = [[rng.normal(size=(n, 12)), np.maximum(rng.normal(1, 1, size=(n, 3, 4, 4)), 0)] for n in sizes]
    batches_y = [[bx[0] @ rng.normal(size=(12, 5)) + rng.normal(size=(n, 5)), rng.normal(size=(n, 2)),
                  bx[1].reshape(n, -1)[:, :9]] for bx, n in zip(batches_x, sizes)]
    expected = ref.minibatch_cka_matrix(batches_x, batches_y)
    got = cka.minibatch_cka_matrix(
        [[xp.asarray(a, dtype) for a in b] for b in batches_x], [[xp.asarray(a, dtype) for a in b] for b in batches_y]
    )
    assert xp.is_native(got) and tuple(got.shape) == (2, 3)
    np.testing.assert_allclose(xp.to_numpy(got), expected, atol=TOL[dtype])


def test_minibatch_cka_scalar_matches_reference(xp, rng):
    xs = [rng.normal(size=(25, 8)) for _ in range(4)]
    ys = [x @ rng.normal(size=(8, 8)) + rng.normal(size=(25, 8)) for x in xs]
    expected = ref.minibatch_cka_matrix([[x] for x in xs], [[y] for y in ys])[0, 0]
    got = cka.minibatch_cka((xp.asarray(x) for x in xs), (xp.asarray(y) for y in ys))
    assert xp.is_native(got) and float(got) == pytest.approx(expected, abs=1e-10)


def test_feature_space_form_equals_gram_form(xp, rng):
    """Kornblith et al.'s identity: CKA from examples equals CKA from features, biased and unbiased."""
    for n, d in [(10, 3), (50, 49), (30, 200)]:
        x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.3 * rng.normal(size=(n, 1))
        for unbiased in (False, True):
            feature_form = float(cka.feature_space_linear_cka(xp.asarray(x), xp.asarray(y), unbiased=unbiased))
            assert feature_form == pytest.approx(ref.cka(x, y, unbiased=unbiased), abs=1e-10)


def test_results_keep_the_array_type_and_float_works(xp, rng):
    x, y = xp.asarray(rng.normal(size=(10, 3))), xp.asarray(rng.normal(size=(10, 4)))
    for value in (cka.cka(x, y), cka.cka(x, y, kernel="rbf"), cka.minibatch_cka([x], [y]),
                  cka.hsic(cka.linear_kernel(x), cka.linear_kernel(y))):
        assert xp.is_native(value)
        assert isinstance(float(value), float)


# ---------------------------------------------------------------------------------------------
# Streaming state
# ---------------------------------------------------------------------------------------------


def test_merged_states_equal_one_pass_and_batch_order_does_not_matter(xp, rng):
    batches = [([rng.normal(size=(16, 5)), rng.normal(size=(16, 7))], [rng.normal(size=(16, 3))]) for _ in range(6)]

    def run(order):
        state = cka.init_state(2, 1, like=xp.asarray(np.zeros(1)))
        for i in order:
            bx, by = batches[i]
            state = cka.update_state(state, [xp.asarray(a) for a in bx], [xp.asarray(a) for a in by])
        return state

    one_pass = cka.finalize(run(range(6)))
    merged = cka.finalize(cka.merge_states(run([0, 1, 2]), run([3, 4, 5])))
    shuffled = cka.finalize(run([5, 2, 0, 4, 1, 3]))
    np.testing.assert_allclose(xp.to_numpy(merged), xp.to_numpy(one_pass), atol=1e-14)
    np.testing.assert_allclose(xp.to_numpy(shuffled), xp.to_numpy(one_pass), atol=1e-14)
    assert float(run(range(6)).n_examples) == 96 and float(run(range(6)).n_batches) == 6


def test_state_accumulators_are_float64(xp):
    state = cka.init_state(2, 3, like=xp.asarray(np.zeros(1), "float32"))
    assert all(str(field.dtype).endswith("float64") for field in state)
    assert tuple(state.hsic_xy.shape) == (2, 3)


def test_update_from_grams_equals_update_from_features(xp, rng):
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 9))
    s0 = cka.init_state(1, 1, like=xp.asarray(x))
    from_features = cka.update_state(s0, [xp.asarray(x)], [xp.asarray(y)])
    from_grams = cka.update_state_from_grams(s0, [cka.linear_kernel(xp.asarray(x))], [cka.linear_kernel(xp.asarray(y))])
    for a, b in zip(from_features, from_grams):
        np.testing.assert_allclose(xp.to_numpy(a), xp.to_numpy(b), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, NaN with a warning for constant inputs
# ---------------------------------------------------------------------------------------------


def test_mismatched_examples_error_shows_both_shapes(xp):
    with pytest.raises(ValueError, match=r"\(10, 3\).*\(12, 3\)"):
        cka.cka(xp.asarray(np.ones((10, 3))), xp.asarray(np.ones((12, 3))))


def test_unbiased_needs_four_examples(xp, rng):
    x = xp.asarray(rng.normal(size=(3, 5)))
    with pytest.raises(ValueError, match="at least 4 examples.*has 3"):
        cka.cka(x, x, unbiased=True)
    with pytest.raises(ValueError, match="at least 4"):
        cka.hsic_unbiased(cka.linear_kernel(x), cka.linear_kernel(x))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_inputs_are_refused(xp, rng, bad):
    x = rng.normal(size=(8, 3))
    x[2, 1] = bad
    with pytest.raises(ValueError, match="y contains NaN or Inf"):
        cka.cka(xp.asarray(rng.normal(size=(8, 3))), xp.asarray(x))


def test_kernel_shape_errors(xp):
    with pytest.raises(ValueError, match=r"gram_x must be a square \(n, n\) kernel matrix; got shape \(4, 5\)"):
        cka.hsic(xp.asarray(np.ones((4, 5))), xp.asarray(np.ones((4, 4))))
    with pytest.raises(ValueError, match=r"same n examples; got shapes \(5, 5\) and \(6, 6\)"):
        cka.hsic_unbiased(xp.asarray(np.eye(5)), xp.asarray(np.eye(6)))


def test_unknown_kernel_lists_the_valid_ones(xp):
    x = xp.asarray(np.eye(5))
    with pytest.raises(ValueError, match="unknown kernel 'cosine'; valid kernels: linear, rbf"):
        cka.cka(x, x, kernel="cosine")


def test_mixed_array_types_are_refused_with_the_conversion_to_use():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="x is a numpy array but y is a torch array.*convert"):
        cka.cka(np.ones((5, 2)), torch.ones(5, 2))
    with pytest.raises(TypeError, match="cka accepts numpy arrays, torch tensors and JAX arrays; got builtins.list"):
        cka.cka([[1.0, 2.0]] * 5, [[1.0, 2.0]] * 5)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_constant_input_gives_nan_with_a_warning(xp, rng, kernel, unbiased):
    constant = np.full((10, 4), 0.1)  # 0.1 is inexact in binary: centring leaves rounding residue
    with pytest.warns(CKANumericsWarning, match="NaN.*constant"):
        value = cka.cka(xp.asarray(constant), xp.asarray(rng.normal(size=(10, 3))), kernel=kernel, unbiased=unbiased)
    assert np.isnan(float(value))


def test_constant_layer_in_minibatch_matrix_is_nan_only_in_its_row(xp, rng):
    batches_x = [[xp.asarray(np.full((8, 3), 7.3)), xp.asarray(rng.normal(size=(8, 3)))] for _ in range(2)]
    batches_y = [[xp.asarray(rng.normal(size=(8, 2)))] for _ in range(2)]
    with pytest.warns(CKANumericsWarning):
        matrix = xp.to_numpy(cka.minibatch_cka_matrix(batches_x, batches_y))
    assert np.isnan(matrix[0]).all() and np.isfinite(matrix[1]).all()


def test_minibatch_skips_a_small_trailing_batch_with_a_warning_and_errors_if_none_left(xp, rng):
    xs = [rng.normal(size=(10, 3)), rng.normal(size=(2, 3))]
    ys = [rng.normal(size=(10, 3)), rng.normal(size=(2, 3))]
    with pytest.warns(UserWarning, match=r"skipped batch\(es\) \[1\] with fewer than 4 examples"):
        value = cka.minibatch_cka([xp.asarray(a) for a in xs], [xp.asarray(a) for a in ys])
    assert float(value) == pytest.approx(ref.cka(xs[0], ys[0], unbiased=True), abs=1e-10)
    with pytest.raises(ValueError, match="no batch with at least 4 examples"), pytest.warns(UserWarning):
        cka.minibatch_cka([xp.asarray(xs[1])], [xp.asarray(ys[1])])


def test_minibatch_mismatched_batches_name_the_batch(xp, rng):
    with pytest.raises(ValueError, match="batch 1: xs has 8 examples but ys has 9"):
        cka.minibatch_cka([xp.asarray(rng.normal(size=(8, 2)))] * 2,
                          [xp.asarray(rng.normal(size=(8, 2))), xp.asarray(rng.normal(size=(9, 2)))])
    with pytest.raises(ValueError, match="ys has more batches than xs"):
        cka.minibatch_cka([xp.asarray(rng.normal(size=(8, 2)))], [xp.asarray(rng.normal(size=(8, 2)))] * 2)
    with pytest.raises(ValueError, match="xs has more batches than ys"):
        cka.minibatch_cka([xp.asarray(rng.normal(size=(8, 2)))] * 2, [xp.asarray(rng.normal(size=(8, 2)))])


def test_biased_cka_with_more_features_than_examples_warns_and_is_misleading(rng):
    """Murphy et al. 2024: independent Gaussians, n = 50, d = 5000: biased ~0.99, debiased ~0."""
    x, y = rng.normal(size=(50, 5000)), rng.normal(size=(50, 5000))
    with pytest.warns(BiasedCKAWarning, match="unbiased=True"):
        biased = float(cka.cka(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BiasedCKAWarning)
        debiased = float(cka.cka(x, y, unbiased=True))
    assert biased > 0.98 and abs(debiased) < 0.05


# ---------------------------------------------------------------------------------------------
# Package shape
# ---------------------------------------------------------------------------------------------


def test_import_cka_imports_no_framework():
    code = "import sys, cka; cka.cka; print(sorted(m for m in ('torch', 'jax', 'matplotlib', 'onnx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_numpy_only_use_needs_no_framework():
    code = (
        "import sys, numpy as np; sys.modules['torch'] = None; sys.modules['jax'] = None\n"
        "import cka; x = np.random.default_rng(0).normal(size=(20, 3)); print(round(float(cka.cka(x, 2 * x)), 9))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1.0"


def test_public_api_is_small_and_explicit():
    expected = {"cka", "hsic", "hsic_unbiased", "linear_kernel", "rbf_kernel", "minibatch_cka",
                "minibatch_cka_matrix", "init_state", "update_state", "update_state_from_grams",
                "merge_states", "finalize", "CKAState"}
    assert expected <= set(cka.__all__)
    for name in cka.__all__:
        assert getattr(cka, name) is not None
