"""Feature capture for JAX models (cka.frontends.jax): Flax linen, Flax nnx, plain functions, layer
selection, and a Flax model against its PyTorch port through the ``CKA`` comparer."""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
jax.config.update("jax_enable_x64", True)  # as tests/conftest.py does for the whole suite

import cka.core  # noqa: E402
from cka.frontends import jax as ckj  # noqa: E402

ATOL = 1e-6  # float32 models: capture must equal the hand-written forward pass to float32 rounding


def _linen() -> object:
    return pytest.importorskip("flax.linen")


def _cnn_class():
    nn = _linen()

    class CNN(nn.Module):
        """conv -> relu (sown) -> conv -> relu -> flatten -> dense, NHWC."""

        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="conv1")(x))
            self.sow("intermediates", "relu1", x)
            x = nn.relu(nn.Conv(5, (3, 3), padding="SAME", name="conv2")(x))
            return nn.Dense(4, name="fc")(x.reshape(x.shape[0], -1))

    return CNN


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """NHWC convolution with SAME padding, by hand (lax), as the reference forward pass."""
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def _init(model: object, x: jax.Array, seed: int = 0) -> dict:
    """Variables of the shapes ``model.init`` gives, filled from numpy (``model.init`` itself compiles
    Flax's random initialisers, seconds on a CPU, and the weights' values do not matter here)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)


def _cnn_and_input() -> tuple[object, dict, jax.Array]:
    model = _cnn_class()()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(12, 6, 6, 3)), jnp.float32)
    return model, _init(model, x), x


def test_linen_capture_equals_a_hand_written_forward_pass() -> None:
    model, variables, x = _cnn_and_input()
    output, captured = ckj.capture_linen(model, variables, x)
    assert list(captured) == ["conv1", "relu1", "conv2", "fc", "__call__"]  # call order, model output last

    @jax.jit
    def by_hand(p: dict, x: jax.Array) -> dict:
        conv1 = _conv(x, p["conv1"]["kernel"], p["conv1"]["bias"])
        conv2 = _conv(jax.nn.relu(conv1), p["conv2"]["kernel"], p["conv2"]["bias"])
        fc = jax.nn.relu(conv2).reshape(x.shape[0], -1) @ p["fc"]["kernel"] + p["fc"]["bias"]
        return {"conv1": conv1, "relu1": jax.nn.relu(conv1), "conv2": conv2, "fc": fc, "__call__": fc}

    for name, expected in by_hand(variables["params"], x).items():
        np.testing.assert_allclose(np.asarray(captured[name]), np.asarray(expected), rtol=0, atol=ATOL, err_msg=name)
    np.testing.assert_array_equal(np.asarray(output), np.asarray(captured["__call__"]))


def test_linen_mlp_with_a_module_called_twice_gets_numbered_names() -> None:
    nn = _linen()

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            shared = nn.Dense(5, name="shared")
            h = nn.tanh(shared(nn.Dense(5, name="inp")(x)))
            return nn.Dense(2, name="out")(nn.tanh(shared(h)))  # "shared" runs twice

    model, x = MLP(), jnp.asarray(np.random.default_rng(1).normal(size=(7, 3)), jnp.float32)
    variables = _init(model, x, seed=1)
    features = ckj.JaxModel.from_linen(model, variables, ["inp", "shared", "shared:1", "out"]).features(x)
    p = variables["params"]
    inp = x @ p["inp"]["kernel"] + p["inp"]["bias"]
    first = inp @ p["shared"]["kernel"] + p["shared"]["bias"]
    second = jnp.tanh(first) @ p["shared"]["kernel"] + p["shared"]["bias"]
    out = jnp.tanh(second) @ p["out"]["kernel"] + p["out"]["bias"]
    for name, expected in (("inp", inp), ("shared", first), ("shared:1", second), ("out", out)):
        np.testing.assert_allclose(np.asarray(features[name]), np.asarray(expected), rtol=0, atol=ATOL, err_msg=name)


def test_nnx_capture_equals_forward_pass_and_leaves_the_model_alone() -> None:
    nnx = pytest.importorskip("flax.nnx")

    rng = np.random.default_rng(2)

    def normal(key: jax.Array, shape: tuple[int, ...], dtype: object = jnp.float32) -> jax.Array:
        return jnp.asarray(rng.normal(size=shape), dtype)  # no jax.random: nothing to compile

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.l1 = nnx.Linear(6, 16, kernel_init=normal, bias_init=normal, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.l2 = nnx.Linear(16, 4, kernel_init=normal, bias_init=normal, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            h = nnx.relu(self.l1(x))
            self.sow(nnx.Intermediate, "hidden", h)
            return self.l2(self.drop(h))

    model = MLP(nnx.Rngs(0))
    x = rng.normal(size=(9, 6)).astype(np.float32)
    extractor = ckj.JaxModel.from_nnx(model, example=x)
    assert extractor.layer_names() == ["drop", "hidden", "l1", "l2", "__call__"]
    features = extractor.features(x)
    h = jax.nn.relu(x @ model.l1.kernel[...] + model.l1.bias[...])
    out = h @ model.l2.kernel[...] + model.l2.bias[...]
    # dropout is the identity: the copy ran in eval mode
    for name, expected in (("hidden", h), ("drop", h), ("l2", out), ("__call__", out)):
        np.testing.assert_allclose(np.asarray(features[name]), np.asarray(expected), rtol=0, atol=ATOL, err_msg=name)
    assert model.drop.deterministic is False  # the user's model still trains
    assert not hasattr(model, "__captures__")


def test_plain_function_with_params_and_selection_rules() -> None:
    def forward(params: dict, x: jax.Array) -> tuple[jax.Array, dict]:
        h = jnp.tanh(x @ params["w1"])
        return h @ params["w2"], {"block": {"pre": x @ params["w1"], "act": h}, "head": h @ params["w2"]}

    rng = np.random.default_rng(3)
    params = {"w1": jnp.asarray(rng.normal(size=(4, 6))), "w2": jnp.asarray(rng.normal(size=(6, 2)))}
    x = jnp.asarray(rng.normal(size=(5, 4)))
    model = ckj.JaxModel(forward, ["head", "block.*"], params=params, example=x)
    assert model.layer_names() == ["head", "block.pre", "block.act"]
    features = model.features(x)
    np.testing.assert_allclose(np.asarray(features["block.act"]), np.tanh(np.asarray(x @ params["w1"])), atol=1e-12)
    assert ckj.JaxModel(forward, lambda name: name.endswith("act"), params=params, example=x).layer_names() == ["block.act"]

    # the wording every frontend shares (cka.frontends._common.select_names)
    with pytest.raises(ValueError, match=r"layers: forward has no layer named 'block\.ac'; close matches: \['block\.act'"):
        ckj.JaxModel(forward, ["block.ac"], params=params, example=x)
    with pytest.raises(ValueError, match=r"'conv\*' selects no layer of forward"):
        ckj.JaxModel(forward, "conv*", params=params, example=x)
    with pytest.raises(ValueError, match=r"layer 'head' is selected twice \(by 'head' and 'h\*'\)"):
        ckj.JaxModel(forward, ["head", "h*"], params=params, example=x)
    with pytest.raises(ValueError, match=r"layer 'head' is selected twice \(by 'head' and 'head'\)"):
        ckj.JaxModel(forward, ["head", "head"], params=params)  # exact names, no trace: checked at once
    with pytest.raises(ValueError, match="pass example="):
        ckj.JaxModel(forward, "block.*", params=params)
    unchecked = ckj.JaxModel(forward, ["head", "missing"], params=params)  # exact names: checked when run
    with pytest.raises(ValueError, match="'missing'"):
        unchecked.features(x)


def test_flatten_intermediates_names() -> None:
    tree = {"__call__": (1,), "a": {"__call__": (2, 3), "s": (4,)}, "layers": {0: {"__call__": (5,)}}}
    assert ckj.flatten_intermediates(tree) == {"a": 2, "a:1": 3, "a.s": 4, "layers.0": 5, "__call__": 1}


def _torch_port(torch, params: dict):
    """The CNN of _cnn_class in PyTorch, with the Flax weights copied across (NCHW, OIHW)."""
    nn = torch.nn

    class TorchCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3, padding=1)
            self.relu1, self.fc = nn.ReLU(), nn.Linear(5 * 6 * 6, 4)

        def forward(self, x):
            x = torch.relu(self.conv2(self.relu1(self.conv1(x))))
            return self.fc(x.permute(0, 2, 3, 1).flatten(1))  # flatten in Flax's NHWC order

    port = TorchCNN()
    with torch.no_grad():
        for name in ("conv1", "conv2"):
            getattr(port, name).weight.copy_(torch.tensor(np.asarray(params[name]["kernel"]).transpose(3, 2, 0, 1)))
            getattr(port, name).bias.copy_(torch.tensor(np.asarray(params[name]["bias"])))
        port.fc.weight.copy_(torch.tensor(np.asarray(params["fc"]["kernel"]).T))
        port.fc.bias.copy_(torch.tensor(np.asarray(params["fc"]["bias"])))
    return port


def test_flax_model_and_its_pytorch_port_have_cka_one_on_the_diagonal() -> None:
    torch = pytest.importorskip("torch")
    frontend = pytest.importorskip("cka.frontends.torch")
    model, variables, _ = _cnn_and_input()
    port = _torch_port(torch, variables["params"])
    images = torch.from_numpy(np.random.default_rng(4).normal(size=(40, 3, 6, 6)).astype(np.float32))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=16)  # 16, 16, 8
    layers = ["conv1", "relu1", "conv2", "fc"]
    flax_side = ckj.JaxModel.from_linen(model, variables, layers, inputs=lambda batch: batch[0].permute(0, 2, 3, 1))
    grams = flax_side.grams((images[:16],), functools.partial(cka.core.gram, kernel="linear", check=False))
    assert isinstance(grams, jax.Array) and grams.shape == (4, 16, 16)  # one stack, from the jitted program

    for first, second in ((port, flax_side), (flax_side, port)):  # a JAX extractor on either side
        comparer = frontend.CKA(first, second, model1_layers=layers if first is port else None,
                                model2_layers=layers if second is port else None, progress=False)
        result = comparer.compare(loader)
        assert result.matrix.shape == (4, 4)
        assert np.diag(result.matrix).min() >= 0.9999
        assert result.matrix[0, 3] < 0.9  # different layers stay different
    assert result.model1_name == "CNN" and result.n_examples == 40
