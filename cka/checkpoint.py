"""Checkpoints: a long run resumes after an interruption with nothing lost and nothing mixed.

A checkpoint holds a :class:`~cka.state.CKAState` (as float64 numpy arrays), the position of the run
(batches consumed), a fingerprint of what was compared (models, layers, settings) and, for
:class:`cka.CKA` runs, what identifies the data (examples and a digest per batch, :mod:`cka._digest`).
The file is written atomically — to a temporary file in the same folder, flushed and fsync'ed, then
renamed over the old one — so an interruption at any moment leaves either the previous good
checkpoint or the new one, never a mixture. A SHA-256 of the payload detects a truncated or
corrupted file; every field is checked on loading, so a malformed or crafted file gives a
:class:`CheckpointError` (a ValueError) naming the file and what is wrong.

:class:`RunCheckpoint` is the comparer's side: restore, check each drawn batch against the recorded
digests (a checkpoint from other data, another batch size or a shorter loader is refused, naming the
first differing batch), save every ``k`` batches and at the end, and refuse to overwrite a file that
another process wrote meanwhile.

Format: the 8 bytes ``b"CKACKPT1"``, 32 bytes of SHA-256 of the rest, then an ``.npz`` payload
(numpy arrays and a JSON metadata string; no pickle, so loading never executes code).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cka import state as engine
from cka._digest import DataRecord
from cka.backends import get_backend
from cka.state import CKAState

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "RunCheckpoint",
    "load_checkpoint",
    "load_state",
    "save_state",
    "state_like",
    "state_to_numpy",
]

_MAGIC = b"CKACKPT1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupted, truncated, or from a different comparison."""


def state_to_numpy(state: Any) -> CKAState:
    """The state's fields as float64 numpy arrays (one host transfer per field); a compensated state
    (:class:`cka.state.CompensatedCKAState`) is folded into its sums first."""
    folded = getattr(engine, "folded", None)
    plain = folded(state) if folded is not None else state
    return CKAState(*(None if f is None else np.asarray(get_backend(f).to_numpy(f), dtype=np.float64) for f in plain))


def state_like(state: CKAState, like: Any) -> CKAState:
    """A numpy state moved to ``like``'s array type, device and accumulator dtype."""
    backend = get_backend(like)
    dtype = backend.accumulator_dtype(like)
    if backend.name == "torch":
        import torch

        return CKAState(*(None if f is None else torch.as_tensor(f, dtype=dtype, device=like.device) for f in state))
    return CKAState(*(None if f is None else backend.xp.asarray(f, dtype=dtype) for f in state))


class Checkpoint(NamedTuple):
    """What a checkpoint holds: the sums, the batches they cover, the caller's extra bookkeeping
    (JSON) and extra arrays (e.g. the data digests)."""

    state: CKAState
    position: int
    extra: dict[str, Any]
    arrays: dict[str, np.ndarray]


def save_state(
    path: str | os.PathLike,
    state: CKAState,
    *,
    position: int,
    fingerprint: dict[str, Any],
    extra: dict[str, Any] | None = None,
    arrays: dict[str, np.ndarray] | None = None,
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
    arrays : dict of str -> numeric numpy array, optional
        Further arrays (the comparer's data digests), returned in :attr:`Checkpoint.arrays`.
    """
    path = Path(path)
    fields = state_to_numpy(state)
    extras = {f"array_{name}": np.asarray(value) for name, value in (arrays or {}).items()}
    meta = json.dumps(
        {"position": int(position), "fingerprint": fingerprint, "extra": extra or {}}, sort_keys=True, default=str
    )
    buffer = io.BytesIO()
    sums = {name: value for name, value in fields._asdict().items() if value is not None}  # statistics may be absent
    contents: dict[str, Any] = {"meta": np.array(meta), **sums, **extras}
    np.savez(buffer, **contents)
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
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; pass a file path (created if missing).")
    blob = path.read_bytes()
    if not blob.startswith(_MAGIC):
        raise CheckpointError(f"{path} is not a cka checkpoint (bad header); delete it or pass another path.")
    digest, payload = blob[len(_MAGIC) : len(_MAGIC) + 32], blob[len(_MAGIC) + 32 :]
    if len(digest) < 32 or hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(
            f"{path} is truncated or corrupted (checksum mismatch, {len(blob)} bytes); delete it to start over."
        )
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            missing = [name for name in ("meta", *CKAState._fields[:5]) if name not in data.files]
            if missing:
                raise CheckpointError(f"{path} is malformed: it lacks {missing}; delete it to start over.")
            meta = json.loads(str(data["meta"]))
            stored = {name: np.array(data[name], dtype=np.float64) for name in CKAState._fields if name in data.files}
            state = _with_statistics_fields(path, CKAState(**stored))
            arrays = {name[len("array_") :]: np.array(data[name]) for name in data.files if name.startswith("array_")}
    except CheckpointError:
        raise
    except (ValueError, TypeError, OSError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path} is malformed ({type(error).__name__}: {error}); delete it to start over."
        ) from None
    position, extra = _check_contents(path, meta, state)
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
    return Checkpoint(state, position, extra, arrays)


def _check_contents(path: Path, meta: Any, state: CKAState) -> tuple[int, dict[str, Any]]:
    """``(position, extra)`` after checking that the metadata and the state's shapes make sense
    together (a CheckpointError naming the file and the problem otherwise)."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is malformed: {what}; delete it to start over.")

    if not isinstance(meta, dict) or not {"position", "fingerprint", "extra"} <= set(meta):
        raise bad(f"its metadata must be a dict with 'position', 'fingerprint' and 'extra', not {str(meta)[:80]!r}")
    position, fingerprint, extra = meta["position"], meta["fingerprint"], meta["extra"]
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise bad(f"its position must be a non-negative number of batches, not {position!r}")
    if not isinstance(fingerprint, dict) or not isinstance(extra, dict):
        raise bad("its fingerprint and extra must be dicts")
    if state.hsic_xy.ndim != 2:
        raise bad(f"hsic_xy must be an (L1, L2) matrix, not of shape {state.hsic_xy.shape}")
    n1, n2 = state.hsic_xy.shape
    expected = {"hsic_xx": (n1,), "hsic_yy": (n2,), "n_examples": (), "n_batches": ()}
    for name, shape in expected.items():
        if getattr(state, name).shape != shape:
            raise bad(f"{name} has shape {getattr(state, name).shape} but hsic_xy's {(n1, n2)} needs {shape}")
    replicates = {"boot_xy": (n1, n2), "boot_xx": (n1,), "boot_yy": (n2,), "null_xy": (n1, n2)}
    for name, shape in replicates.items():
        value = getattr(state, name)
        if value.shape[1:] != shape or value.ndim != len(shape) + 1:
            raise bad(f"{name} has shape {value.shape} but hsic_xy's {(n1, n2)} needs (replicates, *{shape})")
    if not state.boot_xy.shape[0] == state.boot_xx.shape[0] == state.boot_yy.shape[0]:
        raise bad("boot_xy, boot_xx and boot_yy hold different numbers of bootstrap replicates")
    for name, shape in (("log2_scale_x", (n1,)), ("log2_scale_y", (n2,))):
        value = getattr(state, name)
        if value.shape != shape or not np.isfinite(value).all() or (value != np.round(value)).any():
            raise bad(f"{name} must hold {shape[0]} whole numbers (powers of two of the sums), not {value!r:.80}")
    for key, size in (("model1_layers", n1), ("model2_layers", n2)):
        layers = fingerprint.get(key)
        if layers is not None and (not isinstance(layers, list) or len(layers) != size):
            raise bad(f"its sums are over {n1} x {n2} layers but {key} records {layers!r}")
    return position, extra


class RunCheckpoint:
    """The checkpoints of one :meth:`cka.CKA.compare` run: restore, check the data, save, detect a second writer.

    Parameters
    ----------
    path : path-like
        The checkpoint file; under ``torch.distributed`` with more than one rank each rank uses
        ``<stem>.rank<r>-of-<w><suffix>``.
    every : int
        Batches between two saves.
    fingerprint : dict
        The comparison (models, layers, settings, rank and world size); see :func:`load_checkpoint`.
    """

    def __init__(self, path: str | os.PathLike[str], every: int, fingerprint: dict[str, Any]) -> None:
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or int(every) < 1:
            raise ValueError(f"checkpoint_every must be a positive number of batches; got {every!r}.")
        self.path, self.every, self.fingerprint = Path(path), int(every), fingerprint
        if fingerprint["world_size"] > 1:
            self.path = self.path.with_name(
                f"{self.path.stem}.rank{fingerprint['rank']}-of-{fingerprint['world_size']}{self.path.suffix}"
            )
        if self.path.is_dir():
            raise CheckpointError(
                f"{self.path} is a directory, not a checkpoint file; pass a file path (created if missing)."
            )
        self.data = DataRecord()
        self.start, self.complete = 0, False
        self._saved: tuple[np.ndarray, np.ndarray] | None = None
        self._stamp = _stamp(self.path)  # a file that appears later was written by another run

    def restore(self, tally: Any) -> int:
        """Load the checkpoint into ``tally`` if the file exists; the number of batches it covers."""
        if not self.path.exists():
            return 0
        saved = load_checkpoint(self.path, fingerprint=self.fingerprint)
        examples, digests = saved.arrays.get("data_examples"), saved.arrays.get("data_digests")
        if examples is None or digests is None:
            raise CheckpointError(
                f"{self.path} does not record which data it was made with (an older format); delete it to start over."
            )
        if examples.shape != (saved.position,) or digests.shape != (saved.position,):
            raise CheckpointError(
                f"{self.path} is malformed: it covers {saved.position} batches but records the data of "
                f"{examples.shape} / {digests.shape}; delete it to start over."
            )
        self._saved = (examples.astype(np.int64), digests.astype(np.uint64))
        self.start, self.complete = saved.position, bool(saved.extra.get("complete", False))
        tally.from_record(saved.state if saved.extra.get("started", False) else None, saved.extra)
        return self.start

    def see(self, index: int, batch1: Any, batch2: Any = None) -> None:
        """Record batch ``index`` as drawn (before it runs); at the first batch past the restored ones,
        check every restored batch against the checkpoint (one read of any pending device checksums)."""
        if index == self.start and self.start > 0:
            if self.complete:
                raise CheckpointError(
                    f"{self.path} holds a completed run of {self.start} batches, but this data has more: it was made "
                    f"with other data. Use another checkpoint path, or delete it to start over."
                )
            self._verify()
        self.data.append(batch1, batch2)

    def maybe_save(self, tally: Any, position: int) -> None:
        if position % self.every == 0:
            self.save(tally, position, complete=False)

    def finish(self, tally: Any, count: int) -> None:
        """The loaders are exhausted after ``count`` batches: check the data, save the completed run."""
        if count < self.start:
            raise CheckpointError(
                f"{self.path} covers {self.start} batches but this data ended after {count}: it was made with other "
                f"data (or a longer loader). Use another checkpoint path, or delete it to start over."
            )
        self._verify()
        if count > self.start or (count == self.start > 0 and not self.complete):
            self.save(tally, count, complete=True)

    def save(self, tally: Any, position: int, complete: bool) -> None:
        if _stamp(self.path) != self._stamp:
            raise CheckpointError(
                f"{self.path} was written by another process while this run was using it; two runs on one checkpoint "
                f"path would mix their sums. Give each run its own checkpoint path."
            )
        state, extra = tally.to_record()
        started = state is not None
        if not started:
            state = CKAState(
                np.zeros(tally.shape), np.zeros(tally.shape[0]), np.zeros(tally.shape[1]), np.zeros(()), np.zeros(())
            )
        extra.update(started=started, complete=complete)
        save_state(
            self.path, state, position=position, fingerprint=self.fingerprint, extra=extra, arrays=self.data.arrays()
        )
        self._stamp = _stamp(self.path)

    def _verify(self) -> None:
        if self._saved is None:
            return
        saved_examples, saved_digests = self._saved
        ours = self.data.digests()
        for k in range(self.start):
            if int(saved_digests[k]) != ours[k]:
                raise CheckpointError(
                    f"{self.path} was made with other data: batch {k} differs (the checkpoint's had "
                    f"{int(saved_examples[k])} examples, this run's has {self.data.examples[k]}; digests "
                    f"{int(saved_digests[k]):016x} and {ours[k]:016x}). Resume with the same data, order and batch size "
                    f"(seed a shuffling loader), or use another checkpoint path, or delete it to start over."
                )
        self._saved = None


def _with_statistics_fields(path: Path, state: CKAState) -> CKAState:
    """``state`` with empty statistics fields where the file has none (a checkpoint from before
    :mod:`cka.statistics`; all four or none must be there), and zero scales where it has none (from
    before the sums' scales, :mod:`cka._sums`; both or none). Shapes are checked afterwards."""
    scales = [name for name in ("log2_scale_x", "log2_scale_y") if getattr(state, name) is None]
    if len(scales) == 1:
        raise CheckpointError(f"{path} is malformed: it lacks {scales}; delete it to start over.")
    if scales and state.hsic_xy.ndim == 2:
        state = state._replace(
            log2_scale_x=np.zeros(state.hsic_xy.shape[0]), log2_scale_y=np.zeros(state.hsic_xy.shape[1])
        )
    names = ("boot_xy", "boot_xx", "boot_yy", "null_xy")
    absent = [name for name in names if getattr(state, name) is None]
    if absent and len(absent) < len(names):
        raise CheckpointError(f"{path} is malformed: it lacks {absent}; delete it to start over.")
    if not absent or state.hsic_xy.ndim != 2:
        return state
    n1, n2 = state.hsic_xy.shape
    empty = (np.zeros((0, n1, n2)), np.zeros((0, n1)), np.zeros((0, n2)))
    return state._replace(boot_xy=empty[0], boot_xx=empty[1], boot_yy=empty[2], null_xy=np.zeros((0, n1, n2)))


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Identity of the file's current version (inode, size, modification time), None if absent."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
