"""The library face: open a bundle once, run cards, re-run pass 2, write outputs; the CLI, demo and tests call this."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from . import __version__
from .card.bursts import DEFAULT_GAP_S, group_events
from .card.ingest import ImageRecord, scan
from .models.bundle import Bundle, sha256_file
from .outputs import (
    Deployment, ImageInfo, write_camtrap_dp, write_flat_csv, write_images_csv, write_megadetector_json,
    write_predictions_json,
)
from .outputs.images import check_privacy, export_images
from .outputs.report import REPORT_NAME, stricter, write_report
from .outputs.store import STORE_NAME, Store
from .outputs.video import aggregate_videos
from .pipeline import MAX_SIDES, RunOptions, Runner
from .reclassify import EmbeddingTable
from .reclassify.runner import Reclassifier
from .reclassify.stages import StageConfig, accept
from .speciesnet.ensemble import DEFAULT_DETECTION_THRESHOLD_FOR_CLASSIFICATION, load_geofence
from .speciesnet.ensemble.geofence import check_location
from .timing import StageTimer

__all__ = ["FORMATS", "RunReport", "Station", "open_bundle", "output_formats", "rerun_pass_two", "run_references",
           "write_outputs"]

logger = logging.getLogger("trapedge")

FORMATS = ("speciesnet", "megadetector", "camtrap-dp", "csv", "report")
LOG_NAME = "trapedge.log"


def output_formats(report: bool = True) -> tuple[str, ...]:
    """Every output format, without the report when it is turned off."""
    return FORMATS if report else tuple(f for f in FORMATS if f != "report")

Progress = Callable[[int, int], None]
Log = Callable[[str], None]


def open_bundle(path: Union[str, Path]) -> Bundle:
    """Loads and validates an artifact bundle (manifest, hashes, labels); refuses a bad one with the reason."""
    return Bundle.load(Path(path))


@dataclass
class RunReport:
    """What one call did to an output folder: counts, labels, pass-2 changes, time per stage, files written."""

    out: Path
    images: int
    processed: int
    detections: int
    failed: list[tuple[str, str]]
    labels: dict[str, int]
    seconds: float
    timing: dict[str, dict[str, float]]
    providers: dict[str, list[str]] = field(default_factory=dict)
    pass_two: Optional[dict] = None
    written: list[Path] = field(default_factory=list)
    models: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON-ready form."""
        values = asdict(self)
        values["out"] = str(self.out)
        values["written"] = [str(p) for p in self.written]
        return values


class Station:
    """A loaded bundle and the settings of one camera station; `run(card, out)` processes a card.

    Sessions open lazily on the first card. `device` is auto, cpu, cuda or tensorrt; `precision` fp32, fp16 or
    int8 (a quantised variant from `trapedge quantize`, refused below its agreement floor).
    """

    def __init__(self, bundle: Union[str, Path, Bundle], *, device: str = "auto", precision: str = "fp32",
                 threads: Optional[int] = None, agreement_floor: Optional[float] = None, detector_batch: int = 1,
                 classifier_batch: int = 8, decode_workers: int = 2, draft: bool = False,
                 country: Optional[str] = None, admin1: Optional[str] = None, geofence: bool = True,
                 stages: Union[StageConfig, dict, None] = None, centroids: str = "dump", event_pooling: bool = False,
                 burst_gap: float = DEFAULT_GAP_S, video_every: float = 1.0,
                 video_every_frames: Optional[int] = None, privacy: str = "blur",
                 detection_threshold_for_classification: float = DEFAULT_DETECTION_THRESHOLD_FOR_CLASSIFICATION,
                 max_classifications_per_image: Optional[int] = None) -> None:
        if not 0.0 <= detection_threshold_for_classification <= 1.0:
            raise ValueError("detection_threshold_for_classification must be in [0, 1]; got "
                             f"{detection_threshold_for_classification}")
        if max_classifications_per_image is not None and max_classifications_per_image < 1:
            raise ValueError("max_classifications_per_image must be at least 1 (None: no cap); got "
                             f"{max_classifications_per_image}")
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        if geofence:
            country, admin1 = check_location(country, admin1, load_geofence(self.bundle.file("geofence")))
        elif country is not None:
            country, admin1 = country.upper(), admin1.upper() if admin1 else None
        self.country, self.admin1, self.geofence = country, admin1, geofence
        self.config = stages if isinstance(stages, StageConfig) else stage_config(self.bundle, stages or {})
        self.options = RunOptions(country=country, admin1_region=admin1, enable_geofence=geofence, device=device,
                                  threads=threads, detector_batch=detector_batch, classifier_batch=classifier_batch,
                                  decode_workers=decode_workers, precision=precision,
                                  agreement_floor=agreement_floor, draft=draft, stages=self.config,
                                  detection_threshold_for_classification=detection_threshold_for_classification,
                                  max_classifications_per_image=max_classifications_per_image)
        self.centroids, self.event_pooling, self.burst_gap = centroids, event_pooling, burst_gap
        self.video_every, self.video_every_frames = video_every, video_every_frames
        self.privacy = check_privacy(privacy)
        self.reclassifier()  # refuses bad pass-2 settings now, not after pass 1
        self._runner: Optional[Runner] = None
        self._providers: dict[str, list[str]] = {}

    @property
    def settings(self) -> dict:
        """The pass-2 settings a run records, so `reclassify` can reuse them."""
        return {"country": self.country, "admin1": self.admin1, "geofence": self.geofence,
                "centroids": self.centroids, "burst_gap": self.burst_gap, "event_pooling": self.event_pooling,
                "stages": self.config.to_dict()}

    def open(self) -> dict[str, list[str]]:
        """Opens the sessions (once) and returns the providers each model really runs on."""
        if self._runner is None:
            runner = Runner(self.bundle, self.options)
            self._providers = runner.open()
            self._runner = runner
        return self._providers

    def reclassifier(self) -> Reclassifier:
        """A fresh pass-2 runner with this station's settings."""
        return Reclassifier(self.bundle, self.config, centroids=self.centroids, country=self.country,
                            admin1_region=self.admin1, enable_geofence=self.geofence,
                            event_pooling=self.event_pooling, device=self.options.device,
                            precision=self.options.precision)

    def run(self, card: Union[str, Path], out: Union[str, Path], *,
            deployment: Union[Deployment, dict, None] = None, reclassify: bool = True,
            formats: tuple[str, ...] = FORMATS, limit: Optional[int] = None, progress: Optional[Progress] = None,
            log: Optional[Log] = None, export_crops: bool = False) -> RunReport:
        """Pass 1 over every new or changed photo (resuming what `out` holds), pass 2, every output, crops if asked."""
        card, out = Path(card), Path(out)
        _check_formats(formats)
        log = log or logger.info
        store, records = self._begin(card, out, deployment)
        log_to(out / LOG_NAME)
        try:
            for name, used in self.open().items():
                log(f"{name}: {', '.join(used)}")
            detector = self._runner.detector_config
            log(f"detector {detector.model}: letterbox {detector.image_size}, stride {detector.stride}, typical "
                f"confidence threshold {detector.typical_threshold}")
        except BaseException:
            store.close()
            raise
        started = time.perf_counter()
        try:
            records = records[:limit]
            diff = store.diff(records)
            done = len(records) - len(diff.todo)
            if done or diff.vanished:
                log(f"Continuing in {out}: {done} of {len(records)} images already done, {len(diff.changed)} "
                    f"changed, {len(diff.vanished)} vanished")
            for key in diff.vanished:
                logger.warning("%s: vanished from the card since the last run; its results are kept", key)
            timer = self._runner.timer
            processed = self.pass_one(card, diff.todo, store,
                                      resume=(store.degraded_counts(), store.coarse_sides(MAX_SIDES)),
                                      each=lambda done: progress(done, len(diff.todo)) if progress else None)
            reclassifier = self.reclassifier() if reclassify else None
            report = _finish(store, card, out, self.bundle, reclassifier, timer, self.burst_gap, formats,
                             processed, started, self._providers, self.privacy)
            report.models = {name: {"seconds": meter.seconds,
                                    "calls": [{"inputs": dict(shapes), "count": n} for shapes, n in meter.calls.items()]}
                             for name, meter in self._runner.meters().items()}
            if export_crops:
                report.written += export_images(out, card, store.predictions(card), self.privacy)
            return report
        except (OSError, sqlite3.Error) as e:
            raise OSError(f"{out}: cannot write results ({_reason(e)}); what was committed is kept: free space or "
                          "fix the folder and run the same command again to resume") from e
        finally:
            store.close()

    def prepare(self, card: Union[str, Path], out: Union[str, Path], *,
                deployment: Union[Deployment, dict, None] = None) -> tuple[list[ImageRecord], list[ImageRecord]]:
        """Readies `out` for a card as `run` does (store, settings, deployment); returns (all photos, photos to do).

        Batch runs call this, then `pass_one` per chunk into shards merged into the store, then `finish`.
        """
        store, records = self._begin(Path(card), Path(out), deployment)
        try:
            return records, store.diff(records).todo
        finally:
            store.close()

    def _begin(self, card: Path, out: Path, deployment: Union[Deployment, dict, None]) -> tuple[Store, list]:
        """Checks the card, readies `out` (log, stale temp files), opens its store, records this run's settings,
        and scans the card; the caller closes the store."""
        if not card.is_dir():
            raise ValueError(f"{card}: not a folder; give the card's folder (a copy of the SD card or its mount)")
        if not os.access(card, os.R_OK | os.X_OK):
            raise ValueError(f"{card}: not readable (permission denied)")
        deployment = _deployment_values(deployment, card)
        _clear_out(out)
        store = _open_store(out, self.bundle, card)
        try:
            self._check_pass_one(store, out)
            store.set_meta("pass2", json.dumps(self.settings))
            store.set_meta("bundle_root", str(self.bundle.root.resolve()))
            store.set_meta("privacy", self.privacy)
            if deployment is not None:
                store.set_meta("deployment", json.dumps(deployment))
            return store, list(scan(card, video_every=self.video_every, video_every_frames=self.video_every_frames))
        except BaseException:
            store.close()
            raise

    def _check_pass_one(self, store: Store, out: Path) -> None:
        """Refuses to resume a card whose done photos chose their classified boxes differently; records ours."""
        ours = {"detection_threshold_for_classification": self.options.detection_threshold_for_classification,
                "max_classifications_per_image": self.options.max_classifications_per_image}
        done = store.count()
        recorded = json.loads(store.get_meta("pass1") or "null")
        if recorded is None and done:  # a store from before these settings were recorded used SpeciesNet's
            recorded = {"detection_threshold_for_classification": DEFAULT_DETECTION_THRESHOLD_FOR_CLASSIFICATION,
                        "max_classifications_per_image": None}
        if recorded is not None and recorded != ours and done:
            said = ", ".join(f"{k} {v if v is not None else 'no cap'}" for k, v in recorded.items())
            raise ValueError(f"{out}: {done} photos were classified with {said}; resume with the same "
                             "settings or give a new --out")
        store.set_meta("pass1", json.dumps(ours))

    def pass_one(self, card: Union[str, Path], records: list[ImageRecord], store: Store, *,
                 resume: tuple[dict[str, int], list[float]] = ({}, []),
                 each: Optional[Callable[[int], None]] = None) -> int:
        """Pass 1 over the given photos into the given store (a chunk's shard), from the card's sampler state."""
        self.open()
        self._runner.resume(*resume)
        done = 0
        for result in self._runner.process(records, Path(card)):
            with self._runner.timer.stage("store"):
                store.put(result)
            done += 1
            if each is not None:
                each(done)
        return done

    def finish(self, card: Union[str, Path], out: Union[str, Path], *, reclassify: bool = True,
               formats: tuple[str, ...] = FORMATS, export_crops: bool = False) -> RunReport:
        """Pass 2 and every output for a card whose store already holds all of pass 1 (as the end of `run`)."""
        card, out = Path(card), Path(out)
        if not (out / STORE_NAME).is_file():
            raise ValueError(f"{out}: no {STORE_NAME}; nothing of pass 1 to finish")
        store = Store(out / STORE_NAME)
        try:
            reclassifier = self.reclassifier() if reclassify else None
            report = _finish(store, card, out, self.bundle, reclassifier, StageTimer(), self.burst_gap, formats, 0,
                             time.perf_counter(), self._providers, self.privacy)
            if export_crops:
                report.written += export_images(out, card, store.predictions(card), self.privacy)
            return report
        except (OSError, sqlite3.Error) as e:
            raise OSError(f"{out}: cannot write results ({_reason(e)})") from e
        finally:
            store.close()


def stage_config(bundle: Bundle, overrides: dict) -> StageConfig:
    """Stage settings: the bundle's defaults, then the given values."""
    return StageConfig.from_dict({**bundle.manifest.get("stages", {}), **overrides})


def rerun_pass_two(out: Union[str, Path], bundle: Union[str, Path, Bundle, None] = None, **overrides) -> RunReport:
    """Re-runs pass 2 over a finished run's store (nothing recomputed), with the run's settings unless overridden.

    Overrides are Station's pass-2 keywords (country, admin1, geofence, centroids, event_pooling, burst_gap) and
    `stages`, a dict of StageConfig fields merged over the run's.
    """
    out = Path(out)
    store = _existing_store(out)
    try:
        used = json.loads(store.get_meta("pass2") or "{}")
        bundle = bundle if bundle is not None else store.get_meta("bundle_root")
        if bundle is None:
            raise ValueError(f"{out}: the run did not record its bundle; give --bundle")
        loaded = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        stages = {**used.get("stages", {}), **(overrides.pop("stages", None) or {})}
        settings = {k: used[k] for k in ("country", "admin1", "geofence", "centroids", "event_pooling", "burst_gap")
                    if used.get(k) is not None}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        station = Station(loaded, stages=stage_config(loaded, stages), device="cpu", **settings)
        card = Path(store.get_meta("dump_root") or out)
        formats = output_formats(report=(out / REPORT_NAME).exists())
        return _finish(store, card, out, loaded, station.reclassifier(), StageTimer(), station.burst_gap, formats,
                       0, time.perf_counter(), {}, _recorded_privacy(store))
    finally:
        store.close()


def write_outputs(out: Union[str, Path], formats: tuple[str, ...] = FORMATS,
                  deployment: Union[Deployment, dict, None] = None, *, export_crops: bool = False,
                  privacy: Optional[str] = None, fallback: Union[Deployment, dict, None] = None) -> list[Path]:
    """Re-writes result files from a run's store; a deployment given here (or amending the recorded one) is kept,
    `fallback` (a station's default) only when the run recorded none; with `export_crops`, the crops and
    thumbnails too; people in exported images handled by `privacy` (default: as the run did, else blur)."""
    out = Path(out)
    _check_formats(formats)
    if privacy is not None:
        check_privacy(privacy)
    store = _existing_store(out)
    try:
        recorded = _recorded_privacy(store)
        if privacy is not None:
            store.set_meta("privacy", stricter(recorded, privacy))  # a later rewrite never shows more people
        privacy = privacy or recorded
        card = Path(store.get_meta("dump_root") or out)
        if deployment is None and not store.get_meta("deployment"):
            deployment = fallback
        if deployment is not None:
            given = asdict(deployment) if isinstance(deployment, Deployment) else dict(deployment)
            values = {**json.loads(store.get_meta("deployment") or "{}"),
                      **{k: v for k, v in given.items() if v is not None}}
            store.set_meta("deployment", json.dumps(_deployment_values(values, card)))
        try:
            info = json.loads((out / "predictions.json").read_text(encoding="utf-8")).get("info", {})
        except (OSError, json.JSONDecodeError):
            info = {}
        info.pop("format_version", None)
        predictions = store.predictions(card)
        written = _write(store, card, out, predictions, info, formats, privacy=privacy)
        if export_crops:
            written += export_images(out, card, predictions, privacy)
        return written
    finally:
        store.close()


def run_references(outdir: Union[str, Path], config: StageConfig) -> tuple[np.ndarray, list[str]]:
    """Embeddings and labels of the detections stage 1 accepts in a run's store."""
    if not (Path(outdir) / STORE_NAME).is_file():
        raise ValueError(f"{outdir}: no {STORE_NAME}; run `trapedge run` first")
    store = Store(Path(outdir) / STORE_NAME)
    try:
        card = Path(store.get_meta("dump_root") or outdir)
        paths, dets, vectors = store.embeddings(card)
        rows = {(p, int(d)): i for i, (p, d) in enumerate(zip(paths, dets))}
        picked, labels = [], []
        for pred in store.predictions(card):
            for idx, det in enumerate(pred.get("detections") or []):
                processed = det.get("processed_classification")
                if processed and (pred["filepath"], idx) in rows and accept(
                        [processed["class"]], np.array([processed["score"]]), [processed["source"]], config)[0]:
                    picked.append(rows[(pred["filepath"], idx)])
                    labels.append(processed["class"])
    finally:
        store.close()
    if not picked:
        raise ValueError(f"{outdir}: no confident species-level detections to learn from")
    return vectors[picked], labels


def _clear_out(out: Path) -> None:
    """Creates the output folder and clears the temporary files a power cut left (the real files are intact)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink()


def log_to(path: Path) -> None:
    """Sends trapedge's log (warnings, notes, tracebacks of unexpected errors) to a run's file; the log of an
    earlier run in this process is closed, so one card's messages never land in another card's log."""
    root = logging.getLogger("trapedge")
    path = Path(path).resolve()
    for handler in list(root.handlers):
        if getattr(handler, "trapedge_run_log", False) and Path(handler.baseFilename) != path:
            root.removeHandler(handler)
            handler.close()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.trapedge_run_log = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _check_formats(formats: tuple[str, ...]) -> None:
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(sorted(unknown))}; expected {', '.join(FORMATS)}")


def _reason(error: BaseException) -> str:
    """An OSError as 'strerror: filename', anything else as its message."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error)


def _deployment_values(deployment: Union[Deployment, dict, None], card: Path) -> Optional[dict]:
    """A deployment as stored: all of timezone, latitude and longitude, validated, with an id."""
    if deployment is None:
        return None
    values = asdict(deployment) if isinstance(deployment, Deployment) else dict(deployment)
    if not any(values.get(k) is not None for k in ("timezone", "latitude", "longitude")):
        return None
    missing = [flag for flag, key in (("--timezone", "timezone"), ("--lat", "latitude"), ("--lon", "longitude"))
               if values.get(key) is None]
    if missing:
        raise ValueError(f"Camtrap DP needs {', '.join(missing)} as well")
    if not values.get("deployment_id"):
        values["deployment_id"] = Path(card).resolve().name or "deployment"
    Deployment.from_dict(values)
    return {k: v for k, v in values.items() if v is not None}


def _recorded_privacy(store: Store) -> str:
    """The privacy mode the run recorded (runs before privacy existed: blur)."""
    return store.get_meta("privacy") or "blur"


def _existing_store(out: Path) -> Store:
    if not (out / STORE_NAME).is_file():
        raise ValueError(f"{out}: no {STORE_NAME}; run `trapedge run` first")
    log_to(out / LOG_NAME)
    return Store(out / STORE_NAME)


def _open_store(out: Path, bundle: Bundle, card: Path) -> Store:
    store = Store(out / STORE_NAME)
    fingerprint = sha256_file(bundle.root / "manifest.json")
    previous = store.get_meta("bundle_manifest_sha256")
    if previous is not None and previous != fingerprint and store.count():
        store.close()
        raise ValueError(f"{out}: holds results from another bundle; use a new --out folder")
    store.set_meta("bundle_manifest_sha256", fingerprint)
    store.set_meta("dump_root", str(Path(card).resolve()))
    return store


def _finish(store: Store, card: Path, out: Path, bundle: Bundle, reclassifier: Optional[Reclassifier],
            timer: StageTimer, burst_gap: float, formats: tuple[str, ...], processed: int, started: float,
            providers: dict, privacy: str = "blur") -> RunReport:
    """Pass 2 over everything in the store, then the outputs, then the report."""
    predictions = store.predictions(card)
    images = store.images(card)
    if reclassifier is not None:
        undated = [i["key"] for i in images if not i.get("captured") and i["status"] != "failed"]
        if undated:
            logger.warning("%d image(s) have no EXIF capture time (first: %s); their file modification time is "
                           "used to group bursts", len(undated), undated[0])
        events = group_events(images, burst_gap)
        reclassifier.events = {image["filepath"]: events[image["key"]] for image in images}
        paths, dets, vectors = store.embeddings(card)
        reclassifier.run(predictions, EmbeddingTable(paths, dets, vectors), store.evidence(card),
                         store.degraded(card))
        for note in reclassifier.result.notes:
            logger.warning("%s", note)
        timer.merge(reclassifier.timer)
        with timer.stage("store"):
            store.save_predictions(predictions, card)
    with timer.stage("write"):
        written = _write(store, card, out, predictions, run_info(bundle, reclassifier), formats, images,
                         privacy=privacy)
    return _report(out, predictions, images, processed, time.perf_counter() - started, timer, providers,
                   reclassifier, written)


def run_info(bundle: Bundle, reclassifier: Optional[Reclassifier]) -> dict:
    """The `info` block of predictions.json: trapedge version, bundle versions, pass-2 settings and calibration."""
    info = {"trapedge": {"version": __version__, "bundle_model_version": bundle.model_version,
                         "bundle_data_version": bundle.data_version}}
    facts = bundle.model("detector").raw.get("megadetector") if bundle.has_model("detector") else None
    if facts:
        info["trapedge"]["detector"] = {k: facts.get(k) for k in ("name", "version", "typical_detection_threshold",
                                                                "conservative_detection_threshold")}
    if reclassifier is not None:
        result = reclassifier.result
        info["trapedge"]["reclassification"] = {
            "stages": reclassifier.config.to_dict(), "centroids": reclassifier.centroid_source,
            "event_pooling": reclassifier.event_pooling, "counts": reclassifier.summary,
            "calibration": {k: v for k, v in result.calibration.items() if k != "features"} if result else {},
            "notes": result.notes if result else []}
    return info


def _deployment(store: Store, card: Path) -> Optional[Deployment]:
    recorded = store.get_meta("deployment")
    if not recorded:
        return None
    values = json.loads(recorded)
    values.setdefault("deployment_id", Path(card).name or "deployment")
    return Deployment.from_dict(values)


def _write(store: Store, card: Path, out: Path, predictions: list[dict], info: dict, formats: tuple[str, ...],
           images: Optional[list[dict]] = None, *, privacy: str = "blur") -> list[Path]:
    """Writes the requested formats from the store, each atomically; returns what was written."""
    images = images if images is not None else store.images(card)
    predictions, images = aggregate_videos(predictions, images)
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
        deployment = _deployment(store, card)
        if deployment is None:
            if tuple(formats) == ("camtrap-dp",):
                raise ValueError(f"{out}: Camtrap DP needs the deployment's --timezone, --lat and --lon")
        else:
            (out / "camtrap-dp").mkdir(exist_ok=True)
            write_camtrap_dp(out / "camtrap-dp", predictions, infos, deployment, info=info)
            written.append(out / "camtrap-dp")
    if "report" in formats:
        written.append(write_report(out / REPORT_NAME, predictions, images, info, card, privacy=privacy))
    return written


def _report(out: Path, predictions: list[dict], images: list[dict], processed: int, seconds: float,
            timer: StageTimer, providers: dict, reclassifier: Optional[Reclassifier],
            written: list[Path]) -> RunReport:
    detections = [d for p in predictions for d in p.get("detections", [])]
    labels = Counter((d.get("reclassification") or d["processed_classification"])["class"].split(";")[-1]
                     for d in detections if "processed_classification" in d)
    failed = [(i["key"], i["reason"]) for i in images if i["status"] == "failed"]
    pass_two = None
    if reclassifier is not None and reclassifier.result is not None:
        result = reclassifier.result
        pass_two = {"counts": dict(result.counts), "notes": list(result.notes),
                    "calibration": {k: v for k, v in result.calibration.items() if k != "features"}}
    return RunReport(out=out, images=len(images), processed=processed, detections=len(detections), failed=failed,
                     labels=dict(labels.most_common()), seconds=seconds, timing=timer.summary(),
                     providers=providers, pass_two=pass_two, written=written)
