"""Caffe -> MXNet converter: walk the net, write an MXNet checkpoint and its preprocessing sidecar.

Usage (the interface of MXNet's tools/caffe_converter/convert_model.py, plus options):

    python -m tools.caffe_converter deploy.prototxt weights.caffemodel out/model/vgg16 [--verify]

writes `PREFIX-symbol.json`, `PREFIX-0000.params` (loadable by `mx.model.load_checkpoint(PREFIX, 0)`) and
`PREFIX-preprocess.json` (symbols/sidecar.py), plus `PREFIX-mean.npy` when a mean image is given.

The walker below knows no layer type: it wires blobs to layers, looks each type up in
tools.caffe_layers.LAYER_CONVERTERS, and ends with checks (parameter names equal the symbol's arguments,
every shape equals MXNet's inferred shape). Two graph-level steps happen before the walk, both following the
blob wiring rather than layer names: a Scale that is the only reader of a BatchNorm's output is folded into
it, and (unless --keep-bgr) the layers reading the image get their channel weights reversed for RGB input.
"""
from __future__ import annotations

import argparse
import logging
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from symbols.sidecar import Preprocess, save_sidecar
from recbuild.atomic import atomic_path
from tools.caffe_io import CaffeFormatError, CaffeNet, file_region, load_net, read_mean_binaryproto
from tools.caffe_layers import INPUT_CHANNEL_FLIPS, LAYER_CONVERTERS, Tensor, UnsupportedLayerError
from tools.verify import DEFAULT_TOLERANCE

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Value = Tuple  # ("in", name) for a net input, (layer index, top index) for a layer output


class ConversionError(ValueError):
    """The net cannot be converted; the message is one line naming the layer and what is supported."""


@dataclass
class ConversionResult:
    """A converted net.

    Attributes:
        symbol: the MXNet symbol (input `data`; the final Softmax is a SoftmaxOutput named after its layer).
        arg_arrays / aux_arrays: parameters as float32 numpy arrays keyed by MXNet name (no `arg:` prefix).
        preprocess: what the sidecar records (input shape, channel order, mean, scale, classifier, ...).
        input_shapes: MXNet input name -> shape with batch axis (first input is `data`).
        output_blobs: the Caffe blob (or layer) names of the symbol's outputs, in order.
        output_layers / output_tops: the Caffe layer computing each output and which of its tops it is
            (OpenCV names outputs by layer).
        blob_symbols: Caffe layer name -> MXNet symbol of its first top, for per-layer verification.
        skipped: (layer, type, why) for every layer left out.
    """

    symbol: "mx.sym.Symbol"
    arg_arrays: Dict[str, np.ndarray]
    aux_arrays: Dict[str, np.ndarray]
    preprocess: Preprocess
    input_shapes: Dict[str, Tuple[int, ...]]
    output_blobs: List[str]
    blob_symbols: Dict[str, "mx.sym.Symbol"] = field(default_factory=dict)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)
    mean_image: Optional[np.ndarray] = None
    output_layers: List[str] = field(default_factory=list)
    output_tops: List[int] = field(default_factory=list)
    layer_order: List[str] = field(default_factory=list)
    caffe_input_names: Dict[str, str] = field(default_factory=dict)
    rgb_layers: List[str] = field(default_factory=list)

    @property
    def arg_params(self) -> Dict[str, "mx.nd.NDArray"]:
        """Arguments as NDArrays, as `mx.model.load_checkpoint` returns them."""
        import mxnet as mx
        return {k: mx.nd.array(v, dtype=np.float32) for k, v in self.arg_arrays.items()}

    @property
    def aux_params(self) -> Dict[str, "mx.nd.NDArray"]:
        import mxnet as mx
        return {k: mx.nd.array(v, dtype=np.float32) for k, v in self.aux_arrays.items()}


# ---- wiring ------------------------------------------------------------------------------------------
def _wire(net: CaffeNet) -> Tuple[List[List[Value]], Dict[str, Value]]:
    """Resolve each layer's bottoms to the value that produced them (in-place tops simply rebind)."""
    env: Dict[str, Value] = {name: ("in", name) for name in net.inputs}
    reads: List[List[Value]] = []
    for i, layer in enumerate(net.layers):
        row = []
        for b in layer.bottoms:
            if b not in env:
                raise ConversionError(f"{net.prototxt}: layer '{layer.name}' reads blob '{b}', which no input or "
                                      f"earlier layer produces")
            row.append(env[b])
        reads.append(row)
        for k, top in enumerate(layer.tops):
            env[top] = (i, k)
    return reads, env


def _select_outputs(net: CaffeNet, reads, env, output_layer: Optional[Sequence[str]]) -> List[Tuple[str, Value]]:
    if output_layer:
        names = {layer.name: i for i, layer in enumerate(net.layers)}
        chosen = []
        for name in output_layer:
            if name in names and net.layers[names[name]].tops:
                chosen.append((name, (names[name], 0)))  # a layer: its output at that point of the net
            elif name in env and env[name][0] != "in":
                chosen.append((name, env[name]))           # a blob: its final value
            else:
                raise ConversionError(f"{net.prototxt}: --output-layer '{name}' is neither a layer nor a blob of the "
                                      f"net (last layers: {[l.name for l in net.layers[-5:]]})")
        return chosen
    consumed = {v for row in reads for v in row}
    outputs = []
    for i, layer in enumerate(net.layers):
        for k, top in enumerate(layer.tops):
            if (i, k) not in consumed and env.get(top) == (i, k):
                outputs.append((top, (i, k)))
    if not outputs:
        raise ConversionError(f"{net.prototxt}: the net has no output blob")
    return outputs


def _needed(reads, outputs) -> List[int]:
    """Indices of the layers the outputs depend on, in net order."""
    need, stack = set(), [v for _, v in outputs]
    while stack:
        v = stack.pop()
        if v[0] == "in" or v[0] in need:
            continue
        need.add(v[0])
        stack.extend(reads[v[0]])
    return sorted(need)


def _fold_scales(net: CaffeNet, reads, order: List[int], outputs) -> int:
    """Fold a per-channel Scale into the BatchNorm whose output it alone reads (found by wiring, not names)."""
    out_values = {v for _, v in outputs}
    readers: Dict[Value, List[int]] = {}
    for i in order:
        for v in reads[i]:
            readers.setdefault(v, []).append(i)
    folded = 0
    for i in order:
        bn = net.layers[i]
        if bn.type != "BatchNorm" or (i, 0) in out_values:
            continue
        users = readers.get((i, 0), [])
        if len(users) != 1:
            continue
        sc = net.layers[users[0]]
        p = sc.param.scale_param
        if sc.type == "Scale" and len(sc.bottoms) == 1 and p.axis == 1 and p.num_axes == 1:
            bn.fused_scale, sc.folded_into = sc, bn.name
            folded += 1
    return folded


def _swap_to_rgb(net: CaffeNet, reads, order: List[int], outputs, data_name: str) -> List[str]:
    """Reorder the weights of the layers that read the BGR image so the model takes RGB.

    Returns the layers whose outputs still carry the reversed (RGB) channel order.

    Follows the wiring from the input: per-channel layers (a BatchNorm/Scale on the input, as in the SSD
    face detector) get their parameters reversed and pass the reversed order on; the first Convolution or
    InnerProduct absorbs it. Any other reader is an error: its output would silently depend on the order.
    """
    reversed_values = {("in", data_name)}
    touched = []
    for i in order:
        layer = net.layers[i]
        if layer.folded_into:
            if any(v in reversed_values for v in reads[i]):
                reversed_values.add((i, 0))  # the BatchNorm it was folded into already flipped its blobs
                touched.append(layer.name)
            continue
        if not any(v in reversed_values for v in reads[i]):
            continue
        flip = INPUT_CHANNEL_FLIPS.get(layer.type)
        if flip is None or len(reads[i]) != 1:
            raise ConversionError(
                f"layer '{layer.name}' ({layer.type}) reads the image channels directly and cannot be reordered "
                f"for RGB input (supported: {', '.join(sorted(INPUT_CHANNEL_FLIPS))}); convert with --keep-bgr")
        if not layer.blobs and layer.type in ("BatchNorm", "Scale", "Bias", "PReLU", "Convolution", "Deconvolution",
                                              "InnerProduct"):
            raise CaffeFormatError(f"layer '{layer.name}' ({layer.type}): the caffemodel has 0 weight blob(s) for it; "
                                   f"is the caffemodel missing this layer or is it named differently?")
        still_reversed = flip(layer)
        if still_reversed:
            touched.append(layer.name)
            reversed_values.update((i, k) for k in range(len(layer.tops)))
    leaked = [name for name, v in outputs if v in reversed_values]
    if leaked:
        raise ConversionError(f"output {leaked} still carries the image's channel order; convert with --keep-bgr")
    return touched


# ---- the walk ----------------------------------------------------------------------------------------
def convert_net(net: CaffeNet, keep_bgr: bool = False, output_layer: Optional[Sequence[str]] = None,
                strict: bool = False):
    """Convert a loaded CaffeNet into (symbol, args, aux, details).

    Args:
        net: from tools.caffe_io.load_net (with weights).
        keep_bgr: keep Caffe's BGR input order instead of reordering the first layers' weights for RGB.
        output_layer: cut the net at these layers/blobs instead of at its final outputs.
        strict: turn skipped layers into an error.

    Returns:
        dict with symbol, arg/aux numpy dicts, input shapes, outputs, per-layer symbols and notes.
    """
    import mxnet as mx

    if strict and net.skipped:
        raise ConversionError(f"{net.prototxt}: --strict and {len(net.skipped)} layer(s) would be skipped: "
                              f"{[(n, t) for n, t, _ in net.skipped][:5]}")
    reads, env = _wire(net)
    outputs = _select_outputs(net, reads, env, output_layer)
    order = _needed(reads, outputs)
    out_values = {v for _, v in outputs}
    for i in order:
        layer = net.layers[i]
        layer.is_net_output = any((i, k) in out_values for k in range(len(layer.tops)))
    unknown = [net.layers[i] for i in order if net.layers[i].type not in LAYER_CONVERTERS]
    if unknown:
        layer = unknown[0]
        raise UnsupportedLayerError(
            f"layer '{layer.name}' has type '{layer.type}', which the converter does not support; supported: "
            f"{', '.join(sorted(LAYER_CONVERTERS))} (training-only layers are skipped); "
            f"--output-layer can cut the net before it")
    folded = _fold_scales(net, reads, order, outputs)

    input_names = list(net.inputs)
    data_name = input_names[0]
    mx_names = {name: ("data" if name == data_name else name) for name in input_names}
    input_shapes = {mx_names[n]: tuple(net.inputs[n]) for n in input_names}
    data_shape = input_shapes["data"]
    swap = not keep_bgr and len(data_shape) == 4 and data_shape[1] == 3
    if not keep_bgr and not swap:
        log.info("input has shape %s (not 3 channels): channel order left as is", data_shape)
    flipped = _swap_to_rgb(net, reads, order, outputs, data_name) if swap else []

    values: Dict[Value, Tensor] = {("in", n): Tensor(mx.sym.Variable(mx_names[n]), tuple(net.inputs[n]))
                                   for n in input_names}
    args: Dict[str, np.ndarray] = {}
    aux: Dict[str, np.ndarray] = {}
    layer_syms: Dict[str, mx.sym.Symbol] = {}
    feeds: Dict[str, str] = {}  # layer name -> output name of the symbol feeding it (for feature_output)
    for i in order:
        layer = net.layers[i]
        ins = [values[v] for v in reads[i]]
        if layer.folded_into:
            outs = [ins[0].sym]  # computed by the BatchNorm it was folded into
        else:
            converted = LAYER_CONVERTERS[layer.type](layer, ins)
            if len(converted.outputs) != len(layer.tops):
                raise ConversionError(f"layer '{layer.name}' ({layer.type}): {len(layer.tops)} tops, converter made "
                                      f"{len(converted.outputs)} outputs")
            outs = converted.outputs
            for store, new in ((args, converted.args), (aux, converted.aux)):
                clash = set(store) & set(new)
                if clash:
                    raise ConversionError(f"layer '{layer.name}': parameter name(s) {sorted(clash)} already used; "
                                          f"rename the layer")
                store.update(new)
        try:
            group = mx.sym.Group(outs)
            shapes = group.infer_shape(**_used(group, input_shapes))[1]
        except mx.base.MXNetError as err:
            first = next((ln for ln in str(err).splitlines() if "Error" in ln or "Check failed" in ln), str(err))
            raise ConversionError(f"layer '{layer.name}' ({layer.type}): MXNet rejects the shapes "
                                  f"{[t.shape for t in ins]}: {first.strip()[:300]}") from None
        for k, (sym, shape) in enumerate(zip(outs, shapes)):
            values[(i, k)] = Tensor(sym, tuple(shape))
        if ins:
            feeds[layer.name] = ins[0].sym.list_outputs()[0]
        if layer.fused_scale is None:  # a BatchNorm with a folded Scale computes the Scale's output, not its own
            layer_syms[layer.name] = outs[0]
        log.debug("%s (%s) -> %s", layer.name, layer.type, [tuple(s) for s in shapes])

    out_syms = [values[v].sym for _, v in outputs]
    symbol = out_syms[0] if len(out_syms) == 1 else mx.sym.Group(out_syms)
    _final_checks(symbol, args, aux, input_shapes)
    return dict(symbol=symbol, args={k: args[k] for k in symbol.list_arguments() if k in args},
                aux={k: aux[k] for k in symbol.list_auxiliary_states()}, input_shapes=input_shapes,
                outputs=outputs, order=order, reads=reads, layer_syms=layer_syms, feeds=feeds,
                swapped=swap, flipped=flipped, folded=folded)


def _used(symbol, input_shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """The input shapes `symbol` actually reads (a Crop reference input only lends its shape)."""
    names = set(symbol.list_arguments())
    return {k: v for k, v in input_shapes.items() if k in names}


def _final_checks(symbol, args: Dict[str, np.ndarray], aux: Dict[str, np.ndarray], input_shapes) -> None:
    """Parameter names equal the symbol's arguments / aux states, and every shape equals MXNet's inference."""
    arg_names = [n for n in symbol.list_arguments() if n not in input_shapes and not n.endswith("_label")]
    missing = [n for n in arg_names if n not in args]
    if missing:
        raise ConversionError(f"internal: symbol arguments without weights: {missing[:5]}")
    unused = sorted(set(args) - set(symbol.list_arguments()))
    if unused:
        log.info("%d parameter(s) belong to layers the outputs do not use and are left out: %s",
                 len(unused), unused[:5])
    aux_names = symbol.list_auxiliary_states()
    if set(aux_names) - set(aux):
        raise ConversionError(f"internal: auxiliary states without values: {sorted(set(aux_names) - set(aux))[:5]}")
    arg_shapes, _, aux_shapes = symbol.infer_shape(**_used(symbol, input_shapes))
    for names, shapes, store in ((symbol.list_arguments(), arg_shapes, args), (aux_names, aux_shapes, aux)):
        for name, shape in zip(names, shapes):
            if name in store and tuple(store[name].shape) != tuple(shape):
                raise ConversionError(f"internal: parameter {name} has shape {store[name].shape}, MXNet infers "
                                      f"{tuple(shape)}")


# ---- preprocessing ------------------------------------------------------------------------------------
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


# ---- public API ---------------------------------------------------------------------------------------
def convert(prototxt: PathLike, caffemodel: PathLike, prefix: Optional[PathLike] = None, *, keep_bgr: bool = False,
            mean_file: Optional[PathLike] = None, mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None, scale: Optional[float] = None,
            output_layer: Optional[Sequence[str]] = None, strict: bool = False) -> ConversionResult:
    """Convert a Caffe model; when `prefix` is given also write the checkpoint (epoch 0) and sidecar.

    Args:
        prototxt: deploy prototxt (V1 `layers {}` or current `layer {}` format).
        caffemodel: the binary weights.
        prefix: checkpoint prefix to write (`PREFIX-symbol.json`, `PREFIX-0000.params`,
            `PREFIX-preprocess.json`, `PREFIX-mean.npy` with a mean image); None writes nothing.
        keep_bgr: keep BGR input (default: the model takes RGB).
        mean_file: a Caffe mean.binaryproto (BGR), recorded as a mean image centre-cropped to the input.
        mean / std: per-channel values in the Caffe net's channel order (BGR), e.g. (104, 117, 123).
        scale: Caffe's transform_param.scale (default: read from the prototxt, else 1).
        output_layer: cut the net at these layers or blobs.
        strict: fail instead of skipping training-only layers.

    Returns:
        ConversionResult (symbol, parameters, preprocessing, per-layer symbols).

    Raises:
        CaffeFormatError, ConversionError, UnsupportedLayerError: with a one-line message naming the file/layer.
    """
    if isinstance(output_layer, str):
        output_layer = [output_layer]
    net = load_net(prototxt, caffemodel)
    net.caffemodel = str(caffemodel)
    conv = convert_net(net, keep_bgr=keep_bgr, output_layer=output_layer, strict=strict)
    pre, mean_image = build_preprocess(net, conv, mean_file, mean, std, scale)
    result = ConversionResult(conv["symbol"], conv["args"], conv["aux"], pre, conv["input_shapes"],
                              [name for name, _ in conv["outputs"]], conv["layer_syms"], list(net.skipped),
                              mean_image,
                              output_layers=[net.layers[v[0]].name for _, v in conv["outputs"]],
                              output_tops=[v[1] for _, v in conv["outputs"]],
                              layer_order=[net.layers[i].name for i in conv["order"]],
                              rgb_layers=conv["flipped"],
                              caffe_input_names={("data" if i == 0 else n): n for i, n in enumerate(net.inputs)})
    for name, type_name, why in net.skipped:
        log.info("skipped layer '%s' (%s): %s", name, type_name, why)
    if prefix is not None:
        write_checkpoint(prefix, result)
    return result


# NDArray list file (what mx.nd.save writes), written straight from numpy so no weight is copied into an
# NDArray first: u64 magic 0x112, u64 reserved, u64 count, then per array u32 0xF993FAC9 (V2 magic),
# i32 storage type (0 dense), u32 ndim, i64 dims, i32 dev_type (1 cpu), i32 dev_id, i32 dtype (0 float32),
# raw little-endian data; then u64 count and (u64 length, bytes) per name.
_LIST_MAGIC, _ND_MAGIC = 0x112, 0xF993FAC9


def save_params(path: PathLike, arrays: Dict[str, np.ndarray]) -> None:
    """Write `arrays` as an MXNet .params file (atomically), streaming each array from its buffer.

    Arrays that are still untouched views of a caffemodel's memory map are copied file-to-file by the kernel
    (os.copy_file_range): four times faster than writing them from Python and their pages are never read in.
    """
    sources: Dict[str, int] = {}
    with atomic_path(path) as tmp:
        with open(tmp, "wb", buffering=0) as out:
            try:
                out.write(struct.pack("<QQQ", _LIST_MAGIC, 0, len(arrays)))
                for arr in arrays.values():
                    arr = np.asarray(arr)
                    if arr.dtype != np.dtype("<f4"):
                        arr = arr.astype("<f4")
                    shape = arr.shape if arr.ndim else (1,)
                    out.write(struct.pack("<IiI", _ND_MAGIC, 0, len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
                              + struct.pack("<iii", 1, 0, 0))
                    region = file_region(arr)
                    done = _copy_range(region, arr.nbytes, out, sources) if region is not None else 0
                    if done < arr.nbytes:
                        _write_all(out, memoryview(np.ascontiguousarray(arr)).cast("B")[done:])
                tail = [struct.pack("<Q", len(arrays))]
                for name in arrays:
                    raw = name.encode("utf-8")
                    tail += [struct.pack("<Q", len(raw)), raw]
                _write_all(out, b"".join(tail))
            finally:
                for fd in sources.values():
                    os.close(fd)


def _write_all(out, data) -> None:
    view = memoryview(data)
    while view.nbytes:
        view = view[out.write(view):]


def _copy_range(region: Tuple[str, int], nbytes: int, out, sources: Dict[str, int]) -> int:
    """Kernel-side copy of up to `nbytes` at `region` to `out`'s position; returns the bytes copied (0 when
    the platform or file system does not support it; the caller writes the rest from memory)."""
    copy = getattr(os, "copy_file_range", None)
    if copy is None:
        return 0
    path, offset = region
    if path not in sources:
        sources[path] = os.open(path, os.O_RDONLY)
    done = 0
    try:
        while done < nbytes:
            n = copy(sources[path], out.fileno(), nbytes - done, offset + done)
            if n <= 0:
                break
            done += n
    except OSError:  # EXDEV, ENOSYS, EINVAL on some file systems: fall back to plain writes
        pass
    return done


def write_checkpoint(prefix: PathLike, result: ConversionResult, epoch: int = 0) -> List[Path]:
    """Write `PREFIX-symbol.json`, `PREFIX-%04d.params`, the sidecar (and mean image), each atomically."""
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    written = []
    params = {f"arg:{k}": v for k, v in result.arg_arrays.items()}
    params.update({f"aux:{k}": v for k, v in result.aux_arrays.items()})
    params_path = Path(f"{prefix}-{epoch:04d}.params")
    save_params(params_path, params)
    written.append(params_path)
    sym_path = Path(f"{prefix}-symbol.json")
    with atomic_path(sym_path) as tmp:
        result.symbol.save(str(tmp))
    written.append(sym_path)
    pre = result.preprocess
    if result.mean_image is not None:
        mean_path = Path(f"{prefix}-mean.npy")
        with atomic_path(mean_path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, result.mean_image.astype(np.float32))
        written.append(mean_path)
        pre.mean = mean_path.name
    written.append(save_sidecar(prefix, pre))
    return written


# ---- CLI ----------------------------------------------------------------------------------------------
def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.caffe_converter",
        description="Convert a Caffe model (prototxt + caffemodel, V1 or current format) into an MXNet checkpoint "
                    "PREFIX-symbol.json + PREFIX-0000.params and a preprocessing sidecar PREFIX-preprocess.json.")
    parser.add_argument("prototxt", help="the deploy prototxt")
    parser.add_argument("caffemodel", help="the binary caffemodel")
    parser.add_argument("prefix", help="output checkpoint prefix (convert_model.py's save_model_name)")
    parser.add_argument("--keep-bgr", action="store_true",
                        help="keep Caffe's BGR input; by default the model is converted to take RGB")
    parser.add_argument("--mean-file", help="Caffe mean.binaryproto, recorded in the sidecar as PREFIX-mean.npy")
    parser.add_argument("--mean", type=_floats,
                        help="per-channel mean in the Caffe model's order (BGR), e.g. 104,117,123")
    parser.add_argument("--std", type=_floats, help="per-channel std in the Caffe model's order (BGR)")
    parser.add_argument("--scale", type=float, help="input scale after mean/std (default: transform_param or 1)")
    parser.add_argument("--output-layer", action="append", metavar="NAME",
                        help="cut the net at this layer or blob (repeat for several outputs)")
    parser.add_argument("--verify", action="store_true",
                        help="compare the outputs with OpenCV's Caffe importer on random input")
    parser.add_argument("--verify-layers", action="store_true", help="compare every layer with OpenCV")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"max relative difference accepted by --verify (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--strict", action="store_true", help="fail instead of skipping training-only layers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every layer")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        result = convert(args.prototxt, args.caffemodel, args.prefix, keep_bgr=args.keep_bgr,
                         mean_file=args.mean_file, mean=args.mean, std=args.std, scale=args.scale,
                         output_layer=args.output_layer, strict=args.strict)
    except (CaffeFormatError, ConversionError, UnsupportedLayerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    pre = result.preprocess
    n_params = sum(int(v.size) for v in result.arg_arrays.values()) + \
        sum(int(v.size) for v in result.aux_arrays.values())
    print(f"converted {args.prototxt} + {args.caffemodel} -> {args.prefix}-symbol.json, {args.prefix}-0000.params "
          f"in {elapsed:.1f} s: {n_params / 1e6:.2f} M parameters, outputs {result.output_blobs}, input "
          f"{pre.input_shape} {pre.channel_order}, mean {pre.mean}, scale {pre.scale}, classifier {pre.classifier} "
          f"({pre.num_classes} classes, fed by {pre.feature_output}); {len(result.skipped)} layer(s) skipped"
          + "".join(f"\n  skipped '{n}' ({t}): {why}" for n, t, why in result.skipped))
    if args.verify or args.verify_layers:
        from tools.verify import verify_conversion  # imports OpenCV only when asked to verify
        report = verify_conversion(args.prototxt, args.caffemodel, result, layers=args.verify_layers,
                                   tolerance=args.tolerance)
        print(report.format())
        if not report.ok:
            print(f"error: verification failed: relative difference above {args.tolerance:g}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
