"""Evaluation report of a checkpoint on labelled data: what `evaluate` measures, and where the errors are.

    python -m train.predict report PREFIX EPOCH DATA --out DIR [--top-losses 24] [--mirror] ...
    python -m train.report PREFIX EPOCH DATA --out DIR ...            (the same)

DATA is a labelled .rec (or .lst), read exactly as `python -m train.predict evaluate` reads it (train.predict's
`iterate`, the sidecar's preprocessing). Written to DIR, atomically: report.html (one self-contained page),
report.json, confusion.png, confusion_normalised.png, reliability.png. The page shows the confusion matrix
(counts and row-normalised, class names on the axes), per-class precision / recall / F1 / support, the most
confused class pairs, the top-loss images with their true and predicted labels and probabilities, and the
calibration: expected calibration error and a reliability diagram.

Accuracy, top-k accuracy, log loss and per-class accuracy come from the same `Tally` and the same arithmetic as
`train.predict.evaluate`, so the numbers agree exactly.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from recbuild import html_report as H
from recbuild.atomic import write_json
from recbuild.publish import PrefixBusy, PublishError, output_error_line, publish
from train.metrics import Tally, sample_losses

log = logging.getLogger(__name__)

FORMAT = "mxtransfer.evalreport/1"
TOP_LOSSES = 24         # images shown in the top-loss gallery
CONFUSED_PAIRS = 10     # most-confused (true, predicted) pairs listed
ECE_BINS = 15           # equal-width confidence bins, the usual choice since Guo et al. 2017
_ANNOTATE_UP_TO = 25    # write the count in every confusion-matrix cell up to this many classes


@dataclass
class Collected:
    """Predictions on labelled data, in file order, and the running tally `evaluate` keeps."""

    names: List[str]
    probs: np.ndarray        # (N, K)
    labels: np.ndarray       # (N,) int64
    tally: Tally
    top_k: int


def collect(model, source: Path, top_k: int = 5, mirror: bool = False, resize: int = -1,
            root: Optional[Path] = None) -> Collected:
    """Run the model over labelled data the way `train.predict.evaluate` does (same iterator, same batches, the
    same `Tally` updated batch by batch, so its sums round alike) and keep every prediction."""
    from train.predict import PredictError, labelled_batches
    top_k = top_k if top_k < len(model.class_names) else 0  # evaluate's rule: top-k of all classes is always 1
    tally = Tally(top_k)
    names: List[str] = []
    probs, labels = [], []
    for batch_names, batch_probs, batch_labels in labelled_batches(model, source, mirror, resize, root,
                                                                   needs="the report"):
        tally.update(batch_probs, batch_labels)
        names += batch_names
        probs.append(batch_probs)
        labels.append(batch_labels)
    if tally.n == 0:
        raise PredictError(f"{source}: no records")
    return Collected(names, np.concatenate(probs), np.concatenate(labels).astype(np.int64), tally, top_k)


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (labels, predicted), 1)
    return counts


def per_class(counts: np.ndarray, class_names: Sequence[str]) -> List[dict]:
    """Precision, recall, F1 and support per class from a confusion matrix (None where undefined: a class never
    predicted has no precision, a class absent from the data no recall)."""
    out = []
    for k, name in enumerate(class_names):
        tp, support, predicted = int(counts[k, k]), int(counts[k].sum()), int(counts[:, k].sum())
        precision = tp / predicted if predicted else None
        recall = tp / support if support else None
        f1 = (2 * precision * recall / (precision + recall) if precision and recall else
              (0.0 if precision is not None and recall is not None else None))
        out.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": support,
                    "predicted": predicted})
    return out


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error of the top-1 confidence over equal-width bins, and the bins themselves."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)  # (lo, hi] bins
    rows, ece = [], 0.0
    for b in range(bins):
        mine = which == b
        n = int(mine.sum())
        acc = float(correct[mine].mean()) if n else None
        conf = float(confidence[mine].mean()) if n else None
        if n:
            ece += n / len(labels) * abs(acc - conf)
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n, "accuracy": acc,
                     "confidence": conf})
    return {"ece": ece, "bins": rows}


def summarise(c: Collected, class_names: Sequence[str], top_losses: int = TOP_LOSSES) -> dict:
    """Every figure of the report, JSON-ready."""
    names, probs, labels, tally, top_k = c.names, c.probs, c.labels, c.tally, c.top_k
    k = len(class_names)
    predicted = probs.argmax(axis=1)
    counts = confusion(labels, predicted, k)
    support = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)
    off = [(int(counts[t, p]), t, p) for t in range(k) for p in range(k) if t != p and counts[t, p]]
    losses = sample_losses(probs, labels)
    # Only mistakes: with few errors, the highest losses would otherwise include correct predictions.
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-losses[wrong], kind="stable")][:top_losses]
    result = {"format": FORMAT, "images": tally.n, "accuracy": tally.correct / tally.n,
              "log_loss": tally.loss / tally.n}
    if top_k > 1:
        result[f"top_{top_k}_accuracy"] = tally.correct_k / tally.n
    result.update({
        "per_class_accuracy": {name: (int(counts[c, c]) / int(support[c, 0]) if support[c, 0] else None)
                               for c, name in enumerate(class_names)},
        "class_names": list(class_names), "confusion": counts.tolist(), "confusion_normalised": normalised.tolist(),
        "per_class": per_class(counts, class_names),
        "most_confused": [{"true": class_names[t], "predicted": class_names[p], "count": n,
                           "fraction_of_true": n / int(support[t, 0])}
                          for n, t, p in sorted(off, key=lambda x: (-x[0], x[1], x[2]))[:CONFUSED_PAIRS]],
        "top_losses": [{"position": int(i), "name": names[i], "true": class_names[labels[i]],
                        "predicted": class_names[predicted[i]], "loss": float(losses[i]),
                        "p_true": float(probs[i, labels[i]]), "p_predicted": float(probs[i, predicted[i]])}
                       for i in worst],
        "calibration": calibration(probs, labels)})
    return result


# ---- pictures -------------------------------------------------------------------------------------------------
def confusion_png(matrix: np.ndarray, class_names: Sequence[str], normalised: bool) -> bytes:
    """The confusion matrix as a heat map, true classes down, predicted across, class names on both axes."""
    plt = H.pyplot()
    k = len(class_names)
    side = max(4.5, 0.42 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    shown = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalised else max(1, matrix.max()))
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticklabels(class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true",
           title="confusion (row-normalised)" if normalised else "confusion (counts)")
    if k <= _ANNOTATE_UP_TO:
        top = matrix.max() if matrix.size else 1
        for t in range(k):
            for p in range(k):
                value = matrix[t, p]
                ax.text(p, t, f"{value:.2f}" if normalised else str(int(value)), ha="center", va="center",
                        fontsize=7, color="white" if value > 0.6 * (1 if normalised else top) else "black")
    return H.figure_png(fig)


def reliability_png(cal: dict) -> bytes:
    """Reliability diagram: accuracy per confidence bin against the diagonal of perfect calibration."""
    plt = H.pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    bins = [b for b in cal["bins"] if b["count"]]
    width = cal["bins"][0]["hi"] - cal["bins"][0]["lo"]
    ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge", edgecolor="k",
           alpha=0.8, label="accuracy")
    ax.bar([b["lo"] for b in bins], [b["confidence"] - b["accuracy"] for b in bins], width=width, align="edge",
           bottom=[b["accuracy"] for b in bins], color="tab:red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
           title=f"reliability, ECE {cal['ece']:.3f}")
    ax.legend(fontsize=8, loc="upper left")
    return H.figure_png(fig)


def source_images(source: Path, positions: Sequence[int], root: Optional[Path] = None) -> dict:
    """{position: decoded image} for the given positions of the data, as stored (the packed image, uncropped)."""
    import cv2
    wanted = set(int(p) for p in positions)
    out = {}
    if source.suffix == ".rec":
        from recbuild.recordio import iter_records, unpack_header
        with open(source, "rb") as handle:
            for pos, (_, payload) in enumerate(iter_records(handle, source.stat().st_size)):
                if pos in wanted:
                    out[pos] = cv2.imdecode(np.frombuffer(unpack_header(payload)[1], np.uint8), cv2.IMREAD_COLOR)
                if len(out) == len(wanted):
                    break
        return out
    from train.predict import _image_paths
    paths = _image_paths(source, root)[0]
    return {p: cv2.imread(str(paths[p]), cv2.IMREAD_COLOR) for p in wanted}


# ---- the page -------------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_html(result: dict, title: str, pngs: dict, thumbs: dict) -> str:
    """One self-contained page from `summarise`'s result, the PNGs and {position: data URI} thumbnails."""
    key = next((k for k in result if k.startswith("top_") and k.endswith("_accuracy")), None)
    headline = (f"{result['images']} images: accuracy {result['accuracy']:.4f}"
                + (f", {key.replace('_', '-').replace('-accuracy', '')} accuracy {result[key]:.4f}" if key else "")
                + f", log loss {result['log_loss']:.4f}, ECE {result['calibration']['ece']:.4f}")
    rows = [(r["class"], _fmt(r["precision"]), _fmt(r["recall"]), _fmt(r["f1"]), r["support"], r["predicted"])
            for r in result["per_class"]]
    confused = [(c["true"], c["predicted"], c["count"], f"{c['fraction_of_true']:.3f}")
                for c in result["most_confused"]]
    cards = []
    for t in result["top_losses"]:
        img = H.image(thumbs[t["position"]], t["name"], css="thumb") if t["position"] in thumbs else ""
        cards.append(f'<div class="pair">{img}<br>{H.esc(t["name"])}<br>true <b>{H.esc(t["true"])}</b> '
                     f'(p {t["p_true"]:.3f})<br>predicted <b>{H.esc(t["predicted"])}</b> (p {t["p_predicted"]:.3f})'
                     f'<br>loss {t["loss"]:.3f}</div>')
    bins = [(f"{b['lo']:.2f}-{b['hi']:.2f}", b["count"], _fmt(b["confidence"]), _fmt(b["accuracy"]))
            for b in result["calibration"]["bins"] if b["count"]]
    body = [H.paragraph(headline, "headline ok"),
            H.section("Confusion matrix", H.image(pngs["confusion"], "confusion matrix (counts)"),
                      H.image(pngs["confusion_normalised"], "confusion matrix (row-normalised)")),
            H.section("Per class", H.table(["class", "precision", "recall", "F1", "support", "predicted"], rows)),
            H.section("Most confused pairs", H.table(["true", "predicted as", "images", "fraction of true"], confused,
                                                     left=2) if confused else H.paragraph("No confusions.")),
            H.section("Top losses", H.paragraph("The misclassified images the model is most wrong about: "
                                                "mislabelled, ambiguous or hard examples.", "muted")
                      if cards else H.paragraph("No misclassified images."), "".join(cards)),
            H.section("Calibration", H.image(pngs["reliability"], "reliability diagram"),
                      H.table(["confidence bin", "images", "mean confidence", "accuracy"], bins))]
    return H.page(title, body)


def write_report(result: dict, out_dir: Path, title: str, thumbs: dict) -> dict:
    """report.json, the three PNGs and report.html in `out_dir`, published as one unit (recbuild.publish, under
    the writer lock of OUT_DIR/report); returns their paths."""
    with publish(Path(out_dir) / "report"):
        return _write_report(result, Path(out_dir), title, thumbs)


def _write_report(result: dict, out_dir: Path, title: str, thumbs: dict) -> dict:
    counts = np.array(result["confusion"])
    names = result["class_names"]
    pngs = {"confusion": confusion_png(counts, names, False),
            "confusion_normalised": confusion_png(np.array(result["confusion_normalised"]), names, True),
            "reliability": reliability_png(result["calibration"])}
    paths = {name: H.write_png(out_dir / f"{name}.png", data) for name, data in pngs.items()}
    paths["json"] = out_dir / "report.json"
    write_json(paths["json"], result)
    paths["html"] = H.write_page(out_dir / "report.html", render_html(result, title, pngs, thumbs))
    return {k: str(v) for k, v in paths.items()}


def make_report(model, source: Path, out_dir: Path, top_k: int = 5, mirror: bool = False, resize: int = -1,
                top_losses: int = TOP_LOSSES, title: Optional[str] = None) -> dict:
    """Evaluate `model` on `source` and write the report into `out_dir`. Returns the result with `paths`."""
    collected = collect(model, Path(source), top_k, mirror, resize)
    result = summarise(collected, model.class_names, top_losses)
    images = source_images(Path(source), [t["position"] for t in result["top_losses"]])
    thumbs = {p: H.thumbnail_uri(img) for p, img in images.items() if img is not None}
    result["data"] = str(source)
    result["mirror"] = mirror
    paths = write_report(result, Path(out_dir), title or f"Evaluation report: {Path(source).name}", thumbs)
    return {**result, "paths": paths}


def build_parser() -> argparse.ArgumentParser:
    """The `python -m train.predict report` command line: the model arguments of every predict form, then the
    labelled data and the report's own options."""
    from train.predict import add_model_arguments
    p = argparse.ArgumentParser(prog="python -m train.predict report", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("data", type=Path, help="labelled .rec (or .lst)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.html, report.json and the PNGs")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--top-losses", type=int, default=TOP_LOSSES, help="images in the top-loss gallery")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m train.predict report PREFIX EPOCH DATA --out DIR` (also `python -m train.report ...`)."""
    import mxnet as mx
    from train.data import DataError
    from train.predict import PredictError, load_model, resolve_epoch, trained_resize
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    ctx = [mx.gpu(i) for i in a.gpus] or None
    try:
        epoch = resolve_epoch(a.prefix, a.epoch)
        model = load_model(a.prefix, epoch, a.batch_size, ctx, a.classes, a.image_shape, a.rgb_mean, a.rgb_std)
        resize = a.resize if a.resize > 0 else trained_resize(a.prefix)
        result = make_report(model, a.data, a.out, a.top_k, a.mirror, resize, a.top_losses,
                             f"Evaluation report: {Path(a.prefix).name}-{epoch:04d} on {a.data.name}")
    except (PredictError, DataError, ValueError, PrefixBusy, PublishError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only folder, --out naming a file, ...
        print(output_error_line(err), file=sys.stderr)
        return 2
    print(f"{a.data}: {result['images']} images, accuracy {result['accuracy']:.4f}, log loss "
          f"{result['log_loss']:.4f}, ECE {result['calibration']['ece']:.4f}; report {result['paths']['html']} "
          f"(+ report.json, confusion.png, confusion_normalised.png, reliability.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
