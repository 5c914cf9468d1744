"""Bootstrap intervals, permutation p-values and calibrated CKA (cka/statistics.py).

Three kinds of test: the generator (known answers, distribution, independence of sharding and
order); the per-batch algebra (permuted cross terms against a brute-force HSIC of permuted Grams,
on numpy, torch and JAX, masked and chunked); and statistical validity by simulation (uniform
p-values under independence, calibrated scores centred at 0, nominal coverage of the intervals
for a Gaussian model whose population CKA is known in closed form). Seeded; seconds each.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cka import _sampling as sampling
from cka import core
from cka import statistics as st
from cka.state import (
    CKAState,
    finalize,
    folded,
    init_state,
    merge_states,
    minibatch_cka_matrix,
    update_state,
    update_state_from_grams,
)

KNOWN_ANSWERS = [  # Random123's kat_vectors for philox4x32-10 (Salmon et al. 2011)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.fixture(autouse=True)
def _quiet_coarse_warnings():
    """Most tests use few replicates on purpose; the warning itself is tested below."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st.CoarseStatisticsWarning)
        yield


def _grams(rng: np.random.Generator, n: int, widths: list[int], base: np.ndarray | None = None) -> np.ndarray:
    feats = [rng.normal(size=(n, d)) for d in widths]
    if base is not None:  # share a signal so that cells differ
        feats = [f + base[:, : f.shape[1]] for f in feats]
    return np.stack([np.asarray(core.gram(f)) for f in feats])


def _brute_null(grams_x, grams_y, perms, unbiased):
    f = core.hsic_unbiased if unbiased else core.hsic
    return np.array([[[float(f(kx, ky[np.ix_(p, p)])) for ky in grams_y] for kx in grams_x] for p in perms])


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_matches_random123_known_answers(counter, key, expected):
    import jax
    import jax.numpy as jnp

    assert tuple(int(w[0]) for w in st.philox4x32(counter, key)) == expected
    assert tuple(int(w[0]) for w in st.philox4x32(counter, key, jnp)) == expected
    traced = jax.jit(lambda c: st.philox4x32((c, *counter[1:]), key, jnp))(jnp.uint32(counter[0]))
    assert tuple(int(w[0]) for w in traced) == expected


def test_numpy_and_limb_products_agree():
    words = np.random.default_rng(0).integers(0, 2**32, size=10000, dtype=np.uint64).astype(np.uint32)
    words[:3] = (0, 1, 2**32 - 1)
    for m in sampling._PHILOX_M:
        wide, limbs = sampling._mulhilo32(m, words), sampling._mulhilo32_limbs(m, words)
        assert all(np.array_equal(a, b) for a, b in zip(wide, limbs, strict=True))


def test_poisson_weights_follow_poisson_one():
    weights = np.concatenate([st.bootstrap_weights(7, b, 2000) for b in range(50)])  # 100000 draws
    counts = np.bincount(weights, minlength=6)
    expected = np.array([math.exp(-1) / math.factorial(k) for k in range(5)] + [0.0])
    expected[5] = 1 - expected[:5].sum()  # 5 or more
    observed = np.append(counts[:5], counts[5:].sum())
    chi2 = scipy_stats.chisquare(observed, expected * observed.sum())
    assert chi2.pvalue > 1e-3, (observed, chi2)
    assert abs(weights.mean() - 1) < 0.02 and abs(weights.var() - 1) < 0.03
    assert weights.max() <= len(sampling._POISSON1_THRESHOLDS)


def test_weights_and_permutations_depend_only_on_seed_replicate_and_batch():
    import jax
    import jax.numpy as jnp

    # prefix property: replicate r of batch b is the same whatever R, and whatever else was drawn before
    assert np.array_equal(st.bootstrap_weights(3, 11, 40), st.bootstrap_weights(3, 11, 200)[:40])
    assert np.array_equal(st.batch_permutations(3, 11, 5, 16), st.batch_permutations(3, 11, 9, 16)[:5])
    forward = [st.bootstrap_weights(3, b, 64) for b in range(20)]
    backward = [st.bootstrap_weights(3, b, 64) for b in reversed(range(20))][::-1]
    assert all(np.array_equal(f, g) for f, g in zip(forward, backward, strict=True))
    # seeds, batches and the two streams differ; huge batch indices are distinct
    assert not np.array_equal(st.bootstrap_weights(3, 11, 64), st.bootstrap_weights(4, 11, 64))
    assert not np.array_equal(st.bootstrap_weights(3, 11, 64), st.bootstrap_weights(3, 12, 64))
    assert not np.array_equal(st.bootstrap_weights(3, 5, 64), st.bootstrap_weights(3, 5 + 2**32, 64))
    assert not np.array_equal(st.bootstrap_weights(2**40 + 3, 5, 64), st.bootstrap_weights(3, 5, 64))
    # numpy and JAX (eager and traced batch index) give the same bits
    assert np.array_equal(st.bootstrap_weights(3, 11, 64), np.asarray(st.bootstrap_weights(3, 11, 64, jnp)))
    traced = jax.jit(lambda b: st.batch_permutations(3, b, 6, 16, xp=jnp))(jnp.int32(11))
    assert np.array_equal(st.batch_permutations(3, 11, 6, 16), np.asarray(traced))


def test_weights_are_independent_across_replicates_and_batches():
    w = np.stack([st.bootstrap_weights(0, b, 400) for b in range(400)]).astype(float)  # (batches, replicates)
    corr = np.corrcoef(w)  # batch against batch, over replicates
    off = corr[~np.eye(len(corr), dtype=bool)]
    assert abs(off.mean()) < 0.01 and off.std() < 1.3 / np.sqrt(400)
    corr_r = np.corrcoef(w.T)
    assert abs(corr_r[~np.eye(len(corr_r), dtype=bool)].mean()) < 0.01


def test_permutations_are_uniform():
    perms = np.concatenate([st.batch_permutations(1, b, 500, 6) for b in range(4)])  # 2000 draws of S_6
    assert (np.sort(perms, axis=1) == np.arange(6)).all()
    # where example 0 lands, and the joint law of (pi(0), pi(1)): chi-square against uniform
    position = np.bincount(perms[:, 0], minlength=6)
    assert scipy_stats.chisquare(position).pvalue > 1e-3
    pairs = np.bincount(perms[:, 0] * 6 + perms[:, 1], minlength=36).reshape(6, 6)
    off_diagonal = pairs[~np.eye(6, dtype=bool)]
    assert pairs.trace() == 0 and scipy_stats.chisquare(off_diagonal).pvalue > 1e-3


def test_masked_permutations_keep_padding_and_match_the_unpadded_batch():
    import jax.numpy as jnp

    valid = np.arange(12) < 9
    padded = st.batch_permutations(5, 3, 20, 12, valid)
    assert np.array_equal(padded[:, :9], st.batch_permutations(5, 3, 20, 9))
    assert np.array_equal(padded[:, 9:], np.broadcast_to(np.arange(9, 12), (20, 3)))
    assert np.array_equal(padded, np.asarray(st.batch_permutations(5, 3, 20, 12, jnp.asarray(valid), jnp)))
    scattered = np.array([1, 0, 1, 1, 0, 1, 1, 0], dtype=bool)  # valid rows need not be a prefix
    perms = st.batch_permutations(5, 3, 50, 8, scattered)
    assert scattered[perms[:, scattered]].all()  # valid positions receive valid rows
    assert np.array_equal(perms[:, ~scattered], np.broadcast_to(np.flatnonzero(~scattered), (50, 3)))


# --------------------------------------------------------------------------------------------
# The per-batch algebra
# --------------------------------------------------------------------------------------------


STATS = ("boot_xy", "boot_xx", "boot_yy", "null_xy")


def _stats(state):
    """The statistics fields of a (folded) state, as numpy arrays."""
    plain = folded(state)
    return [np.asarray(core.get_backend(f).to_numpy(f)) for f in (getattr(plain, k) for k in STATS)]


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("layers", [(2, 3), (3, 2)])  # gathers the first model's Grams, then the second's
def test_permuted_cross_terms_equal_brute_force_hsic_of_permuted_grams(xp, unbiased, layers):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(14, 8))
    gx, gy = _grams(rng, 14, [5, 7, 3][: layers[0]], base), _grams(rng, 14, [4, 6, 2][: layers[1]], base)
    state = init_state(*layers, xp.asarray(gx), bootstrap=3, permutations=6)
    new = update_state_from_grams(state, xp.asarray(gx), xp.asarray(gy), batch_index=9, seed=4, unbiased=unbiased)
    assert all(xp.is_native(getattr(new, k)) for k in STATS)
    perms = st.batch_permutations(4, 9, 6, 14)
    np.testing.assert_allclose(xp.to_numpy(new.null_xy), _brute_null(gx, gy, perms, unbiased), rtol=1e-10, atol=1e-12)
    # the bootstrap sums are the weighted observed terms; the point estimate's sums are untouched
    f = core.hsic_unbiased if unbiased else core.hsic
    observed = np.array([[float(f(kx, ky)) for ky in gy] for kx in gx])
    weights = st.bootstrap_weights(4, 9, 3)
    np.testing.assert_allclose(xp.to_numpy(new.boot_xy), weights[:, None, None] * observed, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(xp.to_numpy(new.hsic_xy), observed, rtol=1e-10, atol=1e-12)
    self_x = np.diag(_brute_null(gx, gx, [np.arange(14)], unbiased)[0])
    np.testing.assert_allclose(xp.to_numpy(new.boot_xx), weights[:, None] * self_x, rtol=1e-10, atol=1e-12)


def test_chunked_permutations_equal_one_chunk(monkeypatch):
    rng = np.random.default_rng(2)
    gx, gy = _grams(rng, 10, [3, 4]), _grams(rng, 10, [5, 2, 6])
    state = init_state(2, 3, gx, permutations=7)
    whole = update_state_from_grams(state, gx, gy, batch_index=0, seed=1)
    monkeypatch.setattr(st, "PERMUTATION_CHUNK_BYTES", 2 * 10 * 10 * 8)  # 1-2 permutations per chunk
    chunked = update_state_from_grams(state, gx, gy, batch_index=0, seed=1)
    np.testing.assert_allclose(chunked.null_xy, whole.null_xy, rtol=1e-13, atol=1e-15)


def _pad(grams, size):
    extra = size - grams.shape[-1]
    return np.pad(grams, ((0, 0), (0, extra), (0, extra)))


@pytest.mark.parametrize("unbiased", [True, False])
def test_padded_batches_equal_the_unpadded_batch(unbiased):
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    x = [rng.normal(size=(9, d)) for d in (4, 5)]
    y = [rng.normal(size=(9, 3))]
    gx, gy = np.stack([np.asarray(core.gram(a)) for a in x]), np.stack([np.asarray(core.gram(a)) for a in y])
    options = {"batch_index": 2, "seed": 8, "unbiased": unbiased}
    plain = update_state_from_grams(init_state(2, 1, gx, bootstrap=4, permutations=5), gx, gy, **options)
    # padded Grams with their count (numpy and JAX), padded features with a mask (JAX, traced index)
    padded = update_state_from_grams(
        init_state(2, 1, gx, bootstrap=4, permutations=5), _pad(gx, 12), _pad(gy, 12), n=9, **options
    )
    jstate = init_state(2, 1, jnp.zeros(()), bootstrap=4, permutations=5)
    traced_grams = update_state_from_grams(
        jstate, jnp.asarray(_pad(gx, 12)), jnp.asarray(_pad(gy, 12)), n=9, **{**options, "batch_index": jnp.int32(2)}
    )
    pad_rows = [np.pad(a, ((0, 3), (0, 0)), constant_values=np.nan) for a in (*x, *y)]  # padding may hold anything
    masked = update_state(
        jstate,
        [jnp.asarray(a) for a in pad_rows[:2]],
        [jnp.asarray(pad_rows[2])],
        mask=jnp.arange(12) < 9,
        **{**options, "batch_index": jnp.int32(2)},
    )
    for other in (padded, traced_grams, masked):
        for a, b in zip(_stats(other), _stats(plain), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_a_padded_batch_with_too_few_rows_adds_nothing():
    import jax.numpy as jnp

    rng = np.random.default_rng(4)
    gx, gy = _pad(_grams(rng, 3, [3]), 8), _pad(_grams(rng, 3, [3]), 8)
    state = init_state(1, 1, jnp.zeros(()), bootstrap=3, permutations=3)
    with pytest.warns(UserWarning, match="skipped batch"):
        new = update_state_from_grams(state, jnp.asarray(gx), jnp.asarray(gy), n=3, batch_index=0)
    assert all(np.array_equal(a, b) for a, b in zip(_stats(new), _stats(state), strict=True))


def test_a_state_with_statistics_needs_the_batch_index():
    rng = np.random.default_rng(5)
    gx, gy = _grams(rng, 10, [3, 4]), _grams(rng, 10, [5])
    for state in (init_state(2, 1, gx, bootstrap=5), init_state(2, 1, gx, permutations=5)):
        with pytest.raises(ValueError, match="pass batch_index="):
            update_state_from_grams(state, gx, gy)
        with pytest.raises(ValueError, match="pass batch_index="):
            update_state(state, [rng.normal(size=(10, 3))] * 2, [rng.normal(size=(10, 3))])
    plain = init_state(2, 1, gx)
    assert plain.boot_xy.shape == (0, 2, 1) and plain.null_xy.shape == (0, 2, 1)
    assert st.replicate_counts(plain) == (0, 0)
    assert update_state_from_grams(plain, gx, gy).boot_xy.shape == (0, 2, 1)
    by_hand = CKAState(*plain[:5])  # the five sums alone: statistics absent
    assert by_hand.boot_xy is None and update_state_from_grams(by_hand, gx, gy).null_xy is None


def _run(batches, seed, bootstrap=5, permutations=4, indices=None):
    """The state over ``batches`` of (grams_x, grams_y), with global batch ``indices`` (default 0..)."""
    indices = range(len(batches)) if indices is None else indices
    gx0 = batches[0][0]
    state = init_state(gx0.shape[0], batches[0][1].shape[0], gx0, bootstrap=bootstrap, permutations=permutations)
    for index, (gx, gy) in zip(indices, batches, strict=True):
        state = update_state_from_grams(state, gx, gy, batch_index=index, seed=seed)
    return state


def test_shards_and_resume_equal_one_pass():
    rng = np.random.default_rng(6)
    batches = [(_grams(rng, 8, [3, 2]), _grams(rng, 8, [4])) for _ in range(10)]
    whole = _run(batches, seed=2)
    # two ranks taking every other batch (global indices), merged
    even = _run(batches[0::2], seed=2, indices=range(0, 10, 2))
    odd = _run(batches[1::2], seed=2, indices=range(1, 10, 2))
    # an interrupted run resumed at batch 6
    head = _run(batches[:6], seed=2)
    tail = _run(batches[6:], seed=2, indices=range(6, 10))
    for merged in (merge_states(even, odd), merge_states(head, tail)):
        for a, b in zip(merged, whole, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"\(bootstrap, permutations\) = \(5, 4\) \(a\) and one with \(6, 4\)"):
        merge_states(whole, _run(batches[:2], seed=2, bootstrap=6))


def test_jax_update_under_jit_and_scan_equals_the_eager_loop():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(7)
    gxs = np.stack([_grams(rng, 8, [3, 2]) for _ in range(5)])
    gys = np.stack([_grams(rng, 8, [4]) for _ in range(5)])
    eager = _run(list(zip(gxs, gys, strict=True)), seed=3)

    @jax.jit
    def scanned(state, gx, gy):
        def body(carry, batch):
            index, x, y = batch
            return update_state_from_grams(carry, x, y, batch_index=index, seed=3), None

        return jax.lax.scan(body, state, (jnp.arange(5, dtype=jnp.int32), gx, gy))[0]

    start = init_state(2, 1, jnp.zeros(()), bootstrap=5, permutations=4)
    out = scanned(start, jnp.asarray(gxs), jnp.asarray(gys))
    for a, b in zip(_stats(out), _stats(eager), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_jax_float32_without_x64_in_a_subprocess():
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp, numpy as np, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from cka import core, init_state, update_state_from_grams\n"
        "from cka.state import folded, CompensatedCKAState\n"
        "assert not jax.config.jax_enable_x64\n"
        "rng = np.random.default_rng(0)\n"
        "gx = np.stack([np.asarray(core.gram(rng.normal(size=(10, 3)))) for _ in range(2)])\n"
        "gy = np.stack([np.asarray(core.gram(rng.normal(size=(10, 4))))])\n"
        "options = dict(batch_index=7, seed=2**40 + 1)\n"
        "s = init_state(2, 1, jnp.zeros((), jnp.float32), bootstrap=3, permutations=4)\n"
        "assert isinstance(s, CompensatedCKAState)\n"
        "s = update_state_from_grams(s, jnp.asarray(gx, jnp.float32), jnp.asarray(gy, jnp.float32), **options)\n"
        "r = update_state_from_grams(init_state(2, 1, gx, bootstrap=3, permutations=4), gx, gy, **options)\n"
        "s = folded(s)\n"
        "assert s.null_xy.dtype == jnp.float32\n"
        "for a, b in zip(s, r, strict=True):\n"
        "    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# finalize
# --------------------------------------------------------------------------------------------


def _finalized(seed=0, bootstrap=50, permutations=40, n_batches=12):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        base = rng.normal(size=(10, 4))
        batches.append((_grams(rng, 10, [3, 2, 4], base), _grams(rng, 10, [2, 3], base * 0.3)))
    return _run(batches, seed=seed, bootstrap=bootstrap, permutations=permutations)


def test_finalize_matches_a_brute_force_reading_of_the_sums():
    state = _finalized()
    out = st.finalize_statistics(state, confidence=0.9)
    matrix = np.asarray(finalize(state))
    assert np.array_equal(out.matrix, matrix)  # bit for bit
    null = state.null_xy / np.sqrt(np.outer(state.hsic_xx, state.hsic_yy))
    np.testing.assert_allclose(out.p_value, (1 + (null >= matrix).sum(0)) / (1 + 40), rtol=0, atol=0)
    np.testing.assert_allclose(out.null_mean, null.mean(0), rtol=1e-13)
    np.testing.assert_allclose(out.calibrated, (matrix - null.mean(0)) / (1 - null.mean(0)), rtol=1e-12)
    row = (1 + (null.max(2) >= matrix.max(1)).sum(0)) / 41
    col = (1 + (null.max(1) >= matrix.max(0)).sum(0)) / 41
    np.testing.assert_array_equal(out.p_value_best_row, row)
    np.testing.assert_array_equal(out.p_value_best_col, col)
    boot = state.boot_xy / np.sqrt(state.boot_xx[:, :, None] * state.boot_yy[:, None, :])
    alpha = st.expanded_alpha(0.9, 12)
    assert 0 < alpha < 0.1
    np.testing.assert_allclose(out.ci_low, np.quantile(boot, alpha / 2, axis=0), rtol=1e-12)
    np.testing.assert_allclose(out.ci_high, np.quantile(boot, 1 - alpha / 2, axis=0), rtol=1e-12)
    assert (out.ci_low <= out.ci_high).all()


def test_finalize_without_statistics_and_on_every_backend(xp):
    state = _finalized(bootstrap=20, permutations=20)
    reference = st.finalize_statistics(state)
    converted = type(state)(*(xp.asarray(a) for a in state))
    out = st.finalize_statistics(converted)
    for name, a, b in zip(out._fields, out, reference, strict=True):
        assert xp.is_native(a), name
        np.testing.assert_allclose(xp.to_numpy(a), b, rtol=1e-12, atol=1e-14, err_msg=name)
    for bare in (CKAState(*converted[:5]), init_state(3, 2, converted.hsic_xy)):
        out_bare = st.finalize_statistics(bare)
        assert out_bare.ci_low is None and out_bare.p_value is None and out_bare.p_value_best_row is None
    plain = finalize(converted)
    assert st.finalize_statistics(converted, matrix=plain).matrix is plain


def test_a_constant_layer_gives_nan_statistics_not_errors():
    rng = np.random.default_rng(8)
    batches = [
        (np.stack([np.asarray(core.gram(rng.normal(size=(8, 3)))), np.zeros((8, 8))]), _grams(rng, 8, [2, 3]))
        for _ in range(12)
    ]
    state = _run(batches, seed=1, bootstrap=20, permutations=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from all-NaN slices
        out = st.finalize_statistics(state)
    for field in ("ci_low", "ci_high", "p_value", "null_mean", "calibrated"):
        value = getattr(out, field)
        assert np.isnan(value[1]).all() and np.isfinite(value[0]).all(), field
    assert np.isnan(out.p_value_best_row[1]) and np.isfinite(out.p_value_best_row[0])
    assert np.isfinite(out.p_value_best_col).all()  # the NaN row is skipped in each column's maximum


def test_few_replicates_or_batches_warn_and_bad_options_raise():
    gx = np.zeros((1, 8, 8))
    with pytest.warns(st.CoarseStatisticsWarning, match="bootstrap=30 and permutations=50"):
        init_state(1, 1, gx, bootstrap=30, permutations=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        init_state(1, 1, gx, bootstrap=100, permutations=0)
    state = _finalized(bootstrap=20, permutations=0, n_batches=4)
    with pytest.warns(st.CoarseStatisticsWarning, match="only 4 were seen"):
        st.finalize_statistics(state)
    state = _finalized(bootstrap=20, permutations=0, n_batches=1)
    with pytest.warns(st.CoarseStatisticsWarning):
        out = st.finalize_statistics(state)
    assert np.isnan(out.ci_low).all() and np.isfinite(out.matrix).all()
    for kwargs, message in (
        ({"bootstrap": -1}, "bootstrap must be a non-negative int"),
        ({"permutations": 2.5}, "permutations must be a non-negative int"),
        ({"confidence": 1.0}, "confidence must be a number strictly between 0 and 1"),
        ({"seed": -3}, r"seed must be an int in \[0, 2\*\*64\)"),
    ):
        with pytest.raises(ValueError, match=message):
            st.check_statistics_options(**kwargs)
        with pytest.raises(ValueError, match=message):
            minibatch_cka_matrix([[np.zeros((8, 2))]], [[np.zeros((8, 2))]], **kwargs)
    with pytest.raises(ValueError, match="batch_index must be an int"):
        st.bootstrap_weights(0, -1, 3)


def test_minibatch_cka_matrix_returns_statistics_only_when_asked():
    rng = np.random.default_rng(9)
    xs = [[rng.normal(size=(16, 5)), rng.normal(size=(16, 3))] for _ in range(12)]
    ys = [[x[0][:, :2] + rng.normal(size=(16, 2))] for x in xs]
    plain = minibatch_cka_matrix(xs, ys)
    with_stats = minibatch_cka_matrix(xs, ys, bootstrap=100, permutations=100, confidence=0.9, seed=3)
    assert isinstance(plain, np.ndarray) and isinstance(with_stats, st.CKAStatistics)
    assert np.array_equal(with_stats.matrix, plain)
    # the same as the state API with batch indices 0, 1, ...
    state = init_state(2, 1, xs[0][0], bootstrap=100, permutations=100)
    for index, (x, y) in enumerate(zip(xs, ys, strict=True)):
        state = update_state(state, x, y, batch_index=index, seed=3)
    by_hand = st.finalize_statistics(state, confidence=0.9)
    for name, a, b in zip(by_hand._fields, by_hand, with_stats, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert with_stats.p_value[0, 0] < 0.05 < with_stats.p_value[1, 0]
    assert with_stats.ci_low[0, 0] < plain[0, 0] < with_stats.ci_high[0, 0]


def test_student_t_quantile_and_expanded_alpha():
    for df in (1, 2, 3, 5, 9, 30, 200, 5000):
        for p in (0.6, 0.95, 0.975, 0.999):
            assert sampling._student_t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)
    assert st.expanded_alpha(0.95, 20) < 0.05 and st.expanded_alpha(0.95, 10) < st.expanded_alpha(0.95, 20)
    assert st.expanded_alpha(0.95, 100000) == pytest.approx(0.05, rel=1e-3)
    assert st.expanded_alpha(0.95, 1) == pytest.approx(0.05)


# --------------------------------------------------------------------------------------------
# Statistical validity, by simulation
# --------------------------------------------------------------------------------------------


def _null_run(rng, seed, n=12, n_batches=6, permutations=99, unbiased=True):
    """Independent features for 2 x 3 layers (the second model's layers share a signal among themselves)."""
    state = None
    for b in range(n_batches):
        gx = np.stack([np.asarray(core.gram(rng.normal(size=(n, 4)))) for _ in range(2)])
        shared = rng.normal(size=(n, 3))
        gy = np.stack([np.asarray(core.gram(shared + 0.5 * rng.normal(size=(n, 3)))) for _ in range(3)])
        state = init_state(2, 3, gx, permutations=permutations) if state is None else state
        state = update_state_from_grams(state, gx, gy, unbiased=unbiased, batch_index=b, seed=seed)
    return st.finalize_statistics(state)


@pytest.mark.parametrize("unbiased", [True, False])
def test_p_values_are_uniform_and_calibrated_scores_centred_under_independence(unbiased):
    rng = np.random.default_rng(10 if unbiased else 11)
    runs = [_null_run(rng, seed, unbiased=unbiased) for seed in range(300)]
    cell = np.array([r.p_value[0, 1] for r in runs])
    best_row = np.array([r.p_value_best_row[0] for r in runs])
    best_col = np.array([r.p_value_best_col[2] for r in runs])
    for name, p in (("cell", cell), ("best row", best_row), ("best column", best_col)):
        # p-values live on the grid k/100: compare with the uniform law at its resolution
        assert scipy_stats.kstest(p - 0.005, "uniform").pvalue > 0.01, name
    calibrated = np.array([r.calibrated[1, 0] for r in runs])
    raw = np.array([r.matrix[1, 0] for r in runs])
    se = calibrated.std(ddof=1) / np.sqrt(len(calibrated))
    assert abs(calibrated.mean()) < 4 * se
    if not unbiased:  # the biased estimator's inflation is real, and the calibration removes it
        assert raw.mean() > 10 * se and np.mean([r.null_mean[1, 0] for r in runs]) > 10 * se


def test_p_values_detect_a_real_relation():
    rng = np.random.default_rng(12)
    state = None
    for b in range(6):
        x = rng.normal(size=(12, 4))
        gx = np.asarray(core.gram(x))[None]
        related, unrelated = x[:, :2] + rng.normal(size=(12, 2)), rng.normal(size=(12, 3))
        gy = np.stack([np.asarray(core.gram(related)), np.asarray(core.gram(unrelated))])
        state = init_state(1, 2, gx, permutations=199) if state is None else state
        state = update_state_from_grams(state, gx, gy, batch_index=b)
    out = st.finalize_statistics(state)
    assert out.p_value[0, 0] == pytest.approx(1 / 200) and out.p_value[0, 1] > 0.01
    assert out.calibrated[0, 0] > 0.2 and out.p_value_best_row[0] == pytest.approx(1 / 200)


def _population_linear_cka(a: np.ndarray, noise: float) -> float:
    r"""x ~ N(0, I_p), y = A x + noise * eps: Cov(y, x) = A, Cov(x) = I, Cov(y) = A A^T + noise^2 I, so

    CKA = ||Cov(y, x)||_F^2 / (||Cov(x)||_F ||Cov(y)||_F) = ||A||_F^2 / (sqrt(p) ||A A^T + noise^2 I||_F)
    (population HSIC of linear kernels is the squared Frobenius norm of the cross-covariance)."""
    q, p = a.shape
    return float(np.sum(a**2) / (np.sqrt(p) * np.linalg.norm(a @ a.T + noise**2 * np.eye(q))))


def test_population_cka_formula_against_a_large_sample():
    rng = np.random.default_rng(13)
    a = rng.normal(size=(3, 4)) * 0.5
    x = rng.normal(size=(200000, 4))
    y = x @ a.T + rng.normal(size=(200000, 3))
    assert float(core.feature_space_linear_cka(x, y)) == pytest.approx(_population_linear_cka(a, 1.0), abs=3e-3)


def test_intervals_cover_the_population_cka_at_the_nominal_rate():
    a = np.random.default_rng(99).normal(size=(3, 4)) * 0.5
    truth = _population_linear_cka(a, 1.0)  # 0.384
    n, n_batches, repetitions = 32, 20, 200
    covered = 0
    for rep in range(repetitions):
        rng = np.random.default_rng(1000 + rep)
        state = init_state(1, 1, np.zeros(()), bootstrap=200)
        for b in range(n_batches):
            x = rng.normal(size=(n, 4))
            y = x @ a.T + rng.normal(size=(n, 3))
            gx, gy = core._gram_impl(x, "linear", None, 0.8)[None], core._gram_impl(y, "linear", None, 0.8)[None]
            state = update_state_from_grams(state, gx, gy, batch_index=b, seed=rep, check=False)
        out = st.finalize_statistics(state, confidence=0.95)
        covered += bool(out.ci_low[0, 0] <= truth <= out.ci_high[0, 0])
    assert 0.88 <= covered / repetitions <= 0.99, covered / repetitions


# --------------------------------------------------------------------------------------------
# CUDA (runs where a GPU is present)
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_update_has_no_host_sync_and_matches_cpu():
    import torch

    rng = np.random.default_rng(14)
    batches = [(_grams(rng, 16, [3, 5]), _grams(rng, 16, [4, 2, 6])) for _ in range(4)]
    reference = _run(batches, seed=5, bootstrap=30, permutations=25)
    state = init_state(2, 3, torch.zeros((), dtype=torch.float64, device="cuda"), bootstrap=30, permutations=25)
    on_device = [(torch.from_numpy(gx).cuda(), torch.from_numpy(gy).cuda()) for gx, gy in batches]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for index, (gx, gy) in enumerate(on_device):
            state = update_state_from_grams(state, gx, gy, batch_index=index, seed=5, check=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(a.device.type == "cuda" for a in state)
    for a, b in zip(state, reference, strict=True):
        np.testing.assert_allclose(a.cpu().numpy(), b, rtol=1e-10, atol=1e-12)
    out, expected = st.finalize_statistics(state), st.finalize_statistics(reference)
    for name, a, b in zip(out._fields, out, expected, strict=True):
        np.testing.assert_allclose(a.cpu().numpy(), b, rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_statistics_of_layers_far_outside_float64_are_those_of_the_unscaled_layers(framework):
    """Bootstrap and permutation sums are kept at the same per-layer powers of two as the sums
    (cka._sums): every field for layers scaled by 1e200 and 1e-200 (HSIC terms far outside float64)
    equals that of the unscaled layers; the draws depend on the seed and batch index only."""
    rng = np.random.default_rng(10)
    xs = [[rng.normal(size=(12, 5)), rng.normal(size=(12, 3))] for _ in range(10)]
    ys = [[x[0][:, :2] + rng.normal(size=(12, 2))] for x in xs]
    as_array = np.asarray if framework == "numpy" else __import__("torch").as_tensor
    settings = {"bootstrap": 50, "permutations": 50, "seed": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st.CoarseStatisticsWarning)
        expected = minibatch_cka_matrix(xs, ys, **settings)
        scaled = [[as_array(x[0] * 1e200), as_array(x[1] * 1e-200)] for x in xs]
        got = minibatch_cka_matrix(scaled, [[as_array(y[0])] for y in ys], **settings)
    for name, a, b in zip(expected._fields, expected, got, strict=True):
        if a is not None:
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-9, err_msg=name)
