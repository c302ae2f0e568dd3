"""`python -m train`: fine-tune a converted checkpoint on packed .rec data.

Options keep fine-tune.py's and fit.py's names; see train/config.py for every default and why.

    python -m train --pretrained-model out/model/vgg16 --data-train out/rec/x_train.rec \\
        --data-val out/rec/x_val.rec --model-prefix out/train/vgg16-ft --num-epochs 10 --lr 0.01 \\
        --lr-mult '^conv[1-3]_=0' --lr-mult '^fc8_=10'
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import fields
from typing import List, Optional

import mxnet as mx  # noqa: F401  - in a DMLC server/scheduler role this import runs the ps-lite loop

from train.config import DTYPES, KV_STORES, OPTIMIZERS, SCHEDULERS, TrainConfig

D = TrainConfig()  # the defaults, from their one place


def _ints(text: str):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str):
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("pretrained model")
    g.add_argument("--pretrained-model", default=D.pretrained_model, help="PREFIX of the converted checkpoint")
    g.add_argument("--pretrained-epoch", type=int, default=D.pretrained_epoch)
    g.add_argument("--layer-before-fullc", default=D.layer_before_fullc,
                   help="attach the new head after this layer (default: VGG's declared head, else the sidecar's)")
    g.add_argument("--num-classes", type=int, default=D.num_classes,
                   help="default: the class map's size; checked against the labels in the .rec files")
    g.add_argument("--hidden", type=int, default=D.hidden, help="width of an extra hidden head layer (0: none)")
    g.add_argument("--hidden-dropout", type=float, default=D.hidden_dropout)
    g = p.add_argument_group("data")
    g.add_argument("--data-train", default=D.data_train, help=".rec of the training set")
    g.add_argument("--data-val", default=D.data_val, help=".rec of the validation set")
    g.add_argument("--image-shape", type=_ints, default=D.image_shape, help="C,H,W (default: the sidecar's)")
    g.add_argument("--batch-size", type=int, default=D.batch_size, help="per worker, across all its devices")
    g.add_argument("--num-examples", type=int, default=D.num_examples,
                   help="fit.py's epoch size; the records are counted, this is only checked against them")
    g.add_argument("--resize", type=int, default=D.resize, help="shorter side before cropping (-1: as packed)")
    g.add_argument("--data-nthreads", type=int, default=D.data_nthreads)
    g.add_argument("--rgb-mean", type=_floats, default=D.rgb_mean, help="override the sidecar's mean (R,G,B)")
    g.add_argument("--rgb-std", type=_floats, default=D.rgb_std, help="override the sidecar's std (R,G,B)")
    g = p.add_argument_group("augmentation")
    g.add_argument("--random-crop", type=int, default=int(D.random_crop), help="1: random crop instead of centre")
    g.add_argument("--random-resized-crop", type=int, default=int(D.random_resized_crop),
                   help="1: Inception-style crop of --min/max-random-area and aspect ratio, resized")
    g.add_argument("--min-random-area", type=float, default=D.min_random_area)
    g.add_argument("--max-random-area", type=float, default=D.max_random_area)
    g.add_argument("--min-random-aspect-ratio", type=float, default=D.min_random_aspect_ratio)
    g.add_argument("--max-random-aspect-ratio", type=float, default=D.max_random_aspect_ratio)
    g.add_argument("--random-mirror", type=int, default=int(D.random_mirror))
    g.add_argument("--max-random-rotate-angle", type=int, default=D.max_random_rotate_angle)
    g.add_argument("--brightness", type=float, default=D.brightness)
    g.add_argument("--contrast", type=float, default=D.contrast)
    g.add_argument("--saturation", type=float, default=D.saturation)
    g.add_argument("--pca-noise", type=float, default=D.pca_noise)
    g = p.add_argument_group("schedule and optimizer")
    g.add_argument("--num-epochs", type=int, default=D.num_epochs)
    g.add_argument("--lr", type=float, default=D.lr)
    g.add_argument("--lr-scheduler", choices=SCHEDULERS, default=D.lr_scheduler)
    g.add_argument("--lr-factor", type=float, default=D.lr_factor)
    g.add_argument("--lr-step-epochs", type=_ints, default=D.lr_step_epochs)
    g.add_argument("--warmup-epochs", type=float, default=D.warmup_epochs)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=D.optimizer)
    g.add_argument("--mom", type=float, default=D.mom)
    g.add_argument("--wd", type=float, default=D.wd)
    g.add_argument("--lr-mult", action="append", default=[], metavar="REGEX=MULT",
                   help="repeatable; parameters matching REGEX train at MULT x lr; 0 freezes; later rules win")
    g.add_argument("--dtype", choices=DTYPES, default=D.dtype)
    g = p.add_argument_group("devices")
    g.add_argument("--gpus", default=D.gpus, help="e.g. 0,1 (default: CPU)")
    g.add_argument("--cpus", type=int, default=D.cpus, help="CPU contexts to train on without --gpus")
    g.add_argument("--kv-store", choices=KV_STORES, default=D.kv_store)
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--model-prefix", default=D.model_prefix)
    g.add_argument("--load-epoch", type=int, default=D.load_epoch,
                   help="resume MODEL_PREFIX-NNNN (params + optimizer state); not the pretrained epoch")
    g.add_argument("--overwrite", action="store_true", help="start afresh over existing checkpoints")
    g.add_argument("--disp-batches", type=int, default=D.disp_batches)
    g.add_argument("--top-k", type=int, default=D.top_k)
    g.add_argument("--seed", type=int, default=D.seed)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """The CLI edge: argparse namespace -> TrainConfig (bool flags given as 0/1 like fit.py's)."""
    values = {f.name: getattr(ns, f.name) for f in fields(TrainConfig)}
    for name in ("random_crop", "random_resized_crop", "random_mirror"):
        values[name] = bool(values[name])
    return TrainConfig(**values)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lr-find"]:  # the learning-rate range test, with this parser's options (train/lr_find.py)
        from train.lr_find import main as lr_find_main
        return lr_find_main(argv[1:])
    from train.data import DataError
    from train.fit import TrainError, TrainingDiverged, fit

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    started = time.time()
    try:
        result = fit(cfg)
    except (TrainError, DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        from train.fit import Checkpointer
        done = [e for e in Checkpointer(cfg.model_prefix).existing_epochs() if e > 0]
        hint = (f"last complete checkpoint {cfg.model_prefix}-{done[-1]:04d}.params; resume with the same command "
                f"plus --load-epoch {done[-1]}" if done else "no epoch finished")
        print(f"\ninterrupted: {hint}", file=sys.stderr)
        return 130
    last = result.metrics[-1] if result.metrics else {}
    val = (f", val accuracy {last['val_accuracy']:.3f} (loss {last['val_loss']:.3f})"
           if "val_accuracy" in last else "")
    print(f"Trained {result.num_classes} classes for {cfg.num_epochs} epochs in {time.time() - started:.0f} s: "
          f"train accuracy {last.get('train_accuracy', float('nan')):.3f}{val}, "
          f"{last.get('img_per_s', 0):.1f} img/s. Checkpoints {result.prefix}-NNNN.params"
          f"{'' if 'dist' in cfg.kv_store else '/.states'}, "
          f"metrics {result.prefix}-metrics.csv/.png, config {cfg.model_prefix}-config.json.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
