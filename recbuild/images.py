"""Decode -> center crop -> resize -> encode for one image, with the guards that make bad files reportable.

Choices (documented in docs/packing.md):
- EXIF orientation is applied (OpenCV's default, so im2rec.py, which uses cv2.imread, does the same): a photo
  is packed the way a viewer shows it.
- Large JPEGs are decoded at a reduced DCT scale (1/2, 1/4 or 1/8) when the reduced image keeps a short edge
  of at least DCT_OVERSAMPLE (1.5) x --resize: the decoder then does a fraction of the IDCT and colour work.
  Reducing all the way down to --resize itself would be faster still, but on fine texture (foliage, water,
  grain) it falls to 27-30 dB PSNR against a full decode + INTER_AREA; the 1.5x margin keeps the worst
  bench.pack photo above 35 dB (see the constant).
- A progressive JPEG decoded at a reduced scale skips the refinement scans for the lowest bits of its AC
  coefficients (see _without_low_bit_scans): half the decode time, for bits a >= 3x downscale does not keep.
- The resize runs on the source's exact geometry (see transform), averaging every source pixel to shrink and
  with INTER_LINEAR to enlarge. im2rec uses INTER_LINEAR for everything, which aliases when it shrinks a
  3000 px photo to 224 px (it samples 2x2 of every ~13x13 source pixels).
- Output sizes follow im2rec exactly (short edge = --resize, long edge = long * resize // short of the
  oriented source), computed from the full-resolution size even when the decode was reduced.
- A JPEG whose entropy-coded data ends before its EOI marker (a truncated download) is refused: libjpeg
  would return it with the missing part filled grey and only print a warning.
- Any image the decoder can only read with a warning about its data (libjpeg's "Corrupt JPEG data: ...",
  "Premature end of JPEG file"; libpng's CRC errors) is refused with that warning as the reason: the pixels it
  returns are partly invented. The warning is captured per image (see recbuild/decoder_messages.py).
- With --color -1 (cv2.IMREAD_UNCHANGED, which ignores EXIF) the EXIF orientation of JPEG (APP1) and PNG (eXIf)
  files is applied here, so every --color packs a photo the same way up, as OpenCV does for 1 and 0.
- GIF: the first frame, read through OpenCV's video reader (its image reader has no GIF decoder in the
  opencv-python wheels). PNG alpha is dropped with --color 1 (OpenCV's behaviour), kept with --color -1;
  16-bit PNGs become 8 bit (the high byte) for JPEG output.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import cv2
import numpy as np

from recbuild import config as defaults
from recbuild.config import PackConfig
from recbuild.decoder_messages import captured_stderr, damage_reported

# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): they carry the size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}
# The next marker in entropy-coded data: 0xFF followed by anything but a stuffed zero, a restart marker or a
# fill byte.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_REDUCED_COLOR = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
_REDUCED_GREY = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
                 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


class ImageError(Exception):
    """An image that cannot be packed; the message is the reason written to the error report."""


@dataclass
class Sniffed:
    """What the first bytes of a file say.

    Attributes:
        fmt: 'jpeg', 'png', 'gif', 'bmp', 'webp', 'tiff' or 'unknown'.
        width, height: the stored size (before EXIF rotation), or None if the header does not say.
        complete: False when the file visibly ends too early (JPEG without EOI after its scan data).
        orientation: the JPEG's EXIF orientation (1-8; 1 when absent).
        progressive: a progressive JPEG (its coefficients arrive in several scans).
    """
    fmt: str
    width: Optional[int] = None
    height: Optional[int] = None
    complete: bool = True
    orientation: int = 1
    progressive: bool = False


def sniff(data: bytes) -> Sniffed:
    """Identify the format from the content (never the file name) and the stored size from the format's own
    header, without decoding. Every format the packer lets through to OpenCV states its size here, so the
    decompression-bomb guard applies to each (decode refuses a file whose header does not say); formats not
    listed (JPEG 2000, OpenEXR, Radiance HDR, PNM, Sun raster, ...) are 'unknown' and never decoded."""
    if data[:3] == b"\xff\xd8\xff":
        return _sniff_jpeg(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        # IHDR must be the first chunk (the PNG spec; libpng refuses anything else).
        w, h = struct.unpack(">II", data[16:24]) if data[12:16] == b"IHDR" and len(data) >= 24 else (None, None)
        return Sniffed("png", w, h, complete=b"IEND" in data[-32:])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return Sniffed("gif", w, h)
    if data[:2] == b"BM" and len(data) >= 26:
        if struct.unpack("<I", data[14:18])[0] == 12:              # OS/2 BITMAPCOREHEADER: 16-bit sizes
            w, h = struct.unpack("<HH", data[18:22])
        else:
            w, h = struct.unpack("<ii", data[18:26])
        return Sniffed("bmp", abs(w), abs(h))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        return _sniff_webp(data)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _sniff_tiff(data)
    return Sniffed("unknown")


# TIFF: the first image file directory (IFD0) is the image OpenCV decodes. Tags 256/257 are ImageWidth/ImageLength,
# of type SHORT (3), LONG (4) or, in BigTIFF, LONG8 (16). An IFD of more entries than this is not an image.
_TIFF_MAX_ENTRIES = 4096
_TIFF_VALUE = {3: "H", 4: "I", 16: "Q"}


def _sniff_tiff(data: bytes) -> Sniffed:
    """Size of a classic or BigTIFF file from IFD0; None where the directory does not say (decode refuses it)."""
    endian = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    # (IFD offset, entry count field, entry size, entry count/value layout) for classic and BigTIFF
    head, count_fmt, entry_size, entry_fmt = (("Q", 8), "Q", 20, "HHQ") if big else (("I", 4), "H", 12, "HHI")
    size: Dict[int, int] = {}
    try:
        at = 8 if big else 4
        ifd = struct.unpack_from(endian + head[0], data, at)[0]
        count = struct.unpack_from(endian + count_fmt, data, ifd)[0]
        first = ifd + struct.calcsize(endian + count_fmt)
        for k in range(min(count, _TIFF_MAX_ENTRIES)):
            pos = first + k * entry_size
            tag, kind, _ = struct.unpack_from(endian + entry_fmt, data, pos)
            if tag in (256, 257) and kind in _TIFF_VALUE:
                value_at = pos + struct.calcsize(endian + entry_fmt)
                size[tag] = struct.unpack_from(endian + _TIFF_VALUE[kind], data, value_at)[0]
    except struct.error:                                            # a directory cut short
        pass
    return Sniffed("tiff", size.get(256), size.get(257))


class _Segment(NamedTuple):
    """A JPEG marker segment: `marker` (-1 where the structure breaks) at byte `start`, its length field's
    value `length` (0 for markers without one)."""
    marker: int
    start: int
    length: int = 0


def _jpeg_segments(data: bytes) -> Iterator[_Segment]:
    """The marker segments after SOI, in order, through EOI; a scan (SOS) is followed by its entropy-coded
    data, which is skipped. Ends with a -1 segment where a marker was due and something else is there, or a
    scan's data never ends."""
    pos, n = 2, len(data)
    while pos + 2 <= n:
        if data[pos] != 0xFF:
            yield _Segment(-1, pos)
            return
        marker = data[pos + 1]
        if marker == 0xFF:                                          # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8, 0xD9) or 0xD0 <= marker <= 0xD7:  # markers without a length
            yield _Segment(marker, pos)
            if marker == 0xD9:
                return
            pos += 2
            continue
        if pos + 4 > n:
            yield _Segment(-1, pos)
            return
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        yield _Segment(marker, pos, length)
        pos += 2 + length
        if marker == 0xDA:                                          # entropy-coded data up to the next marker
            following = _NEXT_MARKER.search(data, pos)
            if following is None:
                yield _Segment(-1, n)
                return
            pos = following.start()


def _sniff_jpeg(data: bytes) -> Sniffed:
    width = height = None
    orientation = 1
    progressive = False
    for marker, pos, length in _jpeg_segments(data):
        if marker == -1:
            break                                                   # lost sync: corrupt header
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\0\0":
            orientation = _exif_orientation(data[pos + 10:pos + 2 + length])
        if marker in _SOF and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            progressive = marker in _PROGRESSIVE_SOF
        if marker == 0xDA:                                          # start of scan: the image data follows
            # The last EOI must come after the first scan; an EOI earlier in the file belongs to an EXIF
            # thumbnail, so a file cut inside the scan data would otherwise look complete.
            return Sniffed("jpeg", width, height, complete=data.rfind(b"\xff\xd9") > pos,
                           orientation=orientation, progressive=progressive)
    return Sniffed("jpeg", width, height, complete=False)


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 in an EXIF (TIFF-structured) block; 1 when absent or unreadable."""
    try:
        endian = {b"II": "<", b"MM": ">"}[tiff[:2]]
        ifd = struct.unpack(endian + "I", tiff[4:8])[0]
        count = struct.unpack(endian + "H", tiff[ifd:ifd + 2])[0]
        for k in range(count):
            entry = tiff[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
            tag, kind = struct.unpack(endian + "HH", entry[:4])
            if tag == 0x0112 and kind == 3:
                value = struct.unpack(endian + "H", entry[8:10])[0]
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


def _sniff_webp(data: bytes) -> Sniffed:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return Sniffed("webp", w, h)
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return Sniffed("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return Sniffed("webp", w & 0x3FFF, h & 0x3FFF)
    return Sniffed("webp")


def reduction(sniffed: Sniffed, resize: int, color: int) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) to decode a JPEG at: the largest that still leaves the short
    edge at least DCT_OVERSAMPLE x `resize` pixels. 1 for anything else, for --resize 0 and for --color -1 (no
    reduced flag keeps the file unchanged)."""
    if sniffed.fmt != "jpeg" or resize <= 0 or color == -1 or not sniffed.width or not sniffed.height:
        return 1
    short = min(sniffed.width, sniffed.height)
    for scale in (8, 4, 2):
        if short >= scale * resize * defaults.DCT_OVERSAMPLE:
            return scale
    return 1


@dataclass
class Decoded:
    """A decoded image and where it lies on the source's pixel grid.

    Attributes:
        image: the pixels; with scale > 1 each one is the mean of a scale x scale block of the source (libjpeg's
            reduced IDCT is an exact box filter).
        full: (width, height) of the EXIF-oriented source at full resolution: output sizes and the resize
            geometry are computed from it, never from the reduced image.
        scale: 1, 2, 4 or 8.
        origin: (x, y), in image pixels, of the source's top-left corner. 0 except where EXIF orientation
            turned a partial block (a side that is not a multiple of the scale) to the left or top edge.
    """
    image: np.ndarray
    full: Tuple[int, int]
    scale: int = 1
    origin: Tuple[float, float] = (0.0, 0.0)


def decode(data: bytes, path: str, cfg: PackConfig) -> Decoded:
    """Decode `data` (the bytes of `path`) under the guards.

    Raises:
        ImageError: empty, not an image, truncated, too large, or undecodable.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    info = sniff(data)
    if info.fmt == "unknown":
        raise ImageError(f"not an image: unrecognised header {data[:8]!r}")
    if not info.complete:
        raise ImageError(f"truncated {info.fmt.upper()} (file ends before the end-of-image marker)")
    scale = reduction(info, cfg.resize, cfg.color)
    if info.width is None or info.height is None:
        # The guard must know the size before the decoder allocates it: a header that does not say is refused.
        raise ImageError(f"{info.fmt.upper()} header does not state the image size (damaged, or a variant the "
                         "decompression-bomb guard cannot read); not decoded")
    if info.width == 0 or info.height == 0:
        raise ImageError(f"{info.fmt.upper()} header declares an empty image ({info.width}x{info.height})")
    pixels = -(-info.width // scale) * -(-info.height // scale)
    if pixels > cfg.max_pixels:
        raise ImageError(f"{info.fmt.upper()} of {info.width}x{info.height} ({pixels / 1e6:.0f} MP to decode) "
                         f"exceeds the decompression-bomb guard of {cfg.max_pixels / 1e6:.0f} MP; raise "
                         "--max-pixels if the image is genuine")
    if info.fmt == "gif":
        img = _decode_gif(path, cfg.color)
    else:
        flag = cfg.color if scale == 1 else (_REDUCED_GREY if cfg.color == 0 else _REDUCED_COLOR)[scale]
        trimmed = _without_low_bit_scans(data) if scale > 1 and info.progressive else data
        img, damage = imdecode_checked(trimmed, flag, info.fmt)
        if damage and trimmed is not data:
            # Only the file's own bytes count: decode them as they are to see whether they carry the damage.
            img, damage = imdecode_checked(data, flag, info.fmt)
        if damage:
            raise ImageError(f"corrupt {info.fmt.upper()} data: the decoder reports {damage!r}")
    if img is None or img.size == 0:
        raise ImageError(f"OpenCV cannot decode this {info.fmt.upper()} (corrupt or unsupported variant)")
    if scale == 1:
        if cfg.color == -1:
            img = apply_orientation(img, exif_orientation(data, info))
        return Decoded(img, (img.shape[1], img.shape[0]))
    # The decoder rounds each side up; swap the header's size if EXIF orientation turned the image.
    w, h = info.width, info.height
    if (img.shape[1], img.shape[0]) != (-(-w // scale), -(-h // scale)):
        w, h = h, w
    return Decoded(img, (w, h), scale, _origin(info, scale))


def imdecode_checked(data: bytes, flag: int, fmt: str = "image") -> Tuple[Optional[np.ndarray], str]:
    """cv2.imdecode with the decoder's own warnings captured: (image or None, the damage it reported or '')."""
    with captured_stderr() as said:
        try:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        except cv2.error as err:
            raise ImageError(f"OpenCV cannot decode this {fmt.upper()}: {str(err).strip()[-200:]}") from None
    if img is None:
        return None, ""       # the caller names the failure; a libpng error line only repeats it
    return img, damage_reported(said)


# cv2.rotate/flip steps that show a stored image as EXIF orientation 1-8 says (TIFF 6.0, tag 0x0112).
_ORIENT_STEPS = {2: ("flip", 1), 3: ("rotate", cv2.ROTATE_180), 4: ("flip", 0), 5: ("transpose", None),
                 6: ("rotate", cv2.ROTATE_90_CLOCKWISE), 7: ("transverse", None),
                 8: ("rotate", cv2.ROTATE_90_COUNTERCLOCKWISE)}


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """The stored image `img` turned the way EXIF `orientation` (1-8) says a viewer shows it."""
    step, arg = _ORIENT_STEPS.get(orientation, (None, None))
    if step == "flip":
        return cv2.flip(img, arg)
    if step == "rotate":
        return cv2.rotate(img, arg)
    if step == "transpose":
        return np.ascontiguousarray(img.swapaxes(0, 1))
    if step == "transverse":
        return np.ascontiguousarray(img[::-1, ::-1].swapaxes(0, 1))
    return img


def exif_orientation(data: bytes, info: Sniffed) -> int:
    """The EXIF orientation OpenCV applies under --color 1/0: a JPEG's APP1 (already sniffed) or a PNG's eXIf
    chunk; 1 for anything else."""
    if info.fmt == "jpeg":
        return info.orientation
    if info.fmt == "png":
        pos = 8
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos:pos + 8])
            if kind == b"eXIf":
                return _exif_orientation(data[pos + 8:pos + 8 + length])
            if kind in (b"IDAT", b"IEND"):
                break                  # OpenCV reads eXIf only before the image data (libpng's rule)
            pos += 12 + length
    return 1


def _without_low_bit_scans(data: bytes) -> bytes:
    """A progressive JPEG without the refinement scans that carry the lowest bits of its AC coefficients, for
    a reduced decode; the file is returned unchanged where the plan below does not apply.

    Why: a progressive JPEG took ~3x as long to decode as a baseline one of the same size (bench.pack: 37 vs
    8.4 ms at the reduced scale), and the reduced IDCT saves it almost nothing. The time goes into the
    successive-approximation refinement scans (libjpeg-turbo decodes them coefficient by coefficient) and
    into block smoothing, which libjpeg switches on whenever an AC coefficient is left short of its last bit.

    How:
    - A component's low AC bits are dropped while they are worth at most LOW_BIT_ERROR_LIMIT on its two
      lowest-frequency AC coefficients (bits x quantisation step). With libjpeg's standard tables luma loses
      2 bits from quality 90 and 1 from quality 65, chroma 1 from quality 77; below 65 nothing is dropped.
    - The refinement scans for those bits are left out. The remaining AC scans are renumbered so that their
      bits land that many positions lower, and the quantisation steps for those coefficients are multiplied
      by as much: each dequantised coefficient is the original with the dropped bits cleared, and libjpeg
      sees complete coefficients, so it does not smooth.
    - DC scans are all kept.

    Measured on bench.pack's 110 progressive photos that decode at a reduced scale: 37 ms per decode for the
    whole file, 26.5 ms with the last-bit scans merely left out (libjpeg then smooths), 16.8 ms with this; the
    worst PSNR against a full decode + INTER_AREA stays at 36.0 dB. Only 8-bit Huffman progressive files
    (SOF2) with one set of quantisation tables are rewritten; anything else, including structure this does not
    understand, is returned unchanged for libjpeg to judge."""
    tables: Dict[int, List[int]] = {}               # quantisation table id -> its 64 steps, zigzag order
    dqts: Dict[int, Dict[int, List[int]]] = {}      # DQT segment start -> the tables it defines
    table_of: Dict[int, int] = {}                   # component id -> quantisation table id
    scans: Dict[int, _Scan] = {}                    # SOS segment start -> the scan, in file order
    segments = list(_jpeg_segments(data))
    for seg in segments:
        body = data[seg.start + 4:seg.start + 2 + seg.length]
        if seg.marker == -1 or (seg.marker in _SOF and seg.marker != 0xC2):
            return data
        if seg.marker == 0xDB:
            read = _read_dqt(body)
            if read is None or scans or read.keys() & tables.keys():
                return data                         # malformed, or tables redefined: not worth the bookkeeping
            tables.update(read)
            dqts[seg.start] = read
        elif seg.marker == 0xC2:
            if len(body) < 6 or body[0] != 8 or len(body) < 6 + 3 * body[5]:
                return data
            table_of = {body[6 + 3 * i]: body[8 + 3 * i] for i in range(body[5])}
        elif seg.marker == 0xDA:
            scan = _read_sos(body)
            if scan is None or not set(scan.components) <= table_of.keys():
                return data
            if scan.ss > 0 and len(scan.components) != 1:
                return data                         # an AC scan holds one component (T.81 G.1.1.1.1)
            if scan.al > 13 or (scan.ah and scan.ah != scan.al + 1):
                return data                         # not a successive-approximation step T.81 allows
            scans[seg.start] = scan
    if not table_of or not set(table_of.values()) <= tables.keys():
        return data
    droppable = {c: _droppable_bits(tables[t]) for c, t in table_of.items()}
    ac_scans = {start: scan for start, scan in scans.items() if scan.ss > 0}
    kept = {start: scan for start, scan in ac_scans.items()
            if not (scan.ah > 0 and scan.al < droppable[scan.components[0]])}
    if len(kept) == len(ac_scans):
        return data

    # The bit each (component, AC coefficient) ends at, and so the shift for each (table, coefficient) and for
    # each kept AC scan.
    last_bit: Dict[Tuple[int, int], int] = {}
    for scan in kept.values():
        for k in range(scan.ss, scan.se + 1):
            key = (scan.components[0], k)
            last_bit[key] = min(last_bit.get(key, scan.al), scan.al)
    shift: Dict[Tuple[int, int], int] = {}
    for c, t in table_of.items():
        for k in range(1, 64):
            if (c, k) not in last_bit or shift.setdefault((t, k), last_bit[c, k]) != last_bit[c, k]:
                return data                         # a coefficient never sent, or a shared table shifted twice
    scan_shift: Dict[int, int] = {}
    for start, scan in kept.items():
        bits = {last_bit[scan.components[0], k] for k in range(scan.ss, scan.se + 1)}
        if len(bits) != 1:
            return data                             # one scan would need two shifts
        scan_shift[start] = bits.pop()
    new_dqts = {start: _write_dqt(read, shift) for start, read in dqts.items()}
    if None in new_dqts.values():
        return data

    ends = [seg.start for seg in segments[1:]] + [len(data)]
    out = [data[:segments[0].start]]
    for seg, end in zip(segments, ends):
        piece = data[seg.start:end]
        if seg.start in new_dqts:
            piece = new_dqts[seg.start] + data[seg.start + 2 + seg.length:end]
        elif seg.start in ac_scans:
            if seg.start not in kept:
                continue
            scan, s = kept[seg.start], scan_shift[seg.start]
            piece = bytearray(piece)                # marker, length, Ns, 2 bytes per component, Ss, Se, Ah/Al
            piece[7 + 2 * len(scan.components)] = ((scan.ah - s if scan.ah else 0) << 4) | (scan.al - s)
            piece = bytes(piece)
        out.append(piece)
    return b"".join(out)


class _Scan(NamedTuple):
    """What an SOS header says: the components in the scan, its spectral band Ss..Se (zigzag indices) and its
    successive-approximation bits Ah (the previous scan's last bit; 0 for a first scan) and Al (this scan's)."""
    components: Tuple[int, ...]
    ss: int
    se: int
    ah: int
    al: int


def _read_sos(body: bytes) -> Optional[_Scan]:
    if not body or body[0] == 0 or len(body) < 4 + 2 * body[0]:
        return None
    n = body[0]
    ss, se, bits = body[1 + 2 * n:4 + 2 * n]
    if ss > se or se > 63:
        return None
    return _Scan(tuple(body[1:1 + 2 * n:2]), ss, se, bits >> 4, bits & 15)


def _read_dqt(body: bytes) -> Optional[Dict[int, List[int]]]:
    """The quantisation tables in a DQT segment's body: id -> 64 steps in zigzag order (None if malformed)."""
    tables: Dict[int, List[int]] = {}
    i = 0
    while i < len(body):
        wide, table = body[i] >> 4, body[i] & 15
        size = 128 if wide else 64
        if wide > 1 or i + 1 + size > len(body):
            return None
        raw = body[i + 1:i + 1 + size]
        tables[table] = list(struct.unpack(">64H", raw)) if wide else list(raw)
        i += 1 + size
    return tables


def _write_dqt(tables: Dict[int, List[int]], shift: Dict[Tuple[int, int], int]) -> Optional[bytes]:
    """A DQT segment with each AC step k of table t multiplied by 2 ** shift[t, k]; 16-bit where a step
    outgrows 8 bits (libjpeg reads either precision whatever the sample precision). None if one outgrows 16."""
    body = bytearray()
    for table, steps in tables.items():
        steps = steps[:1] + [step << shift.get((table, k), 0) for k, step in enumerate(steps[1:], 1)]
        if max(steps) > 0xFFFF:
            return None
        if max(steps) > 0xFF:
            body += bytes([0x10 | table]) + struct.pack(">64H", *steps)
        else:
            body += bytes([table]) + bytes(steps)
    return b"\xff\xdb" + struct.pack(">H", len(body) + 2) + bytes(body)


def _droppable_bits(steps: List[int]) -> int:
    """How many low AC bits a component quantised with `steps` may lose: the most whose worth on the two
    lowest-frequency AC coefficients, (2 ** bits - 1) x step, stays within LOW_BIT_ERROR_LIMIT."""
    if min(steps[1:]) == 0:
        return 0                                    # a zero step is invalid; leave such a file exact
    lowest = max(steps[1], steps[2])
    bits = 0
    while ((2 << bits) - 1) * lowest <= defaults.LOW_BIT_ERROR_LIMIT:
        bits += 1
    return bits


# Where the stored image's last column and last row end up after EXIF orientation 1-8.
_RIGHT_GOES = {1: "right", 2: "left", 3: "left", 4: "right", 5: "bottom", 6: "bottom", 7: "top", 8: "top"}
_BOTTOM_GOES = {1: "bottom", 2: "bottom", 3: "top", 4: "top", 5: "right", 6: "left", 7: "left", 8: "right"}


def _origin(info: Sniffed, scale: int) -> Tuple[float, float]:
    """A reduced decode of a side that is not a multiple of `scale` ends in a pixel that is partly the
    encoder's edge padding (1337 px at 1/4 -> 335 px of which 334.25 are image). At the right or bottom edge
    that pixel is simply not sampled; where EXIF orientation moved it to the left or top, the source starts
    part-way into the first pixel, and the resize must know where."""
    x = y = 0.0
    for remainder, goes in ((info.width % scale, _RIGHT_GOES[info.orientation]),
                            (info.height % scale, _BOTTOM_GOES[info.orientation])):
        if remainder and goes in ("left", "top"):
            offset = (scale - remainder) / scale
            x, y = (x + offset, y) if goes == "left" else (x, y + offset)
    return x, y


def _decode_gif(path: str, color: int) -> np.ndarray:
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    try:
        ok, frame = cap.read()
    finally:
        cap.release()
    if not ok or frame is None:
        raise ImageError("OpenCV cannot decode this GIF")
    if color == 0:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    return frame


def output_size(full: Tuple[int, int], resize: int, center_crop: bool) -> Tuple[int, int]:
    """(width, height) im2rec produces for a source of size `full`: center crop to a square, then the short
    edge becomes `resize` and the long one long * resize // short."""
    w, h = full
    if center_crop:
        w = h = min(w, h)
    if not resize:
        return w, h
    if h > w:
        return resize, h * resize // w
    return w * resize // h, resize


def transform(decoded: Decoded, resize: int, center_crop: bool) -> np.ndarray:
    """Center crop and resize a decode, on the source's exact geometry.

    Every output pixel averages the same source area as a full decode + INTER_AREA resize would (the crop and
    the scale are computed on the full-resolution grid and mapped onto the reduced image), so a reduced
    decode changes which pixels are averaged by nothing more than the block granularity. Shrinking averages
    every source pixel (im2rec's INTER_LINEAR reads 2x2 of every ~13x13 source pixels when it takes a 3000 px
    photo to 224 px, and aliases); enlarging uses INTER_LINEAR, as im2rec does.
    """
    w, h = decoded.full
    x0, y0, crop_w, crop_h = 0, 0, w, h
    if center_crop:                                   # im2rec: a centred square of the short edge
        side = min(w, h)
        x0, y0, crop_w, crop_h = (w - side) // 2, (h - side) // 2, side, side
    out_w, out_h = output_size(decoded.full, resize, center_crop)
    scale = decoded.scale
    # Where the crop starts on the decoded grid: a whole pixel plus a fraction (non-zero only when scale > 1
    # and a center crop or an EXIF origin falls inside a block; even an eighth of a pixel costs ~1 dB on fine
    # texture, so the fraction is resampled, not rounded). On a reduced grid, two more pixels keep the resize
    # from running short; at full scale the crop is exact, so nothing outside it is sampled (as im2rec).
    left_at, top_at = decoded.origin[0] + x0 / scale, decoded.origin[1] + y0 / scale
    left, top = int(left_at), int(top_at)
    shift = (left_at - left, top_at - top)
    margin = 0 if scale == 1 else 2
    img = decoded.image[top:top + -(-crop_h // scale) + margin, left:left + -(-crop_w // scale) + margin]
    if scale == 1 and (out_w, out_h) == (crop_w, crop_h):
        return img
    # Output pixels per decoded pixel, from the full-resolution geometry.
    fx, fy = out_w * scale / crop_w, out_h * scale / crop_h
    if fx >= 1 or fy >= 1:
        return _resize_on_grid(img, fx, fy, out_w, out_h, cv2.INTER_LINEAR, shift)
    if fx > 1 / _AREA_DIRECT_FROM and fy > 1 / _AREA_DIRECT_FROM:
        # Linear onto a grid of twice the output resolution, then an exact 2x2 box average: within 0.5 dB of
        # INTER_AREA at these factors, and half its cost (OpenCV's INTER_AREA is vectorised only for integer
        # factors; at 1.5-3x it was a quarter of the time spent on a bench.pack photo).
        fine = _resize_on_grid(img, 2 * fx, 2 * fy, 2 * out_w, 2 * out_h, cv2.INTER_LINEAR, shift)
        return cv2.resize(fine, (out_w, out_h), interpolation=cv2.INTER_AREA)
    return _resize_on_grid(img, fx, fy, out_w, out_h, cv2.INTER_AREA, shift)


# Shrinking by more than this (only images that were not DCT-reduced: small JPEGs, PNG, WebP...) goes straight
# to INTER_AREA: a linear step would skip source pixels.
_AREA_DIRECT_FROM = 3.0


def _resize_on_grid(img: np.ndarray, fx: float, fy: float, out_w: int, out_h: int, method: int,
                    shift: Tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Resize by exactly (fx, fy) output pixels per input pixel, starting `shift` input pixels into `img`, and
    keep out_w x out_h.

    Passed as fx/fy (not as a size), OpenCV maps output pixel i onto exactly [i / fx, (i + 1) / fx) of the
    input; a size would stretch the reduced image's padded last pixel over the whole output. A fractional
    shift (rare: see transform) needs warpAffine, which is linear only, and slower."""
    if shift != (0.0, 0.0):
        to_input = np.float64([[1 / fx, 0, 0.5 / fx - 0.5 + shift[0]], [0, 1 / fy, 0.5 / fy - 0.5 + shift[1]]])
        return cv2.warpAffine(img, to_input, (out_w, out_h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)
    out = cv2.resize(img, None, fx=fx, fy=fy, interpolation=method)
    short_h, short_w = max(0, out_h - out.shape[0]), max(0, out_w - out.shape[1])
    if short_h or short_w:                            # a rounded-off last line (never more than one)
        out = cv2.copyMakeBorder(out, 0, short_h, 0, short_w, cv2.BORDER_REPLICATE)
    return out[:out_h, :out_w]


def fit_for_encoding(img: np.ndarray, encoding: str) -> np.ndarray:
    """The image as the format can hold it: JPEG holds 8 bits (16-bit PNGs under --color -1) and no alpha."""
    if encoding == ".jpg":
        if img.dtype != np.uint8:
            img = (img >> 8).astype(np.uint8) if img.dtype == np.uint16 else cv2.convertScaleAbs(img)
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, :3]
    return img


def encode(img: np.ndarray, encoding: str, quality: int) -> bytes:
    """Encode like mx.recordio.pack_img (same cv2.imencode parameters), fitting the image to the format."""
    img = fit_for_encoding(img, encoding)
    params = [cv2.IMWRITE_JPEG_QUALITY if encoding == ".jpg" else cv2.IMWRITE_PNG_COMPRESSION, quality]
    ok, buf = cv2.imencode(encoding, img, params)
    if not ok:
        raise ImageError(f"OpenCV cannot encode a {img.shape} {img.dtype} image as {encoding}")
    return buf.tobytes()


def check_pass_through(data: bytes, path: str, cfg: PackConfig) -> None:
    """--pass-through stores bytes as they are, but only bytes that decode cleanly: the same guards and decoder
    warnings as a packed image (a JPEG is decoded at 1/8 scale, which still entropy-decodes every coefficient,
    so all damage is seen at a fraction of the cost).

    Raises:
        ImageError: with the reason, as decode() does.
    """
    check = PackConfig(resize=1, color=1, max_pixels=cfg.max_pixels, pass_through=False)
    decode(data, path, check)


def load_image_bytes(path: str, cfg: PackConfig) -> bytes:
    """The encoded image to store for `path` (the whole pipeline for one file).

    Raises:
        ImageError: with the reason, for anything that cannot be packed.
    """
    return load_image(path, cfg)[0]


def load_image(path: str, cfg: PackConfig) -> Tuple[bytes, Optional[np.ndarray]]:
    """(the encoded image to store for `path`, the array it was encoded from; None with --pass-through).

    Raises:
        ImageError: with the reason, for anything that cannot be packed.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except IsADirectoryError:
        raise ImageError("is a folder, not a file") from None
    except OSError as err:
        raise ImageError(f"cannot read file ({err.strerror})") from None
    if cfg.pass_through:
        check_pass_through(data, path, cfg)
        return data, None
    img = fit_for_encoding(transform(decode(data, path, cfg), cfg.resize, cfg.center_crop), cfg.encoding)
    return encode(img, cfg.encoding, cfg.quality), img
