#!/usr/bin/env bash
# One short GPU check (< 8 min) for a lent GPU machine, in two parts:
# 1. the anchor: torch CUDA vs CPU on EfficientNetV2-M@480 (2498 classes) and YOLOv5x6 at 960x1280, random
#    weights; latency at batch 1/8 in fp32 and fp16, fp16-CUDA vs fp32-CPU parity (torch has no int8 convolution
#    on CUDA; trapedge's int8 route, TensorRT on a `trapedge quantize --precision int8` variant, is not timed
#    here: its calibration takes minutes of CPU);
# 2. trapedge's own backends (benchmarks/gpu_backends.py): ONNX Runtime CUDA and TensorRT (native or ORT's EP) at
#    fp32 and fp16 through open_model and Station, against ONNX Runtime CPU fp32; skipped with the reason when
#    this machine has neither onnxruntime-gpu nor TensorRT.
# Usage, from the repository root: OUT=/some/folder bash benchmarks/gpu_check.sh
# Writes $OUT/gpu_check.json, $OUT/gpu_backends.json and $OUT/nvidia-smi.txt (the anchor also writes
# benchmarks/results/gpu_check.json when writable). GPU_CHECK_ANCHOR=0 skips part 1; GPU_CHECK_DEVICES
# (cuda,tensorrt), GPU_CHECK_SIZE (real) and GPU_CHECK_WORK steer part 2 (the test runs it with cpu and tiny).
set -uo pipefail

OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
    done
fi

{
    nvidia-smi || echo "nvidia-smi failed or is missing"
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv 2>/dev/null || true
    nproc; free -g 2>/dev/null || true
} > "$OUT/nvidia-smi.txt" 2>&1
head -n 20 "$OUT/nvidia-smi.txt"

if [ -z "$PY" ]; then
    echo '{"errors": ["no python found"]}' > "$OUT/gpu_check.json"
    exit 0
fi

if [ "${GPU_CHECK_ANCHOR:-1}" = "0" ]; then
    echo "anchor skipped (GPU_CHECK_ANCHOR=0)"
    ANCHOR_SKIP=1
fi
[ -n "${ANCHOR_SKIP:-}" ] || timeout "${GPU_CHECK_TIMEOUT:-190}" "$PY" - "$OUT" <<'PY'
import copy
import datetime as dt
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

out = Path(sys.argv[1])
result = {"started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
          "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
          "packages": {}, "models": {}, "errors": []}


def save():
    text = json.dumps(result, indent=2, default=str) + "\n"
    (out / "gpu_check.json").write_text(text)
    try:
        folder = Path("benchmarks/results")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gpu_check.json").write_text(text)
    except OSError:
        pass


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


for name in ("torch", "torchvision", "numpy", "onnx", "onnxruntime", "yolov5", "tensorrt", "cuda.bindings", "cupy"):
    try:
        module = __import__(name, fromlist=["_"])
        result["packages"][name] = getattr(module, "__version__", "present")
    except Exception as e:
        result["packages"][name] = f"missing ({type(e).__name__})"
try:
    import onnxruntime
    result["packages"]["onnxruntime_providers"] = onnxruntime.get_available_providers()
except Exception:
    pass

try:
    import numpy as np
    import torch
except Exception as e:
    result["errors"].append(f"torch/numpy unavailable: {e}")
    save()
    sys.exit(0)

cuda = torch.cuda.is_available()
torch.set_num_threads(os.cpu_count() or 1)
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
result["torch"] = {"version": torch.__version__, "cuda_available": cuda, "cuda": torch.version.cuda,
                   "cudnn": torch.backends.cudnn.version() if cuda else None, "threads": torch.get_num_threads(),
                   "fp32": "strict (TF32 off for matmul and cuDNN)", "fp16": "model.half(), half inputs",
                   "int8": "not measured: torch has no int8 convolution kernels on CUDA; trapedge's int8 route is "
                           "TensorRT on a QDQ variant (trapedge quantize --precision int8)"}
if cuda:
    props = torch.cuda.get_device_properties(0)
    result["torch"].update(device=props.name, compute_capability=f"{props.major}.{props.minor}",
                           memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
else:
    result["errors"].append("torch sees no CUDA device; CPU numbers only")
save()


def smooth_images(count, height, width, seed):
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, max(2, height // 32), max(2, width // 32), generator=gen)
    detail = torch.rand(count, 3, height, width, generator=gen) * 0.1
    up = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    return (up * 0.9 + detail).clamp(0, 1)


def calibrate_batchnorm(model, batches):
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.eval()
    for bn in bns:
        bn.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, reps):
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync(device)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"ms_min": round(times[0], 3), "ms_median": round(times[len(times) // 2], 3), "reps": reps}


def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def topk_agreement(ref, cand, k):
    a = torch.topk(ref, k, dim=-1).indices
    b = torch.topk(cand, k, dim=-1).indices
    return float((a == b).all(dim=-1).float().mean())


def parity_classifier(ref, cand):
    ref, cand = ref.double(), cand.double()
    diff = (ref - cand).abs().max().item()
    return {"max_abs_diff": diff, "max_rel_diff": diff / max(ref.abs().max().item(), 1e-12),
            "top1_agreement": topk_agreement(ref, cand, 1), "top5_agreement": topk_agreement(ref, cand, 5),
            "count": int(ref.shape[0])}


def parity_detector(ref, cand, threshold=0.1):
    ref, cand = ref.double(), cand.double()
    scores = ref[..., 4:5] * ref[..., 5:]
    keep = scores.max(dim=-1).values > threshold
    diff = (ref - cand).abs()
    result = {"max_abs_diff": diff.max().item(),
              "max_abs_diff_scores": diff[..., 4:].max().item(),
              "rows_above_threshold": int(keep.sum())}
    if keep.any():
        cand_scores = cand[..., 4:5] * cand[..., 5:]
        result["class_agreement_above_threshold"] = float(
            (scores[keep].argmax(-1) == cand_scores[keep].argmax(-1)).float().mean())
        result["max_box_diff_above_threshold_px"] = diff[..., :4][keep].max().item()
    return result


def build_effnet():
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.efficientnet_v2_m(weights=None, num_classes=2498), (3, 480, 480)


def build_yolo():
    import logging
    logging.getLogger("yolov5").setLevel(logging.ERROR)
    import yaml
    import yolov5
    from yolov5.models.yolo import Model
    cfg = yaml.safe_load((Path(yolov5.__file__).parent / "models" / "hub" / "yolov5x6.yaml").read_text())
    cfg["nc"] = 3
    torch.manual_seed(0)
    return Model(cfg, ch=3), (3, 960, 1280)


def check(name, build, parity_fn, parity_batch, cpu_reps):
    entry = result["models"].setdefault(name, {})
    log(f"{name}: building")
    model, shape = build()
    entry["input"] = [None, *shape]
    entry["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    device = "cuda" if cuda else "cpu"
    model = model.to(device)
    calibrate_batchnorm(model, (smooth_images(4, *shape[1:], seed=s).to(device) for s in range(3)))
    if hasattr(model, "fuse"):
        model = model.fuse()
    model.eval()
    x = smooth_images(parity_batch, *shape[1:], seed=99)
    cpu_model = copy.deepcopy(model).cpu().float().eval()
    log(f"{name}: CPU fp32 reference on {parity_batch} inputs")
    with torch.no_grad():
        start = time.perf_counter()
        ref = first_output(cpu_model(x)).float()
        entry["cpu_fp32_ms_per_image_batch"] = round((time.perf_counter() - start) * 1000 / parity_batch, 1)
    entry["cpu_fp32_batch1"] = timed(lambda: cpu_model(x[:1]), "cpu", 1, cpu_reps)
    del cpu_model
    save()
    if not cuda:
        return
    half = copy.deepcopy(model).half().eval()
    with torch.no_grad():
        out32 = first_output(model(x.to(device))).float().cpu()
        out16 = first_output(half(x.to(device).half())).float().cpu()
    entry["parity_cuda_fp32_vs_cpu_fp32"] = parity_fn(ref, out32)
    entry["parity_cuda_fp16_vs_cpu_fp32"] = parity_fn(ref, out16)
    entry["finite_fp16"] = bool(torch.isfinite(out16).all())
    log(f"{name}: parity {entry['parity_cuda_fp16_vs_cpu_fp32']}")
    save()
    latency = entry.setdefault("cuda_latency", {})
    for batch in (1, 8):
        for precision, net in (("fp32", model), ("fp16", half)):
            try:
                inp = torch.rand(batch, *shape, device=device)
                inp = inp.half() if precision == "fp16" else inp
                torch.cuda.reset_peak_memory_stats()
                stats = timed(lambda: net(inp), device, 5, 20)
                stats["ms_per_image"] = round(stats["ms_min"] / batch, 3)
                stats["images_per_s"] = round(1000 * batch / stats["ms_min"], 1)
                stats["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                latency[f"bs{batch}_{precision}"] = stats
                log(f"{name}: bs{batch} {precision} {stats}")
            except Exception as e:
                latency[f"bs{batch}_{precision}"] = {"error": f"{type(e).__name__}: {e}"}
            save()
    del model, half
    torch.cuda.empty_cache()


plans = [("efficientnet_v2_m_480_2498", build_effnet, parity_classifier, 8, 3),
         ("yolov5x6_960x1280_nc3", build_yolo, parity_detector, 2, 1)]
for name, build, parity_fn, batch, cpu_reps in plans:
    try:
        check(name, build, parity_fn, batch, cpu_reps)
    except Exception as e:
        result["models"].setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"
        result["errors"].append(f"{name}: {traceback.format_exc(limit=3)}")
        log(f"{name}: failed: {type(e).__name__}: {e}")
    save()

result["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
save()
log(f"wrote {out / 'gpu_check.json'}")
PY
status=$?
if [ "$status" -ne 0 ]; then
    echo "gpu check python exited with $status (124 = timeout); partial results are in $OUT/gpu_check.json"
fi

timeout "${GPU_BACKENDS_TIMEOUT:-270}" "$PY" benchmarks/gpu_backends.py "$OUT/gpu_backends.json" \
    --devices "${GPU_CHECK_DEVICES:-cuda,tensorrt}" --size "${GPU_CHECK_SIZE:-real}" \
    --work "${GPU_CHECK_WORK:-/tmp/trapedge-gpu-backends}"
status=$?
if [ "$status" -ne 0 ]; then
    echo "gpu backends check exited with $status (124 = timeout); partial results are in $OUT/gpu_backends.json"
fi
exit 0
