"""Caffe nets generated in code (prototxt + caffemodel written through our own caffe_pb2), seeded weights.

Used by the converter tests and by other areas' tests that need a converted checkpoint:

    from tests._caffe_nets import make_tiny_vgg
    prototxt, caffemodel = make_tiny_vgg(tmp_path, num_classes=3, input_size=32)
    result = tools.caffe_converter.convert(prototxt, caffemodel, tmp_path / "vgg")   # checkpoint + sidecar
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from google.protobuf import text_format

from tools.caffe_converter import caffe_pb2
from tools.caffe_converter.caffe_io import write_caffemodel, write_prototxt

INPUT_STYLES = ("input_shape", "input_dim", "layer")


class NetBuilder:
    """Build a Caffe net layer by layer; `write` emits it in V1 or current format.

    Layer settings are given as prototxt text (`"convolution_param { num_output: 4 kernel_size: 3 }"`), so
    tests read like the prototxt they produce.
    """

    def __init__(self, name: str = "net", seed: int = 0):
        self.net = caffe_pb2.NetParameter(name=name)
        self.blobs: Dict[str, List[np.ndarray]] = {}
        self.rng = np.random.default_rng(seed)
        self.inputs: List[Tuple[str, Tuple[int, ...]]] = []

    def input(self, name: str, shape: Sequence[int]) -> "NetBuilder":
        self.inputs.append((name, tuple(int(d) for d in shape)))
        return self

    def rand(self, *shape: int, scale: Optional[float] = None, positive: bool = False) -> np.ndarray:
        """Seeded random weights; the default scale keeps activations O(1) (He-style for fan-in)."""
        if scale is None:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            scale = float(np.sqrt(2.0 / max(fan_in, 1)))
        values = self.rng.standard_normal(shape).astype(np.float32) * scale
        return np.abs(values) + 0.5 if positive else values

    def layer(self, name: str, type_name: str, bottoms: Sequence[str] = (), tops: Optional[Sequence[str]] = None,
              params: str = "", blobs: Sequence[np.ndarray] = ()) -> caffe_pb2.LayerParameter:
        layer = self.net.layer.add(name=name, type=type_name)
        layer.bottom.extend(bottoms)
        layer.top.extend([name] if tops is None else tops)
        if params:
            text_format.Merge(params, layer)
        if blobs:
            self.blobs[name] = [np.asarray(b, np.float32) for b in blobs]
        return layer

    def build(self, input_style: str = "input_shape") -> caffe_pb2.NetParameter:
        """The NetParameter with the inputs declared in one of the three Caffe ways."""
        if input_style not in INPUT_STYLES:
            raise ValueError(f"input_style must be one of {INPUT_STYLES}")
        net = caffe_pb2.NetParameter()
        net.CopyFrom(self.net)
        if input_style == "layer":
            layers = list(net.layer)
            del net.layer[:]
            for name, shape in self.inputs:
                lp = net.layer.add(name=name, type="Input")
                lp.top.append(name)
                lp.input_param.shape.add(dim=shape)
            net.layer.extend(layers)
        else:
            for name, shape in self.inputs:
                net.input.append(name)
                if input_style == "input_shape":
                    net.input_shape.add(dim=shape)
                else:
                    net.input_dim.extend(shape)
        return net

    def write(self, dirpath, stem: str = "net", fmt: str = "v2",
              input_style: Optional[str] = None) -> Tuple[Path, Path]:
        """Write `<stem>.prototxt` and `<stem>.caffemodel`; fmt 'v1' uses `layers {}` and 4-D blob shapes."""
        if fmt not in ("v1", "v2"):
            raise ValueError("fmt must be 'v1' or 'v2'")
        style = input_style or ("input_dim" if fmt == "v1" else "input_shape")
        if fmt == "v1" and style == "layer":
            raise ValueError("V1 nets have no Input layer; use input_dim or input_shape")
        dirpath = Path(dirpath)
        dirpath.mkdir(parents=True, exist_ok=True)
        net = self.build(style)
        prototxt, caffemodel = dirpath / f"{stem}.prototxt", dirpath / f"{stem}.caffemodel"
        write_prototxt(prototxt, net, v1=fmt == "v1")
        write_caffemodel(caffemodel, net, self.blobs, v1=fmt == "v1")
        return prototxt, caffemodel


# ---- VGG ---------------------------------------------------------------------------------------------
VGG16_BLOCKS = (2, 2, 3, 3, 3)  # convolutions per block, as in VGG_ILSVRC_16_layers


def vgg16_builder(num_classes: int = 1000, input_size: int = 224, widths: Sequence[int] = (64, 128, 256, 512, 512),
                  fc_width: int = 4096, seed: int = 0, softmax: bool = True, rand=None) -> NetBuilder:
    """VGG16 with Caffe's layer names (conv1_1 .. fc8, prob); widths and fc size can be reduced.

    `rand(builder, *shape)` makes the weights (default: seeded He-scaled normal).
    """
    b = NetBuilder("VGG_ILSVRC_16_layers", seed=seed)
    make = rand or (lambda builder, *shape: builder.rand(*shape))
    b.input("data", (1, 3, input_size, input_size))
    bottom, channels, size = "data", 3, input_size
    for block, (convs, width) in enumerate(zip(VGG16_BLOCKS, widths), start=1):
        for j in range(1, convs + 1):
            name = f"conv{block}_{j}"
            b.layer(name, "Convolution", [bottom], params=f"convolution_param {{ num_output: {width} pad: 1 "
                    f"kernel_size: 3 }}", blobs=[make(b, width, channels, 3, 3), make(b, width) * 0.1])
            b.layer(f"relu{block}_{j}", "ReLU", [name], [name])
            bottom, channels = name, width
        b.layer(f"pool{block}", "Pooling", [bottom], params="pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
        bottom, size = f"pool{block}", -(-size // 2)
    fan_in = channels * size * size
    for name, n_in, n_out in (("fc6", fan_in, fc_width), ("fc7", fc_width, fc_width), ("fc8", fc_width, num_classes)):
        b.layer(name, "InnerProduct", [bottom], params=f"inner_product_param {{ num_output: {n_out} }}",
                blobs=[make(b, n_out, n_in), make(b, n_out) * 0.1])
        bottom = name
        if name != "fc8":
            idx = name[2:]
            b.layer(f"relu{idx}", "ReLU", [name], [name])
            b.layer(f"drop{idx}", "Dropout", [name], [name], params="dropout_param { dropout_ratio: 0.5 }")
    if softmax:
        b.layer("prob", "Softmax", ["fc8"])
    return b


def make_tiny_vgg(dirpath, num_classes: int = 4, input_size: int = 32, fmt: str = "v2",
                  widths: Sequence[int] = (4, 8, 16, 16, 16), fc_width: int = 32, seed: int = 0,
                  input_style: Optional[str] = None) -> Tuple[Path, Path]:
    """A reduced-width VGG16 (same 16 weight layers and names as Caffe's VGG16) written to `dirpath`.

    Returns (prototxt, caffemodel). Converting it gives classifier 'fc8', feature output 'drop7_output',
    SoftmaxOutput 'prob', BGR mean none (set one with convert(..., mean=...)).
    """
    builder = vgg16_builder(num_classes=num_classes, input_size=input_size, widths=widths, fc_width=fc_width,
                            seed=seed)
    return builder.write(dirpath, stem=f"tiny_vgg_{fmt}", fmt=fmt, input_style=input_style)
