"""Pass 1 over a dump: decode, detect, crop, classify, decide; batched, with decoding overlapped and timed."""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .speciesnet import classifier as cls_ops
from .speciesnet import detector as det_ops
from .timing import StageTimer
from .models.bundle import Bundle, BundleError
from .speciesnet.ensemble import (
    DEFAULT_DETECTION_THRESHOLD_FOR_CLASSIFICATION,
    DEFAULT_MAX_CLASSIFICATIONS_PER_DETECTION,
    NUM_CLASSIFICATIONS_FOR_ENSEMBLE,
    Classification,
    Detection,
    Ensemble,
    Failure,
)
from .reclassify.embed import Embedder
from .faults import checkpoint
from .card.ingest import DecodedImage, ImageRecord, decode
from .models.metered import Metered
from .models.select import open_model
from .reclassify.degrade import EmbeddedView, ReferenceSampler, background_patch, crop_quality, render_views
from .reclassify.stages import StageConfig, accept, label_depth, needs_embedding

__all__ = ["MAX_SIDES", "ImageResult", "RunOptions", "Runner", "tables_from_results"]

logger = logging.getLogger("trapedge")
MAX_SIDES = 4096  # coarse-candidate box sides kept for rendering degraded views


@dataclass(frozen=True)
class RunOptions:
    """How pass 1 runs; defaults are SpeciesNet's."""

    country: Optional[str] = None
    admin1_region: Optional[str] = None
    enable_geofence: bool = True
    device: str = "auto"
    threads: Optional[int] = None
    detection_threshold_for_classification: float = DEFAULT_DETECTION_THRESHOLD_FOR_CLASSIFICATION
    max_classifications_per_detection: int = DEFAULT_MAX_CLASSIFICATIONS_PER_DETECTION
    max_classifications_per_image: Optional[int] = None
    detector_batch: int = 1
    classifier_batch: int = 8
    decode_workers: int = 2
    chunk: int = 8
    embed: bool = True
    precision: str = "fp32"
    agreement_floor: Optional[float] = None
    draft: bool = False
    stages: StageConfig = StageConfig()


@dataclass
class ImageResult:
    """Everything pass 1 learned about one image."""

    record: ImageRecord
    prediction: dict
    width: Optional[int] = None
    height: Optional[int] = None
    captured: Optional[str] = None
    error: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    features: dict[int, np.ndarray] = field(default_factory=dict)
    embeddings: dict[int, np.ndarray] = field(default_factory=dict)
    top5: dict[int, tuple[list[str], list[float]]] = field(default_factory=dict)
    evidence: dict[int, tuple[list, np.ndarray]] = field(default_factory=dict)
    degraded: list[EmbeddedView] = field(default_factory=list)

    @property
    def status(self) -> str:
        """'ok', 'warning' or 'failed'."""
        return "failed" if self.error else ("warning" if self.warnings else "ok")


@dataclass
class _Work:
    image: DecodedImage
    boxed: Optional[det_ops.Letterboxed] = None
    detections: list[dict] = field(default_factory=list)


class Runner:
    """Runs SpeciesNet's pass 1 from a bundle on ONNX Runtime."""

    def __init__(self, bundle: Bundle, options: RunOptions = RunOptions()) -> None:
        self.bundle = bundle
        self.options = options
        self.timer = StageTimer()
        self.detector = self._backend("detector", options.detector_batch)
        self.classifier = self._backend("classifier", options.classifier_batch)
        self.ensemble = Ensemble.from_files(
            bundle.file("taxonomy"), bundle.file("geofence"), options.enable_geofence
        )
        self.embedder = (Embedder(bundle, options.device, options.threads, precision=options.precision)
                         if options.embed else None)
        self.sampler = ReferenceSampler(options.stages.degraded_per_label)
        self.coarse_sides: list[float] = []
        try:
            self.detector_config = det_ops.DetectorConfig.from_manifest(bundle.model("detector").raw)
        except (TypeError, ValueError) as e:
            raise BundleError(f"{bundle.root / 'manifest.json'}: models.detector: {e}") from e
        config = self.detector_config
        logger.info("detector %s: letterbox %d, stride %d, typical confidence threshold %s", config.model,
                    config.image_size, config.stride, config.typical_threshold)

    def resume(self, degraded_counts: dict[str, int], coarse_sides: list[float]) -> None:
        """Continues an interrupted card: references already given degraded views, coarse box sides seen."""
        self.sampler = ReferenceSampler(self.options.stages.degraded_per_label, degraded_counts)
        self.coarse_sides = list(coarse_sides)[:MAX_SIDES]

    def _backend(self, name: str, batch: int):
        """The model on the asked device and precision (`models.select` rules; quantised variants refused below
        their agreement floors)."""
        return Metered(open_model(self.bundle, name, device=self.options.device, precision=self.options.precision,
                                  threads=self.options.threads, batch=batch,
                                  agreement_floor=self.options.agreement_floor, log=logger.info))

    def meters(self) -> dict[str, Metered]:
        """Each model's calls (input shapes) and seconds so far, by bundle model name."""
        found = {"detector": self.detector, "classifier": self.classifier}
        if self.embedder is not None and self.embedder.backend is not None:
            found[self.embedder.section["model"]] = self.embedder.backend
        return found

    def open(self) -> dict[str, list[str]]:
        """Opens both sessions, checks the classifier against the labels, returns providers in use."""
        with self.timer.stage("load_models"):
            declared = self.classifier.output_shape("logits")[-1]
            if isinstance(declared, int) and declared != len(self.bundle.labels):
                raise BundleError(
                    f"{self.classifier.path}: classifier has {declared} outputs but the bundle has "
                    f"{len(self.bundle.labels)} labels"
                )
            return {"detector": self.detector.providers, "classifier": self.classifier.providers}

    def process(self, records: Iterable[ImageRecord], root: Path) -> Iterator[ImageResult]:
        """Yields one result per record, in order; decoding runs ahead in worker threads."""
        root = Path(root).resolve()
        records = list(records)
        with ThreadPoolExecutor(max(1, self.options.decode_workers)) as pool:
            futures = [pool.submit(self._decode, r) for r in records[: self.options.chunk * 2]]
            next_index = len(futures)
            for start in range(0, len(records), self.options.chunk):
                chunk = []
                for future in futures[start : start + self.options.chunk]:
                    with self.timer.stage("wait_decode"):
                        chunk.append(future.result())
                    if next_index < len(records):
                        futures.append(pool.submit(self._decode, records[next_index]))
                        next_index += 1
                    futures[len(chunk) + start - 1] = None
                yield from self._process_chunk(chunk, root)

    def _decode(self, record: ImageRecord) -> _Work:
        with self.timer.stage("decode"):
            image = decode(record, self.detector_config.image_size if self.options.draft else None)
        work = _Work(image)
        if image.ok:
            with self.timer.stage("letterbox"):
                work.boxed = det_ops.letterbox(image.pixels, self.detector_config)
        return work

    def _process_chunk(self, chunk: list[_Work], root: Path) -> list[ImageResult]:
        self._detect(chunk)
        results = [self._result(work, root) for work in chunk]
        self._classify(chunk, results)
        with self.timer.stage("ensemble"):
            for work, result in zip(chunk, results):
                self._decide(result)
        if self.embedder is not None:
            self._embed(chunk, results)
        for work in chunk:
            work.image.pixels = None
            work.boxed = None
        return results

    def _detect(self, chunk: list[_Work]) -> None:
        by_shape: dict[tuple, list[_Work]] = defaultdict(list)
        for work in chunk:
            if work.boxed is not None:
                by_shape[work.boxed.shape].append(work)
        batch = max(1, self.options.detector_batch)
        for shape, group in by_shape.items():
            for i in range(0, len(group), batch):
                part = group[i : i + batch]
                checkpoint("detect")
                with self.timer.stage("detect"):
                    (raw,) = self.detector.run(
                        {"images": det_ops.to_network_input([w.boxed for w in part])}, ["predictions"]
                    )
                with self.timer.stage("nms"):
                    for work, rows in zip(part, raw):
                        work.detections = det_ops.postprocess(rows, shape, work.boxed, self.detector_config)

    def _result(self, work: _Work, root: Path) -> ImageResult:
        image = work.image
        record = image.record
        prediction: dict = {"filepath": str(root / record.key)}
        result = ImageResult(record, prediction, captured=image.captured, warnings=list(image.warnings))
        if not image.ok:
            result.error = image.error
            prediction["failures"] = [Failure.DETECTOR.name]
            prediction["failure_reason"] = image.error
        else:
            result.height, result.width = image.full_size or image.pixels.shape[:2]
            if self.options.country:
                prediction["country"] = self.options.country
            if self.options.admin1_region:
                prediction["admin1_region"] = self.options.admin1_region
            prediction["detections"] = [dict(d) for d in work.detections]
        prediction["model_version"] = self.bundle.model_version
        return result

    def _classify(self, chunk: list[_Work], results: list[ImageResult]) -> None:
        crops: list[np.ndarray] = []
        owners: list[tuple[ImageResult, int]] = []
        threshold = self.options.detection_threshold_for_classification
        with self.timer.stage("crop"):
            for work, result in zip(chunk, results):
                if not work.image.ok:
                    continue
                chosen = set(cls_ops.select_for_classification(
                    result.prediction["detections"], threshold, self.options.max_classifications_per_image))
                wanted = [i in chosen for i in range(len(result.prediction["detections"]))]
                if any(wanted) and work.image.drafted:
                    full = decode(work.image.record)  # crops always come from full resolution
                    if full.ok:
                        work.image.pixels, work.image.drafted = full.pixels, False
                for idx, det in enumerate(result.prediction["detections"]):
                    if not wanted[idx]:
                        continue
                    crop = cls_ops.preprocess_crop(work.image.pixels, det["bbox"])
                    if crop is None:
                        result.warnings.append(
                            f"detection {idx} is thinner than a pixel after cropping; not classified"
                        )
                        continue
                    crops.append(crop)
                    owners.append((result, idx))
        batch = max(1, self.options.classifier_batch)
        for i in range(0, len(crops), batch):
            with self.timer.stage("classify"):
                logits, features = self.classifier.run(
                    {"crops": cls_ops.to_network_input(crops[i : i + batch])}, ["logits", "features"]
                )
            with self.timer.stage("topk"):
                idx, scores = cls_ops.top_k(cls_ops.softmax(logits), self._top_k(logits.shape[-1]))
                for j, (result, det_idx) in enumerate(owners[i : i + batch]):
                    det = result.prediction["detections"][det_idx]
                    det["raw_classifications"] = {
                        "classes": [self.bundle.labels[k] for k in idx[j]],
                        "scores": scores[j].tolist(),
                    }
                    result.top5[det_idx] = (det["raw_classifications"]["classes"][:NUM_CLASSIFICATIONS_FOR_ENSEMBLE],
                                            det["raw_classifications"]["scores"][:NUM_CLASSIFICATIONS_FOR_ENSEMBLE])
                    result.features[det_idx] = features[j]

    def _embed(self, chunk: list[_Work], results: list[ImageResult]) -> None:
        for work, result in zip(chunk, results):
            wanted = [i for i, det in enumerate(result.prediction.get("detections") or [])
                      if "processed_classification" in det
                      and needs_embedding(det["processed_classification"]["class"])
                      and Detection.from_category(str(det.get("category"))) != Detection.HUMAN]
            if not wanted:
                continue
            detections = result.prediction["detections"]
            with self.timer.stage("evidence"):
                height, width = work.image.pixels.shape[:2]
                for i in wanted:
                    box = detections[i]["bbox"]
                    region = cls_ops.crop_region(work.image.pixels, box)
                    if region is None or i not in result.top5:
                        continue
                    side = float(min(box[2] * width, box[3] * height))
                    result.evidence[i] = (list(result.top5[i]), crop_quality(region, side))
                    label = detections[i]["processed_classification"]["class"]
                    if label_depth(label) < 5 and len(self.coarse_sides) < MAX_SIDES:
                        self.coarse_sides.append(side)
            if self.embedder.uses_classifier:
                result.embeddings = {i: result.features[i] for i in wanted}
            else:
                with self.timer.stage("embed"):
                    vectors = self.embedder.embed(work.image.pixels, [detections[i]["bbox"] for i in wanted])
                result.embeddings = {i: v for i, v in zip(wanted, vectors) if v is not None}
            self._degrade(work, result, wanted)

    def _degrade(self, work: _Work, result: ImageResult, wanted: list[int]) -> None:
        """Degraded views of a bounded sample of this image's references, classified and embedded (pass 2 calibrates on them)."""
        config = self.options.stages
        if config.degraded_per_label <= 0 or config.degraded_views <= 0:
            return
        detections = result.prediction["detections"]
        processed = [detections[i]["processed_classification"] for i in wanted]
        refs = accept([p["class"] for p in processed], np.array([p["score"] for p in processed]),
                      [p["source"] for p in processed], config)
        chosen = [i for i, is_ref in zip(wanted, refs) if is_ref and i in result.embeddings
                  and self.sampler.take(detections[i]["processed_classification"]["class"])]
        if not chosen:
            return
        with self.timer.stage("degrade"):
            rng = np.random.default_rng(zlib.crc32(f"{result.record.key}#{chosen}".encode()))
            boxes = [d["bbox"] for d in detections]
            views: list[tuple[int, str, str, np.ndarray, float]] = []
            for i in chosen:
                label = detections[i]["processed_classification"]["class"]
                region = cls_ops.crop_region(work.image.pixels, detections[i]["bbox"])
                if region is None:
                    continue
                sides = self.coarse_sides or None
                for view in render_views(region, rng, sides, config.degraded_views):
                    views.append((i, label, "+".join(view.kinds), view.pixels, view.side_px))
                box = detections[i]["bbox"]
                patch = background_patch(work.image.pixels, boxes, (box[2], box[3]), rng)
                if patch is not None:
                    views.append((i, Classification.BLANK.value, "background", patch, float(min(patch.shape[:2]))))
            crops = [cls_ops.preprocess_crop(v[3], (0.0, 0.0, 1.0, 1.0)) for v in views]
            keep = [k for k, c in enumerate(crops) if c is not None]
            batch = max(1, self.options.classifier_batch)
            for start in range(0, len(keep), batch):
                part = keep[start : start + batch]
                logits, features = self.classifier.run(
                    {"crops": cls_ops.to_network_input([crops[k] for k in part])}, ["logits", "features"])
                idx, scores = cls_ops.top_k(cls_ops.softmax(logits), NUM_CLASSIFICATIONS_FOR_ENSEMBLE)
                if self.embedder.uses_classifier:
                    vectors = list(features)
                else:
                    vectors = [self.embedder.embed(views[k][3], [(0.0, 0.0, 1.0, 1.0)])[0] for k in part]
                for j, k in enumerate(part):
                    if vectors[j] is None:
                        continue
                    det_idx, label, kind, pixels, side = views[k]
                    result.degraded.append(EmbeddedView(
                        det_idx, label, kind, np.asarray(vectors[j], dtype=np.float32),
                        ([self.bundle.labels[c] for c in idx[j]], scores[j].tolist()), crop_quality(pixels, side)))

    def _top_k(self, num_labels: int) -> int:
        keep = self.options.max_classifications_per_detection
        if keep is None or keep < 0:
            return num_labels
        return max(keep, NUM_CLASSIFICATIONS_FOR_ENSEMBLE)

    def _decide(self, result: ImageResult) -> None:
        detections = result.prediction.get("detections") or []
        classified = [d for d in detections if "raw_classifications" in d]
        if classified:
            decisions = self.ensemble.decide(
                [d["raw_classifications"] for d in classified],
                classified,
                self.options.country,
                self.options.admin1_region,
            )
            for det, decision in zip(classified, decisions):
                det["processed_classification"] = decision
        keep = self.options.max_classifications_per_detection
        for det in classified:
            raw = det["raw_classifications"]
            if keep >= 0:
                det["raw_classifications"] = {k: v[:keep] for k, v in raw.items()}


def tables_from_results(results: list[ImageResult]):
    """Pass 2's embedding, evidence and degraded-view tables from in-memory pass-1 results (bench, library use)."""
    from .reclassify import DegradedTable, EmbeddingTable, EvidenceTable

    emb = [(r.prediction["filepath"], i, v) for r in results for i, v in sorted(r.embeddings.items())]
    ev = [(r.prediction["filepath"], i, top, q) for r in results for i, (top, q) in sorted(r.evidence.items())]
    views = [(r.prediction["filepath"], v) for r in results for v in r.degraded]
    width = len(emb[0][2]) if emb else 0
    return (
        EmbeddingTable([e[0] for e in emb], np.array([e[1] for e in emb], dtype=np.int64),
                       np.array([e[2] for e in emb], dtype=np.float32).reshape(len(emb), width)),
        EvidenceTable([e[0] for e in ev], np.array([e[1] for e in ev], dtype=np.int64), [e[2][0] for e in ev],
                      [e[2][1] for e in ev], np.array([e[3] for e in ev], dtype=np.float32).reshape(len(ev), 3)),
        DegradedTable([v[0] for v in views], np.array([v[1].detection for v in views], dtype=np.int64),
                      [v[1].label for v in views], [v[1].kind for v in views],
                      np.array([v[1].vector for v in views], dtype=np.float32).reshape(len(views), width),
                      [v[1].top[0] for v in views], [v[1].top[1] for v in views],
                      np.array([v[1].quality for v in views], dtype=np.float32).reshape(len(views), 3)),
    )
