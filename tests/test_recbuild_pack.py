"""recbuild packing: round trips through MXNet's own readers, im2rec compatibility, the bad-image corpus,
interruption and `verify`."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import mxnet as mx
import numpy as np
import pytest

from recbuild.config import PackConfig
from recbuild.images import (Decoded, _jpeg_segments, _without_low_bit_scans, decode, load_image_bytes, reduction,
                             sniff, transform)
from recbuild.listing import read_list
from recbuild.recordio import encode_record
from tests import _recbuild_fixtures as fx


def _records(prefix: Path):
    """{key: (header, decoded BGR image or raw bytes)} through mx.recordio, plus keys in file order."""
    rec = mx.recordio.MXIndexedRecordIO(str(prefix) + ".idx", str(prefix) + ".rec", "r")
    out = {}
    for key in rec.keys:
        header, body = mx.recordio.unpack(rec.read_idx(key))
        out[key] = (header, body)
    keys = list(rec.keys)
    rec.close()
    return out, keys


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A 3-class tree with landscape and portrait images, listed and packed by the CLI with 2 workers."""
    tmp = tmp_path_factory.mktemp("packed")
    truth = fx.make_tree(tmp / "img", per_class=6, sizes=[(48, 64), (70, 40), (50, 50)])
    fx.run_recbuild("--list", "--recursive", "--train-ratio", "0.75", str(tmp / "set"), str(tmp / "img"))
    proc = fx.run_recbuild("--resize", "32", "--center-crop", "--num-thread", "2", str(tmp / "set"),
                           str(tmp / "img"))
    return tmp, truth, proc


def test_round_trip_mx_recordio(packed):
    tmp, truth, proc = packed
    assert "packed 13 of 13 images" in proc.stdout and "packed 5 of 5 images" in proc.stdout
    for split in ("train", "val"):
        entries = read_list(str(tmp / f"set_{split}.lst"))
        records, keys = _records(tmp / f"set_{split}")
        assert keys == [e.index for e in entries]                       # list order, every entry
        for e in entries:
            header, body = records[e.index]
            label, i, _ = truth[e.path]
            assert header.id == e.index and header.flag == 0 and header.label == label == e.labels[0]
            img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
            assert img.shape == (32, 32, 3)
            want = fx.coded(32, 32, label, i).reshape(-1, 3).mean(0)
            assert np.abs(img.reshape(-1, 3).mean(0) - want).max() < 3.0   # JPEG q95 tolerance
    assert not list(tmp.glob("*.errors.tsv"))


def test_round_trip_image_record_iter(packed):
    tmp, truth, _ = packed
    entries = read_list(str(tmp / "set_train.lst"))
    it = mx.io.ImageRecordIter(path_imgrec=str(tmp / "set_train.rec"), path_imgidx=str(tmp / "set_train.idx"),
                               data_shape=(3, 32, 32), batch_size=len(entries), shuffle=False,
                               preprocess_threads=1, round_batch=False)
    batch = next(iter(it))
    data, labels = batch.data[0].asnumpy(), batch.label[0].asnumpy()
    assert data.shape == (len(entries), 3, 32, 32)
    for row, e in enumerate(entries):
        label, i, _ = truth[e.path]
        assert labels[row] == label
        want_bgr = fx.coded(32, 32, label, i).reshape(-1, 3).mean(0)
        got_rgb = data[row].reshape(3, -1).mean(1)
        assert np.abs(got_rgb[::-1] - want_bgr).max() < 3.0


def test_pass_through_and_pack_label_are_byte_identical_to_im2rec(tmp_path):
    """With --pass-through nothing is re-encoded, so the .rec/.idx must equal im2rec's byte for byte; a
    multi-label list exercises --pack-label's header layout."""
    fx.make_tree(tmp_path / "img", per_class=3)
    lines = []
    for n, path in enumerate(sorted(p.relative_to(tmp_path / "img") for p in (tmp_path / "img").rglob("*.jpg"))):
        lines.append(f"{100 + 3 * n}\t{n % 3:f}\t{n * 0.5:f}\t{-1.25:f}\t{path}\n")
    for side in ("ref", "ours"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "m.lst").write_text("".join(lines))
    fx.run_im2rec("--pass-through", "--pack-label", "ref/m", str(tmp_path / "img"), cwd=tmp_path)
    fx.run_recbuild("--pass-through", "--pack-label", "--num-thread", "2", str(tmp_path / "ours" / "m"),
                    str(tmp_path / "img"))
    for ext in (".rec", ".idx"):
        assert (tmp_path / "ours" / f"m{ext}").read_bytes() == (tmp_path / "ref" / f"m{ext}").read_bytes()
    records, _ = _records(tmp_path / "ours" / "m")
    header, body = records[103]
    np.testing.assert_array_equal(header.label, np.float32([1, 0.5, -1.25]))


def test_resized_records_match_im2rec_headers_and_sizes(tmp_path):
    """Same keys, headers and image sizes as im2rec's; pixels close (we shrink with INTER_AREA, it with
    INTER_LINEAR)."""
    fx.make_tree(tmp_path / "img", per_class=3, sizes=[(300, 200), (120, 333), (97, 97)])
    for side in ("ref", "ours"):
        (tmp_path / side).mkdir()
    fx.run_recbuild("--list", "--recursive", str(tmp_path / "ours" / "s"), str(tmp_path / "img"))
    shutil.copy(tmp_path / "ours" / "s.lst", tmp_path / "ref" / "s.lst")
    fx.run_im2rec("--resize", "40", "--quality", "90", "ref/s", str(tmp_path / "img"), cwd=tmp_path)
    fx.run_recbuild("--resize", "40", "--quality", "90", str(tmp_path / "ours" / "s"), str(tmp_path / "img"))
    ref, ref_keys = _records(tmp_path / "ref" / "s")
    ours, our_keys = _records(tmp_path / "ours" / "s")
    assert our_keys == ref_keys and len(our_keys) == 9
    for key in ref_keys:
        assert ours[key][0] == ref[key][0]
        a = cv2.imdecode(np.frombuffer(ours[key][1], np.uint8), 1)
        b = cv2.imdecode(np.frombuffer(ref[key][1], np.uint8), 1)
        assert a.shape == b.shape
        assert fx.psnr(a, b) > 30


def test_record_framing_splits_on_magic_like_dmlc(tmp_path):
    """A payload holding RecordIO's magic at aligned offsets is split into parts exactly as dmlc does."""
    magic = struct.pack("<I", 0xCED7230A)
    for payload in (magic + b"abcd" + magic + magic + b"xyz", b"ab" + magic + b"cdef" + magic, b"", b"12345"):
        path = tmp_path / "m.rec"
        w = mx.recordio.MXRecordIO(str(path), "w")
        w.write(payload)
        w.close()
        assert path.read_bytes() == encode_record(payload)
        r = mx.recordio.MXRecordIO(str(path), "r")
        assert r.read() == payload
        r.close()


def test_framing_errors_name_offset_and_kind(tmp_path):
    """Our reader against files mx.recordio wrote, then broke: each error names the frame's offset and kind."""
    from recbuild.recordio import RecordIOError, iter_records
    magic = struct.pack("<I", 0xCED7230A)
    payloads = [b"head", b"abcd" + magic + b"efgh", b"tail"]      # the middle one is split in two frames
    path = tmp_path / "s.rec"
    w = mx.recordio.MXRecordIO(str(path), "w")
    for payload in payloads:
        w.write(payload)
    w.close()
    data = path.read_bytes()
    with open(path, "rb") as handle:
        assert [p for _, p in iter_records(handle, len(data))] == payloads
    second = 8 + 4                                                 # after the first record (4 bytes, padded)
    cases = {"split": data[:second + 8 + 4],                        # ends after the first part of the split
             "magic": data[:second] + b"\0" * 8 + data[second + 8:],
             "cflag": data[:second + 4] + struct.pack("<I", 5 << 29 | 4) + data[second + 8:],
             "overrun": data[:-2],
             "header": data + b"\x0a\x23"}
    for kind, broken in cases.items():
        with open(path, "wb") as f:
            f.write(broken)
        with open(path, "rb") as handle, pytest.raises(RecordIOError) as err:
            list(iter_records(handle, len(broken)))
        assert err.value.kind == kind and f"offset {err.value.offset}" in str(err.value), kind


# ---- decoding: speed path quality, EXIF --------------------------------------------------------------------------

def _jpeg(img, quality, progressive=True) -> bytes:
    flags = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    return cv2.imencode(".jpg", img, flags)[1].tobytes()


def _imdecode(data, flag=cv2.IMREAD_COLOR):
    return cv2.imdecode(np.frombuffer(data, np.uint8), flag)


@pytest.mark.parametrize("h,w,orientation,scale,period,progressive", [
    (2704, 3000, 1, 8, 80, False),     # sides divisible by 8
    (2703, 3005, 1, 8, 80, False),     # partial last DCT blocks
    (2703, 3005, 3, 8, 80, False),     # ... turned 180 degrees by EXIF: the partial blocks end up top and left
    (2703, 3005, 6, 8, 80, True),      # ... turned 90 degrees (sides swap), progressive
    (1400, 1347, 1, 4, 80, False),
    (1400, 1347, 1, 4, 15, False),     # fine texture: 2.5 output pixels per period
    (1400, 1347, 8, 4, 15, True),      # ... progressive (low-bit scans dropped), turned by EXIF
    (700, 900, 1, 2, 80, False),
    (500, 650, 1, 1, 15, False),       # short edge < 1.5 x 2 x 224: a full decode
])
def test_reduced_dct_decode_psnr(h, w, orientation, scale, period, progressive):
    """Decoding at a reduced DCT scale, then resizing, stays >= 35 dB PSNR from a full decode + INTER_AREA (on
    textured photos, where a resize off by a fraction of a pixel, or a reduced image too close to the target,
    shows)."""
    img = fx.textured(h, w, period=period, seed=1)
    data = fx.exif_jpeg(img, orientation, progressive)
    cfg = PackConfig(resize=224, workers=1)
    assert reduction(sniff(data), 224, 1) == scale
    decoded = decode(data, "x.jpg", cfg)
    reference = _imdecode(data)
    assert decoded.full == (reference.shape[1], reference.shape[0]) and decoded.scale == scale
    out = transform(decoded, 224, False)
    rh, rw = reference.shape[:2]
    size = (rw * 224 // rh, 224) if rw >= rh else (224, rh * 224 // rw)    # im2rec's rule
    ref = cv2.resize(reference, size, interpolation=cv2.INTER_AREA)
    assert out.shape == ref.shape
    assert fx.psnr(out, ref) >= 35.0


@pytest.mark.parametrize("orientation", [1, 6])
def test_center_crop_on_a_reduced_decode_matches_full_decode(orientation):
    img = fx.textured(1500, 2300, period=40, seed=3)
    data = fx.exif_jpeg(img, orientation)
    decoded = decode(data, "x.jpg", PackConfig(resize=224, center_crop=True, workers=1))
    assert decoded.scale == 4
    reference = _imdecode(data)
    rh, rw = reference.shape[:2]
    side = min(rh, rw)
    square = reference[(rh - side) // 2:(rh - side) // 2 + side, (rw - side) // 2:(rw - side) // 2 + side]
    want = cv2.resize(square, (224, 224), interpolation=cv2.INTER_AREA)
    out = transform(decoded, 224, True)
    assert out.shape == want.shape and fx.psnr(out, want) >= 35.0


@pytest.mark.parametrize("h,w,resize", [(90, 150, 120), (150, 90, 120), (90, 150, 25)])
def test_full_scale_center_crop_is_crop_then_resize(h, w, resize):
    """At full scale nothing outside the crop is sampled: enlarging equals im2rec's crop + cv2.resize exactly,
    shrinking by more than 3x equals crop + INTER_AREA exactly."""
    img = fx.textured(h, w, period=7, seed=5)
    decoded = Decoded(img, (w, h))
    side = min(h, w)
    square = img[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    method = cv2.INTER_LINEAR if resize > side else cv2.INTER_AREA
    want = cv2.resize(square, (resize, resize), interpolation=method)
    np.testing.assert_array_equal(transform(decoded, resize, True), want)


def test_reduced_decode_keeps_a_margin_over_the_target():
    """1/2 scale only from 2 x 1.5 x the target short edge (DCT_OVERSAMPLE), never below it."""
    img = fx.photo(400, 600, seed=2)
    data = cv2.imencode(".jpg", img)[1].tobytes()
    assert reduction(sniff(data), 224, 1) == 1 and reduction(sniff(data), 134, 1) == 1
    assert reduction(sniff(data), 133, 1) == 2 and reduction(sniff(data), 66, 1) == 4
    assert reduction(sniff(data), 0, 1) == 1 and reduction(sniff(data), 100, -1) == 1


def _sof_and_dqts(data):
    segments = list(_jpeg_segments(data))
    return ([s for s in segments if s.marker == 0xC2][0], [s for s in segments if s.marker == 0xDB])


def test_low_bit_scans_are_dropped_only_where_the_bits_are_worth_little():
    img = fx.textured(600, 800, period=15, seed=4)
    progressive = _jpeg(img, 95)
    assert sniff(progressive).progressive
    lean = _without_low_bit_scans(progressive)
    assert len(lean) < 0.6 * len(progressive) and lean.endswith(b"\xff\xd9")
    # What is kept is exact. At 1/8 scale the luma is the DC coefficient alone, which is never touched:
    grey8 = cv2.IMREAD_REDUCED_GRAYSCALE_8
    np.testing.assert_array_equal(_imdecode(lean, grey8), _imdecode(progressive, grey8))
    # ... and the AC coefficients keep their scale (the renumbered scans and the multiplied steps cancel; with
    # the scans renumbered alone this falls to 27 dB). Lossy, but only by the dropped bits.
    assert 38 < fx.psnr(_imdecode(lean), _imdecode(progressive)) < 60
    coarse = _jpeg(img, 40)                                        # steps of 10+: no bit is cheap enough to drop
    assert _without_low_bit_scans(coarse) is coarse
    baseline = _jpeg(img, 95, progressive=False)
    assert _without_low_bit_scans(baseline) is baseline
    cut = progressive[:len(progressive) // 2]                   # a scan without an end: left to libjpeg to judge
    assert _without_low_bit_scans(cut) is cut
    first_scan = progressive.index(b"\xff\xda")
    short_header = progressive[:first_scan + 4] + b"\x09"        # an SOS that claims 9 components, then ends
    assert _without_low_bit_scans(short_header) is short_header


def test_low_bit_scans_survive_mangled_headers():
    """Random bytes in the marker segments, with or without a cut: the file comes back rewritten or unchanged,
    never as an exception (which the packer would report as an unexpected error instead of libjpeg's verdict)."""
    progressive = _jpeg(fx.textured(120, 160, period=15, seed=4), 95)
    headers = [i for s in _jpeg_segments(progressive) for i in range(s.start, min(s.start + 140, len(progressive)))]
    rng = random.Random(0)
    rewritten = 0
    for _ in range(3000):
        mangled = bytearray(progressive)
        for _ in range(rng.randint(1, 4)):
            mangled[rng.choice(headers)] = rng.randrange(256)
        if rng.random() < 0.2:
            mangled = mangled[:rng.randrange(len(mangled))]
        mangled = bytes(mangled)
        rewritten += _without_low_bit_scans(mangled) is not mangled
    assert 1000 < rewritten < 3000                                   # both paths were taken
    # A one-component scan refining bit 2 -> 1 (SOS: marker, length, Ns, Cs/Td-Ta, Ss, Se, Ah/Al at +9) made to
    # jump from bit 2 straight to bit 0, which T.81 does not allow.
    step = [s.start + 9 for s in _jpeg_segments(progressive)
            if s.marker == 0xDA and progressive[s.start + 4] == 1 and progressive[s.start + 9] == 0x21][0]
    bad_step = progressive[:step] + b"\x20" + progressive[step + 1:]
    assert _without_low_bit_scans(bad_step) is bad_step


def test_low_bit_scans_with_wide_steps_or_a_shared_table():
    img = fx.textured(600, 800, period=15, seed=4)
    progressive = _jpeg(img, 95)
    _, dqts = _sof_and_dqts(progressive)
    # A luma table whose fine steps, multiplied by 4, outgrow 8 bits: it is rewritten with 16-bit steps.
    luma = dqts[0]
    steps = list(progressive[luma.start + 5:luma.start + 69])
    steps[1] = steps[2] = 2
    steps[62], steps[63] = 150, 200
    custom = (progressive[:luma.start] + b"\xff\xdb\x00\x43\x00" + bytes(steps)
              + progressive[luma.start + 2 + luma.length:])
    lean = _without_low_bit_scans(custom)
    assert [lean[s.start + 4] >> 4 for s in _sof_and_dqts(lean)[1]] == [1, 0]
    grey8 = cv2.IMREAD_REDUCED_GRAYSCALE_8
    np.testing.assert_array_equal(_imdecode(lean, grey8), _imdecode(custom, grey8))
    assert 38 < fx.psnr(_imdecode(lean), _imdecode(custom)) < 60
    # Luma moved onto the chroma table: luma would drop 2 bits, chroma 1, and one table cannot be multiplied
    # both ways, so the file is left exact.
    fine = _jpeg(img, 97)
    sof, _ = _sof_and_dqts(fine)
    assert fine[sof.start + 10:sof.start + 13] == b"\x01\x22\x00"          # component 1, 2x2 sampling, table 0
    shared = fine[:sof.start + 12] + b"\x01" + fine[sof.start + 13:]
    assert _without_low_bit_scans(fine) is not fine and _without_low_bit_scans(shared) is shared


def test_exif_orientation_is_applied(tmp_path):
    img = fx.coded(60, 100, 1, 1)
    img[:10, :10] = 255                                            # a white top-left corner to track
    path = tmp_path / "rot.jpg"
    path.write_bytes(fx.exif_jpeg(img, 6))                          # 6: rotate 90 degrees clockwise to view
    want = cv2.imread(str(path))                                    # OpenCV (and so im2rec) applies EXIF
    assert want.shape[:2] == (100, 60)
    for resize in (0, 30):
        out = cv2.imdecode(np.frombuffer(load_image_bytes(str(path), PackConfig(resize=resize)), np.uint8), 1)
        expect = want if not resize else cv2.resize(want, (30, 50), interpolation=cv2.INTER_AREA)
        assert out.shape == expect.shape and fx.psnr(out, expect) > 30
        assert out[:2, -2:].mean() > 200 and out[:2, :2].mean() < 200       # corner now top-right


# ---- the bad-image corpus ---------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every kind of file the issue names. Returns (root, {name: expectation}) where expectation is either
    ('ok', check(img)) or ('fail', words the reason must contain)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("corpus") / "odd images"
    root.mkdir()
    base = fx.photo(90, 120, seed=3)
    rgb = base[:, :, ::-1]
    exp = {}

    def close_to(ref, tol=28.0):
        return lambda img: img.shape == ref.shape and fx.psnr(img, ref) > tol

    cv2.imwrite(str(root / "baseline.jpg"), base, [cv2.IMWRITE_JPEG_QUALITY, 95])
    exp["baseline.jpg"] = ("ok", close_to(base))
    cv2.imwrite(str(root / "progressive.jpg"), base, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    exp["progressive.jpg"] = ("ok", close_to(base))
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    exp["cmyk.jpg"] = ("ok", close_to(base, 25))
    grey = cv2.cvtColor(base, cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(root / "grey.png"), grey)
    exp["grey.png"] = ("ok", close_to(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)))
    bgra = np.dstack([base, np.linspace(0, 255, 120, dtype=np.uint8)[None, :].repeat(90, 0)])
    cv2.imwrite(str(root / "alpha.png"), bgra)
    exp["alpha.png"] = ("ok", close_to(base))
    cv2.imwrite(str(root / "deep16.png"), base.astype(np.uint16) * 257)
    exp["deep16.png"] = ("ok", close_to(base))
    frames = [Image.fromarray(rgb).quantize(64), Image.fromarray(255 - rgb).quantize(64)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    first = np.asarray(frames[0].convert("RGB"))[:, :, ::-1]
    exp["anim.gif"] = ("ok", close_to(np.ascontiguousarray(first)))
    cv2.imwrite(str(root / "bitmap.bmp"), base)
    exp["bitmap.bmp"] = ("ok", close_to(base))
    cv2.imwrite(str(root / "web.webp"), base, [cv2.IMWRITE_WEBP_QUALITY, 100])
    exp["web.webp"] = ("ok", close_to(base))
    cv2.imwrite(str(root / "ünïcödé name 猫.jpg"), base)
    exp["ünïcödé name 猫.jpg"] = ("ok", close_to(base))
    big = cv2.resize(base, (6000, 4500), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(root / "large.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    exp["large.jpg"] = ("ok", close_to(cv2.resize(big, (120, 90), interpolation=cv2.INTER_AREA), 30))
    (root / "rotated.jpg").write_bytes(fx.exif_jpeg(base, 8))          # 8: rotate 90 counter-clockwise
    exp["rotated.jpg"] = ("ok", close_to(cv2.rotate(base, cv2.ROTATE_90_COUNTERCLOCKWISE)))

    (root / "empty.jpg").write_bytes(b"")
    exp["empty.jpg"] = ("fail", "empty file")
    data = (root / "baseline.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    exp["truncated.jpg"] = ("fail", "truncated JPEG")
    png = cv2.imencode(".png", base)[1].tobytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    exp["truncated.png"] = ("fail", "PNG")
    (root / "notes.png").write_text("this is not an image\n")
    exp["notes.png"] = ("fail", "not an image")
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) +
                                    _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _png_chunk(b"IEND", b""))
    exp["bomb.png"] = ("fail", "decompression-bomb guard")
    (root / "folder.jpg").mkdir()
    exp["folder.jpg"] = ("fail", "folder")
    lines = [f"{i}\t{i % 2:f}\t{name}\n" for i, name in enumerate(sorted(exp))]
    lines.append(f"{len(exp)}\t0.000000\tvanished.jpg\n")
    exp["vanished.jpg"] = ("fail", "file not found")
    (root.parent / "c.lst").write_text("".join(lines), encoding="utf-8")
    return root, exp


@pytest.mark.slow
def test_bad_image_corpus_is_reported_not_lost(corpus):
    root, exp = corpus
    lst = root.parent / "c.lst"
    # --resize 90 keeps the 120x90 images as they are and shrinks large.jpg (through the reduced decode).
    proc = fx.run_recbuild("--resize", "90", "--num-thread", "2", str(root.parent / "c"), str(root))
    entries = {e.path: e for e in read_list(str(lst))}
    records, keys = _records(root.parent / "c")
    errors = (root.parent / "c.errors.tsv").read_text(encoding="utf-8").splitlines()
    assert errors[0] == "index\tpath\treason"
    reasons = {line.split("\t")[1]: line.split("\t")[2] for line in errors[1:]}
    for name, (kind, check) in exp.items():
        e = entries[name]
        if kind == "ok":
            assert name not in reasons, (name, reasons.get(name))
            header, body = records[e.index]
            img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
            assert header.label == e.labels[0] and check(img), name
        else:
            assert e.index not in records, name
            assert check in reasons[name], (name, reasons[name])
    n_ok = sum(1 for k, _ in exp.values() if k == "ok")
    assert len(keys) == n_ok and len(reasons) == len(exp) - n_ok
    assert f"packed {n_ok} of {len(exp)} images" in proc.stdout and "c.errors.tsv" in proc.stdout

    strict = fx.run_recbuild("--strict", "--resize", "90", "--num-thread", "1", str(root.parent / "c"), str(root),
                             check=False)
    assert strict.returncode == 1 and "--strict" in strict.stderr
    assert (root.parent / "c.rec").is_file()                        # the good records are still written

    ver = fx.run_recbuild("verify", "--no-progress", str(root.parent / "c.rec"), check=False)
    assert ver.returncode == 0, ver.stderr                          # failures are reported, not corruption


def test_color_flags(corpus):
    root, _ = corpus
    grey = load_image_bytes(str(root / "baseline.jpg"), PackConfig(color=0, resize=45))
    assert cv2.imdecode(np.frombuffer(grey, np.uint8), cv2.IMREAD_UNCHANGED).shape == (45, 60)
    alpha = load_image_bytes(str(root / "alpha.png"), PackConfig(color=-1, encoding=".png", quality=3))
    assert cv2.imdecode(np.frombuffer(alpha, np.uint8), cv2.IMREAD_UNCHANGED).shape == (90, 120, 4)
    deep = load_image_bytes(str(root / "deep16.png"), PackConfig(color=-1, encoding=".png", quality=3))
    assert cv2.imdecode(np.frombuffer(deep, np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    deep_jpg = load_image_bytes(str(root / "deep16.png"), PackConfig(color=-1))
    assert cv2.imdecode(np.frombuffer(deep_jpg, np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint8


# ---- interruption and verify -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_killed_pack_leaves_nothing_complete_and_rerun_finishes(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    for i in range(160):
        cv2.imwrite(str(root / f"{i:03d}.jpg"), fx.photo(480, 640, seed=i % 7), [cv2.IMWRITE_JPEG_QUALITY, 90])
    fx.run_recbuild("--list", str(tmp_path / "k"), str(root))
    repo = Path(fx.__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "recbuild", "--num-thread", "2", "--no-progress", str(tmp_path / "k"), str(root)]
    proc = subprocess.Popen(cmd, cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    part = None
    while time.time() < deadline and proc.poll() is None:
        parts = list(tmp_path.glob(".k.rec.*.part"))
        if parts and parts[0].stat().st_size > 50_000:
            part = parts[0]
            break
        time.sleep(0.02)
    assert part is not None, "the pack finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "k.rec").exists() and not (tmp_path / "k.idx").exists()
    assert list(tmp_path.glob(".k.rec.*.part"))                     # the leftover a re-run must clean

    fx.run_recbuild("--num-thread", "2", str(tmp_path / "k"), str(root))
    assert not list(tmp_path.glob(".k.*.part"))
    records, keys = _records(tmp_path / "k")
    assert keys == [e.index for e in read_list(str(tmp_path / "k.lst"))] and len(keys) == 160
    ver = fx.run_recbuild("verify", "--no-progress", str(tmp_path / "k.rec"))
    assert "OK" in ver.stdout


def _session_processes(sid: int):
    """Pids of the processes still in session `sid` (the packer was started as its leader)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_kill_9_of_the_parent_leaves_no_worker_behind(tmp_path, method):
    """kill -9 of the packer alone (what the OOM killer does): its workers, and a forkserver, go too."""
    root = tmp_path / "img"
    root.mkdir()
    for i in range(120):
        cv2.imwrite(str(root / f"{i:03d}.jpg"), fx.photo(480, 640, seed=i % 7), [cv2.IMWRITE_JPEG_QUALITY, 90])
    fx.run_recbuild("--list", str(tmp_path / "k"), str(root))
    repo = Path(fx.__file__).resolve().parents[1]
    env = fx.hooked_env(tmp_path / "hook", method=method)
    cmd = [sys.executable, "-m", "recbuild", "--num-thread", "2", "--no-progress", str(tmp_path / "k"), str(root)]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        parts = list(tmp_path.glob(".k.rec.*.part"))
        if parts and parts[0].stat().st_size > 50_000 and len(_session_processes(proc.pid)) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the pack finished before it could be killed"
    assert len(_session_processes(proc.pid)) >= 3                   # the packer and its two workers at least
    os.kill(proc.pid, signal.SIGKILL)                               # the parent only
    proc.wait()
    deadline = time.time() + 15
    while _session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    left = _session_processes(proc.pid)
    for pid in left:                                                # do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left 15 s after kill -9 of the packer: {left}"
    fx.run_recbuild("--num-thread", "2", "--no-progress", str(tmp_path / "k"), str(root))
    assert not list(tmp_path.glob(".k.*.part"))
    _, keys = _records(tmp_path / "k")
    assert keys == [e.index for e in read_list(str(tmp_path / "k.lst"))]


def _corrupt(kind: str, rec: Path, idx: Path):
    """Damage a copy of a packed set one way. Returns the (problem kind, .idx key) pairs verify must report."""
    data = bytearray(rec.read_bytes())
    lines = idx.read_text().splitlines()
    keys = [int(line.split("\t")[0]) for line in lines]
    offsets = [int(line.split("\t")[1]) for line in lines]
    if kind == "truncated":
        rec.write_bytes(bytes(data[: len(data) - 100]))
        return [("cut-short", keys[-1])]
    if kind == "cut by one byte":
        rec.write_bytes(bytes(data[:-1]))
        return [("size", None), ("cut-short", keys[-1])]
    if kind == "bad magic":
        data[offsets[2]] ^= 0xFF
        rec.write_bytes(bytes(data))
        return [("framing", keys[2])]
    if kind == "garbage image":
        start = offsets[1] + 8 + 24
        data[start:start + 64] = b"\0" * 64                        # the JPEG SOI and headers
        rec.write_bytes(bytes(data))
        return [("decode", keys[1])]
    if kind == "flipped payload":
        length = struct.unpack("<I", data[offsets[3] + 4:offsets[3] + 8])[0] & ((1 << 29) - 1)
        middle = offsets[3] + 8 + 24 + (length - 24) // 2          # inside the JPEG's entropy-coded data
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        rec.write_bytes(bytes(data))
        return [("decode", keys[3])]                                # libjpeg gives up on this one
    if kind == "marker in scan data":
        length = struct.unpack("<I", data[offsets[3] + 4:offsets[3] + 8])[0] & ((1 << 29) - 1)
        body = bytes(data[offsets[3] + 8 + 24:offsets[3] + 8 + length])
        middle = offsets[3] + 8 + 24 + (body.find(b"\xff\xda") + len(body)) // 2
        data[middle:middle + 2] = b"\xff\xd9"                     # an end-of-image marker half-way through the scan
        rec.write_bytes(bytes(data))
        return [("decoder-warning", keys[3])]                       # pixels come back, with a libjpeg warning
    if kind == "one bit in the JFIF header":
        data[offsets[6] + 8 + 24 + 15] ^= 0x01                     # the X density: decodes the same, no warning
        rec.write_bytes(bytes(data))
        return [("checksum", keys[6])]                              # only the packer's CRC32 sees it
    if kind == "header id":
        data[offsets[4] + 8 + 8:offsets[4] + 8 + 16] = struct.pack("<Q", 999)
        rec.write_bytes(bytes(data))
        return [("header-id", keys[4])]
    if kind == "label":
        data[offsets[5] + 8 + 4:offsets[5] + 8 + 8] = struct.pack("<f", 7.0)
        rec.write_bytes(bytes(data))
        return [("label", keys[5])]
    if kind == "idx line missing":
        idx.write_text("\n".join(lines[1:]) + "\n")
        return [("not-indexed", keys[0])]
    if kind == "idx extra line":
        idx.write_text("\n".join(lines + [f"999\t{offsets[3]}"]) + "\n")
        return [("idx-duplicate-offset", 999)]
    if kind == "idx duplicate key":
        lines[2] = f"{keys[1]}\t{offsets[2]}"
        idx.write_text("\n".join(lines) + "\n")
        return [("idx-duplicate-key", keys[1])]
    if kind == "idx out of order":
        lines[3], lines[4] = lines[4], lines[3]
        idx.write_text("\n".join(lines) + "\n")
        return [("idx-order", keys[3])]
    if kind == "idx wrong offset":
        lines[1] = f"{keys[1]}\t{offsets[1] + 4}"
        idx.write_text("\n".join(lines) + "\n")
        return [("idx-not-record", keys[1])]
    if kind == "idx past the end":
        lines[1] = f"{keys[1]}\t{len(data) + 64}"
        idx.write_text("\n".join(lines) + "\n")
        return [("idx-not-record", keys[1]), ("not-indexed", keys[1])]
    if kind == "list lines swapped":
        lst = rec.with_suffix(".lst")
        rows = lst.read_text().splitlines(keepends=True)
        rows[3], rows[4] = rows[4], rows[3]
        lst.write_text("".join(rows))
        return [("list-order", keys[4])]
    assert kind == "idx deleted"
    idx.unlink()
    return [("missing-file", None)]


_DAMAGE = ["truncated", "cut by one byte", "bad magic", "garbage image", "flipped payload", "marker in scan data",
           "one bit in the JFIF header",
           "header id", "label",
           "idx line missing", "idx extra line", "idx duplicate key", "idx out of order", "idx wrong offset",
           "idx past the end", "list lines swapped", "idx deleted"]


@pytest.mark.parametrize("kind", _DAMAGE)
def test_verify_names_each_kind_of_damage_and_its_record(packed, tmp_path, kind):
    """Each damage is reported as exactly the expected problem(s), naming the record's .idx key, and the records
    around it still count as readable (one bad magic is one problem, not one per later record)."""
    src, _, _ = packed
    for ext in (".rec", ".idx", ".lst", ".pack.json", ".crc32"):
        shutil.copy(src / f"set_train{ext}", tmp_path / f"t{ext}")
    from recbuild.integrity import verify_rec
    clean = verify_rec(tmp_path / "t.rec", progress=False)
    assert clean.ok and clean.records == 13 and clean.readable == 13 and sum(clean.per_class.values()) == 13
    expected = _corrupt(kind, tmp_path / "t.rec", tmp_path / "t.idx")
    res = verify_rec(tmp_path / "t.rec", progress=False)
    got = [(p.kind, p.key) for p in res.problems]
    assert got == expected, [p.message for p in res.problems]
    assert all("\n" not in p.message for p in res.problems)
    listed = {e.index: e for e in read_list(tmp_path / "t.lst")}
    for problem in res.problems:
        if problem.key in listed:
            assert f"key {problem.key}" in problem.message and listed[problem.key].path in problem.message
    if kind in ("bad magic", "garbage image", "flipped payload", "marker in scan data", "header id", "label",
                "one bit in the JFIF header"):
        assert res.readable == 12                                   # only the damaged record is lost
    quick = verify_rec(tmp_path / "t.rec", progress=False, quick=True)
    payload_kinds = {"decode", "decoder-warning", "header-id", "label", "checksum"}
    assert [(p.kind, p.key) for p in quick.problems] == [e for e in expected if e[0] not in payload_kinds]


def test_verify_a_bad_magic_in_a_big_set_is_one_problem(tmp_path):
    """2000 records, record 0's magic flipped: one problem; mx.recordio still reads the 1999 others by index."""
    rec_path, idx_path = tmp_path / "big.rec", tmp_path / "big.idx"
    writer = mx.recordio.MXIndexedRecordIO(str(idx_path), str(rec_path), "w")
    jpeg = cv2.imencode(".jpg", fx.coded(8, 8, 0, 0))[1].tobytes()
    for i in range(2000):
        writer.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, float(i % 3), i, 0), jpeg))
    writer.close()
    data = bytearray(rec_path.read_bytes())
    data[0] ^= 0x01
    rec_path.write_bytes(bytes(data))
    from recbuild.integrity import verify_rec
    res = verify_rec(rec_path, progress=False)
    assert [(p.kind, p.key) for p in res.problems] == [("framing", 0)] and res.readable == 1999
    reader = mx.recordio.MXIndexedRecordIO(str(idx_path), str(rec_path), "r")
    assert sum(1 for i in range(1, 2000) if mx.recordio.unpack(reader.read_idx(i))[0].id == i) == 1999


def test_verify_refuses_an_idx_or_lst_and_names_the_rec(packed, tmp_path):
    src, _, _ = packed
    for ext in (".idx", ".lst"):
        proc = fx.run_recbuild("verify", "--no-progress", str(src / f"set_train{ext}"), check=False)
        assert proc.returncode == 1 and f"pass {src / 'set_train.rec'}" in proc.stderr


def test_verify_cli_exit_status_and_class_counts(packed, tmp_path):
    src, _, _ = packed
    ok = fx.run_recbuild("verify", "--no-progress", str(src / "set_train.rec"))
    assert "OK" in ok.stdout and "(cat)" in ok.stdout and "(eel)" in ok.stdout
    shutil.copy(src / "set_train.rec", tmp_path / "b.rec")
    shutil.copy(src / "set_train.idx", tmp_path / "b.idx")
    with open(tmp_path / "b.rec", "r+b") as f:
        f.truncate(f.seek(0, 2) - 10)
    bad = fx.run_recbuild("verify", "--no-progress", str(tmp_path / "b.rec"), check=False)
    assert bad.returncode == 1 and "CORRUPT" in bad.stderr


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_worker_crash_is_pinned_on_its_image(tmp_path, method):
    """A decoder that kills its worker process costs that image only: it is reported, the rest is packed, whether
    the workers were forked from the packer or from a forkserver (the start method when mxnet is loaded)."""
    root = tmp_path / "img"
    root.mkdir()
    names = [f"{i:02d}{'boom' if i in (5, 17) else ''}.jpg" for i in range(30)]
    for i, name in enumerate(names):
        cv2.imwrite(str(root / name), fx.coded(20, 20, 0, i))
    fx.run_recbuild("--list", "--no-shuffle", str(tmp_path / "c"), str(root))
    repo = Path(fx.__file__).resolve().parents[1]
    env = fx.hooked_env(tmp_path / "hook", method=method, crash_on="boom")
    proc = subprocess.Popen([sys.executable, "-m", "recbuild", "--num-thread", "2", "--no-progress",
                             str(tmp_path / "c"), str(root)], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    parents = set((tmp_path / "hook" / "crash-parents").read_text().split())
    assert len(parents) >= 1 and (parents == {str(proc.pid)}) == (method == "fork"), (parents, proc.pid)
    records, keys = _records(tmp_path / "c")
    assert keys == [i for i in range(30) if i not in (5, 17)]
    errors = (tmp_path / "c.errors.tsv").read_text().splitlines()[1:]
    assert [line.split("\t")[:2] for line in errors] == [["5", "05boom.jpg"], ["17", "17boom.jpg"]]
    assert all("crashed its worker" in line for line in errors)


# ---- corrupt source data, EXIF under --color -1 -------------------------------------------------------------------

def _scan_with_marker(img: np.ndarray) -> bytes:
    """A JPEG with an end-of-image marker half-way through its scan: libjpeg returns pixels (the rest grey) and
    only prints 'Corrupt JPEG data: premature end of data segment'."""
    data = bytearray(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    middle = (data.find(b"\xff\xda") + len(data)) // 2
    data[middle:middle + 2] = b"\xff\xd9"
    return bytes(data)


@pytest.mark.parametrize("pass_through", [False, True])
def test_corrupt_source_data_is_a_reported_failure(tmp_path, pass_through):
    root = tmp_path / "img"
    root.mkdir()
    for i in range(6):
        cv2.imwrite(str(root / f"ok{i}.jpg"), fx.photo(60, 80, seed=i))
    (root / "scan.jpg").write_bytes(_scan_with_marker(fx.photo(60, 80, seed=9)))
    assert cv2.imread(str(root / "scan.jpg")) is not None          # OpenCV alone accepts it
    fx.run_recbuild("--list", "--no-shuffle", str(tmp_path / "s"), str(root))
    flags = ["--pass-through"] if pass_through else ["--resize", "40"]
    proc = fx.run_recbuild(*flags, "--num-thread", "2", "--no-progress", str(tmp_path / "s"), str(root))
    rows = [line.split("\t") for line in (tmp_path / "s.errors.tsv").read_text().splitlines()[1:]]
    assert [r[1] for r in rows] == ["scan.jpg"] and "Corrupt JPEG data" in rows[0][2], rows
    assert "packed 6 of 7 images" in proc.stdout and "1 image(s) could not be packed" in proc.stdout
    records, keys = _records(tmp_path / "s")
    assert len(keys) == 6                                           # the intact files are unaffected
    strict = fx.run_recbuild(*flags, "--strict", "--num-thread", "1", "--no-progress", str(tmp_path / "s"), str(root),
                             check=False)
    assert strict.returncode == 1 and "--strict" in strict.stderr


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applies_with_color_unchanged(tmp_path, orientation):
    """--color -1 turns a JPEG (APP1) or PNG (eXIf) the way --color 1 does (OpenCV applies EXIF there)."""
    img = fx.coded(30, 50, 1, 2)
    img[:6, :6] = 255
    jpeg = tmp_path / "o.jpg"
    jpeg.write_bytes(fx.exif_jpeg(img, orientation))
    png_data = cv2.imencode(".png", img)[1].tobytes()
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + b"\0" * 4
    png = tmp_path / "o.png"
    png.write_bytes(png_data[:33] + _png_chunk(b"eXIf", tiff) + png_data[33:])
    for path in (jpeg, png):
        unchanged = load_image_bytes(str(path), PackConfig(color=-1, encoding=".png"))
        colour = load_image_bytes(str(path), PackConfig(color=1, encoding=".png"))
        a, b = (cv2.imdecode(np.frombuffer(x, np.uint8), cv2.IMREAD_UNCHANGED) for x in (unchanged, colour))
        assert a.shape == b.shape == cv2.imread(str(path)).shape and np.array_equal(a, b), (path.name, orientation)


# ---- the pack sidecar --------------------------------------------------------------------------------------------

def test_pack_sidecar_counts_match_mx_recordio(packed, tmp_path):
    from recbuild.packinfo import PackInfoError, pack_info_path, read_pack_info
    src, _, _ = packed
    for split in ("train", "val"):
        rec = src / f"set_{split}.rec"
        info = read_pack_info(rec)
        records, keys = _records(src / f"set_{split}")
        labels = [int(records[k][0].label) for k in keys]
        assert info.records == len(keys) and info.label_width == 1 and info.matches_rec
        assert info.class_counts == np.bincount(labels, minlength=3).tolist()[:max(labels) + 1]
        assert info.rec_bytes == rec.stat().st_size and info.data["rec"] == rec.name
        assert info.transform == {"resize": 32, "center_crop": True, "color": 1, "encoding": ".jpg", "quality": 95,
                                  "pass_through": False}
        assert json.loads(pack_info_path(rec).read_text())["format"] == "mxtransfer.pack/1"
    from recbuild.recordio import read_checksums
    sums = read_checksums(src / "set_train.rec")
    reader = mx.recordio.MXIndexedRecordIO(str(src / "set_train.idx"), str(src / "set_train.rec"), "r")
    assert sums == {k: zlib.crc32(reader.read_idx(k)) for k in reader.keys}
    assert read_pack_info(src / "set_train.rec").data["payload_crc32"] == "set_train.crc32"
    shutil.copy(src / "set_train.rec", tmp_path / "c.rec")
    shutil.copy(pack_info_path(src / "set_train.rec"), pack_info_path(tmp_path / "c.rec"))
    assert read_pack_info(tmp_path / "c.rec").matches_rec
    with open(tmp_path / "c.rec", "ab") as f:
        f.write(b"\0" * 4)
    assert not read_pack_info(tmp_path / "c.rec").matches_rec          # the .rec changed since it was written
    assert read_pack_info(tmp_path / "none.rec") is None               # im2rec's files have none
    pack_info_path(tmp_path / "c.rec").write_text('{"format": "mxtransfer.pack/1", "records": "9"}')
    with pytest.raises(PackInfoError, match=r"c\.pack\.json: 'rec' must be str"):
        read_pack_info(tmp_path / "c.rec")
    pack_info_path(tmp_path / "c.rec").write_text("{")
    with pytest.raises(PackInfoError, match=r"c\.pack\.json: not a readable pack sidecar"):
        read_pack_info(tmp_path / "c.rec")


def test_pack_sidecar_multi_label_and_non_integer_labels(tmp_path):
    from recbuild.packinfo import read_pack_info
    root = tmp_path / "img"
    root.mkdir()
    for i in range(5):
        cv2.imwrite(str(root / f"{i}.png"), fx.coded(10, 12, 0, i))
    (tmp_path / "m.lst").write_text("".join(f"{i}\t{i % 2:f}\t{i * 0.1:f}\t{i}.png\n" for i in range(5)))
    (tmp_path / "f.lst").write_text("".join(f"{i}\t{i * 0.1:f}\t{i}.png\n" for i in range(5)))
    fx.run_recbuild("--pack-label", "--pass-through", "--num-thread", "1", "--no-progress", str(tmp_path / "m"),
                    str(root))
    fx.run_recbuild("--encoding", ".png", "--color", "-1", "--num-thread", "1", "--no-progress",
                    str(tmp_path / "f"), str(root))
    multi = read_pack_info(tmp_path / "m.rec")
    reader = mx.recordio.MXIndexedRecordIO(str(tmp_path / "m.idx"), str(tmp_path / "m.rec"), "r")
    header = mx.recordio.unpack(reader.read_idx(3))[0]
    assert multi.label_width == header.flag == 2 and multi.class_counts == [3, 2] and multi.records == 5
    assert multi.transform["pass_through"] is True
    frac = read_pack_info(tmp_path / "f.rec")
    assert frac.class_counts is None and frac.transform["color"] == -1 and frac.transform["encoding"] == ".png"
    from recbuild.integrity import verify_rec
    for name in ("m", "f"):                 # labels like 0.1 are stored as float32 and still match the list
        res = verify_rec(tmp_path / f"{name}.rec", progress=False)
        assert res.ok and res.readable == 5, [p.message for p in res.problems]


@pytest.mark.parametrize("args", [("--resize", "40"), ("--color", "0", "--quality", "80"), ("--encoding", ".png"),
                                  ("--pass-through",)], ids=["jpg", "grey-q80", "png", "pass-through"])
def test_pack_time_fingerprints_describe_the_records(tmp_path, args):
    """--report: NAME.fingerprints.npy has one row per record in .idx order, keyed and placed as mx.recordio
    reads them, with the record's label, byte digest and decoded size; its hash and thumbnail are those of the
    decoded record exactly for lossless records, and within the JPEG re-encode's tolerance otherwise: thumbnails
    within 0.5 grey levels (the report's limit is 6) and, for photo-like images, hashes within 2 bits of 64 (the
    report's limit is 8; measured on bench.pack's 200 photos: 194 equal, 6 at 2 bits). The flat synthetic
    images of make_tree move by up to 9 bits (coefficients tied at the median flip), so only their pairs are
    compared: the same as the standalone report's."""
    import hashlib
    from recbuild.fingerprints import fingerprint, fingerprints_path, pixel_digest
    from recbuild.packinfo import read_pack_info
    fx.make_tree(tmp_path / "img", per_class=3, sizes=[(48, 64), (70, 40)])
    for k, name in enumerate(("cat", "dog", "eel")):
        cv2.imwrite(str(tmp_path / "img" / name / f"photo{k}.jpg"), fx.photo(90 + 20 * k, 120, seed=3 + k))
    fx.run_recbuild("--list", "--recursive", str(tmp_path / "set"), str(tmp_path / "img"))
    proc = fx.run_recbuild(*args, "--report", "--num-thread", "2", "--no-progress", str(tmp_path / "set"),
                           str(tmp_path / "img"))
    from recbuild.report import build_report
    at_pack, _ = build_report(str(tmp_path / "set"))
    decoded, _ = build_report(str(tmp_path / "set"), use_stored=False)
    assert set(at_pack["sources"].values()) == {"pack-time fingerprints"}
    assert f"{at_pack['pairs_total']} duplicate pair(s)" in proc.stdout
    assert [(p.a, p.b, p.kind) for p in at_pack["pairs"]] == [(p.a, p.b, p.kind) for p in decoded["pairs"]]
    info = read_pack_info(tmp_path / "set.rec")
    assert info.fingerprints == "set.fingerprints.npy" and info.data["fingerprints"]["format"] == \
        "mxtransfer.fingerprints/1"
    rows = np.load(fingerprints_path(tmp_path / "set.rec"))
    reader = mx.recordio.MXIndexedRecordIO(str(tmp_path / "set.idx"), str(tmp_path / "set.rec"), "r")
    assert rows["id"].tolist() == list(reader.keys) and len(rows) == info.records == 12
    paths = {e.index: e.path for e in read_list(str(tmp_path / "set.lst"))}
    lossless = "--encoding" in args or "--pass-through" in args
    for row in rows:
        key = int(row["id"])
        assert int(row["offset"]) == reader.idx[key]
        header, body = mx.recordio.unpack(reader.read_idx(key))
        assert row["label"] == header.label and bytes(row["byte_sha"]).ljust(20, b"\0") == \
            hashlib.sha1(body).digest()
        img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
        assert (row["decoded"], row["width"], row["height"], row["channels"]) == \
            (1, img.shape[1], img.shape[0], 1 if img.ndim == 2 else img.shape[2])
        hash64, thumb = fingerprint(img)
        bits = bin(int(row["phash"]) ^ hash64).count("1")
        mad = float(np.abs(row["thumb"].astype(np.float32) - thumb).mean())
        if lossless:
            assert bits == 0 and mad == 0
        else:
            assert mad <= 0.5 and (bits <= 2 or "photo" not in paths[key])
        pixel_sha = bytes(row["pixel_sha"])
        assert pixel_sha.ljust(20, b"\0").hex() == pixel_digest(img) if "--pass-through" in args else not pixel_sha
    reader.close()


# ---- the worker pool never waits on nothing ------------------------------------------------------------------------
_POOL_SCRIPT = """
import multiprocessing as mp, sys
from recbuild.workers import run_tasks
def init(): pass
def work(x): return x * 2
def crash(task): raise AssertionError("no worker should die")
if __name__ == "__main__":
    ctx = mp.get_context(sys.argv[1])
    for workers, in_flight in ((1, 2), (2, 1), (2, 3)):
        out = list(run_tasks(list(range(300)), work, workers, ctx, init, (), in_flight, crash))
        assert out == [2 * i for i in range(300)], (workers, in_flight)
    print("ok")
"""


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_worker_pool_finishes_when_every_answer_arrives_at_once(tmp_path, method):
    """Instant tasks: a worker answers everything it holds before the packer looks again. The pool used to refill
    before moving its window, found nothing to hand out and waited on no worker at all, forever (a 60,000-image
    pack hung so)."""
    script = tmp_path / "pool.py"
    script.write_text(_POOL_SCRIPT)
    done = subprocess.run([sys.executable, str(script), method], cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
