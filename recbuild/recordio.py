"""MXNet's indexed RecordIO format, written and read without importing mxnet.

Packing must not import mxnet: its engine threads make forking workers unsafe and the import costs a second.
The format (dmlc-core recordio, checked against mx.recordio in tests/test_recbuild_pack.py):

- a record is [magic 0xced7230a][lrecord][payload][zero padding to 4 bytes], little-endian uint32s, where
  lrecord = cflag << 29 | length (length < 2**29);
- a payload containing the magic at a 4-byte-aligned offset is split there into parts (cflag 1 = first,
  2 = middle, 3 = last; 0 = whole record) and the magic itself is dropped; readers re-insert it;
- the .idx file has one line per record, "<key>\\t<byte offset of the record>\\n";
- an image record payload starts with the IRHeader struct '<IfQQ' (flag, label, id, id2); with flag > 0 the
  label field is 0 and `flag` float32 labels follow the header (mx.recordio.pack / --pack-label).
"""
from __future__ import annotations

import struct
import zlib
from typing import BinaryIO, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
# The image header mxnet.recordio puts before each image: flag (count of float labels that follow; 0: one label
# in `label`), label float32, id uint64, id2 uint64. Little-endian, as dmlc writes everything.
IR_HEADER = struct.Struct("<IfQQ")
IR_SIZE = IR_HEADER.size


class RecordIOError(ValueError):
    """A .rec/.idx that does not follow the format; the message says where.

    Attributes:
        offset: the byte offset of the frame at fault, or None.
        kind: 'header' (the file ends inside a frame header), 'magic' (not a frame header), 'overrun' (a frame
            runs past the end of the file), 'cflag' (an invalid continuation flag), 'split' (the file ends inside
            a split record), or '' for payload-level errors; callers word their own messages from it.
    """

    def __init__(self, message: str, offset: Optional[int] = None, kind: str = ""):
        super().__init__(message)
        self.offset = offset
        self.kind = kind


class Frame(NamedTuple):
    """One frame of a .rec: a whole record (cflag 0) or a part of a split one (1 first, 2 middle, 3 last)."""
    offset: int
    cflag: int
    length: int


class IRHeader(NamedTuple):
    """mx.recordio.IRHeader: flag (number of packed labels, 0 for one), label, id, id2."""
    flag: int
    label: object
    id: int
    id2: int


def pack_header(labels: Sequence[float], index: int, pack_label: bool) -> bytes:
    """The header im2rec writes: one float label, or every label with --pack-label on a multi-label list."""
    if pack_label and len(labels) > 1:
        return IR_HEADER.pack(len(labels), 0.0, index, 0) + np.asarray(labels, np.float32).tobytes()
    return IR_HEADER.pack(0, labels[0], index, 0)


def unpack_header(payload: bytes) -> Tuple[IRHeader, bytes]:
    """Split an image record into its header (label as float or float32 array) and the image bytes."""
    if len(payload) < IR_SIZE:
        raise RecordIOError(f"record of {len(payload)} bytes is shorter than the {IR_SIZE}-byte image header")
    flag, label, rid, id2 = IR_HEADER.unpack_from(payload)
    body = payload[IR_SIZE:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(f"record declares {flag} labels but holds {len(body)} bytes")
        label = np.frombuffer(body[:4 * flag], np.float32)
        body = body[4 * flag:]
    return IRHeader(flag, label, rid, id2), body


def encode_record(payload: bytes) -> bytes:
    """The bytes of one record as dmlc's RecordIOWriter lays them out."""
    n = len(payload)
    if n >= 1 << 29:
        raise RecordIOError(f"record of {n} bytes exceeds RecordIO's 2**29 - 1 limit")
    out: List[bytes] = []
    start = 0
    # Only aligned occurrences matter (readers resynchronise on aligned magics); find() is fast and rare hits
    # at unaligned offsets are skipped.
    hit = payload.find(_MAGIC_BYTES)
    while hit != -1 and hit + 4 <= n - (n % 4):
        if hit % 4 == 0:
            out.append(struct.pack("<II", MAGIC, (1 if start == 0 else 2) << 29 | (hit - start)))
            out.append(payload[start:hit])
            start = hit + 4
        hit = payload.find(_MAGIC_BYTES, hit + 1)
    out.append(struct.pack("<II", MAGIC, (3 if start else 0) << 29 | (n - start)))
    out.append(payload[start:])
    out.append(b"\0" * (-n % 4))
    return b"".join(out)


class RecordWriter:
    """Append records to an open .rec handle and remember (key, offset) for the .idx.

    With `checksums`, also remember (key, CRC32 of the payload) for recbuild's NAME.crc32 (see write_checksums):
    RecordIO itself has no checksum, so a changed byte that still decodes is otherwise invisible.
    """

    def __init__(self, handle: BinaryIO, checksums: bool = False):
        self.handle = handle
        self.offset = handle.tell()
        self.index: List[Tuple[int, int]] = []
        self.checksums: Optional[List[Tuple[int, int]]] = [] if checksums else None

    def write(self, key: int, payload: bytes) -> None:
        data = encode_record(payload)
        self.index.append((key, self.offset))
        if self.checksums is not None:
            self.checksums.append((key, zlib.crc32(payload)))
        self.handle.write(data)
        self.offset += len(data)

    def write_index(self, handle) -> None:
        """Write the .idx lines (text handle) in record order, like MXIndexedRecordIO."""
        handle.writelines(f"{key}\t{offset}\n" for key, offset in self.index)


def iter_frames(handle: BinaryIO, size: int, start: int = 0) -> Iterator[Frame]:
    """Walk the frames of a .rec of `size` bytes from byte `start`, reading only their 8-byte headers.

    When a frame is yielded the handle is at its payload, so a caller may read (part of) it; the walk seeks to
    the next frame itself.

    Raises:
        RecordIOError: with the offset and kind (see RecordIOError) of the first frame that breaks the format.
    """
    offset = start
    while offset < size:
        handle.seek(offset)
        head = handle.read(8)
        if len(head) < 8:
            raise RecordIOError(f"offset {offset}: file ends inside a record header", offset, "header")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"offset {offset}: bad magic 0x{magic:08x} (expected 0x{MAGIC:08x})", offset,
                                "magic")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        if offset + 8 + length > size:
            raise RecordIOError(f"offset {offset}: record of {length} bytes runs past the end of the file "
                                "(truncated)", offset, "overrun")
        if cflag > 3:
            raise RecordIOError(f"offset {offset}: invalid continuation flag {cflag}", offset, "cflag")
        yield Frame(offset, cflag, length)
        offset += 8 + length + (-length % 4)


def iter_records(handle: BinaryIO, size: int, start: int = 0) -> Iterator[Tuple[int, bytes]]:
    """Yield (offset, payload) for every record of a .rec from byte `start`, in file order, joining split
    records (the writer dropped the magic at each split point; it is put back)."""
    parts: List[bytes] = []
    first = start
    for frame in iter_frames(handle, size, start):
        if not parts:
            first = frame.offset
        parts.append(handle.read(frame.length))
        if frame.cflag in (0, 3):
            yield first, _MAGIC_BYTES.join(parts)
            parts = []
    if parts:
        raise RecordIOError(f"offset {first}: the file ends inside a split record", first, "split")



# NAME.crc32: recbuild's own addition beside NAME.rec (MXNet never reads it): a 16-byte magic line, then one
# little-endian (uint64 key, uint32 CRC32 of the record's payload) pair per record, in .idx order.
CHECKSUM_MAGIC = b"mxtransfer.crc1\n"
_CHECKSUM = struct.Struct("<QI")


def checksums_path(rec_path) -> "Path":
    """NAME.crc32 beside NAME.rec."""
    from pathlib import Path
    rec_path = Path(rec_path)
    return rec_path.with_name(rec_path.stem + ".crc32")


def encode_checksums(pairs: Sequence[Tuple[int, int]]) -> bytes:
    """The bytes of a NAME.crc32 file for (key, crc) pairs."""
    return CHECKSUM_MAGIC + b"".join(_CHECKSUM.pack(k, c) for k, c in pairs)


def read_checksums(rec_path) -> Optional[Dict[int, int]]:
    """{key: CRC32 of its payload} from NAME.crc32, or None when there is none (im2rec's files).

    Raises:
        RecordIOError: a file that is not one of ours, or cut short (names the file).
    """
    path = checksums_path(rec_path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    body = data[len(CHECKSUM_MAGIC):]
    if not data.startswith(CHECKSUM_MAGIC) or len(body) % _CHECKSUM.size:
        raise RecordIOError(f"{path}: not a recbuild checksum file (or cut short); delete it or pack again")
    return dict(_CHECKSUM.iter_unpack(body))
