"""The ``cka`` command line: ``cka demo`` and ``cka compare``.

Every failure goes through one boundary, :func:`main`: a problem with what was asked for (an
unknown model spec, a missing or damaged file, data the model rejects, a model file refused because
loading it would run code, a factory that raises) prints one line that names the problem and the
fix and exits with status 2; Ctrl-C prints one line and exits with 130; a closed pipe (``| head``)
ends quietly. ``--traceback`` shows the full traceback instead, for bug reports.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class CLIError(Exception):
    """An error in what the user asked for: printed as one line, exit status 2."""


#: Standard exceptions whose message is written for the user (we raise them with a message that names
#: the problem and the fix), besides cka's own. Anything else is shown with its type name.
_EXPLAINED = (CLIError, ValueError, TypeError, OSError, ImportError, LookupError)


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
            "timm:NAME (random init unless --weights), hf:NAME_OR_PATH (a Hugging Face model from a local folder or "
            "the local cache; never downloaded), model.onnx, model.pt2 (torch.export), model.pt (TorchScript). "
            "A models file is Python code: cka imports it and calls the factory, as `python` would, so name only "
            "files you trust. Model files are data: pickled models are never loaded, and a .pt2 file is checked "
            "before loading and refused if loading it would run code from it (see --trust-code). "
            "DATA: an image folder (class subfolders), a .npy/.npz array file, synthetic:3x224x224 (seeded), or "
            "lines.txt (one text per line, for hf: models, tokenized by each model's own tokenizer)."
        ),
    )
    p.add_argument("model1", metavar="MODEL1", help="the first model (see below)")
    p.add_argument("model2", metavar="MODEL2", nargs="?", help="the second model (default: MODEL1)")
    p.add_argument("--data", required=False, help="the examples both models see (see below)")
    p.add_argument("--data2", help="a second data set for MODEL2 (paired with --data batch by batch)")
    p.add_argument("--layers1", nargs="+", metavar="PAT", help="layers of MODEL1: names or glob patterns")
    p.add_argument("--layers2", nargs="+", metavar="PAT", help="layers of MODEL2: names or glob patterns")
    p.add_argument("--batch-size", type=int, default=128, help="examples per batch (default 128)")
    p.add_argument(
        "--limit",
        type=int,
        help="use at most N examples (an image folder: N sampled across its classes, "
        "seeded; synthetic data: N examples, default 512)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models run (default cpu)")
    p.add_argument("--out", default="cka-out", help="output folder (default ./cka-out)")
    p.add_argument("--format", default="json", choices=["json", "npz", "csv"], help="result file format")
    p.add_argument("--weights", help="torchvision/timm weights already cached locally (e.g. DEFAULT); never downloads")
    p.add_argument(
        "--image-size", type=int, help="resize images of an image folder to this size (default: the first image's)"
    )
    p.add_argument("--kernel", default="linear", choices=["linear", "rbf"])
    p.add_argument(
        "--tokens",
        choices=["mean", "first", "last", "all"],
        help="(batch, tokens, dim) layers: one example per sequence (the mean, first or last of its real tokens) "
        "or every real token an example (all); padding never counts (default for text data: mean)",
    )
    p.add_argument("--max-length", type=int, help="text data: truncate each line to this many tokens")
    p.add_argument(
        "--list-layers", action="store_true", help="print the selectable layer names of the model(s) and exit"
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="N bootstrap replicates over batches: a confidence interval for every cell (e.g. 1000)",
    )
    p.add_argument(
        "--permutations",
        type=int,
        default=0,
        metavar="N",
        help="N permutations of each batch's examples: a p-value, null mean and calibrated score for every cell, "
        "and for each layer's best match (e.g. 1000); the heatmap hatches cells with p > 1 - confidence",
    )
    p.add_argument("--confidence", type=float, default=0.95, help="coverage of the intervals (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and permutation draws (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="load .pt2 files as torch.export.load does, even when they hold pickled objects, compiled libraries "
        "or Python that runs while loading: only for files from someone you trust (without it such a file is "
        "refused, naming what it holds)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cka",
        description="Compare neural networks by the similarity of their representations (minibatch CKA).",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="on an error, show the full traceback (for bug reports)"
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
    """Run the command line; returns the exit status. The one place where errors become messages."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "demo":
            from cka.demo import run_demo

            _check_output_folder(Path(args.out))
            run_demo(Path(args.out), fast=args.fast)
        else:
            _run_compare(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the boundary
    except KeyboardInterrupt:
        if args.traceback:
            raise
        print("cka: interrupted (Ctrl-C); no result was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader (`| head`) has gone: nothing more can be shown; stop quietly, as `head` expects
        _silence_stdout()
        return 0
    except Exception as error:
        if args.traceback:
            raise
        print(f"cka: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _one_line(error: BaseException) -> str:
    """The message on one line; foreign exceptions keep their type name and first line."""
    module = type(error).__module__
    if module.split(".")[0] == "cka" or (isinstance(error, _EXPLAINED) and module == "builtins"):
        text = " ".join(str(error).split())
        return text or type(error).__name__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return f"{type(error).__name__}: {first} (rerun with cka --traceback for the details)".replace(":  (", " (")


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# ------------------------------------------------------------------------------------------------
# cka compare
# ------------------------------------------------------------------------------------------------


def _run_compare(args: argparse.Namespace) -> None:
    from cka.specs import load_data, load_model

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be positive; got {args.batch_size}.")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be positive; got {args.limit}.")
    if not args.list_layers:
        if not args.data:
            raise CLIError("--data is required (an image folder, a .npy/.npz file, synthetic:CxHxW or lines.txt).")
        _check_output_folder(Path(args.out), f"cka.{args.format}", "cka.png")
    loaded1 = load_model(args.model1, weights=args.weights, trust_code=args.trust_code)
    loaded2 = load_model(args.model2, weights=args.weights, trust_code=args.trust_code) if args.model2 else loaded1
    if args.list_layers:
        _list_layers([loaded1, loaded2] if args.model2 else [loaded1])
        return
    for loaded, layers in ((loaded1, args.layers1), (loaded2, args.layers2)):
        if loaded.kind == "torchscript" and layers and list(layers) != ["output"]:
            raise CLIError(
                f"{loaded.spec} is TorchScript, whose inner layers cannot be hooked: only its 'output' can be compared. "
                f"Save the model with torch.export.save (a .pt2 file) to compare inner layers."
            )
    import torch

    from cka import CKA

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu.")
    if args.max_length is not None and args.max_length < 1:
        raise CLIError(f"--max-length must be a positive number of tokens; got {args.max_length}.")
    if _is_text(args.data):
        loader1, loader2 = _text_loaders(args, loaded1, loaded2)
        args.tokens = args.tokens or "mean"  # one example per line, padding excluded
    else:
        loader1, loader2 = _array_loaders(args, loaded1, loaded2, load_data)
    # one model given: it is compared with itself, on the same layers unless --layers2 says otherwise
    layers1 = args.layers1 if args.layers1 else loaded1.default_layers
    if args.model2 is not None or args.layers2:
        layers2 = args.layers2 if args.layers2 else loaded2.default_layers
    else:
        layers2 = layers1
    comparison = CKA(
        loaded1.model,
        loaded2.model,
        model1_name=Path(args.model1).name,
        model2_name=Path(args.model2 or args.model1).name,
        model1_layers=layers1,
        model2_layers=layers2,
        device=args.device,
        kernel=args.kernel,
        progress=not args.no_progress,
        tokens=args.tokens,
    )
    label1 = _data_label(args.data, args)
    label2 = _data_label(args.data2, args) if args.data2 else label1
    result = comparison.compare(
        loader1,
        loader2,
        dataset1_name=label1,
        dataset2_name=label2,
        bootstrap=args.bootstrap,
        permutations=args.permutations,
        confidence=args.confidence,
        seed=args.seed,
    )
    out = Path(args.out)
    result_path = result.save(out / f"cka.{args.format}")
    figure_path = out / "cka.png"
    result.save_plot(figure_path, **({"alpha": 1 - args.confidence} if result.p_value is not None else {}))
    print(_summary(result))
    print(f"wrote {result_path} and {figure_path}")


def _data_label(spec: str, args: argparse.Namespace) -> str:
    """What identifies the data in the result: the spec and the options that choose the examples."""
    parts = [spec]
    if args.limit is not None:
        parts.append(f"limit {args.limit}")
    if args.image_size is not None:
        parts.append(f"image size {args.image_size}")
    if args.max_length is not None:
        parts.append(f"max length {args.max_length}")
    return ", ".join(parts)


def _array_loaders(args: argparse.Namespace, loaded1: Any, loaded2: Any, load_data: Any) -> tuple[Any, Any]:
    """Examples from array data (--data, --data2) as DataLoaders, after checking each model takes them."""
    import torch

    if args.max_length is not None:
        raise CLIError("--max-length applies to text data (--data lines.txt) only.")
    data1 = load_data(args.data, limit=args.limit, image_size=args.image_size)
    data2 = load_data(args.data2, limit=args.limit, image_size=args.image_size) if args.data2 else None
    if data2 is not None and len(data2) != len(data1):
        raise CLIError(
            f"--data has {len(data1)} examples but --data2 has {len(data2)}; the two data sets are paired "
            f"example by example, so they must be the same size (use --limit)."
        )
    for loaded, data, option in (
        (loaded1, data1, "--data"),
        (loaded2, data2 if data2 is not None else data1, "--data2" if data2 is not None else "--data"),
    ):
        if getattr(loaded.model, "main_input_name", None) == "input_ids":  # a Hugging Face text model
            raise CLIError(
                f"{loaded.spec} takes token ids: give it text data ({option} lines.txt, one text per line), which "
                f"its tokenizer turns into tokens; {getattr(args, option.lstrip('-'))} is not text."
            )
        _check_model_takes_data(loaded, data, args.batch_size, option, getattr(args, option.lstrip("-")))
    loader1 = torch.utils.data.DataLoader(data1, batch_size=args.batch_size)
    loader2 = torch.utils.data.DataLoader(data2, batch_size=args.batch_size) if data2 is not None else None
    return loader1, loader2


def _is_text(spec: str | None) -> bool:
    return spec is not None and spec.lower().endswith(".txt")


def _text_loaders(args: argparse.Namespace, loaded1: Any, loaded2: Any) -> tuple[Any, Any]:
    """Text data: the lines of --data (and --data2) as batches tokenized by each model's own tokenizer,
    the same lines in the same batches on both sides; one loader when both sides share it."""
    from cka.frontends.hf import TextBatches, load_local_tokenizer, read_lines

    if loaded1.kind != "hf" or loaded2.kind != "hf":
        others = " and ".join(dict.fromkeys(m.spec for m in (loaded1, loaded2) if m.kind != "hf"))
        raise CLIError(
            f"text data ({args.data}) needs hf:NAME_OR_PATH models, whose tokenizer turns the lines into tokens; "
            f"{others} is not one."
        )
    if args.data2 is not None and not _is_text(args.data2):
        raise CLIError(f"--data is text but --data2 ({args.data2}) is not; give both as .txt files.")
    lines1 = read_lines(args.data, args.limit)
    lines2 = read_lines(args.data2, args.limit) if args.data2 else lines1
    if len(lines2) != len(lines1):
        raise CLIError(
            f"--data has {len(lines1)} lines but --data2 has {len(lines2)}; they are paired line by line (use --limit)."
        )
    specs = list(dict.fromkeys(m.spec for m in (loaded1, loaded2)))
    tokenizers = [load_local_tokenizer(spec.partition(":")[2]) for spec in specs]
    loader1 = TextBatches(lines1, tokenizers[0], args.batch_size, args.max_length)
    if len(tokenizers) == 1 and lines2 is lines1:
        return loader1, None
    return loader1, TextBatches(lines2, tokenizers[-1], args.batch_size, args.max_length)


def _check_output_folder(out: Path, *files: str) -> None:
    """Before any work: ``out`` must be (or become) a folder we can write, and the files not folders."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file, not a folder; choose a folder (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".cka-write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise CLIError(f"cannot write into --out {out} ({reason}); choose a folder you can write to.") from None
    for name in files:
        if (out / name).is_dir():
            raise CLIError(
                f"{out / name} is a folder, but the result is written there; remove it or choose another --out."
            )


def _check_model_takes_data(loaded: Any, dataset: Any, batch_size: int, option: str, spec: str) -> None:
    """Run the model once on a small batch of the data, so a mismatch is named before the run.

    A ``torch.export`` program records its input shape: a static batch size and the example shape
    are checked against it first, with the fix in the message.
    """
    import torch

    if not isinstance(loaded.model, torch.nn.Module) or len(dataset) == 0:
        return
    example = dataset[0][0] if isinstance(dataset[0], (tuple, list)) else dataset[0]
    shape = loaded.input_shape
    if shape is not None:
        if len(shape) - 1 != example.dim() or any(
            s is not None and s != e for s, e in zip(shape[1:], example.shape, strict=True)
        ):
            wanted = ", ".join("any" if s is None else str(s) for s in shape[1:])
            raise CLIError(
                f"{loaded.spec} takes examples of shape ({wanted}) but {option} {spec} has examples of shape "
                f"{tuple(example.shape)}; give matching data (or --image-size)."
            )
        static = loaded.static_batch
        if static is not None and (batch_size != static or len(dataset) % static):
            raise CLIError(
                f"{loaded.spec} was exported with a static batch size of {static}, so every batch must hold exactly "
                f"{static} examples (here: --batch-size {batch_size}, {len(dataset)} examples); re-export it with "
                f"dynamic_shapes=({{0: torch.export.Dim('batch')}},), or pass --batch-size {static} and a --limit "
                f"that is a multiple of {static}."
            )
    n = min(len(dataset), batch_size, max(2, loaded.min_batch))
    batch = torch.stack([dataset[i][0] if isinstance(dataset[i], (tuple, list)) else dataset[i] for i in range(n)])
    try:
        with torch.inference_mode():
            loaded.model(batch)
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise CLIError(
            f"{loaded.spec} fails on the examples of {option} {spec} (a batch of shape {tuple(batch.shape)}): "
            f"{type(error).__name__}: {lines[0] if lines else ''}; give data whose examples have the shape and "
            f"type the model expects (see --image-size), or check the model."
        ) from None


def _list_layers(models: list[Any]) -> None:
    for label, loaded in zip(("MODEL1", "MODEL2"), models, strict=False):
        model = loaded.model
        print(f"{label} ({getattr(model, 'name', None) or loaded.spec}):")
        if type(model).__name__ == "OnnxModel":
            selectable = model.available_layers()  # module calls first, then raw ONNX values
            heading = {
                "module": "  PyTorch module names (mapped to their ONNX values):",
                "value": "  ONNX values (also selectable):",
            }
            kind = None
            for layer in selectable:
                if layer.kind != kind:
                    kind = layer.kind
                    print(heading[kind])
                print(f"  {layer.name}  -> {layer.value}" if kind == "module" else f"  {layer.name}")
            continue
        from cka.frontends.hf import hidden_state_names, is_hf_model

        for name, _ in model.named_modules():
            if name:
                print(f"  {name}")
        if is_hf_model(model):  # read from output_hidden_states=True, not hooked
            print("  hidden states (from output_hidden_states=True; also 'hidden_states' for all):")
            for name in hidden_state_names(model):
                print(f"  {name}")


def _summary(result: Any) -> str:
    """The diagonal when both sides have the same layers, else each model1 layer's best match."""
    import numpy as np

    lines = [f"CKA ({result.model1_name} x {result.model2_name}, {result.n_examples} examples):"]
    lines += _statistics_legend(result)
    matrix = result.matrix
    if list(result.model1_layers) == list(result.model2_layers):
        for i, name in enumerate(result.model1_layers):
            lines.append(f"  {name:<40} {matrix[i, i]:.4f}{_cell_statistics(result, i, i)}")
    else:
        for i, name in enumerate(result.model1_layers):
            row = matrix[i]
            if np.isnan(row).all():
                lines.append(f"  {name:<40} NaN (constant layer)")
                continue
            j = int(np.nanargmax(row))
            best = "" if result.p_value_best_row is None else f"  p(best) = {result.p_value_best_row[i]:.3g}"
            lines.append(
                f"  {name:<40} best match {result.model2_layers[j]} ({row[j]:.4f}){_cell_statistics(result, i, j)}{best}"
            )
    return "\n".join(lines)


def _statistics_legend(result: Any) -> list[str]:
    """One line saying what the intervals and p-values next to the values are (none without them)."""
    settings, parts = result.settings, []
    if result.ci_low is not None:
        confidence = 100 * settings.get("confidence", 0.95)
        parts.append(f"[low, high]: {confidence:g}% interval (bootstrap over {settings.get('n_batches')} batches)")
    if result.p_value is not None:
        best = "" if list(result.model1_layers) == list(result.model2_layers) else "; p(best) allows for the search"
        parts.append(f"p: permutation p-value ({settings.get('permutations')} permutations{best})")
    return [f"  {'; '.join(parts)}"] if parts else []


def _cell_statistics(result: Any, i: int, j: int) -> str:
    """``  [low, high]  p = ...`` for cell ``(i, j)``, as far as the result has them."""
    text = ""
    if result.ci_low is not None:
        text += f"  [{result.ci_low[i, j]:.4f}, {result.ci_high[i, j]:.4f}]"
    if result.p_value is not None:
        text += f"  p = {result.p_value[i, j]:.3g}"
    return text


if __name__ == "__main__":
    raise SystemExit(main())
