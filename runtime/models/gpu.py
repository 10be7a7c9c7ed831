"""GPU, driver, Jetson and TensorRT facts for engine cache keys and benchmark reports; best effort, never raises."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["cuda_device", "gpu_info"]

_JETSON_SM = (("orin", "8.7"), ("xavier", "7.2"), ("tx2", "6.2"), ("nano", "5.3"), ("tx1", "5.3"))


def _run(command: Sequence[str], timeout: float = 10.0) -> Optional[str]:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_bytes().replace(b"\x00", b"").decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def gpu_info() -> dict[str, Any]:
    """Best-effort GPU, driver, Jetson and TensorRT facts (nvidia-smi, device tree, nvpmodel); never raises."""
    info: dict[str, Any] = {}
    try:
        smi = _run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                    "--format=csv,noheader,nounits"])
        if smi:
            fields = [f.strip() for f in smi.splitlines()[0].split(",")]
            keys = ("name", "compute_capability", "driver", "memory_mib")
            for key, value in zip(keys, fields):
                if value and not value.startswith("[") and value != "N/A":
                    info[key] = int(value) if key == "memory_mib" and value.isdigit() else value
        model = _read("/proc/device-tree/model")
        if model and ("jetson" in model.lower() or "nvidia" in model.lower()):
            info["jetson_model"] = model
        release = _read("/etc/nv_tegra_release")
        if release:
            info["l4t"] = release.splitlines()[0].lstrip("# ").strip()
        power = _run(["nvpmodel", "-q"], timeout=5)
        if power:
            info["nvpmodel"] = " ".join(line.strip() for line in power.splitlines() if line.strip())
        if "name" not in info or "compute_capability" not in info:
            info.update({k: v for k, v in _cuda_properties().items() if k not in info})
        if "compute_capability" not in info and "jetson_model" in info:
            lowered = info["jetson_model"].lower()
            sm = next((sm for word, sm in _JETSON_SM if word in lowered), None)
            if sm:
                info["compute_capability"] = sm
        if "name" not in info and "jetson_model" in info:
            info["name"] = info["jetson_model"]
        try:
            import tensorrt

            info["tensorrt"] = tensorrt.__version__
        except Exception:  # absent or broken bindings are simply not reported
            pass
    except Exception as e:  # best effort: report what failed instead of raising
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def cuda_device() -> Optional[str]:
    """The name of a visible CUDA GPU or Jetson board, or None where there is none."""
    return gpu_info().get("name")


def _cuda_properties() -> dict[str, Any]:
    try:
        try:
            from cuda.bindings import runtime
        except ImportError:
            from cuda import cudart as runtime
        err, count = runtime.cudaGetDeviceCount()
        if err != runtime.cudaError_t.cudaSuccess or not count:
            return {}
        err, props = runtime.cudaGetDeviceProperties(0)
        if err != runtime.cudaError_t.cudaSuccess:
            return {}
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}
    except Exception:  # no cuda-python, no driver or no GPU
        return {}
