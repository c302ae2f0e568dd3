"""`python -m train.recipes COMMAND ...`: recipes from the field on top of the trainer.

Commands:
  features   train a new head from cached backbone features; writes the full model   (train.recipes.features)
  fuse       fuse two converted models into one deployable symbol                       (train.recipes.fusion)
  stages     staged fine-tuning from a JSON schedule, resumable mid-stage             (train.recipes.stages)
  fit        `python -m train` plus --class-balance                                    (train.recipes.sampling)
  ensemble   weights searched on the validation split, mirror TTA                      (train.recipes.ensemble)
  pseudo     add confident test predictions to the training set, retrain, report       (train.recipes.pseudo)

`features`, `stages` and `fit` take every `python -m train` option (same names and defaults).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from train.config import checked_type, add_options, config_from_args, parse_ints


def _summary(result, started: float, what: str) -> str:
    last = result.metrics[-1] if result.metrics else {}
    val = (f", val accuracy {last['val_accuracy']:.3f} (loss {last['val_loss']:.3f})"
           if "val_accuracy" in last else "")
    return (f"{what}: {result.num_classes} classes, {result.last_epoch} epochs in {time.time() - started:.1f} s: "
            f"train accuracy {last.get('train_accuracy', float('nan')):.3f}{val}. Checkpoint "
            f"{result.prefix}-{result.last_epoch:04d}.params (full model), metrics {result.prefix}-metrics.csv.")


# ---- the commands: each adds its options to its subparser and runs on the parsed namespace --------------------
def _features_options(p: argparse.ArgumentParser) -> None:
    from train.recipes.features import DEFAULT_CACHE_DIR
    add_options(p)
    g = p.add_argument_group("feature cache")
    g.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where feature files are kept")
    g.add_argument("--mirror", action="store_true", help="cache mirrored views too; one per image per epoch")
    g.add_argument("--class-balance", action="store_true", help="class-balanced sampling of each epoch")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N epochs (0: last only)")


def _features(args: argparse.Namespace) -> int:
    from train.recipes.features import train_from_cache
    started = time.time()
    result = train_from_cache(config_from_args(args), args.cache_dir, args.mirror, args.class_balance,
                              args.save_every)
    print(_summary(result, started, "Head trained from cached features"))
    return 0


def _fit_options(p: argparse.ArgumentParser) -> None:
    add_options(p)
    p.add_argument("--class-balance", action="store_true",
                   help="each epoch draws N records with every class equally likely (resampled .rec per epoch)")


def _fit(args: argparse.Namespace) -> int:
    from train.fit import fit
    from train.recipes.sampling import epoch_rec_provider
    cfg = config_from_args(args)
    started = time.time()
    provider = epoch_rec_provider(cfg.data_train, cfg.model_prefix, cfg.seed) if args.class_balance else None
    result = fit(cfg, epoch_train_rec=provider)
    print(_summary(result, started, "Fine-tuned" + (" (class-balanced)" if args.class_balance else "")))
    return 0


def _stages_options(p: argparse.ArgumentParser) -> None:
    add_options(p)
    g = p.add_argument_group("stages")
    g.add_argument("--schedule", required=True, help="JSON schedule file")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint, mid-stage or not")
    g.add_argument("--until-epoch", type=int, default=None, help="stop after this global epoch")


def _stages(args: argparse.Namespace) -> int:
    from train.recipes.stages import load_schedule, run_stages, stages_path
    stages = load_schedule(args.schedule)
    cfg = config_from_args(args)
    started = time.time()
    result = run_stages(cfg, stages, args.resume, args.until_epoch)
    print(_summary(result, started, f"Staged fine-tuning ({len(stages)} stages)") +
          f" Stage record {stages_path(cfg.model_prefix)}.")
    return 0


def _fuse_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="PREFIX[:EPOCH]",
                   help="twice; EPOCH defaults to 0 (a converted model)")
    p.add_argument("--out", required=True, help="output prefix (epoch 0 + sidecar)")
    p.add_argument("--input-size", default=None, type=checked_type(parse_ints),
                   help="H,W of the fused input (default: the larger model's)")
    p.add_argument("--num-classes", type=int, default=2, help="placeholder head width (fine-tuning replaces it)")
    p.add_argument("--layer-before-fullc", action="append", default=None,
                   help="per model, where its features are taken (give twice, or not at all)")


def _fuse(args: argparse.Namespace) -> int:
    from train.recipes.ensemble import parse_model
    from train.recipes.fusion import fuse
    models = [parse_model(m) if ":" in m else (m, 0) for m in args.model]
    size = args.input_size
    if size is not None and len(size) != 2:
        raise ValueError(f"--input-size {','.join(map(str, size))}: expected H,W, e.g. 299,299")
    layers = args.layer_before_fullc or [None, None]
    if len(layers) != 2:
        raise ValueError("--layer-before-fullc: give it once per model (twice) or not at all")
    out = fuse(models, args.out, args.num_classes, size, layers)
    print(f"Fused {models[0][0]} + {models[1][0]} -> {out}-symbol.json / -0000.params / -preprocess.json "
          f"(input: 'data', RGB pixels 0..255). Fine-tune it like any converted model.")
    return 0


def _ensemble_options(p: argparse.ArgumentParser) -> None:
    from train.predict.submission import add_submission_arguments
    p.add_argument("--model", action="append", required=True, metavar="PREFIX:EPOCH", help="two or more")
    p.add_argument("--val", required=True, help="labelled validation .rec (the only data the weights see)")
    p.add_argument("--test", default=None, help=".rec to predict with the searched weights")
    p.add_argument("--out", type=Path, default=None, help="submission file of the test predictions")
    p.add_argument("--mirror", action="store_true", help="TTA: average each model with the mirror image")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    add_submission_arguments(p)


def _ensemble(args: argparse.Namespace) -> int:
    from train.predict.submission import submission_format
    from train.recipes.ensemble import format_report, parse_model, run_ensemble
    if args.out and not args.test:
        raise ValueError("--out needs --test")
    report = run_ensemble([parse_model(m) for m in args.model], args.val, args.test, args.out, args.mirror,
                          args.batch_size, args.json, submission_format(args))
    print(format_report(report))
    if "test" in report:
        print(f"Test: {report['test']['images']} images" +
              (f" -> {report['test']['csv']}" if "csv" in report["test"] else ""))
    return 0


def _pseudo_options(p: argparse.ArgumentParser) -> None:
    from train.predict.submission import add_submission_arguments
    from train.recipes.pseudo import DEFAULT_THRESHOLD
    p.add_argument("prefix")
    p.add_argument("epoch", type=int)
    p.add_argument("--test", required=True, help=".rec of unlabelled (or ignored-label) test images")
    p.add_argument("--out-prefix", required=True, help="new training .rec and retrained model prefix")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--data-val", default=None, help="default: the original run's --data-val")
    p.add_argument("--num-epochs", type=int, default=None, help="default: the original run's")
    p.add_argument("--mirror", action="store_true", help="TTA for the test predictions")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-dir", default=None, help="feature cache of a retrain by the feature-cache route "
                                                     "(default .cache/features)")
    p.add_argument("--out", type=Path, default=None,
                   help="also predict --test with the retrained model into this submission file")
    add_submission_arguments(p)


def _pseudo(args: argparse.Namespace) -> int:
    from train.predict.submission import submission_format
    from train.recipes.pseudo import pseudo_label
    r = pseudo_label(args.prefix, args.epoch, args.test, args.out_prefix, args.threshold, args.data_val,
                     args.num_epochs, args.mirror, args.batch_size, args.cache_dir, args.out,
                     submission_format(args))
    print(f"Pseudo-labels: added {r['added']} of {r['test_records']} test images (confidence >= {r['threshold']:g}) "
          f"to {r['train_records']} training images -> {r['pseudo_rec']}; retrained {r['retrained']}. Validation "
          f"accuracy {r['val_accuracy_before']:.4f} -> {r['val_accuracy_after']:.4f} "
          f"({r['val_accuracy_change']:+.4f}), log loss {r['val_log_loss_before']:.4f} -> "
          f"{r['val_log_loss_after']:.4f}. Report {args.out_prefix}-pseudo.json." +
          (f" Test predictions of the retrained model -> {r['csv']}." if "csv" in r else ""))
    return 0


# name -> (description, add its options, run it)
COMMANDS: Dict[str, Tuple[str, Callable, Callable]] = {
    "features": ("Train a new head on cached backbone features; writes the full model.", _features_options,
                 _features),
    "fuse": ("Fuse two converted models into one symbol (input contract in train/recipes/fusion.py).",
             _fuse_options, _fuse),
    "stages": ("Staged fine-tuning from a JSON schedule (see train/recipes/stages.py).", _stages_options, _stages),
    "fit": ("`python -m train` with class-balanced sampling.", _fit_options, _fit),
    "ensemble": ("Ensemble checkpoints; weights searched on the validation split only.", _ensemble_options,
                 _ensemble),
    "pseudo": ("Add confident test predictions to the training set, retrain, report.", _pseudo_options, _pseudo),
}


def build_parser() -> argparse.ArgumentParser:
    """`python -m train.recipes`: one argparse subparser per command."""
    parser = argparse.ArgumentParser(prog="python -m train.recipes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (description, add, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=description, description=description,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        parser.print_help()
        return 0
    from train.config import parse_with_recipe
    args = parse_with_recipe(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import mxnet as mx

    from recbuild.publish import PrefixBusy, PublishError, output_error_line
    from train.data import DataError
    from train.fit import TrainError, TrainingDiverged
    from train.predict import PredictError
    try:
        return args.run(args)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (TrainError, DataError, PredictError, ValueError, FileNotFoundError, PrefixBusy, PublishError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only folder, an output path that is a folder: nothing half-written
        print(output_error_line(err), file=sys.stderr)
        return 2
    except mx.base.MXNetError as err:  # e.g. an input size the network cannot take: MXNet's own first line
        lines = [ln for ln in str(err).splitlines() if ln.strip() and "Traceback" not in ln and "File " not in ln]
        print(f"error: MXNet refused the network or data: {lines[-1].strip() if lines else err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
