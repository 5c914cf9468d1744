"""Tiny models for the frontend tests: a residual CNN (BatchNorm, a shared ReLU called twice), a
small transformer taking Hugging Face-style keyword inputs, modules with tuple/dict outputs, and a
model whose forward order differs from its definition order."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's BasicBlock in miniature: one ``relu`` module called twice per forward."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class ResidualCNN(nn.Module):
    """Stem, two stages of residual blocks (``layer1.0`` ...), pooling, a classifier."""

    def __init__(self, channels: int = 8, blocks: tuple[int, int] = (2, 1), classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.layer1 = nn.Sequential(*[BasicBlock(channels) for _ in range(blocks[0])])
        self.layer2 = nn.Sequential(*[BasicBlock(channels) for _ in range(blocks[1])])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.conv1(x)))
        return self.fc(self.pool(x).flatten(1))


class TinyTransformer(nn.Module):
    """Token embedding, a ModuleList of encoder layers, Hugging Face-style call and output:
    ``model(input_ids=..., attention_mask=...)`` returns a dict with ``last_hidden_state``."""

    def __init__(self, vocab: int = 20, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(
            [nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        x = self.embed(input_ids)
        padding = None if attention_mask is None else attention_mask == 0
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        return {"last_hidden_state": self.norm(x), "pooled": x.mean(1)}


class FakeModelOutput(OrderedDict):
    """Stands in for transformers' ``ModelOutput`` (an OrderedDict of the non-None fields)."""


class TupleOut(nn.Module):
    """Returns ``(features, aux)`` like an RNN or attention module."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.linear(x)
        return y, -y.sum(1)


class DictOut(nn.Module):
    """Returns a ModelOutput-like mapping with ``None`` first (as HF drops unset fields, ours holds
    a non-tensor first) and the hidden state second."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> FakeModelOutput:
        y = self.linear(x)
        return FakeModelOutput(note="no tensor here", hidden=torch.tanh(y), logits=y)


class MultiOutputNet(nn.Module):
    """Sequential use of a tuple-output and a dict-output module."""

    def __init__(self) -> None:
        super().__init__()
        self.tuple_layer = TupleOut(6, 7)
        self.dict_layer = DictOut(7, 5)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.tuple_layer(x)
        return self.head(self.dropout(self.dict_layer(y)["hidden"]))


class ReorderedNet(nn.Module):
    """Defines ``late`` before ``early`` but runs ``early`` first: hook firing order differs from
    ``named_modules()`` order (torch_cka's label/row mismatch)."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(8, 4)
        self.early = nn.Linear(6, 8)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(torch.tanh(self.early(x)))


def mlp(widths: tuple[int, ...] = (6, 12, 10, 4), seed: int = 0) -> nn.Sequential:
    """Linear/Tanh stack (deterministic given ``seed``)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])
