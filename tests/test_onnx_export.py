"""ONNX export: onnxruntime matches MXNet within 1e-4 relative on VGG-like and ResNet-like fine-tuned nets."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mxnet as mx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from symbols.sidecar import load_sidecar, save_sidecar
from tests import _deploy_fixtures as fx
from tools import deploy, onnx_export

RTOL, ATOL = 1e-4, 1e-6  # the bar; atol only matters for probabilities near zero
ROOT = Path(__file__).resolve().parents[1]


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=sorted(fx.NETS))
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"onnx_{request.param}")
    prefix = fx.make_checkpoint(folder / "ckpt", request.param, epoch=2)
    b, summary = deploy.write_bundle(prefix, 2, folder / "bundle", onnx=True)
    return prefix, b, summary


@pytest.mark.parametrize("batch", [1, 4])
def test_onnxruntime_matches_mxnet(exported, batch):
    prefix, b, _ = exported
    x = fx.sample_input(batch=batch, seed=batch)
    reference = fx.reference_predict(prefix, 2, x)  # the training checkpoint through stock Module
    got = _session(b.onnx_file).run(None, {"data": x})[0]
    assert got.shape == reference.shape == (batch, fx.NUM_CLASSES)
    np.testing.assert_allclose(got, reference, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(got.argmax(1), reference.argmax(1))


def test_logits_match_too(exported, tmp_path):
    """Softmax compresses errors; the classifier's logits must match within the same relative bar."""
    prefix, _, _ = exported
    sym, args, auxs = mx.model.load_checkpoint(prefix, 2)
    logits = sym.get_children()[0]
    pre = load_sidecar(prefix)
    onnx_export.export_onnx(logits, args, auxs, pre, tmp_path / "logits.onnx", verify=False)
    x = fx.sample_input(batch=3, seed=9)
    mod = mx.mod.Module(logits, label_names=None, context=mx.cpu())
    mod.bind([("data", x.shape)], for_training=False)
    mod.set_params(args, auxs, allow_extra=True)
    mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
    reference = mod.get_outputs()[0].asnumpy()
    got = _session(tmp_path / "logits.onnx").run(None, {"data": x})[0]
    scale = np.abs(reference).max()
    assert scale > 0.1
    assert np.abs(got - reference).max() <= RTOL * scale


def test_model_structure(exported):
    _, b, summary = exported
    model = onnx.load(str(b.onnx_file))
    onnx.checker.check_model(model)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    assert [i.name for i in model.graph.input] == ["data"]  # weights are initializers, not inputs
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and [d.dim_value for d in dims[1:]] == list(fx.INPUT_SHAPE)
    assert model.graph.node[-1].op_type == "Softmax"  # SoftmaxOutput exported as softmax
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["class_names"]) == fx.CLASSES
    assert json.loads(meta["preprocess"])["channel_order"] == "BGR"
    assert "onnxruntime" in summary["parity"]


def test_fix_gamma_default_is_honoured(tmp_path):
    """MXNet ignores gamma when fix_gamma=True (its default); the stock exporter would apply it."""
    x = mx.sym.Convolution(mx.sym.var("data"), num_filter=4, kernel=(3, 3), name="conv")
    x = mx.sym.BatchNorm(x, name="bn")  # fix_gamma defaults to True
    sym = mx.sym.FullyConnected(x, num_hidden=3, name="fc")  # logits: a softmax could saturate and hide it
    pre = fx.Preprocess(input_shape=(3, 8, 8), num_classes=3)
    rng = np.random.default_rng(0)
    args = {"conv_weight": rng.normal(0, 0.3, (4, 3, 3, 3)), "conv_bias": np.zeros(4),
            "bn_gamma": np.full(4, 5.0), "bn_beta": rng.normal(0, 1, 4),
            "fc_weight": rng.normal(0, 0.3, (3, 4 * 6 * 6)), "fc_bias": np.zeros(3)}
    auxs = {"bn_moving_mean": rng.normal(0, 1, 4), "bn_moving_var": rng.uniform(0.5, 2, 4)}
    to_nd = lambda d: {k: mx.nd.array(np.asarray(v, np.float32)) for k, v in d.items()}
    onnx_export.export_onnx(sym, to_nd(args), to_nd(auxs), pre, tmp_path / "bn.onnx", verify=False)
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    mod = mx.mod.Module(sym, label_names=None, context=mx.cpu())
    mod.bind([("data", x.shape)], for_training=False)
    mod.set_params(to_nd(args), to_nd(auxs))
    mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
    reference = mod.get_outputs()[0].asnumpy()
    got = _session(tmp_path / "bn.onnx").run(None, {"data": x})[0]
    assert np.abs(reference).max() > 0.1
    np.testing.assert_allclose(got, reference, rtol=RTOL, atol=RTOL * np.abs(reference).max())


def test_unsupported_operator_is_named(tmp_path):
    x = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=3, name="fc")
    sym = mx.sym.SVMOutput(x, name="svm_head")
    pre = fx.Preprocess(input_shape=(3, 4, 4), num_classes=3)
    args = {"fc_weight": mx.nd.ones((3, 48)), "fc_bias": mx.nd.zeros(3)}
    with pytest.raises(onnx_export.OnnxExportError, match=r"svm_head \(SVMOutput\)"):
        onnx_export.export_onnx(sym, args, {}, pre, tmp_path / "svm.onnx")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_exporter_compat_is_undone():
    """The onnx.mapping stand-in and the opset override exist only while exporting."""
    import onnx.defs

    newest = onnx.defs.onnx_opset_version()
    with onnx_export._exporter_compat():
        assert onnx.defs.onnx_opset_version() == 13
        from onnx import mapping  # noqa: F401  (what the exporter imports)
    assert onnx.defs.onnx_opset_version() == newest and "onnx.mapping" not in sys.modules


def test_cli(tmp_path):
    prefix = fx.make_checkpoint(tmp_path / "ckpt", "resnet_like", epoch=1)
    out = tmp_path / "m.onnx"
    res = subprocess.run([sys.executable, "-m", "tools.onnx_export", prefix, "1", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "onnxruntime vs MXNet: max abs diff" in res.stdout and out.is_file()
    bad = subprocess.run([sys.executable, "-m", "tools.onnx_export", prefix + "_nope", "1", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "_nope-preprocess.json" in bad.stderr


def test_full_pooling_window_in_padding_is_refused_with_the_layer_named(tmp_path):
    """MXNet's 'full' convention keeps a last window that starts in the padding; ONNX drops it."""
    ok = mx.sym.Pooling(mx.sym.var("data"), kernel=(3, 3), stride=(2, 2), pad=(1, 1), pool_type="max",
                        pooling_convention="full", name="pool_ok")
    onnx_export.export_onnx(ok, {}, {}, fx.Preprocess(input_shape=(1, 8, 8)), tmp_path / "ok.onnx")  # verified
    bad = mx.sym.Pooling(mx.sym.var("data"), kernel=(2, 2), stride=(2, 2), pad=(1, 1), pool_type="max",
                         pooling_convention="full", name="pool_bad")
    with pytest.raises(onnx_export.OnnxExportError, match=r"layer pool_bad .*starts in the padding"):
        onnx_export.export_onnx(bad, {}, {}, fx.Preprocess(input_shape=(1, 7, 7)), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_caffe_net_to_bundle_matches_opencv(tmp_path, fmt):
    """Caffe VGG -> our converter -> deploy bundle: every loader and onnxruntime agree with OpenCV's Caffe
    importer, an independent runtime fed the BGR, mean-subtracted image the Caffe way."""
    cv2 = pytest.importorskip("cv2")
    from tests._caffe_nets import make_tiny_vgg
    from tools.caffe_converter import convert

    prototxt, caffemodel = make_tiny_vgg(tmp_path / "caffe", num_classes=4, input_size=32, fmt=fmt)
    prefix = tmp_path / "conv" / "vgg"
    convert(prototxt, caffemodel, prefix, mean=(104.0, 117.0, 123.0))
    classes = tmp_path / "c.classes.json"
    classes.write_text(json.dumps({"format": "mxtransfer.classmap/1", "classes": list("abcd")}))
    b, _ = deploy.write_bundle(str(prefix), 0, tmp_path / "bundle", classes=str(classes), onnx=True)

    rgb = np.random.default_rng(3).integers(0, 256, size=(2, 32, 32, 3)).astype(np.float32)
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    bgr = rgb[..., ::-1].transpose(0, 3, 1, 2) - np.array([104, 117, 123], np.float32).reshape(1, 3, 1, 1)
    net.setInput(np.ascontiguousarray(bgr))
    reference = net.forward().reshape(2, 4)
    assert np.ptp(reference, axis=1).min() > 0.05  # not uniform: a wrong channel order or mean would show

    x = load_sidecar(b.prefix).apply(rgb, b.outdir)  # the bundle's own recipe: RGB in, as documented
    for name, got in {"module": deploy.predict_module(b, x), "gluon": deploy.predict_gluon(b, x),
                      "c_api": deploy.predict_c_api(b, x), "onnxruntime": deploy.predict_onnx(b, x)}.items():
        np.testing.assert_allclose(got, reference, rtol=RTOL, atol=1e-5, err_msg=name)


def test_a_mean_image_model_is_checked_through_its_real_preprocessing(tmp_path, monkeypatch):
    """The check feeds seeded images through Preprocess.apply with the checkpoint's folder (wherever the CLI
    runs): what onnxruntime gets, times std/scale plus the mean image, is whole pixel values in [0, 255]."""
    prefix = fx.make_checkpoint(tmp_path / "ckpt", "vgg_like", epoch=1)
    pre = load_sidecar(prefix)
    mean = np.random.default_rng(4).uniform(60, 180, pre.input_shape).astype(np.float32)
    np.save(tmp_path / "ckpt" / "vgg_like-mean.npy", mean)
    save_sidecar(prefix, replace(pre, mean="vgg_like-mean.npy"))
    fed = []
    real = onnx_export.run_onnxruntime
    monkeypatch.setattr(onnx_export, "run_onnxruntime", lambda path, x: fed.append(x) or real(path, x))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the mean image is found beside the checkpoint, not in the working folder
    out = tmp_path / "m.onnx"
    assert onnx_export.main([prefix, "1", str(out)]) == 0 and out.is_file()
    (x,) = fed
    assert pre.std is None and pre.channel_order == "BGR"  # the fixture's recipe, inverted by hand below
    pixels = x / pre.scale + mean  # channel order is BGR on both sides; the mean image is in channel order
    assert np.abs(pixels - np.round(pixels)).max() < 1e-3
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3 and len(np.unique(np.round(pixels))) > 200

    # Without its mean image the model cannot be checked: one line naming the file, nothing written.
    (tmp_path / "ckpt" / "vgg_like-mean.npy").unlink()
    out.unlink()
    res = subprocess.run([sys.executable, "-m", "tools.onnx_export", prefix, "1", str(out)], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "vgg_like-mean.npy: mean image named by the sidecar is missing" in res.stderr and not out.exists()
