"""Data for training and prediction: one preprocessing truth from the packed image to the model input.

* What a .rec holds (record count, class histogram, labels, how its images were packed) comes from
  train/recfile.py: the pack sidecar `NAME.pack.json` recbuild writes, else one header scan per file, cached.
* Class maps: the class map `PREFIX.classes.json` is the truth for a data set, the sidecar's `class_names` for
  a model; train and val maps (and, at prediction, the data's and the model's) must be identical.
* At start-up `plan_input` checks the pack transform against the model input, says what ImageRecordIter will
  do (centre crop, random crop, random resized crop, enlargement) and records it in the model's sidecar, so
  `load_raw_image` prepares a raw file exactly like its training record: recbuild's own decode and
  transform, then `iterator_view`, ImageRecordIter's validation geometry.
* The formula (channel order, mean, std, scale) is the sidecar's (symbols/sidecar.py). Two things
  ImageRecordIter cannot do are done on the batch: it always decodes to RGB, so a BGR model gets its channels
  reversed; and a mean *image* is subtracted here, after a shape check (ImageRecordIter's own `mean_img`
  silently computes a mean over the data, and writes it, when the file is missing, and never checks its shape).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from recbuild.classmap import find_class_map, read_class_map
from symbols import classes
from symbols.sidecar import Preprocess
from train import recfile
from train.recfile import DataError, PackTransform, framing_error  # noqa: F401  (re-exported)
from train.config import AUGMENT, TrainConfig

log = logging.getLogger(__name__)


def scan_labels(rec_path) -> np.ndarray:
    """The (first) label of every record of a .rec file, from the record headers (scanned once per file).

    Raises:
        DataError: the file is missing, is not RecordIO, or is truncated.
    """
    return recfile.scan(rec_path).labels


def scan_headers(rec_path) -> Tuple[np.ndarray, np.ndarray]:
    """(first label, id) of every record of a .rec file, in file order (scanned once per file).

    Raises:
        DataError: the file is missing, is not RecordIO, or is truncated.
    """
    found = recfile.scan(rec_path)
    return found.labels, found.ids


def record_count(rec_path) -> int:
    """Records in a .rec: the pack sidecar's count, else the (cached) header scan."""
    return recfile.summary(rec_path)[0]


def pack_transform(rec_path) -> Optional[PackTransform]:
    """How the images of `rec_path` were packed (its pack sidecar), or None for a file without one."""
    info = recfile.read_pack_info(rec_path)
    return info.transform if info is not None else None


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

    The class histogram comes from the pack sidecar where it has one (recbuild wrote whole class indices),
    else from the record headers (scanned once per file). A val class map must equal the training one.

    Raises:
        DataError: labels are not whole numbers, are negative or exceed the class count, the class map
            and --num-classes disagree, or the train and val class maps differ.
    """
    found = find_class_map(train_rec)
    names = read_class_map(found) if found else None
    if val_rec:
        val_map = find_class_map(val_rec)
        if names is not None and val_map is not None and val_map != found:
            check_same_classes(names, str(found), read_class_map(val_map), str(val_map))
    checked = [(Path(train_rec), _histogram(train_rec))]
    if val_rec:
        checked.append((Path(val_rec), _histogram(val_rec)))
    if checked[0][1].sum() == 0:
        raise DataError(f"{train_rec}: contains no records")
    top = max(len(hist) - 1 for _, hist in checked)
    if names is not None and num_classes is not None and num_classes != len(names):
        raise DataError(f"--num-classes {num_classes} disagrees with the class map {found} ({len(names)} classes)")
    count = num_classes if num_classes is not None else (len(names) if names is not None else top + 1)
    for path, hist in checked:
        if len(hist) > count:
            source = f"--num-classes {num_classes}" if num_classes is not None else f"the class map {found}"
            raise DataError(f"{path}: label {len(hist) - 1} is out of range for {count} classes ({source})")
    counts = np.zeros(count, np.int64)
    counts[:len(checked[0][1])] = checked[0][1]
    if (counts == 0).any():
        log.warning("%s: %d of %d classes have no training records: %s", train_rec, int((counts == 0).sum()),
                    count, np.flatnonzero(counts == 0)[:10].tolist())
    return ClassInfo(count, names, counts, int(counts.sum()), found)


def _histogram(rec_path) -> np.ndarray:
    """Records per class index (up to the largest label present) of a .rec, checking the labels are classes."""
    records, counts = recfile.summary(rec_path)
    if counts is not None:
        nonzero = np.flatnonzero(counts)
        return counts[:nonzero[-1] + 1] if nonzero.size else counts[:0]
    labels = scan_labels(rec_path)
    bad = labels[(labels != np.round(labels)) | (labels < 0)]
    if bad.size:
        raise DataError(f"{rec_path}: label {bad[0]:g} is not a class index (whole numbers from 0 expected)")
    return np.bincount(labels.astype(np.int64)) if labels.size else np.zeros(0, np.int64)


def check_same_classes(names: Sequence[str], where: str, other: Sequence[str], other_where: str) -> None:
    """symbols.classes.check_same_classes (the one comparison of class lists), its error as DataError.

    Raises:
        DataError: naming both files, the sizes and the first label whose name differs.
    """
    try:
        classes.check_same_classes(names, where, other, other_where)
    except classes.ClassNamesError as err:
        raise DataError(str(err)) from None


class _AugmentMethods:
    """What Augment does with its settings; its fields are declared once, as TrainConfig's AUGMENT group."""

    @classmethod
    def from_config(cls, cfg) -> "Augment":
        """The augmentation fields of a TrainConfig (same names)."""
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})

    def iter_kwargs(self) -> dict:
        """ImageRecordIter's augmentation arguments, each set as fine-tune.py's data.py sets it (so the defaults
        and meanings are its own: an unset --min-random-aspect-ratio makes --max-random-aspect-ratio X a 1 +- X
        jitter, with or without random_resized_crop, and the area limits default to the whole image)."""
        return dict(rand_crop=self.random_crop, random_resized_crop=self.random_resized_crop,
                    rand_mirror=self.random_mirror, max_random_scale=self.max_random_scale,
                    min_random_scale=self.min_random_scale, max_aspect_ratio=self.max_random_aspect_ratio,
                    min_aspect_ratio=self.min_random_aspect_ratio, max_random_area=self.max_random_area,
                    min_random_area=self.min_random_area, min_crop_size=self.min_crop_size,
                    max_crop_size=self.max_crop_size, brightness=self.brightness, contrast=self.contrast,
                    saturation=self.saturation, pca_noise=self.pca_noise, random_h=self.max_random_h,
                    random_s=self.max_random_s, random_l=self.max_random_l,
                    max_rotate_angle=self.max_random_rotate_angle, max_shear_ratio=self.max_random_shear_ratio)

    def aspect_range(self) -> Tuple[float, float]:
        """The aspect ratios drawn (data.py's rule: [min, max], or 1 +- max without a min)."""
        if self.min_random_aspect_ratio is None:
            return 1 - self.max_random_aspect_ratio, 1 + self.max_random_aspect_ratio
        return self.min_random_aspect_ratio, self.max_random_aspect_ratio


# Training-time augmentation (ImageRecordIter's own, so it runs in its decode threads): a dataclass whose fields,
# types and defaults are TrainConfig's AUGMENT group, so the options are declared in train/config.py only.
Augment = make_dataclass(
    "Augment", [(f.name, f.type, field(default=f.default)) for f in fields(TrainConfig)
                if f.metadata.get("group") == AUGMENT],
    bases=(_AugmentMethods,))
Augment.__module__ = __name__


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
                rgb_mean=None, rgb_std=None, round_batch: bool = True, idx_path=None, pad: int = 0,
                fill_value: int = 127) -> ModelInputIter:
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
        idx_path: the .idx to use (--data-train-idx / --data-val-idx); default the .idx beside the .rec.
        pad / fill_value: pad every image by `pad` pixels of value `fill_value` (--pad-size / --fill-value).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such .rec file")
    shape = tuple(int(v) for v in (image_shape or pre.input_shape))
    records = record_count(path)  # the pack sidecar's, or one header scan per file: never per pass
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
              round_batch=round_batch, resize=resize, verbose=False, label_width=1, pad=pad, fill_value=fill_value,
              **norm)
    if idx_path:
        if not Path(idx_path).is_file():
            raise DataError(f"{idx_path}: no such .idx file (--data-train-idx / --data-val-idx)")
        kw["path_imgidx"] = str(idx_path)
    elif path.with_suffix(".idx").is_file():
        kw["path_imgidx"] = str(path.with_suffix(".idx"))
    if train and augment is not None:
        kw.update(augment.iter_kwargs())
    inner = mx.io.ImageRecordIter(**kw)
    return ModelInputIter(inner, label_name, pre.channel_order == "BGR", mean_image)


# ---- one preprocessing truth: from the packed (or raw) image to the model input -------------------------------
# The classic re-pack ratio for random crops (ImageNet: 256 packed for a 224 input).
CROP_MARGIN = 256 / 224


def plan_input(pre: Preprocess, sidecar_dir, shape: Sequence[int], cfg) -> Preprocess:
    """Start-up check of the data against the model input; returns the sidecar the run writes.

    Reads the pack sidecars of cfg.data_train / cfg.data_val (a .rec without one, e.g. from im2rec, still
    trains, with a warning), says what ImageRecordIter will do to each packed image (centre crop, random crop,
    random resized crop, an enlargement when the images are packed smaller than the input), warns when
    `--random-crop 1` has nothing to crop, and checks --rgb-mean/--rgb-std and a mean image before any work.

    Returns:
        `pre` with `packing` filled (the training pack transform and cfg.resize, which is how `train.predict`
        prepares raw images exactly alike) and --rgb-mean/--rgb-std folded in (in the model's channel order),
        so the sidecar records the formula the model was trained with.

    Raises:
        DataError: bad --rgb-mean/--rgb-std, a missing or mis-shaped mean image, a bad pack sidecar.
    """
    normalisation(pre, sidecar_dir, shape, cfg.rgb_mean, cfg.rgb_std)
    train_pack = _pack_or_warn(cfg.data_train)
    if cfg.data_val:
        val_pack = _pack_or_warn(cfg.data_val)
        if train_pack is not None and val_pack is not None and val_pack != train_pack:
            log.warning("%s was packed differently from %s (%s vs %s): validation then measures other pictures "
                        "than training and prediction see; pack both with the same flags", cfg.data_val,
                        cfg.data_train, val_pack.describe(), train_pack.describe())
    for level, message in describe_input(cfg.data_train, train_pack, shape, cfg.resize, Augment.from_config(cfg)):
        log.log(level, "%s", message)
    packing = {"pack": None if train_pack is None else dict(vars(train_pack)), "iterator_resize": int(cfg.resize)}
    return replace(_fold_overrides(pre, cfg.rgb_mean, cfg.rgb_std), packing=packing)


def _pack_or_warn(rec_path) -> Optional[PackTransform]:
    transform = pack_transform(rec_path)
    if transform is None:
        log.warning("%s: no pack sidecar %s (packed by im2rec or an older recbuild): how its images were resized "
                    "is unknown, so `train.predict` on raw images resizes their short edge to the input size; "
                    "re-pack with `python -m recbuild` to record it", rec_path,
                    recfile.pack_sidecar_path(rec_path).name)
    return transform


def describe_input(rec_path, pack: Optional[PackTransform], shape: Sequence[int], resize: int,
                   augment: Augment) -> List[Tuple[int, str]]:
    """(log level, message) lines saying what happens between a packed image and the model input."""
    height, width = int(shape[1]), int(shape[2])
    target = f"{height}x{width}"
    if augment.random_resized_crop:
        low, high = augment.aspect_range()
        crop = (f"random resized crop (area {augment.min_random_area:g}-{augment.max_random_area:g}, aspect "
                f"{low:g}-{high:g}) resized to {target}")
    elif augment.random_crop:
        crop = f"random crop {target}"
    else:
        crop = f"centre crop {target}"
    short = resize if resize > 0 else (pack.resize if pack is not None and not pack.pass_through else 0)
    packed = pack.describe() if pack is not None else "packed without a record of how"
    via = f", resized by the iterator to short edge {resize}" if resize > 0 else ""
    lines = [(logging.INFO, f"{rec_path}: images {packed}{via}; training takes a {crop}, validation and "
                            f"prediction a centre crop {target}")]
    if augment.random_crop and not augment.random_resized_crop and _nothing_to_crop(rec_path, pack, resize, shape):
        lines.append((logging.WARNING, f"--random-crop 1 does nothing here: {rec_path} holds {width}x{height} "
                                       f"images and the input is {target}, so every crop is the whole image; "
                                       f"re-pack larger (`python -m recbuild --resize "
                                       f"{int(round(max(height, width) * CROP_MARGIN))}`), or use "
                                       f"--random-resized-crop 1"))
    if short and short < max(height, width):
        lines.append((logging.WARNING, f"{rec_path}: images have a short edge of {short}, smaller than the "
                                       f"{target} input: ImageRecordIter enlarges every one (blurred); re-pack with "
                                       f"`python -m recbuild --resize {max(height, width)}` or larger"))
    elif not short and resize <= 0:
        lines += _small_records(rec_path, max(height, width), target)
    return lines


# Records this much smaller than the input (short edge) are enlarged enough to lose the detail a pretrained
# model relies on (32 px CIFAR images at 224 are enlarged 7x).
SMALL_RECORD_FACTOR = 1.5


def _small_records(rec_path, side: int, target: str) -> List[Tuple[int, str]]:
    """A warning when the first records (their encoded headers, nothing decoded) have a short edge more than
    SMALL_RECORD_FACTOR below the input: packed without --resize, or by im2rec, the pack records no size."""
    shorts = [min(size) for size in recfile.sample_sizes(rec_path, 16)]
    if not shorts or min(shorts) * SMALL_RECORD_FACTOR >= side:
        return []
    return [(logging.WARNING, f"{rec_path}: the first {len(shorts)} records have a short edge of "
                              f"{min(shorts)}-{max(shorts)} px, more than {SMALL_RECORD_FACTOR:g}x below the "
                              f"{target} input: ImageRecordIter enlarges them up to {side / min(shorts):.1f}x "
                              f"(blurred); pack larger images, or train at a smaller --image-shape if the model "
                              f"allows it")]


def _nothing_to_crop(rec_path, pack: Optional[PackTransform], resize: int, shape: Sequence[int]) -> bool:
    """Whether the records are exactly the input size: the pack sidecar says so (a centre-cropped square of
    the input size), or, without an iterator resize, the first records' own headers do (square sources packed
    at the input size, or an im2rec file)."""
    height, width = int(shape[1]), int(shape[2])
    if resize > 0:
        return resize == height == width and pack is not None and pack.center_crop
    if pack is not None and pack.center_crop and pack.resize:
        return pack.resize == height == width
    sizes = recfile.sample_sizes(rec_path)
    return bool(sizes) and all(size == (width, height) for size in sizes)


def _fold_overrides(pre: Preprocess, rgb_mean, rgb_std) -> Preprocess:
    """The sidecar with --rgb-mean/--rgb-std (RGB order) written in its own channel order."""
    order = slice(None, None, -1) if pre.channel_order == "BGR" else slice(None)
    if rgb_mean is not None:
        pre = replace(pre, mean=pre.per_channel(rgb_mean, "--rgb-mean")[order])
    if rgb_std is not None:
        pre = replace(pre, std=pre.per_channel(rgb_std, "--rgb-std")[order])
    return pre


def raw_packing(pre: Preprocess, resize: int = -1) -> Tuple[PackTransform, int]:
    """(pack transform, iterator resize) that turn a raw image into what the model was trained on.

    From the sidecar's `packing` when the trainer recorded it; otherwise (a converted model, a .rec packed
    without a sidecar) the short edge is resized to the input size (or to `resize`). `resize` > 0 overrides the
    iterator resize, as --resize does for a .rec.
    """
    packing = pre.packing or {}
    iterator_resize = resize if resize > 0 else int(packing.get("iterator_resize", -1))
    if packing.get("pack"):
        known = {k: v for k, v in packing["pack"].items() if k in PackTransform.__dataclass_fields__}
        return PackTransform(**known), iterator_resize
    short = iterator_resize if iterator_resize > 0 else max(pre.input_shape[1:])
    return PackTransform(resize=short, encoding=".png"), -1


def load_raw_image(path, pre: Preprocess, resize: int = -1) -> np.ndarray:
    """An image file as the model saw its training images: (H, W, C) uint8 RGB (grey for a 1-channel model).

    The pack transform runs through recbuild's own decode and transform (recbuild.images), then the
    validation view of ImageRecordIter (`iterator_view`). Only the packer's re-encoding is not repeated, so a
    raw image and its lossless (.png) record give the same pixels; a .jpg record differs by its JPEG loss.

    Raises:
        DataError: the file cannot be read or decoded (the reason is recbuild's).
    """
    from recbuild.config import PackConfig
    from recbuild.images import ImageError, decode, transform

    pack, iterator_resize = raw_packing(pre, resize)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read image ({err.strerror})") from None
    cfg = PackConfig(resize=0 if pack.pass_through else pack.resize, center_crop=pack.center_crop,
                     color=pack.color, workers=1, progress=False)
    try:
        img = transform(decode(data, str(path), cfg), cfg.resize, cfg.center_crop)
    except ImageError as err:
        raise DataError(f"{path}: cannot decode image ({err})") from None
    img = _as_decoded_record(img, pre.input_shape[0])
    img = iterator_view(img, pre.input_shape, iterator_resize)
    return img[:, :, ::-1] if img.shape[2] == 3 else img  # OpenCV's BGR -> RGB, the sidecar's convention


def _as_decoded_record(img: np.ndarray, channels: int) -> np.ndarray:
    """What ImageRecordIter's decode of the packed record holds: 8-bit, BGR for a 3-channel input, grey for 1."""
    import cv2
    if img.dtype != np.uint8:                   # 16-bit PNG under --color -1: the decoder keeps the high byte
        img = (img >> 8).astype(np.uint8) if img.dtype == np.uint16 else cv2.convertScaleAbs(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 4:                       # alpha: dropped by a colour decode
        img = img[:, :, :3]
    if channels == 1:
        return img if img.shape[2] == 1 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, :, None]
    return img if img.shape[2] == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)


def iterator_view(img: np.ndarray, shape: Sequence[int], resize: int = -1) -> np.ndarray:
    """ImageRecordIter's validation view of a decoded (H, W, C) image: its `resize` (short edge to `resize`,
    long edge long * resize // short, bilinear), an enlargement when the image is smaller than the input
    (each side times max(H / h, W / w), rounded down), then the centre crop (offsets rounded down)."""
    import cv2
    height, width = int(shape[1]), int(shape[2])
    h, w = img.shape[:2]
    if resize > 0:
        new_h, new_w = (resize * h // w, resize) if h > w else (resize, resize * w // h)
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR).reshape(new_h, new_w, -1)
        h, w = new_h, new_w
    if h < height or w < width:
        factor = max(height / h, width / w)
        new_h, new_w = max(height, int(h * factor)), max(width, int(w * factor))
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR).reshape(new_h, new_w, -1)
        h, w = new_h, new_w
    top, left = (h - height) // 2, (w - width) // 2
    return img[top:top + height, left:left + width]
