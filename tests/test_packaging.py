"""Packaging: a distribution name of our own, typed, and a clear warning when another distribution
(pytorch-cka) provides the module ``cka`` too; the Makefile's install and lint knobs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_distribution_name_is_not_the_taken_cka_and_the_import_name_stays():
    from cka._install import DISTRIBUTION

    name = PYPROJECT["project"]["name"]
    assert name == DISTRIBUTION == "centered-kernel-alignment"
    assert PYPROJECT["project"]["scripts"]["cka"] == "cka.cli:main"
    assert (ROOT / "cka" / "__init__.py").is_file()


def test_the_package_is_typed_and_the_dev_extra_has_the_linters():
    assert (ROOT / "cka" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["cka"]
    dev = " ".join(PYPROJECT["project"]["optional-dependencies"]["dev"])
    assert "ruff" in dev and "mypy" in dev
    assert PYPROJECT["tool"]["ruff"]["line-length"] == 120
    overrides = {m for o in PYPROJECT["tool"]["mypy"]["overrides"] for m in o["module"]}
    assert {"torch.*", "jax.*", "onnx.*", "onnxruntime.*"} <= overrides


@pytest.mark.slow
def test_the_built_wheel_carries_the_name_the_types_and_no_tests(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name.startswith("centered_kernel_alignment-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cka/py.typed" in names and "cka/__init__.py" in names and "cka/cli.py" in names
    assert not [n for n in names if n.startswith("tests/")]


def test_the_makefile_has_pip_extra_on_the_torch_install_and_lint_on_by_default():
    """`make test` lints (ruff, format, mypy) unless LINT=0 is given."""
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^PIP_EXTRA \?=\s*$", text, re.M) and re.search(r"^LINT \?= 1$", text, re.M)
    torch_lines = [line for line in text.splitlines() if "$(TORCH_PIN)" in line and "pip install" in line]
    assert any("$(PIP_EXTRA)" in line for line in torch_lines)
    lint = text.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check cka" in lint and "ruff format --check cka" in lint and "mypy cka" in lint
    assert "$(if $(filter 1,$(LINT)),lint)" in text.split("\ntest:", 1)[1].splitlines()[0]


def _make_dry_run(*args: str) -> str:
    run = subprocess.run(["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.skipif(subprocess.run(["which", "make"], capture_output=True).returncode != 0, reason="needs make")
def test_make_passes_pip_extra_and_runs_lint_before_pytest():
    cpu = "--index-url https://download.pytorch.org/whl/cpu"
    lines = _make_dry_run("test", f"PIP_EXTRA={cpu}", "LINT=1").splitlines()
    torch_install = next(line for line in lines if 'pip install -q' in line and '"torch==' in line and "-e" not in line)
    assert cpu in torch_install
    assert not any(cpu in line for line in lines if "-e " in line)  # the rest comes from the default index
    order = [i for i, line in enumerate(lines) if re.search(r"ruff check cka|ruff format --check cka|mypy cka|pytest", line)]
    assert [lines[i].split()[0].rsplit("/", 1)[-1] for i in order] == ["ruff", "ruff", "mypy", "python"]
    assert not [line for line in _make_dry_run("test").splitlines() if "mypy" in line or "ruff" in line]


# ------------------------------------------------------------------------------------------------
# Another distribution that installs a top-level `cka` (pytorch-cka), simulated on a temporary path
# ------------------------------------------------------------------------------------------------


def fake_pytorch_cka(root: Path, with_package: bool) -> Path:
    info = root / "pytorch_cka-1.1.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pytorch-cka\nVersion: 1.1.3\n")
    (info / "RECORD").write_text(
        "cka/__init__.py,sha256=x,1237\ncka/cka.py,sha256=y,13418\npytorch_cka-1.1.3.dist-info/RECORD,,\n"
    )
    if with_package:
        (root / "cka").mkdir()
        (root / "cka" / "__init__.py").write_text("from .cka import CKA\n")
    return root


def import_cka_with(extra_path: Path | None) -> subprocess.CompletedProcess:
    code = "import sys\n"
    if extra_path is not None:  # after ours: ours is the one imported, and it must notice the other
        code += f"sys.path.append({str(extra_path)!r})\n"
    code += "import cka\nprint('torch' in sys.modules)\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)


@pytest.mark.parametrize("with_package", [False, True], ids=["files-over-ours", "second-copy"])
def test_import_warns_when_pytorch_cka_also_provides_the_module(tmp_path, with_package):
    run = import_cka_with(fake_pytorch_cka(tmp_path, with_package))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"  # the check never imports torch
    assert "CKAInstallWarning" in run.stderr
    assert "the distribution pytorch-cka 1.1.3" in run.stderr and "installs files under cka/" in run.stderr
    assert "pip uninstall pytorch-cka" in run.stderr and "pip install --force-reinstall centered-kernel-alignment" in run.stderr
    if with_package:
        assert f"a second module named cka is at {tmp_path / 'cka'}" in run.stderr


def test_import_is_silent_without_a_conflict(tmp_path):
    (tmp_path / "other_pkg-1.0.dist-info").mkdir()
    (tmp_path / "other_pkg-1.0.dist-info" / "RECORD").write_text("other_pkg/__init__.py,,\n")
    (tmp_path / "torch_cka-0.21.dist-info").mkdir()  # the predecessor: module torch_cka, no conflict
    (tmp_path / "torch_cka-0.21.dist-info" / "RECORD").write_text("torch_cka/__init__.py,,\n")
    run = import_cka_with(tmp_path)
    assert run.returncode == 0 and "Warning" not in run.stderr, run.stderr


def test_find_conflicts_reads_only_dist_info_that_mention_cka(tmp_path):
    from cka._install import find_conflicts

    fake_pytorch_cka(tmp_path / "site", with_package=False)
    (tmp_path / "site" / "packaging-26.4.dist-info").mkdir()  # "cka" inside a word is not a match
    (tmp_path / "site" / "packaging-26.4.dist-info" / "RECORD").write_text("cka/__init__.py,,\n")
    ours = tmp_path / "site" / "centered_kernel_alignment-0.1.0.dist-info"
    ours.mkdir()
    (ours / "RECORD").write_text("cka/__init__.py,,\n")
    found = find_conflicts(path=[str(tmp_path / "site")])
    assert len(found) == 1 and "pytorch-cka 1.1.3" in found[0]
