"""Deploy bundle: files, atomicity, errors, and identical predictions through Module, Gluon and the C API."""
import json
import shutil
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from recbuild.classmap import read_class_map
from symbols.sidecar import load_sidecar
from tests import _deploy_fixtures as fx
from tools import c_predict, deploy

# Same kernels underneath, different entry points: float32 round-off at most.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module", params=sorted(fx.NETS))
def bundle(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    prefix = fx.make_checkpoint(folder / "ckpt", request.param, epoch=3)
    bundle, summary = deploy.write_bundle(prefix, 3, folder / "bundle")
    return prefix, bundle, summary


def test_bundle_files_and_metadata(bundle):
    prefix, b, summary = bundle
    assert sorted(p.name for p in b.outdir.iterdir()) == sorted(
        ["model-symbol.json", "model-0000.params", "model-preprocess.json", "model.classes.json", "README.md"])
    assert read_class_map(b.outdir / "model.classes.json") == fx.CLASSES
    pre = load_sidecar(b.prefix)
    assert pre.class_names == fx.CLASSES and pre.num_classes == fx.NUM_CLASSES
    assert pre.source["deployed_from"] == {"prefix": prefix, "epoch": 3}
    assert pre.input_shape == fx.INPUT_SHAPE and pre.channel_order == "BGR"
    sym, args, auxs = mx.model.load_checkpoint(str(b.prefix), 0)
    assert sym.list_outputs() == ["prob_output"]  # same output name as the training symbol
    assert "prob_label" not in sym.list_arguments()
    _, src_args, src_auxs = mx.model.load_checkpoint(prefix, 3)
    assert set(args) == set(src_args) and set(auxs) == set(src_auxs)
    for name in src_args:
        np.testing.assert_array_equal(args[name].asnumpy(), src_args[name].asnumpy())
    assert summary["unused_params"] == []
    assert set(summary["parity"]) == {"gluon.SymbolBlock", "C predict API"}
    readme = (b.outdir / "README.md").read_text()
    assert "BGR" in readme and "prob_output" in readme and "(N, 3, 32, 32)" in readme


def test_three_loaders_agree_with_the_training_checkpoint(bundle):
    prefix, b, _ = bundle
    x = fx.sample_input(batch=3)
    reference = fx.reference_predict(prefix, 3, x)  # SoftmaxOutput training symbol, stock Module
    assert reference.shape == (3, fx.NUM_CLASSES)
    assert reference.max() < 0.99  # not saturated: a wrong op would show
    results = {"module": deploy.predict_module(b, x), "gluon": deploy.predict_gluon(b, x),
               "c_api": deploy.predict_c_api(b, x)}
    for name, got in results.items():
        np.testing.assert_allclose(got, reference, rtol=RTOL, atol=ATOL, err_msg=name)
        np.testing.assert_array_equal(got.argmax(1), reference.argmax(1), err_msg=name)


def test_c_predict_api_symbols_are_exported_by_the_wheel():
    lib = c_predict.find_libmxnet()
    if shutil.which("nm"):
        out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                             check=True).stdout
        exported = {line.split()[-1] for line in out.splitlines() if " T " in line}
    else:  # binutils missing: ask the dynamic loader instead
        handle = c_predict.load_library()
        exported = {name for name in c_predict.REQUIRED_SYMBOLS if hasattr(handle, name)}
    assert set(c_predict.REQUIRED_SYMBOLS) <= exported


def test_c_predictor_batch_one_and_errors(bundle):
    _, b, _ = bundle
    x = fx.sample_input(batch=1, seed=5)
    with c_predict.CPredictor.from_files(b.symbol_file, b.params_file, {"data": x.shape}) as pred:
        assert pred.output_shape(0) == (1, fx.NUM_CLASSES)
        np.testing.assert_allclose(pred.forward(data=x)[0], deploy.predict_module(b, x), rtol=RTOL, atol=ATOL)
        with pytest.raises(ValueError, match="shape"):
            pred.forward(data=np.zeros((2,) + fx.INPUT_SHAPE, np.float32))
    with pytest.raises(c_predict.CPredictError, match="MXPredCreate"):
        c_predict.CPredictor(b.symbol_file.read_text(), b"not a params file", {"data": x.shape})


def test_refuses_non_empty_outdir_and_force_replaces(tmp_path):
    prefix = fx.make_checkpoint(tmp_path / "ckpt", "vgg_like", epoch=1)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(deploy.DeployError, match="not empty.*--force"):
        deploy.write_bundle(prefix, 1, out, check=False)
    assert (out / "keep.txt").read_text() == "user file"
    deploy.write_bundle(prefix, 1, out, force=True, check=False)
    assert not (out / "keep.txt").exists() and (out / "model-0000.params").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_leaves_no_bundle_and_keeps_the_old_one(tmp_path, monkeypatch):
    prefix = fx.make_checkpoint(tmp_path / "ckpt", "vgg_like", epoch=1)
    out = tmp_path / "bundle"
    deploy.write_bundle(prefix, 1, out, check=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "README.md"}

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash during the parity check")

    monkeypatch.setattr(deploy, "check_parity", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        deploy.write_bundle(prefix, 1, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "README.md"} == before
    with pytest.raises(RuntimeError, match="simulated"):
        deploy.write_bundle(prefix, 1, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unused_params_are_left_out_and_reported(tmp_path):
    prefix = fx.make_checkpoint(tmp_path / "ckpt", "vgg_like", epoch=1)
    sym, args, auxs = mx.model.load_checkpoint(prefix, 1)
    args["old_fc8_weight"] = mx.nd.zeros((2, 2))
    mx.model.save_checkpoint(prefix, 1, sym, args, auxs)
    b, summary = deploy.write_bundle(prefix, 1, tmp_path / "bundle", check=False)
    assert summary["unused_params"] == ["old_fc8_weight"]
    assert "old_fc8_weight" not in mx.model.load_checkpoint(str(b.prefix), 0)[1]


def test_class_names_from_class_map_and_count_mismatch(tmp_path):
    prefix = fx.make_checkpoint(tmp_path / "ckpt", "vgg_like", epoch=1, class_names=False)
    with pytest.raises(deploy.DeployError, match="no class names.*--classes"):
        deploy.write_bundle(prefix, 1, tmp_path / "b1", check=False)
    # A list file finds its class map the way every stage does (lists_train.lst -> lists.classes.json).
    lst = tmp_path / "ckpt" / "lists_train.lst"
    lst.write_text("")
    b, _ = deploy.write_bundle(prefix, 1, tmp_path / "b1", classes=str(lst), check=False)
    assert read_class_map(b.outdir / "model.classes.json") == fx.CLASSES
    bad = tmp_path / "bad.classes.json"
    bad.write_text(json.dumps({"format": "mxtransfer.classmap/1", "classes": ["a", "b"]}))
    with pytest.raises(deploy.DeployError, match="5 outputs but the class map has 2"):
        deploy.write_bundle(prefix, 1, tmp_path / "b2", classes=str(bad), check=False)


def test_classes_never_relabel_a_model_that_has_names(tmp_path):
    """The sidecar's class names are the model's truth (symbols.classes, the rule train.predict follows too):
    --classes may only agree with them, and a disagreeing map is one line naming both files."""
    prefix = fx.make_checkpoint(tmp_path / "ckpt", "vgg_like", epoch=1)  # sidecar names fx.CLASSES
    other = tmp_path / "other.classes.json"
    other.write_text(json.dumps({"format": "mxtransfer.classmap/1", "classes": list(reversed(fx.CLASSES))}))
    with pytest.raises(deploy.DeployError) as err:
        deploy.write_bundle(prefix, 1, tmp_path / "b1", classes=str(other), check=False)
    message = str(err.value)
    assert "\n" not in message and "vgg_like-preprocess.json" in message and "other.classes.json" in message
    assert "label 0: 'class_0' vs 'class_4'" in message and not (tmp_path / "b1").exists()
    same = tmp_path / "ckpt" / "lists_val.lst"  # finds lists.classes.json, which agrees
    same.write_text("")
    b, _ = deploy.write_bundle(prefix, 1, tmp_path / "b2", classes=str(same), check=False)
    assert read_class_map(b.outdir / "model.classes.json") == load_sidecar(b.prefix).class_names == fx.CLASSES
    res = subprocess.run([sys.executable, "-m", "tools.deploy", prefix, "1", str(tmp_path / "b3"), "--no-check",
                          "--classes", str(other)], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "other.classes.json" in res.stderr

def test_bad_shapes_are_named(tmp_path):
    prefix = fx.make_checkpoint(tmp_path / "ckpt", "vgg_like", epoch=1)
    sym, args, auxs = mx.model.load_checkpoint(prefix, 1)
    args["fc8_weight"] = mx.nd.zeros((7, 32))
    mx.model.save_checkpoint(prefix, 1, sym, args, auxs)
    with pytest.raises(deploy.DeployError, match=r"fc8_weight has shape \(7, 32\)"):
        deploy.write_bundle(prefix, 1, tmp_path / "bundle", check=False)


def test_cli_one_line_errors_and_summary(tmp_path):
    prefix = fx.make_checkpoint(tmp_path / "ckpt", "vgg_like", epoch=2)
    run = lambda *a: subprocess.run([sys.executable, "-m", "tools.deploy", *a], capture_output=True, text=True)
    missing = run(prefix, "7", str(tmp_path / "out"))
    assert missing.returncode == 2  # bad input exits 2, as in train.predict
    assert missing.stderr.strip().count("\n") == 0 and "vgg_like-0007.params" in missing.stderr
    assert "epochs beside it: 0002\n" in missing.stderr  # what is there instead (symbols/checkpoint.py's words)
    ok = run(prefix, "2", str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert "C predict API max|diff|" in ok.stdout and "gluon.SymbolBlock" in ok.stdout
    again = run(prefix, "2", str(tmp_path / "out"))
    assert again.returncode == 2 and "--force" in again.stderr
    word = run(prefix, "last", str(tmp_path / "out2"))
    assert word.returncode == 2 and "epoch 'last': expected a number or 'latest'" in word.stderr
    latest = run(prefix, "latest", str(tmp_path / "out3"), "--no-check")  # the highest epoch, as predict takes it
    assert latest.returncode == 0, latest.stderr
    assert json.loads((tmp_path / "out3" / "model-preprocess.json").read_text())["source"]["deployed_from"] == \
        {"prefix": prefix, "epoch": 2}


def test_inference_symbol_rejects_internal_softmax_output():
    x = mx.sym.SoftmaxOutput(mx.sym.var("data"), name="inner")
    y = mx.sym.FullyConnected(x, num_hidden=2, name="fc")
    with pytest.raises(deploy.DeployError, match="inside the graph"):
        deploy.inference_symbol(y)


def test_c_predict_library_does_not_leak_its_image_codecs_into_the_process(tmp_path):
    """libmxnet.so bundles libjpeg; loaded RTLD_GLOBAL it hijacked Pillow's JPEG encoder in the same process."""
    script = (
        "import numpy as np\n"
        "from tools import c_predict\n"
        "c_predict.load_library()\n"
        "from PIL import Image\n"
        f"Image.fromarray(np.zeros((9, 12, 3), np.uint8)).convert('CMYK').save(r'{tmp_path / 'c.jpg'}', quality=95)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "c.jpg").stat().st_size > 0
