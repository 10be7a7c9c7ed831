"""The whole `trapedge run` on a card with detections: serial vs pipelined pass 1 against the critical path, and peak
memory as the card grows.

The card is the ten real Reconyx photos (2048x1440) repeated under new names (hard links, so a 10,000-image card
costs no disk); the untrained demo bundle finds boxes in them, so the classifier, the evidence and the degraded
views run as on a real card, and pass 2 and every output are written. Each configuration runs in its own process
through the library face (`Station.run`), so peak RSS is its own. `--bundle` takes any other bundle (for example
real-size random-weight models from `trapedge.export.random_models`).

The critical path: decoding and letterboxing run in `--workers` threads while the main thread detects, crops,
classifies, embeds and stores, so a run can be no shorter than max(main-thread work, decode work / workers). A
pipelined run close to that bound hides decoding; the serial run (one worker, chunk 1) adds them up.

    python benchmarks/pipeline.py [--images 200] [--rss-sizes 300 3000 10000] [--bundle B] [--rss-from JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402

WORKER_STAGES = ("decode", "letterbox")  # run in the decode threads
WAITING = ("wait_decode", "load_models")

CHILD = """
import dataclasses, json, sys, time
from trapedge.runtime import Station
from trapedge.runtime.bench import peak_rss_mib
bundle, card, out, workers, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
station = Station(bundle, device="cpu", decode_workers=workers)
station.options = dataclasses.replace(station.options, chunk=chunk)  # chunk 1: the serial baseline
station.open()
started = time.perf_counter()
report = station.run(card, out, log=lambda m: None)
print(json.dumps({"wall_s": time.perf_counter() - started, "images": report.images, "detections": report.detections,
                  "stages": report.timing, "peak_rss_mib": peak_rss_mib()}))
"""


def make_card(folder: Path, count: int) -> Path:
    """`count` photos: the packaged real photos repeated under new names (hard links where the disk allows)."""
    from trapedge.runtime.demo import sample_photos

    photos = sample_photos()
    target = folder / "DCIM" / "100MEDIA"
    target.mkdir(parents=True, exist_ok=True)
    for i in range(len(list(target.glob("*.JPG"))), count):
        dest = target / f"IMG_{i:05d}.JPG"
        try:
            os.link(photos[i % len(photos)], dest)
        except OSError:
            dest.write_bytes(photos[i % len(photos)].read_bytes())
    return folder


def run_child(bundle: Path, card: Path, out: Path, workers: int, chunk: int) -> dict:
    """One `Station.run` in a fresh process on a fresh output folder (never a resume); its result and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(card), str(out), str(workers), str(chunk)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def critical_path(result: dict, workers: int) -> dict:
    """Main-thread work, decode-thread work per worker, and the bound the wall clock cannot beat."""
    stages = result["stages"]
    main = sum(s["total_ms"] for k, s in stages.items() if k not in WORKER_STAGES + WAITING) / 1000
    decode = sum(stages[k]["total_ms"] for k in WORKER_STAGES if k in stages) / 1000
    bound = max(main, decode / workers)
    return {"main_thread_s": main, "decode_threads_s": decode, "bound_s": bound,
            "wall_over_bound": result["wall_s"] / bound, "waiting_for_decode_s": stages.get("wait_decode", {})
            .get("total_ms", 0.0) / 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[300, 3000, 10000])
    parser.add_argument("--bundle", type=Path, help="bundle to run (default: the demo bundle, built here)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/trapedge-pipeline"))
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for pipeline.json and .md")
    parser.add_argument("--rss-from", type=Path, help="take the RSS series from an earlier pipeline.json (the long "
                                                      "runs), timing the serial and pipelined runs afresh")
    args = parser.parse_args()
    from trapedge.runtime.demo import build_demo_bundle

    bundle = args.bundle or build_demo_bundle(args.work / "bundle")
    card = make_card(args.work / f"card-{args.images}", args.images)
    serial = run_child(bundle, card, args.work / "out-serial", 1, 1)
    piped = run_child(bundle, card, args.work / "out-piped", 2, 8)
    paths = {"serial": critical_path(serial, 1), "pipelined": critical_path(piped, 2)}
    rss = json.loads(args.rss_from.read_text())["peak_rss_by_size"] if args.rss_from else {}
    for size in [] if args.rss_from else args.rss_sizes:
        grown = run_child(bundle, make_card(args.work / f"card-{size}", size), args.work / f"out-{size}", 2, 8)
        rss[size] = {"peak_rss_mib": grown["peak_rss_mib"], "wall_s": grown["wall_s"],
                     "detections": grown["detections"]}
    result = {"images": args.images, "bundle": str(bundle), "serial": serial, "pipelined": piped,
              "critical_path": paths, "peak_rss_by_size": rss, "machine": machine.describe()}
    table = [("card", f"{args.images} real 2048x1440 photos, {piped['detections']} detections "
                      f"({piped['stages'].get('classify', {}).get('count', 0)} classifier calls)"),
             ("serial wall (1 decode worker, chunk 1)", f"{serial['wall_s']:.1f} s; critical path "
              f"{paths['serial']['bound_s']:.1f} s (main thread {paths['serial']['main_thread_s']:.1f} s, "
              f"decode {paths['serial']['decode_threads_s']:.1f} s)"),
             ("pipelined wall (2 decode workers, chunk 8)", f"{piped['wall_s']:.1f} s; critical path "
              f"{paths['pipelined']['bound_s']:.1f} s (main thread {paths['pipelined']['main_thread_s']:.1f} s, "
              f"decode {paths['pipelined']['decode_threads_s']:.1f} s over 2 threads); wall / critical path "
              f"{paths['pipelined']['wall_over_bound']:.2f}, waiting for decode "
              f"{paths['pipelined']['waiting_for_decode_s']:.1f} s"),
             ("stage totals, pipelined (ms)", ", ".join(f"{k} {v['total_ms']:.0f}" for k, v in piped["stages"].items())),
             ("peak RSS by card size", ", ".join(f"{n} images: {v['peak_rss_mib']:.0f} MiB ({v['wall_s']:.0f} s, "
                                                 f"{v['detections']} detections)" for n, v in rss.items()))]
    print(machine.write("pipeline", result, table, args.out).read_text())


if __name__ == "__main__":
    main()
