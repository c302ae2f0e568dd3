"""train/data.py: labels from .rec headers (scanned once per file), the pack sidecar, ImageRecordIter set up from
the sidecar compared with an independent numpy pipeline (mx.recordio decode + Preprocess.apply), its
validation geometry reproduced for raw images, class maps, and the start-up checks."""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import mxnet as mx

from recbuild.config import PackConfig
from symbols.sidecar import Preprocess
from tests._pack_fixtures import write_pack_sidecar
from tests._train_fixtures import tiny_vgg_checkpoint, write_rec
from train import recfile
from train.config import TrainConfig
from train.data import (DataError, PackTransform, iterator_view, pack_transform, plan_input, record_iter,
                        resolve_classes, scan_headers, scan_labels)
from train.fit import fit


def reference_batch(rec_path, n, pre: Preprocess, sidecar_dir="."):
    """First n records decoded with mx.recordio (BGR) -> RGB -> Preprocess.apply."""
    rec = mx.recordio.MXRecordIO(str(rec_path), "r")
    images = []
    for _ in range(n):
        _, img = mx.recordio.unpack_img(rec.read())
        images.append(img[:, :, ::-1])
    return pre.apply(np.stack(images), sidecar_dir)


def test_scan_labels_matches_recordio(tmp_path):
    labels = [3, 0, 2, 2, 1, 4, 0]
    path = write_rec(tmp_path / "a.rec", 5, 0, labels=labels)
    rec = mx.recordio.MXRecordIO(str(path), "r")
    expected = []
    while (item := rec.read()) is not None:
        expected.append(mx.recordio.unpack(item)[0].label)
    np.testing.assert_array_equal(scan_labels(path), expected)
    np.testing.assert_array_equal(scan_headers(path)[1], np.arange(len(labels)))
    (tmp_path / "junk.rec").write_bytes(b"not a recordio file at all")
    with pytest.raises(DataError, match="junk.rec: not a RecordIO file"):
        scan_labels(tmp_path / "junk.rec")
    (tmp_path / "cut.rec").write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match="cut.rec: truncated"):
        scan_labels(tmp_path / "cut.rec")


def test_classes_from_class_map_and_checks(tmp_path):
    path = write_rec(tmp_path / "x_train.rec", 3, 2, class_names=["a", "b", "c"])
    info = resolve_classes(path)
    assert (info.num_classes, info.names, info.counts.tolist()) == (3, ["a", "b", "c"], [2, 2, 2])
    with pytest.raises(DataError, match=r"--num-classes 4 disagrees with the class map .*x.classes.json \(3"):
        resolve_classes(path, 4)
    plain = write_rec(tmp_path / "plain.rec", 3, 0, labels=[0, 1, 1.5])
    with pytest.raises(DataError, match=r"plain.rec: label 1.5 is not a class index"):
        resolve_classes(plain)
    nomap = write_rec(tmp_path / "nomap.rec", 3, 0, labels=[0, 2, 5])
    assert resolve_classes(nomap).num_classes == 6  # no class map: max label + 1 (with a warning)
    with pytest.raises(DataError, match=r"nomap.rec: label 5 is out of range for 4 classes \(--num-classes 4\)"):
        resolve_classes(nomap, 4)


@pytest.mark.parametrize("order,mean,std,scale", [
    ("RGB", [123.7, 116.3, 103.5], [58.4, 57.1, 57.4], 1.0),   # torchvision-style
    ("BGR", [104.0, 117.0, 123.0], None, 1.0),                  # Caffe VGG: BGR, per-channel mean
    ("BGR", [104.0, 117.0, 123.0], [2.0, 3.0, 4.0], 0.017),     # BGR with std and scale
])
def test_iterator_feeds_what_the_sidecar_describes(tmp_path, order, mean, std, scale):
    path = write_rec(tmp_path / "d.rec", 3, 4)
    pre = Preprocess(input_shape=(3, 16, 16), channel_order=order, mean=mean, std=std, scale=scale)
    batch = next(iter(record_iter(path, 8, pre, tmp_path, "prob_label")))
    expected = reference_batch(path, 8, pre)
    np.testing.assert_allclose(batch.data[0].asnumpy(), expected, rtol=1e-5, atol=1e-4)
    assert batch.provide_label[0].name == "prob_label"


def test_mean_image_is_checked_and_applied(tmp_path):
    path = write_rec(tmp_path / "d.rec", 3, 4)
    mean = np.random.RandomState(0).uniform(90, 130, (3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "m-mean.npy", mean)
    pre = Preprocess(input_shape=(3, 16, 16), channel_order="BGR", mean="m-mean.npy", std=[1.0, 2.0, 4.0], scale=0.5)
    batch = next(iter(record_iter(path, 8, pre, tmp_path, "prob_label")))
    np.testing.assert_allclose(batch.data[0].asnumpy(), reference_batch(path, 8, pre, tmp_path), rtol=1e-5,
                               atol=1e-4)
    np.save(tmp_path / "m-mean.npy", mean[:, :8])
    with pytest.raises(DataError, match=r"m-mean.npy: mean image has shape \(3, 8, 16\), the input is \(3, 16, 16\)"):
        record_iter(path, 8, pre, tmp_path, "prob_label")
    (tmp_path / "m-mean.npy").unlink()
    with pytest.raises(DataError, match="m-mean.npy: mean image named by the sidecar is missing"):
        record_iter(path, 8, pre, tmp_path, "prob_label")
    assert not (tmp_path / "m-mean.npy").exists()  # ImageRecordIter would have computed and written one


def test_workers_read_disjoint_parts(tmp_path):
    # Record i is a uniform image of value 3*i, so every batch says exactly which records it holds.
    path = tmp_path / "d.rec"
    rec = mx.recordio.MXIndexedRecordIO(str(path.with_suffix(".idx")), str(path), "w")
    for i in range(32):
        img = np.full((16, 16, 3), 3 * i, np.uint8)
        rec.write_idx(i, mx.recordio.pack_img(mx.recordio.IRHeader(0, float(i % 4), i, 0), img, img_fmt=".png"))
    rec.close()
    pre = Preprocess(input_shape=(3, 16, 16))
    seen = []
    for part in range(2):
        it = record_iter(path, 4, pre, tmp_path, "l", num_parts=2, part_index=part)
        got = []
        for b in it:
            x = b.data[0].asnumpy()[: 4 - b.pad]
            assert (x == x[:, :1, :1, :1]).all()          # whole records, never a mix
            got += [int(v) // 3 for v in x[:, 0, 0, 0]]
        seen.append(got)
    assert len(seen[0]) + len(seen[1]) == 32 and len(seen[0]) == 16
    assert len(set(seen[0])) == len(set(seen[1])) == 16   # no record twice within a part
    assert not set(seen[0]) & set(seen[1])                # the parts are disjoint ...
    assert set(seen[0]) | set(seen[1]) == set(range(32))  # ... and together cover every record


# ---- the validation view: ImageRecordIter's own geometry, reproduced for raw images ------------------------------
@pytest.mark.parametrize("h,w,shape,resize", [
    (20, 30, (3, 16, 16), -1),    # larger: centre crop, offsets rounded down
    (31, 20, (3, 16, 16), 18),    # the iterator's --resize (short edge, long * r // short), then the crop
    (20, 30, (3, 16, 16), 17),
    (20, 30, (3, 24, 16), -1),    # a non-square input, enlarged to cover it
    (12, 30, (3, 16, 16), -1),    # smaller than the input: enlarged (short edge to 16), then cropped
    (30, 12, (3, 16, 16), -1),
    (7, 9, (3, 16, 16), -1),
])
def test_iterator_view_is_what_image_record_iter_feeds(tmp_path, h, w, shape, resize):
    rng = np.random.RandomState(h * 100 + w)
    images = [rng.randint(0, 256, (h, w, 3)).astype(np.uint8) for _ in range(3)]
    rec = mx.recordio.MXIndexedRecordIO(str(tmp_path / "v.idx"), str(tmp_path / "v.rec"), "w")
    for i, img in enumerate(images):
        rec.write_idx(i, mx.recordio.pack_img(mx.recordio.IRHeader(0, 0.0, i, 0), img, img_fmt=".png"))
    rec.close()
    it = mx.io.ImageRecordIter(path_imgrec=str(tmp_path / "v.rec"), data_shape=shape, batch_size=3, resize=resize)
    got = next(iter(it)).data[0].asnumpy()
    for img, fed in zip(images, got):
        view = iterator_view(img, shape, resize)[:, :, ::-1].transpose(2, 0, 1)  # BGR -> RGB, CHW
        np.testing.assert_array_equal(fed, view)


# ---- pack sidecar and the per-file header cache -------------------------------------------------------------------
def test_pack_sidecar_is_read_defensively(tmp_path, caplog):
    rec = write_rec(tmp_path / "p.rec", 3, 2)
    cfg = PackConfig(resize=24, center_crop=True, encoding=".png", quality=3)
    write_pack_sidecar(rec, cfg, [2, 2, 2], 6, packer="recbuild 9.9", note={"extra": "keys are ignored"})
    assert pack_transform(rec) == PackTransform(resize=24, center_crop=True, color=1, encoding=".png", quality=3)
    records, counts = recfile.summary(rec)
    assert (records, counts.tolist()) == (6, [2, 2, 2])
    # A sidecar of an earlier pack (the .rec was rewritten since): ignored, with a warning naming both.
    write_pack_sidecar(rec, cfg, [2, 2, 2], 6, rec_bytes=rec.stat().st_size + 1)
    with caplog.at_level("WARNING"):
        assert pack_transform(rec) is None
    assert "p.pack.json: describes a .rec of" in caplog.text
    (tmp_path / "p.pack.json").write_text('{"format": "something else"}')
    with pytest.raises(DataError, match=r'p.pack.json: not a pack sidecar; expected \{"format": "mxtransfer.pack/1"'):
        pack_transform(rec)
    write_pack_sidecar(rec, cfg, [2, 2, 2], 6, transform={"resize": "24"})
    with pytest.raises(DataError, match=r"p.pack.json: 'transform.resize' must be int, got '24'"):
        pack_transform(rec)
    (tmp_path / "p.pack.json").unlink()
    assert pack_transform(rec) is None  # an im2rec file: no sidecar, still usable


def test_record_facts_come_from_the_sidecar_or_one_scan_per_file(tmp_path, monkeypatch):
    scans = []
    real = recfile._scan_file
    monkeypatch.setattr(recfile, "_scan_file", lambda path: scans.append(path) or real(path))
    monkeypatch.setattr(recfile, "REC_CACHE_DIR", tmp_path / "cache")
    recfile.forget()
    path = write_rec(tmp_path / "d.rec", 3, 4)
    pre = Preprocess(input_shape=(3, 16, 16))
    for _ in range(3):  # three passes (epochs), each with a fresh iterator: one scan
        list(record_iter(path, 4, pre, tmp_path, "l"))
    assert scan_labels(path).size == 12 and len(scans) == 1
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewritten file is scanned again
    assert scan_headers(path)[1].tolist() == list(range(12)) and len(scans) == 2
    # Large files are also kept on disk, keyed by path, size and mtime_ns: a new process does not rescan.
    monkeypatch.setattr(recfile, "DISK_CACHE_MIN_RECORDS", 10)
    recfile.forget()
    scan_labels(path)
    assert len(scans) == 3 and len(list((tmp_path / "cache").glob("d-*.npz"))) == 1
    recfile.forget()
    np.testing.assert_array_equal(scan_labels(path), np.arange(12) % 3)
    assert len(scans) == 3
    # A pack sidecar written beside it changes what the check read: one more checked scan, which compares the
    # sidecar's counts with the headers; its histogram is then used.
    write_pack_sidecar(path, PackConfig(resize=16), [4, 4, 4], 12)
    info = resolve_classes(path)
    list(record_iter(path, 4, pre, tmp_path, "l"))
    assert (info.num_records, info.counts.tolist()) == (12, [4, 4, 4]) and len(scans) == 4


def test_train_and_val_class_maps_must_agree(tmp_path, capsys):
    train = write_rec(tmp_path / "x_train.rec", 3, 2, class_names=["cat", "dog", "eel"])
    val = write_rec(tmp_path / "y_val.rec", 3, 2, class_names=["eel", "dog", "cat"])
    with pytest.raises(DataError) as err:
        resolve_classes(train, val_rec=val)
    message = str(err.value)
    assert "x.classes.json" in message and "y.classes.json" in message and "\n" not in message
    assert "label 0: 'cat' vs 'eel'" in message
    same = write_rec(tmp_path / "z_val.rec", 3, 2, class_names=["cat", "dog", "eel"])
    assert resolve_classes(train, val_rec=same).names == ["cat", "dog", "eel"]
    # The command stops before any work, with that one line.
    from train.__main__ import main
    base = tiny_vgg_checkpoint(tmp_path / "base", num_classes=3)
    assert main(["--pretrained-model", str(base), "--data-train", str(train), "--data-val", str(val),
                 "--model-prefix", str(tmp_path / "ft"), "--num-epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.classes.json" in err[0] and "y.classes.json" in err[0]
    assert not list(tmp_path.glob("ft*"))


@pytest.mark.parametrize("values, ok", [((10.0,), True), ((10.0, 20.0, 30.0), True), ((10.0, 20.0), False),
                                        ((1.0, 2.0, 3.0, 4.0, 5.0), False)])
def test_rgb_mean_and_std_take_one_or_three_values(tmp_path, values, ok):
    path = write_rec(tmp_path / "d.rec", 3, 4)
    pre = Preprocess(input_shape=(3, 16, 16), channel_order="BGR")
    if not ok:
        given = ",".join(f"{v:g}" for v in values)
        for option in ("rgb_mean", "rgb_std"):
            with pytest.raises(DataError, match=rf"--{option.replace('_', '-')} {given}: give 1 value .* or 3"):
                record_iter(path, 8, pre, tmp_path, "l", **{option: values})
        return
    batch = next(iter(record_iter(path, 8, pre, tmp_path, "l", rgb_mean=values)))
    rgb = np.broadcast_to(np.asarray(values, np.float32), (3,))
    expected = reference_batch(path, 8, Preprocess(input_shape=(3, 16, 16), channel_order="BGR",
                                                   mean=list(rgb[::-1])))
    np.testing.assert_allclose(batch.data[0].asnumpy(), expected, rtol=1e-5, atol=1e-4)


def test_mirror_input_is_the_mirrored_raw_image(tmp_path):
    rng = np.random.RandomState(3)
    mean = rng.uniform(60, 160, (3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "m.npy", mean)
    raw = rng.randint(0, 256, (4, 16, 16, 3)).astype(np.float32)
    for pre in (Preprocess(input_shape=(3, 16, 16), channel_order="BGR", mean="m.npy", std=[2, 3, 4], scale=0.5),
                Preprocess(input_shape=(3, 16, 16), channel_order="RGB", mean=[1, 2, 3], std=[5.0])):
        x = pre.apply(raw, tmp_path)
        expected = pre.apply(raw[:, :, ::-1], tmp_path)        # flip the raw pixels, then mean/std/scale
        np.testing.assert_allclose(pre.mirror_input(x, tmp_path), expected, rtol=1e-5, atol=1e-5)
        nd = pre.mirror_input(mx.nd.array(x), tmp_path)
        np.testing.assert_allclose(nd.asnumpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(pre.apply(raw[:, :, ::-1], tmp_path) - x[:, :, :, ::-1]).max() < 1e-4  # per-channel: a flip
    pre = Preprocess(input_shape=(3, 16, 16), mean="m.npy")
    assert np.abs(pre.apply(raw[:, :, ::-1], tmp_path) - pre.apply(raw, tmp_path)[:, :, :, ::-1]).max() > 1


# ---- start-up: the pack transform against the model input, and the crop flags --------------------------------------
def test_start_up_says_what_happens_and_warns_about_a_crop_with_nothing_to_crop(tmp_path, caplog):
    path = write_rec(tmp_path / "s_train.rec", 3, 4)
    write_pack_sidecar(path, PackConfig(resize=16, center_crop=True), [4, 4, 4], 12)
    pre = Preprocess(input_shape=(3, 16, 16), channel_order="BGR", mean=[104, 117, 123])
    cfg = TrainConfig(pretrained_model="m", data_train=str(path), model_prefix="p", random_crop=True,
                      rgb_mean=(1.0, 2.0, 3.0))
    with caplog.at_level("INFO", logger="train.data"):
        planned = plan_input(pre, tmp_path, (3, 16, 16), cfg)
    assert "training takes a random crop 16x16, validation and prediction a centre crop 16x16" in caplog.text
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and "--random-crop 1 does nothing here" in warning[0]
    assert "--resize 18" in warning[0] and "--random-resized-crop 1" in warning[0]
    assert planned.packing == {"pack": vars(PackTransform(resize=16, center_crop=True)), "iterator_resize": -1}
    assert planned.mean == [3.0, 2.0, 1.0]  # --rgb-mean recorded in the model's (BGR) order
    caplog.clear()
    (tmp_path / "s_train.pack.json").unlink()
    with caplog.at_level("INFO", logger="train.data"):
        planned = plan_input(pre, tmp_path, (3, 16, 16), replace(cfg, random_crop=False, rgb_mean=None))
    assert "s_train.rec: no pack sidecar s_train.pack.json" in caplog.text and planned.packing["pack"] is None
    # Without a sidecar (an im2rec file), or packed without --center-crop from square sources, the records' own
    # headers tell: 16x16 records for a 16x16 input leave a random crop nothing to do.
    for sidecar in (None, PackConfig(resize=16, center_crop=False)):
        if sidecar is not None:
            write_pack_sidecar(path, sidecar, [4, 4, 4], 12)
        caplog.clear()
        with caplog.at_level("WARNING", logger="train.data"):
            plan_input(pre, tmp_path, (3, 16, 16), replace(cfg, rgb_mean=None))
        assert "--random-crop 1 does nothing here" in caplog.text
    bigger = write_rec(tmp_path / "b_train.rec", 3, 4, size=20)
    caplog.clear()
    with caplog.at_level("WARNING", logger="train.data"):
        plan_input(pre, tmp_path, (3, 16, 16), replace(cfg, data_train=str(bigger), rgb_mean=None))
    assert "does nothing" not in caplog.text  # 20 px records: room to crop
    with pytest.raises(DataError, match="--rgb-std 1,2: give 1 value"):
        plan_input(pre, tmp_path, (3, 16, 16), replace(cfg, rgb_std=(1.0, 2.0)))


@pytest.mark.parametrize("flag", ["random_resized_crop", "random_crop", "random_mirror"])
def test_each_crop_and_mirror_flag_trains_and_checkpoints(tmp_path, flag):
    base = tiny_vgg_checkpoint(tmp_path / "base")
    rec = write_rec(tmp_path / "a_train.rec", 3, 4, size=20)  # 20 px records for a 16 px input: room to crop
    cfg = TrainConfig(pretrained_model=str(base), data_train=str(rec), model_prefix=str(tmp_path / "ft"),
                      num_epochs=1, batch_size=4, progress=False, **{flag: True})
    result = fit(cfg)
    assert result.last_epoch == 1 and (tmp_path / "ft-0001.params").is_file()
    _, args, _ = mx.model.load_checkpoint(str(tmp_path / "ft"), 1)  # the stock loader reads it
    assert args["fc8_weight"].shape == (3, 16)


def test_a_training_run_scans_each_rec_once(tmp_path, monkeypatch):
    scans = []
    real = recfile._scan_file
    monkeypatch.setattr(recfile, "_scan_file", lambda path: scans.append(path.name) or real(path))
    recfile.forget()
    base = tiny_vgg_checkpoint(tmp_path / "base")
    train = write_rec(tmp_path / "r_train.rec", 3, 4)
    val = write_rec(tmp_path / "r_val.rec", 3, 2, seed=1)
    fit(TrainConfig(pretrained_model=str(base), data_train=str(train), data_val=str(val), num_epochs=3,
                    batch_size=4, model_prefix=str(tmp_path / "ft"), progress=False))
    assert sorted(scans) == ["r_train.rec", "r_val.rec"]  # 3 epochs, 6 iterator passes: one scan per file
    recfile.forget()
    scans.clear()
    for rec, n in ((train, 12), (val, 6)):
        write_pack_sidecar(rec, PackConfig(resize=16), [n // 3] * 3, n)
    fit(TrainConfig(pretrained_model=str(base), data_train=str(train), data_val=str(val), num_epochs=2,
                    batch_size=4, model_prefix=str(tmp_path / "ft2"), progress=False))
    assert sorted(scans) == ["r_train.rec", "r_val.rec"]  # still one check per file, against the pack sidecars
