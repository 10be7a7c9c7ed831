"""MDv1000-spruce (YOLOv5s at 640) against MDv5a (YOLOv5x6 at 1280) in front of the real-size SpeciesNet classifier.

The real-size random-weight bundle of benchmarks/throughput.py (built there if missing), and a copy of it whose
detector is a random-weight spruce checkpoint in MDv1000's published format, BN-calibrated on the sample photos
and exported with `trapedge export detector --model spruce`; its objectness logits are shifted by +1.5 so that,
like the random MDv5a, it finds a few boxes per photo above the classification threshold 0.1 (64 against 56 on
these photos; unshifted it finds 3, and the comparison would leave out the classifier). Both run the ten real photos through `Station.run`
(pass 1, pass 2, outputs) on this CPU; reported: detector ms per image (every call metered), detections,
classifier crops and seconds, end-to-end images/s. Writes results/light_detector.json and .md.

    python benchmarks/light_detector.py [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402

OBJECTNESS_SHIFT = 1.5


def _copy_bundle(source: Path, dest: Path) -> Path:
    """A copy made of hard links: the export writes a new detector file and replaces the manifest atomically, so
    the source bundle is never touched."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, copy_function=os.link, ignore=shutil.ignore_patterns(".engines", ".history"))
    return dest


def _run(bundle: Path, card: Path, out: Path) -> dict:
    from trapedge.runtime.speciesnet.detector import DetectorConfig
    from trapedge.runtime.station import Station

    shutil.rmtree(out, ignore_errors=True)
    station = Station(bundle, device="cpu")
    station.open()
    start = time.perf_counter()
    report = station.run(card, out, log=lambda m: None)
    seconds = time.perf_counter() - start
    detector, classifier = report.models["detector"], report.models["classifier"]
    crops = sum(call["inputs"]["crops"][0] * call["count"] for call in classifier["calls"])
    return {"seconds": round(seconds, 2), "images_per_s": round(report.images / seconds, 4),
            "detections": report.detections,
            "detector_ms_per_image": round(1000 * detector["seconds"] / report.images, 1),
            "detector_input": detector["calls"][0]["inputs"]["images"],
            "classifier_crops": crops, "classifier_s": round(classifier["seconds"], 2),
            "model": DetectorConfig.from_manifest(station.bundle.model("detector").raw).model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/trapedge-bench"))
    args = parser.parse_args()

    from trapedge.export.detector import export_megadetector
    from trapedge.export.megadetectors import megadetector
    from trapedge.export.random_detectors import build_megadetector_checkpoint
    from trapedge.runtime.demo import copy_samples, sample_photos

    real = args.work / "bundle-real"
    if not (real / "manifest.json").is_file():
        raise SystemExit(f"{real}: run benchmarks/throughput.py first (it builds the real-size bundle)")
    spruce_bundle = _copy_bundle(real, args.work / "bundle-spruce")
    checkpoint = build_megadetector_checkpoint(args.work / megadetector("spruce").file, "spruce", seed=0,
                                               calibration_images=sample_photos()[:4],
                                               objectness_shift=OBJECTNESS_SHIFT)
    export_megadetector(checkpoint, spruce_bundle, "spruce", log=lambda m: None)
    card = args.work / "light-card"
    if not card.is_dir():
        copy_samples(card)
    rows = {"mdv5a": _run(real, card, args.work / "light-out-mdv5a"),
            "spruce": _run(spruce_bundle, card, args.work / "light-out-spruce")}
    result = {"images": 10, "rows": rows, "machine": machine.describe(), "spruce_objectness_shift": OBJECTNESS_SHIFT,
              "note": "random weights: the two detectors find different boxes, so the classifier's share differs"}
    md = machine.write("light_detector", result, [
        (f"{key} ({row['model']}, input {row['detector_input']})",
         f"detector {row['detector_ms_per_image']} ms/image; {row['detections']} detections, "
         f"{row['classifier_crops']} crops (with degraded views) classified in {row['classifier_s']} s; end to end "
         f"{row['images_per_s']} images/s ({row['seconds']} s)")
        for key, row in rows.items()
    ] + [("detector speed-up spruce vs MDv5a",
          f"{rows['mdv5a']['detector_ms_per_image'] / rows['spruce']['detector_ms_per_image']:.1f}x")])
    print(md.read_text())


if __name__ == "__main__":
    main()
