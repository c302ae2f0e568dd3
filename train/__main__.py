"""`python -m train`: fine-tune a converted checkpoint on packed .rec data.

Options are fine-tune.py's (with common/fit.py's and common/data.py's), with its defaults; `--recipe transfer`
sets our transfer-learning defaults instead. See train/config.py for every default and
docs/finetune-migration.md for the flag table.

    python -m train --pretrained-model out/model/vgg16 --data-train out/rec/x_train.rec \\
        --data-val out/rec/x_val.rec --model-prefix out/train/vgg16-ft --num-epochs 10 --lr 0.01 \\
        --recipe transfer --lr-mult '^conv[1-3]_=0' --lr-mult '^fc_=10'
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import mxnet as mx  # noqa: F401  - in a DMLC server/scheduler role this import runs the ps-lite loop

from train.config import build_parser, config_from_args, parse_with_recipe

COMMANDS = """other commands:
  python -m train lr-find OPTIONS      learning-rate range test with these options (train/lr_find.py)
  python -m train evaluate PREFIX EPOCH DATA.rec   accuracy and loss of a checkpoint (train.predict evaluate)
  python -m train report PREFIX EPOCH DATA.rec --out DIR   HTML evaluation report (train.predict report)
  python -m train.predict PREFIX EPOCH DATA --out FILE     predictions (CSV/JSON)"""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lr-find"]:  # the learning-rate range test, with this parser's options (train/lr_find.py)
        from train.lr_find import main as lr_find_main
        return lr_find_main(argv[1:])
    if argv[:1] in (["evaluate"], ["report"]):  # train.predict's, reachable from here as --help lists them
        from train.predict.cli import main as predict_main
        return predict_main(argv)
    from recbuild.publish import PrefixBusy, PublishError, output_error_line
    from train.data import DataError
    from train.fit import TrainError, TrainingDiverged, fit, resolve_load_epoch

    parser = build_parser("python -m train", __doc__.split("\n\n")[0], COMMANDS)
    args = parse_with_recipe(parser, argv)
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
    if cfg.test_io:
        print(f"--test-io: read the training data in {time.time() - started:.0f} s; nothing trained or written.")
        return 0
    print(summary(cfg, result, time.time() - started))
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


def summary(cfg, result, seconds: float) -> str:
    """The run's last line: its figures and the files it wrote, naming only files that exist."""
    from symbols.checkpoint import list_epochs
    last = result.metrics[-1] if result.metrics else {}
    val = (f", val accuracy {last['val_accuracy']:.3f} (loss {last['val_loss']:.3f})"
           if "val_accuracy" in last else "")
    epochs = list_epochs(result.prefix)
    files = []
    if epochs:
        states = Path(f"{result.prefix}-{epochs[-1]:04d}.states").is_file()
        files.append(f"checkpoints {result.prefix}-NNNN.params{'/.states' if states else ''} "
                     f"(last {result.prefix}-{epochs[-1]:04d}.params)")
    metrics = [s for s in ("csv", "json", "png") if Path(f"{result.prefix}-metrics.{s}").is_file()]
    if metrics:
        files.append(f"metrics {result.prefix}-metrics.{'/.'.join(metrics)}")
    if Path(f"{cfg.model_prefix}-config.json").is_file():
        files.append(f"config {cfg.model_prefix}-config.json")
    written = ", ".join(files) or "no files written"
    return (f"Trained {result.num_classes} classes for {cfg.num_epochs} epochs in {seconds:.0f} s: "
            f"train accuracy {last.get('train_accuracy', float('nan')):.3f}{val}, "
            f"{last.get('img_per_s', 0):.1f} img/s. {written[:1].upper()}{written[1:]}.")


if __name__ == "__main__":
    sys.exit(main())
