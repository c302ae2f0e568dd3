"""train.predict: Kaggle CSV in class-map order, top-k, mirror TTA, .rec/.lst/folder inputs agree, evaluate;
probabilities checked against stock Module on independently decoded and preprocessed images."""
from __future__ import annotations

import csv
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import mxnet as mx
import numpy as np
import pytest

from recbuild.classmap import write_class_map
from recbuild.config import PackConfig
from recbuild.images import decode, encode, transform
from symbols.sidecar import load_sidecar, save_sidecar
from tests._pack_fixtures import pack_tree
from tests._train_fixtures import class_image, tiny_vgg_checkpoint, write_rec
from train.config import TrainConfig
from train.data import DataError, iterator_view
from train.fit import fit
from train.predict import PredictError, build_parser, evaluate, load_model, predict
from train.predict.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["zebra", "apple", "mango", "kiwi"]  # not alphabetical: columns must follow the class map


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    tiny_vgg_checkpoint(d / "pre")
    write_rec(d / "s_train.rec", 4, 40, class_names=CLASSES)
    # the validation set, three ways: .rec (+ .lst beside it), an image folder, and the .lst alone
    rng = np.random.RandomState(7)
    rec = mx.recordio.MXIndexedRecordIO(str(d / "s_val.idx"), str(d / "s_val.rec"), "w")
    lines = []
    for i in range(14):
        label = i % 4
        img = class_image(label, 4, 16, rng)
        rel = f"{CLASSES[label]}/img{i:02d}.png"
        (d / "images" / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / "images" / rel), img)
        rec.write_idx(i, mx.recordio.pack_img(mx.recordio.IRHeader(0, float(label), i, 0), img, img_fmt=".png"))
        lines.append(f"{i}\t{label}.000000\t{rel}\n")
    rec.close()
    (d / "s_val.lst").write_text("".join(lines))
    fit(TrainConfig(pretrained_model=str(d / "pre"), data_train=str(d / "s_train.rec"), model_prefix=str(d / "ft"),
                    num_epochs=3, lr=0.05, batch_size=16, progress=False, lr_step_epochs=(2,), lr_factor=0.5))
    return d


def read_csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], {r[0]: np.array([float(v) for v in r[1:]]) for r in rows[1:]}


def stock_probs(d: Path, paths, mirror=False):
    """Independent path: cv2 decode -> RGB -> Preprocess.apply -> stock Module."""
    pre = load_sidecar(d / "ft")
    x = pre.apply(np.stack([cv2.imread(str(p))[:, :, ::-1] for p in paths]))
    mod = mx.mod.Module.load(str(d / "ft"), 3, label_names=["softmax_label"])
    mod.bind(data_shapes=[("data", x.shape)], label_shapes=[("softmax_label", (len(x),))], for_training=False)
    out = 0
    for view in ([x, x[:, :, :, ::-1]] if mirror else [x]):
        mod.forward(mx.io.DataBatch([mx.nd.array(view.copy())], [mx.nd.zeros(len(x))]), is_train=False)
        out = out + mod.get_outputs()[0].asnumpy()
    return out / (2 if mirror else 1)


def test_rec_prediction_csv(trained, tmp_path):
    model = load_model(str(trained / "ft"), 3, batch_size=8)  # 14 images: the last batch is padded
    summary = predict(model, trained / "s_val.rec", tmp_path / "p.csv", top_k=2, progress=False)
    header, rows = read_csv(tmp_path / "p.csv")
    assert header == ["id"] + CLASSES and summary["images"] == 14
    assert sorted(rows) == sorted(f"img{i:02d}" for i in range(14))  # ids: the .lst's file stems
    paths = [trained / "images" / f"{CLASSES[i % 4]}/img{i:02d}.png" for i in range(14)]
    expected = stock_probs(trained, paths)
    got = np.stack([rows[f"img{i:02d}"] for i in range(14)])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1, atol=1e-4)
    topk_header, *topk = list(csv.reader(open(tmp_path / "p.topk.csv")))
    assert topk_header == ["id", "label_1", "label_2", "prob_1", "prob_2"]
    for row in topk:
        probs = rows[row[0]]
        assert row[1] == CLASSES[int(probs.argmax())] and float(row[3]) >= float(row[4])


def test_the_progress_bar_has_a_total_and_an_eta_for_every_input_form(trained, tmp_path, capsys):
    model = load_model(str(trained / "ft"), 3, batch_size=8)
    for source, root in ((trained / "s_val.rec", None), (trained / "s_val.lst", trained / "images"),
                         (trained / "images", None)):
        n = predict(model, source, tmp_path / "p.csv", root=root, progress=True)["images"]
        bar = capsys.readouterr().err.strip().split("\r")[-1]  # the bar's last state
        assert "100%|" in bar and f"| {n}/{n} [" in bar and "<00:00" in bar, (source, bar)  # done, elapsed<ETA


def test_folder_list_and_rec_agree_and_mirror_tta(trained, tmp_path):
    model = load_model(str(trained / "ft"), 3, batch_size=8)
    predict(model, trained / "s_val.rec", tmp_path / "rec.csv", progress=False)
    predict(model, trained / "images", tmp_path / "dir.csv", progress=False, id_mode="path")
    predict(model, trained / "s_val.lst", tmp_path / "lst.csv", root=trained / "images", progress=False)
    _, rec = read_csv(tmp_path / "rec.csv")
    _, folder = read_csv(tmp_path / "dir.csv")
    _, lst = read_csv(tmp_path / "lst.csv")
    assert sorted(folder) == sorted(f"{CLASSES[i % 4]}/img{i:02d}.png" for i in range(14))
    for key, probs in folder.items():
        np.testing.assert_allclose(probs, rec[Path(key).stem], atol=2e-5)
        np.testing.assert_allclose(lst[Path(key).stem], rec[Path(key).stem], atol=2e-5)
    predict(model, trained / "s_val.rec", tmp_path / "m.csv", mirror=True, progress=False)
    _, mirrored = read_csv(tmp_path / "m.csv")
    paths = [trained / "images" / f"{CLASSES[i % 4]}/img{i:02d}.png" for i in range(14)]
    expected = stock_probs(trained, paths, mirror=True)
    np.testing.assert_allclose(np.stack([mirrored[f"img{i:02d}"] for i in range(14)]), expected, atol=2e-5)


def test_evaluate_matches_the_csv(trained, tmp_path):
    model = load_model(str(trained / "ft"), 3, batch_size=8)
    result = evaluate(model, trained / "s_val.rec", top_k=2)
    predict(model, trained / "s_val.rec", tmp_path / "p.csv", progress=False)
    _, rows = read_csv(tmp_path / "p.csv")
    probs = np.stack([rows[f"img{i:02d}"] for i in range(14)])
    labels = np.arange(14) % 4
    assert result["images"] == 14
    assert result["accuracy"] == pytest.approx((probs.argmax(1) == labels).mean())
    assert result["accuracy"] >= 0.75  # chance 0.25
    expected_loss = -np.mean(np.log(np.clip(probs[np.arange(14), labels], 1e-15, 1)))
    assert result["log_loss"] == pytest.approx(expected_loss, rel=1e-3)
    top2 = np.argsort(-probs, axis=1)[:, :2]
    assert result["top_2_accuracy"] == pytest.approx((top2 == labels[:, None]).any(1).mean())
    assert set(result["per_class_accuracy"]) == set(CLASSES)


def test_cli_and_errors(trained, tmp_path, capsys):
    out = tmp_path / "cli.csv"
    done = subprocess.run([sys.executable, "-m", "train.predict", str(trained / "ft"), "3", str(trained / "s_val.rec"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Predicted 14 images" in done.stdout and out.is_file() and (tmp_path / "cli.topk.csv").is_file()
    assert main(["evaluate", str(trained / "ft"), "latest", str(trained / "s_val.rec"), "--top-k", "2"]) == 0
    assert "14 images, accuracy" in capsys.readouterr().out
    bad = tmp_path / "imgs"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    assert main([str(trained / "ft"), "3", str(bad), "--out", str(tmp_path / "x.csv")]) == 2
    assert "broken.jpg: cannot decode image" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
    with pytest.raises(PredictError, match=r"nothere-symbol.json: checkpoint file missing"):
        load_model(str(trained / "nothere"), 3)
    with pytest.raises(PredictError, match=r"ft-0009.params: checkpoint file missing"):
        load_model(str(trained / "ft"), 9)



def test_cli_parser_forms(capsys):
    """build_parser: the predict form needs --out; the evaluate form (after the word `evaluate`) does not and
    has its own --top-k default; both keep the epoch as given ('latest' is resolved by main)."""
    pred = build_parser().parse_args(["m", "latest", "v.rec", "--out", "p.csv", "--mirror"])
    assert (pred.prefix, pred.epoch, pred.data, pred.out, pred.top_k, pred.mirror, pred.id_mode) == (
        "m", "latest", Path("v.rec"), Path("p.csv"), 3, True, "auto")
    ev = build_parser(evaluating=True).parse_args(["m", "2", "v.rec", "--json", "m.json"])
    assert (ev.epoch, ev.top_k, ev.json, ev.classes) == ("2", 5, Path("m.json"), None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["m", "2", "v.rec"])
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser(evaluating=True).parse_args(["m", "2", "v.rec", "--out", "p.csv"])


def test_cli_classes_names_a_model_without_names_and_never_relabels_one(trained, tmp_path, capsys):
    """One class-name rule (symbols.classes.model_class_names, as tools.deploy): --classes, a class map or a
    .lst beside one, names the columns of a model whose sidecar has none; for a model with names it must agree."""
    tiny_vgg_checkpoint(tmp_path / "conv", num_classes=4)  # a converted model: its sidecar names no classes
    out = tmp_path / "p.csv"
    assert main([str(tmp_path / "conv"), "0", str(trained / "s_val.rec"), "--out", str(out),
                 "--classes", str(trained / "s_val.lst")]) == 0  # finds s.classes.json beside the list
    assert read_csv(out)[0] == ["id"] + CLASSES
    assert main([str(tmp_path / "conv"), "0", str(trained / "s_val.rec"), "--out", str(out)]) == 0
    assert read_csv(out)[0] == ["id"] + [f"class_{i}" for i in range(4)]
    capsys.readouterr()
    write_class_map(tmp_path / "other", list(reversed(CLASSES)))
    relabelled = tmp_path / "r.csv"
    assert main([str(trained / "ft"), "3", str(trained / "s_val.rec"), "--out", str(relabelled),
                 "--classes", str(tmp_path / "other.classes.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ft-preprocess.json" in err and "other.classes.json" in err
    assert not relabelled.exists()
    capsys.readouterr()
    write_class_map(tmp_path / "three", CLASSES[:3])
    assert main([str(tmp_path / "conv"), "0", str(trained / "s_val.rec"), "--out", str(relabelled),
                 "--classes", str(tmp_path / "three.classes.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "three.classes.json" in err and "conv-preprocess.json" in err
    assert "4 outputs but the class map has 3 classes" in err

# ---- one preprocessing truth: a .rec packed larger than the input, its .lst and its raw folder ------------------
@pytest.fixture(scope="module", params=[(24, False, -1, 1), (20, True, -1, 1), (0, False, 18, 1), (24, False, -1, 0)],
                ids=["short-edge-24", "centre-cropped-20", "kept-size+iterator-resize-18", "greyscale-24"])
def packed_larger(request, tmp_path_factory):
    """Raw images of assorted sizes packed by recbuild (.png) larger than the 16x16 model input: (pack --resize,
    --center-crop, the trainer's --resize, pack --color)."""
    resize, center_crop, iterator_resize, color = request.param
    d = tmp_path_factory.mktemp("packed")
    tiny_vgg_checkpoint(d / "pre")
    cfg = PackConfig(resize=resize, center_crop=center_crop, color=color, encoding=".png", quality=3, workers=1,
                     progress=False)
    pack_tree(d, "q_train", CLASSES, 8, cfg)
    pack_tree(d, "q_val", CLASSES, 3, cfg, seed=5)
    fit(TrainConfig(pretrained_model=str(d / "pre"), data_train=str(d / "q_train.rec"),
                    data_val=str(d / "q_val.rec"), model_prefix=str(d / "ft"), num_epochs=2, lr=0.05, batch_size=8,
                    progress=False, resize=iterator_resize, random_crop=True))
    return d, cfg, iterator_resize


def test_rec_lst_and_folder_give_the_same_probabilities_when_packed_larger(packed_larger, tmp_path):
    d, cfg, iterator_resize = packed_larger
    pre = load_sidecar(d / "ft")
    # the trainer recorded how its data was packed and resized
    assert (pre.packing["pack"]["resize"], pre.packing["pack"]["center_crop"]) == (cfg.resize, cfg.center_crop)
    assert pre.packing["iterator_resize"] == iterator_resize
    model = load_model(str(d / "ft"), 2, batch_size=5)
    predict(model, d / "q_val.rec", tmp_path / "rec.csv", progress=False)
    predict(model, d / "q_val.lst", tmp_path / "lst.csv", root=d / "images", progress=False)
    predict(model, d / "images", tmp_path / "dir.csv", progress=False)
    _, rec = read_csv(tmp_path / "rec.csv")
    _, lst = read_csv(tmp_path / "lst.csv")
    _, folder = read_csv(tmp_path / "dir.csv")
    val = {k: v for k, v in folder.items() if k.startswith("q_val")}
    assert sorted(rec) == sorted(lst) == sorted(val) and len(rec) == 12
    # 1e-4: the records are lossless PNG, so the only possible difference is the packer's re-encoding; with
    # .jpg records JPEG loss would add its own error on top (the only allowed source of difference).
    for key in rec:
        np.testing.assert_allclose(lst[key], rec[key], atol=1e-4)
        np.testing.assert_allclose(val[key], rec[key], atol=1e-4)
    # The independent path: cv2 decode -> im2rec's documented geometry (centre square, short edge R, long edge
    # long * R // short, INTER_AREA to shrink) -> centre crop 16 -> Preprocess.apply -> stock Module.
    images = []
    for key in sorted(rec):
        raw = cv2.imread(str(next((d / "images").rglob(f"{key}.png"))))
        if cfg.color == 0:  # packed grey; ImageRecordIter decodes it to three equal channels
            raw = cv2.cvtColor(cv2.cvtColor(raw, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
        h, w = raw.shape[:2]
        if cfg.center_crop:
            side = min(h, w)
            raw = raw[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
            h = w = side
        short = iterator_resize if iterator_resize > 0 else cfg.resize
        size = (short, h * short // w) if h > w else (w * short // h, short)
        small = cv2.resize(raw, size, interpolation=cv2.INTER_AREA if cfg.resize else cv2.INTER_LINEAR)
        top, left = (small.shape[0] - 16) // 2, (small.shape[1] - 16) // 2
        images.append(small[top:top + 16, left:left + 16, ::-1])
    x = pre.apply(np.stack(images))
    mod = mx.mod.Module.load(str(d / "ft"), 2, label_names=["softmax_label"])
    mod.bind(data_shapes=[("data", x.shape)], label_shapes=[("softmax_label", (len(x),))], for_training=False)
    mod.forward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.zeros(len(x))]), is_train=False)
    # recbuild averages on the exact source grid (its own INTER_AREA variant): a few grey levels of difference.
    np.testing.assert_allclose(np.stack([rec[k] for k in sorted(rec)]), mod.get_outputs()[0].asnumpy(), atol=0.02)


def test_mirror_tta_with_a_mean_image_equals_predicting_the_mirrored_raw_images(trained, tmp_path):
    d = tmp_path
    tiny_vgg_checkpoint(d / "m", num_classes=4)
    pre = load_sidecar(d / "m")
    np.save(d / "m-mean.npy", np.random.RandomState(1).uniform(60, 180, pre.input_shape).astype(np.float32))
    save_sidecar(d / "m", replace(pre, mean="m-mean.npy"))
    flipped = d / "flipped"
    for path in (trained / "images").rglob("*.png"):
        (flipped / path.parent.name).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(flipped / path.parent.name / path.name), cv2.imread(str(path))[:, ::-1])
    model = load_model(str(d / "m"), 0, batch_size=8)
    predict(model, trained / "images", d / "tta.csv", mirror=True, progress=False, id_mode="path")
    predict(model, trained / "images", d / "plain.csv", progress=False, id_mode="path")
    predict(model, flipped, d / "flip.csv", progress=False, id_mode="path")
    _, tta = read_csv(d / "tta.csv")
    _, plain = read_csv(d / "plain.csv")
    _, flip = read_csv(d / "flip.csv")
    for key in tta:
        np.testing.assert_allclose(tta[key], (plain[key] + flip[key]) / 2, atol=1e-5)
    # the same through a .rec (ImageRecordIter + the mean-image step)
    predict(model, trained / "s_val.rec", d / "rec_tta.csv", mirror=True, progress=False)
    _, rec_tta = read_csv(d / "rec_tta.csv")
    for key in tta:
        np.testing.assert_allclose(rec_tta[Path(key).stem], tta[key], atol=1e-5)


def test_test_data_with_another_class_map_is_refused(trained, tmp_path):
    lst = tmp_path / "other_test.lst"
    lst.write_text((trained / "s_val.lst").read_text())
    write_class_map(tmp_path / "other", list(reversed(CLASSES)))
    model = load_model(str(trained / "ft"), 3, batch_size=8)
    with pytest.raises(DataError) as err:
        predict(model, lst, tmp_path / "x.csv", root=trained / "images", progress=False)
    assert "other.classes.json" in str(err.value) and "label 0: 'zebra' vs 'kiwi'" in str(err.value)
    assert not (tmp_path / "x.csv").exists()
    with pytest.raises(DataError, match="label 0: 'zebra' vs 'kiwi'"):
        load_model(str(trained / "ft"), 3, classes_file=str(tmp_path / "other.classes.json"))


def test_with_jpeg_records_the_only_difference_is_the_re_encoding(tmp_path):
    """A .jpg pack: raw files differ from their records by the JPEG loss alone. Re-encoding the transformed raw
    image with the pack's own encoder and quality (recbuild.images.encode) and decoding it gives the record's
    probabilities to 1e-4, while skipping the re-encode, as predict does, leaves the loss visible."""
    d = tmp_path
    tiny_vgg_checkpoint(d / "pre")
    cfg = PackConfig(resize=24, encoding=".jpg", quality=90, workers=1, progress=False)
    pack_tree(d, "j_train", CLASSES, 8, cfg)
    pack_tree(d, "j_val", CLASSES, 3, cfg, seed=5)
    fit(TrainConfig(pretrained_model=str(d / "pre"), data_train=str(d / "j_train.rec"), model_prefix=str(d / "ft"),
                    num_epochs=2, lr=0.05, batch_size=8, progress=False))
    model = load_model(str(d / "ft"), 2, batch_size=12)
    predict(model, d / "j_val.rec", d / "rec.csv", progress=False)
    predict(model, d / "j_val.lst", d / "lst.csv", root=d / "images", progress=False)
    _, rec = read_csv(d / "rec.csv")
    _, lst = read_csv(d / "lst.csv")
    keys = sorted(rec)
    images = []
    for key in keys:
        path = next((d / "images").rglob(f"{key}.png"))
        packed = transform(decode(path.read_bytes(), str(path), cfg), cfg.resize, cfg.center_crop)
        again = cv2.imdecode(np.frombuffer(encode(packed, cfg.encoding, cfg.quality), np.uint8), cv2.IMREAD_COLOR)
        images.append(iterator_view(again, model.pre.input_shape)[:, :, ::-1])
    model.module.forward(mx.io.DataBatch([mx.nd.array(model.pre.apply(np.stack(images)))]), is_train=False)
    re_encoded = model.module.get_outputs()[0].asnumpy()
    np.testing.assert_allclose(re_encoded, np.stack([rec[k] for k in keys]), atol=1e-4)
    assert max(np.abs(lst[k] - rec[k]).max() for k in keys) > 1e-3  # the JPEG loss itself, not re-applied
