"""Small checkpoints for the recipes tests, built in code.

`small_net_checkpoint` writes a converted-looking checkpoint (symbol, params, sidecar) of a tiny conv net with
NO dropout below its classifier and BatchNorm on its stored statistics, so features computed in inference mode equal those seen in training mode:
the condition under which the feature cache and full forward passes must train the same head.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import mxnet as mx
import numpy as np

from symbols.sidecar import Preprocess, save_sidecar


def small_net(num_classes: int = 5, channels: int = 6, width: int = 12) -> mx.sym.Symbol:
    x = mx.sym.var("data")
    x = mx.sym.Convolution(x, num_filter=channels, kernel=(3, 3), pad=(1, 1), name="conv1")
    x = mx.sym.Activation(x, act_type="relu", name="relu1")
    x = mx.sym.Pooling(x, pool_type="max", kernel=(2, 2), stride=(2, 2), name="pool1")
    x = mx.sym.Convolution(x, num_filter=channels, kernel=(3, 3), pad=(1, 1), name="conv2")
    x = mx.sym.BatchNorm(x, fix_gamma=False, use_global_stats=True, name="bn2")  # as a deploy prototxt
    x = mx.sym.Activation(x, act_type="relu", name="relu2")
    x = mx.sym.Pooling(x, pool_type="avg", global_pool=True, kernel=(1, 1), name="pool2")
    x = mx.sym.Flatten(x, name="flat")
    x = mx.sym.FullyConnected(x, num_hidden=width, name="fc6")
    x = mx.sym.Activation(x, act_type="relu", name="relu6")
    x = mx.sym.FullyConnected(x, num_hidden=num_classes, name="fc7")
    return mx.sym.SoftmaxOutput(x, name="softmax")


def small_net_checkpoint(prefix: Path, input_shape: Tuple[int, int, int] = (3, 16, 16), channel_order: str = "BGR",
                         mean: Sequence[float] = (104.0, 117.0, 123.0), std=None, scale: float = 1 / 64,
                         seed: int = 0, num_classes: int = 5, channels: int = 6, width: int = 12) -> Path:
    """Write PREFIX-symbol.json, PREFIX-0000.params and PREFIX-preprocess.json (classifier fc7 on relu6)."""
    sym = small_net(num_classes, channels, width)
    arg_shapes, _, aux_shapes = sym.infer_shape(data=(1,) + tuple(input_shape))
    rng = np.random.RandomState(seed)
    args, aux = {}, {}
    for name, shape in zip(sym.list_arguments(), arg_shapes):
        if name in ("data", "softmax_label"):
            continue
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = (rng.normal(0, np.sqrt(2.0 / fan_in), shape) if name.endswith("weight")
                 else 1 + rng.normal(0, 0.1, shape) if name.endswith("gamma") else rng.normal(0, 0.05, shape))
        args[name] = mx.nd.array(value)
    for name, shape in zip(sym.list_auxiliary_states(), aux_shapes):
        args_value = rng.uniform(0.5, 1.5, shape) if name.endswith("var") else rng.normal(0, 0.2, shape)
        aux[name] = mx.nd.array(args_value)
    mx.model.save_checkpoint(str(prefix), 0, sym, args, aux)
    save_sidecar(prefix, Preprocess(input_shape=input_shape, channel_order=channel_order,
                                    mean=list(mean) if mean is not None else None,
                                    std=list(std) if std is not None else None, scale=scale,
                                    num_classes=num_classes, classifier="fc7", feature_output="relu6_output",
                                    output_name="softmax", source={"test": "small_net"}))
    return Path(prefix)
