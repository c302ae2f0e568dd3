"""The class map: label index -> class name, written beside every set of lists.

File: `<list prefix>.classes.json`, e.g. `out/rec/demo.classes.json` beside `out/rec/demo_train.lst`.
Content: {"format": "mxtransfer.classmap/1", "classes": ["name of label 0", "name of label 1", ...]}.
Every later stage (trainer, predictor, deploy bundle) finds it from a .lst/.rec/.idx path with
`find_class_map`, so class names are never re-derived from a folder listing.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional, Sequence

from recbuild.atomic import write_json

FORMAT = "mxtransfer.classmap/1"
SUFFIX = ".classes.json"
# im2rec names its lists PREFIX[_CHUNK][_train|_val|_test].lst; these are stripped to find PREFIX.
_SPLIT_SUFFIX = re.compile(r"_(train|val|test)$")
_CHUNK_SUFFIX = re.compile(r"_\d+$")


def class_map_path(list_prefix) -> Path:
    """Where the class map of lists made with `--list PREFIX` lives."""
    return Path(str(list_prefix) + SUFFIX)


def write_class_map(list_prefix, classes: Sequence[str]) -> Path:
    """Write the class map for `list_prefix` atomically and return its path."""
    path = class_map_path(list_prefix)
    write_json(path, {"format": FORMAT, "classes": list(classes)})
    return path


def read_class_map(path) -> List[str]:
    """Read a class map file; the list index is the label."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: JSON nested deeper than Python recurses
        raise ValueError(f"{path}: not a readable class map ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("classes"), list):
        raise ValueError(f"{path}: not a class map; expected {{\"format\": \"{FORMAT}\", \"classes\": [...]}}")
    return [str(c) for c in data["classes"]]


def find_class_map(data_path) -> Optional[Path]:
    """Find the class map that belongs to a .lst/.rec/.idx file, or None.

    Tries `<stem>.classes.json`, then strips a split suffix (_train/_val/_test) and a chunk suffix (_0, _1 ...)
    the way im2rec builds list names.
    """
    path = Path(data_path)
    stem = path.name
    for ext in (".lst", ".rec", ".idx"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    candidates = [stem]
    stripped = _SPLIT_SUFFIX.sub("", stem)
    candidates.append(stripped)
    candidates.append(_CHUNK_SUFFIX.sub("", stripped))
    for candidate in dict.fromkeys(candidates):
        found = path.with_name(candidate + SUFFIX)
        if found.is_file():
            return found
    return None
