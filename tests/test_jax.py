"""The JAX streaming API (cka.frontends.jax): init / update / scan_update / merge / psum / finalize.

In this process JAX runs with ``jax_enable_x64`` (tests/conftest.py), so the JAX path must equal the
numpy float64 reference to 1e-10. The float32 path (x64 off) and two CPU devices need a fresh
interpreter, so those tests run in subprocesses (tests/test_jax_subprocess.py).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
jax.config.update("jax_enable_x64", True)  # as tests/conftest.py does for the whole suite

from cka import core, stream  # noqa: E402
from cka import state as engine  # noqa: E402
from cka.frontends import jax as ckj  # noqa: E402

EXACT = 1e-10


def _post_relu(rng: np.random.Generator, n: int, shape: tuple[int, ...], offset: float = 1.0) -> np.ndarray:
    return np.maximum(rng.normal(size=(n, *shape)) + offset, 0.0)


#: Every test uses batches of (at most) N examples and the layer shapes of _batches, so that the
#: jitted programs compile once for the whole module (XLA compiles take seconds on a loaded CPU).
N = 16


def _batches(rng: np.random.Generator, sizes: list[int]) -> tuple[list, list]:
    """Per-batch features of two 'models': xs[b] is a list of 2 (n_b, ...) arrays, ys[b] of 2; the
    second model's first layer is a noisy map of the first's, so CKA values spread over (0, 1)."""
    xs, ys = [], []
    mix = rng.normal(size=(12, 7))
    for n in sizes:
        layers = [_post_relu(rng, n, (12,)), _post_relu(rng, n, (3, 4))]
        xs.append(layers)
        ys.append([np.tanh(layers[0] @ mix + 0.3 * rng.normal(size=(n, 7))), _post_relu(rng, n, (2, 3))])
    return xs, ys


def _run_updates(xs: list, ys: list, size: int, **settings) -> ckj.CompensatedCKAState:
    state = ckj.init(len(xs[0]), len(ys[0]))
    for bx, by in zip(xs, ys, strict=True):
        px, mask = ckj.pad_batch(bx, size)
        py, _ = ckj.pad_batch(by, size)
        state = ckj.update(state, px, py, mask, **settings)
    return state


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_update_equals_numpy_float64_reference(kernel: str, unbiased: bool) -> None:
    rng = np.random.default_rng(1)
    xs, ys = _batches(rng, [N, N, N, 9])  # a ragged last batch, padded to N
    reference = engine.minibatch_cka_matrix(xs, ys, kernel=kernel, unbiased=unbiased)
    state = _run_updates(xs, ys, N, kernel=kernel, unbiased=unbiased)
    assert state.sums.hsic_xy.dtype == jnp.float64
    matrix = np.asarray(ckj.finalize(state))
    assert matrix.shape == (2, 2)
    np.testing.assert_allclose(matrix, reference, rtol=0, atol=EXACT)
    assert float(state.sums.n_examples) == 3 * N + 9 and float(state.sums.n_batches) == 4


def test_ragged_last_batch_reuses_the_compiled_update() -> None:
    rng = np.random.default_rng(2)
    xs, ys = _batches(rng, [N, N, N, 5])
    state = _run_updates(xs[:1], ys[:1], N)
    compiled = stream._update_jit._cache_size()  # the programs compiled so far (this shape included)
    state = ckj.merge(state, _run_updates(xs[1:], ys[1:], N))  # full batches, then the ragged one
    assert stream._update_jit._cache_size() == compiled
    # no mask at all is the same program as an all-true mask
    state = ckj.update(state, [jnp.asarray(a) for a in xs[0]], [jnp.asarray(a) for a in ys[0]])
    assert stream._update_jit._cache_size() == compiled
    reference = engine.minibatch_cka_matrix(xs + xs[:1], ys + ys[:1])
    np.testing.assert_allclose(np.asarray(ckj.finalize(state)), reference, rtol=0, atol=EXACT)


def test_scan_update_equals_one_update_per_batch() -> None:
    rng = np.random.default_rng(3)
    xs, ys = _batches(rng, [N, N, N, N, 11])
    stacked_x, masks = ckj.stack_batches(xs)
    stacked_y, _ = ckj.stack_batches(ys)
    assert stacked_x[1].shape == (5, N, 3, 4) and masks.shape == (5, N)
    scanned = ckj.scan_update(ckj.init(2, 2), stacked_x, stacked_y, masks)
    looped = _run_updates(xs, ys, N)
    for a, b in zip(jax.tree.leaves(ckj.to_core_state(scanned)), jax.tree.leaves(ckj.to_core_state(looped)), strict=True):  # XLA may fuse differently: rounding
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=0)
    np.testing.assert_allclose(np.asarray(ckj.finalize(scanned)), engine.minibatch_cka_matrix(xs, ys), rtol=0, atol=EXACT)


def test_update_and_a_whole_loop_work_under_jit() -> None:
    rng = np.random.default_rng(4)
    xs, ys = _batches(rng, [N, 10])
    stacked_x, masks = ckj.stack_batches(xs)
    stacked_y, _ = ckj.stack_batches(ys)

    @jax.jit
    def pipeline(sx: list, sy: list, m: jax.Array) -> jax.Array:  # init, a Python loop of updates, finalize
        state = ckj.init(2, 2)
        for b in range(m.shape[0]):
            state = ckj.update(state, [a[b] for a in sx], [a[b] for a in sy], m[b])
        return ckj.finalize(state)

    jitted_update = jax.jit(ckj.update)(ckj.init(2, 2), [jnp.asarray(a) for a in xs[0]], [jnp.asarray(a) for a in ys[0]])
    np.testing.assert_allclose(np.asarray(pipeline(stacked_x, stacked_y, masks)), engine.minibatch_cka_matrix(xs, ys),
                               rtol=0, atol=EXACT)
    np.testing.assert_allclose(np.asarray(ckj.finalize(jitted_update)), engine.minibatch_cka_matrix(xs[:1], ys[:1]),
                               rtol=0, atol=EXACT)


def test_vmap_over_independent_comparisons_equals_a_loop() -> None:
    # e.g. one model against S checkpoints of another on the same batch: vmap over the second side
    rng = np.random.default_rng(5)
    x = jnp.asarray(_post_relu(rng, N, (12,)))
    ys = jnp.asarray(_post_relu(rng, 4 * N, (7,)).reshape(4, N, 7))
    states = jax.vmap(lambda s, y: ckj.update(s, [x], [y]), in_axes=(None, 0))(ckj.init(1, 1), ys)
    assert states.sums.hsic_xy.shape == (4, 1, 1)
    matrices = jax.vmap(ckj.finalize)(states)
    for s in range(4):
        expected = engine.minibatch_cka_matrix([[np.asarray(x)]], [[np.asarray(ys[s])]])
        np.testing.assert_allclose(np.asarray(matrices[s]), expected, rtol=0, atol=EXACT)


def test_merge_of_two_halves_equals_one_pass() -> None:
    rng = np.random.default_rng(6)
    xs, ys = _batches(rng, [N] * 5)
    first, second = _run_updates(xs[:3], ys[:3], N), _run_updates(xs[3:], ys[3:], N)
    merged = ckj.merge(first, second)
    whole = _run_updates(xs, ys, N)
    np.testing.assert_allclose(np.asarray(ckj.finalize(merged)), np.asarray(ckj.finalize(whole)), rtol=0, atol=1e-14)
    assert float(merged.sums.n_batches) == 5
    core_state = ckj.to_core_state(merged)  # interoperates with the core's finalize
    np.testing.assert_allclose(np.asarray(engine.finalize(core_state)), engine.minibatch_cka_matrix(xs, ys), atol=EXACT)


@pytest.mark.parametrize("valid", [0, 3])
def test_batch_with_too_few_valid_rows_adds_nothing(valid: int) -> None:
    rng = np.random.default_rng(7)
    xs, ys = _batches(rng, [N, N])
    state = _run_updates(xs, ys, N)
    padded_x, mask = ckj.pad_batch([a[:valid] for a in xs[0]], N)
    padded_y, _ = ckj.pad_batch([a[:valid] for a in ys[0]], N)
    after = ckj.update(state, padded_x, padded_y, mask)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_finalize_names_nan_features_and_constant_layers_are_nan() -> None:
    rng = np.random.default_rng(8)
    xs, ys = _batches(rng, [N])
    bad = xs[0][1].copy()
    bad[2, 1, 0] = np.nan
    state = ckj.update(ckj.init(2, 2), [jnp.asarray(xs[0][0]), jnp.asarray(bad)], [jnp.asarray(y) for y in ys[0]])
    with pytest.raises(ValueError, match=r"NaN or Inf \(layers xs\[1\]"):
        ckj.finalize(state)
    constant = [jnp.asarray(ys[0][0]), jnp.asarray(np.full((N, 2, 3), 2.5))]
    state = ckj.update(ckj.init(2, 2), [jnp.asarray(x) for x in xs[0]], constant)
    with pytest.warns(core.CKANumericsWarning, match="NaN"):
        matrix = np.asarray(ckj.finalize(state))
    assert np.isnan(matrix[:, 1]).all() and np.isfinite(matrix[:, 0]).all()


def test_errors_name_the_problem_and_the_fix() -> None:
    x = jnp.ones((8, 4))
    state = ckj.init(1, 1)
    with pytest.raises(ValueError, match=r"made for 1 x 1 layers but this batch has 2 x 1"):
        ckj.update(state, [x, x], [x])
    with pytest.raises(ValueError, match="same examples"):
        ckj.update(state, [x], [jnp.ones((7, 4))])
    with pytest.raises(ValueError, match=r"mask must have shape \(8,\)"):
        ckj.update(state, [x], [x], jnp.ones((9,), bool))
    with pytest.raises(TypeError, match="lists"):
        ckj.update(state, x, [x])
    with pytest.raises(ValueError, match="unknown kernel 'rfb'"):
        ckj.update(state, [x], [x], kernel="rfb")
    with pytest.raises(TypeError, match=r"CompensatedCKAState.*cka\.state\.CKAState"):
        ckj.update(engine.init_state(1, 1, like=x), [x], [x])
    with pytest.raises(ValueError, match="different layers"):
        ckj.merge(state, ckj.init(2, 1))
    with pytest.raises(ValueError, match="does not fit the static size 4"):
        ckj.pad_batch([x], 4)
    with pytest.raises(ValueError, match="positive int"):
        ckj.init(0, 1)
    with pytest.raises(ValueError, match=r"\(n_batches, n, \.\.\.\)"):
        ckj.scan_update(state, [jnp.ones(8)], [jnp.ones(8)])
    with pytest.raises(TypeError, match=r"unbiased must be True or False; got 'no'"):
        ckj.update(state, [x], [x], unbiased="no")
    with pytest.raises(TypeError, match=r"unbiased must be True or False"):
        ckj.scan_update(state, [x[None]], [x[None]], unbiased=None)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_the_stream_is_the_one_accumulator(kernel: str) -> None:
    # cka.frontends.jax's names are thin jitted names over cka.state: the same state type, and
    # ckj.update gives what cka.update_state gives on a compensated state (to rounding)
    assert ckj.CompensatedCKAState is engine.CompensatedCKAState
    assert ckj.update.__module__ == "cka.stream"
    rng = np.random.default_rng(10)
    xs, ys = _batches(rng, [N, N])
    streamed, direct = ckj.init(2, 2), engine.init_state(2, 2, like=jnp.zeros(()), compensated=True)
    for bx, by in zip(xs, ys, strict=True):
        jx, jy = [jnp.asarray(a) for a in bx], [jnp.asarray(a) for a in by]
        streamed = ckj.update(streamed, jx, jy, kernel=kernel)
        direct = engine.update_state(direct, jx, jy, mask=jnp.ones(N, bool), kernel=kernel)
    for a, b in zip(jax.tree.leaves(streamed.sums), jax.tree.leaves(direct.sums), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(np.asarray(ckj.finalize(streamed)), np.asarray(engine.finalize(direct)), rtol=0, atol=1e-14)


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_core_masked_update_ignores_padding_even_nan(framework: str) -> None:
    # the mask path of cka.core that update() builds on: padded rows, whatever they hold, add nothing
    rng = np.random.default_rng(9)
    xs, ys = _batches(rng, [11])
    reference = engine.minibatch_cka_matrix(xs, ys, kernel="rbf", unbiased=False)
    convert = {"numpy": np.asarray, "jax": jnp.asarray}.get(framework)
    if convert is None:
        torch = pytest.importorskip("torch")
        convert = torch.as_tensor
    mask = np.arange(N) < 11
    padded = [[np.where(mask.reshape(-1, *[1] * (a.ndim - 1)), np.resize(a, (N, *a.shape[1:])), np.nan) for a in side]
              for side in (xs[0], ys[0])]
    state = engine.init_state(2, 2, like=convert(np.zeros(1)))
    state = engine.update_state(state, [convert(a) for a in padded[0]], [convert(a) for a in padded[1]],
                              mask=convert(mask), kernel="rbf", unbiased=False)
    matrix = engine.finalize(state)
    np.testing.assert_allclose(np.asarray(matrix.cpu() if framework == "torch" else matrix), reference, atol=EXACT)
