"""File names as text: the one rule for names that are not valid UTF-8.

On POSIX a file name is bytes; Python hands a name that is not valid UTF-8 over as a str holding "surrogate
escapes" (PEP 383), which round-trips to the file system but cannot be written to a UTF-8 file: the CSV or
report that contains it fails at the write, naming nothing. Such a name is written escaped instead, each byte
that is not UTF-8 as `\\xNN` (`bad\\xff.jpg`), and named in a warning once per process. Files that must name the
file system exactly (the .lst, which the packer opens) keep the bytes as they are.
"""
from __future__ import annotations

import logging
from typing import Iterable, List, Set

log = logging.getLogger(__name__)

_warned: Set[str] = set()


def is_utf8(name: str) -> bool:
    """Whether `name` is valid UTF-8 text (no surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display_name(name: str) -> str:
    """`name` as valid UTF-8 text: unchanged when it is, else each byte that is not UTF-8 written as \\xNN."""
    if is_utf8(name):
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def escaped_names(names: Iterable[str], where: str) -> List[str]:
    """display_name of each name; every name that had to be escaped is warned about once, saying `where` it is
    written (e.g. the CSV's path)."""
    out = []
    for name in names:
        shown = display_name(name)
        if shown != name and name not in _warned:
            _warned.add(name)
            log.warning("%s: the file name is not valid UTF-8; written to %s as %r", shown, where, shown)
        out.append(shown)
    return out
