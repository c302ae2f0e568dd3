"""The reports: data health (duplicates and leakage across splits), evaluation report, LR finder.

Data-health oracle: the tree is built here, so which val/test images are resized or re-encoded copies of which
training images is known; the packed files are read back by the report only.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from recbuild.cli import main as recbuild_main
from recbuild.report import PHASH_THRESHOLD, hamming, near_pairs, phash
from tests._recbuild_fixtures import photo

CLASSES = ("cat", "dog", "eel")


# ---- data health ----------------------------------------------------------------------------------------------
def _write(path: Path, img: np.ndarray, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, quality]) if path.suffix == ".jpg" else \
        cv2.imwrite(str(path), img)
    assert ok


def _resized_copy(img: np.ndarray, scale: float) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)


def make_split_tree(root: Path, leaky: bool, pack_args=()):
    """12 training images (3 classes), 6 val images and a 2-image test folder.

    With `leaky`: val 3 is train 1 resized to 1/2 and re-encoded at JPEG quality 60, val 4 is train 5 at 0.7
    (PNG), val 5 is train 9's file byte for byte; test-folder image 0 is train 2 at 0.6, quality 70.
    `pack_args` are added to the pack command (e.g. --report). Returns {val or folder path: train path} of the
    planted copies."""
    images = root / "images"
    train, val, copies = [], [], {}
    for i in range(12):
        rel = f"{CLASSES[i % 3]}/t{i:02d}.jpg"
        _write(images / rel, photo(90 + 7 * i, 120 + 5 * (i % 4), seed=i))
        train.append((i, i % 3, rel))
    for j in range(6):
        rel = f"{CLASSES[j % 3]}/v{j:02d}" + (".png" if j == 4 else ".jpg")
        src = {3: 1, 4: 5, 5: 9}.get(j) if leaky else None
        if src is None:
            _write(images / rel, photo(100, 130, seed=100 + j))
        elif j == 5:
            rel = f"{CLASSES[j % 3]}/v{j:02d}.jpg"
            (images / rel).write_bytes((images / train[src][2]).read_bytes())
        else:
            scale, quality = (0.5, 60) if j == 3 else (0.7, 95)
            _write(images / rel, _resized_copy(cv2.imread(str(images / train[src][2])), scale), quality)
        if src is not None:
            copies[rel] = train[src][2]
        val.append((100 + j, j % 3, rel))
    folder = root / "kaggle_test"
    _write(folder / "0.jpg", _resized_copy(cv2.imread(str(images / train[2][2])), 0.6) if leaky
           else photo(95, 95, seed=500), 70)
    _write(folder / "1.jpg", photo(110, 90, seed=501))
    if leaky:
        copies["0.jpg"] = train[2][2]
    for name, rows in (("train", train), ("val", val)):
        (root / f"set_{name}.lst").write_text("".join(f"{i}\t{c}.000000\t{p}\n" for i, c, p in rows))
    (root / "set.classes.json").write_text(json.dumps({"format": "mxtransfer.classmap/1", "classes": CLASSES}))
    assert recbuild_main([str(root / "set"), str(images), "--num-thread", "1", "--no-progress", *pack_args]) == 0
    return copies


@pytest.mark.parametrize("leaky", [True, False], ids=["leaky", "clean"])
def test_data_report_finds_every_planted_copy_and_nothing_else(tmp_path, leaky, capsys):
    copies = make_split_tree(tmp_path, leaky)
    assert recbuild_main(["report", str(tmp_path / "set"), "--test-folder", str(tmp_path / "kaggle_test")]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "set.report.json").read_text())
    found = {(p["b"]["path"], p["a"]["path"]): p for p in data["pairs"]}
    assert {k[0]: k[1] for k in found} == copies  # every planted pair, each held-out copy paired with its source
    for (copy, source), p in found.items():
        assert p["a"]["split"] == "train" and p["b"]["split"] in ("val", "kaggle_test")
        assert p["distance"] <= PHASH_THRESHOLD
        line = int(re.search(r"t(\d+)", source).group(1)) + 1  # the .lst line of the training image
        assert p["a"]["line"] == line and p["a"]["class"] == source.split("/")[0]
    if leaky:
        assert found[("cat/v03.jpg", "dog/t01.jpg")]["kind"] == "near"
        assert found[("dog/v04.png", "eel/t05.jpg")]["kind"] == "near"
        assert found[("eel/v05.jpg", "cat/t09.jpg")]["kind"] == "bytes"  # same file -> same packed bytes
    assert data["leakage"]["val"] == {"role": "val", "images": 6, "with_copy_in_train": 3 if leaky else 0}
    assert data["leakage"]["kaggle_test"]["with_copy_in_train"] == (1 if leaky else 0)
    assert f"leakage: {3 if leaky else 0} of 6 val images have a copy in train" in out
    assert data["splits"]["train"]["class_counts"] == [4, 4, 4] and data["splits"]["val"]["class_counts"] == [2, 2, 2]
    assert data["splits"]["train"]["small_classes"] == [0, 1, 2]  # fewer than 10 images each
    assert data["splits"]["train"]["width"]["min"] == 120 and data["splits"]["train"]["height"]["max"] == 90 + 77
    page = (tmp_path / "set.report.html").read_text()
    assert page.count('class="pair"') == len(copies)
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained: every resource inline
    assert page.count('<img class="thumb"') == 2 * len(copies)


def test_class_flags_and_empty_split(tmp_path):
    """A class with no val image is flagged in val; a class under --min-class-images is flagged."""
    images = tmp_path / "images"
    rows = {"train": [], "val": []}
    for i in range(9):
        rel = f"{CLASSES[i % 3]}/t{i}.jpg"
        _write(images / rel, photo(40, 40, seed=i))
        rows["train"].append((i, i % 3, rel))
    for j in range(3):  # val has cat and dog only
        rel = f"{CLASSES[j % 2]}/v{j}.jpg"
        _write(images / rel, photo(40, 40, seed=50 + j))
        rows["val"].append((50 + j, j % 2, rel))
    for name, r in rows.items():
        (tmp_path / f"s_{name}.lst").write_text("".join(f"{i}\t{c}.000000\t{p}\n" for i, c, p in r))
    (tmp_path / "s.classes.json").write_text(json.dumps({"format": "mxtransfer.classmap/1", "classes": CLASSES}))
    assert recbuild_main([str(tmp_path / "s"), str(images), "--num-thread", "1", "--no-progress"]) == 0
    assert recbuild_main(["report", str(tmp_path / "s"), "--min-class-images", "3", "--no-html"]) == 0
    data = json.loads((tmp_path / "s.report.json").read_text())
    assert data["splits"]["val"]["empty_classes"] == [2]
    assert data["splits"]["val"]["small_classes"] == [0, 1]
    assert data["splits"]["train"]["small_classes"] == [] and data["splits"]["train"]["empty_classes"] == []
    assert not (tmp_path / "s.report.html").exists()


def test_near_pairs_equal_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2 ** 63, 300, dtype=np.int64).astype(np.uint64)
    flips = [np.uint64(sum(1 << int(b) for b in rng.choice(64, k, replace=False))) for k in range(12)]
    hashes = np.concatenate([base, base[:60] ^ np.array(flips * 5, np.uint64)])  # copies 0..11 bits away
    got = {(int(a), int(b)): int(d) for a, b, d in near_pairs(hashes, 8, block=50)}
    expected = {}
    for i in range(len(hashes)):
        d = hamming(np.full(len(hashes) - i - 1, hashes[i]), hashes[i + 1:])
        expected.update({(i, i + 1 + int(j)): int(d[j]) for j in np.nonzero(d <= 8)[0]})
    assert got == expected and len(expected) >= 45


def test_phash_is_robust_to_resizing_and_reencoding_but_separates_images():
    img = photo(300, 400, seed=3)
    h = phash(img)
    for scale, quality in ((0.5, 90), (0.33, 50), (1.5, 95)):
        ok, buf = cv2.imencode(".jpg", _resized_copy(img, scale), [cv2.IMWRITE_JPEG_QUALITY, quality])
        copy = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        assert bin(h ^ phash(copy)).count("1") <= PHASH_THRESHOLD
    assert phash(img) == phash((img.astype(np.uint16) * 257))  # 16-bit copy: same hash
    others = [bin(h ^ phash(photo(300, 400, seed=s))).count("1") for s in range(10, 30)]
    assert min(others) > PHASH_THRESHOLD + 4


def test_look_alikes_are_not_copies_but_their_resized_copies_are(tmp_path):
    """Two different Fashion-MNIST boots of the bundled demo set whose hashes are 4 bits apart: the thumbnail check
    keeps them apart; a 3x upscaled, JPEG re-encoded copy of one of them is still found."""
    demo = Path(__file__).resolve().parents[1] / "demo" / "images" / "ankle_boot"
    a, b = cv2.imread(str(demo / "02246.png")), cv2.imread(str(demo / "05528.png"))
    assert bin(phash(a) ^ phash(b)).count("1") <= PHASH_THRESHOLD  # the hash alone would pair them
    images = tmp_path / "images"
    _write(images / "boot/a.png", a)
    _write(images / "boot/b.png", b)
    _write(images / "boot/a_copy.jpg", cv2.resize(a, (84, 84), interpolation=cv2.INTER_CUBIC), 80)
    (tmp_path / "f_train.lst").write_text("0\t0.000000\tboot/a.png\n")
    (tmp_path / "f_val.lst").write_text("1\t0.000000\tboot/b.png\n2\t0.000000\tboot/a_copy.jpg\n")
    assert recbuild_main([str(tmp_path / "f"), str(images), "--num-thread", "1", "--no-progress",
                          "--encoding", ".png"]) == 0
    assert recbuild_main(["report", str(tmp_path / "f"), "--no-html"]) == 0
    data = json.loads((tmp_path / "f.report.json").read_text())
    assert [(p["a"]["path"], p["b"]["path"], p["kind"]) for p in data["pairs"]] == \
        [("boot/a.png", "boot/a_copy.jpg", "near")]
    assert data["leakage"]["val"]["with_copy_in_train"] == 1


def test_the_data_report_stays_on_the_mxnet_free_floor():
    import subprocess
    import sys
    code = ("import sys, recbuild.report, recbuild.html_report, recbuild.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mxnet', 'symbols', 'train', 'tools')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_data_report_errors_are_one_line_and_name_the_file(tmp_path, capsys):
    assert recbuild_main(["report", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no .rec file starting with" in err and str(tmp_path / "nothing") in err
    make_split_tree(tmp_path, leaky=False)
    rec = tmp_path / "set_val.rec"
    rec.write_bytes(rec.read_bytes()[:-100])  # truncated inside the last record
    assert recbuild_main(["report", str(tmp_path / "set")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "truncated" in err and str(rec) in err
    assert not (tmp_path / "set.report.json").exists()


def test_an_undecodable_record_is_listed_not_dropped(tmp_path):
    from recbuild.recordio import RecordWriter, pack_header
    good = cv2.imencode(".png", photo(20, 20, seed=1))[1].tobytes()
    with open(tmp_path / "u_train.rec", "wb") as handle:
        writer = RecordWriter(handle)
        writer.write(0, pack_header([0.0], 0, False) + good)
        writer.write(1, pack_header([1.0], 1, False) + b"\x89PNG not really")
    assert recbuild_main(["report", str(tmp_path / "u"), "--no-html"]) == 0
    data = json.loads((tmp_path / "u.report.json").read_text())
    assert data["records"] == 1 and len(data["failures"]) == 1
    assert "record 1 holds no decodable image" in data["failures"][0]


# ---- the data report at pack time (--report) --------------------------------------------------------------------
def _pairs(data: dict) -> set:
    return {(p["a"]["path"], p["b"]["path"], p["kind"]) for p in data["pairs"]}


def _rec_copies(copies: dict) -> set:
    """The planted pairs between packed splits (the test-folder copy is not packed), as (train, copy) paths."""
    return {(src, copy) for copy, src in copies.items() if "/" in copy}


@pytest.mark.parametrize("leaky", [True, False], ids=["leaky", "clean"])
def test_pack_time_report_finds_the_same_pairs_as_the_standalone_report(tmp_path, leaky, capsys):
    """`--report` writes the report from the workers' fingerprints (of the image before its JPEG re-encode); the
    standalone report decodes every record. Same pairs, kinds, leakage and split figures; distances within the
    re-encode's tolerance (2 bits; measured 0 on this tree)."""
    from recbuild.report import build_report
    copies = make_split_tree(tmp_path, leaky, pack_args=("--report",))
    assert f"leakage: {3 if leaky else 0} of 6 val images have a copy in train" in capsys.readouterr().out
    at_pack = json.loads((tmp_path / "set.report.json").read_text())
    assert set(at_pack["sources"].values()) == {"pack-time fingerprints"}
    decoded, items = build_report(str(tmp_path / "set"), use_stored=False)
    assert set(decoded["sources"].values()) == {"decoded"}
    decoded_pairs = {(p.a, p.b, p.kind) for p in decoded["pairs"]}
    assert len(decoded_pairs) == len(at_pack["pairs"]) == (3 if leaky else 0)
    assert {(a, b) for a, b, _ in _pairs(at_pack)} == _rec_copies(copies)
    write_dir = tmp_path / "standalone"
    write_dir.mkdir()
    from recbuild.report import write_report
    write_report(decoded, items, write_dir / "r.json", None)
    standalone = json.loads((write_dir / "r.json").read_text())
    assert _pairs(standalone) == _pairs(at_pack)
    for a, b in zip(sorted(standalone["pairs"], key=lambda p: p["b"]["path"]),
                    sorted(at_pack["pairs"], key=lambda p: p["b"]["path"])):
        assert abs(a["distance"] - b["distance"]) <= 2
    for key in ("leakage", "splits", "pair_counts", "records", "failures", "class_names"):
        assert at_pack[key] == standalone[key], key
    assert (tmp_path / "set.report.html").read_text().count('class="pair"') == len(at_pack["pairs"])


def test_the_report_reads_stored_fingerprints_without_decoding(tmp_path, monkeypatch, capsys):
    """Packed with --report, `python -m recbuild report` takes every record's fingerprint from the file: with
    the decoder made to fail, it still finds the planted copies (the old code decoded every record)."""
    copies = make_split_tree(tmp_path, True, pack_args=("--report",))

    def no_decode(*args, **kwargs):
        raise AssertionError("the report decoded an image although pack-time fingerprints were there")
    monkeypatch.setattr(cv2, "imdecode", no_decode)
    monkeypatch.setattr(cv2, "imread", no_decode)
    (tmp_path / "set.report.json").unlink()
    assert recbuild_main(["report", str(tmp_path / "set"), "--no-html"]) == 0
    assert "leakage: 3 of 6 val images have a copy in train" in capsys.readouterr().out
    data = json.loads((tmp_path / "set.report.json").read_text())
    assert set(data["sources"].values()) == {"pack-time fingerprints"}
    assert {(a, b) for a, b, _ in _pairs(data)} == _rec_copies(copies)
    assert data["splits"]["train"]["width"]["min"] == 120 and data["splits"]["train"]["height"]["max"] == 90 + 77
    found = {p["b"]["path"]: p for p in data["pairs"]}
    assert found["eel/v05.jpg"]["kind"] == "bytes" and found["cat/v03.jpg"]["kind"] == "near"
    assert found["cat/v03.jpg"]["a"]["line"] == 2 and found["cat/v03.jpg"]["a"]["class"] == "dog"


def test_a_stale_fingerprint_file_is_ignored_with_a_warning(tmp_path, caplog):
    """A .rec replaced after packing (another quality, packed elsewhere and copied over): its fingerprints
    describe another file, so the report warns and decodes it; a truncated file likewise; packing again without
    --report removes the file."""
    import shutil
    from recbuild.fingerprints import fingerprints_path
    from recbuild.report import build_report
    copies = make_split_tree(tmp_path, True, pack_args=("--report",))
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tmp_path / "set_val.lst", other / "set_val.lst")
    assert recbuild_main([str(other / "set"), str(tmp_path / "images"), "--num-thread", "1", "--no-progress",
                          "--quality", "80"]) == 0
    for suffix in (".rec", ".idx"):
        shutil.copy(other / f"set_val{suffix}", tmp_path / f"set_val{suffix}")
    with caplog.at_level("WARNING", logger="recbuild.fingerprints"):
        data, items = build_report(str(tmp_path / "set"))
    assert any("set_val.fingerprints.npy: ignored" in r.getMessage() and "decoding the records" in r.getMessage()
               for r in caplog.records)
    assert data["sources"] == {str(tmp_path / "set_train.rec"): "pack-time fingerprints",
                               str(tmp_path / "set_val.rec"): "decoded"}
    assert {(items[p.a].path, items[p.b].path) for p in data["pairs"]} == _rec_copies(copies)

    rows = np.load(fingerprints_path(tmp_path / "set_train.rec"))
    with open(fingerprints_path(tmp_path / "set_train.rec"), "wb") as handle:
        np.save(handle, rows[:-1])
    caplog.clear()
    with caplog.at_level("WARNING", logger="recbuild.fingerprints"):
        data, _ = build_report(str(tmp_path / "set"))
    assert any("set_train.fingerprints.npy: ignored, expected 12 rows" in r.getMessage() for r in caplog.records)
    assert set(data["sources"].values()) == {"decoded"} and len(data["pairs"]) == 3

    assert recbuild_main([str(tmp_path / "set"), str(tmp_path / "images"), "--num-thread", "1",
                          "--no-progress"]) == 0
    assert not fingerprints_path(tmp_path / "set_train.rec").exists()
    assert "fingerprints" not in json.loads((tmp_path / "set_train.pack.json").read_text())


def test_report_flag_belongs_to_packing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        recbuild_main(["--list", "--report", str(tmp_path / "x"), str(tmp_path)])
    assert "--report goes with packing" in capsys.readouterr().err
