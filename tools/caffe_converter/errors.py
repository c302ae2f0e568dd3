"""The converter's three errors, each a ValueError whose message is one line naming the file, layer or line."""
from __future__ import annotations

from typing import Sequence


class CaffeFormatError(ValueError):
    """A Caffe file that cannot be read or does not match its counterpart."""


class ConversionError(ValueError):
    """The net cannot be converted; the message names the layer and what is supported."""


class UnsupportedLayerError(ValueError):
    """A layer (or a setting of a layer) this converter cannot express in MXNet."""


def some_names(names: Sequence[str], limit: int = 8) -> str:
    """'a, b, c, ... (152 more)': a list of layer names short enough for one line."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
