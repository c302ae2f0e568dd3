"""`python -m recbuild`: im2rec.py's command line (same flags, same files) plus our extras, and `verify`.

    python -m recbuild --list [--recursive] [--train-ratio R] ... PREFIX ROOT     write PREFIX*.lst
    python -m recbuild [--resize N] [--num-thread N] ... PREFIX ROOT             pack every PREFIX*.lst
    python -m recbuild verify [--quick] PREFIX.rec [...]                         check packed files
    python -m recbuild report PREFIX [--test-folder DIR]                         data health (recbuild.report)
    python -m recbuild --report [...] PREFIX ROOT                                pack, then the data report
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import Optional, Sequence

from recbuild import config as defaults
from recbuild.config import ListConfig, PackConfig

_EPILOG = """\
Beyond im2rec: a class map PREFIX.classes.json is written beside the lists; --labels, --unlabelled and
--stratify build lists from a Kaggle layout, an unlabelled test folder, or per class; packing never drops an
image silently (NAME.errors.tsv beside NAME.rec lists each one with its reason, including images the decoder
reads only with a warning about damaged data) and writes atomically; each list records the folder it was listed
from (NAME.lst.json) and is packed from that folder, so a test list made from test/ is never packed against
train/; NAME.pack.json records the record count,
class histogram and transform. Check packed files record by record with: python -m recbuild verify [--quick]
NAME.rec"""


def build_parser() -> argparse.ArgumentParser:
    """im2rec.py's parser (same names, defaults and meaning) plus the extras, in their own group."""
    p = argparse.ArgumentParser(
        prog="python -m recbuild", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Create image lists, or pack the images of PREFIX*.lst into .rec/.idx files "
                    "(a drop-in for mxnet's tools/im2rec.py).", epilog=_EPILOG)
    p.add_argument("prefix", help="prefix of input/output lst and rec files")
    p.add_argument("root", help="path to folder containing images")
    c = p.add_argument_group("Options for creating image lists")
    c.add_argument("--list", action="store_true",
                   help="create image list(s) PREFIX*.lst by traversing ROOT instead of packing them")
    c.add_argument("--exts", nargs="+", default=list(defaults.EXTS),
                   help="acceptable image suffixes (lower case, with the dot)")
    c.add_argument("--chunks", type=int, default=defaults.CHUNKS, help="number of chunks")
    c.add_argument("--train-ratio", type=float, default=defaults.TRAIN_RATIO,
                   help="ratio of images to use for training")
    c.add_argument("--test-ratio", type=float, default=defaults.TEST_RATIO,
                   help="ratio of images to use for testing")
    c.add_argument("--recursive", action="store_true",
                   help="walk sub-folders and give each folder its own label; otherwise only ROOT's files, "
                        "label 0")
    c.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="keep the listing order instead of shuffling")
    r = p.add_argument_group("Options for creating database")
    r.add_argument("--pass-through", action="store_true",
                   help="store the files as they are, without decoding or transforming them")
    r.add_argument("--resize", type=int, default=defaults.RESIZE,
                   help="resize the shorter edge to this size (0: keep the size)")
    r.add_argument("--center-crop", action="store_true", help="crop the centre square first")
    r.add_argument("--quality", type=int, default=defaults.QUALITY,
                   help="JPEG quality 1-100, or PNG compression 0-9 with --encoding .png")
    r.add_argument("--num-thread", type=int, default=None,
                   help="worker processes (default: all cores); records keep the list order whatever the "
                        "number")
    r.add_argument("--color", type=int, default=defaults.COLOR, choices=[-1, 0, 1],
                   help="1: colour (alpha dropped), 0: greyscale, -1: unchanged (alpha, 16 bit kept)")
    r.add_argument("--encoding", type=str, default=defaults.ENCODING, choices=[".jpg", ".png"],
                   help="encoding of the stored images")
    r.add_argument("--pack-label", action="store_true",
                   help="also pack every label of a multi-label list in the record header")
    x = p.add_argument_group("Beyond im2rec")
    x.add_argument("--labels", metavar="CSV", default=None,
                   help="with --list: ROOT is a flat folder labelled by this 'id,label' CSV (Kaggle layout; "
                        "header row required; the id is the file name with or without suffix). Classes are "
                        "numbered 0..K-1 in sorted order (numerically when every class is an integer, so ids "
                        "0,1,2,10 become labels 0,1,2,3; see --keep-numeric-labels); the class map records it")
    x.add_argument("--label-column", metavar="NAME", default=None,
                   help="with --labels: the header name of the label column; other columns are then ignored "
                        "(without it a CSV with more than the two columns id,label is an error)")
    x.add_argument("--keep-numeric-labels", action="store_true",
                   help="with --labels: integer class ids are the labels as they are (the class map names "
                        "absent ids by their number) instead of being renumbered 0..K-1")
    x.add_argument("--delimiter", default=",", metavar="SEP",
                   help="with --labels: the field separator of the labels file: ',' (CSV), 'tab', or 'space' "
                        "(runs of spaces, e.g. Baidu's '<id> <typeid>' train.txt)")
    x.add_argument("--no-header", dest="header", action="store_false",
                   help="with --labels: the file has no header row; every line is 'id<SEP>label'")
    x.add_argument("--unlabelled", "--unlabeled", action="store_true",
                   help="with --list: ROOT is a flat folder of unlabelled images -> PREFIX_test.lst, label 0; "
                        "integer file stems are kept as record ids")
    x.add_argument("--stratify", action="store_true",
                   help="with --list: split every class with --train-ratio/--test-ratio")
    x.add_argument("--seed", type=int, default=defaults.SHUFFLE_SEED,
                   help="shuffle seed (100 is im2rec's and gives identical lists)")
    x.add_argument("--strict", action="store_true",
                   help="exit with status 1 if any image could not be packed (the report is still written)")
    x.add_argument("--max-pixels", type=int, default=defaults.MAX_PIXELS,
                   help="decompression-bomb guard: refuse images that would decode to more pixels")
    x.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    x.add_argument("--report", action="store_true",
                   help="also fingerprint every image while it is packed (NAME.fingerprints.npy) and then write "
                        "the data report PREFIX.report.json/.html from them, as `python -m recbuild report "
                        "PREFIX` would, without decoding the records again")
    return p


def _list_config(a: argparse.Namespace) -> ListConfig:
    from recbuild.listing import DELIMITERS
    return ListConfig(exts=tuple(a.exts), chunks=a.chunks, train_ratio=a.train_ratio, test_ratio=a.test_ratio,
                      recursive=a.recursive, shuffle=a.shuffle, seed=a.seed, labels_csv=a.labels,
                      label_column=a.label_column, keep_numeric_labels=a.keep_numeric_labels,
                      unlabelled=a.unlabelled, stratify=a.stratify,
                      labels_delimiter=DELIMITERS.get(a.delimiter, a.delimiter), labels_header=a.header)


def _pack_config(a: argparse.Namespace, parser: argparse.ArgumentParser) -> PackConfig:
    if a.resize < 0:
        parser.error(f"--resize must be 0 (keep) or a positive size, got {a.resize}")
    if a.encoding == ".jpg" and not 0 <= a.quality <= 100:
        parser.error(f"--quality for .jpg is 0-100, got {a.quality}")
    quality = a.quality
    if a.encoding == ".png" and quality > 9:
        # im2rec passes its default 95 to OpenCV, which clamps PNG compression to 9; say so instead.
        print(f"note: --quality {quality} with --encoding .png means PNG compression level 9 (the maximum)")
        quality = 9
    if a.encoding == ".png" and quality < 0:
        parser.error(f"--quality for --encoding .png is a compression level 0-9, got {a.quality}")
    if a.num_thread is not None and a.num_thread < 1:
        parser.error(f"--num-thread must be at least 1, got {a.num_thread}")
    if a.max_pixels < 1:
        parser.error(f"--max-pixels must be positive, got {a.max_pixels}")
    workers = a.num_thread if a.num_thread is not None else defaults.default_workers()
    return PackConfig(pass_through=a.pass_through, resize=a.resize, center_crop=a.center_crop,
                      quality=quality, color=a.color, encoding=a.encoding, pack_label=a.pack_label,
                      workers=workers, strict=a.strict, max_pixels=a.max_pixels, progress=a.progress)


def run_list(prefix: str, root: str, cfg: ListConfig) -> int:
    """`--list`: write the lists and the class map, print what was written."""
    from recbuild.classmap import class_map_path, read_class_map
    from recbuild.listing import make_lists
    written = make_lists(prefix, root, cfg)
    for path, n in written:
        print(f"wrote {path} ({n} images)")
    cmap = class_map_path(os.path.abspath(prefix))
    total = sum(n for _, n in written)
    if cfg.unlabelled:
        kept = read_class_map(cmap)
        print(f"Listed {total} unlabelled images (label 0) in {written[0][0]}; class map {cmap} "
              + (f"(kept: the {len(kept)} classes listed under this prefix)." if kept else
                 "(empty: these images have no classes; the model's class names name the predictions)."))
        print(f"Pack it with the other lists of this prefix (it is read from {os.path.abspath(root)}, the folder "
              f"it was listed from), or alone: python -m recbuild [options] {shlex.quote(written[0][0])} "
              f"{shlex.quote(root)}")
        return 0
    classes = read_class_map(cmap)
    for label, name in enumerate(classes):
        print(f"{name} {label}")
    print(f"Listed {total} images in {len(written)} list(s) with {len(classes)} class(es); class map {cmap}.")
    if cfg.labels_csv and not cfg.keep_numeric_labels and all(c.isdigit() for c in classes) and \
            any(int(c) != i for i, c in enumerate(classes)):
        print("Note: the CSV's integer class ids were renumbered 0..K-1 in numeric order (the lines above: id "
              "label); --keep-numeric-labels keeps them as the labels.")
    return 0


def run_pack(prefix: str, root: str, cfg: PackConfig, report: bool = False) -> int:
    """Pack every PREFIX*.lst (im2rec's rule); with `report`, then write the data report. Returns the exit
    status."""
    from recbuild.listing import pack_root
    from recbuild.packing import find_lists, pack_list
    work, lists = find_lists(prefix)
    if not lists:
        print(f"error: no .lst file starting with {os.path.abspath(prefix)} in {work}; create lists with "
              f"--list first", file=sys.stderr)
        return 1
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        print(f"error: image root {root} is not a folder", file=sys.stderr)
        return 1
    failed = 0
    roots = [pack_root(lst, root) for lst in lists]   # every list checked before anything is packed
    for lst, (list_root, note) in zip(lists, roots):
        if note:
            print(note)
        print(f"Creating .rec file from {lst} in {work} ({cfg.workers} worker(s))")
        packed = pack_list(lst, list_root, cfg, out_dir=work, fingerprints=report)
        print(packed.summary())
        failed += len(packed.failed)
    status = 0
    if report:
        from recbuild.report import report_after_packing
        status = report_after_packing(prefix)
    if failed and cfg.strict:
        print(f"error: --strict: {failed} image(s) could not be packed (see the .errors.tsv report(s))",
              file=sys.stderr)
        return 1
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `python -m recbuild`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if argv[:1] == ["verify"]:
        from recbuild.integrity import main as verify_main
        return verify_main(argv[1:])
    if argv[:1] == ["report"]:
        from recbuild.report import main as report_main
        return report_main(argv[1:])
    from recbuild.listing import ListError
    from recbuild.publish import PrefixBusy, PublishError, output_error_line
    from recbuild.recordio import RecordIOError
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.report and a.list:
        parser.error("--report goes with packing (PREFIX ROOT without --list); list first, then pack with it")
    try:
        if a.list:
            return run_list(a.prefix, a.root, _list_config(a))
        if a.labels or a.unlabelled or a.stratify:
            parser.error("--labels, --unlabelled and --stratify build lists: add --list")
        return run_pack(a.prefix, a.root, _pack_config(a, parser), a.report)
    except (ListError, RecordIOError, PrefixBusy, PublishError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # disk full, read-only folder, an output path that is a folder, ...
        print(output_error_line(err), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no .rec/.idx was completed by this run; run the same command again",
              file=sys.stderr)
        return 130
