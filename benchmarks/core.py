"""The all-pairs accumulator against a per-pair loop in the torch_cka style, and the JAX jitted path.

For each configuration (L1 = L2 = L layers, n examples per batch, d features per layer) one batch is
timed (median of ``--repeats`` runs):

* ``cka``: :func:`cka.update_state` — one centred Gram per layer, all L x L HSIC values from one
  float64 matrix product;
* ``per-pair``: what torch_cka 0.21 does per batch — for every pair (i, j) the Gram of layer j is
  recomputed, ``trace(K @ L)``, and ``.item()`` three times per HSIC, in float32. Where a full
  per-pair pass would take minutes, only the first rows i are timed and the time is scaled by L / rows
  (every row costs the same); such rows are marked ``*``;
* ``jax``: the same accumulator under ``jax.jit`` (compile time reported separately).

Both results are compared with a float64 computation on the same features ("max |dev|").

Run: ``python benchmarks/core.py [--device cuda] [--quick]``; numbers go to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch

import cka


def per_pair_torch_cka_style(feats_x: list[torch.Tensor], feats_y: list[torch.Tensor], rows: int) -> torch.Tensor:
    """torch_cka 0.21's inner loop (``CKA.compare`` / ``CKA._HSIC``), restricted to the first ``rows`` rows."""
    n = feats_x[0].shape[0]
    device = feats_x[0].device
    hsic = torch.zeros(len(feats_x), len(feats_y), 3)

    def _hsic(k: torch.Tensor, l: torch.Tensor) -> float:
        ones = torch.ones(n, 1, device=device)
        result = torch.trace(k @ l)
        result += ((ones.t() @ k @ ones @ ones.t() @ l @ ones) / ((n - 1) * (n - 2))).item()
        result -= ((ones.t() @ k @ l @ ones) * 2 / (n - 2)).item()
        return (1 / (n * (n - 3)) * result).item()

    for i in range(rows):
        x = feats_x[i].flatten(1)
        k = x @ x.t()
        k.fill_diagonal_(0.0)
        hsic[i, :, 0] += _hsic(k, k)
        for j, feat in enumerate(feats_y):
            y = feat.flatten(1)
            l = y @ y.t()
            l.fill_diagonal_(0.0)
            hsic[i, j, 1] += _hsic(k, l)
            hsic[i, j, 2] += _hsic(l, l)
    return hsic[:, :, 1] / (hsic[:, :, 0].sqrt() * hsic[:, :, 2].sqrt())


def median_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def features(n_layers: int, n: int, d: int, device: str, seed: int) -> list[torch.Tensor]:
    """``n_layers`` feature tensors; at most 4 distinct ones are allocated and cycled (the cost of every
    method is the same for distinct layers, and 100 layers x 512 x 16384 floats would not fit)."""
    g = torch.Generator().manual_seed(seed)
    pool = [torch.randn(n, d, generator=g).to(device) for _ in range(min(4, n_layers))]
    return [pool[i % len(pool)] for i in range(n_layers)]


def run(configs: list[tuple[int, int, int]], device: str, repeats: int, budget_s: float, with_jax: bool) -> list[dict]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows_out = []
    for n_layers, n, d in configs:
        fx, fy = features(n_layers, n, d, device, 0), features(n_layers, n, d, device, 1)
        state0 = cka.init_state(n_layers, n_layers, like=fx[0])

        ours = lambda: cka.update_state(state0, fx, fy)  # noqa: E731
        t_ours = median_time(ours, repeats, sync)
        result_ours = cka.finalize(ours()).cpu().numpy()
        reference = cka.finalize(cka.update_state(state0, [f.double() for f in fx], [f.double() for f in fy])).cpu().numpy()

        # per-pair: time one row, then as many rows as fit in the budget
        t_row = median_time(lambda: per_pair_torch_cka_style(fx, fy, 1), 1, sync)
        rows = max(1, min(n_layers, int(budget_s / max(t_row, 1e-9))))
        t_pairs = median_time(lambda: per_pair_torch_cka_style(fx, fy, rows), 1 if rows < n_layers else repeats, sync)
        t_pairs *= n_layers / rows
        result_pairs = per_pair_torch_cka_style(fx, fy, rows).numpy()[:rows]

        entry = {
            "L": n_layers, "n": n, "d": d,
            "cka_s": t_ours, "pairs_s": t_pairs, "extrapolated": rows < n_layers,
            "speedup": t_pairs / t_ours,
            "dev_cka": float(np.nanmax(np.abs(result_ours - reference))),
            "dev_pairs": float(np.nanmax(np.abs(result_pairs - reference[:rows]))),
        }
        if with_jax:
            entry.update(jax_times(n_layers, n, d, repeats))
        rows_out.append(entry)
        print(format_row(entry), flush=True)
    return rows_out


def jax_times(n_layers: int, n: int, d: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    pool_x = [jnp.asarray(rng.normal(size=(n, d)), dtype=jnp.float32) for _ in range(min(4, n_layers))]
    pool_y = [jnp.asarray(rng.normal(size=(n, d)), dtype=jnp.float32) for _ in range(min(4, n_layers))]
    fx = [pool_x[i % len(pool_x)] for i in range(n_layers)]
    fy = [pool_y[i % len(pool_y)] for i in range(n_layers)]
    state0 = cka.init_state(n_layers, n_layers, like=fx[0])
    start = time.perf_counter()
    jax.block_until_ready(cka.update_state(state0, fx, fy))
    compile_s = time.perf_counter() - start
    step = median_time(lambda: jax.block_until_ready(cka.update_state(state0, fx, fy)), repeats, lambda: None)
    return {"jax_s": step, "jax_compile_s": compile_s}


def format_row(e: dict) -> str:
    star = "*" if e["extrapolated"] else " "
    line = (f"| {e['L']:>3} | {e['n']:>3} | {e['d']:>5} | {e['cka_s'] * 1e3:9.1f} | {e['pairs_s'] * 1e3:10.0f}{star} "
            f"| {e['speedup']:7.0f}x | {e['dev_cka']:.1e} | {e['dev_pairs']:.1e} |")
    if "jax_s" in e:
        line += f" {e['jax_s'] * 1e3:8.1f} | {e['jax_compile_s']:6.2f} |"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of per-pair loop per configuration")
    parser.add_argument("--quick", action="store_true", help="only L=50, n=128, d=512 (the target)")
    parser.add_argument("--no-jax", action="store_true")
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 50, 100], help="values of L1 = L2")
    parser.add_argument("--n", type=int, nargs="+", default=[128, 512], help="examples per batch")
    parser.add_argument("--d", type=int, nargs="+", default=[512, 16384], help="features per layer")
    args = parser.parse_args()
    if args.quick:
        configs = [(50, 128, 512)]
    else:
        configs = [(L, n, d) for L in args.layers for n in args.n for d in args.d]
    with_jax = not args.no_jax and args.device == "cpu"
    if with_jax:
        import jax

        jax.config.update("jax_enable_x64", True)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, median of {args.repeats}")
    header = "|   L |   n |     d | cka (ms) | per-pair (ms) | speedup | max dev cka | max dev per-pair |"
    if with_jax:
        header += " jax (ms) | jax compile (s) |"
    print(header)
    run(configs, args.device, args.repeats, args.budget, with_jax)


if __name__ == "__main__":
    main()
