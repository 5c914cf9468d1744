"""Gather the outputs of ``benchmarks/gpu.sh`` into one markdown table per step and one JSON file.

Reads OUT_DIR/{status.txt, environment.json, tests.xml, models.json, models.md, core.log, jax.log}
(whatever exists: a failed step is reported as failed) and writes OUT_DIR/summary.md and
OUT_DIR/results.json, with the issue's targets checked against the model benchmark:
blocks <= 1.15x the floor at "highest" and <= 1.10x at "tf32"; all leaves <= 1.6x at "tf32" with a
deviation <= 1e-4; peak extra GPU memory <= 2 GB on both layer sets.

Usage: ``python benchmarks/gpu_summary.py OUT_DIR``
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

#: (layer set, method, limit on time / floor, limit on the deviation or None)
TARGETS = (("blocks", "cka", 1.15, None), ("blocks", "cka-tf32", 1.10, None), ("leaves", "cka-tf32", 1.6, 1e-4))
EXTRA_MEMORY_LIMIT_MB = 2048


def read_status(out: Path) -> dict[str, dict[str, int]]:
    """``{step: {"rc": int, "seconds": int}}`` from the ``name rc=R seconds=S`` lines of status.txt."""
    steps: dict[str, dict[str, int]] = {}
    path = out / "status.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, *fields = line.split()
        steps[name] = {key: int(value) for key, value in (field.split("=", 1) for field in fields)}
    return steps


def read_tests(out: Path) -> dict[str, Any]:
    """Counts, failures and skip reasons from pytest's junit XML."""
    path = out / "tests.xml"
    if not path.exists():
        return {"error": "no tests.xml (the test step did not finish)"}
    root = ElementTree.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = {}
    for case in cases:
        skip = case.find("skipped")
        if skip is not None:
            skipped[f"{case.get('classname')}::{case.get('name')}"] = (skip.get("message") or "")[:160]
    cuda = [c for c in cases if "cuda" in (c.get("name") or "").lower() or "cuda" in (c.get("classname") or "").lower()]
    return {
        "total": len(cases), "failed": failed, "skipped": skipped,
        "passed": len(cases) - len(failed) - len(skipped),
        "cuda_named_tests": len(cuda), "cuda_named_skipped": sum(1 for c in cuda if c.find("skipped") is not None),
    }


def check_targets(models: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue against the model benchmark's rows: the value measured and whether it holds."""
    checks = []
    by_set = {row["layers"]: row["results"] for row in models.get("rows", [])}
    for layer_set, method, ratio_limit, deviation_limit in TARGETS:
        results = by_set.get(layer_set, {})
        floor, entry = results.get("floor", {}), results.get(method, {})
        if "time" not in floor or "time" not in entry:
            checks.append({"target": f"{layer_set} {method} <= {ratio_limit}x floor", "measured": None, "holds": False})
            continue
        ratio = entry["time"] / floor["time"]
        holds = ratio <= ratio_limit
        measured = f"{ratio:.2f}x"
        if deviation_limit is not None:
            deviation = entry.get("deviation", float("inf"))
            holds = holds and deviation <= deviation_limit
            measured += f", deviation {deviation:.1e}"
        checks.append({"target": f"{layer_set} {method} <= {ratio_limit}x floor"
                       + (f", deviation <= {deviation_limit:g}" if deviation_limit else ""), "measured": measured, "holds": holds})
    for layer_set, results in by_set.items():
        floor_peak = results.get("floor", {}).get("peak_mb")
        for method in ("cka", "cka-tf32", "cka-bf16"):
            if method in results and "peak_mb" in results[method] and floor_peak is not None:
                extra = results[method]["peak_mb"] - floor_peak
                checks.append({"target": f"{layer_set} {method} extra memory <= {EXTRA_MEMORY_LIMIT_MB} MB",
                               "measured": f"{extra:.0f} MB", "holds": extra <= EXTRA_MEMORY_LIMIT_MB})
    return checks


def table_of(log: Path) -> str:
    """The markdown table lines (``|...``) a benchmark printed, or a note that it printed none."""
    if not log.exists():
        return "(not run)\n"
    lines = [line for line in log.read_text().splitlines() if line.startswith("|")]
    return "\n".join(lines) + "\n" if lines else "(no table; see the log's tail)\n" + "\n".join(log.read_text().splitlines()[-5:]) + "\n"


def main(out: Path) -> None:
    status = read_status(out)
    environment = json.loads((out / "environment.json").read_text()) if (out / "environment.json").exists() else {}
    tests = read_tests(out)
    models = json.loads((out / "models.json").read_text()) if (out / "models.json").exists() else {}
    checks = check_targets(models) if models else []
    results = {"status": status, "environment": environment, "tests": tests, "models": models, "targets": checks}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    parts = ["# GPU run", "", f"Environment: `{json.dumps(environment)}`", "", "| step | exit status | seconds |",
             "|---|---:|---:|"]
    parts += [f"| {name} | {s.get('rc')} | {s.get('seconds')} |" for name, s in status.items()]
    parts += ["", "## Tests", ""]
    if "error" in tests:
        parts.append(tests["error"])
    else:
        parts.append(f"{tests['passed']} passed, {len(tests['failed'])} failed, {len(tests['skipped'])} skipped "
                     f"(CUDA-named tests: {tests['cuda_named_tests']}, of which skipped: {tests['cuda_named_skipped']})")
        parts += [f"- FAILED {name}" for name in tests["failed"]]
        parts += [f"- skipped {name}: {why}" for name, why in list(tests["skipped"].items())[:40]]
    parts += ["", "## Models", "", (out / "models.md").read_text() if (out / "models.md").exists() else "(not run)", ""]
    parts += ["| target | measured | holds |", "|---|---|---|"]
    parts += [f"| {c['target']} | {c['measured']} | {'yes' if c['holds'] else 'NO'} |" for c in checks]
    parts += ["", "## Core", "", table_of(out / "core.log"), "## JAX", "", table_of(out / "jax.log")]
    (out / "summary.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
