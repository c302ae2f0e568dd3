"""Caffe's loading rules (parser strictness, weights the prototxt lacks), the data layer's transform_param, what
the sidecar says after a cut, Gluon loading, and --verify checking the files on disk before publishing them."""
import logging

import mxnet as mx
import numpy as np
import pytest

from symbols.sidecar import load_sidecar
from tests._caffe_nets import NetBuilder, make_tiny_vgg, vgg16_builder
from tools.caffe_converter import caffe_pb2, cli, params_writer
from tools.caffe_converter import convert
from tools.caffe_converter.caffe_io import CaffeFormatError, load_net, write_caffemodel
from tools.caffe_converter.errors import ConversionError
from tools.caffe_converter.opencv_check import random_inputs, run_opencv


def _one_line(err):
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


# ---- the text parser's rules ------------------------------------------------------------------------------
def test_every_unknown_field_bad_enum_and_wrong_type_is_one_error_naming_field_layer_and_line(tmp_path):
    prototxt, caffemodel = make_tiny_vgg(tmp_path)
    text = prototxt.read_text()
    lines = text.splitlines()
    relu = next(i for i, ln in enumerate(lines) if 'name: "relu1_1"' in ln)
    lines.insert(relu + 1, "  relu_param { negative_slop: 0.1 }")
    pool = next(i for i, ln in enumerate(lines) if "pool: MAX" in ln)
    lines[pool] = lines[pool].replace("pool: MAX", "pool: MAXIMUM")
    conv = next(i for i, ln in enumerate(lines) if "num_output: 4" in ln)
    lines[conv] = lines[conv].replace("num_output: 4", 'num_output: "4"')
    bad = tmp_path / "bad.prototxt"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(CaffeFormatError) as err:
        convert(bad, caffemodel)
    msg = _one_line(err)
    assert "3 setting(s)" in msg
    assert f"{relu + 2}: layer 'relu1_1'" in msg and "unknown field 'negative_slop' in ReLUParameter" in msg
    assert "layer 'pool1'" in msg and "has no value MAXIMUM" in msg and "MAX, AVE" in msg
    assert f"{conv + 1}: layer 'conv1_1'" in msg and "'num_output' expects a number" in msg


def test_fields_of_layer_types_we_do_not_convert_are_accepted_and_the_layer_refused_or_cut(tmp_path):
    b = NetBuilder("prior", seed=1)
    b.input("data", (1, 3, 8, 8))
    b.layer("conv", "Convolution", ["data"], params="convolution_param { num_output: 2 kernel_size: 1 "
            "weight_filler { type: \"xavier\" } engine: CAFFE }", blobs=[b.rand(2, 3, 1, 1), b.rand(2)])
    b.layer("pb", "PriorBox", ["conv", "data"])
    prototxt, caffemodel = b.write(tmp_path, "prior")
    text = prototxt.read_text().replace('type: "PriorBox"', 'type: "PriorBox"\n  prior_box_param { min_size: 30 '
                                        'aspect_ratio: 2 flip: true }', 1)
    prototxt.write_text(text)
    result = convert(prototxt, caffemodel, output_layer="conv")
    assert result.symbol.list_outputs() == ["conv_output"]


# ---- weights for layers the prototxt does not define ---------------------------------------------------------
def _with_extra_weights(tmp_path):
    prototxt, caffemodel = make_tiny_vgg(tmp_path)
    net = load_net(prototxt, caffemodel)
    model = caffe_pb2.NetParameter()
    model.layer.extend([layer.param for layer in net.layers])
    extra = model.layer.add(name="conv5-3", type="InnerProduct")  # as MTCNN det2's caffemodel
    extra.inner_product_param.num_output = 3
    blobs = {layer.name: layer.blobs for layer in net.layers}
    blobs["conv5-3"] = [np.ones((3, 8), np.float32), np.zeros(3, np.float32)]
    extra_model = tmp_path / "extra.caffemodel"
    write_caffemodel(extra_model, model, blobs)
    return prototxt, caffemodel, extra_model


def test_weights_the_prototxt_lacks_are_ignored_with_one_warning_and_refused_with_strict(tmp_path, caplog):
    prototxt, caffemodel, extra_model = _with_extra_weights(tmp_path)
    with caplog.at_level(logging.WARNING):
        result = convert(prototxt, extra_model)
    warnings = [r.getMessage() for r in caplog.records if "conv5-3" in r.getMessage()]
    assert len(warnings) == 1 and "ignoring weights of 1 layer(s)" in warnings[0]
    assert result.unused_weights == ["conv5-3"]
    plain = convert(prototxt, caffemodel)
    for key, value in plain.arg_arrays.items():
        np.testing.assert_array_equal(result.arg_arrays[key], value)
    with pytest.raises(ConversionError, match=r"--strict .*conv5-3") as err:
        convert(prototxt, extra_model, strict=True)
    _one_line(err)


def test_cli_summary_lists_ignored_weights(tmp_path, capsys):
    prototxt, _, extra_model = _with_extra_weights(tmp_path)
    assert cli.main([str(prototxt), str(extra_model), str(tmp_path / "out" / "m")]) == 0
    assert "ignored the caffemodel's weights for 1 layer(s) the prototxt does not define: conv5-3" in \
        capsys.readouterr().out
    assert cli.main([str(prototxt), str(extra_model), str(tmp_path / "out" / "s"), "--strict"]) == 2


# ---- transform_param ------------------------------------------------------------------------------------------
def _write_mean(path, mean):
    blob = caffe_pb2.BlobProto(num=1, channels=mean.shape[0], height=mean.shape[1], width=mean.shape[2])
    blob.data.extend(mean.ravel().tolist())
    path.write_bytes(blob.SerializeToString())


def _with_data_layer(tmp_path, **transform):
    b = vgg16_builder(num_classes=3, input_size=32, widths=(4, 4, 4, 4, 4), fc_width=8)
    data = caffe_pb2.LayerParameter(name="data", type="Data", top=["data", "label"])
    data.include.add(phase=caffe_pb2.TEST)
    for key, value in transform.items():
        if key == "mean_value":
            data.transform_param.mean_value.extend(value)
        else:
            setattr(data.transform_param, key, value)
    b.net.layer.insert(0, data)
    return b.write(tmp_path, "train_val")


def test_transform_mean_file_beside_the_prototxt_becomes_the_mean_image(tmp_path):
    mean_bgr = np.random.default_rng(3).uniform(50, 200, (3, 36, 36)).astype(np.float32)
    prototxt, caffemodel = _with_data_layer(tmp_path, mean_file="imagenet_mean.binaryproto", crop_size=32,
                                            mirror=True)
    _write_mean(tmp_path / "imagenet_mean.binaryproto", mean_bgr)
    prefix = tmp_path / "m" / "vgg"
    convert(prototxt, caffemodel, prefix)
    pre = load_sidecar(prefix)
    np.testing.assert_array_equal(np.load(prefix.parent / pre.mean), mean_bgr[::-1, 2:34, 2:34])
    assert pre.source["transform"] == {"layer": "data", "crop_size": 32, "mirror": True}


def test_transform_mean_file_missing_crop_mismatch_and_force_gray_are_errors(tmp_path):
    prototxt, caffemodel = _with_data_layer(tmp_path / "a", mean_file="gone.binaryproto")
    with pytest.raises(ConversionError, match=r"layer 'data' transform_param mean_file 'gone.binaryproto'.*"
                                              r"--mean-file") as err:
        convert(prototxt, caffemodel)
    _one_line(err)
    assert convert(prototxt, caffemodel, mean=[1, 2, 3]).preprocess.mean == [3.0, 2.0, 1.0]
    prototxt, caffemodel = _with_data_layer(tmp_path / "b", crop_size=227)
    with pytest.raises(ConversionError, match="crop_size 227 differs from the input 32x32"):
        convert(prototxt, caffemodel)
    prototxt, caffemodel = _with_data_layer(tmp_path / "c", force_gray=True)
    with pytest.raises(ConversionError, match="force_gray"):
        convert(prototxt, caffemodel)
    prototxt, caffemodel = _with_data_layer(tmp_path / "d", mean_value=[110.0])
    assert convert(prototxt, caffemodel).preprocess.mean == [110.0, 110.0, 110.0]


# ---- the sidecar after a cut, and Gluon --------------------------------------------------------------------------
def test_sidecar_after_output_layer_names_the_outputs_and_data_is_a_valid_cut(tmp_path):
    prototxt, caffemodel = make_tiny_vgg(tmp_path)
    convert(prototxt, caffemodel, tmp_path / "full")
    full = load_sidecar(tmp_path / "full")
    assert (full.source["outputs"], full.source["softmax"]) == (["prob_output"], True)
    convert(prototxt, caffemodel, tmp_path / "cut", output_layer=["pool5", "fc7"])
    cut = load_sidecar(tmp_path / "cut")
    assert (cut.source["outputs"], cut.source["softmax"]) == (["pool5_output", "fc7_output"], False)
    assert cut.source["input_sizes"]["fixed"] is True  # fc7 needs the declared size
    result = convert(prototxt, caffemodel, tmp_path / "data", output_layer="data")
    assert result.symbol.list_outputs() == ["data"] and not result.arg_arrays
    sym, args, aux = mx.model.load_checkpoint(str(tmp_path / "data"), 0)
    assert sym.list_outputs() == ["data"] and load_sidecar(tmp_path / "data").source["input_sizes"]["step"] == 1


def test_gluon_loads_every_checkpoint_as_the_readme_says(tmp_path):
    """README: `SymbolBlock.imports(sym, ['data'], params)` for a net without a final Softmax; with one, the
    SoftmaxOutput's label is a second (unused) input: `['data', '<output_name>_label']`."""
    prototxt, caffemodel = make_tiny_vgg(tmp_path)
    x_bgr = random_inputs({"data": (2, 3, 32, 32)}, seed=5)["data"]
    x = mx.nd.array(np.ascontiguousarray(x_bgr[:, ::-1]))
    for prefix, cut, layer in ((tmp_path / "cut", "fc8", "fc8"), (tmp_path / "full", None, "prob")):
        convert(prototxt, caffemodel, prefix, output_layer=cut)
        pre = load_sidecar(prefix)
        inputs = ["data"] + ([f"{pre.output_name}_label"] if pre.source["softmax"] else [])
        block = mx.gluon.SymbolBlock.imports(f"{prefix}-symbol.json", inputs, f"{prefix}-0000.params")
        ours = block(x, *([mx.nd.zeros(2)] if len(inputs) > 1 else [])).asnumpy()
        (theirs,) = run_opencv(prototxt, caffemodel, {"data": x_bgr}, [layer])
        np.testing.assert_allclose(ours, theirs.reshape(ours.shape), rtol=0, atol=1e-4 * np.abs(theirs).max())


# ---- --verify checks the files it publishes ---------------------------------------------------------------------
def test_verify_catches_a_params_writer_bug_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    prototxt, caffemodel = make_tiny_vgg(tmp_path)
    prefix = tmp_path / "out" / "vgg"
    real = params_writer.save_params

    def swapping_writer(path, arrays):  # a bug on disk only: two rows of fc8's weight change places
        arrays = dict(arrays)
        w = np.array(arrays["arg:fc8_weight"])
        w[[0, 1]] = w[[1, 0]]
        arrays["arg:fc8_weight"] = w
        real(path, arrays)
    monkeypatch.setattr("tools.caffe_converter.pipeline.save_params", swapping_writer)
    assert cli.main([str(prototxt), str(caffemodel), str(prefix), "--verify"]) == 1
    out = capsys.readouterr()
    assert "ABOVE TOLERANCE" in out.out and "files on disk" in out.out and "nothing written" in out.err
    assert not list(prefix.parent.iterdir())  # no checkpoint, no sidecar, no staging folder
    monkeypatch.setattr("tools.caffe_converter.pipeline.save_params", real)
    assert cli.main([str(prototxt), str(caffemodel), str(prefix), "--verify"]) == 0
    assert "verify OK" in capsys.readouterr().out
    assert {p.name for p in prefix.parent.iterdir()} == {"vgg-symbol.json", "vgg-0000.params", "vgg-preprocess.json"}


def test_verify_of_lrn_with_k_compares_against_caffes_formula_and_an_equivalent_opencv_net(tmp_path, capsys):
    """OpenCV computes LRN as if k were 1; --verify used to fail a correct conversion of k = 2."""
    b = NetBuilder("lrn_k", seed=6)
    b.input("data", (1, 3, 10, 10))
    b.layer("conv1", "Convolution", ["data"], params="convolution_param { num_output: 6 kernel_size: 3 }",
            blobs=[b.rand(6, 3, 3, 3, scale=0.002), b.rand(6, scale=0.1)])
    b.layer("norm1", "LRN", ["conv1"], params="lrn_param { local_size: 5 alpha: 0.3 beta: 0.75 k: 2 }")
    b.layer("fc", "InnerProduct", ["norm1"], params="inner_product_param { num_output: 3 }",
            blobs=[b.rand(3, 6 * 8 * 8), b.rand(3)])
    b.layer("prob", "Softmax", ["fc"])
    prototxt, caffemodel = b.write(tmp_path, "lrn_k")
    prefix = tmp_path / "out" / "lrn"
    assert cli.main([str(prototxt), str(caffemodel), str(prefix), "--verify"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "verify OK" in out and "OpenCV ignores k=2: against Caffe's formula in numpy" in out
    # the equivalent net is needed: OpenCV on the file as it is disagrees with Caffe's formula
    import cv2
    x = random_inputs({"data": (1, 3, 10, 10)}, seed=1)["data"]
    raw = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    raw.setInput(x)
    (fixed,) = run_opencv(prototxt, caffemodel, {"data": x}, ["fc"])
    assert np.abs(raw.forward("fc") - fixed).max() > 1e-2 * np.abs(fixed).max()


def test_verify_of_a_net_opencv_cannot_run_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    b = NetBuilder("thresh", seed=2)
    b.input("data", (1, 3, 6, 6))
    b.layer("conv", "Convolution", ["data"], params="convolution_param { num_output: 2 kernel_size: 3 }",
            blobs=[b.rand(2, 3, 3, 3), b.rand(2)])
    b.layer("t", "Threshold", ["conv"])  # OpenCV 4.11 has no Threshold layer
    prototxt, caffemodel = b.write(tmp_path, "thresh")
    prefix = tmp_path / "out" / "t"
    assert cli.main([str(prototxt), str(caffemodel), str(prefix), "--verify"]) == 1
    err = capsys.readouterr().err.strip()
    assert "OpenCV cannot run" in err and "nothing written" in err and "\n" not in err
    assert not list(prefix.parent.iterdir())
    assert cli.main([str(prototxt), str(caffemodel), str(prefix)]) == 0
