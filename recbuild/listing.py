"""Image lists: a folder tree, a Kaggle `labels.csv` or an unlabelled folder -> entries -> .lst files.

The .lst format (im2rec.py's): one line per image, tab separated,

    <integer index> \t <label as %f> [\t <label as %f> ...] \t <path relative to ROOT> \n

Given the same flags and tree, the lists written here are byte-identical to im2rec.py's. The facts that
requires: the tree is walked with os.walk(followlinks=True) with folders and files sorted by code point; a
file is taken when its lower-cased suffix is one of --exts; with --recursive a folder gets the next label
when its first image is found (the root itself may be a class); without it only ROOT's own files are listed,
all with label 0; indices are given in walk order *before* the shuffle, which is random.shuffle after
random.seed(100); every chunk is ceil(N / chunks) long, and inside a chunk the test split comes first
(int(chunk_size * test_ratio) images, computed from the full chunk size even for a short last chunk), then
train (int(chunk_size * train_ratio)), then val (the rest, written only when train_ratio + test_ratio < 1).
train_ratio == 1.0 writes one PREFIX[_i].lst and ignores test_ratio.

Beside every list `--list` writes, NAME.lst.json records the folder it was listed from (the .lst itself stays
im2rec's), so packing reads each list from its own folder: a test list made from `test/` is never packed
against `train/`, whose numbered files may have the same names (list_source, pack_root).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from recbuild.classmap import class_map_path, write_class_map
from recbuild.config import ListConfig
from recbuild.atomic import atomic_open, write_json

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# How many offending names an error message shows before "... and N more".
_SHOW = 10
# --delimiter names -> the separator of a labels file (' ' takes runs of spaces as one).
DELIMITERS = {",": ",", "comma": ",", "tab": "\t", "\\t": "\t", "space": " ", " ": " ", "\t": "\t"}
LIST_SOURCE_FORMAT = "mxtransfer.listsource/1"


class ListError(ValueError):
    """A problem with the image tree, a labels CSV or a .lst file; the message names the file or line."""


@dataclass(frozen=True)
class Entry:
    """One line of a .lst file.

    Attributes:
        index: the integer id written to the record header (and the .idx key).
        labels: one float per label column (im2rec writes them with %f).
        path: the image path relative to ROOT, as written in the list.
        line: the entry's line number in the .lst it was read from (0 when it was not read from a file); not
            part of equality.
    """
    index: int
    labels: Tuple[float, ...]
    path: str
    line: int = field(default=0, compare=False)


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in items[:_SHOW])
    return shown + (f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def _has_ext(name: str, exts: Sequence[str]) -> bool:
    # im2rec's rule: the lower-cased suffix must equal one of --exts exactly ('.JPG' in --exts never matches).
    return os.path.splitext(name)[1].lower() in exts


# ---- sources -------------------------------------------------------------------------------------------------

def scan_tree(root: str, recursive: bool, exts: Sequence[str]) -> Tuple[List[Entry], List[str]]:
    """List the images under `root` the way im2rec.py does.

    Args:
        root: the image root.
        recursive: one class per folder (label = order of first appearance in a sorted walk); otherwise only
            root's own files, all label 0.
        exts: lower-case suffixes with the dot.

    Returns:
        (entries in walk order with indices 0..N-1, class names in label order: folder paths relative to root,
        '.' for root itself).
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise ListError(f"{root}: image root is not a folder")
    entries: List[Entry] = []
    if recursive:
        labels: Dict[str, int] = {}
        walk_links = _LinkGuard(root)
        for folder, dirs, files in os.walk(root, followlinks=True):
            dirs.sort()
            dirs[:] = walk_links.followed(folder, dirs)
            files.sort()
            for name in files:
                full = os.path.join(folder, name)
                if _has_ext(name, exts) and os.path.isfile(full):
                    label = labels.setdefault(folder, len(labels))
                    entries.append(Entry(len(entries), (float(label),), os.path.relpath(full, root)))
        classes = [os.path.relpath(folder, root) for folder in labels]
    else:
        for name in sorted(os.listdir(root)):
            full = os.path.join(root, name)
            if _has_ext(name, exts) and os.path.isfile(full):
                entries.append(Entry(len(entries), (0.0,), os.path.relpath(full, root)))
        classes = ["."]
    return entries, classes


class _LinkGuard:
    """Which sub-folders a recursive walk enters. Like im2rec (os.walk(followlinks=True)) it follows symbolic links
    to folders, except two kinds, each warned about once, naming the link: a link whose target lies outside ROOT
    (its images are not part of the tree the user named), and a link to a folder already on the path from ROOT
    to it (a loop, which os.walk would follow until the path is too long: 5 images became 204 entries in 122
    classes). Links to files are kept as im2rec keeps them: a list may well be a farm of links into an image
    store, and the path written stays inside ROOT."""

    def __init__(self, root: str):
        self.real_root = os.path.realpath(root)
        self.chains: Dict[str, frozenset] = {root: frozenset([self.real_root])}   # folder -> real folders above
        self.warned: set = set()

    def followed(self, folder: str, dirs: List[str]) -> List[str]:
        chain = self.chains.pop(folder, frozenset([os.path.realpath(folder)]))
        kept = []
        for name in dirs:
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            outside = os.path.commonpath([self.real_root, real]) != self.real_root
            if outside or real in chain:
                self._warn(path, real, "outside ROOT" if outside else "a folder that contains it (a loop)")
                continue
            self.chains[path] = chain | {real}
            kept.append(name)
        return kept

    def _warn(self, path: str, real: str, what: str) -> None:
        link = (os.path.realpath(os.path.dirname(path)), os.path.basename(path))  # the same link, however reached
        if link not in self.warned:
            self.warned.add(link)
            log.warning("%s: a symbolic link to %s, %s: not followed", path, real, what)


def _flat_images(root: str, exts: Sequence[str]) -> List[str]:
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise ListError(f"{root}: image folder is not a folder")
    return [n for n in sorted(os.listdir(root)) if _has_ext(n, exts) and os.path.isfile(os.path.join(root, n))]


def _label_order(names: Sequence[str]) -> List[str]:
    """Class names in label order: numerically when every name is an integer (so '10' follows '9'), else by
    code point. Integer class names 0..K-1 thus keep their value as the label."""
    unique = set(names)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


def _read_csv_rows(csv_path: str, delimiter: str = ",") -> List[Tuple[int, List[str]]]:
    """(line number, stripped fields) of every non-blank row; `delimiter` ' ' takes runs of spaces as one."""
    rows: List[Tuple[int, List[str]]] = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            lines = handle
            if delimiter == " ":  # trailing spaces would be an empty last field
                lines = (line.rstrip(" \r\n") + "\n" for line in handle)
            reader = csv.reader(lines, delimiter=delimiter, skipinitialspace=delimiter == " ")
            for line_no, row in enumerate(reader, start=1):
                if row and any(c.strip() for c in row):
                    rows.append((line_no, [c.strip() for c in row]))
    except OSError as err:
        raise ListError(f"{csv_path}: cannot read labels CSV ({err.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise ListError(f"{csv_path}: not a UTF-8 CSV file ({err})") from None
    if not rows:
        raise ListError(f"{csv_path}: empty; expected a header row 'id,label' and one row per image")
    return rows


def _delimiter_hint(fields: List[str], delimiter: str) -> str:
    """What to pass when a row holds one field that another separator would split."""
    text = fields[0] if fields else ""
    for sep, flag in (("\t", "--delimiter tab"), (" ", "--delimiter space"), (",", "--delimiter ,")):
        if sep != delimiter and len(text.split(sep if sep != " " else None)) == 2:
            return f"; the line looks {flag.split()[-1]}-separated: pass {flag}"
    return ""


def _label_field(csv_path: str, rows: List[Tuple[int, List[str]]], label_column: Optional[str],
                 names_an_image: Callable[[str], bool], delimiter: str = ",") -> int:
    """Check the header row and return the label column's position.

    Rule for telling a header from data (by content, not by whether an image exists): the first row is data when
    its first field names an image in ROOT, or when its label field is a label of another row (a header's
    'label' or 'breed' is no class). Extra columns are an error unless --label-column names the one to use.
    """
    header_line, header = rows[0]
    if len(header) < 2:
        raise ListError(f"{csv_path}:{header_line}: expected 'id,label', got {','.join(header)!r}"
                        + _delimiter_hint(header, delimiter))
    if label_column is not None:
        if label_column not in header[1:]:
            raise ListError(f"{csv_path}:{header_line}: no column {label_column!r} for --label-column; the header "
                            f"has {', '.join(repr(c) for c in header)} (the first column is the image id)")
        position = header.index(label_column, 1)
    else:
        position = 1
    other_labels = {fields[position] for _, fields in rows[1:] if len(fields) > position}
    if names_an_image(header[0]):
        rule = f"its first field {header[0]!r} names an image in the folder"
    elif header[position] in other_labels:
        rule = f"its label field {header[position]!r} is also the label of other rows"
    else:
        rule = None
    if rule:
        raise ListError(f"{csv_path}:{header_line}: the first row is data, not a header ({rule}); a header row "
                        "such as 'id,label' is required, or pass --no-header for a file of data lines only")
    if label_column is None and len(header) > 2:
        extra = ", ".join(repr(c) for c in header[2:])
        raise ListError(f"{csv_path}:{header_line}: extra column(s) {extra} beyond 'id,label' would be ignored; "
                        "name the label column with --label-column NAME (for a multi-label CSV, one list per "
                        "column)")
    return position


def _numbered_classes(csv_path: str, file_label: Dict[str, str], line_of: Dict[str, int], keep_numeric: bool
                      ) -> Tuple[List[str], Dict[str, int]]:
    """(class names in label order, {label text: label})."""
    if keep_numeric:
        bad = [f"{t!r} (line {line_of[n]})" for n, t in file_label.items() if not t.isdigit()]
        if bad:
            raise ListError(f"{csv_path}: --keep-numeric-labels needs non-negative integer labels; "
                            f"{len(bad)} are not: {_names(bad)}")
        values = {t: int(t) for t in file_label.values()}
        # Label i is class i: ids without images still get an entry, named by their number, so the map's index
        # stays the label.
        return [str(i) for i in range(max(values.values()) + 1)], values
    classes = _label_order(list(file_label.values()))
    label_of = {c: i for i, c in enumerate(classes)}
    moved = [f"{c}->{i}" for c, i in label_of.items() if c.isdigit() and int(c) != i]
    if moved and all(c.isdigit() for c in classes):
        log.warning("%s: integer class ids renumbered 0..%d in numeric order (%s); the class map keeps the ids "
                    "as the class names, so predictions give them back; pass --keep-numeric-labels to keep them "
                    "as the labels", csv_path, len(classes) - 1, _names(moved))
    return classes, label_of


def read_labels_csv(csv_path: str, root: str, exts: Sequence[str], label_column: Optional[str] = None,
                    keep_numeric: bool = False, delimiter: str = ",", header: bool = True
                    ) -> Tuple[List[Entry], List[str]]:
    """The Kaggle layout: a flat folder of images plus a labels file `id,label` (header row required unless
    `header` is False; `delimiter` ',' '\t' or ' ').

    The id is a file name in `root`, with or without its suffix. Every image in the folder must have exactly
    one row and every row exactly one image; anything else is an error that names the ids/files. A header is
    told from data by content (see _label_field); more than two columns need `label_column`. Class names are
    the label texts as written (Baidu's type ids stay '12', '47', ...), so outputs can give them back.

    Returns:
        (entries sorted by file name with indices 0..N-1, class names in label order).
    """
    files = _flat_images(root, exts)
    by_name = {n: n for n in files}
    by_stem: Dict[str, List[str]] = defaultdict(list)
    for n in files:
        by_stem[os.path.splitext(n)[0]].append(n)
    rows = _read_csv_rows(csv_path, delimiter)
    if header:
        position = _label_field(csv_path, rows, label_column, lambda i: i in by_name or i in by_stem, delimiter)
        width, data, shape = len(rows[0][1]), rows[1:], delimiter.join(rows[0][1])
    else:
        position, width, data, shape = 1, 2, rows, delimiter.join(("id", "label"))
    for line_no, fields in data:
        if len(fields) < position + 1 or (label_column is None and len(fields) != width):
            raise ListError(f"{csv_path}:{line_no}: expected 'id,label' ({width} fields, like {shape!r}), got "
                            f"{delimiter.join(fields)!r}" + _delimiter_hint(fields, delimiter))
    file_label, line_of = _match_rows(csv_path, root, exts, [(n, f[0], f[position]) for n, f in data],
                                      files, by_name, by_stem)
    classes, label_of = _numbered_classes(csv_path, file_label, line_of, keep_numeric)
    entries = [Entry(i, (float(label_of[file_label[n]]),), n) for i, n in enumerate(files)]
    return entries, classes


def _match_rows(csv_path: str, root: str, exts: Sequence[str], rows: List[Tuple[int, str, str]], files,
                by_name, by_stem) -> Tuple[Dict[str, str], Dict[str, int]]:
    """{file name: label text} and {file name: CSV line}, or an error naming every mismatch."""
    seen: Dict[str, int] = {}
    duplicates, missing, ambiguous, empty = [], [], [], []
    file_label: Dict[str, str] = {}
    line_of: Dict[str, int] = {}
    for line_no, ident, label in rows:
        if ident in seen:
            duplicates.append(f"{ident} (lines {seen[ident]} and {line_no})")
            continue
        seen[ident] = line_no
        if not label:
            empty.append(f"{ident} (line {line_no})")
            continue
        if ident in by_name:
            name = ident
        elif len(by_stem.get(ident, ())) == 1:
            name = by_stem[ident][0]
        elif ident in by_stem:
            ambiguous.append(f"{ident} ({', '.join(by_stem[ident])})")
            continue
        else:
            missing.append(f"{ident} (line {line_no})")
            continue
        if name in file_label:
            duplicates.append(f"{ident} (line {line_no}: {name} is already labelled)")
            continue
        file_label[name], line_of[name] = label, line_no
    unknown = [n for n in files if n not in file_label]
    problems = []
    if duplicates:
        problems.append(f"{len(duplicates)} duplicate id(s): {_names(duplicates)}")
    if empty:
        problems.append(f"{len(empty)} row(s) without a label: {_names(empty)}")
    if missing:
        problems.append(f"{len(missing)} id(s) with no image ({'/'.join(exts)}) in {root}: {_names(missing)}")
    if ambiguous:
        problems.append(f"{len(ambiguous)} id(s) matching several files: {_names(ambiguous)}")
    if unknown and not (duplicates or missing or ambiguous or empty):
        problems.append(f"{len(unknown)} image(s) in {root} without a row: {_names(unknown)}")
    if problems:
        raise ListError(f"{csv_path}: " + "; ".join(problems))
    if not file_label:
        raise ListError(f"{csv_path}: no rows after the header")
    return file_label, line_of


def scan_unlabelled(root: str, exts: Sequence[str]) -> List[Entry]:
    """A flat folder of unlabelled (test) images, label 0.

    The file stem is the image's id: when every stem is a non-negative integer (Kaggle's '1.jpg' ...), it is
    the list index, so record ids equal the competition's ids. Otherwise indices follow the sorted file names
    and the id is the stem of the path column.
    """
    files = _flat_images(root, exts)
    stems = [os.path.splitext(n)[0] for n in files]
    if files and all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        order = sorted(range(len(files)), key=lambda i: int(stems[i]))
        return [Entry(int(stems[i]), (0.0,), files[i]) for i in order]
    return [Entry(i, (0.0,), n) for i, n in enumerate(files)]


# ---- splitting -----------------------------------------------------------------------------------------------

def chunk_and_split(entries: List[Entry], cfg: ListConfig) -> List[Tuple[str, List[Entry]]]:
    """Shuffle, chunk and split like im2rec (or per class with cfg.stratify).

    Returns:
        [(list name suffix such as '_0_train', entries)] in im2rec's write order.
    """
    entries = list(entries)
    if cfg.shuffle:
        # random.Random(100) is in the same state as the module generator after random.seed(100).
        random.Random(cfg.seed).shuffle(entries)
    n = len(entries)
    chunk_size = (n + cfg.chunks - 1) // cfg.chunks
    out: List[Tuple[str, List[Entry]]] = []
    for c in range(cfg.chunks):
        chunk = entries[c * chunk_size:(c + 1) * chunk_size]
        tag = f"_{c}" if cfg.chunks > 1 else ""
        if cfg.train_ratio == 1.0:
            out.append((tag, chunk))
            continue
        if cfg.stratify:
            test, train, val = _stratified(chunk, cfg.train_ratio, cfg.test_ratio)
        else:
            sep = int(chunk_size * cfg.train_ratio)
            sep_test = int(chunk_size * cfg.test_ratio)
            test, train, val = chunk[:sep_test], chunk[sep_test:sep_test + sep], chunk[sep_test + sep:]
        if cfg.test_ratio:
            out.append((tag + "_test", test))
        if cfg.train_ratio + cfg.test_ratio < 1.0:
            out.append((tag + "_val", val))
        out.append((tag + "_train", train))
    return out


def _stratified(chunk: List[Entry], train_ratio: float, test_ratio: float):
    """Split every class with the ratios (rounded per class); lists keep the chunk's (shuffled) order."""
    by_class: Dict[float, List[int]] = defaultdict(list)
    for pos, e in enumerate(chunk):
        by_class[e.labels[0]].append(pos)
    has_val = train_ratio + test_ratio < 1.0
    split_of: Dict[int, str] = {}
    for positions in by_class.values():
        k = len(positions)
        n_test = min(k, int(round(k * test_ratio)))
        n_train = k - n_test if not has_val else min(k - n_test, int(round(k * train_ratio)))
        for j, pos in enumerate(positions):
            split_of[pos] = "test" if j < n_test else "train" if j < n_test + n_train else "val"
    pick = lambda s: [e for pos, e in enumerate(chunk) if split_of[pos] == s]  # noqa: E731
    return pick("test"), pick("train"), pick("val")


# ---- .lst io: the one reader and writer of .lst files (the packer, the predictor and the demo use these) -------

def format_entry(e: Entry) -> str:
    """One .lst line, exactly as im2rec writes it: index, every label as %f, the path, all tab separated, with
    the newline."""
    return "%d\t" % e.index + "".join("%f\t" % v for v in e.labels) + "%s\n" % e.path


def write_list(path: PathLike, entries: Sequence[Entry]) -> None:
    """Write a .lst atomically (UTF-8; undecodable file names are written back as their original bytes).

    Args:
        path: the .lst to (re)place; readers see the old or the new list, never half of one.
        entries: the lines, in order (format_entry of each).
    """
    with atomic_open(path, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as handle:
        for e in entries:
            handle.write(format_entry(e))


def read_list(path: PathLike) -> List[Entry]:
    """Read a .lst file. Blank lines are ignored; any other malformed line is an error naming it.

    Returns:
        The entries in file order (Entry.index, Entry.labels as floats, Entry.path relative to the image root).

    Raises:
        ListError: a line without index/label/path, a non-numeric field, or an index used twice (the .idx is
            keyed by index, so a duplicate would make one record unreachable).
    """
    entries: List[Entry] = []
    first_line: Dict[int, int] = {}
    dupes: List[str] = []
    try:
        handle = open(path, encoding="utf-8", errors="surrogateescape", newline="")
    except OSError as err:
        raise ListError(f"{path}: cannot read list ({err.strerror})") from None
    with handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise ListError(f"{path}:{line_no}: expected 'index<TAB>label[<TAB>label...]<TAB>path', "
                                f"got {len(parts)} field(s): {line!r}")
            try:
                index = int(parts[0].strip())
                labels = tuple(float(v) for v in parts[1:-1])
            except ValueError:
                raise ListError(f"{path}:{line_no}: index must be an integer and labels numbers: {line!r}") \
                    from None
            if index < 0:
                raise ListError(f"{path}:{line_no}: negative index {index}; record ids are unsigned")
            if index in first_line:
                dupes.append(f"{index} (lines {first_line[index]} and {line_no})")
            first_line.setdefault(index, line_no)
            entries.append(Entry(index, labels, parts[-1], line_no))
    if dupes:
        raise ListError(f"{path}: {len(dupes)} duplicate index(es): {_names(dupes)}")
    return entries


# ---- the --list command --------------------------------------------------------------------------------------

def make_lists(prefix: str, root: str, cfg: ListConfig) -> List[Tuple[str, int]]:
    """Build the lists of `root` under `prefix` (im2rec --list) and the class map beside them.

    Returns:
        [(list path, number of entries)] in write order.
    """
    prefix = os.path.abspath(prefix)
    _check_config(cfg)
    if cfg.unlabelled:
        entries = scan_unlabelled(root, cfg.exts)
        classes = None
        parts = [("_test", entries)]
    else:
        if cfg.labels_csv:
            entries, classes = read_labels_csv(cfg.labels_csv, root, cfg.exts, cfg.label_column,
                                               cfg.keep_numeric_labels, cfg.labels_delimiter, cfg.labels_header)
        else:
            entries, classes = scan_tree(root, cfg.recursive, cfg.exts)
        parts = chunk_and_split(entries, cfg)
    bad = [e.path for e in entries if any(c in e.path for c in "\t\r\n")]
    if bad:
        raise ListError(f"{root}: {len(bad)} file name(s) contain a tab or line break, which a .lst cannot "
                        f"hold; rename them: {_names(bad)}")
    if not entries:
        log.warning("%s: no files with suffix %s; the lists are empty", root, " ".join(cfg.exts))
    written = []
    for suffix, part in parts:
        path = prefix + suffix + ".lst"
        if os.path.exists(path):
            log.info("replacing %s", path)      # atomically: readers see the old or the new list, never half
        write_list(path, part)
        write_list_source(path, root, cfg.unlabelled)
        written.append((path, len(part)))
    cmap = class_map_path(prefix)
    if classes is not None:
        write_class_map(prefix, classes)
    elif not cmap.exists():
        # Unlabelled lists carry no class names; an empty map marks that, and an existing map (the training
        # lists' under the same prefix) is kept.
        write_class_map(prefix, [])
    return written


def _check_config(cfg: ListConfig) -> None:
    if cfg.chunks < 1:
        raise ListError(f"--chunks must be at least 1, got {cfg.chunks}")
    if not 0.0 <= cfg.train_ratio <= 1.0 or not 0.0 <= cfg.test_ratio <= 1.0:
        raise ListError(f"--train-ratio and --test-ratio must lie in [0, 1], got {cfg.train_ratio} and "
                        f"{cfg.test_ratio}")
    if cfg.train_ratio != 1.0 and cfg.train_ratio + cfg.test_ratio > 1.0 + 1e-9:
        # im2rec accepts this and silently trains on 1 - test_ratio; we do the same (identical lists) but say so.
        log.warning("--train-ratio %s + --test-ratio %s exceed 1: the test split is taken first and the train "
                    "split gets what is left (%s of each chunk); there is no val split",
                    cfg.train_ratio, cfg.test_ratio, round(1 - cfg.test_ratio, 6))
    if cfg.unlabelled and (cfg.labels_csv or cfg.recursive or cfg.stratify or cfg.chunks != 1
                           or cfg.train_ratio != 1.0 or cfg.test_ratio):
        raise ListError("--unlabelled lists a flat folder of unlabelled images into PREFIX_test.lst; it cannot "
                        "be combined with --labels, --recursive, --stratify, --chunks or the split ratios")
    if (cfg.label_column or cfg.keep_numeric_labels or cfg.labels_delimiter != "," or not cfg.labels_header) \
            and not cfg.labels_csv:
        raise ListError("--label-column, --keep-numeric-labels, --delimiter and --no-header choose how a --labels "
                        "file is read: add --labels")
    if cfg.labels_delimiter not in DELIMITERS.values():
        raise ListError(f"--delimiter {cfg.labels_delimiter!r}: supported are {', '.join(DELIMITERS)}")
    if cfg.label_column and not cfg.labels_header:
        raise ListError("--label-column names a header column; a --no-header file has exactly the two fields "
                        "id and label")
    if cfg.labels_csv and cfg.recursive:
        raise ListError("--labels reads a flat folder; drop --recursive")
    bad_exts = [e for e in cfg.exts if not e.startswith(".") or e != e.lower()]
    if bad_exts:
        # Not an error: im2rec accepts them too, but they never match anything.
        log.warning("--exts %s never match: suffixes are compared lower-cased and with the dot, e.g. .jpg",
                    " ".join(bad_exts))


# ---- where a list was made from: NAME.lst.json ------------------------------------------------------------------

def list_source_path(lst: PathLike) -> Path:
    """The record of the folder a .lst was listed from: NAME.lst.json beside NAME.lst."""
    return Path(str(lst) + ".json")


def _list_digest(lst: PathLike) -> str:
    digest = hashlib.sha1()
    with open(lst, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_list_source(lst: PathLike, root: str, unlabelled: bool) -> None:
    """Record `root` (absolute, and relative to the list's folder so a tree moved as a whole still resolves) and
    the list's digest (a list rewritten since, e.g. by im2rec.py, is no longer described by the record)."""
    root = os.path.abspath(root)
    write_json(list_source_path(lst), {"format": LIST_SOURCE_FORMAT, "root": root,
                                       "root_from_list": os.path.relpath(root, os.path.dirname(os.path.abspath(lst))),
                                       "unlabelled": bool(unlabelled), "list_sha1": _list_digest(lst)})


def _list_source(lst: PathLike) -> Optional[dict]:
    """The record beside `lst` when it describes the list as it is now; None when there is none, or when the list
    was rewritten since (then it is im2rec's or a hand-made list again, and a warning says so)."""
    path = list_source_path(lst)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        valid = data.get("format") == LIST_SOURCE_FORMAT and isinstance(data["root"], str)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise ListError(f"{path}: not a list-source record; expected {{\"format\": \"{LIST_SOURCE_FORMAT}\", "
                        f"\"root\": ...}} (delete it to pack {lst} against ROOT as im2rec would)")
    if data.get("list_sha1") != _list_digest(lst):
        log.warning("%s: %s was rewritten since it was listed from %s; packing it against ROOT as im2rec would",
                    path, os.path.basename(str(lst)), data["root"])
        return None
    return data


def listed_unlabelled(lst: PathLike) -> bool:
    """Whether `lst` was listed with --unlabelled (its labels are placeholders, not classes)."""
    try:
        data = _list_source(lst)
    except (ListError, OSError):
        return False
    return data is not None and data.get("unlabelled") is True


def listed_root(lst: PathLike) -> Optional[str]:
    """The folder `lst` was listed from, or None for a list without a record (im2rec's, or one written by hand).
    A recorded folder that moved with the list (same relative place) is found there."""
    data = _list_source(lst)
    if data is None:
        return None
    root = data["root"]
    if not os.path.isdir(root) and isinstance(data.get("root_from_list"), str):
        moved = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(lst)), data["root_from_list"]))
        root = moved if os.path.isdir(moved) else root
    return root


def pack_root(lst: PathLike, root: str) -> Tuple[str, Optional[str]]:
    """The folder to pack `lst` from, and a line to print when it is not ROOT.

    A list is packed from the folder it was listed from. im2rec packs every PREFIX*.lst against the one ROOT
    given, which packs a test list made from `test/` against `train/`: with numbered ids (`1.png` in both) the
    training images become the test set without an error. So a list whose recorded folder differs from ROOT is
    packed from its own folder, and the run says so; a recorded folder that no longer exists is refused.

    Raises:
        ListError: the recorded folder is gone (naming it, ROOT, and the ways on).
    """
    given = os.path.abspath(root)
    recorded = listed_root(lst)
    if recorded is None or os.path.realpath(recorded) == os.path.realpath(given):
        return given, None
    if not os.path.isdir(recorded):
        raise ListError(f"{lst} was listed from {recorded}, which no longer exists; refusing to pack it against "
                        f"ROOT {given} (its images may have the same names there). List the images again with "
                        f"--list, or delete {list_source_path(lst)} to pack it against ROOT as im2rec would")
    return recorded, (f"{os.path.basename(str(lst))}: packing from {recorded}, the folder it was listed from "
                      f"(not ROOT {given})")
