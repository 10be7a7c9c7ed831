"""How long report.html takes, and how large it gets, for cards of 1,000 to 10,000 media.

Cards of the ten packaged photos repeated under new names (hard links) in 20 camera folders over 90 days, three
detections per photo with final labels drawn from 40 species (a third re-labelled by pass 2), 2% failed; the
report built by `outputs.report.build_report` exactly as a run writes it (charts, 72 thumbnails decoded from the
photos, people blurred). Writes results/report.json and results/report.md.

    python benchmarks/report.py [--sizes 1000 10000] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
import tracemalloc
from datetime import datetime, timedelta
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402


def _label(i: int) -> str:
    return f"u{i};mammalia;order{i % 5};family{i % 11};genus{i};species{i};animal number {i}"


def card(root: Path, size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Photos (hard links) and their predictions and image rows."""
    from trapedge.runtime.demo import sample_photos

    rng = random.Random(seed)
    photos = sample_photos()
    shutil.rmtree(root, ignore_errors=True)
    predictions, images = [], []
    start = datetime(2024, 3, 1)
    for i in range(size):
        key = f"CAM{i % 20:02d}/IMG_{i:06d}.JPG"
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(photos[i % len(photos)], path)
        captured = (start + timedelta(seconds=rng.randrange(90 * 86400))).isoformat()
        failed = rng.random() < 0.02
        detections = []
        for d in range(0 if failed else 3):
            label = _label(rng.randrange(40))
            det = {"category": "1", "conf": round(rng.uniform(0.05, 0.99), 3),
                   "bbox": [0.1 + 0.25 * d, 0.5, 0.2, 0.2],
                   "processed_classification": {"class": label, "score": 0.8, "source": "classifier"}}
            if rng.random() < 0.33:
                det["reclassification"] = {"class": _label(rng.randrange(40)), "original": label,
                                           "stage": "calibrated", "probability": 0.97, "precision_bound": 0.97}
            detections.append(det)
        pred = {"filepath": str(path), "detections": detections}
        if failed:
            pred = {"filepath": str(path), "failures": ["DETECTOR"], "failure_reason": "truncated JPEG"}
        predictions.append(pred)
        images.append({"key": key, "filepath": str(path), "captured": captured,
                       "status": "failed" if failed else "ok", "reason": "truncated JPEG" if failed else None})
    return predictions, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/trapedge-report-bench"))
    args = parser.parse_args()
    from trapedge.runtime.outputs.report import build_report

    info = {"trapedge": {"version": "bench", "reclassification": {"stages": {"decision": "calibrated"}}}}
    rows = {}
    for size in args.sizes:
        root = args.work / f"card-{size}"
        predictions, images = card(root, size)
        build_report(predictions[:50], images[:50], info, root)  # imports and matplotlib's font cache
        tracemalloc.start()
        start = time.perf_counter()
        page = build_report(predictions, images, info, root)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows[size] = {"seconds": round(seconds, 2), "bytes": len(page.encode()), "python_peak_mib": round(
            peak / 2**20, 1), "thumbnails": page.count("data:image/jpeg")}
        print(size, rows[size], flush=True)
    result = {"rows": rows, "machine": machine.describe()}
    md = machine.write("report", result, [
        (f"{size:,} media", f"{r['seconds']} s, {r['bytes'] / 2**20:.2f} MiB page, {r['thumbnails']} thumbnails, "
                            f"Python peak {r['python_peak_mib']} MiB") for size, r in rows.items()])
    print(md.read_text())


if __name__ == "__main__":
    main()
