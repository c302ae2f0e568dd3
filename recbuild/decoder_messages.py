"""Decoder warnings, attributed to the image that caused them.

libjpeg and libpng (inside OpenCV) report recoverable damage ("Corrupt JPEG data: 886 extraneous bytes before
marker 0xd9", "libpng warning: tEXt: CRC error") by printing a line to the C stderr, file descriptor 2, and
still returning pixels; cv2.imdecode passes no status back and Pillow does not surface them either. The one way
to tie such a line to its image is to point fd 2 at a private file for the length of one decode and read back
what was written: `captured_stderr` does that (two dup2 calls per image, a few microseconds).

It needs the decode to be the only writer to fd 2 meanwhile: the packer's workers decode on their one thread
(OpenCV's own thread pool is off there), and verify decodes on its main thread between progress-bar updates.
OpenCV's own log lines ("[ WARN:0@1.2] global loadsave.cpp ...") are not about the data and are left out.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import BinaryIO, Iterator, List, Optional, Tuple

# libpng's complaints about colour-profile metadata (an sRGB profile flagged "known incorrect" by libpng 1.6,
# an iCCP chunk that is too short) leave every pixel intact and are common in files written by older editors:
# they are not damage. A CRC error in any chunk is (the file's bytes changed after it was written).
# OpenCV's logger lines start with "[ WARN:", "[ INFO:" and the like.
_HARMLESS = re.compile(r"^(libpng warning: (iCCP|sRGB|cHRM|gAMA): (?!.*CRC)|\[ ?[A-Z]+:)")
# A captured text longer than this is cut (a stream of warnings says nothing more than its first lines).
_KEEP_CHARS = 300

_sink: Optional[Tuple[int, BinaryIO]] = None


def _sink_file() -> BinaryIO:
    """This process's capture file (a forked child gets its own: the inherited one shares its offset)."""
    global _sink
    if _sink is None or _sink[0] != os.getpid():
        _sink = (os.getpid(), tempfile.TemporaryFile(prefix="recbuild-stderr-"))
    return _sink[1]


@contextlib.contextmanager
def captured_stderr() -> Iterator[List[str]]:
    """Capture what C code writes to fd 2 inside the block; the yielded list receives it, line by line, when
    the block ends (empty when nothing was written)."""
    lines: List[str] = []
    sink = _sink_file()
    fd = sink.fileno()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        yield lines
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        size = os.lseek(fd, 0, os.SEEK_END)
        if size:
            text = os.pread(fd, min(size, 4 * _KEEP_CHARS), 0).decode("utf-8", "replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())
            os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)


def damage_reported(lines: List[str]) -> str:
    """The decoder lines that mean damaged data, joined for an error report ('' when there are none)."""
    bad = [line for line in lines if not _HARMLESS.match(line)]
    text = "; ".join(bad)
    return text if len(text) <= _KEEP_CHARS else text[:_KEEP_CHARS] + " ..."
