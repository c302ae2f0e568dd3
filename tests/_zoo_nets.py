"""The Caffe model zoo's layer patterns, generated in code with seeded random weights (tests only).

Each builder writes a small net with the pattern that makes the published model what it is (AlexNet's LRN and
grouped convolutions, a GoogLeNet inception module, a ResNet bottleneck with BatchNorm+Scale and Eltwise, ...),
with the published layer settings but reduced widths and input sizes, so the zoo test runs in seconds.
`ZOO[name] = (builder, other input size or None)`: None where the net has a fixed input (an InnerProduct after
spatial axes); else another size at which Caffe (and the converted model) reshapes the net.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from tests._caffe_nets import NetBuilder


class Zoo(NetBuilder):
    """NetBuilder with the channel count of every blob, so the pattern builders read like the prototxts."""

    def __init__(self, name: str, size: int, channels: int = 3, seed: int = 0, batch: int = 1):
        super().__init__(name, seed=seed)
        self.input("data", (batch, channels, size, size))
        self.channels: Dict[str, int] = {"data": channels}

    def conv(self, name: str, bottom: str, cout: int, k=3, stride: int = 1, pad=None, group: int = 1,
             dilation: int = 1, bias: bool = True, top: Optional[str] = None) -> str:
        kh, kw = (k, k) if isinstance(k, int) else k
        ph, pw = ((kh // 2) * dilation, (kw // 2) * dilation) if pad is None else \
            ((pad, pad) if isinstance(pad, int) else pad)
        cin = self.channels[bottom]
        shape = f"kernel_size: {kh}" if kh == kw else f"kernel_h: {kh} kernel_w: {kw}"
        pads = f"pad: {ph}" if ph == pw else f"pad_h: {ph} pad_w: {pw}"
        params = (f"convolution_param {{ num_output: {cout} {shape} stride: {stride} {pads} group: {group} "
                  f"dilation: {dilation} bias_term: {str(bias).lower()} }}")
        blobs = [self.rand(cout, cin // group, kh, kw)] + ([self.rand(cout, scale=0.1)] if bias else [])
        top = top or name
        self.layer(name, "Convolution", [bottom], [top], params=params, blobs=blobs)
        self.channels[top] = cout
        return top

    def bn_scale(self, name: str, blob: str, scale: bool = True) -> str:
        """BatchNorm (+ Scale) in place, as ResNet's bn/scale pairs (colorization has BatchNorm alone)."""
        c = self.channels[blob]
        factor = 0.5
        self.layer(f"bn_{name}", "BatchNorm", [blob], [blob], params="batch_norm_param { use_global_stats: true }",
                   blobs=[self.rand(c, scale=0.1) * factor, (self.rand(c, positive=True)) * factor,
                          np.array([factor], np.float32)])
        if scale:
            self.layer(f"scale_{name}", "Scale", [blob], [blob], params="scale_param { bias_term: true }",
                       blobs=[self.rand(c, positive=True), self.rand(c, scale=0.1)])
        return blob

    def relu(self, blob: str, name: Optional[str] = None) -> str:
        self.layer(name or f"relu_{blob}", "ReLU", [blob], [blob])
        return blob

    def pool(self, name: str, bottom: str, kind: str = "MAX", k: int = 3, stride: int = 2, pad: int = 0,
             global_pool: bool = False) -> str:
        params = (f"pooling_param {{ pool: {kind} global_pooling: true }}" if global_pool else
                  f"pooling_param {{ pool: {kind} kernel_size: {k} stride: {stride} pad: {pad} }}")
        self.layer(name, "Pooling", [bottom], params=params)
        self.channels[name] = self.channels[bottom]
        return name

    def concat(self, name: str, bottoms: Sequence[str]) -> str:
        self.layer(name, "Concat", list(bottoms))
        self.channels[name] = sum(self.channels[b] for b in bottoms)
        return name

    def eltwise(self, name: str, bottoms: Sequence[str], coeff: Sequence[float] = ()) -> str:
        params = "eltwise_param { operation: SUM " + "".join(f"coeff: {c} " for c in coeff) + "}"
        self.layer(name, "Eltwise", list(bottoms), params=params)
        self.channels[name] = self.channels[bottoms[0]]
        return name

    def fc(self, name: str, bottom: str, n: int, fan_in: int) -> str:
        self.layer(name, "InnerProduct", [bottom], params=f"inner_product_param {{ num_output: {n} }}",
                   blobs=[self.rand(n, fan_in), self.rand(n, scale=0.1)])
        self.channels[name] = n
        return name

    def conv_bn_relu(self, name: str, bottom: str, cout: int, **kw) -> str:
        top = self.conv(name, bottom, cout, bias=False, **kw)
        return self.relu(self.bn_scale(name, top))

    def classifier(self, bottom: str, classes: int = 10) -> str:
        """Global average pooling, an InnerProduct and a Softmax (any input size)."""
        pooled = self.pool("pool_global", bottom, "AVE", global_pool=True)
        self.fc("fc_cls", pooled, classes, self.channels[pooled])
        self.layer("prob", "Softmax", ["fc_cls"])
        return "prob"


def alexnet(z: Zoo) -> None:
    """CaffeNet: 11x11 stride 4, LRN across channels, grouped convolutions, fc + dropout."""
    x = z.relu(z.conv("conv1", "data", 16, 11, stride=4, pad=0))
    z.layer("norm1", "LRN", [x], params="lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }")
    z.channels["norm1"] = 16
    x = z.pool("pool1", "norm1")
    x = z.relu(z.conv("conv2", x, 24, 5, pad=2, group=2))
    z.layer("norm2", "LRN", [x], params="lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 k: 2 }")
    z.channels["norm2"] = 24
    x = z.relu(z.conv("conv3", "norm2", 32, 3, group=2))
    x = z.pool("pool5", x)
    z.fc("fc6", x, 32, 32 * 3 * 3)
    z.relu("fc6")
    z.layer("drop6", "Dropout", ["fc6"], ["fc6"], params="dropout_param { dropout_ratio: 0.5 }")
    z.fc("fc8", "fc6", 10, 32)
    z.layer("prob", "Softmax", ["fc8"])


def googlenet(z: Zoo) -> None:
    """One inception module: 1x1, 3x3 after a reduction, 5x5 after a reduction, pool projection; Concat."""
    x = z.relu(z.conv("conv1", "data", 16, 7, stride=2))
    x = z.pool("pool1", x)
    b1 = z.relu(z.conv("i3a_1x1", x, 8, 1))
    b2 = z.relu(z.conv("i3a_3x3", z.relu(z.conv("i3a_3x3_reduce", x, 8, 1)), 12, 3))
    b3 = z.relu(z.conv("i3a_5x5", z.relu(z.conv("i3a_5x5_reduce", x, 4, 1)), 6, 5))
    b4 = z.relu(z.conv("i3a_pool_proj", z.pool("i3a_pool", x, k=3, stride=1, pad=1), 6, 1))
    z.classifier(z.concat("i3a_output", [b1, b2, b3, b4]))


def vgg(z: Zoo) -> None:
    x = z.relu(z.conv("conv1_1", "data", 8, 3))
    x = z.pool("pool1", z.relu(z.conv("conv1_2", x, 8, 3)), k=2, stride=2)
    x = z.pool("pool2", z.relu(z.conv("conv2_1", x, 16, 3)), k=2, stride=2)
    z.relu(z.fc("fc6", x, 24, 16 * 4 * 4))
    z.fc("fc8", "fc6", 10, 24)
    z.layer("prob", "Softmax", ["fc8"])


def _bottleneck(z: Zoo, name: str, x: str, mid: int, out: int, stride: int = 1, group: int = 1) -> str:
    """ResNet's bottleneck (ResNeXt's with group > 1): 1x1, 3x3, 1x1, each BatchNorm+Scale; Eltwise SUM."""
    if z.channels[x] != out or stride != 1:
        short = z.bn_scale(f"{name}_branch1", z.conv(f"{name}_branch1", x, out, 1, stride=stride, bias=False))
    else:
        short = x
    y = z.conv_bn_relu(f"{name}_branch2a", x, mid, k=1, stride=stride)
    y = z.conv_bn_relu(f"{name}_branch2b", y, mid, k=3, group=group)
    y = z.bn_scale(f"{name}_branch2c", z.conv(f"{name}_branch2c", y, out, 1, bias=False))
    return z.relu(z.eltwise(name, [short, y]))


def resnet(z: Zoo) -> None:
    x = z.conv_bn_relu("conv1", "data", 8, k=7, stride=2)
    x = z.pool("pool1", x)
    x = _bottleneck(z, "res2a", x, 4, 16)
    x = _bottleneck(z, "res2b", x, 4, 16)
    x = _bottleneck(z, "res3a", x, 8, 24, stride=2)
    z.classifier(x)


def resnext(z: Zoo) -> None:
    x = z.conv_bn_relu("conv1", "data", 8, k=7, stride=2)
    x = _bottleneck(z, "res2a", z.pool("pool1", x), 16, 24, group=4)
    z.classifier(_bottleneck(z, "res2b", x, 16, 24, group=8))


def inception_v3(z: Zoo) -> None:
    """Factorised 7x7: 1x7 then 7x1 (kernel_h/kernel_w, pad_h/pad_w), BatchNorm+Scale, Concat."""
    x = z.conv_bn_relu("conv", "data", 8, k=3, stride=2, pad=0)
    b1 = z.conv_bn_relu("m_1x1", x, 6, k=1)
    b2 = z.conv_bn_relu("m_tower_conv_1", z.conv_bn_relu("m_tower_conv", x, 6, k=(1, 7)), 6, k=(7, 1))
    b3 = z.conv_bn_relu("m_pool_proj", z.pool("m_pool", x, "AVE", k=3, stride=1, pad=1), 4, k=1)
    z.classifier(z.concat("m_concat", [b1, b2, b3]))


def inception_resnet(z: Zoo) -> None:
    """A scaled residual: branches concatenated, a 1x1 up-projection, then Eltwise SUM with coeff 0.17."""
    x = z.conv_bn_relu("stem", "data", 16, k=3)
    b1 = z.conv_bn_relu("ir_b0", x, 8, k=1)
    b2 = z.conv_bn_relu("ir_b1_2", z.conv_bn_relu("ir_b1_1", x, 8, k=1), 8, k=3)
    up = z.conv("ir_up", z.concat("ir_concat", [b1, b2]), 16, 1)
    z.classifier(z.relu(z.eltwise("ir_sum", [x, up], coeff=(1.0, 0.17))))


def se_block(z: Zoo, channels: int = 512) -> None:
    """SE-BN-Inception's gate: global pooling, 1x1 down, ReLU, 1x1 up, Sigmoid, Reshape to N x C, Scale axis 0.

    512 channels: MXNet's MKLDNN Reshape of that gate failed (the crash of issue 23)."""
    x = z.conv_bn_relu("conv1", "data", channels, k=3)
    pooled = z.pool("se_pool", x, "AVE", global_pool=True)
    down = z.relu(z.conv("se_down", pooled, 16, 1))
    up = z.conv("se_up", down, channels, 1)
    z.layer("se_prob", "Sigmoid", [up], [up])
    z.layer("se_reshape", "Reshape", [up], params="reshape_param { shape { dim: 0 dim: 0 } }")
    z.layer("se_scale", "Scale", [x, "se_reshape"], ["se_output"], params="scale_param { axis: 0 bias_term: false }")
    z.channels["se_output"] = channels
    z.classifier(z.conv("conv2", "se_output", 8, 1))


def densenet(z: Zoo) -> None:
    """A dense block: BatchNorm+Scale+ReLU+conv, each output concatenated to all earlier ones."""
    x = z.conv("conv1", "data", 8, 3, stride=2)
    for i in range(3):
        y = z.relu(z.bn_scale(f"b{i}", z.conv(f"b{i}_pre", x, z.channels[x], 1, bias=False), scale=True))
        y = z.conv(f"b{i}_conv", y, 4, 3, bias=False)
        x = z.concat(f"concat_{i}", [x, y])
    z.classifier(x)


def squeezenet(z: Zoo) -> None:
    """A fire module (squeeze 1x1, expand 1x1 and 3x3, Concat) and SqueezeNet's convolutional classifier."""
    x = z.pool("pool1", z.relu(z.conv("conv1", "data", 16, 3, stride=2, pad=0)), k=3, stride=2)
    s = z.relu(z.conv("fire2_squeeze1x1", x, 4, 1))
    x = z.concat("fire2_concat", [z.relu(z.conv("fire2_expand1x1", s, 8, 1)),
                                  z.relu(z.conv("fire2_expand3x3", s, 8, 3))])
    z.layer("drop9", "Dropout", [x], [x], params="dropout_param { dropout_ratio: 0.5 }")
    x = z.relu(z.conv("conv10", x, 10, 1))
    z.pool("pool10", x, "AVE", global_pool=True)
    z.layer("prob", "Softmax", ["pool10"])


def mobilenet_v1(z: Zoo) -> None:
    """Depthwise 3x3 (group = channels) and pointwise 1x1, each BatchNorm+Scale+ReLU."""
    x = z.conv_bn_relu("conv1", "data", 8, k=3, stride=2)
    x = z.conv_bn_relu("conv2_1_dw", x, 8, k=3, group=8)
    x = z.conv_bn_relu("conv2_1_sep", x, 16, k=1)
    x = z.conv_bn_relu("conv2_2_dw", x, 16, k=3, stride=2, group=16)
    z.classifier(z.conv_bn_relu("conv2_2_sep", x, 24, k=1))


def mobilenet_v2(z: Zoo) -> None:
    """An inverted residual: 1x1 expand, depthwise 3x3, linear 1x1 project, Eltwise SUM."""
    x = z.conv_bn_relu("conv1", "data", 8, k=3, stride=2)
    y = z.conv_bn_relu("conv2_expand", x, 48, k=1)
    y = z.conv_bn_relu("conv2_dwise", y, 48, k=3, group=48)
    y = z.bn_scale("conv2_linear", z.conv("conv2_linear", y, 8, 1, bias=False))
    z.classifier(z.eltwise("block_2", [x, y]))


def fcn(z: Zoo) -> None:
    """FCN: scores upsampled by a Deconvolution and cropped back to the input (Crop axis 2, offset)."""
    x = z.pool("pool1", z.relu(z.conv("conv1", "data", 8, 3, pad=1)), k=2, stride=2)
    x = z.pool("pool2", z.relu(z.conv("conv2", x, 8, 3, pad=1)), k=2, stride=2)
    score = z.conv("score_fr", x, 5, 1)
    z.layer("upscore", "Deconvolution", [score],
            params="convolution_param { num_output: 5 kernel_size: 8 stride: 4 bias_term: false }",
            blobs=[z.rand(5, 5, 8, 8, scale=0.2)])
    z.layer("score", "Crop", ["upscore", "data"], params="crop_param { axis: 2 offset: 2 }")


def hed(z: Zoo) -> None:
    """HED: side outputs of two stages upsampled, cropped to the input, concatenated and fused; sigmoids."""
    s1 = z.relu(z.conv("conv1_1", "data", 8, 3, pad=1))
    s2 = z.relu(z.conv("conv2_1", z.pool("pool1", s1, k=2, stride=2), 8, 3, pad=1))
    side1 = z.conv("score-dsn1", s1, 1, 1)
    side2 = z.conv("score-dsn2", s2, 1, 1)
    z.layer("upsample_2", "Deconvolution", [side2], params="convolution_param { num_output: 1 kernel_size: 4 "
            "stride: 2 bias_term: false }", blobs=[z.rand(1, 1, 4, 4, scale=0.3)])
    z.layer("crop2", "Crop", ["upsample_2", "data"], ["score-dsn2-up"], params="crop_param { axis: 2 offset: 1 }")
    z.channels["score-dsn2-up"] = 1
    fused = z.conv("new-score-weighting", z.concat("concat", [side1, "score-dsn2-up"]), 1, 1)
    for name, blob in (("sigmoid-dsn1", side1), ("sigmoid-dsn2", "score-dsn2-up"), ("sigmoid-fuse", fused)):
        z.layer(name, "Sigmoid", [blob], [name])


def colorization(z: Zoo) -> None:
    """Colorization: dilated convolutions with BatchNorm alone, a Deconvolution, a per-position Softmax after a
    constant Scale, and a 1x1 convolution of the probabilities."""
    # named after the blob it reads, as in the published file: OpenCV keeps it under its top's name
    x = z.relu(z.conv("bw_conv1_1", "data", 8, 3, pad=1, top="conv1_1"))
    x = z.bn_scale("conv1_2norm", z.relu(z.conv("conv1_2", x, 8, 3, stride=2, pad=1)), scale=False)
    x = z.relu(z.conv("conv5_1", x, 8, 3, dilation=2))
    x = z.bn_scale("conv5_3norm", z.relu(z.conv("conv5_2", x, 8, 3, dilation=2)), scale=False)
    z.layer("conv8_1", "Deconvolution", [x], params="convolution_param { num_output: 8 kernel_size: 4 stride: 2 "
            "pad: 1 dilation: 1 }", blobs=[z.rand(8, 8, 4, 4, scale=0.2), z.rand(8, scale=0.1)])
    z.channels["conv8_1"] = 8
    x = z.conv("conv8_313", z.relu("conv8_1"), 12, 1)
    z.layer("conv8_313_rh", "Scale", [x], params="scale_param { bias_term: false num_axes: 0 filler { type: 'constant' "
            "value: 2.606 } }", blobs=[np.array([2.606], np.float32)])
    z.layer("class8_313_rh", "Softmax", ["conv8_313_rh"])
    z.channels["class8_313_rh"] = 12
    z.conv("class8_ab", "class8_313_rh", 2, 1, bias=False)


def openpose(z: Zoo) -> None:
    """OpenPose: two branches per stage, concatenated with the features as the next stage's input."""
    feat = z.relu(z.conv("conv4_4_CPM", z.pool("pool1", z.relu(z.conv("conv1_1", "data", 8, 3)), k=2, stride=2),
                         8, 3))
    l1 = z.conv("conv5_5_CPM_L1", z.relu(z.conv("conv5_1_CPM_L1", feat, 8, 3)), 4, 1)
    l2 = z.conv("conv5_5_CPM_L2", z.relu(z.conv("conv5_1_CPM_L2", feat, 8, 3)), 2, 1)
    x = z.concat("concat_stage2", [l1, l2, feat])
    z.conv("Mconv7_stage2_L1", z.relu(z.conv("Mconv1_stage2_L1", x, 8, 7)), 4, 1)
    z.conv("Mconv7_stage2_L2", z.relu(z.conv("Mconv1_stage2_L2", x, 8, 7)), 2, 1)


# ---- the dialects of the forks (issue 23): the published nets' own spellings ----------------------------------
def _ceil_pool(z: Zoo, name: str, bottom: str, kind: str, k: int, stride: int, ceil: bool, pad: int = 0) -> str:
    z.layer(name, "Pooling", [bottom], params=f"pooling_param {{ pool: {kind} kernel_size: {k} stride: {stride} "
                                               f"pad: {pad} ceil_mode: {str(ceil).lower()} }}")
    z.channels[name] = z.channels[bottom]
    return name


def densenet_ceil(z: Zoo) -> None:
    """DenseNet-121 as published (shicai/DenseNet-Caffe): pool1 and the transition's AVE pooling with
    `ceil_mode: false`, at sizes where rounding down and up differ."""
    x = z.relu(z.bn_scale("conv1", z.conv("conv1", "data", 8, 7, stride=2, bias=False)))
    x = _ceil_pool(z, "pool1", x, "MAX", 3, 2, ceil=False, pad=1)
    for i in range(2):
        y = z.relu(z.bn_scale(f"b{i}_x1", z.conv(f"b{i}_x1", x, 8, 1, bias=False)))
        x = z.concat(f"concat_{i}", [x, z.conv(f"b{i}_x2", y, 4, 3, bias=False)])
    x = z.relu(z.bn_scale("trans", z.conv("trans", x, 8, 1, bias=False)))
    z.classifier(_ceil_pool(z, "trans_pool", x, "AVE", 2, 2, ceil=False))


def resnext_ceil(z: Zoo) -> None:
    """ResNeXt-50 as published (soeaver/caffe-model): pool1 with `ceil_mode: false`, grouped bottlenecks."""
    x = z.conv_bn_relu("conv1", "data", 8, k=7, stride=2)
    x = _bottleneck(z, "res2a", _ceil_pool(z, "pool1", x, "MAX", 3, 2, ceil=False), 16, 24, group=8)
    z.classifier(_bottleneck(z, "res3a", x, 16, 32, stride=2, group=8))


def se_axpy(z: Zoo) -> None:
    """SE-ResNet-50 (hujie-frank/SENet): the gate (global pooling, 1x1 down, ReLU, 1x1 up, Sigmoid) and SENet's
    Axpy(gate, residual, shortcut) = gate * residual + shortcut, which OpenCV computes the other way round."""
    x = z.conv_bn_relu("conv1", "data", 16, k=3)
    y = z.conv_bn_relu("conv2_1_1x1_reduce", x, 8, k=1)
    y = z.bn_scale("conv2_1_1x1_increase", z.conv("conv2_1_1x1_increase", y, 16, 1, bias=False))
    gate = z.pool("conv2_1_global_pool", y, "AVE", global_pool=True)
    gate = z.relu(z.conv("conv2_1_1x1_down", gate, 4, 1))
    gate = z.conv("conv2_1_1x1_up", gate, 16, 1)
    z.layer("conv2_1_prob", "Sigmoid", [gate], [gate])
    z.layer("conv2_1", "Axpy", [gate, y, x])
    z.channels["conv2_1"] = 16
    z.classifier(z.relu("conv2_1", name="conv2_1_relu"))


def hed_duplicates(z: Zoo) -> None:
    """HED as published (s9xie/hed): the side outputs' Crop layers all named `crop`."""
    s1 = z.relu(z.conv("conv1_1", "data", 8, 3, pad=1))
    s2 = z.relu(z.conv("conv2_1", z.pool("pool1", s1, k=2, stride=2), 8, 3, pad=1))
    s3 = z.relu(z.conv("conv3_1", z.pool("pool2", s2, k=2, stride=2), 8, 3, pad=1))
    sides = [z.conv("score-dsn1", s1, 1, 1)]
    for i, (blob, stride) in enumerate(((s2, 2), (s3, 4)), start=2):
        z.layer(f"upsample_{i}", "Deconvolution", [z.conv(f"score-dsn{i}", blob, 1, 1)], params=f"convolution_param "
                f"{{ num_output: 1 kernel_size: {2 * stride} stride: {stride} bias_term: false }}",
                blobs=[z.rand(1, 1, 2 * stride, 2 * stride, scale=0.3)])
        z.layer("crop", "Crop", [f"upsample_{i}", "data"], [f"score-dsn{i}-up"],
                params=f"crop_param {{ axis: 2 offset: {stride // 2} }}")
        z.channels[f"score-dsn{i}-up"] = 1
        sides.append(f"score-dsn{i}-up")
    fused = z.conv("new-score-weighting", z.concat("concat", sides), 1, 1)
    for i, blob in enumerate(sides + [fused], start=1):
        z.layer(f"sigmoid-dsn{i}" if blob != fused else "sigmoid-fuse", "Sigmoid", [blob])


def memorydata_vgg(z: Zoo) -> None:
    """A VGG16 deploy file that declares its input in a MemoryData layer (no input field, no Input layer)."""
    z.inputs.clear()
    z.layer("data", "MemoryData", [], ["data", "label"], params="memory_data_param { batch_size: 1 channels: 3 "
                                                                "height: 16 width: 16 }")
    vgg(z)


def roi_pooling(z: Zoo) -> None:
    """py-faster-rcnn's head: conv features, ROIPooling of the `rois` input (image coordinates, spatial_scale
    1/4 for two stride-2 stages) to 3 x 3, fc6 + ReLU, the class scores and box deltas."""
    z.input("rois", (4, 5))
    x = z.relu(z.conv("conv1", "data", 8, 3, stride=2))
    x = z.relu(z.conv("conv2", x, 8, 3, stride=2))
    z.layer("roi_pool5", "ROIPooling", [x, "rois"], params="roi_pooling_param { pooled_h: 3 pooled_w: 3 "
                                                           "spatial_scale: 0.25 }")
    z.relu(z.fc("fc6", "roi_pool5", 16, 8 * 3 * 3))
    z.fc("cls_score", "fc6", 3, 16)
    z.fc("bbox_pred", "fc6", 12, 16)
    z.layer("cls_prob", "Softmax", ["cls_score"])


def ssd_head(z: Zoo, prior_extra: str = "", detection_extra: str = "") -> None:
    """SSD's head, one class besides the background: loc/conf convolutions permuted and flattened, PriorBox with
    Caffe's defaults left out (clip false, variance 0.1: OpenCV departs from both), DetectionOutput with
    `keep_top_k: -1` (keep every box: OpenCV corrupts its memory on it) and `share_location` left out."""
    x = z.relu(z.conv("conv1", "data", 8, 3, stride=2))
    feature = z.relu(z.conv("conv2", x, 8, 3, stride=2))
    priors = 3  # min_size, the max_size square, aspect ratio 2 (flip off)
    # small head weights: on inputs of +-128 the box deltas stay O(0.1) and the scores spread over (0, 1) (a
    # saturated softmax gives equal scores, whose order within a tie is arbitrary)
    for kind, n in (("loc", 4), ("conf", 2)):
        z.layer(f"mbox_{kind}_conv", "Convolution", [feature], params=f"convolution_param {{ num_output: {priors * n} "
                f"kernel_size: 3 pad: 1 }}", blobs=[z.rand(priors * n, 8, 3, 3, scale=0.0005 if kind == "loc" else 0.001),
                                                   z.rand(priors * n, scale=0.3)])
        z.layer(f"mbox_{kind}_perm", "Permute", [f"mbox_{kind}_conv"], params="permute_param { order: 0 order: 2 "
                                                                            "order: 3 order: 1 }")
        z.layer(f"mbox_{kind}", "Flatten", [f"mbox_{kind}_perm"], params="flatten_param { axis: 1 }")
    z.layer("mbox_priorbox", "PriorBox", [feature, "data"], params="prior_box_param { min_size: 8 max_size: 16 "
            f"aspect_ratio: 2 flip: false offset: 0.5 {prior_extra} }}")
    z.layer("mbox_conf_reshape", "Reshape", ["mbox_conf"], params="reshape_param { shape { dim: 0 dim: -1 dim: 2 } }")
    z.layer("mbox_conf_softmax", "Softmax", ["mbox_conf_reshape"], params="softmax_param { axis: 2 }")
    z.layer("mbox_conf_flatten", "Flatten", ["mbox_conf_softmax"], params="flatten_param { axis: 1 }")
    z.layer("detection_out", "DetectionOutput", ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"],
            params="detection_output_param { num_classes: 2 background_label_id: 0 code_type: CENTER_SIZE "
                   f"nms_param {{ nms_threshold: 0.45 top_k: 40 }} keep_top_k: -1 confidence_threshold: 0.2 "
                   f"{detection_extra} }}")


# name -> (builder, declared input size, another size or None where the input size is fixed)
ZOO: Dict[str, Tuple[Callable[[Zoo], None], int, Optional[int]]] = {
    "alexnet": (alexnet, 67, None),
    "googlenet": (googlenet, 32, 40),
    "vgg": (vgg, 16, None),
    "resnet": (resnet, 32, 48),
    "resnext": (resnext, 24, 40),
    "inception_v3": (inception_v3, 27, 35),
    "inception_resnet": (inception_resnet, 16, 24),
    "se_block": (se_block, 8, 12),
    "densenet": (densenet, 16, 24),
    "squeezenet": (squeezenet, 35, 47),
    "mobilenet_v1": (mobilenet_v1, 32, 40),
    "mobilenet_v2": (mobilenet_v2, 24, 32),
    "fcn": (fcn, 32, 48),
    "hed": (hed, 32, 40),
    "colorization": (colorization, 32, 48),
    "openpose": (openpose, 32, 48),
    "densenet_ceil": (densenet_ceil, 29, 37),
    "resnext_ceil": (resnext_ceil, 26, 34),
    "se_axpy": (se_axpy, 10, 14),
    "hed_duplicates": (hed_duplicates, 32, 40),
    "openpose_1x1": (openpose, 1, 48),  # declared 1 x 1 as published; converted with --input-shape (ZOO_CONVERT)
    "memorydata_vgg": (memorydata_vgg, 16, None),
    "roi_pooling": (roi_pooling, 32, 40),
    "ssd_head": (ssd_head, 32, None),  # the priors are those of the declared size
}

# convert() options of the entries that need one (the command line's --input-shape)
ZOO_CONVERT: Dict[str, dict] = {"openpose_1x1": dict(input_shape={"data": (1, 3, 32, 32)})}


def write_zoo_net(name: str, dirpath, seed: int = 0):
    """(prototxt, caffemodel, declared size, other size or None) of a ZOO entry, written to `dirpath`."""
    build, size, other = ZOO[name]
    z = Zoo(name, size, channels=1 if name == "colorization" else 3, seed=seed)
    build(z)
    prototxt, caffemodel = z.write(dirpath, stem=name)
    return prototxt, caffemodel, size, other


def deep_residual(dirpath, blocks: int = 14, width: int = 32, size: int = 16, seed: int = 1):
    """A deep net of conv+BatchNorm+Scale+ReLU residual blocks (4 layers each, plus the Eltwise and its ReLU), whose
    head subtracts two nearly equal 3x3 convolutions (weights W and 1.0002 W, Eltwise coeff 1, -1). Their rounding
    differs between libraries while the difference is 5000 times smaller than either, so end to end the outputs
    drift well beyond 1e-4, as deep real nets do (ResNet-152: 2.7e-3 against OpenCV), while each layer, fed
    OpenCV's inputs, agrees to float32 precision."""
    z = Zoo("deep", size, seed=seed)
    x = z.conv_bn_relu("conv1", "data", width, k=3)
    for i in range(blocks):
        y = z.conv_bn_relu(f"b{i}_a", x, width, k=3)
        y = z.bn_scale(f"b{i}_b", z.conv(f"b{i}_b", y, width, 3, bias=False))
        x = z.relu(z.eltwise(f"b{i}_sum", [x, y], coeff=(1.0, 0.5)))
    weight = z.rand(16, width, 3, 3)
    for name, w in (("head_a", weight), ("head_b", weight * np.float32(1.0002))):
        z.layer(name, "Convolution", [x], params="convolution_param { num_output: 16 kernel_size: 3 pad: 1 "
                "bias_term: false }", blobs=[w])
        z.channels[name] = 16
    z.classifier(z.eltwise("difference", ["head_b", "head_a"], coeff=(1.0, -1.0)))
    return z.write(dirpath, stem="deep")
