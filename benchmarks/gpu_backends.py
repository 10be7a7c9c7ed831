"""trapedge's own GPU backends on a lent machine: ONNX Runtime CUDA, TensorRT (native or ORT's EP), against CPU fp32.

Builds a random-weight SpeciesNet bundle (real size by default: YOLOv5x6 + EfficientNetV2-M, 2,498 labels) from
the packaged photos, then, for every route this machine offers, opens the detector and the classifier through
trapedge's own `open_model` (its providers, fallbacks and engine builds), times batch 1 and 8, compares outputs
with ONNX Runtime CPU fp32, and runs the ten photos through `Station` end to end. A route the machine lacks is
recorded as skipped with the reason. `--devices cpu` runs the same code on the CPU (the test's dry run).

    python benchmarks/gpu_backends.py OUT_JSON [--size real|tiny] [--devices cuda,tensorrt] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

PRECISIONS = {"cpu": ("fp32", "fp16"), "cuda": ("fp32", "fp16"), "tensorrt": ("fp32", "fp16")}
PARITY_SCORE = 0.1  # detector rows compared where the CPU's best class score exceeds this


def _save(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def unavailable(device: str) -> Optional[str]:
    """Why a device cannot run here, or None when it can."""
    from trapedge.runtime.models.backends import BackendError, available_providers
    from trapedge.runtime.models.select import tensorrt_route

    if device == "cpu":
        return None
    if device == "cuda":
        providers = available_providers()
        return None if "CUDAExecutionProvider" in providers else f"onnxruntime offers only {providers}"
    try:
        tensorrt_route()
    except BackendError as e:
        return str(e)
    return None


def build_bundle(work: Path, size: str) -> Path:
    """A random-weight SpeciesNet folder exported to a trapedge bundle (reused when already there)."""
    from trapedge.export.random_models import build_speciesnet_folder
    from trapedge.export.speciesnet import export_speciesnet
    from trapedge.runtime.demo import SAMPLE_DATA, sample_photos

    folder, bundle = work / f"speciesnet-{size}", work / f"bundle-{size}"
    if not (bundle / "manifest.json").is_file():
        build_speciesnet_folder(folder, size=size, seed=0, calibration_images=sample_photos())
        export_speciesnet(str(folder), bundle, parity_images=SAMPLE_DATA)
    return bundle


def add_fp16_variant(bundle_root: Path) -> dict:
    """`trapedge quantize --precision fp16` (the classifier's fp16 variant ONNX Runtime CUDA runs), as a user would."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", "quantize", "--bundle", str(bundle_root),
                           "--precision", "fp16"], capture_output=True, text=True)
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "output": (proc.stdout + proc.stderr)[-1500:]}


def model_inputs(bundle) -> dict[str, np.ndarray]:
    """Classifier crops (whole photos, 8) and one letterboxed photo for the detector, from the packaged photos."""
    from trapedge.runtime.card.ingest import ImageRecord, decode
    from trapedge.runtime.demo import sample_photos
    from trapedge.runtime.speciesnet import classifier as cls_ops
    from trapedge.runtime.speciesnet import detector as det_ops

    pixels = []
    for path in sample_photos()[:8]:
        stat = path.stat()
        pixels.append(decode(ImageRecord(path.name, path, stat.st_size, stat.st_mtime_ns)).pixels)
    config = det_ops.DetectorConfig.from_manifest(bundle.model("detector").raw)
    return {"crops": cls_ops.to_network_input([cls_ops.preprocess_crop(p, (0.0, 0.0, 1.0, 1.0)) for p in pixels]),
            "images": det_ops.to_network_input([det_ops.letterbox(pixels[0], config)])}


def _timed(call: Callable[[], Any], reps: int) -> dict[str, float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return {"ms_min": round(times[0], 3), "ms_median": round(times[len(times) // 2], 3), "reps": reps}


def classifier_parity(ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    """Top-1 agreement, largest logit difference and the smallest pooled-feature cosine against the CPU."""
    (logits_ref, feats_ref), (logits, feats) = ref, got
    cosine = (feats * feats_ref).sum(-1) / (np.linalg.norm(feats, axis=-1) * np.linalg.norm(feats_ref, axis=-1))
    return {"top1_agreement": float((logits.argmax(-1) == logits_ref.argmax(-1)).mean()),
            "max_abs_logit_diff": float(np.abs(logits.astype(np.float64) - logits_ref).max()),
            "min_feature_cosine": float(cosine.min()), "count": int(logits.shape[0])}


def detector_parity(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Score and box differences on the rows the CPU scores above PARITY_SCORE, and their class agreement."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    scores = ref[..., 4:5] * ref[..., 5:]
    keep = scores.max(-1) > PARITY_SCORE
    result = {"rows_compared": int(keep.sum()), "max_abs_diff_all": float(np.abs(ref - got).max())}
    if keep.any():
        got_scores = got[..., 4:5] * got[..., 5:]
        result.update(max_score_diff=float(np.abs(scores[keep] - got_scores[keep]).max()),
                      max_box_diff_px=float(np.abs(ref[..., :4][keep] - got[..., :4][keep]).max()),
                      class_agreement=float((scores[keep].argmax(-1) == got_scores[keep].argmax(-1)).mean()))
    return result


def _check_model(bundle, name: str, device: str, precision: str, data: np.ndarray, reference: list) -> dict:
    """One model through open_model: open and first-call seconds, latency, parity with the CPU; the backend is
    released on return (an 8 GB Jetson holds few sessions or engines at once)."""
    from trapedge.runtime.models.select import open_model

    feed, outputs = ("crops", ["logits", "features"]) if name == "classifier" else ("images", ["predictions"])
    start = time.perf_counter()
    backend = open_model(bundle, name, device=device, precision=precision, batch=8, log=_log)
    opened = time.perf_counter() - start
    start = time.perf_counter()
    got = backend.run({feed: data}, outputs)
    model = {"providers": backend.providers, "open_s": round(opened, 3),
             "first_call_s": round(time.perf_counter() - start, 3),
             "parity": classifier_parity(reference, got) if name == "classifier"
             else detector_parity(reference[0], got[0])}
    model["batch1"] = _timed(lambda: backend.run({feed: data[:1]}, outputs), 5)
    if name == "classifier":
        model["batch8"] = _timed(lambda: backend.run({feed: data}, outputs), 3)
        model["batch8"]["ms_per_image"] = round(model["batch8"]["ms_min"] / data.shape[0], 3)
    _log(f"{device} {precision} {name}: {model['providers'][:1]} batch1 {model['batch1']['ms_min']} ms, "
         f"parity {model['parity']}")
    return model


def check_route(bundle, device: str, precision: str, inputs: dict[str, np.ndarray], reference: dict) -> dict:
    """One device and precision: both models, each against the CPU."""
    return {"classifier": _check_model(bundle, "classifier", device, precision, inputs["crops"],
                                       reference["classifier"]),
            "detector": _check_model(bundle, "detector", device, precision, inputs["images"], reference["detector"])}


def end_to_end(bundle, device: str, precision: str, work: Path) -> dict:
    """The ten photos through Station.run (pass 1, pass 2, outputs): seconds, images/s, providers, labels."""
    from trapedge.runtime.demo import copy_samples
    from trapedge.runtime.station import Station

    card = work / "card"
    if not card.is_dir():
        copy_samples(card)
    out = work / f"out-{device}-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    station = Station(bundle, device=device, precision=precision)
    station.open()
    start = time.perf_counter()
    report = station.run(card, out, formats=("speciesnet",), log=lambda m: None)
    seconds = time.perf_counter() - start
    predictions = json.loads((out / "predictions.json").read_text())["predictions"]
    top = [(det.get("processed_classification") or {}).get("class") for p in predictions
           for det in p.get("detections") or []]
    return {"seconds": round(seconds, 3), "images_per_s": round(report.images / seconds, 3),
            "detections": report.detections, "providers": report.providers, "labels": top}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="real", choices=("real", "tiny"))
    parser.add_argument("--devices", default="cuda,tensorrt")
    parser.add_argument("--work", type=Path, default=Path("/tmp/trapedge-gpu-backends"))
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"size": args.size, "routes": {}, "end_to_end": {}, "errors": []}
    try:
        from trapedge.runtime.bench import machine
        from trapedge.runtime.models.backends import available_providers
        from trapedge.runtime.models.bundle import Bundle
        from trapedge.runtime.models.select import open_model

        result["machine"] = machine()
        result["onnxruntime_providers"] = available_providers()
        devices = [d for d in args.devices.split(",") if d]
        reasons = {device: unavailable(device) for device in devices}
        result["skipped"] = {d: r for d, r in reasons.items() if r}
        if all(reasons.values()):
            _log(f"no route to check: {result['skipped']}")
            _save(args.out, result)
            return 0
        start = time.perf_counter()
        root = build_bundle(args.work, args.size)
        result["bundle_s"] = round(time.perf_counter() - start, 1)
        _log(f"bundle ready in {result['bundle_s']} s")
        if any(not reasons[d] and "fp16" in PRECISIONS[d] for d in devices):
            result["quantize_fp16"] = add_fp16_variant(root)
            _log(f"fp16 variant: {result['quantize_fp16']['returncode']}")
        bundle = Bundle.load(root)
        inputs = model_inputs(bundle)
        reference = {"classifier": open_model(bundle, "classifier", device="cpu").run(
                         {"crops": inputs["crops"]}, ["logits", "features"]),
                     "detector": open_model(bundle, "detector", device="cpu").run(
                         {"images": inputs["images"]}, ["predictions"])}
        labels: dict[str, list] = {}
        for device in (d for d in devices if not reasons[d]):  # the devices first: the CPU baseline comes last
            for precision in PRECISIONS[device]:
                key = f"{device} {precision}"
                try:
                    result["routes"][key] = check_route(bundle, device, precision, inputs, reference)
                    run = end_to_end(bundle, device, precision, args.work)
                    labels[key] = run.pop("labels")
                    result["end_to_end"][key] = run
                except Exception as e:  # a route that fails is a finding, not the end of the check
                    result["routes"][key] = {"error": f"{type(e).__name__}: {e}"}
                    result["errors"].append(f"{key}: {traceback.format_exc(limit=4)}")
                _save(args.out, result)
        cpu = end_to_end(bundle, "cpu", "fp32", args.work)
        cpu_labels = cpu.pop("labels")
        result["end_to_end"]["baseline (cpu fp32)"] = cpu
        for key, run in result["end_to_end"].items():
            if key in labels:
                run["speedup_vs_cpu"] = round(cpu["seconds"] / run["seconds"], 2)
                run["same_detections_as_cpu"] = run["detections"] == cpu["detections"]
                if run["same_detections_as_cpu"]:  # label by label only when the boxes pair up one to one
                    run["label_agreement_with_cpu"] = round(float(np.mean(
                        [a == b for a, b in zip(labels[key], cpu_labels)] or [1.0])), 4)
    except Exception as e:
        result["errors"].append(f"{type(e).__name__}: {traceback.format_exc(limit=6)}")
    _save(args.out, result)
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
