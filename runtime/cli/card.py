"""Commands over a card and its results: run, reclassify, export-results, evaluate, bench, demo."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..card.bursts import DEFAULT_GAP_S
from ..station import RunReport, Station, output_formats, rerun_pass_two, write_outputs
from .common import (
    Centroids, Decision, Device, Format, Precision, Privacy, Scoring, UserError, bundle_option, config_option, console,
    export_crops_option, need_bundle, privacy_option, report_option, say, value, with_config,
)

INPUT, LOCATION, SPEED, STAGES, OUTPUTS = "Input", "Location and deployment", "Speed", "Re-classification", "Output"


def _stages(stages_config: Optional[Path], **flags) -> dict:
    """Stage settings from a JSON file, then flags."""
    values = {}
    if stages_config is not None:
        try:
            values = json.loads(stages_config.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{stages_config}: not valid JSON ({e})") from e
        if not isinstance(values, dict):
            raise UserError(f"{stages_config}: expected a JSON object of stage settings")
    values.update({k: value(v) for k, v in flags.items() if v is not None})
    return values


def _deployment(timezone: Optional[str], lat: Optional[float], lon: Optional[float],
                deployment_id: Optional[str]) -> Optional[dict]:
    given = {"timezone": timezone, "latitude": lat, "longitude": lon, "deployment_id": deployment_id}
    return given if any(v is not None for v in given.values()) else None


def run(
    ctx: typer.Context,
    card: Path = typer.Argument(..., help="The card: a folder (SD card mount or copy), scanned recursively.",
                                show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created; a rerun resumes it).",
                             show_default=False, rich_help_panel=OUTPUTS),
    bundle: Optional[Path] = bundle_option(rich_help_panel=INPUT),
    config: Optional[Path] = config_option(rich_help_panel=INPUT),
    video_every: float = typer.Option(1.0, min=0.001, help="Seconds between the sampled frames of a video clip.",
                                      rich_help_panel=INPUT),
    video_every_frames: Optional[int] = typer.Option(None, min=1, help="Sample every Nth frame of a video clip "
                                                                      "instead.", rich_help_panel=INPUT),
    country: Optional[str] = typer.Option(None, help="ISO 3166-1 alpha-3 country for the geofence, e.g. NAM.",
                                          rich_help_panel=LOCATION),
    admin1: Optional[str] = typer.Option(None, help="ISO 3166-2 region for the geofence (SpeciesNet: USA states).",
                                         rich_help_panel=LOCATION),
    geofence: bool = typer.Option(True, help="Apply SpeciesNet's geofence.", rich_help_panel=LOCATION),
    timezone: Optional[str] = typer.Option(None, help="Camera clock's IANA zone or UTC offset (Camtrap DP), e.g. "
                                                      "Africa/Windhoek or +02:00.", rich_help_panel=LOCATION),
    lat: Optional[float] = typer.Option(None, help="Deployment latitude (Camtrap DP).", rich_help_panel=LOCATION),
    lon: Optional[float] = typer.Option(None, help="Deployment longitude (Camtrap DP).", rich_help_panel=LOCATION),
    deployment_id: Optional[str] = typer.Option(None, help="Deployment id (Camtrap DP); default: the card's "
                                                           "folder name.", rich_help_panel=LOCATION),
    device: Device = typer.Option("auto", help="Where models run.", rich_help_panel=SPEED),
    precision: Precision = typer.Option("fp32", help="fp16/int8: TensorRT builds it, or the bundle's quantised "
                                                     "variant (trapedge quantize).", rich_help_panel=SPEED),
    agreement_floor: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                                    help="Refuse a quantised model whose recorded agreement with "
                                                         "fp32 is below this.", rich_help_panel=SPEED),
    threads: Optional[int] = typer.Option(None, min=1, help="ONNX Runtime intra-op threads.", rich_help_panel=SPEED),
    workers: int = typer.Option(2, min=1, help="Decode worker threads.", rich_help_panel=SPEED),
    detector_batch: int = typer.Option(1, min=1, help="Images per detector call.", rich_help_panel=SPEED),
    classifier_batch: int = typer.Option(8, min=1, help="Crops per classifier call.", rich_help_panel=SPEED),
    draft: bool = typer.Option(False, help="Decode large JPEGs at reduced size for the detector (faster; boxes "
                                           "differ slightly from SpeciesNet's).", rich_help_panel=SPEED),
    detection_threshold_for_classification: float = typer.Option(
        0.1, min=0.0, max=1.0, help="Classify boxes at or above this confidence (SpeciesNet's default).",
        rich_help_panel=SPEED),
    max_classifications_per_image: Optional[int] = typer.Option(
        None, min=1, help="Classify at most this many boxes per photo, the most confident (default: all; as "
                          "SpeciesNet's flag). Pass 2 sees only the boxes classified.", rich_help_panel=SPEED),
    reclassify_: bool = typer.Option(True, "--reclassify/--no-reclassify",
                                     help="Run pass 2, the five re-classification stages.", rich_help_panel=STAGES),
    decision: Optional[Decision] = typer.Option(None, help="How coarse labels are refined (default calibrated).",
                                                rich_help_panel=STAGES),
    target_precision: Optional[float] = typer.Option(None, min=0.5, max=0.999,
                                                     help="95% lower bound each calibrated level must reach "
                                                          "(0.97).", rich_help_panel=STAGES),
    centroids: Centroids = typer.Option("dump", help="Where centroids come from: this card, the bundle, both.",
                                        rich_help_panel=STAGES),
    scoring: Optional[Scoring] = typer.Option(None, help="Stage-5 scoring for --decision adaptive.",
                                              rich_help_panel=STAGES),
    tau_accept: Optional[float] = typer.Option(None, help="Stage 1: acceptance score.", rich_help_panel=STAGES),
    lam: Optional[float] = typer.Option(None, help="Stage 5: threshold mean + lam * std.", rich_help_panel=STAGES),
    margin: Optional[float] = typer.Option(None, help="Stage 5: margin over the runner-up.", rich_help_panel=STAGES),
    n_min: Optional[int] = typer.Option(None, min=1, help="Stage 3: references per centroid.",
                                        rich_help_panel=STAGES),
    burst_gap: float = typer.Option(DEFAULT_GAP_S, min=0.0, help="Seconds between photos of one event.",
                                    rich_help_panel=STAGES),
    event_pooling: bool = typer.Option(False, help="--decision adaptive scores an event's crops together.",
                                       rich_help_panel=STAGES),
    stages_config: Optional[Path] = typer.Option(None, dir_okay=False, help="JSON file of stage settings.",
                                                 rich_help_panel=STAGES),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary.", rich_help_panel=OUTPUTS),
    export_crops: bool = export_crops_option("Also write crops per label and thumbnails with boxes (OUT/crops, "
                                             "OUT/thumbnails).", rich_help_panel=OUTPUTS),
    privacy: Privacy = privacy_option(rich_help_panel=OUTPUTS),
    report_: bool = report_option("Write OUT/report.html, a page to look at (counts, activity, thumbnails).",
                                  rich_help_panel=OUTPUTS),
) -> None:
    """Detect, classify and re-classify every photo on a card; write SpeciesNet, MegaDetector, Camtrap DP, CSV."""
    s = with_config(ctx, config, locals())
    station = Station(
        need_bundle(s["bundle"]), device=value(s["device"]), precision=value(s["precision"]), threads=s["threads"],
        agreement_floor=s["agreement_floor"], detector_batch=s["detector_batch"],
        classifier_batch=s["classifier_batch"], decode_workers=s["workers"], draft=s["draft"],
        country=s["country"], admin1=s["admin1"], geofence=s["geofence"],
        stages=_stages(stages_config, scoring=scoring, tau_accept=tau_accept, lam=lam, margin=margin, n_min=n_min,
                       decision=s["decision"], target_precision=s["target_precision"]),
        centroids=value(s["centroids"]), event_pooling=event_pooling, burst_gap=s["burst_gap"],
        video_every=s["video_every"], video_every_frames=s["video_every_frames"], privacy=value(s["privacy"]),
        detection_threshold_for_classification=s["detection_threshold_for_classification"],
        max_classifications_per_image=s["max_classifications_per_image"])
    progress = Progress(TextColumn("[bold]images"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                        TimeRemainingColumn(), console=console, disable=quiet)
    task = progress.add_task("run", total=None, rate="", start=False)
    started = time.perf_counter()

    def advance(done: int, total: int) -> None:
        if done == 1:
            progress.start()
        progress.update(task, completed=done, total=total,
                        rate=f"{done / max(time.perf_counter() - started, 1e-9):.2f} img/s")

    try:
        report = station.run(card, out, deployment=_deployment(s["timezone"], s["lat"], s["lon"], s["deployment_id"]),
                             reclassify=reclassify_, progress=advance, log=(lambda m: None) if quiet else say,
                             export_crops=export_crops,
                             formats=output_formats(report_))
    finally:
        if progress.live.is_started:
            progress.stop()
    if not quiet:
        summary(report)


def summary(report: RunReport) -> None:
    """Images, detections, failures by reason, labels, pass-2 levels and time per stage."""
    failed = len(report.failed)
    say(f"{report.processed} images processed in {report.seconds:.1f} s "
        f"({report.processed / max(report.seconds, 1e-9):.2f} img/s); {report.images} in the results, "
        f"{report.detections} detections, {failed} failed; wrote {report.out / 'predictions.json'}")
    reasons: dict[str, int] = {}
    for _, reason in report.failed:
        reasons[reason.split(":")[0]] = reasons.get(reason.split(":")[0], 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        say(f"  failed ({count}): {reason}")
    if report.labels:
        table = Table("label", "detections", title="Labels (after re-classification)")
        for label, count in list(report.labels.items())[:15]:
            table.add_row(label, str(count))
        console.print(table)
    pass_two(report)
    console.print(timing_table(report.timing, "Per-stage time"))


def pass_two(report: RunReport) -> None:
    """Counts per stage, each calibrated level's bound (or why it is off), and the notes."""
    if report.pass_two is None:
        return
    say(f"re-classification: {report.pass_two['counts']}")
    for level, cal in report.pass_two["calibration"].get("levels", {}).items():
        if cal.get("enabled"):
            say(f"  {level}: on, precision >= {cal['lower_bound']:.3f} (95% bound) on {cal['accepted']} held-out "
                f"views, threshold {cal['threshold']:.3f}")
        else:
            say(f"  {level}: off, {cal['reason']}")
    for note in report.pass_two["notes"]:
        say(f"  note: {note}")


def timing_table(stages: dict, title: str) -> Table:
    """Per-stage count, mean, p50, p95 and total milliseconds."""
    table = Table("stage", "count", "mean ms", "p50 ms", "p95 ms", "total ms", title=title)
    for stage, s in stages.items():
        table.add_row(stage, str(s["count"]), f"{s['mean_ms']:.1f}", f"{s['p50_ms']:.1f}", f"{s['p95_ms']:.1f}",
                      f"{s['total_ms']:.0f}")
    return table


def reclassify_cmd(
    out: Path = typer.Argument(..., help="Output folder of a finished run.", show_default=False),
    bundle: Optional[Path] = bundle_option("Artifact bundle folder (default: the one the run used)."),
    country: Optional[str] = typer.Option(None, help="ISO3 country for the geofence (default: the run's)."),
    admin1: Optional[str] = typer.Option(None, help="ISO 3166-2 region (default: the run's)."),
    geofence: Optional[bool] = typer.Option(None, help="Apply the geofence (default: as the run did).",
                                            show_default=False),
    centroids: Optional[Centroids] = typer.Option(None, help="Centroid source (default: the run's)."),
    decision: Optional[Decision] = typer.Option(None, help="How coarse labels are refined (default: the run's)."),
    scoring: Optional[Scoring] = typer.Option(None, help="Stage-5 scoring for --decision adaptive."),
    target_precision: Optional[float] = typer.Option(None, min=0.5, max=0.999,
                                                     help="95% lower bound per calibrated level (default: the "
                                                          "run's)."),
    burst_gap: Optional[float] = typer.Option(None, min=0.0, help="Seconds between photos of one event "
                                                                  "(default: the run's)."),
    event_pooling: Optional[bool] = typer.Option(None, help="--decision adaptive scores an event's crops together "
                                                            "(default: the run's).", show_default=False),
    stages_config: Optional[Path] = typer.Option(None, dir_okay=False, help="JSON file of stage settings."),
) -> None:
    """Re-run pass 2 on a finished run's store (nothing recomputed); settings default to the run's own."""
    report = rerun_pass_two(out, bundle, country=country, admin1=admin1, geofence=geofence,
                        centroids=value(centroids), event_pooling=event_pooling, burst_gap=burst_gap,
                        stages=_stages(stages_config, decision=decision, scoring=scoring,
                                       target_precision=target_precision))
    pass_two(report)


def export_results(
    ctx: typer.Context,
    out: Path = typer.Argument(..., help="Output folder of a run.", show_default=False),
    format: list[Format] = typer.Option(list(Format), "--format", "-f", help="Formats to write (repeat the option)."),
    config: Optional[Path] = config_option(),
    timezone: Optional[str] = typer.Option(None, help="Camera clock's IANA zone or UTC offset (remembered)."),
    lat: Optional[float] = typer.Option(None, help="Deployment latitude (remembered)."),
    lon: Optional[float] = typer.Option(None, help="Deployment longitude (remembered)."),
    deployment_id: Optional[str] = typer.Option(None, help="Deployment id (remembered); default: the card's name."),
    export_crops: bool = typer.Option(False, "--export-crops", help="Also write crops per label and thumbnails."),
    privacy: Optional[Privacy] = typer.Option(None, help="People in exported images: blurred, filled, or the "
                                                         "photo left out (default: as the run did).",
                                              show_default=False),
) -> None:
    """Re-write the result files from the run's store; a deployment given here is kept with the run."""
    s = with_config(ctx, config, {"timezone": None, "lat": None, "lon": None, "deployment_id": None})
    for path in write_outputs(out, tuple(value(f) for f in format), _deployment(timezone, lat, lon, deployment_id),
                              export_crops=export_crops, privacy=value(privacy) if privacy else None,
                              fallback=_deployment(s["timezone"], s["lat"], s["lon"], s["deployment_id"])):
        say(f"wrote {path}")


def report_cmd(
    out: Path = typer.Argument(..., help="Output folder of a run.", show_default=False),
    privacy: Optional[Privacy] = typer.Option(None, help="People in the thumbnails: blurred, filled, or the photo "
                                                         "left out (default: as the run did).", show_default=False),
) -> None:
    """Write OUT/report.html: one offline page with species, activity, folders, pass-2 changes and thumbnails."""
    for path in write_outputs(out, ("report",), privacy=value(privacy) if privacy else None):
        say(f"wrote {path}")


def evaluate_cmd(
    out: Path = typer.Argument(..., help="Output folder of a finished run.", show_default=False),
    truth: Path = typer.Option(..., dir_okay=False, help="CSV: filepath, detection, label.", show_default=False),
) -> None:
    """Score a run's re-classifications against ground truth (the paper's metrics); writes JSON and Markdown."""
    from ..reclassify.evaluate import evaluate, load_truth, write_report

    try:
        document = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{out / 'predictions.json'}: not valid JSON ({e})") from e
    if not isinstance(document, dict) or "predictions" not in document:
        raise UserError(f"{out / 'predictions.json'}: no predictions list")
    result = evaluate(document["predictions"], load_truth(truth))
    print(write_report(result, out).read_text())


def bench(
    ctx: typer.Context,
    card: Path = typer.Argument(..., help="Folder of photos to run on.", show_default=False),
    bundle: Optional[Path] = bundle_option(),
    config: Optional[Path] = config_option(),
    device: Device = typer.Option("auto", help="Where models run."),
    precision: Precision = typer.Option("fp32", help="Model precision."),
    detector_batch: int = typer.Option(1, min=1, help="Images per detector call."),
    classifier_batch: int = typer.Option(8, min=1, help="Crops per classifier call."),
    images: Optional[int] = typer.Option(None, min=1, help="Only the first K images."),
    threads: Optional[int] = typer.Option(None, min=1, help="ONNX Runtime intra-op threads."),
    workers: int = typer.Option(2, min=1, help="Decode worker threads (1 = no overlap)."),
    out: Path = typer.Option(Path("bench-results"), "--out", "-o", help="Folder for bench.json and bench.md."),
    stages_config: Optional[Path] = typer.Option(None, dir_okay=False, help="JSON file of stage settings."),
) -> None:
    """Run the real pipeline once and report time per stage, throughput, peak memory, providers and the machine."""
    import tempfile

    from ..atomic import atomic_write_json, atomic_write_text
    from ..bench import machine, model_rates, peak_rss_mib, report_markdown, sgemm_peak_gflops

    s = with_config(ctx, config, locals())
    station = Station(need_bundle(s["bundle"]), device=value(s["device"]), precision=value(s["precision"]),
                      threads=s["threads"], detector_batch=s["detector_batch"],
                      classifier_batch=s["classifier_batch"], decode_workers=s["workers"],
                      stages=_stages(stages_config))
    providers = station.open()
    with tempfile.TemporaryDirectory(prefix="trapedge-bench-") as scratch:
        report = station.run(card, Path(scratch) / "out", limit=images, log=lambda m: None)
    for handler in [h for h in logging.getLogger("trapedge").handlers if getattr(h, "baseFilename", "")
                    .startswith(scratch)]:
        logging.getLogger("trapedge").removeHandler(handler)  # its folder is gone
        handler.close()
    overlapped = {"decode", "letterbox", "load_models"}  # decode runs in worker threads, overlapping the rest
    timed = sum(v["total_ms"] for k, v in report.timing.items() if k not in overlapped) / 1000.0
    result = {"images": report.processed, "wall_s": report.seconds,
              "images_per_s": report.processed / max(report.seconds, 1e-9), "stages": report.timing,
              "timed_share": timed / max(report.seconds, 1e-9), "peak_rss_mib": peak_rss_mib(),
              "providers": providers, "device": value(s["device"]), "precision": value(s["precision"]),
              "detector_batch": s["detector_batch"], "machine": machine(),
              "models": model_rates(report.models, {n: station.bundle.model(n).path for n in report.models}),
              "sgemm_peak_gflops": sgemm_peak_gflops() if providers["detector"][0] == "CPUExecutionProvider" else None}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench.json", result)
    atomic_write_text(out / "bench.md", report_markdown(result))
    console.print(timing_table(report.timing, f"{result['images_per_s']:.3f} images/s, peak RSS "
                                              f"{result['peak_rss_mib']:.0f} MiB"))
    for name, rate in result["models"].items():
        if rate.get("gflops_per_s"):
            share = (f", {100 * rate['gflops_per_s'] / result['sgemm_peak_gflops']:.0f}% of this CPU's sgemm peak"
                     if result["sgemm_peak_gflops"] else "")
            say(f"{name}: {rate['gflop']:.1f} GFLOP in {rate['seconds']:.2f} s = {rate['gflops_per_s']:.1f} GFLOP/s"
                f"{share}")
    say(f"providers: {providers}; wrote {out / 'bench.json'} and {out / 'bench.md'}")


def demo(out: Path = typer.Option(Path("trapedge-demo"), "--out", "-o",
                                  help="Folder for the demo bundle, card and results.")) -> None:
    """Build an untrained demo bundle locally and run the full pipeline on the packaged sample photos."""
    from ..demo import build_demo_bundle, copy_samples

    say("Building the demo bundle: UNTRAINED demo models (a saliency heuristic and a random classifier) so the "
        "pipeline can run with no downloads; their labels mean nothing.")
    try:
        bundle = build_demo_bundle(out / "bundle")
    except RuntimeError as e:
        raise UserError(str(e)) from e
    card = copy_samples(out / "card")
    station = Station(bundle)
    report = station.run(card, out / "results", log=say,
                         deployment={"timezone": "UTC", "latitude": 0.0, "longitude": 0.0,
                                     "deployment_id": "trapedge-demo"})
    summary(report)
    say(f"Open {out / 'results' / 'report.html'} in a browser to look at the results.")
    say("For real results, export SpeciesNet's weights on a workstation with the export extra:\n"
        "  trapedge export speciesnet kaggle:google/speciesnet/pyTorch/v4.0.3a/1 --bundle artifacts/speciesnet\n"
        "  trapedge export encoder --bundle artifacts/speciesnet --model ViT-L-14 --pretrained openai\n"
        "then: trapedge run /media/SDCARD --bundle artifacts/speciesnet --out results --country ISO3")
