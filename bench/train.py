"""`python -m bench.train` (`make bench-train`): the training loop of `python -m train` against stock Module.fit.

    python -m bench.train                       # CPU: VGG16 layout at 1/4 width, 64x64 input
    python -m bench.train --gpus 0              # GPU server: the real VGG16 (full width, 224x224)

Five arms, each run as a whole process in every round (rounds interleaved, each in a new random order), on the
same `.rec` (synthetic JPEGs packed with `python -m recbuild`) and the same VGG16-layout net with its sidecar:

  stock          `python -m bench.stock_fit`: fine-tune.py-style Module.fit, every layer trained
  stock'         the same command again: the identical-baseline control
  ours           `python -m train`, every layer trained
  stock frozen   `python -m bench.stock_fit --fixed-params '^conv[1-4]_'` (Module's fixed_param_names)
  ours frozen    `python -m train --lr-mult '^conv[1-4]_=0'`

What is timed is each program's own clock of its training epochs after the first (the first pays memory
planning and first allocations): Module.fit's "Epoch[k] Time cost=" log line, and the `seconds` of each
epoch in ours' PREFIX-metrics.json. Both run from the epoch's first batch fetch to its last update call and
leave out checkpoint writing; ours also includes whatever it does per epoch beyond the batches (its iterator
set-up). Per round each arm gives epochs-1 timed epochs of `--steps` batches; the step time is their mean.
Ratios are paired within a round; medians and full ranges over rounds are printed, with the control's ratio
beside them. Each whole process's wall time and CPU seconds (user + system) are printed too, and the ratios
of the CPU seconds, which neighbours on a shared machine disturb less.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from bench._trainruns import (ROOT, Recipe, Spread, Timed, epoch_seconds, interleaved, ours_command,
                              pack_with_recbuild, paired_ratios, run_timed, stock_command, write_image_tree,
                              write_net)
from symbols.vgg import VGG16_STAGES

# ---- defaults, in one place ------------------------------------------------------------------------------------
FREEZE = r"^conv[1-4]_"
STEPS = 20                 # timed batches per epoch (the issue asks for >= 20)
EPOCHS = 2                 # epoch 1 is the warm-up; epochs 2.. are timed
ROUNDS = 5
BATCH = 32
CLASSES = 10
CPU_SIZE, GPU_SIZE = 64, 224
CPU_WIDTH, GPU_WIDTH = 4, 1   # channel divisor: 1/4 width keeps 5 rounds of 5 arms in minutes on 2 cores
WORKDIR = ROOT / ".cache" / "bench_train"
GEN_VERSION = 1
ARMS = ("stock", "stock'", "ours", "stock frozen", "ours frozen")


@dataclass(frozen=True)
class Setup:
    """The data, the net and what the arms need to know about them."""

    net: Path
    rec: Path
    records: int
    size: int


def stages_at(width_divisor: int) -> tuple:
    return tuple((max(c // width_divisor, 8), n) for c, n in VGG16_STAGES)


def prepare(workdir: Path, size: int, width_divisor: int, records: int) -> Setup:
    """Build (once, cached) the VGG16-layout net and a .rec of `records` images of size x size."""
    folder = workdir / f"v{GEN_VERSION}-{size}px-w{width_divisor}-{records}"
    net, rec = folder / "vgg16", folder / "set.rec"
    if not (folder / "done.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_net(net, stages_at(width_divisor), 4096 // width_divisor, size)
        write_image_tree(folder / "images", records, CLASSES, size, seed=1)
        pack_with_recbuild(folder / "set", folder / "images")
        shutil.rmtree(folder / "images")
        (folder / "done.json").write_text(json.dumps({"records": records, "size": size}))
    return Setup(net, rec, records, size)


def arm_command(arm: str, setup: Setup, prefix: Path, epochs: int, recipe: Recipe) -> List[str]:
    frozen = arm.endswith("frozen")
    if arm.startswith("ours"):
        return ours_command(setup.net, setup.rec, prefix, epochs, recipe, [f"{FREEZE}=0"] if frozen else [])
    return stock_command(setup.net, setup.rec, prefix, epochs, recipe, CLASSES, setup.records,
                         (3, setup.size, setup.size), FREEZE if frozen else None)


def step_seconds(epochs: Sequence[float], steps: int) -> float:
    """Mean seconds per batch over the epochs after the first (the warm-up)."""
    timed = list(epochs[1:])
    if not timed:
        raise ValueError("need at least two epochs: the first is the warm-up")
    return sum(timed) / (len(timed) * steps)


def run_rounds(schedule: List[List[str]], setup: Setup, runs: Path, epochs: int, steps: int,
               recipe: Recipe) -> Dict[str, Dict[str, List[float]]]:
    """Per arm: step seconds and whole-process wall seconds, in round order."""
    out: Dict[str, Dict[str, List[float]]] = {arm: {"step": [], "wall": [], "cpu": []} for arm in ARMS}
    for number, order in enumerate(schedule, start=1):
        for arm in order:
            folder = runs / f"r{number}-{arm.replace(' ', '-').replace(chr(39), 'b')}"
            shutil.rmtree(folder, ignore_errors=True)
            prefix = folder / "ft"
            timed: Timed = run_timed(arm_command(arm, setup, prefix, epochs, recipe), folder / "log.txt")
            step = step_seconds(epoch_seconds(arm.startswith("ours"), prefix, timed.log), steps)
            out[arm]["step"].append(step)
            out[arm]["wall"].append(timed.wall_s)
            out[arm]["cpu"].append(timed.cpu_s)
            print(f"  round {number} {arm:<13} {1e3 * step:8.1f} ms/step  (process {timed.wall_s:6.1f} s, CPU "
                  f"{timed.cpu_s:6.1f} s)", flush=True)
    return out


def report(results: Dict[str, Dict[str, List[float]]], batch: int) -> None:
    steps = {arm: results[arm]["step"] for arm in ARMS}
    print(f"\n{'arm':<14} {'ms/step':<24} {'img/s':<10} {'process wall s':<22} {'process CPU s':<22}")
    for arm in ARMS:
        step = Spread.of(steps[arm])
        print(f"{arm:<14} {Spread.of([1e3 * s for s in steps[arm]]).format('{:.1f}'):<24} "
              f"{batch / step.median:<10.2f} {Spread.of(results[arm]['wall']).format('{:.1f}'):<22} "
              f"{Spread.of(results[arm]['cpu']).format('{:.1f}'):<22}")
    control = Spread.of(paired_ratios(steps["stock'"], steps["stock"])).format("{:.3f}")
    lines = (("ours / stock, every layer trained", "ours", "stock"),
             ("ours frozen / stock frozen", "ours frozen", "stock frozen"),
             ("ours frozen / stock (the gain of freezing)", "ours frozen", "stock"))
    cpu = {arm: results[arm]["cpu"] for arm in ARMS}
    cpu_control = Spread.of(paired_ratios(cpu["stock'"], cpu["stock"])).format("{:.3f}")
    print(f"\nratios paired per round, median [range]: step time (control stock'/stock {control}); whole-process "
          f"CPU seconds, start-up included (control {cpu_control})")
    for label, a, b in lines:
        print(f"  {label:<44} {Spread.of(paired_ratios(steps[a], steps[b])).format('{:.3f}'):<22} "
              f"CPU {Spread.of(paired_ratios(cpu[a], cpu[b])).format('{:.3f}')}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default=None, help="e.g. 0 (default: CPU)")
    p.add_argument("--size", type=int, default=None, help=f"input side (default {GPU_SIZE} on GPU, {CPU_SIZE} on CPU)")
    p.add_argument("--width-divisor", type=int, default=None,
                   help=f"VGG16 channels / this (default {GPU_WIDTH} on GPU, {CPU_WIDTH} on CPU)")
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--steps", type=int, default=STEPS, help="batches per epoch, all timed after the first epoch")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per run; the first is not timed")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--seed", type=int, default=0, help="seeds the order of the runs")
    p.add_argument("--workdir", type=Path, default=WORKDIR)
    p.add_argument("--no-cache", action="store_true", help="skip the feature-cache comparison (bench/train_cache.py)")
    args = p.parse_args(argv)
    if args.epochs < 2 or args.steps < 1 or args.rounds < 1:
        p.error("need --epochs >= 2 (the first is the warm-up), --steps >= 1 and --rounds >= 1")
    size = args.size or (GPU_SIZE if args.gpus else CPU_SIZE)
    divisor = args.width_divisor or (GPU_WIDTH if args.gpus else CPU_WIDTH)
    recipe = Recipe(batch_size=args.batch_size, gpus=args.gpus)
    setup = prepare(args.workdir, size, divisor, args.steps * args.batch_size)
    import mxnet as mx
    print(f"bench.train: VGG16 layout at 1/{divisor} width, input 3x{size}x{size}, batch {args.batch_size}, "
          f"{'GPU ' + args.gpus if args.gpus else 'CPU'}; {args.steps} timed steps x {args.epochs - 1} epoch(s) "
          f"per run after a warm-up epoch, {args.rounds} rounds in random order; mxnet {mx.__version__}, "
          f"python {sys.version.split()[0]}")
    schedule = interleaved(ARMS, args.rounds, args.seed)
    results = run_rounds(schedule, setup, args.workdir / "runs", args.epochs, args.steps, recipe)
    report(results, args.batch_size)
    if not args.no_cache:  # issue 6: head epochs/s from the feature cache vs full forward passes, same data
        from bench.train_cache import report as cache_report
        print()
        cache_report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
