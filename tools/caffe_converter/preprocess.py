"""The preprocessing sidecar of a converted net: input shape, channel order, mean, std, scale and classifier.

What a user must do to an image before the converted model sees it, read from the net itself (its input shape,
the data layer's transform_param, the wiring from the final Softmax back to its classifier) and from the
user's --mean/--mean-file/--std/--scale. symbols/sidecar.py defines the file and applies it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from symbols.sidecar import Preprocess
from tools.caffe_converter.caffe_io import CaffeNet, read_mean_binaryproto
from tools.caffe_converter.errors import ConversionError

PathLike = Union[str, "os.PathLike[str]"]


# Per-channel means Caffe models are commonly trained with, in Caffe's order (B, G, R): ImageNet's (VGG, ResNet,
# open_nsfw, ... use 104, 117, 123 or VGG's 103.939, 116.779, 123.68) on 0..255 pixels, and the same on 0..1.
COMMON_BGR_MEANS = {"ImageNet": (104.0, 117.0, 123.0), "ImageNet (0..1 pixels)": (0.406, 0.456, 0.485)}


def reversed_common_mean(mean: Optional[Sequence[float]]) -> Optional[Tuple[str, Tuple[float, ...]]]:
    """(name, mean) of the common BGR mean that `mean` is the reverse of (RGB order given where Caffe's B, G, R is
    meant), within 1.5 % of the largest value; None when it is not one (or is the common mean itself)."""
    if mean is None or len(mean) != 3:
        return None
    for name, bgr in COMMON_BGR_MEANS.items():
        close = lambda a, b: max(abs(x - y) for x, y in zip(a, b)) <= 0.015 * max(b)  # noqa: E731
        if close(mean, bgr[::-1]) and not close(mean, bgr):
            return name, bgr
    return None


def _classifier(net: CaffeNet, conv: dict) -> Tuple[Optional[str], Optional[str], Optional[str], Optional[int]]:
    """(classifier layer, feature output feeding it, SoftmaxOutput name, class count) from the wiring."""
    layers, reads = net.layers, conv["reads"]
    softmax = None
    for name, v in conv["outputs"]:
        if v[0] != "in" and layers[v[0]].type == "Softmax" and layers[v[0]].is_net_output:
            softmax = v[0]
    if softmax is None:
        return None, None, None, None
    i, steps = softmax, 0
    while steps < 8 and reads[i] and reads[i][0][0] != "in":
        i = reads[i][0][0]
        steps += 1
        if layers[i].type in ("InnerProduct", "Convolution"):
            break
        if len(reads[i]) != 1:
            break
    # Only a FullyConnected is recorded as the classifier: head surgery replaces it with a new FullyConnected
    # on the same features. A convolutional classifier (SqueezeNet) still gives the class count.
    if layers[i].type == "InnerProduct":
        cls = layers[i]
        num = int(cls.param.inner_product_param.num_output)
        return cls.name, conv["feeds"].get(cls.name), layers[softmax].name, num
    num = layers[i].param.convolution_param.num_output if layers[i].type == "Convolution" else None
    return None, None, layers[softmax].name, num


def _center_crop(mean: np.ndarray, h: int, w: int, where: str) -> np.ndarray:
    c, mh, mw = mean.shape
    if mh < h or mw < w:
        raise ConversionError(f"{where}: mean image is {mh}x{mw}, smaller than the model input {h}x{w}")
    top, left = (mh - h) // 2, (mw - w) // 2  # Caffe crops the mean at the image's (centre, at test) offset
    return np.ascontiguousarray(mean[:, top:top + h, left:left + w])


def _transform_mean_file(net: CaffeNet) -> Optional[Path]:
    """The data layer's transform_param.mean_file, resolved beside the prototxt (or as given when absolute)."""
    t = net.transform
    if t is None or not t.mean_file:
        return None
    path = Path(t.mean_file)
    if not path.is_absolute():
        path = Path(net.prototxt).parent / path
    if not path.is_file():
        raise ConversionError(f"{net.prototxt}: layer '{net.transform_layer}' transform_param mean_file "
                              f"'{t.mean_file}' is not beside the prototxt ({path} not found); pass its path with "
                              f"--mean-file, or --mean B,G,R")
    return path


def _mean(net: CaffeNet, conv: dict, mean_file: Optional[PathLike], mean: Optional[Sequence[float]]
          ) -> Tuple[Union[None, List[float]], Optional[np.ndarray], Optional[PathLike]]:
    """(per-channel mean, mean image, mean file used): the user's --mean/--mean-file, else the data layer's."""
    c, h, w = conv["input_shapes"]["data"][1:]
    if mean_file is not None and mean is not None:
        raise ConversionError("give either --mean-file or --mean, not both")
    t = net.transform
    if mean_file is None and mean is None and t is not None:
        mean_file = _transform_mean_file(net)
        if mean_file is None and len(t.mean_value):
            mean = list(t.mean_value) * (c if len(t.mean_value) == 1 else 1)  # Caffe repeats a single value
            if len(mean) != c:
                raise ConversionError(f"{net.prototxt}: layer '{net.transform_layer}' transform_param has "
                                      f"{len(t.mean_value)} mean_value entries for {c} channels")
    if mean_file is not None:
        img = read_mean_binaryproto(mean_file)
        if img.shape[0] != c:
            raise ConversionError(f"{mean_file}: mean has {img.shape[0]} channels, the model input has {c}")
        img = _center_crop(img, h, w, str(mean_file))
        return None, (np.ascontiguousarray(img[::-1]) if conv["swapped"] else img), mean_file
    if mean is not None:
        values = [float(v) for v in mean]
        return (values[::-1] if conv["swapped"] else values), None, None
    return None, None, None


def _transform_record(net: CaffeNet, h: int, w: int) -> dict:
    """crop_size and mirror of the data layer, checked against the input and recorded for the trainer.

    crop_size must equal the declared input (Caffe feeds the net crops of that size, centred at test time);
    force_color/force_gray change how images are decoded, which the sidecar cannot express: refused by name.
    """
    t = net.transform
    if t is None:
        return {}
    where = f"{net.prototxt}: layer '{net.transform_layer}' transform_param"
    if t.crop_size and (t.crop_size, t.crop_size) != (h, w):
        raise ConversionError(f"{where} crop_size {t.crop_size} differs from the input {h}x{w}; the net is fed "
                              f"{t.crop_size}x{t.crop_size} crops, so declare that input shape")
    for name in ("force_color", "force_gray"):
        if getattr(t, name):
            raise ConversionError(f"{where} {name}: true is not supported (the sidecar cannot change how images "
                                  f"are decoded); remove it and convert the images yourself")
    return {"layer": net.transform_layer, "crop_size": int(t.crop_size), "mirror": bool(t.mirror)}


def build_preprocess(net: CaffeNet, conv: dict, mean_file: Optional[PathLike], mean: Optional[Sequence[float]],
                     std: Optional[Sequence[float]], scale: Optional[float]) -> Tuple[Preprocess, Optional[np.ndarray]]:
    """The sidecar contents. User-given mean/std are in the Caffe net's channel order (BGR for RGB images).

    Without --mean/--mean-file/--scale the data layer's transform_param supplies them (mean_file resolved
    beside the prototxt); its crop_size and mirror are recorded in `source["transform"]`.
    """
    shape = conv["input_shapes"]["data"]
    if len(shape) != 4:
        raise ConversionError(f"{net.prototxt}: input shape {shape} is not N x C x H x W; no preprocessing sidecar "
                              f"can describe it")
    c, h, w = shape[1:]
    transform = net.transform
    mean_value, mean_image, used_mean_file = _mean(net, conv, mean_file, mean)
    std_value = [float(v) for v in std] if std is not None else None
    if std_value is not None and conv["swapped"]:
        std_value = std_value[::-1]
    if scale is None:
        scale = float(transform.scale) if transform is not None and transform.HasField("scale") else 1.0
    cls, feature, out_name, num = _classifier(net, conv)
    outputs = conv["symbol"].list_outputs()
    pre = Preprocess(input_shape=(c, h, w), channel_order="RGB" if conv["swapped"] else "BGR", mean=mean_value,
                     std=std_value, scale=float(scale), num_classes=num, classifier=cls, feature_output=feature,
                     # without a Softmax, output_name names the SoftmaxOutput a new head will get (symbols/head.py)
                     output_name=out_name or "softmax", input_name="data",
                     source={"converter": "mxtransfer.tools.caffe_converter", "prototxt": str(net.prototxt),
                             "caffemodel": str(net.caffemodel), "format": net.format,
                             "mean_file": str(used_mean_file) if used_mean_file else None,
                             "outputs": outputs, "softmax": out_name is not None,
                             "transform": _transform_record(net, h, w)})
    return pre, mean_image

