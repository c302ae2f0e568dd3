"""One converter per Caffe layer type, and the table that holds them.

Each `convert_<type>(layer, inputs)` is a small pure function: it reads the layer's Caffe settings, checks
its weights against the shapes the inputs imply, and returns the MXNet symbols for its tops plus the
parameters they need. The walker (graph.py) knows no layer type; it looks a type up in `LAYER_CONVERTERS`
and nothing else. `caffe_pool_size` is Caffe's pooling-window rule, the one home of it (the ONNX export
checks its pooling against it too).

MXNet's defaults differ from Caffe's in several places (pooling rounding, BatchNorm eps, Deconvolution's
bias); each converter sets those arguments explicitly and says why.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from tools.caffe_converter import caffe_pb2
from tools.caffe_converter.caffe_io import Layer
from tools.caffe_converter.errors import CaffeFormatError, UnsupportedLayerError

Shape = Tuple[int, ...]
log = logging.getLogger(__name__)


def infer_quietly(sym: mx.sym.Symbol, **shapes):
    """sym.infer_shape without the argument dump MXNet prints before re-raising: a probe is expected to fail."""
    return sym._infer_shape_impl(False, **shapes)  # the implementation infer_shape wraps in that print


@dataclass
class Tensor:
    """A Caffe blob during conversion: the MXNet symbol computing it and its shape (batch included).

    `probe_inputs` are the net's input shapes at another spatial size (twice the declared one); a converter
    that must know whether a shape depends on the input size asks `probe_shape()` (None: the net cannot run
    at that size, a fixed-size net).
    """

    sym: mx.sym.Symbol
    shape: Shape
    probe_inputs: Optional[Dict[str, Shape]] = None

    def probe_shape(self) -> Optional[Shape]:
        if not self.probe_inputs:
            return None
        wanted = {k: v for k, v in self.probe_inputs.items() if k in set(self.sym.list_arguments())}
        try:
            return tuple(infer_quietly(self.sym, **wanted)[1][0])
        except mx.base.MXNetError:
            return None


@dataclass
class Converted:
    """What a layer converter returns: one symbol per Caffe top, and the parameters the symbols use."""

    outputs: List[mx.sym.Symbol]
    args: Dict[str, np.ndarray] = field(default_factory=dict)
    aux: Dict[str, np.ndarray] = field(default_factory=dict)


# ---- helpers ------------------------------------------------------------------------------------------
def _fail(layer: Layer, message: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(f"layer '{layer.name}' ({layer.type}): {message}")


def shape_failure(layer: Layer, inputs: Sequence["Tensor"], message: str) -> UnsupportedLayerError:
    """A layer that cannot run on its bottoms' shapes: the message names them; the walker adds the declared
    input shapes and the --input-shape option (a net declared at a size it is not run at, as OpenPose)."""
    err = _fail(layer, f"{message}; bottom shape(s) {', '.join(str(tuple(t.shape)) for t in inputs)}")
    err.shape_failure = True
    return err


def _axis(layer: Layer, axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise _fail(layer, f"axis {axis} is out of range for a {ndim}-D input")
    return axis % ndim


def take_blobs(layer: Layer, specs: Sequence[Tuple[str, Shape]]) -> List[np.ndarray]:
    """Check the layer's caffemodel blobs against `specs` [(role, expected shape)] and return them reshaped.

    A blob may be stored in V1's padded 4-D form (1, 1, N, K) or with extra unit axes; only the values'
    count and the non-unit axes have to agree. Anything else is an error naming the layer and the blob.
    """
    if len(layer.blobs) != len(specs):
        roles = ", ".join(f"{role} {tuple(shape)}" for role, shape in specs) or "none"
        raise CaffeFormatError(
            f"layer '{layer.name}' ({layer.type}): the caffemodel has {len(layer.blobs)} weight blob(s), "
            f"expected {len(specs)} ({roles})"
            + ("; is the caffemodel missing this layer or is it named differently?" if not layer.blobs else "")
            + (f" (it has unused weights for {list(layer.unused_weights)[:5]})"
               if not layer.blobs and layer.unused_weights else "")
            + (f"; it is a later layer named '{layer.caffe_name}', and Caffe copies a caffemodel's weights into the "
               f"first layer of a name only (this one would keep its filler values): give the layers unique names"
               if layer.caffe_name and not layer.blobs else ""))
    out = []
    for i, (blob, (role, shape)) in enumerate(zip(layer.blobs, specs)):
        shape = tuple(int(d) for d in shape)
        if blob.shape != shape:
            squeeze = lambda s: tuple(d for d in s if d != 1)  # noqa: E731
            if blob.size != int(np.prod(shape)) or squeeze(blob.shape) != squeeze(shape):
                raise CaffeFormatError(
                    f"layer '{layer.name}' ({layer.type}): blob {i} ({role}) has shape {tuple(blob.shape)}, "
                    f"the prototxt and input shape imply {shape}")
            blob = blob.reshape(shape)
        out.append(blob)
    return out


def _pairs(layer: Layer, repeated: Sequence[int], h: int, w: int, has_hw: bool, default: int,
           what: str, ndim: int) -> Tuple[int, ...]:
    """Caffe's kernel/stride/pad/dilation: a repeated field (1 or n values) or separate _h/_w fields."""
    if has_hw:
        if ndim != 2:
            raise _fail(layer, f"{what}_h/{what}_w only apply to 2-D spatial inputs")
        if repeated:
            raise _fail(layer, f"give either {what} or {what}_h/{what}_w, not both")
        return (int(h), int(w))
    if not repeated:
        return (default,) * ndim
    if len(repeated) == 1:
        return (int(repeated[0]),) * ndim
    if len(repeated) != ndim:
        raise _fail(layer, f"{len(repeated)} {what} values for {ndim} spatial axes")
    return tuple(int(v) for v in repeated)


def _at_least(layer: Layer, field: str, values: Sequence[int], minimum: int = 1) -> None:
    """Caffe CHECKs these settings (a zero stride divides by zero, a zero kernel or output count has no
    meaning); here they are one line naming the layer and the field instead of an MXNet traceback."""
    bad = [int(v) for v in values if int(v) < minimum]
    if bad:
        raise _fail(layer, f"{field} must be >= {minimum}, got {bad[0]}")


def _fits(layer: Layer, x: "Tensor", kernel: Sequence[int], pad: Sequence[int], dilate: Sequence[int]) -> None:
    """A window larger than the padded input has no output position: a one-line shape error."""
    for size, k, pd, d in zip(x.shape[2:], kernel, pad, dilate):
        if size + 2 * pd < d * (k - 1) + 1:
            raise shape_failure(layer, [x], f"kernel {tuple(kernel)} (dilation {tuple(dilate)}, pad {tuple(pad)}) "
                                            f"is larger than the padded input")


def _reshape_checked(x: mx.sym.Symbol, shape: Shape, keep_batch: bool, name: str) -> mx.sym.Symbol:
    """Reshape to a fully known `shape` so that another input size fails at bind time.

    MXNet 1.9's reshape does not check the element count when its target holds a 0 (copy) and no -1: bound at
    another size it returns a wrong shape and then reads past its buffer (a segfault). reshape_like against a
    constant of the target shape checks the count; the batch axis stays free when Caffe copies it.
    """
    ref = mx.sym.zeros(shape=(1,) + tuple(shape[1:]) if keep_batch else tuple(shape), name=f"{name}_shape")
    begin = 1 if keep_batch else 0
    return mx.sym.reshape_like(x, ref, lhs_begin=begin, rhs_begin=begin, name=name)


def _var(name: str, shape: Shape) -> mx.sym.Symbol:
    return mx.sym.Variable(name, shape=tuple(int(d) for d in shape))


# ---- converters (alphabetical by Caffe type) ---------------------------------------------------------
def convert_absval(layer: Layer, inputs: List[Tensor]) -> Converted:
    """|x|."""
    return Converted([mx.sym.abs(inputs[0].sym, name=layer.name)])


def convert_axpy(layer: Layer, inputs: List[Tensor]) -> Converted:
    """SENet's Axpy: a * x + y, with bottoms (a, x, y) and a of shape N x C (x 1 x 1): a per-channel scale of x."""
    if len(inputs) != 3:
        raise _fail(layer, f"needs three bottoms (a, x, y), got {len(inputs)}")
    a, x, y = inputs
    if x.shape != y.shape:
        raise _fail(layer, f"x {x.shape} and y {y.shape} must have the same shape")
    if a.shape[:2] != x.shape[:2] or any(d != 1 for d in a.shape[2:]) or len(a.shape) not in (2, len(x.shape)):
        raise _fail(layer, f"a {a.shape} must be N x C or N x C x 1 x 1 for x {x.shape}")
    scale = a.sym if len(a.shape) == len(x.shape) else \
        mx.sym.reshape(a.sym, shape=(0, 0) + (1,) * (len(x.shape) - 2), name=f"{layer.name}_a")
    scaled = mx.sym.broadcast_mul(scale, x.sym, name=f"{layer.name}_ax")
    return Converted([mx.sym.elemwise_add(scaled, y.sym, name=layer.name)])


def convert_batchnorm(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Caffe BatchNorm stores mean and variance multiplied by a scale-factor blob; we divide it out.

    Caffe's BatchNorm has no gamma/beta; a Scale layer after it supplies them. The walker folds such a
    Scale in (found through the blob wiring, see `fused_scale`), and then gamma/beta are real parameters
    (`fix_gamma=False`); otherwise gamma is fixed at 1 and beta starts at 0.
    MXNet defaults replaced: eps (MXNet 1e-3, Caffe 1e-5), momentum (MXNet 0.9; Caffe's
    moving_average_fraction, 0.999 by default), use_global_stats (Caffe freezes statistics only when the
    prototxt says use_global_stats: true; inference uses the stored statistics in both frameworks).
    """
    p = layer.param.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        log.warning("layer '%s' (BatchNorm) says use_global_stats: false, so Caffe normalises with the statistics "
                    "of each test batch; the converted model (like OpenCV) uses the stored statistics", layer.name)
    channels = inputs[0].shape[1]
    mean, var, factor = take_blobs(layer, [("mean", (channels,)), ("variance", (channels,)),
                                           ("scale factor", (1,))])
    f = float(factor.reshape(-1)[0])
    f = 0.0 if f == 0 else 1.0 / f
    args = {}
    scale_layer: Optional[Layer] = layer.fused_scale
    if scale_layer is not None:
        sp = scale_layer.param.scale_param
        specs = [("scale", (channels,))] + ([("bias", (channels,))] if sp.bias_term else [])
        blobs = take_blobs(scale_layer, specs)
        gamma = blobs[0]
        beta = blobs[1] if sp.bias_term else np.zeros(channels, np.float32)
    else:
        gamma, beta = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    args[f"{layer.name}_gamma"] = np.asarray(gamma, np.float32)
    args[f"{layer.name}_beta"] = np.asarray(beta, np.float32)
    aux = {f"{layer.name}_moving_mean": (mean * f).astype(np.float32),
           f"{layer.name}_moving_var": (var * f).astype(np.float32)}
    sym = mx.sym.BatchNorm(inputs[0].sym, name=layer.name, eps=float(p.eps),
                           momentum=float(p.moving_average_fraction), fix_gamma=scale_layer is None,
                           use_global_stats=bool(p.HasField("use_global_stats") and p.use_global_stats), axis=1)
    return Converted([sym], args, aux)


def convert_bias(layer: Layer, inputs: List[Tensor]) -> Converted:
    """x + b, b broadcast from `axis` over `num_axes` axes (a learned blob, or the second bottom)."""
    p = layer.param.bias_param
    x = inputs[0]
    axis = _axis(layer, p.axis, len(x.shape))
    if len(inputs) == 2:
        bshape, b, args = inputs[1].shape, inputs[1].sym, {}
    else:
        n = p.num_axes if p.num_axes >= 0 else len(x.shape) - axis
        bshape = tuple(x.shape[axis:axis + n])
        (blob,) = take_blobs(layer, [("bias", bshape or (1,))])
        b = _var(f"{layer.name}_bias", blob.shape)
        args = {f"{layer.name}_bias": blob}
    full = (1,) * axis + tuple(bshape) + (1,) * (len(x.shape) - axis - len(bshape))
    out = mx.sym.broadcast_add(x.sym, mx.sym.reshape(b, shape=full), name=layer.name)
    return Converted([out], args)


def convert_concat(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Concatenate along `axis` (or the legacy `concat_dim`)."""
    p = layer.param.concat_param
    axis = p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim
    axis = _axis(layer, axis, len(inputs[0].shape))
    if len(inputs) == 1:
        return Converted([inputs[0].sym])
    return Converted([mx.sym.concat(*[t.sym for t in inputs], dim=axis, name=layer.name)])


def _conv_settings(layer: Layer, x: Tensor):
    p = layer.param.convolution_param
    if p.axis != 1:
        raise _fail(layer, f"convolution over axis {p.axis} is not supported; only axis 1 (channels)")
    nd = len(x.shape) - 2
    kernel = _pairs(layer, p.kernel_size, p.kernel_h, p.kernel_w, p.HasField("kernel_h") or p.HasField("kernel_w"),
                    0, "kernel", nd)
    _at_least(layer, "kernel_size", kernel)
    stride = _pairs(layer, p.stride, p.stride_h, p.stride_w, p.HasField("stride_h") or p.HasField("stride_w"),
                    1, "stride", nd)
    _at_least(layer, "stride", stride)
    pad = _pairs(layer, p.pad, p.pad_h, p.pad_w, p.HasField("pad_h") or p.HasField("pad_w"), 0, "pad", nd)
    dilate = _pairs(layer, p.dilation, 0, 0, False, 1, "dilation", nd)
    _at_least(layer, "dilation", dilate)
    _at_least(layer, "num_output", [p.num_output])
    _at_least(layer, "group", [p.group])
    return p, kernel, stride, pad, dilate


def _conv_weights(layer: Layer, channels: int, weight_shape: tuple) -> dict:
    """The arguments of a (de)convolution: its weight blob (checked against `weight_shape`) and, with
    bias_term, its bias; after checking that `group` divides both channel counts."""
    p = layer.param.convolution_param
    if channels % p.group or p.num_output % p.group:
        raise _fail(layer, f"group {p.group} does not divide {channels} input / {p.num_output} output channels")
    specs = [("weight", weight_shape)]
    if p.bias_term:
        specs.append(("bias", (p.num_output,)))
    blobs = take_blobs(layer, specs)
    args = {f"{layer.name}_weight": blobs[0]}
    if p.bias_term:
        args[f"{layer.name}_bias"] = blobs[1]
    return args


def convert_convolution(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Convolution with group, dilation, rectangular kernel/stride/pad and optional bias.

    Caffe's kernel_h/kernel_w and stride_h/stride_w override the square fields; both are read here.
    """
    x = inputs[0]
    p, kernel, stride, pad, dilate = _conv_settings(layer, x)
    _fits(layer, x, kernel, pad, dilate)
    channels, group = x.shape[1], p.group
    args = _conv_weights(layer, channels, (p.num_output, channels // group) + kernel)
    sym = mx.sym.Convolution(x.sym, name=layer.name, num_filter=p.num_output, kernel=kernel, stride=stride,
                             pad=pad, dilate=dilate, num_group=group, no_bias=not p.bias_term)
    return Converted([sym], args)


def convert_crop(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Crop bottom[0] to bottom[1]'s shape from `axis` on, starting at `offset` (one value or one per axis).

    When the reference is computed from the image (FCN crops its upsampled scores to `data`), the crop follows
    the reference's shape at run time (slice_like), so the model works at any input size as in Caffe; a
    reference that is a separate net input only lends its declared shape and is not an input of the symbol.
    """
    p = layer.param.crop_param
    if len(inputs) != 2:
        raise _fail(layer, "needs two bottoms (the blob to crop and the reference)")
    x, ref = inputs
    axis = _axis(layer, p.axis, len(x.shape))
    n = len(x.shape) - axis
    offsets = list(p.offset)
    if len(offsets) == 0:
        offsets = [0] * n
    elif len(offsets) == 1:
        offsets = offsets * n
    elif len(offsets) != n:
        raise _fail(layer, f"{len(offsets)} offsets for {n} cropped axes")
    begin, end = [None] * axis, [None] * axis
    for i, off in enumerate(offsets):
        size, avail = ref.shape[axis + i], x.shape[axis + i]
        if off + size > avail:
            raise _fail(layer, f"crop of {size} at offset {off} exceeds axis {axis + i} of size {avail}")
        begin.append(int(off))
        end.append(int(off + size))
    separate_input = set(ref.sym.list_arguments()) == {ref.sym.name} and ref.sym.name != "data"
    if separate_input:
        return Converted([mx.sym.slice(x.sym, begin=tuple(begin), end=tuple(end), name=layer.name)])
    shifted = mx.sym.slice(x.sym, begin=tuple(begin), end=(None,) * len(begin), name=f"{layer.name}_offset")
    return Converted([mx.sym.slice_like(shifted, ref.sym, axes=tuple(range(axis, len(x.shape))), name=layer.name)])


def convert_deconvolution(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Transposed convolution. Caffe's weight is (C_in, C_out / group, kh, kw), the same layout as MXNet's.

    MXNet's Deconvolution defaults to no_bias=True; Caffe's bias_term defaults to true, so it is always set.
    """
    x = inputs[0]
    p, kernel, stride, pad, dilate = _conv_settings(layer, x)
    channels, group = x.shape[1], p.group
    args = _conv_weights(layer, channels, (channels, p.num_output // group) + kernel)
    sym = mx.sym.Deconvolution(x.sym, name=layer.name, num_filter=p.num_output, kernel=kernel, stride=stride,
                               pad=pad, dilate=dilate, num_group=group, no_bias=not p.bias_term)
    return Converted([sym], args)


def convert_dropout(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Kept as Dropout (identity at inference) so that fine-tuning regularises as the original did.

    Both frameworks scale at training time (inverted dropout), so no weight rescaling is needed.
    """
    ratio = float(layer.param.dropout_param.dropout_ratio)
    if not 0.0 <= ratio < 1.0:  # Caffe scales kept values by 1 / (1 - ratio); MXNet bounds p to [0, 1]
        raise _fail(layer, f"dropout_ratio must be in [0, 1), got {ratio:g}")
    return Converted([mx.sym.Dropout(inputs[0].sym, p=ratio, name=layer.name)])


def convert_eltwise(layer: Layer, inputs: List[Tensor]) -> Converted:
    """SUM (with per-input coefficients), PROD and MAX; the wheel's converter turns PROD and MAX into a sum."""
    p = layer.param.eltwise_param
    syms = [t.sym for t in inputs]
    shapes = {t.shape for t in inputs}
    if len(shapes) > 1:
        raise _fail(layer, f"inputs have different shapes {sorted(shapes)}")
    op = p.operation
    if op == caffe_pb2.EltwiseParameter.SUM:
        coeff = list(p.coeff) or [1.0] * len(syms)
        if len(coeff) != len(syms):
            raise _fail(layer, f"{len(coeff)} coefficients for {len(syms)} inputs")
        if any(c != 1.0 for c in coeff):
            syms = [s if c == 1.0 else s * float(c) for s, c in zip(syms, coeff)]
        out = mx.sym.add_n(*syms, name=layer.name) if len(syms) > 1 else syms[0]
        return Converted([out])
    if p.coeff:
        raise _fail(layer, "coeff is only allowed with operation SUM")
    combine = mx.sym.elemwise_mul if op == caffe_pb2.EltwiseParameter.PROD else mx.sym.broadcast_maximum
    out = syms[0]
    for i, s in enumerate(syms[1:], start=1):
        out = combine(out, s, name=layer.name if i == len(syms) - 1 else f"{layer.name}_part{i}")
    return Converted([out])


def convert_detectionoutput(layer: Layer, inputs: List[Tensor]) -> Converted:
    """SSD's DetectionOutput as MXNet's MultiBoxDetection, for nets with one class besides the background.

    Caffe decodes each prior (CENTER_SIZE, the prior blob's variances), keeps the scores above
    confidence_threshold, takes the nms top_k per class, runs greedy NMS per class and keeps the keep_top_k best
    over all classes. MultiBoxDetection does the same steps, but gives each prior only its best class: with one
    foreground class that is the same candidate set; with more it is not, and the layer is refused. The
    variances are applied to the location predictions beforehand (MultiBoxDetection runs with variances 1), so
    per-prior variances hold as in Caffe. Output: Caffe's [N, 1, K, 7] rows (image, label, score, xmin, ymin,
    xmax, ymax), best first, K = keep_top_k (or every prior); where Caffe's blob stops after its last
    detection, the remaining rows are 0, as in OpenCV's output.
    """
    p = layer.param.detection_output_param
    kinds = caffe_pb2.PriorBoxParameter
    refusals = [(len(inputs) != 3, f"{len(inputs)} bottoms (only loc, conf, priors are supported)"),
                (p.num_classes != 2, f"num_classes {p.num_classes}: Caffe keeps every class of each prior, MXNet's "
                                     f"MultiBoxDetection only each prior's best class, which agree only for one class "
                                     f"besides the background"),
                (p.background_label_id != 0, f"background_label_id {p.background_label_id} (MXNet's is 0)"),
                (not p.share_location, "share_location: false (MXNet decodes one box per prior)"),
                (p.code_type != kinds.CENTER_SIZE, f"code_type {kinds.CodeType.Name(p.code_type)} (MXNet decodes "
                                                   f"CENTER_SIZE only)"),
                (p.nms_param.eta != 1.0, f"nms_param.eta {p.nms_param.eta:g} (adaptive NMS; MXNet's is fixed)"),
                (not 0 < p.nms_param.nms_threshold <= 1, f"nms_threshold {p.nms_param.nms_threshold:g} outside (0, 1]")]
    for refused, why in refusals:
        if refused:
            raise _fail(layer, f"{why}; cut the net before it with --output-layer and decode its inputs yourself")
    loc, conf, priors = inputs
    count = priors.shape[-1] // 4
    if len(priors.shape) != 3 or priors.shape[:2] != (1, 2) or loc.shape[0] != conf.shape[0] or \
            int(np.prod(loc.shape[1:])) != 4 * count or int(np.prod(conf.shape[1:])) != 2 * count:
        raise shape_failure(layer, inputs, f"expects loc N x {4 * count}, conf N x {2 * count} and priors 1 x 2 x "
                                           f"{4 * count}")
    boxes = mx.sym.reshape(mx.sym.slice_axis(priors.sym, axis=1, begin=0, end=1), shape=(1, -1, 4))
    deltas = mx.sym.reshape(loc.sym, shape=(0, -1))
    if not p.variance_encoded_in_target:  # Caffe multiplies each delta by its prior's variance before decoding
        variances = mx.sym.reshape(mx.sym.slice_axis(priors.sym, axis=1, begin=1, end=2), shape=(1, -1))
        deltas = mx.sym.broadcast_mul(deltas, variances, name=f"{layer.name}_scaled_loc")
    scores = mx.sym.transpose(mx.sym.reshape(conf.sym, shape=(0, -1, 2)), axes=(0, 2, 1))
    top_k = int(p.nms_param.top_k) if p.nms_param.HasField("top_k") else -1
    det = mx.sym.contrib.MultiBoxDetection(scores, deltas, boxes, clip=False, threshold=float(p.confidence_threshold),
                                           nms_threshold=float(p.nms_param.nms_threshold), force_suppress=False,
                                           variances=(1.0, 1.0, 1.0, 1.0), nms_topk=top_k, name=f"{layer.name}_nms")
    return Converted([_caffe_detections(det, count, int(p.keep_top_k), layer.name)])


def _caffe_detections(det: mx.sym.Symbol, count: int, keep: int, name: str) -> mx.sym.Symbol:
    """MultiBoxDetection's N x A x 6 rows (class - 1 or -1 when dropped, score, box) as Caffe's N x 1 x K x 7,
    the rows after the last detection 0 as OpenCV writes them."""
    k = count if keep < 0 or keep > count else keep
    cls = mx.sym.slice_axis(det, axis=2, begin=0, end=1)
    kept = cls >= 0
    key = mx.sym.where(kept, mx.sym.slice_axis(det, axis=2, begin=1, end=2), mx.sym.ones_like(cls) * -2.0)
    order = mx.sym.topk(mx.sym.reshape(key, shape=(0, -1)), axis=1, k=k, ret_typ="indices", is_ascend=False)
    rows = mx.sym.batch_dot(mx.sym.one_hot(order, depth=count), det)  # N x K x 6, gathered exactly
    valid = mx.sym.slice_axis(rows, axis=2, begin=0, end=1) >= 0
    image = mx.sym.broadcast_like(mx.sym.reshape(mx.sym.contrib.arange_like(rows, axis=0), shape=(-1, 1, 1)),
                                  valid)
    label = mx.sym.slice_axis(rows, axis=2, begin=0, end=1) + 1.0  # Caffe counts the background as class 0
    table = mx.sym.concat(image, label, mx.sym.slice_axis(rows, axis=2, begin=1, end=6), dim=2)
    table = mx.sym.where(mx.sym.broadcast_like(valid, table), table, mx.sym.zeros_like(table))
    return mx.sym.expand_dims(table, axis=1, name=name)


def convert_elu(layer: Layer, inputs: List[Tensor]) -> Converted:
    """ELU with Caffe's alpha (MXNet calls it slope)."""
    alpha = float(layer.param.elu_param.alpha)
    return Converted([mx.sym.LeakyReLU(inputs[0].sym, act_type="elu", slope=alpha, name=layer.name)])


def convert_flatten(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Merge axes axis..end_axis into one, at any input size.

    Each merge of two neighbouring axes is a reshape (0,)*axis + (-3, -2): -3 multiplies the two axes MXNet is
    given, -2 copies the rest, so no size is written into the symbol (Reshape(0, N) would tie the model to
    the prototxt's input size).
    """
    p = layer.param.flatten_param
    shape = inputs[0].shape
    axis = _axis(layer, p.axis, len(shape))
    end = _axis(layer, p.end_axis, len(shape))
    if end < axis:
        raise _fail(layer, f"end_axis {p.end_axis} comes before axis {p.axis}")
    out = inputs[0].sym
    merges = end - axis
    if merges == 0:
        return Converted([mx.sym.identity(out, name=layer.name)])
    for i in range(merges):
        out = mx.sym.reshape(out, shape=(0,) * axis + (-3, -2),
                             name=layer.name if i == merges - 1 else f"{layer.name}_merge{i}")
    return Converted([out])


def convert_innerproduct(layer: Layer, inputs: List[Tensor]) -> Converted:
    """FullyConnected over the axes from `axis` on. `transpose: true` stores the weight as (K, N)."""
    p = layer.param.inner_product_param
    x = inputs[0]
    axis = _axis(layer, p.axis, len(x.shape))
    k = int(np.prod(x.shape[axis:]))
    n = int(p.num_output)
    _at_least(layer, "num_output", [n])
    specs = [("weight", (k, n) if p.transpose else (n, k))]
    if p.bias_term:
        specs.append(("bias", (n,)))
    blobs = take_blobs(layer, specs)
    weight = np.ascontiguousarray(blobs[0].T) if p.transpose else blobs[0]
    args = {f"{layer.name}_weight": weight}
    if p.bias_term:
        args[f"{layer.name}_bias"] = blobs[1]
    data = x.sym
    if axis == 1:
        flatten = True  # MXNet flattens every axis after the batch axis, which is Caffe's axis 1
    else:
        flatten = False  # FullyConnected(flatten=False) works on the last axis: merge axis.. into it first
        if axis != len(x.shape) - 1:
            data = mx.sym.reshape(data, shape=tuple([0] * axis + [-1]), name=f"{layer.name}_merge")
    sym = mx.sym.FullyConnected(data, name=layer.name, num_hidden=n, no_bias=not p.bias_term, flatten=flatten)
    return Converted([sym], args)


def convert_lrn(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Local response normalisation.

    ACROSS_CHANNELS: x / (k + alpha / n * sum over n channels of x^2) ^ beta, which is MXNet's LRN.
    WITHIN_CHANNEL: Caffe computes x / (1 + alpha * mean of x^2 over an n x n window) ^ beta, with the
    window zero-padded by (n - 1) / 2 and the mean always divided by n^2 (k is not used); built here from
    an average pooling that counts the padding.
    """
    p = layer.param.lrn_param
    x = inputs[0].sym
    n = int(p.local_size)
    if n % 2 == 0:
        raise _fail(layer, f"local_size must be odd, got {n}")
    if p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        return Converted([mx.sym.LRN(x, name=layer.name, alpha=float(p.alpha), beta=float(p.beta),
                                     knorm=float(p.k), nsize=n)])
    pad = (n - 1) // 2
    nd = len(inputs[0].shape) - 2
    mean_sq = mx.sym.Pooling(mx.sym.square(x, name=f"{layer.name}_sq"), name=f"{layer.name}_pool",
                             kernel=(n,) * nd, stride=(1,) * nd, pad=(pad,) * nd, pool_type="avg",
                             count_include_pad=True, pooling_convention="valid")
    denom = (mean_sq * float(p.alpha) + 1.0) ** float(-p.beta)
    return Converted([mx.sym.elemwise_mul(x, denom, name=layer.name)])


def convert_normalize(layer: Layer, inputs: List[Tensor]) -> Converted:
    """SSD's Normalize: x / sqrt(sum x^2 + eps) times a learned scale.

    across_spatial sums over C, H and W of each sample, otherwise over C at each position;
    channel_shared keeps one scale value instead of one per channel.
    """
    p = layer.param.norm_param
    x = inputs[0]
    channels = x.shape[1]
    nshape = (1,) if p.channel_shared else (channels,)
    (scale,) = take_blobs(layer, [("scale", nshape)])
    axes = tuple(range(1, len(x.shape))) if p.across_spatial else (1,)
    norm = mx.sym.sqrt(mx.sym.sum(mx.sym.square(x.sym), axis=axes, keepdims=True) + float(p.eps),
                       name=f"{layer.name}_norm")
    gamma = _var(f"{layer.name}_gamma", nshape)
    full = (1, nshape[0]) + (1,) * (len(x.shape) - 2)
    out = mx.sym.broadcast_mul(mx.sym.broadcast_div(x.sym, norm), mx.sym.reshape(gamma, shape=full),
                               name=layer.name)
    return Converted([out], {f"{layer.name}_gamma": scale})


def convert_permute(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Transpose; a partial `order` is completed with the remaining axes in their original order (as SSD)."""
    order = [int(v) for v in layer.param.permute_param.order]
    ndim = len(inputs[0].shape)
    if len(set(order)) != len(order) or any(not 0 <= v < ndim for v in order):
        raise _fail(layer, f"order {order} is not a permutation of the {ndim} axes")
    order += [a for a in range(ndim) if a not in order]
    return Converted([mx.sym.transpose(inputs[0].sym, axes=tuple(order), name=layer.name)])


def caffe_pool_size(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """Caffe's pooled size: rounded up, minus a last window that would start inside the bottom/right pad."""
    if not ceil:
        return (size + 2 * pad - kernel) // stride + 1
    out = int(math.ceil((size + 2 * pad - kernel) / stride)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def pooling_window(layer: Layer, nd: int) -> Tuple[Shape, Shape, Shape, bool]:
    """(kernel, stride, pad, rounds up) of a windowed (not global) Caffe Pooling over `nd` spatial axes."""
    p = layer.param.pooling_param
    kernel = _pairs(layer, [p.kernel_size] if p.HasField("kernel_size") else [], p.kernel_h, p.kernel_w,
                    p.HasField("kernel_h") or p.HasField("kernel_w"), 0, "kernel", nd)
    if min(kernel) <= 0:
        raise _fail(layer, "kernel_size must be >= 1 (or global_pooling: true), got "
                           f"{min(kernel) if p.HasField('kernel_size') or p.HasField('kernel_h') else 'none'}")
    stride = _pairs(layer, [p.stride] if p.HasField("stride") else [], p.stride_h, p.stride_w,
                    p.HasField("stride_h") or p.HasField("stride_w"), 1, "stride", nd)
    _at_least(layer, "stride", stride)
    pad = _pairs(layer, [p.pad] if p.HasField("pad") else [], p.pad_h, p.pad_w,
                 p.HasField("pad_h") or p.HasField("pad_w"), 0, "pad", nd)
    if any(pd >= k for pd, k in zip(pad, kernel)):
        raise _fail(layer, f"pad {pad} must be smaller than kernel {kernel}")
    return kernel, stride, pad, pooling_rounds_up(layer)


def pooling_rounds_up(layer: Layer) -> bool:
    """BVLC's `round_mode: CEIL/FLOOR`, or the forks' `ceil_mode: true/false` (DenseNet, ResNeXt deploy files);
    both default to rounding up. A file giving both must agree with itself."""
    p = layer.param.pooling_param
    if not p.HasField("ceil_mode"):
        return p.round_mode == caffe_pb2.PoolingParameter.CEIL
    if p.HasField("round_mode") and (p.round_mode == caffe_pb2.PoolingParameter.CEIL) != p.ceil_mode:
        raise _fail(layer, f"ceil_mode: {str(p.ceil_mode).lower()} contradicts round_mode: "
                           f"{caffe_pb2.PoolingParameter.RoundMode.Name(p.round_mode)}")
    return bool(p.ceil_mode)


def convert_pooling(layer: Layer, inputs: List[Tensor]) -> Converted:
    """MAX and AVE pooling, global or windowed, with Caffe's exact output size.

    Caffe rounds the output size up (MXNet 'full') but drops a last window that starts inside the padding,
    which 'full' does not; that case is exactly MXNet's 'valid' (round down), so we choose per layer and
    check the result. AVE divides by the window clipped to the padded input, as MXNet with
    count_include_pad=True (set explicitly; it is the Caffe behaviour).
    """
    p = layer.param.pooling_param
    x = inputs[0]
    methods = {caffe_pb2.PoolingParameter.MAX: "max", caffe_pb2.PoolingParameter.AVE: "avg"}
    if p.pool not in methods:
        raise _fail(layer, "only MAX and AVE pooling are supported (STOCHASTIC is not)")
    pool_type = methods[p.pool]
    nd = len(x.shape) - 2
    if p.global_pooling:
        sym = mx.sym.Pooling(x.sym, name=layer.name, kernel=(1,) * nd, pool_type=pool_type, global_pool=True)
        return Converted([sym])
    kernel, stride, pad, ceil = pooling_window(layer, nd)
    spatial = x.shape[2:]
    want = [caffe_pool_size(s, k, st, pd, ceil) for s, k, st, pd in zip(spatial, kernel, stride, pad)]
    if min(want) < 1:
        raise shape_failure(layer, [x], f"kernel {kernel} (pad {pad}, stride {stride}) leaves no output position")
    full = [int(math.ceil((s + 2 * pd - k) / st)) + 1 for s, k, st, pd in zip(spatial, kernel, stride, pad)]
    valid = [(s + 2 * pd - k) // st + 1 for s, k, st, pd in zip(spatial, kernel, stride, pad)]
    if want == full:
        convention = "full"
    elif want == valid:
        convention = "valid"
    else:  # one axis rounds up, another drops its last window: no single MXNet convention matches
        raise _fail(layer, f"Caffe output size {want} matches neither MXNet rounding ({full} / {valid})")
    sym = mx.sym.Pooling(x.sym, name=layer.name, kernel=kernel, stride=stride, pad=pad, pool_type=pool_type,
                         pooling_convention=convention, count_include_pad=True)
    return Converted([sym])


def convert_power(layer: Layer, inputs: List[Tensor]) -> Converted:
    """(shift + scale * x) ^ power."""
    p = layer.param.power_param
    y = inputs[0].sym
    if p.scale != 1.0:
        y = y * float(p.scale)
    if p.shift != 0.0:
        y = y + float(p.shift)
    if p.power != 1.0:
        y = y ** float(p.power)
    return Converted([mx.sym.identity(y, name=layer.name)])


def _prior_boxes(layer: Layer) -> Tuple[List[Tuple[float, float]], List[float]]:
    """Caffe SSD's PriorBox: the (width, height) in pixels of each prior at a position, in Caffe's order, and the
    four variances. Order per min_size: the min_size square, the sqrt(min_size * max_size) square, then each
    aspect ratio (not 1, duplicates dropped, 1/ar after ar with flip) at min_size."""
    p = layer.param.prior_box_param
    if not p.min_size:
        raise _fail(layer, "min_size is required")
    if p.max_size and len(p.max_size) != len(p.min_size):
        raise _fail(layer, f"{len(p.max_size)} max_size values for {len(p.min_size)} min_size values")
    for field_name, values in (("min_size", p.min_size), ("max_size", p.max_size)):
        for v in values:
            if not (v > 0 and v == int(v)):  # Caffe SSD stores sizes in an int there; OpenCV keeps the fraction
                raise _fail(layer, f"{field_name} {v:g}: only positive whole numbers are supported (Caffe SSD's "
                                   f"PriorBox truncates a fraction, OpenCV's does not)")
    ratios = [1.0]
    for ar in p.aspect_ratio:
        if not ar > 0:
            raise _fail(layer, f"aspect_ratio must be > 0, got {ar:g}")
        if not any(abs(ar - r) < 1e-6 for r in ratios):
            ratios += [ar, 1.0 / ar] if p.flip else [ar]
    boxes = []
    for i, low in enumerate(p.min_size):
        boxes.append((low, low))
        if p.max_size:
            if not p.max_size[i] > low:
                raise _fail(layer, f"max_size {p.max_size[i]:g} must be larger than min_size {low:g}")
            side = math.sqrt(int(low) * int(p.max_size[i]))
            boxes.append((side, side))
        boxes += [(low * math.sqrt(r), low / math.sqrt(r)) for r in ratios[1:]]
    variances = list(p.variance) or [0.1]
    if len(variances) not in (1, 4) or min(variances) <= 0:
        raise _fail(layer, f"variance must be one or four positive values, got {variances}")
    return boxes, variances * 4 if len(variances) == 1 else variances


def _prior_geometry(layer: Layer, feature: Shape, image: Shape) -> Tuple[float, float, float, float]:
    """(image height, image width, step_h, step_w) in pixels, from the settings or, as Caffe, the bottoms."""
    p = layer.param.prior_box_param
    if p.img_h or p.img_w:
        img_h, img_w = float(p.img_h), float(p.img_w)
    elif p.img_size:
        img_h = img_w = float(p.img_size)
    else:
        img_h, img_w = float(image[2]), float(image[3])
    if p.step_h or p.step_w:
        step_h, step_w = float(p.step_h), float(p.step_w)
    elif p.step:
        step_h = step_w = float(p.step)
    else:
        step_h, step_w = img_h / feature[2], img_w / feature[3]
    if min(img_h, img_w, step_h, step_w) <= 0:
        raise _fail(layer, "img_h/img_w and step_h/step_w must be given together and be > 0")
    return img_h, img_w, step_h, step_w


def convert_priorbox(layer: Layer, inputs: List[Tensor]) -> Converted:
    """SSD's PriorBox: Caffe's 1 x 2 x (H * W * priors * 4) blob (boxes normalised to the image, then the
    variances), built from parameter-free operators for the feature map and image sizes of the conversion.

    MXNet's MultiBoxPrior cannot express it (sizes relative to the feature map's aspect, no separate max_size
    box per min_size, no pixel step), so the priors are computed here. They depend on the sizes only: the
    output is tied to its bottoms' shapes, so binding the model at another input size fails at bind time
    rather than giving the priors of the declared size (the sidecar records the model as fixed-size).
    """
    if len(inputs) != 2 or len(inputs[0].shape) != 4 or len(inputs[1].shape) != 4:
        raise _fail(layer, "needs two 4-D bottoms (the feature map and the image)")
    feature, image = inputs
    boxes, variances = _prior_boxes(layer)
    img_h, img_w, step_h, step_w = _prior_geometry(layer, feature.shape, image.shape)
    height, width, count = feature.shape[2], feature.shape[3], len(boxes)
    offset = float(layer.param.prior_box_param.offset)

    def centres(n: int, step: float, size: float) -> mx.sym.Symbol:  # (i + offset) * step / size, i < n
        return (mx.sym.arange(0, n, dtype="float32") + offset) * (step / size)

    def constants(values: Sequence[float]) -> mx.sym.Symbol:
        return mx.sym.concat(*[mx.sym.full(shape=(1,), val=float(v)) for v in values], dim=0)

    def halves(sizes: Sequence[float], image_size: float) -> mx.sym.Symbol:  # each prior's half extent
        return constants([s / 2.0 / image_size for s in sizes])

    cx = mx.sym.broadcast_to(mx.sym.reshape(centres(width, step_w, img_w), shape=(1, width, 1)),
                             shape=(height, width, count))
    cy = mx.sym.broadcast_to(mx.sym.reshape(centres(height, step_h, img_h), shape=(height, 1, 1)),
                             shape=(height, width, count))
    hw = mx.sym.reshape(halves([b[0] for b in boxes], img_w), shape=(1, 1, count))
    hh = mx.sym.reshape(halves([b[1] for b in boxes], img_h), shape=(1, 1, count))
    corners = [mx.sym.broadcast_sub(cx, hw), mx.sym.broadcast_sub(cy, hh),
               mx.sym.broadcast_add(cx, hw), mx.sym.broadcast_add(cy, hh)]
    coords = mx.sym.stack(*corners, axis=3)
    if layer.param.prior_box_param.clip:
        coords = mx.sym.clip(coords, 0.0, 1.0)
    total = height * width * count * 4
    rows = [mx.sym.reshape(coords, shape=(1, 1, total)),
            mx.sym.reshape(mx.sym.broadcast_to(constants(variances).reshape((1, 4)),
                                               shape=(height * width * count, 4)), shape=(1, 1, total))]
    priors = mx.sym.concat(*rows, dim=1)
    # zero, but only where the bottoms have the conversion's shapes: another input size fails at bind time
    # (mx.sym.slice with a partial begin on a 4-D input stops MXNet 1.9.1 with SIGFPE: one axis at a time)
    firsts = [mx.sym.slice_axis(mx.sym.slice_axis(t.sym, axis=0, begin=0, end=1), axis=1, begin=0, end=1)
              for t in inputs]
    ties = [mx.sym.sum(mx.sym.zeros_like(f) + mx.sym.zeros(shape=(1, 1) + tuple(t.shape[2:])))
            for f, t in zip(firsts, inputs)]
    return Converted([mx.sym.broadcast_add(priors, ties[0] + ties[1], name=layer.name)])


def convert_prelu(layer: Layer, inputs: List[Tensor]) -> Converted:
    """PReLU; a channel_shared slope is stored once in Caffe and repeated per channel here (MXNet's gamma
    is per channel), which computes the same function."""
    p = layer.param.prelu_param
    channels = inputs[0].shape[1]
    (slope,) = take_blobs(layer, [("slope", (1,) if p.channel_shared else (channels,))])
    gamma = np.repeat(slope, channels) if p.channel_shared else slope
    sym = mx.sym.LeakyReLU(inputs[0].sym, act_type="prelu", gamma=_var(f"{layer.name}_gamma", (channels,)),
                           name=layer.name)
    return Converted([sym], {f"{layer.name}_gamma": np.asarray(gamma, np.float32)})


def convert_relu(layer: Layer, inputs: List[Tensor]) -> Converted:
    """ReLU, or a leaky ReLU when negative_slope is set."""
    slope = float(layer.param.relu_param.negative_slope)
    if slope:
        return Converted([mx.sym.LeakyReLU(inputs[0].sym, act_type="leaky", slope=slope, name=layer.name)])
    return Converted([mx.sym.Activation(inputs[0].sym, act_type="relu", name=layer.name)])


def _reshape_target(layer: Layer, shape: List[int]) -> Tuple[int, int, List[int], List[int]]:
    """(start, end, spec, resolved output shape) of a Caffe Reshape on an input of `shape`."""
    p = layer.param.reshape_param
    ndim = len(shape)
    start = p.axis if p.axis >= 0 else ndim + 1 + p.axis
    if not 0 <= start <= ndim:
        raise _fail(layer, f"axis {p.axis} is out of range for a {ndim}-D input")
    end = ndim if p.num_axes == -1 else start + p.num_axes
    if p.num_axes < -1 or end > ndim:
        raise _fail(layer, f"num_axes {p.num_axes} is out of range")
    spec = [int(d) for d in p.shape.dim]
    middle = []
    for i, d in enumerate(spec):
        if d == 0:
            if start + i >= ndim:
                raise _fail(layer, f"dim {i} copies input axis {start + i}, which does not exist")
            middle.append(shape[start + i])
        else:
            middle.append(d)
    if middle.count(-1) > 1:
        raise _fail(layer, "at most one -1 dimension")
    out = shape[:start] + middle + shape[end:]
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        total = int(np.prod(shape))
        if known == 0 or total % known:
            raise _fail(layer, f"cannot reshape {tuple(shape)} into {tuple(out)}")
        out[out.index(-1)] = total // known
    if int(np.prod(out)) != int(np.prod(shape)):
        raise _fail(layer, f"cannot reshape {tuple(shape)} into {tuple(out)}")
    return start, end, spec, out


def convert_reshape(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Caffe Reshape (0 copies an axis, -1 is inferred, axis/num_axes select the part replaced).

    Caffe's 0 and -1 mean what MXNet's do as long as every dimension before them maps to one input axis, so
    the spec is passed on with the axes before `axis` copied: the model reshapes at any input size, as Caffe
    does. A spec without -1, or one whose replaced axes are followed by kept ones of a different count, is
    resolved to the declared shape and checked at bind time (`_reshape_checked`).
    """
    shape = list(inputs[0].shape)
    start, end, spec, out = _reshape_target(layer, shape)
    keeps_batch = start > 0 or (bool(spec) and spec[0] == 0)
    trailing = len(shape) - end
    if -1 in spec and (trailing == 0 or len(spec) == end - start):
        target = [0] * start + spec + [0] * trailing
        return Converted([mx.sym.reshape(inputs[0].sym, shape=tuple(target), name=layer.name)])
    return Converted([_reshape_checked(inputs[0].sym, tuple(out), keeps_batch, layer.name)])


def convert_roipooling(layer: Layer, inputs: List[Tensor]) -> Converted:
    """py-faster-rcnn's ROI max pooling: bottoms (features, rois R x 5: batch index, x1, y1, x2, y2 in image
    pixels). MXNet's ROIPooling follows Caffe's rules exactly: corners scaled by spatial_scale and rounded, the
    region at least 1 x 1 (end inclusive), bins from floor(i * h / ph) to ceil((i + 1) * h / ph) clipped to the
    map, an empty bin gives 0."""
    p = layer.param.roi_pooling_param
    if len(inputs) != 2:
        raise _fail(layer, f"needs two bottoms (features, rois), got {len(inputs)}")
    _at_least(layer, "pooled_h", [p.pooled_h])
    _at_least(layer, "pooled_w", [p.pooled_w])
    feats, rois = inputs
    if len(feats.shape) != 4 or len(rois.shape) != 2 or rois.shape[1] != 5:
        raise _fail(layer, f"needs N x C x H x W features and R x 5 rois, got {feats.shape} and {rois.shape}")
    if not p.spatial_scale > 0:
        raise _fail(layer, f"spatial_scale must be > 0, got {p.spatial_scale:g}")
    sym = mx.sym.ROIPooling(feats.sym, rois.sym, pooled_size=(int(p.pooled_h), int(p.pooled_w)),
                            spatial_scale=float(p.spatial_scale), name=layer.name)
    return Converted([sym])


def convert_scale(layer: Layer, inputs: List[Tensor]) -> Converted:
    """x * gamma (+ beta), gamma broadcast from `axis` over `num_axes` axes, learned or the second bottom.

    A Scale that directly follows a BatchNorm is folded into it by the walker and never reaches here.
    """
    p = layer.param.scale_param
    x = inputs[0]
    axis = _axis(layer, p.axis, len(x.shape))
    args = {}
    if len(inputs) == 2:
        sshape, gamma = inputs[1].shape, inputs[1].sym
        blobs = take_blobs(layer, [("bias", sshape)] if p.bias_term else [])
        beta_blob = blobs[0] if p.bias_term else None
    else:
        n = p.num_axes if p.num_axes >= 0 else len(x.shape) - axis
        sshape = tuple(x.shape[axis:axis + n])
        specs = [("scale", sshape or (1,))] + ([("bias", sshape or (1,))] if p.bias_term else [])
        blobs = take_blobs(layer, specs)
        gamma = _var(f"{layer.name}_gamma", blobs[0].shape)
        args[f"{layer.name}_gamma"] = blobs[0]
        beta_blob = blobs[1] if p.bias_term else None
    full = (1,) * axis + tuple(sshape) + (1,) * (len(x.shape) - axis - len(sshape))
    out = mx.sym.broadcast_mul(x.sym, mx.sym.reshape(gamma, shape=full),
                               name=layer.name if beta_blob is None else f"{layer.name}_mul")
    if beta_blob is not None:
        beta = _var(f"{layer.name}_beta", beta_blob.shape)
        args[f"{layer.name}_beta"] = beta_blob
        out = mx.sym.broadcast_add(out, mx.sym.reshape(beta, shape=full), name=layer.name)
    return Converted([out], args)


def convert_sigmoid(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Logistic sigmoid."""
    return Converted([mx.sym.Activation(inputs[0].sym, act_type="sigmoid", name=layer.name)])


def convert_slice(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Split along `axis` (or legacy slice_dim) at slice_point (fixed, as in Caffe), or into equal parts."""
    p = layer.param.slice_param
    x = inputs[0]
    axis = p.axis if p.HasField("axis") or not p.HasField("slice_dim") else p.slice_dim
    axis = _axis(layer, axis, len(x.shape))
    size, tops = x.shape[axis], len(layer.tops)
    if p.slice_point:
        points = [int(v) for v in p.slice_point]
        if len(points) != tops - 1 or points != sorted(points) or points[-1] >= size or points[0] <= 0:
            raise _fail(layer, f"slice_point {points} does not cut axis {axis} of size {size} into {tops} parts")
    else:  # equal parts: split at run time, so a spatial split follows the input size
        if size % tops:
            raise _fail(layer, f"axis {axis} of size {size} does not split evenly into {tops} tops")
        if tops == 1:
            return Converted([mx.sym.identity(x.sym, name=f"{layer.name}_{layer.tops[0]}")])
        parts = mx.sym.split(x.sym, num_outputs=tops, axis=axis, name=layer.name)
        return Converted([parts[i] for i in range(tops)])
    bounds = [0] + points + [size]
    outs = [mx.sym.slice_axis(x.sym, axis=axis, begin=b, end=e, name=f"{layer.name}_{top}")
            for b, e, top in zip(bounds[:-1], bounds[1:], layer.tops)]
    return Converted(outs)


def convert_softmax(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Softmax over `axis` (Caffe's default 1: the channels, at every position of a 4-D blob).

    The net's final Softmax becomes a SoftmaxOutput named after the Caffe layer, so the model trains with
    Module/fit as is. Its input is flattened first (labels (N,)) only when its spatial axes are 1 at every
    input size (after global pooling or an InnerProduct); a fully convolutional net such as MTCNN's PNet,
    declared at 12x12, keeps a softmax over the channels per position when bound at a pyramid size.
    """
    axis = _axis(layer, layer.param.softmax_param.axis, len(inputs[0].shape))
    x = inputs[0]
    if layer.is_net_output and axis == 1:
        data = x.sym
        multi = len(x.shape) > 2
        if multi and all(d == 1 for d in x.shape[2:]):
            probe = x.probe_shape()
            if probe is None or all(d == 1 for d in probe[2:]):
                data, multi = mx.sym.Flatten(data, name=f"{layer.name}_flatten"), False
        return Converted([mx.sym.SoftmaxOutput(data, name=layer.name, multi_output=multi)])
    return Converted([mx.sym.softmax(x.sym, axis=axis, name=layer.name)])


def convert_split(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Every top is the bottom itself."""
    return Converted([inputs[0].sym] * len(layer.tops))


def convert_tanh(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Hyperbolic tangent."""
    return Converted([mx.sym.Activation(inputs[0].sym, act_type="tanh", name=layer.name)])


def _log_base(base: float) -> float:
    """ln(base); Caffe's base -1 means e."""
    return 1.0 if base == -1.0 else math.log(base)


def convert_argmax(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Caffe ArgMax: the top_k indices (or, with out_max_val and an axis, the values) along `axis`.

    Without an axis Caffe flattens each sample and returns (N, 1, top_k) indices, or (N, 2, top_k) indices
    then values with out_max_val. Indices are floats, as in Caffe.
    """
    p = layer.param.argmax_param
    x = inputs[0]
    k = int(p.top_k)
    _at_least(layer, "top_k", [k])
    if p.HasField("axis"):
        axis = _axis(layer, p.axis, len(x.shape))
        if k > x.shape[axis]:
            raise _fail(layer, f"top_k {k} exceeds axis {axis} of size {x.shape[axis]}")
        kind = "value" if p.out_max_val else "indices"
        return Converted([mx.sym.topk(x.sym, axis=axis, k=k, ret_typ=kind, is_ascend=False, dtype="float32",
                                      name=layer.name)])
    flat = mx.sym.reshape(x.sym, shape=(0, -1), name=f"{layer.name}_flat")
    if k > int(np.prod(x.shape[1:])):
        raise _fail(layer, f"top_k {k} exceeds the {int(np.prod(x.shape[1:]))} values of a sample")
    idx = mx.sym.topk(flat, axis=1, k=k, ret_typ="indices", is_ascend=False, dtype="float32",
                      name=f"{layer.name}_indices")
    parts = [mx.sym.expand_dims(idx, axis=1)]
    if p.out_max_val:
        val = mx.sym.topk(flat, axis=1, k=k, ret_typ="value", is_ascend=False, name=f"{layer.name}_values")
        parts.append(mx.sym.expand_dims(val, axis=1))
    out = mx.sym.concat(*parts, dim=1, name=layer.name) if len(parts) > 1 else \
        mx.sym.identity(parts[0], name=layer.name)
    return Converted([out])


def convert_bnll(layer: Layer, inputs: List[Tensor]) -> Converted:
    """log(1 + e^x), MXNet's softrelu."""
    return Converted([mx.sym.Activation(inputs[0].sym, act_type="softrelu", name=layer.name)])


def convert_clip(layer: Layer, inputs: List[Tensor]) -> Converted:
    """min(max(x, min), max)."""
    p = layer.param.clip_param
    return Converted([mx.sym.clip(inputs[0].sym, a_min=float(p.min), a_max=float(p.max), name=layer.name)])


def convert_exp(layer: Layer, inputs: List[Tensor]) -> Converted:
    """base ^ (shift + scale * x) = exp(ln(base) * scale * x + ln(base) * shift)."""
    p = layer.param.exp_param
    if p.base != -1.0 and p.base <= 0:
        raise _fail(layer, f"base {p.base} must be positive (or -1 for e)")
    ln_base = _log_base(float(p.base))
    inner = float(p.scale) * ln_base
    y = inputs[0].sym if inner == 1.0 else inputs[0].sym * inner
    if p.shift:
        y = y + float(p.shift) * ln_base
    return Converted([mx.sym.exp(y, name=layer.name)])


def convert_log(layer: Layer, inputs: List[Tensor]) -> Converted:
    """log_base(shift + scale * x) = ln(shift + scale * x) / ln(base)."""
    p = layer.param.log_param
    if p.base != -1.0 and (p.base <= 0 or p.base == 1):
        raise _fail(layer, f"base {p.base} must be positive and not 1 (or -1 for e)")
    y = inputs[0].sym if p.scale == 1.0 else inputs[0].sym * float(p.scale)
    if p.shift:
        y = y + float(p.shift)
    ln_base = _log_base(float(p.base))
    out = mx.sym.log(y, name=layer.name if ln_base == 1.0 else f"{layer.name}_ln")
    return Converted([out if ln_base == 1.0 else mx.sym.identity(out / ln_base, name=layer.name)])


def convert_mvn(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Mean-variance normalisation per sample: over H x W, or C x H x W with across_channels.

    Caffe subtracts the mean, then divides by sqrt(variance) + eps (eps outside the root).
    """
    p = layer.param.mvn_param
    x = inputs[0]
    axes = tuple(range(1 if p.across_channels else 2, len(x.shape)))
    if not axes:
        raise _fail(layer, f"needs spatial axes; the input has shape {x.shape}")
    centred = mx.sym.broadcast_sub(x.sym, mx.sym.mean(x.sym, axis=axes, keepdims=True), name=f"{layer.name}_centred")
    if not p.normalize_variance:
        return Converted([mx.sym.identity(centred, name=layer.name)])
    std = mx.sym.sqrt(mx.sym.mean(mx.sym.square(centred), axis=axes, keepdims=True)) + float(p.eps)
    return Converted([mx.sym.broadcast_div(centred, std, name=layer.name)])


def convert_reduction(layer: Layer, inputs: List[Tensor]) -> Converted:
    """SUM, ASUM (sum of |x|), SUMSQ or MEAN over every axis from `axis` on (Caffe's default 0: all), times
    coeff. Caffe's 0-D result for axis 0 is MXNet's shape (1,) (the same single value)."""
    p = layer.param.reduction_param
    x = inputs[0]
    axis = _axis(layer, p.axis, len(x.shape))
    axes = tuple(range(axis, len(x.shape)))
    ops = caffe_pb2.ReductionParameter
    data = {ops.SUM: x.sym, ops.MEAN: x.sym, ops.ASUM: mx.sym.abs(x.sym), ops.SUMSQ: mx.sym.square(x.sym)}[p.operation]
    reduce = mx.sym.mean if p.operation == ops.MEAN else mx.sym.sum
    out = reduce(data, axis=axes, keepdims=False, name=layer.name if p.coeff == 1.0 else f"{layer.name}_reduce")
    if p.coeff != 1.0:
        out = mx.sym.identity(out * float(p.coeff), name=layer.name)
    return Converted([out])


def convert_swish(layer: Layer, inputs: List[Tensor]) -> Converted:
    """x * sigmoid(beta * x)."""
    beta = float(layer.param.swish_param.beta)
    x = inputs[0].sym
    gate = mx.sym.Activation(x if beta == 1.0 else x * beta, act_type="sigmoid", name=f"{layer.name}_gate")
    return Converted([mx.sym.elemwise_mul(x, gate, name=layer.name)])


def convert_threshold(layer: Layer, inputs: List[Tensor]) -> Converted:
    """1 where x > threshold, else 0 (strictly greater, as Caffe)."""
    t = float(layer.param.threshold_param.threshold)
    return Converted([mx.sym.identity(inputs[0].sym > t, name=layer.name)])


def convert_tile(layer: Layer, inputs: List[Tensor]) -> Converted:
    """Repeat the whole blob `tiles` times along `axis` (numpy's tile, not repeat)."""
    p = layer.param.tile_param
    x = inputs[0]
    axis = _axis(layer, p.axis, len(x.shape))
    if p.tiles < 1:
        raise _fail(layer, f"tiles must be >= 1, got {p.tiles}")
    reps = [1] * len(x.shape)
    reps[axis] = int(p.tiles)
    return Converted([mx.sym.tile(x.sym, reps=tuple(reps), name=layer.name)])


# The one table. Keys are Caffe type names (V1 enum names are translated when the net is loaded).
LAYER_CONVERTERS: Dict[str, Callable[[Layer, List[Tensor]], Converted]] = {
    "Convolution": convert_convolution,
    "Deconvolution": convert_deconvolution,
    "Pooling": convert_pooling,
    "InnerProduct": convert_innerproduct,
    "ReLU": convert_relu,
    "PReLU": convert_prelu,
    "ELU": convert_elu,
    "Sigmoid": convert_sigmoid,
    "TanH": convert_tanh,
    "AbsVal": convert_absval,
    "Power": convert_power,
    "BatchNorm": convert_batchnorm,
    "Scale": convert_scale,
    "Bias": convert_bias,
    "Eltwise": convert_eltwise,
    "Concat": convert_concat,
    "Slice": convert_slice,
    "Split": convert_split,
    "Flatten": convert_flatten,
    "Reshape": convert_reshape,
    "Crop": convert_crop,
    "LRN": convert_lrn,
    "Dropout": convert_dropout,
    "Softmax": convert_softmax,
    "Permute": convert_permute,
    "Normalize": convert_normalize,
    "ArgMax": convert_argmax,
    "BNLL": convert_bnll,
    "Clip": convert_clip,
    "Exp": convert_exp,
    "Log": convert_log,
    "MVN": convert_mvn,
    "Reduction": convert_reduction,
    "Swish": convert_swish,
    "Threshold": convert_threshold,
    "Tile": convert_tile,
    "Axpy": convert_axpy,
    "PriorBox": convert_priorbox,
    "DetectionOutput": convert_detectionoutput,
    "ROIPooling": convert_roipooling,
}
