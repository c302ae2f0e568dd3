"""BGR -> RGB: how a layer that reads the image directly has its weights reordered so the model takes RGB.

`INPUT_CHANNEL_FLIPS` maps a Caffe type to a function that reorders the layer's blobs in place and says
whether the layer's output still carries the reversed channel order (a per-channel layer passes it on; a
Convolution or InnerProduct absorbs it). The RGB pass (passes.swap_to_rgb) follows the wiring and calls these.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from tools.caffe_converter.caffe_io import Layer
from tools.caffe_converter.errors import UnsupportedLayerError


def _fail(layer: Layer, message: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(f"layer '{layer.name}' ({layer.type}): {message}")


def _flip0(blobs: List[np.ndarray], indices: Sequence[int]) -> List[np.ndarray]:
    return [np.ascontiguousarray(b[::-1]) if i in indices else b for i, b in enumerate(blobs)]


def flip_convolution(layer: Layer) -> bool:
    """Reverse the weight's input-channel axis; the output no longer depends on the channel order."""
    if layer.param.convolution_param.group != 1:
        raise _fail(layer, "reads the image with group > 1; cannot reorder its channels for RGB input "
                           "(use --keep-bgr)")
    layer.blobs = [np.ascontiguousarray(layer.blobs[0][:, ::-1])] + list(layer.blobs[1:])
    return False


def flip_deconvolution(layer: Layer) -> bool:
    """Deconvolution weights are (C_in, C_out / group, ...): reverse the input-channel axis 0."""
    if layer.param.convolution_param.group != 1:
        raise _fail(layer, "reads the image with group > 1; cannot reorder its channels for RGB input "
                           "(use --keep-bgr)")
    layer.blobs = [np.ascontiguousarray(layer.blobs[0][::-1])] + list(layer.blobs[1:])
    return False


def flip_innerproduct(layer: Layer) -> bool:
    """Reverse the channel axis inside the flattened (C, H, W) input dimension of the weight."""
    p = layer.param.inner_product_param
    if p.axis != 1 or p.transpose:
        raise _fail(layer, "reads the image with axis != 1 or transpose; use --keep-bgr")
    w = layer.blobs[0]
    n = w.shape[0] if w.ndim == 2 else w.shape[-2]
    w3 = w.reshape(n, 3, -1)
    layer.blobs = [np.ascontiguousarray(w3[:, ::-1]).reshape(w.shape)] + list(layer.blobs[1:])
    return False


def flip_per_channel(layer: Layer) -> bool:
    """Per-channel parameters (mean/var, scale/bias, slopes) follow the channels; the output stays reversed."""
    if layer.type == "BatchNorm":
        layer.blobs = _flip0(layer.blobs, (0, 1))
        fused = layer.fused_scale
        if fused is not None:
            fused.blobs = _flip0(fused.blobs, (0, 1))
    elif layer.type in ("Scale", "Bias"):
        p = layer.param.scale_param if layer.type == "Scale" else layer.param.bias_param
        if p.axis != 1 or p.num_axes != 1 or len(layer.bottoms) != 1:
            raise _fail(layer, "reads the image with a scale that is not per channel; use --keep-bgr")
        layer.blobs = _flip0(layer.blobs, (0, 1))
    elif layer.type == "PReLU":
        if not layer.param.prelu_param.channel_shared:
            layer.blobs = _flip0(layer.blobs, (0,))
    return True


def _passthrough(layer: Layer) -> bool:
    """Element-wise or channel-symmetric layers: the output keeps the input's channel order."""
    return True


INPUT_CHANNEL_FLIPS: Dict[str, Callable[[Layer], bool]] = {
    "Convolution": flip_convolution,
    "Deconvolution": flip_deconvolution,
    "InnerProduct": flip_innerproduct,
    "BatchNorm": flip_per_channel,
    "Scale": flip_per_channel,
    "Bias": flip_per_channel,
    "PReLU": flip_per_channel,
    "ReLU": _passthrough, "ELU": _passthrough, "Sigmoid": _passthrough, "TanH": _passthrough,
    "AbsVal": _passthrough, "Power": _passthrough, "Dropout": _passthrough, "Split": _passthrough,
    "Pooling": _passthrough, "LRN": _passthrough, "BNLL": _passthrough, "Clip": _passthrough,
    "Crop": _passthrough, "Exp": _passthrough, "Log": _passthrough, "Swish": _passthrough,
    "Threshold": _passthrough, "MVN": _passthrough,
}

# Bottoms that lend only their shape: a Crop's reference (FCN crops its scores to `data`) carries no channels.
SHAPE_ONLY_BOTTOMS: Dict[str, Tuple[int, ...]] = {"Crop": (1,), "PriorBox": (0, 1)}
