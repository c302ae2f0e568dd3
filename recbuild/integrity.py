"""`python -m recbuild verify NAME.rec [...]`: is a packed file intact, record by record? Exit 1 on any damage.

What is checked, per NAME.rec (each problem is one line naming its kind and, where known, the record's .idx key,
byte offset, .lst line and source path):

- the file passed is a .rec (an .idx or .lst passed by mistake is named, with the .rec to pass instead);
- `size`: the size is a multiple of 4 (ImageRecordIter refuses the whole file otherwise);
- `framing`: every record starts with the RecordIO magic and a valid continuation flag, split records are
  complete; after a damaged frame the walk resynchronises on the next record start, as a reader by index does,
  so one bad magic number is one problem and the records after it are still checked;
- `cut-short`: the last record ends inside the file;
- the .idx: `idx-malformed` lines, `idx-duplicate-key`, `idx-duplicate-offset` (two keys on one record),
  `idx-not-record` (an offset that is not a record start), `idx-order` (offsets not increasing: the packer writes
  them in file order), `not-indexed` (a record no line points at: a missing line);
- `header`: the image header is complete; `header-id`: its id equals the .idx key (im2rec writes both from the
  list index);
- `label`: with NAME.lst beside it, the header's flag and labels equal the list's (one label, or every label
  with --pack-label);
- `decode`: the image decodes; `decoder-warning`: it decodes without libjpeg/libpng reporting damaged data
  (captured per image, see recbuild/decoder_messages.py);
- `checksum`: for files recbuild packed (NAME.crc32, named by a NAME.pack.json that still matches the .rec's
  size), the payload's CRC32 is the one the packer recorded: any changed byte, even one that decodes cleanly;
- with NAME.lst: `list-missing` (a listed id neither packed nor in NAME.errors.tsv), `list-extra` (a packed id
  the list does not have), `list-order` (records not in list order).

`--quick` checks framing, the .idx and the list ids only: no payload is read beyond frame headers, no decode.
What it cannot see: in files without our checksums (im2rec's, the recipes' resampled copies), a change inside an
image's data that still decodes cleanly (RecordIO has no checksum of its own); and whether a label is the right
one for its image.
Prints the number of records per class (names from the class map when there is one) and how many indexed
records a reader by index (mx.recordio, ImageRecordIter) still gets intact.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from recbuild.classmap import find_class_map, read_class_map
from recbuild.listing import Entry, ListError, read_list
from recbuild.names import display_name
from recbuild.recordio import IR_HEADER, MAGIC, RecordIOError, checksums_path, read_checksums, unpack_header

# Problems printed in full before "... and N more"; ids listed in one problem line.
_SHOW = 20
# Bytes read at a time while looking for the next record start after damage.
_RESYNC_CHUNK = 1 << 20
_MAGIC_BYTES = struct.pack("<I", MAGIC)


@dataclass
class Problem:
    """One kind of damage at one place.

    Attributes:
        kind: the check that failed (see the module docstring).
        message: the one-line description, naming the record.
        key: the record's .idx key, when known.
        offset: the byte offset in the .rec, when known.
    """
    kind: str
    message: str
    key: Optional[int] = None
    offset: Optional[int] = None


@dataclass
class VerifyResult:
    """Counts and problems found in one .rec.

    Attributes:
        rec: the file checked.
        records: records found by the framing walk.
        indexed: .idx lines that point at a record start.
        readable: indexed records a reader by index gets intact (framing, header and, unless --quick, image).
        per_class: records per first label (not in --quick mode).
        problems: every problem, in the order found.
    """
    rec: Path
    records: int = 0
    indexed: int = 0
    readable: int = 0
    per_class: Dict[object, int] = field(default_factory=collections.Counter)
    problems: List[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, message: str, key: Optional[int] = None, offset: Optional[int] = None) -> None:
        self.problems.append(Problem(kind, message, key, offset))


@dataclass
class _Span:
    """A record the framing walk found: [offset, end) holds its frames; parts are (payload offset, length)."""
    offset: int
    end: int
    parts: List[Tuple[int, int]]


# ---- the framing walk ----------------------------------------------------------------------------------------

def _next_start(handle: BinaryIO, size: int, offset: int) -> int:
    """The next 4-byte-aligned RecordIO magic at or after `offset` (the writer splits a payload at any aligned
    magic, so one there is a frame start), or `size`."""
    offset += -offset % 4
    while offset < size:
        handle.seek(offset)
        chunk = handle.read(min(_RESYNC_CHUNK, size - offset) + 3)
        hit = chunk.find(_MAGIC_BYTES)
        while hit != -1 and hit % 4:
            hit = chunk.find(_MAGIC_BYTES, hit + 1)
        if hit != -1:
            return offset + hit
        offset += _RESYNC_CHUNK
    return size


def _walk(handle: BinaryIO, size: int) -> Tuple[List[_Span], Dict[int, Problem]]:
    """Every record of the .rec from its frame headers, resynchronising after damage.

    Returns:
        (records in file order, {offset: problem} for damage found at a place where a record should start).
    """
    spans: List[_Span] = []
    damage: Dict[int, Problem] = {}
    offset, current = 0, None
    while offset < size:
        handle.seek(offset)
        head = handle.read(8)
        magic, lrec = struct.unpack("<II", head) if len(head) == 8 else (None, 0)
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        if magic is None or (magic == MAGIC and offset + 8 + length > size):
            at = current.offset if current else offset
            need = (offset + 8 + length - at) if magic is not None else 8
            damage[at] = Problem("cut-short", f"cut short: the record needs at least {need} bytes from offset {at}, "
                                              f"the file ends {size - at} bytes after it", offset=at)
            return spans, damage
        if magic == MAGIC and cflag in (0, 1) and current is not None:
            # A new record begins while a split one is unfinished: that one lost its last part; this one is fine.
            damage[current.offset] = Problem("framing", f"split record unfinished: a new record starts at offset "
                                                        f"{offset}", offset=current.offset)
            current = None
            continue
        if magic != MAGIC or cflag > 3 or (cflag in (2, 3) and current is None):
            at = current.offset if current is not None else offset
            what = (f"bad magic 0x{magic:08x}" if magic != MAGIC else f"invalid continuation flag {cflag}"
                    if cflag > 3 else "a continuation part without its first part")
            damage.setdefault(at, Problem("framing", f"{what} at offset {offset}", offset=at))
            current = None
            offset = _next_start(handle, size, offset + 4)
            continue
        if current is None:
            current = _Span(offset, 0, [])
        current.parts.append((offset + 8, length))
        offset += 8 + length + (-length % 4)
        if cflag in (0, 3):
            current.end = offset
            spans.append(current)
            current = None
    if current is not None:
        damage[current.offset] = Problem("cut-short", "cut short: the file ends inside a split record",
                                         offset=current.offset)
    return spans, damage


def _payload(handle: BinaryIO, span: _Span) -> bytes:
    pieces = []
    for start, length in span.parts:
        handle.seek(start)
        pieces.append(handle.read(length))
    return _MAGIC_BYTES.join(pieces)


# ---- the index -----------------------------------------------------------------------------------------------

def _read_idx(idx: Path, size: int, where: "_Where", res: VerifyResult
              ) -> Tuple[List[Tuple[int, int, int]], Set[int]]:
    """Parse the .idx.

    Returns:
        ((line number, key, offset) of every line to check, offsets named by lines that were reported and set
        aside: a duplicate key or a second key on one record, which must not also count as a missing line).
    """
    lines: List[Tuple[int, int, int]] = []
    set_aside: Set[int] = set()
    key_line: Dict[int, int] = {}
    offset_line: Dict[int, int] = {}
    last = -1
    with open(idx, encoding="ascii", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            try:
                key, off = int(parts[0]), int(parts[1])
                if len(parts) != 2 or key < 0 or off < 0:
                    raise ValueError
            except (ValueError, IndexError):
                res.add("idx-malformed", f"{idx.name}:{line_no}: expected '<key>\\t<offset>', got {line.rstrip()!r}")
                continue
            if key in key_line:
                res.add("idx-duplicate-key", f"{idx.name}:{line_no}: key {key} again (first on line "
                                             f"{key_line[key]}), now at offset {off}; the first is {where(key, None)}",
                        key, off)
                set_aside.add(off)
                continue
            if off in offset_line:
                res.add("idx-duplicate-offset", f"{idx.name}:{line_no}: key {key} points at offset {off}, as line "
                        f"{offset_line[off]} does (a reader by index gets an empty record for one of them)", key, off)
                continue
            if off < last:
                res.add("idx-order", f"{idx.name}:{line_no}: {where(key, off)} comes after offset {last}: the lines "
                                     "are not in file order", key, off)
            key_line[key], offset_line[off] = line_no, line_no
            if off < size:
                last = off
            lines.append((line_no, key, off))
    return lines, set_aside


# ---- one record ----------------------------------------------------------------------------------------------

class _Where:
    """Names a record in a problem line: key, offset, list line and source path where known."""

    def __init__(self, listed: Dict[int, Entry], lst: Optional[Path]):
        self.listed, self.lst = listed, lst

    def __call__(self, key: Optional[int], offset: Optional[int]) -> str:
        bits = [] if key is None else [f"key {key}"]
        if offset is not None:
            bits.append(f"offset {offset}")
        entry = self.listed.get(key) if key is not None else None
        if entry is not None:
            bits.append(f"{self.lst.name} line {entry.line}: {display_name(entry.path)}")
        return "record " + ", ".join(bits)


def _check_record(payload: bytes, key: int, span: _Span, entry: Optional[Entry], checks: _Checks, where: _Where,
                  res: VerifyResult, crc: Optional[int] = None) -> bool:
    """Header, labels, image and (when the packer recorded one) checksum of one indexed record; True when it is
    intact. A checksum mismatch is reported only when no other check explains it: one problem per damage."""
    try:
        header, body = unpack_header(payload)
    except RecordIOError as err:
        res.add("header", f"{where(key, span.offset)}: {err}", key, span.offset)
        return False
    intact = True
    if checks.ids and header.id != key:
        res.add("header-id", f"{where(key, span.offset)}: header id {header.id} != .idx key {key}", key, span.offset)
        intact = False
    labels = [float(header.label)] if header.flag == 0 else [float(v) for v in header.label]
    res.per_class[labels[0]] += 1
    # The header stores float32: compare the list's labels as the packer stored them (0.1 is not float32(0.1)).
    listed = [float(v) for v in np.float32(entry.labels)] if entry is not None else []
    if entry is not None and (labels != listed[:len(labels)] or header.flag not in (0, len(listed))):
        res.add("label", f"{where(key, span.offset)}: header flag {header.flag} labels {labels} != list labels "
                         f"{list(entry.labels)}", key, span.offset)
        intact = False
    if checks.decode:
        intact &= _check_image(body, where(key, span.offset), key, span.offset, res)
    if intact and crc is not None and zlib.crc32(payload) != crc:
        still = " although it still decodes" if checks.decode else ""
        res.add("checksum", f"{where(key, span.offset)}: the payload differs from what the packer wrote (CRC32 "
                            f"{zlib.crc32(payload):08x}, recorded {crc:08x}){still}", key, span.offset)
        intact = False
    return intact


def _check_image(body: bytes, name: str, key: int, offset: int, res: VerifyResult) -> bool:
    import cv2

    from recbuild.images import ImageError, imdecode_checked
    try:
        img, damage = imdecode_checked(body, cv2.IMREAD_UNCHANGED) if body else (None, "")
    except ImageError as err:
        img, damage = None, str(err)
    if img is None:
        res.add("decode", f"{name}: image does not decode ({len(body)} bytes)", key, offset)
        return False
    if damage:
        res.add("decoder-warning", f"{name}: the image decodes only with the decoder reporting {damage!r}", key,
                offset)
        return False
    return True


# ---- the whole file ------------------------------------------------------------------------------------------

def _wrong_file(rec: Path) -> Optional[str]:
    suffix = rec.suffix.lower()
    if suffix in (".idx", ".lst"):
        what = "the index" if suffix == ".idx" else "the image list"
        return f"{rec}: this is {what}, not the packed file; pass {rec.with_suffix('.rec')}"
    return None


def verify_rec(rec: Path, decode: bool = True, progress: bool = True, quick: bool = False) -> VerifyResult:
    """Run every check on one .rec (see the module docstring); `quick` skips payloads and decoding."""
    rec = Path(rec)
    res = VerifyResult(rec)
    wrong = _wrong_file(rec)
    if wrong:
        res.add("wrong-file", wrong)
        return res
    idx = rec.with_suffix(".idx")
    for path, hint in ((rec, "no such file"), (idx, "missing (an interrupted pack leaves a .rec without .idx; pack "
                                                     "again)")):
        if not path.is_file():
            res.add("missing-file", f"{path}: {hint}")
            return res
    listed, lst = _read_lst(rec, res)
    _check_class_map(rec, res)
    packed_ids, in_file_order = _check_file(rec, res, _Where(listed, lst), _Checks(decode and not quick, quick),
                                            progress)
    _check_against_list(rec, lst, listed, packed_ids, in_file_order, res)
    return res


@dataclass(frozen=True)
class _Checks:
    """What is checked of each indexed record. decode: the image; quick: nothing past the frame headers (no
    payload read); ids: the header id against the .idx key (a reader never uses it, so reader_problems does not
    ask); stride: a sampled check of a file too large to read whole at start-up."""
    decode: bool
    quick: bool
    ids: bool = True
    stride: int = 1         # read the payload of every stride-th indexed record only (the others as with quick)


def _check_file(rec: Path, res: VerifyResult, where: "_Where", checks: _Checks, progress: bool
                ) -> Tuple[Set[int], List[int]]:
    """Size, framing, the .idx (which must exist) and each indexed record; see _check_index for the result."""
    size = rec.stat().st_size
    if size % 4:
        res.add("size", f"{rec.name}: {size} bytes, not a multiple of 4 (cut short or appended to): "
                        "ImageRecordIter refuses the whole file")
    crcs = _checksums(rec, res)
    with open(rec, "rb") as handle:
        spans, damage = _walk(handle, size)
        res.records = len(spans)
        lines, set_aside = _read_idx(rec.with_suffix(".idx"), size, where, res)
        _check_checksum_keys(rec, lines, crcs, res)
        return _check_index(handle, spans, damage, lines, set_aside, where, res, checks, progress, crcs)


# Damage a reader of the .rec meets: MXNet's C++ reader aborts the process on a bad magic or an .idx offset that
# is not a record start, crashes on an empty .idx, refuses a size that is not a multiple of 4; a record no .idx
# line names is never read, and a changed byte (checksum) trains on other data than was packed. The other kinds
# (header id vs key, labels vs the .lst, the list checks, decoding) are verify's own findings.
READER_KINDS = frozenset({"size", "framing", "cut-short", "idx-malformed", "idx-duplicate-key",
                          "idx-duplicate-offset", "idx-not-record", "idx-order", "not-indexed", "header", "checksum",
                          "checksum-file", "pack-info"})


def reader_problems(rec: Path, progress: bool = False, crc_stride: int = 1) -> List[Problem]:
    """What makes `rec` unsafe or wrong to hand to a reader (ImageRecordIter, mx.recordio): the `--quick` walk of
    the framing and the .idx, plus, where the packer recorded them (NAME.crc32), the payload CRC32 of every
    `crc_stride`-th record (all of them by default, which reads the whole file once). Nothing is decoded and the
    .lst is not read. A .rec without an .idx (readers then go through it in order) gets the framing walk alone.
    [] when the file is sound for readers."""
    rec = Path(rec)
    res = VerifyResult(rec)
    if rec.with_suffix(".idx").is_file():
        checks = _Checks(decode=False, quick=_checksum_file_named(rec) is None, ids=False, stride=max(1, crc_stride))
        _check_file(rec, res, _Where({}, None), checks, progress)
    else:
        size = rec.stat().st_size
        if size % 4:
            res.add("size", f"{rec.name}: {size} bytes, not a multiple of 4 (cut short or appended to)")
        with open(rec, "rb") as handle:
            spans, damage = _walk(handle, size)
        res.records = len(spans)
        for off, problem in sorted(damage.items()):
            res.add(problem.kind, f"record at offset {off}: {problem.message}", None, off)
    return [p for p in res.problems if p.kind in READER_KINDS]


def _checksum_file_named(rec: Path) -> Optional[str]:
    """NAME.crc32's name when NAME.pack.json names it and still describes this .rec (a .rec replaced since, by
    another packer, must not be judged by the old sums); None otherwise, also for a damaged sidecar (which
    _checksums reports)."""
    from recbuild.packinfo import PackInfoError, read_pack_info
    try:
        info = read_pack_info(rec)
    except PackInfoError:
        return None
    if info is None or not info.matches_rec or not isinstance(info.data.get("payload_crc32"), str):
        return None
    return info.data["payload_crc32"]


def _checksums(rec: Path, res: VerifyResult) -> Optional[Dict[int, int]]:
    """The packer's payload checksums where NAME.pack.json names them (see _checksum_file_named). A damaged
    sidecar, or a named NAME.crc32 that is missing or damaged, is a problem: the records then go unchecked."""
    from recbuild.packinfo import PackInfoError, read_pack_info
    try:
        read_pack_info(rec)
    except PackInfoError as err:
        res.add("pack-info", f"{err} (the payload checksums cannot be used)")
        return None
    if _checksum_file_named(rec) is None:
        return None
    try:
        crcs = read_checksums(rec)
    except RecordIOError as err:
        res.add("checksum-file", f"{err} (the payload checksums cannot be used)")
        return None
    if crcs is None:
        res.add("checksum-file", f"{checksums_path(rec)}: missing, though {rec.stem}.pack.json names it; the "
                                 "payloads cannot be checked (pack again)")
    return crcs


def _check_checksum_keys(rec: Path, lines: List[Tuple[int, int, int]], crcs: Optional[Dict[int, int]],
                         res: VerifyResult) -> None:
    """NAME.crc32 has a checksum for every .idx key: an entry lost or changed there would otherwise leave its
    record silently unchecked. (A checksum for a key the .idx lacks is not reported: the lost .idx line is,
    as `not-indexed`.)"""
    if crcs is None:
        return
    unchecked = sorted({key for _, key, _ in lines} - set(crcs))
    if unchecked:
        res.add("checksum-file", f"{checksums_path(rec).name}: no checksum for {len(unchecked)} indexed record(s) "
                                 f"(keys {_ids(unchecked)}): the file is damaged; pack again")


def _check_index(handle: BinaryIO, spans: List[_Span], damage: Dict[int, Problem], lines, set_aside: Set[int],
                 where: _Where, res: VerifyResult, checks: _Checks, progress: bool,
                 crcs: Optional[Dict[int, int]]) -> Tuple[Set[int], List[int]]:
    """Match .idx lines to records and check each indexed record.

    Returns:
        (the ids the records carry, those ids in file order).
    """
    by_offset = {span.offset: span for span in spans}
    starts = [span.offset for span in spans]
    claimed = set(set_aside)
    ids: Dict[int, int] = {}                        # id -> offset
    bar = _bar(progress and not checks.quick, len(lines), res.rec.name)
    try:
        for position, (_, key, off) in enumerate(lines):
            bar.update(1)
            ids[key] = off                          # damaged or not, the id is accounted for by its line
            span = by_offset.get(off)
            if span is None:
                _misplaced(key, off, spans, starts, damage, claimed, where, res)
                continue
            claimed.add(off)
            res.indexed += 1
            if checks.quick or position % checks.stride:
                res.readable += 1
                continue
            payload, crc = _payload(handle, span), crcs.get(key) if crcs else None
            if crc is not None and not (checks.decode or checks.ids) and zlib.crc32(payload) == crc:
                res.readable += 1       # the reader check: the bytes the packer wrote, so nothing else to look at
                continue
            res.readable += int(_check_record(payload, key, span, where.listed.get(key), checks, where, res, crc))
    finally:
        bar.close()
    for off, problem in sorted(damage.items()):
        res.add(problem.kind, f"{where(None, off)}: {problem.message}", None, off)
    for span in spans:
        if span.offset in set_aside:
            ids.setdefault(_header_id(handle, span), span.offset)
        elif span.offset not in claimed:
            header_id = _header_id(handle, span)
            if header_id is not None:
                ids.setdefault(header_id, span.offset)
            res.add("not-indexed", f"{where(header_id, span.offset)}: no .idx line points at this record (a missing "
                                   "line: readers by index never see it)", header_id, span.offset)
    in_file_order = sorted((off, key) for key, off in ids.items() if off in by_offset)
    return set(ids), [key for _, key in in_file_order]


def _misplaced(key: int, off: int, spans: List[_Span], starts: List[int], damage: Dict[int, Problem],
               claimed: Set[int], where: "_Where", res: VerifyResult) -> None:
    """An .idx line whose offset is no sound record start: damage found there, or a shifted offset."""
    problem = damage.pop(off, None)
    if problem is not None:
        res.add(problem.kind, f"{where(key, off)}: {problem.message}", key, off)
        return
    inside = bisect.bisect_right(starts, off) - 1
    if inside >= 0 and off < spans[inside].end and spans[inside].offset not in claimed:
        # A shifted offset: it names the record it falls into, which is then not also "missing from the .idx".
        claimed.add(spans[inside].offset)
        res.add("idx-not-record", f"{where(key, off)}: the .idx points at offset {off}, inside the record at "
                                  f"offset {spans[inside].offset}, not at its start", key, off)
        return
    res.add("idx-not-record", f"{where(key, off)}: the .idx points at offset {off}, which is not a record start "
                              f"of {res.rec.name}", key, off)


def _header_id(handle: BinaryIO, span: _Span) -> Optional[int]:
    start, length = span.parts[0]
    if length < IR_HEADER.size:
        return None
    handle.seek(start)
    return IR_HEADER.unpack(handle.read(IR_HEADER.size))[2]


def _bar(show: bool, total: int, name: str):
    if not show:
        return _NoBar()
    import tqdm
    # The monitor thread could redraw the bar while a decode has fd 2 captured: no monitor.
    tqdm.tqdm.monitor_interval = 0
    return tqdm.tqdm(total=total, desc=f"verify {name}", unit="rec", dynamic_ncols=True, file=sys.stderr)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _read_lst(rec: Path, res: VerifyResult) -> Tuple[Dict[int, Entry], Optional[Path]]:
    lst = rec.with_suffix(".lst")
    if not lst.is_file():
        return {}, None
    try:
        return {e.index: e for e in read_list(lst)}, lst
    except ListError as err:
        res.add("list", str(err))
        return {}, None


def _check_against_list(rec: Path, lst: Optional[Path], listed: Dict[int, Entry], ids: Set[int],
                        in_file_order: List[int], res: VerifyResult) -> None:
    if lst is None:
        return
    errors = rec.with_suffix(".errors.tsv")
    reported = _reported_failures(errors, res)
    unaccounted = sorted(set(listed) - ids - reported)
    if unaccounted:
        res.add("list-missing", f"{lst.name}: {len(unaccounted)} listed id(s) neither in {rec.name} nor in "
                                f"{errors.name}: {_ids(unaccounted)}")
    extra = sorted(ids - set(listed))
    if extra:
        res.add("list-extra", f"{rec.name}: {len(extra)} record id(s) not in {lst.name}: {_ids(extra)}")
    rank = {index: n for n, index in enumerate(listed)}
    got = [k for k in in_file_order if k in rank]
    behind = next((n for n in range(1, len(got)) if rank[got[n]] < rank[got[n - 1]]), None)
    if behind is not None:
        where = _Where(listed, lst)
        res.add("list-order", f"{rec.name}: records are not in {lst.name}'s order: {where(got[behind], None)} is "
                              f"stored after key {got[behind - 1]} (list line {listed[got[behind - 1]].line})",
                got[behind])
    if reported:
        print(f"{rec.name}: {len(reported)} listed image(s) were not packed, as reported in {errors.name}")


def _reported_failures(errors: Path, res: VerifyResult) -> Set[int]:
    """The list ids NAME.errors.tsv (`index<TAB>path<TAB>reason`, a header row first) says were not packed. A
    line without an id is a problem naming the line, not a crash; its id then counts as unaccounted for."""
    reported: Set[int] = set()
    if not errors.is_file():
        return reported
    with open(errors, encoding="utf-8", errors="replace") as handle:
        next(handle, None)
        for line_no, line in enumerate(handle, start=2):
            if not line.strip():
                continue
            try:
                reported.add(int(line.split("\t", 1)[0]))
            except ValueError:
                res.add("errors-file", f"{errors.name}:{line_no}: expected '<index>\\t<path>\\t<reason>', got "
                                       f"{line.rstrip()[:80]!r}")
    return reported


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(map(str, ids[:_SHOW])) + (f" ... and {len(ids) - _SHOW} more" if len(ids) > _SHOW else "")


def _class_names(rec: Path) -> Optional[List[str]]:
    """The class names for the per-class counts, or None (a damaged class map is reported by _check_class_map)."""
    path = find_class_map(rec)
    if path is None:
        return None
    try:
        return read_class_map(path)
    except ValueError:
        return None


def _check_class_map(rec: Path, res: VerifyResult) -> None:
    """`class-map`: the class map that belongs to the .rec, when there is one, is readable (the trainer and the
    predictor refuse a damaged one, so verify says so first)."""
    path = find_class_map(rec)
    if path is None:
        return
    try:
        read_class_map(path)
    except ValueError as err:
        res.add("class-map", str(err))


def _report(rec: str, res: VerifyResult) -> None:
    names = _class_names(Path(rec))
    print(f"{rec}: {res.records} records, {res.indexed} indexed, {res.readable} readable by index")
    for label, n in sorted(res.per_class.items()):
        li = int(label) if float(label).is_integer() else label
        name = names[li] if names and isinstance(li, int) and 0 <= li < len(names) else None
        print(f"  label {li}{f' ({name})' if name else ''}: {n}")
    for problem in res.problems[:_SHOW]:
        print(f"  CORRUPT [{problem.kind}] {problem.message}", file=sys.stderr)
    if len(res.problems) > _SHOW:
        print(f"  ... and {len(res.problems) - _SHOW} more problems", file=sys.stderr)
    if res.ok:
        print(f"{rec}: OK")
    else:
        kinds = collections.Counter(p.kind for p in res.problems)
        print(f"{rec}: {len(res.problems)} problem(s) found ({', '.join(f'{n} {k}' for k, n in kinds.items())})",
              file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m recbuild verify`: returns 0 when every file is sound, 1 otherwise."""
    p = argparse.ArgumentParser(prog="python -m recbuild verify",
                                description="Check .rec/.idx pairs record by record: framing, index, headers, "
                                            "labels against the .lst, every image decodes without decoder "
                                            "warnings; print counts per class. Exit status 1 on any damage.")
    p.add_argument("recs", nargs="+", help="NAME.rec file(s)")
    p.add_argument("--quick", action="store_true",
                   help="framing, index and list ids only: read no payload, decode nothing (for huge files)")
    p.add_argument("--no-decode", dest="decode", action="store_false",
                   help="check headers and labels but do not decode the images")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a = p.parse_args(argv)
    bad = 0
    for rec in a.recs:
        res = verify_rec(Path(rec), decode=a.decode, progress=a.progress, quick=a.quick)
        _report(rec, res)
        bad += not res.ok
    return 1 if bad else 0
