"""Packed sets with their pack sidecar, for the trainer and predictor tests.

`pack_tree` writes raw images of assorted sizes (larger than the model input, not square) whose colours encode
their class, lists them, and packs them with recbuild's own packer. The pack sidecar `NAME.pack.json` is
recbuild's to write; where this checkout's recbuild does not write one yet, `write_pack_sidecar` writes it in
the documented format (mxtransfer.pack/1), so the tests hold either way.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

import cv2
import numpy as np

from recbuild.classmap import write_class_map
from recbuild.config import PackConfig
from recbuild.listing import Entry, write_list
from recbuild.packing import pack_list
from tests._train_fixtures import class_image

# Raw sizes (h, w): all larger than the 16x16 test input, landscape and portrait, none already at a pack size.
RAW_SIZES = ((30, 40), (44, 26), (27, 27), (36, 50), (25, 33))


def write_pack_sidecar(rec: Path, cfg: PackConfig, class_counts: Optional[Sequence[int]], records: int,
                       **extra) -> Path:
    """NAME.pack.json beside NAME.rec, in the format recbuild writes (extra keys allowed)."""
    path = rec.with_name(rec.name[:-len(".rec")] + ".pack.json")
    data = {"format": "mxtransfer.pack/1", "rec": rec.name, "rec_bytes": rec.stat().st_size, "records": records,
            "label_width": 1, "class_counts": list(class_counts) if class_counts is not None else None,
            "transform": {"resize": cfg.resize, "center_crop": cfg.center_crop, "color": cfg.color,
                          "encoding": cfg.encoding, "quality": cfg.quality, "pass_through": cfg.pass_through}}
    data.update(extra)
    path.write_text(json.dumps(data))
    return path


def pack_tree(folder: Path, name: str, classes: Sequence[str], per_class: int, cfg: PackConfig, seed: int = 0
              ) -> Path:
    """Raw PNGs under folder/images/<class>/, NAME.lst, NAME.rec (+ .idx, pack sidecar, class map)."""
    rng = np.random.RandomState(seed)
    entries: List[Entry] = []
    root = folder / "images"
    for i in range(len(classes) * per_class):
        label = i % len(classes)
        h, w = RAW_SIZES[i % len(RAW_SIZES)]
        img = class_image(label, len(classes), max(h, w), rng)[:h, :w]
        rel = f"{classes[label]}/{name}{i:03d}.png"
        (root / classes[label]).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), img)
        entries.append(Entry(i, (float(label),), rel))
    lst = folder / f"{name}.lst"
    write_list(str(lst), entries)
    report = pack_list(lst, str(root), cfg)
    assert report.packed == len(entries), report.summary()
    rec = folder / f"{name}.rec"
    if not rec.with_name(f"{name}.pack.json").is_file():
        counts = np.bincount([int(e.labels[0]) for e in entries], minlength=len(classes)).tolist()
        write_pack_sidecar(rec, cfg, counts, len(entries))
    stem = name
    for split in ("_train", "_val", "_test"):
        stem = stem[:-len(split)] if stem.endswith(split) else stem
    write_class_map(folder / stem, list(classes))
    return rec
