"""Which input sizes a converted net accepts, found by binding its shapes at other sizes.

Caffe (and OpenCV) reshape a net to any input size; a converted MXNet symbol does the same wherever no size
is written into it (graph.py and layers.py keep it so). What still ties a net to a size: a fully-connected
layer after spatial axes (its weight fixes the input size), branches that must agree (Eltwise, Concat), and
Caffe's pooling rule, which MXNet can follow only through one rounding convention per layer, chosen at the
declared size. `accepted_sizes` infers every shape at a few other sizes and checks each windowed pooling's
output against Caffe's formula (layers.caffe_pool_size); the result goes into the sidecar.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Tuple

import mxnet as mx

from tools.caffe_converter.caffe_io import CaffeNet
from tools.caffe_converter.layers import caffe_pool_size, infer_quietly, pooling_window

Shape = Tuple[int, ...]
# Steps tried, smallest first: 1 is "any size"; a net whose branches meet after k stride-2 layers needs 2^k.
SIZE_STEPS = (1, 2, 4, 8, 16, 32, 64)
FAR_STEPS = 16  # the far probe: declared + 16 steps (224 -> 240 at step 1, 736 at step 32)


def _pool_checks(symbol: mx.sym.Symbol, net: CaffeNet) -> List[Tuple[str, str, tuple]]:
    """(pooling output name, its input's name, (kernel, stride, pad, ceil)) for each windowed Pooling."""
    nodes = json.loads(symbol.tojson())["nodes"]
    by_name = {node["name"]: node for node in nodes}
    checks = []
    for layer in net.layers:
        node = by_name.get(layer.name)
        if layer.type != "Pooling" or node is None or node["op"] != "Pooling":
            continue
        if layer.param.pooling_param.global_pooling:
            continue
        src = nodes[node["inputs"][0][0]]
        src_name = src["name"] if src["op"] == "null" else f"{src['name']}_output"
        nd = len([d for d in node["attrs"]["kernel"].strip("()").split(",") if d.strip()])
        checks.append((f"{layer.name}_output", src_name, pooling_window(layer, nd)))
    return checks


def works_at(symbol: mx.sym.Symbol, input_shapes: Dict[str, Shape], param_shapes: Dict[str, Shape], checks,
             spatial: Sequence[int]) -> bool:
    """Whether every shape infers at this spatial size (with the weights' shapes fixed) and every pooling has
    Caffe's output size there."""
    internals = symbol.get_internals()
    names = set(internals.list_arguments()) | set(internals.list_auxiliary_states())
    shapes = {k: (tuple(v[:2]) + tuple(spatial) if len(v) == 2 + len(spatial) else tuple(v))
              for k, v in input_shapes.items() if k in names}
    shapes.update({k: tuple(v) for k, v in param_shapes.items() if k in names})
    try:
        _, out_shapes, _ = infer_quietly(internals, **shapes)
    except mx.base.MXNetError:
        return False
    if out_shapes is None:
        return False
    found = dict(zip(internals.list_outputs(), out_shapes))
    found.update(shapes)
    for out_name, in_name, (kernel, stride, pad, ceil) in checks:
        if out_name not in found or in_name not in found:
            continue
        want = [caffe_pool_size(s, k, st, pd, ceil)
                for s, k, st, pd in zip(found[in_name][2:], kernel, stride, pad)]
        if list(found[out_name][2:]) != want:
            return False
    return True


def accepted_sizes(symbol: mx.sym.Symbol, input_shapes: Dict[str, Shape], param_shapes: Dict[str, Shape],
                   net: CaffeNet) -> dict:
    """The sidecar's record of the input sizes the net accepts.

    Returns:
        {"fixed": True, "declared": [H, W]} or {"fixed": False, "step": m, "declared": [H, W],
        "checked": [[H', W'], ...]}: any H = declared H + k*m (and the same for W) down to the smallest size
        the layers allow; step 1 means any size.
    """
    data = input_shapes.get("data", ())
    if len(data) != 4:
        return {"fixed": True, "declared": list(data[2:])}
    h, w = data[2:]
    checks = _pool_checks(symbol, net)
    for step in SIZE_STEPS:
        # and one far off: rounding can keep a fixed window's input (SE-BN-Inception's 7x7 pool5 before its
        # InnerProduct) the same size for a few pixels more, so near sizes alone would pass a fixed net
        probes = [(h + step, w + step), (h + 2 * step, w), (h, w + 3 * step), (h + 5 * step, w + 2 * step),
                  (h + FAR_STEPS * step, w + FAR_STEPS * step)]
        if all(works_at(symbol, input_shapes, param_shapes, checks, hw) for hw in probes):
            return {"fixed": False, "step": step, "declared": [h, w], "checked": [list(p) for p in probes]}
    return {"fixed": True, "declared": [h, w]}


def describe(sizes: Optional[dict]) -> str:
    """One phrase for the summary: 'fixed 224x224', 'any size', 'any size in steps of 32 from 224x224'."""
    if not sizes:
        return "unknown"
    h, w = (sizes["declared"] + [0, 0])[:2]
    if sizes["fixed"]:
        return f"fixed {h}x{w}"
    return "any size" if sizes["step"] == 1 else f"any size in steps of {sizes['step']} from {h}x{w}"
