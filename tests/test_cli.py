"""The command line through its real entry point (the installed ``cka`` script, in a subprocess):
the demo in fast mode, every model and data form of ``cka compare``, and every error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

SCRIPT = shutil.which("cka", path=str(Path(sys.executable).parent)) or shutil.which("cka")

MODELS_PY = '''
import torch
from torch import nn

def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))

def make_other():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))

def not_a_model():
    return 42
'''


def cka(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert SCRIPT, "the cka console script is not installed (pip install -e .)"
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "models.py").write_text(MODELS_PY)
    rng = np.random.default_rng(0)
    np.save(root / "images.npy", rng.normal(size=(40, 3, 8, 8)).astype(np.float32))
    np.savez(root / "images.npz", x=rng.normal(size=(40, 3, 8, 8)).astype(np.float32), y=np.arange(40) % 3)
    from PIL import Image

    for cls in ("cats", "dogs"):
        (root / "folder" / cls).mkdir(parents=True)
        for i in range(10):
            pixels = (rng.uniform(size=(8, 8, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "folder" / cls / f"{i}.png")
    return root


def test_help_is_complete():
    top = cka("--help")
    assert top.returncode == 0 and "demo" in top.stdout and "compare" in top.stdout
    compare = cka("compare", "--help")
    for flag in ("--data", "--data2", "--layers1", "--layers2", "--batch-size", "--limit", "--device", "--out",
                 "--format", "--list-layers", "--weights", "torchvision:resnet18", "synthetic:3x224x224"):
        assert flag in compare.stdout, flag
    assert "--fast" in cka("demo", "--help").stdout


def test_demo_fast_writes_what_it_promises(tmp_path):
    run = cka("demo", "--fast", "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    assert "test accuracy" in run.stdout and "Wrote heatmaps" in run.stdout
    out = tmp_path / "out"
    for key in ("shallow_vs_deep", "torch_vs_onnx", "onnx_vs_int8", "clean_vs_noisy"):
        assert (out / f"{key}.png").stat().st_size > 1000
        data = json.loads((out / f"{key}.json").read_text())
        matrix = np.array(data["matrix"], dtype=float)
        assert np.isfinite(matrix).all()
        if key == "torch_vs_onnx":
            assert (np.diag(matrix) >= 0.999).all()
        if key == "shallow_vs_deep":
            assert matrix.shape == (4, 7)  # 2 blocks + pool + fc  vs  5 blocks + pool + fc
    assert (out / "shallow.onnx").exists() and (out / "shallow-int8.onnx").exists()


@pytest.mark.parametrize("fmt", ["json", "npz", "csv"])
def test_compare_factory_models_on_synthetic_data(workdir, tmp_path, fmt):
    run = cka("compare", "models.py:make_model", "models.py:make_other", "--data", "synthetic:3x8x8",
              "--limit", "64", "--batch-size", "32", "--out", str(tmp_path), "--format", fmt, "--no-progress",
              cwd=workdir)
    assert run.returncode == 0, run.stderr
    assert "best match" in run.stdout  # different layer sets: each layer's best match is printed
    assert (tmp_path / f"cka.{fmt}").exists() and (tmp_path / "cka.png").stat().st_size > 1000
    from cka.result import CKAResult

    result = CKAResult.load(tmp_path / f"cka.{fmt}")
    assert result.n_examples == 64


@pytest.mark.parametrize("data", ["images.npy", "images.npz", "folder"])
def test_compare_a_model_with_itself_on_each_data_form(workdir, tmp_path, data):
    run = cka("compare", "models.py:make_model", "--data", data, "--layers1", "0", "1", "3",
              "--batch-size", "16", "--out", str(tmp_path), "--no-progress", cwd=workdir)
    assert run.returncode == 0, run.stderr
    diagonal = [float(line.split()[-1]) for line in run.stdout.splitlines()[1:4]]
    assert diagonal == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_compare_onnx_torchscript_and_exported_program_files(workdir, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("user_models", workdir / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.make_model().eval()
    example = torch.randn(2, 3, 8, 8)
    torch.onnx.export(model, (example,), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    torch.jit.save(torch.jit.trace(model, example), str(tmp_path / "m.pt"))
    batch = torch.export.Dim("batch", min=2)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), str(tmp_path / "m.pt2"))
    for other, layer in (("m.onnx", "1"), ("m.pt2", "1"), ("m.pt", "output")):  # TorchScript: its output only
        layer1 = "3" if layer == "output" else "1"
        run = cka("compare", str(workdir / "models.py") + ":make_model", other, "--data", "synthetic:3x8x8",
                  "--limit", "32", "--batch-size", "16", "--layers1", layer1, "--layers2", layer,
                  "--out", str(tmp_path / f"out-{other}"), "--no-progress", cwd=tmp_path)
        assert run.returncode == 0, (other, run.stderr)
        assert float(run.stdout.splitlines()[1].split()[-1].strip("()")) == pytest.approx(1.0, abs=1e-4), other
    refused = cka("compare", "m.pt", "--data", "synthetic:3x8x8", "--layers1", "1", cwd=tmp_path)
    assert refused.returncode == 2 and "inner layers cannot be hooked" in refused.stderr
    listed = cka("compare", "m.onnx", "--list-layers", cwd=tmp_path)  # the module names the CLI takes, then raw values
    assert listed.returncode == 0, listed.stderr
    lines = [line.strip() for line in listed.stdout.splitlines()]
    assert "PyTorch module names (mapped to their ONNX values):" in lines and "ONNX values (also selectable):" in lines
    assert any(line.startswith("1  -> ") for line in lines)


def test_list_layers(workdir):
    run = cka("compare", "models.py:make_other", "--list-layers", cwd=workdir)
    assert run.returncode == 0
    assert [line.strip() for line in run.stdout.splitlines()[1:]] == ["0", "1", "2", "3", "4", "5"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["compare", "resnet18", "--data", "synthetic:3x8x8"], "unknown model spec 'resnet18'"),
        (["compare", "nope.onnx", "--data", "synthetic:3x8x8"], "model file nope.onnx does not exist"),
        (["compare", "models.py:missing", "--data", "synthetic:3x8x8"], "defines no 'missing'; callables there: make_model"),
        (["compare", "models.py:not_a_model", "--data", "synthetic:3x8x8"], "returned a int, not a torch.nn.Module"),
        (["compare", "models.py:make_model", "--data", "nowhere/"], "data nowhere/ does not exist"),
        (["compare", "models.py:make_model", "--data", "synthetic:3xAx8"], "write it like synthetic:3x224x224"),
        (["compare", "models.py:make_model", "--data", "images.npy", "--data2", "synthetic:3x8x8"],
         "--data has 40 examples but --data2 has 512"),
        (["compare", "models.py:make_model", "--data", "synthetic:3x8x8", "--layers1", "conv"],
         "close matches|not found|no layer"),
        (["compare", "models.py:make_model"], "--data is required"),
        (["compare", "pickled.pt", "--data", "synthetic:3x8x8"], "pickled models are never loaded"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(workdir, args, message):
    if "pickled.pt" in args and not (workdir / "pickled.pt").exists():
        torch.save(torch.nn.Linear(2, 2), workdir / "pickled.pt")
    run = cka(*args, cwd=workdir)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("cka: error:")]
    assert len(lines) == 1, run.stderr
    import re

    assert re.search(message, lines[0]), lines[0]
