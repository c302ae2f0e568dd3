"""Faults at every publish point of each stage, two writers on one prefix, --overwrite, and no pickle from the
checkpoint folder.

Each sweep injects ENOSPC (tests/_faults.py) at the k-th file-system call of a stage's CLI, for every k of a clean
run (or of the part of it that publishes), starting each time from a copy of the old outputs. After each fault the
message is one line naming the errno, and after the settle the next run of ours does, the stage's outputs are byte
for byte the old set or the new one (for training: whole epochs only)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Sequence

import cv2
import numpy as np
import pytest

from recbuild.publish import lock_path, settle
from tests._faults import inject

ROOT = Path(__file__).resolve().parents[1]
PACK_SUFFIXES = (".rec", ".idx", ".crc32", ".pack.json", ".errors.tsv", ".fingerprints.npy")


def outputs(folder: Path, names: Sequence[str], *roots: Path) -> Dict[str, bytes]:
    """The files present, with the folders they were made in (`roots`: a report names its input) written <DIR>."""
    found = {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}
    for root in roots:
        found = {n: data.replace(str(root).encode(), b"<DIR>") for n, data in found.items()}
    return found


def sweep(tmp_path: Path, old: Path, run: Callable[[Path], int], names: Sequence[str], prefix_name: str,
          monkeypatch, capsys, ks=None) -> set:
    """Run `run(folder)` on copies of `old` with ENOSPC at each call k; check old-or-new and the message."""
    clean = tmp_path / "clean"
    shutil.copytree(old, clean)
    with monkeypatch.context() as patch:
        injector = inject(patch, None)
        assert run(clean) == 0, capsys.readouterr().err
    capsys.readouterr()
    before, after = outputs(old, names, old), outputs(clean, names, clean)
    assert before != after
    seen = set()
    for k in ks or range(1, injector.calls + 1):
        folder = tmp_path / f"k{k}"
        shutil.copytree(old, folder)
        with monkeypatch.context() as patch:
            inject(patch, k)
            code = run(folder)
        err = capsys.readouterr().err
        if code != 0:  # one line (a progress bar may stand before it), naming a final file, not a temporary
            lines = [line for line in err.splitlines() if "error" in line]
            assert len(lines) == 1 and "ENOSPC" in lines[0] and ".part" not in lines[0], (k, err)
            assert "Traceback" not in err, (k, err)
        settle(folder / prefix_name, writer=True)
        state = outputs(folder, names, folder, old)
        assert state in (before, after), (k, sorted(state), err)
        seen.add("old" if state == before else "new")
    return seen


# ---- pack -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    lines = []
    for i in range(6):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        cv2.imwrite(str(root / f"c{i % 2}" / f"{i}.png"), rng.randint(0, 255, (20 + i, 24, 3), np.uint8))
        lines.append(f"{i}\t{i % 2}\tc{i % 2}/{i}.png\n")
    return root, "".join(lines)


def _pack(folder: Path, root: Path, resize: int) -> int:
    from recbuild.cli import main
    return main(["--resize", str(resize), "--num-thread", "1", "--no-progress", str(folder / "x"), str(root)])


@pytest.mark.slow
def test_pack_fault_at_every_call_leaves_old_or_new(tmp_path, images, monkeypatch, capsys):
    root, lst = images
    old = tmp_path / "old"
    old.mkdir()
    (old / "x.lst").write_text(lst)
    assert _pack(old, root, 20) == 0
    names = [f"x{s}" for s in PACK_SUFFIXES]
    seen = sweep(tmp_path, old, lambda f: _pack(f, root, 24), names, "x", monkeypatch, capsys)
    assert seen == {"old", "new"}


def test_pack_output_that_is_a_folder_is_one_line_and_keeps_the_old_set(tmp_path, images, capsys):
    root, lst = images
    (tmp_path / "x.lst").write_text(lst)
    assert _pack(tmp_path, root, 20) == 0
    before = outputs(tmp_path, [f"x{s}" for s in PACK_SUFFIXES])
    (tmp_path / "x.crc32").unlink()
    (tmp_path / "x.crc32").mkdir()
    capsys.readouterr()
    assert _pack(tmp_path, root, 24) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'x.crc32'}: EISDIR") and "\n" not in err
    del before["x.crc32"]
    assert outputs(tmp_path, [f"x{s}" for s in PACK_SUFFIXES]) == before


@pytest.mark.slow
def test_data_report_fault_at_every_publish_point_leaves_old_or_new(tmp_path, images, monkeypatch, capsys):
    import recbuild.report as data_report
    from recbuild.cli import main
    root, lst = images
    old = tmp_path / "old"
    old.mkdir()
    (old / "x_train.lst").write_text(lst)
    monkeypatch.setattr(data_report.time, "perf_counter", lambda: 0.0)  # the report's timing: same bytes each run
    # The page's plots cost a second a run and are not what is tested here: a page that still differs per run.
    monkeypatch.setattr(data_report, "render_html", lambda report, items, title: f"<p>{report['threshold']}</p>")
    assert main(["--num-thread", "1", "--no-progress", "--report", str(old / "x"), str(root)]) == 0
    run = lambda f: main(["report", str(f / "x"), "--threshold", "0"])  # noqa: E731
    clean = tmp_path / "count"
    shutil.copytree(old, clean)
    with monkeypatch.context() as patch:
        injector = inject(patch, None)
        assert run(clean) == 0
    seen = sweep(tmp_path, old, run, ["x.report.json", "x.report.html"], "x.report", monkeypatch, capsys,
                 publish_points(injector.calls, 10, 3))
    assert seen == {"old", "new"}


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_pack_killed_during_its_publication_leaves_old_or_new(tmp_path, images):
    root, lst = images
    old = tmp_path / "old"
    old.mkdir()
    (old / "x.lst").write_text(lst)
    assert _pack(old, root, 20) == 0
    names = [f"x{s}" for s in PACK_SUFFIXES]

    def killed(folder: Path, at=None, count=None) -> int:
        env = dict(os.environ, FAULT_KIND="kill", FAULT_AT=str(at or ""), FAULT_COUNT=str(count or ""))
        return subprocess.run([sys.executable, "-m", "tests._faults", "recbuild", "--resize", "24", "--num-thread",
                               "1", "--no-progress", str(folder / "x"), str(root)], cwd=ROOT, env=env,
                              capture_output=True).returncode
    shutil.copytree(old, tmp_path / "clean")
    assert killed(tmp_path / "clean", count=tmp_path / "count") == 0
    total = int((tmp_path / "count").read_text())
    before, after = outputs(old, names), outputs(tmp_path / "clean", names)
    seen = set()
    # Every other call of the last 25: the publication (journal, renames, removals) and the staging before it;
    # every single call of a publication is killed in tests/test_publish.py.
    for k in range(max(1, total - 24), total + 1, 2):
        folder = tmp_path / f"k{k}"
        shutil.copytree(old, folder)
        assert killed(folder, at=k) == 137
        settle(folder / "x", writer=True)
        state = outputs(folder, names)
        assert state in (before, after), k
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
        seen.add("old" if state == before else "new")
    assert seen == {"old", "new"}


SLOW_PACKER = """
import sys, time
import recbuild.packing as packing
real = packing._pack_into
packing._pack_into = lambda *a, **k: (time.sleep(30), real(*a, **k))[1]
from recbuild.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_packer_is_refused_naming_the_first(tmp_path, images, capsys):
    root, lst = images
    (tmp_path / "x.lst").write_text(lst)
    first = subprocess.Popen([sys.executable, "-c", SLOW_PACKER, "--num-thread", "1", "--no-progress",
                              str(tmp_path / "x"), str(root)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lock_path(tmp_path / "x"), first)
        assert _pack(tmp_path, root, 20) == 1
        err = capsys.readouterr().err.strip()
        assert f"pid {first.pid}:" in err and "another run is writing it" in err and "\n" not in err
        assert not (tmp_path / "x.rec").exists()
    finally:
        first.kill()
        first.wait()


# ---- convert --------------------------------------------------------------------------------------------------
def _convert(folder: Path, net, *extra) -> int:
    from tools.caffe_converter.cli import main
    return main([str(net[0]), str(net[1]), str(folder / "vgg"), *extra])


@pytest.mark.slow
def test_convert_fault_at_every_call_leaves_old_or_new(tmp_path, monkeypatch, capsys):
    from tests._caffe_nets import make_tiny_vgg
    net = make_tiny_vgg(tmp_path / "net", input_size=32, widths=(2, 2, 2, 2, 2), fc_width=8)
    old = tmp_path / "old"
    old.mkdir()
    assert _convert(old, net, "--keep-bgr", "--mean", "1,2,3") == 0
    names = ["vgg-symbol.json", "vgg-0000.params", "vgg-preprocess.json", "vgg-mean.npy"]
    seen = sweep(tmp_path, old, lambda f: _convert(f, net, "--mean", "104,117,123"), names, "vgg", monkeypatch,
                 capsys)
    assert seen == {"old", "new"}


SLOW_CONVERTER = """
import sys, time
import tools.caffe_converter.pipeline as pipeline
real = pipeline.convert_net
pipeline.convert_net = lambda *a, **k: (time.sleep(30), real(*a, **k))[1]
from tools.caffe_converter.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_converter_is_refused_and_a_killed_verify_staging_is_cleaned(tmp_path, capsys):
    from tests._caffe_nets import make_tiny_vgg
    net = make_tiny_vgg(tmp_path / "net", input_size=32, widths=(2, 2, 2, 2, 2), fc_width=8)
    out = tmp_path / "m"
    out.mkdir()
    first = subprocess.Popen([sys.executable, "-c", SLOW_CONVERTER, str(net[0]), str(net[1]), str(out / "vgg")],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lock_path(out / "vgg"), first)
        assert _convert(out, net) == 2
        err = capsys.readouterr().err.strip()
        assert f"pid {first.pid}:" in err and "\n" not in err
    finally:
        first.kill()
        first.wait()
    # What a --verify killed after staging leaves (a whole model in .vgg.staging-PID/) goes on the next run.
    staging = out / f".vgg.staging-{first.pid}"
    staging.mkdir()
    (staging / "vgg-0000.params").write_bytes(b"\0" * 4096)
    assert _convert(out, net) == 0
    assert sorted(p.name for p in out.iterdir()) == ["vgg-0000.params", "vgg-preprocess.json", "vgg-symbol.json"]


# ---- train ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    from tests._train_fixtures import tiny_vgg_checkpoint, write_rec
    d = tmp_path_factory.mktemp("faults_train")
    tiny_vgg_checkpoint(d / "pre", num_classes=7)
    write_rec(d / "set_train.rec", 2, 8, class_names=["a", "b"])
    return d


def _train_args(data: Path, prefix: Path, epochs: int, *extra) -> list:
    """A fresh run from the pretrained model; with --load-epoch a resume of PREFIX, which names no
    --pretrained-model (with one, --load-epoch is fine-tune.py's pretrained epoch)."""
    start = [] if "--load-epoch" in extra else ["--pretrained-model", str(data / "pre")]
    return start + ["--data-train", str(data / "set_train.rec"), "--model-prefix", str(prefix), "--num-epochs",
                    str(epochs), "--batch-size", "8", "--lr", "0.05", "--no-progress", "--top-k", "0", *extra]


def _whole_epochs(prefix: Path) -> list:
    """The epochs on disk, checked to be whole: .params with .states, metrics rows 1..N in .json and .csv."""
    folder, name = prefix.parent, prefix.name
    params = sorted(int(p.name[len(name) + 1:-7]) for p in folder.glob(f"{name}-[0-9]*.params"))
    states = sorted(int(p.name[len(name) + 1:-7]) for p in folder.glob(f"{name}-[0-9]*.states"))
    assert params == states, (params, states)
    rows = json.loads((folder / f"{name}-metrics.json").read_text())["epochs"] if params else []
    assert [r["epoch"] for r in rows] == params
    if params:
        assert (folder / f"{name}-metrics.csv").read_text().count("\n") == len(params) + 1
    return params


@pytest.mark.slow
def test_train_fault_at_every_publish_point_leaves_whole_epochs_and_the_resume_advice(
        tmp_path, train_data, monkeypatch, capsys):
    import train.fit as fit_module
    from train.__main__ import main
    # Where epoch 2's publication starts and ends in the count of calls of a clean run.
    marks, real_publish = [], fit_module.publish_epoch

    def marked(prefix, epoch, *a, **k):
        marks.append(injector.calls)
        real_publish(prefix, epoch, *a, **k)
        marks.append(injector.calls)
    with monkeypatch.context() as patch:
        patch.setattr(fit_module, "publish_epoch", marked)
        injector = inject(patch, None)
        assert main(_train_args(train_data, tmp_path / "clean" / "r", 2)) == 0
    assert _whole_epochs(tmp_path / "clean" / "r") == [1, 2]
    capsys.readouterr()
    first, last = marks[2], marks[3]
    assert last - first >= 8  # states, metrics json + csv, params, journal, renames
    seen = set()
    for k in range(first + 1, last + 1):
        prefix = tmp_path / f"k{k}" / "r"
        with monkeypatch.context() as patch:
            inject(patch, k)
            code = main(_train_args(train_data, prefix, 2))
        err = capsys.readouterr().err.strip().splitlines()
        settle(prefix, writer=True)
        epochs = _whole_epochs(prefix)
        assert epochs in ([1], [1, 2]), (k, epochs)
        seen.add(len(epochs))
        if code:
            assert len(err) == 1 and "ENOSPC" in err[0], (k, err)
            assert f"resume with the same command plus --load-epoch {epochs[-1]}" in err[0] or epochs == [1, 2]
    assert seen == {1, 2}  # faults before and after epoch 2's commit point


def test_overwrite_removes_the_whole_earlier_run(tmp_path, train_data):
    from symbols.checkpoint import latest_epoch
    from train.__main__ import main
    prefix = tmp_path / "r"
    assert main(_train_args(train_data, prefix, 4)) == 0
    old_config = (tmp_path / "r-config.json").read_text()
    assert main(_train_args(train_data, prefix, 2, "--overwrite", "--lr", "0.01")) == 0
    assert latest_epoch(prefix) == 2
    assert _whole_epochs(prefix) == [1, 2]
    assert not list(tmp_path.glob("r-0003.*")) and not list(tmp_path.glob("r-0004.*"))
    assert (tmp_path / "r-config.json").read_text() != old_config
    assert json.loads((tmp_path / "r-config.json").read_text())["lr"] == 0.01
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_resume_from_an_earlier_epoch_is_refused_while_later_epochs_stand(tmp_path, train_data, capsys):
    """Resuming from epoch 2 beside epochs 3-4 would have `latest` pair an epoch of the old trajectory with the
    new run's metrics until the new run overwrote it: refused in one line, nothing written."""
    from train.__main__ import main
    prefix = tmp_path / "r"
    assert main(_train_args(train_data, prefix, 4)) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(_train_args(train_data, prefix, 4, "--load-epoch", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "r-0004.params exists" in err and "epochs 3, 4" in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert main(_train_args(train_data, prefix, 5, "--load-epoch", "4")) == 0   # the last one resumes
    assert _whole_epochs(prefix) == [1, 2, 3, 4, 5]


def test_a_second_trainer_is_refused_naming_the_first_and_predict_reads_meanwhile(tmp_path, train_data, capsys):
    from train.__main__ import main
    prefix = tmp_path / "r"
    first = subprocess.Popen([sys.executable, "-m", "train", *_train_args(train_data, prefix, 500)], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lock_path(prefix), first)
        assert main(_train_args(train_data, prefix, 2)) == 2
        err = capsys.readouterr().err.strip()
        assert f"pid {first.pid}:" in err and "-m train" in err and "\n" not in err
        # A reader (predict on the latest epoch) does not wait for the trainer, which holds the prefix.
        from train.predict.cli import main as predict_main
        _wait_for(tmp_path / "r-0001.params", first)
        started = time.monotonic()
        assert predict_main([str(prefix), "latest", str(train_data / "set_train.rec"), "--out",
                             str(tmp_path / "p.csv")]) == 0
        assert time.monotonic() - started < 30 and first.poll() is None
    finally:
        first.kill()
        first.wait()


# ---- no pickle from the checkpoint folder ---------------------------------------------------------------------
class _Planted:
    """A pickle whose loading creates a file: what a crafted .states could do with any code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_pickled_states_does_not_run(tmp_path, train_data, capsys):
    import pickle
    from train.__main__ import main
    prefix = tmp_path / "r"
    assert main(_train_args(train_data, prefix, 1)) == 0
    planted = tmp_path / "PWNED"
    (tmp_path / "r-0001.states").write_bytes(pickle.dumps({0: _Planted(str(planted))}))
    capsys.readouterr()
    assert main(_train_args(train_data, prefix, 2, "--load-epoch", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "r-0001.states" in err and "--trust-states" in err and "\n" not in err
    assert not planted.exists()
    assert not (tmp_path / "r-0002.params").exists()


def test_trust_states_loads_an_old_pickled_states_exactly(tmp_path, train_data):
    """A run resumed from MXNet's own pickled .states (with --trust-states) equals one resumed from ours."""
    import mxnet as mx
    from symbols.checkpoint import read_optimizer_states
    from train.__main__ import main
    a, b = tmp_path / "a" / "r", tmp_path / "b" / "r"
    args = ("--mom", "0.9")
    assert main(_train_args(train_data, a, 1, *args)) == 0
    shutil.copytree(a.parent, b.parent)
    states = read_optimizer_states(b.parent / "r-0001.states")
    import pickle
    (b.parent / "r-0001.states").write_bytes(pickle.dumps(states))  # what Module.save_optimizer_states writes
    assert main(_train_args(train_data, a, 2, "--load-epoch", "1", *args)) == 0
    assert main(_train_args(train_data, b, 2, "--load-epoch", "1", "--trust-states", *args)) == 0
    pa, pb = mx.nd.load(str(a.parent / "r-0002.params")), mx.nd.load(str(b.parent / "r-0002.params"))
    for key in pa:
        np.testing.assert_array_equal(pa[key].asnumpy(), pb[key].asnumpy(), err_msg=key)


# ---- predict's CSVs, the evaluation report, the deploy bundle, the data report --------------------------------
def publish_points(total: int, tail: int = 10, sample: int = 2) -> list:
    """Every call of the publication (the last `tail` calls of a run) and a few of the staging before it."""
    head = list(range(1, max(1, total - tail), max(1, (total - tail) // sample)))
    return head + list(range(max(1, total - tail), total + 1))


@pytest.fixture(scope="module")
def two_epochs(train_data, tmp_path_factory):
    from train.__main__ import main
    run = tmp_path_factory.mktemp("two_epochs")
    assert main(_train_args(train_data, run / "r", 2, "--mom", "0.9")) == 0
    return run / "r"


def test_predict_csvs_fault_at_every_call_leaves_old_or_new(tmp_path, train_data, two_epochs, monkeypatch, capsys):
    from train.predict.cli import main
    data = str(train_data / "set_train.rec")
    old = tmp_path / "old"
    old.mkdir()
    assert main([str(two_epochs), "1", data, "--out", str(old / "p.csv"), "--top-k", "2"]) == 0
    run = lambda f: main([str(two_epochs), "2", data, "--out", str(f / "p.csv"), "--top-k", "2"])  # noqa: E731
    seen = sweep(tmp_path, old, run, ["p.csv", "p.topk.csv"], "p", monkeypatch, capsys)
    assert seen == {"old", "new"}


@pytest.mark.slow
def test_evaluation_report_fault_at_every_publish_point_leaves_old_or_new(tmp_path, train_data, two_epochs,
                                                                          monkeypatch, capsys):
    import train.report as eval_report
    from train.predict.cli import main
    # The plots cost a second a run and are not what is tested here: cheap stand-ins that differ per epoch.
    monkeypatch.setattr(eval_report, "confusion_png", lambda counts, names, normalised: repr(counts).encode())
    monkeypatch.setattr(eval_report, "reliability_png", lambda calibration: repr(calibration).encode())
    data = str(train_data / "set_train.rec")
    old = tmp_path / "old"
    assert main(["report", str(two_epochs), "1", data, "--out", str(old)]) == 0
    run = lambda f: main(["report", str(two_epochs), "2", data, "--out", str(f)])  # noqa: E731
    names = ["report.html", "report.json", "confusion.png", "confusion_normalised.png", "reliability.png"]
    clean = tmp_path / "count"
    shutil.copytree(old, clean)
    with monkeypatch.context() as patch:
        injector = inject(patch, None)
        assert run(clean) == 0
    seen = sweep(tmp_path, old, run, names, "report", monkeypatch, capsys, publish_points(injector.calls, 12, 3))
    assert seen == {"old", "new"}


@pytest.mark.slow
def test_deploy_fault_at_every_publish_point_leaves_old_or_new_bundle(tmp_path, two_epochs, monkeypatch, capsys):
    from tools.deploy import main
    old = tmp_path / "old"
    assert main([str(two_epochs), "1", str(old / "bundle"), "--no-check"]) == 0
    run = lambda f: main([str(two_epochs), "2", str(f / "bundle"), "--no-check", "--force"])  # noqa: E731
    # (the symbol's auto-named nodes, flatten0/flatten1..., count per process: its bytes differ between runs)
    names = ["bundle/model-0000.params", "bundle/model-preprocess.json", "bundle/model.classes.json"]
    clean = tmp_path / "count"
    shutil.copytree(old, clean)
    with monkeypatch.context() as patch:
        injector = inject(patch, None)
        assert run(clean) == 0
    seen = sweep(tmp_path, old, run, names, "bundle", monkeypatch, capsys, publish_points(injector.calls))
    assert seen == {"old", "new"}
    # What a killed deploy leaves (its staged bundle, an old one moved aside) goes on the next run.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for leftover in (f".bundle.{dead.pid}.part", f".bundle.old.{dead.pid}"):
        (old / leftover).mkdir()
        (old / leftover / "model-0000.params").write_bytes(b"\0" * 1024)
    assert run(old) == 0
    assert sorted(p.name for p in old.iterdir()) == ["bundle"]


@pytest.mark.parametrize("kind", ["erofs", "eacces"])
def test_every_cli_says_one_line_for_a_read_only_or_forbidden_output(tmp_path, train_data, two_epochs, images,
                                                                     monkeypatch, capsys, kind):
    """EROFS / EACCES at the first write of each command: one line naming the file and the errno, no traceback,
    nothing published (running as root, chmod cannot forbid anything: the errno is injected)."""
    import errno as errnos
    from recbuild.cli import main as recbuild_main
    from tools.deploy import main as deploy_main
    from train.__main__ import main as train_main
    from train.predict.cli import main as predict_main
    root, lst = images
    (tmp_path / "x.lst").write_text(lst)
    code_name = errnos.errorcode[{"erofs": errnos.EROFS, "eacces": errnos.EACCES}[kind]]
    commands = {
        "pack": lambda: recbuild_main(["--num-thread", "1", "--no-progress", str(tmp_path / "x"), str(root)]),
        "list": lambda: recbuild_main(["--list", "--recursive", str(tmp_path / "y"), str(root)]),
        "train": lambda: train_main(_train_args(train_data, tmp_path / "t", 1)),
        "predict": lambda: predict_main([str(two_epochs), "2", str(train_data / "set_train.rec"), "--out",
                                         str(tmp_path / "p.csv")]),
        "deploy": lambda: deploy_main([str(two_epochs), "2", str(tmp_path / "bundle"), "--no-check"]),
    }
    for name, command in commands.items():
        before = sorted(p.name for p in tmp_path.iterdir())
        with monkeypatch.context() as patch:
            inject(patch, 1, kind)
            code = command()
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert code != 0 and len(err) == 1 and ".part" not in err[0], (name, err)
        assert code_name in err[0] and str(tmp_path) in err[0] and "Traceback" not in err[0], (name, err)
        if name == "train":
            assert "no epoch finished" in err[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name
