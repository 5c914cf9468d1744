"""ONNX frontend: PyTorch models vs their ONNX exports (both exporters), quantized copies, external
data, providers, and every error the frontend promises."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import shutil
import warnings
from pathlib import Path

# torch, onnx, onnxruntime and onnxscript (the dynamo exporter) are part of the test set-up: a missing
# one fails here instead of skipping the frontend's tests
import numpy as np
import onnx
import onnxruntime as ort
import onnxscript  # noqa: F401
import pytest
import torch

from cka import CKA
from cka.frontends import onnx as cka_onnx
from cka.frontends.base import FeatureExtractor
from cka.frontends.onnx import (
    OnnxMappingError,
    OnnxModel,
    OnnxRuntimeSetupWarning,
    UncheckedMappingWarning,
    default_providers,
)
from cka.frontends.onnx import loading as onnx_loading
from cka.frontends.onnx import runtime as onnx_runtime
from tests.onnx_models import export, resnet_like, tiny_encoder

EXPORTERS = ["torchscript", "dynamo"]
RESNET_LAYERS = [
    "stem",
    "layer1.0",
    "layer1.0.relu",
    "layer1",
    "layer2.0.conv1",
    "layer2.0.downsample",
    "layer2.1.relu",
    "layer2",
    "pool",
    "fc",
]
# fusion-safe for both exporters (layer2.0.conv1 is not: it is in the list above only for the
# remedy test below, and removed here)
RESNET_SAFE = [name for name in RESNET_LAYERS if name != "layer2.0.conv1"]
ENCODER_LAYERS = [
    "embed",
    "act",
    "layers.0.norm1",
    "layers.0.attn.qkv",
    "layers.0.attn",
    "layers.0.mlp.1",
    "layers.0.mlp",
    "layers.0",
    "layers.1",
    "norm",
]

pytestmark = pytest.mark.filterwarnings(
    "ignore::cka.frontends.torch.LayerCalledTwiceWarning",  # 'layer1.0.relu' and 'act' run twice by design
)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 5, 8, generator=torch.Generator().manual_seed(seed))


MODELS = {
    "resnet": (resnet_like, _images, RESNET_SAFE),
    "encoder": (tiny_encoder, _tokens, ENCODER_LAYERS),
}


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every model exported once per exporter, plus a no-folding TorchScript export of the ResNet."""
    directory = tmp_path_factory.mktemp("onnx-exports")
    paths = {}
    for model_name, (make, data, _) in MODELS.items():
        for exporter in EXPORTERS:
            path = directory / f"{model_name}-{exporter}.onnx"
            paths[model_name, exporter] = export(make(), data(4, 0), path, exporter)
    paths["resnet", "unfolded"] = export(
        resnet_like(), _images(4, 0), directory / "resnet-unfolded.onnx", "torchscript", do_constant_folding=False
    )
    return paths


def _torch_outputs(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, list[torch.Tensor]]:
    """Every call's output of each named module, captured independently of cka."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda m, a, out, name=name: captured[name].append(out.detach().clone()))
        for name in names
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _loader(data, batches: int = 3, n: int = 16) -> list[torch.Tensor]:
    return [data(n, seed) for seed in range(1, batches + 1)]


# --------------------------------------------------------------------------------------------
# PyTorch vs its ONNX export
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_torch_vs_onnx_diagonal_is_one(exports, model_name, exporter):
    make, data, layers = MODELS[model_name]
    model = make()
    deployed = OnnxModel(exports[model_name, exporter])
    result = CKA(model, deployed, model1_layers=layers, model2_layers=layers, progress=False).compare(_loader(data))
    assert result.model2_layers == tuple(layers)
    assert np.isfinite(result.matrix).all()
    assert np.diag(result.matrix).min() >= 0.9999, dict(zip(layers, np.diag(result.matrix), strict=True))
    # off-diagonal entries are not all 1: the matrix compares different layers
    assert result.matrix.min() < 0.99


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_mapped_features_equal_module_outputs(exports, model_name, exporter):
    make, data, layers = MODELS[model_name]
    model, x = make(), data(8, 7)
    deployed = OnnxModel(exports[model_name, exporter], layers=layers, reference=model)
    features = deployed.features(x)
    expected = _torch_outputs(model, x, layers)
    assert list(features) == layers
    for name in layers:
        value = features[name]
        assert isinstance(value, torch.Tensor)  # torch is loaded: handed over through DLPack
        np.testing.assert_allclose(value.numpy(), expected[name][0].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_module_called_twice_maps_to_calls_in_order(exports, exporter):
    model, x = resnet_like(), _images(8, 3)
    names = ["layer1.0.relu", "layer1.0.relu@1", "layer2.1.relu@1"]
    features = OnnxModel(exports["resnet", exporter], layers=names, reference=model).features(x)
    expected = _torch_outputs(model, x, ["layer1.0.relu", "layer2.1.relu"])
    for name, want in [
        ("layer1.0.relu", expected["layer1.0.relu"][0]),
        ("layer1.0.relu@1", expected["layer1.0.relu"][1]),
        ("layer2.1.relu@1", expected["layer2.1.relu"][1]),
    ]:
        np.testing.assert_allclose(features[name].numpy(), want.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    assert not np.allclose(features["layer1.0.relu"].numpy(), features["layer1.0.relu@1"].numpy())

    encoder, tokens = tiny_encoder(), _tokens(8, 3)
    features = OnnxModel(exports["encoder", exporter], layers=["act", "act@1"], reference=encoder).features(tokens)
    expected = _torch_outputs(encoder, tokens, ["act"])["act"]
    for k, name in enumerate(["act", "act@1"]):
        np.testing.assert_allclose(features[name].numpy(), expected[k].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)

    with pytest.raises(OnnxMappingError, match=r"holds 2 call\(s\) of 'layer1.0.relu'.*no call 2"):
        OnnxModel(exports["resnet", exporter], layers=["layer1.0.relu@2"])


def test_listing_values_and_modules(exports):
    deployed = OnnxModel(exports["resnet", "torchscript"])
    assert deployed.exporter == "torchscript"
    values = {v.name: v for v in deployed.layers()}
    relu = values["/layer1/layer1.0/relu_1/Relu_output_0"]
    assert relu.shape == ("n", 8, 16, 16) and relu.dtype == "float32" and relu.op_type == "Relu"
    assert "layer1.0.relu@1" in relu.module and "layer1.0" in relu.module
    assert not any(v.op_type in ("Shape", "Constant") for v in values.values())
    modules = deployed.modules()
    assert modules["layer1.0.relu@1"] == relu.name
    assert "stem.1" not in modules  # the folded BatchNorm owns no node
    assert deployed.layer_names() == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]  # default: the blocks

    dynamo = OnnxModel(exports["resnet", "dynamo"])
    assert dynamo.exporter == "dynamo"
    assert "stem.0" not in dynamo.modules() and "stem.1" in dynamo.modules()  # the Conv is filed under the BN
    assert dynamo.layer_names() == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]


def test_raw_value_names_and_module_names_mix(exports):
    model = resnet_like()
    layers = ["/layer1/layer1.0/relu/Relu_output_0", "layer1.0.relu"]
    features = OnnxModel(exports["resnet", "torchscript"], layers=layers, reference=model).features(_images(6, 1))
    np.testing.assert_array_equal(features[layers[0]].numpy(), features[layers[1]].numpy())


def test_onnx_vs_onnx_across_exporters_by_module_name(exports):
    layers = RESNET_SAFE
    with pytest.warns(UncheckedMappingWarning, match="without the PyTorch model"):
        result = CKA(
            OnnxModel(exports["resnet", "torchscript"]),
            OnnxModel(exports["resnet", "dynamo"]),
            model1_layers=layers,
            model2_layers=layers,
            progress=False,
        ).compare(_loader(_images))
    assert np.diag(result.matrix).min() >= 0.9999


# --------------------------------------------------------------------------------------------
# Fusion: never a different tensor under a module's name
# --------------------------------------------------------------------------------------------


def test_torchscript_conv_holding_batchnorm_is_reported_fused(exports):
    model = resnet_like()
    deployed = OnnxModel(exports["resnet", "torchscript"])
    cka = CKA(model, deployed, model1_layers=["stem.0", "layer1"], model2_layers=["stem.0", "layer1"], progress=False)
    with pytest.raises(OnnxMappingError) as info:
        cka.compare(_loader(_images))
    message = str(info.value)
    assert "'stem.0' (fused)" in message and "'stem.1' (BatchNorm2d)" in message
    assert "do_constant_folding=False" in message and "optimize=False" in message and "fusion-safe" in message
    assert [p.layer for p in info.value.problems] == ["stem.0"]  # 'layer1' is fine

    with pytest.raises(OnnxMappingError, match=r"'stem.1' \(unmapped\).*BatchNorm2d.*folded this BatchNorm"):
        CKA(model, OnnxModel(exports["resnet", "torchscript"]), model1_layers=["stem.1"], model2_layers=["stem.1"])


def test_dynamo_keeps_no_conv_value_and_maps_batchnorm_to_conv_bn(exports):
    model, x = resnet_like(), _images(8, 2)
    with pytest.raises(
        OnnxMappingError, match=r"'stem.0' \(unmapped\).*Conv2d.*filed the fused op under that BatchNorm"
    ):
        OnnxModel(exports["resnet", "dynamo"], layers=["stem.0"], reference=model)
    features = OnnxModel(exports["resnet", "dynamo"], layers=["stem.1", "layer1.0.bn2"], reference=model).features(x)
    expected = _torch_outputs(model, x, ["stem.1", "layer1.0.bn2"])
    for name in ["stem.1", "layer1.0.bn2"]:
        np.testing.assert_allclose(features[name].numpy(), expected[name][0].numpy(), rtol=1e-4, atol=1e-5)


def test_remedy_export_without_constant_folding_maps_conv_and_batchnorm(exports):
    model, x = resnet_like(), _images(8, 4)
    layers = ["stem.0", "stem.1", "layer2.0.conv1", "layer2.0.bn1"]
    features = OnnxModel(exports["resnet", "unfolded"], layers=layers, reference=model).features(x)
    expected = _torch_outputs(model, x, layers)
    for name in layers:
        np.testing.assert_allclose(
            features[name].numpy(), expected[name][0].numpy(), rtol=1e-4, atol=1e-5, err_msg=name
        )


def test_reference_with_other_weights_is_mismatched(exports):
    other = resnet_like(seed=1)  # same architecture, different weights: every value differs
    deployed = OnnxModel(exports["resnet", "torchscript"], layers=["layer1", "fc"], reference=other)
    with pytest.raises(OnnxMappingError, match=r"'layer1' \(mismatched\).*relative difference .* > 0.01"):
        deployed.features(_images(8, 0))


def test_module_names_without_reference_warn_once_unchecked(exports):
    deployed = OnnxModel(exports["resnet", "torchscript"], layers=["layer1"])
    with pytest.warns(UncheckedMappingWarning, match=r"\['layer1'\].*reference="):
        deployed.features(_images(4, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deployed.features(_images(4, 1))  # the session exists: no second warning
        OnnxModel(exports["resnet", "torchscript"], layers=["/layer1/layer1.1/relu_1/Relu_output_0"]).features(
            _images(4, 0)
        )


# --------------------------------------------------------------------------------------------
# Quantized and external-data models
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(exports, tmp_path_factory) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = tmp_path_factory.mktemp("quantized") / "resnet-int8.onnx"
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint
    quantize_dynamic(str(exports["resnet", "torchscript"]), str(path), weight_type=QuantType.QInt8)
    return path


def test_quantized_copy_vs_float_export(exports, quantized):
    values = [
        "/stem/stem.2/Relu_output_0",
        "/layer1/layer1.0/relu_1/Relu_output_0",
        "/layer2/layer2.0/relu_1/Relu_output_0",
        "/layer2/layer2.1/relu_1/Relu_output_0",
        "out",
    ]
    loader = _loader(_images, batches=3, n=32)
    baseline = CKA(
        OnnxModel(exports["resnet", "torchscript"]),
        OnnxModel(exports["resnet", "torchscript"]),
        model1_layers=values,
        model2_layers=values,
        progress=False,
    ).compare(loader)
    drifted = CKA(
        OnnxModel(exports["resnet", "torchscript"]),
        OnnxModel(quantized),
        model1_layers=values,
        model2_layers=values,
        progress=False,
    ).compare(loader)
    assert drifted.matrix.shape == (len(values), len(values))
    assert np.isfinite(drifted.matrix).all()
    assert (np.abs(drifted.matrix) <= 1 + 1e-9).all()
    assert (np.diag(drifted.matrix) < np.diag(baseline.matrix)).all()
    assert np.diag(drifted.matrix).min() > 0.9  # int8 drift is small on this model, but measurable


def test_torch_vs_quantized_by_module_name_passes_the_check(quantized):
    model = resnet_like()
    layers = ["stem", "layer1.0.relu", "layer1", "layer2", "fc"]
    result = CKA(model, OnnxModel(quantized), model1_layers=layers, model2_layers=layers, progress=False).compare(
        _loader(_images, n=32)
    )
    diagonal = np.diag(result.matrix)
    assert np.isfinite(diagonal).all() and (diagonal < 1).all() and diagonal.min() > 0.9
    with pytest.raises(OnnxMappingError, match=r"'layer1.0.conv1' \(fused\).*'layer1.0.bn1' \(BatchNorm2d\)"):
        OnnxModel(quantized, layers=["layer1.0.conv1"], reference=model).features(_images(16, 0))


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_external_data_model_leaves_nothing_on_disk(exports, tmp_path):
    proto = onnx.load(str(exports["resnet", "torchscript"]))
    onnx.save_model(
        proto, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    before = _digest(tmp_path)
    assert set(before) == {"model.onnx", "model.onnx.data"}
    layers = ["layer1", "/layer2/layer2.1/relu_1/Relu_output_0"]
    deployed = OnnxModel(tmp_path / "model.onnx", layers=layers, reference=resnet_like())
    with deployed:
        features = deployed.features(_images(6, 0))
    inline = OnnxModel(exports["resnet", "torchscript"], layers=layers, reference=resnet_like()).features(_images(6, 0))
    for name in layers:
        np.testing.assert_array_equal(features[name].numpy(), inline[name].numpy())
    assert _digest(tmp_path) == before  # no temporary copy left, the original untouched


def test_dynamo_export_uses_external_data(exports):
    assert exports["resnet", "dynamo"].with_name(exports["resnet", "dynamo"].name + ".data").is_file()


def test_model_proto_input_is_left_as_given(exports):
    proto = onnx.load(str(exports["resnet", "torchscript"]))
    serialized = proto.SerializeToString()
    features = OnnxModel(proto, layers=["/layer1/layer1.1/relu_1/Relu_output_0"]).features(_images(4, 0))
    assert features["/layer1/layer1.1/relu_1/Relu_output_0"].shape == (4, 8, 16, 16)
    assert proto.SerializeToString() == serialized


def test_dict_and_tuple_batches_feed_by_input_name(exports):
    deployed = OnnxModel(exports["resnet", "torchscript"], layers=["out"])
    x = _images(4, 0)
    plain = deployed.features(x)["out"]
    np.testing.assert_array_equal(deployed.features({"x": x, "label": 1})["out"].numpy(), plain.numpy())
    np.testing.assert_array_equal(deployed.features((x, torch.zeros(4)))["out"].numpy(), plain.numpy())
    np.testing.assert_array_equal(deployed.features(x.numpy())["out"].numpy(), plain.numpy())


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_error_not_an_onnx_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("these are my notes, not a model\n" * 4)
    with pytest.raises(ValueError, match=r"notes.onnx' is not an ONNX model"):
        OnnxModel(path)
    with pytest.raises(FileNotFoundError, match="no ONNX model at"):
        OnnxModel(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match=r"path to a \.onnx file or an onnx\.ModelProto"):
        OnnxModel(12)


def test_error_unknown_name_lists_close_matches(exports):
    with pytest.raises(OnnxMappingError) as info:
        OnnxModel(exports["resnet", "torchscript"], layers=["layer1", "layer1.0.conv", "/layer1/layer1.0/Relu_output"])
    message = str(info.value)
    assert "'layer1.0.conv' (unknown)" in message and "'layer1.0.conv1'" in message
    assert "'/layer1/layer1.0/relu/Relu_output_0'" in message
    assert [p.layer for p in info.value.problems] == ["layer1.0.conv", "/layer1/layer1.0/Relu_output"]


def _if_model() -> onnx.ModelProto:
    """``y = If(sum(x) > 0, then: relu(x) * 2, else: -x)``, with ``inner`` only inside the then-branch."""
    from onnx import TensorProto, helper

    then_branch = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["inner"]), helper.make_node("Add", ["inner", "inner"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Sigmoid", ["y"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "if-model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_error_value_inside_a_subgraph():
    with pytest.raises(
        OnnxMappingError,
        match=(
            r"'inner' \(subgraph\): it is computed inside the 'then_branch' subgraph of the If node 'branch'.*"
            r"outputs \['y'\]"
        ),
    ):
        OnnxModel(_if_model(), layers=["inner"])
    x = np.abs(np.random.default_rng(0).normal(size=(5, 4))).astype(np.float32)
    features = OnnxModel(_if_model(), layers=["y", "z"]).features(x)
    np.testing.assert_allclose(features["y"].numpy(), 2 * x, rtol=1e-6)


def test_error_batch_dtype_and_shape(exports):
    deployed = OnnxModel(exports["resnet", "torchscript"], layers=["out"])
    with pytest.raises(TypeError, match=r"batch 0, input 'x': the graph expects float32 .* gives float64"):
        deployed.features(_images(4, 0).double())
    model = resnet_like()
    loader = [_images(8, 0), _images(8, 1)[:, :, :8, :8]]
    with pytest.raises(
        ValueError, match=r"batch 1, input 'x': the graph expects shape \('n', 3, 16, 16\).*\(8, 3, 8, 8\)"
    ):
        CKA(
            model,
            OnnxModel(exports["resnet", "torchscript"]),
            model1_layers=["fc"],
            model2_layers=["fc"],
            progress=False,
        ).compare(loader)
    with pytest.raises(ValueError, match=r"no entry for input\(s\) \['x'\].*given keys \['image'\]"):
        deployed.features({"image": _images(4, 0)})


def test_error_missing_external_data(exports, tmp_path):
    shutil.copy(exports["resnet", "dynamo"], tmp_path / "alone.onnx")
    data_name = exports["resnet", "dynamo"].name + ".data"
    with pytest.raises(FileNotFoundError, match=rf"external data file\(s\) that do not exist: '.*{data_name}'"):
        OnnxModel(tmp_path / "alone.onnx")
    proto = onnx.load(str(exports["resnet", "dynamo"]), load_external_data=False)
    with pytest.raises(ValueError, match=r"references external data files .* pass the path of the \.onnx file"):
        OnnxModel(proto)
    assert OnnxModel(proto, base_dir=exports["resnet", "dynamo"].parent, layers=["layer1"]).layer_names() == ["layer1"]


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------


def test_default_providers(monkeypatch):
    assert default_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnx_runtime, "_gpu_present", lambda: True)
    assert default_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    monkeypatch.setattr(onnx_runtime, "_gpu_present", lambda: False)
    assert default_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_warns_when_cuda_silently_falls_back_to_cpu(exports):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime really has CUDA")
    deployed = OnnxModel(
        exports["resnet", "torchscript"], layers=["out"], providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with pytest.warns(OnnxRuntimeSetupWarning, match=r"asked for \['CUDAExecutionProvider'\].*fell back"):
        deployed.features(_images(4, 0))


def test_warns_when_two_onnxruntime_distributions_are_installed(exports, monkeypatch):
    versions = {"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.20.0"}

    def version(name):
        if name in versions:
            return versions[name]
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert cka_onnx.installed_onnxruntime_distributions() == ["onnxruntime==1.20.0", "onnxruntime-gpu==1.20.0"]
    with pytest.warns(OnnxRuntimeSetupWarning, match="several onnxruntime distributions.*onnxruntime-gpu"):
        OnnxModel(exports["resnet", "torchscript"], layers=["out"]).features(_images(4, 0))


@pytest.mark.cuda
def test_cuda_session_keeps_features_on_the_gpu(exports):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    model = resnet_like().cuda()
    deployed = OnnxModel(exports["resnet", "dynamo"])
    assert "CUDAExecutionProvider" in deployed._ensure_session().session.get_providers()
    assert deployed.home_device() == torch.device("cuda", 0)
    features = OnnxModel(exports["resnet", "dynamo"], layers=["layer1"]).features(_images(8, 0).cuda())
    assert features["layer1"].is_cuda
    result = CKA(model, deployed, model1_layers=RESNET_SAFE, model2_layers=RESNET_SAFE, progress=False).compare(
        [x.cuda() for x in _loader(_images)]
    )
    assert np.diag(result.matrix).min() >= 0.999


def test_in_memory_model_over_the_protobuf_limit_goes_through_a_temporary_directory(exports, monkeypatch):
    """A loaded model too big for one protobuf message (shrunk limit here) is saved with external data to
    a temporary directory for the session; the caller's proto keeps its weights in memory."""
    from onnx import numpy_helper

    proto = onnx.load(str(exports["resnet", "torchscript"]))
    weights = {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}
    layers = ["/layer1/layer1.1/relu_1/Relu_output_0", "out"]
    expected = OnnxModel(exports["resnet", "torchscript"], layers=layers).features(_images(4, 0))
    monkeypatch.setattr(onnx_loading, "PROTOBUF_LIMIT", 1000)
    features = OnnxModel(proto, layers=layers).features(_images(4, 0))
    for name in layers:
        np.testing.assert_array_equal(features[name].numpy(), expected[name].numpy())
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    for tensor in proto.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), weights[tensor.name])


def test_reduce_pattern_before_the_gram(exports):
    model, x = resnet_like(), _images(6, 0)
    deployed = OnnxModel(
        exports["resnet", "torchscript"], layers=["layer1", "fc"], reference=model, reduce={"layer1": "b c h w -> b c"}
    )
    features = deployed.features(x)
    expected = _torch_outputs(model, x, ["layer1"])["layer1"][0].mean(dim=(2, 3))
    np.testing.assert_allclose(features["layer1"].numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert features["fc"].shape == (6, 10)
    with pytest.raises(ValueError, match=r"reduce names layer\(s\) \['layer9'\] that are not selected"):
        OnnxModel(exports["resnet", "torchscript"], layers=["fc"], reduce={"layer9": "b c -> b"})


def test_works_without_torch_and_returns_numpy():
    """The frontend imports no framework; without torch, features are numpy arrays."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from onnx import TensorProto, helper\n"
        "from cka.frontends.onnx import OnnxModel\n"
        "from cka import core\n"
        "graph = helper.make_graph([helper.make_node('Relu', ['x'], ['y']), helper.make_node('Sigmoid', ['y'], ['z'])],\n"
        "    'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['n', 4])],\n"
        "    [helper.make_tensor_value_info('z', TensorProto.FLOAT, ['n', 4])])\n"
        "m = OnnxModel(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]), layers=['y', 'z'])\n"
        "x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)\n"
        "f = m.features(x)\n"
        "assert type(f['y']) is np.ndarray and np.array_equal(f['y'], np.maximum(x, 0))\n"
        "g = m.grams(x, lambda a: core.gram(a, check=False))\n"
        "assert g[0].shape == (6, 6) and g[0].dtype == np.float64\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_imports_and_runs_where_torch_cannot_be_imported():
    """With torch made unimportable (``sys.modules['torch'] = None``), the package imports, wraps a graph
    built with onnx.helper, and computes features and Grams on numpy batches: no module of the package
    imports torch, at import or at run time."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        "import numpy as np\n"
        "from onnx import TensorProto, helper\n"
        "import cka.frontends.onnx as package\n"
        "from cka.frontends.onnx import OnnxModel\n"
        "from cka import core\n"
        "graph = helper.make_graph([helper.make_node('Relu', ['x'], ['y']), helper.make_node('Tanh', ['y'], ['z'])],\n"
        "    'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['n', 4])],\n"
        "    [helper.make_tensor_value_info('z', TensorProto.FLOAT, ['n', 4])])\n"
        "m = OnnxModel(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]))\n"
        "assert m.layer_names() == ['y', 'z'], m.layer_names()\n"
        "x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)\n"
        "f = m.features(x)\n"
        "assert type(f['z']) is np.ndarray and np.allclose(f['z'], np.tanh(np.maximum(x, 0)))\n"
        "with m:\n"
        "    g = m.grams(x, lambda a: core.gram(a, check=False))\n"
        "    assert g.shape == (2, 6, 6) and np.allclose(g[1], core.gram(f['z']))\n"
        "assert m.home_device() is None  # numpy Grams\n"
        "assert sys.modules['torch'] is None\n"
        "print(sorted(n for n in sys.modules if n.startswith('cka.frontends.onnx.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for module in ("errors", "graph", "loading", "model", "naming", "probe", "runtime"):
        assert f"cka.frontends.onnx.{module}" in result.stdout  # every module was imported without torch


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_available_layers_lists_module_calls_then_values(exports, exporter):
    deployed = OnnxModel(exports["resnet", exporter])
    available = deployed.available_layers()
    kinds = [layer.kind for layer in available]
    assert set(kinds) == {"module", "value"} and kinds == sorted(kinds)  # every module before every value
    modules = {layer.name: layer.value for layer in available if layer.kind == "module"}
    values = [layer.name for layer in available if layer.kind == "value"]
    assert modules == deployed.modules()
    assert {"layer1.0", "layer1.0.relu", "layer1.0.relu@1", "fc"} <= set(modules)
    assert values == [v.name for v in deployed.layers()]
    # the CLI default (the blocks) is among the module names; every listed name is accepted as listed
    assert set(deployed.layer_names()) <= set(modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedMappingWarning)
        picked = [*list(modules)[::7], *values[::9]]
        features = OnnxModel(exports["resnet", exporter], layers=picked).features(_images(4, 0))
    assert list(features) == picked
    for name in picked:
        if name in modules:
            np.testing.assert_array_equal(features[name].numpy(), features.get(modules[name], features[name]).numpy())


def test_available_layers_of_a_graph_without_module_names_are_its_values():
    deployed = OnnxModel(_if_model())
    assert deployed.exporter is None
    assert deployed.available_layers() == [cka_onnx.SelectableLayer(n, "value", n) for n in ("y", "z")]


def test_glob_patterns_callables_and_duplicates_are_worded_like_the_other_frontends(exports):
    path = exports["resnet", "torchscript"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedMappingWarning)
        assert OnnxModel(path, layers="layer1.?").layer_names() == ["layer1.0", "layer1.1"]
        assert OnnxModel(path, layers=["fc", "layer2.*.relu@1"]).layer_names() == [
            "fc",
            "layer2.0.relu@1",
            "layer2.1.relu@1",
        ]
        assert OnnxModel(path, layers=lambda name: name.endswith("conv2")).layer_names() == [
            "layer1.0.conv2",
            "layer1.1.conv2",
            "layer2.0.conv2",
            "layer2.1.conv2",
        ]
    with pytest.raises(ValueError, match=r"layers: layer 'fc' is selected twice \(by 'fc' and 'fc'\)"):
        OnnxModel(path, layers=["fc", "fc"])
    with pytest.raises(ValueError, match=r"layer 'layer1.0' is selected twice \(by 'layer1.0' and 'layer1.\?'\)"):
        OnnxModel(path, layers=["layer1.0", "layer1.?"])
    with pytest.raises(ValueError, match=r"'layer9.\*' selects no layer of resnet-torchscript; close matches"):
        OnnxModel(path, layers=["layer9.*"])
    with pytest.raises(ValueError, match="layers is empty"):
        OnnxModel(path, layers=[])
    with pytest.raises(TypeError, match=r"each entry must be a module or value name .* got int 3"):
        OnnxModel(path, layers=["fc", 3])


class _ProbeSide(FeatureExtractor):
    """A PyTorch model behind nothing but the FeatureExtractor interface (``module``, ``layer_names``,
    ``features``), counting the batches it runs: what the probe check may use of the other side."""

    def __init__(self, module: torch.nn.Module, layers: list[str]) -> None:
        self.module, self._layers, self.batches = module, layers, 0
        self.name = "probe-side"

    def layer_names(self) -> list[str]:
        return list(self._layers)

    def features(self, batch):
        self.batches += 1
        named = dict(self.module.named_modules())
        captured = {}
        handles = [
            named[n].register_forward_hook(lambda m, a, out, n=n: captured.setdefault(n, out)) for n in self._layers
        ]
        try:
            with torch.inference_mode():
                self.module(batch["image"])  # this side reads its own batch format
        finally:
            for handle in handles:
                handle.remove()
        return {n: captured[n] for n in self._layers}


def test_probe_check_runs_the_other_side_through_its_extractor_interface(exports):
    model = resnet_like()
    side = _ProbeSide(model, ["stem", "layer1"])
    batch = {"image": _images(8, 0), "x": _images(8, 0)}  # the ONNX side reads 'x', the other side 'image'
    deployed = OnnxModel(exports["resnet", "torchscript"])
    deployed.bind(layers=None, other=side)
    assert deployed.reference is model and deployed.layer_names() == ["stem", "layer1"]  # mirrored
    deployed.features(batch)
    deployed.features(batch)
    assert side.batches == 1  # the probe batch only
    fused = OnnxModel(exports["resnet", "torchscript"])
    fused.bind(layers=["stem.0"], other=_ProbeSide(model, ["stem"]))
    with pytest.raises(OnnxMappingError, match=r"'stem.0' \(fused\).*'stem.1' \(BatchNorm2d\)"):
        fused.features(batch)


def test_probe_check_leaves_the_reference_as_it_found_it(exports):
    model = resnet_like().train()
    model.layer1[0].eval()  # mixed flags are restored one by one
    flags = {name: m.training for name, m in model.named_modules()}

    def hooks(module: torch.nn.Module) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())

    OnnxModel(exports["resnet", "torchscript"], layers=["layer1", "fc"], reference=model).features(_images(8, 0))
    with pytest.raises(OnnxMappingError, match="fused"):
        OnnxModel(exports["resnet", "torchscript"], layers=["stem.0"], reference=model).features(_images(8, 0))
    assert hooks(model) == 0
    assert {name: m.training for name, m in model.named_modules()} == flags


def test_large_models_are_typed_on_a_light_copy_with_the_same_shapes(exports, monkeypatch):
    """Over 64 MB, shape inference runs on a copy without the large weights; shape constants stay, so
    data propagation gives the same value shapes as inference on the full model."""
    expected = {}
    for model_name in ("resnet", "encoder"):
        for exporter in EXPORTERS:
            deployed = OnnxModel(exports[model_name, exporter])
            expected[model_name, exporter] = [(v.name, v.shape, v.dtype) for v in deployed.layers()]
    monkeypatch.setattr(onnx_loading, "_LIGHT_COPY_OVER", 0)
    for (model_name, exporter), values in expected.items():
        proto = onnx.load(str(exports[model_name, exporter]))
        light = onnx_loading._copy_without_weights(proto)
        assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
        placeholders = 0
        for original, copy in zip(proto.graph.initializer, light.graph.initializer, strict=True):
            assert (copy.name, copy.data_type, list(copy.dims)) == (
                original.name,
                original.data_type,
                list(original.dims),
            )
            if original.ByteSize() > onnx_loading._KEEP_INITIALIZERS_UP_TO:
                assert onnx.external_data_helper.uses_external_data(copy) and not copy.raw_data
                placeholders += 1
            else:
                assert copy == original
        assert placeholders > 0 or model_name == "encoder"  # the encoder's weights are all small
        deployed = OnnxModel(proto)
        assert [(v.name, v.shape, v.dtype) for v in deployed.layers()] == values, (model_name, exporter)


def test_element_types_are_named_by_onnx_enums():
    from cka.frontends.onnx.graph import FLOAT_TYPES, dtype_name, numpy_dtype

    assert dtype_name(onnx.TensorProto.FLOAT) == "float32" and dtype_name(onnx.TensorProto.DOUBLE) == "float64"
    assert dtype_name(onnx.TensorProto.FLOAT16) == "float16" and dtype_name(onnx.TensorProto.BFLOAT16) == "bfloat16"
    assert numpy_dtype(onnx.TensorProto.INT64) == np.int64 and dtype_name(onnx.TensorProto.UNDEFINED) is None
    assert onnx.TensorProto.INT64 not in FLOAT_TYPES and onnx.TensorProto.FLOAT in FLOAT_TYPES


def test_grams_are_one_stack_equal_to_the_core_gram_of_each_feature(exports):
    from cka import core

    deployed = OnnxModel(exports["resnet", "torchscript"], layers=["/layer1/layer1.1/relu_1/Relu_output_0", "out"])
    x = _images(6, 0)
    with deployed:
        stack = deployed.grams(x, lambda a: core.gram(a, check=False))
        features = deployed.features(x)
    assert tuple(stack.shape) == (2, 6, 6)
    assert stack.device == deployed.home_device() == torch.device("cpu")
    for i, value in enumerate(features.values()):
        np.testing.assert_allclose(stack[i].numpy(), core.gram(value, check=False).numpy(), rtol=1e-12, atol=1e-12)
