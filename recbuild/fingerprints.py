"""Image fingerprints for the data report, and NAME.fingerprints.npy: the ones the packer computed with --report.

A fingerprint is what `python -m recbuild report` needs of one record without looking at it again: its size,
a digest of its stored bytes and (where it is not implied by them) of its decoded pixels, the 64-bit DCT
perceptual hash and the 16x16 grey thumbnail that confirms hash matches.

`python -m recbuild --report` computes them in the workers, from the image they have just transformed, and
writes NAME.fingerprints.npy beside NAME.rec (atomically, one row per record in record order) after the .rec
and .idx are in place; NAME.pack.json names it under "fingerprints". The report uses the file only while
NAME.pack.json still describes the .rec (same size) and the file has one row per record; otherwise it warns
and decodes the records.

Which image: the record holds the transformed image *encoded* (JPEG at --quality, or PNG). The packer hashes
the array it hands to the encoder (after the encoder's own fitting: 16 -> 8 bit and no alpha for JPEG), not the
re-decoded record: decoding the record again (and digesting its pixels) measured +10% CPU on bench.pack's photos
against +3.5% for this. The JPEG round trip (quality 95, 224 px) moves the thumbnail by at most 0.22 grey levels
(the report confirms within NEAR_MAX_MAD = 6) and the hash of 194 of those 200 photos not at all, of the other 6 by
2 bits (the report's PHASH_THRESHOLD is 8); flat synthetic images, whose DCT coefficients tie at the median, can
move by up to 9 bits, which can move a pair near the threshold across it. On the test trees (tests/test_reports.py,
tests/test_recbuild_pack.py) the pack-time report finds exactly the pairs the decoding report finds.
Exact copies: the packer's encoder is deterministic, so two records decode to the same pixels exactly when their
bytes are the same; their exact-duplicate key is then the byte digest. With --pass-through the record is the
source file, so the worker decodes those bytes the way the report does and stores the true pixel digest (that
costs a full decode per image).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from recbuild.atomic import atomic_open

log = logging.getLogger(__name__)

FORMAT = "mxtransfer.fingerprints/1"
SUFFIX = ".fingerprints.npy"
HASH_SIDE = 32             # pHash: grey image area-resized to 32x32, DCT, the 8x8 lowest frequencies
HASH_KEEP = 8
THUMB_SIDE = 16
# One row per record. pixel_sha is all zeros when the byte digest is the exact-duplicate key (see above);
# decoded is 0 for a record whose image does not decode (the report lists it as a failure).
ROW = np.dtype([("id", "<u8"), ("offset", "<i8"), ("label", "<f4"), ("decoded", "u1"), ("width", "<u4"),
                ("height", "<u4"), ("channels", "u1"), ("byte_sha", "S20"), ("pixel_sha", "S20"),
                ("phash", "<u8"), ("thumb", "<f2", (THUMB_SIDE * THUMB_SIDE,))])
PathLike = Union[str, Path]


def fingerprint(img: np.ndarray) -> Tuple[int, np.ndarray]:
    """(64-bit DCT perceptual hash, 16x16 grey thumbnail) of a decoded OpenCV image (grey, BGR, BGRA; any depth).

    The image is turned grey, area-resized to 32x32 (which removes the resolution and most JPEG noise), and of
    its 2-D DCT the 8x8 lowest frequencies are kept; bit k says whether coefficient k exceeds the median of
    the 63 non-DC coefficients. Comparisons to a median ignore brightness scale, so 8- and 16-bit copies agree.
    The thumbnail (in 8-bit grey levels) is the 32x32 image area-halved.
    """
    import cv2
    to_8bit = 1 / 257.0 if img.dtype == np.uint16 else 1.0  # the thumbnail compares in 8-bit grey levels
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        img = img[:, :, :3].astype(np.float32) @ np.array([0.114, 0.587, 0.299], np.float32)  # BGR luma
    small = cv2.resize(img.astype(np.float32), (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA)
    coeffs = cv2.dct(small)[:HASH_KEEP, :HASH_KEEP].ravel()
    bits = coeffs > np.median(coeffs[1:])
    thumb = cv2.resize(small, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA) * to_8bit
    return int.from_bytes(np.packbits(bits).tobytes(), "big"), thumb.astype(np.float16).ravel()


def pixel_digest(img: np.ndarray) -> str:
    """sha1 of the decoded pixels, shape and dtype included (equal digests: identical images)."""
    h = hashlib.sha1(f"{img.shape}{img.dtype}".encode())
    h.update(np.ascontiguousarray(img).data)
    return h.hexdigest()


def decode_stored(data: bytes) -> Optional[np.ndarray]:
    """A record's image decoded the way the report reads it (cv2.IMREAD_UNCHANGED), or None."""
    import cv2
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def image_row(body: bytes, encoded_from: Optional[np.ndarray]) -> tuple:
    """The worker's part of a row (every field but id, offset and label) for a record holding `body`.

    Args:
        body: the stored image bytes (the record without its header).
        encoded_from: the array the encoder made `body` from; None when `body` is the source file
            (--pass-through), which is then decoded here as the report would.
    """
    byte_sha = hashlib.sha1(body).digest()
    img, pixel_sha = encoded_from, b""
    if img is None:
        img = decode_stored(body)
        if img is None:
            return 0, 0, 0, 0, byte_sha, b"", 0, np.zeros(THUMB_SIDE * THUMB_SIDE, np.float16)
        pixel_sha = bytes.fromhex(pixel_digest(img))
    hash64, thumb = fingerprint(img)
    return (1, img.shape[1], img.shape[0], 1 if img.ndim == 2 else img.shape[2], byte_sha, pixel_sha, hash64,
            thumb)


def fingerprints_path(rec_path: PathLike) -> Path:
    """NAME.fingerprints.npy for NAME.rec."""
    rec_path = Path(rec_path)
    return rec_path.with_name(rec_path.stem + SUFFIX)


def write_fingerprints(rec_path: PathLike, rows: np.ndarray) -> Path:
    """Write the rows (dtype ROW, in record order) atomically beside `rec_path`; returns the path."""
    path = fingerprints_path(rec_path)
    with atomic_open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(rows, ROW), allow_pickle=False)
    return path


def read_fresh(rec_path: PathLike) -> Optional[np.ndarray]:
    """The packer's fingerprints of NAME.rec when they still describe it, else None (with a warning when a file
    exists but is stale or unreadable; silently when the .rec was packed without --report)."""
    from recbuild.packinfo import PackInfoError, read_pack_info
    rec_path = Path(rec_path)
    path = fingerprints_path(rec_path)
    try:
        info = read_pack_info(rec_path)
    except PackInfoError as err:
        if path.exists():
            log.warning("%s: ignored, its pack sidecar is unreadable (%s); decoding the records instead", path, err)
        return None
    named = info.fingerprints if info is not None else None
    if named is None:
        if path.exists():
            log.warning("%s: ignored, %s does not name it (packed again without --report?); decoding the records "
                        "instead", path, "NAME.pack.json" if info is None else info.path.name)
        return None
    path = rec_path.with_name(named)
    if info.current_bytes != info.rec_bytes:
        log.warning("%s: ignored, it describes a .rec of %d bytes and %s has %s; decoding the records instead",
                    path, info.rec_bytes, rec_path.name, info.current_bytes)
        return None
    try:
        rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        log.warning("%s: ignored, not a readable fingerprint file (%s); decoding the records instead", path, err)
        return None
    if rows.dtype != ROW or rows.ndim != 1 or len(rows) != info.records:
        log.warning("%s: ignored, expected %d rows of %s, found %s of %s; decoding the records instead", path,
                    info.records, FORMAT, rows.shape, rows.dtype)
        return None
    return rows
