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
from typing import List, Optional

COMMANDS = ("features", "fuse", "stages", "fit", "ensemble", "pseudo")


def _train_parser(command: str, description: str) -> argparse.ArgumentParser:
    from train.__main__ import build_parser
    p = build_parser()
    p.prog = f"python -m train.recipes {command}"
    p.description = description
    return p


def _summary(result, started: float, what: str) -> str:
    last = result.metrics[-1] if result.metrics else {}
    val = (f", val accuracy {last['val_accuracy']:.3f} (loss {last['val_loss']:.3f})"
           if "val_accuracy" in last else "")
    return (f"{what}: {result.num_classes} classes, {result.last_epoch} epochs in {time.time() - started:.1f} s: "
            f"train accuracy {last.get('train_accuracy', float('nan')):.3f}{val}. Checkpoint "
            f"{result.prefix}-{result.last_epoch:04d}.params (full model), metrics {result.prefix}-metrics.csv.")


def _features(argv: List[str]) -> int:
    from train.__main__ import config_from_args
    from train.recipes.features import DEFAULT_CACHE_DIR, train_from_cache
    p = _train_parser("features", "Train a new head on cached backbone features; writes the full model.")
    g = p.add_argument_group("feature cache")
    g.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where feature files are kept")
    g.add_argument("--mirror", action="store_true", help="cache mirrored views too; one per image per epoch")
    g.add_argument("--class-balance", action="store_true", help="class-balanced sampling of each epoch")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N epochs (0: last only)")
    args = p.parse_args(argv)
    started = time.time()
    result = train_from_cache(config_from_args(args), args.cache_dir, args.mirror, args.class_balance,
                              args.save_every)
    print(_summary(result, started, "Head trained from cached features"))
    return 0


def _fit(argv: List[str]) -> int:
    from train.__main__ import config_from_args
    from train.fit import fit
    from train.recipes.sampling import epoch_rec_provider
    p = _train_parser("fit", "`python -m train` with class-balanced sampling.")
    p.add_argument("--class-balance", action="store_true",
                   help="each epoch draws N records with every class equally likely (resampled .rec per epoch)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    started = time.time()
    provider = epoch_rec_provider(cfg.data_train, cfg.model_prefix, cfg.seed) if args.class_balance else None
    result = fit(cfg, epoch_train_rec=provider)
    print(_summary(result, started, "Fine-tuned" + (" (class-balanced)" if args.class_balance else "")))
    return 0


def _stages(argv: List[str]) -> int:
    from train.__main__ import config_from_args
    from train.recipes.stages import load_schedule, run_stages, stages_path
    p = _train_parser("stages", "Staged fine-tuning from a JSON schedule (see train/recipes/stages.py).")
    g = p.add_argument_group("stages")
    g.add_argument("--schedule", required=True, help="JSON schedule file")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint, mid-stage or not")
    g.add_argument("--until-epoch", type=int, default=None, help="stop after this global epoch")
    args = p.parse_args(argv)
    stages = load_schedule(args.schedule)
    cfg = config_from_args(args)
    started = time.time()
    result = run_stages(cfg, stages, args.resume, args.until_epoch)
    print(_summary(result, started, f"Staged fine-tuning ({len(stages)} stages)") +
          f" Stage record {stages_path(cfg.model_prefix)}.")
    return 0


def _fuse(argv: List[str]) -> int:
    from train.recipes.ensemble import parse_model
    from train.recipes.fusion import fuse
    p = argparse.ArgumentParser(prog="python -m train.recipes fuse",
                                description="Fuse two converted models into one symbol (input contract in "
                                            "train/recipes/fusion.py).")
    p.add_argument("--model", action="append", required=True, metavar="PREFIX[:EPOCH]",
                   help="twice; EPOCH defaults to 0 (a converted model)")
    p.add_argument("--out", required=True, help="output prefix (epoch 0 + sidecar)")
    p.add_argument("--input-size", default=None, help="H,W of the fused input (default: the larger model's)")
    p.add_argument("--num-classes", type=int, default=2, help="placeholder head width (fine-tuning replaces it)")
    p.add_argument("--layer-before-fullc", action="append", default=None,
                   help="per model, where its features are taken (give twice, or not at all)")
    args = p.parse_args(argv)
    models = [parse_model(m) if ":" in m else (m, 0) for m in args.model]
    size = None
    if args.input_size:
        try:
            size = tuple(int(v) for v in args.input_size.split(","))
        except ValueError:
            size = ()
        if len(size) != 2:
            raise ValueError(f"--input-size {args.input_size!r}: expected H,W, e.g. 299,299")
    layers = args.layer_before_fullc or [None, None]
    if len(layers) != 2:
        raise ValueError("--layer-before-fullc: give it once per model (twice) or not at all")
    out = fuse(models, args.out, args.num_classes, size, layers)
    print(f"Fused {models[0][0]} + {models[1][0]} -> {out}-symbol.json / -0000.params / -preprocess.json "
          f"(input: 'data', RGB pixels 0..255). Fine-tune it like any converted model.")
    return 0


def _ensemble(argv: List[str]) -> int:
    from train.recipes.ensemble import format_report, parse_model, run_ensemble
    p = argparse.ArgumentParser(prog="python -m train.recipes ensemble",
                                description="Ensemble checkpoints; weights searched on the validation split only.")
    p.add_argument("--model", action="append", required=True, metavar="PREFIX:EPOCH", help="two or more")
    p.add_argument("--val", required=True, help="labelled validation .rec (the only data the weights see)")
    p.add_argument("--test", default=None, help=".rec to predict with the searched weights")
    p.add_argument("--out", type=Path, default=None, help="Kaggle CSV of the test predictions")
    p.add_argument("--mirror", action="store_true", help="TTA: average each model with the mirror image")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)
    if args.out and not args.test:
        raise ValueError("--out needs --test")
    report = run_ensemble([parse_model(m) for m in args.model], args.val, args.test, args.out, args.mirror,
                          args.batch_size, args.json)
    print(format_report(report))
    if "test" in report:
        print(f"Test: {report['test']['images']} images" +
              (f" -> {report['test']['csv']}" if "csv" in report["test"] else ""))
    return 0


def _pseudo(argv: List[str]) -> int:
    from train.recipes.pseudo import DEFAULT_THRESHOLD, pseudo_label
    p = argparse.ArgumentParser(prog="python -m train.recipes pseudo",
                                description="Add confident test predictions to the training set, retrain, report.")
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
    args = p.parse_args(argv)
    r = pseudo_label(args.prefix, args.epoch, args.test, args.out_prefix, args.threshold, args.data_val,
                     args.num_epochs, args.mirror, args.batch_size, args.cache_dir)
    print(f"Pseudo-labels: added {r['added']} of {r['test_records']} test images (confidence >= {r['threshold']:g}) "
          f"to {r['train_records']} training images -> {r['pseudo_rec']}; retrained {r['retrained']}. Validation "
          f"accuracy {r['val_accuracy_before']:.4f} -> {r['val_accuracy_after']:.4f} "
          f"({r['val_accuracy_change']:+.4f}), log loss {r['val_log_loss_before']:.4f} -> "
          f"{r['val_log_loss_after']:.4f}. Report {args.out_prefix}-pseudo.json.")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import mxnet as mx

    from train.data import DataError
    from train.fit import TrainError, TrainingDiverged
    from train.predict import PredictError
    handler = {"features": _features, "fuse": _fuse, "stages": _stages, "fit": _fit, "ensemble": _ensemble,
               "pseudo": _pseudo}[argv[0]]
    try:
        return handler(argv[1:])
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (TrainError, DataError, PredictError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except mx.base.MXNetError as err:  # e.g. an input size the network cannot take: MXNet's own first line
        lines = [ln for ln in str(err).splitlines() if ln.strip() and "Traceback" not in ln and "File " not in ln]
        print(f"error: MXNet refused the network or data: {lines[-1].strip() if lines else err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
