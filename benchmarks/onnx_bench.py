"""Time per batch of the ONNX path vs plain onnxruntime inference (the floor).

The floor is one ``InferenceSession.run`` of the exported graph as it is (its own outputs only). The
ONNX path is what :class:`cka.CKA` does per batch on the ONNX side: one run of the graph with the
selected values as extra outputs (read through I/O binding, handed to torch by DLPack) plus one
float64 Gram per selected layer (into the extractor's one preallocated ``(L, n, n)`` stack), with the Gram
function ``CKA`` hands to extractors. Model: the CIFAR-size ResNet-like network of
the tests (``tests/onnx_models.py``) at ResNet-18's width (64 and 128 channels, 32x32 inputs),
exported with the TorchScript exporter and the dynamo exporter, batch 128. Two selections: block
outputs (7 values) and every module output the graph records (all of :meth:`OnnxModel.modules`).
The floor and the ONNX path are timed alternately, batch by batch, so that load from other processes
hits both alike; reported: the medians, the median per-batch ratio, and ``floor+mm``: the floor plus
the bare float32 Gram products ``X @ X.T`` of the same features, over the floor, i.e. what any
Gram-based method costs at least. onnxruntime and torch use their
default thread pools.

Run: ``.venv/bin/python benchmarks/onnx_bench.py`` (``--repeats 7 --batch 128 --width 64``).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cka import core
from cka.frontends.onnx import OnnxModel
from tests.onnx_models import export, resnet_like

BLOCKS = ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "pool", "fc"]


def _gram_function():
    """The Gram function :class:`cka.CKA` hands to extractors (``cka/compare.py``): :func:`cka.core.gram`
    with the linear kernel and the default settings, unchecked."""
    return functools.partial(core.gram, kernel="linear", sigma=None, sigma_frac=0.8, check=False)


def _products(flat: list[torch.Tensor]) -> list[torch.Tensor]:
    return [f @ f.T for f in flat]


def _seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def interleaved(floor_step, step, repeats: int, warmup: int = 1) -> tuple[float, float, float]:
    """Median seconds of ``floor_step()`` and of ``step()``, and the median of their per-repeat ratio,
    timed alternately so that load from other processes hits both alike."""
    for _ in range(warmup):
        floor_step()
        step()
    floors, times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        floor_step()
        middle = time.perf_counter()
        step()
        end = time.perf_counter()
        floors.append(middle - start)
        times.append(end - middle)
    ratios = [t / f for t, f in zip(times, floors, strict=True)]
    return statistics.median(floors), statistics.median(times), statistics.median(ratios)


def bench(path: Path, x: np.ndarray, repeats: int) -> list[tuple[str, int, float, float, float, float]]:
    """``(selection, layers, floor seconds, ours seconds, median ratio, (floor + bare Gram products) /
    floor)`` for both selections."""
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gram_fn = _gram_function()
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # module names without the PyTorch model: unchecked, on purpose
        all_modules = list(OnnxModel(path).modules())
        for label, layers in (("block outputs", BLOCKS), ("every module output", all_modules)):
            extractor = OnnxModel(path, layers=layers, providers=["CPUExecutionProvider"])
            with extractor, torch.inference_mode():
                floor, seconds, ratio = interleaved(
                    lambda: plain.run(None, {"x": x}), functools.partial(extractor.grams, x, gram_fn), repeats
                )
                # the bare Gram products of the same features: the floor of any Gram-based method
                flat = [f.reshape(f.shape[0], -1) for f in extractor.features(x).values()]
                products = statistics.median(_seconds(functools.partial(_products, flat)) for _ in range(3))
            rows.append((label, len(layers), floor, seconds, ratio, (floor + products) / floor))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage (64: ResNet-18's)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    model = resnet_like(width=args.width)
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, batch {args.batch}, "
          f"ResNet-like width {args.width}, 32x32, median of {args.repeats}")
    print(f"{'exporter':<12} {'selection':<20} {'layers':>6} {'floor ms':>9} {'cka ms':>9} {'x floor':>8} "
          f"{'floor+mm':>9}")
    with tempfile.TemporaryDirectory() as directory:
        for exporter in ("torchscript", "dynamo"):
            path = export(model, torch.from_numpy(x[:4]), Path(directory) / f"resnet-{exporter}.onnx", exporter)
            for label, n_layers, floor, seconds, ratio, gram_floor in bench(path, x, args.repeats):
                print(f"{exporter:<12} {label:<20} {n_layers:>6} {1e3 * floor:>9.1f} {1e3 * seconds:>9.1f} {ratio:>8.2f} "
                      f"{gram_floor:>9.2f}")


if __name__ == "__main__":
    main()
