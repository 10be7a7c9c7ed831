"""SpeciesNet's own pipeline vs `trapedge run` (ONNX Runtime CPU) on the same photos and real-size models.

Real-size architectures with random weights (YOLOv5x6 MegaDetector, EfficientNetV2-M with 2,498 labels),
built in SpeciesNet's on-disk formats by trapedge.export.random_models and exported with `trapedge export speciesnet`.
Two trapedge timings: pass 1 with the models loaded (`pipeline.Runner`, like for like with `predict`), and the
whole `trapedge run` process (start-up, model loading, pass 1, pass 2, every output and the report), the issue's
end-to-end measure. Writes results/throughput.json and results/throughput.md.

    python benchmarks/throughput.py [--images N] [--repeats R] [--work DIR]

With --repeats R, SpeciesNet's predict and the whole trapedge process alternate R times (so drifting machine
load falls on both) and the ratio is taken of the medians; the spread is reported.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
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

    from speciesnet import SpeciesNet

    model = SpeciesNet(str(folder), components="all", geofence=True)
    model.predict(filepaths=[str(files[0])], run_mode="multi_thread")  # warm-up outside the timing
    sn_times, process_times = [], []
    out_dir = args.work / "run-out"
    for _ in range(args.repeats):
        t = time.perf_counter()
        try:
            out = model.predict(filepaths=[str(f) for f in files], run_mode="multi_thread", batch_size=8)
            sn_error = None
            sn_detections = sum(len(p.get("detections", [])) for p in out["predictions"])
        except RuntimeError as e:  # SpeciesNet raises on empty crops; report rather than hide it
            sn_error, sn_detections = str(e), None
        sn_times.append(time.perf_counter() - t)
        shutil.rmtree(out_dir, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", "run", str(dump), "--bundle",
                        str(bundle_dir), "--out", str(out_dir), "--device", "cpu", "--quiet"], check=True)
        process_times.append(time.perf_counter() - t)
    sn_seconds, process_seconds = statistics.median(sn_times), statistics.median(process_times)
    del model

    from trapedge.runtime.models.bundle import Bundle
    from trapedge.runtime.card.ingest import scan
    from trapedge.runtime.pipeline import RunOptions, Runner

    runner = Runner(Bundle.load(bundle_dir), RunOptions(device="cpu"))
    runner.open()
    list(runner.process(list(scan(dump))[:1], dump))  # warm-up outside the timing
    runner = Runner(Bundle.load(bundle_dir), RunOptions(device="cpu"))
    runner.open()
    t = time.perf_counter()
    results = list(runner.process(list(scan(dump)), dump))
    te_seconds = time.perf_counter() - t
    te_detections = sum(len(r.prediction.get("detections", [])) for r in results)
    providers, stages = runner.open(), runner.timer.summary()
    del runner

    result = {
        "images": len(files), "image_size": "2048x1440 (real Reconyx photos)",
        "models": "YOLOv5x6 (MegaDetector v5a architecture) + EfficientNetV2-M 480, 2,498 labels; random weights",
        "repeats": args.repeats,
        "speciesnet": {"seconds": sn_seconds, "runs_s": [round(x, 2) for x in sn_times],
                       "images_per_s": len(files) / sn_seconds,
                       "detections": sn_detections, "error": sn_error},
        "trapedge": {"seconds": te_seconds, "images_per_s": len(files) / te_seconds, "detections": te_detections,
                     "providers": providers, "stages": stages},
        "trapedge_process": {"seconds": process_seconds, "runs_s": [round(x, 2) for x in process_times],
                             "images_per_s": len(files) / process_seconds,
                             "command": "trapedge run CARD --bundle B --out OUT --device cpu --quiet"},
        "ratio": sn_seconds / te_seconds,
        "ratio_process": sn_seconds / process_seconds,
        "target_ratio": 1.6,
        "machine": machine.describe(),
    }
    md = machine.write("throughput", result, [
        ("images", str(len(files))),
        ("SpeciesNet images/s", f"{result['speciesnet']['images_per_s']:.4f}"
         + (f" (raised: {sn_error[:60]})" if sn_error else "")),
        ("trapedge images/s (ORT CPU)", f"{result['trapedge']['images_per_s']:.4f}"),
        ("ratio trapedge pass 1 / SpeciesNet", f"{result['ratio']:.2f}x"),
        ("whole `trapedge run` process images/s", f"{result['trapedge_process']['images_per_s']:.4f}"),
        ("ratio whole process / SpeciesNet", f"{result['ratio_process']:.2f}x (target 1.6x)"),
        ("runs (s): SpeciesNet / whole trapedge process",
         f"{', '.join(f'{x:.1f}' for x in sn_times)} / {', '.join(f'{x:.1f}' for x in process_times)} "
         f"(medians of {args.repeats}, alternated)"),
        ("detections SpeciesNet / trapedge", f"{sn_detections} / {te_detections}"),
    ])
    print(md.read_text())


if __name__ == "__main__":
    main()
