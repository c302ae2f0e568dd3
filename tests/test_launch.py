"""tools.launch: DMLC environment, ssh command lines, clean-up of every child, and a real dist_sync run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from tests._train_fixtures import tiny_vgg_checkpoint, write_rec
from tools.launch import LaunchError, local_nodes, main, read_hosts, run, ssh_nodes

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
    assert nodes[2].argv[:7] == ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes", "-p", "2222"]
    assert remote.startswith("cd /work/job && env ")
    for part in ("DMLC_ROLE=worker", "DMLC_PS_ROOT_URI=10.0.0.5", "DMLC_NUM_WORKER=2", "DMLC_NUM_SERVER=1",
                 "DMLC_NODE_HOST=node-a", "X='y z'", "python -m train --kv-store dist_sync"):
        assert part in remote
    assert "DMLC_ROLE=server" in nodes[1].argv[-1]
    bad = tmp_path / "bad"
    bad.write_text("node-a slots=two\n")
    with pytest.raises(LaunchError, match=r"bad:1: expected 'HOST' or 'HOST slots=N'"):
        read_hosts(bad)


def test_cli_errors_and_dry_run(capsys, tmp_path):
    assert main(["-n", "2"]) == 2
    assert "no command given" in capsys.readouterr().err
    assert main(["-n", "2", "--launcher", "ssh", "--", "python"]) == 2
    assert "needs -H/--hostfile" in capsys.readouterr().err
    assert main(["-n", "1", "--dry-run", "--", "python", "-m", "train"]) == 0
    out = capsys.readouterr().out
    assert "scheduler" in out and "'DMLC_ROLE': 'worker'" in out


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


@pytest.mark.slow
def test_dist_sync_two_workers_one_server_identical_weights(tmp_path):
    tiny_vgg_checkpoint(tmp_path / "pre")
    write_rec(tmp_path / "s_train.rec", 4, 41, class_names=list("abcd"))
    prefix = tmp_path / "ft"
    command = [sys.executable, "-m", "tools.launch", "-n", "2", "-s", "1", "--timeout", "240", "--",
               sys.executable, "-m", "train", "--pretrained-model", str(tmp_path / "pre"),
               "--data-train", str(tmp_path / "s_train.rec"), "--model-prefix", str(prefix), "--num-epochs", "2",
               "--batch-size", "16", "--lr", "0.05", "--kv-store", "dist_sync", "--no-progress",
               "--lr-mult", "^conv1=0"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a = mx.nd.load(str(tmp_path / "ft-0002.params"))
    b = mx.nd.load(str(tmp_path / "ft-1-0002.params"))  # fit.py's naming for worker 1
    pre = mx.nd.load(str(tmp_path / "pre-0000.params"))
    assert set(a) == set(b)
    for key in a:
        assert np.array_equal(a[key].asnumpy(), b[key].asnumpy()), key
    assert np.array_equal(a["arg:conv1_1_weight"].asnumpy(), pre["arg:conv1_1_weight"].asnumpy())
    assert not np.array_equal(a["arg:fc7_weight"].asnumpy(), pre["arg:fc7_weight"].asnumpy())
    # each worker read its own half: 164 records -> 82 each, so their epoch losses differ
    rows = [json.loads((tmp_path / f"{p}-metrics.json").read_text())["epochs"] for p in ("ft", "ft-1")]
    assert rows[0][0]["train_loss"] != rows[1][0]["train_loss"]
    assert "finished with code 0" in done.stderr
