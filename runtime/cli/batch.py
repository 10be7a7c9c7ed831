"""`trapedge batch`: a season of cards on this machine, or on a Ray cluster with --cluster."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..season.driver import DEFAULT_CHUNK, SeasonReport, run_season
from ..season.pools import local_pool
from ..season.cards import CSV_COLUMNS, read_cards
from ..station import Station, open_bundle, output_formats
from .card import _stages
from .common import (
    Decision, Device, Precision, Privacy, UserError, bundle_option, config_option, console, export_crops_option,
    need_bundle, privacy_option, report_option, say, value, with_config,
)

INPUT, LOCATION, SPEED, STAGES, OUTPUTS = "Input", "Location and deployment", "Speed", "Re-classification", "Output"
RAY_MISSING = "--cluster needs Ray: pip install 'trapedge[cluster]'"


def batch(
    ctx: typer.Context,
    cards: Path = typer.Argument(..., help="A folder of card folders (deployment id: the folder's name) or a CSV "
                                           f"with columns {', '.join(CSV_COLUMNS)}.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Season folder: ROOT/<deployment>/ per card, merged files "
                                                      "in ROOT (a rerun resumes).", show_default=False,
                             rich_help_panel=OUTPUTS),
    bundle: Optional[Path] = bundle_option(rich_help_panel=INPUT),
    config: Optional[Path] = config_option(rich_help_panel=INPUT),
    country: Optional[str] = typer.Option(None, help="Default ISO3 country for cards the CSV leaves blank.",
                                          rich_help_panel=LOCATION),
    admin1: Optional[str] = typer.Option(None, help="Default ISO 3166-2 region.", rich_help_panel=LOCATION),
    geofence: bool = typer.Option(True, help="Apply SpeciesNet's geofence.", rich_help_panel=LOCATION),
    timezone: Optional[str] = typer.Option(None, help="Default camera clock zone (Camtrap DP).",
                                           rich_help_panel=LOCATION),
    lat: Optional[float] = typer.Option(None, help="Default latitude (Camtrap DP).", rich_help_panel=LOCATION),
    lon: Optional[float] = typer.Option(None, help="Default longitude (Camtrap DP).", rich_help_panel=LOCATION),
    cluster: Optional[str] = typer.Option(None, help="Run on Ray: ray://HOST:PORT or auto (needs the cluster "
                                                     "extra; cards on storage every node reads).",
                                          rich_help_panel=SPEED),
    parallel: Optional[int] = typer.Option(None, min=1, help="Workers (cards side by side): default this "
                                                             "machine's cores, or the cluster's CPUs or GPUs.",
                                           rich_help_panel=SPEED),
    chunk: int = typer.Option(DEFAULT_CHUNK, min=1, help="Images per chunk (the unit of retry and resume).",
                              rich_help_panel=SPEED),
    device: Device = typer.Option("auto", help="Where models run (cuda/tensorrt: one GPU per Ray worker).",
                                  rich_help_panel=SPEED),
    precision: Precision = typer.Option("fp32", help="Model precision.", rich_help_panel=SPEED),
    threads: Optional[int] = typer.Option(None, min=1, help="ONNX Runtime threads per worker.",
                                          rich_help_panel=SPEED),
    workers: int = typer.Option(2, min=1, help="Decode threads per worker.", rich_help_panel=SPEED),
    detection_threshold_for_classification: float = typer.Option(
        0.1, min=0.0, max=1.0, help="Classify boxes at or above this confidence.", rich_help_panel=SPEED),
    max_classifications_per_image: Optional[int] = typer.Option(
        None, min=1, help="Classify at most this many boxes per photo, the most confident.", rich_help_panel=SPEED),
    decision: Optional[Decision] = typer.Option(None, help="How coarse labels are refined (default calibrated).",
                                                rich_help_panel=STAGES),
    target_precision: Optional[float] = typer.Option(None, min=0.5, max=0.999, help="Calibrated levels' bound.",
                                                     rich_help_panel=STAGES),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary.", rich_help_panel=OUTPUTS),
    export_crops: bool = export_crops_option("Also write each card's crops per label and thumbnails with boxes.",
                                             rich_help_panel=OUTPUTS),
    privacy: Privacy = privacy_option(rich_help_panel=OUTPUTS),
    report_: bool = report_option("Write each card's report.html and the season's.", rich_help_panel=OUTPUTS),
) -> None:
    """Every card of a season: per-card outputs as `trapedge run` writes them, plus the season's merged files."""
    s = with_config(ctx, config, locals())
    specs = read_cards(cards, {"country": s["country"], "admin1": s["admin1"], "timezone": s["timezone"],
                               "lat": s["lat"], "lon": s["lon"]})
    loaded = open_bundle(need_bundle(s["bundle"]))
    settings = {"bundle": str(loaded.root.resolve()), "device": value(s["device"]),
                "precision": value(s["precision"]), "threads": s["threads"], "decode_workers": s["workers"],
                "geofence": s["geofence"], "privacy": value(s["privacy"]),
                "detection_threshold_for_classification": s["detection_threshold_for_classification"],
                "max_classifications_per_image": s["max_classifications_per_image"],
                "stages": _stages(None, decision=s.get("decision"), target_precision=s.get("target_precision"))}
    stations: dict[tuple, Station] = {}

    def station(location: tuple) -> Station:
        if location not in stations:
            rest = {k: v for k, v in settings.items() if k != "bundle"}
            stations[location] = Station(loaded, country=location[0], admin1=location[1], **rest)
        return stations[location]

    pool = _pool(cluster, settings, parallel, len(specs))
    progress = Progress(TextColumn("[bold]images"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console, disable=quiet)
    task = progress.add_task("batch", total=None, rate="")
    started = time.perf_counter()

    def advance(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total,
                        rate=f"{done / max(time.perf_counter() - started, 1e-9):.2f} img/s")

    progress.start()
    try:
        report = run_season(specs, out, pool, station, chunk=chunk, progress=advance, export_crops=export_crops,
                            formats=output_formats(report_))
    finally:
        progress.stop()
        pool.close()
    if not quiet:
        _summary(report)
    if report.cards and len(report.failed) == len(report.cards):
        raise UserError(f"no card finished (first: {report.failed[0].deployment_id}: {report.failed[0].reason}); "
                        f"see {report.root / 'summary.csv'}")


def _pool(cluster: Optional[str], settings: dict, parallel: Optional[int], cards: int):
    """A Ray pool for --cluster (imported only then), else local processes up to the cores (or the cards)."""
    if cluster:
        try:
            from trapedge.cluster import ray_pool
        except ImportError as e:
            raise UserError(RAY_MISSING) from e
        return ray_pool(cluster, settings, parallel)
    workers = parallel or max(1, min(os.cpu_count() or 1, cards))
    if workers > 1 and settings["threads"] is None:
        settings = {**settings, "threads": max(1, (os.cpu_count() or 1) // workers)}
    return local_pool(settings, workers)


def _summary(report: SeasonReport) -> None:
    done = [c for c in report.cards if c.status == "done"]
    say(f"{len(done)} of {len(report.cards)} cards done in {report.seconds:.1f} s ({report.chunks_run} chunks "
        f"run); {sum(c.images for c in done)} images, {sum(c.detections for c in done)} detections; "
        f"wrote {report.root / 'summary.csv'}")
    for card in report.failed:
        say(f"  failed: {card.deployment_id}: {card.reason}")
