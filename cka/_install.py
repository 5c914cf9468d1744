"""Noticing another distribution's files under the module name ``cka``, cheaply, at import.

This package is distributed as ``centered-kernel-alignment`` and imported as ``cka``; pytorch-cka
(and the unrelated ``cka`` placeholder on the package index) install a top-level ``cka`` module
too. Two distributions cannot own one module: the last one installed overwrites the other's files,
and uninstalling either deletes files the other needs. When ``import cka`` finds such a
distribution, or a second ``cka`` package elsewhere on ``sys.path``, it warns with the fix instead
of failing later somewhere deep. The check costs a directory listing per ``sys.path`` entry and a
read of the few ``*.dist-info/RECORD`` files whose name mentions ``cka`` (no ``importlib.metadata``,
whose import alone costs more than the rest of ``import cka``).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

__all__ = ["DISTRIBUTION", "CKAInstallWarning", "find_conflicts", "warn_about_conflicts"]

#: This package's distribution name (``pip install centered-kernel-alignment``).
DISTRIBUTION = "centered-kernel-alignment"


class CKAInstallWarning(UserWarning):
    """Another installed distribution provides the module ``cka`` too."""


def _project(dist_info: str) -> str:
    """``pytorch_cka-1.1.3.dist-info`` -> ``pytorch-cka`` (normalised as the package index does)."""
    return re.sub(r"[-_.]+", "-", dist_info.rsplit(".", 1)[0].split("-")[0]).lower()


def _claims_cka(record: Path) -> bool:
    try:
        text = record.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(line.startswith(("cka/__init__.py,", "cka\\__init__.py,")) for line in text.splitlines())


def find_conflicts(package_dir: Path | None = None, path: list[str] | None = None) -> list[str]:
    """Descriptions of what else provides ``cka``: other distributions whose RECORD lists
    ``cka/__init__.py``, and other ``cka`` packages on ``path`` (default ``sys.path``)."""
    here = (package_dir or Path(__file__).parent).resolve()
    found: list[str] = []
    for entry in path if path is not None else sys.path:
        folder = Path(entry or ".")
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if not name.endswith(".dist-info") or "cka" not in _project(name).split("-"):
                continue
            project = _project(name)
            if project != DISTRIBUTION and _claims_cka(folder / name / "RECORD"):
                version = name[: -len(".dist-info")].partition("-")[2] or "?"
                found.append(f"the distribution {project} {version} ({folder / name}) installs files under cka/")
        if "cka" in names:
            copy = folder / "cka"
            try:
                other = (copy / "__init__.py").is_file() and copy.resolve() != here
            except OSError:
                other = False
            if other:
                found.append(f"a second module named cka is at {copy}")
    return found


def warn_about_conflicts() -> None:
    """Warn once per import if :func:`find_conflicts` finds anything."""
    conflicts = find_conflicts()
    if conflicts:
        warnings.warn(
            f"{'; '.join(conflicts)}. This package ({DISTRIBUTION}) is imported as cka too, and two distributions "
            f"cannot share one module: installing one overwrites the other's files and uninstalling either breaks "
            f"the other. Keep one per environment, e.g. pip uninstall pytorch-cka && pip install --force-reinstall "
            f"{DISTRIBUTION}.",
            CKAInstallWarning,
            stacklevel=3,
        )
