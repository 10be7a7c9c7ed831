"""Describes the machine a benchmark ran on and writes results as JSON and a Markdown table."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def describe() -> dict[str, Any]:
    """CPU model, cores, memory, Python and key package versions."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for name in ("onnxruntime", "torch", "numpy", "speciesnet"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # a missing or broken package is just not reported
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


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
