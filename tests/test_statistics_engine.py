"""Statistics everywhere the engine runs: the comparer (torch, numpy/JAX extractors), checkpoint-resume,
torch.distributed (gloo, 2 processes), the JAX streaming API (jit, scan, shard_map psum), the CLI, and
``tokens="all"``. Each path is held to the same numbers as one uninterrupted single-process run."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import cka
import cka.frontends.base
from cka import CKA
from cka.checkpoint import CheckpointError, load_checkpoint
from cka.distributed import shard_batches
from cka.result import BEST_MATCH_P_VALUES, STATISTICS

LAYERS = ["0", "1", "2", "3"]
OPTIONS = {"bootstrap": 120, "permutations": 110, "seed": 7}
FIELDS = (*STATISTICS, *BEST_MATCH_P_VALUES)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6), nn.Tanh()).eval()


def make_batches(n_batches: int = 12, size: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return [torch.randn(size, 8, generator=g) for _ in range(n_batches)]


def compare(batches, checkpoint=None, every=2, **options):
    comparison = CKA(make_model(0), make_model(1), model1_layers=LAYERS, model2_layers=LAYERS, progress=False)
    return comparison.compare(batches, checkpoint=checkpoint, checkpoint_every=every, **options)


def assert_same_statistics(result, expected, atol=1e-12):
    np.testing.assert_allclose(result.matrix, expected.matrix, atol=atol, rtol=0)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(result, name), getattr(expected, name), atol=atol, rtol=0, err_msg=name)


def _features(batches):
    """Each batch's four layer outputs of both models, as numpy (what the comparer's hooks see)."""
    out = []
    for model in (make_model(0), make_model(1)):
        per_batch = []
        for x in batches:
            layers, h = [], x
            with torch.no_grad():
                for module in model:
                    h = module(h)
                    layers.append(h.numpy().astype(np.float64))
            per_batch.append(layers)
        out.append(per_batch)
    return out


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cka.CoarseStatisticsWarning)
        yield


def test_compare_fills_the_statistics_and_leaves_the_matrix_unchanged():
    batches = make_batches()
    plain = compare(batches)
    result = compare(batches, **OPTIONS, confidence=0.9)
    assert np.array_equal(result.matrix, plain.matrix)  # bit for bit
    assert plain.statistics == {} and set(result.statistics) == set(FIELDS)
    assert result.p_value.shape == result.ci_low.shape == (4, 4) and result.p_value_best_col.shape == (4,)
    assert result.settings["bootstrap"] == 120 and result.settings["confidence"] == 0.9
    # the same numbers as the functional API on the same features, batch b with index b
    xs, ys = _features(batches)
    expected = cka.minibatch_cka_matrix(xs, ys, **OPTIONS, confidence=0.9)
    for name in ("matrix", *FIELDS):
        # the hooks' Grams are float32 products of float32 features: agreement to ~1e-8, p-values exactly
        np.testing.assert_allclose(getattr(result, name), getattr(expected, name), atol=1e-6, rtol=0, err_msg=name)
    assert (result.ci_low <= result.matrix).all() and (result.matrix <= result.ci_high).all()


class NumpyFeatures(cka.frontends.base.FeatureExtractor):
    """A framework-free extractor: the batch's numpy arrays are the layers' features."""

    def __init__(self, n_layers: int, name: str) -> None:
        self.n_layers, self.name = n_layers, name

    def layer_names(self) -> list[str]:
        return [f"l{i}" for i in range(self.n_layers)]

    def features(self, batch: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {f"l{i}": np.asarray(a) for i, a in enumerate(batch)}


@pytest.mark.parametrize("framework", ["numpy", "jax"])
def test_compare_with_numpy_or_jax_extractors_equals_the_functional_api(framework):
    from cka.frontends.jax import JaxModel

    rng = np.random.default_rng(1)
    xs = [[rng.normal(size=(10, 4)), rng.normal(size=(10, 3))] for _ in range(12)]
    ys = [[x[0][:, :2] + rng.normal(size=(10, 2))] for x in xs]

    def side(n_layers: int, name: str):
        if framework == "numpy":
            return NumpyFeatures(n_layers, name)
        return JaxModel(
            lambda *f: {f"l{i}": a for i, a in enumerate(f)},
            [f"l{i}" for i in range(n_layers)],
            inputs=tuple,
            name=name,
        )

    result = CKA(side(2, "a"), side(1, "b"), progress=False).compare(xs, ys, **OPTIONS)
    expected = cka.minibatch_cka_matrix(xs, ys, **OPTIONS)
    for name in ("matrix", *FIELDS):
        np.testing.assert_allclose(getattr(result, name), np.asarray(getattr(expected, name)), atol=1e-12, err_msg=name)


def test_statistics_survive_save_and_load(tmp_path):
    result = compare(make_batches(), **OPTIONS)
    for suffix in ("json", "npz", "csv"):
        loaded = cka.CKAResult.load(result.save(tmp_path / f"r.{suffix}"))
        assert_same_statistics(loaded, result, atol=1e-15)


@pytest.mark.parametrize("k", [1, 5])
def test_resume_with_statistics_equals_an_uninterrupted_run(tmp_path, k):
    batches = make_batches()
    expected = compare(batches, **OPTIONS)

    def interrupted():
        for i, batch in enumerate(batches):
            if i == k:
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt):
        compare(interrupted(), checkpoint=tmp_path / "run.ckpt", every=1, **OPTIONS)
    saved = load_checkpoint(tmp_path / "run.ckpt")
    assert saved.position == k and saved.state.boot_xy.shape == (120, 4, 4) and saved.state.null_xy.shape[0] == 110
    resumed = compare(batches, checkpoint=tmp_path / "run.ckpt", every=1, **OPTIONS)
    assert_same_statistics(resumed, expected)


def test_the_checkpoint_fingerprint_records_the_statistics_settings(tmp_path):
    batches = make_batches(4)
    compare(batches, checkpoint=tmp_path / "run.ckpt", **OPTIONS)
    for changed in ({"seed": 8}, {"bootstrap": 121}, {"permutations": 0}, {"confidence": 0.9}):
        key = next(iter(changed))
        with pytest.raises(CheckpointError, match=key):
            compare(batches, checkpoint=tmp_path / "run.ckpt", **{**OPTIONS, **changed})
    with pytest.raises(CheckpointError, match="bootstrap"):  # a plain run does not resume a run with statistics
        compare(batches, checkpoint=tmp_path / "run.ckpt")


def test_a_plain_checkpoint_of_the_five_sums_still_loads(tmp_path):
    from cka.checkpoint import save_state

    state = cka.CKAState(np.ones((2, 3)), np.ones(2), np.ones(3), np.asarray(8.0), np.asarray(1.0))
    save_state(tmp_path / "old.ckpt", state, position=1, fingerprint={})
    loaded = load_checkpoint(tmp_path / "old.ckpt").state
    assert loaded.boot_xy.shape == (0, 2, 3) and loaded.null_xy.shape == (0, 2, 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, n_batches: int, checkpoint: str | None, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = compare(shard_batches(make_batches(n_batches)), checkpoint=checkpoint, **OPTIONS)
        out.put((rank, result.to_dict()))
    except Exception as error:
        out.put((rank, repr(error)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n_batches", [7, 1], ids=["uneven-shards", "a-rank-with-no-batch"])
def test_statistics_under_torch_distributed_equal_one_process(tmp_path, n_batches):
    expected = compare(make_batches(n_batches), **OPTIONS)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, n_batches, str(tmp_path / "run.ckpt"), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for _rank_index, record in results:
        assert not isinstance(record, str), record
        assert_same_statistics(cka.CKAResult.from_dict(record), expected)


def test_permutations_with_every_token_an_example_are_refused():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, input_ids, attention_mask=None):  # (batch, tokens) -> (batch, tokens, 4)
            return self.proj(nn.functional.one_hot(input_ids, 4).float())

    batch = {"input_ids": torch.randint(0, 4, (6, 5)), "attention_mask": torch.ones(6, 5, dtype=torch.long)}
    comparison = CKA(Tokens(), Tokens(), model1_layers=["proj"], model2_layers=["proj"], tokens="all", progress=False)
    with pytest.raises(ValueError, match=r"permutations= cannot be combined with tokens='all'.*exchangeable"):
        comparison.compare([batch] * 3, permutations=100)
    assert comparison.compare([batch] * 12, bootstrap=100).ci_low.shape == (1, 1)  # intervals are fine
    # a TorchModel with its own tokens="all" is caught at its first batch
    from cka.frontends.torch import TorchModel

    own = TorchModel(Tokens(), layers=["proj"], tokens="all")
    with pytest.raises(ValueError, match="tokens='all'"):
        CKA(own, TorchModel(Tokens(), layers=["proj"], tokens="all"), progress=False).compare([batch], permutations=100)


# --------------------------------------------------------------------------------------------
# JAX streaming API
# --------------------------------------------------------------------------------------------


def _jax_batches(rng):
    xs = [[rng.normal(size=(16, 5)), rng.normal(size=(16, 3))] for _ in range(6)]
    xs.append([rng.normal(size=(11, 5)), rng.normal(size=(11, 3))])  # a ragged last batch
    ys = [[x[0][:, :2] + rng.normal(size=(len(x[0]), 2))] for x in xs]
    return xs, ys


def test_jax_stream_update_and_scan_equal_the_functional_api():
    import jax

    from cka.frontends import jax as ckj

    xs, ys = _jax_batches(np.random.default_rng(0))
    expected = cka.minibatch_cka_matrix(xs, ys, bootstrap=50, permutations=40, seed=3)
    stacked_x, masks = ckj.stack_batches(xs)
    stacked_y, _ = ckj.stack_batches(ys)
    start = ckj.init(2, 1, bootstrap=50, permutations=40)
    scanned = ckj.scan_update(start, stacked_x, stacked_y, masks, batch_index=0, seed=3)
    looped = start
    step = jax.jit(lambda s, a, b, m, i: ckj.update(s, a, b, m, batch_index=i, seed=3))  # a traced index
    for index, (x, y) in enumerate(zip(xs, ys, strict=True)):
        (px, mask), (py, _) = ckj.pad_batch(x, 16), ckj.pad_batch(y, 16)
        looped = step(looped, px, py, mask, index)
    for state in (scanned, looped):
        out = ckj.finalize_statistics(state)
        for name, a, b in zip(out._fields, out, expected, strict=True):
            np.testing.assert_allclose(np.asarray(a), b, atol=1e-12, rtol=0, err_msg=name)
    with pytest.raises(ValueError, match="pass batch_index="):
        ckj.update(start, [stacked_x[0][0], stacked_x[1][0]], [stacked_y[0][0]])
    with pytest.raises(ValueError, match="one index per batch"):
        ckj.scan_update(start, stacked_x, stacked_y, masks, batch_index=np.arange(3))


def test_jax_psum_over_two_devices_equals_one_device():
    code = textwrap.dedent(
        """
        import os, warnings
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        from jax.sharding import NamedSharding, PartitionSpec as P
        warnings.simplefilter("ignore")
        from cka.frontends import jax as ckj
        rng = np.random.default_rng(0)
        xs = [[rng.normal(size=(12, 4))] for _ in range(6)]
        ys = [[x[0][:, :2] + rng.normal(size=(12, 2))] for x in xs]
        sx, masks = ckj.stack_batches(xs)
        sy, _ = ckj.stack_batches(ys)
        one = ckj.scan_update(ckj.init(1, 1, bootstrap=30, permutations=20), sx, sy, masks, batch_index=0, seed=5)
        mesh = jax.make_mesh((2,), ("data",))
        def shard(state, sx, sy, masks, index):
            return ckj.psum(ckj.scan_update(state, sx, sy, masks, batch_index=index, seed=5), "data")
        run = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data"), P("data")),
                                    out_specs=P()))
        put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
        indices = jnp.arange(6, dtype=jnp.int32)  # each device's batches keep their global indices
        two = run(ckj.init(1, 1, bootstrap=30, permutations=20), [put(a) for a in sx], [put(a) for a in sy],
                  put(masks), put(indices))
        a, b = ckj.finalize_statistics(one), ckj.finalize_statistics(two)
        for name, u, v in zip(a._fields, a, b):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-12, rtol=0, err_msg=name)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_prints_intervals_and_p_values(tmp_path, capsys):
    from cka.cli import main

    models = tmp_path / "models.py"
    models.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def first():\n    torch.manual_seed(0)\n    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))\n\n"
        "def second():\n    torch.manual_seed(1)\n    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 4))\n"
    )
    common = ["--data", "synthetic:3x2x2", "--limit", "192", "--batch-size", "16", "--no-progress"]
    stats = ["--bootstrap", "100", "--permutations", "100", "--seed", "2"]
    assert main(["compare", f"{models}:first", *common, *stats, "--out", str(tmp_path / "a")]) == 0
    diagonal = capsys.readouterr().out
    assert "95% interval (bootstrap over 12 batches)" in diagonal and "p = " in diagonal
    layers = ["--layers1", "1", "3", "--layers2", "1", "2", "3"]
    args = ["compare", f"{models}:first", f"{models}:second", *layers, *common, *stats, "--out", str(tmp_path / "b")]
    assert main(args) == 0
    best = capsys.readouterr().out
    assert "best match" in best and "p(best) = " in best and "[" in best
    saved = cka.CKAResult.load(tmp_path / "b" / "cka.json")
    assert saved.p_value_best_row is not None and saved.settings["seed"] == 2
    assert main(["compare", f"{models}:first", *common, "--bootstrap", "-1", "--out", str(tmp_path / "c")]) == 2
    assert "bootstrap must be a non-negative int" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# CUDA (runs where a GPU is present)
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_compare_on_cuda_matches_cpu_without_a_sync_per_batch():
    batches = make_batches()
    expected = compare(batches, **OPTIONS)
    comparison = CKA(
        make_model(0), make_model(1), model1_layers=LAYERS, model2_layers=LAYERS, device="cuda", progress=False
    )
    result = comparison.compare([b.cuda() for b in batches], **OPTIONS)
    assert_same_statistics(result, expected, atol=1e-9)
