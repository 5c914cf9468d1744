"""``cka demo``: the whole product on an embedded default, in under two minutes on two CPU cores.

1. Loads scikit-learn's handwritten digits (1797 8x8 images, shipped inside scikit-learn: no
   download) and trains a shallow and a deep CNN for a few seconds each.
2. Exports the shallow net to ONNX and makes an int8-quantized copy with onnxruntime's tools.
3. Compares: shallow vs deep; the PyTorch net vs its ONNX export (diagonal ~1.0); the ONNX export vs
   its int8 copy; the same net on clean vs noise-corrupted digits.
4. Writes heatmaps (PNG) and results (JSON) into the output folder.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SmallCNN", "digits_tensors", "run_demo"]

TEST_SPLIT = 1200  # digits 0..1199 train, 1200..1796 test (597 examples)


def _torch() -> Any:
    import torch

    return torch


def SmallCNN(depth: int, width: int = 16, seed: int = 0) -> Any:  # noqa: N802 - a model factory
    """A CNN for 1x8x8 digits: ``depth`` blocks ``conv3x3 -> BatchNorm -> ReLU`` (named ``block<i>``),
    global average pooling and a linear classifier ``fc``."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(seed)
    blocks: list[tuple[str, Any]] = []
    channels = 1
    for i in range(depth):
        out = width * (2 if i >= depth // 2 else 1)
        blocks.append(
            (
                f"block{i}",
                nn.Sequential(nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()),
            )
        )
        channels = out
    blocks += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(channels, 10))]
    from collections import OrderedDict

    return nn.Sequential(OrderedDict(blocks))


def digits_tensors() -> tuple[Any, Any]:
    """The 1797 digits as ``(n, 1, 8, 8)`` float32 in [0, 1] and their labels."""
    torch = _torch()
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
    return x, torch.tensor(digits.target)


def train(model: Any, x: Any, y: Any, steps: int, seed: int) -> float:
    """Adam on minibatches of 64; returns the seconds it took."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    model.eval()
    return time.perf_counter() - start


def accuracy(model: Any, x: Any, y: Any) -> float:
    torch = _torch()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def export_onnx(model: Any, path: Path, example: Any) -> Path:
    """The TorchScript-based exporter (``dynamo=False``), dynamic batch axis."""
    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def quantize_int8(source: Path, target: Path, calibration: np.ndarray) -> Path:
    """Static int8 quantization (QDQ, per-tensor) calibrated on ``calibration`` examples."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{"x": calibration[i : i + 32]} for i in range(0, len(calibration), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs a pre-processing hint
    quantize_static(str(source), str(target), Reader(), activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return target


def run_demo(out: Path, *, fast: bool = False) -> dict[str, Any]:
    """Run the demo, write its files into ``out``, print what it finds; returns the results by name."""
    torch = _torch()
    from cka.frontends.onnx import OnnxModel
    from cka.frontends.torch import CKA

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out.mkdir(parents=True, exist_ok=True)
    x, y = digits_tensors()
    x_train, y_train, x_test, y_test = x[:TEST_SPLIT], y[:TEST_SPLIT], x[TEST_SPLIT:], y[TEST_SPLIT:]
    steps = 60 if fast else 300

    print("1. Training two CNNs on scikit-learn's digits (1200 train / 597 test images, 8x8)")
    shallow, deep = SmallCNN(depth=2, seed=0), SmallCNN(depth=5, seed=1)
    for name, model, seed in (("shallow (2 conv blocks)", shallow, 0), ("deep (5 conv blocks)", deep, 1)):
        seconds = train(model, x_train, y_train, steps, seed)
        print(f"   {name}: test accuracy {accuracy(model, x_test, y_test):.3f} after {steps} steps ({seconds:.1f} s)")

    print("2. Exporting the shallow CNN to ONNX and quantizing a copy to int8")
    onnx_path = export_onnx(shallow, out / "shallow.onnx", x_test[:2])
    int8_path = quantize_int8(onnx_path, out / "shallow-int8.onnx", x_train[:256].numpy())
    print(
        f"   {onnx_path} ({onnx_path.stat().st_size / 1024:.0f} KiB), {int8_path} ({int8_path.stat().st_size / 1024:.0f} KiB)"
    )

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_test, y_test), batch_size=128)
    g = torch.Generator().manual_seed(0)
    noisy = (x_test + 0.35 * torch.randn(x_test.shape, generator=g)).clamp(0, 1)
    noisy_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(noisy, y_test), batch_size=128)
    blocks_shallow = [n for n, _ in shallow.named_children() if n.startswith("block")] + ["pool", "fc"]
    blocks_deep = [n for n, _ in deep.named_children() if n.startswith("block")] + ["pool", "fc"]
    # fusion-safe boundaries for the ONNX comparisons: block outputs (after ReLU), pooling, logits
    comparisons = {
        "shallow_vs_deep": (
            CKA(shallow, deep, "shallow", "deep", blocks_shallow, blocks_deep, progress=False),
            loader,
            None,
        ),
        "torch_vs_onnx": (
            CKA(
                shallow,
                OnnxModel(onnx_path),
                "shallow (PyTorch)",
                "shallow (ONNX)",
                blocks_shallow,
                blocks_shallow,
                progress=False,
            ),
            loader,
            None,
        ),
        "onnx_vs_int8": (
            CKA(
                OnnxModel(onnx_path, reference=shallow),
                OnnxModel(int8_path, reference=shallow),
                "shallow (ONNX float32)",
                "shallow (ONNX int8)",
                blocks_shallow,
                blocks_shallow,
                progress=False,
            ),
            loader,
            None,
        ),
        "clean_vs_noisy": (
            CKA(
                shallow,
                shallow,
                "shallow on clean digits",
                "shallow on noisy digits",
                blocks_shallow,
                blocks_shallow,
                progress=False,
            ),
            loader,
            noisy_loader,
        ),
    }
    print("3. Comparing (minibatch CKA, batches of 128, unbiased HSIC)")
    results = {}
    for key, (comparison, first, second) in comparisons.items():
        result = comparison.compare(first, second)
        results[key] = result
        result.save(out / f"{key}.json")
        result.save_plot(out / f"{key}.png", dpi=110)
        print(f"   {result.model1_name} vs {result.model2_name}:")
        if list(result.model1_layers) == list(result.model2_layers):
            diagonal = ", ".join(f"{n} {result.matrix[i, i]:.4f}" for i, n in enumerate(result.model1_layers))
            print(f"     diagonal: {diagonal}")
        else:
            print(_indent(np.array2string(result.matrix, precision=3, max_line_width=120), "     "))
    print(f"4. Wrote heatmaps (PNG) and results (JSON) to {out.resolve()}")
    return results


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())
