"""The inference graph of a checkpoint: what deployment (tools/deploy.py) and ONNX export (tools/onnx_export.py)
both start from, so neither has to import the other.

- `load_for_inference(prefix, epoch)`: the sidecar and the checkpoint (through symbols/checkpoint.py), with
  one-line errors naming the missing file.
- `inference_symbol(sym)`: a final SoftmaxOutput (a training op with a `softmax_label` input) becomes the
  forward-identical `softmax` under the same layer name, so the output is still `<name>_output`.
- `used_params(...)`: only the parameters the symbol uses, their shapes checked against infer_shape.

Errors are `DeployError` (a ValueError), whose message names the file or layer and what is expected instead.
"""
from __future__ import annotations

import json
from typing import Dict, List, Tuple

from recbuild.publish import settle
from symbols.checkpoint import load_checkpoint
from symbols.sidecar import Preprocess, has_sidecar, load_sidecar

_TRUTHY = {"true", "1"}


class DeployError(ValueError):
    """Bad input to the bundler or the exporter; the message names the file or layer and what is expected."""


def load_for_inference(prefix: str, epoch: int, why: str = "it gives the input shape and preprocessing"
                       ) -> Tuple[Preprocess, object, Dict, Dict]:
    """(sidecar, symbol, arg_params, aux_params) of checkpoint `prefix`/`epoch`.

    Raises:
        DeployError: no `PREFIX-preprocess.json` beside the checkpoint.
        symbols.checkpoint.CheckpointError: a checkpoint file is missing or unreadable.
    """
    settle(prefix)  # finish a killed writer's publication first: the sidecar and the weights of one set
    if not has_sidecar(prefix):
        raise DeployError(f"{prefix}-preprocess.json: no preprocessing sidecar beside the checkpoint ({why}); "
                          f"the converter and trainer write it (python -m tools.caffe_converter / python -m train)")
    pre = load_sidecar(prefix)
    sym, arg_params, aux_params = load_checkpoint(prefix, epoch, "checkpoint")
    return pre, sym, arg_params, aux_params


def _head_op(sym) -> Tuple[str, dict]:
    graph = json.loads(sym.tojson())
    if len(graph["heads"]) != 1:
        return "", {}
    node = graph["nodes"][graph["heads"][0][0]]
    return node["op"], node.get("attrs", node.get("param", {})) or {}


def inference_symbol(sym):
    """The symbol with a final SoftmaxOutput replaced by `softmax` of the same name (forward-identical).

    Args:
        sym: an mx.sym.Symbol, typically from a training checkpoint.

    Returns:
        The inference symbol; unchanged when it does not end in SoftmaxOutput.

    Raises:
        DeployError: SoftmaxOutput is used elsewhere or with options whose forward pass is not a plain
            softmax over the class axis.
    """
    import mxnet as mx

    op, attrs = _head_op(sym)
    graph_ops = [n["op"] for n in json.loads(sym.tojson())["nodes"]]
    if op != "SoftmaxOutput":
        if "SoftmaxOutput" in graph_ops:
            raise DeployError("SoftmaxOutput is used inside the graph, not as its single output; "
                              "only a final SoftmaxOutput can be turned into an inference softmax")
        return sym
    if graph_ops.count("SoftmaxOutput") > 1:
        raise DeployError("more than one SoftmaxOutput in the graph; only a final one is supported")
    name = sym.name
    data = sym.get_children()[0]
    if str(attrs.get("multi_output", "False")).lower() in _TRUTHY:
        return mx.sym.softmax(data, axis=1, name=name)  # multi_output: softmax over channels at each position
    _, out_shapes, _ = data.infer_shape_partial()
    # SoftmaxOutput flattens (N, ...) to (N, -1) unless preserve_shape; for the usual (N, K) logits both are
    # a softmax over the last axis.
    if str(attrs.get("preserve_shape", "False")).lower() in _TRUTHY or (out_shapes and out_shapes[0]
                                                                        and len(out_shapes[0]) == 2):
        return mx.sym.softmax(data, axis=-1, name=name)
    return mx.sym.softmax(mx.sym.flatten(data), axis=-1, name=name)


def used_params(sym, arg_params: dict, aux_params: dict, pre: Preprocess, where: str) -> Tuple[dict, dict, List[str]]:
    """Keep the parameters `sym` uses, check their shapes against infer_shape; report the others by name.

    Returns:
        (arg_params, aux_params) restricted to the symbol's, and the sorted names left out.

    Raises:
        DeployError: a parameter the symbol uses is missing or has the wrong shape (named, with `where`).
    """
    input_names = {pre.input_name}
    args = [a for a in sym.list_arguments() if a not in input_names]
    auxs = sym.list_auxiliary_states()
    missing = [a for a in args if a not in arg_params] + [a for a in auxs if a not in aux_params]
    if missing:
        raise DeployError(f"{where}: the params lack {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                          f"used by the symbol")
    shape = (1,) + tuple(pre.input_shape)
    arg_shapes, _, aux_shapes = sym.infer_shape(**{pre.input_name: shape})
    for name, expected in list(zip(sym.list_arguments(), arg_shapes)) + list(zip(auxs, aux_shapes)):
        if name in input_names:
            continue
        got = (arg_params.get(name) if name in arg_params else aux_params[name]).shape
        if tuple(got) != tuple(expected):
            raise DeployError(f"{where}: parameter {name} has shape {tuple(got)}, the symbol needs "
                              f"{tuple(expected)} for input {shape}")
    unused = sorted(set(arg_params) - set(args)) + sorted(set(aux_params) - set(auxs))
    return ({a: arg_params[a] for a in args}, {a: aux_params[a] for a in auxs}, unused)
