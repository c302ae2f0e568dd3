"""Damaged inputs are refused before training: the seeded fuzzers' shapes (a .rec cut short, a shifted or empty
.idx, a bad magic, flipped bits in JPEG data, a header label changed, pack.json counts x10, a .crc32 entry lost)
applied to a small valid pack, then `python -m train` run as a user runs it. Each must end with one line naming
the damaged file: no signal (MXNet's C++ reader aborts on some of them), no traceback, no checkpoint.

The reference for "damaged" is independent of our reader: every damage below is also checked to be one that
mx.recordio reads differently from the original (or that makes MXNet's reader crash), so none is a no-op.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import pytest

from recbuild.config import PackConfig
from recbuild.integrity import main as verify_main, reader_problems, verify_rec
from recbuild.recordio import CHECKSUM_MAGIC
from tests._pack_fixtures import pack_tree
from tests._train_fixtures import tiny_vgg_checkpoint
from train import recfile
from train.recfile import DataError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ant", "bee", "cow"]
NAME = "s_train"


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """A valid recbuild pack (24 JPEG records, .idx, .crc32, .pack.json, class map) and a tiny net for it."""
    d = tmp_path_factory.mktemp("pack")
    tiny_vgg_checkpoint(d / "pre", num_classes=len(CLASSES))
    pack_tree(d, NAME, CLASSES, 8, PackConfig(resize=20, encoding=".jpg", quality=90, workers=1, progress=False))
    shutil.rmtree(d / "images")
    return d


def _copy(pack: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in pack.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def _offsets(d: Path):
    return [int(line.split("\t")[1]) for line in (d / f"{NAME}.idx").read_text().splitlines()]


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _sidecar(d: Path, **changes) -> None:
    path = d / f"{NAME}.pack.json"
    data = json.loads(path.read_text())
    for key, change in changes.items():
        data[key] = change(data[key]) if callable(change) else change
    path.write_text(json.dumps(data))


def _without_checksums(d: Path) -> None:
    """What an im2rec-packed file has: no .crc32 and no pack sidecar."""
    (d / f"{NAME}.crc32").unlink()
    (d / f"{NAME}.pack.json").unlink()


def damage(kind: str, d: Path) -> str:
    """Apply one damage to the pack in `d`; returns the suffix of the file the error must name."""
    rec, idx = d / f"{NAME}.rec", d / f"{NAME}.idx"
    offsets = _offsets(d)
    if kind == "cut short":
        rec.write_bytes(rec.read_bytes()[:offsets[-1] + 40])
    elif kind == "cut by one byte":
        rec.write_bytes(rec.read_bytes()[:-1])
    elif kind.startswith("shifted idx offset"):
        lines = idx.read_text().splitlines()
        lines[5] = f"5\t{offsets[5] + 4}"
        idx.write_text("\n".join(lines) + "\n")
    elif kind.startswith("empty idx"):
        idx.write_text("")
    elif kind.startswith("bad magic"):
        _patch(rec, offsets[7], b"\x0b")
    elif kind == "bits flipped in JPEG data":
        length = struct.unpack_from("<I", rec.read_bytes(), offsets[3] + 4)[0] & ((1 << 29) - 1)
        middle = offsets[3] + 8 + 24 + (length - 24) * 3 // 4
        _patch(rec, middle, bytes([rec.read_bytes()[middle] ^ 0x04]))
    elif kind.startswith("header label to another class"):
        _patch(rec, offsets[3] + 8 + 4, struct.pack("<f", 2.0))   # record 3 is class 0
    elif kind.startswith("header label outside the class map"):
        _patch(rec, offsets[3] + 8 + 4, struct.pack("<f", 7.0))
    elif kind.startswith("header label 1e9"):                       # bincount up to it would take 8 GB
        _patch(rec, offsets[3] + 8 + 4, struct.pack("<f", 1e9))
    elif kind == "pack.json counts x10":
        _sidecar(d, records=lambda n: n * 10, class_counts=lambda c: [n * 10 for n in c])
        return ".pack.json"
    elif kind == "pack.json count x10, no histogram":
        _sidecar(d, records=lambda n: n * 10, class_counts=None)
        return ".pack.json"
    elif kind == "pack.json not JSON":
        (d / f"{NAME}.pack.json").write_text('{"format": "mxtransfer.pack/1", "records": 2')
        return ".pack.json"
    elif kind == "a .crc32 entry dropped":
        crc = d / f"{NAME}.crc32"
        data = crc.read_bytes()
        crc.write_bytes(data[:len(CHECKSUM_MAGIC) + 12 * 4] + data[len(CHECKSUM_MAGIC) + 12 * 5:])
    elif kind == ".crc32 cut short":
        crc = d / f"{NAME}.crc32"
        crc.write_bytes(crc.read_bytes()[:-5])
    else:
        raise AssertionError(kind)
    if kind.endswith("(im2rec file)"):
        _without_checksums(d)
    if kind.endswith("(no checksums)"):                              # the pack sidecar's histogram is the guard
        (d / f"{NAME}.crc32").unlink()
        _sidecar(d, payload_crc32=None)
    return ".rec"


DAMAGE = ["cut short", "cut by one byte", "shifted idx offset", "empty idx", "bad magic", "bits flipped in JPEG data",
          "header label to another class", "header label outside the class map",
          "header label to another class (no checksums)", "header label 1e9 (no checksums)", "pack.json counts x10",
          "pack.json count x10, no histogram", "pack.json not JSON", "a .crc32 entry dropped", ".crc32 cut short",
          "shifted idx offset (im2rec file)", "empty idx (im2rec file)", "bad magic (im2rec file)",
          "header label outside the class map (im2rec file)"]


# Run as a separate `python -m train` process: the shapes that kill the process inside MXNet's reader when
# unguarded, and one of each silent kind. The others run the same main() in this process (no mxnet start-up).
IN_A_PROCESS = {"shifted idx offset", "empty idx", "bad magic", "bits flipped in JPEG data",
                "header label to another class", "pack.json counts x10", "empty idx (im2rec file)"}


def _args(d: Path):
    return ["--pretrained-model", str(d / "pre"), "--data-train", str(d / f"{NAME}.rec"), "--model-prefix",
            str(d / "ft"), "--num-epochs", "1", "--batch-size", "4", "--no-progress"]


def train(d: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *_args(d)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _assert_refused(d: Path, suffix: str, returncode: int, stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert returncode > 0, (returncode, stderr[-2000:])                       # an error, not a signal
    assert "Traceback" not in stderr, stderr[-2000:]
    assert lines[-1].startswith("error: ") and str(d / f"{NAME}{suffix}") in lines[-1], lines[-1]
    assert not list(d.glob("ft-*.params")), "a checkpoint was written from damaged data"


@pytest.mark.slow
def test_the_undamaged_pack_trains(pack, tmp_path):
    """The control: the same command on the intact copy trains and checkpoints."""
    d = _copy(pack, tmp_path / "ok")
    done = train(d)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (d / "ft-0001.params").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(IN_A_PROCESS))
def test_damaged_input_is_one_line_before_training(pack, tmp_path, kind):
    d = _copy(pack, tmp_path / "d")
    suffix = damage(kind, d)
    done = train(d)
    _assert_refused(d, suffix, done.returncode, done.stderr)
    assert f"python -m recbuild verify {d / NAME}.rec" in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", [k for k in DAMAGE if k not in IN_A_PROCESS])
def test_damaged_input_is_one_line_before_training_in_process(pack, tmp_path, kind, capsys):
    from train.__main__ import main
    d = _copy(pack, tmp_path / "d")
    suffix = damage(kind, d)
    code = main(_args(d))
    _assert_refused(d, suffix, code, capsys.readouterr().err)


@pytest.mark.parametrize("kind", [k for k in DAMAGE if "pack.json" not in k and "crc32" not in k])
def test_each_damage_changes_what_mx_recordio_reads(pack, tmp_path, kind):
    """The reference: each .rec/.idx damage is real for MXNet's own reader (so a test above cannot pass on a
    no-op). Damage that would abort the process in C++ is not read here; it is the framing the fuzzers found."""
    d = _copy(pack, tmp_path / "d")
    damage(kind, d)
    if any(k in kind for k in ("shifted idx", "empty idx", "bad magic", "cut")):
        assert reader_problems(d / f"{NAME}.rec"), kind                      # framing or index: our walk's own
        return
    reader = mx.recordio.MXIndexedRecordIO(str(d / f"{NAME}.idx"), str(d / f"{NAME}.rec"), "r")
    original = mx.recordio.MXIndexedRecordIO(str(pack / f"{NAME}.idx"), str(pack / f"{NAME}.rec"), "r")
    changed = [k for k in original.keys if reader.read_idx(k) != original.read_idx(k)]
    assert changed == [3], changed


def test_checked_scan_is_remembered_and_redone_when_a_companion_changes(pack, tmp_path, monkeypatch):
    """The check runs once per file content: an .idx damaged later beside an unchanged .rec is checked again
    (the cache key covers the .idx, the pack sidecar and the .crc32), also through the disk cache."""
    monkeypatch.setattr(recfile, "REC_CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(recfile, "DISK_CACHE_MIN_RECORDS", 10)
    d = _copy(pack, tmp_path / "d")
    recfile.forget()
    assert recfile.summary(d / f"{NAME}.rec")[0] == 24
    recfile.forget()                                   # a new process: the disk cache answers
    assert recfile.scan(d / f"{NAME}.rec").records == 24
    damage("shifted idx offset", d)
    recfile.forget()
    with pytest.raises(DataError, match=r"s_train.rec: damaged: \[idx-not-record\] record key 5"):
        recfile.summary(d / f"{NAME}.rec")
    recfile.forget()


def test_a_large_file_gets_a_sampled_checksum_check(pack, tmp_path, monkeypatch, caplog):
    """Above CRC_FULL_CHECK_BYTES every n-th record's CRC32 is compared, and a warning says so: damage in a
    sampled record is still refused."""
    d = _copy(pack, tmp_path / "d")
    monkeypatch.setattr(recfile, "CRC_FULL_CHECK_BYTES", (d / f"{NAME}.rec").stat().st_size // 4 + 1)
    recfile.forget()
    with caplog.at_level("WARNING"):
        recfile.check_records(d / f"{NAME}.rec")
    assert "checksums of 1 record in 4 were compared" in caplog.text
    damage("bits flipped in JPEG data", d)               # record 3: not in the sample (0, 4, 8, ...)
    recfile.check_records(d / f"{NAME}.rec")
    _patch(d / f"{NAME}.rec", _offsets(d)[4] + 8 + 30, b"\x00\x01")
    with pytest.raises(DataError, match=r"\[checksum\] record key 4"):
        recfile.check_records(d / f"{NAME}.rec")


# ---- verify on damaged sidecar files: a problem line, never a crash ----------------------------------------------
SIDECARS = {
    "errors.tsv without ids": (".errors.tsv", b"index\tpath\treason\nnot-a-number\tx.jpg\tbroken\n\xff\xfe\n",
                               "errors-file"),
    "errors.tsv one column": (".errors.tsv", b"index\tpath\treason\n12\n", None),
    "pack.json not JSON": (".pack.json", b"{\"format\": ", "pack-info"),
    "pack.json deeply nested": (".pack.json", b"[" * 100000, "pack-info"),
    "pack.json wrong types": (".pack.json", b'{"format": "mxtransfer.pack/1", "rec": 1}', "pack-info"),
    "pack.json binary": (".pack.json", bytes(range(256)), "pack-info"),
    ".crc32 cut short": (".crc32", None, "checksum-file"),
    ".crc32 entry dropped": (".crc32", None, "checksum-file"),
    ".crc32 missing": (".crc32", None, "checksum-file"),
    ".crc32 not ours": (".crc32", b"garbage", "checksum-file"),
    "class map deeply nested": (".classes.json", b"[" * 100000, "class-map"),
    "class map of another shape": (".classes.json", b'{"format": "mxtransfer.classmap/1", "classes": 3}', "class-map"),
}


@pytest.mark.parametrize("case", list(SIDECARS))
def test_verify_reports_a_damaged_sidecar_instead_of_crashing(pack, tmp_path, case, capsys):
    d = _copy(pack, tmp_path / "d")
    suffix, content, kind = SIDECARS[case]
    path = d / (f"s{suffix}" if suffix == ".classes.json" else f"{NAME}{suffix}")   # the class map is per set
    if case == ".crc32 cut short":
        content = path.read_bytes()[:-5]
    elif case == ".crc32 entry dropped":
        data = path.read_bytes()
        content = data[:len(CHECKSUM_MAGIC)] + data[len(CHECKSUM_MAGIC) + 12:]
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    res = verify_rec(d / f"{NAME}.rec", progress=False)
    kinds = [p.kind for p in res.problems]
    if kind is None:           # an id with no path: still an id, accounted for
        assert res.ok, [p.message for p in res.problems]
    else:
        assert kind in kinds and all("\n" not in p.message for p in res.problems), kinds
        named = next(p.message for p in res.problems if p.kind == kind)
        assert path.name in named, named
    assert verify_main(["--no-progress", str(d / f"{NAME}.rec")]) == (0 if kind is None else 1)
    capsys.readouterr()


# ---- the decompression-bomb guard: every format's own header, read before decoding -------------------------------
def tiff_bytes(width: int, height: int, endian: str = "<", big: bool = False, pixels: bytes = b"",
               deflate: bool = False) -> bytes:
    """A minimal 8-bit greyscale TIFF (classic or BigTIFF, either byte order) with one strip of `pixels`."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8 if deflate else 1), (262, 3, 1),
            (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, len(pixels))]
    count_fmt, entry, value, head = ("Q", "HHQ", "Q", 16) if big else ("H", "HHI", "I", 8)
    entry_size = struct.calcsize(endian + entry + value)
    ifd_size = struct.calcsize(endian + count_fmt) + len(tags) * entry_size + struct.calcsize(endian + value)
    strip_at = head + ifd_size
    magic = (b"II" if endian == "<" else b"MM") + struct.pack(endian + "H", 43 if big else 42)
    out = magic + (struct.pack(endian + "HHQ", 8, 0, head) if big else struct.pack(endian + "I", head))
    out += struct.pack(endian + count_fmt, len(tags))
    for tag, kind, val in tags:
        val = strip_at if tag == 273 else val
        # A value sits in the first bytes of the value field (left-justified), whatever the byte order.
        field = struct.pack(endian + ("H" if kind == 3 else "I"), val)
        field += b"\0" * (struct.calcsize(endian + value) - len(field))
        out += struct.pack(endian + entry, tag, kind, 1) + field
    return out + struct.pack(endian + value, 0) + pixels


def deflate_bomb(width: int, height: int) -> bytes:
    """A TIFF of width x height black pixels whose strip is deflated: a few hundred KB that decode to w*h bytes."""
    import zlib
    packer = zlib.compressobj(9)
    row = bytes(width)
    strip = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return tiff_bytes(width, height, pixels=strip, deflate=True)


@pytest.mark.parametrize("endian,big", [("<", False), (">", False), ("<", True), (">", True)],
                         ids=["II", "MM", "II-BigTIFF", "MM-BigTIFF"])
def test_tiff_size_is_read_from_its_directory(endian, big):
    import cv2
    import numpy as np
    from PIL import Image
    import io
    from recbuild.images import sniff
    pixels = np.arange(30 * 41, dtype=np.uint8).reshape(30, 41)
    data = tiff_bytes(41, 30, endian, big, pixels.tobytes())
    assert (sniff(data).fmt, sniff(data).width, sniff(data).height) == ("tiff", 41, 30)
    if not (big and endian == ">"):       # Pillow 9-13 cannot open big-endian BigTIFF; libtiff (below) can
        assert Image.open(io.BytesIO(data)).size == (41, 30)                       # Pillow reads the same header
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)     # and OpenCV decodes that size
    assert decoded is not None and np.array_equal(decoded, pixels)
    assert sniff(tiff_bytes(14000, 14000, endian, big)).width == 14000


def _refuse_decoding(monkeypatch):
    """cv2's decoders fail the test if called: the guard must act on the header alone."""
    import recbuild.images as images

    def called(*_args, **_kwargs):
        raise AssertionError("the image was handed to the decoder")
    monkeypatch.setattr(images.cv2, "imdecode", called)
    monkeypatch.setattr(images.cv2, "VideoCapture", called)


@pytest.mark.parametrize("ext", [".tif", ".webp", ".png", ".bmp", ".jpg"])
def test_pixel_guard_applies_to_every_format_from_its_header(ext, monkeypatch):
    """A 41x30 image encoded by OpenCV in each format it writes, under a file name that says .jpg: the guard reads
    the size from the format's own header (as the encoder wrote it) and refuses one pixel over the limit before
    decoding; at the limit it decodes."""
    import cv2
    import numpy as np
    from recbuild.images import ImageError, decode, sniff
    img = np.random.RandomState(1).randint(0, 255, (30, 41, 3)).astype(np.uint8)
    data = cv2.imencode(ext, img)[1].tobytes()
    assert (sniff(data).width, sniff(data).height) == (41, 30)
    assert decode(data, "x.jpg", PackConfig(max_pixels=41 * 30, workers=1)).image.shape[:2] == (30, 41)
    _refuse_decoding(monkeypatch)
    with pytest.raises(ImageError, match=r"41x30 .* exceeds the decompression-bomb guard"):
        decode(data, "x.jpg", PackConfig(max_pixels=41 * 30 - 1, workers=1))


def test_a_tiff_bomb_named_jpg_is_refused_unread(tmp_path, monkeypatch):
    """The issue's case: a 14000x14000 TIFF (196 MP; deflated, a few hundred KB) named x.jpg is refused from its
    header under the default 100 MP guard, and the pack reports it naming the file."""
    from recbuild.images import ImageError, decode
    bomb = deflate_bomb(14000, 14000)
    assert len(bomb) < 1 << 20
    with monkeypatch.context() as patched:
        _refuse_decoding(patched)
        with pytest.raises(ImageError, match=r"TIFF of 14000x14000 \(196 MP to decode\) exceeds"):
            decode(bomb, "x.jpg", PackConfig(workers=1))
    root = tmp_path / "img"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_bytes(bomb)
    (root / "a" / "fine.tif").write_bytes(tiff_bytes(8, 8, pixels=bytes(64)))
    (tmp_path / "s.lst").write_text("0\t0.000000\ta/x.jpg\n1\t0.000000\ta/fine.tif\n")
    done = subprocess.run([sys.executable, "-m", "recbuild", "--num-thread", "1", "--no-progress",
                           str(tmp_path / "s"), str(root)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    errors = (tmp_path / "s.errors.tsv").read_text().splitlines()[1:]
    assert len(errors) == 1 and errors[0].startswith("0\ta/x.jpg\t") and "decompression-bomb" in errors[0]


def test_a_header_that_does_not_state_the_size_is_not_decoded(monkeypatch):
    from recbuild.images import ImageError, decode
    no_size = tiff_bytes(8, 8, pixels=bytes(64)).replace(struct.pack("<HHI", 256, 4, 1), struct.pack("<HHI", 999, 4, 1))
    _refuse_decoding(monkeypatch)
    with pytest.raises(ImageError, match="TIFF header does not state the image size"):
        decode(no_size, "y.png", PackConfig(workers=1))


# ---- --list --recursive and symbolic links ----------------------------------------------------------------------
def test_recursive_list_does_not_follow_links_that_leave_root_or_loop(tmp_path):
    """A tree with a link back to ROOT (a loop), a link to a folder outside ROOT, a link to a sibling folder inside
    ROOT and a link to a file: the list is im2rec's list of the same tree without the two bad links (byte for
    byte), and each bad link is warned about once, by name."""
    import tests._recbuild_fixtures as fx
    outside = tmp_path / "elsewhere"
    fx.make_tree(outside, classes=("secret",), per_class=2)
    for name in ("tree", "ref"):
        root = tmp_path / name
        fx.make_tree(root, classes=("cat", "dog"), per_class=2)
        (root / "dog" / "twin").symlink_to(root / "cat", target_is_directory=True)       # inside: followed
        (root / "cat" / "linked.jpg").symlink_to(outside / "secret" / "img 0.jpg")       # a file: kept
    (tmp_path / "tree" / "dog" / "loop").symlink_to(tmp_path / "tree", target_is_directory=True)
    (tmp_path / "tree" / "cat" / "out").symlink_to(outside, target_is_directory=True)
    (tmp_path / "tree" / "cat" / "deeper").mkdir()
    (tmp_path / "tree" / "cat" / "deeper" / "up").symlink_to(tmp_path / "tree" / "cat", target_is_directory=True)
    done = fx.run_recbuild("--list", "--recursive", "--no-shuffle", str(tmp_path / "ours"), str(tmp_path / "tree"))
    fx.run_im2rec("--list", "--recursive", "--no-shuffle", str(tmp_path / "theirs"), str(tmp_path / "ref"),
                  cwd=tmp_path)
    ours = (tmp_path / "ours.lst").read_text()
    assert ours == (tmp_path / "theirs.lst").read_text() and "secret" not in ours and len(ours.splitlines()) == 8
    for link, what in (("dog/loop", "a loop"), ("cat/out", "outside ROOT"), ("cat/deeper/up", "a loop")):
        said = [line for line in done.stderr.splitlines() if f"{link}: a symbolic link to" in line]
        assert len(said) == 1 and what in said[0] and "not followed" in said[0], done.stderr


# ---- file names that are not valid UTF-8 ----------------------------------------------------------------------
def test_predict_writes_a_non_utf8_file_name_escaped_and_names_it(pack, tmp_path, caplog):
    """A folder with a file whose name is the bytes b'bad\\xff\\xfe.jpg': the CSVs are valid UTF-8, the id is the
    name with each non-UTF-8 byte as \\xNN (os.fsencode of the real name gives back those bytes), and a warning
    names it. The other ids are untouched."""
    import os
    import cv2
    import numpy as np
    from train.predict import load_model, predict
    folder = tmp_path / "imgs"
    folder.mkdir()
    jpeg = cv2.imencode(".jpg", np.full((20, 20, 3), 90, np.uint8))[1].tobytes()
    (folder / "plain.jpg").write_bytes(jpeg)
    with open(os.path.join(os.fsencode(folder), b"bad\xff\xfe.jpg"), "wb") as handle:
        handle.write(jpeg)
    model = load_model(str(pack / "pre"), 0, batch_size=2)
    with caplog.at_level("WARNING"):
        predict(model, folder, tmp_path / "p.csv", id_mode="path", progress=False)
    for csv_file in (tmp_path / "p.csv", tmp_path / "p.topk.csv"):
        rows = csv_file.read_bytes().decode("utf-8").splitlines()          # strict: valid UTF-8
        assert sorted(r.split(",")[0] for r in rows[1:]) == ["bad\\xff\\xfe.jpg", "plain.jpg"]
    said = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("bad\\xff\\xfe.jpg:") and str(tmp_path / "p.csv") in said[0]
    real = next(n for n in os.listdir(os.fsencode(folder)) if n != b"plain.jpg")
    assert real == b"bad\xff\xfe.jpg"


def test_verify_names_a_non_utf8_listed_path_escaped(pack, tmp_path, capsys):
    """verify's problem line names the .lst path of a damaged record; a path that is not UTF-8 is escaped."""
    d = _copy(pack, tmp_path / "d")
    lst = d / f"{NAME}.lst"
    lines = lst.read_bytes().split(b"\n")
    lines[3] = lines[3].rsplit(b"\t", 1)[0] + b"\tant/bad\xff.png"
    lst.write_bytes(b"\n".join(lines))
    damage("header label to another class", d)                       # record 3
    assert verify_main(["--no-progress", str(d / f"{NAME}.rec")]) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "[label]" in x)
    assert "s_train.lst line 4: ant/bad\\xff.png:" in line, line
    from recbuild.names import display_name
    assert display_name("caf\u00e9.jpg") == "caf\u00e9.jpg"


# ---- tools.deploy --name ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "/tmp/x", "sub/x", "..", ".", "", ".hidden", "a\\b"])
def test_deploy_name_must_be_a_plain_name(tmp_path, name, capsys):
    """--name ../x once wrote the bundle's files beside OUTDIR; now it is a one-line error and nothing is
    written anywhere."""
    from tests import _deploy_fixtures as dfx
    from tools import deploy
    prefix = dfx.make_checkpoint(tmp_path / "ckpt", "vgg_like", epoch=1)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert deploy.main([str(prefix), "1", str(tmp_path / "out" / "bundle"), "--name", name, "--no-check"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--name {name!r}: expected a plain file name" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_deploy_plain_name_is_used(tmp_path):
    from tests import _deploy_fixtures as dfx
    from tools import deploy
    prefix = dfx.make_checkpoint(tmp_path / "ckpt", "vgg_like", epoch=1)
    bundle, _ = deploy.write_bundle(prefix, 1, tmp_path / "out", name="birds-v2", check=False)
    assert (tmp_path / "out" / "birds-v2-symbol.json").is_file() and bundle.name == "birds-v2"
