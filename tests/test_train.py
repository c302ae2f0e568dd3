"""Trainer: accuracy, frozen layers, lr_mult on every update layout, exact resume, NaN stop, stock loading,
errors. Tiny VGG-shaped nets on 16x16 images whose colours encode the class."""
from __future__ import annotations

import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from symbols.sidecar import load_sidecar
from tests._train_fixtures import tiny_vgg_checkpoint, write_rec
from train.config import (AUGMENT, RECIPES, TrainConfig, build_parser, config_from_args, load_run_config,
                          option_names)
from train.data import DataError
from train.fit import TrainError, TrainingDiverged, fit

CLASSES = ["red", "green", "blue", "grey"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    tiny_vgg_checkpoint(d / "pre", num_classes=7)
    write_rec(d / "set_train.rec", 4, 40, class_names=CLASSES)
    write_rec(d / "set_val.rec", 4, 10, seed=1)
    return d


def config(data: Path, prefix: Path, **kw) -> TrainConfig:
    # The transfer recipe (momentum, weight decay, Xavier head) the trainer's tests were written against.
    base = dict(**RECIPES["transfer"])
    base.update(pretrained_model=str(data / "pre"), data_train=str(data / "set_train.rec"),
                data_val=str(data / "set_val.rec"), model_prefix=str(prefix), num_epochs=4, lr=0.05,
                batch_size=16, top_k=2, progress=False, lr_step_epochs=(3,), lr_factor=0.5)
    base.update(kw)
    return TrainConfig(**base)


def params(path) -> dict:
    return {k.split(":", 1)[1]: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def test_learns_and_writes_every_output(data, tmp_path):
    prefix = tmp_path / "ft"
    result = fit(config(data, prefix))
    last = result.metrics[-1]
    assert last["val_accuracy"] >= 0.9, result.metrics  # chance is 0.25
    assert last["val_loss"] < result.metrics[0]["train_loss"]
    for epoch in range(1, 5):
        assert (tmp_path / f"ft-{epoch:04d}.params").is_file() and (tmp_path / f"ft-{epoch:04d}.states").is_file()
    pre = load_sidecar(prefix)
    assert (pre.num_classes, pre.class_names, pre.classifier, pre.output_name) == (4, CLASSES, "fc", "softmax")
    assert pre.channel_order == "BGR" and pre.mean == [104.0, 117.0, 123.0]
    assert json.loads((tmp_path / "ft.classes.json").read_text())["classes"] == CLASSES
    cfg = json.loads((tmp_path / "ft-config.json").read_text())
    assert cfg["lr"] == 0.05 and cfg["resolved"]["num_classes"] == 4 and cfg["resolved"]["head"]["classifier"] == "fc"
    header = (tmp_path / "ft-metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("epoch", "train_loss", "train_accuracy", "train_top_2_accuracy", "val_loss", "val_accuracy",
                "val_top_2_accuracy", "img_per_s"):
        assert col in header
    assert len((tmp_path / "ft-metrics.csv").read_text().splitlines()) == 5
    assert not (tmp_path / "ft-metrics.png").exists()  # drawn on demand only (--plot-metrics, python -m train.metrics)
    from train.metrics import main as draw_metrics
    assert draw_metrics([str(prefix)]) == 0
    assert (tmp_path / "ft-metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.part"))
    # the recorded config reads back as the very config that ran, every type intact (tuples stay tuples)
    assert load_run_config(prefix) == config(data, prefix)
    # every pretrained weight below the head was kept: fc6/fc7 too (fine-tune.py drops anything with 'fc')
    sym = mx.sym.load(str(tmp_path / "ft-symbol.json"))
    assert sym.list_outputs() == ["softmax_output"]
    shapes = dict(zip(sym.list_arguments(), sym.infer_shape(data=(1, 3, 16, 16))[0]))
    assert shapes["fc_weight"] == (4, 16) and shapes["fc7_weight"] == (16, 16)


def test_checkpoint_loads_with_stock_module_and_gluon(data, tmp_path):
    prefix = tmp_path / "ft"
    fit(config(data, prefix, num_epochs=1, data_val=None))
    x = np.random.RandomState(0).uniform(-2, 2, (3, 3, 16, 16)).astype(np.float32)
    mod = mx.mod.Module.load(str(prefix), 1)  # fine-tune.py's head names: Module's default label softmax_label
    mod.bind(data_shapes=[("data", x.shape)], label_shapes=[("softmax_label", (3,))], for_training=False)
    mod.forward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.zeros(3)]), is_train=False)
    from_module = mod.get_outputs()[0].asnumpy()
    net = mx.gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data", "softmax_label"], f"{prefix}-0001.params")
    from_gluon = net(mx.nd.array(x), mx.nd.zeros(3)).asnumpy()
    np.testing.assert_allclose(from_gluon, from_module, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(from_module.sum(axis=1), 1, rtol=1e-5)
    sym, args, aux = mx.model.load_checkpoint(str(prefix), 1)
    assert set(args) == set(sym.list_arguments()) - {"data", "softmax_label"}


# The three optimizer index layouts Module can use: one device; two devices updating on the kvstore
# (index = param); two devices updating locally (index = param * devices + device).
LAYOUTS = [pytest.param(1, "1", id="1ctx"), pytest.param(2, "1", id="2ctx-kvstore"),
           pytest.param(2, "0", id="2ctx-local-update")]


@pytest.mark.parametrize("cpus,on_kv", LAYOUTS)
def test_frozen_layers_bit_identical_and_head_lr_mult(data, tmp_path, monkeypatch, cpus, on_kv):
    monkeypatch.setenv("MXNET_UPDATE_ON_KVSTORE", on_kv)
    pre = params(data / "pre-0000.params")
    moved = {}
    for mult in (1, 10):
        prefix = tmp_path / f"m{mult}"
        fit(config(data, prefix, num_epochs=1, data_val=None, cpus=cpus, kv_store="local", mom=0.0, wd=0.0,
                   lr=0.0005, lr_mult=[r"^(conv|fc6)=0", f"^fc_={mult}"]))
        out = params(f"{prefix}-0001.params")
        for name in ("conv1_1_weight", "conv1_1_bias", "conv2_1_weight", "fc6_weight", "fc6_bias"):
            assert np.array_equal(out[name], pre[name]), f"{name} changed although frozen"
        assert not np.array_equal(out["fc7_weight"], pre["fc7_weight"]), "fc7 (mult 1) did not train"
        start = tiny_fc8_init(data, tmp_path / f"init{mult}")
        moved[mult] = float(np.abs(out["fc_weight"] - start).sum())
    # Same data order and seed: the head moves ~10x as far with lr_mult 10 (not exactly: fc7 also moves).
    assert moved[10] > 7 * moved[1], moved


def tiny_fc8_init(data: Path, prefix: Path) -> np.ndarray:
    """The new head's initial weights (seeded, so every run starts from these)."""
    from train.fit import prepare_model
    return prepare_model(str(data / "pre"), 0, 4).arg_params["fc_weight"].asnumpy()


def test_resume_equals_uninterrupted_run(data, tmp_path):
    # Momentum, a warm-up, a step at epoch 3, dropout and shuffling: all must continue exactly.
    common = dict(lr=0.02, mom=0.9, lr_warmup_epochs=1, lr_step_epochs=(3,), lr_factor=0.3, random_mirror=True,
                  data_val=None)
    fit(config(data, tmp_path / "straight", **common))
    fit(config(data, tmp_path / "split", num_epochs=2, **common))
    fit(config(data, tmp_path / "split", load_epoch=2, **common))
    a, b = params(tmp_path / "straight-0004.params"), params(tmp_path / "split-0004.params")
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
    rows = json.loads((tmp_path / "split-metrics.json").read_text())["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["num_update"] for r in rows] == [10, 20, 30, 40]
    # ... the resume needs the saved momentum: without it, it refuses rather than silently restarting it
    # (epochs 3-4 moved away first: a resume beside later epochs is refused before that).
    for f in ("split-0002.states", "split-0003.params", "split-0003.states", "split-0004.params",
              "split-0004.states"):
        (tmp_path / f).unlink()
    with pytest.raises(TrainError, match="optimizer state missing"):
        fit(config(data, tmp_path / "split", load_epoch=2, **common))


def test_resume_with_cosine_schedule_and_adam(data, tmp_path):
    # Adam's bias correction and the cosine schedule both depend on the update count, which must continue.
    common = dict(lr=0.003, optimizer="adam", lr_scheduler="cosine", lr_warmup_epochs=0.5, data_val=None,
                  num_epochs=3)
    fit(config(data, tmp_path / "straight", **common))
    fit(config(data, tmp_path / "split", **common))
    for f in ("split-0002.params", "split-0002.states", "split-0003.params", "split-0003.states"):
        (tmp_path / f).unlink()
    fit(config(data, tmp_path / "split", load_epoch=1, **common))
    a, b = params(tmp_path / "straight-0003.params"), params(tmp_path / "split-0003.params")
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    prefix = tmp_path / "ft"
    fit(config(data, prefix, num_epochs=3, data_val=None))
    good = (tmp_path / "ft-0001.params").read_bytes()
    for f in ("ft-0002.params", "ft-0002.states", "ft-0003.params", "ft-0003.states"):
        (tmp_path / f).unlink()
    with pytest.raises(TrainingDiverged, match=r"NaN/inf .*ft-0001.params"):
        fit(config(data, prefix, num_epochs=3, data_val=None, load_epoch=1, lr=1e12, allow_config_change=True))
    assert (tmp_path / "ft-0001.params").read_bytes() == good
    assert not (tmp_path / "ft-0002.params").exists() and not list(tmp_path.glob("*.part"))


def test_cli_diverges_with_clear_message(data, tmp_path):
    from train.__main__ import main
    code = main(["--pretrained-model", str(data / "pre"), "--data-train", str(data / "set_train.rec"),
                 "--model-prefix", str(tmp_path / "x"), "--num-epochs", "2", "--lr", "1e12", "--no-progress",
                 "--batch-size", "16"])
    assert code == 3
    assert not (tmp_path / "x-0001.params").exists() and not (tmp_path / "x-0002.params").exists()


@pytest.mark.parametrize("change,error,match", [
    (dict(num_classes=5), DataError, "disagrees with the class map"),
    (dict(lr_mult=["^nosuchlayer=0"]), TrainError, "matches no parameter"),
    (dict(lr_mult=[".=0"]), TrainError, "freezes every parameter"),
    (dict(layer_before_fullc="flatten0"), TrainError, "flatten0: no such layer"),
    (dict(dtype="float16"), ValueError, "needs --gpus"),
    (dict(load_epoch=3, num_epochs=3), ValueError, "must be in 1..2"),
])
def test_bad_input_fails_before_training(data, tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        fit(config(data, tmp_path / "ft", **change))
    assert not list(tmp_path.glob("ft-0001.*"))


def test_label_out_of_range_and_existing_run(data, tmp_path):
    write_rec(tmp_path / "odd_train.rec", 3, 4, labels=[0, 1, 2, 9])
    with pytest.raises(DataError, match=r"odd_train.rec: label 9 is out of range for 3 classes"):
        fit(config(data, tmp_path / "a", data_train=str(tmp_path / "odd_train.rec"), data_val=None,
                   num_classes=3))
    fit(config(data, tmp_path / "b", num_epochs=1, data_val=None))
    with pytest.raises(TrainError, match="--load-epoch 1, or pass --overwrite"):
        fit(config(data, tmp_path / "b", num_epochs=1, data_val=None))
    fit(config(data, tmp_path / "b", num_epochs=1, data_val=None, overwrite=True))


def test_a_wrong_pretrained_path_says_what_was_looked_for(data, tmp_path):
    wrong = tmp_path / "nowhere" / "pre"
    with pytest.raises(TrainError) as err:
        fit(config(data, tmp_path / "ft", pretrained_model=str(wrong)))
    assert str(err.value) == (f"--pretrained-model {wrong}: no such checkpoint: none of pre-symbol.json, "
                              f"pre-0000.params, pre-preprocess.json exists in {wrong.parent} (the folder does not "
                              "exist)")
    # A plain MXNet checkpoint (there, no sidecar) is no wrong path: tests/test_train_plain.py trains from one.


def test_missing_or_misshapen_pretrained_weight_is_an_error(data, tmp_path):
    sym, args, aux = mx.model.load_checkpoint(str(data / "pre"), 0)
    broken = dict(args)
    del broken["fc7_weight"]
    mx.model.save_checkpoint(str(tmp_path / "pre"), 0, sym, broken, aux)
    (tmp_path / "pre-preprocess.json").write_text((data / "pre-preprocess.json").read_text())
    with pytest.raises(TrainError, match="fc7_weight missing"):
        fit(config(data, tmp_path / "ft", pretrained_model=str(tmp_path / "pre")))
    broken = dict(args, fc6_weight=mx.nd.zeros((16, 5)))
    mx.model.save_checkpoint(str(tmp_path / "pre"), 0, sym, broken, aux)
    with pytest.raises(TrainError, match=r"fc6_weight has shape \(16, 5\)"):
        fit(config(data, tmp_path / "ft", pretrained_model=str(tmp_path / "pre")))


def test_two_cpu_contexts_learn(data, tmp_path):
    result = fit(config(data, tmp_path / "ft", cpus=2, kv_store="device"))
    assert result.metrics[-1]["val_accuracy"] >= 0.9
    assert result.metrics[-1]["layout"] == {"contexts": 2, "update_on_kvstore": True}


def test_hidden_head_layer(data, tmp_path):
    result = fit(config(data, tmp_path / "ft", hidden=32, hidden_dropout=0.2, num_epochs=5, lr=0.01))
    names = mx.sym.load(str(tmp_path / "ft-symbol.json")).list_arguments()
    assert "fc_hidden_weight" in names and "fc_weight" in names
    assert result.metrics[-1]["val_accuracy"] >= 0.75  # chance is 0.25


@pytest.mark.gpu
def test_float16_on_gpu_with_multi_precision(data, tmp_path):
    if mx.context.num_gpus() == 0:
        pytest.skip("no CUDA GPU (float16 training is GPU-only)")
    result = fit(config(data, tmp_path / "ft", gpus="0", dtype="float16", kv_store="device", num_epochs=4))
    assert result.metrics[-1]["val_accuracy"] >= 0.9
    out = params(tmp_path / "ft-0004.params")
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())


# ---- the one declaration of the options ------------------------------------------------------------------------
def test_parser_and_augment_derive_from_the_config_declaration():
    from dataclasses import fields
    from train.data import Augment
    parser = build_parser()
    flags = {a.dest: a.option_strings for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(flags) == {f.name for f in fields(TrainConfig)}
    assert config_from_args(parser.parse_args([])) == TrainConfig()  # every default from its one place
    argv = ["--image-shape", "3,32,32", "--rgb-mean", "1,2,3", "--lr-step-epochs", "2,4", "--lr-mult", "a=1",
            "--lr-mult", "b=0", "--random-mirror", "1", "--no-progress", "--gpus", "0,1", "--num-classes", "5"]
    cfg = config_from_args(parser.parse_args(argv))
    assert (cfg.image_shape, cfg.rgb_mean, cfg.lr_step_epochs) == ((3, 32, 32), (1.0, 2.0, 3.0), "2,4")
    assert (cfg.lr_mult, cfg.random_mirror, cfg.progress, cfg.gpus, cfg.num_classes) == (
        ["a=1", "b=0"], True, False, "0,1", 5)
    # train.data.Augment holds exactly the augmentation group, with the same defaults
    assert tuple(Augment.__dataclass_fields__) == option_names(AUGMENT)
    assert vars(Augment()) == TrainConfig().group(AUGMENT)


def test_list_options_errors_name_the_text(capsys):
    from train.config import parse_gpus
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--image-shape", "3,x,32"])
    assert "expected comma-separated integers, got '3,x,32'" in capsys.readouterr().err
    assert parse_gpus("0, 2") == [0, 2] and parse_gpus(None) == []
    with pytest.raises(ValueError, match=r"--gpus 'a': expected comma-separated GPU ids"):
        parse_gpus("a")


def test_recipes_do_not_import_the_command_line_module():
    import subprocess
    import sys
    code = ("import contextlib, io, sys\nfrom train.recipes.__main__ import main\n"
            "for command in ('features', 'stages', 'fit'):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        main([command, '--help'])\n"
            "sys.exit('train.__main__' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0


def test_no_function_of_the_training_loop_exceeds_100_lines():
    import ast
    root = Path(__file__).resolve().parents[1]
    long = []
    for rel in ("train/fit.py", "train/config.py", "train/__main__.py", "train/metrics.py", "train/recipes/features.py",
                "train/recipes/stages.py", "train/recipes/__main__.py", "symbols/head.py", "symbols/vgg.py"):
        for node in ast.walk(ast.parse((root / rel).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long.append(f"{rel}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


# ---- resume guard, epochs published as a unit, logs, lr columns (issue 14) --------------------------------------
def test_resume_with_changed_options_stops_unless_allowed_and_records_it(data, tmp_path, caplog):
    prefix = tmp_path / "ft"
    common = dict(data_val=None, lr_scheduler="cosine", lr_step_epochs=(20,))
    fit(config(data, prefix, num_epochs=2, **common))
    with pytest.raises(TrainError) as err:
        fit(config(data, prefix, num_epochs=3, load_epoch=2, lr=0.07, batch_size=8, **common))
    message = str(err.value)
    assert "\n" not in message and "ft-config.json" in message and "--allow-config-change" in message
    assert "--lr 0.07 (the run had 0.05)" in message and "--batch-size 8 (the run had 16)" in message
    assert not (tmp_path / "ft-0003.params").exists()
    # Extending --num-epochs alone is allowed, and says what happens to the cosine schedule.
    with caplog.at_level("WARNING", logger="train.fit"):
        fit(config(data, prefix, num_epochs=3, load_epoch=2, **common))
    lr_now = 0.05 * (1 + np.cos(np.pi * 21 / 30)) / 2  # CosineScheduler's formula at update 21 of 30
    assert f"re-planned to reach 0 at epoch 3; the lr continues at {lr_now:g} where the 2-epoch plan had 0\n" \
        in caplog.text
    rows = json.loads((tmp_path / "ft-metrics.json").read_text())["epochs"]
    assert rows[2]["lr_start"] == pytest.approx(lr_now)
    recorded = json.loads((tmp_path / "ft-config.json").read_text())
    assert recorded["config_history"] == [] and recorded["num_epochs"] == 3
    # --allow-config-change continues and records the change in the config history.
    (tmp_path / "ft-0003.params").unlink()
    fit(config(data, prefix, num_epochs=3, load_epoch=2, lr=0.07, allow_config_change=True, **common))
    history = json.loads((tmp_path / "ft-config.json").read_text())["config_history"]
    assert len(history) == 1 and history[0]["resumed_from_epoch"] == 2
    assert history[0]["changed"] == {"--lr": {"from": 0.05, "to": 0.07}}
    assert load_run_config(prefix).lr == 0.07


def test_epoch_is_published_as_a_unit_and_the_advice_names_the_last_complete_one(data, tmp_path, monkeypatch,
                                                                                  capsys):
    import subprocess
    import sys
    from train.__main__ import main
    base = ["--pretrained-model", str(data / "pre"), "--data-train", str(data / "set_train.rec"), "--num-epochs", "3",
            "--batch-size", "16", "--lr", "0.05", "--no-progress"]
    argv = base + ["--model-prefix", str(tmp_path / "k")]
    assert main(base + ["--model-prefix", str(tmp_path / "straight")]) == 0
    # Killed while writing epoch 2's optimizer state: epoch 2 must not look complete.
    from symbols import checkpoint
    real, calls = checkpoint.save_optimizer_states, []

    def killed_at_second(module, fname):
        calls.append(fname)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(module, fname)
    monkeypatch.setattr(checkpoint, "save_optimizer_states", killed_at_second)
    assert main(argv) == 130
    assert "last complete checkpoint " + str(tmp_path / "k-0001.params") in capsys.readouterr().err
    assert not (tmp_path / "k-0002.params").exists()
    rows = json.loads((tmp_path / "k-metrics.json").read_text())["epochs"]
    assert [r["epoch"] for r in rows] == [1]
    monkeypatch.setattr(checkpoint, "save_optimizer_states", real)
    # Killed a step later, between the metrics row and the .params: the next start removes the orphans.
    from train.fit import drop_unpublished
    from train.metrics import MetricsLog
    (tmp_path / "k-0002.states").write_bytes(b"partial epoch")
    MetricsLog(str(tmp_path / "k"), rows + [dict(rows[0], epoch=2)]).write()
    drop_unpublished(str(tmp_path / "k"))
    assert not (tmp_path / "k-0002.states").exists()
    assert [r["epoch"] for r in json.loads((tmp_path / "k-metrics.json").read_text())["epochs"]] == [1]
    assert (tmp_path / "k-metrics.csv").read_text().count("\n") == 2  # header + epoch 1
    # A fresh start is refused with the last complete epoch; a dead run's .part leftover is removed on start.
    assert main(argv) == 2
    assert "k-0001.params exists: resume with --load-epoch 1" in capsys.readouterr().err
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".k-0002.params.{dead.pid}.part"
    leftover.write_bytes(b"\0" * 1024)
    # The old resume line (the same command plus --load-epoch) is ambiguous now that --load-epoch with
    # --pretrained-model is fine-tune.py's pretrained epoch: refused, naming both readings.
    assert main(argv + ["--load-epoch", "1"]) == 2
    assert "drop --pretrained-model" in capsys.readouterr().err
    resume = [v for v in argv if v not in ("--pretrained-model", str(data / "pre"))]
    assert main(resume + ["--load-epoch", "1"]) == 0
    assert not leftover.exists()
    a, b = params(tmp_path / "straight-0003.params"), params(tmp_path / "k-0003.params")
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # An epoch whose .states never came (an older run killed between the two) is not offered for resume.
    (tmp_path / "k-0003.states").unlink()
    from train.fit import complete_epochs
    assert complete_epochs(str(tmp_path / "k")) == [1, 2]


def test_log_is_read_by_mxnets_parse_log_like_fine_tune_py(data, tmp_path):
    """The wheel's own tools/parse_log.py reads every epoch of our log, equal to PREFIX-metrics.csv."""
    import csv
    import re
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    prefix = tmp_path / "ft"
    done = subprocess.run([sys.executable, "-m", "train", "--pretrained-model", str(data / "pre"), "--data-train",
                           str(data / "set_train.rec"), "--data-val", str(data / "set_val.rec"), "--model-prefix",
                           str(prefix), "--num-epochs", "3", "--batch-size", "16", "--lr", "0.05", "--no-progress",
                           "--disp-batches", "3"], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log_file = tmp_path / "train.log"
    log_file.write_text(done.stderr)
    parse_log = Path(mx.__file__).parent / "tools" / "parse_log.py"
    table = subprocess.run([sys.executable, str(parse_log), str(log_file), "--format", "none", "--metric-names",
                            "accuracy", "cross-entropy"], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    parsed = [line.split("\t") for line in table.stdout.strip().splitlines()[1:]]
    with open(f"{prefix}-metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(parsed) == len(rows) == 3
    for got, row in zip(parsed, rows):
        epoch, train_acc, train_ce, val_acc, val_ce, seconds = got
        assert int(epoch) == int(row["epoch"])  # parse_log prints Epoch[N] + 1: Epoch[0] is checkpoint -0001
        for value, key in ((train_acc, "train_accuracy"), (train_ce, "train_loss"), (val_acc, "val_accuracy"),
                           (val_ce, "val_loss")):
            assert float(value) == pytest.approx(float(row[key]), abs=1e-6), key
        assert float(seconds) == pytest.approx(float(row["seconds"]), abs=0.051)
    # Speedometer's lines every --disp-batches (10 batches per epoch: [0-3], [3-6], [6-9]).
    speed = re.findall(r"Epoch\[(\d)\] Batch \[(\d+)-(\d+)\]\tSpeed: [\d.]+ samples/sec\taccuracy=[\d.]+\t"
                       r"cross-entropy=[\d.]+\n", done.stderr)
    assert speed == [(str(e), str(a), str(a + 3)) for e in range(3) for a in (0, 3, 6)]
    assert re.search(r'Epoch\[0\] Time cost=[\d.]+\n.*Epoch\[0\] Validation-accuracy=.*\n(.*\n)*.*Saved checkpoint '
                     r'to ".*ft-0001.params"', done.stderr)
    # Head surgery is visible: the replaced classifier is in the summary and in the config.
    assert "Pretrained parameters not carried over (2, listed in the config as dropped_pretrained): fc8_bias, " \
           "fc8_weight" in done.stdout
    assert json.loads((tmp_path / "ft-config.json").read_text())["resolved"]["dropped_pretrained"] == [
        "fc8_bias", "fc8_weight"]


def test_metrics_record_the_lr_each_epoch_starts_and_ends_with(data, tmp_path):
    result = fit(config(data, tmp_path / "ft", num_epochs=2, data_val=None, lr_warmup_epochs=1, lr_step_epochs=(20,)))
    first, second = result.metrics
    # 10 updates per epoch; MultiFactorScheduler's linear warm-up from 0: update 1 -> lr/10, update 10 -> lr
    assert (first["lr_start"], first["lr_end"]) == (pytest.approx(0.005), pytest.approx(0.05))
    assert (second["lr_start"], second["lr_end"]) == (pytest.approx(0.05), pytest.approx(0.05))
    header = (tmp_path / "ft-metrics.csv").read_text().splitlines()[0].split(",")
    assert "lr_start" in header and "lr_end" in header


def test_nccl_without_gpus_is_a_one_line_error(data, tmp_path, capsys):
    from train.__main__ import main
    code = main(["--pretrained-model", str(data / "pre"), "--data-train", str(data / "set_train.rec"),
                 "--model-prefix", str(tmp_path / "x"), "--kv-store", "nccl", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--kv-store nccl needs --gpus" in err[0]


def test_non_finite_validation_is_a_warning_naming_the_epoch(caplog):
    from train.fit import _evaluate

    class NaNModule:
        def forward(self, batch, is_train):
            pass

        def get_outputs(self):
            return [mx.nd.array([[np.nan, 0.5]])]
    batch = mx.io.DataBatch([mx.nd.zeros((1, 2))], [mx.nd.zeros(1)], pad=0)
    with caplog.at_level("WARNING", logger="train.fit"):
        out = _evaluate(NaNModule(), [batch], 0, 4)
    assert np.isnan(out["val_loss"]) and "Epoch[4] validation" in caplog.text and "NaN" in caplog.text


# ---- no host sync per batch (issue 16) -------------------------------------------------------------------------
def test_host_reads_a_batch_only_after_the_next_update_is_queued(data, tmp_path, monkeypatch):
    import train.fit as fit_module
    events = []
    real_update = mx.mod.Module.update

    def update(self):
        events.append("update")
        return real_update(self)

    class Recording(fit_module.Tally):
        def update(self, probs, labels):
            events.append("read")
            return super().update(probs, labels)
    monkeypatch.setattr(mx.mod.Module, "update", update)
    monkeypatch.setattr(fit_module, "Tally", Recording)
    fit(config(data, tmp_path / "ft", num_epochs=1, data_val=None, top_k=0))
    reads = [i for i, e in enumerate(events) if e == "read"]
    # Each batch is tallied twice (epoch and Speedometer window); the first read comes after 2 updates.
    assert events[:2] == ["update", "update"] and events.count("update") == 10 and len(reads) == 20


def test_validation_iterator_is_reused_and_every_record_is_seen_each_pass(data, tmp_path):
    """ImageRecordIter 1.9's reset() skips the records that padded the last batch (round_batch) or reports
    pad 0 over stale rows (round_batch=False); the reused iterator must still give each record once per pass."""
    from symbols.sidecar import load_sidecar as sidecar
    from train.data import record_iter
    from train.fit import ReusedPasses
    write_rec(tmp_path / "v.rec", 27, 1, labels=[float(i) for i in range(27)])
    built = []

    def make():
        built.append(1)
        return record_iter(tmp_path / "v.rec", 8, sidecar(data / "pre"), data, "prob_label", round_batch=False)
    passes = ReusedPasses(make, 27)
    for _ in range(3):
        seen = [label for batch, keep in passes for label in batch.label[0].asnumpy()[:keep]]
        assert sorted(seen) == list(range(27))
    assert len(built) == 1
    # The trainer's validation numbers equal an independent evaluation of each epoch's checkpoint.
    from train.predict import evaluate, load_model
    result = fit(config(data, tmp_path / "ft", num_epochs=3))  # 40 val records, batch 16: a padded last batch
    for row in result.metrics:
        ev = evaluate(load_model(str(tmp_path / "ft"), row["epoch"], batch_size=16), data / "set_val.rec", top_k=2)
        assert ev["accuracy"] == pytest.approx(row["val_accuracy"], abs=1e-9)
        assert ev["log_loss"] == pytest.approx(row["val_loss"], rel=1e-5)


def test_training_iterator_is_reused_every_record_each_epoch_and_resume_replays_it(data, tmp_path):
    """One shuffling ImageRecordIter serves every epoch: each epoch is a complete new permutation (MXNet 1.9's
    round_batch reset would skip the filler records), the last batch is filled with the epoch's first records,
    and a stream started at epoch 2 (a resume) gives epoch 2 of the uninterrupted stream."""
    from symbols.sidecar import load_sidecar as sidecar
    from train.data import record_iter
    from train.fit import EpochStream, reusable_train_iter
    write_rec(tmp_path / "t.rec", 27, 1, labels=[float(i) for i in range(27)])
    built = []

    def make():
        built.append(1)
        return record_iter(tmp_path / "t.rec", 8, sidecar(data / "pre"), data, "prob_label", train=True, seed=5,
                           round_batch=False)
    stream = EpochStream(make, 27, 0)
    epochs = []
    for _ in range(3):
        batches = list(stream.epoch())
        assert [b.pad for b in batches] == [0, 0, 0, 5]
        labels = np.concatenate([b.label[0].asnumpy() for b in batches]).astype(int)
        assert sorted(labels[:27]) == list(range(27))  # every record, once
        assert list(labels[27:]) == list(labels[:5])  # the filler: this epoch's first records
        epochs.append(labels)
    assert len(built) == 1 and not np.array_equal(epochs[0], epochs[1])
    resumed = np.concatenate([b.label[0].asnumpy() for b in EpochStream(make, 27, 2).epoch()]).astype(int)
    np.testing.assert_array_equal(resumed, epochs[2])
    assert reusable_train_iter(TrainConfig()) and not reusable_train_iter(TrainConfig(random_mirror=True))


def test_plot_metrics_draws_the_png_when_the_run_ends(data, tmp_path):
    prefix = tmp_path / "p"
    fit(config(data, prefix, num_epochs=1, data_val=None, plot_metrics=True))
    assert (tmp_path / "p-metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
