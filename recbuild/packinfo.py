"""NAME.pack.json: what the packer knew about NAME.rec, so that readers never rescan the file for it.

`python -m recbuild` writes it beside NAME.rec, atomically, after NAME.rec and NAME.idx are in place; the old
one is removed before the new .rec replaces the old, so a killed run never leaves a sidecar describing another
file. Content (this exact shape; readers may rely on every key, later versions only add keys):

    {"format": "mxtransfer.pack/1",
     "rec": "NAME.rec",              the file described (a name: it lies beside the sidecar)
     "rec_bytes": 123456,            its size when written (a .rec changed since then no longer matches)
     "records": 1000,                records written, one per .idx line
     "label_width": 1,               labels per record header: 1, or the list's label count with --pack-label
                                     (the largest, should lines differ)
     "class_counts": [600, 400],     records per first label (index = label), or null when some first label is
                                     not a non-negative integer; the first label is what ImageRecordIter reads
                                     with label_width 1
     "transform": {"resize": 224,    short edge, 0 = size kept
                   "center_crop": false, "color": 1, "encoding": ".jpg", "quality": 95,
                   "pass_through": false},
     "payload_crc32": "NAME.crc32",  the payload checksums (recbuild.recordio), for `verify`
     "fingerprints": {"file": "NAME.fingerprints.npy", "format": "mxtransfer.fingerprints/1"}}
                                     only when packed with --report: the data report's per-record fingerprints
                                     (recbuild/fingerprints.py); optional

Files packed by im2rec.py have no sidecar: `read_pack_info` returns None for them, and the caller falls back to
scanning the .rec.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from recbuild.atomic import write_json
from recbuild.config import PackConfig

FORMAT = "mxtransfer.pack/1"
SUFFIX = ".pack.json"
PathLike = Union[str, "Path"]


class PackInfoError(ValueError):
    """A sidecar that is not valid JSON of the documented shape; the message names the file."""


@dataclass(frozen=True)
class PackInfo:
    """A parsed NAME.pack.json.

    Attributes:
        path: the sidecar.
        data: its content, exactly as documented in the module docstring.
        current_bytes: the size of the .rec beside it now (None when it is missing).
    """
    path: Path
    data: Dict
    current_bytes: Optional[int]

    @property
    def records(self) -> int:
        return self.data["records"]

    @property
    def label_width(self) -> int:
        return self.data["label_width"]

    @property
    def class_counts(self) -> Optional[List[int]]:
        return self.data["class_counts"]

    @property
    def rec_bytes(self) -> int:
        return self.data["rec_bytes"]

    @property
    def transform(self) -> Dict:
        return self.data["transform"]

    @property
    def fingerprints(self) -> Optional[str]:
        """The file name of the pack-time fingerprints (beside the sidecar), or None when packed without them."""
        named = self.data.get("fingerprints")
        return named["file"] if named else None

    @property
    def matches_rec(self) -> bool:
        """Whether the .rec still has the size it was written with (if not, the counts describe another file)."""
        return self.current_bytes == self.data["rec_bytes"]


def pack_info_path(rec_path: PathLike) -> Path:
    """NAME.pack.json for NAME.rec."""
    rec_path = Path(rec_path)
    return rec_path.with_name(rec_path.stem + SUFFIX)


def describe(rec_path: Path, rec_bytes: int, labels: Sequence[Sequence[float]], cfg: PackConfig) -> Dict:
    """The sidecar's content for a .rec holding one record per `labels` entry (the list's labels, in order)."""
    widths = [len(ls) if cfg.pack_label and len(ls) > 1 else 1 for ls in labels]
    firsts = [ls[0] for ls in labels]
    counts: Optional[List[int]] = None
    if all(v >= 0 and float(v).is_integer() for v in firsts):
        counts = [0] * (int(max(firsts)) + 1 if firsts else 0)
        for v in firsts:
            counts[int(v)] += 1
    return {"format": FORMAT, "rec": rec_path.name, "rec_bytes": rec_bytes, "records": len(labels),
            "label_width": max(widths, default=1), "class_counts": counts,
            "transform": {"resize": cfg.resize, "center_crop": cfg.center_crop, "color": cfg.color,
                          "encoding": cfg.encoding, "quality": cfg.quality, "pass_through": cfg.pass_through}}


def write_pack_info(rec_path: Path, info: Dict) -> Path:
    """Write the sidecar of `rec_path` atomically; returns its path."""
    path = pack_info_path(rec_path)
    write_json(path, info)
    return path


_SHAPE = {"format": str, "rec": str, "rec_bytes": int, "records": int, "label_width": int, "transform": dict}
_TRANSFORM = {"resize": int, "center_crop": bool, "color": int, "encoding": str, "quality": int,
              "pass_through": bool}


def read_pack_info(rec_path: PathLike) -> Optional[PackInfo]:
    """The sidecar of NAME.rec, or None when there is none (im2rec's files, older packs).

    Raises:
        PackInfoError: the sidecar exists but is not the documented JSON (names the file and the key).
    """
    path = pack_info_path(rec_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: JSON nested deeper than Python recurses
        raise PackInfoError(f"{path}: not a readable pack sidecar ({err}); delete it or pack again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PackInfoError(f"{path}: not a pack sidecar; expected {{\"format\": \"{FORMAT}\", ...}}")
    for key, kind in _SHAPE.items():
        _check(path, key, data.get(key), kind)
    for key, kind in _TRANSFORM.items():
        _check(path, f"transform.{key}", data["transform"].get(key), kind)
    counts = data.get("class_counts", "missing")
    if counts is not None and not (isinstance(counts, list) and all(type(c) is int and c >= 0 for c in counts)):
        raise PackInfoError(f"{path}: 'class_counts' must be a list of counts or null, got {counts!r}")
    if counts is not None and sum(counts) != data["records"]:
        raise PackInfoError(f"{path}: 'class_counts' add up to {sum(counts)}, not to 'records' {data['records']}")
    prints = data.get("fingerprints")
    if prints is not None and not (isinstance(prints, dict) and isinstance(prints.get("file"), str)
                                   and prints["file"] and "/" not in prints["file"]):
        raise PackInfoError(f"{path}: 'fingerprints' must be {{\"file\": NAME}} (a file beside it), got {prints!r}")
    rec = Path(rec_path)
    return PackInfo(path, data, rec.stat().st_size if rec.is_file() else None)


def _check(path: Path, key: str, value, kind: type) -> None:
    # bool is an int in Python; a count given as true/false is still malformed.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PackInfoError(f"{path}: {key!r} must be {kind.__name__}, got {value!r}")
