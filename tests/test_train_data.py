"""train/data.py: labels from .rec headers, and ImageRecordIter set up from the sidecar compared with an
independent numpy pipeline (mx.recordio decode + Preprocess.apply)."""
from __future__ import annotations

import numpy as np
import pytest
import mxnet as mx

from symbols.sidecar import Preprocess
from tests._train_fixtures import write_rec
from train.data import DataError, record_iter, resolve_classes, scan_headers, scan_labels


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
    path = write_rec(tmp_path / "d.rec", 4, 8)
    pre = Preprocess(input_shape=(3, 16, 16))
    seen = []
    for part in range(2):
        it = record_iter(path, 4, pre, tmp_path, "l", num_parts=2, part_index=part)
        seen.append([float(x) for b in it for x in b.data[0].asnumpy()[: 4 - b.pad].reshape(4 - b.pad, -1)[:, 0]])
    assert len(seen[0]) + len(seen[1]) == 32 and len(seen[0]) == 16
    assert seen[0] != seen[1]
