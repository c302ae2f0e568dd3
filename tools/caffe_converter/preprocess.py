"""The preprocessing sidecar of a converted net: input shape, channel order, mean, std, scale and classifier.

What a user must do to an image before the converted model sees it, read from the net itself (its input shape,
the data layer's transform_param, the wiring from the final Softmax back to its classifier) and from the
user's --mean/--mean-file/--std/--scale. symbols/sidecar.py defines the file and applies it.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from symbols.sidecar import Preprocess
from tools.caffe_converter.caffe_io import CaffeNet, read_mean_binaryproto
from tools.caffe_converter.errors import ConversionError

PathLike = Union[str, "os.PathLike[str]"]


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
        return cls.name, conv["feeds"].get(cls.name), layers[softmax].name, int(cls.param.inner_product_param.num_output)
    num = layers[i].param.convolution_param.num_output if layers[i].type == "Convolution" else None
    return None, None, layers[softmax].name, num


def _center_crop(mean: np.ndarray, h: int, w: int, where: str) -> np.ndarray:
    c, mh, mw = mean.shape
    if mh < h or mw < w:
        raise ConversionError(f"{where}: mean image is {mh}x{mw}, smaller than the model input {h}x{w}")
    top, left = (mh - h) // 2, (mw - w) // 2  # Caffe crops the mean at the image's (centre, at test) offset
    return np.ascontiguousarray(mean[:, top:top + h, left:left + w])


def build_preprocess(net: CaffeNet, conv: dict, mean_file: Optional[PathLike], mean: Optional[Sequence[float]],
                     std: Optional[Sequence[float]], scale: Optional[float]) -> Tuple[Preprocess, Optional[np.ndarray]]:
    """The sidecar contents. User-given mean/std are in the Caffe net's channel order (BGR for RGB images)."""
    shape = conv["input_shapes"]["data"]
    if len(shape) != 4:
        raise ConversionError(f"{net.prototxt}: input shape {shape} is not N x C x H x W; no preprocessing sidecar "
                              f"can describe it")
    c, h, w = shape[1:]
    order = "RGB" if conv["swapped"] else "BGR"
    flip = (lambda v: list(v)[::-1]) if conv["swapped"] else list
    transform = net.transform
    mean_value: Union[None, List[float], str] = None
    mean_image = None
    if mean_file is not None:
        if mean is not None:
            raise ConversionError("give either --mean-file or --mean, not both")
        img = read_mean_binaryproto(mean_file)
        if img.shape[0] != c:
            raise ConversionError(f"{mean_file}: mean has {img.shape[0]} channels, the model input has {c}")
        img = _center_crop(img, h, w, str(mean_file))
        mean_image = np.ascontiguousarray(img[::-1]) if conv["swapped"] else img
    elif mean is not None:
        mean_value = flip([float(v) for v in mean])
    elif transform is not None and len(transform.mean_value):
        mean_value = flip([float(v) for v in transform.mean_value])
    std_value = flip([float(v) for v in std]) if std is not None else None
    if scale is None:
        scale = float(transform.scale) if transform is not None and transform.HasField("scale") else 1.0
    cls, feature, out_name, num = _classifier(net, conv)
    pre = Preprocess(input_shape=(c, h, w), channel_order=order, mean=mean_value, std=std_value, scale=float(scale),
                     num_classes=num, classifier=cls, feature_output=feature, output_name=out_name or "softmax",
                     input_name="data",
                     source={"converter": "mxtransfer.tools.caffe_converter", "prototxt": str(net.prototxt),
                             "caffemodel": str(net.caffemodel), "format": net.format,
                             "mean_file": str(mean_file) if mean_file else None})
    return pre, mean_image
