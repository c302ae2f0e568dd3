"""`python -m recbuild verify NAME.rec [...]`: check a packed file end to end; exit 1 on any corruption.

Checks, per .rec:
- NAME.idx exists, every line is "<key>\\t<offset>", keys are unique;
- every record of the .rec is reachable from exactly one .idx line, and every .idx offset is a record start;
- every record's header id equals its .idx key (im2rec writes both from the list index);
- every record's image decodes;
- when NAME.lst is beside it: every listed id is in the .rec or in NAME.errors.tsv (reported failures).
Prints the number of records per class (names from the class map when there is one).
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np

from recbuild.classmap import find_class_map, read_class_map
from recbuild.recordio import RecordIOError, iter_records, unpack_header

# Problems listed in full before "... and N more".
_SHOW = 20


class VerifyResult:
    """Counts and problems found in one .rec."""

    def __init__(self, rec: Path):
        self.rec = rec
        self.records = 0
        self.per_class: Dict[object, int] = collections.Counter()
        self.problems: List[str] = []

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_idx(idx: Path, problems: List[str]) -> Dict[int, int]:
    offsets: Dict[int, int] = {}
    with open(idx, encoding="ascii", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.split("\t")
            try:
                key, off = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                problems.append(f"{idx}:{line_no}: malformed line {line.rstrip()!r}")
                continue
            if key in offsets:
                problems.append(f"{idx}:{line_no}: key {key} appears twice")
            offsets[key] = off
    return offsets


def verify_rec(rec: Path, decode: bool = True, progress: bool = True) -> VerifyResult:
    """Run every check on one .rec (see the module docstring)."""
    rec = Path(rec)
    res = VerifyResult(rec)
    idx = rec.with_suffix(".idx")
    if not rec.is_file():
        res.problems.append(f"{rec}: no such file")
        return res
    if not idx.is_file():
        res.problems.append(f"{idx}: missing (an interrupted pack leaves a .rec without .idx; pack again)")
        return res
    offsets = _read_idx(idx, res.problems)
    key_at = {off: key for key, off in offsets.items()}
    size = rec.stat().st_size
    seen_offsets = set()
    ids = set()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(offsets), desc=f"verify {rec.name}", unit="rec", dynamic_ncols=True)
    with open(rec, "rb") as handle:
        try:
            for off, payload in iter_records(handle, size):
                res.records += 1
                if bar:
                    bar.update(1)
                where = f"{rec} record at offset {off}"
                if off not in key_at:
                    res.problems.append(f"{where}: not referenced by {idx.name}")
                    continue
                seen_offsets.add(off)
                try:
                    header, body = unpack_header(payload)
                except RecordIOError as err:
                    res.problems.append(f"{where}: {err}")
                    continue
                if header.id != key_at[off]:
                    res.problems.append(f"{where}: header id {header.id} != .idx key {key_at[off]}")
                ids.add(header.id)
                label = float(header.label) if header.flag == 0 else float(header.label[0])
                res.per_class[label] += 1
                if decode:
                    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED) if body else None
                    if img is None:
                        res.problems.append(f"{where} (id {header.id}): image does not decode "
                                            f"({len(body)} bytes)")
        except RecordIOError as err:
            res.problems.append(f"{rec}: {err}")
        finally:
            if bar:
                bar.close()
    for off in sorted(set(key_at) - seen_offsets):
        res.problems.append(f"{idx}: key {key_at[off]} points at offset {off}, which is not a record start "
                            f"of {rec.name} ({size} bytes)")
    _check_against_list(rec, ids, res)
    return res


def _check_against_list(rec: Path, ids: set, res: VerifyResult) -> None:
    lst = rec.with_suffix(".lst")
    if not lst.is_file():
        return
    from recbuild.listing import ListError, read_list
    try:
        listed = {e.index for e in read_list(str(lst))}
    except ListError as err:
        res.problems.append(str(err))
        return
    reported = set()
    errors = rec.with_suffix(".errors.tsv")
    if errors.is_file():
        with open(errors, encoding="utf-8", errors="replace") as handle:
            next(handle, None)
            reported = {int(line.split("\t")[0]) for line in handle if line.strip()}
    unaccounted = sorted(listed - ids - reported)
    if unaccounted:
        shown = ", ".join(map(str, unaccounted[:_SHOW]))
        res.problems.append(f"{lst.name}: {len(unaccounted)} listed id(s) neither in {rec.name} nor in "
                            f"{errors.name}: {shown}")
    extra = sorted(ids - listed)
    if extra:
        res.problems.append(f"{rec.name}: {len(extra)} record id(s) not in {lst.name}: "
                            f"{', '.join(map(str, extra[:_SHOW]))}")
    if reported:
        print(f"{rec.name}: {len(reported)} listed image(s) were not packed, as reported in {errors.name}")


def _class_names(rec: Path) -> Optional[List[str]]:
    path = find_class_map(rec)
    if path is None:
        return None
    try:
        return read_class_map(path)
    except ValueError:
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m recbuild verify`: returns 0 when every file is sound, 1 otherwise."""
    p = argparse.ArgumentParser(prog="python -m recbuild verify",
                                description="Check .rec/.idx pairs: index agreement, headers, every image "
                                            "decodes; print counts per class. Exit status 1 on corruption.")
    p.add_argument("recs", nargs="+", help="NAME.rec file(s)")
    p.add_argument("--no-decode", dest="decode", action="store_false", help="skip decoding the images")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a = p.parse_args(argv)
    bad = 0
    for rec in a.recs:
        res = verify_rec(Path(rec), decode=a.decode, progress=a.progress)
        names = _class_names(Path(rec))
        print(f"{rec}: {res.records} records")
        for label, n in sorted(res.per_class.items()):
            li = int(label) if float(label).is_integer() else label
            name = names[li] if names and isinstance(li, int) and 0 <= li < len(names) else None
            print(f"  label {li}{f' ({name})' if name else ''}: {n}")
        for problem in res.problems[:_SHOW]:
            print(f"  CORRUPT: {problem}", file=sys.stderr)
        if len(res.problems) > _SHOW:
            print(f"  ... and {len(res.problems) - _SHOW} more problems", file=sys.stderr)
        if res.ok:
            print(f"{rec}: OK")
        else:
            print(f"{rec}: {len(res.problems)} problem(s) found", file=sys.stderr)
            bad += 1
    return 1 if bad else 0
