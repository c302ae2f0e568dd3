"""Predict with a trained checkpoint, or evaluate it on a labelled .rec.

    python -m train.predict PREFIX EPOCH INPUT --out predictions.csv [--top-k 3] [--mirror]
    python -m train.predict evaluate PREFIX EPOCH LABELLED.rec [--top-k 5] [--mirror] [--json metrics.json]
    python -m train.predict report PREFIX EPOCH LABELLED.rec --out DIR    (train.report: confusion, top losses)

INPUT is a .rec file, an im2rec .lst (paths relative to --root, default the list's folder) or an image folder
(searched recursively). Preprocessing comes from the checkpoint's sidecar: a .rec is read with the same
ImageRecordIter set-up as validation during training (centre crop of the packed image); loose images are
resized (shorter side to the input size, or --resize) and centre-cropped the same way.

Outputs (both atomic):
  --out CSV            the submission (train/predict/submission.py): by default `id` + one probability column
                       per class in class-map order; --format label, --sort, --delimiter, --no-header, --columns
  CSV stem + .topk.csv `id`, then label_1..label_k and prob_1..prob_k, most likely first
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from recbuild.atomic import atomic_open
from recbuild.publish import publish
from recbuild.classmap import find_class_map, read_class_map
from recbuild.listing import Entry, ListError, read_list
from symbols.checkpoint import CheckpointError, load_checkpoint, resolve_epoch  # noqa: F401 (cli, report use it)
from symbols.classes import ClassNamesError, model_class_names
from symbols.sidecar import Preprocess, has_sidecar, load_sidecar, plain_checkpoint_sidecar, sidecar_path
from train.config import checked_type, parse_floats, parse_gpus, parse_ints
from train.data import DataError, check_same_classes, load_raw_image, record_count, record_iter, scan_headers
from train.metrics import Tally
from train.predict.submission import (SubmissionFormat, add_submission_arguments, submission_ids,
                                      write_submission)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_BATCH = 32
DEFAULT_TOP_K = 3


class PredictError(ValueError):
    """Bad input to prediction; the message names the file and what is expected."""


@dataclass
class Model:
    """A checkpoint bound for inference, with its preprocessing and class names."""

    module: mx.mod.Module
    pre: Preprocess
    sidecar_dir: Path
    class_names: List[str]
    batch_size: int


def load_model(prefix: str, epoch: int, batch_size: int = DEFAULT_BATCH, ctx: Optional[List[mx.Context]] = None,
               classes_file: Optional[str] = None, image_shape: Optional[Sequence[int]] = None,
               rgb_mean: Optional[Sequence[float]] = None, rgb_std: Optional[Sequence[float]] = None) -> Model:
    """Load PREFIX-symbol.json + PREFIX-EPOCH.params with stock Module and the sidecar.

    A plain MXNet checkpoint (no sidecar: a model-zoo model, a fine-tune.py output) is read under fine-tune.py's
    assumptions (symbols.sidecar.plain_checkpoint_sidecar; `image_shape`, `rgb_mean`, `rgb_std` override
    them), said in one log line; with a sidecar those three must not be given (the sidecar says how).

    Class names have one source of truth per thing named: the sidecar's `class_names` for a model (the trainer
    writes them), the class map `PREFIX.classes.json` for a data set. `classes_file` (a class map, or a
    .lst/.rec beside one) names the columns of a model whose sidecar has none (a converted model); given for a
    model that has names, it must agree (symbols.classes.model_class_names, shared with tools/deploy.py).
    """
    try:
        sym, args, aux = load_checkpoint(prefix, epoch, "checkpoint")
    except CheckpointError as err:
        raise PredictError(str(err)) from None
    if has_sidecar(prefix):
        given = [flag for flag, value in (("--image-shape", image_shape), ("--rgb-mean", rgb_mean),
                                          ("--rgb-std", rgb_std)) if value]
        if given:
            raise PredictError(f"{' '.join(given)}: {sidecar_path(prefix)} says how this model is fed; those flags "
                               f"are for a plain checkpoint without a sidecar")
        pre = load_sidecar(prefix)
    else:
        pre = plain_checkpoint_sidecar(sym.tojson(), image_shape, rgb_mean, rgb_std, prefix=str(prefix))
        log.warning("%s", pre.source["assumed"])  # predict logs warnings only; this must be seen
    # The training symbol ends in SoftmaxOutput: name its label so Module does not take it for a weight.
    labels = [n for n in sym.list_arguments() if n == f"{pre.output_name}_label"]
    module = mx.mod.Module(sym, data_names=["data"], label_names=labels or None, context=ctx or [mx.cpu()])
    with warnings.catch_warnings():  # "label_shapes don't match": no label is needed to predict
        warnings.simplefilter("ignore", UserWarning)
        module.bind(data_shapes=[("data", (batch_size,) + tuple(pre.input_shape))], for_training=False)
    module.set_params(args, aux, allow_missing=False, allow_extra=True)
    num_outputs = module.output_shapes[0][1][1]
    try:
        names = model_class_names(pre.class_names, sidecar_path(prefix), classes_file, num_outputs)
    except ClassNamesError as err:  # a class-map problem, reported like the data's (check_data_classes)
        raise DataError(str(err)) from None
    return Model(module, pre, Path(str(prefix)).parent, names, batch_size)


def _forward(model: Model, data: np.ndarray, mirror: bool) -> np.ndarray:
    """Probabilities for a (N, C, H, W) model-input batch, N <= batch size; with mirror TTA the mean of the
    image's and its mirror image's (the raw pixels mirrored, then mean/std: Preprocess.mirror_input)."""
    n = data.shape[0]
    if n < model.batch_size:  # pad the last batch; padded rows are dropped below
        data = np.concatenate([data, np.zeros((model.batch_size - n,) + data.shape[1:], data.dtype)])
    views = [data, model.pre.mirror_input(data, model.sidecar_dir)] if mirror else [data]
    probs = 0
    for view in views:
        model.module.forward(mx.io.DataBatch([mx.nd.array(np.ascontiguousarray(view))]), is_train=False)
        probs = probs + model.module.get_outputs()[0].asnumpy()
    return (probs / len(views))[:n]


# ---- inputs ---------------------------------------------------------------------------------------------------
def _load_image(path: Path, pre: Preprocess, resize: int) -> np.ndarray:
    """One raw image prepared exactly as the training .rec was packed, then centre-cropped (train.data)."""
    try:
        return load_raw_image(path, pre, resize)
    except DataError as err:
        raise PredictError(f"{err} (supported: {', '.join(IMAGE_EXTENSIONS)})") from None


def check_data_classes(model: Model, source: Path) -> None:
    """The class map of the input data (beside a .rec/.lst) must be the model's class names, in order.

    Raises:
        DataError: naming the model's sidecar, the data's class map and the first difference.
    """
    found = find_class_map(source) if source.is_file() else None
    data_classes = read_class_map(found) if found is not None else []
    # An empty map is an unlabelled test folder listed under its own prefix: it has no classes to disagree.
    if data_classes and model.pre.class_names:
        check_same_classes(model.pre.class_names, f"the model's sidecar ({model.sidecar_dir})",
                           data_classes, str(found))


def _image_paths(source: Path, root: Optional[Path]) -> Tuple[List[Path], List[str], Optional[List[float]]]:
    """(paths, relative names, labels or None) of an image folder or an im2rec .lst."""
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise PredictError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        return paths, [p.relative_to(source).as_posix() for p in paths], None
    base = root or source.parent
    entries = _read_list(source)
    return [base / e.path for e in entries], [e.path for e in entries], [e.labels[0] for e in entries]


def _read_list(path: Path) -> List[Entry]:
    """recbuild's .lst reader (the one home of the format), its errors as PredictError."""
    try:
        return read_list(str(path))
    except ListError as err:
        raise PredictError(str(err)) from None


def iterate(model: Model, source: Path, mirror: bool = False, resize: int = -1, root: Optional[Path] = None
            ) -> Iterator[Tuple[List[str], np.ndarray, Optional[np.ndarray]]]:
    """Yield (names, probabilities, labels or None) batch by batch for a .rec, .lst or image folder.

    `resize` > 0 overrides the iterator resize the model was trained with (its sidecar's `packing`).
    """
    check_data_classes(model, source)
    if resize <= 0 and model.pre.packing:
        resize = int(model.pre.packing.get("iterator_resize", -1))
    if source.suffix == ".rec":
        it = record_iter(source, model.batch_size, model.pre, model.sidecar_dir, "label", train=False,
                         resize=resize)
        lst = source.with_suffix(".lst")
        by_index = {e.index: e.path for e in _read_list(lst)} if lst.is_file() else {}
        # Unshuffled and in one part, the iterator yields records in file order: ids come from the headers.
        record_ids = scan_headers(source)[1]
        seen = 0
        for batch in it:
            keep = batch.data[0].shape[0] - batch.pad
            data = batch.data[0].asnumpy()[:keep]
            names = [by_index.get(int(i), str(int(i))) for i in record_ids[seen:seen + keep]]
            seen += keep
            yield names, _forward(model, data, mirror), batch.label[0].asnumpy()[:keep]
        if seen != len(record_ids):
            raise PredictError(f"{source}: read {seen} of {len(record_ids)} records; is the file damaged?")
        return
    if not source.exists():
        raise PredictError(f"{source}: no such file or folder (expected a .rec, an im2rec .lst or an image folder)")
    if source.is_file() and source.suffix != ".lst":
        raise PredictError(f"{source}: unsupported input; give a .rec, an im2rec .lst or an image folder")
    paths, names, labels = _image_paths(source, root)
    for start in range(0, len(paths), model.batch_size):
        chunk = paths[start:start + model.batch_size]
        rgb = np.stack([_load_image(p, model.pre, resize) for p in chunk])
        data = model.pre.apply(rgb, model.sidecar_dir)
        yield (names[start:start + len(chunk)], _forward(model, data, mirror),
               None if labels is None else np.asarray(labels[start:start + len(chunk)], np.float32))


def input_count(source: Path, root: Optional[Path] = None) -> Optional[int]:
    """How many images `iterate` yields for `source` (the progress bar's total); None when it cannot be read,
    which `iterate` then reports."""
    try:
        if source.suffix == ".rec":
            return record_count(source)
        return len(_image_paths(source, root)[0]) if source.exists() else None
    except (PredictError, DataError, OSError, ValueError):
        return None


def predict(model: Model, source: Path, out: Path, top_k: int = DEFAULT_TOP_K, mirror: bool = False,
            resize: int = -1, root: Optional[Path] = None, id_mode: str = "auto", progress: bool = True,
            fmt: Optional[SubmissionFormat] = None) -> dict:
    """Write the submission (train.predict.submission: by default id + probabilities in class-map order) and
    the top-k CSV as one unit (recbuild.publish: both or neither replace the earlier pair; one writer per OUT);
    return a summary. `fmt` (its id_mode wins over `id_mode`) chooses the submission's layout."""
    out = Path(out)
    with publish(out.with_name(out.stem)):  # OUT.csv and OUT.topk.csv, staged in OUT's folder
        return _predict(model, source, out, top_k, mirror, resize, root, fmt or SubmissionFormat(id_mode=id_mode),
                        progress)


def _predict(model: Model, source: Path, out: Path, top_k: int, mirror: bool, resize: int, root: Optional[Path],
             fmt: SubmissionFormat, progress: bool) -> dict:
    from tqdm import tqdm
    names: List[str] = []
    chunks: List[np.ndarray] = []
    bar = tqdm(total=input_count(source, root) if progress else None, unit="img", desc="predict",
               disable=not progress)
    for batch_names, probs, _ in iterate(model, source, mirror, resize, root):
        names += batch_names
        chunks.append(probs)
        bar.update(len(batch_names))
    bar.close()
    probs = np.concatenate(chunks) if chunks else np.zeros((0, len(model.class_names)), np.float32)
    ids = submission_ids(names, fmt.id_mode, where=str(out))
    write_submission(out, names, probs, model.class_names, fmt)
    k = min(top_k, len(model.class_names))
    order = np.argsort(-probs, axis=1)[:, :k]
    topk_path = out.with_name(out.stem + ".topk.csv")
    with atomic_open(topk_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id"] + [f"label_{i + 1}" for i in range(k)] + [f"prob_{i + 1}" for i in range(k)])
        for key, idx, row in zip(ids, order, probs):
            writer.writerow([key] + [model.class_names[j] for j in idx] + [f"{row[j]:.6g}" for j in idx])
    return {"images": len(ids), "csv": str(out), "topk_csv": str(topk_path)}


def labelled_batches(model: Model, source: Path, mirror: bool = False, resize: int = -1,
                     root: Optional[Path] = None, needs: str = "evaluate"
                     ) -> Iterator[Tuple[List[str], np.ndarray, np.ndarray]]:
    """`iterate` over labelled data, each batch's labels checked: present, and classes of the model.

    Raises:
        PredictError: `source` has no labels (`needs` says who needed them), or a label is not a model class.
    """
    for names, probs, labels in iterate(model, source, mirror, resize, root):
        if labels is None:
            raise PredictError(f"{source}: {needs} needs labels (a .rec or .lst)")
        if labels.max(initial=0) >= len(model.class_names):
            raise PredictError(f"{source}: label {int(labels.max())} is outside the model's "
                               f"{len(model.class_names)} classes")
        yield names, probs, labels


def evaluate(model: Model, source: Path, top_k: int = 5, mirror: bool = False, resize: int = -1) -> dict:
    """Accuracy, top-k accuracy and log loss (Kaggle's, probabilities clipped to 1e-15) on labelled data."""
    top_k = top_k if top_k < len(model.class_names) else 0  # top-k of all classes is always 1
    tally = Tally(top_k)
    per_class = np.zeros((len(model.class_names), 2), np.int64)
    for _, probs, labels in labelled_batches(model, source, mirror, resize):
        tally.update(probs, labels)
        hits = probs.argmax(1) == labels.astype(np.int64)
        np.add.at(per_class, (labels.astype(np.int64), 0), hits.astype(np.int64))
        np.add.at(per_class, (labels.astype(np.int64), 1), 1)
    if tally.n == 0:
        raise PredictError(f"{source}: no records")
    figures = tally.result()
    result = {"images": tally.n, "accuracy": figures["accuracy"], "log_loss": figures["loss"]}
    if top_k > 1:
        result[f"top_{top_k}_accuracy"] = figures[f"top_{top_k}_accuracy"]
    result["per_class_accuracy"] = {name: (int(c) / int(n) if n else None)
                                    for name, (c, n) in zip(model.class_names, per_class)}
    return result


# ---- CLI ------------------------------------------------------------------------------------------------------
def trained_resize(prefix: str) -> int:
    """The --resize the checkpoint was trained with, for models whose sidecar does not record it (from
    PREFIX-config.json), so prediction crops alike."""
    path = Path(f"{prefix}-config.json")
    try:
        return int(json.loads(path.read_text(encoding="utf-8")).get("resize", -1))
    except (OSError, ValueError, TypeError):
        return -1


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every form of `python -m train.predict` shares (predict, evaluate, report): which model,
    and how it sees its input."""
    p.add_argument("prefix", help="checkpoint prefix (PREFIX-symbol.json, PREFIX-NNNN.params, sidecar)")
    p.add_argument("epoch", help="checkpoint epoch, or 'latest'")
    p.add_argument("--mirror", action="store_true", help="test-time augmentation: average with the mirror image")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--resize", type=int, default=-1,
                   help="shorter side before the centre crop (default: the training run's --resize)")
    p.add_argument("--gpus", type=checked_type(parse_gpus), default=[], help="e.g. 0 (default CPU)")
    p.add_argument("--image-shape", type=checked_type(parse_ints), default=None, metavar="C,H,W",
                   help="a plain checkpoint (no sidecar) only: its input (default fine-tune.py's 3,224,224)")
    p.add_argument("--rgb-mean", type=checked_type(parse_floats), default=None, metavar="R,G,B",
                   help="a plain checkpoint only: the mean (default fine-tune.py's 123.68,116.779,103.939)")
    p.add_argument("--rgb-std", type=checked_type(parse_floats), default=None, metavar="R,G,B",
                   help="a plain checkpoint only: the std (default fine-tune.py's 1,1,1)")
    p.add_argument("--classes", default=None,
                   help="class map (or a .lst/.rec beside one) naming the columns of a model whose sidecar has "
                        "no class names; for a model that has them it must agree")


def build_parser(evaluating: bool = False) -> argparse.ArgumentParser:
    """The `python -m train.predict` command line, or with `evaluating` its `evaluate` form (the arguments after
    the word `evaluate`)."""
    p = argparse.ArgumentParser(prog="python -m train.predict" + (" evaluate" if evaluating else ""),
                                description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    if evaluating:
        p.add_argument("data", type=Path, help="labelled .rec (or .lst)")
        p.add_argument("--top-k", type=int, default=5)
        p.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    else:
        p.add_argument("data", type=Path, help=".rec, im2rec .lst or image folder")
        p.add_argument("--out", type=Path, required=True, help="Kaggle-style CSV to write")
        p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
        p.add_argument("--root", type=Path, default=None, help="image root of a .lst (default: its folder)")
        add_submission_arguments(p)
    return p
