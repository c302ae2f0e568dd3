"""End to end through the command lines: a Caffe VGG net -> our converter -> `python -m train` (frozen
backbone, lr_mult head, resume) -> `python -m train.predict`; checked with stock MXNet loaders."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from tests._caffe_nets import make_tiny_vgg
from tests._train_fixtures import write_rec
from tools.caffe_converter import convert

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fox", "owl"]


def run(*args):
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_caffe_vgg_converted_then_fine_tuned_frozen_and_resumed(tmp_path):
    prototxt, caffemodel = make_tiny_vgg(tmp_path / "caffe", num_classes=10, input_size=32, fc_width=64)
    convert(prototxt, caffemodel, tmp_path / "vgg", mean=(104.0, 117.0, 123.0), scale=1 / 64)
    write_rec(tmp_path / "set_train.rec", 4, 40, size=32, class_names=CLASSES)
    write_rec(tmp_path / "set_val.rec", 4, 10, size=32, seed=3)
    common = ["-m", "train", "--pretrained-model", str(tmp_path / "vgg"), "--data-train",
              str(tmp_path / "set_train.rec"), "--data-val", str(tmp_path / "set_val.rec"), "--model-prefix",
              str(tmp_path / "ft"), "--num-epochs", "6", "--batch-size", "16", "--lr", "0.01", "--no-progress",
              "--lr-mult", "^conv[1-3]_=0", "--lr-mult", "^fc_=5", "--random-mirror", "1", "--top-k", "2",
              "--recipe", "transfer"]
    # Interrupted after epoch 2 (the kill is simulated by removing what came later), then resumed.
    first = run(*common)
    assert "Trained 4 classes for 6 epochs" in first.stdout
    straight = mx.nd.load(str(tmp_path / "ft-0006.params"))
    for epoch in range(3, 7):
        for ext in ("params", "states"):
            (tmp_path / f"ft-{epoch:04d}.{ext}").unlink()
    run(*[v for v in common if v not in ("--pretrained-model", str(tmp_path / "vgg"))], "--load-epoch", "2")
    converted = mx.nd.load(str(tmp_path / "vgg-0000.params"))
    tuned = mx.nd.load(str(tmp_path / "ft-0006.params"))
    frozen = [k for k in converted if k.split("_")[0] in ("arg:conv1", "arg:conv2", "arg:conv3")]
    assert len(frozen) == 14  # conv1_1 .. conv3_3, weight + bias
    for key in frozen:
        assert np.array_equal(tuned[key].asnumpy(), converted[key].asnumpy()), key
    for key in ("arg:conv4_1_weight", "arg:conv5_3_weight", "arg:fc6_weight", "arg:fc7_weight"):  # kept from Caffe, then trained
        assert tuned[key].shape == converted[key].shape
        assert not np.array_equal(tuned[key].asnumpy(), converted[key].asnumpy()), key
    assert tuned["arg:fc_weight"].shape == (4, converted["arg:fc8_weight"].shape[1])  # fine-tune.py's `fc`
    metrics = json.loads((tmp_path / "ft-metrics.json").read_text())["epochs"]
    assert [m["epoch"] for m in metrics] == list(range(1, 7))
    assert metrics[-1]["val_accuracy"] >= 0.9, metrics  # chance 0.25
    for key in straight:  # resume == uninterrupted run
        np.testing.assert_allclose(tuned[key].asnumpy(), straight[key].asnumpy(), rtol=1e-5, atol=1e-6, err_msg=key)
    # the fine-tuned checkpoint loads with stock Module and predicts through the CLI
    mod = mx.mod.Module.load(str(tmp_path / "ft"), 6, label_names=["softmax_label"])
    mod.bind(data_shapes=[("data", (1, 3, 32, 32))], label_shapes=[("softmax_label", (1,))], for_training=False)
    run("-m", "train.predict", str(tmp_path / "ft"), "6", str(tmp_path / "set_val.rec"), "--out",
        str(tmp_path / "pred.csv"))
    with open(tmp_path / "pred.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id"] + CLASSES and len(rows) == 41
    done = run("-m", "train.predict", "evaluate", str(tmp_path / "ft"), "6", str(tmp_path / "set_val.rec"))
    accuracy = float(done.stdout.split("accuracy ")[1].split(",")[0])
    assert accuracy == pytest.approx(metrics[-1]["val_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL in the middle of training: only complete checkpoints remain, and resuming gives the weights of
    an uninterrupted run."""
    import signal
    import time
    from tests._train_fixtures import tiny_vgg_checkpoint
    tiny_vgg_checkpoint(tmp_path / "pre")
    write_rec(tmp_path / "s_train.rec", 4, 60, class_names=CLASSES)
    args = ["-m", "train", "--pretrained-model", str(tmp_path / "pre"), "--data-train", str(tmp_path / "s_train.rec"),
            "--num-epochs", "4", "--batch-size", "8", "--lr", "0.02", "--no-progress"]
    run(*args, "--model-prefix", str(tmp_path / "straight"))
    proc = subprocess.Popen([sys.executable, *args, "--model-prefix", str(tmp_path / "k")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "k-0002.params").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name[2:6]) for p in tmp_path.glob("k-*.params"))
    assert done and done[-1] < 4, "the run finished before it could be killed"
    for epoch in done:  # whatever exists is complete and loadable
        mx.nd.load(str(tmp_path / f"k-{epoch:04d}.params"))
    resume = [v for v in args if v not in ("--pretrained-model", str(tmp_path / "pre"))]
    run(*resume, "--model-prefix", str(tmp_path / "k"), "--load-epoch", str(done[-1]))
    a, b = mx.nd.load(str(tmp_path / "straight-0004.params")), mx.nd.load(str(tmp_path / "k-0004.params"))
    for key in a:
        np.testing.assert_allclose(b[key].asnumpy(), a[key].asnumpy(), rtol=1e-5, atol=1e-6, err_msg=key)
