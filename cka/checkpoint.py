"""Saving and loading accumulator states: a long run resumes after an interruption with nothing lost.

A checkpoint holds a :class:`~cka.state.CKAState` (as float64 numpy arrays), the position of the run
(batches consumed) and a fingerprint of what was compared (models, layers, settings). The file is
written atomically — to a temporary file in the same folder, flushed and fsync'ed, then renamed over
the old one — so an interruption at any moment leaves either the previous good checkpoint or the new
one, never a mixture. A SHA-256 of the payload detects a truncated or corrupted file.

Format: the 8 bytes ``b"CKACKPT1"``, 32 bytes of SHA-256 of the rest, then an ``.npz`` payload
(numpy arrays and a JSON metadata string; no pickle, so loading never executes code).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cka.backends import get_backend
from cka.state import CKAState

__all__ = ["Checkpoint", "CheckpointError", "save_state", "load_checkpoint", "load_state", "state_to_numpy", "state_like"]

_MAGIC = b"CKACKPT1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupted, truncated, or from a different comparison."""


def state_to_numpy(state: CKAState) -> CKAState:
    """The state's fields as float64 numpy arrays (one host transfer per field)."""
    return CKAState(*(np.asarray(get_backend(f).to_numpy(f), dtype=np.float64) for f in state))


def state_like(state: CKAState, like: Any) -> CKAState:
    """A numpy state moved to ``like``'s array type, device and accumulator dtype."""
    backend = get_backend(like)
    dtype = backend.accumulator_dtype(like)
    if backend.name == "torch":
        import torch

        return CKAState(*(torch.as_tensor(f, dtype=dtype, device=like.device) for f in state))
    return CKAState(*(backend.xp.asarray(f, dtype=dtype) for f in state))


class Checkpoint(NamedTuple):
    """What a checkpoint holds: the sums, the batches they cover, and the caller's extra bookkeeping."""

    state: CKAState
    position: int
    extra: dict[str, Any]


def save_state(
    path: str | os.PathLike,
    state: CKAState,
    *,
    position: int,
    fingerprint: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``state``, ``position`` and ``fingerprint`` to ``path`` atomically.

    Parameters
    ----------
    path : path-like
        The checkpoint file; replaced only once the new one is completely on disk.
    state : CKAState
        The accumulator after ``position`` batches (any backend; converted to float64 numpy).
    position : int
        Number of batches of the run already added to ``state``.
    fingerprint : dict
        JSON-serialisable description of the comparison (models, layers, settings); :func:`load_state`
        refuses a checkpoint whose fingerprint differs.
    extra : dict, optional
        JSON-serialisable bookkeeping of the caller (skipped batches, ...), returned by :func:`load_checkpoint`.
    """
    path = Path(path)
    arrays = state_to_numpy(state)
    meta = json.dumps({"position": int(position), "fingerprint": fingerprint, "extra": extra or {}},
                      sort_keys=True, default=str)
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(meta), **arrays._asdict())
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).digest()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(_MAGIC + digest + payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_state(path: str | os.PathLike, *, fingerprint: dict[str, Any] | None = None) -> tuple[CKAState, int]:
    """``(state as float64 numpy, position)`` from a checkpoint; see :func:`load_checkpoint`."""
    checkpoint = load_checkpoint(path, fingerprint=fingerprint)
    return checkpoint.state, checkpoint.position


def load_checkpoint(path: str | os.PathLike, *, fingerprint: dict[str, Any] | None = None) -> Checkpoint:
    """Read a checkpoint written by :func:`save_state`: the state (float64 numpy), position and extra.

    Raises
    ------
    CheckpointError
        If the file is truncated or corrupted (checksum mismatch), not a cka checkpoint, or was made
        for a different comparison than ``fingerprint`` describes (the differing keys are named).
    """
    path = Path(path)
    blob = path.read_bytes()
    if not blob.startswith(_MAGIC):
        raise CheckpointError(f"{path} is not a cka checkpoint (bad header); delete it or pass another path.")
    digest, payload = blob[len(_MAGIC):len(_MAGIC) + 32], blob[len(_MAGIC) + 32:]
    if len(digest) < 32 or hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(
            f"{path} is truncated or corrupted (checksum mismatch, {len(blob)} bytes); delete it to start over."
        )
    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        state = CKAState(*(np.array(data[name], dtype=np.float64) for name in CKAState._fields))
    if fingerprint is not None:
        saved = meta["fingerprint"]
        expected = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        if saved != expected:
            keys = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
            details = "; ".join(f"{k}: checkpoint has {saved.get(k)!r}, this run has {expected.get(k)!r}" for k in keys)
            raise CheckpointError(
                f"{path} was written by a different comparison ({details}); use another checkpoint path "
                f"or delete it to start over."
            )
    return Checkpoint(state, int(meta["position"]), dict(meta.get("extra", {})))
