"""recbuild.publish: a set of files published as one unit, settle after a fault or a kill, one writer per prefix.

Every fault is injected at each file-system call of a publication in turn (tests/_faults.py): after it, and after
the settle the next run of ours does, the set on disk is byte for byte the old one or the new one."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict

import pytest

from recbuild.publish import (PrefixBusy, Publication, describe_os_error, journal_path, lock_path, publish, settle,
                              writer_lock)
from tests._faults import inject

ROOT = Path(__file__).resolve().parents[1]
OLD = {"s.json": b'{"old": 1}\n', "s.txt": b"old text\n", "s.extra": b"only the old set has me\n"}
NEW = {"s.json": b'{"new": 2}\n', "s.txt": b"new text, longer than the old\n"}


def visible(folder: Path) -> Dict[str, bytes]:
    """The set as a stock reader sees it: every file that is not hidden."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def hidden(folder: Path) -> list:
    """Hidden leftovers: staged files, journals, aside folders (a lock file whose removal failed is harmless: it
    is unlocked, and the next writer takes it over)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def write_set(folder: Path, files: Dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).write_bytes(data)


def publish_new(folder: Path) -> None:
    with publish(folder / "s") as unit:
        for name, data in NEW.items():
            unit.stage(folder / name).write_bytes(data)
        unit.remove(folder / "s.extra")


def test_publish_replaces_the_whole_set_and_leaves_nothing_hidden(tmp_path):
    write_set(tmp_path, OLD)
    publish_new(tmp_path)
    assert visible(tmp_path) == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NEW)  # no journal, lock or .part left


def test_a_failure_inside_the_block_keeps_the_old_set(tmp_path):
    write_set(tmp_path, OLD)
    with pytest.raises(RuntimeError, match="boom"):
        with publish(tmp_path / "s") as unit:
            unit.stage(tmp_path / "s.json").write_bytes(b"half")
            raise RuntimeError("boom")
    assert visible(tmp_path) == OLD and sorted(p.name for p in tmp_path.iterdir()) == sorted(OLD)


def _calls_of_a_clean_run(tmp_path, monkeypatch) -> int:
    folder = tmp_path / "count"
    folder.mkdir()
    write_set(folder, OLD)
    with monkeypatch.context() as patch:
        injector = inject(patch, None)
        publish_new(folder)
    return injector.calls


@pytest.mark.parametrize("kind", ["enospc", "erofs", "eacces"])
def test_an_error_at_every_call_leaves_old_or_new(tmp_path, monkeypatch, kind):
    total = _calls_of_a_clean_run(tmp_path, monkeypatch)
    assert total >= 10  # stage writes, fsyncs, journal, renames, removals
    seen = set()
    for k in range(1, total + 1):
        folder = tmp_path / f"{kind}{k}"
        folder.mkdir()
        write_set(folder, OLD)
        failed = None
        with monkeypatch.context() as patch:
            inject(patch, k, kind)
            try:
                publish_new(folder)
            except OSError as err:
                failed = err
        if failed is None:  # the fault hit a step whose failure does not matter (the lock file's removal)
            assert visible(folder) == NEW, k
        else:
            assert failed.errno == {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eacces": errno.EACCES}[kind]
            line = describe_os_error(failed)
            assert "\n" not in line and errno.errorcode[failed.errno] in line
        settle(folder / "s", writer=True)  # what the next writer of ours does first
        state = visible(folder)
        assert state in (OLD, NEW), (k, state)
        assert hidden(folder) == [], k
        seen.add("old" if state == OLD else "new")
    assert seen == {"old", "new"}  # the faults fell both before and after the commit point


@pytest.mark.slow
def test_a_kill_at_every_call_leaves_old_or_new(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from tests.test_publish import publish_new
        publish_new(Path(sys.argv[1]))
    """)
    driver = tmp_path / "driver.py"
    driver.write_text(script)
    count = tmp_path / "count.txt"
    clean = tmp_path / "clean"
    clean.mkdir()
    write_set(clean, OLD)
    env = dict(os.environ, FAULT_COUNT=str(count), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "tests._faults", str(driver), str(clean)], env=env,
                   check=True, cwd=ROOT)
    total = int(count.read_text())
    assert visible(clean) == NEW
    seen = set()
    for k in range(1, total + 1):
        folder = tmp_path / f"kill{k}"
        folder.mkdir()
        write_set(folder, OLD)
        run = subprocess.run([sys.executable, "-m", "tests._faults", str(driver), str(folder)],
                             env=dict(env, FAULT_AT=str(k), FAULT_KIND="kill", FAULT_COUNT=""), cwd=ROOT)
        assert run.returncode == 137, k
        settle(folder / "s")  # a reader of ours: the killed writer's lock is gone, so it finishes the commit
        settle(folder / "s", writer=True)
        state = visible(folder)
        assert state in (OLD, NEW), (k, state)
        assert hidden(folder) == [], k
        seen.add("old" if state == OLD else "new")
    assert seen == {"old", "new"}


def test_folder_swap_moves_the_old_folder_aside_and_removes_it_after(tmp_path, monkeypatch):
    def build(folder: Path, at=None):
        out = folder / "bundle"
        out.mkdir(parents=True)
        (out / "a").write_bytes(b"old a")
        (out / "b").write_bytes(b"old b")
        with monkeypatch.context() as patch:
            injector = inject(patch, at)
            try:
                with publish(out) as unit:
                    staged = unit.stage(out, folder=True)
                    (staged / "a").write_bytes(b"new a")
            except OSError:
                pass
        return out, injector.calls
    _, total = build(tmp_path / "clean")
    assert visible(tmp_path / "clean" / "bundle") == {"a": b"new a"}
    for k in range(1, total + 1):
        out, _ = build(tmp_path / f"k{k}", k)
        settle(out, writer=True)
        assert visible(out) in ({"a": b"old a", "b": b"old b"}, {"a": b"new a"}), k
        assert hidden(out.parent) == [], k  # no aside, .part or journal left


def test_an_output_path_that_is_a_folder_fails_before_the_commit(tmp_path):
    write_set(tmp_path, OLD)
    (tmp_path / "s.csv").mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        with publish(tmp_path / "s") as unit:
            unit.stage(tmp_path / "s.json").write_bytes(b"new")
            unit.stage(tmp_path / "s.csv").write_bytes(b"new")
    assert describe_os_error(caught.value).startswith(f"{tmp_path / 's.csv'}: EISDIR")
    assert visible(tmp_path) == OLD and not journal_path(tmp_path / "s").exists()


HOLDER = textwrap.dedent("""
    import sys, time
    from recbuild.publish import writer_lock
    with writer_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_one_writer_per_prefix_readers_never_wait(tmp_path):
    prefix = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(prefix)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(PrefixBusy) as busy:
            with writer_lock(prefix):
                pass
        message = str(busy.value)
        assert f"pid {holder.pid}:" in message and str(prefix) in message and "\n" not in message
        assert time.monotonic() - started < 3
        started = time.monotonic()
        assert settle(prefix) is False  # a reader does not wait for the writer
        assert time.monotonic() - started < 0.5
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the killed holder's lock: the next writer takes it over.
    with writer_lock(prefix):
        assert f"{os.getpid()} " in lock_path(prefix).read_text()
    assert not lock_path(prefix).exists()


def test_reentrant_in_one_process_and_nested_publications_stage_into_theirs(tmp_path):
    with writer_lock(tmp_path / "s"):
        with Publication(tmp_path / "s") as unit:
            unit.stage(tmp_path / "s.json").write_bytes(b"x")
        assert (tmp_path / "s.json").read_bytes() == b"x"
        with publish(tmp_path / "s"):  # the lock this process holds is taken again for free
            from recbuild.atomic import write_json
            write_json(tmp_path / "s.meta.json", {"a": 1})  # joins the unit through atomic's hook
            write_json(tmp_path / "sub" / "elsewhere.json", {"b": 2})  # another folder: written at once
            assert (tmp_path / "sub" / "elsewhere.json").exists() and not (tmp_path / "s.meta.json").exists()
        assert (tmp_path / "s.meta.json").exists()
