"""Loaders for a comparison: pairing the batches of two loaders, and saying what data they hold.

:func:`paired` turns one loader (feeding both sides) or two (model2 sees the second) into pairs of
batches and refuses loaders that end at different batches. :func:`describe_data` is what a result
records about its data: a caller's name (the CLI's data spec) or the data set's class and length,
batch size and sampler — never an object's repr, which may hold a memory address.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["describe_data", "length", "paired", "torch_cka_label"]

_END = object()


def paired(batches1: Iterable[Any], loader2: Iterable[Any] | None) -> Iterable[tuple[Any, Any]]:
    """``(batch1, batch2)`` pairs; without ``loader2`` each batch is paired with itself (one iteration
    of the loader feeds both sides). Loaders that end at different batches are an error."""
    if loader2 is None:
        for batch in batches1:
            yield batch, batch
        return
    batches2 = iter(loader2)
    index = 0
    for index, batch1 in enumerate(batches1, start=1):
        batch2 = next(batches2, _END)
        if batch2 is _END:
            raise ValueError(
                f"dataloader2 ended after {index - 1} batches but dataloader1 has more; both must yield the same "
                f"number of batches."
            )
        yield batch1, batch2
    if next(batches2, _END) is not _END:
        raise ValueError(
            f"dataloader2 has more batches than dataloader1 ({index}); both must yield the same number of batches."
        )


def length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def describe_data(loader: Any, name: str | None = None) -> str:
    """What identifies a loader's data in a result's settings: ``name`` if given (the CLI's data spec),
    else the data set's class and length, the batch size and the sampler (``"TensorDataset of 48
    examples, batch size 16, SequentialSampler"``), or the loader's type and length (``"list of 3
    batches"``). Never an object's repr, which may hold a memory address."""
    if name is not None:
        return str(name)
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        size = length(loader)
        return type(loader).__name__ + (f" of {size} batches" if size is not None else "")
    size = length(dataset)
    parts = [type(dataset).__name__ + (f" of {size} examples" if size is not None else "")]
    if getattr(loader, "batch_size", None) is not None:
        parts.append(f"batch size {loader.batch_size}")
    if getattr(loader, "drop_last", False):
        parts.append("drop_last")
    if getattr(loader, "sampler", None) is not None:
        parts.append(type(loader.sampler).__name__)
    return ", ".join(parts)


def torch_cka_label(loader: Any) -> str:
    """torch_cka's dataset label, kept for :meth:`CKA.export`: the first line of the dataset's repr."""
    dataset = getattr(loader, "dataset", None)
    return repr(dataset).split("\n")[0] if dataset is not None else type(loader).__name__
