"""Describes the machine a benchmark ran on and writes results as JSON and a Markdown table."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def describe() -> dict[str, Any]:
    """The runtime's machine description (CPU, cores, memory, GPU/Jetson) plus key package versions."""
    from importlib.metadata import PackageNotFoundError, version

    from trapedge.runtime.bench import machine

    info = machine()
    info["versions"] = {}
    for name in ("onnxruntime", "torch", "numpy", "speciesnet"):
        try:
            info["versions"][name] = version(name)
        except PackageNotFoundError:
            info["versions"][name] = None
    return info


def write(name: str, result: dict[str, Any], table: list[tuple[str, str]], folder: Path | None = None) -> Path:
    """Writes results/<name>.json and results/<name>.md (a two-column table plus the machine)."""
    folder = folder or Path(__file__).parent / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    machine = result.get("machine", {})
    lines = [f"# {name}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in table]
    lines += ["", f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('memory_gib')} GiB; "
              f"Python {machine.get('python')}; {machine.get('versions')}", ""]
    (folder / f"{name}.md").write_text("\n".join(lines))
    return folder / f"{name}.md"
