"""The walker: wire a CaffeNet's blobs to its layers, run the graph passes, and convert layer by layer.

It knows no layer type. Each layer's type is looked up in layers.LAYER_CONVERTERS and its tops are bound to
the symbols the converter returns (in-place tops such as ReLU's simply rebind); MXNet's shape inference runs
after every layer, so a shape MXNet rejects is reported at the layer that caused it.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from tools.caffe_converter import passes
from tools.caffe_converter.caffe_io import CaffeNet, Layer
from tools.caffe_converter.errors import ConversionError, UnsupportedLayerError
from tools.caffe_converter.layers import LAYER_CONVERTERS, Tensor, infer_quietly
from tools.caffe_converter.passes import Reads, Value

log = logging.getLogger(__name__)


def wire(net: CaffeNet) -> Tuple[Reads, Dict[str, Value]]:
    """Resolve each layer's bottoms to the value that produced them (in-place tops simply rebind).

    Returns:
        (reads, env): the values each layer reads, and each blob name's final value.
    """
    env: Dict[str, Value] = {name: ("in", name) for name in net.inputs}
    reads: Reads = []
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


def probe_inputs(input_shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """The input shapes at twice the declared spatial size, to tell size-dependent shapes from fixed ones."""
    return {k: (tuple(v[:2]) + tuple(2 * d for d in v[2:]) if len(v) > 2 else tuple(v))
            for k, v in input_shapes.items()}


def _check_supported(net: CaffeNet, order: Sequence[int]) -> None:
    unknown = [net.layers[i] for i in order if net.layers[i].type not in LAYER_CONVERTERS]
    if unknown:
        layer = unknown[0]
        raise UnsupportedLayerError(
            f"layer '{layer.name}' has type '{layer.type}', which the converter does not support; supported: "
            f"{', '.join(sorted(LAYER_CONVERTERS))} (training-only layers are skipped); "
            f"--output-layer can cut the net before it")


def convert_net(net: CaffeNet, keep_bgr: bool = False, output_layer: Optional[Sequence[str]] = None,
                strict: bool = False) -> dict:
    """Convert a loaded CaffeNet into (symbol, args, aux, details).

    Args:
        net: from caffe_io.load_net (with weights).
        keep_bgr: keep Caffe's BGR input order instead of reordering the first layers' weights for RGB.
        output_layer: cut the net at these layers/blobs instead of at its final outputs.
        strict: turn skipped layers and ignored caffemodel weights into an error.

    Returns:
        dict with symbol, arg/aux numpy dicts, input shapes, outputs, per-layer symbols and notes.
    """
    if strict and net.skipped:
        raise ConversionError(f"{net.prototxt}: --strict and {len(net.skipped)} layer(s) would be skipped: "
                              f"{[(n, t) for n, t, _ in net.skipped][:5]}")
    if strict and net.unused_weights:
        raise ConversionError(f"{net.caffemodel}: --strict and the caffemodel holds weights for "
                              f"{len(net.unused_weights)} layer(s) {net.prototxt} does not define: "
                              f"{net.unused_weights[:5]}")
    reads, env = wire(net)
    outputs = passes.select_outputs(net, reads, env, output_layer)
    order = passes.needed(reads, outputs)
    out_values = {v for _, v in outputs}
    for i in order:
        layer = net.layers[i]
        layer.is_net_output = any((i, k) in out_values for k in range(len(layer.tops)))
    _check_supported(net, order)
    folds = passes.fold_scales(net, reads, order, outputs)
    for bn, sc in folds:
        net.layers[bn].fused_scale, net.layers[sc].folded_into = net.layers[sc], net.layers[bn].name

    input_names = list(net.inputs)
    data_name = input_names[0]
    mx_names = {name: ("data" if name == data_name else name) for name in input_names}
    input_shapes = {mx_names[n]: tuple(net.inputs[n]) for n in input_names}
    data_shape = input_shapes["data"]
    swap = not keep_bgr and len(data_shape) == 4 and data_shape[1] == 3
    if not keep_bgr and not swap:
        log.info("input has shape %s (not 3 channels): channel order left as is", data_shape)
    flipped = passes.swap_to_rgb(net, reads, order, outputs, data_name) if swap else []

    probe = probe_inputs(input_shapes)
    values: Dict[Value, Tensor] = {("in", n): Tensor(mx.sym.Variable(mx_names[n]), tuple(net.inputs[n]), probe)
                                   for n in input_names}
    walked = _walk(net, reads, order, values, input_shapes)
    out_syms = [values[v].sym for _, v in outputs]
    symbol = out_syms[0] if len(out_syms) == 1 else mx.sym.Group(out_syms)
    args, aux = walked["args"], walked["aux"]
    passes.final_checks(symbol, args, aux, input_shapes)
    return dict(symbol=symbol, args={k: args[k] for k in symbol.list_arguments() if k in args},
                aux={k: aux[k] for k in symbol.list_auxiliary_states()}, input_shapes=input_shapes,
                outputs=outputs, order=order, reads=reads, layer_syms=walked["layer_syms"], feeds=walked["feeds"],
                swapped=swap, flipped=flipped, folded=len(folds))


def _walk(net: CaffeNet, reads: Reads, order: Sequence[int], values: Dict[Value, Tensor],
          input_shapes: Dict[str, Tuple[int, ...]]) -> dict:
    """Convert the layers in `order`, binding their tops in `values`; returns args, aux and per-layer symbols."""
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
            try:
                outs = _convert_layer(layer, ins, args, aux)
            except UnsupportedLayerError as err:
                if getattr(err, "shape_failure", False):
                    raise ConversionError(f"{err}; {_input_hint(net.inputs)}") from None
                raise
        shapes = _infer(layer, outs, ins, input_shapes, net.inputs)
        for k, (sym, shape) in enumerate(zip(outs, shapes)):
            values[(i, k)] = Tensor(sym, tuple(shape), values[reads[i][0]].probe_inputs if reads[i] else None)
        if ins:
            feeds[layer.name] = ins[0].sym.list_outputs()[0]
        if layer.fused_scale is None:  # a BatchNorm with a folded Scale computes the Scale's output, not its own
            layer_syms[layer.name] = outs[0]
        log.debug("%s (%s) -> %s", layer.name, layer.type, [tuple(s) for s in shapes])
    return dict(args=args, aux=aux, layer_syms=layer_syms, feeds=feeds)


def _convert_layer(layer: Layer, ins: List[Tensor], args: Dict[str, np.ndarray],
                   aux: Dict[str, np.ndarray]) -> List[mx.sym.Symbol]:
    """One table look-up; the layer's parameters join `args`/`aux` (a name used twice is an error)."""
    try:
        converted = LAYER_CONVERTERS[layer.type](layer, ins)
    except (mx.base.MXNetError, ArithmeticError) as err:  # a setting MXNet refuses that no converter check caught
        first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise ConversionError(f"layer '{layer.name}' ({layer.type}): cannot convert it with bottom shape(s) "
                              f"{', '.join(str(tuple(t.shape)) for t in ins)}: {first.strip()[:200]}") from None
    if len(converted.outputs) != len(layer.tops):
        raise ConversionError(f"layer '{layer.name}' ({layer.type}): {len(layer.tops)} tops, converter made "
                              f"{len(converted.outputs)} outputs")
    for store, new in ((args, converted.args), (aux, converted.aux)):
        clash = set(store) & set(new)
        if clash:
            raise ConversionError(f"layer '{layer.name}': parameter name(s) {sorted(clash)} already used; "
                                  f"rename the layer")
        store.update(new)
    return converted.outputs


def _infer(layer: Layer, outs: List[mx.sym.Symbol], ins: List[Tensor], input_shapes: Dict[str, Tuple[int, ...]],
           caffe_inputs: Dict[str, Tuple[int, ...]]) -> List[Tuple[int, ...]]:
    """MXNet's output shapes for the layer's symbols; a rejection names the layer and its input shapes."""
    try:
        group = mx.sym.Group(outs)
        return infer_quietly(group, **passes.used_inputs(group, input_shapes))[1]
    except mx.base.MXNetError as err:
        first = next((ln for ln in str(err).splitlines() if "Error" in ln or "Check failed" in ln), str(err))
        raise ConversionError(f"layer '{layer.name}' ({layer.type}): cannot compute its output from bottom shape(s) "
                              f"{', '.join(str(tuple(t.shape)) for t in ins)} ({first.strip()[:200]}); "
                              f"{_input_hint(caffe_inputs)}") from None


def _input_hint(caffe_inputs: Dict[str, Tuple[int, ...]]) -> str:
    """Where a shape fails, the declared input may not be the size the net runs at (OpenPose declares 1x1)."""
    declared = ", ".join(f"{k}={','.join(map(str, v))}" for k, v in caffe_inputs.items())
    return f"the net's input is declared as {declared}: --input-shape NAME=N,C,H,W sets another"
