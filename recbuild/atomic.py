"""Outputs appear atomically: written to a temporary file in the same folder, then renamed.

A killed run therefore never leaves a file that looks complete; the temporary name carries a `.part`
suffix plus the pid so a re-run can recognise and remove leftovers. A file is atomic on its own; a set of files
that must agree is published with recbuild.publish, whose Publication these writers stage into (staging_into).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


def part_path(path: PathLike) -> Path:
    """The temporary name `path` is written under before the final rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.part")


# Inside `recbuild.publish.Publication` the writes below do not rename at once: a file in the publication's
# folder is staged into it and published with the rest of its set (so the writers of a set need not know they
# are part of one). Per thread: a pack's writer thread and a report thread must not stage into each other.
_STAGING = threading.local()


@contextlib.contextmanager
def staging_into(stage: Callable[[Path], Optional[Path]]) -> Iterator[None]:
    """Within the block, `atomic_path` asks `stage(path)` for a temporary path first (None: write as usual)."""
    stack = _STAGING.__dict__.setdefault("stack", [])
    stack.append(stage)
    try:
        yield
    finally:
        stack.pop()


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto `path` only if the block succeeds.

    Use for writers that want a file name rather than a handle (mx.nd.save, cv2.imwrite, MXRecordIO).
    Inside a publication (see staging_into) the path is staged and renamed with the rest of the set.
    """
    path = Path(path)
    stack = getattr(_STAGING, "stack", None)
    staged = stack[-1](path) if stack else None
    if staged is not None:
        yield staged
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs) -> Iterator:
    """Open a temporary file for writing; on success fsync it and rename it onto `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_parts(folder: PathLike, name_glob: str) -> List[Path]:
    """Delete the `.NAME.PID.part` files and folders (see part_path) of a NAME matching `name_glob` whose writer no longer
    runs: what killed runs left (a VGG16 .params.part is 0.5 GB). Those of a live process are left alone.

    Returns:
        The files removed.
    """
    folder = Path(folder)
    removed: List[Path] = []
    for part in sorted(folder.glob(f".{name_glob}.*.part")) if folder.is_dir() else []:
        pid = part.name[:-len(".part")].rpartition(".")[2]
        if not pid.isdigit() or (int(pid) != os.getpid() and pid_alive(int(pid))):
            continue
        if part.is_dir() and not part.is_symlink():  # a staged folder (a deploy bundle)
            shutil.rmtree(part, ignore_errors=True)
            removed.append(part)
            continue
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
            removed.append(part)
    if removed:
        log.info("removed %d unfinished file(s) of an interrupted run: %s", len(removed), [p.name for p in removed])
    return removed


def write_json(path: PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, ensure_ascii=False)
        handle.write("\n")
