"""`python -m bench.pack`: our packer against the wheel's im2rec.py and against a bare decode->resize->encode loop.

All three run in this one invocation, on the same files, with --resize 224 --quality 95 and the same number of
worker processes:

- im2rec: `python .../site-packages/mxnet/tools/im2rec.py --resize 224 --quality 95 --num-thread W` (subprocess);
- ours:   `python -m recbuild --resize 224 --quality 95 --num-thread W` (subprocess, same list file);
- floor:  `python -m bench.pack --floor-worker ...` (subprocess): a multiprocessing.Pool(W) over the same files
          doing only plain OpenCV calls written here, none of recbuild's code: read -> cv2.imdecode at a
          reduced DCT scale (IMREAD_REDUCED_COLOR_2/4/8, the largest that keeps 1.5x the target) -> one
          cv2.resize (INTER_AREA) -> cv2.imencode; no list parsing, no record writing. And, for reference, the
          same loop with im2rec's full decode + INTER_LINEAR resize.

The images: >= 500 photo-sized JPEGs (each side 500-3000 px, a quarter progressive) cut from real photos that
ship in package-registry packages (Debian lomiri-wallpapers-16.04, CC-BY-SA; the scikit-image and
scikit-learn wheels' sample photos). They are fetched with `apt-get download` / `pip download` into .cache/
once and generated deterministically (seeded) into .cache/bench_pack/.

Prints images/s for each and the two ratios the issue sets targets for:
  speedup over im2rec = ours img/s / im2rec img/s                     (target >= 2.0)
  overhead over floor = ours seconds / floor seconds                  (target <= 1.25)
and, for a set much larger than this one, the speedup with each packer's start-up (its time on a one-image list;
for im2rec mostly `import mxnet`) taken off both sides.

The cost of `--report` (issue 17: the hash at pack time adds at most ~5% to packing), timed in the same interleaved
rounds as the plain pack:
  ours_hash:   the packer's own pack_list(..., fingerprints=True) under the CLI's options (subprocess): packing
               plus the pack-time fingerprints, no report; the ratio to the plain pack is the hash's cost;
  ours_report: `python -m recbuild --report ...`: that, then the data report written from the fingerprints; its
               extra over ours_hash is the report's own, mostly fixed, cost (matplotlib, the page).
`--report-cost` times only the plain pack and these two (a quick figure: `--images 200 --repeat 3`).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import multiprocessing
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import List, Tuple

import cv2
import numpy as np

from symbols.mxnet_compat import stock_script

# ---- defaults, in one place ------------------------------------------------------------------------------------
CACHE = Path(".cache/bench_pack")
DOWNLOADS = Path(".cache/dl")
N_IMAGES = 520            # >= 500 (the issue); ~7 s of im2rec time on 2 idle cores
MIN_SIDE, MAX_SIDE = 500, 3000
RESIZE, QUALITY = 224, 95
N_CLASSES = 6             # folders, so the list is a real --recursive one
SEED = 0
GEN_VERSION = 2           # bump when the generator changes, so the cache is rebuilt
IM2REC = Path(cv2.__file__).parents[1] / "mxnet" / "tools" / "im2rec.py"
DEB = "lomiri-wallpapers-16.04"
WHEELS = ("scikit-image", "scikit-learn")
REPORT_COST_TARGET = 1.05   # issue 17: the pack-time hash adds at most ~5%


# ---- source photos ---------------------------------------------------------------------------------------------

def fetch_sources() -> List[Path]:
    """Real photos from registry packages, extracted once into .cache/bench_pack/sources."""
    out = CACHE / "sources"
    done = out / ".complete"
    if done.exists():
        return sorted(p for p in out.iterdir() if p.suffix in (".jpg", ".png"))
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not glob.glob(str(DOWNLOADS / f"{DEB}_*.deb")):
        subprocess.run(["apt-get", "download", DEB], cwd=DOWNLOADS, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for deb in glob.glob(str(DOWNLOADS / f"{DEB}_*.deb")):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
            for f in Path(tmp).rglob("*"):
                if f.suffix.lower() in (".jpg", ".jpeg", ".png") and f.stat().st_size > 100_000:
                    shutil.copy(f, out / f"lomiri_{f.stem}{f.suffix.lower()}")
    for name in WHEELS:
        if not glob.glob(str(DOWNLOADS / f"{name.replace('-', '_')}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                            "-d", str(DOWNLOADS), name], check=False)
    wanted = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png",
              "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg", "china.jpg", "flower.jpg")
    for whl in glob.glob(str(DOWNLOADS / "scikit_*.whl")):
        with zipfile.ZipFile(whl) as z:
            for member in z.namelist():
                if os.path.basename(member) in wanted:
                    (out / os.path.basename(member)).write_bytes(z.read(member))
    found = sorted(p for p in out.iterdir() if p.suffix in (".jpg", ".png"))
    if len(found) < 5:
        sys.exit(f"bench.pack: only {len(found)} source photos in {out}; the package registries (apt-get "
                 f"download {DEB}, pip download {' '.join(WHEELS)}) could not be reached")
    done.touch()
    return found


def generate(sources: List[Path], n: int, seed: int) -> Path:
    """n JPEGs, each side in [MIN_SIDE, MAX_SIDE], cut from the sources; cached by (n, seed, version)."""
    root = CACHE / f"photos_n{n}_s{seed}_v{GEN_VERSION}"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(seed)
    photos = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in sources]
    photos = [p for p in photos if p is not None]
    print(f"generating {n} photo-sized JPEGs from {len(photos)} real photos into {root} (once) ...")
    for i in range(n):
        src = photos[i % len(photos)]
        w, h = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
        # Crop a random window with the target aspect from the source, then scale it to (w, h).
        sh, sw = src.shape[:2]
        frac = rng.uniform(0.6, 1.0)
        cw = min(sw, int(sh * w / h)) * frac
        ch = cw * h / w
        x0, y0 = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
        crop = src[int(y0):int(y0 + ch), int(x0):int(x0 + cw)]
        img = cv2.resize(crop, (w, h), interpolation=cv2.INTER_CUBIC if w > cw else cv2.INTER_AREA)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        params = [cv2.IMWRITE_JPEG_QUALITY, rng.randint(85, 95),
                  cv2.IMWRITE_JPEG_PROGRESSIVE, int(i % 4 == 0)]
        folder = root / f"class{i % N_CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"img{i:05d}.jpg"), img, params)
    (root / ".complete").touch()
    return root


# ---- the floor: nothing but decode -> resize -> encode ----------------------------------------------------------

# JPEG start-of-frame markers that carry the size (baseline, extended, progressive, lossless, arithmetic).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_REDUCED = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}
# The same margin recbuild keeps (recbuild.config.DCT_OVERSAMPLE, restated so that the floor uses none of
# recbuild's code): decode at 1/s while the short edge stays >= 1.5 x the target.
FLOOR_OVERSAMPLE = 1.5


def _jpeg_size(data: bytes) -> Tuple[int, int]:
    """(width, height) from the first SOF marker: the floor's only parsing, to pick the DCT scale."""
    pos = 2
    while pos + 9 < len(data):
        if data[pos] != 0xFF:
            pos += 1
            continue
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF:
            return int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big")
        pos += 2 + length
    raise ValueError("no SOF marker")


def _floor_reduced(path: str) -> int:
    """Plain OpenCV, no recbuild code: cv2.imdecode at the largest reduced-DCT scale that keeps the short edge
    >= FLOOR_OVERSAMPLE x RESIZE, one cv2.resize (INTER_AREA) to im2rec's output size, cv2.imencode."""
    with open(path, "rb") as f:
        data = f.read()
    w, h = _jpeg_size(data)
    scale = next((s for s in (8, 4, 2) if min(w, h) >= s * RESIZE * FLOOR_OVERSAMPLE), 1)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED.get(scale, cv2.IMREAD_COLOR))
    fh, fw = img.shape[0] * scale, img.shape[1] * scale        # EXIF may have turned it
    size = (RESIZE, fh * RESIZE // fw) if fh > fw else (fw * RESIZE // fh, RESIZE)
    out = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return len(cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1])


def _floor_full(path: str) -> int:
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    size = (RESIZE, h * RESIZE // w) if h > w else (w * RESIZE // h, RESIZE)
    return len(cv2.imencode(".jpg", cv2.resize(img, size), [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1])


def _floor_init():
    cv2.setNumThreads(1)


def run_floor(kind: str, file_list: str, workers: int) -> None:
    """The floor loop, in a fresh process (as the contenders are): forking after this process has used OpenCV
    would deadlock the workers on OpenCV's thread-pool lock."""
    paths = Path(file_list).read_text().splitlines()
    fn = {"reduced": _floor_reduced, "full": _floor_full}[kind]
    with multiprocessing.get_context("fork").Pool(workers, initializer=_floor_init) as pool:
        sizes = pool.map(fn, paths, chunksize=8)
    if len(sizes) != len(paths) or min(sizes) <= 0:
        sys.exit("bench.pack: the floor loop lost images")


def time_cmd(cmd: List[str], cwd=None) -> Tuple[float, float]:
    """(wall seconds, CPU seconds of the command and every process it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"bench.pack: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def count_records(idx: Path) -> int:
    return sum(1 for line in idx.read_text().splitlines() if line.strip())


def quality(paths: List[str], step: int = 5) -> Tuple[float, float, float]:
    """PSNR of our decode (reduced DCT scale) + resize against a full decode + INTER_AREA resize, on every
    `step`th image: (min, 5th percentile, mean) in dB."""
    from recbuild.config import PackConfig
    from recbuild.images import decode, output_size, transform
    cfg = PackConfig(resize=RESIZE, workers=1)
    values = []
    for path in paths[::step]:
        with open(path, "rb") as f:
            data = f.read()
        decoded = decode(data, path, cfg)
        ours = transform(decoded, RESIZE, False)
        ref = cv2.resize(cv2.imread(path, cv2.IMREAD_COLOR), output_size(decoded.full, RESIZE, False),
                         interpolation=cv2.INTER_AREA)
        mse = ((ours.astype("float64") - ref) ** 2).mean()
        values.append(10 * math.log10(255 ** 2 / mse) if mse else 99.0)
    values.sort()
    return values[0], values[len(values) // 20], sum(values) / len(values)


def hash_command(common: List[str], prefix: Path, root: Path) -> List[str]:
    """The packer with pack-time fingerprints and without the report: the CLI's own parser and PackConfig, then
    pack_list(..., fingerprints=True) for every PREFIX*.lst, as `python -m recbuild --report` packs them."""
    code = ("import sys; from recbuild.cli import build_parser, _pack_config; "
            "from recbuild.packing import find_lists, pack_list; p = build_parser(); a = p.parse_args(sys.argv[1:]); "
            "work, lists = find_lists(a.prefix); "
            "[pack_list(l, a.root, _pack_config(a, p), out_dir=work, fingerprints=True) for l in lists]")
    return [sys.executable, "-c", code, *common, "--no-progress", str(prefix), str(root)]


def report_figures(results: dict, cpu: dict, pairs: int) -> Tuple[Tuple[float, float], Tuple[float, float], str]:
    """(hash cost, whole --report cost) as (wall, CPU) ratios to the plain pack, and the line that says so."""
    hash_cost = (results["ours_hash"] / results["ours"], cpu["ours_hash"] / cpu["ours"])
    report_cost = (results["ours_report"] / results["ours"], cpu["ours_report"] / cpu["ours"])
    line = (f"pack-time hash: {hash_cost[0]:.3f}x the plain pack's wall time, {hash_cost[1]:.3f}x its CPU time "
            f"(target <= {REPORT_COST_TARGET}); whole --report (the hash, then the data report with {pairs} "
            f"pair(s) on the page): {report_cost[0]:.3f}x wall, {report_cost[1]:.3f}x CPU, the report itself "
            f"{results['ours_report'] - results['ours_hash']:+.2f} s wall, "
            f"{cpu['ours_report'] - cpu['ours_hash']:+.2f} s CPU (fixed, not per image)")
    return hash_cost, report_cost, line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=N_IMAGES, help="number of generated photos (>= 500)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes for all three")
    p.add_argument("--repeat", type=int, default=3, help="time each contender this often (interleaved), keep the best")
    p.add_argument("--report-cost", action="store_true",
                   help="time only `python -m recbuild` with and without --report (interleaved) and print the ratio")
    p.add_argument("--floor-worker", choices=("reduced", "full"), help=argparse.SUPPRESS)
    p.add_argument("--file-list", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.floor_worker:
        run_floor(a.floor_worker, a.file_list, a.workers)
        return 0

    root = generate(fetch_sources(), a.images, SEED).resolve()
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    mb = sum(os.path.getsize(p) for p in paths) / 2**20
    for path in paths:                                   # warm the page cache so no contender pays for disk
        with open(path, "rb") as f:
            f.read()
    work = Path(tempfile.mkdtemp(prefix="bench_pack_"))
    try:
        subprocess.run([sys.executable, "-m", "recbuild", "--list", "--recursive", str(work / "ours" / "set"),
                        str(root)], check=True, stdout=subprocess.DEVNULL)
        (work / "im2rec").mkdir()
        shutil.copy(work / "ours" / "set.lst", work / "im2rec" / "set.lst")
        # Start-up cost: each packer on a one-image list (im2rec's is mostly `import mxnet`, ~2.7 s here).
        first = (work / "ours" / "set.lst").read_text().splitlines()[0] + "\n"
        for name in ("im2rec", "ours"):
            (work / name / "one.lst").write_text(first)
        (work / "files.txt").write_text("\n".join(paths) + "\n")
        floor_cmd = [sys.executable, "-m", "bench.pack", "--workers", str(a.workers), "--file-list",
                     str(work / "files.txt"), "--floor-worker"]
        common = ["--resize", str(RESIZE), "--quality", str(QUALITY), "--num-thread", str(a.workers)]

        def im2rec_cmd(list_name: str) -> List[str]:
            return [*stock_script(IM2REC), *common, str(work / "im2rec" / list_name), str(root)]  # numpy aliases

        def ours_cmd(list_name: str, *extra: str) -> List[str]:
            return [sys.executable, "-m", "recbuild", *common, *extra, "--no-progress",
                    str(work / "ours" / list_name), str(root)]

        hash_cmd = hash_command(common, work / "ours" / "set", root)
        contenders = [("im2rec", im2rec_cmd("set")), ("ours", ours_cmd("set")), ("ours_hash", hash_cmd),
                      ("ours_report", ours_cmd("set", "--report")),
                      ("floor", floor_cmd + ["reduced"]), ("floor_full", floor_cmd + ["full"]),
                      ("im2rec_startup", im2rec_cmd("one")), ("ours_startup", ours_cmd("one"))]
        if a.report_cost:
            contenders = contenders[1:4]
        results, cpu = {}, {}
        for rnd in range(a.repeat):                        # interleaved rounds: load changes hit all alike
            for name, cmd in contenders:
                t, c = time_cmd(cmd)
                print(f"  round {rnd + 1}: {name:14s} {t:6.2f} s wall {c:6.2f} s CPU", flush=True)
                results[name] = min(t, results.get(name, float("inf")))
                cpu[name] = min(c, cpu.get(name, float("inf")))
        n_ours = count_records(work / "ours" / "set.idx")
        n_ref = len(paths) if a.report_cost else count_records(work / "im2rec" / "set.idx")
        pairs = json.loads((work / "ours" / "set.report.json").read_text())["pairs_total"]
        if n_ours != len(paths) or n_ref != len(paths):
            sys.exit(f"bench.pack: record counts differ: ours {n_ours}, im2rec {n_ref}, images {len(paths)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(paths)
    hash_cost, report_cost, report_line = report_figures(results, cpu, pairs)
    if a.report_cost:
        print(f"\n{n} JPEGs -> --resize {RESIZE} --quality {QUALITY}, {a.workers} worker(s), best of {a.repeat}:\n"
              + "\n".join(f"  {k:12s} {results[k]:6.2f} s wall {cpu[k]:6.2f} s CPU"
                          for k in ("ours", "ours_hash", "ours_report")) + "\n" + report_line)
        return 0 if min(hash_cost) <= REPORT_COST_TARGET else 1
    rate = {k: n / v for k, v in results.items()}
    speedup = rate["ours"] / rate["im2rec"]
    overhead = results["ours"] / results["floor"]
    print(f"\n{n} JPEGs ({mb:.0f} MiB, sides {MIN_SIDE}-{MAX_SIDE} px) -> --resize {RESIZE} --quality {QUALITY}, "
          f"{a.workers} worker(s), {os.cpu_count()} cores, best of {a.repeat}")
    labels = {"im2rec": "im2rec.py (wheel)", "ours": "python -m recbuild",
              "floor": "floor (plain OpenCV, reduced DCT)", "floor_full": "floor (full decode, im2rec)"}
    print(f"  {'':34s} {'wall s':>8s} {'img/s':>8s} {'CPU s':>8s}")
    for k, label in labels.items():
        print(f"  {label:34s} {results[k]:8.2f} {rate[k]:8.1f} {cpu[k]:8.2f}")
    print(f"speedup over im2rec: {speedup:.2f}x (target >= 2.0)   "
          f"time over floor: {overhead:.2f}x (target <= 1.25)")
    print(f"same in CPU seconds (robust to other load on the machine): "
          f"{cpu['im2rec'] / cpu['ours']:.2f}x and {cpu['ours'] / cpu['floor']:.2f}x")
    # What a much larger set would see: the start-up (a one-image run) taken off both sides.
    steady = (results["im2rec"] - results["im2rec_startup"]) / (results["ours"] - results["ours_startup"])
    steady_cpu = (cpu["im2rec"] - cpu["im2rec_startup"]) / (cpu["ours"] - cpu["ours_startup"])
    print(f"start-up (one-image run): im2rec {results['im2rec_startup']:.2f} s, ours {results['ours_startup']:.2f} s; "
          f"speedup with it taken off both: {steady:.2f}x, {steady_cpu:.2f}x in CPU seconds "
          "(per image: what a much larger set converges to)")
    print(report_line)
    q_min, q_p5, q_mean = quality(paths, step=1)
    print(f"quality of the reduced DCT decode vs full decode + resize, PSNR over {len(paths)} images: "
          f"min {q_min:.1f} dB, 5th percentile {q_p5:.1f} dB, mean {q_mean:.1f} dB")
    with open(CACHE / "last_result.json", "w") as f:
        json.dump({"images": n, "workers": a.workers, "seconds": results, "cpu_seconds": cpu,
                   "speedup": speedup, "overhead": overhead, "speedup_without_startup": steady,
                   "speedup_without_startup_cpu": steady_cpu, "hash_cost": hash_cost, "report_cost": report_cost},
                  f, indent=2)
    return 0 if speedup >= 2.0 and overhead <= 1.25 else 1


if __name__ == "__main__":
    sys.exit(main())
