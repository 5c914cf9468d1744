"""The functional API on real data: two small networks trained on scikit-learn's handwritten digits
(1797 8x8 images, shipped inside scikit-learn: no download), compared layer by layer.

Run: ``python examples/functional_demo.py`` (or ``make demo``).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

import cka


def train_mlp(widths: list[int], x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 300) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for d_in, d_out in zip([64, *widths], widths):
        layers += [torch.nn.Linear(d_in, d_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(widths[-1], 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def hidden_features(model: torch.nn.Sequential, x: torch.Tensor) -> list[np.ndarray]:
    """The output of every ReLU, as numpy arrays (the functional API takes any array type)."""
    out, feats = x, []
    with torch.no_grad():
        for layer in model:
            out = layer(out)
            if isinstance(layer, torch.nn.ReLU):
                feats.append(out.numpy().astype(np.float64))
    return feats


def main() -> None:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    train, test = slice(0, 1200), slice(1200, None)
    shallow = train_mlp([64, 32], x[train], y[train], seed=0)
    deep = train_mlp([128, 64, 64, 32], x[train], y[train], seed=1)
    for name, model in (("shallow", shallow), ("deep", deep)):
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        print(f"{name} MLP test accuracy: {accuracy:.3f}")

    feats_shallow, feats_deep = hidden_features(shallow, x[test]), hidden_features(deep, x[test])
    print("\nlinear CKA, full batch (597 test digits): shallow layer x deep layer")
    for i, a in enumerate(feats_shallow):
        print(f"  shallow.relu{i}: " + "  ".join(f"{float(cka.cka(a, b)):.3f}" for b in feats_deep))
    print("\ndebiased CKA (unbiased HSIC), full batch")
    for i, a in enumerate(feats_shallow):
        print(f"  shallow.relu{i}: " + "  ".join(f"{float(cka.cka(a, b, unbiased=True)):.3f}" for b in feats_deep))
    batches = range(0, len(feats_shallow[0]), 128)
    matrix = cka.minibatch_cka_matrix(
        ([f[i:i + 128] for f in feats_shallow] for i in batches), ([f[i:i + 128] for f in feats_deep] for i in batches)
    )
    print("\nminibatch CKA (batches of 128, Nguyen et al. 2021)")
    print(np.array2string(np.asarray(matrix), precision=3))
    print(f"\nRBF CKA (sigma = 0.8 x median distance), last hidden layers: "
          f"{float(cka.cka(feats_shallow[-1], feats_deep[-1], kernel='rbf', sigma_frac=0.8)):.3f}")


if __name__ == "__main__":
    main()
