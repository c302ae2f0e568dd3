"""Small checkpoints built in code for the deploy / ONNX / C API tests (no trainer, no downloads).

Two shapes of fine-tuned model: VGG-like (conv/relu/max-pool stacks, fc6/fc7 with dropout, fc8) and
ResNet-like (conv without bias + BatchNorm, a residual block with elementwise add, a 'full'-convention max
pool, a non-global 7x7-style average pool like open_nsfw's, one BatchNorm left at MXNet's fix_gamma=True).
Weights are seeded random; BatchNorm statistics are random too, so a wrong eps/gamma/mean shows up.
"""
from pathlib import Path

import mxnet as mx
import numpy as np

from recbuild.classmap import write_class_map
from symbols.sidecar import Preprocess, save_sidecar

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 5
CLASSES = [f"class_{i}" for i in range(NUM_CLASSES)]


def vgg_like():
    x = mx.sym.var("data")
    for i, width in enumerate((8, 16), start=1):
        x = mx.sym.Convolution(x, num_filter=width, kernel=(3, 3), pad=(1, 1), name=f"conv{i}_1")
        x = mx.sym.Activation(x, act_type="relu", name=f"relu{i}_1")
        x = mx.sym.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type="max", name=f"pool{i}")
    x = mx.sym.FullyConnected(x, num_hidden=32, name="fc6")  # implicit flatten, as in VGG
    x = mx.sym.Activation(x, act_type="relu", name="relu6")
    x = mx.sym.Dropout(x, p=0.5, name="drop6")
    x = mx.sym.FullyConnected(x, num_hidden=32, name="fc7")
    x = mx.sym.Activation(x, act_type="relu", name="relu7")
    x = mx.sym.Dropout(x, p=0.5, name="drop7")
    x = mx.sym.FullyConnected(x, num_hidden=NUM_CLASSES, name="fc8")
    return mx.sym.SoftmaxOutput(x, name="prob")


def resnet_like():
    def conv_bn(x, name, width, kernel, stride=1, relu=True, fix_gamma=False):
        pad = kernel // 2
        x = mx.sym.Convolution(x, num_filter=width, kernel=(kernel, kernel), stride=(stride, stride),
                               pad=(pad, pad), no_bias=True, name=name)
        # Caffe's BatchNorm+Scale converts to BatchNorm with eps 1e-5 and fix_gamma=False.
        x = mx.sym.BatchNorm(x, eps=1e-5, fix_gamma=fix_gamma, use_global_stats=True, name=f"bn_{name}")
        return mx.sym.Activation(x, act_type="relu", name=f"{name}_relu") if relu else x

    x = conv_bn(mx.sym.var("data"), "conv1", 8, 3)
    x = mx.sym.Pooling(x, kernel=(3, 3), stride=(2, 2), pool_type="max", pooling_convention="full", name="pool1")
    shortcut = conv_bn(x, "res2a_branch1", 16, 1, stride=2, relu=False)
    y = conv_bn(x, "res2a_branch2a", 8, 3, stride=2)
    y = conv_bn(y, "res2a_branch2b", 16, 3, relu=False, fix_gamma=True)  # MXNet's default: gamma ignored
    x = mx.sym.Activation(shortcut + y, act_type="relu", name="res2a_relu")
    y = conv_bn(x, "res2b_branch2a", 16, 3)
    y = conv_bn(y, "res2b_branch2b", 16, 3, relu=False)
    x = mx.sym.Activation(mx.sym.elemwise_add(x, y, name="res2b"), act_type="relu", name="res2b_relu")
    # open_nsfw ends in AVE pooling kernel 7 stride 1 over a 7x7 map: non-global, input size matters.
    x = mx.sym.Pooling(x, kernel=(8, 8), stride=(1, 1), pool_type="avg", name="pool5")
    x = mx.sym.FullyConnected(x, num_hidden=NUM_CLASSES, name="fc_new")
    return mx.sym.SoftmaxOutput(x, name="prob")


NETS = {"vgg_like": vgg_like, "resnet_like": resnet_like}


def random_params(sym, seed=0):
    """Seeded random weights and BatchNorm statistics, scaled so the softmax is far from saturated."""
    rng = np.random.default_rng(seed)
    arg_shapes, _, aux_shapes = sym.infer_shape(data=(1,) + INPUT_SHAPE)
    args, auxs = {}, {}
    for name, shape in zip(sym.list_arguments(), arg_shapes):
        if name in ("data", "prob_label"):
            continue
        if name.endswith("_gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("_bias", "_beta")):
            value = rng.normal(0, 0.1, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0, 1.0 / np.sqrt(fan_in), shape)
        args[name] = mx.nd.array(value.astype(np.float32))
    for name, shape in zip(sym.list_auxiliary_states(), aux_shapes):
        value = rng.uniform(0.5, 2.0, shape) if name.endswith("_var") else rng.normal(0, 0.2, shape)
        auxs[name] = mx.nd.array(value.astype(np.float32))
    return args, auxs


def preprocess(class_names=True):
    # Pixel scale matters for the parity checks: inputs are ~[-128, 128] after the BGR mean, like a real net.
    return Preprocess(input_shape=INPUT_SHAPE, channel_order="BGR", mean=[104.0, 117.0, 123.0], scale=1 / 64,
                      num_classes=NUM_CLASSES, classifier="fc8", output_name="prob",
                      class_names=list(CLASSES) if class_names else None, source={"test": "fixture"})


def make_checkpoint(folder: Path, kind: str, epoch: int = 3, class_names=True, seed=0) -> str:
    """Write PREFIX-symbol.json, PREFIX-%04d.params, PREFIX-preprocess.json (and a class map); return PREFIX."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = str(folder / kind)
    sym = NETS[kind]()
    args, auxs = random_params(sym, seed)
    mx.model.save_checkpoint(prefix, epoch, sym, args, auxs)
    save_sidecar(prefix, preprocess(class_names))
    write_class_map(folder / "lists", CLASSES)
    return prefix


def reference_predict(prefix: str, epoch: int, x: np.ndarray) -> np.ndarray:
    """The *training* checkpoint (with SoftmaxOutput and its label) through stock Module: the ground truth."""
    sym, args, auxs = mx.model.load_checkpoint(prefix, epoch)
    mod = mx.mod.Module(sym, data_names=["data"], label_names=["prob_label"], context=mx.cpu())
    mod.bind(data_shapes=[("data", x.shape)], label_shapes=[("prob_label", (x.shape[0],))], for_training=False)
    mod.set_params(args, auxs)
    mod.forward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.zeros((x.shape[0],))]), is_train=False)
    return mod.get_outputs()[0].asnumpy()


def sample_input(batch=3, seed=1):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch, INPUT_SHAPE[1], INPUT_SHAPE[2], 3)).astype(np.float32)
    return preprocess().apply(images)
