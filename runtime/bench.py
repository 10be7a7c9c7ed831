"""The benchmark report: the machine, peak memory, achieved GFLOP/s per model, and time per stage as Markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def machine() -> dict:
    """CPU model, cores, memory and GPU/Jetson facts where readable (never raises)."""
    import os
    import platform
    from pathlib import Path

    from .models.gpu import gpu_info

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
    gpu = gpu_info()
    if gpu:
        info["gpu"] = gpu
    return info


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sgemm_peak_gflops(size: int = 2048, repeats: int = 3) -> float:
    """This CPU's float32 matrix-product rate through numpy's BLAS: the practical ceiling for convolutions."""
    import time

    import numpy as np

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    a @ a  # warm-up: threads started, pages touched
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best / 1e9


def model_rates(models: dict[str, dict], paths: dict[str, Path]) -> dict[str, dict]:
    """Per model: calls, GFLOP done (counted from its ONNX graph at the shapes it was fed), seconds, GFLOP/s."""
    from .models.flops import graph_flops

    rates = {}
    for name, meter in models.items():
        flops: Optional[float] = 0.0
        try:
            for call in meter["calls"]:
                flops += call["count"] * graph_flops(paths[name], {k: tuple(v) for k, v in call["inputs"].items()})
        except (ImportError, KeyError, ValueError) as e:
            flops, rates[name] = None, {"error": f"cannot count FLOPs: {e}"}
        calls = sum(call["count"] for call in meter["calls"])
        rates[name] = {**rates.get(name, {}), "calls": calls, "seconds": meter["seconds"],
                       "gflop": flops / 1e9 if flops is not None else None,
                       "gflops_per_s": flops / 1e9 / meter["seconds"] if flops and meter["seconds"] > 0 else None}
    return rates


def report_markdown(result: dict) -> str:
    """The benchmark result as a Markdown table with the machine described."""
    lines = [f"# trapedge bench: {result['images']} images, {result['images_per_s']:.3f} images/s end to end", "",
             "| stage | count | mean ms | p50 ms | p95 ms | total ms |", "|---|---|---|---|---|---|"]
    for stage, s in result["stages"].items():
        lines.append(f"| {stage} | {s['count']} | {s['mean_ms']:.1f} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | "
                     f"{s['total_ms']:.0f} |")
    rates = result.get("models") or {}
    if rates:
        peak = result.get("sgemm_peak_gflops")
        lines += ["", "| model | calls | GFLOP | seconds | GFLOP/s | share of sgemm peak |", "|---|---|---|---|---|---|"]
        for name, r in rates.items():
            rate = r.get("gflops_per_s")
            share = f"{100 * rate / peak:.0f}%" if rate and peak else "-"
            lines.append(f"| {name} | {r['calls']} | {r['gflop'] or 0:.1f} | {r['seconds']:.2f} | "
                         f"{rate or 0:.1f} | {share} |")
        if peak:
            lines.append(f"\nsgemm peak (numpy BLAS, float32 2048x2048): {peak:.0f} GFLOP/s.")
    lines += ["", f"Wall {result['wall_s']:.2f} s, timed stages cover {100 * result['timed_share']:.1f}% of it; "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB; providers {result['providers']}.",
              f"Machine: {result['machine']}", ""]
    return "\n".join(lines)
