"""A small fault injector for the publish tests: the k-th file-system call of a run fails (ENOSPC, EROFS,
EACCES) or kills the process there (os._exit, as abrupt as SIGKILL for the files: no cleanup, no finally).

The calls counted are the ones a publication is made of: `os.fsync`, `os.replace`, `os.rename`, `os.unlink` and
every `open` for writing. In process (`inject`), with pytest's monkeypatch; in a child process, run
`python -m tests._faults MODULE|SCRIPT.py ARGS...` with FAULT_AT / FAULT_KIND in the environment (FAULT_COUNT=FILE writes
the number of calls a clean run made, to size the loop over k).
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import runpy
import sys
from typing import Optional

KINDS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eacces": errno.EACCES}
_COUNTED = ("fsync", "replace", "rename", "unlink")


class Injector:
    """Counts the calls; at call `at` fails with `kind` (an OSError naming the file) or exits (`kind="kill"`)."""

    def __init__(self, at: Optional[int], kind: str = "enospc"):
        self.at, self.kind, self.calls, self.pid = at, kind, 0, os.getpid()

    def hit(self, what, path) -> None:
        if os.getpid() != self.pid:  # a forked worker (the packer's): only the process under test counts
            return
        self.calls += 1
        if self.at is None or self.calls != self.at:
            return
        if self.kind == "kill":
            os._exit(137)
        code = KINDS[self.kind]
        name = path if isinstance(path, (str, bytes, os.PathLike)) else None
        raise OSError(code, os.strerror(code), name)

    def wrap(self, name: str, real):
        def counted(*args, **kwargs):
            self.hit(name, args[0] if args else None)
            return real(*args, **kwargs)
        return counted

    def wrap_open(self, real):
        def opened(file, mode="r", *args, **kwargs):
            if isinstance(mode, str) and any(c in mode for c in "wax+") and not isinstance(file, int):
                self.hit("open", file)
            return real(file, mode, *args, **kwargs)
        return opened


def inject(monkeypatch, at: Optional[int], kind: str = "enospc") -> Injector:
    """Install an Injector in this process (undone by monkeypatch at the end of the test)."""
    injector = Injector(at, kind)
    for name in _COUNTED:
        monkeypatch.setattr(os, name, injector.wrap(name, getattr(os, name)))
    monkeypatch.setattr(builtins, "open", injector.wrap_open(builtins.open))
    monkeypatch.setattr(io, "open", builtins.open)
    return injector


def _main() -> None:
    at = os.environ.get("FAULT_AT")
    injector = Injector(int(at) if at else None, os.environ.get("FAULT_KIND", "kill"))
    for name in _COUNTED:
        setattr(os, name, injector.wrap(name, getattr(os, name)))
    builtins.open = injector.wrap_open(builtins.open)
    io.open = builtins.open
    module, sys.argv = sys.argv[1], sys.argv[1:]
    count_file = os.environ.get("FAULT_COUNT")
    try:
        if module.endswith(".py"):
            runpy.run_path(module, run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        if count_file:
            with io.FileIO(count_file, "w") as handle:  # not counted
                handle.write(str(injector.calls).encode())


if __name__ == "__main__":
    _main()
