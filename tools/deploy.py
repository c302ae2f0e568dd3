"""Deployment bundle: one folder that legacy MXNet serving code, Gluon, C/C++ and (optionally) ONNX can load.

    python -m tools.deploy PREFIX EPOCH OUTDIR [--name model] [--classes CLASSMAP|LST|REC] [--onnx] [--force]

writes, as one unit (recbuild.publish: built and checked in `.OUTDIR.PID.part`, then swapped in; an old bundle is
moved aside and removed only after; a killed run's leftovers are removed by the next; one deploy per OUTDIR):

    OUTDIR/model-symbol.json      inference symbol (SoftmaxOutput -> softmax of the same name, see below)
    OUTDIR/model-0000.params      only the parameters the symbol uses, `arg:`/`aux:` keyed as always
    OUTDIR/model-preprocess.json  the preprocessing sidecar (symbols/sidecar.py), class names included
    OUTDIR/model.classes.json     the class map (recbuild/classmap.py): label index -> name
    OUTDIR/model.onnx             with --onnx (tools/onnx_export.py)
    OUTDIR/README.md              how to load it four ways, the input recipe and where it came from

Why the SoftmaxOutput is rewritten: SoftmaxOutput is a training op with a `softmax_label` input. Its forward
pass is exactly `softmax`, and stock `mx.mod.Module(..., label_names=None)` and MXPredCreate ignore the label,
but `gluon.SymbolBlock.imports` treats the label as a missing parameter and refuses the file. The bundle
therefore carries `softmax` under the same layer name, so the output is still called `<name>_output` and
predictions are bit-identical; keep the training checkpoint to resume training.

After writing, `--check` (on by default) feeds one seeded input through mx.mod.Module, gluon.SymbolBlock and
the C predict API (and onnxruntime with --onnx) and fails if they disagree.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from recbuild.atomic import atomic_open
from recbuild.publish import output_error_line, publish
from recbuild.classmap import write_class_map
from symbols.checkpoint import load_checkpoint, save_checkpoint
from symbols.classes import ClassNamesError, model_class_names
from symbols.sidecar import Preprocess, copy_mean_file, save_sidecar, sidecar_path
from tools.inference_graph import DeployError, inference_symbol, load_for_inference, used_params
from tools.onnx_export import ONNX_ATOL, ONNX_RTOL, export_onnx, run_onnxruntime

log = logging.getLogger(__name__)

# Defaults in one place.
DEFAULT_NAME = "model"
DEFAULT_EPOCH_OUT = 0  # serving code usually hard-codes epoch 0; the source epoch is recorded in README/sidecar
# Loaders must agree to float32 round-off: the same kernels run underneath, only the entry point differs.
PARITY_RTOL, PARITY_ATOL = 1e-5, 1e-6


@dataclass
class Bundle:
    """Paths of a written bundle."""

    outdir: Path
    name: str

    @property
    def prefix(self) -> Path:
        return self.outdir / self.name

    @property
    def symbol_file(self) -> Path:
        return self.outdir / f"{self.name}-symbol.json"

    @property
    def params_file(self) -> Path:
        return self.outdir / f"{self.name}-{DEFAULT_EPOCH_OUT:04d}.params"

    @property
    def onnx_file(self) -> Path:
        return self.outdir / f"{self.name}.onnx"


# ---- the three (four) loaders ---------------------------------------------------------------------------------
def predict_module(bundle: Bundle, x: np.ndarray, input_name: str = "data") -> np.ndarray:
    """Predictions through stock mx.model.load_checkpoint + mx.mod.Module, as legacy serving code does."""
    import mxnet as mx

    sym, arg, aux = load_checkpoint(bundle.prefix, DEFAULT_EPOCH_OUT, "bundle")
    mod = mx.mod.Module(sym, data_names=[input_name], label_names=None, context=mx.cpu())
    mod.bind(data_shapes=[(input_name, x.shape)], for_training=False)
    mod.set_params(arg, aux)
    mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
    return mod.get_outputs()[0].asnumpy()


def predict_gluon(bundle: Bundle, x: np.ndarray, input_name: str = "data") -> np.ndarray:
    """Predictions through gluon.SymbolBlock.imports."""
    import mxnet as mx

    with _quiet_warnings():
        net = mx.gluon.SymbolBlock.imports(str(bundle.symbol_file), [input_name], str(bundle.params_file))
    return net(mx.nd.array(x)).asnumpy()


def predict_c_api(bundle: Bundle, x: np.ndarray, input_name: str = "data") -> np.ndarray:
    """Predictions through the C predict API (MXPredCreate ... MXPredFree) via ctypes."""
    from tools.c_predict import CPredictor

    with CPredictor.from_files(bundle.symbol_file, bundle.params_file, {input_name: x.shape}) as pred:
        return pred.forward(**{input_name: x})[0]


def predict_onnx(bundle: Bundle, x: np.ndarray) -> np.ndarray:
    """Predictions through onnxruntime on the bundle's ONNX file."""
    return run_onnxruntime(bundle.onnx_file, x)


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def check_parity(bundle: Bundle, pre: Preprocess, batch: int = 2, seed: int = 0,
                 with_onnx: bool = False) -> Dict[str, float]:
    """Run one seeded batch of images through every loader; return max |difference| to Module per loader.

    Raises:
        RuntimeError: a loader disagrees with mx.mod.Module beyond float32 round-off.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch, pre.input_shape[1], pre.input_shape[2], pre.input_shape[0]))
    x = pre.apply(images.astype(np.float32), bundle.outdir)
    ref = predict_module(bundle, x, pre.input_name)
    loaders = {"gluon.SymbolBlock": lambda: predict_gluon(bundle, x, pre.input_name),
               "C predict API": lambda: predict_c_api(bundle, x, pre.input_name)}
    if with_onnx:
        loaders["onnxruntime"] = lambda: predict_onnx(bundle, x)
    diffs = {}
    for name, run in loaders.items():
        got = run()
        rtol, atol = (ONNX_RTOL, ONNX_ATOL) if name == "onnxruntime" else (PARITY_RTOL, PARITY_ATOL)
        if got.shape != ref.shape or not np.allclose(got, ref, rtol=rtol, atol=atol):
            diff = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
            raise RuntimeError(f"{bundle.outdir}: {name} disagrees with mx.mod.Module (max |diff| {diff:.3g}, "
                               f"shapes {got.shape} vs {ref.shape})")
        diffs[name] = float(np.abs(got - ref).max())
    return diffs


# ---- writing ---------------------------------------------------------------------------------------------------
README_TEMPLATE = """# {name}: deployment bundle

Made by `python -m tools.deploy {prefix} {epoch} ...` on {date} from checkpoint `{prefix}` epoch {epoch}.
{num_classes} classes: {classes}.

## Files
- `{name}-symbol.json`, `{name}-{epoch_out:04d}.params`: the MXNet 1.x checkpoint (inference symbol: the final
  SoftmaxOutput is the forward-identical `softmax`, output `{output}`).
- `{name}-preprocess.json`: how to turn an image into the input (below); `{name}.classes.json`: label -> name.
{onnx_line}
## Input
`{input_name}`: float32 (N, {c}, {h}, {w}); image pixels in [0, 255] in **{order}** order,
then `x = (x - mean) / std * scale` with mean = {mean}, std = {std}, scale = {scale}.
Output `{output}`: (N, {num_classes}) class probabilities.

## Load it
```python
import mxnet as mx
sym, arg, aux = mx.model.load_checkpoint("{name}", {epoch_out})              # legacy Module
mod = mx.mod.Module(sym, label_names=None); mod.bind([("data", (1, {c}, {h}, {w}))], for_training=False)
mod.set_params(arg, aux)
net = mx.gluon.SymbolBlock.imports("{name}-symbol.json", ["data"], "{name}-{epoch_out:04d}.params")  # Gluon
```
C/C++: `MXPredCreate(symbol_json, params_bytes, size, 1, 0, 1, {{"data"}}, {{0, 4}}, {{N, {c}, {h}, {w}}}, &h)`,
then `MXPredSetInput`, `MXPredForward`, `MXPredGetOutput`.
{onnx_load}"""


def check_bundle_name(name: str) -> None:
    """--name is a plain file name inside OUTDIR: `../x` or `/tmp/x` would write the bundle's files outside it.

    Raises:
        DeployError: the name is empty, holds a path separator or NUL, or starts with '.' ('.', '..', hidden).
    """
    if not name or name.startswith(".") or any(c in name for c in ("/", "\\", "\0", os.sep)):
        raise DeployError(f"--name {name!r}: expected a plain file name (no '/', '\\', not starting with '.'), "
                          f"e.g. {DEFAULT_NAME}; the files are written inside OUTDIR as NAME-symbol.json, ...")


def write_bundle(prefix: str, epoch: int, outdir: Path, name: str = DEFAULT_NAME, classes: Optional[str] = None,
                 onnx: bool = False, force: bool = False, check: bool = True) -> Tuple[Bundle, dict]:
    """Write the deploy bundle of checkpoint `prefix`/`epoch` into `outdir`, atomically.

    Args:
        prefix: checkpoint prefix (PREFIX-symbol.json, PREFIX-NNNN.params, PREFIX-preprocess.json).
        epoch: checkpoint epoch.
        outdir: bundle folder; must not exist or be empty unless `force`.
        name: file name prefix inside the bundle.
        classes: a class map, or a .lst/.rec/.idx beside one: names the outputs of a model whose sidecar has
            no class names; for a model that has them it must list the same classes in the same order.
        onnx: also export `NAME.onnx`.
        force: replace a non-empty `outdir`.
        check: run the parity check on the written bundle before it is moved into place.

    Returns:
        The bundle and a summary dict (classes, dropped params, parity figures).
    """
    check_bundle_name(name)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise DeployError(f"{outdir}: exists and is not a folder")
    if outdir.is_dir() and any(outdir.iterdir()) and not force:
        raise DeployError(f"{outdir}: folder is not empty; pass --force to replace it")
    pre, sym, arg_params, aux_params = load_for_inference(prefix, epoch)
    sym = inference_symbol(sym)
    arg_params, aux_params, unused = used_params(sym, arg_params, aux_params, pre, f"{prefix}-{epoch:04d}.params")
    _, out_shapes, _ = sym.infer_shape(**{pre.input_name: (1,) + tuple(pre.input_shape)})
    num_outputs = int(np.prod(out_shapes[0][1:]))
    try:  # the one class-name rule (symbols/classes.py), shared with train.predict; a bundle needs real names
        names = model_class_names(pre.class_names, sidecar_path(prefix), classes, num_outputs, required=True)
    except ClassNamesError as err:
        raise DeployError(str(err)) from None

    outdir.parent.mkdir(parents=True, exist_ok=True)
    # One unit (recbuild.publish): the bundle is built in `.OUTDIR.PID.part`, checked there, then swapped in; the
    # old bundle (with --force) is moved aside and removed only after; a killed run's leftovers go on the next run.
    with publish(outdir) as unit:
        tmp = unit.stage(outdir, folder=True)
        bundle = Bundle(tmp, name)
        # dtype=None: the parameters keep the checkpoint's dtype, as mx.model.save_checkpoint keeps them.
        save_checkpoint(bundle.prefix, DEFAULT_EPOCH_OUT, sym, arg_params, aux_params, dtype=None)
        bundle_pre = copy_mean_file(pre, prefix, bundle.prefix)
        bundle_pre = replace(bundle_pre, num_classes=len(names), class_names=names,
                             source={**(pre.source or {}), "deployed_from": {"prefix": str(prefix), "epoch": epoch}})
        save_sidecar(bundle.prefix, bundle_pre)
        write_class_map(bundle.prefix, names)
        if onnx:
            export_onnx(sym, arg_params, aux_params, bundle_pre, bundle.onnx_file,
                        metadata={"class_names": json.dumps(names), "preprocess": json.dumps(bundle_pre.to_dict())},
                        verify=False)
        _write_readme(bundle, bundle_pre, prefix, epoch, names, onnx)
        parity = check_parity(bundle, bundle_pre, with_onnx=onnx) if check else {}
    return Bundle(outdir, name), {"classes": names, "unused_params": unused, "parity": parity}


def _write_readme(bundle: Bundle, pre: Preprocess, prefix: str, epoch: int, names: List[str], onnx: bool) -> None:
    c, h, w = pre.input_shape
    shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
    onnx_line = (f"- `{bundle.name}.onnx`: the same network for onnxruntime (opset 13, dynamic batch; "
                 f"see tools/onnx_export.py for its limits).\n") if onnx else ""
    onnx_load = (f"ONNX: `onnxruntime.InferenceSession(\"{bundle.name}.onnx\").run(None, {{\"data\": x}})`.\n"
                 if onnx else "")
    text = README_TEMPLATE.format(
        name=bundle.name, prefix=prefix, epoch=epoch, epoch_out=DEFAULT_EPOCH_OUT,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), num_classes=len(names), classes=shown,
        onnx_line=onnx_line, onnx_load=onnx_load, input_name=pre.input_name, c=c, h=h, w=w,
        order=pre.channel_order, mean=pre.mean, std=pre.std if pre.std is not None else 1, scale=pre.scale,
        output=f"{pre.output_name}_output")
    with atomic_open(bundle.outdir / "README.md", "w", encoding="utf-8") as handle:
        handle.write(text)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m tools.deploy` command line."""
    parser = argparse.ArgumentParser(prog="python -m tools.deploy",
                                     description="Write a deployment bundle of an MXNet checkpoint.")
    parser.add_argument("prefix", help="checkpoint prefix (PREFIX-symbol.json, PREFIX-NNNN.params)")
    parser.add_argument("epoch", type=int, help="checkpoint epoch")
    parser.add_argument("outdir", type=Path, help="bundle folder (created; must be empty unless --force)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"file prefix inside the bundle (default {DEFAULT_NAME})")
    parser.add_argument("--classes", help="class map (*.classes.json) or a .lst/.rec beside one, for a model "
                                          "whose sidecar has no class names (a converted one); for a model "
                                          "that has them it must agree")
    parser.add_argument("--onnx", action="store_true", help="also export NAME.onnx (tools/onnx_export.py)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUTDIR")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the Module / Gluon / C API (/ onnxruntime) parity check")
    return parser


def main(argv: Sequence[str] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.time()
    try:
        bundle, summary = write_bundle(args.prefix, args.epoch, args.outdir, name=args.name, classes=args.classes,
                                       onnx=args.onnx, force=args.force, check=args.check)
    except (DeployError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # disk full, read-only folder, ...: the earlier bundle is left whole
        print(output_error_line(err), file=sys.stderr)
        return 1
    files = sorted(p.name for p in bundle.outdir.iterdir())
    unused = summary["unused_params"]
    parity = ", ".join(f"{k} max|diff| {v:.1e}" for k, v in summary["parity"].items()) or "not checked (--no-check)"
    print(f"deploy bundle {bundle.outdir} ({time.time() - start:.1f} s): {', '.join(files)}. "
          f"{len(summary['classes'])} classes. Parity with mx.mod.Module: {parity}. "
          + (f"Left out {len(unused)} params the symbol does not use: {', '.join(unused[:8])}."
             if unused else "Every param is used by the symbol."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
