"""benchmarks/gpu_check.sh's second part, trapedge's own backends, run on the CPU so the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_backends_check_runs_every_route_it_can_and_says_why_it_skips_the_others(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, GPU_CHECK_ANCHOR="0",
               GPU_CHECK_DEVICES="cpu,cuda,tensorrt", GPU_CHECK_SIZE="tiny", GPU_CHECK_WORK=str(tmp_path / "work"))
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "nvidia-smi.txt").is_file()
    result = json.loads((tmp_path / "out" / "gpu_backends.json").read_text())
    assert result["errors"] == [] and result["size"] == "tiny"
    route = result["routes"]["cpu fp32"]
    assert route["classifier"]["providers"] == ["CPUExecutionProvider"]
    assert route["classifier"]["parity"]["top1_agreement"] == 1.0 and route["classifier"]["parity"]["count"] == 8
    assert route["classifier"]["parity"]["min_feature_cosine"] > 0.9999
    assert route["detector"]["parity"]["rows_compared"] > 0 and route["detector"]["parity"]["max_score_diff"] == 0
    assert route["classifier"]["batch8"]["ms_per_image"] > 0 and route["detector"]["batch1"]["ms_min"] > 0
    run = result["end_to_end"]["cpu fp32"]
    assert run["same_detections_as_cpu"] and run["label_agreement_with_cpu"] == 1.0
    assert result["quantize_fp16"]["returncode"] == 0, result["quantize_fp16"]["output"]
    half = result["routes"]["cpu fp16"]["classifier"]
    assert half["parity"]["top1_agreement"] >= 0.875 and half["parity"]["min_feature_cosine"] > 0.99
    assert result["end_to_end"]["cpu fp16"]["detections"] > 0
    assert run["detections"] == result["end_to_end"]["baseline (cpu fp32)"]["detections"] > 0
    providers = result["onnxruntime_providers"]
    if "CUDAExecutionProvider" not in providers:
        assert "onnxruntime offers only" in result["skipped"]["cuda"]
    if "TensorrtExecutionProvider" not in providers:
        assert "TensorRT" in result["skipped"]["tensorrt"]
