"""Conformance: published values and closed forms that any CKA implementation must reproduce, on
numpy, torch and JAX (the ``xp`` fixture), each in seconds.

* Kornblith et al.'s demo notebook (google-research ``representation_similarity``): linear 0.55761,
  RBF at 0.5 x the median distance 0.65483, debiased 0.51346.
* The null of biased linear CKA: for independent isotropic Gaussians ``X (n, p1)``, ``Y (n, p2)``,
  ``E[CKA] ~ sqrt(p1 p2 / ((n + p1)(n + p2)))`` (0.20 at n = 32, p = 8; 0.91 at n = 100, p = 1000),
  while debiased CKA is near 0 there.
* RBF CKA tends to linear CKA as the bandwidth grows (``exp(-d^2/2s^2) = 1 - d^2/2s^2 + O(s^-4)``, and
  centring removes the constant: the RBF Gram becomes ``H X X^T H / s^2``).
* Invariance to orthogonal maps, isotropic scaling and offsets (netrep style: ``Y = c X Q + v`` scores
  1), but not to general invertible maps.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

import cka
from cka import BiasedCKAWarning


def kornblith_demo_data() -> tuple[np.ndarray, np.ndarray]:
    """The inputs of Kornblith et al.'s CKA demo notebook (google-research representation_similarity)."""
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


def quiet(fn, *args, **kw) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiasedCKAWarning)
        return float(fn(*args, **kw))


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


def test_kornblith_demo_values_from_both_forms(xp):
    """Their notebook's identity: CKA from examples (Grams) equals CKA from features."""
    x, y = kornblith_demo_data()
    X, Y = xp.asarray(x), xp.asarray(y)
    k, g = cka.linear_kernel(X), cka.linear_kernel(Y)
    from_grams = float(cka.hsic(k, g) / (cka.hsic(k, k) * cka.hsic(g, g)) ** 0.5)
    assert from_grams == pytest.approx(0.55761, abs=5e-6)
    assert float(cka.feature_space_linear_cka(X, Y)) == pytest.approx(from_grams, abs=1e-12)
    debiased = float(cka.hsic_unbiased(k, g) / (cka.hsic_unbiased(k, k) * cka.hsic_unbiased(g, g)) ** 0.5)
    assert debiased == pytest.approx(0.51346, abs=5e-6)
    assert float(cka.feature_space_linear_cka(X, Y, unbiased=True)) == pytest.approx(debiased, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# The null: independent representations
# ---------------------------------------------------------------------------------------------


def null_formula(n: int, p1: int, p2: int) -> float:
    return float(np.sqrt(p1 * p2 / ((n + p1) * (n + p2))))


def test_null_formula_values_quoted_in_the_docs():
    assert null_formula(32, 8, 8) == pytest.approx(0.20, abs=1e-12)
    assert null_formula(100, 1000, 1000) == pytest.approx(0.91, abs=0.001)


@pytest.mark.parametrize(
    "n,p1,p2,seeds,tol",
    # tolerances: a few standard errors of the simulated mean plus the formula's own O(1/n) error
    # (simulated at 200 / 10 seeds: 0.2047 +- 0.0028 against 0.2000; 0.9089 +- 0.0003 against 0.9091)
    [(32, 8, 8, 200, 0.015), (64, 4, 32, 100, 0.015), (100, 1000, 1000, 10, 0.005)],
)
def test_biased_cka_of_independent_gaussians_follows_the_null_formula(xp, n, p1, p2, seeds, tol):
    rng = np.random.default_rng(0)
    biased, debiased = [], []
    for _ in range(seeds):
        x, y = xp.asarray(rng.normal(size=(n, p1))), xp.asarray(rng.normal(size=(n, p2)))
        biased.append(quiet(cka.cka, x, y))
        debiased.append(quiet(cka.cka, x, y, unbiased=True))
    assert np.mean(biased) == pytest.approx(null_formula(n, p1, p2), abs=tol)
    # debiased CKA is centred at 0 under independence: within 4 standard errors of the mean
    assert abs(np.mean(debiased)) < max(4 * np.std(debiased) / np.sqrt(seeds), 0.005)
    assert abs(np.mean(debiased)) < 0.02


# ---------------------------------------------------------------------------------------------
# RBF tends to linear
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [False, True])
def test_rbf_cka_tends_to_linear_cka_as_the_bandwidth_grows(xp, unbiased):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 5))
    y = np.tanh(x @ rng.normal(size=(5, 7))) + 0.3 * rng.normal(size=(60, 7))
    X, Y = xp.asarray(x), xp.asarray(y)
    linear = float(cka.cka(X, Y, unbiased=unbiased))
    gaps = [abs(float(cka.cka(X, Y, kernel="rbf", sigma_frac=f, unbiased=unbiased)) - linear) for f in (1, 10, 100, 1000)]
    assert all(later < earlier / 20 for earlier, later in itertools.pairwise(gaps)), gaps  # O(1/sigma^2)
    assert gaps[-1] < 1e-6
    assert gaps[0] > 1e-3  # at the usual bandwidths the two kernels differ


# ---------------------------------------------------------------------------------------------
# Invariances (netrep style: inputs built with a known answer)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("d", [6, 150])  # the feature-space and the Gram path
def test_orthogonal_map_scaling_and_offset_score_one(xp, seed, d):
    """``Y = c X Q + v`` is the same representation: CKA 1 for every kernel (median bandwidth) and estimator."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, d))
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    y = rng.uniform(0.01, 100) * x @ q + rng.normal(size=(1, d)) * 10
    for kernel in cka.KERNELS:
        for unbiased in (False, True):
            assert quiet(cka.cka, xp.asarray(x), xp.asarray(y), kernel=kernel, unbiased=unbiased) == pytest.approx(
                1.0, abs=1e-9
            ), (kernel, unbiased)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariant_to_orthogonal_maps_of_either_side(xp, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(50, 8)), rng.normal(size=(50, 5))
    y[:, :3] += x[:, :3]
    qx, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    qy, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    for unbiased in (False, True):
        base = float(cka.cka(xp.asarray(x), xp.asarray(y), unbiased=unbiased))
        moved = float(cka.cka(xp.asarray(3.0 * x @ qx), xp.asarray(y @ qy / 7.0 - 2.0), unbiased=unbiased))
        assert moved == pytest.approx(base, abs=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_not_invariant_to_general_invertible_maps(xp, seed):
    """An invertible but non-orthogonal, anisotropic map changes linear CKA: it is not a similarity of
    the representation's geometry (unlike CCA, which would score 1 here)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(100, 10))
    u, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    v, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    a = u @ np.diag(np.logspace(0, 2, 10)) @ v  # invertible, condition number 100
    assert abs(np.linalg.det(a)) > 1e-6
    for unbiased in (False, True):
        assert float(cka.cka(xp.asarray(x), xp.asarray(x @ a), unbiased=unbiased)) < 0.9
