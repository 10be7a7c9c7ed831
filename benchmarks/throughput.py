"""SpeciesNet's own pipeline vs `trapedge run` (ONNX Runtime CPU) on the same photos and real-size models.

Real-size architectures with random weights (YOLOv5x6 MegaDetector, EfficientNetV2-M with 2,498 labels),
built in SpeciesNet's on-disk formats by trapedge.export.random_models and exported with `trapedge export speciesnet`.
Timed: pass 1 with the models loaded (`pipeline.Runner`, like for like with `predict`), and the whole
`trapedge run` process (start-up, model loading, pass 1, pass 2, every output and the report), the issue's
end-to-end measure, in fp32 and, with --int8, in int8 (a copy of the bundle quantised as `trapedge quantize
--precision int8 --activations uint8` does but with no floors recorded, run with `--agreement-floor 0`: random
weights cannot meet the floors, so the speed is real and the answers are not judged).

The floor: both pipelines classify every box with confidence >= 0.1 (SpeciesNet 5.x's default), so their model
work is counted in FLOPs from the ONNX graphs at the shapes fed, and divided by this CPU's float32 sgemm peak;
that gives the fastest any fp32 implementation could do the same work here, and so the largest fp32 ratio
possible. Writes results/throughput.json and results/throughput.md.

    python benchmarks/throughput.py [--images N] [--repeats R] [--int8] [--work DIR]

With --repeats R, SpeciesNet's predict and the whole trapedge process alternate R times (so drifting machine
load falls on all) and the ratios are taken of the medians; the spread is reported.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402
from trapedge.runtime.demo import SAMPLE_DATA as MEDIA  # noqa: E402  (the packaged sample photos)


def _pass_one(bundle, dump: Path, options) -> dict:
    """Pass 1 with the models loaded and warmed on one photo: seconds, results, per-model meters."""
    from trapedge.runtime.card.ingest import scan
    from trapedge.runtime.pipeline import Runner

    runner = Runner(bundle, options)
    runner.open()
    list(runner.process(list(scan(dump))[:1], dump))  # warm-up outside the timing
    runner = Runner(bundle, options)
    runner.open()
    t = time.perf_counter()
    results = list(runner.process(list(scan(dump)), dump))
    seconds = time.perf_counter() - t
    meters = {name: {"seconds": m.seconds, "calls": [{"inputs": dict(shapes), "count": n}
                                                     for shapes, n in m.calls.items()]}
              for name, m in runner.meters().items()}
    return {"seconds": seconds, "results": results, "meters": meters, "providers": runner.open(),
            "stages": runner.timer.summary()}


def _per_call(meters: dict) -> dict:
    """Seconds per photo (detector) and per crop (classifier) from a pass's meters."""
    out = {}
    for name, unit in (("detector", "photo"), ("classifier", "crop")):
        items = sum(call["count"] * next(iter(call["inputs"].values()))[0] for call in meters[name]["calls"])
        out[f"{name}_s_per_{unit}"] = meters[name]["seconds"] / max(items, 1)
        out[f"{name}_{unit}s"] = items
    return out


def _sgemm_peak() -> float:
    """This CPU's float32 sgemm rate, best of several, measured in a fresh process: in this one, torch's and ONNX
    Runtime's thread pools halved it."""
    code = ("from trapedge.runtime.bench import sgemm_peak_gflops as p; "
            "print(max(p(repeats=5) for _ in range(3)))")
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split()[-1])


def _run_process(card: Path, bundle: Path, out: Path, flags: list[str], **kwargs) -> None:
    """The whole `trapedge run` command as a user runs it, into a fresh output folder."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", "run", str(card), "--bundle", str(bundle),
                    "--out", str(out), "--device", "cpu", "--quiet", *flags], check=True, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--int8", action="store_true", help="Also time the whole process in int8 (uint8 activations).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/trapedge-bench"))
    args = parser.parse_args()

    from trapedge.export.random_models import build_speciesnet_folder
    from trapedge.export.speciesnet import export_speciesnet

    photos = sorted(MEDIA.glob("*.JPG"))
    folder, bundle_dir = args.work / "speciesnet-real", args.work / "bundle-real"
    if not (folder / "info.json").is_file():
        t = time.perf_counter()
        build_speciesnet_folder(folder, size="real", seed=0, calibration_images=photos)
        print(f"built real-size model folder in {time.perf_counter() - t:.0f} s")
    if not (bundle_dir / "manifest.json").is_file():
        t = time.perf_counter()
        export_speciesnet(str(folder), bundle_dir, parity_images=MEDIA)
        print(f"exported in {time.perf_counter() - t:.0f} s")
    dump = args.work / "card"
    shutil.rmtree(dump, ignore_errors=True)
    dump.mkdir(parents=True)
    files = []
    for i in range(args.images):
        src = photos[i % len(photos)]
        files.append(Path(shutil.copy(src, dump / f"{i:04d}_{src.name}")))

    int8_dir = args.work / "bundle-int8"
    if args.int8 and not (int8_dir / "manifest.json").is_file():
        from trapedge.export.quantize import quantize_bundle

        t = time.perf_counter()
        shutil.rmtree(int8_dir, ignore_errors=True)
        shutil.copytree(bundle_dir, int8_dir)
        # No floors recorded: random weights cannot meet them (the answers are not judged), and a floor would
        # send the classifier back to convolutions-only int8; the elementwise variant's speed is what is timed.
        quantize_bundle(int8_dir, "int8", activations="uint8", floor=None, log=print)
        print(f"quantised in {time.perf_counter() - t:.0f} s")

    peak_before = _sgemm_peak()
    from speciesnet import SpeciesNet

    model = SpeciesNet(str(folder), components="all", geofence=True)
    model.predict(filepaths=[str(files[0])], run_mode="multi_thread")  # warm-up outside the timing
    routes = {"fp32": [], **({"int8": ["--precision", "int8", "--agreement-floor", "0"]} if args.int8 else {})}
    sn_times: list[float] = []
    process_times: dict[str, list[float]] = {route: [] for route in routes}
    out_dir = args.work / "run-out"
    sn_classified = None
    one = args.work / "card-one"
    shutil.rmtree(one, ignore_errors=True)
    one.mkdir()
    shutil.copy(files[0], one / files[0].name)
    bundles = {"fp32": bundle_dir, "int8": int8_dir}
    for route, flags in routes.items():  # warm-up outside the timing, as SpeciesNet's: bundle files in page cache
        _run_process(one, bundles[route], out_dir, flags, capture_output=True)
    for _ in range(args.repeats):
        t = time.perf_counter()
        try:
            out = model.predict(filepaths=[str(f) for f in files], run_mode="multi_thread", batch_size=8)
            sn_error = None
            sn_detections = sum(len(p.get("detections", [])) for p in out["predictions"])
            sn_classified = sum("raw_classifications" in d for p in out["predictions"]
                                for d in p.get("detections", []))
        except RuntimeError as e:  # SpeciesNet raises on empty crops; report rather than hide it
            sn_error, sn_detections = str(e), None
        sn_times.append(time.perf_counter() - t)
        for route, flags in routes.items():
            t = time.perf_counter()
            _run_process(dump, bundles[route], out_dir, flags)
            process_times[route].append(time.perf_counter() - t)
    sn_seconds = statistics.median(sn_times)
    process_seconds = {route: statistics.median(times) for route, times in process_times.items()}
    del model

    from trapedge.runtime.bench import model_rates
    from trapedge.runtime.models.bundle import Bundle
    from trapedge.runtime.models.flops import graph_flops
    from trapedge.runtime.pipeline import RunOptions

    bundle = Bundle.load(bundle_dir)
    fp32 = _pass_one(bundle, dump, RunOptions(device="cpu"))
    results, te_seconds, meters = fp32["results"], fp32["seconds"], fp32["meters"]
    te_detections = sum(len(r.prediction.get("detections", [])) for r in results)
    te_classified = sum(len(r.top5) for r in results)
    te_views = sum(len(r.degraded) for r in results)
    providers, stages = fp32["providers"], fp32["stages"]
    per_call = {"fp32": _per_call(meters)}
    if args.int8:
        int8 = _pass_one(Bundle.load(int8_dir), dump,
                         RunOptions(device="cpu", precision="int8", agreement_floor=0.0))
        per_call["int8"] = _per_call(int8["meters"])
        per_call["int8"]["pass_one_s"] = int8["seconds"]
        per_call["int8"]["detections"] = sum(len(r.prediction.get("detections", [])) for r in int8["results"])
        per_call["int8"]["classified"] = sum(len(r.top5) for r in int8["results"])
        per_call["int8"]["degraded_views"] = sum(len(r.degraded) for r in int8["results"])

    paths = {name: bundle.model(name).path for name in meters}
    rates = model_rates(meters, paths)
    peak = max(peak_before, _sgemm_peak())
    crop_shape = next(iter(meters["classifier"]["calls"]))["inputs"]
    per_crop = graph_flops(paths["classifier"], {k: (1, *v[1:]) for k, v in crop_shape.items()}) / 1e9
    detector_gflop = rates["detector"]["gflop"]
    sn_gflop = detector_gflop + (sn_classified or 0) * per_crop  # same boxes, so the same detector input shapes
    te_gflop = detector_gflop + rates["classifier"]["gflop"]  # incl. the degraded views pass 2 calibrates on
    floor = {
        "sgemm_peak_gflops": peak, "classifier_gflop_per_crop": per_crop, "detector_gflop": detector_gflop,
        "speciesnet_work_gflop": sn_gflop, "speciesnet_gflops_per_s": sn_gflop / sn_seconds,
        "speciesnet_floor_s": sn_gflop / peak, "max_fp32_ratio_same_work": sn_seconds / (sn_gflop / peak),
        "trapedge_work_gflop": te_gflop, "trapedge_floor_s": te_gflop / peak,
        "max_fp32_ratio_trapedge_work": sn_seconds / (te_gflop / peak),
        "trapedge_model_rates": rates,
    }
    for route, calls in per_call.items():  # SpeciesNet's work (its photos, its crops) at this route's call speeds
        calls["speciesnet_work_s"] = (calls["detector_s_per_photo"] * len(files)
                                      + calls["classifier_s_per_crop"] * (sn_classified or 0))
        calls["ratio_speciesnet_work_models"] = sn_seconds / calls["speciesnet_work_s"]

    result = {
        "images": len(files), "image_size": "2048x1440 (real Reconyx photos)",
        "models": "YOLOv5x6 (MegaDetector v5a architecture) + EfficientNetV2-M 480, 2,498 labels; random weights",
        "repeats": args.repeats,
        "speciesnet": {"seconds": sn_seconds, "runs_s": [round(x, 2) for x in sn_times],
                       "images_per_s": len(files) / sn_seconds, "detections": sn_detections,
                       "classified": sn_classified, "error": sn_error},
        "trapedge": {"seconds": te_seconds, "images_per_s": len(files) / te_seconds, "detections": te_detections,
                     "classified": te_classified, "degraded_views": te_views,
                     "providers": providers, "stages": stages},
        "trapedge_process": {route: {"seconds": process_seconds[route],
                                     "runs_s": [round(x, 2) for x in process_times[route]],
                                     "images_per_s": len(files) / process_seconds[route],
                                     "command": "trapedge run CARD --bundle B --out OUT --device cpu --quiet "
                                                + " ".join(routes[route])}
                             for route in routes},
        "ratio": sn_seconds / te_seconds,
        "ratio_process": {route: sn_seconds / process_seconds[route] for route in routes},
        "target_ratio": {"fp32": 1.6, "int8": 2.5},
        "floor": floor,
        "per_call": per_call,
        "machine": machine.describe(),
    }
    runs = " / ".join(", ".join(f"{x:.1f}" for x in times) for times in [sn_times, *process_times.values()])
    table = [
        ("images", str(len(files))),
        ("SpeciesNet images/s", f"{result['speciesnet']['images_per_s']:.4f}"
         + (f" (raised: {sn_error[:60]})" if sn_error else "")),
        ("trapedge pass 1 images/s (ORT CPU, models loaded)", f"{result['trapedge']['images_per_s']:.4f}"),
        ("ratio trapedge pass 1 / SpeciesNet", f"{result['ratio']:.2f}x"),
    ]
    for route in routes:
        table += [(f"whole `trapedge run` process, {route}, images/s",
                   f"{result['trapedge_process'][route]['images_per_s']:.4f}"),
                  (f"ratio whole process {route} / SpeciesNet",
                   f"{result['ratio_process'][route]:.2f}x (target {result['target_ratio'][route]}x)"
                   + (" (random weights: speed only, agreement not judged)" if route == "int8" else ""))]
    table += [
        (f"runs (s): SpeciesNet / {' / '.join(f'trapedge {r}' for r in routes)}",
         f"{runs} (medians of {args.repeats}, alternated)"),
        ("detections SpeciesNet / trapedge", f"{sn_detections} / {te_detections}"),
        ("boxes classified SpeciesNet / trapedge (conf >= 0.1)", f"{sn_classified} / {te_classified}"),
        ("degraded views trapedge classifies for pass 2", str(te_views)),
        ("model work SpeciesNet / trapedge (GFLOP)", f"{sn_gflop:.0f} / {te_gflop:.0f}"),
        ("float32 sgemm peak (GFLOP/s; best of 15 in a fresh process, before and after)", f"{peak:.0f}"),
        ("SpeciesNet achieved (GFLOP/s)", f"{floor['speciesnet_gflops_per_s']:.0f} "
                                          f"({100 * floor['speciesnet_gflops_per_s'] / peak:.0f}% of peak)"),
        ("trapedge detector / classifier achieved (GFLOP/s)",
         f"{rates['detector']['gflops_per_s']:.0f} / {rates['classifier']['gflops_per_s']:.0f}"),
        ("fp32 floor for SpeciesNet's work at peak (s)", f"{floor['speciesnet_floor_s']:.1f}"),
        ("largest fp32 ratio possible, SpeciesNet's work", f"{floor['max_fp32_ratio_same_work']:.2f}x"),
        ("largest fp32 ratio possible, trapedge's work (+ degraded views)",
         f"{floor['max_fp32_ratio_trapedge_work']:.2f}x"),
    ]
    for route, calls in per_call.items():
        table.append((f"{route} model time per photo (detector) / per crop (classifier), ms",
                      f"{1e3 * calls['detector_s_per_photo']:.0f} / {1e3 * calls['classifier_s_per_crop']:.0f}"))
    for route, calls in per_call.items():
        table.append((f"{route}: SpeciesNet's work (its photos and crops) at these call times, s; ratio",
                      f"{calls['speciesnet_work_s']:.1f}; {calls['ratio_speciesnet_work_models']:.2f}x (models only)"))
    if "int8" in per_call:
        calls = per_call["int8"]
        table.append(("int8 pass 1: detections / boxes classified / degraded views (random weights move them)",
                      f"{calls['detections']} / {calls['classified']} / {calls['degraded_views']}"))
    md = machine.write("throughput", result, table)
    print(md.read_text())


if __name__ == "__main__":
    main()
