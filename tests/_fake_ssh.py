"""A stand-in for `ssh` in the launcher tests: runs the remote command on this machine, the way sshd would.

    python tests/_fake_ssh.py [-t|-tt|-T] [-n] [-o OPTION]... [-p PORT] [-l USER] HOST COMMAND...

The tests put a script named `ssh` first on PATH that runs this file. Like the real client and server, it is two
processes joined by a socket (the "network"):

- the client: this process, which the launcher starts and stops. It waits for the remote exit status and
  exits with it (255 if the connection drops first, as ssh does);
- a stand-in sshd, in a session of its own (so the launcher's kill of the client's process group does not
  reach it), that runs `sh -c COMMAND` in a clean environment (a remote login does not inherit the local one).
  With -tt the command gets a new pseudo-terminal whose controlling process is the shell; otherwise pipes.

When the client dies, however it dies, the sshd sees the socket close and does what sshd does: with a terminal,
it closes the terminal's master side, and the kernel hangs the terminal up (SIGHUP to the remote shell, then to
its foreground processes); with pipes it just goes away, and the remote command keeps running. A remote
command killed by a signal with no shell left to report it makes the client exit 255, like OpenSSH.

Each call is appended to $FAKE_SSH_LOG (one JSON argv per line) when that is set.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import sys
import termios
import time
from typing import List, Tuple

NO_VALUE = set("tTnqvNfAaCxXYy46")  # ssh options that take no argument (-t may be given twice)
REMOTE_ENV = ("PATH", "HOME", "LANG", "TMPDIR")  # what a login shell would have; nothing else passes
REAP_S = 5.0


def parse(argv: List[str]) -> Tuple[bool, str, str]:
    """(whether the remote gets a terminal, host, remote command) from ssh's command line.

    As ssh: -tt forces a terminal, a single -t only when our stdin is one, -T never.
    """
    ttys, no_tty, i = 0, False, 0
    while i < len(argv) and argv[i].startswith("-"):
        flags = argv[i][1:]
        if all(f in NO_VALUE for f in flags):
            ttys += flags.count("t")
            no_tty = no_tty or "T" in flags
            i += 1
        else:  # an option with a value: -oValue or -o Value
            i += 1 if len(flags) > 1 else 2
    if i >= len(argv) - 1:
        sys.exit("fake ssh: usage: ssh [options] HOST COMMAND")
    tty = not no_tty and (ttys >= 2 or (ttys == 1 and os.isatty(0)))
    return tty, argv[i], " ".join(argv[i + 1:])


def _child_exec(command: str, stdio: Tuple[int, int]) -> None:
    stdin, out = stdio
    os.dup2(stdin, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    env = {k: os.environ[k] for k in REMOTE_ENV if k in os.environ}
    os.execve("/bin/sh", ["sh", "-c", command], env)


def _start_remote(command: str, tty: bool) -> Tuple[int, int]:
    """Fork `sh -c command`; return (its pid, the fd its output comes out of)."""
    if tty:
        master, slave = os.openpty()
        pid = os.fork()
        if pid == 0:
            os.close(master)
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)  # the shell becomes the terminal's controlling process
            _child_exec(command, (slave, slave))
        os.close(slave)
        return pid, master
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child_exec(command, (os.open(os.devnull, os.O_RDONLY), write_end))
    os.close(write_end)
    return pid, read_end


def _reap(pid: int) -> None:
    deadline = time.time() + REAP_S
    while time.time() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.05)


def serve(command: str, tty: bool, conn: socket.socket) -> None:
    """The sshd side: run the command, copy its output to our stdout, report its status or hang up."""
    pid, out = _start_remote(command, tty)
    while True:
        ready, _, _ = select.select([out, conn], [], [])
        if conn in ready:  # the client only ever sends EOF: the connection is gone
            os.close(out)  # a terminal is hung up now; pipes simply lose their reader
            _reap(pid)
            return
        try:
            data = os.read(out, 65536)
        except OSError:  # EIO: every process of the terminal has closed it
            data = b""
        if not data:
            break
        try:
            os.write(1, data)
        except OSError:
            pass
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    conn.sendall(f"{code if code >= 0 else 255}\n".encode())


def main(argv: List[str]) -> int:
    if os.environ.get("FAKE_SSH_LOG"):
        with open(os.environ["FAKE_SSH_LOG"], "a", encoding="utf-8") as log:
            log.write(json.dumps(argv) + "\n")
    tty, _host, command = parse(argv)
    client, server = socket.socketpair()
    if os.fork() == 0:
        client.close()
        os.setsid()
        try:
            serve(command, tty, server)
        finally:
            os._exit(0)
    server.close()
    reply = b""
    while chunk := client.recv(64):
        reply += chunk
    return int(reply) if reply.strip() else 255


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
