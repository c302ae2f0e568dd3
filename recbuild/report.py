"""Data health of a packed set: `python -m recbuild report PREFIX [--test-folder DIR]`.

Reads the splits of PREFIX (find_recs) in order (one pass, one decode per record) and reports, per split: the
record count, the class histogram (classes with fewer than --min-class-images images, and classes that are empty in
a split while present in another; none for a split listed --unlabelled), the image size and aspect distribution;
--test-folder is a split of its own; then exact duplicates (same image bytes, or same
decoded pixels) and near-duplicates (a 64-bit DCT perceptual hash within PHASH_THRESHOLD bits, confirmed by 16x16
thumbnails within NEAR_MAX_MAD grey levels) within and across splits, each listed by split, .lst line and source
path. The headline is the leakage: how many val/test images
(and images of --test-folder) have a copy in the training split.

Outputs (atomic): PREFIX.report.json for scripts, PREFIX.report.html (one self-contained page: duplicate pairs as
inline thumbnails, histograms as inline PNGs). Sizes are those of the packed records (after --resize).

A .rec packed with `python -m recbuild --report` has NAME.fingerprints.npy beside it (recbuild/fingerprints.py):
while NAME.pack.json says it describes the .rec as it is, the report takes every record from it and decodes
nothing (the JSON's "sources" says so per .rec); a stale one is ignored with a warning.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import re
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from recbuild.atomic import write_json
from recbuild.publish import PrefixBusy, PublishError, output_error_line, publish
from recbuild.classmap import find_class_map, read_class_map
from recbuild.fingerprints import decode_stored, fingerprint, pixel_digest, read_fresh
from recbuild.listing import ListError, listed_root, listed_unlabelled, read_list
from recbuild.recordio import RecordIOError, iter_records, unpack_header

log = logging.getLogger(__name__)

FORMAT = "mxtransfer.datareport/1"
# Hamming distance (of 64 bits) up to which two images count as near-duplicates. Measured by
# `python -m bench.reports threshold` on copies resized to 3/4, 1/2 and 1/3 and JPEG re-encoded at quality 90/60/30,
# plus 1.6x upscales and PNG round trips: photo-like images stay within 6 bits (all found at 8); crops of a real
# photo and upscaled Fashion-MNIST items within 8 for 99.7% and 99.6% of copies (the rest: quality-30 copies, and
# third-size quality-60 copies of the 28 px Fashion items).
# Distinct images: photo-like pairs are >= 14 bits apart; within 8 bits are 2 of 4950 pairs of overlapping crops
# of one photo (which share content) and 17 of 19900 Fashion-MNIST pairs (near-identical catalogue items). 8 finds
# copies down to quality 60 at a third of the size, and is 6 bits below the closest distinct photos; at 10 the
# Fashion-MNIST false pairs triple (56).
PHASH_THRESHOLD = 8
# ... and a hash match is confirmed only if the two images' 16x16 grey thumbnails differ by at most this mean
# absolute difference (grey levels of 255). The hash alone, at 8 bits, pairs distinct look-alikes in sets of small
# centred objects: on the bundled Fashion-MNIST demo set (packed at 56 px) it reported 35 of 160 val images as
# leaked, every one a different garment. Measured (bench/reports.py): copies as above differ by at most 1.6
# (photo-like), 3.2 (photo crops) and 5.3 (Fashion-MNIST) grey levels; distinct pairs within 10 hash bits by at
# least 6.8 (overlapping crops of one photo) and 10.7 (Fashion-MNIST look-alikes).
NEAR_MAX_MAD = 6.0
MIN_CLASS_IMAGES = 10       # fewer images than this in a split: flagged (too few to learn or measure a class)
# Pairs listed in the JSON / shown with thumbnails in the HTML; counts are always complete.
MAX_PAIRS_JSON = 100_000
MAX_PAIRS_HTML = 1000
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TRAIN, HELD_OUT = "train", ("val", "test")
STORED, DECODED = "pack-time fingerprints", "decoded"   # how a .rec was read (the report's "sources")


class ReportError(ValueError):
    """Bad input to the data report; the message names the file."""


@dataclass
class Item:
    """One image seen by the report.

    Attributes:
        split: split name ('train', 'val', 'test', the rest of a .rec stem, or the test folder's name).
        role: 'train', 'val', 'test', 'folder' or 'other'.
        source: the .rec file or the image file it came from.
        offset: byte offset of the record in the .rec (-1 for folder images).
        record_id: the record header's id (the .lst index); -1 for folder images.
        label: the first label; None for folder images.
        line: the 1-based .lst line of the record, or None.
        path: the image path of the .lst (relative to the image root), or the folder-relative path.
        width, height, channels: decoded size.
        byte_sha, pixel_sha: sha1 of the stored image bytes and of the decoded pixels (with shape and dtype).
        phash: the 64-bit perceptual hash.
        thumb: the 16x16 grey thumbnail (float16) that confirms hash matches.
        origin: the real path of the image file it was made from, when known (a folder image; a record whose
            list recorded its folder): a record and its own source file are not duplicates.
    """
    split: str
    role: str
    source: str
    offset: int
    record_id: int
    label: Optional[float]
    line: Optional[int]
    path: Optional[str]
    width: int
    height: int
    channels: int
    byte_sha: str
    pixel_sha: str
    phash: int
    thumb: np.ndarray
    origin: Optional[str] = None


# ---- hashing ------------------------------------------------------------------------------------------------
def phash(img: np.ndarray) -> int:
    """The 64-bit DCT perceptual hash of `fingerprint`."""
    return fingerprint(img)[0]


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)
_POPCOUNT16 = (_POPCOUNT8[np.arange(1 << 16) & 0xFF] + _POPCOUNT8[np.arange(1 << 16) >> 8]).astype(np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distances of two equal-length uint64 arrays (numpy 1.23 has no bitwise_count)."""
    x = np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))
    return _POPCOUNT16[np.ascontiguousarray(x).view(np.uint16).reshape(-1, 4)].sum(axis=1, dtype=np.int64)


def _masks(width: int, radius: int) -> np.ndarray:
    """Every `width`-bit mask with at most `radius` bits set."""
    from itertools import combinations
    out = [0]
    for r in range(1, radius + 1):
        out += [sum(1 << b for b in bits) for bits in combinations(range(width), r)]
    return np.array(out, np.uint64)


def near_pairs(hashes: np.ndarray, threshold: int, block: int = 4096) -> np.ndarray:
    """All (i, j, distance) with i < j and Hamming(hashes[i], hashes[j]) <= threshold, without N^2 work.

    Pigeonhole: split the 64 bits into 3 chunks (21, 21, 22 bits); two hashes within `threshold` bits differ in
    at most threshold // 3 bits of some chunk. So for each chunk, every hash probes the sorted chunk values at
    all keys within that radius of its own (232 probes at threshold 8) and only the hits are compared in full.

    Returns:
        an (M, 3) int64 array, rows sorted by (i, j).
    """
    hashes = np.asarray(hashes, np.uint64)
    n = len(hashes)
    if n < 2:
        return np.zeros((0, 3), np.int64)
    found: List[np.ndarray] = []
    radius = threshold // 3
    for shift, width in ((0, 21), (21, 21), (42, 22)):
        keys = ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        # A dense table of every chunk value (4M entries at most): a probe is two array lookups, no search.
        bucket = np.bincount(keys, minlength=1 << width)
        first_at = np.cumsum(bucket) - bucket
        masks = _masks(width, radius).astype(np.int64)
        for start in range(0, n, block):
            ids = np.arange(start, min(n, start + block))
            probes = (keys[ids, None] ^ masks[None, :]).ravel()
            counts = bucket[probes]
            lo = first_at[probes]
            if not counts.any():
                continue
            owner = np.repeat(np.repeat(ids, len(masks)), counts)
            first = np.repeat(lo, counts)
            step = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            other = order[first + step]
            keep = owner < other
            owner, other = owner[keep], other[keep]
            dist = hamming(hashes[owner], hashes[other])
            ok = dist <= threshold
            found.append(np.stack([owner[ok], other[ok], dist[ok]], axis=1))
    if not found:
        return np.zeros((0, 3), np.int64)
    pairs = np.concatenate(found)
    # A pair can be found through several chunks; np.unique's first indices come in (i, j) order.
    _, first = np.unique(pairs[:, 0] * n + pairs[:, 1], return_index=True)
    return pairs[first]


# ---- reading ------------------------------------------------------------------------------------------------
def split_of(rec: Path, prefix: str) -> Tuple[str, str]:
    """(split name, role) of a .rec found for PREFIX: im2rec names them PREFIX[_CHUNK][_train|_val|_test]."""
    stem = rec.name[: -len(".rec")]
    base = Path(prefix).name
    name = stem[len(base):].lstrip("_") if stem.startswith(base) and not Path(prefix).is_dir() else stem
    for role in (TRAIN,) + HELD_OUT:
        if name == role or name.endswith("_" + role):
            return name, role
    return name or stem, "other"


def find_recs(prefix: str) -> List[Path]:
    """The splits of PREFIX, exactly: PREFIX.rec, PREFIX_train/_val/_test.rec and chunk files PREFIX_N[_split].rec
    (every .rec inside PREFIX when it is a folder). A glob PREFIX*.rec would also take PREFIXtest_test.rec, the
    splits of another prefix."""
    prefix = os.path.abspath(prefix)
    folder = Path(prefix if os.path.isdir(prefix) else os.path.dirname(prefix))
    if not folder.is_dir():
        raise ReportError(f"{folder}: folder of PREFIX {prefix} does not exist")
    if os.path.isdir(prefix):
        return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".rec"))
    if prefix.endswith(".lst"):  # a list as the prefix (im2rec's other form) packs exactly NAME.rec
        return [p for p in [Path(prefix[:-len(".lst")] + ".rec")] if p.is_file()]
    split = re.compile(re.escape(os.path.basename(prefix)) + r"(_\d+)?(_(train|val|test))?\.rec")
    return sorted(p for p in folder.iterdir() if p.is_file() and split.fullmatch(p.name))


def list_lines(lst: Path) -> Dict[int, Tuple[int, str]]:
    """record id -> (1-based line, image path) of the .lst beside a .rec (empty when there is none).

    The list is read (and checked) by recbuild.listing.read_list; line numbers count its non-blank lines the
    way that reader skips blank ones."""
    if not lst.is_file():
        return {}
    entries = read_list(str(lst))
    with open(lst, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        numbers = [n for n, line in enumerate(handle, start=1) if line.strip()]
    return {e.index: (n, e.path) for e, n in zip(entries, numbers)}


def _decode(data: bytes):
    return decode_stored(data)


def scan_rec(rec: Path, split: str, role: str, failures: List[str], use_stored: bool = True
             ) -> Tuple[List[Item], str]:
    """The Items of a .rec and where they came from ('pack-time fingerprints' or 'decoded').

    From the packer's NAME.fingerprints.npy when it still describes the .rec (nothing is read from the .rec
    then), else by reading the .rec in file order (one sequential pass) and fingerprinting every record."""
    lines = list_lines(rec.with_suffix(".lst"))
    rows = read_fresh(rec) if use_stored else None
    if rows is not None:
        log.info("%s: using the fingerprints computed at pack time", rec)
        return _stored_items(rec, split, role, rows, lines, failures), STORED
    items: List[Item] = []
    size = rec.stat().st_size
    with open(rec, "rb") as handle:
        try:
            for offset, payload in iter_records(handle, size):
                items += _record_item(rec, split, role, offset, payload, lines, failures)
        except RecordIOError as err:
            raise ReportError(f"{rec}: {err}; repack it or check it with `python -m recbuild verify {rec}`") \
                from None
    return items, DECODED


def _record_item(rec: Path, split: str, role: str, offset: int, payload: bytes, lines: Dict[int, Tuple[int, str]],
                 failures: List[str]) -> List[Item]:
    """The Item of one record ([] when its image does not decode; the failure is listed)."""
    header, body = unpack_header(payload)
    img = _decode(body) if body else None
    if img is None:
        failures.append(f"{rec}@{offset}: record {header.id} holds no decodable image")
        return []
    label = float(np.atleast_1d(header.label)[0]) if np.size(header.label) else None
    line, path = lines.get(header.id, (None, None))
    return [Item(split, role, str(rec), offset, int(header.id), label, line, path, int(img.shape[1]),
                 int(img.shape[0]), 1 if img.ndim == 2 else int(img.shape[2]), hashlib.sha1(body).hexdigest(),
                 pixel_digest(img), *fingerprint(img))]


def _stored_items(rec: Path, split: str, role: str, rows: np.ndarray, lines: Dict[int, Tuple[int, str]],
                  failures: List[str]) -> List[Item]:
    """The Items of a .rec from its fingerprint rows (recbuild/fingerprints.py), as _record_item would make them.

    Where a row has no pixel digest, the packer's deterministic encoder makes equal bytes the exact-duplicate
    key: the item's pixel key is then derived from its byte digest."""
    items: List[Item] = []
    for row in rows:
        rid, offset = int(row["id"]), int(row["offset"])
        if not row["decoded"]:
            failures.append(f"{rec}@{offset}: record {rid} holds no decodable image")
            continue
        byte_sha = bytes(row["byte_sha"]).ljust(20, b"\0").hex()
        pixels = bytes(row["pixel_sha"]).ljust(20, b"\0")
        pixel_sha = pixels.hex() if pixels.strip(b"\0") else "bytes:" + byte_sha
        line, path = lines.get(rid, (None, None))
        items.append(Item(split, role, str(rec), offset, rid, float(row["label"]), line, path, int(row["width"]),
                          int(row["height"]), int(row["channels"]), byte_sha, pixel_sha, int(row["phash"]),
                          np.array(row["thumb"], np.float16)))
    return items


def folder_split(folder: Path, packed: Sequence[str]) -> str:
    """The split name of --test-folder's images: the folder's name, or 'NAME (folder)' when a packed split has
    that name (a folder test/ is compared with the packed test split, never merged into it)."""
    name = folder.resolve().name or str(folder)
    return f"{name} (folder)" if name in packed else name


def with_origins(items: List[Item], rec: Path) -> List[Item]:
    """The items of one .rec with what the list beside it knows: the source file of every record (when the list
    recorded its folder), and no label when it was listed --unlabelled (its 0s are placeholders, not a class)."""
    lst = rec.with_suffix(".lst")
    root = listed_root(lst)
    unlabelled = listed_unlabelled(lst)
    return [replace(it, label=None if unlabelled else it.label,
                    origin=os.path.realpath(os.path.join(root, it.path)) if root and it.path else None)
            for it in items]


def scan_folder(folder: Path, failures: List[str], split: Optional[str] = None) -> List[Item]:
    """Fingerprint every image under a folder (recursively), e.g. a Kaggle test folder."""
    if not folder.is_dir():
        raise ReportError(f"{folder}: --test-folder is not a folder")
    items: List[Item] = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
        data = path.read_bytes()
        img = _decode(data)
        if img is None:
            failures.append(f"{path}: not a decodable image")
            continue
        items.append(Item(split or folder_split(folder, ()), "folder", str(path), -1, -1, None, None,
                          path.relative_to(folder).as_posix(), int(img.shape[1]), int(img.shape[0]),
                          1 if img.ndim == 2 else int(img.shape[2]), hashlib.sha1(data).hexdigest(),
                          pixel_digest(img), *fingerprint(img), origin=os.path.realpath(path)))
    return items


# ---- analysis -----------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """Two images that are copies: kind 'bytes' (same file bytes), 'pixels' (same decoded pixels) or 'near'
    (perceptual hashes within the threshold); `distance` is the hashes' Hamming distance."""
    a: int
    b: int
    kind: str
    distance: int


def find_pairs(items: Sequence[Item], threshold: int, max_mad: float = NEAR_MAX_MAD
               ) -> Tuple[List[Pair], np.ndarray, np.ndarray]:
    """Exact and near-duplicate pairs, plus each item's exact group and each group's near neighbours.

    Exact copies (same pixels) form groups; each group is listed as pairs from one member (a training one when
    the group has one, so every held-out copy is paired with a training image) to each other member. Near
    pairs are searched between one representative per group, so a thousand identical images cost one hash; a
    hash match counts only when the thumbnails differ by at most `max_mad` grey levels.

    Returns:
        (pairs, the exact group of each item, the near-duplicate group pairs as an (E, 2) array).
    """
    group_of: Dict[str, int] = {}
    group = np.array([group_of.setdefault(it.pixel_sha, len(group_of)) for it in items], np.int64)
    members: List[List[int]] = [[] for _ in group_of]
    for i, g in enumerate(group):
        members[g].append(i)
    pairs: List[Pair] = []
    for m in members:
        if len(m) < 2:
            continue
        m = sorted(m, key=lambda i: items[i].role != TRAIN)  # stable: a training member first, if any
        for other in m[1:]:
            kind = "bytes" if items[other].byte_sha == items[m[0]].byte_sha else "pixels"
            pairs.append(Pair(m[0], other, kind, 0))
    reps = np.array([m[0] for m in members], np.int64)
    near = near_pairs(np.array([items[r].phash for r in reps], np.uint64), threshold)
    if len(near):
        thumbs = np.stack([items[r].thumb for r in reps]).astype(np.float32)
        mad = np.abs(thumbs[near[:, 0]] - thumbs[near[:, 1]]).mean(axis=1)
        near = near[mad <= max_mad]
    for ga, gb, dist in near:
        a, b = reps[ga], reps[gb]
        if items[b].role == TRAIN and items[a].role != TRAIN:
            a, b = b, a
        pairs.append(Pair(int(a), int(b), "near", int(dist)))
    return pairs, group, near[:, :2]


def leakage(items: Sequence[Item], group: np.ndarray, near_groups: np.ndarray) -> Dict[str, Dict[str, int]]:
    """Per held-out split (val, test, a test folder): how many of its images have a copy (exact or near) in the
    training split. With no split named train, a single split is taken as the training set."""
    roles = {it.split: it.role for it in items}
    train_splits = {s for s, r in roles.items() if r == TRAIN} or (set(roles) if len(roles) == 1 else set())
    is_train = np.array([it.split in train_splits for it in items], bool)
    groups = int(group.max()) + 1 if len(group) else 0
    has_train = np.zeros(groups, bool)
    has_train[group[is_train]] = True
    touched = has_train.copy()
    for ga, gb in near_groups:
        if has_train[ga]:
            touched[gb] = True
        if has_train[gb]:
            touched[ga] = True
    out: Dict[str, Dict[str, int]] = {}
    for split, role in roles.items():
        if split in train_splits:
            continue
        mine = np.array([it.split == split for it in items], bool)
        out[split] = {"role": role, "images": int(mine.sum()), "with_copy_in_train": int(touched[group[mine]].sum())}
    return out


def split_summary(items: Sequence[Item], num_classes: int, min_images: int) -> dict:
    """Counts, class histogram and size statistics of one split's items; an unlabelled split (a test folder, a
    list made with --unlabelled) has no class counts."""
    labels = [int(it.label) for it in items if it.label is not None]
    if not labels:
        num_classes = 0
    hist = np.bincount(np.array(labels, np.int64), minlength=num_classes)[:max(num_classes, 1)] if labels else \
        np.zeros(num_classes, np.int64)
    w = np.array([it.width for it in items], np.float64)
    h = np.array([it.height for it in items], np.float64)

    def stats(v: np.ndarray) -> dict:
        if not len(v):
            return {}
        p = np.percentile(v, [0, 5, 50, 95, 100])
        return dict(zip(("min", "p5", "median", "p95", "max"), (float(x) for x in p)))
    sizes = Counter(f"{it.width}x{it.height}" for it in items).most_common(5)
    return {"records": len(items), "labelled": bool(labels), "class_counts": [int(c) for c in hist],
            "small_classes": [k for k, c in enumerate(hist) if 0 < c < min_images],
            "empty_classes": [k for k, c in enumerate(hist) if c == 0],
            "width": stats(w), "height": stats(h), "aspect": stats(w / np.maximum(h, 1)),
            "common_sizes": [[s, n] for s, n in sizes]}


def analyse(items: Sequence[Item], class_names: Sequence[str], threshold: int, min_images: int,
            max_mad: float = NEAR_MAX_MAD) -> dict:
    """Everything the report says, as JSON-ready data (pairs as item indices; `describe` names them)."""
    labelled = [int(it.label) for it in items if it.label is not None]
    num_classes = max(len(class_names), max(labelled) + 1 if labelled else 0)
    names = list(class_names) + [str(k) for k in range(len(class_names), num_classes)]
    splits = list(dict.fromkeys(it.split for it in items))
    summary = {s: split_summary([it for it in items if it.split == s], num_classes, min_images) for s in splits}
    present = {k for s in summary.values() for k, c in enumerate(s["class_counts"]) if c}
    for s in summary.values():  # a class empty here but present in another split
        s["empty_classes"] = [k for k in s["empty_classes"] if k in present]
    pairs, group, near_groups = find_pairs(items, threshold, max_mad)
    # A packed record and the file it was packed from (a --test-folder that was also packed) are not copies.
    pairs = [p for p in pairs if items[p.a].origin is None or items[p.a].origin != items[p.b].origin]
    between = Counter((tuple(sorted((items[p.a].split, items[p.b].split))), p.kind) for p in pairs)
    return {"class_names": names, "splits": summary, "pairs": pairs,
            "leakage": leakage(items, group, near_groups),
            "pair_counts": [{"splits": list(k), "kind": kind, "pairs": n} for (k, kind), n in sorted(between.items())]}


def describe(item: Item, class_names: Sequence[str]) -> dict:
    """How a pair member is named in the outputs: split, .lst line, path, record id, class."""
    label = None if item.label is None else int(item.label)
    return {"split": item.split, "line": item.line, "path": item.path, "id": item.record_id,
            "class": None if label is None else (class_names[label] if label < len(class_names) else str(label)),
            "source": item.source, "size": [item.width, item.height]}


# ---- outputs ------------------------------------------------------------------------------------------------
def _thumbnail(item: Item) -> str:
    """The item's image, re-read (by offset, or from its file) and inlined as a thumbnail."""
    from recbuild.html_report import thumbnail_uri
    if item.offset < 0:
        img = _decode(Path(item.source).read_bytes())
    else:
        with open(item.source, "rb") as handle:
            _, payload = next(iter_records(handle, os.path.getsize(item.source), item.offset))
            img = _decode(unpack_header(payload)[1])
    return thumbnail_uri(img)


def _class_histogram_png(report: dict) -> bytes:
    from recbuild.html_report import figure_png, pyplot
    plt = pyplot()
    names, splits = report["class_names"], report["splits"]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 3.6))
    splits = {k: v for k, v in splits.items() if v["labelled"]}
    width = 0.8 / max(1, len(splits))
    for k, (split, s) in enumerate(splits.items()):
        ax.bar(np.arange(len(names)) + k * width, s["class_counts"], width, label=f"{split} ({s['records']})")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="images", title="images per class")
    ax.legend(fontsize=8)
    return figure_png(fig)


def _size_png(items: Sequence[Item]) -> bytes:
    from recbuild.html_report import figure_png, pyplot
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for split in dict.fromkeys(it.split for it in items):
        mine = [it for it in items if it.split == split]
        w = np.array([it.width for it in mine], float)
        h = np.array([it.height for it in mine], float)
        for ax, values in zip(axes, (w, h, w / np.maximum(h, 1))):
            ax.hist(values, bins=30, alpha=0.6, label=split)
    for ax, title in zip(axes, ("width (px)", "height (px)", "aspect (width / height)")):
        ax.set(title=title, ylabel="images")
        ax.legend(fontsize=8)
    return figure_png(fig)


def _pair_card(items: Sequence[Item], pair: Pair, names: Sequence[str]) -> str:
    from recbuild.html_report import esc, image
    parts = []
    for i in (pair.a, pair.b):
        d = describe(items[i], names)
        where = (d["split"] + (f" line {d['line']}" if d["line"] else "")
                 + (f" id {d['id']}" if d["id"] >= 0 else ""))
        parts.append(image(_thumbnail(items[i]), d["path"] or d["source"], css="thumb",
                           title=f"{where}: {d['path'] or d['source']}") +
                     f"<br>{esc(where)}<br>{esc(d['path'] or Path(d['source']).name)}"
                     + (f"<br>class {esc(d['class'])}" if d["class"] is not None else ""))
    return (f'<div class="pair"><b>{esc(pair.kind)}</b> (distance {pair.distance})<br>'
            + "<br>".join(parts) + "</div>")


def render_html(report: dict, items: Sequence[Item], title: str, max_pairs: int = MAX_PAIRS_HTML) -> str:
    """The self-contained page."""
    from recbuild import html_report as H
    names = report["class_names"]
    leak = report["leakage"]
    leaked = sum(v["with_copy_in_train"] for v in leak.values())
    head = "; ".join(f"{v['with_copy_in_train']} of {v['images']} {s} images have a copy in train"
                     for s, v in leak.items()) or "no held-out split to compare with train"
    body = [H.paragraph(f"Leakage: {head}.", "headline" + ("" if leaked else " ok")),
            H.paragraph(f"{report['records']} records in {len(report['splits'])} split(s), read in "
                        f"{report['seconds']:.1f} s; near-duplicates: perceptual hashes within "
                        f"{report['threshold']} of 64 bits and 16x16 thumbnails within {report['max_mad']:g} grey "
                        f"levels. Sizes are those of the packed records.", "muted")]
    def named(ks: List[int]) -> str:
        return ", ".join(names[k] for k in ks) or "-"
    rows = [(s, v["records"], sum(1 for c in v["class_counts"] if c) if v["labelled"] else "unlabelled",
             min([c for c in v["class_counts"] if c] or [0]) if v["labelled"] else "-",
             named(v["small_classes"]), named(v["empty_classes"])) for s, v in report["splits"].items()]
    body.append(H.section("Splits", H.table(["split", "records", "classes", "smallest class",
                                              f"classes < {report['min_class_images']} images",
                                              "classes empty here but present elsewhere"], rows, left=1)))
    if report["splits"]:
        if any(v["labelled"] for v in report["splits"].values()):
            body.append(H.image(_class_histogram_png(report), "class histogram"))
        size_rows = [(s, v["width"].get("median"), v["height"].get("median"), v["aspect"].get("min"),
                      v["aspect"].get("median"), v["aspect"].get("max"),
                      ", ".join(f"{k} ({n})" for k, n in v["common_sizes"])) for s, v in report["splits"].items()]
        body.append(H.section("Image sizes", H.table(["split", "median width", "median height", "min aspect",
                                                      "median aspect", "max aspect", "commonest sizes"], size_rows),
                              H.image(_size_png(items), "size histograms")))
    counts = [(" / ".join(c["splits"]), c["kind"], c["pairs"]) for c in report["pair_counts"]]
    pairs = sorted(report["pairs"], key=lambda p: (items[p.a].split == items[p.b].split, p.distance))
    cards = [_pair_card(items, p, names) for p in pairs[:max_pairs]]
    more = (H.paragraph(f"The first {max_pairs} of {len(pairs)} pairs are shown; all are in the JSON.", "muted")
            if len(pairs) > max_pairs else "")
    body.append(H.section("Duplicates", H.table(["splits", "kind", "pairs"], counts, left=2) if counts
                          else H.paragraph("No exact or near-duplicate pairs."), more, "".join(cards)))
    if report["failures"]:
        body.append(H.section("Unreadable records", H.table(["problem"], [(f,) for f in report["failures"]])))
    return H.page(title, body)


def build_report(prefix: str, test_folder: Optional[str] = None, threshold: int = PHASH_THRESHOLD,
                 min_images: int = MIN_CLASS_IMAGES, max_mad: float = NEAR_MAX_MAD, use_stored: bool = True
                 ) -> Tuple[dict, List[Item]]:
    """Read every PREFIX*.rec (and the test folder) and analyse them. Returns (JSON-ready report, items).

    With `use_stored` (the default), a .rec packed with --report is read from its fingerprint file instead of
    being decoded; the report's "sources" says which way each .rec was read."""
    started = time.perf_counter()
    recs = find_recs(prefix)
    if not recs:
        raise ReportError(f"no .rec file starting with {os.path.abspath(prefix)}; pack the lists first")
    failures: List[str] = []
    items: List[Item] = []
    sources: Dict[str, str] = {}
    for rec in recs:
        split, role = split_of(rec, prefix)
        log.info("reading %s (%s)", rec, split)
        found, sources[str(rec)] = scan_rec(rec, split, role, failures, use_stored)
        items += with_origins(found, rec)
    if test_folder:
        packed = {it.split for it in items}
        items += scan_folder(Path(test_folder), failures, folder_split(Path(test_folder), packed))
    cmap = find_class_map(recs[0])
    names = read_class_map(cmap) if cmap else []
    report = analyse(items, names, threshold, min_images, max_mad)
    pairs = report.pop("pairs")
    report = {"format": FORMAT, "prefix": os.path.abspath(prefix), "recs": [str(r) for r in recs],
              "sources": sources,
              "test_folder": test_folder, "threshold": threshold, "max_mad": max_mad, "min_class_images": min_images,
              "records": sum(1 for it in items if it.role != "folder"), **report,
              "pairs_total": len(pairs), "failures": failures, "seconds": time.perf_counter() - started}
    report["pairs"] = pairs
    return report, items


def write_report(report: dict, items: Sequence[Item], json_path: Path, html_path: Optional[Path]) -> None:
    """The JSON (pairs named by split, line and path; at most MAX_PAIRS_JSON) and the HTML page, published as one
    unit when they share a folder (recbuild.publish, under the writer lock of PREFIX.report): a kill leaves both
    old or both new."""
    with publish(Path(json_path).with_suffix("")):
        _write_report(report, items, Path(json_path), html_path)


def _write_report(report: dict, items: Sequence[Item], json_path: Path, html_path: Optional[Path]) -> None:
    from recbuild.html_report import write_page
    names = report["class_names"]
    pairs = sorted(report["pairs"], key=lambda p: (items[p.a].split == items[p.b].split, p.distance))
    data = {k: v for k, v in report.items() if k != "pairs"}
    data["pairs"] = [{"kind": p.kind, "distance": p.distance, "a": describe(items[p.a], names),
                      "b": describe(items[p.b], names)} for p in pairs[:MAX_PAIRS_JSON]]
    write_json(json_path, data)
    if html_path is not None:
        write_page(html_path, render_html(report, items, f"Data report: {Path(report['prefix']).name}"))


def default_paths(prefix: str) -> Tuple[Path, Path]:
    """PREFIX.report.json / .html (inside PREFIX when it is a folder)."""
    base = Path(prefix) / "report" if os.path.isdir(prefix) else Path(prefix + ".report")
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".html")


def build_parser() -> argparse.ArgumentParser:
    """The `python -m recbuild report` command line."""
    p = argparse.ArgumentParser(prog="python -m recbuild report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prefix", help="the prefix the .rec files were packed under (PREFIX.rec, "
                                  "PREFIX_train/_val/_test.rec and chunk files PREFIX_N[_split].rec are read)")
    p.add_argument("--test-folder", default=None,
                   help="also check this image folder against the training set (a split of its own)")
    p.add_argument("--threshold", type=int, default=PHASH_THRESHOLD,
                   help="near-duplicate: perceptual hashes at most this many of 64 bits apart")
    p.add_argument("--max-mad", type=float, default=NEAR_MAX_MAD,
                   help="near-duplicate: and 16x16 grey thumbnails at most this many grey levels apart on average")
    p.add_argument("--min-class-images", type=int, default=MIN_CLASS_IMAGES,
                   help="flag classes with fewer images than this in a split")
    p.add_argument("--json", type=Path, default=None, help="default PREFIX.report.json")
    p.add_argument("--html", type=Path, default=None, help="default PREFIX.report.html")
    p.add_argument("--no-html", action="store_true", help="write only the JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m recbuild report PREFIX [--test-folder DIR] ...`."""
    p = build_parser()
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not 0 <= a.threshold <= 20:
        p.error(f"--threshold must be 0..20 bits, got {a.threshold}")
    json_path, html_path = default_paths(a.prefix)
    try:
        report, items = build_report(a.prefix, a.test_folder, a.threshold, a.min_class_images, a.max_mad)
        write_report(report, items, a.json or json_path, None if a.no_html else (a.html or html_path))
    except (ReportError, RecordIOError, ListError, PrefixBusy, PublishError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(output_error_line(err), file=sys.stderr)
        return 1
    print_summary(report, a.json or json_path, None if a.no_html else (a.html or html_path))
    return 0


def print_summary(report: dict, json_path: Path, html_path: Optional[Path]) -> None:
    """The lines a run prints: the leakage headline, each split, the pair count and where the files are."""
    for split, v in report["leakage"].items():
        print(f"leakage: {v['with_copy_in_train']} of {v['images']} {split} images have a copy in train")
    for split, v in report["splits"].items():
        small = f", {len(v['small_classes'])} class(es) under {report['min_class_images']} images"
        print(f"{split}: {v['records']} records" + ("" if v["labelled"] else " (unlabelled)")
              + (small if v["small_classes"] else "")
              + (f", {len(v['empty_classes'])} class(es) empty" if v["empty_classes"] else ""))
    print(f"{report['pairs_total']} duplicate pair(s); report {json_path}"
          + ("" if html_path is None else f" and {html_path}") + f" ({report['seconds']:.1f} s)")


def report_after_packing(prefix: str) -> int:
    """`python -m recbuild --report PREFIX ROOT`: the data report of every PREFIX*.rec, written to the default
    paths right after packing; the .recs just packed are read from their fingerprint files (no decode)."""
    json_path, html_path = default_paths(prefix)
    try:
        report, items = build_report(prefix)
        write_report(report, items, json_path, html_path)
    except (ReportError, RecordIOError, ListError, PrefixBusy, PublishError) as err:
        print(f"error: data report: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: data report: {output_error_line(err)[len('error: '):]}", file=sys.stderr)
        return 1
    print_summary(report, json_path, html_path)
    return 0
