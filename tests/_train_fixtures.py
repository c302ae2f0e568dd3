"""Tiny data and checkpoints for the trainer tests, built in code.

* `tiny_vgg_checkpoint`: a VGG-shaped net with Caffe's layer names (conv1_1 ... fc6, drop6, fc7, drop7, fc8,
  prob) and seeded weights, plus its sidecar, as the converter would write it.
* `write_rec`: images whose colour encodes their class (class c has a distinct hue pattern plus noise), packed
  with mx.recordio directly (independent of recbuild), so a tiny net separates them in a few epochs.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from recbuild.classmap import write_class_map
from symbols import vgg
from symbols.sidecar import Preprocess, save_sidecar

TINY_STAGES = ((4, 1), (8, 1))
TINY_SHAPE = (3, 16, 16)


def tiny_vgg_checkpoint(prefix: Path, num_classes: int = 7, fc_width: int = 16, channel_order: str = "BGR",
                        mean=(104.0, 117.0, 123.0), std=None, scale: float = 1 / 64, seed: int = 0,
                        input_shape: Tuple[int, int, int] = TINY_SHAPE, sidecar: bool = True) -> Path:
    """Write PREFIX-symbol.json, PREFIX-0000.params and PREFIX-preprocess.json of a tiny VGG."""
    sym = vgg.vgg(num_classes, TINY_STAGES, fc_width=fc_width, dropout=0.5)
    arg_shapes, _, _ = sym.infer_shape(data=(1,) + tuple(input_shape))
    rng = np.random.RandomState(seed)
    args = {}
    for name, shape in zip(sym.list_arguments(), arg_shapes):
        if name in ("data", "prob_label"):
            continue
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        args[name] = mx.nd.array(rng.normal(0, np.sqrt(2.0 / fan_in), shape) if name.endswith("weight")
                                 else rng.normal(0, 0.01, shape))
    mx.model.save_checkpoint(str(prefix), 0, sym, args, {})
    if sidecar:
        save_sidecar(prefix, Preprocess(input_shape=input_shape, channel_order=channel_order,
                                        mean=list(mean) if mean is not None else None,
                                        std=list(std) if std is not None else None, scale=scale,
                                        num_classes=num_classes, classifier="fc8", feature_output="drop7_output",
                                        output_name="prob", source={"test": "tiny_vgg"}))
    return Path(prefix)


def class_image(label: int, num_classes: int, size: int, rng: np.random.RandomState) -> np.ndarray:
    """A BGR uint8 image whose colour layout encodes `label`: a class colour on the top half, another on the
    bottom, plus noise (separable, but not by a single pixel; unchanged by a horizontal mirror)."""
    hue = np.array([np.cos(2 * np.pi * label / num_classes), np.sin(2 * np.pi * label / num_classes), 0.0])
    left = 128 + 100 * np.array([hue[0], hue[1], -hue[0]])
    right = 128 + 100 * np.array([-hue[1], hue[0], hue[1]])
    img = np.empty((size, size, 3), np.float32)
    img[: size // 2] = left
    img[size // 2:] = right
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_rec(path: Path, num_classes: int, per_class: int, size: int = 16, seed: int = 0,
              class_names: Optional[Sequence[str]] = None, labels: Optional[List[float]] = None) -> Path:
    """Pack per_class images of each class (interleaved) into PATH (.rec + .idx); optional class map."""
    path = Path(path)
    rng = np.random.RandomState(seed)
    rec = mx.recordio.MXIndexedRecordIO(str(path.with_suffix(".idx")), str(path), "w")
    if labels is None:
        labels = [float(i % num_classes) for i in range(num_classes * per_class)]
    for i, label in enumerate(labels):
        img = class_image(int(label) % num_classes, num_classes, size, rng)
        header = mx.recordio.IRHeader(0, float(label), i, 0)
        rec.write_idx(i, mx.recordio.pack_img(header, img, quality=95, img_fmt=".png"))
    rec.close()
    if class_names is not None:
        stem = path.name[: -len(".rec")]
        for split in ("_train", "_val"):
            if stem.endswith(split):
                stem = stem[: -len(split)]
        write_class_map(path.with_name(stem), list(class_names))
    return path
