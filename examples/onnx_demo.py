"""A PyTorch model vs its ONNX deployment, float32 and int8: where does the deployed graph drift?

Trains a small residual CNN on scikit-learn's handwritten digits (1797 8x8 images shipped inside
scikit-learn: no download), exports it with ``torch.onnx.export`` (dynamo exporter, weights in
``model.onnx.data``), quantizes a copy to int8 with onnxruntime, and compares both graphs with the
PyTorch model layer by layer. Writes ``cka-demo-out/onnx_float32.png`` and ``cka-demo-out/onnx_int8.png``.

Run: ``python examples/onnx_demo.py``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from cka import CKA
from cka.frontends.onnx import OnnxMappingError, OnnxModel

OUT = Path("cka-demo-out")


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


def digits_cnn(x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    model.blocks = nn.Sequential(Block(16), Block(16), Block(16))
    model.pool = nn.AdaptiveAvgPool2d(1)
    model.flatten = nn.Flatten()
    model.fc = nn.Linear(16, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    OUT.mkdir(exist_ok=True)
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target)
    model = digits_cnn(x[:1200], y[:1200])
    test = torch.utils.data.DataLoader(x[1200:], batch_size=64)

    path = OUT / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:4],), str(path), dynamo=True, input_names=["x"],
                          dynamic_shapes=({0: torch.export.Dim("n")},), verbose=False)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(path), str(OUT / "model.int8.onnx"), weight_type=QuantType.QInt8)

    layers = ["stem", "blocks.0", "blocks.1", "blocks.2", "pool", "fc"]
    # onnxruntime's quantizer drops the dynamo exporter's module metadata on the nodes it rewrites
    # (here the Linear), but keeps value names: select the int8 graph's values by the names that the
    # float graph maps the modules to
    values = OnnxModel(path).modules()
    for tag, file, names in (("float32", path, layers), ("int8", OUT / "model.int8.onnx", [values[m] for m in layers])):
        cka = CKA(model, OnnxModel(file), model1_name="PyTorch", model2_name=f"ONNX {tag}",
                  model1_layers=layers, model2_layers=names, progress=False)
        result = cka.compare(test)
        print(f"PyTorch vs ONNX {tag}: diagonal", {k: round(float(v), 6) for k, v in zip(layers, np.diag(result.matrix))})
        cka.plot_results(save_path=str(OUT / f"onnx_{tag}.png"), title=f"PyTorch vs ONNX {tag} (digits, n={result.n_examples})")

    # The dynamo exporter folds each BatchNorm into its Conv and keeps no conv value: asking for one
    # is an error that says so, rather than a different tensor under the conv's name.
    try:
        CKA(model, OnnxModel(path), model1_layers=["blocks.0.conv1"], model2_layers=["blocks.0.conv1"])
    except OnnxMappingError as error:
        print(error)
    print(f"heatmaps written to {OUT}/onnx_float32.png and {OUT}/onnx_int8.png")


if __name__ == "__main__":
    main()
