"""train.report: every number equals train.predict.evaluate's; the confusion matrix and per-class figures equal
an independent count over the predict CSV and the labels read back with mx.recordio."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from tests._train_fixtures import tiny_vgg_checkpoint, write_rec
from train.config import TrainConfig
from train.fit import fit
from train.predict import evaluate, load_model, predict
from train.predict.cli import main as predict_main

CLASSES = ["zebra", "apple", "mango", "kiwi", "fig"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A briefly trained tiny VGG (3 epochs: right about half the time) and a labelled val .rec."""
    d = tmp_path_factory.mktemp("evalreport")
    tiny_vgg_checkpoint(d / "pre", num_classes=5)
    write_rec(d / "s_train.rec", 5, 16, class_names=CLASSES)
    write_rec(d / "s_val.rec", 5, 5, seed=3, labels=[float(i % 5) for i in range(23)])  # 23: a padded batch
    fit(TrainConfig(pretrained_model=str(d / "pre"), data_train=str(d / "s_train.rec"), model_prefix=str(d / "ft"),
                    num_epochs=3, lr=0.05, batch_size=16, progress=False))
    return d


def _labels(rec: Path) -> np.ndarray:
    reader = mx.recordio.MXRecordIO(str(rec), "r")
    out = []
    while True:
        item = reader.read()
        if item is None:
            return np.array(out, np.int64)
        out.append(int(mx.recordio.unpack(item)[0].label))


def test_report_numbers_equal_evaluate_and_an_independent_count(run, tmp_path, capsys):
    out = tmp_path / "rep"
    assert predict_main(["report", str(run / "ft"), "3", str(run / "s_val.rec"), "--out", str(out),
                         "--batch-size", "8", "--top-k", "2", "--top-losses", "6"]) == 0
    assert "23 images, accuracy" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    model = load_model(str(run / "ft"), 3, batch_size=8)
    ev = evaluate(model, run / "s_val.rec", top_k=2)
    for key in ("images", "accuracy", "log_loss", "top_2_accuracy", "per_class_accuracy"):
        assert rep[key] == ev[key], key  # exactly: the same tally, batch by batch

    predict(model, run / "s_val.rec", tmp_path / "p.csv", progress=False, id_mode="index")
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    probs = np.array([[float(v) for v in r[1:]] for r in rows])
    truth = _labels(run / "s_val.rec")
    guess = probs.argmax(1)
    assert 0 < (guess == truth).mean() < 1  # a report with some confusion in it
    counts = [[int(((truth == t) & (guess == p)).sum()) for p in range(5)] for t in range(5)]
    assert rep["confusion"] == counts
    for k, row in enumerate(rep["per_class"]):
        tp, support, predicted = counts[k][k], sum(counts[k]), sum(c[k] for c in counts)
        assert row["class"] == CLASSES[k] and row["support"] == support
        assert row["recall"] == pytest.approx(tp / support)
        assert row["precision"] == (pytest.approx(tp / predicted) if predicted else None)
        if row["precision"] and row["recall"]:
            assert row["f1"] == pytest.approx(2 * tp / (support + predicted))
        np.testing.assert_allclose(rep["confusion_normalised"][k], np.array(counts[k]) / support)
    off = sorted(((counts[t][p], t, p) for t in range(5) for p in range(5) if t != p and counts[t][p]),
                 key=lambda x: (-x[0], x[1], x[2]))
    assert [(c["count"], c["true"], c["predicted"]) for c in rep["most_confused"]] == \
        [(n, CLASSES[t], CLASSES[p]) for n, t, p in off[:10]]

    losses = -np.log(np.clip(probs[np.arange(23), truth], 1e-15, 1))
    top = rep["top_losses"]
    wrong = [i for i in np.argsort(-losses, kind="stable") if guess[i] != truth[i]]  # only the mistakes
    assert 0 < len(top) == min(6, len(wrong)) and [t["position"] for t in top] == wrong[:6]
    np.testing.assert_allclose([t["loss"] for t in top], losses[wrong[:6]], rtol=1e-4)
    assert all(t["true"] == CLASSES[truth[t["position"]]] != t["predicted"] for t in top)

    confidence, correct = probs.max(1), guess == truth
    ece = sum(((confidence > lo) & (confidence <= lo + 1 / 15)).sum() / 23 *
              abs(correct[(confidence > lo) & (confidence <= lo + 1 / 15)].mean() -
                  confidence[(confidence > lo) & (confidence <= lo + 1 / 15)].mean())
              for lo in np.arange(15) / 15 if ((confidence > lo) & (confidence <= lo + 1 / 15)).any())
    assert rep["calibration"]["ece"] == pytest.approx(ece, abs=1e-4)
    assert sum(b["count"] for b in rep["calibration"]["bins"]) == 23

    page = (out / "report.html").read_text()
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert page.count("<img") == 3 + len(top)  # two confusion matrices, the reliability diagram, the top losses
    for name in ("confusion", "confusion_normalised", "reliability"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(name in page for name in CLASSES)


def test_report_refuses_unlabelled_input_and_bad_epoch(run, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    import cv2
    cv2.imwrite(str(folder / "a.png"), np.zeros((16, 16, 3), np.uint8))
    assert predict_main(["report", str(run / "ft"), "3", str(folder), "--out", str(tmp_path / "r")]) == 2
    assert "the report needs labels" in capsys.readouterr().err
    assert predict_main(["report", str(run / "ft"), "x", str(run / "s_val.rec"), "--out", str(tmp_path / "r")]) == 2
    assert "expected a number or 'latest'" in capsys.readouterr().err
    assert not (tmp_path / "r" / "report.html").exists()


# ---- LR finder -----------------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict:
    import hashlib
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def test_lr_find_changes_nothing_on_disk_and_its_suggestion_trains(tmp_path, capsys):
    from train.__main__ import main as train_main
    d = tmp_path
    tiny_vgg_checkpoint(d / "pre", num_classes=4)
    write_rec(d / "s_train.rec", 4, 40, class_names=CLASSES[:4])
    write_rec(d / "s_val.rec", 4, 10, seed=5)
    before = _snapshot(d)
    assert train_main(["lr-find", "--pretrained-model", str(d / "pre"), "--data-train", str(d / "s_train.rec"),
                       "--model-prefix", str(d / "ft"), "--batch-size", "16", "--num-batches", "60",
                       "--start-lr", "1e-5", "--end-lr", "1000", "--lr-mult", "^conv1_=0", "--no-progress"]) == 0
    assert "Suggested --lr" in capsys.readouterr().out
    after = _snapshot(d)
    assert set(after) - set(before) == {"ft-lr-find.png", "ft-lr-find.json"}  # no checkpoint, config or sidecar
    assert {k: after[k] for k in before} == before  # the pretrained model and the data untouched
    found = json.loads((d / "ft-lr-find.json").read_text())
    assert found["stopped"].startswith("diverged") and len(found["lrs"]) < 60  # 1000 is far too high
    assert found["frozen"] == ["conv1_1_weight", "conv1_1_bias"]  # the same --lr-mult rules as training
    assert found["lrs"][0] == pytest.approx(1e-5) and np.all(np.diff(found["lrs"]) > 0)
    lr = found["suggested_lr"]
    assert lr == pytest.approx(found["min_loss_lr"] / 10) and 1e-5 < lr < 1000

    def train(rate, prefix, epochs):
        return fit(TrainConfig(pretrained_model=str(d / "pre"), data_train=str(d / "s_train.rec"),
                               data_val=str(d / "s_val.rec"), model_prefix=str(d / prefix), num_epochs=epochs,
                               lr=rate, batch_size=16, progress=False, lr_mult=["^conv1_=0"])).metrics
    good = train(lr, "good", 6)
    assert good[-1]["val_accuracy"] >= 0.9  # chance 0.25
    assert good[-1]["train_loss"] < 0.6 * good[0]["train_loss"] < 0.6 * found["smoothed"][0]
    bad = train(lr * 100, "bad", 3)  # where the sweep's loss was rising: does not learn
    assert bad[-1]["val_accuracy"] <= 0.5


def test_lr_find_from_a_checkpoint_with_load_epoch(run, tmp_path, capsys):
    """--load-epoch starts the sweep from MODEL_PREFIX-NNNN (the next stage's rate), leaving it untouched."""
    from train.lr_find import main as lr_find_main
    before = _snapshot(run)
    out = tmp_path / "next-stage.png"
    assert lr_find_main(["--data-train", str(run / "s_train.rec"), "--model-prefix", str(run / "ft"),
                         "--load-epoch", "3", "--num-epochs", "4", "--batch-size", "16", "--num-batches", "12",
                         "--out", str(out)]) == 0
    assert "Suggested --lr" in capsys.readouterr().out
    assert _snapshot(run) == before
    found = json.loads(out.with_suffix(".json").read_text())
    assert len(found["lrs"]) == 12 and found["frozen"] == []
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
