"""Commands over an artifact bundle: check, data update and rollback, quantize, TensorRT engines, fit, export."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..station import open_bundle
from .common import Precision, UserError, bundle_option, need_bundle, say, value

Mining = Enum("Mining", {"batch_hard": "batch_hard", "semi_hard": "semi_hard"}, type=str)
Backbone = Enum("Backbone", {"open_clip": "open_clip", "speciesnet": "speciesnet"}, type=str)
Method = Enum("Method", {"minmax": "minmax", "entropy": "entropy", "percentile": "percentile"}, type=str)
Activations = Enum("Activations", {"int8": "int8", "uint8": "uint8"}, type=str)
QuantModel = Enum("QuantModel", {"all": "all", "detector": "detector", "classifier": "classifier"}, type=str)
EngineModel = Enum("EngineModel", {m: m for m in ("detector", "classifier", "encoder", "head")}, type=str)
QuantPrecision = Enum("QuantPrecision", {"fp16": "fp16", "int8": "int8"}, type=str)
Detector = Enum("Detector", {m: m for m in ("mdv5a", "redwood", "spruce")}, type=str)


def _export_extra(what: str):
    """Imports an export module, or a one-line error saying which extra to install."""
    import importlib

    try:
        return importlib.import_module(f"trapedge.export.{what}")
    except ImportError as e:
        raise UserError(f"this command needs the export extra (pip install 'trapedge[export]'): {e}") from e


def check(bundle: Optional[Path] = bundle_option()) -> None:
    """Validate a bundle (manifest, hashes, label count) and print what it holds."""
    loaded = open_bundle(need_bundle(bundle))
    say(f"{loaded.root}: OK, {len(loaded.labels)} labels, models: {', '.join(loaded.manifest['models'])}, "
        f"SpeciesNet {loaded.model_version}, data version {loaded.data_version}")


def update(
    bundle: Optional[Path] = bundle_option(),
    geofence: Optional[Path] = typer.Option(None, dir_okay=False, help="New SpeciesNet geofence JSON."),
    taxonomy: Optional[Path] = typer.Option(None, dir_okay=False, help="New SpeciesNet taxonomy release."),
) -> None:
    """Validate and install a new geofence and/or taxonomy; the previous data is kept for rollback."""
    from ..models.bundle_update import apply_update

    root = need_bundle(bundle)
    say(f"{root}: data version {apply_update(root, geofence=geofence, taxonomy=taxonomy)}")


def rollback(bundle: Optional[Path] = bundle_option()) -> None:
    """Restore the previous geofence and taxonomy (and manifest) from the bundle's .history."""
    from ..models.bundle_update import rollback as _rollback

    root = need_bundle(bundle)
    say(f"{root}: rolled back to data version {_rollback(root)}")


def quantize(
    bundle: Optional[Path] = bundle_option(),
    precision: QuantPrecision = typer.Option("fp16", help="fp16, or int8 (static QDQ, activations calibrated "
                                                          "on photos)."),
    model: QuantModel = typer.Option("all", help="Which models (each of the two the bundle has)."),
    images: Optional[Path] = typer.Option(None, file_okay=False, help="More photos, added to the packaged "
                                                                      "samples; half calibrate, half measure."),
    agreement_floor: float = typer.Option(0.99, min=0.0, max=1.0,
                                          help="Agreement to keep: classifier top-1 and feature cosine, detector "
                                               "share of fp32 boxes found."),
    method: Optional[Method] = typer.Option(None, help="int8 calibration (default: chosen by measurement)."),
    activations: Activations = typer.Option("int8", help="int8 (TensorRT and onnxruntime) or uint8 (faster on "
                                                         "x86 onnxruntime, not TensorRT)."),
    max_photos: int = typer.Option(64, min=2, help="Most distinct photos used (calibration and held-out)."),
) -> None:
    """Add fp16 or int8 variants of the models, with their agreement against fp32 measured on held-out photos."""
    quant = _export_extra("quantize")
    root = need_bundle(bundle)
    if images is not None and not images.is_dir():
        raise UserError(f"--images {images}: not a folder")
    try:
        entries = quant.quantize_bundle(
            root, value(precision), models=None if value(model) == "all" else [value(model)],
            images=[images] if images else [], floor=agreement_floor, method=value(method) or quant.DEFAULT_METHOD,
            activations=value(activations), max_photos=max_photos, log=say)
    except RuntimeError as e:
        raise UserError(str(e)) from e
    for name, entry in entries.items():
        gated = {k: entry["agreement"].get(k) for k in entry.get("agreement_floor") or {}}
        say(f"{name}_{value(precision)}: {gated} (floor {agreement_floor})")


def engines_build(
    bundle: Optional[Path] = bundle_option(),
    model: list[EngineModel] = typer.Option(["detector", "classifier"], help="Models to build (repeat)."),
    precision: Precision = typer.Option("fp16", help="What TensorRT builds; int8 needs `trapedge quantize "
                                                     "--precision int8` first."),
    profile_batch: Optional[int] = typer.Option(None, min=1, help="Optimal batch of the optimisation profiles "
                                                                  "(default: the run's batch sizes)."),
) -> None:
    """Build TensorRT engines on this GPU, cached beside the bundle, keyed by GPU, TensorRT and ONNX hash."""
    from ..models.engines import ensure_engine

    loaded = open_bundle(need_bundle(bundle))
    for name in model:
        if not loaded.has_model(value(name)):
            raise UserError(f"{loaded.root}: has no {value(name)} model")
        path = ensure_engine(loaded, value(name), precision=value(precision), batch=profile_batch,
                             log=say)
        say(f"{value(name)}: {path}")


def fit(
    bundle: Optional[Path] = bundle_option("Bundle to add the head and centroids to."),
    run: Optional[Path] = typer.Option(None, "--run", file_okay=False,
                                       help="A finished run: its confident (stage 1) detections are the references."),
    references: Optional[Path] = typer.Option(None, dir_okay=False,
                                              help="CSV of labelled crops: filepath,label[,xmin,ymin,width,height]."),
    mining: Mining = typer.Option("batch_hard", help="Triplet mining."),
    epochs: int = typer.Option(40, min=1, help="Training epochs."),
    out_dim: int = typer.Option(256, min=2, help="Head output dimension."),
    triplet_margin: float = typer.Option(0.2, min=0.0, help="Triplet-loss margin."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Train the triplet head (stage 4) and write head.onnx and centroids.npz into the bundle (export extra)."""
    fitting = _export_extra("fit")
    root = need_bundle(bundle)
    if (run is None) == (references is None):
        raise UserError("give exactly one of --run OUTDIR or --references CSV")
    loaded = open_bundle(root)
    from ..station import stage_config

    config = stage_config(loaded, {})
    if references is not None:
        from ..reclassify.embed import crop_embedder

        refs = fitting.references_from_csv(references, crop_embedder(loaded))
    else:
        from ..station import run_references

        refs = fitting.ReferenceSet(*run_references(run, config))
    head = fitting.HeadConfig(mining=value(mining), epochs=epochs, out_dim=out_dim, margin=triplet_margin, seed=seed)
    try:
        manifest = fitting.fit(root, refs, head=head, stages=config, log=say)
    except RuntimeError as e:
        raise UserError(str(e)) from e
    say(f"head: {manifest['models']['head']['file']}, centroids: {manifest['files']['centroids']}")


def export_speciesnet(
    source: str = typer.Argument("kaggle:google/speciesnet/pyTorch/v4.0.3a/1",
                                 help="Kaggle id (kaggle:...), Hugging Face id (hf:...) or a local model folder."),
    bundle: Optional[Path] = bundle_option("Bundle folder to write."),
    opset: int = typer.Option(17, help="ONNX opset (17 keeps TensorRT 8.6/10.3 and older onnxruntime happy)."),
    parity_images: Optional[Path] = typer.Option(None, file_okay=False,
                                                 help="Photos to measure parity on (default: generated)."),
) -> None:
    """Export a SpeciesNet model (classifier and MegaDetector) to an ONNX bundle, with parity measured."""
    exporter = _export_extra("speciesnet")
    try:
        manifest = exporter.export_speciesnet(source, need_bundle(bundle), opset=opset, parity_images=parity_images,
                                              log=say)
    except RuntimeError as e:
        raise UserError(str(e)) from e
    for name, model in manifest["models"].items():
        say(f"{name}: {model['file']} parity {model.get('parity')}")


def export_encoder(
    bundle: Optional[Path] = bundle_option("Bundle to add the encoder (and bird-prompt embeddings) to."),
    backbone: Backbone = typer.Option("open_clip", help="open_clip, or speciesnet (the classifier's features)."),
    model: str = typer.Option("ViT-L-14", help="open_clip model name."),
    pretrained: Optional[str] = typer.Option("openai", help="open_clip pretrained tag or a checkpoint file."),
    parity_images: Optional[Path] = typer.Option(None, file_okay=False, help="Photos to measure parity on."),
    opset: int = typer.Option(17, help="ONNX opset."),
) -> None:
    """Export the re-classification image encoder (CLIP vision tower by default) into a bundle."""
    encoders = _export_extra("encoders")
    try:
        manifest = encoders.export_encoder(need_bundle(bundle), model=model, pretrained=pretrained,
                                           backbone=value(backbone), parity_images=parity_images, opset=opset,
                                           log=say)
    except RuntimeError as e:
        raise UserError(str(e)) from e
    say(f"embedding: {manifest['embedding']}")


def export_detector(
    source: Path = typer.Argument(..., dir_okay=False, help="MegaDetector checkpoint (.pt) as published, e.g. "
                                                          "md_v1000.0.0-spruce.pt."),
    bundle: Optional[Path] = bundle_option("Bundle whose detector is replaced."),
    model: Detector = typer.Option(..., help="mdv5a (YOLOv5x6 at 1280), redwood (MDv1000, YOLOv5x6 at 1280) or "
                                             "spruce (MDv1000, YOLOv5s at 640)."),
    opset: int = typer.Option(17, help="ONNX opset."),
    parity_images: Optional[Path] = typer.Option(None, file_okay=False,
                                                 help="Photos to measure parity on (default: generated)."),
) -> None:
    """Replace a bundle's MegaDetector (MDv5a, MDv1000 redwood or spruce); input size, stride and thresholds go in
    the manifest."""
    exporter = _export_extra("detector")
    try:
        entry = exporter.export_megadetector(source, need_bundle(bundle), value(model), opset=opset,
                                             parity_images=parity_images, log=say)
    except (RuntimeError, ValueError) as e:
        raise UserError(str(e)) from e
    facts = entry["megadetector"]
    say(f"detector: {entry['file']} {facts['name']} at {facts['image_size']} (stride {facts['stride']}), typical "
        f"threshold {facts['typical_detection_threshold']}, parity {entry['parity']}")
