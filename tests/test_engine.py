"""One harness for every engine path (in the manner of torchmetrics' ``MetricTester``).

The same batches (post-ReLU features with a large common offset, batches of different sizes, 3 x 2
layers) go through every way the library accumulates minibatch CKA, and each result is held to the
float64 reference of tests/reference.py (written straight from the formulas): float64 paths within
1e-10, paths with float32 inputs or float32 accumulators within 1e-6, for the linear and RBF kernels.

Adding a path is one entry in :data:`PATHS`: a :class:`Path` with a name, a function
``run(batches_x, batches_y, kernel) -> (L1, L2) numpy array`` (``batches_x[b]`` is the list of
layer features of batch ``b``, numpy arrays already rounded to ``Path.dtype``), a tolerance, and the
JAX ``x64`` setting it needs (``None``: any). Paths that need ``x64=False`` run in a fresh
interpreter (JAX's x64 flag is global) from tests/test_jax_subprocess.py, through
:func:`errors_of`. numpy, torch and JAX are required: a missing one fails this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import cka
from cka import stream
from cka.state import CompensatedCKAState
from tests import reference

Batches = list[list[np.ndarray]]

FLOAT64_TOL = 1e-10
FLOAT32_TOL = 1e-6

#: Batch sizes: different, none below the unbiased estimator's 4; the stream pads to the largest.
SIZES = (16, 11, 16, 8)
#: The common offset added to every (post-ReLU) feature: mean / std about 3.5, twice that of plain
#: post-ReLU activations. Large enough that an all-float32 computation which does not centre errs by
#: 6e-4 (650x the float32 tolerance; a test below), small enough that the uncentred float64
#: reference stays exact to ~1e-12 (another test; at mean / std = 11 it errs by 2e-10 itself).
OFFSET = 2.0


def make_batches(seed: int = 0, sizes: Sequence[int] = SIZES) -> tuple[Batches, Batches]:
    """Per-batch features of two 'models': 3 layers of the first, 2 of the second, post-ReLU plus a
    common offset; the second model's first layer is a noisy map of the first's (CKA well inside (0, 1))."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(12, 7)) / np.sqrt(12)
    batches_x, batches_y = [], []
    for n in sizes:
        latent = rng.normal(size=(n, 12))
        layers_x = [
            np.maximum(latent + 0.5, 0) + OFFSET,
            np.maximum(latent[:, :6].reshape(n, 2, 3) + rng.normal(size=(n, 2, 3)), 0) + OFFSET,
            np.maximum(rng.normal(size=(n, 20)), 0) + OFFSET,
        ]
        layers_y = [
            np.maximum(latent @ mix + 0.5 * rng.normal(size=(n, 7)), 0) + OFFSET,
            np.maximum(rng.normal(size=(n, 2, 5)) + 0.3, 0) + OFFSET,
        ]
        batches_x.append(layers_x)
        batches_y.append(layers_y)
    return batches_x, batches_y


def _as(batches: Batches, convert: Callable) -> list[list]:
    return [[convert(a) for a in layers] for layers in batches]


def _numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


# --------------------------------------------------------------------------------------------
# The paths
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Path:
    """One way through the engine: ``run(batches_x, batches_y, kernel)`` returns the (L1, L2) matrix."""

    name: str
    run: Callable[[Batches, Batches, str], np.ndarray]
    tol: float
    dtype: str = "float64"  # the inputs are rounded to this dtype, and the reference computed from them
    x64: bool | None = None  # the JAX x64 setting the path needs; None: any


def _functional(convert: Callable) -> Callable[[Batches, Batches, str], np.ndarray]:
    def run(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
        return _numpy(cka.minibatch_cka_matrix(_as(bx, convert), _as(by, convert), kernel=kernel))

    return run


def _jax_under_jit(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    function = jax.jit(lambda x, y: cka.minibatch_cka_matrix(x, y, kernel=kernel))
    return _numpy(function(_as(bx, jnp.asarray), _as(by, jnp.asarray)))


def _merged_shards(convert: Callable, compensated: bool | None = None) -> Callable[[Batches, Batches, str], np.ndarray]:
    """Two shards accumulated separately (batches 0-1 and 2-), then :func:`cka.merge_states`."""

    def accumulate(bx: Batches, by: Batches, kernel: str) -> cka.CKAState:
        state = cka.init_state(len(bx[0]), len(by[0]), like=convert(bx[0][0]), compensated=compensated)
        for layers_x, layers_y in zip(bx, by, strict=True):
            state = cka.update_state(state, _as([layers_x], convert)[0], _as([layers_y], convert)[0], kernel=kernel)
        return state

    def run(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
        merged = cka.merge_states(accumulate(bx[:2], by[:2], kernel), accumulate(bx[2:], by[2:], kernel))
        return _numpy(cka.finalize(merged))

    return run


def _from_grams(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    """The frontends' entry point: per-layer Grams from :func:`cka.gram`, then ``update_state_from_grams``."""
    state = cka.init_state(len(bx[0]), len(by[0]), like=bx[0][0])
    for layers_x, layers_y in zip(bx, by, strict=True):
        grams_x = [cka.gram(a, kernel=kernel) for a in layers_x]
        grams_y = np.stack([cka.gram(a, kernel=kernel) for a in layers_y])  # a stack works too
        state = cka.update_state_from_grams(state, grams_x, grams_y)
    return _numpy(cka.finalize(state))


def _stream_update(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    """The JAX streaming API, one jitted update per batch padded to the largest size (with a mask)."""
    state = stream.init(len(bx[0]), len(by[0]))
    size = max(SIZES)
    for layers_x, layers_y in zip(bx, by, strict=True):
        px, mask = stream.pad_batch(layers_x, size)
        py, _ = stream.pad_batch(layers_y, size)
        state = stream.update(state, px, py, mask, kernel=kernel)
    return _numpy(stream.finalize(state))


def _stream_scan(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    sx, masks = stream.stack_batches(bx)
    sy, _ = stream.stack_batches(by)
    return _numpy(stream.finalize(stream.scan_update(stream.init(len(bx[0]), len(by[0])), sx, sy, masks, kernel=kernel)))


def _stream_merge(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    def shard(part_x: Batches, part_y: Batches) -> CompensatedCKAState:
        sx, masks = stream.stack_batches(part_x, size=max(SIZES))
        sy, _ = stream.stack_batches(part_y, size=max(SIZES))
        return stream.scan_update(stream.init(len(bx[0]), len(by[0])), sx, sy, masks, kernel=kernel)

    return _numpy(stream.finalize(stream.merge(shard(bx[:1], by[:1]), shard(bx[1:], by[1:]))))


def _stream_psum(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    """``psum`` over a one-device mesh inside ``shard_map`` (two devices: tests/test_jax_subprocess.py)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",))
    sx, masks = stream.stack_batches(bx)
    sy, _ = stream.stack_batches(by)

    def per_device(state: CompensatedCKAState, x: list, y: list, m: jax.Array) -> CompensatedCKAState:
        return stream.psum(stream.scan_update(state, x, y, m, kernel=kernel), "data")

    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
    run = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")), out_specs=P()))
    return _numpy(stream.finalize(run(stream.init(len(bx[0]), len(by[0])), [put(a) for a in sx], [put(a) for a in sy],
                                      put(masks))))


def _torch(dtype: torch.dtype) -> Callable:
    return lambda a: torch.as_tensor(a, dtype=dtype)


def _jnp(dtype: str) -> Callable:
    return lambda a: jnp.asarray(a, dtype=dtype)


PATHS: list[Path] = [
    Path("numpy float64", _functional(np.asarray), FLOAT64_TOL),
    Path("numpy float32", _functional(np.asarray), FLOAT32_TOL, dtype="float32"),
    Path("torch float64", _functional(_torch(torch.float64)), FLOAT64_TOL),
    Path("torch float32", _functional(_torch(torch.float32)), FLOAT32_TOL, dtype="float32"),
    Path("numpy merged shards", _merged_shards(np.asarray), FLOAT64_TOL),
    Path("numpy compensated merged shards", _merged_shards(np.asarray, compensated=True), FLOAT64_TOL),
    Path("torch merged shards", _merged_shards(_torch(torch.float64)), FLOAT64_TOL),
    Path("numpy from grams", _from_grams, FLOAT64_TOL),
    # JAX with x64 on (this process): float64 accumulators
    Path("jax x64 eager", _functional(_jnp("float64")), FLOAT64_TOL, x64=True),
    Path("jax x64 float32 inputs", _functional(_jnp("float32")), FLOAT32_TOL, dtype="float32", x64=True),
    Path("jax x64 under jit", _jax_under_jit, FLOAT64_TOL, x64=True),
    Path("jax x64 merged shards", _merged_shards(_jnp("float64")), FLOAT64_TOL, x64=True),
    Path("stream x64 update", _stream_update, FLOAT64_TOL, x64=True),
    Path("stream x64 scan_update", _stream_scan, FLOAT64_TOL, x64=True),
    Path("stream x64 merge", _stream_merge, FLOAT64_TOL, x64=True),
    Path("stream x64 psum", _stream_psum, FLOAT64_TOL, x64=True),
    # JAX with x64 off (a fresh interpreter, tests/test_jax_subprocess.py): compensated float32 accumulators
    Path("jax f32 eager", _functional(_jnp("float32")), FLOAT32_TOL, dtype="float32", x64=False),
    Path("jax f32 under jit", _jax_under_jit, FLOAT32_TOL, dtype="float32", x64=False),
    Path("jax f32 merged shards", _merged_shards(_jnp("float32")), FLOAT32_TOL, dtype="float32", x64=False),
    Path("stream f32 update", _stream_update, FLOAT32_TOL, dtype="float32", x64=False),
    Path("stream f32 scan_update", _stream_scan, FLOAT32_TOL, dtype="float32", x64=False),
    Path("stream f32 merge", _stream_merge, FLOAT32_TOL, dtype="float32", x64=False),
    Path("stream f32 psum", _stream_psum, FLOAT32_TOL, dtype="float32", x64=False),
]

KERNELS = ("linear", "rbf")


def error_of(path: Path, kernel: str, seed: int = 0) -> float:
    """The largest deviation of ``path`` from the float64 reference on :func:`make_batches`'s batches."""
    bx, by = make_batches(seed)
    bx, by = _as(bx, lambda a: a.astype(path.dtype)), _as(by, lambda a: a.astype(path.dtype))
    expected = reference.minibatch_cka_matrix(_as(bx, np.float64), _as(by, np.float64), kernel=kernel)
    got = path.run(bx, by, kernel)
    if got.shape != expected.shape or not np.isfinite(got).all():
        raise AssertionError(f"{path.name}: got {got!r}, expected the finite {expected.shape} matrix {expected!r}")
    return float(np.abs(got - expected).max())


def errors_of(x64: bool) -> dict[str, dict[str, float]]:
    """``{path name: {kernel: error}}`` for every path that needs exactly this x64 setting (the
    entry point of the subprocess in tests/test_jax_subprocess.py)."""
    if bool(jax.config.jax_enable_x64) != x64:
        raise RuntimeError(f"errors_of(x64={x64}) called with jax_enable_x64={jax.config.jax_enable_x64}")
    return {p.name: {k: error_of(p, k) for k in KERNELS} for p in PATHS if p.x64 is x64}


# --------------------------------------------------------------------------------------------
# Tests (this process runs with x64 on: tests/conftest.py)
# --------------------------------------------------------------------------------------------


def test_this_process_runs_with_x64() -> None:
    assert jax.config.jax_enable_x64, "tests/conftest.py enables x64 for the suite; x64-off paths run in a subprocess"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("path", [p for p in PATHS if p.x64 is not False], ids=lambda p: p.name)
def test_path_matches_the_float64_reference(path: Path, kernel: str) -> None:
    assert error_of(path, kernel) <= path.tol


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_reference_is_exact_enough_for_the_offset(kernel: str) -> None:
    # centring each batch is exact in theory; in float64 the uncentred reference must agree to far
    # below the 1e-10 tolerance, or the offset is too large for the reference to judge the paths
    bx, by = make_batches()
    centre = lambda batches: [[a - a.mean(axis=0) for a in layers] for layers in batches]  # noqa: E731
    raw = reference.minibatch_cka_matrix(bx, by, kernel=kernel)
    np.testing.assert_allclose(raw, reference.minibatch_cka_matrix(centre(bx), centre(by), kernel=kernel), rtol=0,
                               atol=FLOAT64_TOL / 10)
    assert 0.05 < np.abs(raw).max() < 0.99  # the values are spread, not all 0 or 1


def test_an_uncentred_float32_computation_would_fail_the_float32_tolerance() -> None:
    # the harness can fail: Song et al.'s formula in float32 on the raw (offset) features misses 1e-6
    def naive(k: np.ndarray, g: np.ndarray) -> np.float32:
        n = np.float32(k.shape[0])
        kt, lt = k - np.diag(np.diag(k)), g - np.diag(np.diag(g))
        one = np.ones(k.shape[0], np.float32)
        return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))

    bx, by = make_batches()
    flat = lambda a: a.reshape(len(a), -1).astype(np.float32)  # noqa: E731
    gx = [[flat(a) @ flat(a).T for a in layers] for layers in bx]
    gy = [[flat(a) @ flat(a).T for a in layers] for layers in by]
    xy = np.array([[sum(naive(kx[i], ky[j]) for kx, ky in zip(gx, gy, strict=True)) for j in range(2)] for i in range(3)])
    xx = np.array([sum(naive(kx[i], kx[i]) for kx in gx) for i in range(3)])
    yy = np.array([sum(naive(ky[j], ky[j]) for ky in gy) for j in range(2)])
    error = np.abs(xy / np.sqrt(np.outer(xx, yy)) - reference.minibatch_cka_matrix(bx, by)).max()
    assert error > 100 * FLOAT32_TOL
