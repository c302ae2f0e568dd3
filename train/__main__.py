"""`python -m train`: fine-tune a converted checkpoint on packed .rec data.

Options keep fine-tune.py's and fit.py's names; see train/config.py for every default and why.

    python -m train --pretrained-model out/model/vgg16 --data-train out/rec/x_train.rec \\
        --data-val out/rec/x_val.rec --model-prefix out/train/vgg16-ft --num-epochs 10 --lr 0.01 \\
        --lr-mult '^conv[1-3]_=0' --lr-mult '^fc8_=10'
"""
from __future__ import annotations

import logging
import sys
import time
from typing import List, Optional

import mxnet as mx  # noqa: F401  - in a DMLC server/scheduler role this import runs the ps-lite loop

from train.config import build_parser, config_from_args


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lr-find"]:  # the learning-rate range test, with this parser's options (train/lr_find.py)
        from train.lr_find import main as lr_find_main
        return lr_find_main(argv[1:])
    from recbuild.publish import PrefixBusy, PublishError, output_error_line
    from train.data import DataError
    from train.fit import TrainError, TrainingDiverged, fit, resolve_load_epoch

    args = build_parser("python -m train", __doc__.split("\n\n")[0]).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    started = time.time()
    try:
        cfg = resolve_load_epoch(cfg)  # --load-epoch's one rule (fine-tune.py's pretrained epoch / resume)
        result = fit(cfg)
    except (TrainError, DataError, ValueError, FileNotFoundError, PrefixBusy, PublishError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except OSError as err:  # disk full, read-only folder, an output path that is a folder: nothing half-written
        print(f"{output_error_line(err)}; {_resume_hint(cfg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {_resume_hint(cfg)}", file=sys.stderr)
        return 130
    last = result.metrics[-1] if result.metrics else {}
    val = (f", val accuracy {last['val_accuracy']:.3f} (loss {last['val_loss']:.3f})"
           if "val_accuracy" in last else "")
    print(f"Trained {result.num_classes} classes for {cfg.num_epochs} epochs in {time.time() - started:.0f} s: "
          f"train accuracy {last.get('train_accuracy', float('nan')):.3f}{val}, "
          f"{last.get('img_per_s', 0):.1f} img/s. Checkpoints {result.prefix}-NNNN.params"
          f"{'' if 'dist' in cfg.kv_store else '/.states'}, "
          f"metrics {result.prefix}-metrics.csv/.png, config {cfg.model_prefix}-config.json.")
    if result.dropped:
        print(f"Pretrained parameters not carried over ({len(result.dropped)}, listed in the config as "
              f"dropped_pretrained): {', '.join(result.dropped)}.")
    return 0


def _resume_hint(cfg) -> str:
    """The resume advice: the last complete epoch on disk and the flag that continues from it."""
    from train.fit import complete_epochs
    try:
        done = complete_epochs(cfg.model_prefix)
    except Exception:  # noqa: BLE001 - advice must not mask the error it follows
        done = []
    return (f"last complete checkpoint {cfg.model_prefix}-{done[-1]:04d}.params; resume with the same command "
            f"plus --load-epoch {done[-1]}, without --pretrained-model" if done else "no epoch finished")


if __name__ == "__main__":
    sys.exit(main())
