"""The ``cka`` command line: ``cka demo`` and ``cka compare``.

Errors a user can fix (an unknown model spec, a missing file, mismatched data) print one line that
says what and how, and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main"]

EXIT_USAGE = 2


class CLIError(Exception):
    """An error in what the user asked for: printed as one line, exit status 2."""


def _compare_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two models (or one model with itself) layer by layer",
        description=(
            "Minibatch CKA between every selected layer of MODEL1 and of MODEL2 (default: MODEL1 again), "
            "over the examples of DATA. Writes the result file and a heatmap into --out."
        ),
        epilog=(
            "MODEL: path/to/models.py:make_model (a factory returning a torch.nn.Module), torchvision:resnet18, "
            "timm:NAME (random init unless --weights), model.onnx, model.pt2 (torch.export), model.pt (TorchScript). "
            "DATA: an image folder (class subfolders), a .npy/.npz array file, or synthetic:3x224x224 (seeded)."
        ),
    )
    p.add_argument("model1", metavar="MODEL1", help="the first model (see below)")
    p.add_argument("model2", metavar="MODEL2", nargs="?", help="the second model (default: MODEL1)")
    p.add_argument("--data", required=False, help="the examples both models see (see below)")
    p.add_argument("--data2", help="a second data set for MODEL2 (paired with --data batch by batch)")
    p.add_argument("--layers1", nargs="+", metavar="PAT", help="layers of MODEL1: names or glob patterns")
    p.add_argument("--layers2", nargs="+", metavar="PAT", help="layers of MODEL2: names or glob patterns")
    p.add_argument("--batch-size", type=int, default=128, help="examples per batch (default 128)")
    p.add_argument("--limit", type=int, help="use at most N examples (synthetic data: N examples, default 512)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models run (default cpu)")
    p.add_argument("--out", default="cka-out", help="output folder (default ./cka-out)")
    p.add_argument("--format", default="json", choices=["json", "npz", "csv"], help="result file format")
    p.add_argument("--weights", help="torchvision/timm weights already cached locally (e.g. DEFAULT); never downloads")
    p.add_argument("--image-size", type=int, help="resize images of an image folder to this size (default: the first image's)")
    p.add_argument("--kernel", default="linear", choices=["linear", "rbf"])
    p.add_argument("--list-layers", action="store_true", help="print the selectable layer names of the model(s) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cka",
        description="Compare neural networks by the similarity of their representations (minibatch CKA).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train two small CNNs on scikit-learn's digits and compare them (PyTorch, ONNX, int8, noisy data)",
        description=(
            "Trains a shallow and a deep CNN on scikit-learn's handwritten digits (no download), exports the "
            "shallow one to ONNX and an int8-quantized copy, and compares: shallow vs deep, PyTorch vs ONNX, "
            "ONNX vs int8, clean vs noisy digits. Writes heatmaps (PNG) and results (JSON) into --out."
        ),
    )
    demo.add_argument("--out", default="cka-demo-out", help="output folder (default ./cka-demo-out)")
    demo.add_argument("--fast", action="store_true", help="train briefly (for tests)")
    _compare_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "demo":
            from cka.demo import run_demo

            run_demo(Path(args.out), fast=args.fast)
        else:
            _run_compare(args)
    except (CLIError, FileNotFoundError, ValueError, TypeError, ImportError, KeyError) as error:
        message = str(error).strip().replace("\n", " ") or type(error).__name__
        print(f"cka: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _run_compare(args: argparse.Namespace) -> None:
    from cka.specs import is_torchscript_output, load_data, load_model

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be positive; got {args.batch_size}.")
    model1 = load_model(args.model1, weights=args.weights)
    model2 = load_model(args.model2, weights=args.weights) if args.model2 else model1
    if args.list_layers:
        for label, model in (("MODEL1", model1), ("MODEL2", model2)) if args.model2 else (("MODEL1", model1),):
            print(f"{label} ({_describe(model)}):")
            for name in _selectable_layers(model):
                print(f"  {name}")
        return
    for spec, model, layers in ((args.model1, model1, args.layers1), (args.model2, model2, args.layers2)):
        if is_torchscript_output(model) and layers and list(layers) != ["output"]:
            raise CLIError(
                f"{spec} is TorchScript, whose inner layers cannot be hooked: only its 'output' can be compared. "
                f"Save the model with torch.export.save (a .pt2 file) to compare inner layers."
            )
    if not args.data:
        raise CLIError("--data is required (an image folder, a .npy/.npz file or synthetic:CxHxW).")
    data1 = load_data(args.data, limit=args.limit, image_size=args.image_size)
    data2 = load_data(args.data2, limit=args.limit, image_size=args.image_size) if args.data2 else None
    if data2 is not None and len(data2) != len(data1):
        raise CLIError(
            f"--data has {len(data1)} examples but --data2 has {len(data2)}; the two data sets are paired "
            f"example by example, so they must be the same size (use --limit)."
        )
    import torch

    from cka.frontends.torch import CKA

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu.")
    loader1 = torch.utils.data.DataLoader(data1, batch_size=args.batch_size)
    loader2 = torch.utils.data.DataLoader(data2, batch_size=args.batch_size) if data2 is not None else None
    # one model given: it is compared with itself, on the same layers unless --layers2 says otherwise
    layers2 = args.layers2 if args.model2 is not None or args.layers2 else args.layers1
    comparison = CKA(
        model1, model2,
        model1_name=Path(args.model1).name, model2_name=Path(args.model2 or args.model1).name,
        model1_layers=args.layers1, model2_layers=layers2,
        device=args.device, kernel=args.kernel, progress=not args.no_progress,
    )
    result = comparison.compare(loader1, loader2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_path = result.save(out / f"cka.{args.format}")
    figure_path = out / "cka.png"
    result.save_plot(figure_path)
    print(_summary(result))
    print(f"wrote {result_path} and {figure_path}")


def _is_onnx(model: Any) -> bool:
    return type(model).__name__ == "OnnxModel"


def _describe(model: Any) -> str:
    return getattr(model, "name", None) or type(model).__name__


def _selectable_layers(model: Any) -> list[str]:
    if _is_onnx(model):
        return [value.name for value in model.layers()]
    return [name for name, _ in model.named_modules() if name]


def _summary(result: Any) -> str:
    """The diagonal when both sides have the same layers, else each model1 layer's best match."""
    import numpy as np

    lines = [f"CKA ({result.model1_name} x {result.model2_name}, {result.n_examples} examples):"]
    matrix = result.matrix
    if list(result.model1_layers) == list(result.model2_layers):
        for i, name in enumerate(result.model1_layers):
            lines.append(f"  {name:<40} {matrix[i, i]:.4f}")
    else:
        for i, name in enumerate(result.model1_layers):
            row = matrix[i]
            if np.isnan(row).all():
                lines.append(f"  {name:<40} NaN (constant layer)")
                continue
            j = int(np.nanargmax(row))
            lines.append(f"  {name:<40} best match {result.model2_layers[j]} ({row[j]:.4f})")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
