"""Measurements behind recbuild.report: the near-duplicate threshold, and how the report's time scales.

    python -m bench.reports threshold      pHash distances of resized/re-encoded copies vs distinct images
    python -m bench.reports scaling        the data report on 10k and 100k small generated records

Threshold: copies are each image resized to 3/4, 1/2 and 1/3 and JPEG re-encoded at quality 90/60/30, plus a 1.6x
cubic upscale and a PNG round trip; distinct pairs are all pairs of the originals. Image sets: photo-like images
(tests' generator), random crops of matplotlib's sample photo (grace_hopper.jpg: overlapping crops share content),
and the bundled Fashion-MNIST subset upscaled from 28 to 112 px.
"""
from __future__ import annotations

import argparse
import glob
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from recbuild.recordio import RecordWriter, pack_header
from recbuild.report import build_report, fingerprint

ROOT = Path(__file__).resolve().parents[1]


def _variants(img: np.ndarray):
    h, w = img.shape[:2]
    for scale in (0.75, 0.5, 0.33):
        small = cv2.resize(img, (max(8, int(w * scale)), max(8, int(h * scale))), interpolation=cv2.INTER_AREA)
        for quality in (90, 60, 30):
            yield f"x{scale} q{quality}", cv2.imdecode(
                cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_UNCHANGED)
    yield "x1.6 cubic", cv2.resize(img, (int(w * 1.6), int(h * 1.6)), interpolation=cv2.INTER_CUBIC)
    yield "png", cv2.imdecode(cv2.imencode(".png", img)[1], cv2.IMREAD_UNCHANGED)


def _image_sets():
    sys.path.insert(0, str(ROOT))  # the tests' image generator; a benchmark, not library code
    from tests._recbuild_fixtures import photo
    rng = np.random.default_rng(0)
    sets = {"photo-like": [photo(int(h), int(w), s) for s, (h, w) in enumerate(rng.integers(120, 400, (150, 2)))]}
    import matplotlib
    sample = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if sample.is_file():
        gh = cv2.imread(str(sample))
        crops = []
        for _ in range(100):
            s = int(rng.integers(120, 300))
            y, x = int(rng.integers(0, gh.shape[0] - s)), int(rng.integers(0, gh.shape[1] - s))
            crops.append(gh[y:y + s, x:x + s].copy())
        sets["photo crops"] = crops
    demo = sorted(glob.glob(str(ROOT / "demo" / "images" / "*" / "*.png")))[::4]
    if demo:
        sets["fashion-mnist x4"] = [cv2.resize(cv2.imread(p, 0), (112, 112), interpolation=cv2.INTER_CUBIC)
                                    for p in demo]
    return sets


def threshold() -> None:
    """Hash distances and thumbnail differences (mean absolute, grey levels) of copies and of distinct pairs."""
    for name, imgs in _image_sets().items():
        prints = [fingerprint(i) for i in imgs]
        hashes = [h for h, _ in prints]
        thumbs = [t.astype(np.float32) for _, t in prints]
        per_variant, copy_mad = {}, []
        for k, img in enumerate(imgs):
            for label, copy in _variants(img):
                h, t = fingerprint(copy)
                per_variant.setdefault(label, []).append(bin(hashes[k] ^ h).count("1"))
                copy_mad.append(float(np.abs(thumbs[k] - t.astype(np.float32)).mean()))
        pairs = [(a, b) for a in range(len(imgs)) for b in range(a + 1, len(imgs))]
        distinct = np.array([bin(hashes[a] ^ hashes[b]).count("1") for a, b in pairs])
        close_mad = [float(np.abs(thumbs[a] - thumbs[b]).mean()) for (a, b), d in zip(pairs, distinct) if d <= 10]
        copies = np.concatenate([np.array(v) for v in per_variant.values()])
        print(f"{name}: {len(imgs)} images; copies max {copies.max()} bits (p99 {np.percentile(copies, 99):.0f}), "
              f"found at t=8: {(copies <= 8).mean():.2%}; distinct pairs min {distinct.min()} "
              f"(p1 {np.percentile(distinct, 1):.0f}, median {np.median(distinct):.0f}), "
              f"<= 6/8/10 bits: {[(distinct <= t).sum() for t in (6, 8, 10)]} of {len(distinct)}")
        print("   max per copy kind: " + ", ".join(f"{k} {max(v)}" for k, v in per_variant.items()))
        print(f"   thumbnail difference: copies max {max(copy_mad):.2f} grey levels; distinct pairs within 10 bits "
              f"({len(close_mad)}) min {min(close_mad) if close_mad else float('nan'):.2f}")


def _write_rec(path: Path, count: int, seed: int = 0) -> None:
    """`count` 32x32 JPEG records: distinct random smooth images, one in 100 an exact copy of an earlier one."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        writer = RecordWriter(handle)
        kept = []
        for i in range(count):
            if i % 100 == 99:
                data = kept[int(rng.integers(len(kept)))]
            else:
                img = cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (32, 32),
                                 interpolation=cv2.INTER_CUBIC)
                data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
                if len(kept) < 1000:
                    kept.append(data)
            writer.write(i, pack_header([float(i % 10)], i, False) + data)


def scaling(sizes=(10_000, 100_000)) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            prefix = Path(tmp) / f"n{n}"
            _write_rec(Path(f"{prefix}_train.rec"), int(n * 0.9), seed=1)
            _write_rec(Path(f"{prefix}_val.rec"), n - int(n * 0.9), seed=2)
            start, cpu = time.perf_counter(), time.process_time()
            report, _ = build_report(str(prefix))
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            # CPU time too: on a shared machine the wall time says more about the neighbours than about us
            print(f"{n} records: {seconds:.1f} s wall, {cpu:.1f} s CPU ({n / cpu:.0f} records per CPU second), "
                  f"{report['pairs_total']} pairs, leakage {report['leakage']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reports", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("threshold", "scaling"))
    a = p.parse_args(argv)
    threshold() if a.what == "threshold" else scaling()
    return 0


if __name__ == "__main__":
    sys.exit(main())
