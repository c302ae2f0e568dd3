"""Parsers for list-valued command-line options, shared by every CLI of the project.

They live on the mxnet-free ground floor so the converter, the trainer and the tools parse `--mean 104,117,123`
or `--gpus 0,1` with one rule: items separated by commas (blanks around them ignored), each converted by `kind`.
"""
from __future__ import annotations

import argparse
import re
from typing import Callable, Tuple


def parse_list(text: str, kind: Callable = float, what: str = "numbers") -> tuple:
    """'1,2,3' -> (1.0, 2.0, 3.0) (or ints with kind=int); blanks around commas are ignored.

    Raises:
        ValueError: an item is not a `kind`, naming the text.
    """
    try:
        return tuple(kind(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated {what}, got {text!r}") from None


def parse_floats(text: str) -> Tuple[float, ...]:
    return parse_list(text, float, "numbers")


def parse_ints(text: str) -> Tuple[int, ...]:
    return parse_list(text, int, "integers")


def checked_type(parse: Callable) -> Callable:
    """An argparse `type=` from a parser: argparse shows a type function's ValueError as 'invalid value';
    this keeps our message instead."""
    def run(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    run.__name__ = getattr(parse, "__name__", "value")
    return run


def parse_suffixes(text: str) -> Tuple[str, ...]:
    """One word of `--exts` -> file suffixes: '.jpg', '.jpg,.png', or the Python-list form old posts use,
    `--exts=['.jpg','.png']`, which argparse hands over as one word and im2rec.py takes as one suffix that matches
    nothing.

    Raises:
        ValueError: a suffix that can never match (im2rec compares the lower-cased suffix, dot included).
    """
    items = [v.strip("'\"") for v in re.split(r"[\s,]+", text.strip().strip("[]()")) if v.strip("'\"")]
    bad = [v for v in items if not v.startswith(".") or len(v) < 2 or v != v.lower()]
    if not items or bad:
        raise ValueError(f"expected lower-case file suffixes with the dot, such as .jpg .png, got {text!r} "
                         "(a file's suffix is lower-cased before it is compared)")
    return tuple(items)


class FlatSuffixes(argparse.Action):
    """`nargs="+"` of parse_suffixes words, flattened into one list: `--exts .jpg .png`, `--exts .jpg,.png` and
    `--exts=['.jpg','.png']` all give ['.jpg', '.png']."""
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [suffix for word in values for suffix in word])
