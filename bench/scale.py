"""`python -m bench.scale` (`make bench-scale`): does `python -m train` cost what stock Module.fit costs, at two
dataset sizes 10x apart, and where does each one's time go?

Three arms, each a whole process timed from fork to exit, on the same symbol-built VGG-named net (with the
sidecar the converter writes) and the same `.rec` files (synthetic small JPEGs packed with `python -m recbuild`):

- ours:   `python -m train ...` as a user runs it (bench/_trainruns.py: ours_command);
- stock:  `python -m bench.stock_fit ...`: a fine-tune.py-style Module.fit script, same optimizer, lr, batch,
          epochs and ImageRecordIter arguments;
- stock': the same stock command again, as a separate arm: the identical-baseline control. Its ratio to stock
          shows how far two identical programs drift apart on this machine, so a ratio of ours inside that
          range is noise.

Every (arm, size, epochs) run is repeated in `--rounds` rounds; each round runs all of them in a new random
order. Ratios are paired within a round, then the median and the full range over rounds are printed.

The wall time of every arm is split by least squares into start-up, start-up per record, per-epoch fixed cost
and per-batch cost (bench/_trainruns.py: fit_costs) from the runs at two sizes and two epoch counts. Then, for
the scale notes in docs/benchmarks.md: the reading rate of ImageRecordIter alone on the small records and on 224-px records,
and each arm's peak RSS at each size.

`--vgg16-memory` instead measures only the real VGG16 at 224 (random weights, symbols/vgg.py): each arm's peak
RSS and start-up (process wall time less its training loop's clock) at batch 4 and 8, and their ratios.
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from bench._trainruns import (ROOT, RGB_MEAN, SCALE, Costs, Recipe, Spread, epoch_seconds, fit_costs, interleaved,
                              ours_command, pack_with_recbuild, paired_ratios, run_timed, split_costs, stock_command,
                              write_image_tree, write_net)

# ---- defaults, in one place ------------------------------------------------------------------------------------
SIZES = (6000, 60000)       # 10x apart (the 5,000 and 60,000); 469 batches of 128 at the larger
EPOCHS = (1, 2)             # two epoch counts separate per-epoch costs from start-up
ROUNDS = 5                  # 60 processes, ~3-4 minutes on 2 idle cores
SIDE = 16                   # small images: the loop's own cost, not the convolutions, is what is measured
CLASSES = 10
STAGES = ((8, 1), (16, 1))  # conv1_1, conv2_1: a tiny VGG-named net
FC_WIDTH = 32
TARGET = 1.05               # ours / stock at the larger size (issue 16)
WORKDIR = ROOT / ".cache" / "bench_scale"
GEN_VERSION = 1             # bump when the data or net generator changes, so the cache is rebuilt
READ_SIDE, READ_COUNT = 224, 512
VGG16_BATCHES = (4, 8)      # peak RSS at two batch sizes gives its per-image slope
VGG16_STARTUP_SLACK = 1.0   # seconds of start-up ours may take over stock's on VGG16 (issue 21)
ARMS = ("ours", "stock", "stock'")


@dataclass(frozen=True)
class Job:
    arm: str
    records: int
    epochs: int


@dataclass
class Measured:
    """One run: whole-process wall time, peak RSS, and the training loop's own clock summed over its epochs."""

    wall_s: float
    max_rss_mb: float
    loop_s: float
    cpu_s: float


def dataset(workdir: Path, records: int, side: int = SIDE, height: int = 0, pack_args: Sequence[str] = ()) -> Path:
    """The packed .rec of `records` synthetic images, built once into the cache (the image tree is removed)."""
    folder = workdir / f"v{GEN_VERSION}-{side}x{height or side}-{records}"
    rec = folder / "set.rec"
    if (folder / "done.json").is_file() and rec.is_file():
        return rec
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_image_tree(folder / "images", records, CLASSES, side, seed=records, height=height or None)
    pack_with_recbuild(folder / "set", folder / "images", pack_args)
    shutil.rmtree(folder / "images")
    (folder / "done.json").write_text(json.dumps({"records": records, "side": side}))
    return rec


def network(workdir: Path) -> Path:
    prefix = workdir / f"v{GEN_VERSION}-net" / "tinyvgg"
    if not (prefix.parent / "tinyvgg-preprocess.json").is_file():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        write_net(prefix, STAGES, FC_WIDTH, SIDE)
    return prefix


def job_command(job: Job, net: Path, recs: Dict[int, Path], out: Path, recipe: Recipe) -> List[str]:
    """The command of one run; every run writes into its own fresh folder `out`."""
    if job.arm == "ours":
        return ours_command(net, recs[job.records], out / "ft", job.epochs, recipe)
    return stock_command(net, recs[job.records], out / "ft", job.epochs, recipe, CLASSES, job.records,
                         (3, SIDE, SIDE))


def run_schedule(schedule: List[List[Job]], net: Path, recs: Dict[int, Path], runs: Path,
                 recipe: Recipe) -> Dict[Job, List[Measured]]:
    """Run every round in its order; results per job in round order."""
    results: Dict[Job, List[Measured]] = {}
    total = sum(len(r) for r in schedule)
    done = 0
    for number, order in enumerate(schedule, start=1):
        for job in order:
            out = runs / f"r{number}-{job.arm.replace(chr(39), 'b')}-{job.records}-{job.epochs}"
            shutil.rmtree(out, ignore_errors=True)
            timed = run_timed(job_command(job, net, recs, out, recipe), out / "log.txt")
            loop = sum(epoch_seconds(job.arm == "ours", out / "ft", timed.log))
            results.setdefault(job, []).append(Measured(timed.wall_s, timed.max_rss_mb, loop, timed.cpu_s))
            done += 1
            print(f"  [{done}/{total}] round {number} {job.arm:<6} {job.records:>6} records {job.epochs} epochs: "
                  f"{timed.wall_s:6.2f} s (loop {loop:5.2f} s, CPU {timed.cpu_s:5.2f} s), {timed.max_rss_mb:5.0f} MB",
                  flush=True)
            for path in out.glob("ft-*.params"):  # checkpoints are not needed; the logs stay
                path.unlink()
    return results


def save_results(results: Dict[Job, List[Measured]], path: Path) -> None:
    """Every run's figures, so a report can be printed again (`--from-results`) without re-running."""
    rows = [{**asdict(job), "runs": [asdict(m) for m in runs]} for job, runs in results.items()]
    path.write_text(json.dumps(rows, indent=1))


def load_results(path: Path) -> Dict[Job, List[Measured]]:
    return {Job(r["arm"], r["records"], r["epochs"]): [Measured(**m) for m in r["runs"]]
            for r in json.loads(Path(path).read_text())}


def batches(records: int, batch_size: int) -> int:
    return -(-records // batch_size)


def cost_fits(results: Dict[Job, List[Measured]], arm: str, sizes: Sequence[int], epochs: Sequence[int],
              batch_size: int, rounds: int, with_loop_clock: bool, attr: str = "wall_s") -> Tuple[Costs, List[Costs]]:
    """One arm's cost split from the per-config medians, and from each round alone (for the spread); of wall
    times (`attr` "wall_s"), optionally with the loop clock, or of CPU seconds ("cpu_s", without it)."""
    configs = list(itertools.product(sizes, epochs))

    def fitted(pick) -> Costs:
        rows = [(n, e, batches(n, batch_size), pick(results[Job(arm, n, e)], attr),
                 pick(results[Job(arm, n, e)], "loop_s")) for n, e in configs]
        return split_costs(rows) if with_loop_clock else fit_costs([r[:4] for r in rows])

    median = fitted(lambda runs, attr: Spread.of([getattr(m, attr) for m in runs]).median)
    per_round = [fitted(lambda runs, attr, k=k: getattr(runs[k], attr)) for k in range(rounds)]
    return median, per_round


def print_costs(results: Dict[Job, List[Measured]], sizes, epochs, batch_size: int, rounds: int) -> None:
    columns = (("start-up s", "start_s", 1, "{:.2f}"), ("start/1k rec ms", "per_record_s", 1e6, "{:.1f}"),
               ("per epoch s", "per_epoch_s", 1, "{:.3f}"),
               ("of it outside loop s", "outside_per_epoch_s", 1, "{:.3f}"),
               ("per batch ms", "per_batch_s", 1e3, "{:.2f}"))
    for with_clock, measure, title in ((True, "wall_s", "from wall times and each program's own epoch clock "
                                                      "(Module.fit's 'Time cost', ours' metrics 'seconds')"),
                                       (False, "wall_s", "from wall times alone (per-epoch costs in one column)"),
                                       (False, "cpu_s", "of CPU seconds (user + system, all threads) alone")):
        print(f"\ncost split {title}; least squares over the (size, epochs) medians; [range] = the same fit on "
              f"each round alone")
        print(f"{'arm':<7} " + " ".join(f"{c[0]:<23}" for c in columns) + " residual s")
        for arm in ARMS:
            median, per_round = cost_fits(results, arm, sizes, epochs, batch_size, rounds, with_clock, measure)
            cells = []
            for _, attr, scale, fmt in columns:
                if attr == "outside_per_epoch_s" and not with_clock:
                    cells.append("n/a (needs the clock)")
                    continue
                values = [getattr(c, attr) * scale for c in per_round]
                cells.append(f"{fmt.format(getattr(median, attr) * scale)} [{fmt.format(min(values))}.."
                             f"{fmt.format(max(values))}]")
            print(f"{arm:<7} " + " ".join(f"{c:<23}" for c in cells) + f" {median.residual_s:.3f}")


def report(results: Dict[Job, List[Measured]], sizes: Sequence[int], epochs: Sequence[int], rounds: int,
           batch_size: int) -> bool:
    """Print the tables; returns whether both targets are met."""
    def walls(arm, n, e, attr="wall_s"):  # or CPU seconds, with attr="cpu_s"
        return [getattr(m, attr) for m in results[Job(arm, n, e)]]

    print(f"\n{'records':>8} {'epochs':>6}   {'ours s':<20} {'stock s':<20} {'stock2 s':<20} "
          f"{'ours/stock':<20} {'control stock2/stock':<20}")
    for n, e in itertools.product(sizes, epochs):
        ours, stock, control = walls("ours", n, e), walls("stock", n, e), walls("stock'", n, e)
        print(f"{n:>8} {e:>6}   {Spread.of(ours).format():<20} {Spread.of(stock).format():<20} "
              f"{Spread.of(control).format():<20} {Spread.of(paired_ratios(ours, stock)).format('{:.3f}'):<20} "
              f"{Spread.of(paired_ratios(control, stock)).format('{:.3f}'):<20}")
    small, large, last = min(sizes), max(sizes), max(epochs)
    ratio = Spread.of(paired_ratios(walls("ours", large, last), walls("stock", large, last)))
    control = Spread.of(paired_ratios(walls("stock'", large, last), walls("stock", large, last)))

    def growth(arm, attr="wall_s"):
        return [b - a for a, b in zip(walls(arm, small, last, attr), walls(arm, large, last, attr))]
    grow_ours, grow_stock, grow_control = growth("ours"), growth("stock"), growth("stock'")
    grow_ratio = Spread.of(paired_ratios(grow_ours, grow_stock))
    grow_control_ratio = Spread.of(paired_ratios(grow_control, grow_stock))
    size_met, growth_met = ratio.median <= TARGET, grow_ratio.median <= TARGET
    cpu = Spread.of(paired_ratios(walls("ours", large, last, "cpu_s"), walls("stock", large, last, "cpu_s")))
    cpu_control = Spread.of(paired_ratios(walls("stock'", large, last, "cpu_s"), walls("stock", large, last, "cpu_s")))
    print(f"\nat {large} records, {last} epochs: ours/stock {ratio.format('{:.3f}')} wall (control "
          f"{control.format('{:.3f}')}); target <= {TARGET}: {'met' if size_met else 'NOT met'}")
    print(f"  in CPU seconds: ours/stock {cpu.format('{:.3f}')} (control {cpu_control.format('{:.3f}')})")
    print(f"growth {small} -> {large} records, {last} epochs: ours +{Spread.of(grow_ours).format()} s, stock "
          f"+{Spread.of(grow_stock).format()} s; ours/stock growth {grow_ratio.format('{:.3f}')} (control "
          f"{grow_control_ratio.format('{:.3f}')}); target: no faster than stock (<= {TARGET}): "
          f"{'met' if growth_met else 'NOT met'}")
    cpu_growth = Spread.of(paired_ratios(growth("ours", "cpu_s"), growth("stock", "cpu_s")))
    cpu_growth_control = Spread.of(paired_ratios(growth("stock'", "cpu_s"), growth("stock", "cpu_s")))
    print(f"  in CPU seconds: ours/stock growth {cpu_growth.format('{:.3f}')} (control "
          f"{cpu_growth_control.format('{:.3f}')})")
    print_costs(results, sizes, epochs, batch_size, rounds)
    print("\npeak RSS (median over rounds, MB):")
    for arm in ARMS:
        cells = ", ".join(f"{n} records {Spread.of([t.max_rss_mb for t in results[Job(arm, n, last)]]).median:.0f}"
                          for n in sizes)
        print(f"  {arm:<7} {cells}")
    return size_met and growth_met


def reading_rate(rec: Path, side: int, batch_size: int, threads: int, passes: int = 2) -> Tuple[float, float]:
    """ImageRecordIter alone (decode + mean/scale, no training): (images/s of the best pass, bytes per record)."""
    import mxnet as mx
    best = 0.0
    it = mx.io.ImageRecordIter(path_imgrec=str(rec), path_imgidx=str(rec.with_suffix(".idx")),
                               data_shape=(3, side, side), batch_size=batch_size, shuffle=True,
                               preprocess_threads=threads, mean_r=RGB_MEAN[0], mean_g=RGB_MEAN[1],
                               mean_b=RGB_MEAN[2], scale=SCALE, round_batch=True, verbose=False)
    for _ in range(passes):
        it.reset()
        started, images = time.perf_counter(), 0
        for batch in it:
            batch.data[0].wait_to_read()
            images += batch_size - batch.pad
        best = max(best, images / (time.perf_counter() - started))
    records = sum(1 for _ in open(rec.with_suffix(".idx")))
    return best, rec.stat().st_size / records


def header_walk_seconds(rec: Path, passes: int = 3) -> float:
    """Best time to walk every record header of `rec` (recbuild.recordio.iter_frames, the reader under the
    trainer's label scan), from the page cache after the first pass."""
    from recbuild.recordio import iter_frames
    best = float("inf")
    size = rec.stat().st_size
    for _ in range(passes):
        started = time.perf_counter()
        with open(rec, "rb") as handle:
            for _frame in iter_frames(handle, size):
                pass
        best = min(best, time.perf_counter() - started)
    return best


def report_reading(workdir: Path, small_rec: Path, batch_size: int) -> None:
    large = dataset(workdir, READ_COUNT, side=320, height=256, pack_args=["--resize", str(READ_SIDE)])
    print("\nreading alone (mx.io.ImageRecordIter, decode + mean/scale, best of 2 passes):")
    for rec, side, label in ((small_rec, SIDE, f"{SIDE}x{SIDE} records"),
                             (large, READ_SIDE, f"synthetic 320x256 JPEGs packed --resize {READ_SIDE}")):
        for threads in (1, 2):
            rate, size = reading_rate(rec, side, batch_size if side == SIDE else 32, threads)
            print(f"  {label:<45} {threads} thread(s): {rate:8.0f} img/s = {1e6 / rate:8.1f} us/record, "
                  f"{size / 1024:.1f} KiB/record")
        records = sum(1 for _ in open(rec.with_suffix(".idx")))
        walk = header_walk_seconds(rec)
        print(f"  {label:<45} header walk (iter_frames): {1e6 * walk / records:.2f} us/record, page cache warm")


def report_vgg16_memory(workdir: Path, batch_sizes: Sequence[int] = VGG16_BATCHES, rounds: int = 1) -> bool:
    """Peak RSS and start-up of one short epoch of the real VGG16 (full width, 224x224, random weights built with
    symbols/vgg.py) at two batch sizes, ours and stock, each pair in a random order per round.

    Start-up is everything outside the training loop: the process's wall time less the loop's own clock
    (interpreter, imports, loading the weights, binding, the checkpoint written after the epoch). Met (issue 21)
    when, at every batch size, ours' median peak RSS is at most stock's and its median start-up at most
    VGG16_STARTUP_SLACK seconds over stock's.
    """
    import random
    from symbols.vgg import VGG16_STAGES
    folder = workdir / f"v{GEN_VERSION}-vgg16"
    net = folder / "vgg16"
    if not (folder / "vgg16-preprocess.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_net(net, VGG16_STAGES, 4096, READ_SIDE)
    records = max(batch_sizes)
    rec = dataset(workdir, records, side=READ_SIDE)
    print(f"\nreal VGG16 (138M parameters) at {READ_SIDE}x{READ_SIDE}, one epoch of {records} records, {rounds} "
          f"round(s): peak RSS and start-up (process wall time less the training loop's own clock)", flush=True)
    measured: Dict[Tuple[str, int], List[Tuple[float, float]]] = {}
    order = random.Random(0)
    for _ in range(rounds):
        for batch in batch_sizes:
            recipe = Recipe(batch_size=batch)
            for arm in order.sample(("ours", "stock"), 2):
                out = workdir / "runs" / f"vgg16-{arm}-{batch}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = (ours_command(net, rec, out / "ft", 1, recipe) if arm == "ours" else
                       stock_command(net, rec, out / "ft", 1, recipe, CLASSES, records, (3, READ_SIDE, READ_SIDE)))
                timed = run_timed(cmd, out / "log.txt")
                loop = sum(epoch_seconds(arm == "ours", out / "ft", timed.log))
                measured.setdefault((arm, batch), []).append((timed.max_rss_mb, timed.wall_s - loop))
                print(f"  {arm:<6} batch {batch:>3}: {timed.max_rss_mb:7.0f} MB peak RSS, start-up "
                      f"{timed.wall_s - loop:5.1f} s (process {timed.wall_s:5.1f} s, training loop {loop:5.1f} s)",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
    met = True
    for batch in batch_sizes:
        (ours_rss, ours_up), (stock_rss, stock_up) = (
            tuple(statistics.median(v[i] for v in measured[(arm, batch)]) for i in (0, 1)) for arm in ("ours", "stock"))
        ok = ours_rss <= stock_rss and ours_up <= stock_up + VGG16_STARTUP_SLACK
        met &= ok
        print(f"  batch {batch:>3}: peak RSS ours {ours_rss:.0f} MB / stock {stock_rss:.0f} MB = "
              f"{ours_rss / stock_rss:.2f}x; start-up ours {ours_up:.1f} s / stock {stock_up:.1f} s = "
              f"{ours_up / max(stock_up, 1e-9):.2f}x ({ours_up - stock_up:+.1f} s); target <= 1.00x RSS and <= "
              f"+{VGG16_STARTUP_SLACK:g} s: {'met' if ok else 'NOT met'}", flush=True)
    return met


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="two or more record counts")
    p.add_argument("--epochs", default=",".join(map(str, EPOCHS)), help="two or more epoch counts")
    p.add_argument("--rounds", type=int, default=None, help=f"default {ROUNDS} (with --vgg16-memory: 1)")
    p.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    p.add_argument("--seed", type=int, default=0, help="seeds the order of the runs")
    p.add_argument("--gpus", default=None, help="e.g. 0: both arms train there (default: CPU)")
    p.add_argument("--workdir", type=Path, default=WORKDIR, help="cache of the data and the run logs")
    p.add_argument("--no-reading", action="store_true", help="skip the ImageRecordIter reading rates")
    p.add_argument("--from-results", type=Path, default=None,
                   help="print the report of an earlier run's results.json (same --sizes/--epochs) and stop")
    p.add_argument("--vgg16-memory", action="store_true",
                   help="only measure peak RSS and start-up of the real VGG16 at two batch sizes, ours and stock "
                        "(4+ GB each, a few minutes; --rounds runs of each, default 1 here)")
    args = p.parse_args(argv)
    if args.vgg16_memory:
        return 0 if report_vgg16_memory(args.workdir, rounds=args.rounds or 1) else 1
    args.rounds = args.rounds or ROUNDS
    sizes = sorted(int(v) for v in args.sizes.split(","))
    epochs = sorted(int(v) for v in args.epochs.split(","))
    if len(sizes) < 2 or len(epochs) < 2 or args.rounds < 1:
        p.error("need two sizes, two epoch counts and at least one round")
    recipe = Recipe(batch_size=args.batch_size, gpus=args.gpus)
    import mxnet as mx
    print(f"bench.scale: python -m train vs stock Module.fit (python -m bench.stock_fit), whole-process wall time; "
          f"VGG-named net {STAGES} fc {FC_WIDTH}, input 3x{SIDE}x{SIDE}, {CLASSES} classes, batch "
          f"{recipe.batch_size}, sizes {sizes}, epochs {epochs}, {args.rounds} rounds in random order; "
          f"mxnet {mx.__version__}, python {sys.version.split()[0]}")
    if args.from_results:
        results = load_results(args.from_results)
        rounds = min(len(runs) for runs in results.values())
        return 0 if report(results, sizes, epochs, rounds, recipe.batch_size) else 1
    recs = {n: dataset(args.workdir, n) for n in sizes}
    net = network(args.workdir)
    jobs = [Job(arm, n, e) for arm in ARMS for n in sizes for e in epochs]
    results = run_schedule(interleaved(jobs, args.rounds, args.seed), net, recs, args.workdir / "runs", recipe)
    save_results(results, args.workdir / "runs" / "results.json")
    met = report(results, sizes, epochs, args.rounds, recipe.batch_size)
    if not args.no_reading:
        report_reading(args.workdir, recs[max(sizes)], recipe.batch_size)
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
