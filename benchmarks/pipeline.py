"""Pipelined vs serial pass 1, and peak memory against dump size (flat is the target).

Uses the untrained demo bundle (built locally, no torch) over generated 1920x1440 JPEGs, so it runs
anywhere; its models are light, which makes decoding the dominant stage as on a Jetson. Each
configuration runs in its own process so peak RSS is its own. Writes results/pipeline.json and .md.

    python benchmarks/pipeline.py [--images 200] [--rss-sizes 500 5000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402

CHILD = """
import json, sys, time
from pathlib import Path
from trapedge.runtime.bench import peak_rss_mib
from trapedge.runtime.models.bundle import Bundle
from trapedge.runtime.card.ingest import scan
from trapedge.runtime.pipeline import RunOptions, Runner
bundle, dump, workers, chunk, limit = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
runner = Runner(Bundle.load(Path(bundle)), RunOptions(device="cpu", decode_workers=workers, chunk=chunk, threads=1))
runner.open()
records = list(scan(dump))[:limit]
start = time.perf_counter()
for result in runner.process(records, dump):
    result.features.clear(); result.embeddings.clear()
wall = time.perf_counter() - start
print(json.dumps({"wall_s": wall, "stages": runner.timer.summary(), "peak_rss_mib": peak_rss_mib(), "images": len(records)}))
"""


def _images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = [Image.fromarray(rng.integers(0, 255, (180, 240, 3), dtype=np.uint8)).resize((1920, 1440)) for _ in range(8)]
    for i in range(len(list(folder.glob("*.jpg"))), count):
        base[i % 8].save(folder / f"IMG_{i:05d}.jpg", quality=85)
    return folder


def _child(bundle: Path, dump: Path, workers: int, chunk: int, limit: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(dump), str(workers), str(chunk), str(limit)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[500, 5000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/trapedge-pipeline"))
    args = parser.parse_args()
    from trapedge.runtime.demo import build_demo_bundle

    bundle = build_demo_bundle(args.work / "bundle")
    dump = _images(args.work / "card", max([args.images] + args.rss_sizes))
    serial = _child(bundle, dump, 1, 1, args.images)
    piped = _child(bundle, dump, 2, 8, args.images)
    slowest = max(piped["stages"][s]["total_ms"] for s in ("decode", "detect", "classify") if s in piped["stages"])
    rss = {n: _child(bundle, dump, 2, 8, n)["peak_rss_mib"] for n in args.rss_sizes}
    result = {"images": args.images, "serial": serial, "pipelined": piped,
              "pipelined_vs_slowest_stage": piped["wall_s"] * 1000 / slowest, "peak_rss_mib_by_size": rss,
              "machine": machine.describe()}
    table = [("images", str(args.images)),
             ("serial wall (1 decode worker, chunk 1)", f"{serial['wall_s']:.1f} s"),
             ("pipelined wall (2 decode workers, chunk 8)", f"{piped['wall_s']:.1f} s"),
             ("slowest stage total (pipelined run)", f"{slowest / 1000:.1f} s; wall / slowest = "
                                                     f"{result['pipelined_vs_slowest_stage']:.2f} (target <= 1.10)"),
             ("stage totals, pipelined (ms)", ", ".join(f"{k} {v['total_ms']:.0f}" for k, v in piped["stages"].items())),
             ("peak RSS by dump size", ", ".join(f"{n} images: {v:.0f} MiB" for n, v in rss.items()))]
    print(machine.write("pipeline", result, table).read_text())


if __name__ == "__main__":
    main()
