"""`python -m train.predict`: predict, `evaluate` and `report` (the command line; the library is train.predict).

Kept apart from the library so that the report form (train/report.py, which builds on the library) is reached
from here without an import circle.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import List, Optional

import mxnet as mx

from recbuild.atomic import write_json
from recbuild.publish import PrefixBusy, PublishError, output_error_line
from train.data import DataError
from train.predict import (PredictError, build_parser, evaluate, load_model, predict, resolve_epoch,
                           trained_resize)
from train.predict.submission import submission_format


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from train.report import main as report_main
        return report_main(argv[1:])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    evaluating = bool(argv) and argv[0] == "evaluate"
    args = build_parser(evaluating).parse_args(argv[1:] if evaluating else argv)
    ctx = [mx.gpu(i) for i in args.gpus] or None
    started = time.time()
    try:
        epoch = resolve_epoch(args.prefix, args.epoch)
        model = load_model(args.prefix, epoch, args.batch_size, ctx, args.classes, args.image_shape,
                           args.rgb_mean, args.rgb_std)
        resize = args.resize if args.resize > 0 else trained_resize(args.prefix)
        if evaluating:
            result = evaluate(model, args.data, args.top_k, args.mirror, resize)
            if args.json:
                write_json(args.json, result)
            key = f"top_{args.top_k}_accuracy"
            topk = f", top-{args.top_k} {result[key]:.4f}" if key in result else ""
            print(f"{args.data}: {result['images']} images, accuracy {result['accuracy']:.4f}{topk}, "
                  f"log loss {result['log_loss']:.4f}" + (" (mirror TTA)" if args.mirror else ""))
            return 0
        summary = predict(model, args.data, args.out, args.top_k, args.mirror, resize, args.root,
                          fmt=submission_format(args))
    except (PredictError, DataError, ValueError, PrefixBusy, PublishError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only folder, --out naming a folder, ...
        print(output_error_line(err), file=sys.stderr)
        return 2
    print(f"Predicted {summary['images']} images in {time.time() - started:.1f} s: probabilities -> "
          f"{summary['csv']}, top-{args.top_k} labels -> {summary['topk_csv']}")
    return 0

