"""Two-backbone fusion: one deployable symbol that concatenates the features of two converted models.

    python -m train.recipes fuse --model out/model/resnet152 --model out/model/inception3 \\
        --out out/model/fused [--input-size 299,299] [--num-classes 2]

Input contract of the fused symbol (chosen so every stock consumer works unchanged: mx.model.load_checkpoint,
Module, gluon.SymbolBlock.imports, the C predict API, ImageRecordIter, our predict/deploy):
  * ONE input `data`: (N, 3, H, W) **RGB pixels in [0, 255]**, no mean, no std. H, W default to the larger of
    the two models' input sizes. The fused sidecar says exactly this (channel_order RGB, mean/std none, scale 1).
  * Inside the graph, each branch (its layers renamed `<tag>_<name>`, tags `a` and `b`):
      1. resizes the input to its own size with bilinear interpolation, half-pixel centres
         (contrib.BilinearResize2D, align_corners=False: what cv2.resize INTER_LINEAR does); skipped when the
         size already matches;
      2. reorders channels to its own channel_order and computes (x - mean) / std * scale with its own
         sidecar values, as scalar ops (no extra weights to freeze);
      3. runs its network up to its feature output (the layer before its classifier), flattened.
  * `fusion_concat` concatenates both feature vectors (a first); the head `fusion_fc` -> SoftmaxOutput
    `softmax` sits on it. The sidecar names classifier `fusion_fc`, feature_output `fusion_concat_output`, so
    `python -m train` and `python -m train.recipes features` attach a new head there like on any model.
One difference from running the two models on their own: the second branch sees the image resized from the
fused input size, not from the original photo. Pack the .rec at (at least) the fused size.

Per-channel means only: a branch whose sidecar names a mean *image* is refused with its file name.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from symbols.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from symbols.head import HeadError, find_head, xavier_uniform
from symbols.sidecar import Preprocess, has_sidecar, load_sidecar, save_sidecar, sidecar_path
from train.fit import TrainError

log = logging.getLogger(__name__)

TAGS = ("a", "b")
CLASSIFIER = "fusion_fc"
CONCAT = "fusion_concat"
FEATURE_OUTPUT = f"{CONCAT}_output"
OUTPUT_NAME = "softmax"


class FusionError(TrainError):
    """The two models cannot be fused as asked; the message names the model and the reason."""


@dataclass
class Branch:
    """One model of the fusion, renamed and cut at its feature output."""

    tag: str
    prefix: str
    epoch: int
    pre: Preprocess
    features: mx.sym.Symbol                 # renamed, input variable still `data`
    arg_params: Dict[str, mx.nd.NDArray]    # renamed
    aux_params: Dict[str, mx.nd.NDArray]
    feature_output: str                     # original name


def _rename_graph(symbol: mx.sym.Symbol, tag: str) -> mx.sym.Symbol:
    """Prefix every node but the `data` input with `<tag>_`, so two models' layers cannot collide."""
    graph = json.loads(symbol.tojson())
    for node in graph["nodes"]:
        if not (node["op"] == "null" and node["name"] == "data"):
            node["name"] = f"{tag}_{node['name']}"
    return mx.sym.load_json(json.dumps(graph))


def load_branch(tag: str, prefix: str, epoch: int, layer_before_fullc: Optional[str] = None) -> Branch:
    """Load a converted (or fine-tuned) checkpoint and cut it at the input of its classifier."""
    if not has_sidecar(prefix):
        raise FusionError(f"{sidecar_path(prefix)}: missing; fusion needs each model's preprocessing sidecar")
    pre = load_sidecar(prefix)
    if isinstance(pre.mean, str):
        raise FusionError(f"{sidecar_path(prefix)}: mean image {pre.mean!r}; fusion bakes preprocessing into the "
                          f"graph and supports per-channel means only (convert with a per-channel mean)")
    if pre.input_shape[0] != 3:
        raise FusionError(f"{sidecar_path(prefix)}: input has {pre.input_shape[0]} channels; fusion supports "
                          f"3-channel (RGB/BGR) models")
    try:
        sym, args, aux = load_checkpoint(prefix, epoch, "fusion")
    except CheckpointError as err:
        raise FusionError(str(err)) from None
    try:
        spec = find_head(sym, pre.classifier, pre.feature_output, pre.output_name, layer_before_fullc)
    except HeadError as err:
        raise FusionError(f"{prefix}: {err}") from None
    feats = sym.get_internals()[spec.feature_output]
    renamed = _rename_graph(feats, tag)
    wanted_args = set(feats.list_arguments()) - {"data"}
    missing = sorted(wanted_args - set(args))
    if missing:
        raise FusionError(f"{prefix}-{epoch:04d}.params: weights for {missing[:3]} missing")
    return Branch(tag, prefix, epoch, pre, renamed,
                  {f"{tag}_{n}": args[n] for n in wanted_args},
                  {f"{tag}_{n}": aux[n] for n in feats.list_auxiliary_states()}, spec.feature_output)


def preprocess_graph(x: mx.sym.Symbol, pre: Preprocess, fused_hw: Tuple[int, int], tag: str) -> mx.sym.Symbol:
    """RGB [0, 255] input at `fused_hw` -> this branch's model input (its size, channel order, mean/std/scale)."""
    _, height, width = pre.input_shape
    if (height, width) != tuple(fused_hw):
        x = mx.sym.contrib.BilinearResize2D(x, height=height, width=width, align_corners=False,
                                            name=f"{tag}_resize")
    return pre.graph(x, tag)  # channel order, mean, std, scale: the sidecar's one formula


def fuse(models: Sequence[Tuple[str, int]], out_prefix: str, num_classes: int = 2,
         input_size: Optional[Tuple[int, int]] = None, layers_before_fullc: Sequence[Optional[str]] = (None, None),
         seed: int = 0) -> Path:
    """Write OUT_PREFIX-symbol.json, -0000.params and sidecar of the fused model (see the module docstring).

    Args:
        models: two (prefix, epoch) checkpoints with sidecars.
        out_prefix: where the fused checkpoint is written (epoch 0, like a converted model).
        num_classes: outputs of the placeholder head `fusion_fc` (fine-tuning replaces it anyway).
        input_size: (H, W) of the fused input; default the larger of the two models' sizes.
        layers_before_fullc: per model, overrides where its features are taken.
        seed: seeds the placeholder head.

    Returns:
        The output prefix.
    """
    if len(models) != 2:
        raise FusionError(f"fusion takes exactly two models, got {len(models)}")
    branches = [load_branch(tag, p, e, l) for tag, (p, e), l in zip(TAGS, models, layers_before_fullc)]
    if input_size is None:
        input_size = max((tuple(b.pre.input_shape[1:]) for b in branches), key=lambda hw: (hw[0] * hw[1], hw))
    hw = (int(input_size[0]), int(input_size[1]))
    data = mx.sym.var("data")
    flat = []
    for b in branches:
        feats = b.features(data=preprocess_graph(data, b.pre, hw, b.tag))
        flat.append(mx.sym.Flatten(feats, name=f"{b.tag}_features"))
    concat = mx.sym.Concat(*flat, dim=1, name=CONCAT)
    fc = mx.sym.FullyConnected(concat, num_hidden=num_classes, name=CLASSIFIER)
    symbol = mx.sym.SoftmaxOutput(fc, name=OUTPUT_NAME)

    args: Dict[str, mx.nd.NDArray] = {}
    aux: Dict[str, mx.nd.NDArray] = {}
    for b in branches:
        args.update(b.arg_params)
        aux.update(b.aux_params)
    shapes = dict(zip(symbol.list_arguments(), symbol.infer_shape(data=(1, 3) + hw)[0]))
    rng = np.random.RandomState(seed)
    args[f"{CLASSIFIER}_weight"] = mx.nd.array(xavier_uniform(shapes[f"{CLASSIFIER}_weight"], rng))
    args[f"{CLASSIFIER}_bias"] = mx.nd.zeros(shapes[f"{CLASSIFIER}_bias"])
    needed = set(symbol.list_arguments()) - {"data", f"{OUTPUT_NAME}_label"}
    if needed != set(args):
        raise FusionError(f"internal: fused parameters differ from the graph's ({sorted(needed ^ set(args))[:4]})")

    out_prefix = str(out_prefix)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_prefix, 0, symbol, args, aux, dtype=None)  # the branches' weights, as loaded
    source = {"fusion": [{"tag": b.tag, "prefix": b.prefix, "epoch": b.epoch, "feature_output": b.feature_output,
                          "input_shape": list(b.pre.input_shape), "channel_order": b.pre.channel_order,
                          "mean": b.pre.mean, "std": b.pre.std, "scale": b.pre.scale,
                          "feature_dim": _feature_dim(b)} for b in branches],
              "input_contract": "one input 'data': RGB pixels in [0,255]; each branch resizes (bilinear, "
                                "half-pixel) and normalises inside the graph"}
    save_sidecar(out_prefix, Preprocess(input_shape=(3,) + hw, channel_order="RGB", mean=None, std=None, scale=1.0,
                                        num_classes=num_classes, classifier=CLASSIFIER, feature_output=FEATURE_OUTPUT,
                                        output_name=OUTPUT_NAME, source=source))
    log.info("fused %s (%s) and %s (%s) at input %dx%d: %s", branches[0].prefix, branches[0].feature_output,
             branches[1].prefix, branches[1].feature_output, hw[0], hw[1], out_prefix)
    return Path(out_prefix)


def _feature_dim(branch: Branch) -> int:
    """Width of a branch's flattened features at its own input size."""
    _, out_shapes, _ = mx.sym.Flatten(branch.features).infer_shape(data=(1,) + tuple(branch.pre.input_shape))
    return int(out_shapes[0][1])
