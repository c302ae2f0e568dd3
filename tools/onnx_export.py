"""ONNX export of an MXNet checkpoint with mx.onnx.export_model, made to work with today's onnx/onnxruntime.

    python -m tools.onnx_export PREFIX EPOCH OUT.onnx [--no-verify]

The wheel's exporter (mxnet 1.9.1, `mx.onnx`) predates onnx 1.15 and has default-value bugs. This module works
around each one explicitly and then checks the result against MXNet with onnxruntime:

- `onnx.mapping` was removed in onnx 1.15: a stand-in module with the two dictionaries it used is installed
  while exporting (built from onnx.helper.tensor_dtype_to_np_dtype).
- The exporter stamps the model with the *installed* onnx's newest opset (28 with onnx 1.23) although it only
  implements opsets 12-13, and onnxruntime refuses unreleased opsets: we export as opset 13 and set the IR
  version to the minimum that opset needs.
- FullyConnected without an explicit `flatten` attribute is exported as flatten=False (MXNet's default is
  True), which breaks Gemm after a conv/pool: `flatten` is written explicitly before export.
- BatchNorm's `fix_gamma` (MXNet default True: gamma is treated as 1) is ignored by the exporter: gamma is
  set to ones in the exported copy of the params wherever MXNet would ignore it.
- SoftmaxOutput needs its label as an input: the inference symbol (tools/inference_graph.py) uses `softmax`
  instead.
- Weights are exported as graph inputs too; they are removed from the inputs so onnxruntime can fold them.

Limits: only operators the wheel's exporter knows (get_operator_support(13)); the list of unsupported ones is
reported before anything is written. The batch axis is dynamic, C/H/W are fixed to the sidecar's input shape
(the open_nsfw net's 7x7 average pool needs 224 anyway). Tested on VGG-like and ResNet-like nets (Convolution,
BatchNorm, Activation, Pooling max/avg/global incl. 'full' convention, elementwise add, FullyConnected,
Dropout, Flatten, softmax); other ops are the exporter's own responsibility and are caught by the check.
A 'full'-convention (Caffe-style, ceil) pooling whose last window starts in the padding is refused with the
layer named: MXNet keeps that window, ONNX drops it. Data layout must be NCHW, float32.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import types
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Union

import numpy as np

from recbuild.atomic import atomic_path
from symbols.sidecar import Preprocess
from tools.caffe_converter.layers import caffe_pool_size
from tools.inference_graph import DeployError, inference_symbol, load_for_inference

log = logging.getLogger(__name__)

OPSET = 13  # the newest opset mxnet 1.9.1's exporter implements
# The bar: onnxruntime matches MXNet within 1e-4 relative (atol only for probabilities near 0).
ONNX_RTOL, ONNX_ATOL = 1e-4, 1e-6


class OnnxExportError(DeployError):
    """The symbol cannot be exported; the message names the layer."""


@contextlib.contextmanager
def _exporter_compat() -> Iterator[None]:
    """Make mx.onnx.export_model run on onnx >= 1.15 and stamp opset 13 (restored afterwards)."""
    import onnx
    import onnx.defs
    from onnx import TensorProto, helper

    saved_module = sys.modules.get("onnx.mapping")
    saved_attr = getattr(onnx, "mapping", None)
    saved_opset = onnx.defs.onnx_opset_version
    if saved_module is None:
        codes = [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.INT16,
                 TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32,
                 TensorProto.UINT64, TensorProto.BOOL]
        mapping = types.ModuleType("onnx.mapping")
        mapping.TENSOR_TYPE_TO_NP_TYPE = {c: helper.tensor_dtype_to_np_dtype(c) for c in codes}
        mapping.NP_TYPE_TO_TENSOR_TYPE = {v: k for k, v in mapping.TENSOR_TYPE_TO_NP_TYPE.items()}
        sys.modules["onnx.mapping"] = mapping
        onnx.mapping = mapping
    # The exporter reads the opset from onnx.defs at call time; both the node converters and the model stamp
    # then agree on opset 13.
    onnx.defs.onnx_opset_version = lambda: OPSET
    try:
        yield
    finally:
        onnx.defs.onnx_opset_version = saved_opset
        if saved_module is None:
            sys.modules.pop("onnx.mapping", None)
            if saved_attr is None and hasattr(onnx, "mapping"):
                del onnx.mapping


def _check_pooling_windows(sym, graph: dict, input_shape: Sequence[int]) -> None:
    """Refuse a 'full'-convention pooling whose last window starts in the padding.

    MXNet's 'full' convention keeps such a window; ONNX's ceil_mode drops it, as Caffe does, so the output
    would be one row/column smaller. Caffe's rule is the converter's (`caffe_pool_size`): where it differs
    from the rounded-up size, ONNX differs from MXNet.
    """
    internals = sym.get_internals()
    _, shapes, _ = internals.infer_shape_partial(data=tuple(input_shape))
    shape_of = dict(zip(internals.list_outputs(), shapes))
    for node in graph["nodes"]:
        attrs = node.get("attrs", {})
        if node["op"] != "Pooling" or attrs.get("pooling_convention") != "full" or attrs.get("global_pool") in (
                "True", "1"):
            continue
        src = graph["nodes"][node["inputs"][0][0]]
        in_shape = shape_of.get(src["name"] if src["op"] == "null" else f"{src['name']}_output")
        if not in_shape:
            continue
        kernel, stride = _pair(attrs.get("kernel")), _pair(attrs.get("stride"), 1)
        pad = _pair(attrs.get("pad"), 0)
        for size, k, s, p in zip(in_shape[2:], kernel, stride, pad):
            full = -(-(size + 2 * p - k) // s) + 1  # MXNet's 'full': rounded up, every window kept
            if caffe_pool_size(size, k, s, p, ceil=True) != full:
                raise OnnxExportError(
                    f"layer {node['name']} (Pooling, 'full' convention): its last window starts in the padding "
                    f"for input size {size}; MXNet keeps it, ONNX drops it. Export at an input size where "
                    f"(size + 2*pad - kernel) is a multiple of the stride, or use pad 0")


def _pair(text, default=None):
    if not text or text == "()":
        return (default, default)
    values = [int(v) for v in text.strip("()[] ").split(",") if v.strip()]
    return tuple(values) if len(values) == 2 else (values[0], values[0])


def prepare_for_exporter(sym, arg_params: dict, aux_params: dict, input_shape: Sequence[int] = None):
    """Spell out the defaults the exporter gets wrong; return (symbol, params dict) to export.

    Raises:
        OnnxExportError: a layer uses an operator the exporter does not implement.
    """
    import mxnet as mx
    from mxnet.onnx import get_operator_support

    graph = json.loads(sym.tojson())
    supported = set(get_operator_support(OPSET))
    unsupported = [f"{n['name']} ({n['op']})" for n in graph["nodes"] if n["op"] != "null" and n["op"] not in supported]
    if unsupported:
        raise OnnxExportError(f"layers with operators mxnet's ONNX exporter does not support: "
                              f"{', '.join(unsupported[:8])}; supported: see mx.onnx.get_operator_support()")
    if input_shape is not None:
        _check_pooling_windows(sym, graph, input_shape)
    params = {k: v.copy() for k, v in {**arg_params, **aux_params}.items()}
    for node in graph["nodes"]:
        attrs = node.setdefault("attrs", {})
        if node["op"] == "FullyConnected":
            attrs.setdefault("flatten", "True")
        elif node["op"] == "BatchNorm" and attrs.get("fix_gamma", "True") in ("True", "true", "1"):
            gamma = graph["nodes"][node["inputs"][1][0]]["name"]
            params[gamma] = mx.nd.ones_like(params[gamma])
            attrs["fix_gamma"] = "False"
    return mx.sym.load_json(json.dumps(graph)), params


def export_onnx(sym, arg_params: dict, aux_params: dict, pre: Preprocess, out_path, metadata: Optional[Dict] = None,
                verify: bool = True, sidecar_dir: Union[str, Path] = ".") -> Dict[str, float]:
    """Export the inference symbol to `out_path` (atomically) with a dynamic batch axis.

    Args:
        sym: the symbol to export (tools.inference_graph.inference_symbol is applied to it).
        arg_params, aux_params: its parameters.
        pre: the preprocessing sidecar (input name and shape).
        out_path: the .onnx file to write.
        metadata: string key/values stored in the model's metadata_props (class names, preprocessing).
        verify: compare onnxruntime with MXNet on a seeded batch and raise if beyond ONNX_RTOL/ONNX_ATOL.
        sidecar_dir: the folder of the sidecar `pre` was read from (a mean image is relative to it), for the check.

    Returns:
        {"max_abs_diff": ..., "max_rel_diff": ...} when verified, else {}.
    """
    import mxnet as mx
    import onnx

    sym = inference_symbol(sym)
    if verify:  # a missing or mis-shaped mean image fails the check: say so before anything is written
        pre.mean_array(sidecar_dir)
    shape = (1,) + tuple(pre.input_shape)
    export_sym, params = prepare_for_exporter(sym, arg_params, aux_params, shape)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, _exporter_compat(), _quiet_mxnet_logs():
        mx.onnx.export_model(export_sym, params, in_shapes=[shape], in_types=[np.float32], onnx_file_path=str(tmp),
                             dynamic=True, dynamic_input_shapes=[(None,) + tuple(pre.input_shape)])
        model = onnx.load(str(tmp))
        initializers = {init.name for init in model.graph.initializer}
        kept = [i for i in model.graph.input if i.name not in initializers]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
        model.producer_name, model.producer_version = "mxtransfer (mx.onnx.export_model)", mx.__version__
        for key, value in (metadata or {}).items():
            model.metadata_props.add(key=str(key), value=str(value))
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
    if not verify:
        return {}
    return verify_onnx(sym, arg_params, aux_params, pre, out_path, sidecar_dir)


@contextlib.contextmanager
def _quiet_mxnet_logs():
    # The exporter logs every node at INFO through the root logger; keep our CLI output readable.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def run_onnxruntime(onnx_file, x: np.ndarray) -> np.ndarray:
    """First output of the model for input `x`, on onnxruntime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's concern
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})[0]


def verify_onnx(sym, arg_params: dict, aux_params: dict, pre: Preprocess, onnx_file,
                sidecar_dir: Union[str, Path] = ".", batch: int = 2, seed: int = 0) -> Dict[str, float]:
    """Compare onnxruntime with mx.mod.Module on a seeded batch; raise if they differ beyond the tolerance.

    The batch is seeded random RGB images in [0, 255] turned into model input by the one preprocessing formula,
    `Preprocess.apply`, with `sidecar_dir` (the checkpoint's folder, where a mean image lives).

    Raises:
        ValueError: the sidecar's mean image is missing beside it or has another shape (named).
        RuntimeError: onnxruntime and MXNet differ beyond ONNX_RTOL / ONNX_ATOL.
    """
    import mxnet as mx

    c, h, w = pre.input_shape
    images = np.random.default_rng(seed).integers(0, 256, size=(batch, h, w, c)).astype(np.float32)
    x = pre.apply(images, sidecar_dir)  # the model's own preprocessing: the input range it was trained on
    mod = mx.mod.Module(sym, data_names=[pre.input_name], label_names=None, context=mx.cpu())
    mod.bind(data_shapes=[(pre.input_name, x.shape)], for_training=False)
    mod.set_params(arg_params, aux_params, allow_missing=False, allow_extra=True)
    mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
    ref = mod.get_outputs()[0].asnumpy()
    got = run_onnxruntime(onnx_file, x)
    diff = np.abs(got - ref)
    figures = {"max_abs_diff": float(diff.max()), "max_rel_diff": float((diff / np.maximum(np.abs(ref), 1e-12)).max())}
    if got.shape != ref.shape or not np.allclose(got, ref, rtol=ONNX_RTOL, atol=ONNX_ATOL):
        raise RuntimeError(f"{onnx_file}: onnxruntime differs from MXNet beyond rtol {ONNX_RTOL} / atol {ONNX_ATOL} "
                           f"(max abs diff {figures['max_abs_diff']:.3g}, shapes {got.shape} vs {ref.shape})")
    return figures


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.onnx_export", description="Export a checkpoint to ONNX.")
    parser.add_argument("prefix", help="checkpoint prefix (with PREFIX-preprocess.json beside it)")
    parser.add_argument("epoch", type=int)
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the onnxruntime-vs-MXNet check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.time()
    try:
        pre, sym, arg_params, aux_params = load_for_inference(args.prefix, args.epoch, "it gives the input shape")
        meta = {"preprocess": json.dumps(pre.to_dict())}
        if pre.class_names:
            meta["class_names"] = json.dumps(pre.class_names)
        figures = export_onnx(sym, arg_params, aux_params, pre, args.out, metadata=meta, verify=args.verify,
                              sidecar_dir=Path(args.prefix).parent)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    check = (f"onnxruntime vs MXNet: max abs diff {figures['max_abs_diff']:.2e}, max rel diff "
             f"{figures['max_rel_diff']:.2e} (bar: rtol {ONNX_RTOL})" if figures else "not verified (--no-verify)")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, opset {OPSET}, dynamic batch) in "
          f"{time.time() - start:.1f} s; {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
