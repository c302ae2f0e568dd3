"""Graph passes over a loaded CaffeNet, each following the blob wiring, never layer names.

A value is ("in", name) for a net input or (layer index, top index) for a layer's output; `reads[i]` lists the
values layer i reads (graph.wire builds it). The passes run in this order:

  select_outputs  which values the converted symbol returns (the net's unread tops, or --output-layer's cut)
  needed          the layers those outputs depend on
  fold_scales     a Scale that alone reads a BatchNorm's output is computed by that BatchNorm
  swap_to_rgb     the layers reading the BGR image get their channel weights reversed (unless --keep-bgr)
  final_checks    parameter names equal the symbol's arguments, every shape equals MXNet's inference

The first three only read the net and return their findings. swap_to_rgb reorders the blobs of the layers
it names, in place, through channel_flips (copying a VGG16's weights to stay pure would double the peak memory).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tools.caffe_converter.caffe_io import CaffeNet
from tools.caffe_converter.channel_flips import INPUT_CHANNEL_FLIPS, SHAPE_ONLY_BOTTOMS
from tools.caffe_converter.errors import CaffeFormatError, ConversionError

log = logging.getLogger(__name__)

Value = Tuple  # ("in", name) for a net input, (layer index, top index) for a layer output
Reads = List[List[Value]]

# Layers whose reordering needs weights: a caffemodel without them is named before any reordering happens.
_WEIGHTED_READERS = ("BatchNorm", "Scale", "Bias", "PReLU", "Convolution", "Deconvolution", "InnerProduct")


def select_outputs(net: CaffeNet, reads: Reads, env: Dict[str, Value],
                   output_layer: Optional[Sequence[str]]) -> List[Tuple[str, Value]]:
    """The (name, value) pairs the converted symbol returns, in order.

    Without `output_layer`: every top no later layer reads (and no later layer overwrites in place).
    With it: each name is a layer (its first top at that point of the net) or a blob (its final value).
    """
    if output_layer:
        return [_cut_point(net, env, name) for name in output_layer]
    consumed = {v for row in reads for v in row}
    outputs = []
    for i, layer in enumerate(net.layers):
        for k, top in enumerate(layer.tops):
            if (i, k) not in consumed and env.get(top) == (i, k):
                outputs.append((top, (i, k)))
    if not outputs:
        raise ConversionError(f"{net.prototxt}: the net has no output blob")
    return outputs


def _cut_point(net: CaffeNet, env: Dict[str, Value], name: str) -> Tuple[str, Value]:
    """A layer's first top, a blob's final value, or a net input (the empty cut: the model returns its input)."""
    if name in net.inputs:
        return name, ("in", name)
    names = {layer.name: i for i, layer in enumerate(net.layers)}
    if name in names and net.layers[names[name]].tops:
        return name, (names[name], 0)
    if name in env and env[name][0] != "in":
        return name, env[name]
    raise ConversionError(f"{net.prototxt}: --output-layer '{name}' is neither a layer, a blob nor an input of the "
                          f"net (inputs: {list(net.inputs)}, last layers: {[l.name for l in net.layers[-5:]]})")


def needed(reads: Reads, outputs: Sequence[Tuple[str, Value]]) -> List[int]:
    """Indices of the layers the outputs depend on, in net order."""
    need, stack = set(), [v for _, v in outputs]
    while stack:
        v = stack.pop()
        if v[0] == "in" or v[0] in need:
            continue
        need.add(v[0])
        stack.extend(reads[v[0]])
    return sorted(need)


def fold_scales(net: CaffeNet, reads: Reads, order: Sequence[int],
                outputs: Sequence[Tuple[str, Value]]) -> List[Tuple[int, int]]:
    """(BatchNorm index, Scale index) pairs where a per-channel Scale is the only reader of the BatchNorm.

    The BatchNorm's output must not itself be a net output (it would then have to exist unscaled).
    """
    out_values = {v for _, v in outputs}
    readers: Dict[Value, List[int]] = {}
    for i in order:
        for v in reads[i]:
            readers.setdefault(v, []).append(i)
    pairs = []
    for i in order:
        if net.layers[i].type != "BatchNorm" or (i, 0) in out_values:
            continue
        users = readers.get((i, 0), [])
        if len(users) != 1:
            continue
        sc = net.layers[users[0]]
        p = sc.param.scale_param
        if sc.type == "Scale" and len(sc.bottoms) == 1 and p.axis == 1 and p.num_axes == 1:
            pairs.append((i, users[0]))
    return pairs


def swap_to_rgb(net: CaffeNet, reads: Reads, order: Sequence[int], outputs: Sequence[Tuple[str, Value]],
                data_name: str) -> List[str]:
    """Reorder the weights of the layers that read the BGR image so the model takes RGB.

    Follows the wiring from the input: per-channel layers (a BatchNorm/Scale on the input, as in the SSD
    face detector) get their parameters reversed and pass the reversed order on; the first Convolution or
    InnerProduct absorbs it. Any other reader is an error: its output would silently depend on the order.

    Returns:
        The layers whose outputs still carry the reversed (RGB) channel order.
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
        shape_only = SHAPE_ONLY_BOTTOMS.get(layer.type, ())
        carried = [v for j, v in enumerate(reads[i]) if j not in shape_only]
        if not any(v in reversed_values for v in carried):
            continue
        flip = INPUT_CHANNEL_FLIPS.get(layer.type)
        if flip is None or len(carried) != 1:
            raise ConversionError(
                f"layer '{layer.name}' ({layer.type}) reads the image channels directly and cannot be reordered "
                f"for RGB input (supported: {', '.join(sorted(INPUT_CHANNEL_FLIPS))}); convert with --keep-bgr")
        if not layer.blobs and layer.type in _WEIGHTED_READERS:
            raise CaffeFormatError(f"layer '{layer.name}' ({layer.type}): the caffemodel has 0 weight blob(s) for it; "
                                   f"is the caffemodel missing this layer or is it named differently?")
        if flip(layer):
            touched.append(layer.name)
            reversed_values.update((i, k) for k in range(len(layer.tops)))
    leaked = [name for name, v in outputs if v in reversed_values and v[0] != "in"]  # an input is the user's own
    if leaked:
        raise ConversionError(f"output {leaked} still carries the image's channel order; convert with --keep-bgr")
    return touched


def used_inputs(symbol, input_shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """The input shapes `symbol` actually reads (a Crop reference input only lends its shape)."""
    names = set(symbol.list_arguments())
    return {k: v for k, v in input_shapes.items() if k in names}


def final_checks(symbol, args: Dict[str, np.ndarray], aux: Dict[str, np.ndarray], input_shapes) -> None:
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
    arg_shapes, _, aux_shapes = symbol.infer_shape(**used_inputs(symbol, input_shapes))
    for names, shapes, store in ((symbol.list_arguments(), arg_shapes, args), (aux_names, aux_shapes, aux)):
        for name, shape in zip(names, shapes):
            if name in store and tuple(store[name].shape) != tuple(shape):
                raise ConversionError(f"internal: parameter {name} has shape {store[name].shape}, MXNet infers "
                                      f"{tuple(shape)}")
