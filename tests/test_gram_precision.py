"""Reduced-precision Grams (``gram_precision``): what each setting computes on numpy, torch and JAX,
that global TF32 flags are switched only around our own product and restored (also after an error),
and how far ``"bf16"`` moves CKA from the float64 value."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest

import cka
from cka import BiasedCKAWarning
from cka.backends import backend_for
from tests import reference as ref

PRECISIONS = ("highest", "tf32", "bf16")


def post_relu(rng, n: int, d: int) -> np.ndarray:
    return np.maximum(rng.normal(loc=1.0, size=(n, d)), 0.0)


def bf16_reference(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even to bfloat16 by ml_dtypes (a JAX dependency, so present in the test set-up)."""
    import ml_dtypes

    with np.errstate(invalid="ignore"):  # NaN payloads
        return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The argument
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["fp16", "HIGHEST", "", None, 32])
def test_unknown_precision_lists_the_three(xp, rng, bad):
    x = xp.asarray(rng.normal(size=(8, 3)))
    calls = [
        lambda: cka.gram(x, gram_precision=bad),
        lambda: cka.cka(x, x, gram_precision=bad),
        lambda: cka.feature_space_linear_cka(x, x, gram_precision=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"unknown gram_precision .*'highest'.*'tf32'.*'bf16'"):
            call()


def test_highest_is_the_default(xp, rng):
    x = xp.asarray(rng.normal(size=(16, 40)), "float32")
    np.testing.assert_array_equal(xp.to_numpy(cka.gram(x)), xp.to_numpy(cka.gram(x, gram_precision="highest")))


# ---------------------------------------------------------------------------------------------
# What each precision computes on the CPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tf32_equals_highest_on_cpu(xp, rng, dtype):
    x, y = rng.normal(size=(24, 70)), rng.normal(size=(24, 5))
    for kernel in cka.KERNELS:
        a = xp.to_numpy(cka.gram(xp.asarray(x, dtype), kernel=kernel, gram_precision="tf32"))
        np.testing.assert_array_equal(a, xp.to_numpy(cka.gram(xp.asarray(x, dtype), kernel=kernel)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiasedCKAWarning)
        for a, b in ((x, y), (x[:, :5], y)):  # the Gram and the feature-space paths
            tf32 = cka.cka(xp.asarray(a, dtype), xp.asarray(b, dtype), gram_precision="tf32")
            assert float(tf32) == float(cka.cka(xp.asarray(a, dtype), xp.asarray(b, dtype)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bf16_rounds_the_centred_features_and_accumulates_in_float32(xp, rng, dtype):
    x = post_relu(rng, 32, 200).astype(dtype)
    got = xp.to_numpy(cka.gram(xp.asarray(x, dtype), gram_precision="bf16"))
    centred = x - x.astype(np.float64).mean(0).astype(dtype)  # the centring happens before the rounding
    rounded = bf16_reference(centred).astype(np.float64)
    expected = rounded @ rounded.T
    # exact products of bfloat16 values, summed in float32 (200 terms): float32 rounding of the sums only
    np.testing.assert_allclose(got, expected, rtol=0, atol=3e-6 * np.abs(expected).max())
    highest = xp.to_numpy(cka.gram(xp.asarray(x, dtype)))
    assert np.abs(got - highest).max() > 1e-4 * np.abs(highest).max()  # bfloat16 really was used
    assert str(cka.gram(xp.asarray(x, dtype), gram_precision="bf16").dtype).endswith("float64")  # handed on in float64


def test_numpy_bfloat16_rounding_is_bit_exact_with_torch_and_ml_dtypes(rng):
    torch = pytest.importorskip("torch")
    from cka.backends.numpy import round_to_bfloat16

    specials = np.array(
        [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1 + 2**-8 + 2**-16, -(1 + 2**-8), 3.4e38, -3.4e38, 1e-40, -1e-45,
         1.17e-38, np.inf, -np.inf, np.nan, 65504.0, 2**-126],
        dtype=np.float32,
    )  # ties to even both ways, overflow to inf, subnormals, signed zero, NaN
    bits = rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([specials, rng.normal(size=5000).astype(np.float32), bits])
    ours = round_to_bfloat16(values)
    assert ours.dtype == np.float32
    theirs_torch = torch.from_numpy(values.copy()).to(torch.bfloat16).to(torch.float32).numpy()
    nan = np.isnan(values)
    assert np.isnan(ours[nan]).all() and np.isnan(theirs_torch[nan]).all()
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), theirs_torch[~nan].view(np.uint32))
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), bf16_reference(values)[~nan].view(np.uint32))


@pytest.mark.parametrize("form", ["gram", "feature-space", "minibatch"])
def test_bf16_deviation_from_float64_is_small_but_real(xp, rng, form):
    """On ordinary (post-ReLU, float32) features bf16 Grams move CKA by well under 5e-3 from the float64
    value of the same inputs: centring first keeps the rounded entries small, and everything after the
    product is float64."""
    n, d = (64, 512) if form != "feature-space" else (512, 24)
    deviations, moved = [], []
    for _ in range(3):
        x = post_relu(rng, n, d).astype(np.float32)
        y = np.maximum(x[:, : d // 2] @ rng.normal(size=(d // 2, d // 2)) / np.sqrt(d) + rng.normal(size=(n, d // 2)), 0)
        y = y.astype(np.float32)
        if form == "minibatch":
            halves = [slice(0, n // 2), slice(n // 2, n)]

            def run(precision, x=x, y=y, halves=halves):
                state = cka.init_state(1, 1, like=xp.asarray(x))
                for h in halves:
                    gx = cka.gram(xp.asarray(x[h], "float32"), gram_precision=precision)
                    gy = cka.gram(xp.asarray(y[h], "float32"), gram_precision=precision)
                    state = cka.update_state_from_grams(state, [gx], [gy])
                return float(cka.finalize(state)[0, 0])

            expected = float(ref.minibatch_cka_matrix([[x[h]] for h in halves], [[y[h]] for h in halves])[0, 0])
            low, high = run("bf16"), run("highest")
        else:
            expected = ref.cka(x - x.astype(np.float64).mean(0), y - y.astype(np.float64).mean(0), unbiased=True)
            low = float(cka.cka(xp.asarray(x, "float32"), xp.asarray(y, "float32"), unbiased=True, gram_precision="bf16"))
            high = float(cka.cka(xp.asarray(x, "float32"), xp.asarray(y, "float32"), unbiased=True))
        deviations.append(abs(low - expected))
        moved.append(abs(low - high))
        assert abs(high - expected) < 1e-6
    assert max(deviations) < 5e-3, deviations
    assert max(moved) > 1e-7, moved  # the setting does something


# ---------------------------------------------------------------------------------------------
# Half-precision inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_torch_features_keep_their_float32_gram_unless_bf16_is_asked(rng, half):
    torch = pytest.importorskip("torch")
    x = torch.tensor(post_relu(rng, 16, 300), dtype=getattr(torch, half))
    highest = cka.gram(x)
    assert highest.dtype == torch.float64
    assert torch.equal(highest, cka.gram(x.float()))  # the product ran in float32
    low = cka.gram(x, gram_precision="bf16")
    assert torch.equal(low, cka.gram(x.float(), gram_precision="bf16"))
    assert not torch.equal(low, highest)


def test_half_precision_numpy_features_keep_their_float32_gram(rng):
    x = post_relu(rng, 16, 300).astype(np.float16)
    np.testing.assert_array_equal(cka.gram(x), cka.gram(x.astype(np.float32)))


# ---------------------------------------------------------------------------------------------
# Global flags: switched only around our product, always restored
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def torch_flags():
    """The process-wide matmul/cuDNN precision flags, saved and put back after the test."""
    torch = pytest.importorskip("torch")
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision)
    yield torch
    matmul.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision = saved


def snapshot(torch) -> dict:
    return {
        "matmul": torch.backends.cuda.matmul.fp32_precision,
        "cudnn": torch.backends.cudnn.fp32_precision,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "generic": torch.backends.fp32_precision,
        "mkldnn": torch.backends.mkldnn.matmul.fp32_precision,
    }


def spy_on_products(monkeypatch, torch, fail: bool = False) -> list:
    """Record the CUDA matmul flag while each of our products runs (optionally raising inside it)."""
    backend = backend_for("torch")
    seen: list = []
    original = backend._matmul

    def spy(a, b, precision):
        seen.append(torch.backends.cuda.matmul.fp32_precision)
        if fail:
            raise RuntimeError("boom inside the product")
        return original(a, b, precision)

    monkeypatch.setattr(backend, "_matmul", spy)
    return seen


@pytest.mark.parametrize("user_setting", ["none", "ieee", "tf32"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_torch_tf32_flag_is_set_only_around_our_product_and_restored(torch_flags, monkeypatch, rng, user_setting, precision):
    torch = torch_flags
    torch.backends.cuda.matmul.fp32_precision = user_setting
    before = snapshot(torch)
    seen = spy_on_products(monkeypatch, torch)
    cka.gram(torch.tensor(rng.normal(size=(8, 20))), gram_precision=precision)
    cka.cka(torch.tensor(rng.normal(size=(30, 4))), torch.tensor(rng.normal(size=(30, 3))), gram_precision=precision)
    assert seen and set(seen) == {"tf32" if precision == "tf32" else ("ieee" if user_setting == "tf32" else user_setting)}
    assert snapshot(torch) == before


@pytest.mark.parametrize("precision", PRECISIONS)
def test_torch_flags_are_restored_after_an_error_inside_the_product(torch_flags, monkeypatch, rng, precision):
    torch = torch_flags
    torch.backends.cuda.matmul.fp32_precision = "tf32" if precision != "tf32" else "ieee"  # so that we must switch
    before = snapshot(torch)
    seen = spy_on_products(monkeypatch, torch, fail=True)
    with pytest.raises(RuntimeError, match="boom inside the product"):
        cka.gram(torch.tensor(rng.normal(size=(8, 20))), gram_precision=precision)
    assert seen == ["tf32" if precision == "tf32" else "ieee"]
    assert snapshot(torch) == before


def test_legacy_torch_flag_is_switched_and_restored(monkeypatch, rng):
    """torch < 2.9 has only ``torch.backends.cuda.matmul.allow_tf32``."""
    torch = pytest.importorskip("torch")
    legacy = types.SimpleNamespace(allow_tf32=False)
    monkeypatch.setattr(torch.backends.cuda, "matmul", legacy)
    backend = backend_for("torch")
    seen: list = []
    original = backend._matmul

    def spy(a, b, precision):
        seen.append(legacy.allow_tf32)
        if len(seen) == 2:
            raise RuntimeError("boom")
        return original(a, b, precision)

    monkeypatch.setattr(backend, "_matmul", spy)
    x = torch.tensor(rng.normal(size=(8, 20)))
    cka.gram(x, gram_precision="tf32")
    with pytest.raises(RuntimeError, match="boom"):
        cka.gram(x, gram_precision="tf32")
    assert seen == [True, True] and legacy.allow_tf32 is False
    legacy.allow_tf32 = True  # the user's TF32: "highest" switches it off around the product only
    seen.clear()
    cka.gram(x, gram_precision="highest")
    assert seen == [False] and legacy.allow_tf32 is True


def test_jax_products_name_their_precision_and_leave_the_global_default(rng):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from cka.kernels import _gram_impl

    x = jnp.asarray(rng.normal(size=(8, 20)), dtype=jnp.float32)
    before = jax.config.jax_default_matmul_precision
    texts = {p: str(jax.make_jaxpr(lambda a, p=p: _gram_impl(a, "linear", None, 0.8, None, p))(x)) for p in PRECISIONS}
    assert "Precision.HIGHEST" in texts["highest"] and "Precision.HIGH," in texts["tf32"]
    assert "bf16" in texts["bf16"] and "preferred_element_type=float32" in texts["bf16"]
    with jax.default_matmul_precision("bfloat16"):  # a user's global setting does not lower "highest"
        inside = np.asarray(cka.gram(x))
    np.testing.assert_array_equal(inside, np.asarray(cka.gram(x)))
    assert jax.config.jax_default_matmul_precision == before


@pytest.mark.cuda
def test_cuda_precisions(rng):
    torch = pytest.importorskip("torch")
    x = torch.tensor(post_relu(rng, 256, 4096), dtype=torch.float32, device="cuda")
    highest, tf32, bf16 = (cka.gram(x, gram_precision=p) for p in PRECISIONS)
    scale = highest.abs().max()
    assert (tf32 - highest).abs().max() < 1e-2 * scale and (bf16 - highest).abs().max() < 2e-2 * scale
    assert not torch.equal(bf16, highest)
    flag = torch.backends.cuda.matmul.fp32_precision
    y = torch.relu(x[:, :1024] @ torch.randn(1024, 512, device="cuda") / 32)
    for p in PRECISIONS:
        value = float(cka.cka(x, y, unbiased=True, gram_precision=p))
        assert value == pytest.approx(float(cka.cka(x.double(), y.double(), unbiased=True)), abs=5e-3)
    assert torch.backends.cuda.matmul.fp32_precision == flag


def test_comparer_takes_gram_precision_and_records_it():
    """CKA(..., gram_precision=) runs the hooked Grams at that precision: "tf32" equals "highest" on
    the CPU, "bf16" moves the matrix by a little (within 5e-3), and anything else is refused."""
    import torch
    from torch import nn

    from cka import CKA

    torch.manual_seed(0)
    model1 = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    model2 = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    batches = [torch.randn(32, 16) for _ in range(3)]
    layers = ["0", "1", "2"]

    def run(precision: str):
        comparison = CKA(model1, model2, model1_layers=layers, model2_layers=layers, progress=False,
                         gram_precision=precision)
        return comparison.compare(batches)

    highest, tf32, bf16 = run("highest"), run("tf32"), run("bf16")
    np.testing.assert_array_equal(tf32.matrix, highest.matrix)
    assert 0 < np.abs(bf16.matrix - highest.matrix).max() < 5e-3
    assert bf16.settings["gram_precision"] == "bf16" and "gram_precision" not in highest.settings
    with pytest.raises(ValueError, match="highest.*tf32.*bf16"):
        CKA(model1, model2, gram_precision="fp8")
