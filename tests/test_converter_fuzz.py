"""The prototxt reader and the converter on damaged files: every truncation and seeded single-byte changes of
real-shaped prototxts end, within a time limit, in success or one `ValueError` line naming the file and line
(or the layer and field), never a hang, a traceback or a signal (issue 20, item 7)."""
import signal

import numpy as np
import pytest

from tests._caffe_nets import NetBuilder, vgg16_builder
from tools.caffe_converter import convert
from tools.caffe_converter.caffe_io import load_net

SECONDS = 5  # a case that has not ended by then hangs (the reader used to loop forever at 100 % CPU)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def _ends_cleanly(run, label):
    """run() must return or raise ValueError with one line; anything else (or no end) fails naming the case."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS)
    try:
        run()
        return "ok"
    except _Hang:
        pytest.fail(f"{label}: no end after {SECONDS} s")
    except ValueError as err:
        text = str(err)
        assert text and "\n" not in text and "Traceback" not in text, f"{label}: not one line: {text!r}"
        return text
    except Exception as err:  # noqa: BLE001 - any other exception is the failure being tested for
        pytest.fail(f"{label}: {type(err).__name__} instead of one line: {str(err)[:300]}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


SSD_HEAD = """name: "ssd_like"
input: "data"
input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 8 pad: 1 kernel_size: 3 stride: 2 weight_filler { type: "xavier" } } }
layer { name: "conv_relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "norm" type: "Normalize" bottom: "conv" top: "norm"
  norm_param { across_spatial: false scale_filler { type: "constant" value: 20 } channel_shared: false } }
layer { name: "loc" type: "Convolution" bottom: "norm" top: "loc" convolution_param { num_output: 16 kernel_size: 1 } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm"
  permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" flatten_param { axis: 1 } }
layer { name: "prior" type: "PriorBox" bottom: "norm" bottom: "data" top: "prior"
  prior_box_param { min_size: 30.0 max_size: 60.0 aspect_ratio: 2 flip: true clip: false
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 8 offset: 0.5 } }
"""


def _vgg_text(tmp_path, fmt):
    prototxt, caffemodel = vgg16_builder(num_classes=3, input_size=32, widths=(4, 4, 8, 8, 8), fc_width=8) \
        .write(tmp_path, stem=f"vgg_{fmt}", fmt=fmt)
    return prototxt.read_bytes(), caffemodel


@pytest.mark.slow
def test_every_truncation_of_real_shaped_prototxts_ends_with_one_line(tmp_path):
    texts = {"vgg_v2": _vgg_text(tmp_path, "v2")[0], "vgg_v1": _vgg_text(tmp_path, "v1")[0],
             "ssd": SSD_HEAD.encode()}
    rng = np.random.default_rng(20)
    path = tmp_path / "cut.prototxt"
    outcomes = {"ok": 0, "error": 0}
    for name, data in texts.items():
        # every offset of the SSD head (its tokens end inside every kind of field), a seeded sample of the others
        offsets = range(len(data)) if name == "ssd" else sorted(rng.choice(len(data), 150, replace=False))
        for cut in offsets:
            path.write_bytes(data[:cut])
            result = _ends_cleanly(lambda: load_net(path), f"{name} cut at byte {cut}")
            outcomes["ok" if result == "ok" else "error"] += 1
            if result != "ok":
                assert str(path) in result, result
    assert outcomes["error"] > 300, outcomes  # most cuts are damaged files, reported as such


def test_the_five_byte_file_input_names_its_line(tmp_path):
    path = tmp_path / "input.prototxt"
    path.write_bytes(b"input")
    message = _ends_cleanly(lambda: load_net(path), "input")
    assert message.startswith(f"{path}:1: ") and "ends inside field 'input'" in message, message


def test_truncated_inside_a_layer_names_the_layer_and_line(tmp_path):
    path = tmp_path / "t.prototxt"
    text = SSD_HEAD[:SSD_HEAD.index("kernel_size: 1") + len("kernel_size:")]
    path.write_text(text)
    message = _ends_cleanly(lambda: load_net(path), "loc")
    line = text.count("\n") + 1
    assert message.startswith(f"{path}:{line}: layer 'loc' (line {line}): the file ends inside field "
                              f"'kernel_size'"), message


def test_single_byte_changes_convert_or_fail_with_one_line(tmp_path):
    """Seeded single-byte changes of a small VGG's prototxt, converted with its caffemodel: the loader, the
    converters' parameter checks and MXNet's shape inference must all end in a result or one line."""
    data, caffemodel = _vgg_text(tmp_path, "v2")
    rng = np.random.default_rng(7)
    path = tmp_path / "fuzz.prototxt"
    replacements = b'0123456789-.:{}" \n#ax'
    messages = []
    for case in range(120):
        pos = int(rng.integers(len(data)))
        changed = bytearray(data)
        changed[pos] = replacements[int(rng.integers(len(replacements)))]
        path.write_bytes(bytes(changed))
        messages.append(_ends_cleanly(lambda: convert(path, caffemodel, None),
                                      f"byte {pos} -> {bytes([changed[pos]])!r}"))
    assert sum(m != "ok" for m in messages) > 20


@pytest.mark.parametrize("setting, field", [
    ('"Dropout" dropout_param { dropout_ratio: 1000000 }', "dropout_ratio"),
    ('"Dropout" dropout_param { dropout_ratio: -0.5 }', "dropout_ratio"),
    ('"Convolution" convolution_param { num_output: 4 kernel_size: 0 }', "kernel_size"),
    ('"Convolution" convolution_param { num_output: 4 kernel_size: 3 stride: 0 }', "stride"),
    ('"Convolution" convolution_param { num_output: 0 kernel_size: 3 }', "num_output"),
    ('"Convolution" convolution_param { num_output: 4 kernel_size: 3 group: 3 }', "group"),
    ('"Convolution" convolution_param { num_output: 4 kernel_size: 3 dilation: 0 }', "dilation"),
    ('"Convolution" convolution_param { num_output: 4 kernel_size: 99 }', "kernel"),
    ('"Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 0 }', "stride"),
    ('"Pooling" pooling_param { pool: MAX kernel_size: 0 }', "kernel"),
    ('"Pooling" pooling_param { pool: MAX kernel_size: 99 }', "kernel"),
    ('"LRN" lrn_param { local_size: 4 }', "local_size"),
    ('"ArgMax" argmax_param { top_k: 0 }', "top_k"),
    ('"Tile" tile_param { tiles: 0 }', "tiles"),
    ('"InnerProduct" inner_product_param { num_output: 0 }', "num_output"),
    ('"Convolution" convolution_param { num_output: 4 kernel_size: 3 group: 0 }', "group"),
])
def test_out_of_range_parameters_are_one_line_naming_layer_and_field(tmp_path, setting, field):
    type_name, params = setting.split(" ", 1)
    b = NetBuilder()
    b.input("data", (1, 4, 8, 8))
    b.layer("bad", type_name.strip('"'), ["data"], params=params)
    prototxt, caffemodel = b.write(tmp_path)
    message = _ends_cleanly(lambda: convert(prototxt, caffemodel, None), setting)
    assert message != "ok", setting
    assert "layer 'bad'" in message and field in message, message
