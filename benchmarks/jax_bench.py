"""The JAX jitted accumulator against the PyTorch CPU accumulator, and the float32 JAX path's error.

Speed: L1 = L2 = L layers of n x d float32 post-ReLU features (the same numpy arrays for every
backend), one batch per call, median of ``--repeats`` calls after a warm-up:

* ``torch``: :func:`cka.update_state` on CPU tensors (Gram in float32, HSIC and sums in float64);
* ``jax x64``: :func:`cka.frontends.jax.update` with ``jax_enable_x64`` (same dtypes as torch);
* ``jax f32``: the same without x64 (float32 accumulators, compensated sums).

``compile`` is the trace + XLA compile time of the jitted update (once per shape); ``first call`` is
the torch path's first batch (no compilation; allocator warm-up).

Precision (``--precision``): the float32 JAX path (x64 off) against a numpy float64 reference on
post-ReLU features, for several n, d, and for 10^6 batches with and without compensation.

Each backend runs in its own interpreter (JAX's x64 flag is fixed per process). Run:
``python benchmarks/jax_bench.py [--quick] [--precision]``; numbers go to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def features(layers: int, n: int, d: int, seed: int = 0) -> list[np.ndarray]:
    """``layers`` post-ReLU float32 layers ``(n, d)`` with a shared latent (so CKA is not trivially 0)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 16)).astype(np.float32)
    out = []
    for _ in range(layers):
        w = rng.normal(size=(16, d)).astype(np.float32) / 4
        out.append(np.maximum(latent @ w + 1.0 + 0.5 * rng.standard_normal((n, d), dtype=np.float32), 0))
    return out


def median_time(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(backend: str, layers: int, n: int, d: int, repeats: int, threads: int) -> dict:
    """Time one backend on one configuration (runs in a fresh interpreter; XLA's threads are set by
    the caller through XLA_FLAGS)."""
    xs = features(layers, n, d)
    ys = xs[1:] + xs[:1]  # the same memory, different pairs
    if backend == "torch":
        import torch

        import cka

        torch.set_num_threads(threads)
        tx, ty = [torch.from_numpy(a) for a in xs], [torch.from_numpy(a) for a in ys]
        state0 = cka.init_state(layers, layers, like=tx[0])
        start = time.perf_counter()
        cka.update_state(state0, tx, ty)
        first = time.perf_counter() - start
        per_batch = median_time(lambda: cka.update_state(state0, tx, ty), repeats)
        return {"per_batch": per_batch, "compile": None, "first": first}

    import jax

    jax.config.update("jax_enable_x64", backend == "jax x64")
    import jax.numpy as jnp

    from cka import stream
    from cka.frontends import jax as ckj

    jx, jy = [jnp.asarray(a) for a in xs], [jnp.asarray(a) for a in ys]
    state0 = ckj.init(layers, layers)
    mask = jnp.ones((n,), bool)
    start = time.perf_counter()
    stream._update_jit.lower(state0, jx, jy, mask, "linear", True, None, 0.8).compile()
    compile_time = time.perf_counter() - start
    jax.block_until_ready(ckj.update(state0, jx, jy))  # warm-up: fills the jit cache
    per_batch = median_time(lambda: jax.block_until_ready(ckj.update(state0, jx, jy)), repeats)
    return {"per_batch": per_batch, "compile": compile_time, "first": None}


PRECISION_SCRIPT = r"""
import json, sys
import numpy as np
import jax, jax.numpy as jnp
from cka import core
from cka import state as engine
from cka.frontends import jax as ckj

rows = []
for n, d, batches in [(64, 1024, 8), (256, 4096, 4), (256, 16384, 2), (128, 65536, 2)]:
    rng = np.random.default_rng(n + d)
    weights = [rng.normal(size=(32, d)).astype(np.float32) / 6 for _ in range(3)]
    xs = []
    for _ in range(batches):
        z = rng.normal(size=(n, 32)).astype(np.float32)
        zs = [z, 0.6 * z + 0.8 * rng.normal(size=(n, 32)).astype(np.float32), rng.normal(size=(n, 32)).astype(np.float32)]
        xs.append([np.maximum(a @ w + 1.0 + 0.5 * rng.standard_normal((n, d), dtype=np.float32), 0)
                   for a, w in zip(zs, weights)])
    ys = [b[::-1] for b in xs]
    reference = engine.minibatch_cka_matrix([[a.astype(np.float64) for a in b] for b in xs],
                                          [[a.astype(np.float64) for a in b] for b in ys])
    state = ckj.init(3, 3)
    for bx, by in zip(xs, ys):
        state = ckj.update(state, [jnp.asarray(a) for a in bx], [jnp.asarray(a) for a in by])
    row = {"n": n, "d": d, "batches": batches, "error": float(np.abs(np.asarray(ckj.finalize(state)) - reference).max()),
           "min_cka": float(reference.min())}
    reference = engine.minibatch_cka_matrix([[a.astype(np.float64) for a in b] for b in xs],
                                          [[a.astype(np.float64) for a in b] for b in ys], kernel="rbf")
    state = ckj.init(3, 3)
    for bx, by in zip(xs, ys):
        state = ckj.update(state, [jnp.asarray(a) for a in bx], [jnp.asarray(a) for a in by], kernel="rbf")
    row["rbf_error"] = float(np.abs(np.asarray(ckj.finalize(state)) - reference).max())
    rows.append(row)

# many batches: 1000 distinct (16 x 32) batches, repeated; the float64 reference is the 1000-batch value
rng = np.random.default_rng(1)
mix = rng.normal(size=(2, 8, 32))
small = []
for _ in range(1000):
    z = rng.normal(size=(16, 8))
    small.append([np.maximum(z @ mix[i] + 1.0 + 0.3 * rng.normal(size=(16, 32)), 0).astype(np.float32) for i in range(2)])
reference = engine.minibatch_cka_matrix([[a.astype(np.float64) for a in b] for b in small],
                                      [[a.astype(np.float64) for a in b[::-1]] for b in small])
sx = [jnp.asarray(np.stack([b[i] for b in small])) for i in range(2)]
sy = sx[::-1]
state = ckj.init(2, 2)
drift = []
done = 0
for target in (10**3, 10**4, 10**5, 10**6):
    while done < target:
        state = ckj.scan_update(state, sx, sy)
        done += 1000
    drift.append({"batches": done, "compensated": float(np.abs(np.asarray(ckj.finalize(state)) - reference).max()),
                  "plain": float(np.abs(np.asarray(engine.finalize(state.sums)) - reference).max())})
print(json.dumps({"features": rows, "drift": drift}))
"""


def run_in_subprocess(args: list[str], env: dict[str, str] | None = None) -> dict:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    environment.pop("JAX_ENABLE_X64", None)
    environment.update(env or {})
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 16384])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per backend (default 1: stable numbers on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="d = 512 only, 3 repeats")
    parser.add_argument("--precision", action="store_true", help="also measure the float32 path's error")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.layers, args.n, args.d, args.repeats, args.threads)))
        return
    if args.quick:
        args.dims, args.repeats = [512], 3

    import jax
    import torch

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; torch {torch.__version__}, "
          f"jax {jax.__version__}; L1 = L2 = {args.layers}, n = {args.n}, float32 features, {args.threads} thread(s) "
          f"per backend, median of {args.repeats}; load average before: {os.getloadavg()[0]:.1f}\n")
    xla_threads = {"XLA_FLAGS": f"--xla_cpu_multi_thread_eigen={'true' if args.threads > 1 else 'false'} "
                                f"intra_op_parallelism_threads={args.threads}"}
    print("| d | backend | time per batch | compile (once per shape) | first call |")
    print("|---|---|---|---|---|")
    for d in args.dims:
        for backend in ("torch", "jax x64", "jax f32"):
            result = run_in_subprocess([__file__, "--worker", backend, "--layers", str(args.layers), "--n", str(args.n),
                                        "--d", str(d), "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                       xla_threads)
            print(f"| {d} | {backend} | {fmt(result['per_batch'])} | {fmt(result['compile'])} | {fmt(result['first'])} |",
                  flush=True)

    if args.precision:
        result = run_in_subprocess(["-c", PRECISION_SCRIPT])
        print("\nfloat32 JAX path (x64 off) vs numpy float64, max |error| over the 3 x 3 CKA matrix:\n")
        print("| n | d | batches | linear: max abs error | smallest CKA | RBF (sigma_frac 0.8): max abs error |")
        print("|---|---|---|---|---|---|")
        for row in result["features"]:
            print(f"| {row['n']} | {row['d']} | {row['batches']} | {row['error']:.1e} | {row['min_cka']:.3f} | "
                  f"{row['rbf_error']:.1e} |")
        print("\n| batches | compensated (default) | plain float32 sums |")
        print("|---|---|---|")
        for row in result["drift"]:
            print(f"| {row['batches']:.0e} | {row['compensated']:.1e} | {row['plain']:.1e} |")


if __name__ == "__main__":
    main()
