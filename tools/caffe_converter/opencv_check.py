"""Check a converted model against an independent Caffe runtime: OpenCV's dnn importer.

Random input goes through `cv2.dnn.readNetFromCaffe` (BGR, as Caffe) and through the converted MXNet model
(the same input with its channels reversed when the model was converted to RGB). For each output, or each
layer, we report the max absolute difference and the relative difference max|a - b| / max|b|.

`verify_files` checks what was written: the checkpoint re-loaded with stock `mx.model.load_checkpoint` into a
fresh `mx.mod.Module`, so a bug in the `.params` writer cannot hide behind the in-memory arrays.
`verify_conversion` checks the in-memory conversion, layer by layer if asked. cv2 is imported only here.
`--verify` itself (layer by layer, each layer fed OpenCV's input blobs, in a child process) is run_check.py's
`verify_staged`, using `run_opencv` and the report classes from here.

Where OpenCV departs from Caffe, it is not trusted blindly: it runs an equivalent net (`opencv_equivalent`: LRN's
k, SENet's Axpy with x and y exchanged, one image at a time, PriorBox's and DetectionOutput's defaults spelled
out), and each such layer is also compared with Caffe's formula in numpy where one exists (a report row says so). OpenCV's Log ignores base/scale/shift and its Swish
ignores beta (found by the layer tests; those cases are checked against numpy there).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tools.caffe_converter.layerwise import LAYER_TOLERANCE

log = logging.getLogger(__name__)

# Max relative difference accepted (max |ours - OpenCV| / max |OpenCV|), per layer: layerwise.py says why.
DEFAULT_TOLERANCE = LAYER_TOLERANCE


@dataclass
class Row:
    name: str
    shape: Tuple[int, ...]
    max_abs: float
    rel: float
    ok: bool
    note: str = ""


@dataclass
class VerifyReport:
    """Per-output (or per-layer) differences between MXNet and OpenCV.

    `verify_staged` fills `figures` (end to end over the probe inputs: printed, not a criterion), `top1` and,
    when the check itself cannot pass (NaN/Inf weights, a graph MXNet cannot run), `failure`.
    """

    rows: List[Row] = field(default_factory=list)
    tolerance: float = DEFAULT_TOLERANCE
    figures: List[Row] = field(default_factory=list)
    top1: Tuple[int, int] = (0, 0)
    probes: int = 0
    failure: str = ""
    every_layer: bool = True
    where: str = "files on disk run in a child process"

    @property
    def ok(self) -> bool:
        return not self.failure and bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def first_failure(self) -> Optional[Row]:
        return next((r for r in self.rows if not r.ok), None)

    def summary(self) -> str:
        """The one line saying why verification failed (empty when it passed)."""
        if self.failure:
            return self.failure
        first = self.first_failure
        if first is not None:
            note = f" ({first.note})" if first.note else ""
            return (f"first layer that disagrees with OpenCV: '{first.name}', relative difference {first.rel:.3e} > "
                    f"{self.tolerance:g}{note}")
        return "" if self.rows else "nothing compared"

    @property
    def max_rel(self) -> float:
        return max((r.rel for r in self.rows), default=float("nan"))

    def format(self) -> str:
        if self.probes or self.failure:
            return _format_staged(self)
        width = max([len(r.name) for r in self.rows] + [5])
        lines = [f"{'layer':<{width}}  {'shape':<20} {'max abs diff':>13} {'rel diff':>10}"]
        for r in self.rows:
            flag = "" if r.ok else "  ABOVE TOLERANCE"
            lines.append(f"{r.name:<{width}}  {str(r.shape):<20} {r.max_abs:13.3e} {r.rel:10.3e}{flag}"
                         + (f"  ({r.note})" if r.note else ""))
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"verify {verdict}: {len(self.rows)} compared, max relative difference {self.max_rel:.3e} "
                     f"(tolerance {self.tolerance:g}) against OpenCV {_cv2_version()} dnn")
        return "\n".join(lines)


def _cv2_version() -> str:
    import cv2
    return cv2.__version__


def random_inputs(input_shapes: Dict[str, Tuple[int, ...]], seed: int = 0, low: float = -128.0,
                  high: float = 128.0) -> Dict[str, np.ndarray]:
    """Uniform random inputs in Caffe order (BGR), by default in the range of mean-subtracted pixels."""
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(low, high, size=shape).astype(np.float32) for name, shape in input_shapes.items()}


def compare(a: np.ndarray, b: np.ndarray) -> Tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|) of two same-sized arrays."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return max_abs, max_abs / max(scale, 1e-12)


def run_mxnet(symbol, arg_arrays, aux_arrays, inputs: Dict[str, np.ndarray]) -> List[np.ndarray]:
    """Forward `symbol` (inference mode) on CPU with numpy inputs; labels of SoftmaxOutput are zeros."""
    import mxnet as mx
    shapes = {k: v.shape for k, v in inputs.items() if k in symbol.list_arguments()}
    arg_shapes, _, _ = symbol.infer_shape_partial(**shapes)
    args = {}
    for name, shape in zip(symbol.list_arguments(), arg_shapes):
        if name in inputs:
            args[name] = mx.nd.array(inputs[name])
        elif name in arg_arrays:
            args[name] = mx.nd.array(arg_arrays[name])
        else:  # a SoftmaxOutput label: not used by the forward pass
            args[name] = mx.nd.zeros(shape)
    aux = {name: mx.nd.array(aux_arrays[name]) for name in symbol.list_auxiliary_states()}
    # MXNet 1.9's MKLDNN subgraph pass fuses Convolution+ReLU even when the convolution's own output is also
    # requested, and then returns the wrong values for it; per-layer comparison binds without that pass.
    saved = os.environ.get("MXNET_SUBGRAPH_BACKEND")
    if len(symbol.list_outputs()) > 1:
        os.environ["MXNET_SUBGRAPH_BACKEND"] = "NONE"
    try:
        exe = symbol.bind(mx.cpu(), args=args, aux_states=aux, grad_req="null")
    finally:
        if saved is None:
            os.environ.pop("MXNET_SUBGRAPH_BACKEND", None)
        else:
            os.environ["MXNET_SUBGRAPH_BACKEND"] = saved
    return [out.asnumpy() for out in exe.forward(is_train=False)]


def lrn_k_layers(prototxt) -> Dict[str, Tuple[int, float, float, float]]:
    """ACROSS_CHANNELS LRN layers with k != 1, which OpenCV computes as if k were 1: name -> (n, alpha, beta, k)."""
    from tools.caffe_converter import caffe_pb2
    from tools.caffe_converter.caffe_io import read_prototxt
    found = {}
    for layer in read_prototxt(prototxt).layer:
        p = layer.lrn_param
        if layer.type == "LRN" and p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS and p.k != 1.0:
            found[layer.name] = (int(p.local_size), float(p.alpha), float(p.beta), float(p.k))
    return found


def opencv_equivalent(prototxt, folder, keep_top_k: Optional[Dict[str, int]] = None) -> Tuple[str, bool]:
    """A prototxt OpenCV computes exactly as Caffe computes `prototxt`, and whether OpenCV must run it one image
    at a time. Weights are matched by name, so the caffemodel is used as it is. Where OpenCV 4.11 departs:

    - LRN ACROSS_CHANNELS with k != 1 (OpenCV takes k as 1): x / (k + alpha/n * S)^beta ==
      k^-beta * x / (1 + (alpha/k)/n * S)^beta, so an LRN with alpha/k and k 1 then a Power scaling by k^-beta,
      under the LRN's own name and top;
    - SENet's Axpy (a, x, y): OpenCV computes a * bottom[2] + bottom[1], so x and y are listed the other way
      round; it also fails at batch > 1, hence one image at a time;
    - PriorBox: OpenCV clips when `clip` is not given (Caffe: false) and refuses a missing `variance` (Caffe:
      one 0.1), so both are written out;
    - DetectionOutput: OpenCV needs `share_location` written out (Caffe: true) and corrupts its memory on
      `keep_top_k: -1` (Caffe: keep every box), which becomes `keep_top_k[name]`, the rows of our output (the
      nms top_k where that is not given: a net cut before the layer still builds its memory);
    - DetectionOutput with `variance_encoded_in_target` (Caffe ignores the priors' variances): OpenCV wants
      the priors' coordinates only, so a Slice keeps those;
    - a net whose input is declared by a data layer (a MemoryData deploy file): OpenCV cannot set that blob, so
      the layer becomes an `input` of the same name.
    """
    from tools.caffe_converter.caffe_io import DATA_INPUT_TYPES, read_prototxt, write_prototxt
    net = read_prototxt(prototxt)
    k_layers = lrn_k_layers(prototxt)
    layers = list(net.layer)
    changed, per_image = False, False
    declared = bool(net.input) or any(layer.type == "Input" for layer in layers)
    del net.layer[:]
    for layer in layers:
        if not declared and layer.type in DATA_INPUT_TYPES and layer.top:
            changed = True
            if layer.top[0] not in net.input:
                net.input.append(layer.top[0])
            continue
        if layer.name not in k_layers:
            if layer.type == "DetectionOutput" and layer.detection_output_param.variance_encoded_in_target \
                    and len(layer.bottom) > 2:
                _prior_coordinates(net, layer)
            copy = net.layer.add()
            copy.CopyFrom(layer)
            changed |= _spell_out(copy, keep_top_k or {})
            per_image |= copy.type == "Axpy"
            continue
        changed = True
        n, alpha, beta, k = k_layers[layer.name]
        lrn = net.layer.add()
        lrn.CopyFrom(layer)
        lrn.name, lrn.top[0] = f"{layer.name}__k1", f"{layer.top[0]}__k1"
        lrn.lrn_param.alpha, lrn.lrn_param.k = alpha / k, 1.0
        scale = net.layer.add(name=layer.name, type="Power", bottom=[lrn.top[0]], top=[layer.top[0]])
        scale.power_param.scale = k ** -beta
    if not changed:
        return str(prototxt), per_image
    path = Path(folder) / f"opencv_{Path(str(prototxt)).name}"
    write_prototxt(path, net)
    return str(path), per_image


def _prior_coordinates(net, layer) -> None:
    """With variance_encoded_in_target, Caffe ignores the prior blob's variances and OpenCV refuses a prior blob
    that has them: a Slice before the layer keeps the coordinates' channel only."""
    cut = net.layer.add(name=f"{layer.name}__coordinates", type="Slice", bottom=[layer.bottom[2]],
                        top=[f"{layer.bottom[2]}__coordinates", f"{layer.bottom[2]}__variances"])
    cut.slice_param.axis = 1
    cut.slice_param.slice_point.append(1)


def _spell_out(layer, keep_top_k: Dict[str, int]) -> bool:
    """Rewrite one layer where OpenCV departs from Caffe (see `opencv_equivalent`); whether it changed."""
    if layer.type == "Axpy" and len(layer.bottom) == 3:
        layer.bottom[1], layer.bottom[2] = layer.bottom[2], layer.bottom[1]
        return True
    if layer.type == "PriorBox":
        p = layer.prior_box_param
        missing = not p.HasField("clip") or not p.variance
        if not p.HasField("clip"):
            p.clip = False
        if not p.variance:
            p.variance.append(0.1)
        return missing
    if layer.type == "DetectionOutput":
        p = layer.detection_output_param
        missing = not p.HasField("share_location") or p.keep_top_k < 0 or p.variance_encoded_in_target
        p.share_location = p.share_location
        if p.variance_encoded_in_target and len(layer.bottom) > 2:
            layer.bottom[2] = f"{layer.bottom[2]}__coordinates"  # see _prior_coordinates
        if p.keep_top_k < 0:  # not asked for (a net cut before it): any positive count keeps OpenCV's memory sane
            p.keep_top_k = keep_top_k.get(layer.name, max(p.nms_param.top_k, 1))
        return missing
    return False


def run_opencv(prototxt, caffemodel, inputs: Dict[str, np.ndarray], layer_names: Sequence[str],
               missing_ok: bool = False, keep_top_k: Optional[Dict[str, int]] = None) -> List[Optional[np.ndarray]]:
    """Forward the Caffe net with OpenCV (no layer fusion, so every layer's own output is kept), with Caffe's
    semantics: where OpenCV departs from Caffe it runs the equivalent net of `opencv_equivalent` (one image at a
    time where it needs to, the outputs stacked on axis 0).

    With `missing_ok`, a layer OpenCV's importer does not keep under its name (it renames colorization's
    'bw_conv1_1' after its top) gives None instead of an error. `keep_top_k`: DetectionOutput name -> the rows
    to keep where the prototxt says -1 (every box).
    """
    import cv2
    with tempfile.TemporaryDirectory() as folder:
        path, per_image = opencv_equivalent(prototxt, folder, keep_top_k)
        net = cv2.dnn.readNetFromCaffe(path, str(caffemodel))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    net.enableFusion(False)
    have = set(net.getLayerNames()) if missing_ok else set(layer_names)
    kept = [n for n in layer_names if n in have]
    batch = max((v.shape[0] for v in inputs.values() if v.ndim), default=1)
    runs = [slice(i, i + 1) for i in range(batch)] if per_image and batch > 1 else [slice(None)]
    outs: Dict[str, List[np.ndarray]] = {n: [] for n in kept}
    for part in runs:
        for name, value in inputs.items():
            net.setInput(np.ascontiguousarray(value[part]), name)
        for name, value in zip(kept, net.forward(kept) if kept else []):
            outs[name].append(np.asarray(value).copy())
    return [np.concatenate(outs[n]) if n in outs else None for n in layer_names]


def caffe_lrn(x: np.ndarray, n: int, alpha: float, beta: float, k: float) -> np.ndarray:
    """Caffe's ACROSS_CHANNELS LRN in numpy: x / (k + alpha/n * sum of x^2 over n channels, zero-padded)^beta."""
    half = (n - 1) // 2
    sq = np.pad(np.asarray(x, np.float64) ** 2, ((0, 0), (half, half)) + ((0, 0),) * (x.ndim - 2))
    total = sum(sq[:, i:i + x.shape[1]] for i in range(n))
    return x / (k + alpha / n * total) ** beta


def lrn_formula_rows(prototxt, result, mx_inputs: Dict[str, np.ndarray], tolerance: float) -> List["Row"]:
    """Each LRN with k != 1 against Caffe's formula in numpy, on the input our converted layer receives."""
    import mxnet as mx
    rows = []
    for name, (n, alpha, beta, k) in lrn_k_layers(prototxt).items():
        sym = result.blob_symbols.get(name)
        if sym is None:
            continue
        ours_in, ours_out = run_mxnet(mx.sym.Group([sym.get_children()[0], sym]), result.arg_arrays,
                                      result.aux_arrays, mx_inputs)
        max_abs, rel = compare(ours_out, caffe_lrn(ours_in, n, alpha, beta, k))
        rows.append(Row(name, tuple(ours_out.shape), max_abs, rel, bool(rel <= tolerance),
                        f"OpenCV ignores k={k:g}: against Caffe's formula in numpy"))
    return rows


def verify_conversion(prototxt, caffemodel, result, layers: bool = False, tolerance: float = DEFAULT_TOLERANCE,
                      inputs: Optional[Dict[str, np.ndarray]] = None, seed: int = 0) -> VerifyReport:
    """Compare a ConversionResult with OpenCV on random (or given) input.

    Args:
        prototxt, caffemodel: the Caffe files the result was converted from.
        result: tools.caffe_converter.pipeline.ConversionResult.
        layers: compare every converted layer, not only the outputs.
        tolerance: max accepted relative difference.
        inputs: Caffe-order (BGR) inputs keyed by MXNet input name; default: `random_inputs`.

    Returns:
        VerifyReport; `.ok` is False when any difference is above tolerance.
    """
    import mxnet as mx
    inputs = inputs if inputs is not None else random_inputs(result.input_shapes, seed)
    caffe_names = result.caffe_input_names
    cv_inputs = {caffe_names[k]: v for k, v in inputs.items()}
    mx_inputs = dict(inputs)
    if result.preprocess.channel_order == "RGB":
        mx_inputs["data"] = np.ascontiguousarray(inputs["data"][:, ::-1])
    if layers:
        names = [name for name in result.layer_order if name in result.blob_symbols]
        syms = [result.blob_symbols[name] for name in names]
    else:
        outputs = [result.symbol[i] for i in range(len(result.output_layers))] \
            if len(result.output_layers) > 1 else [result.symbol]
        names, picks = _output_names(result)
        syms = [outputs[i] for i in picks]
        classifier = result.preprocess.classifier
        if classifier and classifier not in names and classifier in result.blob_symbols:
            names.insert(0, classifier)  # the logits too: a saturated softmax would hide differences
            syms.insert(0, result.blob_symbols[classifier])
    ours = run_mxnet(mx.sym.Group(syms) if len(syms) > 1 else syms[0], result.arg_arrays, result.aux_arrays,
                     mx_inputs)
    theirs = run_opencv(prototxt, caffemodel, cv_inputs, names)
    return _report(names, ours, theirs, result, tolerance)


def _output_names(result) -> Tuple[List[str], List[int]]:
    """(OpenCV layer names, indices into the symbol's outputs) of the outputs OpenCV can show."""
    names, picks = [], []
    tops = result.output_tops or [0] * len(result.output_layers)
    for i, (name, top) in enumerate(zip(result.output_layers, tops)):
        if name in result.caffe_input_names.values():
            log.warning("output '%s' is the net's input: nothing to compare", name)
            continue
        if top:  # OpenCV's forward() returns a layer's first top only
            log.warning("output %d of layer '%s' is not compared: OpenCV exposes only a layer's first output",
                        top, name)
            continue
        names.append(name)
        picks.append(i)
    return names, picks


def verify_files(prefix, prototxt, caffemodel, result, tolerance: float = DEFAULT_TOLERANCE,
                 inputs: Optional[Dict[str, np.ndarray]] = None, seed: int = 0) -> VerifyReport:
    """Compare the checkpoint on disk at `prefix` (epoch 0) with OpenCV on random (or given) input.

    The files are read by stock `mx.model.load_checkpoint` and run in a fresh `mx.mod.Module`, as a user
    would; the classifier's logits are compared too (taken from the loaded symbol's internals), since a
    saturated softmax hides differences.

    Returns:
        VerifyReport; `.ok` is False when any difference is above tolerance.
    """
    import mxnet as mx
    sym, arg_params, aux_params = mx.model.load_checkpoint(str(prefix), 0)
    inputs = inputs if inputs is not None else random_inputs(result.input_shapes, seed)
    cv_inputs = {result.caffe_input_names[k]: v for k, v in inputs.items()}
    mx_inputs = dict(inputs)
    if result.preprocess.channel_order == "RGB":
        mx_inputs["data"] = np.ascontiguousarray(inputs["data"][:, ::-1])
    names, picks = _output_names(result)
    outputs = [sym[i] for i in picks] if len(sym.list_outputs()) > 1 else [sym]
    classifier = result.preprocess.classifier
    internal = f"{classifier}_output"
    if classifier and classifier not in names and internal in sym.get_internals().list_outputs():
        names.insert(0, classifier)
        outputs.insert(0, sym.get_internals()[internal])
    group = mx.sym.Group(outputs) if len(outputs) > 1 else outputs[0]
    data_names = [k for k in result.input_shapes if k in group.list_arguments()]
    labels = [n for n in group.list_arguments() if n.endswith("_label") and n not in data_names]
    mod = mx.mod.Module(group, data_names=data_names, label_names=labels, context=mx.cpu())
    mod.bind([(k, mx_inputs[k].shape) for k in data_names], for_training=False)
    mod.set_params(arg_params, aux_params, allow_missing=False, allow_extra=True)
    mod.forward(mx.io.DataBatch([mx.nd.array(mx_inputs[k]) for k in data_names]), is_train=False)
    ours = [o.asnumpy() for o in mod.get_outputs()]
    theirs = run_opencv(prototxt, caffemodel, cv_inputs, names)
    report = _report(names, ours, theirs, result, tolerance, "files on disk")
    report.rows += lrn_formula_rows(prototxt, result, mx_inputs, tolerance)
    return report


def _report(names, ours, theirs, result, tolerance, note: str = "") -> VerifyReport:
    report = VerifyReport(tolerance=tolerance)
    for name, a, b in zip(names, ours, theirs):
        if name in result.rgb_layers:  # still in the model's RGB order (before the first convolution)
            a = np.ascontiguousarray(a[:, ::-1])
        if a.size != b.size:
            report.rows.append(Row(name, tuple(a.shape), float("inf"), float("inf"), False,
                                   f"OpenCV shape {tuple(b.shape)}"))
            continue
        max_abs, rel = compare(a, b)
        report.rows.append(Row(name, tuple(a.shape), max_abs, rel, bool(rel <= tolerance), note))
    return report


# ---- --verify: the written files, layer by layer, in a child process (run_check.py) ---------------------------
def _format_staged(report: VerifyReport) -> str:
    lines = []
    if report.rows:
        lines.append(f"layer by layer (each layer fed OpenCV's own input blobs; a layer passes when max |ours - "
                     f"OpenCV| <= {report.tolerance:g} x max |OpenCV|):")
        width = max(len(r.name) for r in report.rows)
        shown = report.rows if report.every_layer else [r for r in report.rows if not r.ok or r.note]
        worst = max(report.rows, key=lambda r: r.rel)
        if worst not in shown:
            shown = shown + [worst]
        for r in shown:
            flag = "" if r.ok else "  ABOVE TOLERANCE"
            label = " (the largest)" if r is worst and not report.every_layer and r.ok else ""
            lines.append(f"  {r.name:<{width}}  {str(r.shape):<20} {r.max_abs:13.3e} {r.rel:10.3e}{flag}{label}"
                         + (f"  ({r.note})" if r.note else ""))
    if report.figures:
        agree, total = report.top1
        lines.append(f"end to end over {report.probes} probe inputs (a figure, not a criterion: float32 rounding "
                     f"accumulates with depth):")
        for r in report.figures:
            lines.append(f"  {r.name}  {str(r.shape)}  max abs {r.max_abs:.3e}, relative {r.rel:.3e}")
        if total:
            lines.append(f"  top-1 agreement with OpenCV: {agree}/{total}")
    verdict = "OK" if report.ok else "FAILED"
    max_rel = f", max relative difference {report.max_rel:.3e}" if report.rows else ""
    lines.append(f"verify {verdict}: {len(report.rows)} layers compared{max_rel} (tolerance {report.tolerance:g}) "
                 f"against OpenCV {_cv2_version()} dnn, {report.where}"
                 + (f": {report.summary()}" if not report.ok else ""))
    return "\n".join(lines)
