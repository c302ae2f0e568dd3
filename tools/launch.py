"""Launch a distributed MXNet job (ps-lite: dist_sync, dist_device_sync, dist_async) locally or over ssh.

    python -m tools.launch -n 2 -s 1 -- python -m train ... --kv-store dist_sync
    python -m tools.launch -n 4 -s 2 --launcher ssh -H hosts.txt --sync-dst-dir /tmp/job -- python -m train ...

The DMLC protocol, as MXNet reads it from the environment:
  DMLC_ROLE            scheduler | server | worker
  DMLC_PS_ROOT_URI     address of the scheduler, DMLC_PS_ROOT_PORT its port
  DMLC_NUM_SERVER      number of server processes, DMLC_NUM_WORKER number of workers
  DMLC_NODE_HOST       (optional) the address other nodes reach this process at
A process started with DMLC_ROLE=server or scheduler runs the parameter-server loop inside `import mxnet` and
exits when the workers finish; workers get their rank from the scheduler (kv.rank).

Unlike the wheel's tools/launch.py + dmlc_tracker (which crash on Python >= 3.9 with Thread.isAlive and then leave
a DMLC_ROLE=scheduler process behind), every child here runs in its own process group and the launcher kills all
of them when a worker fails, when it is interrupted (SIGINT, SIGTERM, SIGHUP), or when servers outlive the workers.

Over ssh the same holds on the remote machines: each remote command runs under `ssh -tt`, on a terminal of its
own whose controlling process is the remote shell. When the launcher stops an ssh client (or the client dies any
other way), sshd sees the connection close and hangs up that terminal, and the kernel sends SIGHUP to the remote
shell and its foreground processes: the remote server or worker. Host keys are checked
(`StrictHostKeyChecking=yes`: the hosts must be in known_hosts); `--strict-host-key-checking accept-new|no`
relaxes that and is unsafe (accept-new trusts whatever key answers first, no accepts any key, so anyone between
the machines can impersonate a host and read the job's traffic and environment).

The exit status is 0, the first failing worker's exit code, 128+N when that worker (or the launcher) was
killed by signal N (a remote worker's status comes back through its shell, which reports a signal the same
way), 124 on --timeout, and 1 when a server or the scheduler dies first.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

log = logging.getLogger(__name__)

# After the last worker exits, servers and the scheduler shut down on their own within a second or two.
SHUTDOWN_GRACE_S = 30.0
KILL_GRACE_S = 5.0
POLL_S = 0.2
# ssh's own StrictHostKeyChecking values; "yes" (the default here) refuses hosts missing from known_hosts.
HOST_KEY_CHECKS = ("yes", "accept-new", "no")


class LaunchError(ValueError):
    """Bad launcher input (host file, counts); the message says what is expected."""


@dataclass
class Node:
    """One process of the job: its role, the command and extra environment, and where it runs."""

    role: str
    argv: List[str]
    env: Dict[str, str]
    host: Optional[str] = None  # None: this machine
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def dmlc_env(role: str, root_uri: str, root_port: int, num_workers: int, num_servers: int) -> Dict[str, str]:
    return {"DMLC_ROLE": role, "DMLC_PS_ROOT_URI": root_uri, "DMLC_PS_ROOT_PORT": str(root_port),
            "DMLC_NUM_WORKER": str(num_workers), "DMLC_NUM_SERVER": str(num_servers)}


# A host as ssh and rsync take it: an optional USER@, then a name or IPv4 address. Nothing else: a line starting
# with '-' would reach ssh/rsync as an option, and whitespace or shell characters have no place in a host name.
_HOST = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?[A-Za-z0-9][A-Za-z0-9._-]*")


def read_hosts(path) -> List[str]:
    """Host names, one per line; '#' comments and blank lines ignored; `host slots=N` repeats a host.

    Raises:
        LaunchError: a line that is not `HOST` or `HOST slots=N`, or a host that is not [USER@]NAME (letters,
            digits, '.', '-', '_'; not starting with '-'), naming the file and line.
    """
    hosts: List[str] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise LaunchError(f"{path}: cannot read host file ({err.strerror})") from None
    for number, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if not _HOST.fullmatch(parts[0]):
            raise LaunchError(f"{path}:{number}: {parts[0]!r} is not a host name: expected [USER@]NAME of letters, "
                              "digits, '.', '-' and '_', not starting with '-'")
        slots = 1
        for extra in parts[1:]:
            if not extra.startswith("slots=") or not extra[6:].isdigit():
                raise LaunchError(f"{path}:{number}: expected 'HOST' or 'HOST slots=N', got {line!r}")
            slots = int(extra[6:])
        hosts += [parts[0]] * slots
    if not hosts:
        raise LaunchError(f"{path}: no hosts listed")
    return hosts


def local_nodes(command: Sequence[str], num_workers: int, num_servers: int, env: Dict[str, str],
                python: str = sys.executable) -> List[Node]:
    """Scheduler, servers and workers on this machine. Servers and the scheduler only `import mxnet`."""
    port = free_port()
    server_argv = [python, "-c", "import mxnet"]
    nodes = [Node("scheduler", server_argv, {**env, **dmlc_env("scheduler", "127.0.0.1", port, num_workers,
                                                                num_servers)})]
    nodes += [Node("server", server_argv, {**env, **dmlc_env("server", "127.0.0.1", port, num_workers,
                                                              num_servers)}) for _ in range(num_servers)]
    nodes += [Node("worker", list(command), {**env, **dmlc_env("worker", "127.0.0.1", port, num_workers,
                                                                num_servers)}) for _ in range(num_workers)]
    return nodes


def remote_command(workdir: str, env: Dict[str, str], command: Sequence[str]) -> str:
    """The shell line run on the remote host: `cd DIR && env NAME=VALUE... COMMAND; exit $?`.

    The trailing `exit $?` keeps the shell from exec-ing the command, so the shell stays the terminal's
    controlling process and turns a remote death by signal N into status 128+N (an exec'd command killed by
    a signal makes the ssh client exit 255 instead).
    """
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return f"cd {shlex.quote(workdir)} && env {exports} {shlex.join(command)}; exit $?"


def ssh_argv(host: str, remote: str, ssh_port: int = 22, host_key_check: str = "yes") -> List[str]:
    """`ssh -tt ... HOST REMOTE`: -tt gives the remote command a terminal, so closing the connection hangs it up
    (SIGHUP); BatchMode fails instead of prompting for a password or an unknown host key."""
    if host_key_check not in HOST_KEY_CHECKS:
        raise LaunchError(f"host key checking {host_key_check!r}: expected one of {', '.join(HOST_KEY_CHECKS)}")
    return ["ssh", "-tt", "-o", f"StrictHostKeyChecking={host_key_check}", "-o", "BatchMode=yes",
            "-p", str(ssh_port), host, remote]


def ssh_nodes(command: Sequence[str], num_workers: int, num_servers: int, env: Dict[str, str], hosts: List[str],
              root_uri: str, workdir: str, ssh_port: int = 22, server_command: Optional[Sequence[str]] = None,
              host_key_check: str = "yes") -> List[Node]:
    """The scheduler here; servers and workers round-robin over `hosts`, each through `ssh -tt HOST 'cd DIR; ...'`.

    Servers run `server_command` (default: the worker command, which imports mxnet first and so becomes a
    server, as with dmlc's tracker). `host_key_check` is ssh's StrictHostKeyChecking (see HOST_KEY_CHECKS).
    """
    port = free_port()
    server_command = list(server_command or command)
    nodes = [Node("scheduler", [sys.executable, "-c", "import mxnet"],
                  {**os.environ, **env, **dmlc_env("scheduler", root_uri, port, num_workers, num_servers)})]
    roles = ["server"] * num_servers + ["worker"] * num_workers
    for i, role in enumerate(roles):
        host = hosts[i % len(hosts)]
        remote_env = {**env, **dmlc_env(role, root_uri, port, num_workers, num_servers), "DMLC_NODE_HOST": host}
        remote = remote_command(workdir, remote_env, server_command if role == "server" else command)
        nodes.append(Node(role, ssh_argv(host, remote, ssh_port, host_key_check), dict(os.environ), host))
    return nodes


def _start(node: Node) -> None:
    # Own session/process group: a kill reaches the node's children too (ssh, python's engine threads).
    # An ssh client reads nothing: with -tt and the terminal as stdin it would put that terminal in raw mode.
    stdin = subprocess.DEVNULL if node.host is not None else None
    node.proc = subprocess.Popen(node.argv, env=node.env, stdin=stdin, start_new_session=True)


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: its exit code, or 128+N when signal N killed it (Popen: -N)."""
    return 128 - returncode if returncode < 0 else returncode


def _kill(nodes: Sequence[Node]) -> None:
    """SIGTERM every live node's process group, then SIGKILL what is left after KILL_GRACE_S."""
    live = [n for n in nodes if n.proc is not None and n.proc.poll() is None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for n in live:
            try:
                os.killpg(n.proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + KILL_GRACE_S
        while time.time() < deadline and any(n.proc.poll() is None for n in live):
            time.sleep(POLL_S)
        live = [n for n in live if n.proc.poll() is None]
        if not live:
            break
    for n in nodes:  # reap, so nothing is left as a zombie either
        if n.proc is not None:
            try:
                n.proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not exit", n.role, n.proc.pid)


def run(nodes: List[Node], timeout: Optional[float] = None) -> int:
    """Start every node, wait for the workers, clean up. Returns 0, or the first failing worker's exit status
    (128+N when signal N killed it; 128+N when the launcher got signal N; 124 on timeout, 1 when a server or
    the scheduler dies first)."""
    interrupted: List[int] = []

    def on_signal(signum, _frame):
        interrupted.append(signum)

    # SIGHUP too: a closed terminal (a dropped ssh session to this machine) must not orphan the job.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    start = time.time()
    code = 0
    others_done = 0.0
    try:
        for node in nodes:
            _start(node)
        workers = [n for n in nodes if n.role == "worker"]
        others = [n for n in nodes if n.role != "worker"]
        while True:
            if interrupted:
                code = 128 + interrupted[0]
                print(f"launch: interrupted, stopping {len(nodes)} processes", file=sys.stderr)
                break
            failed = [n for n in workers if n.proc.poll() not in (None, 0)]
            if failed:
                code = exit_status(failed[0].proc.returncode)
                how = (f"was killed by signal {-failed[0].proc.returncode}" if failed[0].proc.returncode < 0
                       else f"exited with code {code}")
                print(f"launch: a worker {how}; stopping the others (exit status {code})", file=sys.stderr)
                break
            if all(n.proc.poll() == 0 for n in workers):
                deadline = time.time() + SHUTDOWN_GRACE_S
                while time.time() < deadline and any(n.proc.poll() is None for n in others):
                    time.sleep(POLL_S)
                break
            dead = [n for n in others if n.proc.poll() not in (None, 0)]
            if dead:
                code = 1
                print(f"launch: the {dead[0].role} failed (code {dead[0].proc.returncode}) before the workers "
                      f"finished; stopping the job", file=sys.stderr)
                break
            # Servers and the scheduler exit cleanly once the workers have said goodbye; workers then only
            # tear down. If they are still running long after that, something hangs.
            if all(n.proc.poll() == 0 for n in others):
                others_done = others_done or time.time()
                if time.time() - others_done > SHUTDOWN_GRACE_S:
                    code = 1
                    print("launch: servers finished but workers did not exit; stopping them", file=sys.stderr)
                    break
            if timeout is not None and time.time() - start > timeout:
                code = 124
                print(f"launch: timed out after {timeout:.0f} s; stopping the job", file=sys.stderr)
                break
            time.sleep(POLL_S)
    finally:
        _kill(nodes)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


def sync_argv(host: str, dst_dir: str, ssh_port: int = 22, host_key_check: str = "yes") -> List[str]:
    """`rsync` of the current folder into DST_DIR on `host`. Never `--delete`: DST_DIR may hold files the launcher
    did not put there (a home folder, an earlier job's checkpoints), and rsync would remove every one of them;
    without it, only files of the same relative path as a local one are replaced."""
    ssh = f"ssh -p {int(ssh_port)} -o BatchMode=yes -o StrictHostKeyChecking={host_key_check}"
    return ["rsync", "-az", "--exclude", ".git", "-e", ssh, os.getcwd() + "/", f"{host}:{dst_dir}/"]


def sync_to_hosts(hosts: Sequence[str], dst_dir: str, ssh_port: int = 22, host_key_check: str = "yes") -> None:
    """Copy the current folder to DST_DIR on every distinct host (see sync_argv).

    Raises:
        LaunchError: rsync failed for a host (named).
    """
    for host in dict.fromkeys(hosts):
        if subprocess.call(sync_argv(host, dst_dir, ssh_port, host_key_check)) != 0:
            raise LaunchError(f"rsync to {host}:{dst_dir} failed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--num-workers", type=int, required=True)
    p.add_argument("-s", "--num-servers", type=int, default=None, help="default: as many as workers")
    p.add_argument("--launcher", choices=("local", "ssh"), default="local")
    p.add_argument("-H", "--hostfile", default=None, help="ssh: one host per line ('HOST' or 'HOST slots=N')")
    p.add_argument("--sync-dst-dir", default=None,
                   help="ssh: rsync the current folder to this path on every host and run there. Files of the "
                        "same relative path are updated; nothing else in the folder is touched (no --delete)")
    p.add_argument("--host-ip", default=None, help="ssh: address the hosts reach this machine at (scheduler)")
    p.add_argument("--ssh-port", type=int, default=22)
    p.add_argument("--strict-host-key-checking", choices=HOST_KEY_CHECKS, default="yes",
                   help="ssh: host key checking. 'yes' (default): every host must already be in known_hosts "
                        "(ssh-keyscan, then check the fingerprints). UNSAFE: 'accept-new' trusts the first key a "
                        "host presents, 'no' accepts any key; both let a machine in between impersonate a host")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment, repeatable")
    p.add_argument("--timeout", type=float, default=None, help="stop the whole job after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the worker command (after --)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if not command:
            raise LaunchError("no command given: python -m tools.launch -n 2 -- python -m train ...")
        if args.num_workers < 1 or (args.num_servers is not None and args.num_servers < 1):
            raise LaunchError("--num-workers and --num-servers must be at least 1")
        env = {}
        for item in args.env:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise LaunchError(f"--env {item!r}: expected NAME=VALUE")
            env[name] = value
        num_servers = args.num_servers or args.num_workers
        if args.launcher == "local":
            nodes = local_nodes(command, args.num_workers, num_servers, {**os.environ, **env})
        else:
            if not args.hostfile:
                raise LaunchError("--launcher ssh needs -H/--hostfile")
            hosts = read_hosts(args.hostfile)
            workdir = args.sync_dst_dir or os.getcwd()
            root = args.host_ip or socket.gethostbyname(socket.gethostname())
            nodes = ssh_nodes(command, args.num_workers, num_servers, env, hosts, root, workdir, args.ssh_port,
                              host_key_check=args.strict_host_key_checking)
            if args.strict_host_key_checking != "yes":
                what = ("the first key a new host presents is trusted unverified"
                        if args.strict_host_key_checking == "accept-new" else "any host key is accepted")
                print(f"warning: --strict-host-key-checking {args.strict_host_key_checking}: {what}; a machine "
                      f"between here and the hosts could impersonate them (unsafe)", file=sys.stderr)
            if args.sync_dst_dir and not args.dry_run:
                sync_to_hosts(hosts, args.sync_dst_dir, args.ssh_port, args.strict_host_key_checking)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for n in nodes:
            shown = {k: v for k, v in n.env.items() if k.startswith("DMLC_")}
            print(f"{n.role:9} {n.host or 'local':12} {shown} {shlex.join(n.argv)}")
        return 0
    started = time.time()
    code = run(nodes, args.timeout)
    print(f"launch: {args.num_workers} workers + {num_servers} servers ({args.launcher}) finished with code {code} "
          f"in {time.time() - started:.0f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
