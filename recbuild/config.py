"""Every default of recbuild, in one place, with the reason for each.

The im2rec.py-compatible defaults are im2rec's own (so a script that switches program name changes nothing);
the others are ours. The CLI (recbuild/cli.py) turns its flags into these dataclasses at the edge; library
code never sees an argparse namespace.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

# ---- im2rec.py's defaults (same meaning) ---------------------------------------------------------------------
EXTS: Tuple[str, ...] = (".jpeg", ".jpg", ".png")
CHUNKS = 1
TRAIN_RATIO = 1.0
TEST_RATIO = 0.0
SHUFFLE_SEED = 100          # im2rec calls random.seed(100) before random.shuffle: byte-identical lists need it
RESIZE = 0                  # 0: keep the decoded size
QUALITY = 95                # JPEG quality 1-100, or PNG compression level 0-9 with --encoding .png
COLOR = 1                   # cv2.imread flag: 1 colour (BGR), 0 greyscale, -1 unchanged (alpha, 16 bit)
ENCODING = ".jpg"

# ---- ours ----------------------------------------------------------------------------------------------------
# A decoded image larger than this is refused (decompression-bomb guard). 100 MP is a 12000x8000 panorama;
# at 3 bytes per pixel a worker then needs ~300 MB for the decode and about as much for the resize.
# For JPEGs the limit applies to the size *after* DCT-domain reduction, so a 20000x15000 photo packed at
# --resize 224 (decoded at 1/8 scale) passes.
MAX_PIXELS = 100_000_000
# A JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's reduced IDCT: an exact box filter, at a fraction
# of the cost) only while the reduced short edge stays >= this many times --resize, so the final resize still
# averages 1.5+ decoded pixels per output pixel. Measured on bench.pack's 520 photos against a full decode +
# INTER_AREA (recbuild/images.py's exact-geometry resize): reducing down to 1.0x the target leaves the worst
# textured photos at 30-31 dB PSNR (the block grid no longer lines up with the output grid); 1.5x keeps all 520
# at >= 35.1 dB, 2.0x at >= 39.1 dB for ~25% more time per image.
DCT_OVERSAMPLE = 1.5
# On such a reduced decode a progressive JPEG may lose the lowest bits of its AC coefficients (the refinement
# scans that carry them are the slowest part of the decode), as long as they are worth at most this much on the
# two lowest-frequency AC coefficients: bits x quantisation step, in DCT units, where 8 moves a pixel by at most
# ~1.4 grey levels. Measured with progressive photos at quality 30-100 against a full decode + INTER_AREA: 8
# costs <= 0.6 dB at the worst photo of each quality; 12 costs up to 1.3 dB at quality 50, 24 up to 3.5 dB.
LOW_BIT_ERROR_LIMIT = 8
# Work is handed to the worker processes in batches of this many images: large enough that the per-task IPC
# cost (~100 us) is negligible, small enough that the in-order writer never waits long for a slow batch.
BATCH_SIZE = 8
# Batches in flight per worker. Bounds the memory held by finished-but-not-yet-written records (a slow image
# at the head of the list stalls the writer, not the workers) while keeping every worker busy.
IN_FLIGHT_PER_WORKER = 4
# RecordIO stores a record length in 29 bits; dmlc rejects anything larger.
MAX_RECORD_BYTES = (1 << 29) - 1


def default_workers() -> int:
    """All the cores this process may run on (im2rec's default is a single process)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class ListConfig:
    """How to build .lst files (`python -m recbuild --list`).

    Attributes:
        exts: file suffixes to include, compared with the lower-cased suffix (im2rec semantics: '.JPG' never
            matches; pass lower-case suffixes with the dot).
        chunks: split the (shuffled) list into this many chunks, PREFIX_<i>[_train|_val|_test].lst.
        train_ratio: fraction per chunk for training; 1.0 writes a single PREFIX.lst.
        test_ratio: fraction per chunk for testing (taken first, as im2rec does).
        recursive: one label per sub-folder (im2rec order: sorted walk, label = first appearance).
        shuffle: shuffle with `seed` before chunking/splitting.
        seed: the shuffle seed; 100 is im2rec's and gives byte-identical lists.
        labels_csv: Kaggle layout: a flat ROOT plus an `id,label` CSV (header row required).
        label_column: with labels_csv, the header name of the label column (the id is the first column); any
            number of other columns is then allowed. None: the CSV must have exactly the two columns id,label.
        keep_numeric_labels: with labels_csv, integer class ids are the labels as they are (class map entries
            for absent ids are their number); otherwise classes are numbered 0..K-1 in sorted order.
        unlabelled: a flat ROOT without labels becomes PREFIX_test.lst; integer file stems are kept as ids.
        labels_delimiter: with labels_csv, the field separator: ',' (CSV), '\t' (tab) or ' ' (one or more
            spaces, e.g. Baidu's `train.txt`).
        labels_header: with labels_csv, the file starts with a header row (False: every line is `id label`).
        stratify: split every class with the same ratios instead of the whole chunk.
    """
    exts: Tuple[str, ...] = EXTS
    chunks: int = CHUNKS
    train_ratio: float = TRAIN_RATIO
    test_ratio: float = TEST_RATIO
    recursive: bool = False
    shuffle: bool = True
    seed: int = SHUFFLE_SEED
    labels_csv: Optional[str] = None
    label_column: Optional[str] = None
    keep_numeric_labels: bool = False
    unlabelled: bool = False
    labels_delimiter: str = ","
    labels_header: bool = True
    stratify: bool = False


@dataclass
class PackConfig:
    """How to turn a .lst into .rec/.idx (`python -m recbuild PREFIX ROOT`).

    Attributes:
        pass_through: store the file bytes as they are (no decode); the header is still checked.
        resize: resize the shorter edge to this many pixels (0: keep), after the optional center crop.
        center_crop: crop the longer edge to a centred square first.
        quality: JPEG quality (1-100) or PNG compression (0-9).
        color: 1 colour, 0 greyscale, -1 unchanged.
        encoding: '.jpg' or '.png'.
        pack_label: store every label column of a multi-label list (im2rec's --pack-label).
        workers: worker processes; 1 packs in this process.
        strict: any image that cannot be packed makes the run fail (exit status 1) after the report is written.
        max_pixels: decompression-bomb guard, see MAX_PIXELS.
        progress: show a tqdm progress bar.
    """
    pass_through: bool = False
    resize: int = RESIZE
    center_crop: bool = False
    quality: int = QUALITY
    color: int = COLOR
    encoding: str = ENCODING
    pack_label: bool = False
    workers: int = field(default_factory=default_workers)
    strict: bool = False
    max_pixels: int = MAX_PIXELS
    progress: bool = True
