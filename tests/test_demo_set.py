"""The committed demo set (demo/images) is balanced, readable and exactly what demo/make_demo_set.py makes."""
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from demo import make_demo_set as mds

DEMO = Path(mds.__file__).resolve().parent


@pytest.fixture(scope="module")
def manifest():
    return mds.read_manifest(DEMO / "manifest.csv")


def test_manifest_lists_exactly_the_committed_files(manifest):
    on_disk = sorted(p.relative_to(DEMO).as_posix() for p in (DEMO / "images").rglob("*") if p.is_file())
    assert sorted(row["path"] for row in manifest) == on_disk


def test_set_is_class_balanced_and_folders_match_labels(manifest):
    counts = Counter(row["class"] for row in manifest)
    assert set(counts) == set(mds.CLASS_NAMES)
    assert set(counts.values()) == {mds.DEFAULT_PER_CLASS}
    for row in manifest:
        assert row["class"] == mds.CLASS_NAMES[row["fashion_mnist_label"]]
        assert row["path"] == mds.relative_path(row["fashion_mnist_label"], row["t10k_index"])
    assert len({row["t10k_index"] for row in manifest}) == len(manifest)


def test_every_image_decodes_to_the_hashed_pixels(manifest):
    for row in manifest:
        pixels = cv2.imread(str(DEMO / row["path"]), cv2.IMREAD_UNCHANGED)
        assert pixels is not None, row["path"]
        assert pixels.shape == (28, 28) and pixels.dtype == np.uint8, row["path"]
        assert mds.pixels_sha256(pixels) == row["pixels_sha256"], row["path"]


def test_set_is_a_few_mb_at_most():
    size = sum(p.stat().st_size for p in (DEMO / "images").rglob("*.png"))
    assert size < 3e6


def test_committed_set_matches_the_script_and_its_source(manifest):
    """Re-run the selection on the Debian dataset and check the committed pixels are those images."""
    if not (mds.DEFAULT_SOURCE / mds.IMAGES_FILE).is_file():
        pytest.skip(f"{mds.DEFAULT_SOURCE}: Debian package dataset-fashion-mnist not installed")
    images, labels = mds.load_source(mds.DEFAULT_SOURCE)
    chosen = mds.select(labels, mds.DEFAULT_PER_CLASS)
    expected = sorted(mds.relative_path(label, i) for label, idx in chosen.items() for i in idx)
    assert sorted(row["path"] for row in manifest) == expected
    for row in manifest:
        assert labels[row["t10k_index"]] == row["fashion_mnist_label"]
        assert mds.pixels_sha256(images[row["t10k_index"]]) == row["pixels_sha256"]


def test_build_is_deterministic_and_replaces_atomically(tmp_path):
    """Two builds into the same folder give identical files, and a stale file from a bigger set disappears."""
    if not (mds.DEFAULT_SOURCE / mds.IMAGES_FILE).is_file():
        pytest.skip(f"{mds.DEFAULT_SOURCE}: Debian package dataset-fashion-mnist not installed")
    stale = tmp_path / "images" / "bag" / "99999.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    rows = mds.build(mds.DEFAULT_SOURCE, tmp_path, per_class=3)
    first = {p: p.read_bytes() for p in (tmp_path / "images").rglob("*.png")}
    assert len(rows) == len(first) == 30 and not stale.exists()
    mds.build(mds.DEFAULT_SOURCE, tmp_path, per_class=3)
    assert {p: p.read_bytes() for p in (tmp_path / "images").rglob("*.png")} == first
    assert not list(tmp_path.glob(".images*"))
