"""The accumulator (cka/state.py): compensated sums, masks and skipped batches, and the clear errors
of its edge calls (issue 13). Every path's numbers against the reference: tests/test_engine.py."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import cka
from cka import _sums
from cka import state as engine
from cka.state import CKAState, CompensatedCKAState
from tests import reference
from tests.conftest import Namespace

EXACT = 1e-10


def _features(rng: np.random.Generator, n: int, d: int = 6) -> np.ndarray:
    return np.maximum(rng.normal(size=(n, d)) + 0.5, 0.0)


def _leaves(state: object) -> list[np.ndarray]:
    return [np.asarray(Namespace("torch").to_numpy(a) if isinstance(a, torch.Tensor) else a)
            for a in jax.tree.leaves(state)]


# --------------------------------------------------------------------------------------------
# The state types
# --------------------------------------------------------------------------------------------


def test_init_state_is_compensated_exactly_where_the_accumulator_is_not_float64() -> None:
    assert type(cka.init_state(2, 3, like=np.zeros(1))) is CKAState
    assert type(cka.init_state(2, 3, like=torch.zeros(1))) is CKAState
    assert type(cka.init_state(2, 3, like=jnp.zeros(1))) is CKAState  # x64 is on in this process
    state = cka.init_state(2, 3, like=np.zeros(1), compensated=True)
    assert isinstance(state, CompensatedCKAState)
    assert state.sums.hsic_xy.shape == (2, 3) and state.compensation.hsic_yy.shape == (3,)
    assert state.hsic_xx.shape == (2,) and float(state.n_batches) == 0.0  # CKAState's fields, folded


def test_ckastate_stays_constructible_from_its_five_fields() -> None:
    state = CKAState(np.ones((1, 1)), np.ones(1), np.ones(1), np.asarray(8.0), np.asarray(1.0))
    assert CKAState._fields[:5] == ("hsic_xy", "hsic_xx", "hsic_yy", "n_examples", "n_batches")
    # the statistics fields (cka.statistics) are optional: absent here, empty in init_state's states
    assert CKAState._fields[5:9] == ("boot_xy", "boot_xx", "boot_yy", "null_xy")
    # the sums' per-layer scales (powers of two; None: all 0, the plain sums)
    assert CKAState._fields[9:] == ("log2_scale_x", "log2_scale_y") and state.log2_scale_x is None
    assert state.boot_xy is None and state.null_xy is None
    assert cka.init_state(1, 1, np.zeros(())).boot_xy.shape == (0, 1, 1)
    np.testing.assert_array_equal(cka.finalize(state), [[1.0]])
    assert engine.folded(state) is state


def test_two_sum_is_exact() -> None:
    a, b = np.float32(1.0), np.float32(1e-9)
    s, e = _sums._two_sum(a, b)
    assert s == np.float32(1.0) and e == np.float32(1e-9)
    s, e = _sums._two_sum(np.float32(-3e-9), np.float32(2.0))  # |a| < |b|: TwoSum, not FastTwoSum
    assert float(s) + float(e) == float(np.float32(-3e-9)) + 2.0


def test_compensation_keeps_float32_sums_exact() -> None:
    # 20000 float32 additions of 0.1: plain sums drift (relative 2e-4), compensated ones stay within
    # about one float32 rounding of the total (eps = 1.2e-7)
    def float32_state(value: float) -> CKAState:
        return CKAState(*(np.full(shape, value, np.float32) for shape in ((1, 1), (1,), (1,), (), ())))

    plain = float32_state(0.0)
    compensated = CompensatedCKAState(float32_state(0.0), float32_state(0.0))
    delta = float32_state(0.1)
    for _ in range(20_000):
        plain = cka.merge_states(plain, delta)
        compensated = cka.merge_states(compensated, delta)
    exact = 20_000 * float(np.float32(0.1))
    plain_error = abs(float(plain.hsic_xy[0, 0]) - exact) / exact
    compensated_error = abs(float(compensated.hsic_xy[0, 0]) - exact) / exact  # folded: sums + compensation
    assert plain_error > 1e-5
    assert compensated_error < 1e-7
    assert isinstance(cka.merge_states(plain, compensated), CompensatedCKAState)  # either order promotes


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_compensated_state_gives_the_plain_states_numbers(xp: Namespace, kernel: str) -> None:
    rng = np.random.default_rng(1)
    batches = [([_features(rng, n), _features(rng, n, 3)], [_features(rng, n, 4)]) for n in (9, 12, 7)]
    results = []
    for compensated in (False, True):
        state = cka.init_state(2, 1, like=xp.asarray(np.zeros(1)), compensated=compensated)
        for bx, by in batches:
            state = cka.update_state(state, [xp.asarray(a) for a in bx], [xp.asarray(a) for a in by], kernel=kernel)
        grams = [cka.gram(xp.asarray(a), kernel=kernel) for a in batches[0][0]], [cka.gram(xp.asarray(batches[0][1][0]), kernel=kernel)]
        state = cka.update_state_from_grams(state, *grams)
        results.append(xp.to_numpy(cka.finalize(state)))
    expected = reference.minibatch_cka_matrix([b[0] for b in batches] + [batches[0][0]],
                                              [b[1] for b in batches] + [batches[0][1]], kernel=kernel)
    np.testing.assert_allclose(results[0], expected, rtol=0, atol=EXACT)
    np.testing.assert_allclose(results[1], expected, rtol=0, atol=EXACT)


# --------------------------------------------------------------------------------------------
# Masks: too few valid rows skip the batch (no NaN poisoning), with the one warning
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("unbiased", "valid"), [(True, 3), (True, 0), (False, 1)])
def test_masked_batch_with_too_few_valid_rows_is_skipped_with_the_warning(xp: Namespace, unbiased: bool, valid: int) -> None:
    rng = np.random.default_rng(2)
    x, y = _features(rng, 10), _features(rng, 10, 4)
    state = cka.update_state(cka.init_state(1, 1, like=xp.asarray(x)), [xp.asarray(x)], [xp.asarray(y)], unbiased=unbiased)
    mask = xp.asarray(np.arange(10) < valid, dtype="bool")
    with pytest.warns(UserWarning, match=r"skipped batch\(es\) \[1\] with fewer than"):
        after = cka.update_state(state, [xp.asarray(x)], [xp.asarray(y)], mask=mask, unbiased=unbiased)
    for a, b in zip(_leaves(after), _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)  # unchanged: not NaN, not counted
    assert np.isfinite(xp.to_numpy(cka.finalize(after))).all()


def test_masked_batch_with_enough_rows_adds_only_them_and_ignores_nan_padding(xp: Namespace) -> None:
    rng = np.random.default_rng(3)
    x, y = _features(rng, 12), _features(rng, 12, 4)
    x[9:] = np.nan  # padding may hold anything
    mask = xp.asarray(np.arange(12) < 9, dtype="bool")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = cka.update_state(cka.init_state(1, 1, like=xp.asarray(x)), [xp.asarray(x)], [xp.asarray(y)], mask=mask)
    expected = reference.minibatch_cka_matrix([[x[:9]]], [[y[:9]]])
    np.testing.assert_allclose(xp.to_numpy(cka.finalize(state)), expected, rtol=0, atol=EXACT)
    assert float(xp.to_numpy(state.n_examples)) == 9.0


def test_masked_nan_in_a_valid_row_names_the_layer(xp: Namespace) -> None:
    rng = np.random.default_rng(4)
    x, y = _features(rng, 12), _features(rng, 12, 4)
    y[2, 1] = np.inf
    mask = xp.asarray(np.arange(12) < 9, dtype="bool")
    with pytest.raises(ValueError, match=r"ys\[0\] contains NaN or Inf"):
        cka.update_state(cka.init_state(1, 1, like=xp.asarray(x)), [xp.asarray(x)], [xp.asarray(y)], mask=mask)


def test_masked_skip_works_under_jit_by_where() -> None:
    rng = np.random.default_rng(5)
    x, y = jnp.asarray(_features(rng, 10)), jnp.asarray(_features(rng, 10, 4))
    state = cka.update_state(cka.init_state(1, 1, like=x), [x], [y])
    update = jax.jit(lambda s, m: cka.update_state(s, [x], [y], mask=m))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no host round-trip, so no warning under jit
        after = update(state, jnp.arange(10) < 3)
    for a, b in zip(_leaves(after), _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    counted = update(state, jnp.arange(10) < 6)
    assert float(counted.n_batches) == 2.0 and float(counted.n_examples) == 16.0


def test_padded_grams_with_too_few_examples_are_skipped_with_the_warning() -> None:
    rng = np.random.default_rng(6)
    x, y = _features(rng, 8), _features(rng, 8, 3)
    state = cka.update_state_from_grams(cka.init_state(1, 1, like=x), [cka.gram(x)], [cka.gram(y)])
    small = np.zeros((8, 8))
    small[:3, :3] = cka.gram(x[:3])
    with pytest.warns(UserWarning, match=r"skipped batch\(es\) \[1\]"):
        after = cka.update_state_from_grams(state, [small], [small], n=3)
    for a, b in zip(_leaves(after), _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# Edge calls give clear errors (issue 13)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [(0, 0), (0, 2), (2, -1), (1.5, 1), ("2", 1)])
def test_init_state_needs_at_least_one_layer_per_side(layers: tuple) -> None:
    with pytest.raises(ValueError, match=r"must be a positive int .*at least one layer per side\); got"):
        cka.init_state(*layers, like=np.zeros(1))


def test_merging_states_of_different_array_types_names_both_and_the_fix() -> None:
    a = cka.init_state(1, 1, like=np.zeros(1))
    b = cka.init_state(1, 1, like=torch.zeros(1))
    with pytest.raises(TypeError, match=r"numpy arrays \(a\) with one of torch arrays \(b\); convert one first"):
        cka.merge_states(a, b)
    with pytest.raises(TypeError, match=r"jax arrays \(a\) with one of numpy"):
        cka.merge_states(cka.init_state(1, 1, like=jnp.zeros(1)), a)
    with pytest.raises(ValueError, match=r"different layers: \(1, 1\) vs \(2, 1\)"):
        cka.merge_states(a, cka.init_state(2, 1, like=np.zeros(1)))
    with pytest.raises(TypeError, match="must be a CKAState"):
        cka.merge_states(a, {"hsic_xy": 1})


def test_a_mask_of_another_array_type_is_refused() -> None:
    x = torch.ones((8, 3)).double()
    state = cka.init_state(1, 1, like=x)
    with pytest.raises(TypeError, match="state is a torch array but mask is a numpy array"):
        cka.update_state(state, [x], [x], mask=np.ones(8, bool))
    with pytest.raises(ValueError, match=r"mask must have shape \(8,\)"):
        cka.update_state(state, [x], [x], mask=torch.ones(9, dtype=torch.bool))


def test_merging_states_of_different_dtypes_is_refused() -> None:
    a = CKAState(*(np.zeros(s, np.float32) for s in ((1, 1), (1,), (1,), (), ())))
    with pytest.raises(TypeError, match=r"float32 .a. with one in float64 .b."):
        cka.merge_states(a, cka.init_state(1, 1, like=np.zeros(1)))


def test_non_square_or_mismatched_grams_are_refused_with_their_shapes() -> None:
    rng = np.random.default_rng(7)
    k8, k6 = cka.gram(_features(rng, 8)), cka.gram(_features(rng, 6))
    state = cka.init_state(2, 1, like=k8)
    with pytest.raises(ValueError, match=r"grams_x\[1\] must be a square \(n, n\) Gram matrices; got shape \(8, 5\)"):
        cka.update_state_from_grams(state, [k8, k8[:, :5]], [k8])
    with pytest.raises(ValueError, match=r"every Gram of grams_x must be over the same n examples; got shapes \[\(8, 8\), \(6, 6\)\]"):
        cka.update_state_from_grams(state, [k8, k6], [k8])
    with pytest.raises(ValueError, match=r"n = 8 for grams_x .first shape \(8, 8\). and n = 6 for grams_y"):
        cka.update_state_from_grams(state, [k8, k8], [k6])
    with pytest.raises(ValueError, match=r"grams_y must be an \(L, n, n\) stack of Gram matrices; got shape \(1, 8, 7\)"):
        cka.update_state_from_grams(state, np.stack([k8, k8]), k8[None, :, :7])
    with pytest.raises(ValueError, match=r"made for 2 x 1 layers but this batch has 1 x 1"):
        cka.update_state_from_grams(state, [k8], [k8])
    with pytest.raises(ValueError, match=r"grams_x holds no Gram"):
        cka.update_state_from_grams(state, [], [k8])


def test_nan_or_inf_grams_name_the_side_and_layer(xp: Namespace) -> None:
    rng = np.random.default_rng(8)
    good = cka.gram(_features(rng, 8))
    bad = good.copy()
    bad[2, 5] = bad[5, 2] = np.inf
    state = cka.init_state(1, 2, like=xp.asarray(good))
    with pytest.raises(ValueError, match=r"grams_y\[1\] contains NaN or Inf values"):
        cka.update_state_from_grams(state, [xp.asarray(good)], [xp.asarray(good), xp.asarray(bad)])
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match=r"grams_x\[0\] contains NaN or Inf"):
        cka.update_state_from_grams(state, xp.asarray(bad[None]), [xp.asarray(good), xp.asarray(good)])
    # check=False: the frontends track non-finite values themselves; NaN reaches the sums
    unchecked = cka.update_state_from_grams(state, [xp.asarray(bad)], [xp.asarray(good)] * 2, check=False)
    assert not np.isfinite(xp.to_numpy(unchecked.hsic_xx)).any()


def test_empty_batch_or_layer_lists_give_clear_errors() -> None:
    x = np.ones((8, 3))
    with pytest.raises(ValueError, match="xs is empty: pass at least one batch"):
        cka.minibatch_cka_matrix([], [])
    with pytest.raises(ValueError, match=r"batch 0: xs holds no layer; pass at least one"):
        cka.minibatch_cka_matrix([[]], [[x]])
    with pytest.raises(ValueError, match=r"batch 1: ys holds no layer"):
        cka.minibatch_cka_matrix([[x], [x]], [[x], {}])
    with pytest.raises(ValueError, match="ys has more batches than xs"):
        cka.minibatch_cka_matrix([], [[x]])


@pytest.mark.parametrize("unbiased", ["no", 0, None, np.array([True])])
def test_unbiased_must_be_a_bool(unbiased: object) -> None:
    x = np.random.default_rng(9).normal(size=(8, 3))
    state = cka.init_state(1, 1, like=x)
    calls = [
        lambda: cka.update_state(state, [x], [x], unbiased=unbiased),
        lambda: cka.update_state_from_grams(state, [cka.gram(x)], [cka.gram(x)], unbiased=unbiased),
        lambda: cka.minibatch_cka_matrix([[x]], [[x]], unbiased=unbiased),
        lambda: cka.minibatch_cka([x], [x], unbiased=unbiased),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"unbiased must be True or False; got .* Pass unbiased=True"):
            call()
    assert np.isfinite(cka.minibatch_cka([x], [x], unbiased=np.bool_(True)))  # numpy's bool is a bool


# --------------------------------------------------------------------------------------------
# The Grams a caller passes: read, never written, unless it says they may be (overwrite=True)
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::cka.statistics.CoarseStatisticsWarning")
@pytest.mark.parametrize("array", ["numpy", "torch"])
@pytest.mark.parametrize("statistics", [{}, {"bootstrap": 3, "permutations": 3}])
def test_update_from_grams_leaves_the_callers_grams_untouched_unless_told_to_overwrite(
    array: str, statistics: dict
) -> None:
    rng = np.random.default_rng(5)
    xs, ys = [_features(rng, 12) for _ in range(2)], [_features(rng, 12, 4) for _ in range(3)]
    grams_x = np.stack([x @ x.T for x in xs])
    grams_y = np.stack([y @ y.T for y in ys])
    convert = (lambda a: torch.from_numpy(a.copy())) if array == "torch" else (lambda a: a.copy())
    gx, gy = convert(grams_x), convert(grams_y)
    state = cka.init_state(2, 3, like=gx, **statistics)
    kept = engine.update_state_from_grams(state, gx, gy, batch_index=0)
    np.testing.assert_array_equal(np.asarray(gx), grams_x)  # the default reads only
    np.testing.assert_array_equal(np.asarray(gy), grams_y)
    overwritten = engine.update_state_from_grams(state, gx, gy, batch_index=0, overwrite=True)
    for a, b in zip(_leaves(kept), _leaves(overwritten), strict=True):
        np.testing.assert_array_equal(a, b)  # the same numbers, bit for bit
    assert not np.diagonal(np.asarray(gx), axis1=1, axis2=2).any()  # the diagonals are what it may write
    off_diagonal = ~np.eye(12, dtype=bool)
    np.testing.assert_array_equal(np.asarray(gy)[:, off_diagonal], grams_y[:, off_diagonal])
    expected = reference.minibatch_cka_matrix([xs], [ys])
    np.testing.assert_allclose(cka.finalize(overwritten), expected, atol=EXACT)


def test_overwrite_falls_back_to_a_copy_where_autograd_needs_the_grams() -> None:
    rng = np.random.default_rng(6)
    x = torch.tensor(_features(rng, 10), requires_grad=True)
    gram = (x @ x.T)[None]
    state = engine.update_state_from_grams(cka.init_state(1, 1, like=gram), gram, gram.detach().clone(), overwrite=True)
    cka.finalize(state)[0, 0].backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.diagonal(gram[0]).abs().min() > 0  # the graph's Gram kept its diagonal


# --------------------------------------------------------------------------------------------
# Sums at any magnitude: per-layer powers of two (CKAState.log2_scale_x / log2_scale_y)
# --------------------------------------------------------------------------------------------


def _batches_of_changing_magnitude(rng: np.random.Generator) -> tuple[list, list, list[float]]:
    """Five batches of one layer pair whose first layer is scaled per batch by ``c_b`` from 1e-300
    to 1e200: its HSIC terms span far more than float64's range, its CKA is dominated by the largest."""
    factors = [1e-300, 1.0, 1e200, 1e-20, 1e180]
    xs = [rng.normal(size=(12, 7)) for _ in factors]
    ys = [np.tanh(x @ rng.normal(size=(7, 5))) + 0.3 * rng.normal(size=(12, 5)) for x in xs]
    return xs, ys, factors


def _exact_minibatch_cka(xs: list, ys: list, factors: list[float]) -> float:
    r"""CKA of the scaled batches from the reference's per-batch terms of the unscaled ones:
    :math:`\mathrm{HSIC}(c^2 K, L) = c^2\,\mathrm{HSIC}(K, L)`, combined in 50-digit arithmetic."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    sums = [mpmath.mpf(0)] * 3
    for x, y, c in zip(xs, ys, factors, strict=True):
        k, g = reference.linear_gram(x), reference.linear_gram(y)
        c2 = mpmath.mpf(c) ** 2
        terms = (reference.hsic_unbiased(k, g) * c2, reference.hsic_unbiased(k, k) * c2**2, reference.hsic_unbiased(g, g))
        sums = [s + mpmath.mpf(t) if i == 2 else s + t for i, (s, t) in enumerate(zip(sums, terms, strict=True))]
    return float(sums[0] / mpmath.sqrt(sums[1] * sums[2]))


def test_batches_of_any_magnitude_are_summed_at_their_true_scale(xp: Namespace) -> None:
    rng = np.random.default_rng(11)
    xs, ys, factors = _batches_of_changing_magnitude(rng)
    expected = _exact_minibatch_cka(xs, ys, factors)
    scaled = [[xp.asarray(x * c)] for x, c in zip(xs, factors, strict=True)]
    state = cka.init_state(1, 1, like=xp.asarray(np.zeros(1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow, no "constant", no NaN
        for x, y in zip(scaled, ys, strict=True):
            state = cka.update_state(state, x, [xp.asarray(y)])
        assert float(cka.finalize(state)[0, 0]) == pytest.approx(expected, abs=1e-9)
        # shards merge at common scales: two states of different magnitudes, in either order
        first, second = (cka.init_state(1, 1, like=xp.asarray(np.zeros(1))) for _ in range(2))
        for x, y in zip(scaled[:2], ys[:2], strict=True):
            first = cka.update_state(first, x, [xp.asarray(y)])
        for x, y in zip(scaled[2:], ys[2:], strict=True):
            second = cka.update_state(second, x, [xp.asarray(y)])
        for merged in (cka.merge_states(first, second), cka.merge_states(second, first)):
            assert float(cka.finalize(merged)[0, 0]) == pytest.approx(expected, abs=1e-9)
    assert float(xp.to_numpy(state.log2_scale_x)[0]) > 1000  # kept at 2^1329 (1e200 squared is 2^1329)


def test_scaled_sums_survive_a_checkpoint_and_a_fresh_state(tmp_path) -> None:
    from cka.checkpoint import load_state, save_state

    rng = np.random.default_rng(12)
    xs, ys, factors = _batches_of_changing_magnitude(rng)
    state = cka.init_state(1, 1, like=np.zeros(1))
    for x, y, c in zip(xs[:3], ys[:3], factors[:3], strict=True):
        state = cka.update_state(state, [x * c], [y])
    save_state(tmp_path / "s.ckpt", state, position=3, fingerprint={"run": "scaled"})
    restored, position = load_state(tmp_path / "s.ckpt")
    assert position == 3 and float(restored.log2_scale_x[0]) > 1000
    for x, y, c in zip(xs[3:], ys[3:], factors[3:], strict=True):
        restored = cka.update_state(restored, [x * c], [y])
    assert float(cka.finalize(restored)[0, 0]) == pytest.approx(_exact_minibatch_cka(xs, ys, factors), abs=1e-9)


def test_grams_whose_hsic_terms_leave_float64_are_summed_exactly(xp: Namespace) -> None:
    """Grams that fit in float64 but whose products do not (1e160 squared), through the Gram entry point."""
    rng = np.random.default_rng(13)
    xs = [rng.normal(size=(10, 6)) for _ in range(3)]
    ys = [x[:, :3] + rng.normal(size=(10, 3)) for x in xs]
    expected = reference.minibatch_cka_matrix([[x] for x in xs], [[y] for y in ys])
    for scale in (1e160, 1e-160):
        state = cka.init_state(1, 1, like=xp.asarray(np.zeros(1)))
        for x, y in zip(xs, ys, strict=True):
            k = xp.asarray(reference.linear_gram(x - x.mean(0)) * scale)[None]
            state = engine.update_state_from_grams(state, k, xp.asarray(reference.linear_gram(y - y.mean(0)))[None])
        np.testing.assert_allclose(xp.to_numpy(cka.finalize(state)), expected, atol=1e-9)


def test_sums_in_the_normal_range_stay_plain_sums() -> None:
    """Scales are 0 unless a layer needs one: the sums are then the textbook sums themselves."""
    rng = np.random.default_rng(14)
    x, y = rng.normal(size=(10, 4)) * 1e30, rng.normal(size=(10, 3)) * 1e-30
    state = cka.update_state(cka.init_state(1, 1, like=np.zeros(1)), [x], [y])
    assert not state.log2_scale_x.any() and not state.log2_scale_y.any()
    k, g = reference.linear_gram(x - x.mean(0)), reference.linear_gram(y - y.mean(0))
    assert float(state.hsic_xy[0, 0]) == pytest.approx(reference.hsic_unbiased(k, g), rel=1e-9)


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_a_constant_batch_does_not_move_a_layers_scale(xp: Namespace, scale: float) -> None:
    """A batch in which a layer is constant has zero terms at any scale: it must not raise the layer's
    scale above its other batches' (which would flush their sums to zero)."""
    rng = np.random.default_rng(15)
    xs = [rng.normal(size=(10, 5)) for _ in range(4)]
    ys = [rng.normal(size=(10, 4)) + x[:, :4] for x in xs]
    scaled = [x * scale for x in xs]
    scaled[2] = np.full((10, 5), 3.0)  # constant in batch 2, at an ordinary magnitude: zero Gram, zero terms
    xs[2] = np.zeros((10, 5))
    expected = reference.minibatch_cka_matrix([[x] for x in xs], [[y] for y in ys])
    state = cka.init_state(1, 1, like=xp.asarray(np.zeros(1)))
    for x, y in zip(scaled, ys, strict=True):
        state = cka.update_state(state, [xp.asarray(x)], [xp.asarray(y)])
    np.testing.assert_allclose(xp.to_numpy(cka.finalize(state)), expected, atol=1e-9)
