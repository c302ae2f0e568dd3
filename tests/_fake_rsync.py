"""A stand-in for `rsync` in the launcher tests, for machines without it: copies a local folder to `HOST:DIR`
on this machine, with rsync's documented semantics for the options the launcher may pass.

    python tests/_fake_rsync.py [-a|-z|-az|-v] [--exclude PATTERN]... [-e COMMAND] [--delete] SRC/ HOST:DIR/

As rsync: SRC/ (trailing slash) copies the folder's content into DIR, creating DIR; every file of SRC replaces
the file of the same relative path in DIR; files of DIR that SRC lacks are kept, unless --delete is given, which
removes them (except those matching an --exclude pattern, as rsync protects excluded files from deletion).
`--exclude PATTERN` skips every file or folder whose name matches PATTERN (fnmatch). The remote shell (-e) is
not run: HOST is this machine. Any other option is refused, so a launcher that starts passing one is noticed.
Each call is appended to $FAKE_RSYNC_LOG (one JSON argv per line) when that is set.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
from pathlib import Path
from typing import List

FLAGS = set("azv")


def _excluded(name: str, patterns: List[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _copy(src: Path, dst: Path, patterns: List[str], delete: bool) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in src.iterdir() if not _excluded(p.name, patterns)}
    for name in sorted(names):
        source, target = src / name, dst / name
        if source.is_dir() and not source.is_symlink():
            if target.exists() and not target.is_dir():
                target.unlink()
            _copy(source, target, patterns, delete)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            shutil.copy2(source, target, follow_symlinks=False)
    if delete:
        for extra in dst.iterdir():
            if extra.name not in names and not _excluded(extra.name, patterns):
                shutil.rmtree(extra) if extra.is_dir() and not extra.is_symlink() else extra.unlink()


def main(argv: List[str]) -> int:
    if os.environ.get("FAKE_RSYNC_LOG"):
        with open(os.environ["FAKE_RSYNC_LOG"], "a", encoding="utf-8") as log:
            log.write(json.dumps(argv) + "\n")
    patterns: List[str] = []
    delete = False
    paths: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--exclude", "-e"):
            if arg == "--exclude":
                patterns.append(argv[i + 1])
            i += 2
            continue
        if arg == "--delete":
            delete = True
        elif arg.startswith("-") and not arg.startswith("--") and set(arg[1:]) <= FLAGS:
            pass
        elif arg.startswith("-"):
            print(f"fake rsync: option {arg} is not emulated", file=sys.stderr)
            return 1
        else:
            paths.append(arg)
        i += 1
    if len(paths) != 2 or ":" not in paths[1] or not paths[0].endswith("/"):
        print("fake rsync: usage: rsync [options] SRC/ HOST:DIR/", file=sys.stderr)
        return 1
    _copy(Path(paths[0]), Path(paths[1].split(":", 1)[1]), patterns, delete)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
