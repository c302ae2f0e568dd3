"""The packer's worker processes: one pipe each, results in task order, a dead worker pinned on its task.

Why not concurrent.futures.ProcessPoolExecutor: when a worker dies its pool breaks as a whole, and in CPython
3.11 a task submitted while the pool is breaking can be left without a result (the caller waits forever), and
with a forkserver a worker can be started into the broken pool that nobody stops (seen in
tests/test_recbuild_pack.py's crash test, about one run in fifty). Here each worker has its own duplex pipe and
its process sentinel: a worker that dies is seen at once, the tasks it held are known exactly, and the others
carry on.

Workers never outlive the packer: with fork they ask the kernel for SIGKILL when their parent dies
(PR_SET_PDEATHSIG); with a forkserver their parent is the forkserver, and they stop when the packer's end of
their pipe closes, which happens when it dies, however it dies.
"""
from __future__ import annotations

import collections
import logging
import multiprocessing.connection
import os
import signal
import sys
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence

from recbuild.atomic import pid_alive

log = logging.getLogger(__name__)

# <linux/prctl.h>: "send this signal to me when my parent dies".
_PR_SET_PDEATHSIG = 1
# Seconds a worker gets to leave after the last task before it is terminated.
_JOIN_TIMEOUT_S = 5.0


def die_with_parent(packer_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (kill -9, the OOM killer); then exit at
    once if the packer already died before the request took effect. Elsewhere nothing changes."""
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError):
            pass
    if not pid_alive(packer_pid):
        os._exit(1)


def _worker_main(conn, init: Callable, init_args: tuple, work: Callable, packer_pid: int) -> None:
    """A worker: init once, then answer (task number, task) with (task number, work(task)) until told to stop
    (None) or until the packer's end of the pipe is gone (EOF: the packer died)."""
    die_with_parent(packer_pid)
    # Ctrl-C reaches the whole process group; the packer handles it and stops the workers (no tracebacks here).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init(*init_args)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        if message is None:
            return
        number, task = message
        conn.send((number, work(task)))


class _Worker:
    def __init__(self, ctx, init: Callable, init_args: tuple, work: Callable):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, init, init_args, work, os.getpid()),
                                   daemon=True)
        self.process.start()
        child.close()          # the packer keeps only its end, so a worker's recv sees EOF if the packer dies
        self.held: Dict[int, Any] = {}

    def stop(self, wait: bool) -> None:
        if wait and self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(_JOIN_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def run_tasks(tasks: Sequence[Any], work: Callable, workers: int, ctx, init: Callable, init_args: tuple,
              in_flight_per_worker: int, on_crash: Callable[[Any], Any]) -> Iterator[Any]:
    """Yield work(task) for every task, in task order, computed by `workers` processes.

    Args:
        tasks: picklable tasks.
        work: a module-level function run in the workers.
        workers: number of processes.
        ctx: a multiprocessing context (fork or forkserver).
        init, init_args: run once in each worker first.
        in_flight_per_worker: tasks queued per worker (bounds the results held for reordering).
        on_crash: called with a task whose worker died while holding it: returns the task's result (the packer
            splits the task into single images to pin the crash on one).
    """
    pool: List[_Worker] = [_Worker(ctx, init, init_args, work) for _ in range(max(1, workers))]
    todo: Deque[int] = collections.deque(range(len(tasks)))
    done: Dict[int, Any] = {}
    window = max(2, len(pool) * in_flight_per_worker)
    next_out = 0
    clean = False
    try:
        while True:
            # Hand out what is ready first: the window below moves with next_out, and refilling before it
            # moved could leave every worker idle, with nothing for _collect to wait on.
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
            if next_out >= len(tasks):
                break
            for worker in pool:
                while todo and len(worker.held) < in_flight_per_worker and todo[0] < next_out + window:
                    number = todo.popleft()
                    worker.held[number] = tasks[number]
                    try:
                        worker.conn.send((number, tasks[number]))
                    except OSError:
                        break          # it died: _collect sees its sentinel and settles what it held
            if not any(w.held for w in pool):   # cannot happen (task next_out is held or done); never hang on it
                raise RuntimeError(f"internal: task {next_out} of {len(tasks)} is neither done nor handed out")
            _collect(pool, done, ctx, init, init_args, work, on_crash)
        clean = True
    finally:
        for worker in pool:
            worker.stop(wait=clean)


def _collect(pool: List[_Worker], done: Dict[int, Any], ctx, init, init_args, work, on_crash) -> None:
    """Wait for any answer or any death; file answers in `done`; replace a dead worker and settle its tasks."""
    waiting = {w.conn: w for w in pool if w.held}
    sentinels = {w.process.sentinel: w for w in pool if w.held}
    for ready in multiprocessing.connection.wait(list(waiting) + list(sentinels)):
        worker = waiting.get(ready) or sentinels.get(ready)
        if worker not in pool:
            continue
        dead = ready in sentinels
        try:
            while worker.conn.poll():               # answers sent before a death still count
                number, result = worker.conn.recv()
                worker.held.pop(number, None)
                done[number] = result
        except (EOFError, OSError):
            dead = True
        if not dead:
            continue
        lost = dict(sorted(worker.held.items()))
        worker.held.clear()
        worker.stop(wait=False)
        pool[pool.index(worker)] = _Worker(ctx, init, init_args, work)
        if lost:
            log.warning("a worker process died holding %d task(s); redoing them one image at a time", len(lost))
        for number, task in lost.items():
            done[number] = on_crash(task)


def run_alone(task: Any, work: Callable, ctx, init: Callable, init_args: tuple) -> Optional[Any]:
    """work(task) in a fresh process of its own; None if that process dies before answering."""
    worker = _Worker(ctx, init, init_args, work)
    try:
        worker.conn.send((0, task))
        ready = multiprocessing.connection.wait([worker.conn, worker.process.sentinel])
        if worker.conn in ready or worker.conn.poll():
            try:
                return worker.conn.recv()[1]
            except (EOFError, OSError):
                return None
        return None
    finally:
        worker.stop(wait=True)
