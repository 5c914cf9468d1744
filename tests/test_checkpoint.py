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
    for a, b in zip(loaded, state):
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
