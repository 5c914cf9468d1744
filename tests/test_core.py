"""The functional core, as a specification: every public function on every backend against the
float64 reference (tests/reference.py), at every magnitude, errors and warnings. Published values
and closed forms are in tests/test_conformance.py, the Gram precisions in tests/test_gram_precision.py."""

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


# Published values (Kornblith et al.'s demo) and closed forms: tests/test_conformance.py


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
    k, g = ref.rbf_gram(x), ref.linear_gram(y)
    got_b = cka.hsic(xp.asarray(k, dtype), xp.asarray(g, dtype))
    got_u = cka.hsic_unbiased(xp.asarray(k, dtype), xp.asarray(g, dtype))
    assert xp.is_native(got_b) and xp.is_native(got_u)
    scale = abs(ref.hsic_biased(k, g)) + abs(ref.hsic_unbiased(k, g))
    tol = TOL[dtype] * max(scale, 1.0)
    assert float(got_b) == pytest.approx(ref.hsic_biased(k, g), abs=tol)
    assert float(got_u) == pytest.approx(ref.hsic_unbiased(k, g), abs=tol)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_minibatch_matrix_matches_reference(xp, rng, dtype):
    sizes = [32, 32, 17]  # batches may differ in size
    batches_x = [[rng.normal(size=(n, 12)), np.maximum(rng.normal(1, 1, size=(n, 3, 4, 4)), 0)] for n in sizes]
    batches_y = [[bx[0] @ rng.normal(size=(12, 5)) + rng.normal(size=(n, 5)), rng.normal(size=(n, 2)),
                  bx[1].reshape(n, -1)[:, :9]] for bx, n in zip(batches_x, sizes, strict=True)]
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


def test_every_scalar_result_is_a_0d_array_of_the_input_type(xp, rng):
    """One type for every kernel and path: a 0-d array (numpy: ``ndarray``, never a numpy scalar)."""
    narrow, wide = rng.normal(size=(12, 3)), rng.normal(size=(12, 40))  # feature-space and Gram paths
    k, g = cka.linear_kernel(xp.asarray(narrow)), cka.rbf_kernel(xp.asarray(wide))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiasedCKAWarning)
        values = [cka.cka(xp.asarray(a), xp.asarray(b), kernel=kernel, unbiased=unbiased)
                  for a, b in ((narrow, narrow), (wide, wide)) for kernel in cka.KERNELS for unbiased in (False, True)]
    values += [cka.feature_space_linear_cka(xp.asarray(narrow), xp.asarray(wide)), cka.hsic(k, g), cka.hsic_unbiased(k, g)]
    for value in values:
        assert xp.is_native(value) and tuple(value.shape) == ()
        if xp.name == "numpy":
            assert type(value) is np.ndarray


# ---------------------------------------------------------------------------------------------
# Any magnitude, any offset: the accuracy claim
# ---------------------------------------------------------------------------------------------

# Far outside what an unscaled product survives: squares overflow (1e20 in float32: 1e40) or
# underflow (1e-25: 1e-50; 1e-160 in float64: 1e-320).
EXTREME = {"float32": [1e20, 1e-25], "float64": [1e150, 1e-160]}


def centred_reference(x, y, kernel="linear", unbiased=False) -> float:
    """The float64 value from the same inputs, centred in float64 first (a large offset would cost the
    plain reference its digits: uncentred Grams of features around 1e5 hold 1e10 + O(1))."""
    x, y = ref.flatten(x), ref.flatten(y)
    return ref.cka(x - x.mean(0), y - y.mean(0), kernel, unbiased)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("which", [0, 1], ids=["huge", "tiny"])
@pytest.mark.parametrize("shape", [(40, 6), (24, 60)], ids=["feature-space", "gram"])
def test_cka_at_extreme_magnitudes_is_the_value_of_the_unscaled_features(xp, rng, dtype, which, shape):
    scale = EXTREME[dtype][which]
    x = rng.normal(size=shape)
    y = x @ rng.normal(size=(shape[1], 5)) + rng.normal(size=(shape[0], 5))
    xs = (x * scale).astype(dtype)
    unscaled = (xs.astype(np.float64) / scale)  # the same numbers the scaled inputs hold
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow, no "constant" warning, no NaN
        warnings.simplefilter("ignore", BiasedCKAWarning)
        for kernel in cka.KERNELS:
            for unbiased in (False, True):
                got = float(cka.cka(xp.asarray(xs, dtype), xp.asarray(y, dtype), kernel=kernel, unbiased=unbiased))
                expected = ref.cka(unscaled, y.astype(dtype), kernel, unbiased)
                assert np.isfinite(got) and got == pytest.approx(expected, abs=1e-5), (kernel, unbiased)
        both = float(cka.cka(xp.asarray(xs, dtype), xp.asarray(xs, dtype), unbiased=True))
        assert both == pytest.approx(1.0, abs=1e-6)
    if shape[1] < shape[0]:
        fs = float(cka.feature_space_linear_cka(xp.asarray(xs, dtype), xp.asarray(y, dtype)))
        assert fs == pytest.approx(ref.cka(unscaled, y.astype(dtype)), abs=1e-5)


@pytest.mark.parametrize("dtype,scale", [("float32", 1e20), ("float32", 1e-25), ("float64", 1e-3)])
def test_minibatch_cka_at_extreme_float32_magnitudes(xp, rng, dtype, scale):
    """float32 features of any magnitude have float64 Grams that hold their true scale, so the
    accumulator sums them as they are (float64 extremes: see the next test)."""
    xs = [rng.normal(size=(16, 30)) for _ in range(3)]
    ys = [x[:, :10] + rng.normal(size=(16, 10)) for x in xs]
    scaled = [(x * scale).astype(dtype) for x in xs]
    expected = ref.minibatch_cka_matrix([[s.astype(np.float64) / scale] for s in scaled], [[y.astype(dtype)] for y in ys])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CKANumericsWarning)
        got = float(cka.minibatch_cka([xp.asarray(s, dtype) for s in scaled], [xp.asarray(y, dtype) for y in ys]))
    assert got == pytest.approx(float(expected[0, 0]), abs=1e-5)


@pytest.mark.parametrize("scale", [1e150, 1e-160, 1e300, 1e-300])
def test_minibatch_cka_at_extreme_float64_magnitudes(xp, rng, scale):
    """Grams and HSIC terms far outside float64: the sums are kept at per-layer powers of two
    (CKAState.log2_scale_x/y), so the value is the unscaled features', with no warning."""
    xs = [rng.normal(size=(16, 30)) for _ in range(3)]
    ys = [x[:, :10] + rng.normal(size=(16, 10)) for x in xs]
    for kernel in cka.KERNELS:
        for unbiased in (True, False):
            expected = ref.minibatch_cka_matrix([[x] for x in xs], [[y] for y in ys], unbiased=unbiased, kernel=kernel)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = cka.minibatch_cka([xp.asarray(x * scale) for x in xs], [xp.asarray(y) for y in ys],
                                        kernel=kernel, unbiased=unbiased)
            assert float(got) == pytest.approx(float(expected[0, 0]), abs=1e-9), (kernel, unbiased)


def test_constant_layers_stay_nan_at_every_magnitude(xp, rng):
    for dtype, scales in EXTREME.items():
        for value in [*scales, 0.1]:
            constant = np.full((10, 4), value, dtype=dtype)
            with pytest.warns(CKANumericsWarning, match="NaN.*constant"):
                got = cka.cka(xp.asarray(constant, dtype), xp.asarray(rng.normal(size=(10, 3)), dtype))
            assert np.isnan(float(got)), (dtype, value)
            assert not np.any(xp.to_numpy(cka.gram(xp.asarray(constant, dtype))))
    zeros = xp.asarray(np.zeros((10, 4)))
    with pytest.warns(CKANumericsWarning, match="constant"):
        assert np.isnan(float(cka.cka(zeros, xp.asarray(rng.normal(size=(10, 3))))))


def test_gram_of_rescaled_features_and_its_exponent(xp, rng):
    x = rng.normal(size=(12, 30))
    k, e = cka.gram(xp.asarray(x), return_exponent=True)
    np.testing.assert_array_equal(xp.to_numpy(k) * 2.0 ** float(e), xp.to_numpy(cka.gram(xp.asarray(x))))
    # float64 features whose Gram underflows float64: gram() says so; the rescaled Gram and its exponent hold it
    tiny = xp.asarray(x * 1e-160)
    with pytest.warns(CKANumericsWarning, match="outside the range of.*return_exponent=True"):
        cka.gram(tiny)
    k_tiny, e_tiny = cka.gram(tiny, return_exponent=True)
    assert float(e_tiny) < -1000
    half = 1e-160 * 2.0 ** (-float(e_tiny) / 2)  # the same features, rescaled by hand: K_tiny is their Gram
    np.testing.assert_allclose(xp.to_numpy(k_tiny), xp.to_numpy(cka.gram(xp.asarray(x * half))), rtol=1e-12)
    # the RBF kernel does not depend on the scale: exponent 0, same values
    k_rbf, e_rbf = cka.gram(tiny, kernel="rbf", return_exponent=True)
    assert float(e_rbf) == 0
    np.testing.assert_allclose(xp.to_numpy(k_rbf), xp.to_numpy(cka.rbf_kernel(xp.asarray(x))), atol=1e-14)


def test_rbf_with_fixed_sigma_at_extreme_magnitudes(xp, rng):
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 6))
    expected = ref.cka(x, y, "rbf", sigma=1.5)
    for scale in (1e150, 1e-160):
        got = cka.cka(xp.asarray(x * scale), xp.asarray(y * scale), kernel="rbf", sigma=1.5 * scale)
        assert float(got) == pytest.approx(expected, abs=1e-10)


@pytest.mark.filterwarnings("error")  # and no overflow warning on the way (self terms of K 1e200 would overflow)
def test_hsic_of_grams_at_extreme_magnitudes(xp, rng):
    """HSIC is bilinear: computed on rescaled Grams and scaled back, it is right wherever it is representable."""
    k, g = ref.linear_gram(rng.normal(size=(12, 5))), ref.rbf_gram(rng.normal(size=(12, 3)))
    for hsic, formula in ((cka.hsic, ref.hsic_biased), (cka.hsic_unbiased, ref.hsic_unbiased)):
        expected = formula(k, g)
        got = float(hsic(xp.asarray(k * 1e200), xp.asarray(g * 1e-190)))
        assert got == pytest.approx(expected * 1e10, rel=1e-10)
        balanced = float(hsic(xp.asarray(k * 1e-250), xp.asarray(k * 1e250)))  # each factor alone is out of range
        assert balanced == pytest.approx(formula(k, k), rel=1e-10)


def test_jitted_cka_rescales_on_the_device(rng):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    x, y = rng.normal(size=(12, 40)), rng.normal(size=(12, 40)) + 0.0
    y[:, :20] += x[:, :20]
    expected = ref.cka(x, y, unbiased=True)
    f = jax.jit(lambda a, b: cka.cka(a, b, unbiased=True))
    for scale in (1.0, 1e150, 1e-160):
        assert float(f(jnp.asarray(x * scale), jnp.asarray(y))) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("path", ["feature-space", "gram"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_large_common_offset_float32_within_1e6_of_float64_on_both_paths(xp, rng, path, unbiased):
    """float32 features at an offset of 1e5 times their spread: both forms of linear CKA within 1e-6 of the
    float64 value from the same float32 inputs (the feature-space form erred by 3e-4 before)."""
    n, d = (2048, 16) if path == "feature-space" else (64, 300)
    base = rng.normal(size=(n, d))
    x = (base + 1e5).astype(np.float32)
    y = (base @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=(n, d)) + 1e5).astype(np.float32)
    expected = centred_reference(x, y, unbiased=unbiased)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiasedCKAWarning)
        got = float(cka.cka(xp.asarray(x, "float32"), xp.asarray(y, "float32"), unbiased=unbiased))
    assert got == pytest.approx(expected, abs=1e-6)
    if path == "feature-space":
        fs = float(cka.feature_space_linear_cka(xp.asarray(x, "float32"), xp.asarray(y, "float32"), unbiased=unbiased))
        assert fs == pytest.approx(expected, abs=1e-6)


def test_torch_features_of_different_float_dtypes_are_promoted(rng):
    torch = pytest.importorskip("torch")
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 9))
    y[:, :6] += x
    expected = ref.cka(x.astype(np.float32), y)
    for path_width in (6, 60):  # the feature-space and the Gram path
        xw = np.concatenate([x] * (path_width // 6), axis=1)
        expected = ref.cka(xw.astype(np.float32), y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BiasedCKAWarning)
            got = cka.cka(torch.tensor(xw, dtype=torch.float32), torch.tensor(y, dtype=torch.float64))
            half = cka.cka(torch.tensor(xw, dtype=torch.bfloat16), torch.tensor(y, dtype=torch.float32))
        assert got.dtype == torch.float64 and float(got) == pytest.approx(expected, abs=1e-6)
        expected_half = ref.cka(torch.tensor(xw, dtype=torch.bfloat16).double().numpy(), y.astype(np.float32))
        assert float(half) == pytest.approx(expected_half, abs=1e-6)
    got = cka.feature_space_linear_cka(torch.tensor(x, dtype=torch.float16), torch.tensor(y, dtype=torch.float64))
    assert float(got) == pytest.approx(ref.cka(x.astype(np.float16), y), abs=1e-6)


@pytest.mark.parametrize("mode", ["default", "always rescale"])
def test_both_ways_of_deciding_to_rescale_give_the_same_numbers(xp, rng, monkeypatch, mode):
    """numpy and torch on the CPU try the unscaled product and redo it rescaled only where needed; JAX
    (under jit) and torch on accelerators always rescale (no host synchronisation). Powers of two are
    exact: same bits in the normal range, the right value at the extremes, whichever way is taken
    (forced here on the CPU)."""
    from cka.backends import get_backend

    x = post_relu_features(rng, 16, 50).astype(np.float32)
    backend = get_backend(xp.asarray(x))
    expected_normal = xp.to_numpy(cka.gram(xp.asarray(x, "float32")))
    if mode == "always rescale":
        monkeypatch.setattr(backend, "branches_cheaply", lambda a: False)
    np.testing.assert_array_equal(xp.to_numpy(cka.gram(xp.asarray(x, "float32"))), expected_normal)
    y = x[:, :20] + rng.normal(size=(16, 20)).astype(np.float32)
    for scale in EXTREME["float32"]:
        got = float(cka.cka(xp.asarray(x * np.float32(scale), "float32"), xp.asarray(y, "float32"), unbiased=True))
        assert got == pytest.approx(ref.cka(x * np.float32(scale) / scale, y, unbiased=True), abs=1e-5)
    constant = xp.asarray(np.full((8, 5), 3.7), "float32")
    assert not np.any(xp.to_numpy(cka.gram(constant)))


def test_torch_centring_buffer_is_reused_bounded_and_released(rng):
    torch = pytest.importorskip("torch")
    from cka.backends import backend_for

    backend = backend_for("torch")
    backend.release_buffers()
    assert backend.buffer_sizes() == {}
    small, large = torch.tensor(rng.normal(size=(8, 100)), dtype=torch.float32), torch.tensor(rng.normal(size=(8, 300)))
    first = cka.gram(small, check=False)
    kept = first.clone()
    assert backend.buffer_sizes() == {torch.float32: 800}
    cka.gram(torch.tensor(rng.normal(size=(8, 50)), dtype=torch.float32), check=False)
    assert backend.buffer_sizes() == {torch.float32: 800}  # a smaller layer reuses it
    assert torch.equal(first, kept)  # results never alias the buffer
    cka.gram(large.float(), check=False)
    assert backend.buffer_sizes() == {torch.float32: 2400}  # one per dtype: the larger replaces the smaller
    cka.gram(large, check=False)
    assert backend.buffer_sizes() == {torch.float32: 2400, torch.float64: 2400}
    backend.release_buffers()
    assert backend.buffer_sizes() == {}


def test_torch_centring_buffer_is_safe_with_autograd_inference_mode_and_threads(rng):
    torch = pytest.importorskip("torch")
    import threading

    from cka.backends import backend_for

    backend = backend_for("torch")
    backend.release_buffers()
    x = torch.tensor(rng.normal(size=(10, 40)), requires_grad=True)
    (cka.gram(x) ** 2).sum().backward()  # no buffer under autograd: out= would cut the graph
    assert x.grad is not None and torch.isfinite(x.grad).all() and backend.buffer_sizes() == {}
    with torch.inference_mode():
        inside = cka.gram(x.detach(), check=False)
    outside = cka.gram(x.detach(), check=False)  # a buffer made in inference mode stays usable outside
    assert torch.equal(inside, outside) and backend.buffer_sizes() == {torch.float64: 400}
    layers = [torch.tensor(rng.normal(size=(12, 2000))) for _ in range(8)]
    expected = [cka.gram(a, check=False) for a in layers]
    results: dict = {}

    def work(i: int) -> None:
        results[i] = [cka.gram(layers[(i + j) % 8], check=False) for j in range(8)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for j in range(8):
            assert torch.equal(results[i][j], expected[(i + j) % 8])
    backend.release_buffers()


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
    for a, b in zip(from_features, from_grams, strict=True):
        np.testing.assert_allclose(xp.to_numpy(a), xp.to_numpy(b), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, NaN with a warning for constant inputs
# ---------------------------------------------------------------------------------------------


def test_mismatched_examples_error_shows_both_shapes(xp):
    with pytest.raises(ValueError, match=r"\(10, 3\).*\(12, 3\)"):
        cka.cka(xp.asarray(np.ones((10, 3))), xp.asarray(np.ones((12, 3))))


def test_unbiased_needs_four_examples(xp, rng):
    x = xp.asarray(rng.normal(size=(3, 5)))
    with pytest.raises(ValueError, match=r"at least 4 examples.*has 3"):
        cka.cka(x, x, unbiased=True)
    with pytest.raises(ValueError, match="at least 4"):
        cka.hsic_unbiased(cka.linear_kernel(x), cka.linear_kernel(x))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_inputs_are_refused(xp, rng, bad):
    x = rng.normal(size=(8, 3))
    x[2, 1] = bad
    with pytest.raises(ValueError, match="y contains NaN or Inf"):
        cka.cka(xp.asarray(rng.normal(size=(8, 3))), xp.asarray(x))


def test_complex_inputs_are_refused(xp, rng):
    z = rng.normal(size=(8, 3)) + 1j * rng.normal(size=(8, 3))
    if xp.name == "numpy":
        zc = z
    elif xp.name == "torch":
        import torch

        zc = torch.from_numpy(z)
    else:
        import jax.numpy as jnp

        zc = jnp.asarray(z)
    real = xp.asarray(rng.normal(size=(8, 3)))
    calls = [lambda: cka.cka(real, zc), lambda: cka.cka(zc, real, kernel="rbf"), lambda: cka.gram(zc, check=False),
             lambda: cka.linear_kernel(zc), lambda: cka.feature_space_linear_cka(zc, real)]
    for call in calls:
        with pytest.raises(TypeError, match=r"complex dtype.*real and imaginary parts"):
            call()
    with pytest.raises(TypeError, match="gram_y has the complex dtype"):
        cka.hsic(cka.linear_kernel(real), zc[:, :1] @ zc[:, :1].T if xp.name != "numpy" else np.outer(z[:, 0], z[:, 0]))


def test_non_numeric_features_are_refused():
    with pytest.raises(TypeError, match="x has dtype <U1; features must be real numbers"):
        cka.cka(np.array([["a"]] * 5), np.ones((5, 1)))


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_nonpositive_or_nonfinite_bandwidths_are_refused(xp, rng, bad):
    x = xp.asarray(rng.normal(size=(8, 3)))
    for call, name in [(lambda: cka.cka(x, x, kernel="rbf", sigma=bad), "sigma"),
                       (lambda: cka.cka(x, x, kernel="rbf", sigma_frac=bad), "sigma_frac"),
                       (lambda: cka.rbf_kernel(x, sigma=bad), "sigma"),
                       (lambda: cka.gram(x, kernel="rbf", sigma_frac=bad), "sigma_frac")]:
        with pytest.raises(ValueError, match=rf"^{name} must be a positive, finite number.*got {bad!r}"):
            call()


def test_bandwidths_that_are_not_numbers_are_refused(rng):
    x = rng.normal(size=(8, 3))
    with pytest.raises(TypeError, match=r"sigma_frac must be a positive real number.*'0.5' \(str\)"):
        cka.cka(x, x, kernel="rbf", sigma_frac="0.5")
    with pytest.raises(TypeError, match=r"sigma must be a positive real number.*\(complex\)"):
        cka.cka(x, x, kernel="rbf", sigma=1j)


@pytest.mark.parametrize("bad", ["no", 0, 1, None, "False"])
def test_unbiased_must_be_a_bool(xp, rng, bad):
    x = xp.asarray(rng.normal(size=(8, 3)))
    for call in (lambda: cka.cka(x, x, unbiased=bad), lambda: cka.feature_space_linear_cka(x, x, unbiased=bad)):
        with pytest.raises(TypeError, match=rf"unbiased must be True or False; got {bad!r}"):
            call()
    assert float(cka.cka(x, x, unbiased=np.bool_(True))) == pytest.approx(1.0)
    cka.core._check_unbiased(True)  # the check the accumulator calls too
    with pytest.raises(TypeError):
        cka.core._check_unbiased("yes")


def test_gram_flags_must_be_bools(rng):
    x = rng.normal(size=(8, 3))
    with pytest.raises(TypeError, match="check must be True or False"):
        cka.gram(x, check="no")
    with pytest.raises(TypeError, match="return_exponent must be True or False"):
        cka.gram(x, return_exponent=1)


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
    with pytest.raises(TypeError, match=r"x is a numpy array but y is a torch array.*convert"):
        cka.cka(np.ones((5, 2)), torch.ones(5, 2))
    with pytest.raises(TypeError, match=r"cka accepts numpy arrays, torch tensors and JAX arrays; got builtins\.list"):
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
