"""tools.launch: DMLC environment, ssh command lines, clean-up of every child, and a real dist_sync run."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from tests._train_fixtures import tiny_vgg_checkpoint, write_rec
from tools.launch import LaunchError, local_nodes, main, read_hosts, run, ssh_nodes, sync_argv, sync_to_hosts

ROOT = Path(__file__).resolve().parents[1]


def processes_with(marker: str) -> list:
    """PIDs whose environment carries `marker` (so leftovers of this test can be found, and only those)."""
    found = []
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in env_file.read_bytes():
                found.append(int(env_file.parent.name))
        except OSError:
            continue
    return found


def environ_of(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def nothing_left(marker: str, timeout: float = 20.0) -> None:
    """Every process carrying `marker` is gone within `timeout` (remote clean-up is asynchronous)."""
    try:
        wait_until(lambda: not processes_with(marker), timeout, "the job's processes to exit")
    except AssertionError:
        left = {pid: environ_of(pid).get("DMLC_ROLE", "?") for pid in processes_with(marker)}
        for pid in left:  # do not leak them into the rest of the test run
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise AssertionError(f"processes left behind (pid: DMLC_ROLE): {left}") from None


@pytest.fixture
def fake_ssh(tmp_path):
    """PATH with a stand-in `ssh` first (tests/_fake_ssh.py) and the file it logs its argv to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "ssh"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / '_fake_ssh.py'} \"$@\"\n")
    script.chmod(0o755)
    log = tmp_path / "ssh-argv.jsonl"
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SSH_LOG": str(log)}, log


def start_launcher(tmp_path, launcher: str, marker: str, worker_code: str, extra_env=None, workers: int = 2,
                   servers: int = 1) -> subprocess.Popen:
    """`python -m tools.launch` in a process of its own, every process it makes carrying `marker`."""
    name, value = marker.split("=")
    command = [sys.executable, "-m", "tools.launch", "-n", str(workers), "-s", str(servers), "--timeout", "240",
               "--env", marker]
    if launcher == "ssh":
        hosts = tmp_path / "hosts"
        hosts.write_text("127.0.0.1 slots=2\n")  # an address: ps-lite binds to DMLC_NODE_HOST, zmq takes no names
        command += ["--launcher", "ssh", "-H", str(hosts), "--host-ip", "127.0.0.1"]
    command += ["--", sys.executable, "-c", worker_code]
    env = {**os.environ, name: value, **(extra_env or {})}
    out = open(tmp_path / "launch.log", "w")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def job_processes(marker: str, role: str) -> list:
    return [pid for pid in processes_with(marker) if environ_of(pid).get("DMLC_ROLE") == role]


SLEEPER = "import time; time.sleep(600)"


def workers_fail_on(go_file: Path) -> str:
    """Workers exit 3 once `go_file` exists (servers, which run the same command over ssh, keep sleeping)."""
    return (f"import os, sys, time\nwhile not os.path.exists({str(go_file)!r}): time.sleep(0.1)\n"
            f"if os.environ['DMLC_ROLE'] == 'worker': sys.exit(3)\ntime.sleep(600)")


@pytest.mark.parametrize("launcher", ["local", "ssh"])
@pytest.mark.parametrize("stop, expected", [("sigterm launcher", 128 + signal.SIGTERM),
                                            ("sigint launcher", 128 + signal.SIGINT),
                                            ("sighup launcher", 128 + signal.SIGHUP),
                                            ("worker exits 3", 3),
                                            ("sigkill worker", 128 + signal.SIGKILL)])
def test_stopping_a_job_stops_every_process_with_a_conventional_status(tmp_path, fake_ssh, launcher, stop,
                                                                       expected):
    """Over ssh the remote servers and workers stop too: the stand-in sshd hangs up their terminal when the
    launcher stops the ssh clients, as sshd does. A SIGKILLed worker gives 137, not 247."""
    marker = f"MXT_LAUNCH_TEST={uuid.uuid4().hex}"
    env, ssh_log = fake_ssh
    go = tmp_path / "go"
    job = start_launcher(tmp_path, launcher, marker, workers_fail_on(go) if stop == "worker exits 3" else SLEEPER,
                         env)
    try:
        wait_until(lambda: len(job_processes(marker, "worker")) == 2 and len(job_processes(marker, "server")) == 1,
                   60, "2 workers and 1 server to start")
        if stop == "sigterm launcher":
            job.send_signal(signal.SIGTERM)
        elif stop == "sigint launcher":
            job.send_signal(signal.SIGINT)
        elif stop == "sighup launcher":
            job.send_signal(signal.SIGHUP)
        elif stop == "sigkill worker":
            os.kill(job_processes(marker, "worker")[0], signal.SIGKILL)
        else:
            go.touch()
        assert job.wait(timeout=60) == expected, (tmp_path / "launch.log").read_text()[-2000:]
    finally:
        if job.poll() is None:
            job.kill()
    nothing_left(marker)
    if launcher == "ssh":
        calls = [json.loads(line) for line in ssh_log.read_text().splitlines()]
        assert len(calls) == 3 and all(c[:3] == ["-tt", "-o", "StrictHostKeyChecking=yes"] for c in calls)


def test_ssh_job_runs_a_real_dist_sync_exchange(tmp_path, fake_ssh):
    """2 workers + 1 server over (stand-in) ssh: ps-lite connects, the pushes are summed, exit 0, nothing left."""
    marker = f"MXT_LAUNCH_TEST={uuid.uuid4().hex}"
    env, _ = fake_ssh
    code = ("import mxnet as mx\n"  # as a server, this import runs the server loop and exits
            "kv = mx.kv.create('dist_sync')\n"
            "kv.init(3, mx.nd.zeros(2))\n"
            "kv.push(3, mx.nd.ones(2) * (kv.rank + 1))\n"
            "out = mx.nd.zeros(2)\n"
            "kv.pull(3, out=out)\n"
            f"open({str(tmp_path)!r} + f'/pulled-{{kv.rank}}.txt', 'w').write(str(out.asnumpy().tolist()))\n")
    job = start_launcher(tmp_path, "ssh", marker, code, env)
    try:
        assert job.wait(timeout=180) == 0, (tmp_path / "launch.log").read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    assert [(tmp_path / f"pulled-{r}.txt").read_text() for r in (0, 1)] == ["[3.0, 3.0]"] * 2  # 1 + 2
    nothing_left(marker)


def test_local_nodes_carry_the_dmlc_protocol():
    nodes = local_nodes(["python", "-m", "train"], num_workers=2, num_servers=3, env={"A": "1"})
    roles = [n.role for n in nodes]
    assert roles == ["scheduler", "server", "server", "server", "worker", "worker"]
    ports = {n.env["DMLC_PS_ROOT_PORT"] for n in nodes}
    assert len(ports) == 1 and int(ports.pop()) > 0
    for n in nodes:
        assert n.env["DMLC_ROLE"] == n.role and n.env["DMLC_NUM_WORKER"] == "2" and n.env["DMLC_NUM_SERVER"] == "3"
        assert n.env["DMLC_PS_ROOT_URI"] == "127.0.0.1" and n.env["A"] == "1"
    assert nodes[-1].argv == ["python", "-m", "train"] and nodes[1].argv[-1] == "import mxnet"


def test_ssh_nodes_and_host_file(tmp_path):
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("# cluster\nnode-a slots=2\n\nnode-b\n")
    hosts = read_hosts(hosts_file)
    assert hosts == ["node-a", "node-a", "node-b"]
    nodes = ssh_nodes(["python", "-m", "train", "--kv-store", "dist_sync"], 2, 1, {"X": "y z"}, hosts, "10.0.0.5",
                      "/work/job", ssh_port=2222)
    assert [n.role for n in nodes] == ["scheduler", "server", "worker", "worker"]
    assert nodes[0].host is None and nodes[0].env["DMLC_PS_ROOT_URI"] == "10.0.0.5"
    assert [n.host for n in nodes[1:]] == ["node-a", "node-a", "node-b"]
    remote = nodes[2].argv[-1]
    # Host keys checked; -tt so that a closed connection hangs up the remote command
    assert nodes[2].argv[:8] == ["ssh", "-tt", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", "2222"]
    assert not any("StrictHostKeyChecking=no" in a for n in nodes for a in n.argv)
    assert remote.startswith("cd /work/job && env ") and remote.endswith("; exit $?")
    for part in ("DMLC_ROLE=worker", "DMLC_PS_ROOT_URI=10.0.0.5", "DMLC_NUM_WORKER=2", "DMLC_NUM_SERVER=1",
                 "DMLC_NODE_HOST=node-a", "X='y z'", "python -m train --kv-store dist_sync"):
        assert part in remote
    assert "DMLC_ROLE=server" in nodes[1].argv[-1]
    relaxed = ssh_nodes(["python"], 1, 1, {}, hosts, "10.0.0.5", "/w", host_key_check="accept-new")
    assert "StrictHostKeyChecking=accept-new" in relaxed[1].argv
    with pytest.raises(LaunchError, match="expected one of yes, accept-new, no"):
        ssh_nodes(["python"], 1, 1, {}, hosts, "10.0.0.5", "/w", host_key_check="off")
    bad = tmp_path / "bad"
    bad.write_text("node-a slots=two\n")
    with pytest.raises(LaunchError, match=r"bad:1: expected 'HOST' or 'HOST slots=N'"):
        read_hosts(bad)


@pytest.mark.parametrize("line", ["-oProxyCommand=touch pwned", "--help", "node-a;rm -rf x", "$(id)", "node`id`",
                                  "node-a|cat", "-node slots=2", "user@-node", "node\x00a"])
def test_host_file_refuses_what_is_not_a_host_name(tmp_path, line):
    hosts = tmp_path / "hosts"
    hosts.write_text(f"node-a\n{line}\n")
    with pytest.raises(LaunchError, match=r"hosts:2: .* is not a host name: expected \[USER@\]NAME"):
        read_hosts(hosts)
    assert main(["-n", "1", "--launcher", "ssh", "-H", str(hosts), "--dry-run", "--", "python"]) == 2


def test_host_file_takes_names_addresses_and_users(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("gpu-01.example.org slots=2\n10.0.0.7\nmx_user@node_b\n")
    assert read_hosts(hosts) == ["gpu-01.example.org", "gpu-01.example.org", "10.0.0.7", "mx_user@node_b"]


def test_sync_dst_dir_keeps_the_files_already_there(tmp_path, fake_ssh, monkeypatch):
    """--sync-dst-dir adds and updates the synced files only: what DIR already held (an earlier job's checkpoints,
    the user's own files) survives. rsync runs through the stand-in ssh (so "the host" is this machine); where
    rsync is not installed, tests/_fake_rsync.py stands in for it with rsync's semantics, --delete included."""
    env, _ = fake_ssh
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    if shutil.which("rsync") is None:
        (bin_dir / "rsync").write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / '_fake_rsync.py'} \"$@\"\n")
        (bin_dir / "rsync").chmod(0o755)
    job = tmp_path / "job"
    (job / "code").mkdir(parents=True)
    (job / "code" / "model.py").write_text("new code")
    (job / "run.sh").write_text("python -m train")
    (job / ".git").mkdir()
    (job / ".git" / "HEAD").write_text("ref: refs/heads/main")
    dst = tmp_path / "remote job"
    (dst / "runs").mkdir(parents=True)
    (dst / "runs" / "ft-0004.params").write_bytes(b"an earlier run's weights")
    (dst / "notes.txt").write_text("the user's own file")
    (dst / "code").mkdir()
    (dst / "code" / "model.py").write_text("old code")
    (dst / "code" / "local_patch.py").write_text("kept")
    monkeypatch.chdir(job)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("FAKE_RSYNC_LOG", str(tmp_path / "rsync-argv.jsonl"))
    sync_to_hosts(["127.0.0.1", "127.0.0.1"], str(dst))
    assert (dst / "runs" / "ft-0004.params").read_bytes() == b"an earlier run's weights"
    assert (dst / "notes.txt").read_text() == "the user's own file"
    assert (dst / "code" / "local_patch.py").read_text() == "kept"
    assert (dst / "code" / "model.py").read_text() == "new code" and (dst / "run.sh").is_file()
    assert not (dst / ".git").exists()
    assert "--delete" not in sync_argv("127.0.0.1", str(dst))
    if shutil.which("rsync") is None or (bin_dir / "rsync").is_file():
        assert len((tmp_path / "rsync-argv.jsonl").read_text().splitlines()) == 1  # once per distinct host


def test_cli_errors_and_dry_run(capsys, tmp_path):
    assert main(["-n", "2"]) == 2
    assert "no command given" in capsys.readouterr().err
    assert main(["-n", "2", "--launcher", "ssh", "--", "python"]) == 2
    assert "needs -H/--hostfile" in capsys.readouterr().err
    assert main(["-n", "1", "--dry-run", "--", "python", "-m", "train"]) == 0
    out = capsys.readouterr().out
    assert "scheduler" in out and "'DMLC_ROLE': 'worker'" in out
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a\n")
    ssh = ["-n", "1", "--launcher", "ssh", "-H", str(hosts), "--host-ip", "10.0.0.5", "--dry-run", "--", "python"]
    assert main(ssh) == 0
    shown = capsys.readouterr()
    assert "ssh -tt -o StrictHostKeyChecking=yes" in shown.out and "warning" not in shown.err
    assert main(["--strict-host-key-checking", "no"] + ssh) == 0
    shown = capsys.readouterr()
    assert "StrictHostKeyChecking=no" in shown.out and "any host key is accepted" in shown.err


def test_failing_worker_stops_scheduler_and_servers():
    marker = f"MXT_LAUNCH_TEST={uuid.uuid4().hex}"
    name, value = marker.split("=")
    # Worker 0 fails at once; the scheduler and server would wait for it forever.
    nodes = local_nodes([sys.executable, "-c", "import sys; sys.exit(3)"], 2, 1, {**os.environ, name: value})
    assert run(nodes, timeout=120) == 3
    assert all(n.proc.poll() is not None for n in nodes)
    assert processes_with(marker) == [], "a launched process survived"


def test_timeout_stops_everything():
    marker = f"MXT_LAUNCH_TEST={uuid.uuid4().hex}"
    name, value = marker.split("=")
    nodes = local_nodes([sys.executable, "-c", "import time; time.sleep(600)"], 1, 1, {**os.environ, name: value})
    assert run(nodes, timeout=2) == 124
    assert processes_with(marker) == []


# Runs `python -m train` with mx.io.ImageRecordIter wrapped so that every batch's images are logged per
# iterator, as fingerprints: ImageRecordIter's (pixel - mean) / std * scale is undone with the iterator's own
# arguments and the rounded RGB pixels hashed (the wrap-around filler counted in batch.pad is left out). Its
# batch.index would be simpler, but ImageRecordIter 1.9 leaves it all zero.
RECORD_SPY = """
import hashlib, json, os, runpy, sys
import mxnet as mx
import numpy as np

real_iter = mx.io.ImageRecordIter


def fingerprints(batch, kw):
    rgb = lambda name, default: np.array([kw.get(f"{name}_{c}", default) for c in "rgb"]).reshape(1, 3, 1, 1)
    x = batch.data[0].asnumpy() / kw.get("scale", 1.0) * rgb("std", 1.0) + rgb("mean", 0.0)
    pixels = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return [hashlib.sha1(image.tobytes()).hexdigest() for image in pixels]


def spied_iter(**kw):
    it = real_iter(**kw)
    log = open(os.path.join(os.environ["SPY_DIR"], f"reads-{os.getpid()}-{id(it)}.jsonl"), "w")
    real_next = it.next

    def next_batch():
        batch = real_next()
        ids = fingerprints(batch, kw)
        log.write(json.dumps({"rec": kw["path_imgrec"], "part": kw.get("part_index", 0),
                              "parts": kw.get("num_parts", 1), "ids": ids[:len(ids) - batch.pad]}) + "\\n")
        log.flush()
        return batch

    it.next = next_batch
    return it


mx.io.ImageRecordIter = spied_iter
sys.argv = ["train"] + sys.argv[1:]
runpy.run_module("train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_dist_sync_two_workers_one_server_identical_weights(tmp_path):
    marker = f"MXT_LAUNCH_TEST={uuid.uuid4().hex}"
    name, value = marker.split("=")
    tiny_vgg_checkpoint(tmp_path / "pre")
    records = 164
    write_rec(tmp_path / "s_train.rec", 4, records // 4, class_names=list("abcd"))
    prefix = tmp_path / "ft"
    spy_dir = tmp_path / "spy"
    spy_dir.mkdir()
    epochs = 2
    command = [sys.executable, "-m", "tools.launch", "-n", "2", "-s", "1", "--timeout", "240", "--",
               sys.executable, "-c", RECORD_SPY, "--pretrained-model", str(tmp_path / "pre"),
               "--data-train", str(tmp_path / "s_train.rec"), "--model-prefix", str(prefix),
               "--num-epochs", str(epochs), "--batch-size", "16", "--lr", "0.05", "--kv-store", "dist_sync",
               "--no-progress", "--lr-mult", "^conv1=0"]
    env = {**os.environ, name: value, "SPY_DIR": str(spy_dir)}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished with code 0" in done.stderr
    nothing_left(marker)
    a = mx.nd.load(str(tmp_path / "ft-0002.params"))
    b = mx.nd.load(str(tmp_path / "ft-1-0002.params"))  # fit.py's naming for worker 1
    pre = mx.nd.load(str(tmp_path / "pre-0000.params"))
    assert set(a) == set(b)
    for key in a:
        assert np.array_equal(a[key].asnumpy(), b[key].asnumpy()), key
    assert np.array_equal(a["arg:conv1_1_weight"].asnumpy(), pre["arg:conv1_1_weight"].asnumpy())
    assert not np.array_equal(a["arg:fc7_weight"].asnumpy(), pre["arg:fc7_weight"].asnumpy())

    # Which records each worker read: the fingerprint of every record, decoded by mx.recordio (RGB, C x H x W) ...
    reader = mx.recordio.MXRecordIO(str(tmp_path / "s_train.rec"), "r")
    record_of = {}
    while (item := reader.read()) is not None:
        header, bgr = mx.recordio.unpack_img(item)
        rgb = np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))
        record_of[hashlib.sha1(rgb.tobytes()).hexdigest()] = int(header.id)
    assert sorted(record_of.values()) == list(range(records))  # every image distinct
    # ... and, per worker process, the records of every training pass.
    passes = {}  # (pid, part) -> [record ids of one pass, ...]
    for log in sorted(spy_dir.glob("reads-*.jsonl")):
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        if not rows or not rows[0]["rec"].endswith("s_train.rec"):
            continue
        assert {(r["part"], r["parts"]) for r in rows} == {(rows[0]["part"], 2)}
        ids = [record_of[f] for r in rows for f in r["ids"]]  # KeyError: a worker read an image not in the file
        passes.setdefault((log.name.split("-")[1], rows[0]["part"]), []).append(ids)
    assert sorted(part for _, part in passes) == [0, 1], passes.keys()  # two workers, parts 0 and 1
    halves = {}
    for (_, part), worker_passes in passes.items():
        assert len(worker_passes) == epochs
        for ids in worker_passes:
            assert len(ids) == len(set(ids)), f"part {part} read a record twice in one pass"
            assert set(ids) == set(worker_passes[0]), f"part {part} read other records in a later epoch"
        halves[part] = set(worker_passes[0])
    assert not halves[0] & halves[1], "both workers read the same records"
    assert halves[0] | halves[1] == set(range(records)), "records nobody read"
    assert len(halves[0]) == len(halves[1]) == records // 2
