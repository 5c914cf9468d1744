"""The command line under bad input and hostile files: one line that names the problem and the fix,
exit status 2 (130 for Ctrl-C), no traceback, and nothing from a model file ever executed.

Most cases call :func:`cka.cli.main` in this process (the boundary under test is ``main`` itself);
the ones about processes (the two entry points, signals, pipes, payloads) run in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cka.cli import main  # noqa: E402

SCRIPT = shutil.which("cka", path=str(Path(sys.executable).parent)) or shutil.which("cka")

MODELS_PY = '''
import os, time
import torch
from torch import nn

def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))

def make_blocks():
    torch.manual_seed(0)
    block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
    return nn.Sequential(block(3, 4), block(4, 4), block(4, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))

def raises():
    raise RuntimeError("no weights here\\nsecond line")

def marks():
    open(os.environ["CKA_TEST_MARKER"], "w").close()
    return make_model()

def many_layers():
    return nn.Sequential(*[nn.Identity() for _ in range(20000)])

class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = make_model()
    def forward(self, x):
        open(os.environ["CKA_TEST_STARTED"], "w").close()
        time.sleep(0.2)
        return self.inner(x)

def slow():
    return Slow()
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-errors")
    (root / "models.py").write_text(MODELS_PY)
    (root / "syntax.py").write_text("def make():\n    return (\n")
    (root / "boom.py").write_text("x = 1 / 0\n")
    rng = np.random.default_rng(0)
    np.save(root / "scalar.npy", np.float32(3.0))
    np.save(root / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(root / "good.npz", x=rng.normal(size=(40, 3, 8, 8)).astype(np.float32))
    data = (root / "good.npz").read_bytes()
    (root / "truncated.npz").write_bytes(data[: len(data) // 2])
    np.save(root / "good.npy", rng.normal(size=(40, 3, 8, 8)).astype(np.float32))
    (root / "truncated.npy").write_bytes((root / "good.npy").read_bytes()[:1000])
    from PIL import Image

    for folder, bad in (("corrupt-first", "a"), ("corrupt-later", "zz")):
        for cls in ("a", "b", "zz"):
            (root / folder / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray((rng.uniform(size=(8, 8, 3)) * 255).astype(np.uint8)).save(root / folder / cls / f"{i}.png")
        target = root / folder / bad / "0.png"
        if bad == "a":
            target.write_bytes(b"not an image at all")
        else:  # a valid header, cut short: fails only when decoded
            target.write_bytes(target.read_bytes()[:60])
    model = nn_model()
    example = torch.randn(2, 3, 8, 8)
    torch.export.save(torch.export.export(model, (example,)), str(root / "static.pt2"))
    batch = torch.export.Dim("batch", min=2)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), str(root / "dynamic.pt2"))
    blocks = _load_factory(root / "models.py", "make_blocks")
    torch.export.save(torch.export.export(blocks, (example,), dynamic_shapes=({0: batch},)), str(root / "blocks.pt2"))
    torch.jit.save(torch.jit.trace(model, example), str(root / "script.pt"))
    broken = root / "broken-packages"
    for name in ("torchvision", "timm"):
        (broken / name).mkdir(parents=True)
        (broken / name / "__init__.py").write_text(f'raise RuntimeError("operator {name}::nms does not exist")\n')
    return root


def _load_factory(path: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_models_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)().eval()


def nn_model():
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, pattern: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("cka: error:")]
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["compare", "models.py:make_model", "--data", "synthetic:3x16x16", "--limit", "8", "--no-progress"],
         r"models.py:make_model fails on the examples of --data synthetic:3x16x16 \(a batch of shape \(2, 3, 16, 16\)\): "
         r"RuntimeError: .*give data whose examples have the shape"),
        (["compare", "models.py:raises", "--data", "synthetic:3x8x8"],
         r"models.py:raises\(\) raised RuntimeError: no weights here; fix the factory"),
        (["compare", "syntax.py:make", "--data", "synthetic:3x8x8"], r"syntax.py has a syntax error at line \d+: .*; fix the file"),
        (["compare", "boom.py:make", "--data", "synthetic:3x8x8"], r"importing boom.py raised ZeroDivisionError: division by zero"),
        (["compare", "models.py:make_model", "--data", "corrupt-first", "--no-progress"],
         r"cannot decode image .*corrupt-first/a/0.png \(UnidentifiedImageError: .*\); remove or replace the file"),
        (["compare", "models.py:make_model", "--data", "corrupt-later", "--batch-size", "4", "--no-progress"],
         r"cannot decode image .*corrupt-later/zz/0.png \(.*\); remove or replace the file"),
        (["compare", "models.py:make_model", "--data", "truncated.npz"], r"cannot read data truncated.npz: .*write it again"),
        (["compare", "models.py:make_model", "--data", "truncated.npy"], r"cannot read data truncated.npy: .*write it again"),
        (["compare", "models.py:make_model", "--data", "scalar.npy"], r"data scalar.npy holds a single number \(a 0-d array\)"),
        (["compare", "models.py:make_model", "--data", "objects.npy"], r"objects.npy: it holds Python objects, which are never unpickled"),
        (["compare", "static.pt2", "--data", "synthetic:3x8x8", "--limit", "32", "--batch-size", "16"],
         r"static.pt2 was exported with a static batch size of 2, .*--batch-size 2 and a --limit that is a multiple of 2"),
        (["compare", "dynamic.pt2", "--data", "synthetic:3x9x9", "--limit", "8"],
         r"dynamic.pt2 takes examples of shape \(3, 8, 8\) but --data synthetic:3x9x9 has examples of shape \(3, 9, 9\)"),
        (["compare", "torchvision:resnet18", "--data", "synthetic:3x8x8"],
         r"torchvision is installed but fails to import \(RuntimeError: operator torchvision::nms does not exist\); reinstall"),
        (["compare", "timm:vit_tiny", "--data", "synthetic:3x8x8"], r"timm is installed but fails to import"),
        (["compare", "models.py:make_model", "--data", "synthetic:3x8x8", "--out", "models.py"], r"--out models.py is a file, not a folder"),
        (["compare", "models.py:make_model", "--data", "synthetic:3x8x8", "--out", "models.py/sub"], r"cannot write into --out models.py/sub"),
        (["compare", "models.py:make_model", "--data", "synthetic:3x8x8", "--limit", "0"], r"--limit must be positive"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(workdir, capsys, monkeypatch, args, pattern):
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir / "broken-packages"))
    for name in ("torchvision", "timm"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    code, _, err = run_main(capsys, *args)
    assert_one_line_error(code, err, pattern)


def test_the_output_folder_is_checked_before_any_model_is_loaded(workdir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)
    marker = tmp_path / "factory-ran"
    monkeypatch.setenv("CKA_TEST_MARKER", str(marker))
    code, _, err = run_main(capsys, "compare", "models.py:marks", "--data", "synthetic:3x8x8", "--out", "models.py/x")
    assert_one_line_error(code, err, "cannot write into --out")
    assert not marker.exists()
    (tmp_path / "out" / "cka.json").mkdir(parents=True)  # the result file's name is taken by a folder
    code, _, err = run_main(capsys, "compare", "models.py:marks", "--data", "synthetic:3x8x8", "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, r"cka.json is a folder, but the result is written there")
    assert not marker.exists()


def test_exported_programs_get_the_factory_models_block_defaults(workdir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)
    common = ["--data", "synthetic:3x8x8", "--limit", "16", "--batch-size", "8", "--no-progress"]
    assert run_main(capsys, "compare", "models.py:make_blocks", *common, "--out", str(tmp_path / "f"))[0] == 0
    assert run_main(capsys, "compare", "blocks.pt2", *common, "--out", str(tmp_path / "e"))[0] == 0
    factory = json.loads((tmp_path / "f" / "cka.json").read_text())
    exported = json.loads((tmp_path / "e" / "cka.json").read_text())
    assert factory["model1_layers"] == ["0", "1", "2"]  # the three conv blocks
    assert exported["model1_layers"] == factory["model1_layers"]
    assert np.allclose(exported["matrix"], factory["matrix"], atol=1e-6)


def test_torchscript_results_name_their_layer_output(workdir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)
    code, out, err = run_main(capsys, "compare", "script.pt", "--data", "synthetic:3x8x8", "--limit", "16",
                              "--batch-size", "8", "--no-progress", "--out", str(tmp_path))
    assert code == 0, err
    saved = json.loads((tmp_path / "cka.json").read_text())
    assert saved["model1_layers"] == ["output"] and saved["model2_layers"] == ["output"]
    assert "  output" in out


def test_the_result_records_the_data_spec_not_an_object(workdir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)
    code, _, err = run_main(capsys, "compare", "models.py:make_model", "--data", "synthetic:3x8x8", "--limit", "16",
                            "--batch-size", "8", "--no-progress", "--out", str(tmp_path))
    assert code == 0, err
    settings = json.loads((tmp_path / "cka.json").read_text())["settings"]
    assert settings["dataset1"] == "synthetic:3x8x8, limit 16" and " at 0x" not in json.dumps(settings)


def test_image_folders_are_sampled_across_classes_and_decoded_lazily(tmp_path, monkeypatch):
    from PIL import Image

    from cka.specs import ImageFolder

    rng = np.random.default_rng(1)
    for cls in ("c0", "c1", "c2"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray((rng.uniform(size=(6, 6, 3)) * 255).astype(np.uint8)).save(tmp_path / cls / f"{i:02d}.png")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(Path(fp)) or real_open(fp, *a, **k))
    data = ImageFolder(tmp_path, limit=6)
    assert len(opened) == 1  # only the first image's header, for the size
    assert len(data) == 6 and {label for _, label in data.files} == {0, 1, 2}
    assert [f for f, _ in data.files] == [f for f, _ in ImageFolder(tmp_path, limit=6).files]  # seeded
    assert [f for f, _ in data.files] == sorted(f for f, _ in data.files)  # folder order kept
    x, y = data[3]
    assert x.shape == (3, 6, 6) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    assert int(y) == data.files[3][1]
    assert len(ImageFolder(tmp_path)) == 30 and ImageFolder(tmp_path, image_size=4)[0][0].shape == (3, 4, 4)


# ------------------------------------------------------------------------------------------------
# Hostile model files: nothing in them runs
# ------------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite_archive(source: Path, target: Path, edit) -> Path:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return target


def craft_pt2(source: Path, target: Path, kind: str, marker: Path) -> Path:
    """A ``.pt2`` whose loading by ``torch.export.load`` would run ``touch marker`` (each kind did, in torch 2.13)."""
    command = f"touch {marker}"

    def edit(name: str, data: bytes):
        if kind == "pickled-weight":
            if name.endswith("_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                return json.dumps(config).encode()
            if name.endswith("data/weights/weight_0"):
                return pickle.dumps(_Payload(marker), protocol=2)
        if kind == "sample-inputs" and name.endswith(".pt") and "sample_inputs" in name:
            buffer = io.BytesIO()
            torch.save({"x": _Payload(marker)}, buffer)
            return buffer.getvalue()
        if name.endswith(".json") and "/models/" in name:
            program = json.loads(data)
            if kind == "guards-code":
                program["guards_code"] = [f"__import__('os').system('{command}') == 0"]
            elif kind == "shape-expression":
                text = json.dumps(program)
                found = re.search(r'"expr_str": "(Symbol\([^"]*\))"', text)
                evil = f"(__import__('os').system('{command}') or 1) * {found.group(1)}"
                return text.replace(f'"expr_str": "{found.group(1)}"', f'"expr_str": {json.dumps(evil)}', 1).encode()
            elif kind == "python-target":
                node = program["graph_module"]["graph"]["nodes"][-1]
                node["target"] = "torch.os.system"
            elif kind == "compiled-code":
                pass
            return json.dumps(program).encode()
        return data

    _rewrite_archive(source, target, edit)
    if kind == "compiled-code":
        with zipfile.ZipFile(target, "a") as archive:
            root = archive.namelist()[0].split("/")[0]
            archive.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    return target


PT2_ATTACKS = ["pickled-weight", "sample-inputs", "guards-code", "shape-expression", "python-target", "compiled-code"]


def run_cli(*args: str, cwd: Path, module: bool | str = False, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run the command line: the ``cka`` script, or ``python -m cka.cli`` (``module=True``) / ``-m <module>``."""
    name = module if isinstance(module, str) else "cka.cli"
    command = [sys.executable, "-m", name, *args] if module else [SCRIPT, *args]
    assert command[0], "the cka console script is not installed (pip install -e .)"
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600, env={**os.environ, **(env or {})}, **kwargs)


@pytest.mark.parametrize("kind", PT2_ATTACKS)
def test_crafted_pt2_files_are_refused_and_their_payload_never_runs(workdir, tmp_path, kind):
    marker = tmp_path / "pwned"
    crafted = craft_pt2(workdir / "dynamic.pt2", tmp_path / f"{kind}.pt2", kind, marker)
    for module, args in ((False, ["--list-layers"]), (True, ["--data", "synthetic:3x8x8", "--limit", "8"])):
        run = run_cli("compare", str(crafted), *args, "--out", str(tmp_path / "out"), cwd=tmp_path, module=module)
        assert not marker.exists(), f"{kind}: the payload ran"
        line = assert_one_line_error(run.returncode, run.stderr, rf"{kind}.pt2 is refused: .*--trust-code")
        assert "could run code from the file. To fix:" in line


def test_trust_code_loads_a_pt2_as_pytorch_does(workdir, tmp_path):
    """--trust-code is what its help says: torch.export.load's own behaviour, payload included."""
    marker = tmp_path / "ran"
    crafted = craft_pt2(workdir / "dynamic.pt2", tmp_path / "trusted.pt2", "pickled-weight", marker)
    run_cli("compare", str(crafted), "--list-layers", "--trust-code", cwd=tmp_path)
    assert marker.exists()
    assert "--trust-code" in run_cli("compare", "--help", cwd=tmp_path).stdout


def test_plain_pt2_files_load_without_trust_code(workdir, tmp_path):
    run = run_cli("compare", str(workdir / "blocks.pt2"), "--list-layers", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert [line.strip() for line in run.stdout.splitlines()[1:4]] == ["0", "0.0", "0.1"]


def test_a_pickled_model_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker)}, tmp_path / "pickled.pt")
    with open(tmp_path / "legacy.pt", "wb") as file:
        pickle.dump(_Payload(marker), file)
    for name in ("pickled.pt", "legacy.pt"):
        run = run_cli("compare", name, "--data", "synthetic:3x8x8", cwd=tmp_path)
        assert_one_line_error(run.returncode, run.stderr, "is not a TorchScript file .*pickled models are never loaded")
    assert not marker.exists()


def test_weights_files_holding_objects_are_refused(tmp_path):
    from cka.model_files import UntrustedModelError, check_weights_file

    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "extra": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UntrustedModelError, match=r"evil.pth is refused: it holds more than tensors \(it would import and call (posix|os).system\)"):
        check_weights_file(tmp_path / "evil.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "fine.pth")
    check_weights_file(tmp_path / "fine.pth")
    assert not marker.exists()


def test_the_checker_accepts_what_torch_export_writes_for_real_programs(tmp_path):
    """Dynamic shapes with guards, a higher-order op (cond), a transformer: all load unprompted."""
    from cka.model_files import read_exported_program

    nn = torch.nn

    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

        def forward(self, x):
            y = torch.nn.functional.interpolate(self.conv(x), scale_factor=2)
            y = y.view(y.shape[0], 4, -1).mean(-1)
            h = y.shape[0] // 2
            return torch.cat([self.fc(y)[:h], self.fc(y)[h:]], 0)

    class Cond(nn.Module):
        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda x: x * 2, lambda x: x - 1, (x,))

    auto = torch.export.Dim.AUTO
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
    cases = {
        "halves": (Halves(), (torch.randn(4, 3, 8, 8),), ({0: auto, 2: auto, 3: auto},)),
        "cond": (Cond(), (torch.randn(4, 3),), ({0: torch.export.Dim("b")},)),
        "encoder": (encoder, (torch.randn(4, 5, 16),), ({0: torch.export.Dim("b"), 1: torch.export.Dim("t")},)),
    }
    for name, (model, example, shapes) in cases.items():
        program = torch.export.export(model.eval(), example, dynamic_shapes=shapes)
        torch.export.save(program, str(tmp_path / f"{name}.pt2"))
        loaded = read_exported_program(tmp_path / f"{name}.pt2")
        assert torch.allclose(loaded.module()(*example), model(*example), atol=1e-5), name
    assert program is not None


# ------------------------------------------------------------------------------------------------
# Processes: both entry points, broken pipes, Ctrl-C
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [False, True, "cka"], ids=["cka", "python -m cka.cli", "python -m cka"])
def test_both_entry_points_report_errors_the_same_way(workdir, module):
    run = run_cli("compare", "models.py:raises", "--data", "synthetic:3x8x8", cwd=workdir, module=module)
    assert_one_line_error(run.returncode, run.stderr, r"models.py:raises\(\) raised RuntimeError: no weights here")
    unknown = run_cli("compare", "resnet18", "--data", "synthetic:3x8x8", cwd=workdir, module=module)
    assert_one_line_error(unknown.returncode, unknown.stderr, "unknown model spec 'resnet18'")


def test_list_layers_into_a_closed_pipe_ends_quietly(workdir):
    process = subprocess.Popen([SCRIPT, "compare", "models.py:many_layers", "--list-layers"], cwd=workdir,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("MODEL1")
    process.stdout.close()  # as `| head -1` does
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0 and "Traceback" not in err and "Error" not in err, err


def test_ctrl_c_is_one_line_and_exit_130(workdir, tmp_path):
    started = tmp_path / "started"
    env = {**os.environ, "CKA_TEST_STARTED": str(started)}
    process = subprocess.Popen(
        [SCRIPT, "compare", "models.py:slow", "--data", "synthetic:3x8x8", "--limit", "4000", "--batch-size", "8",
         "--no-progress", "--out", str(tmp_path / "out")],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.monotonic() + 300
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), process.communicate()[1]
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert err.strip() == "cka: interrupted (Ctrl-C); no result was written."
    assert not (tmp_path / "out" / "cka.json").exists()
