"""Benchmark: our Caffe converter against the wheel's tools/caffe_converter/convert_model.py, same run.

    python -m bench.convert            # (make bench-convert)

Builds a VGG16-shaped V1 caffemodel (553 MB of seeded random weights, `layers {}` format, as the 2014
VGG_ILSVRC_16_layers files) in .cache/bench/, converts it with both tools as subprocesses, and prints wall
time, peak RSS (getrusage of each child) and our/their ratios. Targets: at most 1/4 of the time and at most
1/2 of the peak RSS. Both checkpoints are then compared parameter by parameter (they must be identical:
both converters turn the first convolution to RGB).

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


def measure(name: str, cmd: List[str], env: Optional[dict] = None, cwd: Optional[Path] = None) -> Run:
    """Run `cmd`; wall time and the child's own peak RSS (wait4 rusage, so other children do not count)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(name, wall, usage.ru_maxrss / 1024.0, proc.returncode, output.strip()[-600:])


def wheel_converter_dir() -> Path:
    import mxnet
    folder = Path(mxnet.__file__).parent / "tools" / "caffe_converter"
    if not (folder / "convert_model.py").is_file():
        raise SystemExit(f"error: {folder}/convert_model.py not found; the mxnet wheel ships it in mxnet/tools/")
    return folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the VGG16 caffemodel is built")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool; the best time and RSS count")
    parser.add_argument("--json", type=Path, default=Path("out/bench/convert.json"), help="results file")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    prototxt, caffemodel = vgg16_v1(args.cache)
    print(f"VGG16 V1 caffemodel: {caffemodel} ({caffemodel.stat().st_size / 1e6:.0f} MB), "
          f"ready in {time.perf_counter() - start:.1f} s")
    wheel = wheel_converter_dir()
    protoc = shutil.which("protoc")
    if protoc is None:
        raise SystemExit("error: protoc not found; the wheel's converter needs a caffe_pb2 (apt install protobuf-compiler)")
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        subprocess.run([protoc, f"--proto_path={wheel}", f"--python_out={tmp}", str(wheel / "caffe.proto")], check=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp), str(wheel)]))
        env.pop("MXNET_SUBGRAPH_BACKEND", None)
        ours_env = dict(os.environ)
        root = Path(__file__).resolve().parents[1]
        theirs_cmd = [sys.executable, str(wheel / "convert_model.py"), str(prototxt.resolve()),
                      str(caffemodel.resolve()), str(tmp / "theirs")]
        ours_cmd = [sys.executable, "-m", "tools.caffe_converter", str(prototxt.resolve()), str(caffemodel.resolve()),
                    str(tmp / "ours")]
        runs = {"theirs": [], "ours": []}
        for _ in range(args.repeat):  # interleaved so both see the same page cache and machine load
            runs["theirs"].append(measure("wheel convert_model.py", theirs_cmd, env=env, cwd=tmp))
            runs["ours"].append(measure("tools.caffe_converter", ours_cmd, env=ours_env, cwd=root))
        for key, items in runs.items():
            bad = [r for r in items if r.returncode != 0]
            if bad:
                print(f"error: {bad[0].name} failed (exit {bad[0].returncode}):\n{bad[0].tail}", file=sys.stderr)
                return 1
        best = {k: (min(r.wall_s for r in v), min(r.peak_rss_mb for r in v)) for k, v in runs.items()}
        identical = _compare(tmp / "theirs", tmp / "ours")

    t_ratio = best["ours"][0] / best["theirs"][0]
    m_ratio = best["ours"][1] / best["theirs"][1]
    print(f"{'converter':<24} {'wall s':>8} {'peak RSS MB':>12}")
    for key, label in (("theirs", "wheel convert_model.py"), ("ours", "tools.caffe_converter")):
        print(f"{label:<24} {best[key][0]:8.2f} {best[key][1]:12.0f}")
    ok_t, ok_m = t_ratio <= TIME_TARGET, m_ratio <= RSS_TARGET
    print(f"ratio ours/theirs: time {t_ratio:.3f} (target <= {TIME_TARGET}: {'met' if ok_t else 'MISSED'}), "
          f"peak RSS {m_ratio:.3f} (target <= {RSS_TARGET}: {'met' if ok_m else 'MISSED'}); "
          f"parameters identical: {identical}")
    write_json(args.json, {"caffemodel_mb": round(caffemodel.stat().st_size / 1e6, 1), "repeat": args.repeat,
                           "theirs": {"wall_s": best["theirs"][0], "peak_rss_mb": best["theirs"][1]},
                           "ours": {"wall_s": best["ours"][0], "peak_rss_mb": best["ours"][1]},
                           "time_ratio": t_ratio, "rss_ratio": m_ratio, "params_identical": identical})
    print(f"summary: converting a 553 MB VGG16 V1 caffemodel took {best['ours'][0]:.1f} s / "
          f"{best['ours'][1]:.0f} MB with ours vs {best['theirs'][0]:.1f} s / {best['theirs'][1]:.0f} MB with the "
          f"wheel's converter; results in {args.json}")
    return 0 if ok_t and ok_m and identical else 1


def _compare(theirs: Path, ours: Path) -> bool:
    """Same parameter names (arg:/aux:) and bitwise-identical values in both checkpoints."""
    import mxnet as mx
    a = mx.nd.load(f"{theirs}-0000.params")
    b = mx.nd.load(f"{ours}-0000.params")
    if set(a) != set(b):
        print(f"parameter names differ: only wheel {sorted(set(a) - set(b))[:5]}, only ours {sorted(set(b) - set(a))[:5]}")
        return False
    same = True
    for key in a:
        if a[key].shape != b[key].shape or not np.array_equal(a[key].asnumpy(), b[key].asnumpy()):
            print(f"parameter {key} differs")
            same = False
    return same


if __name__ == "__main__":
    sys.exit(main())
