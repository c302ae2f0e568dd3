"""A prefix is a unit: publish a set of files as one, and let one writer at a time work on a prefix.

Our outputs are sets of files that must agree (`NAME.rec`/`.idx`/`.crc32`/`.pack.json`;
`PREFIX-symbol.json`/`-0000.params`/`-preprocess.json`; an epoch's `.params`/`.states`/metrics; a report's HTML and
JSON; predict's two CSVs). They keep their legacy names side by side in one folder, because stock MXNet readers
(`mx.model.load_checkpoint`, `ImageRecordIter`) find them by name; so the set cannot be swapped in by renaming one
folder. The mechanism is a small roll-forward journal, the classic answer for a multi-file commit on a POSIX file
system where only a single rename is atomic:

1. **stage**: every new file is written complete under a hidden temporary name in the same folder
   (`.NAME.PID.part`, recbuild.atomic.part_path) and fsynced;
2. **commit**: `.PREFIX.publish.json` is written atomically (temporary file, fsync, rename, folder fsync). It lists
   the renames to do and the old files to remove. Before it exists, a crash leaves the old set (the staged files
   are hidden, and removed by the next writer); once it exists the new set is decided;
3. **roll forward**: the renames, a folder fsync, the removal of the old set's files the new set does not replace,
   then the journal is removed. Every step is idempotent (a rename whose source is gone was done), so whoever
   finds a journal whose writer is gone can finish it: `settle()`, which every writer of ours runs under the lock
   and our readers run when the prefix is not locked.

So a crash at any instant leaves the whole old set, or (after the next settle) the whole new set; the old set is
removed only after the new one is in place. Renaming a folder onto an existing one (a deploy bundle) moves the old
folder aside to `.NAME.old.PID` first; that aside name is in the journal, so a roll-forward completes it too.

**One writer per prefix**: `writer_lock(prefix)` takes `fcntl.flock` on `.PREFIX.lock` beside the outputs (the file
holds the holder's pid and command line, for the refusal message). A second writer is refused at once with one line
naming the holder; readers never take the lock for long (they settle only when it is free) and never wait for it.
The kernel drops a flock when its holder dies, so a killed run never leaves a stale lock (its empty-looking lock
file stays until the next writer, which takes it over). The holder removes the file on release while still holding
the lock, and a process that locked a file which is no longer at that path retries, so two writers never hold two
different files.

Limits: stock MXNet readers do not settle. In the microseconds of a roll-forward, or after a crash inside one and
before the next command of ours touches the prefix, such a reader can see part of the new set beside part of the
old. flock is advisory and local: it does not hold across NFS clients on every NFS version.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

from recbuild.atomic import part_path, pid_alive, remove_stale_parts, staging_into

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
JOURNAL_FORMAT = "mxtransfer.publish/1"
# A reader may hold the lock for the instant of a settle; a writer retries this long before refusing.
_LOCK_PATIENCE_S = 0.5


class PrefixBusy(RuntimeError):
    """Another process is writing this prefix; the message is one line naming its pid and command."""


class PublishError(RuntimeError):
    """A journal that cannot be read or finished; the message names the file."""


def _split(prefix: PathLike) -> Tuple[Path, str]:
    prefix = Path(os.fspath(prefix))
    return prefix.parent, prefix.name


def journal_path(prefix: PathLike) -> Path:
    """`.NAME.publish.json` beside the prefix: the commit record of a publication in progress."""
    folder, name = _split(prefix)
    return folder / f".{name}.publish.json"


def lock_path(prefix: PathLike) -> Path:
    """`.NAME.lock` beside the prefix: the one-writer lock."""
    folder, name = _split(prefix)
    return folder / f".{name}.lock"


# ---- one writer per prefix ------------------------------------------------------------------------------------
# flock belongs to an open file description, so a second open+flock in this same process would refuse itself:
# locks this process holds are counted here and taken again for free (train holds its prefix for the whole run
# and publishes epochs inside it).
_HELD: Dict[str, List[int]] = {}


def _command_line() -> str:
    argv = getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv
    text = " ".join(argv).replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def _acquire(path: Path, patience: float) -> Optional[int]:
    """An fd holding flock on `path`, or None if another process holds it for `patience` seconds. The lock file
    is removed on release, so a lock taken on a file that was unlinked meanwhile does not count: retry."""
    deadline = time.monotonic() + patience
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
            continue
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)  # while still locked: a waiter that opened it sees it is gone (see _acquire)
    os.close(fd)


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    pid, _, cmd = text.partition(" ")
    return f"pid {pid}: {cmd}" if pid.isdigit() else "a process that has not yet written its pid"


@contextlib.contextmanager
def writer_lock(prefix: PathLike, settle_first: bool = True) -> Iterator[Path]:
    """Hold the one-writer lock of `prefix` for the block; settle the prefix first (see settle).

    Raises:
        PrefixBusy: another process holds it (after a short patience for a reader's settle).
        OSError: the lock file cannot be created (read-only folder, no space, ...).
    """
    path = lock_path(prefix)
    key = os.path.abspath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, _LOCK_PATIENCE_S)
    if fd is None:
        raise PrefixBusy(f"{prefix}: another run is writing it ({_holder(path)}); wait for it or stop it "
                         f"(lock {path})")
    try:
        os.ftruncate(fd, 0)  # a killed holder's line
        os.write(fd, f"{os.getpid()} {_command_line()}\n".encode("utf-8", "replace"))
        _HELD[key] = [fd, 1]
        try:
            if settle_first:
                settle(prefix, writer=True)
            yield path
        finally:
            del _HELD[key]
    finally:
        _release(path, fd)


def holds_lock(prefix: PathLike) -> bool:
    """Whether this process holds the writer lock of `prefix`."""
    return os.path.abspath(lock_path(prefix)) in _HELD


# ---- settle: finish a dead writer's committed publication, drop its uncommitted parts --------------------------
def settle(prefix: PathLike, writer: bool = False) -> bool:
    """Bring `prefix` to a whole set: roll a committed journal forward; as a writer also remove what dead writers
    left uncommitted (hidden `.part` files and folders, conversion staging folders, deploy's aside folders).

    A reader (writer=False) settles only when it can take the lock at once, so it never waits and never races a
    live writer; with the lock held by a live writer it leaves everything as it is.

    Returns:
        Whether a journal was rolled forward.
    """
    journal = journal_path(prefix)
    if not writer:
        if not journal.exists() or holds_lock(prefix):
            return _roll_forward_file(journal) if journal.exists() else False
        try:
            fd = _acquire(lock_path(prefix), 0)
        except OSError:
            return False  # a read-only folder: nobody can have written a journal we could finish
        if fd is None:
            return False
        try:
            return _roll_forward_file(journal)
        finally:
            _release(lock_path(prefix), fd)
    rolled = _roll_forward_file(journal)
    remove_dead_leftovers(prefix)
    return rolled


def remove_dead_leftovers(prefix: PathLike) -> List[Path]:
    """Remove the uncommitted temporaries of dead writers of `prefix`: `.NAME[-.]*.PID.part` files and folders
    (staged files, deploy's staged bundle), `.NAME.staging-PID/` (the converter's --verify staging) and
    `.NAME.old.PID/` (a bundle moved aside). Those of a live process are left alone."""
    folder, name = _split(prefix)
    removed = (remove_stale_parts(folder, glob.escape(name) + "[-.]*") + remove_stale_parts(folder, glob.escape(name))
               + remove_stale_parts(folder, glob.escape(journal_path(prefix).name)))  # an unfinished commit
    for pattern in (f".{glob.escape(name)}.staging-*", f".{glob.escape(name)}.old.*"):
        for path in sorted(folder.glob(pattern)) if folder.is_dir() else []:
            pid = path.name.rpartition("-" if ".staging-" in path.name else ".")[2]
            if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
                _remove(path)
                removed.append(path)
    if removed:
        log.info("removed %d unfinished output(s) of an interrupted run: %s", len(removed), [p.name for p in removed])
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync_folder(folder: PathLike) -> None:
    """Make the renames and removals in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync a staged file, or every file and folder of a staged folder."""
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file():
                _fsync_file(child)
        for sub in [path] + sorted(p for p in path.rglob("*") if p.is_dir()):
            fsync_folder(sub)
    else:
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _roll_forward_file(journal: Path) -> bool:
    try:
        record = json.loads(journal.read_text(encoding="utf-8"))
        if record.get("format") != JOURNAL_FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
    except FileNotFoundError:
        return False
    except (ValueError, OSError) as err:
        raise PublishError(f"{journal}: unreadable publication journal ({err}); remove it by hand after checking "
                           f"the files beside it") from None
    if record.get("pid") != os.getpid():
        log.info("finishing the publication of an interrupted run (pid %s): %s", record.get("pid"), journal.name)
    _roll_forward(journal, record)
    return True


def _roll_forward(journal: Path, record: dict) -> None:
    """Do (or finish) what a committed journal says; every step is idempotent."""
    base = journal.parent
    for step in record["renames"]:
        src, dst = base / step["src"], base / step["dst"]
        if not os.path.lexists(src):
            continue  # done before
        if step.get("aside") and dst.is_dir() and not dst.is_symlink():
            aside = base / step["aside"]
            if os.path.lexists(aside):
                _remove(aside)
            os.rename(dst, aside)
        os.replace(src, dst)
    fsync_folder(base)
    for name in record["remove"]:
        _remove(base / name)
    with contextlib.suppress(FileNotFoundError):
        journal.unlink()
    fsync_folder(base)


# ---- publish a set --------------------------------------------------------------------------------------------
class Publication:
    """A set of new files (and old files to drop) that becomes visible as one unit.

    Use as a context manager: `stage(final)` gives the temporary path to write each new file (or folder) at;
    `remove(path)` names an old file the new set does not replace. On a clean exit the set is committed and rolled
    forward (see the module docstring); on an exception the staged files are removed and the old set stays.

        with writer_lock(prefix), Publication(prefix) as pub:
            write_a(pub.stage(a_path)); write_b(pub.stage(b_path)); pub.remove(old_c_path)
    """

    def __init__(self, prefix: PathLike):
        self.prefix = Path(os.fspath(prefix))
        self.journal = journal_path(self.prefix)
        self.staged: List[Tuple[Path, Path]] = []
        self.removals: List[Path] = []
        self._folder = os.path.abspath(self.journal.parent)
        self._hook = contextlib.ExitStack()

    def stage(self, final: PathLike, folder: bool = False) -> Path:
        """The temporary path to write `final` at (created empty when `folder`). Files are renamed in the order
        staged: stage the file that marks a set complete for stock readers (a `.params`, a `.pack.json`) last."""
        final = Path(os.fspath(final))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = part_path(final)
        _remove(tmp)
        if folder:
            tmp.mkdir()
        if final in self.removals:
            self.removals.remove(final)
        if all(final != f for _, f in self.staged):  # written twice (a metrics log rewritten): one rename
            self.staged.append((tmp, final))
        return tmp

    def _stage_if_mine(self, path: Path) -> Optional[Path]:
        """recbuild.atomic's hook: a file written in this publication's folder joins the set."""
        if any(path == tmp for tmp, _ in self.staged):
            return path  # a staged temporary itself: written in place
        if os.path.abspath(path.parent) == self._folder:
            return self.stage(path)
        return None

    def adopt(self, staged: PathLike, final: PathLike) -> None:
        """Publish an already written temporary `staged` (same file system) onto `final`."""
        self.staged.append((Path(os.fspath(staged)), Path(os.fspath(final))))

    def remove(self, path: PathLike) -> None:
        """Remove this old file (or folder) once the new set is in place (nothing happens if it is missing)."""
        path = Path(os.fspath(path))
        if path not in self.removals and all(path != final for _, final in self.staged):
            self.removals.append(path)

    def commit(self) -> List[Path]:
        """fsync the staged files, write the journal (the commit point), roll forward. Returns the final paths."""
        base = self.journal.parent
        renames, removals = [], [p for p in self.removals if all(p != f for _, f in self.staged)]
        for tmp, final in self.staged:
            if final.is_dir() and not final.is_symlink() and not tmp.is_dir():
                # checked before the commit: a journal whose rename cannot be done would never settle
                raise IsADirectoryError(errno.EISDIR, "is a folder", str(final))
            _fsync_tree(tmp)
            step = {"src": os.path.relpath(tmp, base), "dst": os.path.relpath(final, base)}
            if tmp.is_dir():
                aside = final.with_name(f".{final.name}.old.{os.getpid()}")
                step["aside"] = os.path.relpath(aside, base)
                removals.append(aside)
            renames.append(step)
        for folder in {tmp.parent for tmp, _ in self.staged}:
            fsync_folder(folder)
        record = {"format": JOURNAL_FORMAT, "pid": os.getpid(), "prefix": self.prefix.name, "renames": renames,
                  "remove": [os.path.relpath(p, base) for p in removals]}
        _write_journal(self.journal, record)
        _roll_forward(self.journal, record)
        return [final for _, final in self.staged]

    def abort(self) -> None:
        for tmp, _ in self.staged:
            _remove(tmp)

    def __enter__(self) -> "Publication":
        self._hook.enter_context(staging_into(self._stage_if_mine))
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self._hook.close()
        if kind is None:
            try:
                self.commit()
            except BaseException:
                if not self.journal.exists():
                    self.abort()
                raise
        elif not self.journal.exists():
            self.abort()


def _write_journal(path: Path, record: dict) -> None:
    tmp = part_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_folder(path.parent)


@contextlib.contextmanager
def publish(prefix: PathLike) -> Iterator[Publication]:
    """`Publication(prefix)` under the prefix's writer lock (taken here unless this process holds it)."""
    with writer_lock(prefix), Publication(prefix) as pub:
        yield pub


def publish_files(prefix: PathLike, files: Dict[PathLike, "callable"], remove: Optional[List[PathLike]] = None
                  ) -> List[Path]:
    """Publish `{final path: writer(tmp path)}` as one unit (in the given order), removing `remove`."""
    with publish(prefix) as pub:
        for final, write in files.items():
            write(pub.stage(final))
        for path in remove or ():
            pub.remove(path)
    return [Path(os.fspath(f)) for f in files]


# ---- one-line messages for the errors a full, read-only or misnamed output gives -------------------------------
OUTPUT_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EISDIR: "is a folder", errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "not a folder"}


def describe_os_error(err: OSError, fallback: Optional[PathLike] = None) -> str:
    """One line naming the file and the errno of a failed write: `PATH: ENOSPC (no space left on the device)`."""
    name = errno.errorcode.get(err.errno or 0, "E?")
    what = OUTPUT_ERRNOS.get(err.errno, err.strerror or str(err))
    path = err.filename if err.filename is not None else fallback
    if path is not None:  # a staged temporary is named by the file it stands for: .NAME.PID.part -> NAME
        parts = [re.sub(r"^\.(.+)\.\d+\.part$", r"\1", part) for part in Path(os.fsdecode(path)).parts]
        path = Path(*parts)
    where = f"{path}: " if path is not None else ""
    return f"{where}{name} ({what})"


def output_error_line(err: OSError, fallback: Optional[PathLike] = None) -> str:
    """The CLIs' one line for a failed write: what failed, and that earlier outputs are as they were."""
    return f"error: {describe_os_error(err, fallback)}; earlier outputs are left as they were"
