"""Build the bundled demo set: a class-balanced subset of Fashion-MNIST as PNG files in class folders.

    python -m demo.make_demo_set                       # writes demo/images/<class>/<index>.png + demo/manifest.csv
    python -m demo.make_demo_set --per-class 80 --source /usr/share/datasets/fashion-mnist

The source is the Fashion-MNIST *test* split (t10k, 10 000 images, MIT licence), shipped by the Debian package
`dataset-fashion-mnist`. The selection is deterministic: for every class the test-split indices of that class
are shuffled with a fixed seed and the first `--per-class` are kept, so re-running the script reproduces the
committed files pixel for pixel. `demo/manifest.csv` lists every file with its class, the Fashion-MNIST label,
the index in the t10k files and the SHA-256 of its raw 28x28 pixels; tests/test_demo_set.py checks the
committed images against it (and against the source, where the Debian package is installed).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

from recbuild.atomic import atomic_open

# Defaults live here, in one place.
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
# 80 per class: 640 train / 160 val images at --train-ratio 0.8, enough for a clear fine-tuned vs
# from-scratch gap, small enough that `make demo` fine-tunes ResNet-50-1by2 at 224 px in minutes on 2 cores.
DEFAULT_PER_CLASS = 80
SEED = 2017  # the year Fashion-MNIST was published; any fixed value makes the selection reproducible
DEMO_DIR = Path(__file__).resolve().parent
IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
LABELS_FILE = "t10k-labels-idx1-ubyte.gz"
# Fashion-MNIST label order (its README); folder names are lower-case and file-system safe.
CLASS_NAMES = ("tshirt_top", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle_boot")
MANIFEST_FIELDS = ("path", "class", "fashion_mnist_label", "t10k_index", "pixels_sha256")


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST container: magic, dims as big-endian uint32, then uint8 data)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4]!r})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def load_source(source: Path) -> Tuple[np.ndarray, np.ndarray]:
    """The t10k images (N, 28, 28) and labels (N,) from the Fashion-MNIST folder `source`."""
    missing = [name for name in (IMAGES_FILE, LABELS_FILE) if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{source}: missing {', '.join(missing)}; install the Debian package dataset-fashion-mnist "
            f"or pass --source with a folder holding the Fashion-MNIST t10k files")
    images, labels = read_idx(source / IMAGES_FILE), read_idx(source / LABELS_FILE)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{source}: images {images.shape} and labels {labels.shape} do not pair up")
    return images, labels


def select(labels: np.ndarray, per_class: int, seed: int = SEED) -> Dict[int, List[int]]:
    """For each label, `per_class` t10k indices: the label's indices shuffled with `seed`, first ones kept."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for label in range(len(CLASS_NAMES)):
        indices = np.flatnonzero(labels == label)
        if len(indices) < per_class:
            raise ValueError(f"class {CLASS_NAMES[label]} has {len(indices)} images, fewer than {per_class}")
        chosen[label] = sorted(int(i) for i in rng.permutation(indices)[:per_class])
    return chosen


def pixels_sha256(pixels: np.ndarray) -> str:
    """Hash of the raw uint8 pixels, independent of how the PNG encoder compressed them."""
    return hashlib.sha256(np.ascontiguousarray(pixels, np.uint8).tobytes()).hexdigest()


def relative_path(label: int, index: int) -> str:
    return f"images/{CLASS_NAMES[label]}/{index:05d}.png"


def build(source: Path, out_dir: Path, per_class: int) -> List[dict]:
    """Write `out_dir`/images and `out_dir`/manifest.csv; the images folder is replaced only when complete."""
    images, labels = load_source(source)
    chosen = select(labels, per_class)
    rows = []
    # Write into a temporary folder beside the target and swap it in at the end: a killed run never
    # leaves a half-written set behind.
    tmp = Path(tempfile.mkdtemp(prefix=".images.", dir=out_dir))
    try:
        for label, indices in chosen.items():
            (tmp / CLASS_NAMES[label]).mkdir()
            for index in indices:
                rel = relative_path(label, index)
                ok, png = cv2.imencode(".png", images[index], [cv2.IMWRITE_PNG_COMPRESSION, 9])
                if not ok:
                    raise RuntimeError(f"PNG encoding failed for t10k index {index}")
                (tmp / rel.split("/", 1)[1]).write_bytes(png.tobytes())
                rows.append({"path": rel, "class": CLASS_NAMES[label], "fashion_mnist_label": label,
                             "t10k_index": index, "pixels_sha256": pixels_sha256(images[index])})
        final = out_dir / "images"
        old = out_dir / f".images.old.{os.getpid()}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with atomic_open(out_dir / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def read_manifest(path: Path = DEMO_DIR / "manifest.csv") -> List[dict]:
    """The rows of demo/manifest.csv, with integer label and index."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["fashion_mnist_label"] = int(row["fashion_mnist_label"])
        row["t10k_index"] = int(row["t10k_index"])
    return rows


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.make_demo_set", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help=f"folder with the Fashion-MNIST t10k .gz files (default {DEFAULT_SOURCE})")
    parser.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS,
                        help=f"images per class (default {DEFAULT_PER_CLASS})")
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="output folder (default: demo/)")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error("--per-class must be at least 1")
    try:
        rows = build(args.source, args.out, args.per_class)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in (args.out / "images").rglob("*.png"))
    print(f"wrote {len(rows)} images ({args.per_class} per class x {len(CLASS_NAMES)} classes, "
          f"{size / 1e6:.2f} MB) to {args.out / 'images'} and the manifest {args.out / 'manifest.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
