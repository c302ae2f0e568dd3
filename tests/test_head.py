"""Head surgery (symbols/head.py), VGG's declared head (symbols/vgg.py) and lr_mult rules."""
from __future__ import annotations

import json

import mxnet as mx
import numpy as np
import pytest

from symbols import vgg
from symbols.head import (HeadError, find_head, frozen, parse_lr_mult, replace_head, resolve_lr_mults,
                          to_float16)
from symbols.vgg import HeadSpec

SHAPE = (3, 16, 16)


def tiny_vgg(num_classes=10, seed=0):
    sym = vgg.vgg(num_classes, ((4, 1), (8, 1)), fc_width=16)
    shapes = dict(zip(sym.list_arguments(), sym.infer_shape(data=(1,) + SHAPE)[0]))
    rng = np.random.RandomState(seed)
    args = {n: mx.nd.array(rng.normal(0, 0.1, s)) for n, s in shapes.items() if n not in ("data", "prob_label")}
    return sym, args


def resnet_like():
    """Not VGG-shaped: conv -> BatchNorm -> global pool -> fc 'classifier', like a converted ResNet."""
    x = mx.sym.Convolution(mx.sym.var("data"), num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv1")
    x = mx.sym.BatchNorm(x, name="bn1", use_global_stats=True)
    x = mx.sym.Activation(x, act_type="relu", name="relu1")
    x = mx.sym.Pooling(x, global_pool=True, pool_type="avg", kernel=(1, 1), name="pool5")
    x = mx.sym.Flatten(x, name="flatten")
    x = mx.sym.FullyConnected(x, num_hidden=2, name="fc_nsfw")
    sym = mx.sym.SoftmaxOutput(x, name="prob")
    arg_shapes, _, aux_shapes = sym.infer_shape(data=(1,) + SHAPE)
    rng = np.random.RandomState(1)
    args = {n: mx.nd.array(rng.normal(0, 0.1, s)) for n, s in zip(sym.list_arguments(), arg_shapes)
            if n not in ("data", "prob_label")}
    aux = {n: mx.nd.array(rng.uniform(0.5, 1.5, s)) for n, s in zip(sym.list_auxiliary_states(), aux_shapes)}
    return sym, args, aux


def test_vgg16_spec_matches_caffe_names_and_sizes():
    sym = vgg.vgg(1000)
    args = sym.list_arguments()
    assert [a for a in args if a.endswith("_weight")][:3] == ["conv1_1_weight", "conv1_2_weight", "conv2_1_weight"]
    assert sum(a.endswith("_weight") for a in args) == 16  # VGG16: 13 conv + 3 fc
    shapes = dict(zip(args, sym.infer_shape(data=(1, 3, 224, 224))[0]))
    assert shapes["fc6_weight"] == (4096, 25088) and shapes["fc8_weight"] == (1000, 4096)
    assert vgg.matches(sym) and not vgg.matches(resnet_like()[0])


def test_vgg_head_keeps_every_other_weight_exactly():
    sym, args = tiny_vgg(10)
    spec = find_head(sym)
    assert spec == vgg.HEAD == HeadSpec("fc8", "drop7_output", "prob")
    head = replace_head(sym, args, {}, SHAPE, 3, spec, seed=5)
    assert head.new_params == ["fc8_weight", "fc8_bias"]
    assert head.dropped == ["fc8_bias", "fc8_weight"]  # the replaced 1000-class fc8 is listed, not hidden
    assert head.arg_params["fc8_weight"].shape == (3, 16)
    for name in args:
        if not name.startswith("fc8"):
            assert head.arg_params[name] is args[name], name  # same arrays: fc6/fc7 kept, unlike fine-tune.py
    assert np.all(head.arg_params["fc8_bias"].asnumpy() == 0)
    w = head.arg_params["fc8_weight"].asnumpy()
    assert 0 < np.abs(w).max() <= np.sqrt(6 / (16 + 3)) + 1e-6  # Xavier-uniform bound
    again = replace_head(sym, args, {}, SHAPE, 3, spec, seed=5).arg_params["fc8_weight"].asnumpy()
    np.testing.assert_array_equal(w, again)  # seeded
    outputs = head.symbol.infer_shape(data=(2,) + SHAPE)[1]
    assert outputs == [(2, 3)] and head.symbol.list_outputs() == ["prob_output"]
    assert head.label_name == "prob_label"


def test_sidecar_head_for_non_vgg_net_keeps_batchnorm_state():
    sym, args, aux = resnet_like()
    with pytest.raises(HeadError, match=r"not VGG-shaped.*FullyConnected layers: \['fc_nsfw'\]"):
        find_head(sym)
    spec = find_head(sym, sidecar_classifier="fc_nsfw", sidecar_output_name="prob")
    assert spec == HeadSpec("fc_nsfw", "flatten_output", "prob")  # feature output found from the graph
    head = replace_head(sym, args, aux, SHAPE, 5, spec, hidden=8, hidden_dropout=0.3)
    assert head.new_params == ["fc_nsfw_hidden_weight", "fc_nsfw_hidden_bias", "fc_nsfw_weight", "fc_nsfw_bias"]
    assert head.aux_params["bn1_moving_var"] is aux["bn1_moving_var"]
    nodes = {n["name"]: n for n in json.loads(head.symbol.tojson())["nodes"]}
    assert nodes["fc_nsfw_hidden_drop"]["attrs"]["p"] == "0.3"
    assert head.symbol.infer_shape(data=(1,) + SHAPE)[1] == [(1, 5)]


def test_layer_before_fullc_overrides_and_fine_tune_default_fails_clearly():
    sym, args = tiny_vgg()
    spec = find_head(sym, layer_before_fullc="drop6")  # cut below fc7: the new classifier takes fc7's name
    assert spec.feature_output == "drop6_output" and spec.classifier == "fc7"
    head = replace_head(sym, args, {}, SHAPE, 4, spec)
    assert "fc8_weight" not in head.symbol.list_arguments() and head.new_params == ["fc7_weight", "fc7_bias"]
    assert head.dropped == ["fc7_bias", "fc7_weight", "fc8_bias", "fc8_weight"]  # replaced fc7 + cut-off fc8
    assert find_head(sym, layer_before_fullc="relu6_output").classifier == "fc"  # no FC consumed it
    with pytest.raises(HeadError, match=r"--layer-before-fullc flatten0: no such layer .*'drop7', 'fc8', 'prob'"):
        find_head(sym, layer_before_fullc="flatten0")


@pytest.mark.parametrize("damage,match", [
    (lambda a: a.pop("fc7_weight"), r"fc7_weight missing"),
    (lambda a: a.__setitem__("conv2_1_weight", mx.nd.zeros((8, 3, 3, 3))),
     r"conv2_1_weight has shape \(8, 3, 3, 3\), the network needs \(8, 4, 3, 3\)"),
])
def test_missing_or_misshapen_pretrained_weight_fails(damage, match):
    sym, args = tiny_vgg()
    damage(args)
    with pytest.raises(HeadError, match=match):
        replace_head(sym, args, {}, SHAPE, 3, vgg.HEAD)


def test_missing_batchnorm_state_and_bad_class_count_fail():
    sym, args, aux = resnet_like()
    spec = find_head(sym, sidecar_classifier="fc_nsfw")
    with pytest.raises(HeadError, match=r"bn1_moving_mean \(auxiliary state\) missing"):
        replace_head(sym, args, {k: v for k, v in aux.items() if k != "bn1_moving_mean"}, SHAPE, 3, spec)
    with pytest.raises(HeadError, match="at least 2"):
        replace_head(sym, args, aux, SHAPE, 1, spec)
    with pytest.raises(HeadError, match="'nope_output' is not in the network"):
        replace_head(sym, args, aux, SHAPE, 3, HeadSpec("fc_nsfw", "nope_output", "prob"))


def test_float16_head_casts_input_and_logits():
    sym, args = tiny_vgg()
    head = replace_head(sym, args, {}, SHAPE, 3, vgg.HEAD, dtype="float16")
    plain = replace_head(sym, args, {}, SHAPE, 3, vgg.HEAD)
    assert head.symbol.list_arguments() == plain.symbol.list_arguments()  # float32 checkpoints load into it
    assert to_float16(plain.symbol, vgg.HEAD).tojson() == head.symbol.tojson()
    arg_types, out_types, _ = head.symbol.infer_type(data=np.float32)
    types = dict(zip(head.symbol.list_arguments(), arg_types))
    assert types["conv1_1_weight"] == np.float16 and types["fc8_weight"] == np.float16
    assert out_types == [np.float32]  # softmax and its gradient in float32
    with pytest.raises(HeadError, match="dtype 'int8' is not supported"):
        replace_head(sym, args, {}, SHAPE, 3, vgg.HEAD, dtype="int8")


def test_lr_mult_rules():
    names = ["conv1_1_weight", "conv1_1_bias", "conv5_3_weight", "fc6_weight", "fc8_weight", "fc8_bias"]
    rules = [parse_lr_mult(r"^conv=0"), parse_lr_mult(r"^conv5=0.5"), parse_lr_mult("fc8=10")]
    mults = resolve_lr_mults(names, rules)
    assert mults == {"conv1_1_weight": 0, "conv1_1_bias": 0, "conv5_3_weight": 0.5, "fc6_weight": 1.0,
                     "fc8_weight": 10, "fc8_bias": 10}
    assert frozen(mults) == ["conv1_1_weight", "conv1_1_bias"]
    assert parse_lr_mult("a=b=2").pattern == "a=b"  # split at the last '='
    for bad, match in [("conv1", "expected 'REGEX=MULT'"), ("conv=x", "is not a number"),
                       ("conv=-1", ">= 0"), ("conv[=0", "bad regular expression")]:
        with pytest.raises(ValueError, match=match):
            parse_lr_mult(bad)
    with pytest.raises(ValueError, match="matches no parameter"):
        resolve_lr_mults(names, [parse_lr_mult("^res=0")])


@pytest.mark.parametrize("contexts,on_kv", [(1, "1"), (2, "1"), (2, "0")])
def test_lr_mult_reaches_module_optimizer_on_every_layout(monkeypatch, contexts, on_kv):
    """The trap: an optimizer object gets no symbol lr_mult attributes and needs the index layout Module will
    pick; the optimizer Module creates by name reads them from the training symbol on every layout."""
    from train.config import TrainConfig
    from train.fit import init_optimizer
    from symbols.head import with_lr_mults
    monkeypatch.setenv("MXNET_UPDATE_ON_KVSTORE", on_kv)
    x = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=4, name="conv1")
    sym = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(x, num_hidden=3, name="fc8"), name="prob")
    mults = {"conv1_weight": 0.5, "fc8_weight": 10.0}
    mod = mx.mod.Module(with_lr_mults(sym, mults), label_names=["prob_label"],
                        context=[mx.cpu(i) for i in range(contexts)])
    mod.bind([("data", (4, 5))], [("prob_label", (4,))])
    mod.init_params()
    init_optimizer(mod, "local", TrainConfig(lr=0.1, mom=0.0, wd=0.01), None, 0)
    opt = mod._optimizer
    assert mod._update_on_kvstore == (contexts > 1 and on_kv == "1")
    names = sym.list_arguments()[1:-1]
    per_param = 1 if mod._update_on_kvstore else contexts
    assert sorted(opt.idx2name) == list(range(len(names) * per_param))
    for index, name in opt.idx2name.items():
        assert opt._get_lr(index) == pytest.approx(0.1 * mults.get(name, 1.0)), name
        assert opt._get_wd(index) == pytest.approx(0.01 if name.endswith("_weight") else 0.0), name
    assert opt.rescale_grad == pytest.approx(1 / 4)
    # The checkpoint's symbol is untouched: the attributes live on the training copy only.
    assert "__lr_mult__" not in sym.tojson()


def test_sidecar_declared_head_wins_over_vgg_names(caplog):
    """A VGG-named net whose sidecar declares another head: the declaration is used, not the name signature."""
    sym, args = tiny_vgg()
    spec = find_head(sym, sidecar_classifier="fc7", sidecar_feature_output="drop6_output", sidecar_output_name="prob")
    assert spec == HeadSpec("fc7", "drop6_output", "prob")
    assert find_head(sym) == vgg.HEAD  # no declaration: VGG's names decide
    with caplog.at_level("WARNING", logger="symbols.head"):
        head = replace_head(sym, args, {}, SHAPE, 4, spec)
    assert head.dropped == ["fc7_bias", "fc7_weight", "fc8_bias", "fc8_weight"]
    assert "fc7_weight (replaced)" in caplog.text and "fc8_weight (cut off)" in caplog.text
