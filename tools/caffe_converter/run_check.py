"""`--verify` in a child process: the written files are bound and run where a crash cannot take the converter down.

The parent (`verify_in_child`) writes a job file and runs `python -m tools.caffe_converter.run_check JOB`. The
child loads the staged checkpoint with stock `mx.model.load_checkpoint`, runs it end to end in an `mx.mod.Module`
on a few probe inputs (as a user would, MKLDNN fusion included), runs OpenCV's Caffe importer on the same
inputs, then compares layer by layer (layerwise.py), and writes its findings as JSON.

If the child dies (a signal, MKLDNN's "could not create a primitive descriptor", a hang) the parent names the
layer: a crash while a single layer ran is that layer (the child records each layer before running it); a
crash of the whole graph is bisected over the graph's outputs, running the graph cut after the k-th Caffe layer
in a fresh child until the first layer whose prefix crashes is found.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tools.caffe_converter.layerwise import (DEPARTURES, LAYER_TOLERANCE, LayerPlan, caffe_reference, cut_graph,
                                             entry_of, non_finite, relative)
from tools.caffe_converter.opencv_check import Row, VerifyReport, random_inputs, run_opencv

PROBES = 4  # random inputs for the end-to-end figure and its top-1 agreement; layer by layer uses the first
CHILD_TIMEOUT_S = 3600  # a child that runs longer is a hang, reported as such
_REPO = Path(__file__).resolve().parents[2]


# ---- the parent -------------------------------------------------------------------------------------------------
def plan_of(result) -> dict:
    """What the child needs from a ConversionResult, as JSON."""
    layers = [dict(name=name, entry=result.blob_symbols[name].list_outputs()[0], rgb=name in result.rgb_layers)
              for name in result.layer_order if name in result.blob_symbols]
    return dict(layers=layers, input_shapes={k: list(v) for k, v in result.input_shapes.items()},
                caffe_input_names=result.caffe_input_names, rgb=result.preprocess.channel_order == "RGB",
                classifier=result.preprocess.classifier or "", output_layers=list(result.output_layers),
                output_tops=list(result.output_tops or [0] * len(result.output_layers)))


def _run_child(job: dict, folder: Path, tag: str) -> Tuple[Optional[dict], str]:
    """(the child's findings or None, how it ended when it wrote none)."""
    job_path, out_path, progress = folder / f"{tag}.json", folder / f"{tag}.out.json", folder / f"{tag}.progress"
    job = dict(job, output=str(out_path), progress=str(progress))
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    with open(folder / f"{tag}.stderr", "w+b") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "tools.caffe_converter.run_check", str(job_path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        code = _wait_showing_progress(proc, progress, job["mode"] == "verify")
        stderr.seek(0)
        text = stderr.read().decode(errors="replace")
    if code is None:
        return None, f"no answer within {CHILD_TIMEOUT_S} s"
    if out_path.exists() and code == 0:
        return json.loads(out_path.read_text()), ""
    return None, _how_it_ended(code, text)


def _wait_showing_progress(proc: subprocess.Popen, progress: Path, show: bool) -> Optional[int]:
    """The child's exit status (None after CHILD_TIMEOUT_S, the child killed), printing the layer-by-layer
    progress (done/total, rate, ETA) on stdout beside the report (stderr keeps the one error line): in place on a
    terminal, every 10 s otherwise."""
    start, shown, tty, stage = time.monotonic(), 0.0, sys.stdout.isatty(), ""
    while True:
        try:
            code = proc.wait(timeout=1.0)
            if show and shown and tty:
                print()
            return code
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now - start > CHILD_TIMEOUT_S:
            proc.kill()
            proc.wait()
            return None
        fields = progress.read_text().split("\t") if show and progress.exists() else []
        if len(fields) == 1 and fields[0] != stage and fields[0].startswith("verify:"):
            stage = fields[0]
            print(stage, flush=True)
        if len(fields) == 4 and (tty or now - shown >= 10):
            done, total, since = int(fields[1]), int(fields[2]), float(fields[3])
            rate = done / max(time.time() - since, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("nan")
            line = f"verify: layer {done}/{total}, {rate:.1f} layers/s, ETA {eta:.0f} s"
            print("\r" + line if tty else line, end="" if tty else "\n", flush=True)
            shown = now


_DIED = ("killed by", "no answer within")  # how _how_it_ended and _run_child describe a crash or a hang


def _how_it_ended(code: int, stderr: str) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if "Segmentation fault" in stderr:  # MXNet's own SIGSEGV handler prints this and may exit with a status
        return "killed by SIGSEGV (MXNet: Segmentation fault)"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or [f"exit status {code}"])[-1][:300]


def verify_in_child(prefix, prototxt, caffemodel, result, tolerance: float = LAYER_TOLERANCE,
                    probes: int = PROBES, input_shapes: Optional[Dict[str, tuple]] = None,
                    in_process: bool = False) -> dict:
    """Run the checks of the module docstring on the checkpoint at `prefix` (epoch 0).

    Args:
        input_shapes: bind at these shapes (MXNet input names) instead of the declared ones.
        in_process: run here, not in a child (tests of many small nets; a crash is then a crash).

    Returns:
        The child's findings: rows (layer by layer), figures (end to end), top1, non_finite, or crash (the
        layer and how it ended), or opencv_error.
    """
    plan = plan_of(result)
    if input_shapes:
        plan["input_shapes"].update({k: list(v) for k, v in input_shapes.items()})
    plan["rois"] = _roi_inputs(prototxt, plan["caffe_input_names"])
    job = dict(mode="verify", prefix=str(prefix), prototxt=str(prototxt), caffemodel=str(caffemodel),
               tolerance=tolerance, probes=probes, plan=plan)
    with tempfile.TemporaryDirectory(prefix="caffe_verify_") as tmp:
        if in_process:
            return _verify(dict(job, progress=str(Path(tmp) / "progress")))
        folder = Path(tmp)
        found, ended = _run_child(job, folder, "verify")
        if found is not None and not found.get("graph_error"):
            return found
        if found is None and not ended.startswith(_DIED):  # a Python error of the check itself: no bisection
            return dict(child_error=ended)
        if found is None:
            progress = folder / "verify.progress"
            stage = progress.read_text().strip() if progress.exists() else ""
            if stage.startswith("layer "):
                return dict(crash=dict(layer=stage[6:].split("\t")[0], how=ended, alone=True))
        else:
            ended = found["graph_error"]
        layer = _bisect(job, folder)
        return dict(crash=dict(layer=layer, how=ended, alone=False))


def _bisect(job: dict, folder: Path) -> str:
    """The first Caffe layer whose prefix of the graph fails to run (in fresh children)."""
    layers = job["plan"]["layers"]
    good, bad = -1, len(layers)  # the whole graph failed
    while bad - good > 1:
        mid = (good + bad) // 2
        found, _ = _run_child(dict(job, mode="probe", entry=layers[mid]["entry"]), folder, f"probe{mid}")
        if found is not None and found.get("ran"):
            good = mid
        else:
            bad = mid
    return layers[bad]["name"] if bad < len(layers) else "(the graph's outputs)"


def verify_staged(prefix, prototxt, caffemodel, result, tolerance: float = LAYER_TOLERANCE,
                  every_layer: bool = False, input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
                  in_process: bool = False) -> VerifyReport:
    """`--verify`: the checkpoint at `prefix` run in a child process, compared with OpenCV layer by layer.

    Each converted layer is fed OpenCV's own input blobs (layerwise.py), so `tolerance` bounds one layer's
    rounding relative to its output's magnitude at any depth; the end-to-end difference and top-1 agreement
    over the probe inputs are figures. A crash of the graph, NaN/Inf parameters, or a layer MXNet cannot run
    fail it, naming the layer or parameter.

    Raises:
        OpenCVCannotRun: OpenCV's importer refuses the net (no reference to compare with).
    """
    found = verify_in_child(prefix, prototxt, caffemodel, result, tolerance, input_shapes=input_shapes,
                            in_process=in_process)
    report = VerifyReport(tolerance=tolerance, every_layer=every_layer, probes=found.get("probes", 0),
                          where="files on disk" + ("" if in_process else " run in a child process"))
    if found.get("opencv_error"):
        raise OpenCVCannotRun(found["opencv_error"])
    if found.get("non_finite"):
        report.failure = f"the written parameters hold NaN/Inf values: {'; '.join(found['non_finite'][:5])}"
        return report
    if found.get("child_error"):
        report.failure = f"the check could not run the written files ({found['child_error']})"
        return report
    if found.get("graph_error"):  # in process: no bisection
        report.failure = f"MXNet cannot run the converted graph ({found['graph_error']})"
        return report
    crash = found.get("crash")
    if crash:
        where = "when its operators run alone" if crash["alone"] else "when the graph is run up to it"
        report.failure = f"layer '{crash['layer']}': MXNet fails on the converted graph {where} ({crash['how']})"
        return report
    for r in found["rows"]:
        report.rows.append(Row(r["name"], tuple(r["shape"]), r["max_abs"], r["rel"], bool(r["rel"] <= tolerance),
                               r["note"]))
    report.figures = [Row(f["name"], tuple(f["shape"]), f["max_abs"], f["rel"], True) for f in found["figures"]]
    report.top1 = tuple(found["top1"])
    return report


class OpenCVCannotRun(Exception):
    """OpenCV's Caffe importer cannot run the net, so there is no reference to verify against."""


# ---- the child --------------------------------------------------------------------------------------------------
def _inputs(plan: dict, seed: int) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(OpenCV's inputs by Caffe name in BGR, MXNet's by MXNet name in the model's order) for one probe.

    Uniform noise, except an input of regions (`plan['rois']`, a ROIPooling's second bottom): rows of (image index,
    x1, y1, x2, y2) inside the image, as Faster R-CNN's proposals are."""
    inputs = random_inputs({k: tuple(v) for k, v in plan["input_shapes"].items()}, seed)
    images = [tuple(v) for k, v in plan["input_shapes"].items() if len(v) == 4 and k not in plan.get("rois", ())]
    batch, height, width = (images[0][0], images[0][2], images[0][3]) if images else (1, 1, 1)
    rng = np.random.default_rng(1000 + seed)
    for name in plan.get("rois", ()):
        count = plan["input_shapes"][name][0]
        x1, y1 = rng.uniform(0, width - 1, count), rng.uniform(0, height - 1, count)
        x2, y2 = x1 + rng.uniform(0, width - 1 - x1), y1 + rng.uniform(0, height - 1 - y1)
        inputs[name] = np.stack([rng.integers(0, batch, count), x1, y1, x2, y2], axis=1).astype(np.float32)
    cv = {plan["caffe_input_names"][k]: v for k, v in inputs.items()}
    mx_inputs = dict(inputs)
    if plan["rgb"]:
        mx_inputs["data"] = np.ascontiguousarray(inputs["data"][:, ::-1])
    return cv, mx_inputs


def _roi_inputs(prototxt, caffe_input_names: Dict[str, str]) -> List[str]:
    """The MXNet names of the inputs that are a ROIPooling's regions."""
    from tools.caffe_converter.caffe_io import read_prototxt
    by_caffe = {caffe: mx for mx, caffe in caffe_input_names.items()}
    return sorted({by_caffe[lp.bottom[1]] for lp in read_prototxt(prototxt).layer
                   if lp.type == "ROIPooling" and len(lp.bottom) > 1 and lp.bottom[1] in by_caffe})


def _bind_run(sym, mx_inputs: Dict[str, np.ndarray], arg_params, aux_params,
              unbatched: Sequence[str] = ()) -> List[np.ndarray]:
    """Forward `sym` as a user would: an mx.mod.Module bound for inference (MKLDNN fusion included). Inputs in
    `unbatched` (regions: one row per region, not per image) are declared without a batch axis."""
    import mxnet as mx
    data_names = [k for k in mx_inputs if k in sym.list_arguments()]
    labels = [n for n in sym.list_arguments() if n.endswith("_label") and n not in data_names]
    mod = mx.mod.Module(sym, data_names=data_names, label_names=labels or None, context=mx.cpu())
    mod.bind([mx.io.DataDesc(k, mx_inputs[k].shape, layout="" if k in unbatched else "NCHW") for k in data_names],
             for_training=False)
    mod.set_params(arg_params, aux_params, allow_missing=False, allow_extra=True)
    mod.forward(mx.io.DataBatch([mx.nd.array(mx_inputs[k]) for k in data_names]), is_train=False)
    return [o.asnumpy() for o in mod.get_outputs()]


def _probe(job: dict) -> dict:
    """Run the written graph cut at one entry (bisection of a crash)."""
    import mxnet as mx
    sym, arg_params, aux_params = mx.model.load_checkpoint(job["prefix"], 0)
    _, mx_inputs = _inputs(job["plan"], 0)
    _bind_run(sym.get_internals()[job["entry"]], mx_inputs, arg_params, aux_params, job["plan"].get("rois", ()))
    return dict(ran=True)


def _end_to_end(job: dict, sym, arg_params, aux_params) -> dict:
    """The outputs (and the classifier's logits) against OpenCV over the probe inputs: figures, not a criterion."""
    plan = job["plan"]
    names, outputs = _output_entries(plan, sym)
    worst: Dict[str, Tuple[float, float, tuple]] = {}
    agree, total = 0, 0
    keep = _keep_top_k(job, _internal_shapes(sym, _inputs(plan, 0)[1]))
    for seed in range(job["probes"]):
        cv_inputs, mx_inputs = _inputs(plan, seed)
        ours = _bind_run(outputs, mx_inputs, arg_params, aux_params, plan.get("rois", ()))
        theirs = run_opencv(job["prototxt"], job["caffemodel"], cv_inputs, names, missing_ok=True,
                            keep_top_k=keep) if names else []
        for name, a, b in zip(names, ours, theirs):
            if b is None:
                continue
            if a.size != b.size:
                worst[name] = (float("inf"), float("inf"), tuple(a.shape))
                continue
            max_abs, rel = relative(a, b)
            old = worst.get(name, (0.0, 0.0, ()))
            worst[name] = (max(old[0], max_abs), max(old[1], rel), tuple(a.shape))
            if a.ndim >= 2 and a.shape[1] > 1 and name == names[-1]:
                same = np.argmax(a, axis=1) == np.argmax(b.reshape(a.shape), axis=1)
                agree, total = agree + int(same.sum()), total + int(same.size)
    figures = [dict(name=n, shape=list(s), max_abs=m, rel=r) for n, (m, r, s) in worst.items()]
    return dict(figures=figures, top1=[agree, total], probes=job["probes"])


def _output_entries(plan: dict, sym):
    """(OpenCV layer names, a Group of the matching symbol outputs): the outputs OpenCV exposes, and the
    classifier's logits (a saturated softmax hides differences)."""
    import mxnet as mx
    names, outs = [], []
    many = len(sym.list_outputs()) > 1
    for i, (name, top) in enumerate(zip(plan["output_layers"], plan["output_tops"])):
        if top or name in plan["caffe_input_names"].values():
            continue  # OpenCV returns a layer's first top only; an input is the user's own
        names.append(name)
        outs.append(sym[i] if many else sym)
    internals = sym.get_internals()
    logits = f"{plan['classifier']}_output"
    if plan["classifier"] and plan["classifier"] not in names and logits in internals.list_outputs():
        names.insert(0, plan["classifier"])
        outs.insert(0, internals[logits])
    return names, mx.sym.Group(outs)


def _caffe_layers(prototxt) -> Dict[str, Tuple[object, List[str]]]:
    """Caffe layer name (a repeated name numbered as the converter and OpenCV number it) -> (its LayerParameter,
    for each bottom the layer that last wrote it, or the blob's own name for an input)."""
    from tools.caffe_converter.caffe_io import unique_layer_names, read_prototxt
    layers = list(read_prototxt(prototxt).layer)
    writer: Dict[str, str] = {}
    found = {}
    for layer, name in zip(layers, unique_layer_names(layers, str(prototxt))):
        found.setdefault(name, (layer, [writer.get(b, b) for b in layer.bottom]))
        for top in layer.top:
            writer[top] = name
    return found


def _keep_top_k(job: dict, shapes: Dict[str, tuple]) -> Dict[str, int]:
    """DetectionOutput layers with keep_top_k -1 (Caffe keeps every box; OpenCV 4.11 corrupts its memory on it):
    name -> the rows of our output, which OpenCV is then asked to keep."""
    found = {}
    entries = {spec["name"]: spec["entry"] for spec in job["plan"]["layers"]}
    for name, (param, _) in _caffe_layers(job["prototxt"]).items():
        shape = shapes.get(entries.get(name, ""))
        if param.type == "DetectionOutput" and param.detection_output_param.keep_top_k < 0 and shape:
            found[name] = int(shape[2])
    return found


def _internal_shapes(sym, mx_inputs: Dict[str, np.ndarray]) -> Dict[str, tuple]:
    internals = sym.get_internals()
    shapes = internals.infer_shape_partial(**{k: v.shape for k, v in mx_inputs.items()
                                              if k in internals.list_arguments()})[1]
    return dict(zip(internals.list_outputs(), shapes))


def _layer_by_layer(job: dict, sym, arg_params, aux_params, progress: Path) -> List[dict]:
    """Each compared layer's operators fed OpenCV's blobs (see layerwise.py); one row per layer."""
    import mxnet as mx
    from tools.caffe_converter.caffe_io import read_caffemodel
    plan = job["plan"]
    graph = json.loads(sym.tojson())
    nodes = graph["nodes"]
    caffe = _caffe_layers(job["prototxt"])
    candidates, seen = [], set()
    for spec in plan["layers"]:
        entry = entry_of(nodes, spec["entry"])
        if entry in seen or nodes[entry[0]]["op"] == "null" or spec["name"] not in caffe:
            continue  # the same value as an earlier layer's (Split), or an input
        seen.add(entry)
        param, bottoms = caffe[spec["name"]]
        candidates.append((LayerPlan(spec["name"], param.type, spec["entry"], spec["rgb"], bottoms[0] if bottoms
                                     else ""), entry, param))
    cv_inputs, mx_inputs = _inputs(plan, 0)
    shapes = _internal_shapes(sym, mx_inputs)
    names = [p.name for p, _, _ in candidates]
    # the bottoms of layers whose reference is Caffe's formula (layerwise.DEPARTURES), fetched too
    extra = sorted({b for p, _, param in candidates if param.type in DEPARTURES for b in caffe[p.name][1]}
                   - set(names) - set(cv_inputs))
    values = run_opencv(job["prototxt"], job["caffemodel"], cv_inputs, names + extra, missing_ok=True,
                        keep_top_k=_keep_top_k(job, shapes))
    # a layer OpenCV does not expose is computed inside the run of layers ending at the next one it does
    layers = [c for c, v in zip(candidates, values) if v is not None]
    blobs = {name: v for name, v in zip(names + extra, values) if v is not None}
    blobs.update(cv_inputs)
    feeds = {entry: f"__blob{i}" for i, (_, entry, _) in enumerate(layers)}
    by_var = {feeds[e]: p for p, e, _ in layers}
    weights = None
    rows = []
    since = time.time()
    for done, (spec, entry, param) in enumerate(layers):
        progress.write_text(f"layer {spec.name}\t{done}\t{len(layers)}\t{since}")
        text, used = cut_graph(graph, entry, {e: v for e, v in feeds.items() if e != entry})
        sub = mx.sym.load_json(text)
        given = dict(mx_inputs)
        for var in used:
            feeder = by_var[var]
            value = blobs[feeder.name].reshape(shapes[feeder.entry])
            given[var] = np.ascontiguousarray(value[:, ::-1]) if feeder.rgb else value
        try:
            (ours,) = _run_sub(sub, given, arg_params, aux_params)
        except mx.base.MXNetError as err:
            rows.append(dict(name=spec.name, type=spec.type, shape=[], max_abs=float("inf"), rel=float("inf"),
                             note=f"MXNet cannot run it: {str(err).strip().splitlines()[0][:200]}"))
            continue
        if spec.rgb:
            ours = np.ascontiguousarray(ours[:, ::-1])
        ref, why = None, ""
        if param.type in DEPARTURES:
            if param.type == "InnerProduct" and weights is None:
                weights = read_caffemodel(job["caffemodel"])
            x = [blobs.get(b) for b in caffe[spec.name][1]]
            w = [np.asarray(b) for b in weights[spec.name].blobs] if param.type == "InnerProduct" else []
            ref, why = caffe_reference(param, x, w) if all(v is not None for v in x) else (None, "")
        ref = blobs[spec.name] if ref is None else ref
        if ours.size != ref.size:
            rows.append(dict(name=spec.name, type=spec.type, shape=list(ours.shape), max_abs=float("inf"),
                             rel=float("inf"), note=f"OpenCV shape {tuple(ref.shape)}"))
            continue
        max_abs, rel = relative(ours, ref.reshape(ours.shape))
        rows.append(dict(name=spec.name, type=spec.type, shape=list(ours.shape), max_abs=max_abs, rel=rel, note=why))
    progress.write_text("done")
    return rows


def _run_sub(sym, given: Dict[str, np.ndarray], arg_params, aux_params) -> List[np.ndarray]:
    """Bind one layer's sub-graph with its fed blobs and the written parameters (labels: zeros)."""
    import mxnet as mx
    shapes = {k: v.shape for k, v in given.items() if k in sym.list_arguments()}
    arg_shapes, _, _ = sym.infer_shape_partial(**shapes)
    args = {}
    for name, shape in zip(sym.list_arguments(), arg_shapes):
        args[name] = mx.nd.array(given[name]) if name in given else arg_params.get(name, None)
        if args[name] is None:  # a SoftmaxOutput label, unused by the forward pass
            args[name] = mx.nd.zeros(shape)
    aux = {name: aux_params[name] for name in sym.list_auxiliary_states()}
    exe = sym.bind(mx.cpu(), args=args, aux_states=aux, grad_req="null")
    return [o.asnumpy() for o in exe.forward(is_train=False)]


def _verify(job: dict) -> dict:
    import mxnet as mx
    progress = Path(job["progress"])
    progress.write_text("loading")
    sym, arg_params, aux_params = mx.model.load_checkpoint(job["prefix"], 0)
    bad = non_finite(arg_params) + non_finite(aux_params)
    if bad:
        return dict(non_finite=bad)
    progress.write_text(f"verify: the whole graph and OpenCV on {job['probes']} probe inputs")
    try:
        found = _end_to_end(job, sym, arg_params, aux_params)
        found["rows"] = _layer_by_layer(job, sym, arg_params, aux_params, progress)
    except mx.base.MXNetError as err:  # the whole graph (single layers' errors are rows)
        return dict(graph_error=_first_error_line(str(err)))
    except Exception as err:  # OpenCV's own failure: the reference cannot run this net
        if type(err).__module__.split(".")[0] != "cv2":
            raise
        return dict(opencv_error=_first_error_line(str(err)))
    return found


def _first_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    picked = [ln for ln in lines if "error:" in ln or "Error" in ln or "Check failed" in ln]
    return (picked or lines or ["(no message)"])[0][:300]


def main(argv: Optional[List[str]] = None) -> int:
    job = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    found = _probe(job) if job["mode"] == "probe" else _verify(job)
    Path(job["output"]).write_text(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
