"""VGG with Caffe's layer names, and the head it declares.

The names follow the original Caffe VGG16/VGG19 prototxt (conv1_1 ... conv5_3, fc6, relu6, drop6, fc7, relu7,
drop7, fc8, prob), which is what `python -m tools.caffe_converter` produces from those files. Head surgery
uses the declared `HEAD` rather than guessing from substrings: fine-tune.py's `'fc' not in name` rule drops
fc6/fc7 as well as fc8, and its default `flatten0` does not exist in a converted VGG.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import mxnet as mx


@dataclass(frozen=True)
class HeadSpec:
    """Where a classifier sits in a network.

    Attributes:
        classifier: name of the FullyConnected layer that maps features to classes (replaced by head surgery).
        feature_output: the internal output feeding the classifier; the new head is attached here.
        output_name: name of the SoftmaxOutput layer (its label input is `<output_name>_label`).
    """

    classifier: str
    feature_output: str
    output_name: str = "softmax"


# The declared head of every VGG built here or converted from Caffe's VGG prototxts.
HEAD = HeadSpec(classifier="fc8", feature_output="drop7_output", output_name="prob")

# (channels, convolutions) per stage: the spec table of the VGG paper, configurations D and E.
VGG16_STAGES: Tuple[Tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
VGG19_STAGES: Tuple[Tuple[int, int], ...] = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))
# Layers whose presence identifies a VGG-shaped net (converted or built here).
SIGNATURE = ("fc6", "fc7", "fc8", "drop7")


def vgg(num_classes: int = 1000, stages: Sequence[Tuple[int, int]] = VGG16_STAGES, fc_width: int = 4096,
        dropout: float = 0.5, output_name: str = HEAD.output_name) -> mx.sym.Symbol:
    """Build a VGG symbol with Caffe's layer names.

    Args:
        num_classes: outputs of fc8.
        stages: (channels, number of 3x3 convolutions) per stage; each stage ends in a 2x2/2 max pool.
        fc_width: width of fc6 and fc7 (4096 in VGG16; small values give tiny test nets).
        dropout: dropout probability of drop6/drop7.
        output_name: name of the final SoftmaxOutput.

    Returns:
        The symbol, with inputs `data` and `<output_name>_label`.
    """
    x = mx.sym.var("data")
    for stage, (channels, convs) in enumerate(stages, start=1):
        for i in range(1, convs + 1):
            x = mx.sym.Convolution(x, num_filter=channels, kernel=(3, 3), pad=(1, 1), name=f"conv{stage}_{i}")
            x = mx.sym.Activation(x, act_type="relu", name=f"relu{stage}_{i}")
        x = mx.sym.Pooling(x, pool_type="max", kernel=(2, 2), stride=(2, 2), name=f"pool{stage}")
    for n in (6, 7):
        x = mx.sym.FullyConnected(x, num_hidden=fc_width, name=f"fc{n}")
        x = mx.sym.Activation(x, act_type="relu", name=f"relu{n}")
        x = mx.sym.Dropout(x, p=dropout, name=f"drop{n}")
    x = mx.sym.FullyConnected(x, num_hidden=num_classes, name=HEAD.classifier)
    return mx.sym.SoftmaxOutput(x, name=output_name)


def matches(symbol: mx.sym.Symbol) -> bool:
    """True when `symbol` has VGG's Caffe layer names (so its declared HEAD applies)."""
    outputs = set(symbol.get_internals().list_outputs())
    return all(f"{name}_output" in outputs for name in SIGNATURE)
