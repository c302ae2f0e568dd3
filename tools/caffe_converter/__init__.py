"""Caffe -> MXNet converter, `python -m tools.caffe_converter` (the name of MXNet's own tool it replaces).

One job per module, each importing only the ones above it in this list:

    errors         CaffeFormatError, ConversionError, UnsupportedLayerError (one-line messages)
    caffe.proto    our subset of Caffe's format; caffe_pb2.py is protoc's output of it
    caffe_io       read a prototxt + caffemodel (V1 or current) into one clean CaffeNet; write test nets
    layers         one convert_<type>() per Caffe layer type in one table (LAYER_CONVERTERS); caffe_pool_size
    channel_flips  how a layer reading the BGR image is reordered for RGB input (INPUT_CHANNEL_FLIPS)
    passes         graph passes: output selection/cut, scale folding, BGR->RGB swap, final checks
    graph          the walker, which knows no layer type
    preprocess     the preprocessing sidecar's contents
    params_writer  the `.params` writer (kernel file copy of untouched caffemodel weights)
    pipeline       convert(): load, walk, write the checkpoint and sidecar
    opencv_check   compare a conversion with OpenCV's Caffe runtime (imports cv2 only when run)
    cli            the command line

`from tools.caffe_converter import convert, ConversionError` works; the names are loaded on first use so that
`import tools.caffe_converter.caffe_io` (test nets, benchmarks) does not import MXNet.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "convert": "pipeline", "write_checkpoint": "pipeline", "ConversionResult": "pipeline",
    "ConversionError": "errors", "CaffeFormatError": "errors", "UnsupportedLayerError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
