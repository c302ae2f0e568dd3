"""Every converter in LAYER_CONVERTERS against OpenCV's Caffe runtime, on one-layer (or few-layer) nets with
seeded random weights. A table entry without a case here fails `test_every_table_entry_has_a_case`."""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import pytest

from tests._caffe_nets import NetBuilder
from tools.caffe_converter import convert
from tools.caffe_converter.caffe_io import V1_TYPE_NAMES, CaffeFormatError, to_v1
from tools.caffe_converter.layers import LAYER_CONVERTERS
from tools.caffe_converter.opencv_check import run_mxnet, verify_conversion

TOLERANCE = 1e-4  # relative to the largest reference value; float32 nets agree to ~1e-6


@dataclass
class Case:
    id: str
    type: str
    build: Callable[[NetBuilder], None]
    inputs: Sequence[Tuple[str, Tuple[int, ...]]] = (("data", (2, 4, 9, 9)),)
    value_range: Tuple[float, float] = (-3.0, 3.0)
    input_style: str = "input_shape"
    # OpenCV lacks a few Caffe types; the reference is then OpenCV on an equivalent net built by this.
    reference: Optional[Callable[[NetBuilder], None]] = None
    # Where OpenCV itself departs from Caffe, the reference is Caffe's formula in numpy:
    # expected(inputs, blobs by layer name) -> the output of the last layer.
    expected: Optional[Callable[[Dict[str, np.ndarray], Dict[str, list]], np.ndarray]] = None
    keep_bgr: bool = True  # layer semantics are tested in Caffe's order; RGB conversion where False


def conv(b, name, bottom, params, weight_shape, bias=True):
    blobs = [b.rand(*weight_shape)] + ([b.rand(weight_shape[0], scale=0.5)] if bias else [])
    b.layer(name, "Convolution", [bottom], params=f"convolution_param {{ {params} }}", blobs=blobs)


def bn(b, name, bottom, top, channels, factor=2.0):
    mean = b.rand(channels, scale=1.0) * factor
    var = (b.rand(channels, positive=True)) * factor
    b.layer(name, "BatchNorm", [bottom], [top], params="batch_norm_param { use_global_stats: true eps: 1e-4 }",
            blobs=[mean, var, np.array([factor], np.float32)])


def scale(b, name, bottom, top, channels, bias=True):
    blobs = [b.rand(channels, positive=True)] + ([b.rand(channels, scale=1.0)] if bias else [])
    b.layer(name, "Scale", [bottom], [top], params=f"scale_param {{ bias_term: {str(bias).lower()} }}", blobs=blobs)


def fc(b, name, bottom, n, k, params=""):
    b.layer(name, "InnerProduct", [bottom], params=f"inner_product_param {{ num_output: {n} {params} }}",
            blobs=[b.rand(n, k), b.rand(n, scale=0.5)])


def _bias_net(b):
    b.layer("bias", "Bias", ["data"], blobs=[b.rand(4, scale=1.0)])


def _bias_reference(b):  # Bias == Scale with gamma 1 and the same bias
    bias = b.rand(4, scale=1.0)
    b.layer("bias", "Scale", ["data"], params="scale_param { bias_term: true }",
            blobs=[np.ones(4, np.float32), bias])


CASES = [
    Case("input-layer", "Input", lambda b: conv(b, "c", "data", "num_output: 3 kernel_size: 3", (3, 4, 3, 3)),
         input_style="layer"),
    Case("input-renamed", "Input", lambda b: conv(b, "c", "img", "num_output: 2 kernel_size: 3", (2, 4, 3, 3)),
         inputs=(("img", (2, 4, 9, 9)),), input_style="layer"),
    Case("input-dim", "Input", lambda b: conv(b, "c", "data", "num_output: 3 kernel_size: 1", (3, 4, 1, 1)),
         input_style="input_dim"),
    Case("conv-basic", "Convolution", lambda b: conv(b, "c", "data", "num_output: 5 kernel_size: 3 pad: 1",
                                                     (5, 4, 3, 3))),
    Case("conv-group-dilation", "Convolution",
         lambda b: conv(b, "c", "data", "num_output: 6 kernel_size: 3 group: 2 dilation: 2 stride: 2", (6, 2, 3, 3))),
    Case("conv-rect", "Convolution",
         lambda b: conv(b, "c", "data", "num_output: 3 kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 pad_h: 1 "
                                        "pad_w: 0", (3, 4, 3, 1))),
    Case("conv-nobias", "Convolution",
         lambda b: conv(b, "c", "data", "num_output: 3 kernel_size: 2 bias_term: false", (3, 4, 2, 2), bias=False)),
    Case("deconv", "Deconvolution",
         lambda b: b.layer("d", "Deconvolution", ["data"], params="convolution_param { num_output: 3 kernel_size: 4 "
                           "stride: 2 pad: 1 }", blobs=[b.rand(4, 3, 4, 4), b.rand(3)])),
    Case("deconv-on-rgb-input", "Deconvolution",  # converted to RGB: the weights' input axis is reversed
         lambda b: b.layer("d", "Deconvolution", ["data"], params="convolution_param { num_output: 2 kernel_size: 2 "
                           "stride: 2 }", blobs=[b.rand(3, 2, 2, 2), b.rand(2)]),
         inputs=(("data", (1, 3, 5, 5)),), keep_bgr=False),
    Case("deconv-group-nobias", "Deconvolution",
         lambda b: b.layer("d", "Deconvolution", ["data"], params="convolution_param { num_output: 4 kernel_size: 3 "
                           "stride: 2 group: 2 bias_term: false }", blobs=[b.rand(4, 2, 3, 3)])),
    Case("pool-max-ceil", "Pooling", lambda b: b.layer("p", "Pooling", ["data"],
                                                       params="pooling_param { pool: MAX kernel_size: 3 stride: 2 }"),
         inputs=(("data", (2, 4, 8, 8)),)),
    Case("pool-ave-pad", "Pooling", lambda b: b.layer("p", "Pooling", ["data"],
                                                      params="pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }"),
         inputs=(("data", (2, 4, 8, 8)),)),
    # pad_w is spelled out: OpenCV 4.11 ignores pad_h unless pad_w is present too (Caffe defaults it to 0)
    Case("pool-rect", "Pooling", lambda b: b.layer("p", "Pooling", ["data"], params="pooling_param { pool: MAX "
                                                   "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 }")),
    Case("pool-rect-pad-h-only", "Pooling", lambda b: b.layer("p", "Pooling", ["data"], params="pooling_param { "
                                                              "pool: AVE kernel_h: 3 kernel_w: 2 stride: 2 pad_h: 1 }"),
         expected=lambda x, w: _ave_pool(x["data"], (3, 2), (2, 2), (1, 0))),
    Case("pool-global-ave", "Pooling", lambda b: b.layer("p", "Pooling", ["data"],
                                                         params="pooling_param { pool: AVE global_pooling: true }")),
    Case("pool-global-max", "Pooling", lambda b: b.layer("p", "Pooling", ["data"],
                                                         params="pooling_param { pool: MAX global_pooling: true }")),
    Case("ip-axis1", "InnerProduct", lambda b: fc(b, "fc", "data", 7, 4 * 9 * 9)),
    Case("ip-axis2", "InnerProduct", lambda b: fc(b, "fc", "data", 5, 9 * 9, "axis: 2")),
    # OpenCV 4.11 ignores `transpose` (reads the (K, N) weight as (N, K)): Caffe's y = x W + b in numpy instead
    Case("ip-transpose", "InnerProduct",
         lambda b: b.layer("fc", "InnerProduct", ["data"], params="inner_product_param { num_output: 6 transpose: true }",
                           blobs=[b.rand(4 * 9 * 9, 6, scale=0.05), b.rand(6)]),
         expected=lambda x, w: x["data"].reshape(2, -1) @ w["fc"][0] + w["fc"][1]),
    Case("ip-nobias", "InnerProduct",
         lambda b: b.layer("fc", "InnerProduct", ["data"], params="inner_product_param { num_output: 3 bias_term: false }",
                           blobs=[b.rand(3, 324)])),
    Case("relu", "ReLU", lambda b: b.layer("r", "ReLU", ["data"])),
    Case("relu-leaky", "ReLU", lambda b: b.layer("r", "ReLU", ["data"], params="relu_param { negative_slope: 0.1 }")),
    Case("prelu", "PReLU", lambda b: b.layer("r", "PReLU", ["data"], blobs=[b.rand(4, scale=0.5)])),
    Case("prelu-shared", "PReLU", lambda b: b.layer("r", "PReLU", ["data"], params="prelu_param { channel_shared: true }",
                                                    blobs=[np.array([0.25], np.float32)])),
    Case("elu", "ELU", lambda b: b.layer("e", "ELU", ["data"], params="elu_param { alpha: 0.5 }")),
    Case("sigmoid", "Sigmoid", lambda b: b.layer("s", "Sigmoid", ["data"])),
    Case("tanh", "TanH", lambda b: b.layer("t", "TanH", ["data"])),
    Case("absval", "AbsVal", lambda b: b.layer("a", "AbsVal", ["data"])),
    Case("power", "Power", lambda b: b.layer("p", "Power", ["data"],
                                             params="power_param { power: 2 scale: 0.5 shift: 1 }")),
    Case("batchnorm", "BatchNorm", lambda b: bn(b, "bn", "data", "bn", 4)),
    Case("batchnorm-scale-inplace", "BatchNorm",
         lambda b: (conv(b, "c", "data", "num_output: 4 kernel_size: 1", (4, 4, 1, 1)), bn(b, "bn", "c", "c", 4),
                    scale(b, "sc", "c", "c", 4))),
    Case("batchnorm-scale-renamed", "BatchNorm",  # wiring, not names: tops differ and names share nothing
         lambda b: (bn(b, "norm_a", "data", "blob_x", 4), scale(b, "affine_b", "blob_x", "blob_y", 4, bias=False))),
    Case("batchnorm-two-readers", "BatchNorm",  # a BatchNorm read by two layers keeps its own output
         lambda b: (bn(b, "bn", "data", "bnout", 4), scale(b, "sc", "bnout", "s1", 4),
                    b.layer("r", "ReLU", ["bnout"], ["r1"]),
                    b.layer("sum", "Eltwise", ["s1", "r1"]))),
    Case("scale-bias", "Scale", lambda b: scale(b, "sc", "data", "sc", 4)),
    Case("scale-nobias", "Scale", lambda b: scale(b, "sc", "data", "sc", 4, bias=False)),
    Case("scale-two-bottoms", "Scale",
         lambda b: b.layer("sc", "Scale", ["data", "gain"], params="scale_param { axis: 0 }"),
         inputs=(("data", (2, 4, 9, 9)), ("gain", (2, 4)))),
    Case("bias", "Bias", _bias_net, reference=_bias_reference),
    Case("eltwise-sum-coeff", "Eltwise",
         lambda b: (b.layer("r", "ReLU", ["data"], ["r"]),
                    b.layer("e", "Eltwise", ["data", "r"], params="eltwise_param { operation: SUM coeff: 1 coeff: -0.5 }"))),
    Case("eltwise-prod", "Eltwise",
         lambda b: (b.layer("t", "TanH", ["data"], ["t"]),
                    b.layer("e", "Eltwise", ["data", "t"], params="eltwise_param { operation: PROD }"))),
    Case("eltwise-max", "Eltwise",
         lambda b: (b.layer("t", "TanH", ["data"], ["t"]), b.layer("n", "Power", ["data"], ["n"],
                                                                   params="power_param { scale: -1 }"),
                    b.layer("e", "Eltwise", ["data", "t", "n"], params="eltwise_param { operation: MAX }"))),
    Case("concat-axis1", "Concat",
         lambda b: (b.layer("t", "TanH", ["data"], ["t"]), b.layer("c", "Concat", ["data", "t"]))),
    Case("concat-axis2", "Concat",
         lambda b: (b.layer("t", "TanH", ["data"], ["t"]),
                    b.layer("c", "Concat", ["data", "t"], params="concat_param { axis: 2 }"))),
    Case("slice-points", "Slice",
         lambda b: (b.layer("s", "Slice", ["data"], ["a", "b2", "c"], params="slice_param { axis: 1 slice_point: 1 "
                                                                          "slice_point: 3 }"),
                    b.layer("pa", "Power", ["a"], params="power_param { scale: 2 }"),
                    b.layer("pb", "Power", ["b2"], params="power_param { scale: 3 }"),
                    b.layer("pc", "Power", ["c"], params="power_param { scale: 4 }"))),
    Case("slice-equal", "Slice",
         lambda b: (b.layer("s", "Slice", ["data"], ["a", "b2"], params="slice_param { axis: 2 }"),
                    b.layer("e", "Eltwise", ["a", "b2"], params="eltwise_param { operation: PROD }")),
         inputs=(("data", (2, 4, 8, 9)),)),
    Case("split", "Split",
         lambda b: (b.layer("sp", "Split", ["data"], ["x1", "x2"]), b.layer("t", "TanH", ["x1"], ["t"]),
                    b.layer("e", "Eltwise", ["t", "x2"], params="eltwise_param { operation: PROD }"))),
    Case("flatten", "Flatten", lambda b: b.layer("f", "Flatten", ["data"])),
    Case("flatten-axis2", "Flatten", lambda b: b.layer("f", "Flatten", ["data"], params="flatten_param { axis: 2 }")),
    Case("reshape", "Reshape", lambda b: b.layer("r", "Reshape", ["data"],
                                                 params="reshape_param { shape { dim: 0 dim: -1 dim: 9 } }")),
    Case("reshape-axis", "Reshape", lambda b: b.layer("r", "Reshape", ["data"], params="reshape_param { shape { "
                                                      "dim: 2 dim: 2 } axis: 1 num_axes: 1 }")),
    Case("crop", "Crop", lambda b: b.layer("cr", "Crop", ["data", "ref"], params="crop_param { axis: 2 offset: 1 "
                                           "offset: 2 }"),
         inputs=(("data", (2, 4, 9, 9)), ("ref", (2, 4, 5, 6)))),
    Case("crop-axis1", "Crop", lambda b: b.layer("cr", "Crop", ["data", "ref"], params="crop_param { axis: 1 offset: 1 }"),
         inputs=(("data", (2, 4, 9, 9)), ("ref", (2, 2, 5, 6)))),
    Case("lrn-across", "LRN", lambda b: b.layer("n", "LRN", ["data"], params="lrn_param { local_size: 5 alpha: 0.1 "
                                                "beta: 0.75 }")),
    # OpenCV 4.11 drops k (uses 1); Caffe: x / (k + alpha / n * sum of x^2 over n channels) ^ beta
    Case("lrn-across-k", "LRN", lambda b: b.layer("n", "LRN", ["data"], params="lrn_param { local_size: 3 alpha: 0.1 "
                                                  "beta: 0.75 k: 2 }"),
         expected=lambda x, w: _lrn_across(x["data"], 3, 0.1, 0.75, 2.0)),
    Case("lrn-within", "LRN", lambda b: b.layer("n", "LRN", ["data"], params="lrn_param { local_size: 3 alpha: 0.5 "
                                                "beta: 0.75 norm_region: WITHIN_CHANNEL }")),
    Case("dropout", "Dropout", lambda b: (b.layer("t", "TanH", ["data"], ["t"]),
                                          b.layer("d", "Dropout", ["t"], ["t"], params="dropout_param { dropout_ratio: 0.3 }"))),
    Case("softmax-final-2d", "Softmax", lambda b: (fc(b, "fc", "data", 5, 324), b.layer("prob", "Softmax", ["fc"]))),
    Case("softmax-final-4d", "Softmax", lambda b: b.layer("prob", "Softmax", ["data"])),
    Case("softmax-axis2", "Softmax", lambda b: (b.layer("sm", "Softmax", ["data"], params="softmax_param { axis: 2 }"),
                                               b.layer("t", "Power", ["sm"], params="power_param { scale: 2 }"))),
    Case("permute", "Permute", lambda b: b.layer("p", "Permute", ["data"],
                                                 params="permute_param { order: 0 order: 2 order: 3 order: 1 }")),
    Case("normalize", "Normalize", lambda b: b.layer("n", "Normalize", ["data"], params="norm_param { across_spatial: "
                                                     "false channel_shared: false }", blobs=[b.rand(4, positive=True)])),
    Case("normalize-shared", "Normalize",
         lambda b: b.layer("n", "Normalize", ["data"], params="norm_param { across_spatial: true channel_shared: true }",
                           blobs=[np.array([20.0], np.float32)])),
    # Element-wise and reduction layers real models use. OpenCV 4.11 runs Exp, Log (plain), BNLL, MVN, Swish (beta 1);
    # it has no Threshold, ArgMax, Reduction or Clip and refuses Tile from Caffe, so those are checked
    # against Caffe's formula in numpy (as is Swish with beta != 1, which OpenCV ignores).
    Case("exp", "Exp", lambda b: b.layer("e", "Exp", ["data"], params="exp_param { base: 2 scale: 0.5 shift: 0.1 }")),
    Case("exp-e", "Exp", lambda b: b.layer("e", "Exp", ["data"], params="exp_param { scale: -0.7 }"),
         expected=lambda x, w: np.exp(-0.7 * x["data"].astype(np.float64))),
    Case("log", "Log", lambda b: b.layer("l", "Log", ["data"]), value_range=(0.05, 5.0)),
    # OpenCV 4.11's Log ignores base, scale and shift (it computes ln x): Caffe's formula in numpy
    Case("log-params", "Log", lambda b: b.layer("l", "Log", ["data"], params="log_param { base: 10 scale: 2 shift: 7 }"),
         expected=lambda x, w: np.log10(7 + 2 * x["data"].astype(np.float64))),
    Case("bnll", "BNLL", lambda b: b.layer("s", "BNLL", ["data"]), value_range=(-20.0, 20.0)),
    Case("mvn", "MVN", lambda b: b.layer("m", "MVN", ["data"])),
    Case("mvn-across", "MVN", lambda b: b.layer("m", "MVN", ["data"], params="mvn_param { across_channels: true }")),
    Case("mvn-mean-only", "MVN", lambda b: b.layer("m", "MVN", ["data"],
                                                   params="mvn_param { normalize_variance: false }")),
    Case("swish", "Swish", lambda b: b.layer("s", "Swish", ["data"])),
    Case("swish-beta", "Swish", lambda b: b.layer("s", "Swish", ["data"], params="swish_param { beta: 1.5 }"),
         expected=lambda x, w: x["data"] / (1 + np.exp(-1.5 * x["data"].astype(np.float64)))),
    Case("threshold", "Threshold", lambda b: b.layer("t", "Threshold", ["data"],
                                                     params="threshold_param { threshold: 0.25 }"),
         expected=lambda x, w: (x["data"] > 0.25).astype(np.float32)),
    Case("clip", "Clip", lambda b: b.layer("c", "Clip", ["data"], params="clip_param { min: -1 max: 0.5 }"),
         expected=lambda x, w: np.clip(x["data"], -1, 0.5)),
    Case("tile", "Tile", lambda b: b.layer("t", "Tile", ["data"], params="tile_param { axis: 2 tiles: 3 }"),
         expected=lambda x, w: np.tile(x["data"], (1, 1, 3, 1))),
    Case("argmax-axis", "ArgMax", lambda b: b.layer("a", "ArgMax", ["data"], params="argmax_param { axis: 1 top_k: 2 }"),
         expected=lambda x, w: np.argsort(-x["data"], axis=1, kind="stable")[:, :2].astype(np.float32)),
    Case("argmax-values", "ArgMax", lambda b: b.layer("a", "ArgMax", ["data"],
                                                      params="argmax_param { axis: 3 out_max_val: true }"),
         expected=lambda x, w: x["data"].max(axis=3, keepdims=True)),
    Case("argmax-flat", "ArgMax", lambda b: b.layer("a", "ArgMax", ["data"],
                                                    params="argmax_param { top_k: 3 out_max_val: true }"),
         expected=lambda x, w: _argmax_flat(x["data"], 3)),
    Case("reduction-all", "Reduction", lambda b: b.layer("r", "Reduction", ["data"]),
         expected=lambda x, w: x["data"].astype(np.float64).sum().reshape(1)),
    Case("reduction-sumsq", "Reduction", lambda b: b.layer("r", "Reduction", ["data"], params="reduction_param { "
                                                           "operation: SUMSQ axis: 2 coeff: 0.5 }"),
         expected=lambda x, w: 0.5 * (x["data"].astype(np.float64) ** 2).sum(axis=(2, 3))),
    Case("reduction-asum-mean", "Reduction",
         lambda b: (b.layer("r", "Reduction", ["data"], ["r"], params="reduction_param { operation: ASUM axis: 2 }"),
                    b.layer("m", "Reduction", ["r"], params="reduction_param { operation: MEAN axis: -1 }")),
         expected=lambda x, w: np.abs(x["data"].astype(np.float64)).sum(axis=(2, 3)).mean(axis=1)),
    # SENet's Axpy: a * x + y (more in test_converter_dialects.py, with OpenCV, which exchanges x and y)
    Case("axpy", "Axpy", lambda b: b.layer("ax", "Axpy", ["data", "x", "y"]),
         inputs=(("data", (2, 4, 1, 1)), ("x", (2, 4, 5, 5)), ("y", (2, 4, 5, 5))),
         expected=lambda x, w: x["data"] * x["x"] + x["y"]),
    # py-faster-rcnn's ROIPooling (rois drawn in [0, 2): batch 0 or 1, small boxes; more in test_converter_dialects)
    Case("roipooling", "ROIPooling", lambda b: b.layer("roi", "ROIPooling", ["data", "rois"],
                                                       params="roi_pooling_param { pooled_h: 2 pooled_w: 3 }"),
         inputs=(("data", (2, 4, 6, 6)), ("rois", (5, 5))), value_range=(0.0, 1.99)),
    # SSD's head (more in test_converter_ssd.py, including the real res10 face detector)
    Case("priorbox", "PriorBox", lambda b: b.layer("p", "PriorBox", ["data", "img"], params="prior_box_param { "
                                                   "min_size: 8 max_size: 14 aspect_ratio: 2 clip: false "
                                                   "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }"),
         inputs=(("data", (1, 4, 3, 4)), ("img", (1, 3, 24, 32)))),
    Case("detectionoutput", "DetectionOutput",
         lambda b: (b.layer("p", "PriorBox", ["data", "img"], params="prior_box_param { min_size: 8 max_size: 14 "
                            "aspect_ratio: 2 clip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }"),
                    b.layer("det", "DetectionOutput", ["loc", "conf", "p"], params="detection_output_param { "
                            "num_classes: 2 share_location: true background_label_id: 0 code_type: CENTER_SIZE "
                            "keep_top_k: 20 confidence_threshold: 0.2 "
                            "nms_param { nms_threshold: 0.45 top_k: 30 } }")),
         inputs=(("data", (1, 4, 3, 4)), ("img", (1, 3, 24, 32)), ("loc", (1, 12 * 4 * 4)), ("conf", (1, 12 * 4 * 2))),
         value_range=(0.0, 1.0)),
]


def _argmax_flat(x, k):
    """Caffe ArgMax without an axis: per sample, (N, 2, k) = top-k indices over the flattened sample, then values."""
    flat = x.reshape(x.shape[0], -1)
    idx = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    return np.stack([idx.astype(np.float32), np.take_along_axis(flat, idx, axis=1)], axis=1)
def _ave_pool(x, kernel, stride, pad):
    """Caffe AVE pooling written out: ceil rounding, divide by the window clipped to the padded input."""
    n, c, h, w = x.shape
    out_h = -(-(h + 2 * pad[0] - kernel[0]) // stride[0]) + 1
    out_w = -(-(w + 2 * pad[1] - kernel[1]) // stride[1]) + 1
    if pad[0] and (out_h - 1) * stride[0] >= h + pad[0]:
        out_h -= 1
    if pad[1] and (out_w - 1) * stride[1] >= w + pad[1]:
        out_w -= 1
    out = np.zeros((n, c, out_h, out_w), np.float64)
    for i in range(out_h):
        for j in range(out_w):
            hs, ws = i * stride[0] - pad[0], j * stride[1] - pad[1]
            he, we = min(hs + kernel[0], h + pad[0]), min(ws + kernel[1], w + pad[1])
            size = (he - hs) * (we - ws)
            window = x[:, :, max(hs, 0):min(he, h), max(ws, 0):min(we, w)]
            out[:, :, i, j] = window.sum(axis=(2, 3)) / size
    return out


def _lrn_across(x, n, alpha, beta, k):
    half = (n - 1) // 2
    sq = np.pad(x.astype(np.float64) ** 2, ((0, 0), (half, half), (0, 0), (0, 0)))
    total = sum(sq[:, i:i + x.shape[1]] for i in range(n))
    return x / (k + alpha / n * total) ** beta


CASES_BY_TYPE: Dict[str, list] = {}
for _case in CASES:
    CASES_BY_TYPE.setdefault(_case.type, []).append(_case)


@pytest.mark.parametrize("layer_type", sorted(LAYER_CONVERTERS))
def test_every_table_entry_has_a_case(layer_type):
    assert CASES_BY_TYPE.get(layer_type), f"LAYER_CONVERTERS['{layer_type}'] has no test case in CASES"


def _write(case: Case, tmp_path, fmt="v2", reference=False):
    b = NetBuilder(case.id, seed=7)
    for name, shape in case.inputs:
        b.input(name, shape)
    (case.reference if reference else case.build)(b)
    style = case.input_style if fmt == "v2" else "input_dim"
    return b.write(tmp_path / ("ref" if reference else fmt), stem=case.id, fmt=fmt, input_style=style)


def _inputs(case: Case, seed=3):
    rng = np.random.default_rng(seed)
    lo, hi = case.value_range
    return {("data" if i == 0 else name): rng.uniform(lo, hi, size=shape).astype(np.float32)
            for i, (name, shape) in enumerate(case.inputs)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layer_matches_opencv(case, tmp_path):
    prototxt, caffemodel = _write(case, tmp_path)
    result = convert(prototxt, caffemodel, keep_bgr=case.keep_bgr)
    assert result.preprocess.channel_order == ("BGR" if case.keep_bgr else "RGB")
    inputs = _inputs(case)
    if case.expected is not None:
        b = NetBuilder(case.id, seed=7)
        for name, shape in case.inputs:
            b.input(name, shape)
        case.build(b)
        expected = case.expected(inputs, b.blobs)
        (ours,) = run_mxnet(result.symbol, result.arg_arrays, result.aux_arrays, inputs)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE * np.abs(expected).max())
        return
    ref_files = _write(case, tmp_path, reference=True) if case.reference else (prototxt, caffemodel)
    report = verify_conversion(*ref_files, result, inputs=inputs, tolerance=TOLERANCE)
    assert report.ok, report.format()
    # the same holds layer by layer (every intermediate blob, not just the outputs)
    if not case.reference:
        report = verify_conversion(prototxt, caffemodel, result, layers=True, inputs=inputs, tolerance=TOLERANCE)
        assert report.ok, report.format()


V1_CASES = [c for c in CASES if c.input_style != "layer" and c.type in V1_TYPE_NAMES.values()]


def _v1_encodable(case: Case) -> bool:
    b = NetBuilder(case.id)
    for name, shape in case.inputs:
        b.input(name, shape)
    case.build(b)
    try:
        for layer in b.net.layer:
            to_v1(layer)
    except CaffeFormatError:
        return False
    return True


@pytest.mark.parametrize("case", [c for c in V1_CASES if _v1_encodable(c)], ids=lambda c: c.id)
def test_v1_and_v2_give_identical_output(case, tmp_path):
    outs = []
    for fmt in ("v1", "v2"):
        prototxt, caffemodel = _write(case, tmp_path, fmt=fmt)
        result = convert(prototxt, caffemodel, keep_bgr=True)
        assert result.preprocess.source["format"] == fmt
        outs.append(run_mxnet(result.symbol, result.arg_arrays, result.aux_arrays, _inputs(case)))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("height,kernel,stride,pad", [
    (4, 3, 3, 2),   # Caffe drops the last window, which would start inside the padding -> 2, not 3
    (8, 3, 2, 0),   # rounds up without padding: 4 windows, the last one partial
    (7, 2, 2, 1),   # rounds up with padding, last window kept
    (6, 3, 2, 1),   # exact fit
    (5, 4, 3, 3),   # large pad: several rows of pure padding
])
@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_ceil_pooling_edge_cases(tmp_path, height, kernel, stride, pad, pool):
    case = Case(f"pool-{pool}-{height}-{kernel}-{stride}-{pad}", "Pooling",
                lambda b: b.layer("p", "Pooling", ["data"], params=f"pooling_param {{ pool: {pool} kernel_size: "
                                                                    f"{kernel} stride: {stride} pad: {pad} }}"),
                inputs=(("data", (1, 2, height, height + 1)),))
    prototxt, caffemodel = _write(case, tmp_path)
    result = convert(prototxt, caffemodel, keep_bgr=True)
    report = verify_conversion(prototxt, caffemodel, result, inputs=_inputs(case), tolerance=TOLERANCE)
    assert report.ok, report.format()
