"""fine-tune.py's starting points: `--pretrained-model P --load-epoch N`, plain MXNet checkpoints (no sidecar) in
training and prediction, `--from-scratch`, the start-up warnings, and the checkpoint writer's memory-lean pieces
(checked against Module's own)."""
from __future__ import annotations

import csv
import json
import logging
import pickle
from pathlib import Path

import cv2
import mxnet as mx
import numpy as np
import pytest

from symbols.sidecar import FINE_TUNE_PY_RGB_MEAN, load_sidecar, plain_checkpoint_sidecar
from tests._train_fixtures import class_image, tiny_vgg_checkpoint, write_rec
from train.__main__ import main
from train.config import TrainConfig
from train.fit import TrainError, prepare_model, resolve_load_epoch

CLASSES = ["red", "green", "blue", "grey"]
SHAPE = (3, 16, 16)


def plain_net(prefix: Path, epoch: int = 0, seed: int = 0) -> Path:
    """A model-zoo-style checkpoint written by stock save_checkpoint, no sidecar: conv -> flatten0 -> fc1 ->
    softmax, fine-tune.py's layer names."""
    x = mx.sym.Convolution(mx.sym.var("data"), num_filter=8, kernel=(3, 3), pad=(1, 1), name="conv0")
    x = mx.sym.Pooling(mx.sym.Activation(x, act_type="relu", name="relu0"), kernel=(2, 2), stride=(2, 2),
                       pool_type="max", name="pool0")
    x = mx.sym.FullyConnected(mx.sym.Flatten(x, name="flatten0"), num_hidden=5, name="fc1")
    sym = mx.sym.SoftmaxOutput(x, name="softmax")
    shapes, _, _ = sym.infer_shape(data=(1,) + SHAPE)
    rng = np.random.RandomState(seed)
    args = {n: mx.nd.array(rng.normal(0, 0.05, s)) for n, s in zip(sym.list_arguments(), shapes)
            if n not in ("data", "softmax_label")}
    mx.model.save_checkpoint(str(prefix), epoch, sym, args, {})
    return prefix


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    tiny_vgg_checkpoint(d / "pre", num_classes=7)
    # A second epoch of the same net with other weights: --load-epoch 2 must start from these.
    tiny_vgg_checkpoint(d / "other", num_classes=7, seed=5)
    (d / "pre-0002.params").write_bytes((d / "other-0000.params").read_bytes())
    plain_net(d / "zoo")
    write_rec(d / "s_train.rec", 4, 20, class_names=CLASSES)
    write_rec(d / "s_val.rec", 4, 5, seed=1)
    return d


def argv(data: Path, prefix: Path, *extra: str) -> list:
    return ["--data-train", str(data / "s_train.rec"), "--model-prefix", str(prefix), "--num-epochs", "2",
            "--batch-size", "16", "--lr", "0.05", "--no-progress", *extra]


def saved(path) -> dict:
    return {k.split(":", 1)[1]: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


# ---- --load-epoch --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch", [0, 2])
def test_pretrained_model_with_load_epoch_starts_from_that_epoch(data, tmp_path, epoch):
    """fine-tune.py's `--pretrained-model P --load-epoch N` loads P-NNNN.params: with the backbone frozen, the
    trained checkpoint's conv weights are exactly P-NNNN's (and not the other epoch's)."""
    out = tmp_path / "ft"
    assert main(argv(data, out, "--pretrained-model", str(data / "pre"), "--load-epoch", str(epoch),
                     "--lr-mult", "^conv=0")) == 0
    start = saved(data / f"pre-{epoch:04d}.params")
    other = saved(data / f"pre-{2 - epoch:04d}.params")
    trained = saved(out.with_name("ft-0002.params"))
    for name in ("conv1_1_weight", "conv2_1_bias"):
        np.testing.assert_array_equal(trained[name], start[name])
        assert not np.array_equal(trained[name], other[name])
    recorded = json.loads(Path(f"{out}-config.json").read_text())
    assert (recorded["pretrained_epoch"], recorded["load_epoch"]) == (epoch, None)


def test_load_epoch_rule_refuses_the_ambiguous_cases(data, tmp_path):
    base = TrainConfig(pretrained_model=str(data / "pre"), data_train="x.rec", model_prefix=str(tmp_path / "m"),
                       load_epoch=1)
    # Resume (no --pretrained-model) and fine-tune.py's start are each unambiguous.
    assert resolve_load_epoch(TrainConfig(data_train="x.rec", model_prefix="m", load_epoch=1)).load_epoch == 1
    assert (resolve_load_epoch(base).pretrained_epoch, resolve_load_epoch(base).load_epoch) == (1, None)
    with pytest.raises(TrainError, match="--pretrained-model and --model-prefix are both .*drop --pretrained-model"):
        resolve_load_epoch(TrainConfig(pretrained_model=str(tmp_path / "m"), data_train="x.rec",
                                       model_prefix=str(tmp_path / "m"), load_epoch=1))
    with pytest.raises(TrainError, match="--load-epoch 1 and --pretrained-epoch 3 name two epochs"):
        resolve_load_epoch(TrainConfig(**{**base.to_dict(), "pretrained_epoch": 3}))
    (tmp_path / "m-0001.params").write_bytes(b"")  # this run's own epoch 1: the old resume line
    with pytest.raises(TrainError, match="this run's .*m-0001.params exists: to resume it, drop --pretrained-model"):
        resolve_load_epoch(base)
    assert resolve_load_epoch(TrainConfig(**{**base.to_dict(), "overwrite": True})).pretrained_epoch == 1


def test_the_cli_refuses_in_one_line(data, tmp_path, capsys):
    out = tmp_path / "same"
    assert main(argv(data, out, "--pretrained-model", str(out), "--load-epoch", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --pretrained-model and --model-prefix are both") and "\n" not in err


# ---- plain MXNet checkpoints ----------------------------------------------------------------------------------
def test_plain_checkpoint_sidecar_states_fine_tune_pys_assumptions(data):
    pre = plain_checkpoint_sidecar(mx.sym.load(str(data / "zoo-symbol.json")).tojson(), prefix="zoo")
    assert (pre.channel_order, pre.mean, pre.std, pre.input_shape) == ("RGB", list(FINE_TUNE_PY_RGB_MEAN),
                                                                      [1.0] * 3, (3, 224, 224))
    assert (pre.classifier, pre.feature_output, pre.output_name, pre.num_classes) == ("fc1", "flatten0_output",
                                                                                      "softmax", 5)
    assert "fine-tune.py's assumptions: RGB, --rgb-mean 123.68,116.779,103.939, --rgb-std 1,1,1" in \
        pre.source["assumed"]
    # No flatten0 (a converted VGG saved without its sidecar): the classifier's own input.
    vgg = plain_checkpoint_sidecar(mx.sym.load(str(data / "pre-symbol.json")).tojson(), (3, 16, 16), (1, 2, 3))
    assert (vgg.classifier, vgg.feature_output, vgg.output_name, vgg.mean) == ("fc8", "drop7_output", "prob",
                                                                               [1.0, 2.0, 3.0])


def test_plain_checkpoint_trains_writes_our_sidecar_and_loads_stock(data, tmp_path, caplog):
    out = tmp_path / "ft"
    with caplog.at_level(logging.INFO):
        assert main(argv(data, out, "--pretrained-model", str(data / "zoo"), "--load-epoch", "0",
                         "--image-shape", "3,16,16")) == 0
    assumed = [r.message for r in caplog.records if "plain MXNet checkpoint" in r.message]
    assert len(assumed) == 1 and "new head after flatten0 (replacing fc1)" in assumed[0]
    pre = load_sidecar(out)
    assert (pre.channel_order, pre.mean, pre.num_classes, pre.class_names) == ("RGB", list(FINE_TUNE_PY_RGB_MEAN),
                                                                             4, CLASSES)
    sym, args, aux = mx.model.load_checkpoint(str(out), 2)
    module = mx.mod.Module(sym, context=mx.cpu())  # default label name: softmax_label
    module.bind([("data", (2,) + SHAPE)], for_training=False)
    module.set_params(args, aux)
    module.forward(mx.io.DataBatch([mx.nd.zeros((2,) + SHAPE)]), is_train=False)
    assert module.get_outputs()[0].shape == (2, 4)


def test_predict_reads_a_plain_checkpoint_as_fine_tune_py_fed_it(data, tmp_path):
    """A fine-tune.py output (no sidecar) predicts like stock Module fed (RGB - data.py's mean) / std."""
    from train.predict.cli import main as predict_main
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.RandomState(3)
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), class_image(i, 4, 16, rng))
    out = tmp_path / "p.csv"
    assert predict_main([str(data / "zoo"), "0", str(images), "--out", str(out), "--image-shape", "3,16,16"]) == 0
    rows = {r["id"]: [float(v) for k, v in r.items() if k != "id"] for r in csv.DictReader(open(out))}
    sym, args, aux = mx.model.load_checkpoint(str(data / "zoo"), 0)
    module = mx.mod.Module(sym, context=mx.cpu())
    module.bind([("data", (3,) + SHAPE)], for_training=False)
    module.set_params(args, aux)
    rgb = np.stack([cv2.imread(str(images / f"{i}.png"))[:, :, ::-1] for i in range(3)]).astype(np.float32)
    x = (rgb - np.array(FINE_TUNE_PY_RGB_MEAN, np.float32)).transpose(0, 3, 1, 2)
    module.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
    expected = module.get_outputs()[0].asnumpy()
    for i in range(3):
        np.testing.assert_allclose(rows[str(i)], expected[i], atol=1e-5)


def test_predict_refuses_plain_flags_for_a_model_with_a_sidecar(data, tmp_path, capsys):
    from train.predict.cli import main as predict_main
    rc = predict_main([str(data / "pre"), "0", str(data / "s_val.rec"), "--out", str(tmp_path / "p.csv"),
                       "--rgb-mean", "1,2,3"])
    assert rc != 0 and "--rgb-mean: " in capsys.readouterr().err


# ---- --from-scratch ----------------------------------------------------------------------------------------------
def test_from_scratch_changes_every_layer_trains_and_loads_stock(data, tmp_path):
    pretrained = saved(data / "pre-0000.params")
    fresh = prepare_model(str(data / "pre"), 0, 4, from_scratch=True, seed=1)
    kept = prepare_model(str(data / "pre"), 0, 4, seed=1)
    compared = [n for n in fresh.arg_params if n not in fresh.new_params]
    assert len(compared) == len(fresh.arg_params) - 2  # every layer but the new classifier, fresh anyway
    for name in compared:
        assert not np.allclose(fresh.arg_params[name].asnumpy(), pretrained[name]), name
    assert set(fresh.arg_params) == set(kept.arg_params)  # the same architecture
    out = tmp_path / "sc"
    assert main(argv(data, out, "--pretrained-model", str(data / "pre"), "--from-scratch",
                     "--data-val", str(data / "s_val.rec"))) == 0
    rows = json.loads(Path(f"{out}-metrics.json").read_text())["epochs"]
    assert len(rows) == 2 and all(np.isfinite(r["train_loss"]) for r in rows)
    sym, args, aux = mx.model.load_checkpoint(str(out), 2)
    module = mx.mod.Module(sym, label_names=[f"{load_sidecar(out).output_name}_label"], context=mx.cpu())
    module.bind([("data", (2,) + SHAPE)], for_training=False)
    module.set_params(args, aux)
    assert load_sidecar(out).source["from_scratch"] is True


def test_scratch_network_learns_batchnorm_and_initialises_as_fit_py(tmp_path):
    from symbols.head import HeadError, scratch_network
    from tests import _deploy_fixtures as fx
    prefix = Path(fx.make_checkpoint(tmp_path / "ckpt", "resnet_like", epoch=0))
    src_sym, src_args, src_aux = mx.model.load_checkpoint(str(prefix), 0)
    sym, args, aux = scratch_network(src_sym, src_args, src_aux, seed=0)
    assert sym.list_arguments() == src_sym.list_arguments() and set(aux) == set(src_aux)
    bns = [n for n in json.loads(sym.tojson())["nodes"] if n["op"] == "BatchNorm"]
    assert bns and all(n["attrs"]["use_global_stats"] == "False" and n["attrs"]["momentum"] == "0.9" for n in bns)
    for name, value in args.items():
        v = value.asnumpy()
        if name.endswith("_weight"):
            fan_in = int(np.prod(v.shape[1:]))
            assert abs(v.std() - np.sqrt(2 / fan_in)) < 0.5 * np.sqrt(2 / fan_in)  # He, fit.py's default
        elif name.endswith(("_bias", "_beta")):
            assert not v.any()
        else:
            assert (v == 1).all()
    assert all((v.asnumpy() == (1 if k.endswith("var") else 0)).all() for k, v in aux.items())
    args["temperature"] = mx.nd.ones((1, 1))
    with pytest.raises(HeadError, match="parameter temperature"):
        scratch_network(src_sym, args, src_aux)


# ---- the checkpoint writer's memory-lean pieces, against MXNet's own -------------------------------------------
def test_checkpoint_pieces_equal_modules_own(tmp_path):
    """The weights read in place equal Module.get_params; the optimizer state written straight from the CPU
    arrays (no copy) equals what Module's own pickle holds; the device-side finite check."""
    from symbols.checkpoint import read_optimizer_states, save_optimizer_states
    from train.fit import all_finite, current_params
    sym = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=3, name="fc"), name="softmax")
    module = mx.mod.Module(sym, context=mx.cpu())
    module.bind([("data", (4, 5))], [("softmax_label", (4,))])
    module.init_params()
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.1, "momentum": 0.9})
    module.forward_backward(mx.io.DataBatch([mx.nd.ones((4, 5))], [mx.nd.array([0, 1, 2, 0])]))
    module.update()
    module.save_optimizer_states(str(tmp_path / "stock.states"))
    save_optimizer_states(module, tmp_path / "ours.states")
    stock, ours = pickle.loads((tmp_path / "stock.states").read_bytes()), read_optimizer_states(tmp_path / "ours.states")
    assert set(stock) == set(ours)
    for k in stock:
        np.testing.assert_array_equal(stock[k].asnumpy(), ours[k].asnumpy())
    args, aux = current_params(module)
    ref_args, _ = module.get_params()
    assert set(args) == set(ref_args) and all(np.array_equal(args[n].asnumpy(), ref_args[n].asnumpy()) for n in args)
    big = mx.nd.ones((3 * (1 << 22) + 5,))
    assert all_finite(big)
    for bad in (np.nan, np.inf, -np.inf):
        big[3 * (1 << 22) + 4] = bad
        assert not all_finite(big)
        big[3 * (1 << 22) + 4] = 1
    assert all_finite(mx.nd.array([3e38, -3e38]))  # large but finite


# ---- warnings for silent preprocessing mistakes (issue 22) --------------------------------------------------
def test_rgb_overrides_are_logged_and_a_reversed_mean_warned(data, caplog):
    from train.fit import check_preprocessing
    pre = load_sidecar(data / "pre")  # BGR, mean 104,117,123 in B,G,R: 123,117,104 as R,G,B
    cfg = TrainConfig(pretrained_model=str(data / "pre"), data_train="x.rec", model_prefix="m")
    cases = [({"rgb_mean": (104.0, 117.0, 123.0)}, logging.WARNING, "in reverse (B,G,R) order"),
             ({"rgb_mean": (120.0, 110.0, 100.0)}, logging.INFO, "--rgb-mean 120,110,100 (R,G,B) replaces"),
             ({"rgb_std": (58.0, 57.0, 57.0)}, logging.INFO, "--rgb-std 58,57,57 (R,G,B) replaces"),
             ({"rgb_mean": (123.0, 117.0, 104.0)}, None, None)]  # the sidecar's own, in R,G,B: silent
    for change, level, text in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="train.fit"):
            check_preprocessing(pre, TrainConfig(**{**cfg.to_dict(), **change}))
        lines = [(r.levelno, r.message) for r in caplog.records]
        if level is None:
            assert lines == []
        else:
            assert len(lines) == 1 and lines[0][0] == level and text in lines[0][1], lines


def test_image_shape_other_than_a_fixed_models_size_is_warned(data, caplog):
    from dataclasses import replace
    from train.fit import check_preprocessing
    pre = replace(load_sidecar(data / "pre"), source={"parent": {"input_sizes": {"fixed": True,
                                                                                 "declared": [16, 16]}}})
    cfg = TrainConfig(pretrained_model="p", data_train="x.rec", model_prefix="m", image_shape=(3, 24, 24))
    with caplog.at_level(logging.INFO, logger="train.fit"):
        check_preprocessing(pre, cfg)
        check_preprocessing(pre, TrainConfig(**{**cfg.to_dict(), "image_shape": (3, 16, 16)}))
    assert [r.message for r in caplog.records if r.levelno == logging.WARNING] == [
        "--image-shape 3,24,24: p takes only 16x16 (its sidecar's source.input_sizes: fixed); at 24x24 its layers "
        "see another scale than they were trained at and the new head is sized for it; pack at 16 and drop "
        "--image-shape unless this is meant"]


def test_records_far_below_the_input_are_warned_from_their_headers(tmp_path):
    from train.data import Augment, describe_input
    augment = Augment.from_config(TrainConfig(pretrained_model="p", data_train="x.rec", model_prefix="m"))
    small, close = write_rec(tmp_path / "s8.rec", 2, 4, size=8), write_rec(tmp_path / "s12.rec", 2, 4, size=12)
    warned = [m for level, m in describe_input(small, None, (3, 16, 16), -1, augment) if level == logging.WARNING]
    assert len(warned) == 1 and "short edge of 8-8 px, more than 1.5x below the 16x16 input" in warned[0]
    assert not [m for level, m in describe_input(close, None, (3, 16, 16), -1, augment)
                if level == logging.WARNING]
