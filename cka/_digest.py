"""What identifies the data of a run: a short digest of each batch as it is drawn, for checkpoints.

A checkpoint's sums are only meaningful for the batches that made them, so a resumed run checks that
it draws the same batches (same examples, order and batch size) before it adds anything.
:func:`batch_digest` walks a batch (tensors, arrays, nested tuples, lists and dicts, scalars) in
order and hashes each array's dtype, shape and bytes with SHA-256; the first 8 bytes of the result
(a uint64) are the batch's digest. The number of examples (the first axis of the first array) is
kept beside it, for error messages.

Cost: CPU arrays are hashed where they are (about 1-2 GB/s on one core; only when checkpointing is
on). Arrays on a GPU are not copied to the host: a CUDA tensor gets an on-device checksum (two sums
of its 32-bit words, one of them position-weighted, modulo a prime; no host synchronisation), read
with all others pending at the next checkpoint in one transfer. JAX arrays are read through the host.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["DataRecord", "batch_digest", "device_checksum"]

#: A prime below 2**31: word values and positions are reduced modulo it, so no int64 sum overflows.
_PRIME = 2_147_483_629
#: Words per chunk of the device checksum (bounds its int64 temporaries to 32 MB).
_CHUNK = 1 << 22


def device_checksum(tensor: Any) -> Any:
    r"""Two int64 numbers identifying a torch tensor's bytes, computed where the tensor is (no host sync).

    With :math:`w_i` the tensor's 32-bit words (bytes when its size is not a multiple of 4) and
    :math:`p` a prime below :math:`2^{31}`:

    .. math:: c_1 = \sum_i (w_i \bmod p) \bmod p,\qquad c_2 = \sum_i \big((w_i \bmod p)(i \bmod p + 1) \bmod p\big) \bmod p

    :math:`c_2` changes when words move (a shuffled batch), :math:`c_1` and :math:`c_2` together when
    any word changes. A checksum against accidents, not adversaries.

    Returns
    -------
    (2,) int64 tensor on the tensor's device.
    """
    import torch

    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    words = flat.view(torch.uint8)
    if words.numel() % 4 == 0:
        try:
            words = words.view(torch.int32)
        except RuntimeError:  # a storage offset that is not 4-byte aligned
            words = words.clone().view(torch.int32)
    total = torch.zeros(2, dtype=torch.int64, device=tensor.device)
    for start in range(0, words.numel(), _CHUNK):
        chunk = words[start : start + _CHUNK].to(torch.int64).remainder(_PRIME)
        weights = (
            torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=tensor.device).remainder(_PRIME) + 1
        )
        total += torch.stack([chunk.sum(), (chunk * weights).remainder(_PRIME).sum()])
        total = total.remainder(_PRIME)
    return total


def _on_accelerator(leaf: Any) -> bool:
    """Whether ``leaf`` is a torch tensor off the CPU (checksummed where it is, not copied to the host)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(leaf, torch.Tensor) and leaf.device.type not in ("cpu", "meta")


def _leaves(value: Any, path: str, out: list[tuple[str, Any]]) -> None:
    """The batch's leaves in order, each with its place in the structure."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _leaves(item, f"{path}[{key!r}]", out)
    elif isinstance(value, (tuple, list)):
        for k, item in enumerate(value):
            _leaves(item, f"{path}[{k}]", out)
    else:
        out.append((path, value))


def batch_digest(batch: Any) -> tuple[int, list[Any]]:
    """``(examples, parts)`` of one batch: the first axis of its first array (-1 if none), and per
    leaf either a 32-byte SHA-256 or a pending device checksum (a torch tensor), in order."""
    torch = sys.modules.get("torch")
    leaves: list[tuple[str, Any]] = []
    _leaves(batch, "", leaves)
    examples, parts = -1, list[Any]()
    for path, leaf in leaves:
        shape = getattr(leaf, "shape", None)
        if shape is not None and examples < 0 and len(shape) > 0:
            examples = int(shape[0])
        header = (
            f"{path}:{type(leaf).__name__}:{getattr(leaf, 'dtype', '')}:{tuple(shape) if shape is not None else ''};"
        )
        if _on_accelerator(leaf):
            parts.append((header.encode(), device_checksum(leaf)))
            continue
        digest = hashlib.sha256(header.encode())
        if torch is not None and isinstance(leaf, torch.Tensor):
            digest.update(memoryview(leaf.detach().resolve_conj().reshape(-1).contiguous().view(torch.uint8).numpy()))
        elif shape is not None and hasattr(leaf, "dtype"):
            array = np.asarray(leaf)
            if not array.dtype.hasobject:  # object arrays: shape and dtype only (their items' reprs may hold addresses)
                digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        elif isinstance(leaf, (str, bytes, int, float, complex, bool)) or leaf is None:
            digest.update(repr(leaf).encode())
        # other objects: their type is in the header (a repr could hold a memory address)
        parts.append(digest.digest())
    return examples, parts


class DataRecord:
    """The digests of the batches a run has drawn, in order (examples per batch and a uint64 digest).

    Device checksums stay pending on the device until :meth:`resolve`, which reads all of them in
    one transfer (at a checkpoint, where the run synchronises anyway).
    """

    def __init__(self, examples: Sequence[int] = (), digests: Sequence[int] = ()) -> None:
        self.examples = [int(e) for e in examples]
        self._digests: list[Any] = [int(d) for d in digests]

    def __len__(self) -> int:
        return len(self._digests)

    def append(self, batch1: Any, batch2: Any = None) -> None:
        """Record the next batch (the pair, when the two sides draw from two loaders)."""
        examples, parts = batch_digest(batch1)
        if batch2 is not None:
            parts = [*parts, b"|", *batch_digest(batch2)[1]]
        self.examples.append(examples)
        self._digests.append(parts)

    def digests(self) -> list[int]:
        """Every batch's digest as an int in ``[0, 2**64)``; resolves pending device checksums."""
        self.resolve()
        return list(self._digests)

    def resolve(self) -> None:
        pending = [p for d in self._digests if isinstance(d, list) for p in d if isinstance(p, tuple)]
        values: list[bytes] = []
        if pending:
            import torch

            by_device: dict[Any, list[Any]] = {}
            for _, checksum in pending:
                by_device.setdefault(checksum.device, []).append(checksum)
            read = {device: iter(torch.stack(sums).cpu().tolist()) for device, sums in by_device.items()}
            values = [f"{next(read[c.device])}".encode() for _, c in pending]
        filled = iter(values)
        for k, parts in enumerate(self._digests):
            if isinstance(parts, list):
                digest = hashlib.sha256()
                for part in parts:
                    digest.update(part[0] + next(filled) if isinstance(part, tuple) else part)
                self._digests[k] = int.from_bytes(digest.digest()[:8], "little")

    def arrays(self) -> dict[str, np.ndarray]:
        """``{"data_examples": int64 (B,), "data_digests": uint64 (B,)}`` for a checkpoint."""
        return {
            "data_examples": np.asarray(self.examples, dtype=np.int64),
            "data_digests": np.asarray(self.digests(), dtype=np.uint64),
        }
