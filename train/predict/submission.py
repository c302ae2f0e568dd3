"""The one writer of submission files: `train.predict`, `train.recipes ensemble` and `train.recipes pseudo`.

Every command that writes predictions for a test set goes through `write_submission`, so the ids and formats
are the same whichever wrote them. The formats the competitions need:

    --format probs   (default)  id,<class 1>,...,<class K>   softmax probabilities, columns in class-map order
                                (for a labels.csv layout that is sorted class-name order, sample_submission.csv's)
    --format label              id,label                     the most likely class's name (Kaggle CIFAR-10)
    --columns label,id --delimiter tab --no-header           Baidu's `<typeid>\\t<id>` lines: class names are the
                                                             labels file's own texts, so original type ids return
    --sort numeric|name|none    row order: ids as numbers (1, 2, ..., 10), as text (1, 10, 11, ..., 2), or the
                                order the images were read in (default)

Ids: the file stem of each image's path ('0201ab.jpg' -> '0201ab'; `--id auto`, the default, when the stems are
unique; `--id path` the relative path, `--id index` the row number); records without a list beside their .rec are
named by their record id.
"""
from __future__ import annotations

import argparse
import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np

from recbuild.atomic import atomic_open
from recbuild.names import escaped_names

FORMATS = ("probs", "label")
SORTS = ("none", "numeric", "name")
ID_MODES = ("auto", "stem", "path", "index")
COLUMNS = ("id,label", "label,id")
# --delimiter names -> separator
DELIMITERS = {",": ",", "comma": ",", "tab": "\t", "\\t": "\t", "\t": "\t", "space": " ", " ": " ",
              ";": ";"}


class SubmissionError(ValueError):
    """A submission that cannot be written as asked (e.g. --sort numeric of ids that are not numbers)."""


@dataclass(frozen=True)
class SubmissionFormat:
    """How a submission file is laid out (see the module docstring).

    Attributes:
        kind: 'probs' (one probability column per class) or 'label' (the predicted class name).
        sort: 'none', 'numeric' or 'name'.
        delimiter: the field separator.
        header: write the header row.
        label_first: with kind 'label', the columns are label then id (Baidu).
        id_mode: 'auto', 'stem', 'path' or 'index'.
    """
    kind: str = "probs"
    sort: str = "none"
    delimiter: str = ","
    header: bool = True
    label_first: bool = False
    id_mode: str = "auto"


def submission_ids(names: Sequence[str], mode: str = "auto", where: str = "the submission") -> List[str]:
    """The id of each image: its file stem (auto: when the stems are unique, else the path), its relative path,
    or its row index. A name that is not valid UTF-8 is written escaped (recbuild.names), warned naming `where`."""
    stems = [Path(n).with_suffix("").name for n in names]
    if mode == "stem" or (mode == "auto" and len(set(stems)) == len(stems)):
        return escaped_names(stems, where)
    if mode == "index":
        return [str(i) for i in range(len(names))]
    return escaped_names(names, where)


def _order(ids: Sequence[str], sort: str) -> List[int]:
    if sort == "none":
        return list(range(len(ids)))
    if sort == "name":
        return sorted(range(len(ids)), key=lambda i: ids[i])
    bad = [i for i in ids if not i.lstrip("-").isdigit()]
    if bad:
        raise SubmissionError(f"--sort numeric: {len(bad)} id(s) are not integers, e.g. {bad[0]!r}; use --sort name")
    return sorted(range(len(ids)), key=lambda i: int(ids[i]))


def submission_rows(names: Sequence[str], probs: np.ndarray, class_names: Sequence[str],
                    fmt: SubmissionFormat = SubmissionFormat(), where: str = "the submission") -> List[List[str]]:
    """The rows of the submission (header first when fmt.header) for images `names` with probabilities `probs`
    (N x K, columns in `class_names` order)."""
    if len(names) != len(probs):
        raise SubmissionError(f"{len(names)} ids but {len(probs)} rows of probabilities")
    ids = submission_ids(names, fmt.id_mode, where)
    rows: List[List[str]] = []
    if fmt.kind == "probs":
        if fmt.header:
            rows.append(["id"] + list(class_names))
        body = [[ids[i]] + [f"{p:.6g}" for p in probs[i]] for i in _order(ids, fmt.sort)]
    else:
        if fmt.header:
            rows.append(["label", "id"] if fmt.label_first else ["id", "label"])
        best = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
        pairs = [(ids[i], class_names[int(best[i])]) for i in _order(ids, fmt.sort)]
        body = [[label, key] if fmt.label_first else [key, label] for key, label in pairs]
    return rows + body


def submission_text(rows: List[List[str]], fmt: SubmissionFormat = SubmissionFormat()) -> str:
    """The file's text: fields quoted only where needed, '\\n' line ends."""
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=fmt.delimiter, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def write_submission(path, names: Sequence[str], probs: np.ndarray, class_names: Sequence[str],
                     fmt: SubmissionFormat = SubmissionFormat()) -> int:
    """Write the submission atomically (readers see the old file or the new one); returns the data rows."""
    rows = submission_rows(names, probs, class_names, fmt, str(path))
    with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
        handle.write(submission_text(rows, fmt))
    return len(rows) - int(fmt.header)


def add_submission_arguments(p: argparse.ArgumentParser) -> None:
    """The submission options every command that writes one shares."""
    g = p.add_argument_group("submission file")
    g.add_argument("--format", dest="submission_kind", choices=FORMATS, default="probs",
                   help="probs: id + one probability column per class (Kaggle dog breeds); label: id + the "
                        "predicted class name (Kaggle CIFAR-10)")
    g.add_argument("--sort", dest="submission_sort", choices=SORTS, default="none",
                   help="row order: numeric ids (1,2,...,10), ids as text (1,10,11,...,2), or as read")
    g.add_argument("--delimiter", dest="submission_delimiter", default=",", metavar="SEP",
                   help="field separator: ',' 'tab' 'space' or ';'")
    g.add_argument("--no-header", dest="submission_header", action="store_false", help="no header row")
    g.add_argument("--columns", dest="submission_columns", choices=COLUMNS, default="id,label",
                   help="with --format label: column order (Baidu: label,id)")
    g.add_argument("--id", dest="id_mode", choices=ID_MODES, default="auto",
                   help="id column: file stem (auto: when unique), relative path, or row index")


def submission_format(args: argparse.Namespace) -> SubmissionFormat:
    """The SubmissionFormat of parsed add_submission_arguments options."""
    if args.submission_delimiter not in DELIMITERS:
        raise SubmissionError(f"--delimiter {args.submission_delimiter!r}: supported are ',' 'tab' 'space' ';'")
    if args.submission_columns != "id,label" and args.submission_kind != "label":
        raise SubmissionError("--columns label,id goes with --format label")
    return SubmissionFormat(kind=args.submission_kind, sort=args.submission_sort,
                            delimiter=DELIMITERS[args.submission_delimiter], header=args.submission_header,
                            label_first=args.submission_columns == "label,id", id_mode=args.id_mode)
