"""Memory of a comparison beside the models: the stated formula against the measured peak.

The comparer keeps one preallocated ``(L, n, n)`` float64 Gram stack per side, filled in place from
the forward hooks (:class:`cka.frontends._common.GramStack`); so beside the models it needs

    M = 8 n^2 (L1 + L2)        bytes (two models; one model on both sides with the same layers: 8 n^2 L)

plus transients a few ``n x n`` in size (a layer's Gram before it is copied into the stack), the
centring buffer of the largest layer's ``(n, d)`` features, and whatever the HSIC step of
:mod:`cka.state` / :mod:`cka.core` allocates on top of the stacks (printed here as the ratio).

Each case runs in a fresh process: the models (``L`` small residual ``Linear + tanh`` blocks, so the
features are tiny beside the Grams) are built, a warm-up comparison of two layers initialises
everything, then the peak resident set size (``ru_maxrss``) is read before and after the full
comparison; the difference is the comparison's memory.

Run: ``python benchmarks/memory.py`` (L = 60, n = 256: well under a minute) or
``python benchmarks/memory.py --layers 200 --n 512`` (the README's case, ~1 GB); ``--device cuda``
reads ``torch.cuda.max_memory_allocated`` instead of the RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = ("same model, same layers", "same model, other layers", "two models")


def _run_case(case: str, layers: int, n: int, width: int, batches: int, device: str) -> dict:
    """Build, warm up, measure; one process per case (``ru_maxrss`` only grows)."""
    import torch
    from torch import nn

    from cka import CKA

    torch.manual_seed(0)

    class Block(nn.Module):
        """``x + tanh(linear(x))``: activations neither vanish nor explode over hundreds of blocks."""

        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.tanh(self.linear(x))

    def model() -> nn.Module:
        return nn.Sequential(*(Block() for _ in range(layers))).to(device)

    first = model()
    second = first if case.startswith("same") else model()
    names = [str(i) for i in range(layers)]
    layers1 = names
    layers2 = names if case != "same model, other layers" else [f"{i}.linear" for i in range(layers)]
    data = [torch.randn(n, width, device=device) for _ in range(batches)]

    def peak() -> int:
        if device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    CKA(first, second, model1_layers=names[:2], model2_layers=names[:2], progress=False).compare(data[:1])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = peak()
    start = time.perf_counter()
    CKA(first, second, model1_layers=layers1, model2_layers=layers2, progress=False).compare(data)
    seconds = time.perf_counter() - start
    gram = 8 * n * n
    stacks = layers * gram if case == "same model, same layers" else 2 * layers * gram
    return {"case": case, "theory": stacks, "measured": peak() - before, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=60, help="layers per side (L1 = L2 = L)")
    parser.add_argument("--n", type=int, default=256, help="examples per batch")
    parser.add_argument("--width", type=int, default=64, help="features per layer")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(_run_case(args.case, args.layers, args.n, args.width, args.batches, args.device)))
        return
    mb = 2**20
    print(f"L1 = L2 = {args.layers} layers, n = {args.n}, {args.width} features per layer, {args.batches} batches, "
          f"{args.device}; theory: 8 n^2 (L1 + L2) bytes (one shared stack: 8 n^2 L)")
    print(f"{'case':<28} {'theory MB':>10} {'measured MB':>12} {'ratio':>6} {'seconds':>8}")
    for case in CASES:
        command = [sys.executable, __file__, "--case", case, "--layers", str(args.layers), "--n", str(args.n),
                   "--width", str(args.width), "--batches", str(args.batches), "--device", args.device]
        row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"{case:<28} {row['theory'] / mb:>10.1f} {row['measured'] / mb:>12.1f} "
              f"{row['measured'] / row['theory']:>6.2f} {row['seconds']:>8.2f}")


if __name__ == "__main__":
    main()
