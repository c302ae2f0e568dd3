"""Pack a .lst into .rec/.idx: worker processes, records in list order, atomic output, an error report.

Output for `NAME.lst` (im2rec's naming, in the list's folder):
- `NAME.rec`, `NAME.idx`: written under temporary names and published with the rest of the set only when every
  record is written (recbuild.publish: staged files, a commit journal, then the renames), so a killed or failed
  run leaves the whole previous set or the whole new one; a re-run removes the leftovers of dead runs. One packer
  at a time per NAME: a second is refused naming the first (the `.NAME.lock` beside the outputs).
- `NAME.crc32`: the CRC32 of every record's payload, by key (recbuild.recordio), for `verify`.
- `NAME.fingerprints.npy` (with --report): every record's size, digests, perceptual hash and thumbnail, computed
  by the workers from the image they just transformed (recbuild/fingerprints.py), so the data report needs no
  second decode.
- `NAME.pack.json`: record count, class histogram, label width and the transform (recbuild/packinfo.py), renamed
  into place last; it names NAME.crc32 and NAME.fingerprints.npy.
- `NAME.errors.tsv`: one line per image that could not be packed (index, path, reason), written whenever
  anything failed; an earlier run's report (and fingerprints) is removed with the publication of the new set. Failed images are never silently missing:
  the summary counts them and --strict makes the run fail.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from recbuild import config as defaults
from recbuild.config import PackConfig
from recbuild.fingerprints import FORMAT as FINGERPRINTS_FORMAT, ROW, fingerprints_path, image_row, \
    write_fingerprints
from recbuild.listing import Entry, ListError, read_list
from recbuild.packinfo import describe, write_pack_info
from recbuild.recordio import RecordWriter, checksums_path, encode_checksums, pack_header
from recbuild.atomic import atomic_open
from recbuild.publish import publish
from recbuild.workers import run_alone, run_tasks

log = logging.getLogger(__name__)

# (position in the list, record payload or None, reason or None, fingerprint row part or None)
Result = Tuple[int, Optional[bytes], Optional[str], Optional[tuple]]


@dataclass
class PackReport:
    """What one .lst produced.

    Attributes:
        lst, rec, idx: the paths involved.
        total: entries in the list.
        packed: records written.
        failed: [(entry, reason)] for every image that was not packed.
        errors_path: the error report, or None when nothing failed.
        seconds: wall time.
        rec_bytes: size of the .rec.
    """
    lst: Path
    rec: Path
    idx: Path
    total: int
    packed: int = 0
    failed: List[Tuple[Entry, str]] = field(default_factory=list)
    errors_path: Optional[Path] = None
    seconds: float = 0.0
    rec_bytes: int = 0

    def summary(self) -> str:
        """One paragraph for the end of a run."""
        rate = self.packed / self.seconds if self.seconds > 0 else 0.0
        text = (f"{self.lst.name}: packed {self.packed} of {self.total} images into {self.rec} "
                f"({self.rec_bytes / 2**20:.1f} MiB) and {self.idx.name} in {self.seconds:.1f} s "
                f"({rate:.0f} img/s).")
        if self.failed:
            reasons = collections.Counter(r.split(":")[0].split(" (")[0] for _, r in self.failed)
            common = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3))
            text += (f" {len(self.failed)} image(s) could not be packed ({common}); every one is listed with "
                     f"its reason in {self.errors_path}.")
        else:
            text += " Every image was packed."
        return text


def errors_path_for(rec: Path) -> Path:
    """The error report of a .rec: NAME.errors.tsv beside NAME.rec."""
    return rec.with_suffix(".errors.tsv")


# ---- worker side -----------------------------------------------------------------------------------------------

_worker_cfg: Optional[PackConfig] = None
_worker_fingerprints = False


def _init_worker(cfg: PackConfig, fingerprints: bool = False) -> None:
    global _worker_cfg, _worker_fingerprints
    _worker_cfg, _worker_fingerprints = cfg, fingerprints
    import cv2
    # One OpenCV thread per process: the parallelism is the worker processes; OpenCV's own pool would
    # oversubscribe the cores (measured: ~10% slower at 2 workers on 2 cores).
    cv2.setNumThreads(1)
    # libjpeg's "Corrupt JPEG data" warnings would interleave with the progress bar; failures are reported.
    with contextlib.suppress(Exception):
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _pack_one(pos: int, entry: Entry, root: str, cfg: PackConfig, fingerprints: bool = False) -> Result:
    """One image: its record, or the reason it has none; with `fingerprints`, also its fingerprint (of the
    array just encoded: no second decode, see recbuild/fingerprints.py)."""
    from recbuild.images import ImageError, load_image
    path = os.path.join(root, entry.path)
    try:
        header = pack_header(entry.labels, entry.index, cfg.pack_label)
        body, encoded_from = load_image(path, cfg)
        payload = header + body
        if len(payload) > defaults.MAX_RECORD_BYTES:
            return pos, None, f"record of {len(payload)} bytes exceeds RecordIO's 512 MiB limit", None
        return pos, payload, None, image_row(body, encoded_from) if fingerprints else None
    except ImageError as err:
        return pos, None, str(err), None
    except MemoryError:
        return pos, None, "out of memory while decoding (lower --max-pixels or use fewer --num-thread)", None
    except Exception as err:  # noqa: BLE001 - one odd file must not kill a million-image run; it is reported
        return pos, None, f"unexpected {type(err).__name__}: {err}", None


def _pack_batch(task: Tuple[Sequence[Tuple[int, Entry]], str]) -> List[Result]:
    batch, root = task
    return [_pack_one(pos, entry, root, _worker_cfg, _worker_fingerprints) for pos, entry in batch]


# ---- parent side -----------------------------------------------------------------------------------------------

_cv2_imported_here = False


def _start_method() -> str:
    """fork when it is safe, else forkserver.

    fork starts workers in milliseconds and lets them share the parent's imported OpenCV (importing it costs
    each worker ~0.5 s, a fifth of a 500-image run). It is safe only while the parent runs no threads a
    child could inherit half-way: mxnet's engine, or an OpenCV thread pool that a library caller created by
    using cv2 before calling us. So: fork when mxnet is absent and cv2 was absent until we imported it.
    """
    global _cv2_imported_here
    if "mxnet" in sys.modules:
        return "forkserver"
    if "cv2" not in sys.modules:
        import cv2  # noqa: F401  (imported once here, inherited by every forked worker)
        _cv2_imported_here = True
    return "fork" if _cv2_imported_here else "forkserver"


def _results(entries: Sequence[Entry], root: str, cfg: PackConfig, fingerprints: bool = False
             ) -> Iterator[Result]:
    """Yield results in list order, computed by cfg.workers processes with a bounded number in flight.

    A worker that dies (a decoder crashing on a hostile file) costs only the batch it held: those images are
    redone one at a time, each in a fresh process, so the crash is pinned on its image, reported, and the run
    goes on (recbuild/workers.py).
    """
    items = list(enumerate(entries))
    if not items:
        return
    tasks = [(items[i:i + defaults.BATCH_SIZE], root) for i in range(0, len(items), defaults.BATCH_SIZE)]
    ctx = multiprocessing.get_context(_start_method())
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["recbuild.images"])

    def one_at_a_time(task) -> List[Result]:
        batch, _ = task
        out: List[Result] = []
        for item in batch:
            result = run_alone(([item], root), _pack_batch, ctx, _init_worker, (cfg, fingerprints))
            out.extend(result if result is not None else
                       [(item[0], None, "the decoder crashed its worker process (corrupt or hostile file)", None)])
        return out

    for results in run_tasks(tasks, _pack_batch, cfg.workers, ctx, _init_worker, (cfg, fingerprints),
                             defaults.IN_FLIGHT_PER_WORKER, one_at_a_time):
        yield from results


def pack_list(lst: Path, root: str, cfg: PackConfig, out_dir: Optional[Path] = None,
              progress: Optional[Callable] = None, fingerprints: bool = False) -> PackReport:
    """Pack the images of one .lst into NAME.rec/NAME.idx (in `out_dir`, default the list's folder).

    Args:
        lst: the list file.
        root: the folder the list's paths are relative to.
        cfg: packing options.
        out_dir: where the outputs go.
        progress: a tqdm-like factory (total=, desc=, unit=) or None for the default (tqdm if cfg.progress).
        fingerprints: also write NAME.fingerprints.npy for the data report (`--report`).

    Returns:
        The report; the caller decides what --strict means for the exit status.

    Raises:
        ListError: the list itself is malformed (nothing is written then).
    """
    lst = Path(lst)
    entries = read_list(str(lst))
    out_dir = Path(out_dir) if out_dir else lst.parent
    rec = out_dir / (lst.stem + ".rec")
    idx = out_dir / (lst.stem + ".idx")
    report = PackReport(lst, rec, idx, total=len(entries))
    # The writer lock of NAME (a second packer is refused) and its settle (a dead run's leftovers) come first.
    with publish(out_dir / lst.stem) as unit:
        if rec.exists() or idx.exists():
            log.info("%s will replace the existing %s/%s once it is complete", lst.name, rec.name, idx.name)
        _pack_into(unit, entries, root, cfg, report, progress, fingerprints)
    return report


def _pack_into(unit, entries: Sequence[Entry], root: str, cfg: PackConfig, report: PackReport,
               progress: Optional[Callable], fingerprints: bool) -> None:
    """Write the set of one list into the publication `unit` (every atomic write below is staged into it and
    renamed with the rest when the caller's block ends)."""
    rec, idx = report.rec, report.idx
    bar = _progress_bar(progress, cfg, len(entries), report.lst.name)
    start = time.perf_counter()
    try:
        with atomic_open(rec, "wb") as rec_handle:
            writer = RecordWriter(rec_handle, checksums=True)
            packed_labels, rows = [], []
            for pos, payload, reason, row in _results(entries, root, cfg, fingerprints):
                if payload is None:
                    report.failed.append((entries[pos], reason))
                    bar.set_postfix(failed=len(report.failed), refresh=False)
                else:
                    writer.write(entries[pos].index, payload)
                    packed_labels.append(entries[pos].labels)
                    if fingerprints:
                        rows.append((entries[pos].index, writer.index[-1][1], entries[pos].labels[0]) + row)
                bar.update(1)
            rec_tmp_size = rec_handle.tell()
        # Staged in rename order: the .idx right after the .rec (stock readers need the pair), what readers of
        # ours check last (the sidecar names the others).
        with atomic_open(idx, "w", encoding="ascii", newline="\n") as idx_handle:
            writer.write_index(idx_handle)
        errs = errors_path_for(rec)
        if report.failed:
            with atomic_open(errs, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as h:
                h.write("index\tpath\treason\n")
                for entry, reason in report.failed:
                    h.write(f"{entry.index}\t{entry.path}\t{reason}\n")
            report.errors_path = errs
        else:
            unit.remove(errs)  # an earlier run's report, removed when the new set is in place
        if not fingerprints:
            unit.remove(fingerprints_path(rec))
        with atomic_open(checksums_path(rec), "wb") as crc_handle:
            crc_handle.write(encode_checksums(writer.checksums))
        info = describe(rec, rec_tmp_size, packed_labels, cfg)
        info["payload_crc32"] = checksums_path(rec).name
        if fingerprints:
            written = write_fingerprints(rec, np.array(rows, ROW) if rows else np.zeros(0, ROW))
            info["fingerprints"] = {"file": written.name, "format": FINGERPRINTS_FORMAT}
        write_pack_info(rec, info)
    finally:
        bar.close()
    report.packed = len(writer.index)
    report.seconds = time.perf_counter() - start
    report.rec_bytes = rec_tmp_size


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def _progress_bar(factory, cfg: PackConfig, total: int, desc: str):
    if factory is not None:
        return factory(total=total, desc=desc, unit="img")
    if not cfg.progress:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1)


def find_lists(prefix: str) -> Tuple[Path, List[Path]]:
    """im2rec's rule: every .lst in PREFIX's folder (PREFIX itself when it is a folder) whose path starts
    with PREFIX. Returns (working folder, sorted lists)."""
    prefix = os.path.abspath(prefix)
    work = Path(prefix if os.path.isdir(prefix) else os.path.dirname(prefix))
    if not work.is_dir():
        raise ListError(f"{work}: folder of PREFIX {prefix} does not exist")
    lists = sorted(p for p in work.iterdir()
                   if p.is_file() and str(p).startswith(prefix) and p.name.endswith(".lst"))
    return work, lists
