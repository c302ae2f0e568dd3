"""recbuild lists: byte equality with the wheel's im2rec.py, and the list features im2rec lacks."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import pytest

from recbuild.classmap import find_class_map, read_class_map
from recbuild.config import ListConfig
from recbuild.listing import ListError, make_lists, read_list
from tests import _recbuild_fixtures as fx


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """An awkward tree: nested classes, images in the root itself, an empty class folder, upper-case and
    non-image suffixes, non-ASCII names, spaces, 37 images so chunks and ratios do not divide evenly."""
    root = tmp_path_factory.mktemp("tree") / "images"
    img = fx.coded(8, 8, 0, 0)
    names = ["zeta/a.jpg", "zeta/b.png", "Alpha/x y.jpeg", "Alpha/é.jpg", "Alpha/sub/deep.jpg", "beta/1.JPG",
             "beta/2.jpg", "beta/notes.txt", "root1.jpg", "root2.png", "empty/.keep", "mid/über 3.png"]
    names += [f"many/{i:02d}.jpg" for i in range(25)]
    names += ["beta/c.gif"]
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith((".jpg", ".jpeg", ".png", ".JPG")):
            cv2.imwrite(str(path.with_suffix(".png")) if name.endswith(".JPG") else str(path), img)
            if name.endswith(".JPG"):
                path.with_suffix(".png").rename(path)
        else:
            path.write_text("x")
    return root


FLAG_SETS = [
    ["--recursive"],
    ["--recursive", "--train-ratio", "0.7", "--test-ratio", "0.1"],
    ["--recursive", "--train-ratio", "0.6", "--test-ratio", "0.3", "--chunks", "3"],
    ["--recursive", "--no-shuffle", "--train-ratio", "0.5", "--exts", ".jpg", ".gif"],
    ["--train-ratio", "0.8"],                                  # non-recursive: root files only, label 0
    ["--recursive", "--train-ratio", "0.7", "--test-ratio", "0.3", "--chunks", "4"],   # no val (0.7+0.3 == 1)
    ["--recursive", "--train-ratio", "0.9", "--test-ratio", "0.2", "--no-shuffle"],    # sum > 1: warned
    ["--recursive", "--train-ratio", "1.0", "--test-ratio", "0.2", "--chunks", "2"],   # 1.0 ignores test
]


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: " ".join(f))
def test_lists_byte_identical_to_im2rec(tree, tmp_path, flags):
    (tmp_path / "ref").mkdir()
    (tmp_path / "ours").mkdir()
    # Positionals first: --exts takes every following word, in both programs.
    fx.run_im2rec("--list", "ref/set", str(tree), *flags, cwd=tmp_path)
    fx.run_recbuild("--list", str(tmp_path / "ours" / "set"), str(tree), *flags)
    ref = sorted(p.name for p in (tmp_path / "ref").glob("*.lst"))
    ours = sorted(p.name for p in (tmp_path / "ours").glob("*.lst"))
    assert ref and ours == ref
    for name in ref:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    total = sum(len(read_list(str(tmp_path / "ours" / n))) for n in ours)
    assert total > 0


@pytest.mark.parametrize("words", [["--exts=['.jpg','.png']"], ["--exts", "['.jpg', '.png']"], ["--exts=.jpg,.png"]])
def test_the_python_list_form_of_exts_lists_what_the_spaced_form_does(tree, tmp_path, words):
    """`--exts=['.jpg','.png']` (an old blog post's form; one word to argparse, one suffix matching nothing to
    im2rec.py) lists exactly what im2rec.py lists for `--exts .jpg .png`."""
    fx.run_im2rec("--list", "ref", str(tree), "--recursive", "--exts", ".jpg", ".png", cwd=tmp_path)
    fx.run_recbuild("--list", "--recursive", str(tmp_path / "ours"), str(tree), *words)
    assert len(read_list(str(tmp_path / "ref.lst"))) == 34  # every .jpg/.png of the tree, .JPG included
    assert (tmp_path / "ours.lst").read_bytes() == (tmp_path / "ref.lst").read_bytes()


@pytest.mark.parametrize("word", [".JPG", "jpg", "[]"])
def test_a_suffix_that_can_never_match_is_refused(tree, tmp_path, word):
    done = fx.run_recbuild("--list", str(tmp_path / "set"), str(tree), "--exts", word, check=False)
    assert done.returncode == 2 and not (tmp_path / "set.lst").exists()
    assert done.stderr.splitlines()[-1] == (
        f"python -m recbuild: error: argument --exts: expected lower-case file suffixes with the dot, such as "
        f".jpg .png, got {word!r} (a file's suffix is lower-cased before it is compared)")


def test_class_map_names_every_label(tree, tmp_path):
    written = make_lists(str(tmp_path / "set"), str(tree), ListConfig(recursive=True, train_ratio=0.8))
    classes = read_class_map(tmp_path / "set.classes.json")
    # Labels in walk order of first image: root ('.'), then sorted folders that hold images.
    assert classes == [".", "Alpha", "Alpha/sub", "beta", "many", "mid", "zeta"]
    for path, _ in written:
        assert find_class_map(path) == tmp_path / "set.classes.json"
        for e in read_list(path):
            folder = str(Path(e.path).parent)
            assert classes[int(e.labels[0])] == folder


# ---- Kaggle layout ---------------------------------------------------------------------------------------------

def _kaggle(tmp_path, ids_labels, extra_files=(), header="id,breed"):
    root = tmp_path / "train"
    root.mkdir()
    img = fx.coded(8, 8, 0, 0)
    for ident, _ in ids_labels:
        cv2.imwrite(str(root / f"{ident}.jpg"), img)
    for name in extra_files:
        cv2.imwrite(str(root / name), img)
    csv = tmp_path / "labels.csv"
    csv.write_text(header + "\n" + "".join(f"{i},{l}\n" for i, l in ids_labels))
    return root, csv


def test_labels_csv_kaggle_layout(tmp_path):
    rows = [(f"{h:032x}", ["beagle", "pug", "akita"][h % 3]) for h in range(30)]
    root, csv = _kaggle(tmp_path, rows)
    before = sorted(p.name for p in root.iterdir())
    make_lists(str(tmp_path / "k"), str(root), ListConfig(labels_csv=str(csv), train_ratio=0.8))
    assert sorted(p.name for p in root.iterdir()) == before          # nothing copied or moved
    classes = read_class_map(tmp_path / "k.classes.json")
    assert classes == ["akita", "beagle", "pug"]
    truth = dict(rows)
    seen = []
    for split in ("train", "val"):
        for e in read_list(str(tmp_path / f"k_{split}.lst")):
            assert (root / e.path).is_file()
            assert classes[int(e.labels[0])] == truth[Path(e.path).stem]
            seen.append(e.path)
    assert sorted(seen) == sorted(f"{i}.jpg" for i, _ in rows)
    assert len(read_list(str(tmp_path / "k_train.lst"))) == 24


def test_labels_csv_integer_classes_keep_their_value(tmp_path):
    rows = [(f"p{i}", str([0, 1, 2, 10][i % 4])) for i in range(12)]
    root, csv = _kaggle(tmp_path, rows, header="id,label")
    make_lists(str(tmp_path / "k"), str(root), ListConfig(labels_csv=str(csv)))
    assert read_class_map(tmp_path / "k.classes.json") == ["0", "1", "2", "10"]


@pytest.mark.parametrize("case,expect", [
    ("duplicate", "duplicate id"),
    ("missing", "with no image"),
    ("unknown", "without a row"),
    ("no_header", "header row"),
    ("short_row", ":3: expected 'id,label'"),
])
def test_labels_csv_errors_name_the_entries(tmp_path, case, expect):
    rows = [("a", "x"), ("b", "y"), ("c", "x")]
    root, csv = _kaggle(tmp_path, rows, extra_files=["stray.jpg"] if case == "unknown" else ())
    text = csv.read_text()
    if case == "duplicate":
        text += "b,x\n"
    elif case == "missing":
        text += "ghost,y\n"
    elif case == "no_header":
        text = text.split("\n", 1)[1]
    elif case == "short_row":
        text = text.replace("b,y", "b")
    csv.write_text(text)
    with pytest.raises(ListError) as err:
        make_lists(str(tmp_path / "k"), str(root), ListConfig(labels_csv=str(csv)))
    msg = str(err.value)
    assert expect in msg and str(csv) in msg and "\n" not in msg
    named = {"duplicate": "'b", "missing": "'ghost", "unknown": "'stray.jpg'"}.get(case)
    if named:
        assert named in msg
    assert not list(tmp_path.glob("k*.lst"))                      # nothing half-written


def test_labels_csv_cli_error_is_one_line(tmp_path):
    root, csv = _kaggle(tmp_path, [("a", "x"), ("a", "y")])
    proc = fx.run_recbuild("--list", "--labels", str(csv), str(tmp_path / "k"), str(root), check=False)
    assert proc.returncode == 1
    err_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1 and "duplicate id" in err_lines[0] and "'a (lines 2 and 3)'" in err_lines[0]


def test_labels_csv_extra_column_is_an_error_unless_a_column_is_picked(tmp_path):
    rows = [("a", "x"), ("b", "y"), ("c", "x")]
    root, csv = _kaggle(tmp_path, rows, header="id,label")
    csv.write_text("id,label,extra\n" + "".join(f"{i},{l},{'q' if i != 'b' else 'r'}\n" for i, l in rows))
    proc = fx.run_recbuild("--list", "--labels", str(csv), str(tmp_path / "k"), str(root), check=False)
    err_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 1 and len(err_lines) == 1
    assert "'extra'" in err_lines[0] and "--label-column" in err_lines[0]
    assert not list(tmp_path.glob("k*.lst"))
    for column, truth in (("label", dict(rows)), ("extra", {"a": "q", "b": "r", "c": "q"})):
        make_lists(str(tmp_path / column), str(root), ListConfig(labels_csv=str(csv), label_column=column))
        classes = read_class_map(tmp_path / f"{column}.classes.json")
        got = {Path(e.path).stem: classes[int(e.labels[0])] for e in read_list(tmp_path / f"{column}.lst")}
        assert got == truth
    with pytest.raises(ListError, match="no column 'breed'"):
        make_lists(str(tmp_path / "z"), str(root), ListConfig(labels_csv=str(csv), label_column="breed"))
    with pytest.raises(ListError, match="add --labels"):
        make_lists(str(tmp_path / "z"), str(root), ListConfig(label_column="label"))


def test_headerless_csv_is_detected_by_content_even_when_the_first_image_is_missing(tmp_path):
    """No header row and the first row's image missing: before, that row passed for a header and was lost."""
    root, csv = _kaggle(tmp_path, [("b", "x"), ("c", "y"), ("d", "x")])
    csv.write_text("a,x\nb,x\nc,y\nd,x\n")                       # no header; a.jpg does not exist
    with pytest.raises(ListError) as err:
        make_lists(str(tmp_path / "k"), str(root), ListConfig(labels_csv=str(csv)))
    msg = str(err.value)
    assert f"{csv}:1: the first row is data, not a header" in msg and "label field 'x' is also the label" in msg
    csv.write_text("b,x\nc,y\nd,x\n")                              # first image present: the other rule
    with pytest.raises(ListError, match="its first field 'b' names an image"):
        make_lists(str(tmp_path / "k"), str(root), ListConfig(labels_csv=str(csv)))


def test_numeric_labels_are_renumbered_with_a_warning_or_kept(tmp_path, caplog):
    rows = [(f"p{i}", str([0, 1, 2, 10][i % 4])) for i in range(12)]
    root, csv = _kaggle(tmp_path, rows, header="id,label")
    truth = dict(rows)
    with caplog.at_level("WARNING"):
        make_lists(str(tmp_path / "r"), str(root), ListConfig(labels_csv=str(csv)))
    assert "renumbered" in caplog.text and "10->3" in caplog.text and "--keep-numeric-labels" in caplog.text
    make_lists(str(tmp_path / "k"), str(root), ListConfig(labels_csv=str(csv), keep_numeric_labels=True))
    classes = read_class_map(tmp_path / "k.classes.json")
    assert classes == [str(i) for i in range(11)]
    for e in read_list(tmp_path / "k.lst"):
        csv_label = truth[Path(e.path).stem]
        assert int(e.labels[0]) == int(csv_label) and classes[int(e.labels[0])] == csv_label
    (tmp_path / "b").mkdir()
    root2, csv2 = _kaggle(tmp_path / "b", [("a", "cat"), ("b", "3")], header="id,label")
    with pytest.raises(ListError, match="'cat' \\(line 2\\)"):
        make_lists(str(tmp_path / "b" / "k"), str(root2), ListConfig(labels_csv=str(csv2), keep_numeric_labels=True))
    summary = fx.run_recbuild("--list", "--labels", str(csv), str(tmp_path / "c"), str(root)).stdout
    assert "10 3" in summary and "renumbered" in summary and "--keep-numeric-labels" in summary
    help_text = fx.run_recbuild("--help").stdout
    assert "0,1,2,10" in help_text and "--keep-numeric-labels" in help_text


# ---- unlabelled test folder, stratified split -------------------------------------------------------------------

def test_unlabelled_integer_ids_are_kept(tmp_path):
    root = tmp_path / "test"
    root.mkdir()
    for ident in (3, 12, 7, 100):
        cv2.imwrite(str(root / f"{ident}.jpg"), fx.coded(8, 8, 0, 0))
    make_lists(str(tmp_path / "t"), str(root), ListConfig(unlabelled=True))
    entries = read_list(str(tmp_path / "t_test.lst"))
    assert [(e.index, e.path, e.labels) for e in entries] == \
        [(3, "3.jpg", (0.0,)), (7, "7.jpg", (0.0,)), (12, "12.jpg", (0.0,)), (100, "100.jpg", (0.0,))]
    assert read_class_map(tmp_path / "t.classes.json") == []


def test_unlabelled_hash_ids_keep_stems_and_existing_class_map(tmp_path):
    root = tmp_path / "test"
    root.mkdir()
    stems = ["f00d", "0abc", "beef"]
    for s in stems:
        cv2.imwrite(str(root / f"{s}.png"), fx.coded(8, 8, 0, 0))
    (tmp_path / "t.classes.json").write_text(json.dumps({"format": "mxtransfer.classmap/1", "classes": ["a"]}))
    make_lists(str(tmp_path / "t"), str(root), ListConfig(unlabelled=True))
    entries = read_list(str(tmp_path / "t_test.lst"))
    assert [Path(e.path).stem for e in entries] == sorted(stems)
    assert [e.index for e in entries] == [0, 1, 2]
    assert read_class_map(tmp_path / "t.classes.json") == ["a"]     # the training lists' map is kept


def test_stratified_split_keeps_class_ratios(tmp_path):
    root = tmp_path / "imgs"
    counts = {"a": 50, "b": 20, "c": 10}
    img = fx.coded(8, 8, 0, 0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / name / f"{i}.png"), img)
    cfg = ListConfig(recursive=True, train_ratio=0.6, test_ratio=0.2, stratify=True, seed=7)
    make_lists(str(tmp_path / "s"), str(root), cfg)
    per_split = {s: Counter(int(e.labels[0]) for e in read_list(str(tmp_path / f"s_{s}.lst")))
                 for s in ("train", "val", "test")}
    for label, n in enumerate(counts.values()):
        assert per_split["train"][label] == round(n * 0.6)
        assert per_split["test"][label] == round(n * 0.2)
        assert per_split["val"][label] == n - round(n * 0.6) - round(n * 0.2)
    # Deterministic for a seed, different for another.
    first = (tmp_path / "s_train.lst").read_bytes()
    make_lists(str(tmp_path / "s"), str(root), cfg)
    assert (tmp_path / "s_train.lst").read_bytes() == first
    cfg.seed = 8
    make_lists(str(tmp_path / "s"), str(root), cfg)
    assert (tmp_path / "s_train.lst").read_bytes() != first


@pytest.mark.parametrize("content,expect", [
    ("0\t1.000000\ta.jpg\n1\t0.000000\n", ":2: expected"),
    ("0\t1.000000\ta.jpg\nx\t0.000000\tb.jpg\n", ":2: index must be an integer"),
    ("5\t1.000000\ta.jpg\n5\t0.000000\tb.jpg\n", "duplicate index"),
])
def test_malformed_list_lines_are_named(tmp_path, content, expect):
    lst = tmp_path / "bad.lst"
    lst.write_text(content)
    with pytest.raises(ListError, match=expect):
        read_list(str(lst))


def test_every_im2rec_option_is_accepted_with_its_default():
    """A script switches over by changing only the program name: every im2rec.py flag exists here too."""
    import re
    from recbuild.cli import build_parser
    help_text = fx.run_im2rec("--help", cwd=Path.cwd()).stdout
    theirs = set(re.findall(r"(--[a-z][a-z-]+)", help_text)) - {"--help"}
    ours = {opt for action in build_parser()._actions for opt in action.option_strings}
    assert len(theirs) >= 15 and theirs <= ours, theirs - ours
    defaults = vars(build_parser().parse_args(["p", "r"]))
    assert defaults["exts"] == [".jpeg", ".jpg", ".png"] and defaults["quality"] == 95
    assert defaults["chunks"] == 1 and defaults["train_ratio"] == 1.0 and defaults["test_ratio"] == 0
    assert defaults["color"] == 1 and defaults["encoding"] == ".jpg" and defaults["resize"] == 0
    assert defaults["shuffle"] is True
