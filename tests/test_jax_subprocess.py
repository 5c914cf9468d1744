"""JAX settings that must be fixed before JAX starts, each in a fresh interpreter.

* x64 off (float32 accumulators): the error against the numpy float64 reference stays below the
  documented bound, and compensated summation keeps it there over many batches;
* two CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``): ``shard_map`` with
  :func:`cka.frontends.jax.psum` equals one device's pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("jax")

ROOT = Path(__file__).resolve().parents[1]

#: The float32 bound stated in the README and the module docstring of cka.frontends.jax.
FLOAT32_BOUND = 1e-5


def _run(script: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` in a fresh interpreter (repo on the path); return the JSON of its last line."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    environment.pop("JAX_ENABLE_X64", None)
    environment.update(env or {})
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=environment,
        cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, f"subprocess failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


FLOAT32_SCRIPT = """
import json, sys
import numpy as np
import jax, jax.numpy as jnp
from cka.frontends import jax as ckj
from cka import core
from cka import state as engine

out = {"x64": bool(jax.config.jax_enable_x64), "imports": sorted(m for m in ("torch", "flax") if m in sys.modules)}
rng = np.random.default_rng(0)

# 1. Realistic post-ReLU features (mean ~1, correlated layers), float32 in and out, vs float64 numpy.
n, d, n_batches = 64, 2048, 3
weights = [rng.normal(size=(32, d)) / 6 for _ in range(2)]
xs, ys = [], []
for _ in range(n_batches):
    z = rng.normal(size=(n, 32))
    z2 = 0.5 * z + 0.9 * rng.normal(size=(n, 32))  # the second layer shares part of the signal
    layers = [np.maximum(latent @ w + 1.0 + 0.5 * rng.normal(size=(n, d)), 0).astype(np.float32)
              for latent, w in zip((z, z2), weights)]
    xs.append(layers)
    ys.append([np.maximum(layers[0][:, : d // 2] * 2 - 0.5, 0), layers[1]])
reference = engine.minibatch_cka_matrix([[a.astype(np.float64) for a in b] for b in xs],
                                      [[a.astype(np.float64) for a in b] for b in ys])
state = ckj.init(2, 2)
for bx, by in zip(xs, ys):
    state = ckj.update(state, [jnp.asarray(a) for a in bx], [jnp.asarray(a) for a in by])
out["dtype"] = str(state.sums.hsic_xy.dtype)
out["features_error"] = float(np.abs(np.asarray(ckj.finalize(state)) - reference).max())
out["reference_min"] = float(reference.min())
# the RBF kernel (entries in (0, 1], a large mean: its Grams are double-centred before the HSIC terms)
reference = engine.minibatch_cka_matrix([[a.astype(np.float64) for a in b] for b in xs],
                                      [[a.astype(np.float64) for a in b] for b in ys], kernel="rbf")
state = ckj.init(2, 2)
for bx, by in zip(xs, ys):
    state = ckj.update(state, [jnp.asarray(a) for a in bx], [jnp.asarray(a) for a in by], kernel="rbf")
out["rbf_error"] = float(np.abs(np.asarray(ckj.finalize(state)) - reference).max())

# 2. Many batches: 1000 distinct small batches repeated 50 times (5e4 batches). Repeating every
#    batch k times scales every sum by k, so the float64 reference is the 1000-batch value.
distinct, n, d = 1000, 16, 32
mix = rng.normal(size=(2, 8, d))
small = []
for _ in range(distinct):
    z = rng.normal(size=(n, 8))
    small.append([np.maximum(z @ mix[i] + 1.0 + 0.3 * rng.normal(size=(n, d)), 0).astype(np.float32) for i in range(2)])
swapped = [[b[1], b[0]] for b in small]
reference = engine.minibatch_cka_matrix([[a.astype(np.float64) for a in b] for b in small],
                                      [[a.astype(np.float64) for a in b] for b in swapped])
stacked_x = [jnp.asarray(np.stack([b[i] for b in small])) for i in range(2)]  # (1000, 16, 32) each
stacked_y = stacked_x[::-1]
state = ckj.init(2, 2)
for _ in range(50):
    state = ckj.scan_update(state, stacked_x, stacked_y)
out["n_batches"] = float(state.sums.n_batches) + float(state.compensation.n_batches)
out["many_batches_error"] = float(np.abs(np.asarray(ckj.finalize(state)) - reference).max())

# 3. Large and small float32 features: their HSIC terms (about |x|^4 n^2 d^2) leave float32 from
#    |x| ~ 1e6 on; the sums are kept at per-layer powers of two instead, under jit and scan alike.
batches = [(rng.normal(size=(16, 30)), rng.normal(size=(16, 10))) for _ in range(3)]
batches = [(x, x[:, :10] + y) for x, y in batches]
unscaled = engine.minibatch_cka_matrix([[x] for x, _ in batches], [[y] for _, y in batches])
errors = {}
for scale in (1e6, 1e12, 1e20, 1e-12, 1e-25):
    streamed = ckj.init(1, 1)
    for x, y in batches:
        streamed = ckj.update(streamed, [jnp.asarray(x * scale, jnp.float32)], [jnp.asarray(y, jnp.float32)])
    scanned = ckj.scan_update(ckj.init(1, 1), [jnp.asarray(np.stack([x for x, _ in batches]) * scale, jnp.float32)],
                              [jnp.asarray(np.stack([y for _, y in batches]), jnp.float32)])
    errors[str(scale)] = max(float(np.abs(np.asarray(ckj.finalize(s)) - unscaled).max()) for s in (streamed, scanned))
out["magnitude_errors"] = errors
# the same sums without their compensation: plain float32 accumulation
out["uncompensated_error"] = float(np.abs(np.asarray(engine.finalize(state.sums)) - reference).max())
print(json.dumps(out))
"""


def test_float32_path_stays_within_the_stated_bound() -> None:
    result = _run(FLOAT32_SCRIPT)
    assert result["x64"] is False and result["dtype"] == "float32"
    assert result["imports"] == []  # cka.frontends.jax imports neither torch nor flax
    assert result["reference_min"] < 0.9  # the layers differ: the values are not all near 1
    assert result["features_error"] < FLOAT32_BOUND
    assert result["rbf_error"] < FLOAT32_BOUND
    assert result["n_batches"] == 50_000
    assert result["many_batches_error"] < FLOAT32_BOUND
    assert max(result["magnitude_errors"].values()) < FLOAT32_BOUND, result["magnitude_errors"]
    # compensation is what keeps it there: plain float32 sums drift well past the compensated error
    assert result["uncompensated_error"] > 10 * result["many_batches_error"]


TWO_DEVICE_SCRIPT = """
import json
import numpy as np
import jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
from jax.sharding import NamedSharding, PartitionSpec as P
from cka import core
from cka import state as engine
from cka.frontends import jax as ckj

rng = np.random.default_rng(0)
sizes = [16, 16, 16, 16, 11]  # 5 batches, the last ragged
xs = [[np.maximum(rng.normal(size=(n, 12)) + 1, 0), rng.normal(size=(n, 3, 4))] for n in sizes]
ys = [[np.tanh(b[0] @ rng.normal(size=(12, 7))) + 0.1 * rng.normal(size=(n, 7))] for b, n in zip(xs, sizes)]
reference = engine.minibatch_cka_matrix(xs, ys)
# 5 batches do not split over 2 devices: a sixth, all padding (mask all false), adds nothing
empty_x, empty_y = [np.zeros((0, 12)), np.zeros((0, 3, 4))], [np.zeros((0, 7))]
stacked_x, masks = ckj.stack_batches(xs + [empty_x], size=16)
stacked_y, _ = ckj.stack_batches(ys + [empty_y], size=16)
single = ckj.scan_update(ckj.init(2, 1), stacked_x, stacked_y, masks)

mesh = jax.make_mesh((2,), ("data",))
put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
def per_device(state, sx, sy, m):
    return ckj.psum(ckj.scan_update(state, sx, sy, m), "data")
sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")), out_specs=P()))
two = sharded(ckj.init(2, 1), [put(a) for a in stacked_x], [put(a) for a in stacked_y], put(masks))


matrix = lambda s: np.asarray(ckj.finalize(s))
print(json.dumps({
    "devices": jax.device_count(),
    "single_vs_reference": float(np.abs(matrix(single) - reference).max()),
    "shard_map_vs_single": float(np.abs(matrix(two) - matrix(single)).max()),
    "n_batches": [float(single.sums.n_batches), float(two.sums.n_batches)],
    "n_examples": float(two.sums.n_examples),
}))
"""


def test_two_devices_equal_one_device() -> None:
    result = _run(TWO_DEVICE_SCRIPT, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result["devices"] == 2
    assert result["single_vs_reference"] < 1e-10
    assert result["shard_map_vs_single"] < 1e-12
    assert result["n_batches"] == [5.0, 5.0]  # the padding batch was not counted
    assert result["n_examples"] == 75.0


ENGINE_SCRIPT = """
import json
import jax
from tests import test_engine
print(json.dumps({"x64": bool(jax.config.jax_enable_x64), "errors": test_engine.errors_of(x64=False)}))
"""


def test_engine_paths_without_x64() -> None:
    # tests/test_engine.py's paths that need float32 accumulators (x64 off), in a fresh interpreter
    from tests import test_engine

    result = _run(ENGINE_SCRIPT)
    assert result["x64"] is False
    expected = {p.name: p for p in test_engine.PATHS if p.x64 is False}
    assert set(result["errors"]) == set(expected)
    failures = {name: errors for name, errors in result["errors"].items()
                if max(errors.values()) > expected[name].tol}
    assert not failures, f"paths beyond their tolerance: {failures}"
