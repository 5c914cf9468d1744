"""What the theory fixes, checked with hypothesis: invariances, symmetry, bounds, identities; and
gradients (CKA as a loss) under torch autograd and jax.grad, and values under jax.jit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cka
from cka import BiasedCKAWarning
from tests import reference as ref

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def features(draw, min_n: int = 6, max_n: int = 40, max_d: int = 12):
    """A pair of feature matrices over the same n examples, from a seed (reproducible, fast)."""
    n = draw(st.integers(min_n, max_n))
    dx, dy = draw(st.integers(1, max_d)), draw(st.integers(1, max_d))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(n, dx)) * rng.uniform(0.1, 10) + rng.normal() * 5
    y = np.concatenate([x, rng.normal(size=(n, dy))], axis=1)[:, rng.permutation(dx + dy)[:dy]]
    return x, y + 0.1 * rng.normal(size=y.shape), rng


def quiet_cka(x, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiasedCKAWarning)
        return float(cka.cka(x, y, **kw))


@PROPERTY
@given(features(), st.sampled_from(["linear", "rbf"]), st.booleans())
def test_cka_of_a_representation_with_itself_is_one(data, kernel, unbiased):
    x, _, _ = data
    assert quiet_cka(x, x, kernel=kernel, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)


@PROPERTY
@given(features(), st.booleans())
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(data, unbiased):
    x, y, rng = data
    q, _ = np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))
    scale = rng.uniform(0.01, 100)
    base = quiet_cka(x, y, unbiased=unbiased)
    assert quiet_cka(scale * x @ q + 3.0, y, unbiased=unbiased) == pytest.approx(base, abs=1e-9)
    # the RBF kernel with a median-scaled bandwidth is invariant too
    assert quiet_cka(scale * x @ q, y, kernel="rbf") == pytest.approx(quiet_cka(x, y, kernel="rbf"), abs=1e-9)


@PROPERTY
@given(features(max_d=60), st.integers(-300, 300), st.sampled_from(["linear", "rbf"]), st.booleans())
def test_invariant_to_scaling_by_any_power_of_ten(data, power, kernel, unbiased):
    """Scale-invariance holds numerically too, far beyond where x^2 over- or underflows float64 (1e+-154):
    the products run on features rescaled by exact powers of two."""
    x, y, _ = data
    assert quiet_cka(x * 10.0**power, y, kernel=kernel, unbiased=unbiased) == pytest.approx(
        quiet_cka(x, y, kernel=kernel, unbiased=unbiased), abs=1e-9
    )


def test_not_invariant_to_anisotropic_scaling(rng):
    x = rng.normal(size=(50, 4))
    y = x[:, :2] + 0.1 * rng.normal(size=(50, 2))
    stretched = x * np.array([10.0, 10.0, 0.1, 0.1])
    assert quiet_cka(stretched, y) - quiet_cka(x, y) > 0.2


@PROPERTY
@given(features(), st.sampled_from(["linear", "rbf"]), st.booleans())
def test_symmetric(data, kernel, unbiased):
    x, y, _ = data
    assert quiet_cka(x, y, kernel=kernel, unbiased=unbiased) == pytest.approx(
        quiet_cka(y, x, kernel=kernel, unbiased=unbiased), abs=1e-12
    )


@PROPERTY
@given(features(min_n=2), st.sampled_from(["linear", "rbf"]))
def test_biased_cka_lies_in_unit_interval(data, kernel):
    x, y, _ = data
    assert -1e-12 <= quiet_cka(x, y, kernel=kernel) <= 1 + 1e-12


@PROPERTY
@given(features(), st.floats(-10, 10))
def test_hsic_unbiased_invariant_to_rank_one_offsets(data, c):
    """HSIC_1(K + a1^T + 1a^T + c11^T, L) = HSIC_1(K, L) exactly (DESIGN.md)."""
    x, y, rng = data
    n = x.shape[0]
    k, g = ref.linear_gram(x), ref.rbf_gram(y)
    a = rng.normal(size=(n, 1)) * 5
    shifted = k + a @ np.ones((1, n)) + np.ones((n, 1)) @ a.T + c
    base = float(cka.hsic_unbiased(k, g))
    assert float(cka.hsic_unbiased(shifted, g)) == pytest.approx(base, abs=1e-9 * max(1.0, abs(base)))


@PROPERTY
@given(features())
def test_minibatch_of_one_batch_equals_unbiased_full_batch(data):
    x, y, _ = data
    assert float(cka.minibatch_cka([x], [y])) == pytest.approx(quiet_cka(x, y, unbiased=True), abs=1e-12)


@PROPERTY
@given(features(min_n=4, max_n=30, max_d=60), st.booleans())
def test_feature_space_and_gram_forms_agree(data, unbiased):
    """Both forms within 1e-9 of the textbook value. The reference is given centred features (every
    HSIC estimator is exactly invariant to centring): on raw features with a common offset of 9
    spreads it errs itself by up to 1e-7 at n = 4 against 50-digit arithmetic, both forms by 1e-12."""
    x, y, _ = data
    expected = ref.cka(x - x.mean(0), y - y.mean(0), unbiased=unbiased)
    assert float(cka.feature_space_linear_cka(x, y, unbiased=unbiased)) == pytest.approx(expected, abs=1e-9)
    assert quiet_cka(x, y, unbiased=unbiased) == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Gradients and jit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel,unbiased", [("linear", False), ("linear", True), ("rbf", False)])
def test_torch_gradcheck_float64(rng, kernel, unbiased):
    torch = pytest.importorskip("torch")
    x = torch.tensor(rng.normal(size=(12, 3)), requires_grad=True)
    y = torch.tensor(rng.normal(size=(12, 20)), requires_grad=True)  # d > n: the Gram form
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiasedCKAWarning)
        assert torch.autograd.gradcheck(lambda a, b: cka.cka(a, b, kernel=kernel, unbiased=unbiased), (x, y))


def test_cka_as_a_torch_loss_increases_similarity(rng):
    torch = pytest.importorskip("torch")
    x = torch.tensor(rng.normal(size=(64, 8)))
    target = x @ torch.diag(torch.tensor([8.0, 4, 2, 1, 0.5, 0.25, 0.1, 0.1], dtype=torch.float64))
    w = torch.zeros(8, 8, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=0.05)
    start = float(cka.cka(x + x @ w, target).detach())
    for _ in range(60):
        optimizer.zero_grad()
        loss = 1 - cka.cka(x + x @ w, target)  # a differentiable 0-d tensor
        loss.backward()
        optimizer.step()
    assert float(cka.cka(x + x @ w, target).detach()) > start + 0.1


@pytest.mark.parametrize("unbiased", [False, True])
def test_jax_grad_matches_finite_differences_and_jit_matches_eager(rng, unbiased):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    x, y = jnp.asarray(rng.normal(size=(10, 3))), jnp.asarray(rng.normal(size=(10, 4)))
    f = lambda a: cka.cka(a, y, unbiased=unbiased)  # noqa: E731
    grad = np.asarray(jax.grad(f)(x))
    numeric = np.zeros_like(grad)
    h = 1e-6
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            e = np.zeros(x.shape)
            e[i, j] = h
            numeric[i, j] = (float(f(x + e)) - float(f(x - e))) / (2 * h)
    np.testing.assert_allclose(grad, numeric, atol=1e-7)
    assert float(jax.jit(f)(x)) == pytest.approx(float(f(x)), abs=1e-13)


def test_minibatch_functions_work_inside_jax_jit(rng):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    xs = [jnp.asarray(rng.normal(size=(16, 5))) for _ in range(3)]
    ys = [jnp.asarray(rng.normal(size=(16, 4))) for _ in range(3)]
    eager = cka.minibatch_cka_matrix([[x, x**2] for x in xs], [[y] for y in ys])
    jitted = jax.jit(lambda a, b: cka.minibatch_cka_matrix([[x, x**2] for x in a], [[y] for y in b]))(xs, ys)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-13)
    assert float(jax.jit(lambda a, b: cka.minibatch_cka(a, b))(xs, ys)) == pytest.approx(
        float(cka.minibatch_cka(xs, ys)), abs=1e-13
    )


@pytest.mark.cuda
def test_cuda_results_stay_on_the_device_and_match_cpu(rng):
    torch = pytest.importorskip("torch")
    x, y = rng.normal(size=(256, 64)), rng.normal(size=(256, 300))
    for kw in ({}, {"unbiased": True}, {"kernel": "rbf"}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BiasedCKAWarning)
            got = cka.cka(torch.tensor(x, device="cuda"), torch.tensor(y, device="cuda"), **kw)
        assert got.device.type == "cuda"
        assert float(got) == pytest.approx(ref.cka(x, y, kw.get("kernel", "linear"), kw.get("unbiased", False)), abs=1e-10)
    batches = [[torch.tensor(x[i:i + 64], device="cuda", dtype=torch.float32)] for i in range(0, 256, 64)]
    matrix = cka.minibatch_cka_matrix(batches, batches)
    assert matrix.device.type == "cuda" and float(matrix[0, 0]) == pytest.approx(1.0, abs=1e-6)
