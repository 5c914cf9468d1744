"""Small PyTorch models for the ONNX frontend tests and benchmark, and their exports.

A ResNet-like CNN (nested ``nn.Sequential``, residual adds, BatchNorm with non-trivial statistics, a
strided block with a ``downsample`` branch) and a small transformer encoder (attention, LayerNorm, GELU
MLP, and an activation module called twice per forward).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; ``relu`` runs twice per call."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetLike(nn.Module):
    """A CIFAR-style ResNet in miniature: stem, two stages of two blocks, pool, fc."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def set_batchnorm_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm statistics and affine parameters far from the identity, as a trained model
    has, so that a value with the BatchNorm folded in differs from one without."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                m.weight.copy_(0.5 + torch.rand(c, generator=generator))
                m.bias.copy_(0.3 * torch.randn(c, generator=generator))
    return model


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyEncoder(nn.Module):
    """Pre-norm transformer encoder on ``(n, tokens, features)``; ``act`` runs twice per forward."""

    def __init__(self, features: int = 8, dim: int = 16, heads: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.act = nn.Tanh()
        self.layers = nn.ModuleList([EncoderLayer(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(2.0 * self.act(self.embed(x)))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def resnet_like(seed: int = 0, width: int = 8) -> ResNetLike:
    torch.manual_seed(seed)
    return set_batchnorm_statistics(ResNetLike(width), seed).eval()


def tiny_encoder(seed: int = 0) -> TinyEncoder:
    torch.manual_seed(seed)
    return TinyEncoder().eval()


def export(model: nn.Module, example: torch.Tensor, path: Path, exporter: str, **kwargs) -> Path:
    """Export with the TorchScript (``"torchscript"``, ``dynamo=False``) or the ``"dynamo"`` exporter,
    with a dynamic batch axis; the dynamo exporter writes its weights to ``<path>.data``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=["x"],
                output_names=["out"],
                dynamic_axes={"x": {0: "n"}, "out": {0: "n"}},
                **kwargs,
            )
        else:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                input_names=["x"],
                dynamic_shapes=({0: torch.export.Dim("n")},),
                verbose=False,
                **kwargs,
            )
    return path
