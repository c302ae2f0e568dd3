"""Data for training and prediction: labels scanned from .rec files, ImageRecordIter set up from the sidecar.

Preprocessing comes from the checkpoint's sidecar (symbols/sidecar.py), so a BGR Caffe model gets BGR input
with its own mean without anyone passing flags. Two things ImageRecordIter cannot do are done on the batch:
  * it always decodes to RGB; a BGR model gets its channels reversed;
  * a mean *image* is subtracted here, after a shape check. ImageRecordIter's own `mean_img` silently computes
    a mean over the data (and writes it) when the file is missing, and never checks its shape.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from recbuild.classmap import find_class_map, read_class_map
from recbuild.recordio import IR_HEADER, RecordIOError, iter_frames
from symbols.sidecar import Preprocess
from train.config import TrainConfig as _DEFAULTS

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file is missing, corrupt or inconsistent with the model; the message names it."""


def scan_labels(rec_path) -> np.ndarray:
    """The (first) label of every record of a .rec file, read from the record headers only (no decoding).

    Raises:
        DataError: the file is missing, is not RecordIO, or is truncated.
    """
    return scan_headers(rec_path)[0]


def scan_headers(rec_path) -> Tuple[np.ndarray, np.ndarray]:
    """(first label, id) of every record of a .rec file, in file order, from the record headers only.

    Raises:
        DataError: the file is missing, is not RecordIO, or is truncated.
    """
    path = Path(rec_path)
    if not path.is_file():
        raise DataError(f"{path}: no such .rec file")
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
    return np.asarray(labels, np.float32), np.asarray(ids, np.int64)


def framing_error(path: Path, err: RecordIOError) -> DataError:
    """The trainer's wording of a broken .rec (recbuild's reader found it)."""
    if err.kind == "magic":
        return DataError(f"{path}: not a RecordIO file (bad magic at byte {err.offset}); pack it with "
                         "`python -m recbuild`")
    if err.kind == "cflag":
        return DataError(f"{path}: corrupt record at byte {err.offset} ({err}); re-pack it")
    return DataError(f"{path}: truncated record at byte {err.offset} (the file ends inside it); re-pack it")


@dataclass
class ClassInfo:
    """Classes of a training set: count, names (from the class map) and how many records each has."""

    num_classes: int
    names: Optional[List[str]]
    counts: np.ndarray
    num_records: int
    class_map: Optional[Path]


def resolve_classes(train_rec, num_classes: Optional[int] = None, val_rec=None) -> ClassInfo:
    """Check labels against the class map and `--num-classes`; decide the class count.

    Raises:
        DataError: labels are not whole numbers, are negative or exceed the class count, or the class map
            and --num-classes disagree.
    """
    labels = scan_labels(train_rec)
    if labels.size == 0:
        raise DataError(f"{train_rec}: contains no records")
    found = find_class_map(train_rec)
    names = read_class_map(found) if found else None
    checked = [(Path(train_rec), labels)]
    if val_rec:
        checked.append((Path(val_rec), scan_labels(val_rec)))
    for path, lab in checked:
        if not np.all(lab == np.round(lab)) or lab.min() < 0:
            bad = lab[(lab != np.round(lab)) | (lab < 0)][0]
            raise DataError(f"{path}: label {bad:g} is not a class index (whole numbers from 0 expected)")
    top = int(max(lab.max() for _, lab in checked))
    if names is not None and num_classes is not None and num_classes != len(names):
        raise DataError(f"--num-classes {num_classes} disagrees with the class map {found} ({len(names)} classes)")
    count = num_classes if num_classes is not None else (len(names) if names is not None else top + 1)
    for path, lab in checked:
        if lab.max() >= count:
            source = f"--num-classes {num_classes}" if num_classes is not None else f"the class map {found}"
            raise DataError(f"{path}: label {int(lab.max())} is out of range for {count} classes ({source})")
    counts = np.bincount(labels.astype(np.int64), minlength=count)
    if (counts == 0).any():
        log.warning("%s: %d of %d classes have no training records: %s", train_rec, int((counts == 0).sum()),
                    count, np.flatnonzero(counts == 0)[:10].tolist())
    return ClassInfo(count, names, counts, int(labels.size), found)


def check_same_classes(names: Sequence[str], where: str, other: Sequence[str], other_where: str) -> None:
    """Two class lists must be identical (same names, same order): labels mean the same class on both sides.

    Raises:
        DataError: naming both files, the sizes and the first label whose name differs.
    """
    names, other = list(names), list(other)
    if names == other:
        return
    first = next((i for i, (a, b) in enumerate(zip(names, other)) if a != b), min(len(names), len(other)))
    left = repr(names[first]) if first < len(names) else "nothing"
    right = repr(other[first]) if first < len(other) else "nothing"
    raise DataError(f"class maps differ: {where} ({len(names)} classes) and {other_where} ({len(other)} classes) "
                    f"first differ at label {first}: {left} vs {right}; both must list the same classes in the "
                    f"same order (pack every split from one `python -m recbuild --list` run)")


@dataclass
class Augment:
    """Training-time augmentation (ImageRecordIter's own, so it runs in its decode threads).

    The defaults (all off) are TrainConfig's: defaults live in train/config.py only.
    """

    random_crop: bool = _DEFAULTS.random_crop
    random_resized_crop: bool = _DEFAULTS.random_resized_crop
    min_random_area: float = _DEFAULTS.min_random_area
    max_random_area: float = _DEFAULTS.max_random_area
    min_random_aspect_ratio: float = _DEFAULTS.min_random_aspect_ratio
    max_random_aspect_ratio: float = _DEFAULTS.max_random_aspect_ratio
    random_mirror: bool = _DEFAULTS.random_mirror
    max_random_rotate_angle: int = _DEFAULTS.max_random_rotate_angle
    brightness: float = _DEFAULTS.brightness
    contrast: float = _DEFAULTS.contrast
    saturation: float = _DEFAULTS.saturation
    pca_noise: float = _DEFAULTS.pca_noise

    def iter_kwargs(self) -> dict:
        kw = dict(rand_crop=self.random_crop or self.random_resized_crop, rand_mirror=self.random_mirror,
                  max_rotate_angle=self.max_random_rotate_angle, brightness=self.brightness,
                  contrast=self.contrast, saturation=self.saturation, pca_noise=self.pca_noise)
        if self.random_resized_crop:
            kw.update(random_resized_crop=True, min_random_area=self.min_random_area,
                      max_random_area=self.max_random_area, min_aspect_ratio=self.min_random_aspect_ratio,
                      max_aspect_ratio=self.max_random_aspect_ratio)
        return kw


def normalisation(pre: Preprocess, sidecar_dir, image_shape: Sequence[int],
                  rgb_mean: Optional[Sequence[float]] = None, rgb_std: Optional[Sequence[float]] = None
                  ) -> Tuple[dict, Optional[tuple]]:
    """ImageRecordIter's mean/std/scale arguments and the mean-image step: `Preprocess.iterator_args`, the one
    home of the formula, with its errors as DataError."""
    try:
        return pre.iterator_args(sidecar_dir, image_shape, rgb_mean, rgb_std)
    except ValueError as err:
        raise DataError(str(err)) from None


class ModelInputIter(mx.io.DataIter):
    """Wraps an ImageRecordIter: reverses channels for BGR models and applies a mean image.

    Provides `data` and `label_name` (the model's SoftmaxOutput label), whatever names the inner iterator uses.
    """

    def __init__(self, inner: mx.io.DataIter, label_name: str, bgr: bool, mean_image=None):
        super().__init__(inner.batch_size)
        self.inner, self.label_name, self.bgr = inner, label_name, bgr
        self.mean_image = None
        if mean_image is not None:
            mean, std, scale = mean_image
            # Mean image is in the model's channel order; batches are reversed before it is subtracted.
            self.mean_image = mx.nd.array(mean[None])
            self.std = mx.nd.array(np.asarray(std, np.float32).reshape(1, -1, 1, 1)) if std is not None else None
            self.scale = scale

    @property
    def provide_data(self):
        return [mx.io.DataDesc("data", self.inner.provide_data[0].shape)]

    @property
    def provide_label(self):
        return [mx.io.DataDesc(self.label_name, self.inner.provide_label[0].shape)]

    def reset(self):
        self.inner.reset()

    def next(self) -> mx.io.DataBatch:
        batch = self.inner.next()
        data = batch.data[0]
        if self.bgr:
            data = mx.nd.flip(data, axis=1)
        if self.mean_image is not None:
            data = data - self.mean_image
            if self.std is not None:
                data = data / self.std
            if self.scale != 1.0:
                data = data * self.scale
        return mx.io.DataBatch(data=[data], label=batch.label, pad=batch.pad, index=batch.index,
                               provide_data=self.provide_data, provide_label=self.provide_label)


def record_iter(path, batch_size: int, pre: Preprocess, sidecar_dir, label_name: str,
                image_shape: Optional[Sequence[int]] = None, train: bool = False, augment: Optional[Augment] = None,
                seed: int = 0, resize: int = -1, threads: int = 2, num_parts: int = 1, part_index: int = 0,
                rgb_mean=None, rgb_std=None, round_batch: bool = True) -> ModelInputIter:
    """An iterator over a .rec file that yields exactly what the model expects.

    Args:
        path: the .rec file (its .idx beside it is used when present).
        batch_size: images per batch (per worker).
        pre: the model's sidecar; gives channel order, mean, std, scale and (by default) the input shape.
        sidecar_dir: folder of the sidecar (a mean image is relative to it).
        label_name: the model's label input, e.g. 'prob_label'.
        image_shape: (C, H, W) to feed; default the sidecar's input_shape.
        train: shuffle and augment (augmentation only with `augment`); otherwise a centre crop, in order.
        seed: seeds shuffling and augmentation, so an epoch can be replayed exactly on resume.
        resize: resize the shorter side to this before cropping (-1: keep the packed size).
        threads: decode threads.
        num_parts / part_index: each distributed worker reads its own part.
        rgb_mean / rgb_std: override the sidecar's values (RGB order).
        round_batch: fill the last batch by wrapping around and report the filler in `batch.pad`. With
            False, ImageRecordIter 1.9 wraps around anyway but reports pad 0, so keep it True. Its reset() is
            not clean either (the next epoch starts after the filler), so make a new iterator per pass.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such .rec file")
    shape = tuple(int(v) for v in (image_shape or pre.input_shape))
    records = len(scan_labels(path))
    if records == 0:
        raise DataError(f"{path}: contains no records")
    if batch_size > records:
        # ImageRecordIter refuses a batch larger than the file; a small evaluation set is simply one batch.
        if train:
            raise DataError(f"{path}: {records} records, fewer than the batch size {batch_size}; lower --batch-size")
        batch_size = records
    norm, mean_image = normalisation(pre, sidecar_dir, shape, rgb_mean, rgb_std)
    kw = dict(path_imgrec=str(path), data_shape=shape, batch_size=batch_size, shuffle=train, seed=seed,
              seed_aug=seed, preprocess_threads=max(1, threads), num_parts=num_parts, part_index=part_index,
              round_batch=round_batch, resize=resize, verbose=False, label_width=1, **norm)
    idx = path.with_suffix(".idx")
    if idx.is_file():
        kw["path_imgidx"] = str(idx)
    if train and augment is not None:
        kw.update(augment.iter_kwargs())
    inner = mx.io.ImageRecordIter(**kw)
    return ModelInputIter(inner, label_name, pre.channel_order == "BGR", mean_image)
