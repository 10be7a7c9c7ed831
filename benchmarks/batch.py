"""`trapedge batch` at season scale on one machine: local sequential, local parallel, and a two-node Ray cluster.

N generated cards of the packaged real photos repeated under new names, the demo bundle. Each mode runs in a
fresh driver process (so its peak RSS is the driver's); the Ray cluster (head and worker on 127.0.0.1, one CPU
each) is started and stopped here. Reports images/s, per-chunk scheduling overhead (driver round trip minus the
worker's own time), shard merge time per chunk and driver peak RSS. Writes results/batch.json and results/batch.md.

    python benchmarks/batch.py [--cards 4] [--images 24] [--chunk 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402

MODES = ("local sequential", "local parallel", "ray two-node")


def make_cards(root: Path, cards: int, images: int) -> Path:
    """`cards` card folders of `images` photos each, the packaged photos repeated under new names."""
    from trapedge.runtime.demo import sample_photos

    photos = sample_photos()
    for c in range(cards):
        folder = root / f"card-{c:03d}" / "DCIM" / "100MEDIA"
        folder.mkdir(parents=True)
        for i in range(images):
            shutil.copy2(photos[(i + c) % len(photos)], folder / f"IMG_{i:05d}.JPG")
    return root


def merge_cost(folder: Path, chunks: int = 8, size: int = 256, dim: int = 1280) -> dict:
    """Milliseconds to merge a shard of `size` images (3 boxes, 2 embeddings of `dim` floats each) into a card
    store, and to read the sampler state back from the grown store (what a worker does before each chunk)."""
    from types import SimpleNamespace

    import numpy as np

    from trapedge.runtime.card.ingest import ImageRecord
    from trapedge.runtime.outputs.store import Store
    from trapedge.runtime.pipeline import MAX_SIDES

    rng = np.random.default_rng(0)
    card = Store(folder / "card.sqlite")
    merges, scans = [], []
    for k in range(chunks):
        shard = Store(folder / f"shard-{k}.sqlite")
        for i in range(k * size, (k + 1) * size):
            shard.put(SimpleNamespace(
                record=ImageRecord(f"DCIM/IMG_{i:06d}.JPG", folder, 1, 1), status="ok", width=1, height=1,
                prediction={"detections": [{"category": "1", "conf": 0.8, "bbox": [0.1, 0.1, 0.3, 0.3]}] * 3},
                captured=None, error=None, warnings=[], evidence={}, degraded=[],
                embeddings={d: rng.normal(size=dim).astype(np.float32) for d in range(2)}))
        shard.close()
        started = time.perf_counter()
        card.merge(folder / f"shard-{k}.sqlite")
        merges.append(time.perf_counter() - started)
        started = time.perf_counter()
        card.degraded_counts(), card.coarse_sides(MAX_SIDES)
        scans.append(time.perf_counter() - started)
    card.close()
    return {"shard_images": size, "merge_ms": 1000 * sum(merges) / chunks,
            "state_scan_ms_at_images": {str((k + 1) * size): 1000 * s for k, s in enumerate(scans)}}


def drive(args: argparse.Namespace) -> None:
    """One mode in this process (the driver); prints its figures as JSON."""
    from trapedge.runtime.season.driver import run_season
    from trapedge.runtime.bench import peak_rss_mib
    from trapedge.runtime.season.pools import local_pool
    from trapedge.runtime.season.cards import read_cards
    from trapedge.runtime.station import Station, open_bundle

    bundle = open_bundle(args.bundle)
    specs = read_cards(Path(args.cards_dir), {"timezone": "+02:00", "lat": -19.6, "lon": 13.9})
    settings = {"bundle": str(bundle.root), "device": "cpu", "threads": 1}
    stations: dict = {}

    def station(location: tuple) -> Station:
        return stations.setdefault(location, Station(bundle, device="cpu", threads=1))

    if args.cluster:
        from trapedge.cluster import ray_pool

        pool = ray_pool(args.cluster, settings, args.workers)
    else:
        pool = local_pool(settings, args.workers)
    try:
        report = run_season(specs, Path(args.out), pool, station, chunk=args.chunk)
    finally:
        pool.close()
    images = sum(c.images for c in report.cards)
    overhead = [trip - work for trip, work in report.chunk_times]
    print(json.dumps({"images": images, "seconds": report.seconds, "images_per_s": images / report.seconds,
                      "chunks": report.chunks_run, "failed": len(report.failed),
                      "overhead_ms_per_chunk": 1000 * sum(overhead) / max(1, len(overhead)),
                      "worker_s_per_chunk": sum(w for _, w in report.chunk_times) / max(1, len(overhead)),
                      "driver_peak_rss_mib": peak_rss_mib()}))


def _mode(name: str, args: argparse.Namespace, bundle: Path, cards: Path, work: Path, cluster: str = "") -> dict:
    workers = 1 if name == "local sequential" else 2
    cmd = [sys.executable, __file__, "--drive", "--bundle", str(bundle), "--cards-dir", str(cards), "--out",
           str(work / name.replace(" ", "-")), "--chunk", str(args.chunk), "--workers", str(workers)]
    if cluster:
        cmd += ["--cluster", cluster]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: failed\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(mode=name, workers=workers, wall_s_with_startup=time.perf_counter() - started)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=4)
    parser.add_argument("--images", type=int, default=24, help="photos per card")
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--cards-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cluster", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args)
        return
    from trapedge.runtime.demo import build_demo_bundle

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = build_demo_bundle(work / "bundle")
        cards = make_cards(work / "cards", args.cards, args.images)
        results = [_mode(name, args, bundle, cards, work) for name in MODES[:2]]
        from ray.cluster_utils import Cluster

        node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
        started = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        cluster_start = time.perf_counter() - started
        try:
            results.append(_mode(MODES[2], args, bundle, cards, work, cluster.address))
        finally:
            cluster.shutdown()
        results[-1]["cluster_start_s"] = cluster_start
        (work / "merge").mkdir()
        merge = merge_cost(work / "merge")
    result = {"cards": args.cards, "images_per_card": args.images, "chunk": args.chunk, "modes": results,
              "merge": merge, "machine": machine.describe()}
    table = [("cards x photos, chunk", f"{args.cards} x {args.images}, {args.chunk}")]
    for r in results:
        table.append((f"{r['mode']} ({r['workers']} worker{'s' if r['workers'] > 1 else ''})",
                      f"{r['images_per_s']:.2f} img/s ({r['images']} images in {r['seconds']:.1f} s); "
                      f"overhead {r['overhead_ms_per_chunk']:.0f} ms/chunk on {r['worker_s_per_chunk']:.2f} s "
                      f"of work; driver peak RSS "
                      f"{r['driver_peak_rss_mib']:.0f} MiB"))
    table.append(("Ray cluster start (2 nodes)", f"{results[-1]['cluster_start_s']:.1f} s"))
    scans = merge["state_scan_ms_at_images"]
    table.append(("shard merge (256 images, 2 x 1280-d embeddings each)", f"{merge['merge_ms']:.0f} ms"))
    table.append(("sampler state read before a chunk", ", ".join(f"{v:.0f} ms at {k} images"
                                                                for k, v in list(scans.items())[::3])))
    print(machine.write("batch", result, table).read_text())


if __name__ == "__main__":
    main()
