"""What the ONNX frontend reports: its exception, its warnings and the texts they quote.

Kept apart from the code that raises them so that every module of the package (and a user catching
them) imports them from one place without importing onnxruntime or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "INSTALL_HINT",
    "REMEDIES",
    "MappingProblem",
    "OnnxMappingError",
    "OnnxRuntimeSetupWarning",
    "UncheckedMappingWarning",
]

INSTALL_HINT = 'pip install "cka[onnx]" (CPU) or pip install "cka[onnx-gpu]" (CUDA), never both'

#: How to avoid fused values; quoted in docstrings and in every mapping error.
REMEDIES = (
    "Remedies: (1) compare at fusion-safe boundaries, i.e. activations (e.g. 'layer1.0.relu') and block "
    "outputs (e.g. 'layer1.0'), which the exporters keep as values; or (2) re-export a copy for analysis "
    "without fusion: torch.onnx.export(..., dynamo=False, do_constant_folding=False) or "
    "torch.onnx.export(..., dynamo=True, optimize=False)."
)

#: Problem kinds after which :data:`REMEDIES` helps (the module exists but its value is not its own).
_REMEDIABLE = ("fused", "unmapped", "mismatched")


class OnnxRuntimeSetupWarning(UserWarning):
    """onnxruntime is installed or set up so that it silently runs elsewhere than asked (e.g. on CPU)."""


class UncheckedMappingWarning(UserWarning):
    """PyTorch module names were mapped to ONNX values without the PyTorch model to check them."""


@dataclass(frozen=True)
class MappingProblem:
    """Why one selected layer cannot be read from the graph: ``kind`` is ``"unknown"``, ``"subgraph"``,
    ``"unmapped"``, ``"fused"`` or ``"mismatched"``; ``reason`` says why, in a sentence."""

    layer: str
    kind: str
    reason: str


class OnnxMappingError(ValueError):
    """Selected layers that the graph does not hold as asked; ``.problems`` lists each with its reason."""

    def __init__(self, problems: Sequence[MappingProblem], model: str, remedies: bool = True) -> None:
        self.problems = list(problems)
        lines = [f"{model}: {len(self.problems)} selected layer(s) cannot be read from the ONNX graph:"]
        lines += [f"  - {p.layer!r} ({p.kind}): {p.reason}" for p in self.problems]
        if remedies and any(p.kind in _REMEDIABLE for p in self.problems):
            lines.append(REMEDIES)
        super().__init__("\n".join(lines))
