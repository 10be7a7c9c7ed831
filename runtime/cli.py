"""The `trapedge` command line; export commands load lazily so the runtime starts without torch."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .models.backends import DEVICES, BackendError
from .models.bundle import Bundle, BundleError
from .outputs.formats import (
    Deployment, ImageInfo, write_camtrap_dp, write_flat_csv, write_images_csv, write_megadetector_json,
    write_predictions_json,
)
from .card.ingest import scan
from .bench import StageTimer
from .models.bundle import sha256_file
from .card.bursts import DEFAULT_GAP_S, group_events
from .pipeline import MAX_SIDES, RunOptions, Runner, tables_from_results
from .outputs.store import STORE_NAME, Store
from .reclassify import EmbeddingTable
from .reclassify.runner import CENTROID_SOURCES, Reclassifier
from .reclassify.stages import DECISIONS, SCORING, StageConfig

app = typer.Typer(help="Camera-trap photos to species on the edge: SpeciesNet on ONNX Runtime.",
                  no_args_is_help=True, add_completion=False)
export_app = typer.Typer(help="Convert models to a trapedge artifact bundle (needs the export extra).",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")

console = Console(stderr=True)
logger = logging.getLogger("trapedge")


def _fail(message: str) -> None:
    console.print(f"Error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _version(value: bool) -> None:
    if value:
        print(f"trapedge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """trapedge: field-station runtime for SpeciesNet and hierarchical re-classification."""


def _check_location(country: Optional[str], admin1: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    if country is not None and (len(country) != 3 or not country.isalpha()):
        _fail(f"--country must be an ISO 3166-1 alpha-3 code such as USA or KEN, got {country!r}")
    if admin1 is not None:
        if country is None:
            _fail("--admin1 needs --country")
        if len(admin1) != 2:
            _fail(f"--admin1 must be a 2-character ISO 3166-2 region code such as CA, got {admin1!r}")
    return (country.upper() if country else None, admin1.upper() if admin1 else None)


@app.command()
def run(
    dump: Path = typer.Argument(..., exists=True, file_okay=False, help="SD-card dump (folder, scanned recursively)."),
    bundle: Path = typer.Option(..., "--bundle", "-b", help="Artifact bundle folder from `trapedge export`."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for predictions.json and friends."),
    country: Optional[str] = typer.Option(None, help="ISO 3166-1 alpha-3 country for the geofence."),
    admin1: Optional[str] = typer.Option(None, help="ISO 3166-2 admin1 region (e.g. CA) for the geofence."),
    geofence: bool = typer.Option(True, help="Apply SpeciesNet's geofence."),
    device: str = typer.Option("auto", help=f"One of {', '.join(DEVICES)}."),
    threads: Optional[int] = typer.Option(None, min=1, help="ONNX Runtime intra-op threads."),
    detector_batch: int = typer.Option(1, min=1, help="Images per detector call (same padded shape)."),
    classifier_batch: int = typer.Option(8, min=1, help="Crops per classifier call."),
    workers: int = typer.Option(2, min=1, help="Decode worker threads."),
    precision: str = typer.Option("fp32", help="fp32, or a quantised variant in the bundle: fp16, int8."),
    agreement_floor: Optional[float] = typer.Option(None, help="Refuse a quantised model whose recorded top-1 "
                                                               "agreement with fp32 is below this."),
    engine: str = typer.Option("onnx", help="onnx (ONNX Runtime providers) or tensorrt-native."),
    draft: bool = typer.Option(False, help="Decode large JPEGs at reduced size for the detector (faster; boxes no "
                                           "longer bit-identical to SpeciesNet's); crops stay full resolution."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    reclassify: bool = typer.Option(True, help="Run pass 2: the five re-classification stages."),
    centroids: str = typer.Option("dump", help=f"Centroid source: {', '.join(CENTROID_SOURCES)}."),
    decision: Optional[str] = typer.Option(None, help=f"How coarse labels are refined: {', '.join(DECISIONS)} "
                                                      "(default calibrated: only on evidence whose precision bound "
                                                      "reaches --target-precision)."),
    scoring: Optional[str] = typer.Option(None, help=f"Stage-5 scoring for --decision adaptive: {', '.join(SCORING)}."),
    target_precision: Optional[float] = typer.Option(None, min=0.5, max=0.999,
                                                     help="Precision each calibrated level must reach as a 95% "
                                                          "lower bound on held-out degraded references (0.97)."),
    stages_config: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                                 help="JSON file of stage settings (see StageConfig)."),
    tau_accept: Optional[float] = typer.Option(None, help="Stage 1 acceptance score."),
    lam: Optional[float] = typer.Option(None, help="Stage 5 adaptive threshold: mean + lam * std."),
    margin: Optional[float] = typer.Option(None, help="Stage 5 margin over the runner-up."),
    n_min: Optional[int] = typer.Option(None, min=1, help="Stage 3 references per centroid."),
    burst_gap: float = typer.Option(DEFAULT_GAP_S, min=0.0, help="Seconds between photos of one event (burst)."),
    event_pooling: bool = typer.Option(False, help="--decision adaptive scores an event's same-label crops together."),
    timezone: Optional[str] = typer.Option(None, help="Camera clock's IANA timezone or UTC offset (Camtrap DP), e.g. "
                                                      "Africa/Windhoek or +02:00."),
    lat: Optional[float] = typer.Option(None, help="Deployment latitude (Camtrap DP)."),
    lon: Optional[float] = typer.Option(None, help="Deployment longitude (Camtrap DP)."),
    deployment_id: Optional[str] = typer.Option(None, help="Deployment id (Camtrap DP); default: the dump's folder name."),
) -> None:
    """Detect, classify and re-classify every photo on a card, writing SpeciesNet's predictions.json."""
    country, admin1 = _check_location(country, admin1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        loaded = Bundle.load(bundle)
        config = _stage_config(loaded, stages_config, scoring=scoring, tau_accept=tau_accept, lam=lam,
                               margin=margin, n_min=n_min, decision=decision, target_precision=target_precision)
        options = RunOptions(country=country, admin1_region=admin1, enable_geofence=geofence,
                             device=device, threads=threads, detector_batch=detector_batch,
                             classifier_batch=classifier_batch, decode_workers=workers, precision=precision,
                             agreement_floor=agreement_floor, engine=engine, draft=draft, stages=config)
        runner = Runner(loaded, options)
        providers = runner.open()
        reclassifier = None
        if reclassify:
            reclassifier = Reclassifier(loaded, config, centroids=centroids, country=country,
                                        admin1_region=admin1, enable_geofence=geofence, event_pooling=event_pooling)
    except (BundleError, BackendError, ValueError) as e:
        _fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink()  # left by a write that a power cut interrupted; the real file is intact
    _log_to(out)
    try:
        store = _open_store(out, loaded, dump)
        runner.resume(store.degraded_counts(), store.coarse_sides(MAX_SIDES))
        store.set_meta("pass2", json.dumps({"country": country, "admin1": admin1, "geofence": geofence,
                                            "centroids": centroids, "burst_gap": burst_gap,
                                            "event_pooling": event_pooling, "stages": config.to_dict()}))
        if timezone is not None or lat is not None or lon is not None:
            if None in (timezone, lat, lon):
                raise ValueError("Camtrap DP needs all of --timezone, --lat and --lon")
            values = {"timezone": timezone, "latitude": lat, "longitude": lon,
                      "deployment_id": deployment_id or Path(dump).resolve().name}
            Deployment.from_dict(values)
            store.set_meta("deployment", json.dumps(values))
    except ValueError as e:
        _fail(str(e))
    if not quiet:
        for name, used in providers.items():
            console.print(f"{name}: {', '.join(used)}", highlight=False)
    records = list(scan(dump))
    diff = store.diff(records)
    done = len(records) - len(diff.todo)
    if not quiet and (done or diff.vanished):
        console.print(f"Continuing in {out}: {done} of {len(records)} images already done, "
                      f"{len(diff.changed)} changed, {len(diff.vanished)} vanished", highlight=False)
    for key in diff.vanished:
        logger.warning("%s: vanished from the dump since the last run; its results are kept", key)
    started = time.perf_counter()
    results = []
    progress = Progress(TextColumn("[bold]images"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                        console=console, disable=quiet)
    try:
        with progress:
            task = progress.add_task("run", total=len(diff.todo), rate="")
            for result in runner.process(diff.todo, dump):
                with runner.timer.stage("store"):
                    store.put(result)
                result.features.clear()
                results.append(result)
                elapsed = time.perf_counter() - started
                progress.update(task, advance=1, rate=f"{len(results) / elapsed:.2f} img/s")
        predictions, images = _finish(store, dump, out, loaded, reclassifier, runner.timer, burst_gap)
    except (OSError, sqlite3.Error) as e:
        store.close()
        _fail(f"{out}: cannot write results ({e}); what was committed is kept: free space or fix the "
              f"folder and run the same command again to resume")
    if not quiet:
        _summary(predictions, images, results, runner, time.perf_counter() - started, out, reclassifier)
    store.close()


def _timing_table(stages: dict, title: str) -> Table:
    """Per-stage count, mean, p50, p95 and total milliseconds as a rich table."""
    table = Table("stage", "count", "mean ms", "p50 ms", "p95 ms", "total ms", title=title)
    for stage, s in stages.items():
        table.add_row(stage, str(s["count"]), f"{s['mean_ms']:.1f}", f"{s['p50_ms']:.1f}", f"{s['p95_ms']:.1f}",
                      f"{s['total_ms']:.0f}")
    return table


def _log_to(out: Path) -> None:
    handler = logging.FileHandler(out / "trapedge.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("trapedge").addHandler(handler)
    logging.getLogger("trapedge").setLevel(logging.INFO)


def _open_store(out: Path, bundle: Bundle, dump: Path) -> Store:
    store = Store(out / STORE_NAME)
    fingerprint = sha256_file(bundle.root / "manifest.json")
    previous = store.get_meta("bundle_manifest_sha256")
    if previous is not None and previous != fingerprint and store.count():
        store.close()
        raise ValueError(f"{out}: holds results from another bundle; use a new --out folder")
    store.set_meta("bundle_manifest_sha256", fingerprint)
    store.set_meta("dump_root", str(Path(dump).resolve()))
    return store


def _finish(store: Store, dump: Path, out: Path, bundle: Bundle, reclassifier: Optional[Reclassifier],
            timer, burst_gap: float = DEFAULT_GAP_S) -> tuple[list[dict], list[dict]]:
    """Pass 2 over everything in the store, then every output written from the store."""
    predictions = store.predictions(dump)
    images = store.images(dump)
    if reclassifier is not None:
        undated = [i["key"] for i in images if not i.get("captured") and i["status"] != "failed"]
        if undated:
            logger.warning("%d image(s) have no EXIF capture time (first: %s); their file modification time is "
                           "used to group bursts", len(undated), undated[0])
        events = group_events(images, burst_gap)
        reclassifier.events = {image["filepath"]: events[image["key"]] for image in images}
        paths, dets, vectors = store.embeddings(dump)
        reclassifier.run(predictions, EmbeddingTable(paths, dets, vectors), store.evidence(dump),
                         store.degraded(dump))
        for note in reclassifier.result.notes:
            logger.warning("%s", note)
        for name, samples in reclassifier.timer.samples.items():
            for value in samples:
                timer.add(name, value)
        with timer.stage("store"):
            store.save_predictions(predictions, dump)
    with timer.stage("write"):
        _write_outputs(store, dump, out, predictions, _info(bundle, reclassifier), FORMATS, images)
    return predictions, images


FORMATS = ("speciesnet", "megadetector", "camtrap-dp", "csv")


def _deployment(store: Store, dump: Path) -> Optional[Deployment]:
    """The Camtrap DP deployment recorded for this run, if --timezone, --lat and --lon were given."""
    recorded = store.get_meta("deployment")
    if not recorded:
        return None
    values = json.loads(recorded)
    values.setdefault("deployment_id", Path(dump).name or "deployment")
    return Deployment.from_dict(values)


def _write_outputs(store: Store, dump: Path, out: Path, predictions: list[dict], info: dict,
                   formats: tuple[str, ...], images: Optional[list[dict]] = None) -> list[Path]:
    """Writes the requested formats from the store, each atomically; returns what was written."""
    images = images if images is not None else store.images(dump)
    infos = {i["filepath"]: ImageInfo(**i) for i in images}
    written = []
    if "speciesnet" in formats:
        write_predictions_json(out / "predictions.json", predictions, info)
        write_images_csv(out / "images.csv", images)
        written += [out / "predictions.json", out / "images.csv"]
    if "megadetector" in formats:
        write_megadetector_json(out / "megadetector.json", predictions, infos, info=info)
        written.append(out / "megadetector.json")
    if "csv" in formats:
        write_flat_csv(out / "results.csv", predictions, infos)
        written.append(out / "results.csv")
    if "camtrap-dp" in formats:
        deployment = _deployment(store, dump)
        if deployment is None:
            if formats == ("camtrap-dp",):
                raise ValueError(f"{out}: Camtrap DP needs the deployment's --timezone, --lat and --lon")
        else:
            (out / "camtrap-dp").mkdir(exist_ok=True)
            write_camtrap_dp(out / "camtrap-dp", predictions, infos, deployment, info=info)
            written.append(out / "camtrap-dp")
    return written


def _summary(predictions: list, images: list, results: list, runner: Runner, seconds: float, out: Path,
             reclassifier: Optional[Reclassifier]) -> None:
    detections = [d for p in predictions for d in p.get("detections", [])]
    labels = Counter((d.get("reclassification") or d["processed_classification"])["class"].split(";")[-1]
                     for d in detections if "processed_classification" in d)
    failed = [i for i in images if i["status"] == "failed"]
    console.print(f"{len(results)} images processed in {seconds:.1f} s "
                  f"({len(results) / max(seconds, 1e-9):.2f} img/s); {len(images)} in the results, "
                  f"{len(detections)} detections, {len(failed)} failed; wrote {out / 'predictions.json'}",
                  highlight=False)
    reasons = Counter(i["reason"].split(":")[0] for i in failed)
    for reason, count in reasons.most_common():
        console.print(f"  failed ({count}): {reason}", highlight=False)
    if labels:
        table = Table("label", "detections", title="Labels (after re-classification)")
        for label, count in labels.most_common(15):
            table.add_row(label, str(count))
        console.print(table)
    if reclassifier is not None:
        _print_pass_two(reclassifier)
    console.print(_timing_table(runner.timer.summary(), "Per-stage time"))


def _print_pass_two(reclassifier: Reclassifier) -> None:
    """Counts per stage, each calibrated level's bound (or why it is off), and the notes."""
    console.print(f"re-classification: {reclassifier.summary}", highlight=False)
    result = reclassifier.result
    if result is None:
        return
    for level, cal in result.calibration.get("levels", {}).items():
        if cal.get("enabled"):
            console.print(f"  {level}: on, precision >= {cal['lower_bound']:.3f} (95% bound) on {cal['accepted']} "
                          f"held-out views, threshold {cal['threshold']:.3f}", highlight=False)
        else:
            console.print(f"  {level}: off, {cal['reason']}", highlight=False)
    for note in result.notes:
        console.print(f"  note: {note}", highlight=False)


def _stage_config(bundle: Bundle, path: Optional[Path], **overrides) -> StageConfig:
    """Stage settings: the bundle's defaults, then a JSON file, then CLI flags."""
    values = dict(bundle.manifest.get("stages", {}))
    if path is not None:
        values.update(_read_json(path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return StageConfig.from_dict(values)


def _info(bundle: Bundle, reclassifier: Optional[Reclassifier]) -> dict:
    info = {"trapedge": {"version": __version__, "bundle_model_version": bundle.model_version}}
    info["trapedge"]["bundle_data_version"] = bundle.data_version
    if reclassifier is not None:
        result = reclassifier.result
        info["trapedge"]["reclassification"] = {"stages": reclassifier.config.to_dict(),
                                                "centroids": reclassifier.centroid_source,
                                                "event_pooling": reclassifier.event_pooling,
                                                "counts": reclassifier.summary,
                                                "calibration": _calibration_info(result.calibration) if result else {},
                                                "notes": result.notes if result else []}
    return info


def _calibration_info(calibration: dict) -> dict:
    """The calibration report without the fitted weights (levels, rows, target)."""
    return {k: v for k, v in calibration.items() if k != "features"}


@app.command("reclassify")
def reclassify_cmd(
    outdir: Path = typer.Argument(..., exists=True, file_okay=False, help="Output folder of a finished run."),
    bundle: Path = typer.Option(..., "--bundle", "-b", help="Artifact bundle folder."),
    country: Optional[str] = typer.Option(None, help="ISO 3166-1 alpha-3 country for the geofence "
                                                     "(default: the run's)."),
    admin1: Optional[str] = typer.Option(None, help="ISO 3166-2 admin1 region (default: the run's)."),
    geofence: Optional[bool] = typer.Option(None, help="Apply SpeciesNet's geofence (default: as the run did)."),
    centroids: Optional[str] = typer.Option(None, help=f"Centroid source: {', '.join(CENTROID_SOURCES)} "
                                                       "(default: the run's)."),
    decision: Optional[str] = typer.Option(None, help=f"How coarse labels are refined: {', '.join(DECISIONS)} "
                                                      "(default: the run's)."),
    scoring: Optional[str] = typer.Option(None, help=f"Stage-5 scoring for --decision adaptive: {', '.join(SCORING)}."),
    target_precision: Optional[float] = typer.Option(None, min=0.5, max=0.999,
                                                     help="Precision each calibrated level must reach as a 95% "
                                                          "lower bound (default: the run's)."),
    burst_gap: Optional[float] = typer.Option(None, min=0.0, help="Seconds between photos of one event "
                                                                  "(default: the run's)."),
    event_pooling: Optional[bool] = typer.Option(None, help="--decision adaptive scores an event's crops together "
                                                            "(default: the run's)."),
    stages_config: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                                 help="JSON file of stage settings (see StageConfig)."),
) -> None:
    """Re-run pass 2 on a finished run's stored predictions, embeddings and degraded views (nothing recomputed).

    Every setting defaults to what the run used (recorded in its results store); flags override.
    """
    country, admin1 = _check_location(country, admin1)
    try:
        if not (outdir / STORE_NAME).is_file():
            raise ValueError(f"{outdir}: no {STORE_NAME}; run `trapedge run` first")
        store = Store(outdir / STORE_NAME)
        used = json.loads(store.get_meta("pass2") or "{}")
        loaded = Bundle.load(bundle)
        values = dict(used.get("stages", {}))
        if stages_config is not None:
            values.update(_read_json(stages_config))
        overrides = {"scoring": scoring, "decision": decision, "target_precision": target_precision}
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = StageConfig.from_dict(values) if values else _stage_config(loaded, None)
        reclassifier = Reclassifier(
            loaded, config, centroids=_pick(centroids, used.get("centroids"), "dump"),
            country=country or used.get("country"), admin1_region=admin1 or used.get("admin1"),
            enable_geofence=_pick(geofence, used.get("geofence"), True),
            event_pooling=_pick(event_pooling, used.get("event_pooling"), False))
    except (BundleError, BackendError, ValueError, OSError) as e:
        _fail(str(e))
    dump = Path(store.get_meta("dump_root") or outdir)
    _finish(store, dump, outdir, loaded, reclassifier, StageTimer(), _pick(burst_gap, used.get("burst_gap"),
                                                                        DEFAULT_GAP_S))
    store.close()
    _print_pass_two(reclassifier)


def _pick(flag, recorded, default):
    """A flag when given, else what the run recorded, else the default."""
    return flag if flag is not None else (recorded if recorded is not None else default)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


@app.command("export-results")
def export_results_cmd(
    outdir: Path = typer.Argument(..., exists=True, file_okay=False, help="Output folder of a run."),
    format: list[str] = typer.Option(list(FORMATS), "--format", "-f", help=f"Any of {', '.join(FORMATS)}."),
    timezone: Optional[str] = typer.Option(None, help="Camera clock's IANA timezone or UTC offset, e.g. "
                                                      "Africa/Windhoek or +02:00 (Camtrap DP; remembered)."),
    lat: Optional[float] = typer.Option(None, help="Deployment latitude (Camtrap DP; remembered)."),
    lon: Optional[float] = typer.Option(None, help="Deployment longitude (Camtrap DP; remembered)."),
    deployment_id: Optional[str] = typer.Option(None, help="Deployment id (Camtrap DP); default: the recorded "
                                                           "one, else the dump's folder name."),
) -> None:
    """Re-write result files from the results store (SpeciesNet JSON, MegaDetector JSON, Camtrap DP, CSV).

    A deployment given here (all of --timezone, --lat and --lon, or any of them to amend the recorded one) is
    stored with the run, so a run made without it needs no rerun.
    """
    unknown = set(format) - set(FORMATS)
    if unknown:
        _fail(f"unknown format(s) {', '.join(sorted(unknown))}; expected {', '.join(FORMATS)}")
    if not (outdir / STORE_NAME).is_file():
        _fail(f"{outdir}: no {STORE_NAME}; run `trapedge run` first")
    store = Store(outdir / STORE_NAME)
    dump = Path(store.get_meta("dump_root") or outdir)
    given = {"timezone": timezone, "latitude": lat, "longitude": lon, "deployment_id": deployment_id}
    if any(v is not None for v in given.values()):
        values = {**json.loads(store.get_meta("deployment") or "{}"),
                  **{k: v for k, v in given.items() if v is not None}}
        values.setdefault("deployment_id", dump.name or "deployment")
        missing = [flag for flag, key in (("--timezone", "timezone"), ("--lat", "latitude"), ("--lon", "longitude"))
                   if values.get(key) is None]
        try:
            if missing:
                raise ValueError(f"Camtrap DP needs {', '.join(missing)} (none recorded for {outdir})")
            Deployment.from_dict(values)
        except ValueError as e:
            store.close()
            _fail(str(e))
        store.set_meta("deployment", json.dumps(values))
    try:
        info = json.loads((outdir / "predictions.json").read_text(encoding="utf-8")).get("info", {})
    except (OSError, json.JSONDecodeError):
        info = {}
    info.pop("format_version", None)
    try:
        written = _write_outputs(store, dump, outdir, store.predictions(dump), info, tuple(format))
    except (OSError, ValueError) as e:
        _fail(str(e))
    finally:
        store.close()
    for path in written:
        console.print(f"wrote {path}", highlight=False)


@app.command("evaluate")
def evaluate_cmd(
    outdir: Path = typer.Argument(..., exists=True, file_okay=False, help="Output folder of a finished run."),
    truth: Path = typer.Option(..., exists=True, dir_okay=False, help="CSV: filepath, detection, label."),
) -> None:
    """Score a run's re-classifications against ground truth (the paper's metrics); writes JSON and Markdown."""
    from .reclassify.evaluate import evaluate, load_truth, write_report

    try:
        document = json.loads((outdir / "predictions.json").read_text(encoding="utf-8"))
        result = evaluate(document["predictions"], load_truth(truth))
    except (ValueError, OSError, KeyError) as e:
        _fail(str(e))
    print(write_report(result, outdir).read_text())


@app.command("fit")
def fit_cmd(
    bundle: Path = typer.Argument(..., help="Artifact bundle folder to add the head and centroids to."),
    run: Optional[Path] = typer.Option(None, "--run", exists=True, file_okay=False,
                                       help="A finished run: its confident (stage 1) detections are the references."),
    references: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                              help="CSV of labelled crops: filepath,label[,xmin,ymin,width,height]."),
    mining: str = typer.Option("batch_hard", help="batch_hard or semi_hard."),
    epochs: int = typer.Option(40, min=1),
    out_dim: int = typer.Option(256, min=2),
    margin: float = typer.Option(0.2, min=0.0),
    seed: int = typer.Option(0),
) -> None:
    """Train the triplet head (stage 4) and write head.onnx and centroids.npz into the bundle (export extra)."""
    try:
        from trapedge.export.fit import HeadConfig, ReferenceSet, fit, references_from_csv
    except ImportError as e:
        _fail(f"fit needs the export extra (pip install 'trapedge[export]'): {e}")
    if (run is None) == (references is None):
        _fail("give exactly one of --run OUTDIR or --references CSV")
    try:
        loaded = Bundle.load(bundle)
        config = _stage_config(loaded, None)
        if references is not None:
            from .reclassify.embed import crop_embedder

            refs = references_from_csv(references, crop_embedder(loaded))
        else:
            refs = ReferenceSet(*_run_references(run, config))
        manifest = fit(bundle, refs, head=HeadConfig(mining=mining, epochs=epochs, out_dim=out_dim, margin=margin,
                                                     seed=seed), stages=config, log=console.print)
    except (BundleError, BackendError, ValueError, OSError) as e:
        _fail(str(e))
    console.print(f"head: {manifest['models']['head']['file']}, centroids: {manifest['files']['centroids']}",
                  highlight=False)


def _run_references(outdir: Path, config: StageConfig) -> tuple:
    """Stage-1 references (embeddings, labels) of a finished run."""
    import numpy as np

    from .reclassify.stages import accept

    store = Store(outdir / STORE_NAME)
    dump = Path(store.get_meta("dump_root") or outdir)
    paths, dets, vectors = store.embeddings(dump)
    rows = {(p, int(d)): i for i, (p, d) in enumerate(zip(paths, dets))}
    picked, labels = [], []
    for pred in store.predictions(dump):
        for idx, det in enumerate(pred.get("detections") or []):
            processed = det.get("processed_classification")
            if processed and (pred["filepath"], idx) in rows and accept(
                    [processed["class"]], np.array([processed["score"]]), [processed["source"]], config)[0]:
                picked.append(rows[(pred["filepath"], idx)])
                labels.append(processed["class"])
    store.close()
    if not picked:
        raise ValueError(f"{outdir}: no confident species-level detections to learn from")
    return vectors[picked], labels


@app.command("bench")
def bench_cmd(
    dump: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder of photos to run on."),
    bundle: Path = typer.Option(..., "--bundle", "-b", help="Artifact bundle folder."),
    device: str = typer.Option("auto", help=f"One of {', '.join(DEVICES)}."),
    batch: int = typer.Option(1, min=1, help="Images per detector call."),
    classifier_batch: int = typer.Option(8, min=1),
    images: Optional[int] = typer.Option(None, min=1, help="Only the first K images."),
    threads: Optional[int] = typer.Option(None, min=1),
    workers: int = typer.Option(2, min=1, help="Decode worker threads (1 = no overlap)."),
    out: Path = typer.Option(Path("bench-results"), help="Folder for bench.json and bench.md."),
    stages_config: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                                 help="JSON file of stage settings (see StageConfig)."),
) -> None:
    """Run the real pipeline and report time per stage, throughput, peak memory, providers and the machine."""
    from .bench import machine, peak_rss_mib, report_markdown
    from .outputs.formats import atomic_write_text

    try:
        loaded = Bundle.load(bundle)
        config = _stage_config(loaded, stages_config)
        runner = Runner(loaded, RunOptions(device=device, threads=threads, detector_batch=batch,
                                           classifier_batch=classifier_batch, decode_workers=workers, stages=config))
        providers = runner.open()
        reclassifier = Reclassifier(loaded, config)
    except (BundleError, BackendError, ValueError) as e:
        _fail(str(e))
    records = list(scan(dump))[:images]
    started = time.perf_counter()
    results = list(runner.process(records, dump))
    predictions = [r.prediction for r in results]
    reclassifier.run(predictions, *tables_from_results(results))
    wall = time.perf_counter() - started
    for name, samples in reclassifier.timer.samples.items():
        for value in samples:
            runner.timer.add(name, value)
    stages = runner.timer.summary()
    overlapped = {"decode", "letterbox", "load_models"}  # decode runs in worker threads, overlapping the rest
    timed = sum(s["total_ms"] for k, s in stages.items() if k not in overlapped) / 1000.0
    result = {"images": len(records), "wall_s": wall, "images_per_s": len(records) / max(wall, 1e-9),
              "stages": stages, "timed_share": timed / max(wall, 1e-9), "peak_rss_mib": peak_rss_mib(),
              "providers": providers, "device": device, "detector_batch": batch, "machine": machine()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2) + "\n")
    markdown = report_markdown(result)
    atomic_write_text(out / "bench.md", markdown)
    console.print(_timing_table(stages, f"{result['images_per_s']:.3f} images/s, peak RSS "
                                        f"{result['peak_rss_mib']:.0f} MiB"))
    console.print(f"providers: {providers}; wrote {out / 'bench.json'} and {out / 'bench.md'}", highlight=False)


@app.command("quantize")
def quantize_cmd(
    bundle: Path = typer.Argument(..., help="Bundle whose models to quantise."),
    model: str = typer.Option("all", help="classifier, detector, or all (each of the two the bundle has)."),
    precision: str = typer.Option("fp16", help="fp16, or int8 (static QDQ: int8 per-channel weights, "
                                               "activations calibrated on photos)."),
    images: Optional[Path] = typer.Option(None, exists=True, file_okay=False,
                                          help="More photos, added to the packaged samples; half calibrate int8, "
                                               "the other half measure agreement."),
    floor: float = typer.Option(0.99, min=0.0, max=1.0,
                                help="Agreement the quantised model must keep: classifier top-1 and mean "
                                     "feature cosine, detector share of fp32 boxes found."),
    method: Optional[str] = typer.Option(None, help="int8 calibration: minmax, entropy or percentile (default: "
                                                    "the one chosen by measurement, benchmarks/results/int8.md)."),
    activations: str = typer.Option("int8", help="int8 activations: int8 (symmetric; TensorRT and onnxruntime) or "
                                                 "uint8 (asymmetric; faster on onnxruntime x86 CPUs, not TensorRT)."),
    max_photos: int = typer.Option(64, min=2, help="Most distinct photos used (calibration and held-out)."),
) -> None:
    """Add fp16 or int8 variants of the models, with their agreement against fp32 measured on held-out photos."""
    try:
        from trapedge.export.quantize import DEFAULT_METHOD, MODELS, quantize_bundle
    except ImportError as e:
        _fail(f"quantize needs the export extra (pip install 'trapedge[export]'): {e}")
    if model not in (*MODELS, "all"):
        _fail(f"unknown model {model!r}; expected {', '.join(MODELS)} or all")
    try:
        entries = quantize_bundle(bundle, precision, models=None if model == "all" else [model],
                                  images=[images] if images else [], floor=floor, method=method or DEFAULT_METHOD,
                                  activations=activations, max_photos=max_photos, log=console.print)
    except (ValueError, RuntimeError, BundleError) as e:
        _fail(str(e))
    for name, entry in entries.items():
        gated = {k: entry["agreement"].get(k) for k in entry.get("agreement_floor") or {}}
        console.print(f"{name}_{precision}: {gated} (floor {floor})", highlight=False)


engines_app = typer.Typer(help="TensorRT engines for this GPU (needs TensorRT and a CUDA GPU).", no_args_is_help=True)
app.add_typer(engines_app, name="engines")


@engines_app.command("build")
def engines_build_cmd(
    bundle: Path = typer.Argument(..., help="Bundle whose ONNX models to build engines for."),
    model: list[str] = typer.Option(["detector", "classifier"], help="Models to build."),
    fp32: bool = typer.Option(False, help="Build fp32 engines instead of fp16."),
    batch: Optional[int] = typer.Option(None, min=1, help="Optimal batch for the profiles."),
) -> None:
    """Build fp16 engines on this GPU, cached beside the bundle, keyed by GPU, TensorRT and ONNX hash."""
    from .models.engines import ensure_engine

    try:
        loaded = Bundle.load(bundle)
        for name in model:
            path = ensure_engine(loaded, name, fp16=not fp32, batch=batch, log=console.print)
            console.print(f"{name}: {path}", highlight=False)
    except (BundleError, BackendError, ValueError) as e:
        _fail(str(e))


@app.command("check-bundle")
def check_bundle(bundle: Path = typer.Argument(..., help="Artifact bundle folder.")) -> None:
    """Validate a bundle (manifest, hashes, label count) and print what it holds."""
    try:
        loaded = Bundle.load(bundle)
    except BundleError as e:
        _fail(str(e))
    console.print(f"{bundle}: OK, {len(loaded.labels)} labels, models: "
                  f"{', '.join(loaded.manifest['models'])}, SpeciesNet {loaded.model_version}", highlight=False)


@export_app.command("speciesnet")
def export_speciesnet(
    source: str = typer.Argument("kaggle:google/speciesnet/pyTorch/v4.0.3a/1",
                                 help="Kaggle id (kaggle:...), Hugging Face id (hf:...) or a local model folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write."),
    opset: int = typer.Option(17, help="ONNX opset (17 keeps TensorRT 8.6/10.3 and older onnxruntime happy)."),
    parity_images: Optional[Path] = typer.Option(None, help="Folder of photos to measure parity on (default: generated)."),
) -> None:
    """Export a SpeciesNet model (classifier and MegaDetector) to an ONNX bundle, with parity measured."""
    try:
        from trapedge.export.speciesnet import export_speciesnet as _export
    except ImportError as e:
        _fail(f"export needs the export extra (pip install 'trapedge[export]'): {e}")
    try:
        manifest = _export(source, out, opset=opset, parity_images=parity_images, log=console.print)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        _fail(str(e))
    for name, model in manifest["models"].items():
        console.print(f"{name}: {model['file']} parity {model.get('parity')}", highlight=False)


@export_app.command("encoder")
def export_encoder_cmd(
    bundle: Path = typer.Argument(..., help="Bundle to add the encoder (and bird-prompt embeddings) to."),
    backbone: str = typer.Option("open_clip", help="open_clip, or speciesnet (the classifier's pooled features)."),
    model: str = typer.Option("ViT-L-14", help="open_clip model name."),
    pretrained: Optional[str] = typer.Option("openai", help="open_clip pretrained tag or a checkpoint file."),
    parity_images: Optional[Path] = typer.Option(None, help="Folder of photos to measure parity on."),
    opset: int = typer.Option(17),
) -> None:
    """Export the re-classification image encoder (CLIP vision tower by default) into a bundle."""
    try:
        from trapedge.export.encoders import export_encoder
    except ImportError as e:
        _fail(f"export needs the export extra (pip install 'trapedge[export]'): {e}")
    try:
        manifest = export_encoder(bundle, model=model, pretrained=pretrained, backbone=backbone,
                                  parity_images=parity_images, opset=opset, log=console.print)
    except (ValueError, RuntimeError, FileNotFoundError, BundleError) as e:
        _fail(str(e))
    console.print(f"embedding: {manifest['embedding']}", highlight=False)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("trapedge-demo"), help="Folder for the demo bundle, card and results."),
) -> None:
    """Build an untrained demo bundle locally and run the full pipeline on the packaged sample photos."""
    from .demo import build_demo_bundle, copy_samples

    console.print("Building the demo bundle: UNTRAINED demo models (a saliency heuristic and a random "
                  "classifier) so the pipeline can run with no downloads; their labels mean nothing.",
                  highlight=False)
    try:
        bundle = build_demo_bundle(out / "bundle")
    except RuntimeError as e:
        _fail(str(e))
    card = copy_samples(out / "card")
    run(dump=card, bundle=bundle, out=out / "results", country=None, admin1=None, geofence=True, device="auto",
        threads=None, detector_batch=1, classifier_batch=8, workers=2, precision="fp32", agreement_floor=None,
        engine="onnx", draft=False, quiet=False, reclassify=True,
        centroids="dump", scoring=None, target_precision=None, stages_config=None, tau_accept=None, lam=None,
        margin=None, n_min=None, burst_gap=DEFAULT_GAP_S, decision=None, event_pooling=False,
        timezone="UTC", lat=0.0, lon=0.0, deployment_id="trapedge-demo")
    console.print(
        "For real results, export SpeciesNet's weights on a workstation with the export extra:\n"
        "  trapedge export speciesnet kaggle:google/speciesnet/pyTorch/v4.0.3a/1 --out artifacts/speciesnet\n"
        "  trapedge export encoder artifacts/speciesnet --model ViT-L-14 --pretrained openai\n"
        "then: trapedge run /media/SDCARD --bundle artifacts/speciesnet --out results --country ISO3",
        highlight=False, markup=False)


bundle_app = typer.Typer(help="Update a bundle's geofence and taxonomy without re-exporting, or roll back.",
                         no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


def _refuse(message: str) -> None:
    console.print(f"Error: {' '.join(message.split())}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@bundle_app.command("update")
def bundle_update_cmd(
    bundle: Path = typer.Argument(..., help="Artifact bundle folder."),
    geofence: Optional[Path] = typer.Option(None, help="New SpeciesNet geofence JSON."),
    taxonomy: Optional[Path] = typer.Option(None, help="New SpeciesNet taxonomy release (7-field lines)."),
) -> None:
    """Validate and install a new geofence and/or taxonomy; the previous data is kept for rollback."""
    from .models.bundle_update import apply_update

    try:
        version = apply_update(bundle, geofence=geofence, taxonomy=taxonomy)
    except (BundleError, OSError) as e:
        _refuse(str(e))
    console.print(f"{bundle}: data version {version}", highlight=False, soft_wrap=True)


@bundle_app.command("rollback")
def bundle_rollback_cmd(bundle: Path = typer.Argument(..., help="Artifact bundle folder.")) -> None:
    """Restore the previous geofence and taxonomy (and manifest) from the bundle's .history."""
    from .models.bundle_update import rollback

    try:
        version = rollback(bundle)
    except (BundleError, OSError) as e:
        _refuse(str(e))
    console.print(f"{bundle}: rolled back to data version {version}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
