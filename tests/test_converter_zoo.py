"""The Caffe zoo's layer patterns (tests/_zoo_nets.py), converted and compared with OpenCV layer by layer and end
to end, at the declared input size and at another one where the net allows it.

Reference: OpenCV dnn's Caffe importer, each converted layer fed OpenCV's own input blobs (layerwise.py); the
tolerance is the converter's, 1e-4 of each layer's largest value. The end-to-end figures are checked only
loosely (finite, top-1 agreement): depth makes them drift, which is what the layer-by-layer check is for.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests._zoo_nets import ZOO, ZOO_CONVERT, write_zoo_net
from tools.caffe_converter import convert
from tools.caffe_converter.layerwise import LAYER_TOLERANCE
from tools.caffe_converter.run_check import verify_staged


def _sizes():
    for name, (_, size, other) in ZOO.items():
        yield pytest.param(name, None, id=f"{name}-{size}")
        if other:
            yield pytest.param(name, other, id=f"{name}-{other}")


@pytest.mark.parametrize("name,other", list(_sizes()))
def test_zoo_pattern_matches_opencv_layer_by_layer(name, other, tmp_path):
    prototxt, caffemodel, size, _ = write_zoo_net(name, tmp_path)
    prefix = tmp_path / "out" / name
    result = convert(prototxt, caffemodel, prefix, **ZOO_CONVERT.get(name, {}))
    channels = result.input_shapes["data"][1]
    shapes = {"data": (1, channels, other, other)} if other else None
    report = verify_staged(prefix, prototxt, caffemodel, result, tolerance=LAYER_TOLERANCE, in_process=True,
                           input_shapes=shapes, every_layer=True)
    assert report.ok, report.format()
    # every weighted layer was compared on its own (not hidden inside a longer run of layers), except one OpenCV
    # keeps under another name (colorization's 'bw_conv1_1', checked with the ReLU after it)
    compared = {r.name for r in report.rows}
    weighted = {name for name in result.layer_order if f"{name}_weight" in result.arg_arrays}
    assert weighted - compared <= {"bw_conv1_1"}, sorted(weighted - compared)
    if other:  # the rows are at the other size, not the declared one
        assert any(r.shape[2:] != result.input_shapes["data"][2:] for r in report.rows if len(r.shape) == 4)
    # end to end: a figure; finite, and the classes agree wherever there is a class axis
    assert report.figures and all(np.isfinite(f.rel) for f in report.figures)
    agree, total = report.top1
    assert agree == total

