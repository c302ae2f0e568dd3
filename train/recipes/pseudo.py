"""Pseudo-labels: add confident test predictions to the training set, retrain, report the validation change.

    python -m train.recipes pseudo out/train/vgg16-ft 10 --test out/rec/x_test.rec --threshold 0.95 \\
        --out-prefix out/train/vgg16-pl [--num-epochs 10] [--mirror]

1. The model PREFIX-EPOCH predicts every record of the test .rec (file order; `--mirror` averages with the
   mirror image). Records whose top probability is >= the threshold are kept with that class as label.
2. OUT_PREFIX_train.rec (+ .idx, + class map) is written atomically with recbuild.recordio: every training
   record (labels and image bytes unchanged), then the kept test records (image bytes untouched, label
   replaced); keys are 0..n-1 and every header id equals its key.
   OUT_PREFIX_pseudo.csv lists the kept test ids (the submission's ids), labels and confidences.
3. The model is retrained with the configuration of the run that made it (PREFIX-config.json, written by
   `python -m train` and by the feature cache), with only the training .rec and the prefix changed, by the
   same route: full fine-tuning, the feature cache, or (when PREFIX-stages.json exists) the same staged
   schedule (`--num-epochs` does not apply to a schedule).
4. Both models are evaluated on the validation .rec with the same code; the report (printed and written to
   OUT_PREFIX-pseudo.json) gives accuracy and log loss before and after, and their change.
5. With --out, the retrained model predicts the test .rec into a submission (train.predict.submission: the
   same ids and formats as `train.predict`).
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional

import numpy as np

from recbuild.classmap import write_class_map
from recbuild.atomic import atomic_open, write_json
from recbuild.recordio import RecordIOError, RecordWriter, iter_records, pack_header, unpack_header
from train import config as train_config
from train.config import TrainConfig, config_path
from train.fit import TrainError, fit
from train.predict import evaluate, load_model
from train.predict.submission import SubmissionFormat, submission_ids, write_submission
from train.recipes.ensemble import batch_for, predict_rec
from train.recipes.sampling import remove_stale_companions, with_record_id

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.95   # a confident minority: mislabelled pseudo-labels cost more than the extra data gains


def load_run_config(prefix: str) -> TrainConfig:
    """The resolved config of the run that wrote PREFIX (PREFIX-config.json), without its 'resolved' block.

    Uses train.config's own reader of run configs where it has one (`load_run_config`); until then the
    fields are restored here from the dataclass's own declaration: JSON turns tuples into lists, and every
    field whose default is a tuple (or declared Tuple) gets one back, so nothing is listed by hand.
    """
    path = config_path(prefix)
    if not path.is_file():
        raise TrainError(f"{path}: missing; pseudo-labelling retrains with the config of the run that made "
                         f"{prefix} (written by `python -m train` / `python -m train.recipes features`)")
    shared = getattr(train_config, "load_run_config", None)
    if shared is not None:
        return shared(prefix)
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("resolved", None)
    for spec in fields(TrainConfig):
        declared_tuple = "Tuple" in str(spec.type) or isinstance(spec.default, tuple)
        if declared_tuple and isinstance(data.get(spec.name), list):
            data[spec.name] = tuple(data[spec.name])
    return TrainConfig.from_dict(data)


def write_pseudo_rec(train_rec, test_rec, test_probs: np.ndarray, threshold: float, out_rec,
                     class_names=None) -> dict:
    """Write OUT_REC = train records + test records with top probability >= threshold (label = argmax).

    Both inputs are streamed record by record (nothing but the predictions is held in memory). Keys are 0..n-1
    and every header id equals its key (so `python -m recbuild verify` passes); train records keep their labels
    and image bytes, kept test records get one label, the predicted class. Written with recbuild.recordio.
    """
    confidence = test_probs.max(axis=1)
    predicted = test_probs.argmax(axis=1)
    kept = np.flatnonzero(confidence >= threshold)
    keep = set(int(i) for i in kept)
    out_rec = Path(out_rec)
    counts = {"train": 0, "test": 0}
    with atomic_open(out_rec, "wb") as rec_handle:
        writer = RecordWriter(rec_handle)
        for which, path in (("train", train_rec), ("test", test_rec)):
            for position, payload in _records_of(Path(path)):
                counts[which] += 1
                key = len(writer.index)
                if which == "train":
                    writer.write(key, with_record_id(payload, key))
                elif position in keep:
                    _, image = unpack_header(payload)
                    writer.write(key, pack_header([float(predicted[position])], key, False) + image)
        if counts["test"] != len(test_probs):
            raise TrainError(f"{test_rec}: {counts['test']} records but {len(test_probs)} predictions")
        remove_stale_companions(out_rec)            # an older .idx / pack sidecar must not describe the new .rec
    with atomic_open(out_rec.with_suffix(".idx"), "w", encoding="ascii", newline="\n") as idx_handle:
        writer.write_index(idx_handle)
    if class_names:
        write_class_map(out_rec.with_suffix(""), class_names)
    return {"train_records": counts["train"], "test_records": counts["test"], "added": int(len(kept)),
            "kept_index": kept.tolist(), "kept_label": predicted[kept].tolist(),
            "kept_confidence": confidence[kept].tolist()}


def _records_of(path: Path):
    """(position, payload) of every record of a .rec in file order; a damaged file is a TrainError naming it."""
    try:
        with open(path, "rb") as handle:
            for position, (_, payload) in enumerate(iter_records(handle, path.stat().st_size)):
                yield position, payload
    except (OSError, RecordIOError) as err:
        raise TrainError(f"{path}: cannot read records ({err})") from None


def pseudo_label(prefix: str, epoch: int, test_rec, out_prefix: str, threshold: float = DEFAULT_THRESHOLD,
                 data_val: Optional[str] = None, num_epochs: Optional[int] = None, mirror: bool = False,
                 batch_size: int = 32, cache_dir=None, out_csv=None, fmt: Optional[SubmissionFormat] = None
                 ) -> dict:
    """The whole recipe (see the module docstring); returns the report. With `out_csv`, the retrained model
    then predicts the test .rec into that submission (train.predict.submission, `fmt` its layout)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"--threshold {threshold}: must be in (0, 1]")
    cfg = load_run_config(prefix)
    resolved = json.loads(config_path(prefix).read_text(encoding="utf-8")).get("resolved", {})
    data_val = data_val or cfg.data_val
    if not data_val:
        raise TrainError(f"{config_path(prefix)}: the run had no --data-val; pass --data-val to measure the change")
    batch_size = batch_for(batch_size, test_rec, data_val)
    model = load_model(prefix, epoch, batch_size)
    test = predict_rec(model, test_rec, mirror)
    before = evaluate(model, Path(data_val), top_k=0)
    out_rec = Path(f"{out_prefix}_train.rec")
    added = write_pseudo_rec(cfg.data_train, test_rec, test.probs, threshold, out_rec, model.class_names)
    test_ids = submission_ids(test.names, (fmt or SubmissionFormat()).id_mode)   # the submission's ids
    with atomic_open(f"{out_prefix}_pseudo.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "confidence"])
        for i, label, conf in zip(added["kept_index"], added["kept_label"], added["kept_confidence"]):
            writer.writerow([test_ids[i], model.class_names[label], f"{conf:.6g}"])
    log.info("pseudo-labels: %d of %d test records at confidence >= %g added to %d training records -> %s",
             added["added"], added["test_records"], threshold, added["train_records"], out_rec)

    new_cfg = replace(cfg, data_train=str(out_rec), data_val=str(data_val), model_prefix=str(out_prefix),
                      load_epoch=None, overwrite=True, num_epochs=num_epochs or cfg.num_epochs,
                      lr_step_epochs=tuple(e for e in cfg.lr_step_epochs if e < (num_epochs or cfg.num_epochs)))
    final_epoch = new_cfg.num_epochs
    from train.recipes.stages import parse_schedule, run_stages, stages_path
    if stages_path(prefix).is_file():  # a staged model is retrained with its own schedule
        record = json.loads(stages_path(prefix).read_text(encoding="utf-8"))
        schedule = parse_schedule({"stages": [{k: v for k, v in st.items() if v is not None}
                                              for st in record["schedule"]]}, str(stages_path(prefix)))
        final_epoch = sum(st.epochs for st in schedule)
        run_stages(replace(new_cfg, num_epochs=final_epoch), schedule)
    elif resolved.get("recipe") == "features":
        from train.recipes.features import DEFAULT_CACHE_DIR, train_from_cache
        train_from_cache(new_cfg, cache_dir or DEFAULT_CACHE_DIR, mirror=bool(resolved.get("mirror")),
                         class_balance=bool(resolved.get("class_balance")))
    else:
        fit(new_cfg)
    retrained = load_model(out_prefix, final_epoch, batch_size)
    after = evaluate(retrained, Path(data_val), top_k=0)
    report = {"model": f"{prefix}:{epoch}", "retrained": f"{out_prefix}:{final_epoch}",
              "threshold": threshold, "test": str(test_rec), "val": str(data_val),
              "train_records": added["train_records"], "test_records": added["test_records"],
              "added": added["added"], "pseudo_rec": str(out_rec),
              "val_accuracy_before": before["accuracy"], "val_accuracy_after": after["accuracy"],
              "val_accuracy_change": after["accuracy"] - before["accuracy"],
              "val_log_loss_before": before["log_loss"], "val_log_loss_after": after["log_loss"]}
    if out_csv is not None:
        final = predict_rec(retrained, test_rec, mirror)
        write_submission(out_csv, final.names, final.probs, retrained.class_names, fmt or SubmissionFormat())
        report["csv"] = str(out_csv)
    write_json(f"{out_prefix}-pseudo.json", report)
    return report
