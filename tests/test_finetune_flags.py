"""fine-tune.py's flags, defaults and meanings through `python -m train` (issue 21 items 1, 2, 5, 6, 7, 9).

The reference is the flag table train/finetune_flags.py (transcribed from MXNet 1.9.1's fine-tune.py, common/fit.py
and common/data.py), the wheel's own optimizer registry, kvstores, ImageRecordIter and tools/parse_log.py.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from _train_fixtures import tiny_vgg_checkpoint, write_rec
from train.config import (KV_STORES, OPTIMIZERS, RECIPES, TrainConfig, build_parser, config_from_args,
                          parse_with_recipe)
from train.finetune_flags import FLAGS, markdown_table
from train.fit import (TrainError, check_kv_store, check_optimizer, fit, flag_notes, init_optimizer, make_kvstore,
                       schedule, schedule_epoch_size)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ftdata")
    tiny_vgg_checkpoint(d / "pre")
    write_rec(d / "s_train.rec", 4, 20, size=16, class_names=["a", "b", "c", "d"])
    write_rec(d / "s_val.rec", 4, 5, size=16, seed=1)
    return d


# ---- item 1: every flag, through the real parser, with fine-tune.py's default --------------------------------
def _dest(parser, flag):
    return next(a.dest for a in parser._actions if flag in a.option_strings)


def test_every_finetune_flag_parses_with_its_default():
    assert len(FLAGS) == 65 and len({row.flag for row in FLAGS}) == 65
    parser = build_parser()
    defaults = parser.parse_args([])
    for row in FLAGS:
        dest = _dest(parser, row.flag)  # StopIteration here: the flag is not accepted at all
        assert getattr(defaults, dest) == row.ours, row.flag
        # ours is fine-tune.py's default, or the table says why not
        assert row.ours == row.finetune_default or row.differs, row.flag
        parsed = getattr(parser.parse_args([row.flag, row.sample]), dest)  # SystemExit: the value is refused
        assert parsed not in (None, "") and parsed != row.ours or row.sample == str(row.ours), (row.flag, parsed)
    # the values fine-tune.py sets by set_defaults, and fit.py's that it keeps
    cfg = config_from_args(defaults)
    assert (cfg.mom, cfg.wd, cfg.batch_size, cfg.top_k, cfg.data_nthreads, cfg.num_epochs, cfg.lr,
            cfg.lr_step_epochs, cfg.warmup_epochs, cfg.kv_store) == (0, 0, 128, 0, 4, 30, 0.01, "20", 5, "device")
    assert "flatten0" == config_from_args(parser.parse_args(["--layer-before-fullc", "flatten0"])).layer_before_fullc


def test_docs_carry_the_table_and_help_is_clean():
    doc = (ROOT / "docs" / "finetune-migration.md").read_text(encoding="utf-8")
    assert markdown_table() in doc
    from recbuild.cli import build_parser as recbuild_parser
    text = build_parser(epilog="x").format_help()
    assert "CI machine" not in text and "(default: True)" not in text  # --no-progress: no "default: True"
    assert "(default: True)" not in recbuild_parser().format_help()    # --no-shuffle, likewise
    done = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and all(c in done.stdout for c in ("lr-find", "evaluate", "report"))


def test_recipe_transfer_is_a_named_set_of_defaults():
    parser = build_parser()
    plain = config_from_args(parse_with_recipe(parser, []))
    assert (plain.mom, plain.wd, plain.batch_size) == (0, 0, 128)
    cfg = config_from_args(parse_with_recipe(build_parser(), ["--recipe", "transfer", "--mom", "0.5"]))
    assert cfg.mom == 0.5  # a flag given wins over the recipe
    assert {k: getattr(cfg, k) for k in RECIPES["transfer"] if k != "mom"} == \
        {k: v for k, v in RECIPES["transfer"].items() if k != "mom"}


# ---- item 6: every optimizer one step, every kvstore accepted or refused in one line ----------------------------
def test_optimizer_list_is_the_wheels_registry():
    assert sorted(OPTIMIZERS) == sorted(mx.optimizer.Optimizer.opt_registry)


def _tiny_module(contexts, no_bias=False):
    x = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=3, name="fc", no_bias=no_bias)
    mod = mx.mod.Module(mx.sym.SoftmaxOutput(x, name="softmax"), context=contexts)
    mod.bind(data_shapes=[("data", (4, 5))], label_shapes=[("softmax_label", (4,))])
    mod.init_params(mx.init.Uniform(0.1))
    return mod


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_takes_one_step(name):
    mod = _tiny_module([mx.cpu()], no_bias=name == "groupadagrad")  # row-wise AdaGrad: 2-D weights only
    before = mod.get_params()[0]["fc_weight"].asnumpy().copy()
    cfg = TrainConfig(optimizer=name, lr=0.1, mom=0.9 if name in ("sgd", "nag") else 0.0)
    init_optimizer(mod, "local", cfg, None, 0, epoch_size=2)
    batch = mx.io.DataBatch([mx.nd.array(np.random.RandomState(0).randn(4, 5))], [mx.nd.array([0, 1, 2, 0])])
    mod.forward_backward(batch)
    mod.update()
    after = mod.get_params()[0]["fc_weight"].asnumpy()
    assert np.isfinite(after).all() and not np.array_equal(after, before), name
    if name == "groupadagrad":  # ... and a network with biases is refused before training, in one line
        with pytest.raises(TrainError, match="fc_bias has shape \\(3,\\); use adagrad"):
            check_optimizer(name, {"fc_weight": (3, 5), "fc_bias": (3,)})


@pytest.mark.parametrize("name", KV_STORES)
def test_each_kvstore_runs_or_is_refused_in_one_line(name):
    refused = {"horovod": "horovod.mxnet is not installed", "byteps": "byteps.mxnet is not installed",
               "nccl": "needs --gpus"}
    if name in refused:
        with pytest.raises(TrainError, match=refused[name]) as err:
            check_kv_store(name, None)
        assert "\n" not in str(err.value)
        return
    check_kv_store(name, None)
    if name.startswith("dist"):  # a real dist run needs the launcher (tests/test_launch.py runs dist_sync)
        return
    mod = _tiny_module([mx.cpu(0), mx.cpu(1)])
    init_optimizer(mod, name, TrainConfig(lr=0.1), None, 0)
    before = mod.get_params()[0]["fc_weight"].asnumpy().copy()
    mod.forward_backward(mx.io.DataBatch([mx.nd.ones((4, 5))], [mx.nd.array([0, 1, 2, 0])]))
    mod.update()
    assert not np.array_equal(mod.get_params()[0]["fc_weight"].asnumpy(), before), name


def test_gradient_compression_needs_a_store_that_compresses():
    assert make_kvstore(TrainConfig(kv_store="device", gc_type="2bit")).type == "device"
    with pytest.raises(TrainError, match="--gc-type 2bit: --kv-store local cannot compress"):
        make_kvstore(TrainConfig(kv_store="local", gc_type="2bit"))


def test_pow_steps_and_num_examples_are_fit_py_s():
    sched = schedule("step", 0.1, 10, 4, "pow2", 0.1)  # 40 updates, PolyScheduler of power 2
    assert sched(0) == pytest.approx(0.1) and sched(20) == pytest.approx(0.1 * 0.5 ** 2)
    assert sched(40) == pytest.approx(0.0, abs=1e-12)
    assert schedule("step", 0.1, 10, 4, "pow2", 1.0)(20) == pytest.approx(0.1)  # --lr-factor 1: constant (fit.py)
    assert schedule("step", 0.1, 10, 4, "2", 1.0)(30) == pytest.approx(0.1)
    cfg = TrainConfig(num_examples=1000, batch_size=128)
    assert schedule_epoch_size(cfg, 3, 1) == 8 and schedule_epoch_size(cfg, 3, 2) == 4  # ceil(int(N/w)/B)
    assert schedule_epoch_size(TrainConfig(batch_size=128), 3, 1) == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--lr-step-epochs", "powx"])


def test_flags_that_cannot_apply_say_so_in_one_line_each():
    cfg = TrainConfig(network="resnet", num_layers=50, benchmark=True, use_imagenet_data_augmentation=True,
                      warmup_epochs=2, optimizer="adam", mom=0.9, profile_server_suffix="s.json")
    notes = flag_notes(cfg)
    for flag in ("--network resnet", "--benchmark 1", "--use-imagenet-data-augmentation 1", "--warmup-epochs 2",
                 "--mom 0.9", "--profile-server-suffix"):
        assert sum(n.startswith(flag) or flag in n.split(":")[0] for n in notes) == 1, (flag, notes)
    assert all("\n" not in n for n in notes)
    assert flag_notes(TrainConfig()) == []


# ---- item 2: data.py's augmentation semantics, exactly as it hands them to ImageRecordIter ----------------------
def test_augmentation_reaches_image_record_iter_as_data_py_passes_it(data):
    from symbols.sidecar import load_sidecar
    from train.data import Augment, record_iter
    kw = Augment().iter_kwargs()
    assert (kw["max_aspect_ratio"], kw["min_aspect_ratio"], kw["min_random_area"], kw["max_random_area"],
            kw["random_h"], kw["max_shear_ratio"], kw["min_crop_size"]) == (0.0, None, 1.0, 1.0, 0, 0.0, -1)
    pre = load_sidecar(data / "pre")
    rec = data / "s_train.rec"

    def first(**aug):
        it = record_iter(rec, 8, pre, data, "softmax_label", train=True, augment=Augment(**aug), seed=3)
        return next(iter(it)).data[0].asnumpy()
    # --random-resized-crop 1 alone: fine-tune.py's defaults crop the full area at aspect 1 -> the image itself
    np.testing.assert_array_equal(first(random_resized_crop=True), first())
    # ... with a +-0.25 aspect jitter it runs (a min > max crash before): at area 1 no other aspect fits the
    # image, so the crop stays whole (as in fine-tune.py); with a smaller area the jittered crops differ
    np.testing.assert_array_equal(first(random_resized_crop=True, max_random_aspect_ratio=0.25), first())
    jittered = first(random_resized_crop=True, max_random_aspect_ratio=0.25, min_random_area=0.5)
    assert jittered.shape == (8, 3, 16, 16) and not np.array_equal(jittered, first())
    # the jitter also applies without --random-resized-crop, as in data.py
    assert not np.array_equal(first(max_random_aspect_ratio=0.25), first())
    # --pad-size/--fill-value reach the iterator: a random crop of the padded image shows fill-value pixels
    padded = next(iter(record_iter(rec, 8, pre, data, "softmax_label", train=True, augment=Augment(random_crop=True),
                                   seed=3, pad=4, fill_value=255))).data[0].asnumpy()
    assert not np.array_equal(padded, first(random_crop=True))
    # --data-train-idx names the index read; a missing one is refused, naming it
    from train.data import DataError
    with pytest.raises(DataError, match="nope.idx: no such .idx file"):
        record_iter(rec, 8, pre, data, "softmax_label", idx_path=data / "nope.idx")


# ---- items 1, 6, 7: a run with the run-time flags ---------------------------------------------------------------
def test_save_period_monitor_gc_initializer_and_names(data, tmp_path, caplog):
    caplog.set_level("INFO")
    cfg = TrainConfig(pretrained_model=str(data / "pre"), data_train=str(data / "s_train.rec"),
                      model_prefix=str(tmp_path / "m"), num_epochs=3, batch_size=16, save_period=2, monitor=5,
                      cpus=2, kv_store="device", gc_type="2bit", optimizer="rmsprop", initializer="msra",
                      progress=False, keep_head_names=True)
    result = fit(cfg)
    assert [p.name for p in sorted(tmp_path.glob("m-*.params"))] == ["m-0002.params", "m-0003.params"]
    assert [r["epoch"] for r in result.metrics] == [1, 2, 3]
    assert re.search(r"Batch: +\d+ fc", caplog.text)  # mx.mon.Monitor's statistics lines
    sym = mx.sym.load(str(tmp_path / "m-symbol.json"))
    assert sym.list_outputs() == ["prob_output"]  # --keep-head-names: the pretrained names
    # --test-io reads and logs speed, trains and writes nothing
    caplog.clear()
    fit(TrainConfig(pretrained_model=str(data / "pre"), data_train=str(data / "s_train.rec"),
                    model_prefix=str(tmp_path / "io"), batch_size=8, disp_batches=2, test_io=True, progress=False))
    assert "Batch [1]\tSpeed:" in caplog.text and "Batch [3]\tSpeed:" in caplog.text  # fit.py's --test-io lines
    assert not list(tmp_path.glob("io*"))
    # --profile-worker-suffix: MXNet's profiler writes this worker's trace there when training ends
    trace = tmp_path / "worker.json"
    fit(TrainConfig(pretrained_model=str(data / "pre"), data_train=str(data / "s_train.rec"),
                    model_prefix=str(tmp_path / "p"), batch_size=16, num_epochs=1, progress=False,
                    profile_worker_suffix=str(trace)))
    assert json.loads(trace.read_text())["traceEvents"]
    from train.fit import profiling  # a distributed worker: rankN_ before the suffix, and no trace without one
    assert (profiling(TrainConfig(profile_worker_suffix="w.json"), None, 1, 2).worker,
            profiling(TrainConfig(), None, 1, 2).worker) == ("rank1_w.json", "")


# ---- item 9: fine-tune.py's own command lines, only the program name changed -------------------------------------
@pytest.mark.slow
def test_fine_tune_command_lines_run_unchanged(data, tmp_path):
    parse_log = Path(mx.__file__).parent / "tools" / "parse_log.py"
    prefix = tmp_path / "ft" / "m"
    prefix.parent.mkdir()
    # The tutorial's line (`--load-epoch 0` left out: starting from the pretrained epoch is the ftplain work),
    # then fine-tune.py --help's augmentation and fit.py's run-time flags on top.
    line = ["--pretrained-model", str(data / "pre"), "--gpus", "", "--data-train", str(data / "s_train.rec"),
            "--data-val", str(data / "s_val.rec"), "--num-classes", "4", "--num-examples", "80", "--batch-size",
            "16", "--lr", "0.05", "--num-epochs", "2", "--layer-before-fullc", "drop7", "--image-shape", "3,16,16",
            "--model-prefix", str(prefix), "--disp-batches", "2"]
    extra = ["--random-mirror", "1", "--max-random-aspect-ratio", "0.25", "--random-resized-crop", "1",
             "--max-random-h", "5", "--top-k", "2", "--loss", "ce", "--optimizer", "nag", "--mom", "0.9",
             "--lr-step-epochs", "pow2", "--initializer", "xavier", "--save-period", "1", "--kv-store",
             "local_allreduce_cpu", "--network", "vgg"]
    for argv, out in ((line, prefix), (line + extra + ["--model-prefix", f"{prefix}x"], Path(f"{prefix}x"))):
        log = tmp_path / f"{out.name}.log"
        with open(log, "w") as handle:
            done = subprocess.run([sys.executable, "-m", "train", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=handle, text=True, timeout=300)
        text = log.read_text()
        assert done.returncode == 0, text[-2000:]
        for name in ("-symbol.json", "-0001.params", "-0002.params"):  # fine-tune.py's checkpoint names
            assert Path(f"{out}{name}").is_file(), name
        sym, args, _ = mx.model.load_checkpoint(str(out), 2)
        assert sym.list_outputs() == ["softmax_output"] and args["fc_weight"].shape == (4, 16)
        assert "\r" not in text and all(re.match(r"\d{4}-\d\d-\d\d |\[\d\d:", ln) for ln in text.splitlines())
        table = subprocess.run([sys.executable, str(parse_log), str(log), "--format", "none"], capture_output=True,
                               text=True, timeout=60).stdout.splitlines()
        rows = json.loads(Path(f"{out}-metrics.json").read_text())["epochs"]
        assert len(table) == 3, table
        for line_, row in zip(table[1:], rows):
            epoch, train_acc, val_acc, seconds = line_.split("\t")
            assert int(epoch) == row["epoch"]
            assert float(train_acc) == pytest.approx(row["train_accuracy"], abs=1e-6)
            assert float(val_acc) == pytest.approx(row["val_accuracy"], abs=1e-6)
        # the summary names only files that exist: no PNG (not asked for), the last checkpoint, the metrics files
        assert "Speed:" in text and "metrics.png" not in done.stdout
        assert f"(last {out}-0002.params), metrics {out}-metrics.csv/.json, config {out}-config.json." in done.stdout
    assert "--network vgg: the network is the pretrained checkpoint's" in log.read_text()
    # the fc -> softmax checkpoint deploys: bundle + ONNX, with the Module / Gluon / C API / onnxruntime parity check
    from tools.deploy import main as deploy_main
    assert deploy_main([str(prefix), "2", str(tmp_path / "bundle"), "--onnx"]) == 0
    assert (tmp_path / "bundle").is_dir() and list((tmp_path / "bundle").glob("*.onnx"))


def test_on_a_terminal_every_log_record_keeps_a_line_of_its_own(data, tmp_path):
    """The bar is drawn on a terminal only, and there the records are written through it: split the raw terminal
    stream at newlines, drop what each line's carriage returns overwrote, and every record is whole."""
    import fcntl
    import os
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    command = [sys.executable, "-m", "train", "--pretrained-model", str(data / "pre"), "--data-train",
               str(data / "s_train.rec"), "--model-prefix", str(tmp_path / "t"), "--batch-size", "8",
               "--num-epochs", "2", "--disp-batches", "3"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    raw = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        raw += chunk
    assert proc.wait(timeout=120) == 0
    os.close(master)
    text = raw.decode("utf-8", "replace")
    assert "epoch 1/2" in text  # the bar was drawn
    records = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    speed = [r for r in records if "Speed:" in r]
    assert len(speed) == 6 and all(re.match(r"\d{4}-\d\d-\d\d [\d:,]+ INFO train.fit: Epoch\[\d\] Batch ", r)
                                   for r in speed), speed
    assert sum(bool(re.match(r"\d{4}-\d\d-\d\d .* Epoch\[\d\] Train-accuracy=[\d.]+$", r)) for r in records) == 2


def test_a_run_recorded_before_the_change_reads_back_with_its_meaning():
    # PREFIX-config.json of an older run: warmup_epochs was the warm-up of any optimizer, the steps a list
    old = TrainConfig.from_dict({"warmup_epochs": 0.5, "lr_step_epochs": [3, 4], "mom": 0.9})
    assert (old.lr_warmup_epochs, old.warmup_epochs, old.lr_step_epochs, old.mom) == (0.5, 5, "3,4", 0.9)


def test_the_bar_counts_the_real_images_of_an_epoch(data, tmp_path, monkeypatch):
    """80 records in batches of 24: 4 batches, 96 slots, 16 of them filler; the bar runs 0..80 (not 0/96 -> 83 %)."""
    import train.fit as fit_module
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.done = total, 0

        def update(self, n):
            self.done += n

        def set_postfix(self, **kw):
            pass

        def close(self):
            pass

    monkeypatch.setattr(fit_module, "_progress", lambda enabled, total, epoch, epochs: bars.append(Bar(total)) or
                        bars[-1])
    fit(TrainConfig(pretrained_model=str(data / "pre"), data_train=str(data / "s_train.rec"),
                    model_prefix=str(tmp_path / "b"), batch_size=24, num_epochs=2))
    assert [(b.total, b.done) for b in bars] == [(80, 80), (80, 80)]
