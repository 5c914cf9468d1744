"""The comparer's paths in the engine harness (tests/test_engine.py): the same batches through
:class:`cka.CKA` with torch (hooked modules), JAX, ONNX and numpy extractors, mixed sides, a
checkpoint-resume and a two-rank gloo all-reduce, each held to the float64 reference of
tests/reference.py (float64 features: within 1e-10), for the linear and RBF kernels.

The features of each batch are fed to "models" that return them unchanged (identity layers), so
every difference from the reference comes from the comparer's path, not from a model.
"""

from __future__ import annotations

import multiprocessing
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path as FilePath

import jax
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from cka import CKA
from cka.frontends.base import FeatureExtractor
from cka.frontends.jax import JaxModel
from tests.test_engine import FLOAT64_TOL, KERNELS, Batches, Path, error_of

# --------------------------------------------------------------------------------------------
# Identity "models" of every framework
# --------------------------------------------------------------------------------------------


class Identities(nn.Module):
    """``forward(*layers)`` runs each feature array through its own ``nn.Identity`` (hooked as a layer)."""

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Identity() for _ in range(n_layers))

    def forward(self, *features: torch.Tensor) -> list[torch.Tensor]:
        return [layer(x) for layer, x in zip(self.layers, features, strict=True)]


def torch_side(n_layers: int) -> dict:
    return {"model": Identities(n_layers), "layers": [f"layers.{i}" for i in range(n_layers)]}


def _as_tensors(batch: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(a) for a in batch)


class NumpyFeatures(FeatureExtractor):
    """A framework-free extractor: the batch's numpy arrays are the layers' features."""

    def __init__(self, n_layers: int, name: str = "numpy") -> None:
        self.n_layers, self.name = n_layers, name

    def layer_names(self) -> list[str]:
        return [f"l{i}" for i in range(self.n_layers)]

    def features(self, batch: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {f"l{i}": np.asarray(a) for i, a in enumerate(batch)}


def jax_side(n_layers: int) -> JaxModel:
    def identities(*features: jax.Array) -> dict[str, jax.Array]:
        return {f"l{i}": x for i, x in enumerate(features)}

    return JaxModel(identities, [f"l{i}" for i in range(n_layers)], inputs=tuple, name=f"jax{n_layers}")


def onnx_side(example: list[np.ndarray], folder: FilePath) -> FeatureExtractor:
    """An ONNX graph of Identity nodes, one per layer, float64 inputs of ``example``'s shapes (batch axis free)."""
    from cka.frontends.onnx import OnnxModel

    n = len(example)
    inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.DOUBLE, ["n", *a.shape[1:]]) for i, a in enumerate(example)]
    outputs = [helper.make_tensor_value_info(f"v{i}", TensorProto.DOUBLE, ["n", *a.shape[1:]]) for i, a in enumerate(example)]
    nodes = [helper.make_node("Identity", [f"x{i}"], [f"v{i}"]) for i in range(n)]
    model = helper.make_model(helper.make_graph(nodes, f"identities{n}", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / f"identities{n}.onnx"
    onnx.save(model, path)
    return OnnxModel(path, [f"v{i}" for i in range(n)], inputs=tuple, providers=["CPUExecutionProvider"])


def _compare(first: object, second: object, bx: Batches, by: Batches, kernel: str, **kwargs: object) -> np.ndarray:
    options = {}
    for key, side in (("model1", first), ("model2", second)):
        if isinstance(side, dict):
            options[f"{key}_layers"] = side["layers"]
    model1 = first["model"] if isinstance(first, dict) else first
    model2 = second["model"] if isinstance(second, dict) else second
    comparison = CKA(model1, model2, kernel=kernel, progress=False, inputs=_as_tensors, **options)
    return np.asarray(comparison.compare(bx, by, **kwargs).matrix)


# --------------------------------------------------------------------------------------------
# The paths
# --------------------------------------------------------------------------------------------


def _torch_hooks(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    return _compare(torch_side(len(bx[0])), torch_side(len(by[0])), bx, by, kernel)


def _numpy_extractors(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    return _compare(NumpyFeatures(len(bx[0])), NumpyFeatures(len(by[0])), bx, by, kernel)


def _jax_extractors(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    return _compare(jax_side(len(bx[0])), jax_side(len(by[0])), bx, by, kernel)


def _torch_and_jax(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    return _compare(torch_side(len(bx[0])), jax_side(len(by[0])), bx, by, kernel)


def _jax_and_numpy(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    return _compare(jax_side(len(bx[0])), NumpyFeatures(len(by[0])), bx, by, kernel)


def _onnx_and_torch(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as folder:
        return _compare(onnx_side(bx[0], FilePath(folder)), torch_side(len(by[0])), bx, by, kernel)


class Interrupted(Exception):  # noqa: N818 - named for what happens
    pass


def _dying(batches: Batches, k: int) -> Iterator[list[np.ndarray]]:
    for i, batch in enumerate(batches):
        if i == k:
            raise Interrupted(f"the loader died at batch {k}")
        yield batch


def _checkpoint_resume(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    """Interrupted after two batches (checkpoint every batch), then resumed from the file."""
    with tempfile.TemporaryDirectory() as folder:
        path = FilePath(folder) / "run.ckpt"
        with pytest.raises(Interrupted):
            _compare(torch_side(len(bx[0])), torch_side(len(by[0])), _dying(bx, 2), by, kernel, checkpoint=path,
                     checkpoint_every=1)
        return _compare(torch_side(len(bx[0])), torch_side(len(by[0])), bx, by, kernel, checkpoint=path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, bx: Batches, by: Batches, kernel: str, out: multiprocessing.Queue) -> None:
    import torch.distributed as dist

    from cka.distributed import shard_batches

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out.put((rank, _compare(torch_side(len(bx[0])), NumpyFeatures(len(by[0])), shard_batches(bx), shard_batches(by),
                                kernel)))
    except Exception as error:
        out.put((rank, repr(error)))
    finally:
        dist.destroy_process_group()


def _gloo_two_ranks(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
    """Two gloo ranks, each with every other batch (torch on one side, numpy on the other)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    ranks = [context.Process(target=_rank, args=(r, port, bx, by, kernel, queue)) for r in range(2)]
    for process in ranks:
        process.start()
    results = dict(queue.get(timeout=240) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
    for rank, matrix in results.items():
        assert not isinstance(matrix, str), f"rank {rank}: {matrix}"
    np.testing.assert_array_equal(results[0], results[1])  # every rank returns the same result
    return results[0]


COMPARER_PATHS: list[Path] = [
    Path("comparer torch hooks", _torch_hooks, FLOAT64_TOL),
    Path("comparer numpy extractors", _numpy_extractors, FLOAT64_TOL),
    Path("comparer jax extractors", _jax_extractors, FLOAT64_TOL, x64=True),
    Path("comparer torch + jax", _torch_and_jax, FLOAT64_TOL, x64=True),
    Path("comparer jax + numpy", _jax_and_numpy, FLOAT64_TOL, x64=True),
    Path("comparer onnx + torch", _onnx_and_torch, FLOAT64_TOL),
    Path("comparer checkpoint resume", _checkpoint_resume, FLOAT64_TOL),
    Path("comparer gloo all-reduce", _gloo_two_ranks, FLOAT64_TOL),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("path", COMPARER_PATHS, ids=lambda p: p.name)
def test_comparer_path_matches_the_float64_reference(path: Path, kernel: str) -> None:
    assert error_of(path, kernel) <= path.tol


def test_the_harness_sees_a_wrong_comparer() -> None:
    # the check can fail: a comparer that drops the last batch misses the tolerance by far
    def dropping(bx: Batches, by: Batches, kernel: str) -> np.ndarray:
        return _torch_hooks(bx[:-1], by[:-1], kernel)

    assert error_of(Path("dropping", dropping, FLOAT64_TOL), "linear") > 1e3 * FLOAT64_TOL
