"""What the trainer knows about a packed `.rec`: its pack sidecar and its record headers, each read once.

Two sources, cheapest first:

* **the pack sidecar** `NAME.pack.json` that recbuild writes beside `NAME.rec` (format `mxtransfer.pack/1`):
  the record count, the class histogram and how the images were transformed (resize, centre crop, colour,
  encoding). It is trusted only while its `rec_bytes` equals the file's size; old im2rec files have none.
* **the header scan**: the first label and the id of every record, read from the record headers only (no
  image is decoded). It is computed once per file and kept, keyed by the absolute path, size, mtime_ns and inode
  of the .rec and of its .idx, pack sidecar and NAME.crc32: in memory for the process (so a run never rescans
  per epoch: every ImageRecordIter pass asks for the record count), and on disk for files of
  DISK_CACHE_MIN_RECORDS records or DISK_CACHE_MIN_BYTES or more, so the next run on an ImageNet-sized file
  (1.28M records, ~140 GB) starts without minutes of header reads.

**Every file is checked before a reader gets it**, as part of that one scan (so once per file content): MXNet's
C++ reader aborts the process (SIGABRT) on a bad magic or an .idx offset that is not a record start and crashes
on an empty .idx, and nothing in RecordIO notices a changed byte. recbuild.integrity.reader_problems walks the
framing and the .idx (verify --quick's walk) and, where the packer recorded them in NAME.crc32, compares the
payload CRC32s: all of them for files up to CRC_FULL_CHECK_BYTES, an evenly spaced sample of about that many
bytes beyond. The pack sidecar's record count and class histogram are then compared with the headers. Any
mismatch is a DataError naming the file and `python -m recbuild verify`. Measured (docs/reliability-inputs.md):
12-17 us a record for the walk, plus ~1.3 ms per MB for the checksums (224-px JPEG records, page cache).

The disk cache lives in `REC_CACHE_DIR` (default `.cache/recinfo`, beside the feature cache, git-ignored;
`MXTRANSFER_REC_CACHE` moves it): not beside the data, which is often on a read-only or shared volume. One
small `.npz` per .rec path (labels float32 + ids int64: 12 bytes a record); a changed file overwrites it.
Nothing is lost when it cannot be written: the scan result is still used, with a debug note.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass, fields as dataclass_fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from recbuild import packinfo
from recbuild.atomic import atomic_path
from recbuild.integrity import Problem, reader_problems
from recbuild.recordio import IR_HEADER, RecordIOError, checksums_path, iter_frames, iter_records, unpack_header

log = logging.getLogger(__name__)

# Below this many records a header scan takes milliseconds: not worth a file on disk (and resampled epoch
# copies, rewritten every epoch under new names, would otherwise leave one cache file each).
DISK_CACHE_MIN_RECORDS = 10_000
# ... and a file this large is checked against its checksums for seconds: remembered too, whatever its count.
DISK_CACHE_MIN_BYTES = 256 << 20
REC_CACHE_DIR = Path(os.environ.get("MXTRANSFER_REC_CACHE", ".cache/recinfo"))
_MEMORY_ENTRIES = 16          # files remembered per process: train, val, test, a few epochs' copies
# /2: a cached scan also means "checked" (reader_problems and the sidecar counts); /1 entries were not.
_SCAN_FORMAT = "mxtransfer.recscan/2"
# Up to this size every record's payload CRC32 is compared at start-up (a whole read of the file: ~6 s from the
# page cache at the measured ~1.3 ms per MB); a larger file gets an evenly spaced sample of about this many bytes,
# and a warning that `python -m recbuild verify` checks them all.
CRC_FULL_CHECK_BYTES = 4 << 30
# The check shows a progress bar (on a terminal) from this size.
_PROGRESS_MIN_BYTES = 256 << 20


class DataError(ValueError):
    """A data file is missing, corrupt or inconsistent with the model; the message names it.

    (Defined here, the lowest module of train/, and re-exported as train.data.DataError.)"""


# ---- the pack sidecar -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackTransform:
    """How recbuild turned each source image into a record (its PackConfig, as recorded in the sidecar).

    Attributes:
        resize: short edge in pixels after the optional centre crop (0: kept at the decoded size).
        center_crop: a centred square of the short edge was cut first.
        color: the decode flag, 1 colour, 0 greyscale, -1 unchanged.
        encoding: '.jpg' or '.png'.
        quality: JPEG quality or PNG compression level.
        pass_through: the file bytes were stored undecoded (no transform at all).
    """
    resize: int = 0
    center_crop: bool = False
    color: int = 1
    encoding: str = ".jpg"
    quality: int = 95
    pass_through: bool = False

    def describe(self) -> str:
        if self.pass_through:
            return "stored as the original files (--pass-through)"
        size = "kept at their own size" if not self.resize else (
            f"{self.resize}x{self.resize}" if self.center_crop else f"short edge {self.resize}")
        crop = "centre-cropped square, " if self.center_crop and not self.resize else ""
        return f"{crop}{size}, {self.encoding} q{self.quality}"


@dataclass(frozen=True)
class PackInfo:
    """The pack sidecar of one .rec, read defensively (unknown keys ignored)."""
    path: Path
    records: Optional[int]
    label_width: int
    class_counts: Optional[List[int]]
    transform: PackTransform


def pack_sidecar_path(rec_path) -> Path:
    """`NAME.pack.json` beside `NAME.rec` (recbuild.packinfo names it)."""
    return packinfo.pack_info_path(rec_path)


def read_pack_info(rec_path) -> Optional[PackInfo]:
    """The pack sidecar of `rec_path`, or None when there is none or it describes another file.

    recbuild.packinfo parses and checks the file (one reader of the format); here a sidecar whose `rec_bytes`
    differs from the .rec's size, which belongs to an earlier pack (the .rec was rewritten, e.g. by im2rec),
    is ignored with a warning, since nothing in it can be trusted for this file.

    Raises:
        DataError: the sidecar exists but is not valid JSON of format mxtransfer.pack/1, or its fields have the
            wrong types; the message names the file and the field.
    """
    try:
        found = packinfo.read_pack_info(rec_path)
    except packinfo.PackInfoError as err:
        raise DataError(str(err)) from None
    if found is None:
        return None
    if found.current_bytes is not None and not found.matches_rec:
        log.warning("%s: describes a .rec of %s bytes, %s has %d; ignored (re-pack to refresh it)", found.path,
                    found.rec_bytes, rec_path, found.current_bytes)
        return None
    known = {f.name for f in dataclass_fields(PackTransform)}
    transform = PackTransform(**{k: v for k, v in found.transform.items() if k in known})
    return PackInfo(found.path, found.records, found.label_width, found.class_counts, transform)


# ---- the header scan, cached ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecScan:
    """First label and id of every record, in file order."""
    labels: np.ndarray
    ids: np.ndarray

    @property
    def records(self) -> int:
        return int(self.labels.size)


Fingerprint = Tuple[str, int, int, int, tuple]
_memory: "OrderedDict[Fingerprint, RecScan]" = OrderedDict()


def fingerprint(rec_path) -> Fingerprint:
    """(absolute path, size, mtime_ns, inode, companions): what identifies a .rec's content cheaply. The inode
    catches a same-size file renamed into place within one tick of the file-system clock (atomic writes do that);
    companions are (size, mtime_ns, inode) of the .idx, pack sidecar and NAME.crc32 (None where absent), which
    the check read: a damaged .idx beside an unchanged .rec is checked again."""
    path = Path(rec_path)
    st = path.stat()
    companions = []
    for other in (path.with_suffix(".idx"), pack_sidecar_path(path), checksums_path(path)):
        try:
            ost = other.stat()
            companions.append((ost.st_size, ost.st_mtime_ns, ost.st_ino))
        except OSError:
            companions.append(None)
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, tuple(companions)


def scan(rec_path) -> RecScan:
    """The checked header scan of `rec_path`, from memory, the disk cache, or the file (then remembered).

    Raises:
        DataError: the file is missing, is not RecordIO, is truncated or damaged, its .idx or NAME.crc32 does
            not match it, or its pack sidecar's counts do not (see check_records); the message names the file.
    """
    path = Path(rec_path)
    if not path.is_file():
        raise DataError(f"{path}: no such .rec file")
    key = fingerprint(path)
    if key in _memory:
        _memory.move_to_end(key)
        return _memory[key]
    found = _read_disk(key)
    if found is None:
        found = _scan_file(path)
        if found.records >= DISK_CACHE_MIN_RECORDS or key[1] >= DISK_CACHE_MIN_BYTES:
            _write_disk(key, found)
    _memory[key] = found
    while len(_memory) > _MEMORY_ENTRIES:
        _memory.popitem(last=False)
    return found


def _scan_file(path: Path) -> RecScan:
    """check_records, then the header scan, then the pack sidecar's counts against it."""
    info = read_pack_info(path)
    check_records(path)
    found = _read_headers(path)
    if info is not None:
        _check_sidecar_counts(path, info, found)
    return found


def check_records(rec_path) -> None:
    """Refuse a .rec that a reader must not be given (recbuild.integrity.reader_problems: framing, the .idx, the
    payload checksums; see the module docstring for what is read).

    Raises:
        DataError: one line naming the file, the first problem, how many more, and `python -m recbuild verify`.
    """
    path = Path(rec_path)
    size = path.stat().st_size
    stride = max(1, -(-size // CRC_FULL_CHECK_BYTES))
    progress = size >= _PROGRESS_MIN_BYTES and sys.stderr.isatty()
    if size >= _PROGRESS_MIN_BYTES:
        log.info("%s: checking its framing, .idx and checksums before it is read (%.1f GB, once per file)", path,
                 size / 1e9)
    try:
        problems = reader_problems(path, progress=progress, crc_stride=stride)
    except OSError as err:          # an unreadable .idx or .crc32 (permissions, I/O error): named, not a traceback
        raise DataError(f"{err.filename or path}: cannot be read ({err.strerror or err})") from None
    if problems:
        raise damage_error(path, problems)
    if stride > 1 and checksums_path(path).is_file():
        log.warning("%s: %.0f GB: the payload checksums of 1 record in %d were compared at start-up; `python -m "
                    "recbuild verify %s` compares them all", path, size / 1e9, stride, path)


def damage_error(path: Path, problems: List[Problem]) -> DataError:
    """The one-line error for a damaged .rec: what it is, the problem that says most, and where to look."""
    headline, shown = "damaged", problems[0]
    for problem in problems:
        if problem.kind == "framing" and problem.offset == 0:
            headline, shown = "not a RecordIO file (or damaged from its first byte)", problem
            break
        if problem.kind == "cut-short":
            headline, shown = "truncated", problem
            break
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return DataError(f"{path}: {headline}: [{shown.kind}] {shown.message}{more}; not handed to MXNet's reader; "
                     f"`python -m recbuild verify {path}` lists every problem (re-pack it, or restore it)")


def _check_sidecar_counts(path: Path, info: PackInfo, found: "RecScan") -> None:
    """The sidecar's record count and class histogram equal what the headers say: training trusts them for the
    epoch length and the class checks (a count x10, or a header label changed to another class, would
    otherwise train silently)."""
    verify = f"`python -m recbuild verify {path}` checks the file"
    if info.records != found.records:
        raise DataError(f"{info.path}: says {info.records} records, {path} holds {found.records}; one of them is "
                        f"damaged or they belong to different packs; {verify}")
    if info.class_counts is None:
        return
    labels = found.labels
    counted = np.asarray(info.class_counts, np.int64)
    # Not a class index, or one past what the sidecar counts (checked before bincount, which would allocate up to
    # the largest label: a header label changed to 1e9 must not cost 8 GB).
    bad = labels[~np.isfinite(labels) | (labels != np.round(labels)) | (labels < 0) | (labels >= counted.size)]
    if bad.size:
        raise DataError(f"{path}: a record header has label {bad[0]:g}, which {info.path} does not count (its "
                        f"labels are class indices 0..{counted.size - 1}); {verify}")
    headers = np.bincount(labels.astype(np.int64), minlength=counted.size)
    if not np.array_equal(headers, counted):
        uncounted = np.flatnonzero((headers > 0) & (counted == 0))
        label = int(uncounted[-1] if uncounted.size else np.flatnonzero(headers != counted)[0])
        raise DataError(f"{path}: {headers[label]} record(s) have label {label} in their headers, {info.path} "
                        f"counted {counted[label]}: a header was changed or the files belong to different packs; "
                        f"{verify}")


def _read_headers(path: Path) -> RecScan:
    labels: List[float] = []
    ids: List[int] = []
    try:
        with open(path, "rb") as handle:
            for frame in iter_frames(handle, path.stat().st_size):
                if frame.cflag not in (0, 1):     # only a whole record or a first part carries the header
                    continue
                payload = handle.read(min(frame.length, IR_HEADER.size + 4))
                if len(payload) < IR_HEADER.size:
                    raise DataError(f"{path}: truncated record at byte {frame.offset}")
                flag, label, record_id, _ = IR_HEADER.unpack_from(payload)
                ids.append(record_id)
                if flag > 0:  # label arrays: the first float follows the header
                    label = struct.unpack_from("<f", payload, IR_HEADER.size)[0]
                labels.append(label)
    except RecordIOError as err:
        raise framing_error(path, err) from None
    return _frozen(np.asarray(labels, np.float32), np.asarray(ids, np.int64))


def _frozen(labels: np.ndarray, ids: np.ndarray) -> RecScan:
    """A scan with read-only arrays: every caller shares the cached copy, so none may change it."""
    labels.setflags(write=False)
    ids.setflags(write=False)
    return RecScan(labels, ids)


def framing_error(path: Path, err: RecordIOError) -> DataError:
    """The trainer's wording of a broken .rec (recbuild's reader found it)."""
    if err.kind == "magic":
        return DataError(f"{path}: not a RecordIO file (bad magic at byte {err.offset}); pack it with "
                        "`python -m recbuild`")
    if err.kind == "cflag":
        return DataError(f"{path}: corrupt record at byte {err.offset} ({err}); re-pack it")
    return DataError(f"{path}: truncated record at byte {err.offset} (the file ends inside it); re-pack it")


def _cache_file(key: Fingerprint) -> Path:
    digest = hashlib.sha256(key[0].encode("utf-8")).hexdigest()[:16]
    return REC_CACHE_DIR / f"{Path(key[0]).stem}-{digest}.npz"


def _meta(key: Fingerprint) -> dict:
    # Through JSON and back, so that it compares equal to what _read_disk loads (tuples become lists).
    return json.loads(json.dumps({"format": _SCAN_FORMAT, "path": key[0], "size": key[1], "mtime_ns": key[2],
                                  "inode": key[3], "companions": key[4]}))


def _read_disk(key: Fingerprint) -> Optional[RecScan]:
    path = _cache_file(key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta != _meta(key):
                return None
            return _frozen(z["labels"], z["ids"])
    except (OSError, ValueError, KeyError) as err:  # a damaged cache file is rescanned, never trusted
        log.debug("%s: unreadable header cache (%s); rescanning", path, err)
        return None


def _write_disk(key: Fingerprint, found: RecScan) -> None:
    meta = _meta(key)
    buffer = io.BytesIO()
    np.savez(buffer, labels=found.labels, ids=found.ids, meta=np.array(json.dumps(meta)))
    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())
    except OSError as err:
        log.debug("%s: header cache not written (%s)", path, err)


def sample_sizes(rec_path, count: int = 8) -> List[Tuple[int, int]]:
    """(width, height) of the first `count` records' images, from their encoded headers (nothing decoded).

    Records whose format does not state a size (or a .rec that cannot be read) are left out; this is a hint
    for start-up messages, never a check.
    """
    from recbuild.images import sniff
    path = Path(rec_path)
    sizes: List[Tuple[int, int]] = []
    try:
        with open(path, "rb") as handle:
            for _, payload in iter_records(handle, path.stat().st_size):
                info = sniff(unpack_header(payload)[1])
                if info.width and info.height:
                    sizes.append((info.width, info.height))
                count -= 1
                if count <= 0:
                    break
    except (OSError, RecordIOError):
        return sizes
    return sizes


def summary(rec_path) -> Tuple[int, Optional[np.ndarray]]:
    """(record count, class histogram or None) of a checked file (scan: once per file): the histogram is the pack
    sidecar's, which the check found equal to the headers', or None without one."""
    found = scan(rec_path)
    info = read_pack_info(rec_path)
    if info is not None and info.class_counts is not None:
        return found.records, np.asarray(info.class_counts, np.int64)
    return found.records, None


def forget() -> Dict[str, int]:
    """Empty the in-memory cache (tests use it to see what a fresh process would do)."""
    size = len(_memory)
    _memory.clear()
    return {"forgotten": size}
