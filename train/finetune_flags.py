"""fine-tune.py's 65 flags (MXNet 1.9.1 example/image-classification: fine-tune.py, common/fit.py, common/data.py),
each with fine-tune.py's default (after its `set_defaults`), ours, and what the flag does in `python -m train`.

This is the table tests/test_finetune_flags.py drives through `python -m train`'s parser, and the source of the
table in docs/finetune-migration.md. `differs` says why our default is not fine-tune.py's, where it is not.
`sample` is a value the test passes to show the flag is accepted ('' for none needed).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple


class Flag(NamedTuple):
    flag: str
    finetune_default: object
    ours: object
    sample: str
    meaning: str
    differs: Optional[str] = None


_SIDECAR = ("the converter's sidecar records the model's own value, which is used; a checkpoint without a sidecar "
            "gets fine-tune.py's value")
_REQUIRED = "required here (fine-tune.py fails later without it)"

FLAGS: Tuple[Flag, ...] = (
    # ---- fine-tune.py ----
    Flag("--pretrained-model", None, "", "m/vgg16", "PREFIX of the pretrained checkpoint", _REQUIRED),
    Flag("--layer-before-fullc", "flatten0", None, "flatten0",
         "the new head is attached after this layer's output",
         "the sidecar's (or VGG's) declared head; a converted VGG has no flatten0"),
    # ---- common/fit.py ----
    Flag("--network", None, None, "vgg", "the network is the checkpoint's; picks --initializer default's "
         "distribution (alexnet: Normal, vgg*: Xavier) and warns"),
    Flag("--num-layers", None, None, "16", "the checkpoint's network is used as it is; warns"),
    Flag("--gpus", None, None, "0", "GPU ids; empty: CPU (see also --cpus)"),
    Flag("--kv-store", "device", "device", "local_allreduce_device",
         "every mx.kv.create name; horovod/byteps/nccl refused with the reason where they cannot run"),
    Flag("--num-epochs", 30, 30, "2", "epochs to train"),
    Flag("--lr", 0.01, 0.01, "0.1", "initial learning rate"),
    Flag("--lr-factor", 0.1, 0.1, "0.5", "lr multiplier at each step (>= 1: constant lr, as fit.py)"),
    Flag("--lr-step-epochs", "20", "20", "pow2", "step epochs (e.g. 30,60) or powN, a polynomial decay to 0"),
    Flag("--initializer", "default", "default", "msra", "the new head's initial weights, fit.py's names, "
         "seeded by --seed"),
    Flag("--optimizer", "sgd", "sgd", "rmsprop", "any mx.optimizer name (Module creates it, as fit.py)"),
    Flag("--mom", 0.0, 0.0, "0.9", "momentum, passed to sgd/dcasgd/nag/signum/lbsgd only (as fit.py)"),
    Flag("--wd", 0.0, 0.0, "0.0005", "weight decay"),
    Flag("--batch-size", 128, 128, "32", "images per batch per worker, split over its devices"),
    Flag("--disp-batches", 20, 20, "5", "a Speedometer line every N batches"),
    Flag("--model-prefix", None, "", "out/m", "where PREFIX-symbol.json and PREFIX-NNNN.params are written",
         _REQUIRED),
    Flag("--save-period", 1, 1, "2", "a checkpoint every N epochs (and after the last epoch)"),
    Flag("--monitor", 0, 0, "10", "mx.mon.Monitor statistics of every array every N batches"),
    Flag("--load-epoch", None, None, "3", "resume MODEL_PREFIX at this epoch (with --pretrained-model: see "
         "docs/finetune-migration.md)"),
    Flag("--top-k", 0, 0, "5", "also report top-k accuracy"),
    Flag("--loss", "", "", "ce,nll_loss", "losses logged per epoch; cross-entropy is always logged"),
    Flag("--test-io", 0, 0, "1", "read the training data once, logging its speed; no training"),
    Flag("--dtype", "float32", "float32", "float16", "float16: GPU mixed precision on the checkpoint's symbol"),
    Flag("--gc-type", "none", "none", "2bit", "kvstore gradient compression"),
    Flag("--gc-threshold", 0.5, 0.5, "0.25", "threshold of 2bit compression"),
    Flag("--macrobatch-size", 0, 0, "256", "lbsgd's effective batch; warns with other optimizers"),
    Flag("--warmup-epochs", 5, 5, "2", "lbsgd's warm-up epochs; warns with other optimizers (our warm-up for "
         "any optimizer: --lr-warmup-epochs)"),
    Flag("--warmup-strategy", "linear", "linear", "power2", "lbsgd's warm-up ramp; warns with other optimizers"),
    Flag("--profile-worker-suffix", "", "", "prof.json", "MXNet profiler trace of this worker"),
    Flag("--profile-server-suffix", "", "", "srv.json", "profiler of the dist kvstore servers; warns otherwise"),
    Flag("--use-imagenet-data-augmentation", 0, 0, "1", "train_imagenet.py's preset, unused by fine-tune.py; warns"),
    # ---- common/data.py ----
    Flag("--data-train", None, "", "x_train.rec", "training .rec", _REQUIRED),
    Flag("--data-train-idx", "", "", "x_train.idx", "its .idx (default: the one beside the .rec)"),
    Flag("--data-val", None, None, "x_val.rec", "validation .rec"),
    Flag("--data-val-idx", "", "", "x_val.idx", "its .idx (default: the one beside the .rec)"),
    Flag("--rgb-mean", "123.68,116.779,103.939", None, "123.68,116.779,103.939", "mean subtracted (R,G,B)",
         _SIDECAR),
    Flag("--rgb-std", "1,1,1", None, "1,1,1", "std divided by (R,G,B)", _SIDECAR),
    Flag("--pad-size", 0, 0, "4", "pad each image by N pixels before cropping"),
    Flag("--fill-value", 127, 127, "0", "padding pixel value"),
    Flag("--image-shape", "3,224,224", None, "3,224,224", "C,H,W fed to the network", _SIDECAR),
    Flag("--num-classes", None, None, "10", "classes of the new head (default: the class map's / labels')"),
    Flag("--num-examples", None, None, "1000", "epoch size of the lr schedule (default: the records counted)"),
    Flag("--data-nthreads", 4, 4, "2", "decode threads"),
    Flag("--benchmark", 0, 0, "1", "synthetic data is not offered; warns and reads --data-train"),
    # ---- common/data.py augmentations (ImageRecordIter's, passed as data.py passes them) ----
    Flag("--random-crop", 0, 0, "1", "random crop"),
    Flag("--random-mirror", 0, 0, "1", "random horizontal flip"),
    Flag("--max-random-h", 0, 0, "10", "hue jitter"),
    Flag("--max-random-s", 0, 0, "10", "saturation jitter"),
    Flag("--max-random-l", 0, 0, "10", "lightness jitter"),
    Flag("--min-random-aspect-ratio", None, None, "0.75", "with it, aspect ratios in [min, max]"),
    Flag("--max-random-aspect-ratio", 0.0, 0.0, "0.25", "without a min: aspect jitter 1 +- X, with or without "
         "--random-resized-crop"),
    Flag("--max-random-rotate-angle", 0, 0, "10", "rotation in degrees"),
    Flag("--max-random-shear-ratio", 0.0, 0.0, "0.1", "shear"),
    Flag("--max-random-scale", 1.0, 1.0, "1.2", "scale"),
    Flag("--min-random-scale", 1.0, 1.0, "0.8", "scale"),
    Flag("--max-random-area", 1.0, 1.0, "0.9", "largest crop area of --random-resized-crop"),
    Flag("--min-random-area", 1.0, 1.0, "0.08", "smallest crop area of --random-resized-crop"),
    Flag("--min-crop-size", -1, -1, "12", "random square crop side, with --max-crop-size"),
    Flag("--max-crop-size", -1, -1, "16", "random square crop side, with --min-crop-size"),
    Flag("--brightness", 0.0, 0.0, "0.2", "brightness jitter"),
    Flag("--contrast", 0.0, 0.0, "0.2", "contrast jitter"),
    Flag("--saturation", 0.0, 0.0, "0.2", "saturation jitter"),
    Flag("--pca-noise", 0.0, 0.0, "0.1", "PCA lighting noise"),
    Flag("--random-resized-crop", 0, 0, "1", "crop a random area and aspect ratio, resized to the input"),
)


def markdown_table() -> str:
    """The table as Markdown (docs/finetune-migration.md holds its output)."""
    def shown(value) -> str:
        return "(none)" if value is None else ("''" if value == "" else str(value))
    lines = ["| flag | fine-tune.py default | ours | what it does here |", "| --- | --- | --- | --- |"]
    for row in FLAGS:
        ours = shown(row.ours) if row.ours == row.finetune_default else f"{shown(row.ours)}: {row.differs}"
        lines.append(f"| `{row.flag}` | {shown(row.finetune_default)} | {ours} | {row.meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
