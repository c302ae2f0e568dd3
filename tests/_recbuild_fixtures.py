"""Image trees and odd files for the recbuild tests, generated in code (nothing downloaded, nothing golden).

Images check themselves: image `i` of class `c` is a smooth field whose mean colour encodes (c, i), so a
decoded record can be matched to its source without a stored copy.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import cv2
import numpy as np

from symbols.mxnet_compat import stock_script

IM2REC = Path(cv2.__file__).parents[1] / "mxnet" / "tools" / "im2rec.py"


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like BGR uint8 image: smooth gradients and blobs plus mild texture (JPEG-friendly, not flat)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for ch in range(3):
        acc = np.full((h, w), rng.uniform(60, 190), np.float32)
        for _ in range(4):
            fx, fy = rng.uniform(0.5, 4) / w, rng.uniform(0.5, 4) / h
            acc += rng.uniform(15, 35) * np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 6.28))
        img[..., ch] = acc
    noise = cv2.GaussianBlur(rng.normal(0, 12, (h, w, 3)).astype(np.float32), (0, 0), 1.5)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def textured(h: int, w: int, period: float, seed: int = 0) -> np.ndarray:
    """photo() plus a diagonal texture of `period` pixels: detail near a 224 px target's resolution, where a
    resize that is off by a fraction of a pixel shows up in PSNR."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    wave = 25 * np.sin(2 * np.pi * (x / period + y / (period * 1.7)))
    return np.clip(photo(h, w, seed).astype(np.float32) + wave[..., None], 0, 255).astype(np.uint8)


def coded(h: int, w: int, label: int, i: int) -> np.ndarray:
    """A BGR image whose channel means encode (label, i): B = 40 + 50*label, G = 30 + 7*i, R = 128, plus a
    gentle gradient so resizing is not trivially exact."""
    img = np.empty((h, w, 3), np.float32)
    ramp = np.linspace(-10, 10, w, dtype=np.float32)[None, :]
    img[..., 0] = 40 + 50 * label + ramp
    img[..., 1] = 30 + 7 * i + ramp * 0.5
    img[..., 2] = 128 - ramp
    return np.clip(img, 0, 255).astype(np.uint8)


def make_tree(root: Path, classes=("cat", "dog", "eel"), per_class=5, ext=".jpg", sizes=None) -> Dict[str, Tuple]:
    """Folders of coded images. Returns {relative path: (label by sorted folder, i, (h, w))}."""
    truth = {}
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)] if sizes else (48 + 8 * i, 64)
            rel = f"{name}/img {i}{ext}"
            cv2.imwrite(str(root / rel), coded(h, w, label, i))
            truth[rel] = (label, i, (h, w))
    return truth


def run_im2rec(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The wheel's im2rec.py, as a user runs it."""
    return subprocess.run([*stock_script(IM2REC), *args], cwd=cwd, capture_output=True, text=True,
                          check=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))


def run_recbuild(*args: str, cwd: Path = None, check=True) -> subprocess.CompletedProcess:
    """`python -m recbuild ...` from the repository root (so the package resolves without installation)."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo))
    return subprocess.run([sys.executable, "-m", "recbuild", *args], cwd=cwd or repo, capture_output=True,
                          text=True, check=check, env=env)


def exif_jpeg(img: np.ndarray, orientation: int, progressive: bool = False) -> bytes:
    """A JPEG of `img` with an APP1 EXIF segment holding only the Orientation tag (0x0112)."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])
    data = buf.tobytes()
    # TIFF header (little endian), IFD0 at offset 8 with one SHORT entry, then next-IFD offset 0.
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + \
        struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + app1 + data[2:]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


_HOOK = '''\
# Written by tests/_recbuild_fixtures.py: runs at start-up in every Python process of the test's pack (the CLI,
# a forkserver and every worker), so a start method can be forced and a decoder crash staged in workers that
# the parent did not fork itself.
import os, signal
import recbuild.images as images
import recbuild.packing as packing
METHOD, CRASH_ON = {method!r}, {crash_on!r}
if METHOD:
    packing._start_method = lambda: METHOD
if CRASH_ON:
    real = images.load_image                 # what the packer's workers call (load_image_bytes wraps it)
    def crashing(path, cfg):
        if CRASH_ON in path:
            with open(os.path.join({folder!r}, "crash-parents"), "a") as note:
                note.write(f"{{os.getppid()}}\\n")   # who started the worker: the CLI (fork) or a forkserver
            os.kill(os.getpid(), signal.SIGSEGV)     # what a decoder bug in C does to its worker
        return real(path, cfg)
    images.load_image = crashing
'''


def hooked_env(folder: Path, method: str = "", crash_on: str = "") -> Dict[str, str]:
    """The environment for a `python -m recbuild` whose processes all run the hook above: packing started with
    `method` ('fork' or 'forkserver'; '' keeps the packer's choice), and a SIGSEGV in the worker decoding any
    path containing `crash_on` (which first appends its parent's pid to `folder`/crash-parents)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_HOOK.format(method=method, crash_on=crash_on, folder=str(folder)))
    repo = Path(__file__).resolve().parents[1]
    return dict(os.environ, PYTHONPATH=f"{folder}{os.pathsep}{repo}")
