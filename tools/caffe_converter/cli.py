"""`python -m tools.caffe_converter`: the command line (MXNet's convert_model.py arguments, plus options).

    python -m tools.caffe_converter deploy.prototxt weights.caffemodel out/model/vgg16 [--verify]

Parses the arguments, calls pipeline.convert, prints a one-paragraph summary and, with --verify, the OpenCV
comparison (opencv_check is imported only then). Exit status: 0 done, 1 verification failed, 2 bad input (or an
output that cannot be written: one line naming the file and the errno; the earlier model is left whole).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

from recbuild.publish import PrefixBusy, PublishError, output_error_line, writer_lock
from recbuild.values import parse_floats
from tools.caffe_converter.errors import CaffeFormatError, ConversionError, UnsupportedLayerError, some_names
from tools.caffe_converter.opencv_check import DEFAULT_TOLERANCE  # numpy only: OpenCV is imported when used

# What `import mxnet` pulls in only because it is installed (mxnet.image/recordio try cv2, mxnet.onnx tries onnx)
# and a conversion never uses; a conversion without --verify imports neither (docs/benchmarks.md, converter figures).
OPTIONAL_MXNET_IMPORTS = ("cv2", "onnx")


def _floats(text: str) -> List[float]:
    # convert_model.py users also write the mean space-separated ("104 117 123"): both spellings are accepted.
    try:
        return list(parse_floats(",".join(text.split())))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _input_shape(text: str) -> Tuple[str, Tuple[int, ...]]:
    """NAME=N,C,H,W (the --input-shape value)."""
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=N,C,H,W with positive integers, got '{text}'")
    return name, shape


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.caffe_converter", usage="%(prog)s [options] prototxt caffemodel prefix",
        description="Convert a Caffe model (prototxt + caffemodel, V1 or current format) into an MXNet checkpoint "
                    "PREFIX-symbol.json + PREFIX-0000.params and a preprocessing sidecar PREFIX-preprocess.json.")
    # Optional to argparse only so that a missing one is named right (check_positionals): with two words it would
    # always report `prefix` missing, also when the caffemodel was left out.
    parser.add_argument("prototxt", nargs="?", help="the deploy prototxt")
    parser.add_argument("caffemodel", nargs="?", help="the binary caffemodel")
    parser.add_argument("prefix", nargs="?", help="output checkpoint prefix (convert_model.py's save_model_name)")
    parser.add_argument("--keep-bgr", action="store_true",
                        help="keep Caffe's BGR input; by default the model is converted to take RGB")
    parser.add_argument("--mean-file", help="Caffe mean.binaryproto, recorded in the sidecar as PREFIX-mean.npy")
    parser.add_argument("--mean", type=_floats,
                        help="per-channel mean in the Caffe model's order (BGR), e.g. 104,117,123")
    parser.add_argument("--std", type=_floats, help="per-channel std in the Caffe model's order (BGR)")
    parser.add_argument("--scale", type=float, help="input scale after mean/std (default: transform_param or 1)")
    parser.add_argument("--output-layer", action="append", metavar="NAME",
                        help="cut the net at this layer or blob (repeat for several outputs)")
    parser.add_argument("--input-shape", action="append", type=_input_shape, metavar="NAME=N,C,H,W",
                        help="replace the shape the prototxt declares for input NAME (repeatable), e.g. for a net "
                             "declared at 1x1 and reshaped at run time: --input-shape data=1,3,368,368")
    parser.add_argument("--verify", action="store_true",
                        help="run the written files (mx.model.load_checkpoint, in a child process) and compare every "
                             "layer with OpenCV's Caffe importer, each fed OpenCV's input blobs; the files are "
                             "published only if every layer agrees")
    parser.add_argument("--verify-layers", action="store_true", help="--verify, printing every layer's row")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"max relative difference of a layer accepted by --verify (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--strict", action="store_true",
                        help="fail instead of skipping training-only layers or ignoring caffemodel weights for "
                             "layers the prototxt does not define")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every layer")
    return parser


def check_positionals(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """All three of PROTOTXT CAFFEMODEL PREFIX given, or a usage error naming the one that is missing."""
    given = [v for v in (args.prototxt, args.caffemodel, args.prefix) if v is not None]
    if len(given) == 3:
        return
    if len(given) == 2 and not (given[1].endswith(".caffemodel") or os.path.isfile(given[1])):
        parser.error(f"the caffemodel is missing: {given[1]!r} is not a file, so it reads as PREFIX; expected "
                     f"PROTOTXT CAFFEMODEL PREFIX")
    missing = ["prototxt", "caffemodel", "prefix"][len(given):]
    parser.error(f"the following arguments are required: {', '.join(missing)}")


def warn_reversed_mean(mean: Optional[Sequence[float]]) -> None:
    """One warning line when --mean looks like a common BGR mean given in RGB order."""
    from tools.caffe_converter.preprocess import reversed_common_mean
    found = reversed_common_mean(mean)
    if found:
        name, bgr = found
        print(f"warning: --mean {','.join(f'{v:g}' for v in mean)} is the common {name} mean reversed (RGB order); "
              f"--mean is in the Caffe model's channel order (B,G,R), so you probably meant "
              f"--mean {','.join(f'{v:g}' for v in bgr)}", file=sys.stderr)


@contextlib.contextmanager
def _hidden(modules: Sequence[str]):
    """Make `import m` raise ImportError for the modules not yet imported, for the duration of the block.

    MXNet guards these optional imports with try/except ImportError, so it loads without them; the entries are
    removed afterwards, so a later `import cv2` (the OpenCV check) works as usual.
    """
    hidden = [m for m in modules if m not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # the import system's documented way to make an import fail
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def summary(args: argparse.Namespace, result, elapsed: float) -> str:
    """The conversion summary: files, parameters, outputs, preprocessing, accepted sizes, what was left out."""
    pre = result.preprocess
    n_params = sum(int(v.size) for v in result.arg_arrays.values()) + \
        sum(int(v.size) for v in result.aux_arrays.values())
    return (f"converted {args.prototxt} + {args.caffemodel} -> {args.prefix}-symbol.json, {args.prefix}-0000.params "
            f"in {elapsed:.1f} s: {n_params / 1e6:.2f} M parameters, outputs {result.output_blobs}, input "
            f"{pre.input_shape} {pre.channel_order}, mean {pre.mean}, scale {pre.scale}, classifier {pre.classifier} "
            f"({pre.num_classes} classes, fed by {pre.feature_output}), input sizes: "
            f"{_sizes(pre.source.get('input_sizes'))}; {len(result.skipped)} layer(s) skipped"
            + "".join(f"\n  skipped '{n}' ({t}): {why}" for n, t, why in result.skipped)
            + (f"\n  ignored the caffemodel's weights for {len(result.unused_weights)} layer(s) the prototxt does "
               f"not define: {some_names(result.unused_weights)}" if result.unused_weights else ""))


def _sizes(record) -> str:
    from tools.caffe_converter.sizes import describe
    return describe(record)


def _verify_and_publish(args: argparse.Namespace, result) -> int:
    """Stage the files, check the staged files (and, with --verify-layers, every layer) against OpenCV, and
    publish them only when every difference is within tolerance; otherwise remove them."""
    from tools.caffe_converter.run_check import OpenCVCannotRun, verify_staged
    from tools.caffe_converter.pipeline import discard_staged, publish_staged, stage_checkpoint
    staging = stage_checkpoint(args.prefix, result)
    try:
        report = verify_staged(staging, args.prototxt, args.caffemodel, result, tolerance=args.tolerance,
                               every_layer=args.verify_layers)
    except OpenCVCannotRun as err:
        discard_staged(staging)
        first = str(err)
        print(f"error: OpenCV cannot run {args.prototxt}, so --verify cannot check it ({first}); nothing written "
              f"to {args.prefix}-*; convert without --verify to keep the unverified files", file=sys.stderr)
        return 1
    except BaseException:
        discard_staged(staging)
        raise
    print(report.format())
    if not report.ok:
        discard_staged(staging)
        print(f"error: verification failed: {report.summary()}; nothing written to {args.prefix}-*", file=sys.stderr)
        return 1
    publish_staged(staging, args.prefix)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_positionals(parser, args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:  # one converter per prefix, for the whole run (recbuild.publish); it also settles a killed run's files
        with writer_lock(args.prefix):
            return _convert(args)
    except (PrefixBusy, PublishError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only folder, an output path that is a folder, ...
        print(output_error_line(err), file=sys.stderr)
        return 2


def _convert(args: argparse.Namespace) -> int:
    verify = args.verify or args.verify_layers
    with _hidden(() if verify else OPTIONAL_MXNET_IMPORTS):
        from tools.caffe_converter.pipeline import convert  # imports mxnet
    warn_reversed_mean(args.mean)  # (imports the sidecar module, and so mxnet: after the block above)
    start = time.perf_counter()
    try:
        result = convert(args.prototxt, args.caffemodel, None if verify else args.prefix, keep_bgr=args.keep_bgr,
                         mean_file=args.mean_file, mean=args.mean, std=args.std, scale=args.scale,
                         output_layer=args.output_layer, strict=args.strict,
                         input_shape=dict(args.input_shape or ()))
    except (CaffeFormatError, ConversionError, UnsupportedLayerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(args, result, time.perf_counter() - start))
    return _verify_and_publish(args, result) if verify else 0
