"""Per-stage timers, cheap enough to stay on in every run."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np

__all__ = ["StageTimer"]


class StageTimer:
    """Collects wall-clock durations per named stage."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the enclosed block under a stage name."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        """Records one duration."""
        self.samples.setdefault(name, []).append(seconds)

    def summary(self) -> dict[str, dict[str, float]]:
        """Count, mean, p50, p95 and total in milliseconds per stage."""
        out = {}
        for name, values in self.samples.items():
            ms = np.asarray(values) * 1000.0
            out[name] = {
                "count": int(ms.size),
                "mean_ms": float(ms.mean()),
                "p50_ms": float(np.percentile(ms, 50)),
                "p95_ms": float(np.percentile(ms, 95)),
                "total_ms": float(ms.sum()),
            }
        return out


def machine() -> dict:
    """CPU model, cores, memory and GPU/Jetson facts where readable (never raises)."""
    import os
    import platform
    from pathlib import Path

    info: dict = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "python": platform.python_version(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    for path, key in (("/proc/device-tree/model", "board"), ("/etc/nv_tegra_release", "l4t")):
        try:
            info[key] = Path(path).read_text(errors="replace").strip("\x00\n ")
        except OSError:
            pass
    try:
        import subprocess

        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if gpu.returncode == 0:
            info["gpu"] = gpu.stdout.strip()
        mode = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10)
        if mode.returncode == 0:
            info["jetson_power_mode"] = mode.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def report_markdown(result: dict) -> str:
    """The benchmark result as a Markdown table with the machine described."""
    lines = [f"# trapedge bench: {result['images']} images, {result['images_per_s']:.3f} images/s end to end", "",
             "| stage | count | mean ms | p50 ms | p95 ms | total ms |", "|---|---|---|---|---|---|"]
    for stage, s in result["stages"].items():
        lines.append(f"| {stage} | {s['count']} | {s['mean_ms']:.1f} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | "
                     f"{s['total_ms']:.0f} |")
    lines += ["", f"Wall {result['wall_s']:.2f} s, timed stages cover {100 * result['timed_share']:.1f}% of it; "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB; providers {result['providers']}.",
              f"Machine: {result['machine']}", ""]
    return "\n".join(lines)
