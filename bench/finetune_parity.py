"""`python -m bench.finetune_parity --finetune-py PATH`: MXNet 1.9.1's fine-tune.py and `python -m train`, the same
command line, the same data and converted model, over a few seeds: accuracy, time and peak memory of each.

fine-tune.py is not part of this project and cannot be fetched at bench time (no network is assumed): pass the
path of a fine-tune.py from an apache/mxnet checkout (`example/image-classification/fine-tune.py`, tag 1.9.1),
with its `common/` (fit.py, data.py, modelzoo.py, find_mxnet.py) beside it. It runs on this venv's mxnet.

Both programs get one explicit argument list (ARGS below), so neither depends on defaults. fine-tune.py takes
no seed: each of its runs seeds MXNet's global generator (the new head's initialisation) before fine-tune.py
starts, through `runpy` (its ImageRecordIter shuffles with its own fixed seed); ours gets `--seed`. The data are
the first `--per-class` images of each class of the bundled `demo/images/` (Fashion-MNIST), packed 80/20 at
224 with `python -m recbuild`; the model is open_nsfw (`python -m tools.fetch_models nsfw`) converted with
`python -m tools.caffe_converter`, or with `--plain` the same files without our sidecar (a plain MXNet
checkpoint). Every process is timed from fork to exit, with its peak RSS (wait4).

Printed: each run's last validation accuracy, wall time and peak RSS; stock's accuracy spread over the seeds
and whether each of ours is inside it; the median time and peak-memory ratios ours / stock.
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

from bench._trainruns import ROOT, BenchError, run_timed

WORKDIR = ROOT / ".cache" / "bench_parity"
SEEDS = (0, 1, 2)
EPOCHS = 2
PER_CLASS = 20            # 10 classes: 160 training and 40 validation images
BATCH = 20                # divides both splits (160 / 40): Module.score counts the padded rows of a last
                          # partial batch (fine-tune.py's validation would then score duplicates), ours does not
NSFW_MEAN_BGR = "104,117,123"
_VAL_ACCURACY = re.compile(r"Epoch\[(\d+)\] Validation-accuracy=([0-9.]+|nan)")


def args_for(model: Path, data: Path, num_examples: int, epochs: int, batch: int, prefix: Path) -> List[str]:
    """The one command line both programs run: every flag explicit, fine-tune.py's own recipe (mom 0, wd 0,
    lr 0.01, step at 20), the converted model's RGB mean, CPU (`--gpus ''`)."""
    return ["--pretrained-model", str(model), "--load-epoch", "0", "--layer-before-fullc", "pool",
            "--num-classes", "10", "--num-examples", str(num_examples),
            "--data-train", f"{data}_train.rec", "--data-val", f"{data}_val.rec",
            "--image-shape", "3,224,224", "--rgb-mean", "123,117,104", "--rgb-std", "1,1,1",
            "--batch-size", str(batch), "--num-epochs", str(epochs), "--lr", "0.01", "--lr-factor", "0.1",
            "--lr-step-epochs", "20", "--mom", "0", "--wd", "0", "--optimizer", "sgd", "--kv-store", "device",
            "--gpus", "", "--top-k", "0", "--disp-batches", "5", "--data-nthreads", "2",
            "--model-prefix", str(prefix)]


def check_finetune_py(path: Path) -> Path:
    """The fine-tune.py to run, with its common/ beside it; BenchError naming what is missing."""
    if not path.is_file():
        raise BenchError(f"--finetune-py {path}: no such file; pass MXNet 1.9.1's "
                         f"example/image-classification/fine-tune.py (from an apache/mxnet checkout)")
    missing = [f for f in ("fit.py", "data.py", "modelzoo.py", "find_mxnet.py") if not (path.parent / "common" / f).is_file()]
    if missing:
        raise BenchError(f"--finetune-py {path}: {path.parent / 'common'} lacks {', '.join(missing)}; fine-tune.py "
                         f"imports them (copy example/image-classification/common/ beside it)")
    return path


def stock_command(finetune_py: Path, seed: int, args: Sequence[str]) -> List[str]:
    """`python fine-tune.py ARGS`, with MXNet's global generator seeded first (fine-tune.py has no --seed)."""
    boot = ("import runpy, sys; import mxnet as mx; "
            f"sys.path.insert(0, {str(finetune_py.parent)!r}); mx.random.seed({seed}); "
            f"sys.argv = [{str(finetune_py)!r}] + sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", boot, *args]


def prepare(workdir: Path, per_class: int, plain: bool) -> tuple:
    """(model prefix, data prefix, training record count), built once per settings into `workdir`."""
    images, data = workdir / f"images-{per_class}", workdir / f"rec-{per_class}" / "fashion"
    if not Path(f"{data}_val.rec").is_file():
        shutil.rmtree(images, ignore_errors=True)
        for folder in sorted((ROOT / "demo" / "images").iterdir()):
            if folder.is_dir():
                (images / folder.name).mkdir(parents=True)
                for src in sorted(folder.iterdir())[:per_class]:
                    shutil.copy(src, images / folder.name / src.name)
        data.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "recbuild", "--list", "--recursive", "--train-ratio", "0.8", str(data),
              str(images)])
        _run([sys.executable, "-m", "recbuild", "--resize", "224", "--quality", "95", "--color", "1", str(data),
              str(images)])
    converted = workdir / "model" / "nsfw"
    if not Path(f"{converted}-preprocess.json").is_file():
        cache = ROOT / ".cache" / "models" / "nsfw"
        if not (cache / "resnet_50_1by2_nsfw.caffemodel").is_file():
            _run([sys.executable, "-m", "tools.fetch_models", "nsfw"])
        _run([sys.executable, "-m", "tools.caffe_converter", "--mean", NSFW_MEAN_BGR, str(cache / "deploy.prototxt"),
              str(cache / "resnet_50_1by2_nsfw.caffemodel"), str(converted)])
    model = converted
    if plain:
        model = workdir / "plain" / "nsfw"
        model.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("-symbol.json", "-0000.params"):
            shutil.copy(f"{converted}{suffix}", f"{model}{suffix}")
    train_lines = Path(f"{data}_train.lst").read_text().splitlines()
    return model, data, len([line for line in train_lines if line.strip()])


def _run(cmd: List[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(cmd[1:4])} exited {done.returncode}: {done.stderr.strip()[-400:]}")


def last_val_accuracy(log: Path) -> float:
    found = [(int(m.group(1)), float(m.group(2))) for m in _VAL_ACCURACY.finditer(log.read_text(errors="replace"))]
    if not found:
        raise BenchError(f"{log}: no 'Epoch[k] Validation-accuracy=' line")
    return max(found)[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.finetune_parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--finetune-py", type=Path, default=None,
                   help="MXNet 1.9.1's example/image-classification/fine-tune.py, with common/ beside it")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--per-class", type=int, default=PER_CLASS, help="images per class taken from demo/images")
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--plain", action="store_true", help="start from the converted files without our sidecar")
    p.add_argument("--workdir", type=Path, default=WORKDIR)
    a = p.parse_args(argv)
    if a.finetune_py is None:
        print("error: --finetune-py PATH is required: this bench runs MXNet 1.9.1's fine-tune.py, which is not "
              "part of the project (take example/image-classification/ from an apache/mxnet checkout)",
              file=sys.stderr)
        return 2
    try:
        finetune_py = check_finetune_py(a.finetune_py.resolve())
        model, data, records = prepare(a.workdir, a.per_class, a.plain)
        seeds = [int(s) for s in a.seeds.split(",")]
        print(f"bench.finetune_parity: fine-tune.py ({finetune_py}) vs python -m train, same ARGS; open_nsfw "
              f"{'plain checkpoint' if a.plain else 'converted'}, {records} training images of 10 classes at 224, "
              f"{a.epochs} epochs, batch {a.batch_size}, seeds {seeds}", flush=True)
        results = {"stock": [], "ours": []}
        for seed in seeds:
            for arm in ("stock", "ours"):   # alternating, so a burst of load lands on both
                out = a.workdir / "runs" / f"{arm}-{seed}"
                shutil.rmtree(out, ignore_errors=True)
                args = args_for(model, data, records, a.epochs, a.batch_size, out / "ft")
                cmd = (stock_command(finetune_py, seed, args) if arm == "stock" else
                       [sys.executable, "-m", "train", *args, "--seed", str(seed), "--no-progress"])
                timed = run_timed(cmd, out / "log.txt")
                acc = last_val_accuracy(timed.log)
                results[arm].append((acc, timed.wall_s, timed.max_rss_mb))
                print(f"  {arm:<5} seed {seed}: validation accuracy {acc:.4f}, {timed.wall_s:6.1f} s, "
                      f"peak RSS {timed.max_rss_mb:6.0f} MB", flush=True)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stock_acc = [r[0] for r in results["stock"]]
    low, high = min(stock_acc), max(stock_acc)
    inside = [low <= r[0] <= high for r in results["ours"]]
    print(f"stock accuracy spread over {len(seeds)} seeds: {low:.4f}..{high:.4f} (mean {statistics.mean(stock_acc):.4f}); "
          f"ours: {', '.join(f'{r[0]:.4f}' for r in results['ours'])} (mean "
          f"{statistics.mean(r[0] for r in results['ours']):.4f}); inside stock's spread: {sum(inside)} of "
          f"{len(inside)}")
    for what, index in (("wall time", 1), ("peak RSS", 2)):
        ratio = statistics.median(r[index] for r in results["ours"]) / statistics.median(
            r[index] for r in results["stock"])
        print(f"median {what} ours / stock: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
