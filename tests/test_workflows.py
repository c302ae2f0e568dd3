"""Acceptance: the five field workflows of WORKFLOWS.md, each from its raw layout to the file it must end with.

Small data made here (tiny images whose colours encode the class, a few per class), tiny networks (the recipes'
converted-looking small net, a reduced Caffe VGG16), one or two epochs: each test checks the workflow's steps run
as documented commands and its output has the header, ids and row count the competition expects. The images of
train/ and test/ differ by construction, so a test set packed from the wrong folder is caught pixel for pixel.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from typing import Dict, List, Sequence

import cv2
import mxnet as mx
import numpy as np
import pytest

from recbuild.cli import main as recbuild_main
from tests._recipes_fixtures import small_net_checkpoint
from tests._train_fixtures import class_image
from train.__main__ import main as train_main
from train.predict.cli import main as predict_main
from train.recipes.__main__ import main as recipes_main

SIZE = 16
# Every run is one or two epochs of a few images: what is checked is the files, not the accuracy.
FAST = ["--batch-size", "4", "--no-progress", "--data-nthreads", "1", "--lr-step-epochs", "100"]


def _write_images(folder: Path, names_labels: Dict[str, int], num_classes: int, seed: int, test: bool = False):
    """One image per name; a test image is the class pattern colour-inverted, so it never equals a train image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for name, label in names_labels.items():
        img = class_image(label, num_classes, SIZE, rng)
        cv2.imwrite(str(folder / name), 255 - img if test else img)


def _recbuild(*args) -> None:
    assert recbuild_main([*map(str, args)]) == 0


def _records(rec: Path) -> Dict[int, np.ndarray]:
    """Record id -> decoded BGR image, read with stock MXNet."""
    reader = mx.recordio.MXIndexedRecordIO(str(rec.with_suffix(".idx")), str(rec), "r")
    out = {}
    for key in reader.keys:
        header, img = mx.recordio.unpack_img(reader.read_idx(key))
        out[int(header.id)] = img
    reader.close()
    return out


def _rows(path: Path, delimiter: str = ",") -> List[List[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle, delimiter=delimiter))


def _hex_ids(n: int, salt: int) -> List[str]:
    return [f"{(i + 1) * 2654435761 + salt:010x}"[-10:] for i in range(n)]


# ---- 1. Kaggle dog breeds: labels.csv (BOM, CRLF) + flat train/ + flat test/, two fused backbones ----------------
@pytest.mark.slow
def test_kaggle_dog_breeds_fused_backbones_to_probability_submission(tmp_path):
    breeds = ["beagle", "chow", "pug"]                      # sample_submission.csv's columns: sorted names
    train_ids, test_ids = _hex_ids(18, 7), _hex_ids(6, 99)
    labels = {i: k % 3 for k, i in enumerate(train_ids)}
    _write_images(tmp_path / "train", {f"{i}.jpg": c for i, c in labels.items()}, 3, seed=1)
    _write_images(tmp_path / "test", {f"{i}.jpg": k % 3 for k, i in enumerate(test_ids)}, 3, seed=2, test=True)
    (tmp_path / "labels.csv").write_bytes(  # saved by a spreadsheet: UTF-8 BOM, CRLF
        ("\ufeffid,breed\r\n" + "".join(f"{i},{breeds[c]}\r\n" for i, c in labels.items())).encode("utf-8"))
    out = tmp_path / "rec" / "dogs"
    out.parent.mkdir()
    _recbuild("--list", "--labels", tmp_path / "labels.csv", "--stratify", "--train-ratio", "0.9", out,
              tmp_path / "train")
    _recbuild("--list", "--unlabelled", out, tmp_path / "test")
    _recbuild("--resize", SIZE, "--num-thread", "1", "--no-progress", out, tmp_path / "train")  # every list
    assert len(_records(Path(f"{out}_val.rec"))) == 3       # valid ratio 0.1 per breed: one of six each
    assert len(_records(Path(f"{out}_test.rec"))) == 6      # packed from test/, not train/

    for k, shape in enumerate([(3, SIZE, SIZE), (3, SIZE, SIZE)]):   # two backbones, run once over all images
        small_net_checkpoint(tmp_path / f"backbone{k}", input_shape=shape, seed=k)
    assert recipes_main(["fuse", "--model", str(tmp_path / "backbone0"), "--model", str(tmp_path / "backbone1"),
                         "--out", str(tmp_path / "fused")]) == 0
    assert recipes_main(["features", "--pretrained-model", str(tmp_path / "fused"), "--data-train",
                         f"{out}_train.rec", "--data-val", f"{out}_val.rec", "--model-prefix", str(tmp_path / "head"),
                         "--hidden", "8", "--hidden-dropout", "0.7", "--optimizer", "adam", "--lr", "1e-3",
                         "--wd", "1e-4", "--num-epochs", "2", "--cache-dir", str(tmp_path / "cache"), *FAST]) == 0
    assert predict_main([str(tmp_path / "head"), "latest", f"{out}_test.rec", "--out",
                         str(tmp_path / "submission.csv")]) == 0
    rows = _rows(tmp_path / "submission.csv")
    assert rows[0] == ["id"] + sorted(breeds)
    assert sorted(r[0] for r in rows[1:]) == sorted(test_ids)   # every test id, no suffix, once
    probs = np.array([[float(p) for p in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-4)


# ---- 2. Baidu dogs: `<id> <typeid>` train.txt, two models averaged, pseudo-labels, `<typeid>\t<id>` output -------
@pytest.mark.slow
def test_baidu_dogs_ensemble_and_pseudo_labels_to_typeid_tab_id_lines(tmp_path):
    type_ids = ["3", "17", "42"]                             # not contiguous, must come back as they are
    train_ids, test_ids = _hex_ids(18, 5), _hex_ids(6, 77)
    labels = {i: k % 3 for k, i in enumerate(train_ids)}
    _write_images(tmp_path / "train", {f"{i}.jpg": c for i, c in labels.items()}, 3, seed=3)
    _write_images(tmp_path / "test", {f"{i}.jpg": k % 3 for k, i in enumerate(test_ids)}, 3, seed=4, test=True)
    (tmp_path / "train.txt").write_text("".join(f"{i} {type_ids[c]}\n" for i, c in labels.items()))
    out = tmp_path / "baidu"
    assert recbuild_main(["--list", "--labels", str(tmp_path / "train.txt"), str(out), str(tmp_path / "train")]) == 1
    _recbuild("--list", "--labels", tmp_path / "train.txt", "--delimiter", "space", "--no-header", "--stratify",
              "--train-ratio", "0.9", out, tmp_path / "train")
    _recbuild("--list", "--unlabelled", out, tmp_path / "test")
    _recbuild("--resize", SIZE, "--num-thread", "1", "--no-progress", out, tmp_path / "train")
    base = small_net_checkpoint(tmp_path / "backbone", num_classes=5)
    models = []
    for k in range(2):                                       # stage 1: the new head only, two seeds
        prefix = tmp_path / f"m{k}"
        assert train_main(["--pretrained-model", str(base), "--data-train", f"{out}_train.rec", "--data-val",
                           f"{out}_val.rec", "--model-prefix", str(prefix), "--num-epochs", "1", "--seed", str(k),
                           "--lr-mult", "^conv=0", "--optimizer", "adam", "--lr", "1e-3", "--random-mirror", "1",
                           *FAST]) == 0
        models += ["--model", f"{prefix}:1"]
    baidu = ["--format", "label", "--columns", "label,id", "--delimiter", "tab", "--no-header"]
    assert recipes_main(["ensemble", *models, "--val", f"{out}_val.rec", "--test", f"{out}_test.rec", "--out",
                         str(tmp_path / "ensemble.txt"), "--batch-size", "4", *baidu]) == 0
    lines = (tmp_path / "ensemble.txt").read_text().splitlines()
    fields = [line.split("\t") for line in lines]
    assert len(lines) == 6 and all(len(f) == 2 and f[0] in type_ids for f in fields)
    assert sorted(f[1] for f in fields) == sorted(test_ids)
    # predict writes the same ids (in the same order) as the ensemble
    assert predict_main([str(tmp_path / "m0"), "1", f"{out}_test.rec", "--out", str(tmp_path / "m0.csv")]) == 0
    assert [r[0] for r in _rows(tmp_path / "m0.csv")[1:]] == [f[1] for f in fields]
    assert recipes_main(["pseudo", str(tmp_path / "m0"), "1", "--test", f"{out}_test.rec", "--threshold", "0.01",
                         "--out-prefix", str(tmp_path / "pl"), "--batch-size", "4", "--out",
                         str(tmp_path / "pseudo.txt"), *baidu]) == 0
    pseudo = [line.split("\t") for line in (tmp_path / "pseudo.txt").read_text().splitlines()]
    assert [f[1] for f in pseudo] == [f[1] for f in fields] and all(f[0] in type_ids for f in pseudo)
    assert json.loads((tmp_path / "pl-pseudo.json").read_text())["added"] == 6


# ---- 3. BOT 2016: im2rec lists of class folders, a Caffe VGG16, stock-loadable checkpoints ---------------------
@pytest.mark.slow
def test_bot_im2rec_lists_caffe_vgg_fine_tuned_to_stock_checkpoints(tmp_path):
    from tests._caffe_nets import make_tiny_vgg
    from tools.caffe_converter.cli import main as convert_main
    classes = ["bird", "cat", "dog"]
    rng = np.random.RandomState(5)
    for c, name in enumerate(classes):
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        for i in range(6):
            cv2.imwrite(str(folder / f"{i}{'.png' if i % 2 else '.jpg'}"), class_image(c, 3, 32, rng))
        (folder / "anim.gif").write_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")  # not in --exts
    # PREFIX ROOT first: --exts takes every word after it (im2rec's argparse does the same)
    _recbuild(tmp_path / "bot", tmp_path / "data", "--list", "--train-ratio", "0.8", "--recursive", "--exts", ".jpg",
              ".jpeg", ".png")
    for split in ("val", "train"):                           # a .lst as the prefix, as the post does
        _recbuild("--resize", "32", "--quality", "100", "--num-thread", "1", "--no-progress",
                  tmp_path / f"bot_{split}.lst", tmp_path / "data")
    prototxt, caffemodel = make_tiny_vgg(tmp_path / "caffe", num_classes=10, input_size=32, fc_width=16, fmt="v1")
    assert convert_main([str(prototxt), str(caffemodel), str(tmp_path / "vgg16"), "--mean", "104,117,123"]) == 0
    assert train_main(["--pretrained-model", str(tmp_path / "vgg16"), "--data-train", str(tmp_path / "bot_train.rec"),
                       "--data-val", str(tmp_path / "bot_val.rec"), "--model-prefix", str(tmp_path / "bot"),
                       "--lr-mult", "^conv=0.01", "--lr", "0.01", "--wd", "1e-4", "--random-crop", "1",
                       "--random-mirror", "1", "--disp-batches", "50", "--num-epochs", "1", *FAST]) == 0
    sym, args, aux = mx.model.load_checkpoint(str(tmp_path / "bot"), 1)   # stock MXNet loads it
    assert args["fc_weight"].shape[0] == 3 and "fc8_weight" not in args   # fc8 replaced by fine-tune.py's `fc`
    assert "softmax_label" in sym.list_arguments()                          # the post's label name
    mod = mx.mod.Module(sym)                                                # Module's default label_names
    mod.bind(data_shapes=[("data", (1, 3, 32, 32))], for_training=False)
    mod.set_params(args, aux)
    metrics = json.loads((tmp_path / "bot-metrics.json").read_text())["epochs"]
    assert [m["epoch"] for m in metrics] == [1] and "val_accuracy" in metrics[0]


# ---- 4. Kaggle CIFAR-10: numbered ids in both train/ and test/, a net from scratch, `id,label` in numeric order --
@pytest.mark.slow
def test_kaggle_cifar10_numbered_ids_pack_test_from_test_and_submit_id_label(tmp_path, capsys):
    classes = ["airplane", "cat", "dog"]
    labels = {i: (i - 1) % 3 for i in range(1, 19)}
    _write_images(tmp_path / "train", {f"{i}.png": c for i, c in labels.items()}, 3, seed=6)
    _write_images(tmp_path / "test", {f"{i}.png": i % 3 for i in range(1, 12)}, 3, seed=7, test=True)
    (tmp_path / "trainLabels.csv").write_text("id,label\n" + "".join(f"{i},{classes[c]}\n" for i, c in labels.items()))
    out = tmp_path / "cifar"
    _recbuild("--list", "--labels", tmp_path / "trainLabels.csv", "--stratify", "--train-ratio", "0.9", out,
              tmp_path / "train")
    _recbuild("--list", "--unlabelled", out, tmp_path / "test")
    # The natural command: every list, ROOT train/. The test list is packed from test/, the folder it was listed
    # from: each record is test/<id>.png pixel for pixel (lossless PNG), never train/<id>.png.
    _recbuild("--encoding", ".png", "--num-thread", "1", "--no-progress", out, tmp_path / "train")
    assert f"cifar_test.lst: packing from {tmp_path / 'test'}, the folder it was listed from" in capsys.readouterr().out
    test = _records(Path(f"{out}_test.rec"))
    assert sorted(test) == list(range(1, 12))
    for rid, img in test.items():
        assert np.array_equal(img, cv2.imread(str(tmp_path / "test" / f"{rid}.png")))
        assert not np.array_equal(img, cv2.imread(str(tmp_path / "train" / f"{rid}.png")))
    # Moved away, the test folder is not replaced by ROOT: the run refuses naming both.
    (tmp_path / "test").rename(tmp_path / "test-moved")
    assert recbuild_main([str(out) + "_test.lst", str(tmp_path / "train"), "--no-progress"]) == 1
    refusal = capsys.readouterr().err
    assert f"listed from {tmp_path / 'test'}, which no longer exists" in refusal and str(tmp_path / "train") in refusal
    (tmp_path / "test-moved").rename(tmp_path / "test")

    # The data report: the unlabelled test split has no classes; test/ given as --test-folder is its own split and
    # its files are not copies of their own records; another prefix's file is not a split.
    for ext in (".rec", ".idx"):
        shutil.copy(f"{out}_val{ext}", f"{out}test_test{ext}")
    _recbuild("report", out, "--test-folder", tmp_path / "test", "--no-html")
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert not any("cifartest" in r for r in report["recs"])
    splits = report["splits"]
    assert set(splits) == {"train", "val", "test", "test (folder)"}
    assert splits["test"]["labelled"] is False and splits["test"]["class_counts"] == []
    assert splits["test"]["empty_classes"] == [] and splits["test (folder)"]["records"] == 11
    assert splits["train"]["class_counts"] == [5, 5, 5] and splits["val"]["class_counts"] == [1, 1, 1]
    assert not [p for p in report["pairs"] if {p["a"]["split"], p["b"]["split"]} == {"test", "test (folder)"}]

    # A ResNet from scratch in the post; here the small net's architecture with --from-scratch, normalised with
    # the training images' own per-channel mean and std.
    pixels = np.stack([cv2.imread(str(tmp_path / "train" / f"{i}.png"))[:, :, ::-1] for i in labels]).reshape(-1, 3)
    mean, std = (",".join(f"{v:.3f}" for v in a) for a in (pixels.mean(0), pixels.std(0)))
    base = small_net_checkpoint(tmp_path / "resnet", num_classes=3, channel_order="RGB")
    assert train_main(["--pretrained-model", str(base), "--data-train", f"{out}_train.rec", "--data-val",
                       f"{out}_val.rec", "--model-prefix", str(tmp_path / "cifar-net"), "--num-epochs", "1",
                       "--from-scratch", "--mom", "0.9", "--wd", "5e-4", "--rgb-mean", mean, "--rgb-std", std,
                       *FAST]) == 0
    for source, name in ((f"{out}_test.rec", "rec.csv"), (str(tmp_path / "test"), "folder.csv")):
        assert predict_main([str(tmp_path / "cifar-net"), "1", source, "--out", str(tmp_path / name),
                             "--format", "label", "--sort", "numeric"]) == 0
    rows = _rows(tmp_path / "rec.csv")
    assert rows[0] == ["id", "label"] and [r[0] for r in rows[1:]] == [str(i) for i in range(1, 12)]
    assert all(r[1] in classes for r in rows[1:])
    assert _rows(tmp_path / "folder.csv") == rows            # the folder gives the same file (lossless PNG)
    # Listed under a prefix of its own, the test folder has an empty class map (no classes): predicted all the same.
    _recbuild("--list", "--unlabelled", tmp_path / "alone", tmp_path / "test")
    _recbuild("--encoding", ".png", "--num-thread", "1", "--no-progress", tmp_path / "alone", tmp_path / "test")
    assert predict_main([str(tmp_path / "cifar-net"), "1", str(tmp_path / "alone_test.rec"), "--out",
                         str(tmp_path / "alone.csv"), "--format", "label", "--sort", "numeric"]) == 0
    assert _rows(tmp_path / "alone.csv") == rows


# ---- 5. Food: train/<class>/ and test/<class>/, fine-tuning against the same net from scratch -------------------
@pytest.mark.slow
def test_food_fine_tuning_against_scratch_compares_test_accuracy_per_epoch(tmp_path):
    classes = ["bread", "dessert", "soup"]
    rng = np.random.RandomState(8)
    for split, per_class in (("train", 6), ("test", 3)):
        for c, name in enumerate(classes):
            folder = tmp_path / "food" / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                cv2.imwrite(str(folder / f"{split}{i}.jpg"), class_image(c, 3, 20, rng))
    for split in ("train", "test"):                          # already split: one list each, class folders
        prefix = tmp_path / f"food_{split}"
        _recbuild("--list", "--recursive", "--train-ratio", "1.0", prefix, tmp_path / "food" / split)
        _recbuild("--resize", "20", "--num-thread", "1", "--no-progress", prefix, tmp_path / "food" / split)
    base = small_net_checkpoint(tmp_path / "resnet", num_classes=3, channel_order="RGB")
    common = ["--data-train", str(tmp_path / "food_train.rec"), "--data-val", str(tmp_path / "food_test.rec"),
              "--random-resized-crop", "1", "--random-mirror", "1", "--lr", "0.01", "--wd", "0.001",
              "--num-epochs", "2", *FAST]
    runs = (("ft", base, ["--lr-mult", "^fc_=10"]), ("scratch", base, ["--from-scratch"]))
    for name, pretrained, extra in runs:
        assert train_main(["--pretrained-model", str(pretrained), "--model-prefix", str(tmp_path / name), *extra,
                           *common]) == 0
    table = {}
    for name in ("ft", "scratch"):
        epochs = json.loads((tmp_path / f"{name}-metrics.json").read_text())["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2]
        assert all({"train_loss", "train_accuracy", "val_accuracy", "val_loss", "seconds"} <= set(e) for e in epochs)
        table[name] = epochs[-1]["val_accuracy"]
        # the per-epoch test accuracy is the one `evaluate` gives for the checkpoint
        assert predict_main(["evaluate", str(tmp_path / name), "2", str(tmp_path / "food_test.rec"), "--json",
                             str(tmp_path / f"{name}.json")]) == 0
        assert json.loads((tmp_path / f"{name}.json").read_text())["accuracy"] == pytest.approx(table[name], abs=1e-6)
    assert set(table) == {"ft", "scratch"}


# ---- the pieces the workflows rest on, each against a hand-made reference ---------------------------------------
def test_submission_rows_sort_delimiter_header_and_columns():
    from train.predict.submission import SubmissionError, SubmissionFormat, submission_rows, submission_text
    names = ["10.png", "2.png", "1.png"]
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    classes = ["cat", "dog"]
    assert submission_rows(names, probs, classes) == [["id", "cat", "dog"], ["10", "0.1", "0.9"],
                                                      ["2", "0.8", "0.2"], ["1", "0.3", "0.7"]]
    numeric = SubmissionFormat(kind="label", sort="numeric")
    assert submission_rows(names, probs, classes, numeric) == [["id", "label"], ["1", "dog"], ["2", "cat"],
                                                               ["10", "dog"]]
    by_name = SubmissionFormat(kind="label", sort="name", header=False, label_first=True, delimiter="\t")
    rows = submission_rows(names, probs, classes, by_name)
    assert rows == [["dog", "1"], ["dog", "10"], ["cat", "2"]]
    assert submission_text(rows, by_name) == "dog\t1\ndog\t10\ncat\t2\n"
    with pytest.raises(SubmissionError, match="not integers, e.g. 'a1'"):
        submission_rows(["a1.jpg"], probs[:1], classes, numeric)


@pytest.mark.parametrize("text, flags, error", [
    ("a 3\nb  17 \nc 3\n", ["--delimiter", "space", "--no-header"], None),
    ("a\t3\nb\t17\nc\t3\n", ["--delimiter", "tab", "--no-header"], None),
    ("id\tlabel\na\t3\nb\t17\nc\t3\n", ["--delimiter", "tab"], None),
    ("a 3\nb 17\nc 3\n", [], ":1: expected 'id,label', got 'a 3'; the line looks space-separated: pass "
                              "--delimiter space"),
    ("a 3\nb 17\nc 3\n", ["--delimiter", "space"], ":1: the first row is data, not a header"),
    ("a 3\nb 17 x\nc 3\n", ["--delimiter", "space", "--no-header"], ":2: expected 'id,label' \\(2 fields"),
    ("a 3\nb 17\n", ["--delimiter", "space", "--no-header"], r"1 image\(s\) in .* without a row: 'c.png'"),
])
def test_labels_files_space_tab_headerless_with_the_same_strictness(tmp_path, capsys, text, flags, error):
    _write_images(tmp_path / "img", {"a.png": 0, "b.png": 1, "c.png": 0}, 2, seed=0)
    (tmp_path / "train.txt").write_text(text)
    code = recbuild_main(["--list", "--labels", str(tmp_path / "train.txt"), *flags, str(tmp_path / "l"),
                          str(tmp_path / "img")])
    if error:
        assert code == 1
        assert re.search(error, capsys.readouterr().err)
        return
    assert code == 0
    # the class map keeps the original type ids as the names, so predictions give them back
    assert json.loads((tmp_path / "l.classes.json").read_text())["classes"] == ["3", "17"]
    assert sorted((tmp_path / "l.lst").read_text().splitlines()) == ["0\t0.000000\ta.png", "1\t1.000000\tb.png",
                                                                     "2\t0.000000\tc.png"]


def test_top_losses_are_mistakes_only_or_none(tmp_path):
    from train.metrics import Tally
    from train.report import Collected, summarise
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    labels = np.array([0, 0, 1, 0])
    tally = Tally()
    tally.update(probs, labels.astype(np.float32))
    result = summarise(Collected(["a", "b", "c", "d"], probs, labels, tally, 0), ["x", "y"], top_losses=3)
    assert [t["name"] for t in result["top_losses"]] == ["d"]   # b's loss is second highest, but b is right
    right = np.array([0, 0, 1, 1])
    tally = Tally()
    tally.update(probs, right.astype(np.float32))
    assert summarise(Collected(list("abcd"), probs, right, tally, 0), ["x", "y"])["top_losses"] == []


def test_data_report_finds_the_splits_of_a_prefix_exactly(tmp_path):
    from recbuild.report import find_recs
    names = ["k.rec", "k_train.rec", "k_val.rec", "k_test.rec", "k_0_train.rec", "k_1.rec", "ktest_test.rec",
             "k_extra.rec", "k_train.rec.tmp", "k_train.idx"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_recs(str(tmp_path / "k"))] == sorted(
        ["k.rec", "k_train.rec", "k_val.rec", "k_test.rec", "k_0_train.rec", "k_1.rec"])
    assert [p.name for p in find_recs(str(tmp_path / "k_val.lst"))] == ["k_val.rec"]


def test_pack_root_follows_the_record_until_the_list_is_rewritten(tmp_path, caplog):
    from recbuild.listing import ListError, list_source_path, pack_root
    _write_images(tmp_path / "train", {"1.png": 0}, 2, seed=0)
    _write_images(tmp_path / "test", {"1.png": 0}, 2, seed=1, test=True)
    _recbuild("--list", "--unlabelled", tmp_path / "p", tmp_path / "test")
    lst = tmp_path / "p_test.lst"
    assert lst.read_text() == "1\t0.000000\t1.png\n"                  # im2rec's format, nothing added
    root, note = pack_root(lst, str(tmp_path / "train"))
    assert root == str(tmp_path / "test") and "packing from" in note
    assert pack_root(lst, str(tmp_path / "test")) == (str(tmp_path / "test"), None)
    lst.write_text("1\t0.000000\t1.png\n2\t0.000000\t1.png\n")     # rewritten by hand (or by im2rec.py)
    assert pack_root(lst, str(tmp_path / "train")) == (str(tmp_path / "train"), None)
    assert "rewritten since it was listed" in caplog.text
    list_source_path(lst).write_text("{}")
    with pytest.raises(ListError, match="not a list-source record"):
        pack_root(lst, str(tmp_path / "train"))
