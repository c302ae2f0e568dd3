"""Convert a Caffe model: load it, walk it, and write an MXNet checkpoint with its preprocessing sidecar.

`convert(prototxt, caffemodel, prefix)` writes `PREFIX-symbol.json`, `PREFIX-0000.params` (loadable by
`mx.model.load_checkpoint(PREFIX, 0)`) and `PREFIX-preprocess.json` (symbols/sidecar.py), plus `PREFIX-mean.npy`
when a mean image is given. The steps live in their own modules: caffe_io (read the files), graph (the walk
and its passes), preprocess (the sidecar), params_writer (the fast `.params` writer).
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from recbuild.atomic import atomic_path
from recbuild.publish import publish, remove_dead_leftovers
from symbols.checkpoint import params_blob, params_path, save_symbol
from symbols.sidecar import SUFFIX as SIDECAR_SUFFIX
from symbols.sidecar import Preprocess, save_sidecar
from tools.caffe_converter.caffe_io import load_net
from tools.caffe_converter.errors import CaffeFormatError, ConversionError, UnsupportedLayerError  # noqa: F401
from tools.caffe_converter.graph import convert_net
from tools.caffe_converter.params_writer import save_params
from tools.caffe_converter.preprocess import build_preprocess
from tools.caffe_converter.sizes import accepted_sizes

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class ConversionResult:
    """A converted net.

    Attributes:
        symbol: the MXNet symbol (input `data`; the final Softmax is a SoftmaxOutput named after its layer).
        arg_arrays / aux_arrays: parameters as float32 numpy arrays keyed by MXNet name (no `arg:` prefix).
        preprocess: what the sidecar records (input shape, channel order, mean, scale, classifier, ...).
        input_shapes: MXNet input name -> shape with batch axis (first input is `data`).
        output_blobs: the Caffe blob (or layer) names of the symbol's outputs, in order.
        output_layers / output_tops: the Caffe layer computing each output and which of its tops it is
            (OpenCV names outputs by layer).
        blob_symbols: Caffe layer name -> MXNet symbol of its first top, for per-layer verification.
        skipped: (layer, type, why) for every layer left out.
        unused_weights: caffemodel layers the prototxt does not define (their weights are ignored, as by Caffe).
    """

    symbol: "mx.sym.Symbol"
    arg_arrays: Dict[str, np.ndarray]
    aux_arrays: Dict[str, np.ndarray]
    preprocess: Preprocess
    input_shapes: Dict[str, Tuple[int, ...]]
    output_blobs: List[str]
    blob_symbols: Dict[str, "mx.sym.Symbol"] = field(default_factory=dict)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)
    mean_image: Optional[np.ndarray] = None
    output_layers: List[str] = field(default_factory=list)
    output_tops: List[int] = field(default_factory=list)
    layer_order: List[str] = field(default_factory=list)
    caffe_input_names: Dict[str, str] = field(default_factory=dict)
    rgb_layers: List[str] = field(default_factory=list)
    unused_weights: List[str] = field(default_factory=list)

    @property
    def arg_params(self) -> Dict[str, "mx.nd.NDArray"]:
        """Arguments as NDArrays, as `mx.model.load_checkpoint` returns them."""
        import mxnet as mx
        return {k: mx.nd.array(v, dtype=np.float32) for k, v in self.arg_arrays.items()}

    @property
    def aux_params(self) -> Dict[str, "mx.nd.NDArray"]:
        import mxnet as mx
        return {k: mx.nd.array(v, dtype=np.float32) for k, v in self.aux_arrays.items()}


# ---- public API ---------------------------------------------------------------------------------------
def convert(prototxt: PathLike, caffemodel: PathLike, prefix: Optional[PathLike] = None, *, keep_bgr: bool = False,
            mean_file: Optional[PathLike] = None, mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None, scale: Optional[float] = None,
            output_layer: Optional[Sequence[str]] = None, strict: bool = False,
            input_shape: Optional[Dict[str, Sequence[int]]] = None) -> ConversionResult:
    """Convert a Caffe model; when `prefix` is given also write the checkpoint (epoch 0) and sidecar.

    Args:
        prototxt: deploy prototxt (V1 `layers {}` or current `layer {}` format).
        caffemodel: the binary weights.
        prefix: checkpoint prefix to write (`PREFIX-symbol.json`, `PREFIX-0000.params`,
            `PREFIX-preprocess.json`, `PREFIX-mean.npy` with a mean image); None writes nothing.
        keep_bgr: keep BGR input (default: the model takes RGB).
        mean_file: a Caffe mean.binaryproto (BGR), recorded as a mean image centre-cropped to the input.
        mean / std: per-channel values in the Caffe net's channel order (BGR), e.g. (104, 117, 123).
        scale: Caffe's transform_param.scale (default: read from the prototxt, else 1).
        output_layer: cut the net at these layers or blobs.
        strict: fail instead of skipping training-only layers or ignoring weights the prototxt lacks.
        input_shape: {input name: shape} replacing the shapes the prototxt declares (`--input-shape`).

    Returns:
        ConversionResult (symbol, parameters, preprocessing, per-layer symbols).

    Raises:
        CaffeFormatError, ConversionError, UnsupportedLayerError: with a one-line message naming the file/layer.
    """
    if isinstance(output_layer, str):
        output_layer = [output_layer]
    net = load_net(prototxt, caffemodel, input_shapes=input_shape)
    net.caffemodel = str(caffemodel)
    conv = convert_net(net, keep_bgr=keep_bgr, output_layer=output_layer, strict=strict)
    pre, mean_image = build_preprocess(net, conv, mean_file, mean, std, scale)
    param_shapes = {k: v.shape for store in (conv["args"], conv["aux"]) for k, v in store.items()}
    pre.source["input_sizes"] = accepted_sizes(conv["symbol"], conv["input_shapes"], param_shapes, net)
    result = ConversionResult(conv["symbol"], conv["args"], conv["aux"], pre, conv["input_shapes"],
                              [name for name, _ in conv["outputs"]], conv["layer_syms"], list(net.skipped),
                              mean_image,
                              output_layers=[v[1] if v[0] == "in" else net.layers[v[0]].name
                                             for _, v in conv["outputs"]],
                              output_tops=[0 if v[0] == "in" else v[1] for _, v in conv["outputs"]],
                              layer_order=[net.layers[i].name for i in conv["order"]],
                              rgb_layers=conv["flipped"], unused_weights=list(net.unused_weights),
                              caffe_input_names={("data" if i == 0 else n): n for i, n in enumerate(net.inputs)})
    for name, type_name, why in net.skipped:
        log.info("skipped layer '%s' (%s): %s", name, type_name, why)
    if prefix is not None:
        write_checkpoint(prefix, result)
    return result


def write_checkpoint(prefix: PathLike, result: ConversionResult, epoch: int = 0, unit: bool = True) -> List[Path]:
    """Write `PREFIX-symbol.json`, `PREFIX-%04d.params`, the sidecar (and mean image) as one unit
    (recbuild.publish, under the prefix's writer lock): a re-conversion into an existing prefix replaces the
    whole old set or nothing, and an old mean image the new model does not use is removed with it.
    `unit=False` writes the files one by one (into a private staging folder)."""
    if not unit:
        return _write_files(str(prefix), result, epoch)
    with publish(prefix) as pub:
        written = _write_files(str(prefix), result, epoch)
        if result.mean_image is None:
            pub.remove(Path(f"{prefix}-mean.npy"))
    return written


def _write_files(prefix: str, result: ConversionResult, epoch: int) -> List[Path]:
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    written = [params_path(prefix, epoch)]
    save_params(written[0], params_blob(result.arg_arrays, result.aux_arrays, dtype=None))
    written.append(save_symbol(prefix, result.symbol))
    pre = result.preprocess
    if result.mean_image is not None:
        mean_path = Path(f"{prefix}-mean.npy")
        with atomic_path(mean_path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, result.mean_image.astype(np.float32))
        written.append(mean_path)
        pre.mean = mean_path.name
    written.append(save_sidecar(prefix, pre))
    return written


def stage_checkpoint(prefix: PathLike, result: ConversionResult) -> Path:
    """Write the checkpoint into a hidden folder beside `prefix`, under the final file names.

    Returns:
        The staging prefix: `mx.model.load_checkpoint(staging, 0)` reads it like the real thing, and
        `publish_staged` moves its files onto `prefix` (same file system, so each move is a rename).
    """
    final = Path(str(prefix))
    folder = final.parent / f".{final.name}.staging-{os.getpid()}"
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(final)  # the staging folders of killed runs (a whole model each)
    shutil.rmtree(folder, ignore_errors=True)  # a killed earlier run of this process id
    folder.mkdir(parents=True)
    staging = folder / final.name
    write_checkpoint(staging, result, unit=False)
    return staging


def publish_staged(staging: Path, prefix: PathLike) -> List[Path]:
    """Publish the staged files onto `prefix`'s names as one unit (recbuild.publish; the sidecar renamed last:
    it marks a complete model); the emptied staging folder goes with the old set's leftovers."""
    final = Path(str(prefix))
    files = sorted(staging.parent.iterdir(), key=lambda f: f.name.endswith(SIDECAR_SUFFIX))
    with publish(final) as pub:
        for f in files:
            pub.adopt(f, final.parent / f.name)
        if not any(f.name.endswith("-mean.npy") for f in files):
            pub.remove(Path(f"{final}-mean.npy"))
        pub.remove(staging.parent)
    return [final.parent / f.name for f in files]


def discard_staged(staging: Path) -> None:
    """Remove a staged checkpoint that failed verification: nothing that looks like a model stays behind."""
    shutil.rmtree(staging.parent, ignore_errors=True)
