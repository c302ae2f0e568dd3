"""Layer-by-layer comparison: each converted layer is fed the reference runtime's own input blob.

End to end, float32 rounding accumulates over depth (OpenCV itself differs from BVLC Caffe by 2e-4 to 3e-3 on
ResNet-152 or colorization), so one fixed tolerance on the outputs cannot tell a correct deep net from a wrong
one. Here every Caffe layer's converted operators run alone: the MXNet graph written to disk is cut at the
blobs of the neighbouring Caffe layers (`cut_graph`), those become variables fed with OpenCV's values, and the
layer's output is compared with OpenCV's. The error is then one layer's rounding at any depth, so a tolerance
near float32's holds (docs/converter-verify.md). A layer whose blob is not exposed (a BatchNorm folded into
its Scale, a Slice's second top) is compared as part of the run of layers ending at the next exposed blob.

Where OpenCV departs from Caffe (`DEPARTURES`), the layer's reference is Caffe's formula in numpy on OpenCV's
input blob; OpenCV's own (wrong) output still feeds the layers after it, which keeps them comparable.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

# A layer passes when max |ours - reference| <= LAYER_TOLERANCE * (max |reference| + ABS_FLOOR): float32 has
# 6e-8 relative rounding per operation; a layer sums at most ~1e4 products (a 3x3x1024 convolution), whose
# rounding grows as sqrt(n) to a few 1e-6 of the output's scale. 1e-4 leaves a factor >10 for the summation
# order of another library and none for a wrong weight (a permuted row changes its output by O(1)).
LAYER_TOLERANCE = 1e-4
ABS_FLOOR = 1e-6  # blobs whose values are all ~0 (a dead ReLU) are compared in absolute terms


@dataclass
class LayerPlan:
    """One compared Caffe layer: its name and type, the MXNet entry of its first top, whether that entry
    carries the model's reversed (RGB) channel order, and the Caffe layer that wrote its first bottom."""

    name: str
    type: str
    entry: str
    rgb: bool
    bottom_layer: str = ""


def relative(ours: np.ndarray, ref: np.ndarray) -> Tuple[float, float]:
    """(max |ours - ref|, that divided by max |ref| + ABS_FLOOR), in float64."""
    a = np.asarray(ours, np.float64).ravel()
    b = np.asarray(ref, np.float64).ravel()
    if not a.size:
        return 0.0, 0.0
    max_abs = float(np.max(np.abs(a - b)))
    if not np.isfinite(max_abs):
        return float("inf"), float("inf")
    return max_abs, max_abs / (float(np.max(np.abs(b))) + ABS_FLOOR)


_PARAM_SUFFIXES = ("_weight", "_bias", "_gamma", "_beta", "_moving_mean", "_moving_var")


def non_finite(arrays: Dict[str, np.ndarray]) -> List[str]:
    """One line per parameter holding NaN or Inf values, naming it and the Caffe layer it comes from."""
    found = []
    for name, value in arrays.items():
        value = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
        nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
        if nan or inf:
            layer = next((name[:-len(s)] for s in _PARAM_SUFFIXES if name.endswith(s)), name)
            found.append(f"parameter '{name}' (Caffe layer '{layer}') holds {nan} NaN and {inf} Inf of "
                         f"{value.size} values")
    return found


# ---- cutting the written graph ---------------------------------------------------------------------------------
def entry_of(nodes: Sequence[dict], name: str) -> Tuple[int, int]:
    """(node index, output index) of an MXNet output name such as 'conv1_output' or 'slice1_output1'."""
    index = {node["name"]: i for i, node in enumerate(nodes)}
    if name in index and nodes[index[name]]["op"] == "null":
        return index[name], 0
    if name.endswith("_output") and name[:-7] in index:
        return index[name[:-7]], 0
    match = re.fullmatch(r"(.*)_output(\d+)", name)
    if match and match.group(1) in index:
        return index[match.group(1)], int(match.group(2))
    raise KeyError(f"no output named {name!r} in the graph")


def cut_graph(graph: dict, output: Tuple[int, int], feeds: Dict[Tuple[int, int], str]) -> Tuple[str, List[str]]:
    """The sub-graph computing `output` from the nearest `feeds` entries, which become variables.

    Args:
        graph: the symbol's JSON (`json.loads(sym.tojson())`).
        output: (node, output index) to compute.
        feeds: (node, output index) -> variable name, for every entry whose value is given.

    Returns:
        (the sub-graph's JSON for mx.sym.load_json, the feed variables it reads).
    """
    nodes = graph["nodes"]
    new_nodes: List[dict] = []
    new_index: Dict[int, int] = {}
    variables: Dict[Tuple[int, int], int] = {}
    used: List[str] = []

    def variable(entry: Tuple[int, int]) -> int:
        if entry not in variables:
            variables[entry] = len(new_nodes)
            new_nodes.append({"op": "null", "name": feeds[entry], "inputs": []})
            used.append(feeds[entry])
        return variables[entry]

    stack = [(output[0], False)]
    while stack:  # iterative post-order: a 500-layer chain would overflow Python's recursion limit
        node_id, expanded = stack.pop()
        if node_id in new_index:
            continue
        node = nodes[node_id]
        inputs = [(i[0], i[1]) for i in node["inputs"]]
        pending = [e for e in inputs if e not in feeds and e[0] not in new_index]
        if not expanded and pending:
            stack.append((node_id, True))
            stack.extend((e[0], False) for e in pending)
            continue
        copy = dict(node)
        copy["inputs"] = [[variable(e), 0, 0] if e in feeds else [new_index[e[0]], e[1], 0] for e in inputs]
        new_index[node_id] = len(new_nodes)
        new_nodes.append(copy)
    cut = {"nodes": new_nodes, "arg_nodes": [i for i, n in enumerate(new_nodes) if n["op"] == "null"],
           "heads": [[new_index[output[0]], output[1], 0]], "attrs": graph.get("attrs", {})}
    cut["node_row_ptr"] = _row_ptr(new_nodes, graph, new_index)
    return json.dumps(cut), used


def _row_ptr(new_nodes: List[dict], graph: dict, new_index: Dict[int, int]) -> List[int]:
    """Output counts per node (MXNet's loader needs them for multi-output nodes such as split)."""
    old_ptr = graph.get("node_row_ptr")
    counts = [1] * len(new_nodes)
    if old_ptr:
        for old, new in new_index.items():
            counts[new] = old_ptr[old + 1] - old_ptr[old]
    ptr = [0]
    for c in counts:
        ptr.append(ptr[-1] + c)
    return ptr


# ---- Caffe's formulas where OpenCV departs -----------------------------------------------------------------------
def _lrn_k(param, x: np.ndarray) -> Optional[np.ndarray]:
    p = param.lrn_param
    if p.norm_region != 0 or p.k == 1.0:  # 0: ACROSS_CHANNELS; OpenCV ignores k only there
        return None
    n, alpha, beta, k = int(p.local_size), float(p.alpha), float(p.beta), float(p.k)
    half = (n - 1) // 2
    sq = np.pad(np.asarray(x, np.float64) ** 2, ((0, 0), (half, half)) + ((0, 0),) * (x.ndim - 2))
    total = sum(sq[:, i:i + x.shape[1]] for i in range(n))
    return x / (k + alpha / n * total) ** beta


def _log(param, x: np.ndarray) -> Optional[np.ndarray]:
    p = param.log_param
    if (p.base, p.scale, p.shift) == (-1.0, 1.0, 0.0):
        return None
    y = np.log(p.shift + p.scale * np.asarray(x, np.float64))
    return y if p.base == -1.0 else y / np.log(p.base)


def _swish(param, x: np.ndarray) -> Optional[np.ndarray]:
    beta = param.swish_param.beta
    if beta == 1.0:
        return None
    x = np.asarray(x, np.float64)
    return x / (1 + np.exp(-beta * x))


def _inner_product(param, x: np.ndarray, blobs: Sequence[np.ndarray]) -> Optional[np.ndarray]:
    p = param.inner_product_param
    if not p.transpose:
        return None
    axis = p.axis % x.ndim
    flat = np.asarray(x, np.float64).reshape(int(np.prod(x.shape[:axis])), -1)
    y = flat @ np.asarray(blobs[0], np.float64).reshape(flat.shape[1], -1)
    return y + blobs[1].reshape(1, -1) if p.bias_term and len(blobs) > 1 else y


def _axpy(param, bottoms: Sequence[np.ndarray]) -> Optional[np.ndarray]:
    if len(bottoms) != 3:
        return None
    a, x, y = (np.asarray(b, np.float64) for b in bottoms)
    return a.reshape(a.shape[:2] + (1,) * (x.ndim - 2)) * x + y


def caffe_priorbox(p, layer_hw: Sequence[int], image_hw: Sequence[int]) -> np.ndarray:
    """Caffe SSD's PriorBox::Forward_cpu in plain loops: the 1 x 2 x (H * W * priors * 4) blob of a
    PriorBoxParameter `p` on a feature map of `layer_hw` for an image of `image_hw`."""
    img_h, img_w = (p.img_h, p.img_w) if p.img_h else (p.img_size, p.img_size) if p.img_size else image_hw
    step_h, step_w = (p.step_h, p.step_w) if p.step_h else (p.step, p.step) if p.step else \
        (img_h / layer_hw[0], img_w / layer_hw[1])
    ratios = [1.0]
    for ar in p.aspect_ratio:
        if all(abs(ar - r) > 1e-6 for r in ratios):
            ratios += [ar, 1 / ar] if p.flip else [ar]
    boxes = []
    for h in range(layer_hw[0]):
        for w in range(layer_hw[1]):
            cx, cy = (w + p.offset) * step_w, (h + p.offset) * step_h
            for i, low in enumerate(p.min_size):
                sides = [(low, low)] + ([(np.sqrt(low * p.max_size[i]),) * 2] if p.max_size else [])
                sides += [(low * np.sqrt(r), low / np.sqrt(r)) for r in ratios[1:]]
                boxes += [((cx - bw / 2) / img_w, (cy - bh / 2) / img_h, (cx + bw / 2) / img_w,
                           (cy + bh / 2) / img_h) for bw, bh in sides]
    coords = np.array(boxes).reshape(-1)
    coords = np.clip(coords, 0, 1) if p.clip else coords
    variances = np.resize(list(p.variance) or [0.1], 4)
    return np.stack([coords, np.tile(variances, len(boxes))])[None].astype(np.float32)


def _priorbox(param, bottoms: Sequence[np.ndarray]) -> Optional[np.ndarray]:
    p = param.prior_box_param
    if not (p.img_size or p.img_h or p.img_w) or len(bottoms) < 2:
        return None
    return caffe_priorbox(p, bottoms[0].shape[2:4], bottoms[1].shape[2:4])


# type -> (why, formula(layer param, OpenCV's blobs of the layer's bottoms, weights) or None where OpenCV is right).
# OpenCV still runs an equivalent net for LRN's k and Axpy (opencv_check.opencv_equivalent), so the layers after
# them are fed Caffe's values.
DEPARTURES: Dict[str, Tuple[str, Callable]] = {
    "LRN": ("OpenCV ignores k={k:g}: against Caffe's formula in numpy", lambda p, x, w: _lrn_k(p, x[0])),
    "Log": ("OpenCV's Log ignores base/scale/shift: against Caffe's formula in numpy",
            lambda p, x, w: _log(p, x[0])),
    "Swish": ("OpenCV's Swish ignores beta: against Caffe's formula in numpy", lambda p, x, w: _swish(p, x[0])),
    "InnerProduct": ("OpenCV ignores transpose: against Caffe's formula in numpy",
                     lambda p, x, w: _inner_product(p, x[0], w)),
    "Axpy": ("OpenCV computes a*y + x: against SENet's a*x + y in numpy", lambda p, x, w: _axpy(p, x)),
    "PriorBox": ("OpenCV ignores img_size/img_h/img_w: against Caffe SSD's loop in numpy",
                 lambda p, x, w: _priorbox(p, x)),
}


def caffe_reference(param, bottoms: Sequence[np.ndarray],
                    weights: Sequence[np.ndarray]) -> Tuple[Optional[np.ndarray], str]:
    """(Caffe's output in numpy, why) where OpenCV departs from Caffe on this layer, else (None, '').

    Args:
        param: the layer's LayerParameter.
        bottoms: OpenCV's values of the layer's bottoms, in order.
        weights: the layer's blobs from the caffemodel (InnerProduct only).
    """
    entry = DEPARTURES.get(param.type)
    if entry is None:
        return None, ""
    why, formula = entry
    ref = formula(param, bottoms, weights)
    if ref is None:
        return None, ""
    return ref, why.format(k=param.lrn_param.k)
