"""Ensembles with test-time augmentation: weights searched on the validation split only.

    python -m train.recipes ensemble --model out/train/a:10 --model out/train/b:8 --val out/rec/x_val.rec \\
        [--test out/rec/x_test.rec --out ensemble.csv] [--mirror] [--json report.json]

Each model predicts the validation .rec (optionally averaged with its mirror image: `--mirror` TTA). The
ensemble is a weighted mean of the models' probabilities; the weights minimise the validation log loss over
the simplex (w >= 0, sum 1), found by exponentiated gradient, a method for exactly this convex problem. The
test set, when given, is predicted afterwards with those fixed weights: nothing about it reaches the search.

Reported: each model's validation accuracy and log loss, the ensemble's, and the weights. All models must
have the same class names in the same order (they are checked).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from recbuild.atomic import write_json
from symbols.sidecar import sidecar_path
from train.data import check_same_classes
from train.metrics import LOG_LOSS_EPS, Tally
from train.predict import Model, PredictError, iterate, load_model
from train.predict.submission import SubmissionFormat, write_submission

log = logging.getLogger(__name__)

SEARCH_STEPS = 500     # exponentiated-gradient steps; the loss is flat to 1e-6 long before this on real sets
SEARCH_RATE = 0.5      # step size on the log weights; the gradient is bounded by 1/min p, usually ~1


@dataclass
class Predictions:
    """One model's probabilities on one .rec, in file order, with the labels read alongside."""

    probs: np.ndarray
    labels: Optional[np.ndarray]
    names: List[str]


def parse_model(text: str) -> Tuple[str, int]:
    """'PREFIX:EPOCH' -> (prefix, epoch)."""
    prefix, sep, epoch = text.rpartition(":")
    if not sep or not prefix or not epoch.isdigit():
        raise ValueError(f"--model {text!r}: expected PREFIX:EPOCH, e.g. out/train/vgg16-ft:10")
    return prefix, int(epoch)


def batch_for(batch_size: int, *recs) -> int:
    """`batch_size`, lowered to the smallest .rec's record count (ImageRecordIter refuses larger batches).

    Counts come from the pack sidecars, or one cached header scan per file."""
    from train.data import record_count
    counts = [record_count(r) for r in recs if r is not None]
    if any(c == 0 for c in counts):
        raise PredictError(f"{[r for r, c in zip(recs, counts) if c == 0][0]}: contains no records")
    return max(1, min([batch_size] + counts))


def predict_rec(model: Model, rec, mirror: bool = False) -> Predictions:
    """Probabilities of every record of `rec` (with mirror TTA when asked)."""
    names, chunks, labels = [], [], []
    for batch_names, probs, batch_labels in iterate(model, Path(rec), mirror):
        names += batch_names
        chunks.append(probs)
        if batch_labels is not None:
            labels.append(batch_labels)
    if not chunks:
        raise PredictError(f"{rec}: no records")
    return Predictions(np.concatenate(chunks), np.concatenate(labels) if labels else None, names)


def scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy and log loss of `probs`, tallied by train.metrics.Tally like every other evaluation."""
    tally = Tally()
    tally.update(probs, labels)
    return tally.result()


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return scores(probs, labels)["loss"]


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return scores(probs, labels)["accuracy"]


def search_weights(val_probs: Sequence[np.ndarray], val_labels: np.ndarray, steps: int = SEARCH_STEPS,
                   rate: float = SEARCH_RATE) -> np.ndarray:
    """Weights on the simplex minimising the validation log loss of sum_j w_j * P_j.

    Takes the validation predictions only, so the test split cannot influence the result. The answer is
    never worse on validation than the best single model or the uniform mean (both are checked at the end).
    """
    labels = val_labels.astype(np.int64)
    picked = np.stack([p[np.arange(len(labels)), labels] for p in val_probs], axis=1)  # (N, M)
    m = picked.shape[1]

    def loss(w):
        return float(-np.log(np.clip(picked @ w, LOG_LOSS_EPS, None)).mean())

    w = np.full(m, 1.0 / m)
    for _ in range(steps):
        mix = np.clip(picked @ w, LOG_LOSS_EPS, None)
        grad = -(picked / mix[:, None]).mean(axis=0)
        w = w * np.exp(-rate * (grad - grad.min()))  # shifting the gradient leaves the normalised step unchanged
        w /= w.sum()
    candidates = [w, np.full(m, 1.0 / m)] + [np.eye(m)[j] for j in range(m)]
    return min(candidates, key=loss)


def run_ensemble(models: Sequence[Tuple[str, int]], val_rec, test_rec=None, out_csv=None, mirror: bool = False,
                 batch_size: int = 32, report_json=None, fmt: Optional[SubmissionFormat] = None) -> dict:
    """Predict val (and test) with every model, search weights on val, report, write the test submission
    (train.predict.submission, the writer `train.predict` uses: same ids, `fmt` its layout).

    Returns:
        {"weights": {...}, "models": [{"model", "val_accuracy", "val_log_loss"}...], "ensemble": {...}}
    """
    if len(models) < 2:
        raise ValueError("an ensemble needs at least two --model PREFIX:EPOCH")
    batch_size = batch_for(batch_size, val_rec, test_rec)
    loaded = [load_model(p, e, batch_size) for p, e in models]
    names = loaded[0].class_names
    for (p, _), m in zip(models[1:], loaded[1:]):  # one class map for all: the models' sidecars must agree
        check_same_classes(names, str(sidecar_path(models[0][0])), m.class_names, str(sidecar_path(p)))
    val = [predict_rec(m, val_rec, mirror) for m in loaded]
    if val[0].labels is None:
        raise PredictError(f"{val_rec}: the validation split must be labelled (.rec)")
    labels = val[0].labels
    weights = search_weights([v.probs for v in val], labels)
    mixed = sum(w * v.probs for w, v in zip(weights, val))
    keys = [f"{p}:{e}" for p, e in models]
    report = {"val": str(val_rec), "mirror_tta": mirror, "weights": dict(zip(keys, map(float, weights))),
              "models": [{"model": k, "val_accuracy": accuracy(v.probs, labels),
                          "val_log_loss": log_loss(v.probs, labels)} for k, v in zip(keys, val)],
              "ensemble": {"val_accuracy": accuracy(mixed, labels), "val_log_loss": log_loss(mixed, labels)}}
    if test_rec is not None:
        test = [predict_rec(m, test_rec, mirror) for m in loaded]
        probs = sum(w * t.probs for w, t in zip(weights, test))
        report["test"] = {"rec": str(test_rec), "images": int(len(probs))}
        if test[0].labels is not None:
            report["test"].update(accuracy=accuracy(probs, test[0].labels))
        if out_csv is not None:
            write_submission(out_csv, test[0].names, probs, names, fmt or SubmissionFormat())
            report["test"]["csv"] = str(out_csv)
    if report_json is not None:
        write_json(report_json, report)
    return report


def format_report(report: dict) -> str:
    lines = [f"{'model':<40} {'weight':>7} {'val acc':>8} {'val logloss':>11}"]
    for row in report["models"]:
        lines.append(f"{row['model']:<40} {report['weights'][row['model']]:>7.3f} {row['val_accuracy']:>8.4f} "
                     f"{row['val_log_loss']:>11.4f}")
    ens = report["ensemble"]
    lines.append(f"{'ensemble' + (' (mirror TTA)' if report['mirror_tta'] else ''):<40} {1.0:>7.3f} "
                 f"{ens['val_accuracy']:>8.4f} {ens['val_log_loss']:>11.4f}")
    return "\n".join(lines)
