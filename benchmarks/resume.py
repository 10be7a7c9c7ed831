"""Resume overhead on an already-finished dump of 5,000 images, and the store's share of a real run.

Fills a results store as a finished `trapedge run` leaves it (5,000 tiny JPEGs, 3 detections and 2
embeddings each), then times the second `trapedge run` end to end (start-up, scan, store diff, pass 2
over everything, all outputs rewritten). Then runs the demo bundle over the sample photos and reports
the store's share of the run's wall time. Writes results/resume.json and results/resume.md.

    python benchmarks/resume.py [--images 5000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402


def _fill(dump: Path, out: Path, bundle: Path, count: int) -> None:
    from trapedge.runtime.models.bundle import Bundle, sha256_file
    from trapedge.runtime.card.ingest import scan
    from trapedge.runtime.outputs.store import STORE_NAME, Store

    labels = Bundle.load(bundle).labels
    rng = np.random.default_rng(0)
    tiny = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    for i in range(count):
        folder = dump / f"{100 + i // 1000}MEDIA"
        folder.mkdir(parents=True, exist_ok=True)
        tiny.save(folder / f"IMG_{i:04d}.JPG")
    out.mkdir(parents=True)
    store = Store(out / STORE_NAME)
    store.set_meta("bundle_manifest_sha256", sha256_file(bundle / "manifest.json"))
    store.set_meta("dump_root", str(dump.resolve()))
    for record in scan(dump):
        dets = [{"category": "1", "label": "animal", "conf": 0.8, "bbox": [0.1, 0.1, 0.3, 0.3],
                 "raw_classifications": {"classes": [labels[4], labels[5]], "scores": [0.9, 0.05]},
                 "processed_classification": {"class": labels[4], "score": 0.9, "source": "classifier"}}
                for _ in range(3)]
        store.put(SimpleNamespace(
            record=record, prediction={"detections": dets, "model_version": "demo-untrained"}, status="ok",
            width=64, height=48, captured="2024-01-01T00:00:00", error=None, warnings=[],
            embeddings={0: rng.normal(size=64).astype(np.float32), 1: rng.normal(size=64).astype(np.float32)},
            evidence={}, degraded=[]))
    store.close()


def _run(dump: Path, bundle: Path, out: Path) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", "run", str(dump), "--bundle", str(bundle),
                           "--out", str(out), "--device", "cpu"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return time.perf_counter() - started, proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/trapedge-resume"))
    args = parser.parse_args()
    from trapedge.runtime.demo import build_demo_bundle, copy_samples

    shutil.rmtree(args.work, ignore_errors=True)
    bundle = build_demo_bundle(args.work / "bundle")
    dump, out = args.work / "card", args.work / "out"
    _fill(dump, out, bundle, args.images)
    resume_s, log = _run(dump, bundle, out)
    start_only = subprocess.run([sys.executable, "-c", "import trapedge.runtime.cli"], capture_output=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import trapedge.runtime.cli"], capture_output=True)
    import_s = time.perf_counter() - t
    assert start_only.returncode == 0 and "already done" in log

    sample_out = args.work / "sample-out"
    wall, log = _run(copy_samples(args.work / "sample-card"), bundle, sample_out)
    timing = log.split("Per-stage time")[1]
    store_ms = sum(float(line.split("│")[-2]) for line in timing.splitlines()
                   if line.startswith("│ store"))
    result = {"images": args.images, "resume_s": resume_s, "python_import_s": import_s, "target_resume_s": 2.0,
              "sample_run_wall_s": wall, "store_ms": store_ms, "store_share": store_ms / 1000 / wall,
              "target_store_share": 0.02, "machine": machine.describe()}
    md = machine.write("resume", result, [
        ("finished dump", f"{args.images} images, 3 detections each"),
        ("second `trapedge run` (resume, end to end)", f"{resume_s:.2f} s (target < 2 s; Python start-up and "
                                                        f"imports alone {import_s:.2f} s)"),
        ("store time in a demo run of 10 photos", f"{store_ms:.0f} ms of {wall:.1f} s = "
                                                  f"{100 * result['store_share']:.2f}% (target < 2%)"),
    ])
    print(md.read_text())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
