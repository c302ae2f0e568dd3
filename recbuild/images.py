"""Decode -> center crop -> resize -> encode for one image, with the guards that make bad files reportable.

Choices (documented in the README):
- EXIF orientation is applied (OpenCV's default, so im2rec.py, which uses cv2.imread, does the same): a photo
  is packed the way a viewer shows it.
- Large JPEGs are decoded at a reduced DCT scale (1/2, 1/4 or 1/8) whenever the reduced image is still at
  least --resize on its short edge: the decoder then does a fraction of the work and memory.
- Shrinking by 2x or more uses INTER_AREA; by less (what is left after a reduced decode), a light Gaussian
  anti-alias blur plus INTER_LINEAR; enlarging INTER_LINEAR. im2rec uses INTER_LINEAR for everything, which
  aliases when it shrinks a 3000 px photo to 224 px (it samples 2x2 of every ~13x13 source pixels).
- Output sizes follow im2rec exactly (short edge = --resize, long edge = long * resize // short of the
  oriented source), computed from the full-resolution size even when the decode was reduced.
- A JPEG whose entropy-coded data ends before its EOI marker (a truncated download) is refused: libjpeg
  would return it with the missing part filled grey and only print a warning.
- GIF: the first frame, read through OpenCV's video reader (its image reader has no GIF decoder in the
  opencv-python wheels). PNG alpha is dropped with --color 1 (OpenCV's behaviour), kept with --color -1;
  16-bit PNGs become 8 bit (the high byte) for JPEG output.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

from recbuild.config import PackConfig

# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): they carry the size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
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
    """
    fmt: str
    width: Optional[int] = None
    height: Optional[int] = None
    complete: bool = True
    orientation: int = 1


def sniff(data: bytes) -> Sniffed:
    """Identify the format and stored size from the header, without decoding."""
    if data[:3] == b"\xff\xd8\xff":
        return _sniff_jpeg(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return Sniffed("png", w, h, complete=b"IEND" in data[-32:])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return Sniffed("gif", w, h)
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return Sniffed("bmp", abs(w), abs(h))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        return _sniff_webp(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return Sniffed("tiff")
    return Sniffed("unknown")


def _sniff_jpeg(data: bytes) -> Sniffed:
    pos, n = 2, len(data)
    width = height = None
    orientation = 1
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return Sniffed("jpeg", width, height, complete=False)   # lost sync: corrupt header
        marker = data[pos + 1]
        if marker == 0xFF:                                          # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:        # markers without a length
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\0\0":
            orientation = _exif_orientation(data[pos + 10:pos + 2 + length])
        if marker in _SOF and pos + 9 <= n:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
        if marker == 0xDA:                                          # start of scan: the image data follows
            # The last EOI must come after the first scan; an EOI earlier in the file belongs to an EXIF
            # thumbnail, so a file cut inside the scan data would otherwise look complete.
            return Sniffed("jpeg", width, height, complete=data.rfind(b"\xff\xd9") > pos,
                           orientation=orientation)
        pos += 2 + length
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
    """The DCT scale denominator (1, 2, 4 or 8) a JPEG can be decoded at and still have a short edge of at
    least `resize` pixels. 1 for anything else, for --resize 0 and for --color -1 (no reduced flag keeps
    the file unchanged)."""
    if sniffed.fmt != "jpeg" or resize <= 0 or color == -1 or not sniffed.width or not sniffed.height:
        return 1
    short = min(sniffed.width, sniffed.height)
    for scale in (8, 4, 2):
        if short >= scale * resize:
            return scale
    return 1


def decode(data: bytes, path: str, cfg: PackConfig) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Decode `data` (the bytes of `path`) under the guards.

    Returns:
        (image, (full width, full height) of the oriented source) — the full size is what output sizes are
        computed from when the decode was reduced.

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
    if info.width is not None and info.height is not None:
        if info.width == 0 or info.height == 0:
            raise ImageError(f"{info.fmt.upper()} header declares an empty image ({info.width}x{info.height})")
        pixels = -(-info.width // scale) * -(-info.height // scale)
        if pixels > cfg.max_pixels:
            raise ImageError(f"{info.width}x{info.height} ({pixels / 1e6:.0f} MP to decode) exceeds the "
                             f"decompression-bomb guard of {cfg.max_pixels / 1e6:.0f} MP; raise --max-pixels "
                             "if the image is genuine")
    if info.fmt == "gif":
        img = _decode_gif(path, cfg.color)
    else:
        flag = cfg.color if scale == 1 else (_REDUCED_GREY if cfg.color == 0 else _REDUCED_COLOR)[scale]
        try:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        except cv2.error as err:
            raise ImageError(f"OpenCV cannot decode this {info.fmt.upper()}: {str(err).strip()[-200:]}") from None
    if img is None or img.size == 0:
        raise ImageError(f"OpenCV cannot decode this {info.fmt.upper()} (corrupt or unsupported variant)")
    full = (img.shape[1], img.shape[0])
    if scale > 1:
        # The decoder rounds each side up; swap the header's size if EXIF orientation turned the image.
        w, h = info.width, info.height
        if (img.shape[1], img.shape[0]) != (-(-w // scale), -(-h // scale)):
            w, h = h, w
        full = (w, h)
        img = _drop_partial_blocks(img, info, scale)
    return img, full


# Where the stored image's last column and last row end up after EXIF orientation 1-8.
_RIGHT_GOES = {1: "right", 2: "left", 3: "left", 4: "right", 5: "bottom", 6: "bottom", 7: "top", 8: "top"}
_BOTTOM_GOES = {1: "bottom", 2: "bottom", 3: "top", 4: "top", 5: "right", 6: "left", 7: "left", 8: "right"}


def _drop_partial_blocks(img: np.ndarray, info: Sniffed, scale: int) -> np.ndarray:
    """A reduced decode of a side that is not a multiple of `scale` ends in a pixel that is partly the
    encoder's edge padding (1337 px at 1/4 -> 335 px of which 334.25 are image). Resizing all of them to the
    target stretches the picture by that fraction, which costs up to ~8 dB PSNR on textured photos. The last
    line is dropped when less than half of it is image, so the geometry is off by at most half a pixel."""
    sides = []
    if 0 < info.width % scale < scale / 2:
        sides.append(_RIGHT_GOES[info.orientation])
    if 0 < info.height % scale < scale / 2:
        sides.append(_BOTTOM_GOES[info.orientation])
    for side in sides:
        img = {"right": img[:, :-1], "left": img[:, 1:], "bottom": img[:-1], "top": img[1:]}[side]
    return img


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


def transform(img: np.ndarray, full: Tuple[int, int], resize: int, center_crop: bool) -> np.ndarray:
    """Center crop and resize `img` (possibly a DCT-reduced decode of a `full`-sized source)."""
    if center_crop:
        h, w = img.shape[:2]
        if h > w:
            m = (h - w) // 2
            img = img[m:m + w]
        else:
            m = (w - h) // 2
            img = img[:, m:m + h]
    if resize:
        size = output_size(full, resize, center_crop)
        if (img.shape[1], img.shape[0]) != size:
            img = _resize(img, size)
    return img


# Gaussian pre-blur for shrinking by less than 2x: sigma = _BLUR_K * sqrt(factor**2 - 1). Chosen on bench.pack's
# photos after a reduced decode: PSNR against a full decode + INTER_AREA within 0.1 dB of INTER_AREA itself,
# at a third of its cost (OpenCV's INTER_AREA is slow for non-integer factors); 0.45 already over-blurs.
_BLUR_K = 0.3


def _resize(img: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Shrink by 2x or more with INTER_AREA (every source pixel counts; im2rec's INTER_LINEAR reads 2x2 of
    them and aliases); by less than 2x - what is left after a reduced DCT decode - with a light anti-alias
    blur and INTER_LINEAR; enlarge with INTER_LINEAR."""
    factor = img.shape[1] / size[0]
    if factor >= 2:
        return cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    if factor > 1:
        sigma = _BLUR_K * (factor * factor - 1) ** 0.5
        if sigma > 0.2:                     # below that the kernel is a near no-op
            img = cv2.GaussianBlur(img, (0, 0), sigma)
    return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)


def encode(img: np.ndarray, encoding: str, quality: int) -> bytes:
    """Encode like mx.recordio.pack_img (same cv2.imencode parameters), fitting the image to the format."""
    if encoding == ".jpg":
        if img.dtype != np.uint8:          # 16-bit PNG under --color -1: JPEG holds 8 bits
            img = (img >> 8).astype(np.uint8) if img.dtype == np.uint16 else cv2.convertScaleAbs(img)
        if img.ndim == 3 and img.shape[2] == 4:   # alpha under --color -1: JPEG has no alpha channel
            img = img[:, :, :3]
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, quality]
    ok, buf = cv2.imencode(encoding, img, params)
    if not ok:
        raise ImageError(f"OpenCV cannot encode a {img.shape} {img.dtype} image as {encoding}")
    return buf.tobytes()


def check_pass_through(data: bytes) -> None:
    """--pass-through stores bytes undecoded; refuse what is visibly not a (complete) image."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    info = sniff(data)
    if info.fmt == "unknown":
        raise ImageError(f"not an image: unrecognised header {data[:8]!r}")
    if not info.complete:
        raise ImageError(f"truncated {info.fmt.upper()} (file ends before the end-of-image marker)")


def load_image_bytes(path: str, cfg: PackConfig) -> bytes:
    """The encoded image to store for `path` (the whole pipeline for one file).

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
        check_pass_through(data)
        return data
    img, full = decode(data, path, cfg)
    img = transform(img, full, cfg.resize, cfg.center_crop)
    return encode(img, cfg.encoding, cfg.quality)
