"""Class-balanced sampling for imbalanced training sets.

Each epoch draws as many records as the set holds (so batches per epoch, schedules and resume arithmetic stay
those of the plain run), every class with the same probability: record i of class c is drawn with probability
1 / (K * count[c]), with replacement. Minority records therefore repeat, majority records are subsampled.
The draw is seeded by (seed, epoch), so a resumed run replays it exactly.

Two consumers:
* the feature cache (train.recipes.features) draws indices into the cached arrays;
* full fine-tuning (`python -m train.recipes fit --class-balance ...`) gets, per epoch, a resampled .rec whose
  records are raw copies of the chosen ones (no decode, no re-encode) and reads it with the same
  ImageRecordIter, so augmentation and decoding stay MXNet's own. ImageRecordIter cannot repeat a record from
  one .rec: an .idx with two keys on one offset gives the repeat a size of 0 in dmlc's IndexedRecordIOSplitter.
  Records are copied by offset (only the offsets are held in memory), so large sets are fine; each copy's
  header id is renumbered to its key, so `python -m recbuild verify` passes on the epoch files. Reading and
  writing go through recbuild.recordio, the project's one RecordIO implementation (checked against mx.recordio
  in the tests).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from recbuild.atomic import atomic_open
from recbuild.packinfo import pack_info_path
from recbuild.recordio import IR_HEADER, RecordIOError, RecordWriter, checksums_path, iter_frames, iter_records
from train.data import DataError, framing_error, scan_labels

log = logging.getLogger(__name__)


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Per-record sampling probabilities that give every present class the same total weight."""
    labels = np.asarray(labels).astype(np.int64)
    if labels.size == 0:
        raise ValueError("class-balanced sampling needs at least one record")
    counts = np.bincount(labels)
    present = int((counts > 0).sum())
    weights = 1.0 / (present * counts[labels])
    return weights / weights.sum()


def balanced_indices(labels: np.ndarray, seed: int, size: Optional[int] = None) -> np.ndarray:
    """`size` (default: len(labels)) record indices drawn with replacement, every class equally likely."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    return rng.choice(labels.size, size=labels.size if size is None else size, replace=True,
                      p=class_weights(labels))


def record_offsets(rec_path: Path) -> List[int]:
    """Byte offset of every record of a .rec, in file order, from the framing only (no payload is read).

    A record split by the writer (cflag 1 = first part, 2 = middle, 3 = last) counts once, at its first part.
    """
    path = Path(rec_path)
    try:
        with open(path, "rb") as handle:
            return [frame.offset for frame in iter_frames(handle, path.stat().st_size) if frame.cflag in (0, 1)]
    except RecordIOError as err:
        raise framing_error(path, err) from None


class RecordReader:
    """Random access to the records of a .rec by file position (0..n-1), holding only their offsets.

    The set's own .idx is not needed (its keys may be anything, or missing): positions come from the framing.
    """

    def __init__(self, rec_path):
        self.path = Path(rec_path)
        self.offsets = record_offsets(self.path)
        self.size = self.path.stat().st_size
        self.handle = open(self.path, "rb")

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, position: int) -> bytes:
        """The payload of the record at file position `position` (split records joined)."""
        try:
            for _, payload in iter_records(self.handle, self.size, self.offsets[int(position)]):
                return payload
        except RecordIOError as err:
            raise framing_error(self.path, err) from None
        raise DataError(f"{self.path}: no record at position {position}")

    def close(self) -> None:
        self.handle.close()


def with_record_id(payload: bytes, key: int) -> bytes:
    """An image record's payload with its header id set to `key` (labels and image bytes untouched), so that
    header id and .idx key agree, as im2rec writes them and `python -m recbuild verify` checks."""
    flag, label, _, id2 = IR_HEADER.unpack_from(payload)
    return IR_HEADER.pack(flag, label, key, id2) + payload[IR_HEADER.size:]


def remove_stale_companions(rec: Path) -> None:
    """Before a new REC replaces an old one: remove the files that describe the old one (its .idx, and the
    packer's NAME.pack.json and NAME.crc32, whose counts and checksums would be wrong for the new file)."""
    for old in (rec.with_suffix(".idx"), pack_info_path(rec), checksums_path(rec)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(old)


def write_resampled_rec(reader: RecordReader, indices: np.ndarray, dst: Path) -> Path:
    """Write DST (.rec + .idx, atomically) holding the records at file positions `indices`, in that order.

    Keys are 0..n-1 and each record's header id is its key (a record drawn twice appears under two ids); labels
    and encoded images are copied as they are.
    """
    dst = Path(dst)
    with atomic_open(dst, "wb") as rec_handle:
        writer = RecordWriter(rec_handle)
        for key, i in enumerate(indices):
            writer.write(key, with_record_id(reader.read(i), key))
        remove_stale_companions(dst)
    with atomic_open(dst.with_suffix(".idx"), "w", encoding="ascii", newline="\n") as idx_handle:
        writer.write_index(idx_handle)
    return dst


class BalancedEpochs:
    """Per-epoch resampled copies of a training .rec, for `train.fit.fit(..., epoch_train_rec=...)`.

    Each call writes `<folder>/epoch-NNNN.rec` for that epoch (seeded by seed and epoch) and removes the
    previous epoch's file, so at most one copy of the set is on disk besides the original.
    """

    def __init__(self, train_rec, folder, seed: int = 0):
        self.src = Path(train_rec)
        self.labels = scan_labels(self.src)
        if self.labels.size == 0:
            raise DataError(f"{self.src}: contains no records")
        self.folder = Path(folder)
        self.seed = seed
        self._reader: Optional[RecordReader] = None
        self._last: Optional[Path] = None
        counts = np.bincount(self.labels.astype(np.int64))
        log.info("class-balanced sampling of %s: class counts %s -> ~%.1f records per class per epoch",
                 self.src, counts.tolist(), self.labels.size / max(int((counts > 0).sum()), 1))

    def indices(self, epoch: int) -> np.ndarray:
        return balanced_indices(self.labels, self.seed * 1000 + epoch)

    def __call__(self, epoch: int) -> str:
        if self._reader is None:
            self._reader = RecordReader(self.src)
            if len(self._reader) != self.labels.size:
                raise DataError(f"{self.src}: {len(self._reader)} records framed, {self.labels.size} headers")
        path = self.folder / f"epoch-{epoch:04d}.rec"
        write_resampled_rec(self._reader, self.indices(epoch), path)
        if self._last is not None and self._last != path:
            for old in (self._last, self._last.with_suffix(".idx")):
                if old.exists():
                    os.remove(old)
        self._last = path
        return str(path)


def epoch_rec_provider(train_rec, model_prefix, seed: int) -> Callable[[int], str]:
    """The provider fit() calls each epoch: resampled copies live in MODEL_PREFIX.balanced/."""
    return BalancedEpochs(train_rec, Path(str(model_prefix) + ".balanced"), seed)
