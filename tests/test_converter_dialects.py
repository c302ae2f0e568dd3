"""Caffe forks' dialects the converter accepts (issue 23, item 3), each built in code and compared with OpenCV's
Caffe runtime (cv2.dnn.readNetFromCaffe): the forks' `ceil_mode`, SENet's Axpy, py-faster-rcnn's ROIPooling,
MemoryData/ImageData/Data layers as input declarations, repeated layer names, and --input-shape."""
import numpy as np
import pytest

from tests._caffe_nets import NetBuilder
from tools.caffe_converter import cli, convert
from tools.caffe_converter.caffe_io import load_net
from tools.caffe_converter.errors import CaffeFormatError, ConversionError, UnsupportedLayerError
from tools.caffe_converter.opencv_check import run_mxnet, run_opencv

TOLERANCE = 1e-5  # relative to the largest reference value; these small float32 nets agree to ~1e-7


def _compare(prototxt, caffemodel, result, inputs, reference=None, layer=None):
    """Our converted outputs against OpenCV's on `reference` (default: the same files), inputs by Caffe name."""
    ours = run_mxnet(result.symbol, result.arg_arrays, result.aux_arrays,
                     {mx: inputs[caffe] for mx, caffe in result.caffe_input_names.items()})
    ref_proto, ref_model = reference or (prototxt, caffemodel)
    theirs = run_opencv(ref_proto, ref_model, inputs, [layer or result.output_layers[0]])
    assert ours[0].shape == theirs[0].shape
    np.testing.assert_allclose(ours[0], theirs[0], rtol=0, atol=TOLERANCE * max(np.abs(theirs[0]).max(), 1e-6))
    return ours[0]


def _uniform(shape, seed=0):
    return np.random.default_rng(seed).uniform(-3, 3, size=shape).astype(np.float32)


# ---- ceil_mode -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ceil_mode, pooled", [("true", 4), ("false", 3)])
def test_ceil_mode_matches_opencv_which_reads_it(tmp_path, ceil_mode, pooled):
    """ceil_mode: false (DenseNet-121, ResNeXt-50 as published) rounds down, true up; OpenCV reads the field."""
    b = NetBuilder()
    b.input("data", (1, 2, 8, 9))
    b.layer("pool", "Pooling", ["data"], params=f"pooling_param {{ pool: MAX kernel_size: 3 stride: 2 "
                                                f"ceil_mode: {ceil_mode} }}")
    b.layer("ave", "Pooling", ["data"], params=f"pooling_param {{ pool: AVE kernel_size: 2 stride: 2 pad: 1 "
                                               f"ceil_mode: {ceil_mode} }}")
    prototxt, caffemodel = b.write(tmp_path)
    result = convert(prototxt, caffemodel, keep_bgr=True)
    x = {"data": _uniform((1, 2, 8, 9))}
    out = _compare(prototxt, caffemodel, result, x, layer="pool")
    assert out.shape[2] == pooled  # (8 - 3) / 2 + 1 rounded up or down
    outs = run_mxnet(result.symbol, result.arg_arrays, result.aux_arrays, x)
    (theirs,) = run_opencv(prototxt, caffemodel, x, ["ave"])
    np.testing.assert_allclose(outs[1], theirs, rtol=0, atol=TOLERANCE * np.abs(theirs).max())


def test_ceil_mode_equals_round_mode_and_a_contradiction_is_refused(tmp_path):
    outs = []
    for setting in ("ceil_mode: false", "round_mode: FLOOR", "ceil_mode: false round_mode: FLOOR"):
        b = NetBuilder()
        b.input("data", (1, 2, 8, 8))
        b.layer("pool", "Pooling", ["data"], params=f"pooling_param {{ pool: MAX kernel_size: 3 stride: 2 {setting} }}")
        prototxt, caffemodel = b.write(tmp_path / str(len(outs)))
        result = convert(prototxt, caffemodel, keep_bgr=True)
        outs.append(run_mxnet(result.symbol, result.arg_arrays, result.aux_arrays, {"data": _uniform((1, 2, 8, 8))}))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][0], outs[2][0])
    b = NetBuilder()
    b.input("data", (1, 2, 8, 8))
    b.layer("pool", "Pooling", ["data"], params="pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: true "
                                                "round_mode: FLOOR }")
    prototxt, caffemodel = b.write(tmp_path / "bad")
    with pytest.raises(UnsupportedLayerError, match=r"layer 'pool' \(Pooling\): ceil_mode: true contradicts "
                                                    r"round_mode: FLOOR"):
        convert(prototxt, caffemodel)


# ---- Axpy ----------------------------------------------------------------------------------------------
def _se_axpy_net(a_is_2d=False, batch=1, opencv_order=False):
    """SE-ResNet-50's pattern: global pooling -> 1x1 convs -> sigmoid -> Axpy(scale, residual, shortcut)."""
    b = NetBuilder(seed=3)
    b.input("data", (batch, 8, 6, 6))
    b.layer("res", "Convolution", ["data"], params="convolution_param { num_output: 8 kernel_size: 3 pad: 1 }",
            blobs=[b.rand(8, 8, 3, 3), b.rand(8, scale=0.3)])
    b.layer("pool", "Pooling", ["res"], params="pooling_param { pool: AVE global_pooling: true }")
    b.layer("down", "Convolution", ["pool"], params="convolution_param { num_output: 2 kernel_size: 1 }",
            blobs=[b.rand(2, 8, 1, 1), b.rand(2, scale=0.3)])
    b.layer("down_relu", "ReLU", ["down"], ["down"])
    b.layer("up", "Convolution", ["down"], params="convolution_param { num_output: 8 kernel_size: 1 }",
            blobs=[b.rand(8, 2, 1, 1), b.rand(8, scale=0.3)])
    b.layer("prob", "Sigmoid", ["up"])
    scale = "prob"
    if a_is_2d:
        b.layer("flat", "Flatten", ["prob"])
        scale = "flat"
    # SENet's Axpy (axpy_layer.cpp) computes bottom[0] * bottom[1] + bottom[2]; OpenCV 4.11 computes
    # bottom[0] * bottom[2] + bottom[1], so its reference net lists x and y the other way round.
    b.layer("axpy", "Axpy", [scale, "data", "res"] if opencv_order else [scale, "res", "data"])
    return b


def test_axpy_matches_opencv_and_the_formula(tmp_path):
    """OpenCV runs Axpy at batch 1 only (it fails on a larger batch), and with x and y exchanged: compared
    with OpenCV on the net that lists them the other way round, and with SENet's formula in numpy."""
    b = _se_axpy_net()
    prototxt, caffemodel = b.write(tmp_path)
    result = convert(prototxt, caffemodel, keep_bgr=True)
    x = {"data": _uniform((1, 8, 6, 6))}
    out = _compare(prototxt, caffemodel, result, x, reference=_se_axpy_net(opencv_order=True).write(tmp_path / "cv"))
    # a * x + y in numpy, from OpenCV's own intermediate blobs
    a, res = run_opencv(prototxt, caffemodel, x, ["prob", "res"])
    np.testing.assert_allclose(out, a * res + x["data"], rtol=0, atol=TOLERANCE * np.abs(out).max())


def test_axpy_with_a_two_axis_scale_and_a_batch(tmp_path):
    """a may be N x C (SENet's layer accepts it; OpenCV's does not), at batch 2 (where OpenCV's Axpy fails): the
    formula, with OpenCV's blobs of the same net with a 4-D a (same seeded weights) as a and x."""
    prototxt, caffemodel = _se_axpy_net(a_is_2d=True, batch=2).write(tmp_path / "2d")
    result = convert(prototxt, caffemodel, keep_bgr=True)
    x = {"data": _uniform((2, 8, 6, 6))}
    ours = run_mxnet(result.symbol, result.arg_arrays, result.aux_arrays, x)[0]
    a, res = run_opencv(*_se_axpy_net(batch=2).write(tmp_path / "4d"), x, ["prob", "res"])
    np.testing.assert_allclose(ours, a * res + x["data"], rtol=0, atol=TOLERANCE * np.abs(ours).max())


def test_axpy_with_mismatched_shapes_is_one_line(tmp_path):
    b = NetBuilder()
    b.input("data", (1, 4, 5, 5))
    b.layer("pool", "Pooling", ["data"], params="pooling_param { pool: AVE kernel_size: 2 stride: 2 }")
    b.layer("axpy", "Axpy", ["pool", "data", "data"])
    prototxt, caffemodel = b.write(tmp_path)
    with pytest.raises(UnsupportedLayerError, match=r"layer 'axpy' \(Axpy\): a \(1, 4, 3, 3\) must be N x C"):
        convert(prototxt, caffemodel)


# ---- ROIPooling ----------------------------------------------------------------------------------------
ROIS = np.array([[0, 0, 0, 31, 31], [1, 3.4, 5.6, 20.2, 12.7], [0, 10, 10, 10, 10],   # whole map, fractional, 1 px
                 [1, 2.5, 6.5, 9.5, 13.5], [0, -8, -8, 70, 40], [1, 30, 30, 60, 60],   # beyond the map
                 [0, 3, 5, 9, 11], [1, -3, -1, 7, 1]],  # corners at k + 0.5 once scaled: C's round, half away from 0
                np.float32)


def test_roi_pooling_matches_opencv(tmp_path):
    b = NetBuilder(seed=5)
    b.input("data", (2, 3, 16, 16))
    b.input("rois", ROIS.shape)
    b.layer("conv", "Convolution", ["data"], params="convolution_param { num_output: 4 kernel_size: 3 pad: 1 }",
            blobs=[b.rand(4, 3, 3, 3), b.rand(4, scale=0.3)])
    b.layer("roi_pool", "ROIPooling", ["conv", "rois"], params="roi_pooling_param { pooled_h: 3 pooled_w: 4 "
                                                               "spatial_scale: 0.5 }")
    prototxt, caffemodel = b.write(tmp_path)
    result = convert(prototxt, caffemodel, keep_bgr=True)
    out = _compare(prototxt, caffemodel, result, {"data": _uniform((2, 3, 16, 16)), "rois": ROIS})
    assert out.shape == (len(ROIS), 4, 3, 4)


def test_roi_pooling_without_pooled_size_names_the_field(tmp_path):
    b = NetBuilder()
    b.input("data", (1, 3, 8, 8))
    b.input("rois", (1, 5))
    b.layer("roi_pool", "ROIPooling", ["data", "rois"], params="roi_pooling_param { pooled_w: 2 }")
    prototxt, caffemodel = b.write(tmp_path)
    with pytest.raises(UnsupportedLayerError, match="layer 'roi_pool' .*pooled_h must be >= 1, got 0"):
        convert(prototxt, caffemodel, keep_bgr=True)


# ---- data layers as input declarations -----------------------------------------------------------------
def _conv_net(b, data_layer, params):
    b.layer("data", data_layer, [], ["data", "label"], params=params)
    b.layer("conv1", "Convolution", ["data"], params="convolution_param { num_output: 4 kernel_size: 3 }",
            blobs=[b.rand(4, 3, 3, 3), b.rand(4, scale=0.3)])
    b.layer("relu1", "ReLU", ["conv1"], ["conv1"])
    b.layer("loss", "SoftmaxWithLoss", ["conv1", "label"])


def _input_twin(tmp_path, shape):
    """The same net declared with an Input layer (OpenCV does not run data layers)."""
    b = NetBuilder()
    b.input("data", shape)
    b.layer("conv1", "Convolution", ["data"], params="convolution_param { num_output: 4 kernel_size: 3 }",
            blobs=[b.rand(4, 3, 3, 3), b.rand(4, scale=0.3)])
    b.layer("relu1", "ReLU", ["conv1"], ["conv1"])
    return b.write(tmp_path / "twin")


@pytest.mark.parametrize("data_layer, params, shape", [
    ("MemoryData", "memory_data_param { batch_size: 2 channels: 3 height: 10 width: 12 }", (2, 3, 10, 12)),
    ("ImageData", "image_data_param { source: 'list.txt' batch_size: 2 new_height: 9 new_width: 11 }", (2, 3, 9, 11)),
    ("ImageData", "transform_param { crop_size: 7 } image_data_param { source: 'l.txt' new_height: 9 new_width: 9 }",
     (1, 3, 7, 7)),
])
def test_data_layer_declares_the_input(tmp_path, data_layer, params, shape):
    b = NetBuilder()
    _conv_net(b, data_layer, params)
    prototxt, caffemodel = b.write(tmp_path, input_style="input_shape")
    result = convert(prototxt, caffemodel, keep_bgr=True)
    assert result.input_shapes == {"data": shape}
    assert ("loss", "SoftmaxWithLoss") in [(n, t) for n, t, _ in result.skipped]
    assert data_layer not in [t for _, t, _ in result.skipped]
    _compare(prototxt, caffemodel, result, {"data": _uniform(shape)}, reference=_input_twin(tmp_path, shape),
             layer="relu1")


def test_a_data_layer_without_a_stated_shape_asks_for_input_shape(tmp_path):
    b = NetBuilder()
    _conv_net(b, "Data", "data_param { source: 'train_lmdb' batch_size: 4 backend: LMDB }")
    prototxt, caffemodel = b.write(tmp_path, input_style="input_shape")
    with pytest.raises(CaffeFormatError, match=r"data layer 'data' \(Data\) does not state the shape of 'data' .*"
                                               r"--input-shape data=N,C,H,W"):
        convert(prototxt, caffemodel)
    result = convert(prototxt, caffemodel, keep_bgr=True, input_shape={"data": (4, 3, 8, 8)})
    _compare(prototxt, caffemodel, result, {"data": _uniform((4, 3, 8, 8))},
             reference=_input_twin(tmp_path, (4, 3, 8, 8)), layer="relu1")


def test_a_declared_input_outranks_data_layers(tmp_path):
    b = NetBuilder()
    b.input("data", (1, 3, 6, 6))
    _conv_net(b, "MemoryData", "memory_data_param { batch_size: 2 channels: 3 height: 10 width: 12 }")
    prototxt, _ = b.write(tmp_path)
    net = load_net(prototxt)
    assert net.inputs == {"data": (1, 3, 6, 6)}
    assert ("data", "MemoryData", "training-only layer") in net.skipped


# ---- repeated layer names ------------------------------------------------------------------------------
def _hed_like(b, weighted_twin=False):
    """HED's two layers named `crop` (each crops an upsampled side output to the image)."""
    b.input("data", (1, 3, 12, 12))
    for k, stride in ((2, 2), (3, 4)):
        b.layer(f"score{k}", "Convolution", ["data"], params=f"convolution_param {{ num_output: 1 kernel_size: 1 "
                f"stride: {stride} }}", blobs=[b.rand(1, 3, 1, 1), b.rand(1, scale=0.3)])
        b.layer(f"up{k}", "Deconvolution", [f"score{k}"], params=f"convolution_param {{ num_output: 1 "
                f"kernel_size: {2 * stride} stride: {stride} bias_term: false }}", blobs=[b.rand(1, 1, 2 * stride,
                                                                                             2 * stride)])
        b.layer("crop", "Crop", [f"up{k}", "data"], [f"crop{k}"], params="crop_param { axis: 2 offset: 1 }")
    b.layer("fuse", "Concat", ["crop2", "crop3"])
    if weighted_twin:  # the second is written under a name of its own, renamed in the prototxt afterwards
        b.layer("fuse_conv", "Convolution", ["fuse"], params="convolution_param { num_output: 1 kernel_size: 1 }",
                blobs=[b.rand(1, 2, 1, 1), b.rand(1)])
        b.layer("fuse_conv2", "Convolution", ["fuse_conv"], ["out"],
                params="convolution_param { num_output: 1 kernel_size: 1 }", blobs=[b.rand(1, 1, 1, 1), b.rand(1)])


def test_repeated_layer_names_are_accepted_as_caffe_does(tmp_path, caplog):
    b = NetBuilder(seed=11)
    _hed_like(b)
    prototxt, caffemodel = b.write(tmp_path)
    result = convert(prototxt, caffemodel, keep_bgr=True)
    assert "layer name(s) crop are used more than once" in caplog.text and "crop_1" in caplog.text
    assert [n for n in result.layer_order if n.startswith("crop")] == ["crop", "crop_1"]  # OpenCV's names too
    x = {"data": _uniform((1, 3, 12, 12))}
    _compare(prototxt, caffemodel, result, x)
    ours = run_mxnet(result.blob_symbols["crop_1"], result.arg_arrays, result.aux_arrays, x)[0]
    (theirs,) = run_opencv(prototxt, caffemodel, x, ["crop_1"])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE * np.abs(theirs).max())


def test_a_later_weighted_layer_of_a_repeated_name_is_refused_as_caffe_leaves_it_unset(tmp_path):
    """Caffe copies a caffemodel's weights into the first layer of a name only: the second would run with its
    filler values (OpenCV instead gives both the same weights), so the conversion refuses it by name."""
    b = NetBuilder(seed=11)
    _hed_like(b, weighted_twin=True)
    prototxt, caffemodel = b.write(tmp_path)
    prototxt.write_text(prototxt.read_text().replace('"fuse_conv2"', '"fuse_conv"'))
    with pytest.raises(CaffeFormatError, match=r"layer 'fuse_conv_1' \(Convolution\): the caffemodel has 0 weight "
                                               r"blob\(s\).*later layer named 'fuse_conv'.*first layer of a name"):
        convert(prototxt, caffemodel)
    # a caffemodel written by Caffe from such a net holds two 'fuse_conv' entries with weights: refused too
    b = NetBuilder(seed=11)
    _hed_like(b, weighted_twin=True)
    b.net.layer[-1].name = "fuse_conv"
    b.blobs["fuse_conv"] = b.blobs["fuse_conv"]
    prototxt, caffemodel = b.write(tmp_path / "both")
    with pytest.raises(CaffeFormatError, match=r"two layers named 'fuse_conv' carry weights: Caffe would copy both "
                                               r"into the first layer of that name"):
        convert(prototxt, caffemodel)


# ---- --input-shape -------------------------------------------------------------------------------------
def _openpose_like(tmp_path, kernel=3):
    """Declared 1 x 3 x 1 x 1 and reshaped at run time, as OpenPose's deploy file."""
    b = NetBuilder(seed=2)
    b.input("image", (1, 3, 1, 1))
    b.layer("conv1_1", "Convolution", ["image"], params="convolution_param { num_output: 4 kernel_size: 3 pad: 1 }",
            blobs=[b.rand(4, 3, 3, 3), b.rand(4, scale=0.3)])
    b.layer("relu1_1", "ReLU", ["conv1_1"], ["conv1_1"])
    b.layer("pool1_stage1", "Pooling", ["conv1_1"], params=f"pooling_param {{ pool: MAX kernel_size: {kernel} "
                                                           f"stride: 2 }}")
    b.layer("conv2", "Convolution", ["pool1_stage1"], params="convolution_param { num_output: 2 kernel_size: 3 }",
            blobs=[b.rand(2, 4, 3, 3), b.rand(2, scale=0.3)])
    return b.write(tmp_path)


@pytest.mark.parametrize("kernel", [3, 2])  # 3: no window fits (our check); 2: Caffe clips it, MXNet refuses
def test_a_one_pixel_declaration_fails_in_one_line_naming_layer_shapes_and_the_option(tmp_path, capsys, kernel):
    prototxt, caffemodel = _openpose_like(tmp_path, kernel)
    rc = cli.main([str(prototxt), str(caffemodel), str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "infer_shape error" not in out + err and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "layer 'pool1_stage1' (Pooling)" in lines[0] and "(1, 4, 1, 1)" in lines[0], lines[0]
    assert "image=1,3,1,1" in lines[0] and "--input-shape" in lines[0], lines[0]


def test_input_shape_overrides_the_declaration(tmp_path, capsys):
    prototxt, caffemodel = _openpose_like(tmp_path)
    rc = cli.main([str(prototxt), str(caffemodel), str(tmp_path / "out"), "--input-shape", "image=1,3,23,19",
                   "--keep-bgr"])
    assert rc == 0, capsys.readouterr().err
    result = convert(prototxt, caffemodel, keep_bgr=True, input_shape={"image": (1, 3, 23, 19)})
    assert result.input_shapes == {"data": (1, 3, 23, 19)}
    _compare(prototxt, caffemodel, result, {"image": _uniform((1, 3, 23, 19))})


@pytest.mark.parametrize("value, message", [
    ("img=1,3,8,8", "--input-shape names 'img', which is not an input of the net; its inputs: image"),
    ("image=3,8,8", "--input-shape image=3,8,8 has 3 axes; the net declares image with 4"),
])
def test_input_shape_errors(tmp_path, capsys, value, message):
    prototxt, caffemodel = _openpose_like(tmp_path)
    assert cli.main([str(prototxt), str(caffemodel), str(tmp_path / "out"), "--input-shape", value]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_input_shape_syntax_is_checked_by_the_parser(tmp_path, capsys):
    prototxt, caffemodel = _openpose_like(tmp_path)
    with pytest.raises(SystemExit):
        cli.main([str(prototxt), str(caffemodel), str(tmp_path / "out"), "--input-shape", "image=1,3,x,8"])
    assert "expected NAME=N,C,H,W with positive integers, got 'image=1,3,x,8'" in capsys.readouterr().err


def test_conversion_errors_stay_value_errors():
    assert issubclass(ConversionError, ValueError) and issubclass(UnsupportedLayerError, ValueError)
