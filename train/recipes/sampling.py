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
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, List, Optional

import mxnet as mx
import numpy as np

from tools.atomic import atomic_path
from train.data import DataError, scan_labels

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


def record_payloads(rec_path: Path) -> List[bytes]:
    """Every record payload of a .rec (each already holds its IRHeader and encoded image), in file order."""
    reader = mx.recordio.MXRecordIO(str(rec_path), "r")
    payloads = []
    try:
        while True:
            item = reader.read()
            if item is None:
                break
            payloads.append(item)
    finally:
        reader.close()
    return payloads


def write_resampled_rec(src: Path, indices: np.ndarray, dst: Path, payloads: Optional[List[bytes]] = None) -> Path:
    """Write DST (.rec + .idx, atomically) holding the records of SRC at `indices`, in that order.

    Record ids are renumbered 0..n-1 in the .idx (the IRHeader inside each record is kept as is).
    """
    payloads = payloads if payloads is not None else record_payloads(src)
    dst = Path(dst)
    with atomic_path(dst) as tmp_rec, atomic_path(dst.with_suffix(".idx")) as tmp_idx:
        writer = mx.recordio.MXIndexedRecordIO(str(tmp_idx), str(tmp_rec), "w")
        for key, i in enumerate(indices):
            writer.write_idx(key, payloads[int(i)])
        writer.close()
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
        self._payloads: Optional[List[bytes]] = None
        self._last: Optional[Path] = None
        counts = np.bincount(self.labels.astype(np.int64))
        log.info("class-balanced sampling of %s: class counts %s -> ~%.1f records per class per epoch",
                 self.src, counts.tolist(), self.labels.size / max(int((counts > 0).sum()), 1))

    def indices(self, epoch: int) -> np.ndarray:
        return balanced_indices(self.labels, self.seed * 1000 + epoch)

    def __call__(self, epoch: int) -> str:
        if self._payloads is None:
            self._payloads = record_payloads(self.src)
            if len(self._payloads) != self.labels.size:
                raise DataError(f"{self.src}: {len(self._payloads)} records readable, {self.labels.size} headers")
        path = self.folder / f"epoch-{epoch:04d}.rec"
        write_resampled_rec(self.src, self.indices(epoch), path, self._payloads)
        if self._last is not None and self._last != path:
            for old in (self._last, self._last.with_suffix(".idx")):
                if old.exists():
                    os.remove(old)
        self._last = path
        return str(path)


def epoch_rec_provider(train_rec, model_prefix, seed: int) -> Callable[[int], str]:
    """The provider fit() calls each epoch: resampled copies live in MODEL_PREFIX.balanced/."""
    return BalancedEpochs(train_rec, Path(str(model_prefix) + ".balanced"), seed)
