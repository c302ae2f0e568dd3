"""Recipes (issue 6): each against an independent path with explicit tolerances.

* feature cache vs full forward passes through train.fit with a frozen backbone (same head within 1e-5);
* fused model vs its two branches run separately through their own checkpoints and sidecars, with OpenCV's
  bilinear resize as the reference for the in-graph resize;
* staged fine-tuning: frozen weights bit-identical to their previous values, the optimizer state type per
  stage, and a run split mid-stage equal to an uninterrupted one;
* ensemble weights depend on the validation split only;
* class-balanced epochs counted back through mx.io.ImageRecordIter;
* pseudo-labelled .rec read back with mx.recordio and compared with train.predict's probabilities.
"""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from symbols.sidecar import load_sidecar, save_sidecar
from tests._recipes_fixtures import small_net_checkpoint
from tests._train_fixtures import tiny_vgg_checkpoint, write_rec
from train.config import TrainConfig
from train.data import DataError
from train.fit import TrainError, fit
from train.recipes import ensemble, features, fusion, pseudo, sampling, stages
from train.recipes.__main__ import main as recipes_main
from recbuild.integrity import verify_rec

CLASSES = ["red", "green", "blue"]


def _cfg(tmp_path, base, name, **kw):
    values = dict(pretrained_model=str(base), data_train=str(tmp_path / "d_train.rec"),
                  data_val=str(tmp_path / "d_val.rec"), batch_size=8, num_epochs=3, lr=0.05,
                  model_prefix=str(tmp_path / name), progress=False, top_k=0)
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture
def data(tmp_path):
    write_rec(tmp_path / "d_train.rec", 3, 8, class_names=CLASSES)
    write_rec(tmp_path / "d_val.rec", 3, 4, seed=1)
    return tmp_path


def _params(prefix, epoch):
    _, args, aux = mx.model.load_checkpoint(str(prefix), epoch)
    return {k: v.asnumpy() for k, v in {**args, **aux}.items()}


# ---- 1. feature cache -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cache_trains_the_same_head_as_full_forward_passes(data):
    tmp = data
    base = small_net_checkpoint(tmp / "base")
    # Three batches per epoch, the last one filled up as ImageRecordIter fills it: the cache follows the record
    # order of full passes, filler included; backbone frozen in fit.
    cfg = _cfg(tmp, base, "full", batch_size=10, num_epochs=4, lr=0.1, lr_mult=["^(?!fc_)=0"])
    fit(cfg)
    res = features.train_from_cache(replace(cfg, model_prefix=str(tmp / "cached")), cache_dir=tmp / "cache")
    full, cached, pre = _params(tmp / "full", 4), _params(tmp / "cached", 4), _params(base, 0)
    assert set(full) == set(cached)
    for name in full:
        np.testing.assert_allclose(cached[name], full[name], rtol=1e-4, atol=1e-5, err_msg=name)
        if not name.startswith("fc_"):
            np.testing.assert_array_equal(cached[name], pre[name], err_msg=f"{name} is backbone: untouched")
    assert np.abs(cached["fc_weight"] - fx_init(tmp, base)).max() > 1e-3  # the head did train
    # The checkpoint is the full model: stock Module on the training symbol predicts val like predict does.
    from train.predict import evaluate, load_model
    m = load_model(str(tmp / "cached"), 4, batch_size=4)
    ev = evaluate(m, tmp / "d_val.rec", top_k=0)
    assert ev["accuracy"] == pytest.approx(res.metrics[-1]["val_accuracy"], abs=1e-9)
    assert ev["log_loss"] == pytest.approx(res.metrics[-1]["val_loss"], rel=1e-4)
    assert load_sidecar(tmp / "cached").class_names == CLASSES


def test_cache_runs_the_dropout_below_the_head_in_the_head_graph(data):
    """VGG's drop6/drop7 sit between fc6 and the head: the cache is cut below drop6 and drop6 -> fc7 -> drop7 run
    (frozen) in the head graph, so training sees dropped activations as full passes do."""
    base = tiny_vgg_checkpoint(data / "vgg")
    features.train_from_cache(_cfg(data, base, "v", num_epochs=2), cache_dir=data / "cache")
    resolved = json.loads((data / "v-config.json").read_text())["resolved"]
    assert resolved["cache_point"] == "relu6_output" and resolved["dropout_in_head"] == ["drop6", "drop7"]
    assert resolved["feature_dim"] == 16  # fc6's width: relu6 is cached, not drop7
    tuned, pre = _params(data / "v", 2), _params(base, 0)
    for name in tuned:
        if not name.startswith("fc_"):
            np.testing.assert_array_equal(tuned[name], pre[name], err_msg=f"{name} is frozen")
    # The layers above the cache drop activations in training mode like the full network, and equal it in
    # inference mode.
    sym, args, aux = mx.model.load_checkpoint(str(base), 0)
    point = features.cache_point(sym, "drop7_output", (3, 16, 16))
    x = mx.nd.array(np.random.RandomState(0).uniform(0, 2, (64, 3, 16, 16)))
    full = mx.mod.Module(sym.get_internals()["drop7_output"], label_names=None)
    full.bind([("data", x.shape)], for_training=True)
    full.set_params(args, aux, allow_extra=True)
    relu6 = mx.mod.Module(sym.get_internals()["relu6_output"], label_names=None)
    relu6.bind([("data", x.shape)], for_training=False)
    relu6.set_params(args, aux, allow_extra=True)
    relu6.forward(mx.io.DataBatch([x]), is_train=False)
    upper = mx.mod.Module(point.upper, label_names=None)
    upper.bind([("data", (64, 16))], for_training=True)
    upper.set_params(args, aux, allow_extra=True)
    outputs = {}
    for name, mod, inp in (("full", full, x), ("upper", upper, relu6.get_outputs()[0])):
        for is_train in (False, True):
            mod.forward(mx.io.DataBatch([inp]), is_train=is_train)
            outputs[name, is_train] = mod.get_outputs()[0].asnumpy()
    np.testing.assert_allclose(outputs["upper", False], outputs["full", False], rtol=1e-5, atol=1e-6)
    active = outputs["full", False] != 0
    for name in ("full", "upper"):  # drop7 zeroes about half of the active units in training mode
        dropped = np.mean(outputs[name, True][active] == 0)
        assert 0.35 < dropped < 0.65, (name, dropped)


def test_cache_refuses_a_dropout_it_cannot_move_above_the_cache(data):
    x = mx.sym.Convolution(mx.sym.var("data"), num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv1")
    x = mx.sym.Activation(x, act_type="relu", name="relu1")
    x = mx.sym.elemwise_add(mx.sym.Dropout(x, p=0.5, name="drop1"), x, name="skip")  # dropout inside a branch
    x = mx.sym.Flatten(mx.sym.Pooling(x, global_pool=True, pool_type="avg", kernel=(1, 1), name="pool"),
                       name="flat")
    sym = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(x, num_hidden=3, name="fc"), name="softmax")
    shapes = dict(zip(sym.list_arguments(), sym.infer_shape(data=(1, 3, 16, 16))[0]))
    args = {n: mx.nd.array(np.random.RandomState(0).normal(0, 0.1, s)) for n, s in shapes.items()
            if n not in ("data", "softmax_label")}
    mx.model.save_checkpoint(str(data / "res"), 0, sym, args, {})
    from symbols.sidecar import Preprocess
    save_sidecar(data / "res", Preprocess(input_shape=(3, 16, 16), channel_order="BGR", mean=[104.0, 117.0, 123.0],
                                          std=None, scale=1 / 64, num_classes=3, classifier="fc",
                                          feature_output="flat_output", output_name="softmax"))
    with pytest.raises(TrainError, match=r"dropout \['drop1'\] below the head: .*not a single chain.*python -m "
                                         r"train"):
        features.train_from_cache(_cfg(data, data / "res", "r"), cache_dir=data / "cache")
    assert not (data / "r-symbol.json").exists()


def test_cache_is_reused_and_keyed_by_rec_and_model(data):
    tmp = data
    base = small_net_checkpoint(tmp / "base")
    files = lambda: sorted(p.name for p in (tmp / "cache").glob("*.npz"))  # noqa: E731
    fs = features.features_only(str(base), 0, [str(tmp / "d_train.rec")], cache_dir=tmp / "cache", mirror=True,
                                progress=False)
    assert not fs[0].from_cache and fs[0].features.shape == (24, 12) and fs[0].mirrored.shape == (24, 12)
    again = features.features_only(str(base), 0, [str(tmp / "d_train.rec")], cache_dir=tmp / "cache", mirror=True,
                                   progress=False)
    assert again[0].from_cache and files() == [fs[0].path.name]
    np.testing.assert_array_equal(again[0].features, fs[0].features)
    # Independent check of the mirrored view: flip the images before the sidecar preprocessing.
    sym, args, aux = mx.model.load_checkpoint(str(base), 0)
    pre = load_sidecar(base)
    rec = mx.recordio.MXIndexedRecordIO(str(tmp / "d_train.idx"), str(tmp / "d_train.rec"), "r")
    imgs = np.stack([mx.recordio.unpack_img(rec.read_idx(i), 1)[1][:, :, ::-1] for i in range(24)])
    mod = mx.mod.Module(sym.get_internals()["relu6_output"], label_names=None)
    mod.bind([("data", (24, 3, 16, 16))], for_training=False)
    mod.set_params(args, aux, allow_extra=True)
    for view, ref in ((imgs, fs[0].features), (imgs[:, :, ::-1], fs[0].mirrored)):
        mod.forward(mx.io.DataBatch([mx.nd.array(pre.apply(view))]), is_train=False)
        np.testing.assert_allclose(ref, mod.get_outputs()[0].asnumpy(), rtol=1e-4, atol=1e-5)
    # A changed model (one weight) or a rewritten .rec gives a new key, never stale features.
    args["fc6_bias"][0] += 1
    mx.model.save_checkpoint(str(tmp / "base2"), 0, sym, args, aux)
    save_sidecar(tmp / "base2", pre)
    features.features_only(str(tmp / "base2"), 0, [str(tmp / "d_train.rec")], cache_dir=tmp / "cache",
                           mirror=True, progress=False)
    assert len(files()) == 2
    st = os.stat(tmp / "d_train.rec")
    os.utime(tmp / "d_train.rec", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = features.features_only(str(base), 0, [str(tmp / "d_train.rec")], cache_dir=tmp / "cache",
                                   mirror=True, progress=False)
    assert not third[0].from_cache and len(files()) == 3


def fx_init(tmp, base):
    """The fresh head both paths start from (seeded head surgery)."""
    from train.fit import prepare_model
    return prepare_model(str(base), 0, 3).arg_params["fc_weight"].asnumpy()


def test_the_feature_bar_has_a_total(data, capsys):
    base = small_net_checkpoint(data / "bar_base")
    features.features_only(str(base), 0, [str(data / "d_train.rec")], cache_dir=data / "bar_cache", progress=True)
    assert "| 0/24 [00:00<?" in capsys.readouterr().err  # tqdm's first frame: a total, the ETA still unknown


def test_cache_run_resumes_exactly(data):
    base = small_net_checkpoint(data / "base")
    cfg = _cfg(data, base, "a", num_epochs=4, random_mirror=True)  # mirror: a per-epoch random view choice
    features.train_from_cache(cfg, cache_dir=data / "cache")
    features.train_from_cache(replace(cfg, model_prefix=str(data / "b"), num_epochs=2), cache_dir=data / "cache")
    assert (data / "b-0002.states").is_file()
    features.train_from_cache(replace(cfg, model_prefix=str(data / "b"), load_epoch=2, pretrained_model=""),
                              cache_dir=data / "cache")  # the run's config names the pretrained model
    a, b = _params(data / "a", 4), _params(data / "b", 4)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert [r["epoch"] for r in json.loads((data / "b-metrics.json").read_text())["epochs"]] == [1, 2, 3, 4]


def test_features_cli_trains_and_refuses_augmentation_it_cannot_hold(data, capsys):
    base = small_net_checkpoint(data / "base")
    common = ["features", "--pretrained-model", str(base), "--data-train", str(data / "d_train.rec"), "--data-val",
              str(data / "d_val.rec"), "--batch-size", "8", "--num-epochs", "2", "--no-progress",
              "--cache-dir", str(data / "cache")]
    assert recipes_main([*common, "--model-prefix", str(data / "ok"), "--mirror"]) == 0
    assert "Head trained from cached features: 3 classes, 2 epochs" in capsys.readouterr().out
    assert json.loads((data / "ok-config.json").read_text())["resolved"]["mirror"] is True
    assert recipes_main([*common, "--model-prefix", str(data / "bad"), "--random-resized-crop", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--random-resized-crop" in err[0] and "--mirror" in err[0]
    assert not (data / "bad-symbol.json").exists()
    # Existing checkpoints are never overwritten silently.
    assert recipes_main([*common, "--model-prefix", str(data / "ok")]) == 2
    assert "--load-epoch 2, or pass --overwrite" in capsys.readouterr().err
    # One writer per prefix, as for python -m train: another process holding the prefix refuses the run in one
    # line naming it, and nothing is written.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from recbuild.publish import writer_lock\n"
         "with writer_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(data / "busy")],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert recipes_main([*common, "--model-prefix", str(data / "busy")]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"pid {holder.pid}:" in err, err
    assert not list(data.glob("busy-*"))


def test_ensemble_and_pseudo_input_errors(data):
    with pytest.raises(ValueError, match="expected PREFIX:EPOCH"):
        ensemble.parse_model("out/model")
    base = small_net_checkpoint(data / "base")
    with pytest.raises(TrainError, match="base-config.json: missing"):
        pseudo.pseudo_label(str(base), 0, data / "d_val.rec", str(data / "pl"))


# ---- 2. fusion ------------------------------------------------------------------------------------------------
def _branch_features(prefix, images_rgb, feature_output="relu6_output"):
    import cv2
    pre = load_sidecar(prefix)
    sym, args, aux = mx.model.load_checkpoint(str(prefix), 0)
    h, w = pre.input_shape[1:]
    if images_rgb.shape[1:3] != (h, w):  # independent reference for the in-graph resize
        images_rgb = np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR) for im in images_rgb])
    x = pre.apply(images_rgb)
    mod = mx.mod.Module(sym.get_internals()[feature_output], label_names=None)
    mod.bind([("data", x.shape)], for_training=False)
    mod.set_params(args, aux, allow_extra=True)
    mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
    return mod.get_outputs()[0].asnumpy()


def test_fused_model_equals_its_branches_run_separately(data):
    tmp = data
    a = small_net_checkpoint(tmp / "a", input_shape=(3, 16, 16), channel_order="BGR", seed=1)
    b = small_net_checkpoint(tmp / "b", input_shape=(3, 12, 12), channel_order="RGB", mean=(120, 110, 100),
                             std=(50, 60, 70), scale=1.0, seed=2, width=7)
    assert recipes_main(["fuse", "--model", str(a), "--model", f"{b}:0", "--out", str(tmp / "fused"),
                         "--num-classes", "4"]) == 0
    pre = load_sidecar(tmp / "fused")
    assert (pre.input_shape, pre.channel_order, pre.mean, pre.std, pre.scale) == ((3, 16, 16), "RGB", None, None, 1.0)
    sym, args, aux = mx.model.load_checkpoint(str(tmp / "fused"), 0)  # stock loader
    assert sym.list_arguments()[0] == "data" and "data2" not in sym.list_arguments()
    images = np.random.RandomState(0).uniform(0, 255, (5, 16, 16, 3)).astype(np.float32)
    mod = mx.mod.Module(sym, label_names=["softmax_label"])
    mod.bind([("data", (5, 3, 16, 16))], for_training=False)
    mod.set_params(args, aux)
    mod.forward(mx.io.DataBatch([mx.nd.array(images.transpose(0, 3, 1, 2))]), is_train=False)
    fused = mod.get_outputs()[0].asnumpy()
    feats = np.concatenate([_branch_features(a, images), _branch_features(b, images)], axis=1)
    logits = feats @ args["fusion_fc_weight"].asnumpy().T + args["fusion_fc_bias"].asnumpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(fused, probs, rtol=1e-4, atol=1e-6)
    # The internal concat output is exactly the two feature vectors side by side.
    inner = mx.mod.Module(sym.get_internals()[fusion.FEATURE_OUTPUT], label_names=None)
    inner.bind([("data", (5, 3, 16, 16))], for_training=False)
    inner.set_params(args, aux, allow_extra=True)
    inner.forward(mx.io.DataBatch([mx.nd.array(images.transpose(0, 3, 1, 2))]), is_train=False)
    np.testing.assert_allclose(inner.get_outputs()[0].asnumpy(), feats, rtol=1e-4, atol=1e-4)
    # Stock consumers of the one-input contract: the C predict API and Gluon's SymbolBlock.
    from tools.c_predict import CPredictor
    with CPredictor.from_files(tmp / "fused-symbol.json", tmp / "fused-0000.params", {"data": (5, 3, 16, 16)}) as cp:
        np.testing.assert_allclose(cp.forward(data=images.transpose(0, 3, 1, 2))[0], fused, rtol=1e-5, atol=1e-6)
    # (A training symbol: Gluon takes its SoftmaxOutput label as a second, unused input; tools.deploy strips it.)
    net = mx.gluon.SymbolBlock.imports(str(tmp / "fused-symbol.json"), ["data", "softmax_label"],
                                       str(tmp / "fused-0000.params"))
    out = net(mx.nd.array(images.transpose(0, 3, 1, 2)), mx.nd.zeros(5)).asnumpy()
    np.testing.assert_allclose(out, fused, rtol=1e-5, atol=1e-6)

    # Works with the feature cache, and the result is a deployable full model that predict loads unchanged.
    res = features.train_from_cache(_cfg(tmp, tmp / "fused", "fused-ft", batch_size=8, num_epochs=3, lr=0.05),
                                    cache_dir=tmp / "cache")
    from train.predict import evaluate, load_model
    ev = evaluate(load_model(str(tmp / "fused-ft"), 3, batch_size=4), tmp / "d_val.rec", top_k=0)
    assert ev["accuracy"] == pytest.approx(res.metrics[-1]["val_accuracy"], abs=1e-9)
    ft = _params(tmp / "fused-ft", 3)
    np.testing.assert_array_equal(ft["b_fc6_weight"], args["b_fc6_weight"].asnumpy())
    assert ft["fc_weight"].shape == (3, 12 + 7)
    from tools.deploy import main as deploy_main  # bundle + Module/Gluon/C-API parity check
    assert deploy_main([str(tmp / "fused-ft"), "3", str(tmp / "bundle")]) == 0


def test_fusion_refuses_a_mean_image(data):
    a = small_net_checkpoint(data / "a")
    b = small_net_checkpoint(data / "b", seed=3)
    pre = load_sidecar(b)
    np.save(data / "b-mean.npy", np.zeros(pre.input_shape, np.float32))
    save_sidecar(b, replace(pre, mean="b-mean.npy"))
    with pytest.raises(fusion.FusionError, match=r"b-preprocess.json: mean image 'b-mean.npy'.*per-channel"):
        fusion.fuse([(str(a), 0), (str(b), 0)], data / "f")
    assert not (data / "f-symbol.json").exists()


# ---- 3. stages ------------------------------------------------------------------------------------------------
SCHEDULE = {"stages": [
    {"name": "head", "epochs": 2, "optimizer": "adam", "lr": 0.01, "lr_mult": ["^(?!fc_)=0"],
     "augment": {"random_mirror": True}},
    {"name": "top", "epochs": 3, "optimizer": "sgd", "lr": 0.01, "mom": 0.9, "lr_mult": ["^conv1_=0"],
     "augment": {}}]}


@pytest.mark.slow
def test_stages_apply_each_stage_lr_mult_and_optimizer_and_resume_mid_stage(data):
    tmp = data
    base = tiny_vgg_checkpoint(tmp / "base")
    (tmp / "s.json").write_text(json.dumps(SCHEDULE))
    common = ["--pretrained-model", str(base), "--data-train", str(tmp / "d_train.rec"), "--data-val",
              str(tmp / "d_val.rec"), "--batch-size", "8", "--no-progress", "--top-k", "0", "--schedule",
              str(tmp / "s.json")]
    assert recipes_main(["stages", *common, "--model-prefix", str(tmp / "s")]) == 0
    p0, p2, p5 = _params(base, 0), _params(tmp / "s", 2), _params(tmp / "s", 5)
    for name in p2:
        if name.startswith("fc_"):
            continue
        np.testing.assert_array_equal(p2[name], p0[name], err_msg=f"stage 1 froze {name}")
        if name.startswith("conv1_"):
            np.testing.assert_array_equal(p5[name], p2[name], err_msg=f"stage 2 froze {name}")
        else:
            assert np.abs(p5[name] - p2[name]).max() > 1e-6, f"stage 2 trains {name}"
    record = json.loads((tmp / "s-stages.json").read_text())
    assert [s["frozen"] for s in record["stages"]] == [
        ["conv1_1_weight", "conv1_1_bias", "conv2_1_weight", "conv2_1_bias", "fc6_weight", "fc6_bias",
         "fc7_weight", "fc7_bias"], ["conv1_1_weight", "conv1_1_bias"]]
    assert [s["augment"]["random_mirror"] for s in record["stages"]] == [True, False]
    # The optimizer state of each stage is its own: Adam (mean, var) pairs, then SGD momentum arrays.
    from symbols.checkpoint import read_optimizer_states
    s2 = read_optimizer_states(tmp / "s-0002.states")
    s5 = read_optimizer_states(tmp / "s-0005.states")
    assert s2 and all(isinstance(v, tuple) and len(v) == 2 for v in s2.values())
    assert s5 and all(isinstance(v, mx.nd.NDArray) for v in s5.values())
    assert len(s5) == 8 and len(s2) == 2  # trainable parameters of each stage (conv2_1, fc6, fc7, fc | fc)
    # Killed in the middle of stage 2 (after epoch 3) and resumed: the same weights as the uninterrupted run.
    assert recipes_main(["stages", *common, "--model-prefix", str(tmp / "r"), "--until-epoch", "3"]) == 0
    assert not (tmp / "r-0004.params").exists()
    assert recipes_main(["stages", *common, "--model-prefix", str(tmp / "r"), "--resume"]) == 0
    r5 = _params(tmp / "r", 5)
    for name in p5:
        np.testing.assert_allclose(r5[name], p5[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Without --resume existing checkpoints are not overwritten.
    assert recipes_main(["stages", *common, "--model-prefix", str(tmp / "r")]) == 2
    # The replaced classifier stays listed across stage boundaries and resumes.
    for run in ("s", "r"):
        assert json.loads((tmp / f"{run}-config.json").read_text())["resolved"]["dropped_pretrained"] == [
            "fc8_bias", "fc8_weight"]


@pytest.mark.parametrize("bad, message", [
    ({"stages": [{"epochs": 1, "momentum": 0.9}]}, r"stage 1: unknown keys \['momentum'\]"),
    ({"stages": [{"epochs": 1}, {"epochs": 2, "warmup_epochs": 1}]}, "stage 2: warmup_epochs is allowed in the first"),
    ({"stages": [{"epochs": 0}]}, "'epochs' must be"),
    ({"stages": [{"epochs": 2, "augment": {"mirror": True}}]}, r"augment keys \['mirror'\] unknown"),
    ({"stages": []}, "at least one stage"),
])
def test_schedule_errors_name_the_stage(tmp_path, bad, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(TrainError, match=message):
        stages.load_schedule(path)


def test_stage_config_offsets_lr_steps_and_replaces_augmentation():
    base = TrainConfig(pretrained_model="m", data_train="t.rec", model_prefix="p", random_mirror=True, brightness=0.3)
    st = stages.parse_schedule({"stages": [{"epochs": 2}, {"epochs": 6, "lr_step_epochs": [2, 4], "lr": 0.001,
                                                           "augment": {"contrast": 0.1}}]})
    cfg = stages.stage_config(base, st[1], 2, 8)
    assert (cfg.num_epochs, cfg.lr_step_epochs, cfg.lr) == (8, "4,6", 0.001)
    assert (cfg.random_mirror, cfg.brightness, cfg.contrast) == (False, 0.0, 0.1)


# ---- 4. ensemble ----------------------------------------------------------------------------------------------
def test_search_weights_prefers_the_informative_model():
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 3, 200)
    good = np.full((200, 3), 0.05)
    good[np.arange(200), labels] = 0.9
    noise = rng.dirichlet(np.ones(3), 200)
    w = ensemble.search_weights([noise, good], labels)
    assert w[1] > 0.95 and w.sum() == pytest.approx(1)
    mixed = 0.5 * good + 0.5 * np.roll(good, 1, axis=1)
    w2 = ensemble.search_weights([good, mixed], labels)
    assert ensemble.log_loss(w2[0] * good + w2[1] * mixed, labels) <= ensemble.log_loss(good, labels) + 1e-12


@pytest.mark.slow
def test_ensemble_weights_come_from_the_validation_split_only(data):
    tmp = data
    write_rec(tmp / "e_val.rec", 3, 12, seed=5)
    write_rec(tmp / "t1.rec", 3, 12, seed=6)
    write_rec(tmp / "t2.rec", 3, 12, seed=7, labels=[float(i % 2) for i in range(36)])
    write_rec(tmp / "v2.rec", 3, 12, seed=8, labels=[0.0] * 36)  # a different validation split
    models = []
    for i, epochs in enumerate((2, 6)):
        base = small_net_checkpoint(tmp / f"base{i}", seed=10 + i)
        features.train_from_cache(_cfg(tmp, base, f"m{i}", num_epochs=epochs, lr=0.1, seed=i),
                                  cache_dir=tmp / "cache")
        models.append((str(tmp / f"m{i}"), epochs))
    r1 = ensemble.run_ensemble(models, tmp / "e_val.rec", tmp / "t1.rec", tmp / "t1.csv", batch_size=8)
    r2 = ensemble.run_ensemble(models, tmp / "e_val.rec", tmp / "t2.rec", tmp / "t2.csv", batch_size=8)
    r3 = ensemble.run_ensemble(models, tmp / "v2.rec", tmp / "t1.rec", None, batch_size=8)
    assert r1["weights"] == r2["weights"]          # other test data: same weights
    assert r1["weights"] != r3["weights"]          # other validation data: other weights
    # Per-model figures agree with train.predict's own evaluation of each checkpoint.
    from train.predict import evaluate, load_model
    for (prefix, epoch), row in zip(models, r1["models"]):
        ev = evaluate(load_model(prefix, epoch, batch_size=8), tmp / "e_val.rec", top_k=0)
        assert row["val_accuracy"] == pytest.approx(ev["accuracy"]) and row["val_log_loss"] == pytest.approx(
            ev["log_loss"], rel=1e-5)
    assert r1["ensemble"]["val_log_loss"] <= min(r["val_log_loss"] for r in r1["models"]) + 1e-9
    rows = (tmp / "t1.csv").read_text().splitlines()
    assert rows[0] == "id," + ",".join(CLASSES) and len(rows) == 37
    mirrored = ensemble.run_ensemble(models, tmp / "e_val.rec", batch_size=8, mirror=True)
    assert mirrored["mirror_tta"] is True and set(mirrored["weights"]) == set(r1["weights"])


# ---- 5. pseudo-labels ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pseudo_labels_add_confident_test_records_and_report_the_change(data):
    tmp = data
    write_rec(tmp / "test.rec", 3, 10, seed=9, labels=[0.0] * 30)  # test labels are unknown: all 0 here
    base = small_net_checkpoint(tmp / "base")
    features.train_from_cache(_cfg(tmp, base, "m", num_epochs=8, lr=0.2), cache_dir=tmp / "cache")
    from train.predict import load_model
    probs = ensemble.predict_rec(load_model(str(tmp / "m"), 8, batch_size=8), tmp / "test.rec").probs
    threshold = float(np.quantile(probs.max(1), 0.4))  # keeps ~60%, whatever the model's confidence
    code = recipes_main(["pseudo", str(tmp / "m"), "8", "--test", str(tmp / "test.rec"), "--threshold",
                         str(threshold), "--out-prefix", str(tmp / "pl"), "--batch-size", "8",
                         "--cache-dir", str(tmp / "cache")])
    assert code == 0
    report = json.loads((tmp / "pl-pseudo.json").read_text())
    kept = np.flatnonzero(probs.max(1) >= threshold)
    assert report["added"] == len(kept) and 0 < len(kept) < 30
    reader = mx.recordio.MXIndexedRecordIO(str(tmp / "pl_train.idx"), str(tmp / "pl_train.rec"), "r")
    train = mx.recordio.MXIndexedRecordIO(str(tmp / "d_train.idx"), str(tmp / "d_train.rec"), "r")
    test = mx.recordio.MXIndexedRecordIO(str(tmp / "test.idx"), str(tmp / "test.rec"), "r")
    assert len(reader.keys) == 24 + len(kept)
    for i in range(24):
        assert reader.read_idx(i) == train.read_idx(i)
    for n, i in enumerate(kept):
        header, image = mx.recordio.unpack(reader.read_idx(24 + n))
        assert header.label == probs[i].argmax()
        assert image == mx.recordio.unpack(test.read_idx(int(i)))[1]
    assert report["val_accuracy_change"] == pytest.approx(report["val_accuracy_after"] - report["val_accuracy_before"])
    assert (tmp / "pl-0008.params").is_file() and load_sidecar(tmp / "pl").class_names == CLASSES


def test_pseudo_rec_keeps_train_records_relabels_kept_test_records_and_passes_verify(tmp_path):
    plain = write_rec(tmp_path / "plain.rec", 3, 4)
    # Keys and ids as im2rec writes a shuffled list: record i carries id = key = ids[i], not i.
    ids = [7, 3, 11, 0, 5, 9, 1, 10, 2, 8, 4, 6]
    train = tmp_path / "a_train.rec"
    reader = mx.recordio.MXIndexedRecordIO(str(plain.with_suffix(".idx")), str(plain), "r")
    writer = mx.recordio.MXIndexedRecordIO(str(train.with_suffix(".idx")), str(train), "w")
    for i, key in enumerate(ids):
        header, image = mx.recordio.unpack(reader.read_idx(i))
        writer.write_idx(key, mx.recordio.pack(header._replace(id=key), image))
    writer.close()
    test = write_rec(tmp_path / "t.rec", 3, 2, seed=5, labels=[0.0] * 6)
    probs = np.full((6, 3), 0.1)
    probs[[1, 4], [2, 1]] = 0.8                                     # test records 1 and 4 are confident
    for stale in ("p_train.pack.json", "p_train.crc32"):          # left by an earlier pack under the same name
        (tmp_path / stale).write_text("{}")
    report = pseudo.write_pseudo_rec(train, test, probs, 0.5, tmp_path / "p_train.rec", class_names=["a", "b", "c"])
    assert not (tmp_path / "p_train.pack.json").exists() and not (tmp_path / "p_train.crc32").exists()
    assert report["added"] == 2 and report["kept_index"] == [1, 4]
    res = verify_rec(tmp_path / "p_train.rec", progress=False)
    assert res.ok and res.records == 14, [p.message for p in res.problems]
    out = mx.recordio.MXIndexedRecordIO(str(tmp_path / "p_train.idx"), str(tmp_path / "p_train.rec"), "r")
    src = mx.recordio.MXIndexedRecordIO(str(plain.with_suffix(".idx")), str(plain), "r")
    tst = mx.recordio.MXIndexedRecordIO(str(test.with_suffix(".idx")), str(test), "r")
    assert list(out.keys) == list(range(14))
    for key in range(14):
        header, image = mx.recordio.unpack(out.read_idx(key))
        assert header.id == key
        if key < 12:
            ref_header, ref_image = mx.recordio.unpack(src.read_idx(key))
            assert (header.label, image) == (ref_header.label, ref_image)
        else:
            i = [1, 4][key - 12]
            assert header.label == probs[i].argmax() and image == mx.recordio.unpack(tst.read_idx(i))[1]


# ---- 6. class-balanced sampling -----------------------------------------------------------------------------------
def _labels_through_image_record_iter(rec):
    it = mx.io.ImageRecordIter(path_imgrec=str(rec), data_shape=(3, 16, 16), batch_size=4, round_batch=False)
    labels = []
    for batch in it:
        labels += batch.label[0].asnumpy()[: 4 - batch.pad].tolist()
    return np.asarray(labels)


def test_class_balanced_epochs_really_balance(tmp_path):
    labels = [0.0] * 48 + [1.0] * 8 + [2.0] * 4
    rec = write_rec(tmp_path / "imb_train.rec", 3, 0, labels=labels)
    provider = sampling.epoch_rec_provider(rec, tmp_path / "model", seed=3)
    totals = np.zeros(3)
    for epoch in range(4):
        path = provider(epoch)
        assert verify_rec(path, progress=False).ok, verify_rec(path, progress=False).problems  # ids = keys
        got = _labels_through_image_record_iter(path)
        assert len(got) == 60  # same epoch size as the plain run
        counts = np.bincount(got.astype(int), minlength=3)
        assert counts.min() >= 10 and counts.max() <= 30, counts  # plain epochs: 48/8/4
        totals += counts
    assert np.abs(totals / totals.sum() - 1 / 3).max() < 0.06, totals
    assert not (tmp_path / "model.balanced" / "epoch-0000.rec").exists()  # only the latest copy is kept
    np.testing.assert_array_equal(provider.indices(2), sampling.BalancedEpochs(rec, tmp_path / "x", 3).indices(2))
    idx = sampling.balanced_indices(np.asarray(labels), seed=0, size=6000)
    np.testing.assert_allclose(np.bincount(np.asarray(labels)[idx].astype(int)) / 6000, [1 / 3] * 3, atol=0.03)


def test_fit_with_class_balance_reads_the_resampled_epochs(tmp_path):
    labels = [0.0] * 20 + [1.0] * 4
    write_rec(tmp_path / "d_train.rec", 2, 0, labels=labels, class_names=["a", "b"])
    write_rec(tmp_path / "d_val.rec", 2, 4, seed=1)
    base = small_net_checkpoint(tmp_path / "base")
    code = recipes_main(["fit", "--pretrained-model", str(base), "--data-train", str(tmp_path / "d_train.rec"),
                         "--model-prefix", str(tmp_path / "b"), "--num-epochs", "2", "--batch-size", "8",
                         "--lr", "0.01", "--class-balance", "--no-progress"])
    assert code == 0
    last = tmp_path / "b.balanced" / "epoch-0001.rec"
    counts = np.bincount(_labels_through_image_record_iter(last).astype(int), minlength=2)
    assert counts.sum() == 24 and counts[1] >= 6  # the plain set has 4 of class 1
    # The cache path balances by index draws, the same sampler.
    res = features.train_from_cache(_cfg(tmp_path, base, "c", num_epochs=2), cache_dir=tmp_path / "cache",
                                    class_balance=True)
    assert json.loads((tmp_path / "c-config.json").read_text())["resolved"]["class_balance"] is True
    assert res.last_epoch == 2


@pytest.mark.slow
def test_pseudo_labels_retrain_a_staged_model_with_its_schedule(data):
    tmp = data
    write_rec(tmp / "test.rec", 3, 4, seed=9)
    base = small_net_checkpoint(tmp / "base")
    schedule = stages.parse_schedule({"stages": [
        {"epochs": 1, "optimizer": "adam", "lr": 0.01, "lr_mult": ["^(?!fc_)=0"]},
        {"epochs": 1, "optimizer": "sgd", "lr": 0.01, "lr_mult": ["^conv1_=0"]}]})
    stages.run_stages(_cfg(tmp, base, "st"), schedule)
    report = pseudo.pseudo_label(str(tmp / "st"), 2, tmp / "test.rec", str(tmp / "pl"), threshold=1e-6)
    # (default batch 32 > the 12 test records: lowered to fit, not refused)
    assert report["added"] == 12 and report["retrained"].endswith("pl:2")
    record = json.loads((tmp / "pl-stages.json").read_text())
    assert [s["frozen"][:1] for s in record["stages"]] == [["conv1_weight"], ["conv1_weight"]]
    assert [s["optimizer"] for s in record["stages"]] == ["adam", "sgd"]


def test_record_offsets_match_the_index_mx_recordio_wrote(tmp_path):
    rec = write_rec(tmp_path / "o_train.rec", 3, 5)
    # A payload containing the RecordIO magic makes the writer split that record in parts (cflag 1..3).
    writer = mx.recordio.MXIndexedRecordIO(str(tmp_path / "m.idx"), str(tmp_path / "m.rec"), "w")
    magic = (0xCED7230A).to_bytes(4, "little")
    payloads = [b"abc", b"x" * 7 + magic + b"yy" + magic + b"z", b"", b"tail" * 3]
    for i, p in enumerate(payloads):
        writer.write_idx(i, p)
    writer.close()
    for path, idx in ((rec, rec.with_suffix(".idx")), (tmp_path / "m.rec", tmp_path / "m.idx")):
        expected = [int(line.split("\t")[1]) for line in idx.read_text().splitlines()]
        assert sampling.record_offsets(path) == expected
    reader = sampling.RecordReader(tmp_path / "m.rec")
    assert [reader.read(i) for i in (3, 1, 0)] == [payloads[3], payloads[1], payloads[0]]
    (tmp_path / "cut.rec").write_bytes(rec.read_bytes()[:-30])
    with pytest.raises(DataError, match="cut.rec: truncated record at byte"):
        sampling.record_offsets(tmp_path / "cut.rec")


def test_ensemble_refuses_models_with_other_class_names(data):
    a = small_net_checkpoint(data / "ca", num_classes=3)
    b = small_net_checkpoint(data / "cb", num_classes=3, seed=4)
    for prefix, names in ((a, CLASSES), (b, ["red", "blue", "green"])):
        save_sidecar(prefix, replace(load_sidecar(prefix), class_names=names))
    with pytest.raises(DataError) as err:
        ensemble.run_ensemble([(str(a), 0), (str(b), 0)], data / "d_val.rec", batch_size=4)
    message = str(err.value)
    assert "ca-preprocess.json" in message and "cb-preprocess.json" in message
    assert "label 1: 'green' vs 'blue'" in message
