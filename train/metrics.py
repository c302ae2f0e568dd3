"""Per-batch tallies (loss, accuracy, top-k) and the per-epoch log written as CSV, JSON and a PNG plot."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from recbuild.atomic import atomic_open, atomic_path, write_json

log = logging.getLogger(__name__)

# Probabilities are clipped here before the log, as Kaggle's log loss does, so one confident miss stays finite.
LOG_LOSS_EPS = 1e-15


def sample_losses(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each sample's cross-entropy, -log p(true class), with p clipped at LOG_LOSS_EPS (the one formula)."""
    labels = labels.astype(np.int64)
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], LOG_LOSS_EPS, 1.0))


class Tally:
    """Running cross-entropy, top-1 and top-k accuracy over (probabilities, labels) batches."""

    def __init__(self, top_k: int = 0):
        self.top_k = top_k
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.loss = 0.0
        self.correct = 0
        self.correct_k = 0

    def update(self, probs: np.ndarray, labels: np.ndarray) -> float:
        """Add a batch; returns its mean loss. Probabilities must be finite (check before calling)."""
        labels = labels.astype(np.int64)
        losses = sample_losses(probs, labels)
        self.n += len(labels)
        self.loss += float(losses.sum())
        self.correct += int((probs.argmax(axis=1) == labels).sum())
        if self.top_k > 1:
            k = min(self.top_k, probs.shape[1])
            top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
            self.correct_k += int((top == labels[:, None]).any(axis=1).sum())
        return float(losses.mean()) if len(labels) else float("nan")

    def result(self, prefix: str = "") -> Dict[str, float]:
        n = max(self.n, 1)
        out = {f"{prefix}loss": self.loss / n, f"{prefix}accuracy": self.correct / n}
        if self.top_k > 1:
            out[f"{prefix}top_{self.top_k}_accuracy"] = self.correct_k / n
        return out


class MetricsLog:
    """Rows of per-epoch metrics, rewritten atomically after every epoch as PREFIX-metrics.{csv,json,png}."""

    def __init__(self, prefix: str, rows: Optional[List[dict]] = None):
        self.prefix = str(prefix)
        self.rows: List[dict] = list(rows or [])

    @property
    def json_path(self) -> Path:
        return Path(self.prefix + "-metrics.json")

    @property
    def csv_path(self) -> Path:
        return Path(self.prefix + "-metrics.csv")

    @property
    def png_path(self) -> Path:
        return Path(self.prefix + "-metrics.png")

    @classmethod
    def load(cls, prefix: str, up_to_epoch: int) -> "MetricsLog":
        """Rows of an earlier run up to and including `up_to_epoch` (for resume); empty when none."""
        path = Path(str(prefix) + "-metrics.json")
        if not path.is_file():
            return cls(prefix)
        rows = json.loads(path.read_text(encoding="utf-8")).get("epochs", [])
        return cls(prefix, [r for r in rows if r.get("epoch", 0) <= up_to_epoch])

    def row(self, epoch: int) -> Optional[dict]:
        return next((r for r in self.rows if r.get("epoch") == epoch), None)

    def append(self, row: dict) -> None:
        self.rows = [r for r in self.rows if r.get("epoch") != row.get("epoch")] + [row]
        self.write()

    def write(self) -> None:
        """PREFIX-metrics.json and .csv (the plot is drawn separately: see `draw`)."""
        write_json(self.json_path, {"format": "mxtransfer.metrics/1", "epochs": self.rows})
        columns: List[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns and not isinstance(r[k], (dict, list))]
        with atomic_open(self.csv_path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

    def draw(self) -> None:
        """PREFIX-metrics.png, once, when a run ends: a plot is a convenience, so it is never drawn (nor
        matplotlib imported) while batches wait, and a failure to draw it only warns."""
        if not self.rows:
            return
        try:
            self.plot()
        except Exception as err:  # never lose a checkpointed run over a plot
            log.warning("could not draw %s: %s", self.png_path, err)

    def plot(self) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.rows]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
            if any(key in r for r in self.rows):
                ax_loss.plot(epochs, [r.get(key, np.nan) for r in self.rows], style, label=key)
        accuracy_keys = sorted({k for r in self.rows for k in r if k.endswith("accuracy")})
        for key in accuracy_keys:
            ax_acc.plot(epochs, [r.get(key, np.nan) for r in self.rows], "-o", label=key)
        ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(self.png_path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m train.metrics PREFIX`: draw PREFIX-metrics.png from a run's PREFIX-metrics.json, at any time
    (during a run too: the JSON is rewritten atomically after every epoch)."""
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="python -m train.metrics", description=main.__doc__.split("\n")[0])
    p.add_argument("prefix", help="the run's --model-prefix")
    a = p.parse_args(argv)
    history = MetricsLog.load(a.prefix, up_to_epoch=10 ** 9)
    if not history.rows:
        print(f"error: {history.json_path}: no epochs recorded", file=sys.stderr)
        return 2
    history.plot()
    print(f"{history.png_path}: {len(history.rows)} epoch(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
