"""The PyTorch frontend, as a specification: what `CKA(model1, model2, ...)` selects, computes and refuses.

Every numeric check compares against a float64 reference built from features captured
independently here (plain forward hooks, no cka code) and fed to `cka.minibatch_cka_matrix`.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cka
from cka import CKA, CKAResult
from cka.frontends.torch import LayerCalledTwiceWarning, TorchModel, default_layers, first_tensor, select_layers
from tests.models import FakeModelOutput, MultiOutputNet, ReorderedNet, ResidualCNN, TinyTransformer, mlp

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --------------------------------------------------------------------------------------------
# Helpers: data and an independent float64 reference
# --------------------------------------------------------------------------------------------


def images(n: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def loader_of(x: torch.Tensor, batch_size: int = 16, **kwargs) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=batch_size, **kwargs)


def trained_like(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random init with BatchNorm statistics from a few train-mode passes, then eval."""
    model.train()
    with torch.no_grad():
        for chunk in x.split(16):
            model(chunk)
    return model.eval()


def captured(model: nn.Module, layers: list[str], batches: list, call=lambda m, b: m(b), pick=lambda o: o) -> list:
    """Per batch, the float64 outputs of ``layers`` (first call), captured with plain hooks."""
    modules = dict(model.named_modules())
    out = []
    for batch in batches:
        store: dict = {}
        handles = [modules[n].register_forward_hook(lambda m, a, o, n=n, store=store: store.setdefault(n, o))
                   for n in layers]
        try:
            with torch.no_grad():
                call(model, batch)
        finally:
            for h in handles:
                h.remove()
        out.append([pick(store[n]).double() for n in layers])
    return out


def reference(model1, layers1, model2, layers2, batches1, batches2=None, **kwargs) -> np.ndarray:
    xs = captured(model1, layers1, batches1, **kwargs)
    ys = captured(model2, layers2, batches2 if batches2 is not None else batches1, **kwargs)
    return cka.minibatch_cka_matrix(xs, ys).numpy()


@pytest.fixture(scope="module")
def cnns():
    torch.manual_seed(0)
    x = images(64, seed=1)
    return trained_like(ResidualCNN(8, (2, 1)), x), trained_like(ResidualCNN(8, (1, 2)), x)


BLOCKS1 = ["conv1", "layer1.0", "layer1.1", "layer2.0", "fc"]
BLOCKS2 = ["conv1", "layer1.0", "layer2.0", "layer2.1", "fc"]


# --------------------------------------------------------------------------------------------
# The computed matrix
# --------------------------------------------------------------------------------------------


def test_matrix_equals_float64_reference_from_independent_features(cnns):
    m1, m2 = cnns
    x = images(48)
    result = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False).compare(loader_of(x))
    expected = reference(m1, BLOCKS1, m2, BLOCKS2, list(x.split(16)))
    assert result.matrix.shape == (5, 5)
    # float32 Gram of centred features vs all-float64: agree to ~1e-7 (DESIGN.md)
    np.testing.assert_allclose(result.matrix, expected, atol=1e-6, rtol=0)
    assert result.n_examples == 48 and result.settings["n_batches"] == 3


def test_float64_models_match_the_reference_to_rounding(cnns):
    m1, m2 = (copy.deepcopy(m).double() for m in cnns)
    x = images(48).double()
    result = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False).compare(loader_of(x))
    expected = reference(m1, BLOCKS1, m2, BLOCKS2, list(x.split(16)))
    np.testing.assert_allclose(result.matrix, expected, atol=1e-12, rtol=0)


def test_same_model_twice_has_unit_diagonal(cnns):
    m1, _ = cnns
    result = CKA(m1, m1, model1_layers=BLOCKS1, model2_layers=BLOCKS1, progress=False).compare(loader_of(images()))
    np.testing.assert_allclose(np.diag(result.matrix), 1.0, atol=1e-6)
    np.testing.assert_allclose(result.matrix, result.matrix.T, atol=1e-12)


def test_two_layer_toy_case_computed_by_hand():
    # u, v: orthogonal, centred, |u|^2 = |v|^2 = 4. Layer "a" outputs [u v], layer "b" outputs u.
    # By hand (DESIGN.md's HSIC_1 with n = 4): HSIC(a, b) = 4/3, HSIC(a, a) = HSIC(b, b) = 8/3,
    # so CKA(a, b) = (4/3) / (8/3) = 1/2 (the biased estimator would give 1/sqrt(2)).
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Identity(), nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)[:, :1])

    x = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]]) + 5.0  # offset: centring is free
    model = Toy()
    result = CKA(model, model, model1_layers=["a", "b"], model2_layers=["a", "b"], progress=False).compare([x])
    np.testing.assert_allclose(result.matrix, [[1.0, 0.5], [0.5, 1.0]], atol=1e-12)


def test_results_do_not_depend_on_batch_order(cnns):
    m1, m2 = cnns
    batches = list(images(64).split(16))
    forward = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False).compare(batches)
    backward = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False).compare(batches[::-1])
    np.testing.assert_allclose(forward.matrix, backward.matrix, atol=1e-12)


def test_rbf_kernel_and_biased_estimator_match_the_core(cnns):
    m1, m2 = cnns
    x = images(32)
    xs = captured(m1, BLOCKS1, list(x.split(16)))
    ys = captured(m2, BLOCKS2, list(x.split(16)))
    for kwargs in ({"kernel": "rbf", "sigma_frac": 0.5}, {"unbiased": False}):
        got = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False, **kwargs).compare(loader_of(x))
        expected = cka.minibatch_cka_matrix(xs, ys, **kwargs).numpy()
        np.testing.assert_allclose(got.matrix, expected, atol=1e-6)
        assert got.settings["unbiased"] == kwargs.get("unbiased", True)


def test_small_transformer_with_dict_batches_and_token_reduction():
    torch.manual_seed(0)
    m1, m2 = TinyTransformer(depth=2), TinyTransformer(depth=3)
    ids = torch.randint(0, 20, (24, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    batches = [{"input_ids": i, "attention_mask": a} for i, a in zip(ids.split(8), mask.split(8), strict=True)]
    assert default_layers(m1) == ["layers.0", "layers.1"]
    run = CKA(m1, m2, reduce="b t d -> b d", progress=False)
    result = run.compare(batches)
    assert result.model2_layers == ("layers.0", "layers.1", "layers.2")

    def call(m, b):
        return m(**b)

    expected = reference(m1, ["layers.0", "layers.1"], m2, ["layers.0", "layers.1", "layers.2"], batches,
                         call=call, pick=lambda o: o.mean(1))
    np.testing.assert_allclose(result.matrix, expected, atol=1e-6)
    # without a reduction, each example's (t, d) tokens are flattened: a different, still valid number
    flat = CKA(m1, m2, progress=False).compare(batches)
    expected_flat = reference(m1, ["layers.0", "layers.1"], m2, ["layers.0", "layers.1", "layers.2"], batches, call=call)
    np.testing.assert_allclose(flat.matrix, expected_flat, atol=1e-6)


def test_two_datasets_model2_sees_the_second_loader(cnns):
    m1, m2 = cnns
    x1, x2 = images(32, seed=3), images(32, seed=4)
    result = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False).compare(loader_of(x1), loader_of(x2))
    expected = reference(m1, BLOCKS1, m2, BLOCKS2, list(x1.split(16)), list(x2.split(16)))
    np.testing.assert_allclose(result.matrix, expected, atol=1e-6)


def test_same_model_on_two_datasets_keeps_each_pass_separate(cnns):
    m1, _ = cnns
    x1, x2 = images(32, seed=3), images(32, seed=4)
    result = CKA(m1, m1, model1_layers=BLOCKS1, model2_layers=BLOCKS1, progress=False).compare(loader_of(x1), loader_of(x2))
    expected = reference(m1, BLOCKS1, m1, BLOCKS1, list(x1.split(16)), list(x2.split(16)))
    np.testing.assert_allclose(result.matrix, expected, atol=1e-6)
    assert np.all(np.diag(result.matrix) < 0.999)  # different data: not the trivial diagonal


# --------------------------------------------------------------------------------------------
# The predecessor's silent-wrong-result bugs
# --------------------------------------------------------------------------------------------


def test_rows_follow_the_labels_not_hook_firing_order():
    torch.manual_seed(0)
    model = ReorderedNet()  # named_modules: late, early; forward: early, late
    x = torch.randn(32, 6)
    result = CKA(model, mlp((6, 5, 4)), model1_layers=["late", "early"], model2_layers=["0", "2"], progress=False).compare([x[:16], x[16:]])
    assert result.model1_layers == ("late", "early")
    expected = reference(model, ["late", "early"], mlp((6, 5, 4)), ["0", "2"], [x[:16], x[16:]])
    np.testing.assert_allclose(result.matrix, expected, atol=1e-6)
    # the same through a pattern: rows in named_modules() order, labels alike
    by_pattern = CKA(model, mlp((6, 5, 4)), model1_layers="*l*", model2_layers=["0", "2"], progress=False).compare([x[:16], x[16:]])
    assert by_pattern.model1_layers == ("late", "early")
    np.testing.assert_allclose(by_pattern.matrix, expected, atol=1e-12)


def test_same_model_object_on_both_sides_equals_an_independent_copy(cnns):
    m1, _ = cnns
    layers2 = ["layer1.1", "conv1", "fc"]  # different from, and overlapping with, side 1
    x = images(48)
    same = CKA(m1, m1, model1_layers=BLOCKS1, model2_layers=layers2, progress=False).compare(loader_of(x))
    copied = CKA(m1, copy.deepcopy(m1), model1_layers=BLOCKS1, model2_layers=layers2, progress=False).compare(loader_of(x))
    np.testing.assert_allclose(same.matrix, copied.matrix, atol=1e-12)
    assert same.model2_layers == tuple(layers2)


def test_one_forward_pass_serves_both_sides_of_the_same_model(cnns):
    m1, _ = cnns
    calls = []
    handle = m1.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        CKA(m1, m1, model1_layers=BLOCKS1, model2_layers=["fc"], progress=False).compare(loader_of(images(48)))
    finally:
        handle.remove()
    assert len(calls) == 3  # 3 batches, not 6


class CountingLoader:
    """An iterable that shuffles on every iteration and counts iterations."""

    def __init__(self, x: torch.Tensor, batch_size: int = 16) -> None:
        self.x, self.batch_size, self.iterations = x, batch_size, 0

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self):
        self.iterations += 1
        order = torch.randperm(len(self.x))
        return iter(self.x[order].split(self.batch_size))


def test_one_iteration_of_a_shuffling_loader_feeds_both_models(cnns):
    m1, _ = cnns
    twin = copy.deepcopy(m1)  # a different object with equal weights: identical features when paired
    loader = CountingLoader(images(48))
    result = CKA(m1, twin, model1_layers=BLOCKS1, model2_layers=BLOCKS1, progress=False).compare(loader)
    assert loader.iterations == 1
    np.testing.assert_allclose(np.diag(result.matrix), 1.0, atol=1e-6)
    shuffled = DataLoader(TensorDataset(images(48), torch.zeros(48)), batch_size=16, shuffle=True)
    result = CKA(m1, twin, model1_layers=BLOCKS1, model2_layers=BLOCKS1, progress=False).compare(shuffled)
    np.testing.assert_allclose(np.diag(result.matrix), 1.0, atol=1e-6)


def test_a_bare_tensor_batch_is_not_unpacked_along_the_batch_axis(cnns):
    m1, m2 = cnns
    x = images(48)
    as_tensors = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False).compare(list(x.split(16)))
    as_tuples = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False).compare(loader_of(x))
    np.testing.assert_allclose(as_tensors.matrix, as_tuples.matrix, atol=1e-12)
    assert as_tensors.n_examples == 48


def test_a_module_called_twice_records_its_first_call_and_warns(cnns):
    m1, _ = cnns  # layer1.0.relu runs twice per forward (inside the block and after the residual add)
    x = images(32)
    with pytest.warns(LayerCalledTwiceWarning, match=r"layer1\.0\.relu.*first call"):
        result = CKA(m1, m1, model1_layers=["layer1.0.relu", "layer1.0.bn1"], model2_layers=["layer1.0"],
                     progress=False).compare(loader_of(x))
    expected_first = reference(m1, ["layer1.0.relu", "layer1.0.bn1"], m1, ["layer1.0"], list(x.split(16)))
    np.testing.assert_allclose(result.matrix, expected_first, atol=1e-6)
    # first call = relu(bn1(.)), so its CKA with the block output (the second call) is below 1
    assert result.matrix[0, 0] < 0.99


# --------------------------------------------------------------------------------------------
# Layer selection
# --------------------------------------------------------------------------------------------


def test_default_selection_is_the_repeated_blocks():
    assert default_layers(ResidualCNN(8, (2, 1))) == ["layer1.0", "layer1.1", "layer2.0"]
    assert default_layers(TinyTransformer(depth=3)) == ["layers.0", "layers.1", "layers.2"]
    nested = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Sequential(nn.Linear(2, 2))))
    assert default_layers(nested) == ["1.0", "1.1"]  # a stage of blocks is searched, not selected


def test_default_without_blocks_is_every_leaf_but_identities():
    assert default_layers(MultiOutputNet()) == ["tuple_layer.linear", "dict_layer.linear", "head"]
    assert default_layers(mlp((4, 3, 2))) == ["0", "1", "2"]
    assert default_layers(nn.Linear(3, 2)) == [""]


def test_every_selection_form():
    model = ResidualCNN(8, (2, 1))
    assert select_layers(model, ["fc", "conv1"]) == ["fc", "conv1"]  # rows follow the list
    assert select_layers(model, "layer1.0") == ["layer1.0"]
    assert select_layers(model, "layer*.conv?") == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1",
                                                    "layer1.1.conv2", "layer2.0.conv1", "layer2.0.conv2"]
    assert select_layers(model, nn.Linear) == ["fc"]
    assert select_layers(model, lambda name, m: isinstance(m, nn.BatchNorm2d) and name.startswith("layer2")) == [
        "layer2.0.bn1", "layer2.0.bn2"]
    assert select_layers(model, ["conv1", nn.AdaptiveAvgPool2d, "layer2.*.bn2"]) == ["conv1", "pool", "layer2.0.bn2"]
    assert select_layers(model, [""]) == [""]  # the model itself


def test_selection_forms_run_end_to_end():
    torch.manual_seed(0)
    model = trained_like(ResidualCNN(8, (2, 1)), images(32, seed=5))
    x = images(32)
    result = CKA(model, model, model1_layers=nn.Conv2d, model2_layers=lambda n, m: n.endswith("bn2"),
                 progress=False).compare(loader_of(x))
    assert result.model1_layers[0] == "conv1" and len(result.model1_layers) == 7
    assert result.model2_layers == ("layer1.0.bn2", "layer1.1.bn2", "layer2.0.bn2")
    expected = reference(model, list(result.model1_layers), model, list(result.model2_layers), list(x.split(16)))
    np.testing.assert_allclose(result.matrix, expected, atol=1e-6)


def test_unknown_name_lists_close_matches():
    # one wording for every frontend (cka.frontends._common.select_names)
    with pytest.raises(ValueError, match=r"model1_layers: ResidualCNN has no layer named 'layer1\.0\.conv3'; close matches: "
                                         r"\['layer1\.0\.conv2', 'layer1\.0\.conv1',.*named_modules\(\)"):
        CKA(ResidualCNN(), mlp(), model1_layers=["layer1.0.conv3"])
    with pytest.raises(ValueError, match=r"model2_layers: 'blocks\.\*' selects no layer of ResidualCNN"):
        CKA(ResidualCNN(), ResidualCNN(), model2_layers="blocks.*")
    with pytest.raises(ValueError, match=r"model1_layers: Conv3d selects no layer"):
        CKA(ResidualCNN(), mlp(), model1_layers=[nn.Conv3d])


def test_duplicate_layers_are_refused():
    with pytest.raises(ValueError, match=r"model1_layers: layer 'fc' is selected twice \(by 'fc' and 'fc'\)"):
        CKA(ResidualCNN(), mlp(), model1_layers=["fc", "conv1", "fc"])
    with pytest.raises(ValueError, match=r"layer 'fc' is selected twice \(by 'fc' and Linear\)"):
        select_layers(ResidualCNN(), ["fc", nn.Linear])
    with pytest.raises(ValueError, match="is empty"):
        select_layers(ResidualCNN(), [])
    with pytest.raises(TypeError, match=r"each entry must be .* got int 3"):
        select_layers(ResidualCNN(), [3])


def test_a_selected_layer_that_never_runs_is_named():
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match=r"\['unused'\] of ReorderedNet never ran in the forward pass"):
        CKA(ReorderedNet(), mlp((6, 4)), model1_layers=["early", "unused"], progress=False).compare([torch.randn(8, 6)])


def test_not_a_module_is_refused():
    with pytest.raises(TypeError, match=r"model2 must be a torch.nn.Module or a cka FeatureExtractor.*got numpy.ndarray"):
        CKA(mlp(), np.zeros(3))
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        TorchModel("resnet18")


# --------------------------------------------------------------------------------------------
# Outputs and reductions
# --------------------------------------------------------------------------------------------


def test_tuple_and_dict_outputs_use_the_first_tensor():
    torch.manual_seed(0)
    model = MultiOutputNet().eval()
    x = torch.randn(32, 6)
    result = CKA(model, model, model1_layers=["tuple_layer", "dict_layer"], model2_layers=["tuple_layer.linear", "head"],
                 progress=False).compare([x[:16], x[16:]])
    xs = captured(model, ["tuple_layer", "dict_layer"], [x[:16], x[16:]], pick=lambda o: o[0] if isinstance(o, tuple) else o["hidden"])
    ys = captured(model, ["tuple_layer.linear", "head"], [x[:16], x[16:]])
    np.testing.assert_allclose(result.matrix, cka.minibatch_cka_matrix(xs, ys).numpy(), atol=1e-6)
    np.testing.assert_allclose(result.matrix[0, 0], 1.0, atol=1e-6)  # tuple_layer[0] is tuple_layer.linear's output


def test_first_tensor_reads_model_outputs():
    t = torch.ones(2)
    assert first_tensor(FakeModelOutput(loss=None, logits=t)) is t
    assert first_tensor(([None, "x"], {"a": (t,)})) is t
    assert first_tensor(("no", 3)) is None


def test_output_selectors_index_key_callable_and_per_layer():
    torch.manual_seed(0)
    model = MultiOutputNet().eval()
    x = torch.randn(32, 6)
    batches = [x[:16], x[16:]]

    def run(output):
        return CKA(model, model, model1_layers=["tuple_layer", "dict_layer"], model2_layers=["dict_layer"],
                   output=output, progress=False).compare(batches).matrix

    logits = run({"tuple_layer": 0, "dict_layer": "logits"})
    by_callable = run(lambda o: o[0] if isinstance(o, tuple) else o["logits"])
    np.testing.assert_allclose(logits, by_callable, atol=1e-12)
    xs = captured(model, ["tuple_layer", "dict_layer"], batches, pick=lambda o: o[0] if isinstance(o, tuple) else o["logits"])
    ys = captured(model, ["dict_layer"], batches, pick=lambda o: o["logits"])
    np.testing.assert_allclose(logits, cka.minibatch_cka_matrix(xs, ys).numpy(), atol=1e-6)
    with pytest.raises(TypeError, match=r"layer 'dict_layer': its output is a FakeModelOutput and the output selector gave str"):
        run({"dict_layer": "note"})
    with pytest.raises(ValueError, match=r"output names layer\(s\) \['dict_layr'\] that are not selected on either side; close matches: \['dict_layer'"):
        run({"dict_layr": 0})


def test_reduce_pattern_per_layer_and_bad_pattern(cnns):
    m1, m2 = cnns
    x = images(32)
    pooled = CKA(m1, m2, model1_layers=["layer1.0", "fc"], model2_layers=["layer2.1"],
                 reduce={"layer1.0": "b c h w -> b c"}, progress=False).compare(loader_of(x))
    xs = captured(m1, ["layer1.0", "fc"], list(x.split(16)))
    xs = [[a.mean((2, 3)), b] for a, b in xs]
    ys = captured(m2, ["layer2.1"], list(x.split(16)))
    np.testing.assert_allclose(pooled.matrix, cka.minibatch_cka_matrix(xs, ys).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"layer 'fc': reduce pattern 'b t d -> b d' does not fit its output of shape \(16, 5\)"):
        CKA(m1, m2, model1_layers=["fc"], reduce="b t d -> b d", progress=False).compare(loader_of(x))


def test_a_layer_whose_first_axis_is_not_the_batch_is_explained(cnns):
    m1, _ = cnns
    with pytest.raises(ValueError, match=r"layer 'fc' of model1 gave a Gram of shape \(5, 5\).*first axis is not the batch axis"):
        CKA(m1, m1, model1_layers=["conv1", "fc"], output={"fc": lambda o: o.T}, progress=False).compare(loader_of(images(32)))


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def test_inputs_hook_turns_a_batch_into_model_inputs(cnns):
    m1, m2 = cnns
    x = images(32)
    records = [{"image": b, "label": 0} for b in x.split(16)]
    hooked = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, inputs=lambda r: r["image"],
                 progress=False).compare(records)
    plain = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False).compare(loader_of(x))
    np.testing.assert_allclose(hooked.matrix, plain.matrix, atol=1e-12)
    with pytest.raises(TypeError, match="inputs must be a callable"):
        CKA(m1, m2, inputs="image")


# --------------------------------------------------------------------------------------------
# Side effects: hooks, modes, graphs, devices
# --------------------------------------------------------------------------------------------


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_and_training_mode_restored_even_when_the_run_raises():
    torch.manual_seed(0)
    model = ResidualCNN()
    model.train()
    model.layer1[0].bn1.eval()  # a mixed state (a frozen BatchNorm) must come back exactly
    before = {name: m.training for name, m in model.named_modules()}
    bad = [images(8), images(8)[:, :2]]  # batch 1 has 2 channels: conv1 raises
    with pytest.raises(RuntimeError):
        CKA(model, mlp(), model2_layers=["0"], progress=False).compare(bad, [torch.randn(8, 6)] * 2)
    assert all_hooks(model) == 0
    assert {name: m.training for name, m in model.named_modules()} == before
    result = CKA(model, copy.deepcopy(model), progress=False).compare([images(8)])
    assert all_hooks(model) == 0 and {name: m.training for name, m in model.named_modules()} == before
    assert isinstance(result, CKAResult)


def test_no_autograd_graph_is_kept_and_parameters_untouched(cnns):
    m1, _ = cnns
    params = [p.detach().clone() for p in m1.parameters()]
    extractor = TorchModel(m1, BLOCKS1)
    feats = extractor.features(images(8))
    assert list(feats) == BLOCKS1
    assert all(f.is_inference() and not f.requires_grad for f in feats.values())
    grams = extractor.grams(images(8), lambda t: cka.gram(t, check=False))
    assert all(g.shape == (8, 8) and g.dtype == torch.float64 for g in grams)
    assert all(torch.equal(p, q) for p, q in zip(params, m1.parameters(), strict=True))
    assert all_hooks(m1) == 0 and torch.is_grad_enabled()


def test_device_argument_runs_on_that_device_and_leaves_models_in_place(cnns):
    m1, m2 = cnns
    run = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, device="cpu", progress=False)
    result = run.compare(loader_of(images(32)))
    assert run.export()["CKA"].device.type == "cpu" and result.matrix.shape == (5, 5)


@pytest.mark.cuda
@cuda
def test_cuda_models_on_different_devices_match_cpu(cnns):
    m1, m2 = cnns
    x = images(48)
    cpu = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False).compare(loader_of(x))
    gpu1 = copy.deepcopy(m1).cuda()
    mixed = CKA(gpu1, copy.deepcopy(m2), model1_layers=BLOCKS1, model2_layers=BLOCKS2, progress=False).compare(loader_of(x))
    np.testing.assert_allclose(mixed.matrix, cpu.matrix, atol=1e-5)
    moved = CKA(m1, m2, model1_layers=BLOCKS1, model2_layers=BLOCKS2, device="cuda", progress=False)
    np.testing.assert_allclose(moved.compare(loader_of(x)).matrix, cpu.matrix, atol=1e-5)
    assert next(m1.parameters()).device.type == "cpu"  # moved for the run, moved back
