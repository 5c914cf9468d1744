"""Accumulator states survive interruptions: atomic save, exact round-trip, corruption detected."""

from __future__ import annotations

import numpy as np
import pytest

import cka
from cka.checkpoint import CheckpointError, load_state, save_state, state_like

FINGERPRINT = {"model1": "a", "layers1": ["l1", "l2"], "kernel": "linear"}


def some_state(xp, rng):
    state = cka.init_state(2, 1, like=xp.asarray(np.zeros(1)))
    for _ in range(3):
        state = cka.update_state(state, [xp.asarray(rng.normal(size=(9, 4))), xp.asarray(rng.normal(size=(9, 2)))],
                                 [xp.asarray(rng.normal(size=(9, 3)))])
    return state


def test_state_round_trips_exactly_and_resumes_on_the_same_backend(xp, rng, tmp_path):
    state = some_state(xp, rng)
    save_state(tmp_path / "run.ckpt", state, position=3, fingerprint=FINGERPRINT)
    loaded, position = load_state(tmp_path / "run.ckpt", fingerprint=FINGERPRINT)
    assert position == 3
    for a, b in zip(loaded, state, strict=True):
        np.testing.assert_array_equal(a, xp.to_numpy(b))  # bit for bit
    resumed = state_like(loaded, xp.asarray(np.zeros(1)))
    assert xp.is_native(resumed.hsic_xy)
    np.testing.assert_array_equal(xp.to_numpy(cka.finalize(resumed)), xp.to_numpy(cka.finalize(state)))


def test_checkpoint_from_another_comparison_is_refused_naming_the_difference(rng, tmp_path):
    save_state(tmp_path / "run.ckpt", some_state(_np(), rng), position=1, fingerprint=FINGERPRINT)
    other = {**FINGERPRINT, "layers1": ["l1", "l3"]}
    with pytest.raises(CheckpointError, match=r"different comparison \(layers1: checkpoint has \['l1', 'l2'\]"):
        load_state(tmp_path / "run.ckpt", fingerprint=other)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_truncated_or_corrupted_checkpoint_is_detected(rng, tmp_path, damage):
    path = tmp_path / "run.ckpt"
    save_state(path, some_state(_np(), rng), position=2, fingerprint=FINGERPRINT)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_state(path, fingerprint=FINGERPRINT)


def test_not_a_checkpoint_is_reported(tmp_path):
    (tmp_path / "x.ckpt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a cka checkpoint"):
        load_state(tmp_path / "x.ckpt")


def test_interrupted_write_keeps_the_previous_good_checkpoint(rng, tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    first = some_state(_np(), rng)
    save_state(path, first, position=1, fingerprint=FINGERPRINT)
    good = path.read_bytes()

    def crash(fd):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("os.fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        save_state(path, some_state(_np(), rng), position=2, fingerprint=FINGERPRINT)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary file left behind
    assert load_state(path, fingerprint=FINGERPRINT)[1] == 1


def _np():
    from tests.conftest import Namespace

    return Namespace("numpy")


# ---------------------------------------------------------------------------------------------
# Malformed or crafted files: a CheckpointError (a ValueError) naming the file and the problem
# ---------------------------------------------------------------------------------------------


def _crafted(path, meta, **arrays) -> None:
    """A checkpoint with a valid header and checksum around whatever payload the test wants."""
    import hashlib
    import io
    import json

    buffer = io.BytesIO()
    fields = {"meta": np.array(meta if isinstance(meta, str) else json.dumps(meta)), **arrays}
    np.savez(buffer, **fields)
    payload = buffer.getvalue()
    path.write_bytes(b"CKACKPT1" + hashlib.sha256(payload).digest() + payload)


GOOD_META = {"position": 2, "fingerprint": {"model1_layers": ["a", "b"], "model2_layers": ["c"]}, "extra": {}}
GOOD_STATE = {"hsic_xy": np.ones((2, 1)), "hsic_xx": np.ones(2), "hsic_yy": np.ones(1), "n_examples": np.array(8.0),
              "n_batches": np.array(2.0)}


@pytest.mark.parametrize(("meta", "state", "problem"), [
    (GOOD_META, {**GOOD_STATE, "hsic_xx": np.ones(3)}, r"hsic_xx has shape \(3,\) but hsic_xy's \(2, 1\) needs \(2,\)"),
    (GOOD_META, {**GOOD_STATE, "hsic_xy": np.ones(2)}, r"hsic_xy must be an \(L1, L2\) matrix"),
    (GOOD_META, {**GOOD_STATE, "n_batches": np.ones(2)}, r"n_batches has shape \(2,\)"),
    ({**GOOD_META, "fingerprint": {"model1_layers": ["a"]}}, GOOD_STATE, r"over 2 x 1 layers but model1_layers records \['a'\]"),
    (GOOD_META, {k: v for k, v in GOOD_STATE.items() if k != "hsic_yy"}, r"lacks \['hsic_yy'\]"),
    ({k: v for k, v in GOOD_META.items() if k != "position"}, GOOD_STATE, r"metadata must be a dict with 'position'"),
    ({**GOOD_META, "position": -1}, GOOD_STATE, r"position must be a non-negative number of batches, not -1"),
    ({**GOOD_META, "position": "2"}, GOOD_STATE, r"position must be a non-negative number"),
    ([1, 2], GOOD_STATE, r"metadata must be a dict"),
    ("{not json", GOOD_STATE, r"\(JSONDecodeError"),
    (GOOD_META, {**GOOD_STATE, "hsic_xy": np.array([["a"]])}, r"\(ValueError"),
], ids=["state-shapes-disagree", "not-a-matrix", "scalar-not-scalar", "layers-disagree", "missing-field",
        "missing-position", "negative-position", "position-not-int", "meta-not-a-dict", "meta-not-json", "not-numbers"])
def test_a_malformed_checkpoint_names_the_file_and_the_problem(tmp_path, meta, state, problem):
    path = tmp_path / "crafted.ckpt"
    _crafted(path, meta, **state)
    with pytest.raises(CheckpointError, match=rf"{tmp_path.name}/crafted\.ckpt is malformed.*{problem}"):
        load_state(path)
    assert issubclass(CheckpointError, ValueError)


def test_a_directory_given_as_the_checkpoint_is_refused(tmp_path):
    from cka.checkpoint import RunCheckpoint

    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file"):
        load_state(tmp_path)
    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file"):
        RunCheckpoint(tmp_path, 10, {"world_size": 1, "rank": 0})


def test_a_comparer_checkpoint_without_its_data_record_is_refused(tmp_path):
    from cka.checkpoint import RunCheckpoint

    path = tmp_path / "old.ckpt"
    fingerprint = {"world_size": 1, "rank": 0}
    save_state(path, cka.init_state(1, 1, like=np.zeros(1)), position=3, fingerprint=fingerprint)
    with pytest.raises(CheckpointError, match=r"does not record which data it was made with"):
        RunCheckpoint(path, 10, fingerprint).restore(None)


# ---------------------------------------------------------------------------------------------
# What identifies a batch (cka._digest)
# ---------------------------------------------------------------------------------------------


def _digest_of(*batches) -> list[int]:
    from cka._digest import DataRecord

    record = DataRecord()
    for batch in batches:
        record.append(batch)
    return record.digests()


@pytest.mark.parametrize("on_device", [False, True], ids=["host-sha256", "device-checksum"])
def test_a_batch_digest_sees_values_order_shape_dtype_and_structure(monkeypatch, on_device):
    torch = pytest.importorskip("torch")
    if on_device:  # the CUDA path (a checksum where the tensor is, read at the next checkpoint), run on the CPU
        monkeypatch.setattr("cka._digest._on_accelerator", lambda leaf: isinstance(leaf, torch.Tensor))
    x = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    base = (x, torch.zeros(6))
    changed = x.clone()
    changed[5, 3] += 1e-6
    variants = {
        "same": (x.clone(), torch.zeros(6)),
        "one value": (changed, torch.zeros(6)),
        "rows swapped": (x[[1, 0, 2, 3, 4, 5]], torch.zeros(6)),
        "labels": (x, torch.ones(6)),
        "dtype": (x.double(), torch.zeros(6)),
        "shape": (x.reshape(4, 6), torch.zeros(6)),
        "structure": {"image": x, "label": torch.zeros(6)},
        "numpy": (x.numpy(), torch.zeros(6)),
    }
    digests = dict(zip(["base", *variants], _digest_of(base, *variants.values()), strict=True))
    assert digests["same"] == digests["base"]
    for name in variants:
        if name != "same":
            assert digests[name] != digests["base"], name
    assert all(0 <= d < 2**64 for d in digests.values())


def test_the_device_checksum_moves_with_any_word():
    torch = pytest.importorskip("torch")
    from cka._digest import device_checksum

    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    reference_sum = device_checksum(x).tolist()
    assert device_checksum(x.clone()).tolist() == reference_sum
    swapped = x.clone()
    swapped[[10, 900]] = swapped[[900, 10]]
    assert device_checksum(swapped).tolist() != reference_sum
    odd = torch.arange(7, dtype=torch.uint8)  # not a whole number of 32-bit words: bytes
    assert device_checksum(odd).tolist() != device_checksum(odd.flip(0)).tolist()
