"""Large runs: ``CKA.compare`` resumes from a checkpoint after an interruption (an exception, a real
SIGKILL) with the result of an uninterrupted run, refuses foreign checkpoints, and under
torch.distributed (gloo, 2 processes) gives every rank the single-process result."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from cka import CKA  # noqa: E402
from cka.checkpoint import CheckpointError  # noqa: E402
from cka.distributed import shard_batches  # noqa: E402

LAYERS = ["0", "1", "2", "3"]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6), nn.Tanh()).eval()


def make_batches(n_batches: int = 7, size: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return [torch.randn(size, 8, generator=g) for _ in range(n_batches)]


def compare(batches, checkpoint=None, every=2, seed2: int = 1, layers2=None):
    comparison = CKA(make_model(0), make_model(seed2), model1_layers=LAYERS, model2_layers=layers2 or LAYERS,
                     progress=False)
    return comparison.compare(batches, checkpoint=checkpoint, checkpoint_every=every)


class Interrupted(Exception):  # noqa: N818 - named for what happens, as in the tests' prose
    pass


def interrupted_after(batches, k: int):
    for i, batch in enumerate(batches):
        if i == k:
            raise Interrupted(f"loader died at batch {k}")
        yield batch


@pytest.mark.parametrize("k", [1, 3, 6])
def test_resume_after_an_exception_equals_an_uninterrupted_run(tmp_path, k):
    batches = make_batches()
    expected = compare(batches)
    with pytest.raises(Interrupted):
        compare(interrupted_after(batches, k), checkpoint=tmp_path / "run.ckpt", every=1)
    resumed = compare(batches, checkpoint=tmp_path / "run.ckpt", every=1)
    np.testing.assert_allclose(resumed.matrix, expected.matrix, atol=1e-12, rtol=0)
    assert resumed.n_examples == expected.n_examples == 7 * 12
    # a finished run's checkpoint resumes to the same result without running the models again
    again = compare(batches, checkpoint=tmp_path / "run.ckpt", every=1)
    np.testing.assert_array_equal(again.matrix, resumed.matrix)


def test_checkpoints_are_taken_every_n_batches(tmp_path):
    from cka.checkpoint import load_checkpoint

    batches = make_batches()
    with pytest.raises(Interrupted):
        compare(interrupted_after(batches, 5), checkpoint=tmp_path / "run.ckpt", every=2)
    assert load_checkpoint(tmp_path / "run.ckpt").position == 4  # saved after batches 2 and 4, not 5


def test_a_checkpoint_of_other_models_layers_or_settings_is_refused(tmp_path):
    batches = make_batches(3)
    compare(batches, checkpoint=tmp_path / "run.ckpt")
    with pytest.raises(CheckpointError, match=r"different comparison.*model2"):
        compare(batches, checkpoint=tmp_path / "run.ckpt", seed2=2)  # other weights
    with pytest.raises(CheckpointError, match="model2_layers"):
        compare(batches, checkpoint=tmp_path / "run.ckpt", layers2=["1", "3"])
    with pytest.raises(CheckpointError, match="unbiased"):
        CKA(make_model(0), make_model(1), model1_layers=LAYERS, model2_layers=LAYERS, unbiased=False,
            progress=False).compare(batches, checkpoint=tmp_path / "run.ckpt")


def test_a_corrupted_checkpoint_is_reported(tmp_path):
    compare(make_batches(3), checkpoint=tmp_path / "run.ckpt")
    blob = (tmp_path / "run.ckpt").read_bytes()
    (tmp_path / "run.ckpt").write_bytes(blob[: len(blob) - 40])
    with pytest.raises(CheckpointError, match=r"truncated or corrupted.*delete it to start over"):
        compare(make_batches(3), checkpoint=tmp_path / "run.ckpt")


SIGKILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.test_large_runs import compare, make_batches

    def slow(batches):
        for i, batch in enumerate(batches):
            if i >= 3:
                print("ready", flush=True)
                time.sleep(600)  # killed here, with batches 0..2 checkpointed
            yield batch

    compare(slow(make_batches()), checkpoint={path!r}, every=1)
    """
)


def test_resume_after_a_real_sigkill(tmp_path):
    path = tmp_path / "run.ckpt"
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", SIGKILL_SCRIPT.format(root=root, path=str(path))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = compare(make_batches(), checkpoint=path, every=1)
    np.testing.assert_allclose(resumed.matrix, compare(make_batches()).matrix, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# torch.distributed
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, n_batches: int, checkpoint: str | None, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = compare(shard_batches(make_batches(n_batches)), checkpoint=checkpoint)
        out.put((rank, result.matrix, result.n_examples))
    except Exception as error:
        out.put((rank, repr(error), None))
    finally:
        dist.destroy_process_group()


def run_two_ranks(n_batches: int, checkpoint: str | None = None) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, n_batches, checkpoint, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return results


@pytest.mark.parametrize("n_batches", [7, 1], ids=["uneven-shards", "a-rank-with-no-batch"])
def test_compare_under_torch_distributed_equals_one_process(tmp_path, n_batches):
    expected = compare(make_batches(n_batches))
    for _rank, matrix, n_examples in run_two_ranks(n_batches, checkpoint=str(tmp_path / "run.ckpt")):
        assert not isinstance(matrix, str), matrix
        np.testing.assert_allclose(matrix, expected.matrix, atol=1e-12, rtol=0)
        assert n_examples == expected.n_examples
    files = sorted(p.name for p in tmp_path.iterdir())  # one file per rank that had batches
    assert files == (["run.rank0-of-2.ckpt", "run.rank1-of-2.ckpt"] if n_batches > 1 else ["run.rank0-of-2.ckpt"])


# ---------------------------------------------------------------------------------------------
# A checkpoint belongs to its data (issue 13): other data, batch size, order or length is refused
# ---------------------------------------------------------------------------------------------


def other_batches(n_batches: int = 7, size: int = 12, seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 8, generator=g) for _ in range(n_batches)]


def interrupted_run(tmp_path, k: int = 3, batches=None) -> Path:
    path = tmp_path / "run.ckpt"
    with pytest.raises(Interrupted):
        compare(interrupted_after(batches if batches is not None else make_batches(), k), checkpoint=path, every=1)
    return path


@pytest.mark.parametrize(("data", "batch"), [
    (lambda: other_batches(), 0),                                               # other examples
    (lambda: [torch.cat(make_batches())[i:i + 8] for i in range(0, 84, 8)], 0),  # another batch size
    (lambda: [make_batches()[i] for i in (0, 2, 1, 3, 4, 5, 6)], 1),              # another order
    (lambda: [*make_batches()[:2], make_batches()[2] + 1e-3, *make_batches()[3:]], 2),  # one batch changed
], ids=["other-data", "other-batch-size", "other-order", "one-batch-changed"])
def test_resuming_with_other_data_is_refused_naming_the_first_differing_batch(tmp_path, data, batch):
    path = interrupted_run(tmp_path, k=3)  # batches 0, 1, 2 in the checkpoint
    with pytest.raises(CheckpointError, match=rf"made with other data: batch {batch} differs"):
        compare(data(), checkpoint=path, every=1)


def test_a_shorter_loader_is_refused(tmp_path):
    path = interrupted_run(tmp_path, k=5)
    with pytest.raises(CheckpointError, match=r"covers 5 batches but this data ended after 3"):
        compare(make_batches()[:3], checkpoint=path)


def test_a_completed_checkpoint_is_reused_only_for_the_same_data(tmp_path):
    path = tmp_path / "run.ckpt"
    done = compare(make_batches(), checkpoint=path)
    with pytest.raises(CheckpointError, match=r"made with other data: batch 0 differs"):
        compare(other_batches(), checkpoint=path)
    with pytest.raises(CheckpointError, match=r"holds a completed run of 7 batches, but this data has more"):
        compare(make_batches(9), checkpoint=path)
    with pytest.raises(CheckpointError, match=r"covers 7 batches but this data ended after 6"):
        compare(make_batches(6), checkpoint=path)
    calls = []
    model = make_model(0)
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    again = CKA(model, make_model(1), model1_layers=LAYERS, model2_layers=LAYERS, progress=False).compare(
        make_batches(), checkpoint=path)
    np.testing.assert_array_equal(again.matrix, done.matrix)
    assert calls == []  # the same data: the completed sums are reused, the models do not run


def test_two_loaders_are_both_part_of_the_data(tmp_path):
    path = tmp_path / "run.ckpt"
    pair = CKA(make_model(0), make_model(1), model1_layers=LAYERS, model2_layers=LAYERS, progress=False)
    with pytest.raises(Interrupted):
        pair.compare(interrupted_after(make_batches(), 3), make_batches(), checkpoint=path, checkpoint_every=1)
    with pytest.raises(CheckpointError, match=r"batch 0 differs"):
        pair.compare(make_batches(), other_batches(), checkpoint=path)
    resumed = pair.compare(make_batches(), make_batches(), checkpoint=path)
    np.testing.assert_allclose(resumed.matrix, compare(make_batches()).matrix, atol=1e-12, rtol=0)


def test_a_second_run_writing_the_same_checkpoint_is_detected(tmp_path):
    path = tmp_path / "run.ckpt"

    def meddling(batches):
        for i, batch in enumerate(batches):
            if i == 3:  # another run (other data) starts on the same path and finishes
                with pytest.raises(CheckpointError, match=r"made with other data"):
                    compare(other_batches(), checkpoint=path, every=1)  # it does not resume our sums
                path.unlink()
                compare(other_batches(), checkpoint=path, every=1)  # nor, after a fresh start, keep them
            yield batch

    with pytest.raises(CheckpointError, match=r"written by another process while this run was using it"):
        compare(meddling(make_batches()), checkpoint=path, every=1)  # and this run does not overwrite its file
    assert compare(other_batches(), checkpoint=path).n_examples == 84  # the other run's complete checkpoint stands
