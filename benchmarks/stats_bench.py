"""Benchmark: what error bars cost. ``compare(..., bootstrap=200, permutations=200)`` against a plain ``compare``.

The ResNet-like pair of ``benchmarks/compare_models.py`` (ResNet-18-like vs ResNet-34-like, CIFAR size
32 x 32, width 64, random init with BatchNorm statistics from a few train-mode batches), block outputs
(the stem, every residual block, the classifier: 10 x 18 layers), on the CPU, in one process. The two
runs alternate within each round so that load drift hits both alike; the time of each is the median
over ``--repeats`` rounds and the ratio is the ratio of the medians (the target is <= 1.15).

The extra work per batch is ``R`` weighted additions of the ``L1 L2 + L1 + L2`` HSIC terms (negligible)
and, per permutation, an index gather of the smaller Gram stack and its ``L1 x L2`` inner products
with the other (``P x min(L1, L2) x n^2`` copies and ``P x L1 x L2 x n^2`` multiply-adds): it grows
with ``n^2``, while the forward passes grow with ``n`` and the model's size.

Run: ``python benchmarks/stats_bench.py`` (default 512 examples in batches of 128, i.e. 4 batches;
``--examples 1024`` for compare_models.py's full size).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from compare_models import CifarResNet, layer_sets  # noqa: E402  (a sibling script, not a package)


def build(examples: int, batch: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """The models and data of compare_models.py: seeded init, BatchNorm statistics from 4 train-mode batches."""
    torch.manual_seed(0)
    m1, m2 = CifarResNet((2, 2, 2, 2)), CifarResNet((3, 4, 6, 3))
    x = torch.randn(examples, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for m in (m1, m2):
        m.train()
        with torch.no_grad():
            for chunk in x[: 4 * batch].split(batch):
                m(chunk)
        m.eval()
    return m1, m2, x


def run(m1, m2, layers1, layers2, loader, **statistics_options):
    from cka import CKA

    comparison = CKA(m1, m2, model1_layers=layers1, model2_layers=layers2, device="cpu", progress=False)
    start = time.perf_counter()
    result = comparison.compare(loader, **statistics_options)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    from cka import CoarseStatisticsWarning

    warnings.simplefilter("ignore", CoarseStatisticsWarning)  # a benchmark's few batches, said once here
    if args.threads:
        torch.set_num_threads(args.threads)
    m1, m2, x = build(args.examples, args.batch)
    layers1, layers2 = layer_sets(m1)["blocks"], layer_sets(m2)["blocks"]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=args.batch)
    options = {"bootstrap": args.bootstrap, "permutations": args.permutations}
    warmup = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[: args.batch]), batch_size=args.batch)
    with warnings.catch_warnings():  # a one-batch warm-up warns about its single batch
        warnings.simplefilter("ignore")
        run(m1, m2, layers1, layers2, warmup)
        run(m1, m2, layers1, layers2, warmup, **options)
    plain_times, stats_times = [], []
    plain = with_stats = None
    for round_ in range(args.repeats):
        order = ("plain", "stats") if round_ % 2 == 0 else ("stats", "plain")
        for which in order:
            if which == "plain":
                elapsed, plain = run(m1, m2, layers1, layers2, loader)
                plain_times.append(elapsed)
            else:
                elapsed, with_stats = run(m1, m2, layers1, layers2, loader, **options)
                stats_times.append(elapsed)
    ratio = statistics.median(stats_times) / statistics.median(plain_times)
    paired = statistics.median(s / p for s, p in zip(stats_times, plain_times, strict=True))  # same round: same load
    identical = bool((with_stats.matrix == plain.matrix).all())
    print(
        f"ResNet-18-like vs ResNet-34-like, blocks ({len(layers1)} x {len(layers2)} layers), CPU "
        f"({torch.get_num_threads()} threads), {args.examples} examples in batches of {args.batch}:"
    )
    print(f"  plain compare                                  {statistics.median(plain_times):8.2f} s  {plain_times}")
    print(
        f"  bootstrap={args.bootstrap}, permutations={args.permutations}            "
        f"{statistics.median(stats_times):8.2f} s  {stats_times}"
    )
    print(f"  ratio (median / median)                        {ratio:8.3f}x   matrix unchanged: {identical}")
    print(f"  ratio (median of the rounds' ratios)           {paired:8.3f}x")
    summary = {
        "examples": args.examples,
        "batch": args.batch,
        "layers": [len(layers1), len(layers2)],
        "bootstrap": args.bootstrap,
        "permutations": args.permutations,
        "threads": torch.get_num_threads(),
        "plain_s": plain_times,
        "stats_s": stats_times,
        "ratio": ratio,
        "ratio_paired": paired,
        "matrix_unchanged": identical,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
