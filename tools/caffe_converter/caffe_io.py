"""Load a Caffe net (prototxt + caffemodel) into one clean, format-independent description.

Everything format-specific happens here, once:
  * V1 files (`layers { type: CONVOLUTION }`, blobs with num/channels/height/width) become the current
    `layer { type: "Convolution" }` form;
  * inputs declared three ways (`input` + `input_dim`, `input` + `input_shape`, an Input layer) become one
    ordered {name: shape} map;
  * layers excluded from the TEST phase are dropped, training-only layers are skipped with a note;
  * caffemodel weights are matched to prototxt layers by name and become float32 numpy arrays.

The caffemodel is not parsed with protobuf: a VGG16 file holds 138 M floats and protobuf would box each of
them. We walk the wire format over a memory map and take `np.frombuffer` views of the packed float bytes, so
weights are never copied through float64 (or at all, until they become NDArrays).
"""
from __future__ import annotations

import logging
import mmap
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from tools.caffe_converter import caffe_pb2
from tools.caffe_converter.errors import CaffeFormatError
from tools.caffe_converter.text_rules import check_prototxt_text

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


# Layers that only exist for training; a deploy model never needs them.
TRAINING_ONLY_TYPES = frozenset({
    "Data", "ImageData", "HDF5Data", "HDF5Output", "MemoryData", "WindowData", "DummyData", "AnnotatedData",
    "Accuracy", "Silence",
    "SoftmaxWithLoss", "EuclideanLoss", "HingeLoss", "SigmoidCrossEntropyLoss", "InfogainLoss",
    "MultinomialLogisticLoss", "ContrastiveLoss", "MultiBoxLoss",
})

# V1 enum name -> current type string. Caffe's own upgrade table, restated from the format.
V1_TYPE_NAMES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DATA": "Data", "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN", "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}
# V1 layer fields that carry over to LayerParameter unchanged (same message types, same names).
_V1_SHARED_FIELDS = ("include", "exclude", "loss_weight", "transform_param", "loss_param", "accuracy_param",
                     "concat_param", "convolution_param", "data_param", "dropout_param", "eltwise_param",
                     "image_data_param", "memory_data_param", "inner_product_param", "lrn_param", "pooling_param",
                     "power_param", "relu_param", "sigmoid_param", "softmax_param", "slice_param", "tanh_param",
                     "argmax_param", "exp_param", "mvn_param", "threshold_param")


def _copy_shared_fields(src, dst) -> None:
    """Copy the fields V1LayerParameter and LayerParameter share (same names, same messages), either way."""
    for name in _V1_SHARED_FIELDS:
        if name in ("include", "exclude", "loss_weight"):   # repeated fields
            getattr(dst, name).extend(getattr(src, name))
        elif src.HasField(name):
            getattr(dst, name).CopyFrom(getattr(src, name))


@dataclass
class Layer:
    """One Caffe layer in the current format, with its weights.

    Attributes:
        name, type, bottoms, tops: as in the prototxt (V1 enum types already turned into type names).
        param: the LayerParameter message (type-specific settings such as `convolution_param`).
        blobs: the layer's weights from the caffemodel as float32 arrays, in Caffe order and shape.
        fused_scale: a Scale layer folded into this BatchNorm by the converter (its blobs are gamma/beta).
        folded_into: set on that Scale layer: the BatchNorm that now computes its output.
        is_net_output: one of this layer's tops is an output of the converted net.
        unused_weights: when the layer got no weights, the caffemodel layers nobody claimed (for the error).
    """

    name: str
    type: str
    bottoms: List[str]
    tops: List[str]
    param: caffe_pb2.LayerParameter
    blobs: List[np.ndarray] = field(default_factory=list)
    fused_scale: Optional["Layer"] = None
    folded_into: Optional[str] = None
    is_net_output: bool = False
    unused_weights: Tuple[str, ...] = ()  # set when this layer got no weights: the caffemodel's unclaimed ones
    caffe_name: str = ""  # the prototxt's name when `name` was made unique (a later layer of a repeated name)


@dataclass
class CaffeNet:
    """A whole net: ordered inputs, the layers to convert, and what was left out."""

    name: str
    inputs: Dict[str, Tuple[int, ...]]
    layers: List[Layer]
    prototxt: str
    caffemodel: Optional[str] = None
    format: str = "v2"
    transform: Optional[caffe_pb2.TransformationParameter] = None
    transform_layer: str = ""  # the data layer the transform_param comes from
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)  # (layer name, type, why)
    unused_weights: List[str] = field(default_factory=list)  # caffemodel layers the prototxt does not define


# ---- prototxt -------------------------------------------------------------------------------------------
def read_prototxt(path: PathLike) -> caffe_pb2.NetParameter:
    """Parse a prototxt (V1 or current format) into a NetParameter whose layers are all in `layer`.

    Caffe's own parser rules apply (text_rules.py): an unknown field, an undefined enum value or a value of the
    wrong type is a one-line error listing every such setting with its layer and line. The parameters of
    layer types we do not convert (PriorBox's, for example) are accepted and have no effect.
    """
    return _parse_prototxt(path)[0]


def _parse_prototxt(path: PathLike) -> Tuple[caffe_pb2.NetParameter, str]:
    """read_prototxt, plus the format the file was written in ("v1" or "v2")."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise CaffeFormatError(f"{path}: cannot read prototxt ({err.strerror})") from None
    problems, truncated = check_prototxt_text(text, path)
    if truncated:
        raise CaffeFormatError(truncated)
    if problems:
        raise CaffeFormatError(f"{path}: Caffe's parser refuses {len(problems)} setting(s): " + "; ".join(
            p[len(path) + 1:] if p.startswith(path + ":") else p for p in problems))
    net = caffe_pb2.NetParameter()
    try:  # unknown fields left by now are other layer types' parameters (text_rules.OTHER_CAFFE_PARAMS)
        text_format.Parse(text, net, allow_unknown_field=True)
    except text_format.ParseError as err:
        raise CaffeFormatError(_syntax_error(path, text, err)) from None
    if net.layers and net.layer:
        raise CaffeFormatError(f"{path}: mixes V1 `layers {{}}` and current `layer {{}}` entries; use one format")
    if not net.layers:
        return net, "v2"
    upgraded = [v1_to_v2(v1, path) for v1 in net.layers]
    del net.layers[:]
    net.layer.extend(upgraded)
    return net, "v1"


def _syntax_error(path: str, text: str, err: "text_format.ParseError") -> str:
    """protobuf's parse error as one line naming the file, line and column (without its copy of the line)."""
    line, col = err.GetLine(), err.GetColumn()
    message = str(err).split(" : ", 1)[-1] if line is not None else str(err)
    lines = text.splitlines()
    if line is not None and 0 < line <= len(lines):
        quoted = f"'{lines[line - 1]}': "
        message = message[len(quoted):] if message.startswith(quoted) else message
    where = f"{path}:{line}: not a valid Caffe prototxt at column {col}" if line is not None else \
        f"{path}: not a valid Caffe prototxt"
    return f"{where}: {' '.join(message.split())[:200]}"


def v1_to_v2(v1: caffe_pb2.V1LayerParameter, where: str = "prototxt") -> caffe_pb2.LayerParameter:
    """Turn one V1 `layers {}` entry into a current `layer {}` entry (blobs included)."""
    layer = caffe_pb2.LayerParameter()
    layer.name = v1.name
    type_enum = caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)
    layer.type = V1_TYPE_NAMES.get(type_enum, type_enum)
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    _copy_shared_fields(v1, layer)
    layer.blobs.extend(v1.blobs)
    return layer


def in_test_phase(layer: caffe_pb2.LayerParameter) -> bool:
    """Caffe's NetStateRule filter for the TEST phase (levels and stages are not used by deploy nets)."""
    if layer.HasField("phase") and layer.phase != caffe_pb2.TEST:
        return False
    if layer.include:
        return any(not rule.HasField("phase") or rule.phase == caffe_pb2.TEST for rule in layer.include)
    return not any(not rule.HasField("phase") or rule.phase == caffe_pb2.TEST for rule in layer.exclude)


def _net_inputs(net: caffe_pb2.NetParameter, path: str) -> Dict[str, Tuple[int, ...]]:
    """Inputs declared at net level: `input` + `input_dim` or `input` + `input_shape`."""
    inputs: Dict[str, Tuple[int, ...]] = {}
    if not net.input:
        if net.input_dim or net.input_shape:
            raise CaffeFormatError(f"{path}: input_dim/input_shape given without an `input:` name")
        return inputs
    if net.input_shape:
        if len(net.input_shape) != len(net.input):
            raise CaffeFormatError(f"{path}: {len(net.input)} inputs but {len(net.input_shape)} input_shape entries")
        for name, shape in zip(net.input, net.input_shape):
            inputs[name] = tuple(int(d) for d in shape.dim)
    elif net.input_dim:
        if len(net.input_dim) != 4 * len(net.input):
            raise CaffeFormatError(f"{path}: {len(net.input)} inputs need {4 * len(net.input)} input_dim values "
                                   f"(num, channels, height, width each), got {len(net.input_dim)}")
        for i, name in enumerate(net.input):
            inputs[name] = tuple(int(d) for d in net.input_dim[4 * i:4 * i + 4])
    else:
        raise CaffeFormatError(f"{path}: input {list(net.input)} has no shape; add input_shape {{ dim: ... }}")
    return inputs


# ---- caffemodel: a wire-format walk over a memory map ---------------------------------------------------
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


class _Truncated(Exception):
    pass


def _varint(buf, pos: int, end: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Truncated(pos)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError(f"varint too long at byte {pos}")


def _fields(buf, pos: int, end: int) -> Iterator[Tuple[int, int, int, int]]:
    """Yield (field number, wire type, value-or-start, stop) for each field of a message in buf[pos:end]."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecodeError(f"field number 0 at byte {pos}")
        if wire == _WIRE_VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
        elif wire == _WIRE_LEN:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Truncated(pos)
            yield number, wire, pos, pos + length
            pos += length
        elif wire == _WIRE_I32:
            if pos + 4 > end:
                raise _Truncated(pos)
            yield number, wire, pos, pos + 4
            pos += 4
        elif wire == _WIRE_I64:
            if pos + 8 > end:
                raise _Truncated(pos)
            yield number, wire, pos, pos + 8
            pos += 8
        else:
            raise DecodeError(f"unsupported wire type {wire} at byte {pos}")


def _packed_varints(buf, start: int, stop: int) -> List[int]:
    values = []
    while start < stop:
        value, start = _varint(buf, start, stop)
        values.append(value)
    return values


def _parse_blob(buf, start: int, stop: int) -> np.ndarray:
    """A BlobProto as a float32 array in its stored shape (a view of buf when the data is packed floats)."""
    shape: Optional[List[int]] = None
    legacy = [0, 0, 0, 0]
    has_legacy = False
    chunks: List[np.ndarray] = []
    for number, wire, a, b in _fields(buf, start, stop):
        if number == 5:                       # repeated float data
            if wire == _WIRE_LEN:
                if (b - a) % 4:
                    raise DecodeError(f"float data of {b - a} bytes at byte {a}")
                chunks.append(np.frombuffer(buf, dtype="<f4", count=(b - a) // 4, offset=a))
            elif wire == _WIRE_I32:           # an unpacked writer: one float per field
                chunks.append(np.frombuffer(buf, dtype="<f4", count=1, offset=a))
        elif number == 8:                     # repeated double double_data: narrowed once, to float32
            if wire == _WIRE_LEN:
                chunks.append(np.frombuffer(buf, dtype="<f8", count=(b - a) // 8, offset=a).astype(np.float32))
            elif wire == _WIRE_I64:
                chunks.append(np.frombuffer(buf, dtype="<f8", count=1, offset=a).astype(np.float32))
        elif number == 7 and wire == _WIRE_LEN:  # BlobShape
            shape = []
            for n2, w2, a2, b2 in _fields(buf, a, b):
                if n2 == 1:
                    shape.extend(_packed_varints(buf, a2, b2) if w2 == _WIRE_LEN else [a2])
            shape = [v - (1 << 64) if v >= 1 << 63 else v for v in shape]
        elif 1 <= number <= 4 and wire == _WIRE_VARINT:
            legacy[number - 1] = a
            has_legacy = True
    if len(chunks) == 1:
        data = chunks[0]
    elif chunks:
        data = np.concatenate(chunks)
    else:
        data = np.zeros(0, np.float32)
    if shape is None:
        shape = legacy if has_legacy else [data.size]
    if int(np.prod(shape, dtype=np.int64)) != data.size:
        raise DecodeError(f"blob shape {shape} does not match its {data.size} values")
    return data.reshape(shape)


# Memory maps of the caffemodels read so far: (start address, size, path, weak reference to the map). The
# params writer asks `file_region` whether an array is still an untouched view of a file, and then lets the
# kernel copy those bytes (copy_file_range) instead of paging the weights in and writing them out again.
_MAPS: List[Tuple[int, int, str, "weakref.ref"]] = []


def _register_map(buf: mmap.mmap, path: str) -> None:
    start = np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]
    _MAPS[:] = [m for m in _MAPS if m[3]() is not None]
    _MAPS.append((start, len(buf), path, weakref.ref(buf)))


def file_region(arr: np.ndarray) -> Optional[Tuple[str, int]]:
    """(caffemodel path, byte offset) when `arr` is a contiguous little-endian float32 view of a mapped file."""
    if arr.dtype != np.dtype("<f4") or not arr.flags.c_contiguous or arr.size == 0:
        return None
    address = arr.__array_interface__["data"][0]
    for start, size, path, ref in _MAPS:
        if ref() is not None and start <= address and address + arr.nbytes <= start + size:
            return path, address - start
    return None


@dataclass
class _ModelLayer:
    name: str
    type: str
    blobs: List[np.ndarray]


def read_caffemodel(path: PathLike) -> Dict[str, _ModelLayer]:
    """Read the weights of a binary caffemodel (V1 or current) as {layer name: layer}.

    The arrays are read-only views into a memory map of the file; nothing is copied for packed float data.
    A truncated or corrupt file raises CaffeFormatError naming the file and the last layer read.
    """
    path = str(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise CaffeFormatError(f"{path}: empty file, not a caffemodel")
            buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise CaffeFormatError(f"{path}: cannot read caffemodel ({err.strerror})") from None
    _register_map(buf, os.path.abspath(path))
    layers: Dict[str, _ModelLayer] = {}
    current = "<start of file>"
    try:
        for number, wire, a, b in _fields(buf, 0, size):
            if wire != _WIRE_LEN or number not in (2, 100):
                continue
            v1 = number == 2
            name, type_name, blobs = "", "", []
            for n2, w2, a2, b2 in _fields(buf, a, b):
                if v1 and n2 == 1 and w2 == _WIRE_LEN:
                    raise CaffeFormatError(f"{path}: V0 layer format (2014 and older); upgrade it with Caffe's "
                                           f"upgrade_net_proto_binary first")
                if n2 == (4 if v1 else 1) and w2 == _WIRE_LEN:
                    name = bytes(buf[a2:b2]).decode("utf-8", errors="replace")
                    current = name
                elif n2 == (5 if v1 else 2):
                    if v1 and w2 == _WIRE_VARINT:
                        enum_name = caffe_pb2.V1LayerParameter.LayerType.Name(a2) \
                            if a2 in caffe_pb2.V1LayerParameter.LayerType.values() else str(a2)
                        type_name = V1_TYPE_NAMES.get(enum_name, enum_name)
                    elif w2 == _WIRE_LEN:
                        type_name = bytes(buf[a2:b2]).decode("utf-8", errors="replace")
                elif n2 == (6 if v1 else 7) and w2 == _WIRE_LEN:
                    blobs.append((a2, b2))
            parsed = []
            for i, (a2, b2) in enumerate(blobs):
                try:
                    parsed.append(_parse_blob(buf, a2, b2))
                except DecodeError as err:
                    raise CaffeFormatError(f"{path}: layer '{name}' blob {i} is corrupt ({err})") from None
            if name in layers and (layers[name].blobs or parsed):
                raise CaffeFormatError(f"{path}: two layers named '{name}' carry weights: Caffe would copy both into "
                                       f"the first layer of that name (the later overwriting the earlier) and leave "
                                       f"the later layer at its filler values; give the layers unique names")
            layers[name] = _ModelLayer(name, type_name, parsed)
    except _Truncated as err:
        raise CaffeFormatError(f"{path}: truncated or corrupt caffemodel (data ends early at byte {err.args[0]} "
                               f"of {size}, after layer '{current}')") from None
    except DecodeError as err:
        raise CaffeFormatError(f"{path}: not a valid caffemodel ({err}; last layer read: '{current}')") from None
    if not layers:
        raise CaffeFormatError(f"{path}: no layers found; is this a caffemodel (binary NetParameter)?")
    return layers


def read_mean_binaryproto(path: PathLike) -> np.ndarray:
    """Read a Caffe mean file (a BlobProto, usually 1 x C x H x W, BGR) as a float32 (C, H, W) array."""
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise CaffeFormatError(f"{path}: cannot read mean file ({err.strerror})") from None
    try:
        blob = _parse_blob(data, 0, len(data))
    except (DecodeError, _Truncated) as err:
        raise CaffeFormatError(f"{path}: not a valid mean.binaryproto ({err})") from None
    if blob.size == 0:
        raise CaffeFormatError(f"{path}: mean file holds no values")
    if blob.ndim == 4 and blob.shape[0] == 1:
        blob = blob[0]
    if blob.ndim != 3:
        raise CaffeFormatError(f"{path}: mean blob has shape {blob.shape}; expected 1 x C x H x W")
    return np.array(blob, dtype=np.float32)


# ---- the whole net --------------------------------------------------------------------------------------
# Data layers that can declare a deploy net's input: used only when nothing else declares one (a train_val file,
# or a deploy file that states its shape in a MemoryData layer, as some VGG16 releases do).
DATA_INPUT_TYPES = ("MemoryData", "ImageData", "Data")


def data_layer_shape(lp: caffe_pb2.LayerParameter) -> Optional[Tuple[int, ...]]:
    """The shape of a data layer's first top as its settings state it, or None where Caffe reads it from the data.

    MemoryData: batch_size x channels x height x width (all four given). ImageData: batch_size x (3, or 1 with
    is_color: false) x the transform's crop_size, else new_height x new_width. Data: never (the channels and
    image size come from its database; give them with --input-shape).
    """
    crop = int(lp.transform_param.crop_size) if lp.HasField("transform_param") else 0
    if lp.type == "MemoryData":
        p = lp.memory_data_param
        dims = (p.batch_size, p.channels, p.height, p.width)
        return tuple(int(d) for d in dims) if all(dims) else None
    if lp.type == "ImageData":
        p = lp.image_data_param
        height, width = (crop, crop) if crop else (int(p.new_height), int(p.new_width))
        return (int(p.batch_size) or 1, 3 if p.is_color else 1, height, width) if height and width else None
    return None


def _unique_names(layers: Sequence[caffe_pb2.LayerParameter], path: str) -> List[str]:
    """Each layer's name, later layers of a repeated name numbered `name_1`, `name_2`, ... as OpenCV names them.

    Caffe accepts repeated layer names (HED has two layers named `crop`): blobs, not layer names, wire the net.
    MXNet needs unique operator and parameter names, so the later ones are renamed, with one warning.
    """
    taken = {lp.name for lp in layers}
    seen: Dict[str, int] = {}
    out = []
    for lp in layers:
        count = seen.get(lp.name, 0)
        seen[lp.name] = count + 1
        name = lp.name
        while count and (name == lp.name or name in taken):
            name = f"{lp.name}_{count}"
            count += 1
        taken.add(name)
        out.append(name)
    repeated = sorted(n for n, c in seen.items() if c > 1)
    if repeated:
        log.warning("%s: layer name(s) %s are used more than once; Caffe accepts this (blobs wire the net) and "
                    "so does the converter, which calls the later ones %s", path, ", ".join(repeated),
                    ", ".join(n for n, lp in zip(out, layers) if n != lp.name))
    return out


def _apply_input_shapes(inputs: Dict[str, Optional[Tuple[int, ...]]], given: Dict[str, Sequence[int]],
                        path: str) -> None:
    """--input-shape NAME=N,C,H,W: replace a declared input's shape (a net declared at 1x1 and reshaped at run
    time, as OpenPose); a name that is not an input is an error listing the inputs."""
    for name, shape in given.items():
        if name not in inputs:
            raise CaffeFormatError(f"{path}: --input-shape names '{name}', which is not an input of the net; its "
                                   f"inputs: {', '.join(inputs) or 'none'}")
        old = inputs[name]
        if old is not None and len(old) != len(shape):
            raise CaffeFormatError(f"{path}: --input-shape {name}={','.join(map(str, shape))} has {len(shape)} "
                                   f"axes; the net declares {name} with {len(old)}: {old}")
        inputs[name] = tuple(int(d) for d in shape)


def load_net(prototxt: PathLike, caffemodel: Optional[PathLike] = None,
             input_shapes: Optional[Dict[str, Sequence[int]]] = None) -> CaffeNet:
    """Load prototxt (+ caffemodel weights) into a CaffeNet.

    Args:
        prototxt: the deploy (or train_val) prototxt, V1 or current format.
        caffemodel: the binary weights; None loads the structure only (every layer gets no blobs).
        input_shapes: {input name: shape} replacing declared input shapes (`--input-shape`).

    Raises:
        CaffeFormatError: unreadable files, no input shape, weights for a layer the prototxt lacks.
    """
    net, fmt = _parse_prototxt(prototxt)
    prototxt = str(prototxt)
    inputs = _net_inputs(net, prototxt)
    data_inputs: Dict[str, Optional[Tuple[int, ...]]] = {}  # declared by data layers (used if nothing else is)
    data_layers: Dict[str, Tuple[str, str]] = {}  # top -> (layer name, type)
    layers: List[Layer] = []
    skipped: List[Tuple[str, str, str]] = []
    transform = fallback_transform = None  # (layer name, transform_param)
    for lp, name in zip(net.layer, _unique_names(net.layer, prototxt)):
        if lp.HasField("transform_param"):  # the TEST data layer's preprocessing wins over the TRAIN one's
            if in_test_phase(lp) and transform is None:
                transform = (lp.name, lp.transform_param)
            elif fallback_transform is None:
                fallback_transform = (lp.name, lp.transform_param)
        if not in_test_phase(lp):
            skipped.append((lp.name, lp.type, "not part of the TEST phase"))
            continue
        if lp.type == "Input":
            shapes = [tuple(int(d) for d in s.dim) for s in lp.input_param.shape]
            if len(shapes) == 1 and len(lp.top) > 1:
                shapes = shapes * len(lp.top)
            if len(shapes) != len(lp.top):
                raise CaffeFormatError(f"{prototxt}: Input layer '{lp.name}' has {len(lp.top)} tops but "
                                       f"{len(shapes)} shapes")
            for top, shape in zip(lp.top, shapes):
                inputs[top] = shape
            continue
        if lp.type in DATA_INPUT_TYPES and lp.top and lp.top[0] not in data_inputs:
            data_inputs[lp.top[0]] = data_layer_shape(lp)
            data_layers[lp.top[0]] = (lp.name, lp.type)
        if lp.type in TRAINING_ONLY_TYPES:
            skipped.append((lp.name, lp.type, "training-only layer"))
            continue
        layers.append(Layer(name, lp.type, list(lp.bottom), list(lp.top), lp, [_blob_array(b) for b in lp.blobs],
                            caffe_name=lp.name if name != lp.name else ""))
    if not inputs and data_inputs:  # the data layers declare the inputs (they are not skipped then)
        inputs = data_inputs
        declaring = {layer_name for layer_name, _ in data_layers.values()}
        skipped = [row for row in skipped if row[0] not in declaring]
    _apply_input_shapes(inputs, dict(input_shapes or {}), prototxt)
    unstated = [blob for blob, shape in inputs.items() if shape is None]
    if unstated:
        layer_name, type_name = data_layers[unstated[0]]
        raise CaffeFormatError(f"{prototxt}: data layer '{layer_name}' ({type_name}) does not state the shape of "
                               f"'{unstated[0]}' (Caffe reads it from the data); give it with --input-shape "
                               f"{unstated[0]}=N,C,H,W")
    if not inputs:
        raise CaffeFormatError(f"{prototxt}: no input shape declared; add `input: \"data\"` with "
                               f"`input_shape {{ dim: 1 dim: 3 dim: 224 dim: 224 }}` or an Input layer")
    chosen = transform or fallback_transform
    result = CaffeNet(net.name, inputs, layers, prototxt, format=fmt, transform=chosen[1] if chosen else None,
                      transform_layer=chosen[0] if chosen else "", skipped=skipped)
    for name, type_name, why in skipped:
        log.info("skipping layer '%s' (%s): %s", name, type_name, why)
    if caffemodel is not None:
        attach_weights(result, read_caffemodel(caffemodel), str(caffemodel))
    return result


def _blob_array(blob: caffe_pb2.BlobProto) -> np.ndarray:
    """Weights stored inline in a prototxt (rare) as float32 arrays."""
    data = np.asarray(blob.data if len(blob.data) else blob.double_data, dtype=np.float32)
    shape = list(blob.shape.dim) if blob.HasField("shape") else [blob.num, blob.channels, blob.height, blob.width]
    return data.reshape(shape) if int(np.prod(shape)) == data.size else data


def attach_weights(net: CaffeNet, model: Dict[str, _ModelLayer], where: str) -> None:
    """Give each prototxt layer the caffemodel blobs of the same name.

    Weights for layers the prototxt does not define are ignored, as Caffe's Net::CopyTrainedLayersFrom does
    (MTCNN det2's `conv5-3`, GoogLeNet's training-only loss branches): listed in `net.unused_weights` and in
    one warning line; `--strict` makes them an error. A layer that needs weights and finds none is then told
    which unused ones there are (a renamed layer).
    """
    by_name = {layer.name: layer for layer in net.layers}
    skipped = {name for name, _, _ in net.skipped}
    net.unused_weights = [name for name, ml in model.items()
                          if ml.blobs and name not in by_name and name not in skipped]
    if net.unused_weights:
        log.warning("%s: ignoring weights of %d layer(s) that %s does not define: %s", where,
                    len(net.unused_weights), net.prototxt, ", ".join(net.unused_weights))
    for layer in net.layers:
        if layer.name in model and model[layer.name].blobs:
            layer.blobs = model[layer.name].blobs
        else:
            layer.unused_weights = tuple(net.unused_weights)


# ---- writing (tests, benchmarks, re-encoding between formats) -------------------------------------------
_V1_TYPE_ENUMS = {v: k for k, v in V1_TYPE_NAMES.items() if v}


def to_v1(layer: caffe_pb2.LayerParameter) -> caffe_pb2.V1LayerParameter:
    """The V1 `layers {}` form of a current-format layer (without blobs). Types V1 lacks are an error."""
    if layer.type not in _V1_TYPE_ENUMS:
        raise CaffeFormatError(f"layer '{layer.name}': type {layer.type} has no V1 encoding")
    v1 = caffe_pb2.V1LayerParameter()
    v1.name = layer.name
    v1.type = caffe_pb2.V1LayerParameter.LayerType.Value(_V1_TYPE_ENUMS[layer.type])
    v1.bottom.extend(layer.bottom)
    v1.top.extend(layer.top)
    _copy_shared_fields(layer, v1)
    for name, _ in layer.ListFields():
        if name.name.endswith("_param") and name.name not in _V1_SHARED_FIELDS:
            raise CaffeFormatError(f"layer '{layer.name}': {name.name} has no V1 encoding")
    return v1


def _enc_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _enc_len(number: int, length: int) -> bytes:
    return _enc_varint(number << 3 | _WIRE_LEN) + _enc_varint(length)


def _blob_header(arr: np.ndarray, v1: bool) -> bytes:
    if v1:  # V1 blobs carry a 4-D num/channels/height/width shape, padded with leading 1s
        dims = (1,) * (4 - arr.ndim) + tuple(arr.shape) if arr.ndim <= 4 else None
        if dims is None:
            raise CaffeFormatError(f"a {arr.ndim}-D blob has no V1 encoding")
        head = b"".join(_enc_varint(n << 3 | _WIRE_VARINT) + _enc_varint(int(d)) for n, d in zip((1, 2, 3, 4), dims))
    else:
        shape = caffe_pb2.BlobShape(dim=[int(d) for d in arr.shape]).SerializeToString()
        head = _enc_len(7, len(shape)) + shape
    return head + _enc_len(5, arr.size * 4)


def write_caffemodel(path: PathLike, net: caffe_pb2.NetParameter, blobs: Dict[str, Sequence[np.ndarray]],
                     v1: bool = False) -> None:
    """Write a binary caffemodel: the layers of `net` (current format) with `blobs` {layer name: arrays}.

    Weights are streamed from the arrays' buffers (a 553 MB VGG16 never exists as protobuf floats).
    With v1=True the layers are written as V1 `layers {}` entries with 4-D legacy blob shapes.
    """
    head = caffe_pb2.NetParameter()
    head.CopyFrom(net)
    del head.layer[:]
    del head.layers[:]
    with open(path, "wb") as out:
        out.write(head.SerializeToString())
        for layer in net.layer:
            bare = caffe_pb2.LayerParameter()
            bare.CopyFrom(layer)
            del bare.blobs[:]
            body = (to_v1(bare) if v1 else bare).SerializeToString()
            arrays = [np.ascontiguousarray(a, dtype="<f4") for a in blobs.get(layer.name, ())]
            parts = []
            for arr in arrays:
                header = _blob_header(arr, v1)
                parts.append((header, arr))
            blob_field = 6 if v1 else 7
            total = len(body) + sum(len(_enc_len(blob_field, len(h) + a.nbytes)) + len(h) + a.nbytes
                                    for h, a in parts)
            out.write(_enc_len(2 if v1 else 100, total))
            out.write(body)
            for header, arr in parts:
                out.write(_enc_len(blob_field, len(header) + arr.nbytes))
                out.write(header)
                out.write(memoryview(arr).cast("B"))


def write_prototxt(path: PathLike, net: caffe_pb2.NetParameter, v1: bool = False) -> None:
    """Write the structure of `net` (no blobs) as prototxt text, in V1 or current format."""
    text_net = caffe_pb2.NetParameter()
    text_net.CopyFrom(net)
    del text_net.layer[:]
    del text_net.layers[:]
    for layer in net.layer:
        bare = caffe_pb2.LayerParameter()
        bare.CopyFrom(layer)
        del bare.blobs[:]
        if v1:
            text_net.layers.append(to_v1(bare))
        else:
            text_net.layer.append(bare)
    Path(path).write_text(text_format.MessageToString(text_net), encoding="utf-8")
