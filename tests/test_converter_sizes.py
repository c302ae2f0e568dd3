"""Converted nets at input sizes other than the prototxt's: Caffe's answer (OpenCV reshapes a Caffe net to any
input), or a clean error when binding, never a crash. Every other-size bind runs in a subprocess
(tests/_bind_at_size.py), so a segfault inside MXNet fails the test instead of killing the run."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from symbols.sidecar import load_sidecar
from tests._caffe_nets import NetBuilder, make_tiny_vgg
from tools.caffe_converter import convert
from tools.caffe_converter.opencv_check import run_opencv

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


def bind_at(prefix, shape, seed=0, rgb=True, x=None):
    """(return code, outputs or the error line, BGR input) of binding `prefix` at `shape` (or on the BGR input
    `x`) in a fresh process."""
    if x is not None:
        shape = x.shape
        seed = Path(f"{prefix}-in-{'x'.join(map(str, shape))}.npy")
        np.save(seed, x)
    out = Path(f"{prefix}-{'x'.join(map(str, shape))}.npz")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_bind_at_size.py"), str(prefix),
                           ",".join(map(str, shape)), str(seed), str(out), "rgb" if rgb else "bgr"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return proc.returncode, proc.stderr.strip().splitlines()[-1:] or [""], None
    data = np.load(out)
    return 0, [data[f"out{i}"] for i in range(len(data.files) - 1)], data["x"]


def assert_close(ours, theirs):
    theirs = np.asarray(theirs).reshape(ours.shape)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE * np.abs(theirs).max())


def _pnet_like(tmp_path):
    """MTCNN PNet's shape: convs + PReLU + ceil pooling, declared at 12x12, a final per-position Softmax and a
    box regression output; meant to run at every size of an image pyramid."""
    b = NetBuilder("pnet_like", seed=3)
    b.input("data", (1, 3, 12, 12))
    b.layer("conv1", "Convolution", ["data"], params="convolution_param { num_output: 4 kernel_size: 3 }",
            blobs=[b.rand(4, 3, 3, 3), b.rand(4)])
    b.layer("prelu1", "PReLU", ["conv1"], ["conv1"], blobs=[b.rand(4, scale=0.2)])
    b.layer("pool1", "Pooling", ["conv1"], params="pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
    b.layer("conv2", "Convolution", ["pool1"], params="convolution_param { num_output: 6 kernel_size: 3 }",
            blobs=[b.rand(6, 4, 3, 3), b.rand(6)])
    b.layer("conv3", "Convolution", ["conv2"], params="convolution_param { num_output: 6 kernel_size: 3 }",
            blobs=[b.rand(6, 6, 3, 3), b.rand(6)])
    b.layer("conv4-1", "Convolution", ["conv3"], params="convolution_param { num_output: 2 kernel_size: 1 }",
            blobs=[b.rand(2, 6, 1, 1, scale=2.0), b.rand(2)])
    b.layer("conv4-2", "Convolution", ["conv3"], params="convolution_param { num_output: 4 kernel_size: 1 }",
            blobs=[b.rand(4, 6, 1, 1), b.rand(4)])
    b.layer("prob1", "Softmax", ["conv4-1"])
    return b.write(tmp_path, "pnet_like")


def _ssd_head_like(tmp_path):
    """SSD's heads: conv -> Permute -> Flatten, Concat, Reshape(0, -1, 2) -> Softmax(axis 2) -> Flatten."""
    b = NetBuilder("ssd_like", seed=4)
    b.input("data", (1, 3, 16, 16))
    b.layer("conv1", "Convolution", ["data"], params="convolution_param { num_output: 4 kernel_size: 3 pad: 1 "
            "stride: 2 }", blobs=[b.rand(4, 3, 3, 3), b.rand(4)])
    b.layer("conf1", "Convolution", ["conv1"], params="convolution_param { num_output: 4 kernel_size: 1 }",
            blobs=[b.rand(4, 4, 1, 1), b.rand(4)])
    b.layer("conf2", "Convolution", ["data"], params="convolution_param { num_output: 2 kernel_size: 3 pad: 1 }",
            blobs=[b.rand(2, 3, 3, 3), b.rand(2)])
    for name in ("conf1", "conf2"):
        b.layer(f"{name}_perm", "Permute", [name], params="permute_param { order: 0 order: 2 order: 3 order: 1 }")
        b.layer(f"{name}_flat", "Flatten", [f"{name}_perm"])
    b.layer("conf", "Concat", ["conf1_flat", "conf2_flat"], params="concat_param { axis: 1 }")
    b.layer("conf_reshape", "Reshape", ["conf"], params="reshape_param { shape { dim: 0 dim: -1 dim: 2 } }")
    b.layer("conf_softmax", "Softmax", ["conf_reshape"], params="softmax_param { axis: 2 }")
    b.layer("conf_flatten", "Flatten", ["conf_softmax"])
    return b.write(tmp_path, "ssd_like")


@pytest.mark.slow
@pytest.mark.parametrize("hw", [(12, 12), (61, 83), (30, 17)])
def test_pnet_like_softmax_is_per_position_at_pyramid_sizes(tmp_path, hw):
    prototxt, caffemodel = _pnet_like(tmp_path)
    prefix = tmp_path / "pnet"
    convert(prototxt, caffemodel, prefix)
    sizes = load_sidecar(prefix).source["input_sizes"]
    assert sizes["fixed"] is False and sizes["step"] == 1, sizes
    rc, outs, x = bind_at(prefix, (1, 3) + hw)
    assert rc == 0, outs
    box, prob = run_opencv(prototxt, caffemodel, {"data": x}, ["conv4-2", "prob1"])
    assert outs[1].shape == prob.shape  # (1, 2, h', w'): a softmax over the 2 channels at each position
    assert_close(outs[0], box)
    assert_close(outs[1], prob)
    np.testing.assert_allclose(outs[1].sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("hw", [(16, 16), (40, 40), (24, 56)])
def test_ssd_like_heads_reshape_at_any_size(tmp_path, hw):
    prototxt, caffemodel = _ssd_head_like(tmp_path)
    prefix = tmp_path / "ssd"
    convert(prototxt, caffemodel, prefix)
    rc, outs, x = bind_at(prefix, (1, 3) + hw)
    assert rc == 0, outs
    (theirs,) = run_opencv(prototxt, caffemodel, {"data": x}, ["conf_flatten"])
    assert outs[0].shape[1] == (-(-hw[0] // 2) * -(-hw[1] // 2) * 4 + hw[0] * hw[1] * 2)
    assert_close(outs[0], theirs)


@pytest.mark.slow
def test_fixed_size_nets_fail_to_bind_at_other_sizes_cleanly(tmp_path):
    """A classifier (Flatten into InnerProduct) and a Reshape without -1: Caffe fails at another size, so MXNet
    must refuse the bind with an error, not segfault or return a reshaped buffer."""
    prototxt, caffemodel = make_tiny_vgg(tmp_path)
    prefix = tmp_path / "vgg"
    convert(prototxt, caffemodel, prefix)
    assert load_sidecar(prefix).source["input_sizes"] == {"fixed": True, "declared": [32, 32]}
    assert bind_at(prefix, (1, 3, 32, 32))[0] == 0
    for shape in ((1, 3, 48, 48), (1, 3, 33, 40)):
        rc, err, _ = bind_at(prefix, shape)
        assert rc == 3, (rc, err)
    b = NetBuilder("fixed_reshape", seed=2)
    b.input("data", (1, 3, 4, 4))
    b.layer("flat", "Flatten", ["data"])
    b.layer("rs", "Reshape", ["flat"], params="reshape_param { shape { dim: 0 dim: 12 dim: 4 } }")
    p2, c2 = b.write(tmp_path, "fixed_reshape")
    prefix2 = tmp_path / "rs"
    convert(p2, c2, prefix2, keep_bgr=True)
    rc, outs, x = bind_at(prefix2, (1, 3, 4, 4), rgb=False)
    assert rc == 0 and outs[0].shape == (1, 12, 4)
    np.testing.assert_array_equal(outs[0], x.reshape(1, 12, 4))
    rc, err, _ = bind_at(prefix2, (1, 3, 8, 8), rgb=False)
    assert rc == 3 and "different size" in err[0], (rc, err)


@pytest.mark.slow
@pytest.mark.parametrize("hw", [(20, 20), (33, 47)])
def test_fcn_crop_to_the_image_follows_the_input_size(tmp_path, hw):
    """FCN: scores upsampled by a Deconvolution, then cropped to `data` with an offset; at any size."""
    b = NetBuilder("fcn_like", seed=8)
    b.input("data", (1, 3, 20, 20))
    b.layer("conv1", "Convolution", ["data"], params="convolution_param { num_output: 4 kernel_size: 3 stride: 2 }",
            blobs=[b.rand(4, 3, 3, 3), b.rand(4)])
    b.layer("up", "Deconvolution", ["conv1"], params="convolution_param { num_output: 2 kernel_size: 6 stride: 2 "
            "bias_term: false }", blobs=[b.rand(4, 2, 6, 6)])
    b.layer("score", "Crop", ["up", "data"], params="crop_param { axis: 2 offset: 1 }")
    prototxt, caffemodel = b.write(tmp_path, "fcn_like")
    prefix = tmp_path / "fcn"
    convert(prototxt, caffemodel, prefix)
    rc, outs, x = bind_at(prefix, (1, 3) + hw)
    assert rc == 0, outs
    (theirs,) = run_opencv(prototxt, caffemodel, {"data": x}, ["score"])
    assert outs[0].shape == (1, 2) + hw
    assert_close(outs[0], theirs)


@pytest.mark.slow
def test_input_sizes_record_follows_caffes_pooling_rule(tmp_path):
    """A 2x2/2 pool with pad 1 keeps its last window at even sizes ('full') but Caffe drops it at odd ones
    ('valid'); one MXNet convention cannot do both, so the sidecar says: any size in steps of 2 from 4x4."""
    from tools.caffe_converter.sizes import describe
    b = NetBuilder("pad_pool", seed=9)
    b.input("data", (1, 3, 4, 4))
    b.layer("conv", "Convolution", ["data"], params="convolution_param { num_output: 2 kernel_size: 1 }",
            blobs=[b.rand(2, 3, 1, 1), b.rand(2)])
    b.layer("pool", "Pooling", ["conv"], params="pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }")
    prototxt, caffemodel = b.write(tmp_path, "pad_pool")
    prefix = tmp_path / "pool"
    convert(prototxt, caffemodel, prefix)
    sizes = load_sidecar(prefix).source["input_sizes"]
    assert (sizes["fixed"], sizes["step"]) == (False, 2), sizes
    assert describe(sizes) == "any size in steps of 2 from 4x4"
    rc, outs, x = bind_at(prefix, (1, 3, 8, 12))  # an accepted size: Caffe's answer
    assert rc == 0, outs
    (theirs,) = run_opencv(prototxt, caffemodel, {"data": x}, ["pool"])
    assert outs[0].shape == theirs.shape == (1, 2, 5, 7)
    assert_close(outs[0], theirs)


@pytest.mark.slow
def test_equal_slice_of_a_spatial_axis_follows_the_input_size(tmp_path):
    """The reference is OpenCV on the net without the Slice (OpenCV 4.11 refuses this Slice at another size)."""
    def build(with_slice):
        b = NetBuilder("halves", seed=10)
        b.input("data", (1, 3, 4, 6))
        b.layer("conv", "Convolution", ["data"], params="convolution_param { num_output: 2 kernel_size: 1 }",
                blobs=[b.rand(2, 3, 1, 1), b.rand(2)])
        if with_slice:
            b.layer("halves", "Slice", ["conv"], ["left", "right"], params="slice_param { axis: 3 }")
        return b.write(tmp_path / str(with_slice), "halves")
    prototxt, caffemodel = build(True)
    prefix = tmp_path / "halves"
    convert(prototxt, caffemodel, prefix)
    rc, outs, x = bind_at(prefix, (1, 3, 5, 10))
    assert rc == 0, outs
    (conv,) = run_opencv(*build(False), {"data": x}, ["conv"])
    assert outs[0].shape == outs[1].shape == (1, 2, 5, 5)
    assert_close(outs[0], conv[..., :5])
    assert_close(outs[1], conv[..., 5:])


def test_fixed_pooling_before_an_inner_product_is_fixed(tmp_path):
    """SE-BN-Inception's end: a fixed 2x2 (there 7x7) pooling feeds an InnerProduct. Three 2x2/2 convolutions
    (which round down) keep its input 2x2 from 16 up to 23 pixels, so sizes near the declared one all bind; 24 and
    more do not (the InnerProduct's weight fixes its input). The sidecar must say fixed, and binding far off must
    fail cleanly."""
    from tools.caffe_converter.sizes import describe
    b = NetBuilder("fixed_pool_fc", seed=11)
    b.input("data", (1, 3, 16, 16))
    b.layer("conv", "Convolution", ["data"], params="convolution_param { num_output: 4 kernel_size: 1 }",
            blobs=[b.rand(4, 3, 1, 1), b.rand(4)])
    bottom = "conv"
    for i in range(3):
        b.layer(f"down{i}", "Convolution", [bottom], params="convolution_param { num_output: 4 kernel_size: 2 "
                "stride: 2 }", blobs=[b.rand(4, 4, 2, 2), b.rand(4)])
        bottom = f"down{i}"
    b.layer("pool5", "Pooling", [bottom], params="pooling_param { pool: AVE kernel_size: 2 stride: 1 }")
    b.layer("fc", "InnerProduct", ["pool5"], params="inner_product_param { num_output: 5 }",
            blobs=[b.rand(5, 4), b.rand(5)])
    prototxt, caffemodel = b.write(tmp_path, "fixed_pool_fc")
    prefix = tmp_path / "fc"
    convert(prototxt, caffemodel, prefix)
    sizes = load_sidecar(prefix).source["input_sizes"]
    assert sizes == {"fixed": True, "declared": [16, 16]}, sizes
    assert describe(sizes) == "fixed 16x16"
    rc, outs, x = bind_at(prefix, (1, 3, 17, 19))  # near sizes do run, and give Caffe's answer
    assert rc == 0, outs
    (theirs,) = run_opencv(prototxt, caffemodel, {"data": x}, ["fc"])
    assert_close(outs[0], theirs)
    rc, err, _ = bind_at(prefix, (1, 3, 32, 32))
    assert rc != 0 and err[0].strip(), (rc, err)
