"""Outputs appear atomically: written to a temporary file in the same folder, then renamed.

A killed run therefore never leaves a file that looks complete; the temporary name carries a `.part`
suffix plus the pid so a re-run can recognise and remove leftovers.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def part_path(path: PathLike) -> Path:
    """The temporary name `path` is written under before the final rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.part")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto `path` only if the block succeeds.

    Use for writers that want a file name rather than a handle (mx.nd.save, cv2.imwrite, MXRecordIO).
    """
    path = Path(path)
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


def write_json(path: PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, ensure_ascii=False)
        handle.write("\n")
