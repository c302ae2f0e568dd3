"""What bench.scale and bench.train share: their synthetic data and net, the two commands they time, timed
processes, the interleaved schedule and the statistics.

Both benches time whole processes through their command lines (`python -m train` and `python -m
bench.stock_fit`), never the trainer's internals, so what they measure is what a user runs.
"""
from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# The sidecar both commands follow: RGB (what the converter writes by default), VGG's mean, and a scale that
# puts pixels near unit variance, so a randomly initialised net does not diverge in a benchmark.
RGB_MEAN = (123.68, 116.779, 103.939)
SCALE = 1 / 58.0


_TIME_COST = re.compile(r"Epoch\[(\d+)\] Time cost=([0-9.]+)")


class BenchError(RuntimeError):
    """A timed command failed; the message names it and its log."""


# ---- the recipe both sides train with ------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters given identically to `python -m train` and to the stock script."""

    batch_size: int = 128
    lr: float = 0.01
    mom: float = 0.9
    wd: float = 0.0005
    data_nthreads: int = 2        # both decode with the same number of threads (the CI machine has 2 cores)
    disp_batches: int = 20        # fine-tune.py's and ours' default
    seed: int = 0
    gpus: Optional[str] = None


def ours_command(net: Path, rec: Path, prefix: Path, epochs: int, recipe: Recipe,
                 lr_mult: Sequence[str] = ()) -> List[str]:
    """`python -m train` as a user runs it; --top-k 0 matches fine-tune.py's default (accuracy only) and
    --no-progress its lack of a progress bar."""
    cmd = [sys.executable, "-m", "train", "--pretrained-model", str(net), "--data-train", str(rec),
           "--model-prefix", str(prefix), "--num-epochs", str(epochs), "--batch-size", str(recipe.batch_size),
           "--lr", repr(recipe.lr), "--mom", repr(recipe.mom), "--wd", repr(recipe.wd),
           "--data-nthreads", str(recipe.data_nthreads), "--disp-batches", str(recipe.disp_batches),
           "--seed", str(recipe.seed), "--top-k", "0", "--no-progress", "--overwrite"]
    for rule in lr_mult:
        cmd += ["--lr-mult", rule]
    if recipe.gpus:
        cmd += ["--gpus", recipe.gpus]
    return cmd


def stock_command(net: Path, rec: Path, prefix: Path, epochs: int, recipe: Recipe, num_classes: int,
                  num_examples: int, image_shape: Sequence[int], fixed_params: Optional[str] = None) -> List[str]:
    """`python -m bench.stock_fit` (Module.fit) with the same data, net and recipe."""
    cmd = [sys.executable, "-m", "bench.stock_fit", "--pretrained-model", str(net), "--data-train", str(rec),
           "--model-prefix", str(prefix), "--num-epochs", str(epochs), "--batch-size", str(recipe.batch_size),
           "--lr", repr(recipe.lr), "--mom", repr(recipe.mom), "--wd", repr(recipe.wd),
           "--data-nthreads", str(recipe.data_nthreads), "--disp-batches", str(recipe.disp_batches),
           "--seed", str(recipe.seed), "--num-classes", str(num_classes), "--num-examples", str(num_examples),
           "--image-shape", ",".join(str(v) for v in image_shape), "--rgb-mean", ",".join(map(str, RGB_MEAN)),
           "--scale", repr(SCALE)]
    if fixed_params:
        cmd += ["--fixed-params", fixed_params]
    if recipe.gpus:
        cmd += ["--gpus", recipe.gpus]
    return cmd


# ---- data and net ----------------------------------------------------------------------------------------------
def write_image_tree(root: Path, count: int, classes: int, side: int, seed: int = 0,
                     height: Optional[int] = None) -> None:
    """`count` JPEGs in `classes` folders; each class has its own colour layout plus blurred noise."""
    rng = np.random.RandomState(seed)
    height = height or side
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        label = i % classes
        hue = 2 * np.pi * label / classes
        colour = 128 + 90 * np.array([np.cos(hue), np.sin(hue), -np.cos(hue)])
        img = colour + rng.normal(0, 40, (height, side, 3))
        img[: height // 2] = 255 - img[: height // 2]
        img = cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (3, 3), 0)
        cv2.imwrite(str(root / f"class{label:02d}" / f"{i:07d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])


def pack_with_recbuild(prefix: Path, root: Path, pack_args: Sequence[str] = ()) -> Path:
    """`python -m recbuild --list --recursive` then `python -m recbuild` (2 workers); returns PREFIX.rec."""
    for extra in (["--list", "--recursive"], ["--num-thread", "2", "--no-progress", *pack_args]):
        done = subprocess.run([sys.executable, "-m", "recbuild", *extra, str(prefix), str(root)], cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"python -m recbuild {' '.join(extra)} {prefix}: exit {done.returncode}: "
                             f"{done.stderr.strip()[-500:]}")
    return prefix.with_suffix(".rec")


def write_net(prefix: Path, stages: Sequence[Tuple[int, int]], fc_width: int, side: int,
              pretrained_classes: int = 1000, seed: int = 0) -> Path:
    """A VGG-named checkpoint (conv1_1 ... fc8, prob) with He-scaled seeded weights and the sidecar the
    trainer needs, as the converter writes them for an RGB model."""
    import mxnet as mx
    from symbols import vgg
    from symbols.checkpoint import save_checkpoint
    from symbols.sidecar import Preprocess, save_sidecar

    sym = vgg.vgg(pretrained_classes, stages, fc_width=fc_width)
    shapes, _, _ = sym.infer_shape(data=(1, 3, side, side))
    rng = np.random.RandomState(seed)
    args = {}
    for name, shape in zip(sym.list_arguments(), shapes):
        if name in ("data", "prob_label"):
            continue
        fan_in = max(int(np.prod(shape[1:])), 1)
        values = rng.normal(0, np.sqrt(2.0 / fan_in), shape) if name.endswith("weight") else np.zeros(shape)
        args[name] = mx.nd.array(values)
    save_checkpoint(str(prefix), 0, sym, args, {})
    save_sidecar(prefix, Preprocess(input_shape=(3, side, side), channel_order="RGB", mean=list(RGB_MEAN),
                                    scale=SCALE, classifier="fc8", feature_output="drop7_output",
                                    output_name="prob", num_classes=pretrained_classes,
                                    source={"bench": "symbol-built VGG layout, seeded weights"}))
    return prefix


# ---- timed processes ---------------------------------------------------------------------------------------------
@dataclass
class Timed:
    """One finished process: wall-clock seconds, CPU seconds (user + system, all its threads), peak resident
    memory, where its output went. CPU seconds are less sensitive than wall time to neighbours on a shared
    machine, but count any busy-waiting of the engine's threads."""

    wall_s: float
    max_rss_mb: float
    log: Path
    cpu_s: float = 0.0


def run_timed(cmd: Sequence[str], log: Path, cwd: Path = ROOT) -> Timed:
    """Run `cmd` to completion; wall time from just before the fork to the reap, peak RSS from wait4.

    Raises:
        BenchError: the command exited non-zero (its log's last lines are in the message).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; tell Popen so it does not wait again
    if proc.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise BenchError(f"{' '.join(cmd[1:3])} exited {proc.returncode}; log {log}: {tail}")
    # Linux reports ru_maxrss in KiB
    return Timed(wall, usage.ru_maxrss / 1024.0, log, usage.ru_utime + usage.ru_stime)


def epoch_seconds(ours: bool, prefix: Path, log: Path) -> List[float]:
    """Each training epoch's own clock, in epoch order, as the program itself reports it.

    Ours: the `seconds` of every epoch in PREFIX-metrics.json (the trainer's published metrics). Stock: the
    "Epoch[k] Time cost=" lines Module.fit logs. Both run from the epoch's first batch fetch to its last update
    call, and leave out checkpoint writing and the end-of-epoch bookkeeping.
    """
    if ours:
        metrics = Path(f"{prefix}-metrics.json")
        if not metrics.is_file():
            raise BenchError(f"{metrics}: python -m train wrote no metrics; log {log}")
        return [float(row["seconds"]) for row in json.loads(metrics.read_text())["epochs"]]
    found = {int(m.group(1)): float(m.group(2)) for m in _TIME_COST.finditer(log.read_text(errors="replace"))}
    if not found:
        raise BenchError(f"{log}: no 'Epoch[k] Time cost=' line from Module.fit")
    return [found[k] for k in sorted(found)]


def interleaved(jobs: Sequence, rounds: int, seed: int = 0) -> List[list]:
    """`rounds` copies of `jobs`, each in its own random order: a neighbour's burst of load on a shared
    machine then lands on random arms instead of always on the same one."""
    rng = random.Random(seed)
    schedule = []
    for _ in range(rounds):
        order = list(jobs)
        rng.shuffle(order)
        schedule.append(order)
    return schedule


# ---- statistics --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spread:
    """Median of a sample and its full range."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        if not values:
            raise ValueError("no values")
        return cls(float(statistics.median(values)), float(min(values)), float(max(values)), len(values))

    def format(self, fmt: str = "{:.2f}", unit: str = "") -> str:
        return f"{fmt.format(self.median)}{unit} [{fmt.format(self.low)}-{fmt.format(self.high)}]"


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> List[float]:
    """Round-by-round ratios: both values of a pair were measured in the same round, under the same load."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} numerators, {len(denominator)} denominators")
    return [a / b for a, b in zip(numerator, denominator)]


@dataclass
class Costs:
    """Where a trainer's whole-process wall time goes (seconds):

    wall = start + per_record * records + epochs * (outside_per_epoch + loop_per_epoch + batches * per_batch)

    `outside_per_epoch` is spent outside the training loop's own clock (checkpoints, metrics files, plots),
    `loop_per_epoch` inside it but not per batch (an iterator built per epoch, say). When only wall times are
    known (`fit_costs`), the two are one figure, in `loop_per_epoch`.
    """

    start_s: float
    per_record_s: float
    outside_per_epoch_s: float
    loop_per_epoch_s: float
    per_batch_s: float
    residual_s: float = 0.0

    @property
    def per_epoch_s(self) -> float:
        return self.outside_per_epoch_s + self.loop_per_epoch_s


def _solve(design: np.ndarray, values: np.ndarray, why: str) -> Tuple[np.ndarray, float]:
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError(why)
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    return coef, float(np.sqrt(np.mean((design @ coef - values) ** 2)))


def fit_costs(points: Sequence[Tuple[int, int, int, float]]) -> Costs:
    """Least-squares split of whole-process wall times alone into start-up, start-up per record, per-epoch
    fixed cost and per-batch cost.

    Args:
        points: (records, epochs, batches per epoch, wall seconds) of each run. It takes two dataset sizes
            and two epoch counts: the epoch difference at one size gives the per-epoch cost, its change with
            the size splits it into fixed and per-batch; what is left at epoch 0 splits into start-up and
            start-up per record (a one-off header scan, say). Per-epoch work that grows with the records
            (a rescan every epoch) shows up in the per-batch cost.

    Raises:
        ValueError: the points do not determine the four costs (one size, or one epoch count).
    """
    design = np.array([[1.0, r, e, e * b] for r, e, b, _ in points])
    coef, residual = _solve(design, np.array([p[3] for p in points], float),
                            "need runs at two dataset sizes and two epoch counts to separate the costs")
    return Costs(float(coef[0]), float(coef[1]), 0.0, float(coef[2]), float(coef[3]), residual)


def split_costs(points: Sequence[Tuple[int, int, int, float, float]]) -> Costs:
    """The same split with the training loop's own clock: the loop seconds per epoch give the per-batch and
    in-loop per-epoch costs directly, and the rest of the wall time (wall - loop) gives start-up, start-up per
    record and the per-epoch cost outside the loop.

    Args:
        points: (records, epochs, batches per epoch, wall seconds, loop seconds summed over the epochs).

    Raises:
        ValueError: the points do not determine the costs (one size, or one epoch count).
    """
    loop_design = np.array([[1.0, b] for _, _, b, _, _ in points])
    loop_coef, loop_res = _solve(loop_design, np.array([lp / e for _, e, _, _, lp in points], float),
                                 "need runs at two dataset sizes to separate per-batch from per-epoch costs")
    rest_design = np.array([[1.0, r, e] for r, e, _, _, _ in points])
    rest_coef, rest_res = _solve(rest_design, np.array([w - lp for _, _, _, w, lp in points], float),
                                 "need runs at two dataset sizes and two epoch counts to separate the costs")
    return Costs(float(rest_coef[0]), float(rest_coef[1]), float(rest_coef[2]), float(loop_coef[0]),
                 float(loop_coef[1]), float(np.hypot(loop_res, rest_res)))
