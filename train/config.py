"""Every training option, declared once: its default (with why), its command-line flag, its help and its parser.

`TrainConfig` is the resolved run; `build_parser` derives the `python -m train` parser from its fields and
`config_from_args` turns the parsed namespace back into it; every run records it as PREFIX-config.json
(`to_dict`) and `load_run_config` reads it back with every type intact (tuples stay tuples).

The option names are fine-tune.py's and common/fit.py's (dashes for underscores), so existing command lines
keep working; what is new is marked "new". List-valued options are parsed here and nowhere else:
`parse_list` (comma lists of numbers) and `parse_gpus` (`--gpus 0,1`).
"""
from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from recbuild.values import checked_type, parse_floats, parse_ints, parse_list  # noqa: F401 (re-exported)

# Every kvstore name MXNet 1.9.1's mx.kv.create knows (fit.py passes --kv-store to it unchecked); which of them
# can run here is decided at start-up (train.fit.check_kv_store), with a one-line reason for those that cannot.
KV_STORES = ("local", "device", "nccl", "local_update_cpu", "local_allreduce_cpu", "local_allreduce_device",
             "dist_sync", "dist_async", "dist_device_sync", "dist_sync_device", "dist_async_device",
             "horovod", "byteps")
# mx.optimizer.Optimizer.opt_registry of MXNet 1.9.1 (tests/test_finetune_flags.py checks it against the wheel):
# fit.py hands --optimizer to Module by name, so every registered one is accepted.
OPTIMIZERS = ("adadelta", "adagrad", "adam", "adamax", "ccsgd", "dcasgd", "ftml", "ftrl", "groupadagrad", "lamb",
              "lars", "lbsgd", "nadam", "nag", "rmsprop", "sgd", "sgld", "signum", "test")
# fit.py passes --mom only to these (the others have no momentum parameter).
MOMENTUM_OPTIMIZERS = ("sgd", "dcasgd", "nag", "signum", "lbsgd")
# fit.py's --initializer values ('default': Xavier gaussian/in/2, Normal for --network alexnet, Xavier for vgg).
INITIALIZERS = ("default", "xavier", "msra", "orthogonal", "normal", "uniform", "one", "zero")
WARMUP_STRATEGIES = ("linear", "power2", "sqrt", "lars")   # mx.optimizer.LBSGD's
GRADIENT_COMPRESSION = ("none", "2bit")
SCHEDULERS = ("step", "cosine")
DTYPES = ("float32", "float16")
CONFIG_SUFFIX = "-config.json"
# Keys of PREFIX-config.json that are not options: what the run resolved, and the changes resumes allowed.
RECORD_KEYS = ("resolved", "config_history")


# ---- the list-valued options' parsers: recbuild.values' (one rule for every CLI), plus --gpus --------------------
def parse_step_epochs(text: str) -> str:
    """`--lr-step-epochs` as fit.py reads it: comma-separated epochs ('30,60') or 'powN' (a polynomial decay to 0
    of power N over the run, MXNet's PolyScheduler); returned normalised ('30,60', 'pow2').

    Raises:
        ValueError: neither form, naming the text.
    """
    text = str(text).strip()
    if text.startswith("pow"):
        try:
            power = float(text[3:].lstrip("- "))
        except ValueError:
            raise ValueError(f"--lr-step-epochs {text!r}: expected 'powN', e.g. pow2") from None
        return f"pow{power:g}"
    try:
        return ",".join(str(e) for e in parse_list(text, int, "epochs")) if text else ""
    except ValueError:
        raise ValueError(f"--lr-step-epochs {text!r}: expected comma-separated epochs (e.g. 30,60) or powN") from None


def step_epochs(text: str) -> Tuple[int, ...]:
    """The epochs of a step schedule ('20,30' -> (20, 30)); () for 'powN' or ''."""
    return () if not text or text.startswith("pow") else tuple(int(e) for e in text.split(","))


def poly_power(text: str) -> Optional[float]:
    """N of a 'powN' --lr-step-epochs, else None."""
    return float(text[3:]) if text and text.startswith("pow") else None


def parse_gpus(text: Optional[str]) -> List[int]:
    """`--gpus 0,1` -> [0, 1]; None or '' -> [] (CPU).

    Raises:
        ValueError: not a list of GPU ids, naming the text.
    """
    if not text:
        return []
    try:
        ids = list(parse_list(text, int, "GPU ids"))
    except ValueError:
        raise ValueError(f"--gpus {text!r}: expected comma-separated GPU ids, e.g. 0,1") from None
    if any(i < 0 for i in ids):
        raise ValueError(f"--gpus {text!r}: GPU ids are 0 or more")
    return ids


# ---- the declaration ------------------------------------------------------------------------------------------
# How an option appears on the command line:
#   value   --name VALUE, parsed by `parse` (default: the field's own type)
#   switch  --name 0|1 (fit.py's style for augmentation switches), stored as bool
#   on      --name (store_true)          off   --no-name (store_false, the flag is given in `flag`)
#   append  --name VALUE, repeatable, collected in a list
#
# `trajectory=False` marks the options that do not shape the training trajectory (where files are, how much is
# logged, ...): a resume (--load-epoch) compares every other one with the run's PREFIX-config.json.
def option(default=MISSING, *, group: str, help: str = "", parse: Optional[Callable] = None, kind: str = "value",
           choices: Optional[Sequence[str]] = None, flag: Optional[str] = None, metavar: Optional[str] = None,
           default_factory=MISSING, trajectory: bool = True):
    """A TrainConfig field that also declares its command-line option (see the kinds above)."""
    meta = {"group": group, "help": help, "parse": parse, "kind": kind, "choices": choices, "flag": flag,
            "metavar": metavar, "trajectory": trajectory}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


MODEL, DATA, AUGMENT, SCHEDULE, DEVICES, OUTPUT = ("pretrained model", "data", "augmentation",
                                                  "schedule and optimizer", "devices", "checkpoints and logging")
# The augmentations that draw random numbers per image, each with the value at which it draws none: the trainer
# rebuilds its iterator per epoch when one is on (see train.fit.EpochStream). The area limits only bound
# random_resized_crop, which is listed itself; an aspect jitter (max_random_aspect_ratio) applies without it too.
RANDOM_AUGMENTATIONS = {"random_crop": False, "random_resized_crop": False, "random_mirror": False,
                        "max_random_aspect_ratio": 0.0, "max_random_rotate_angle": 0, "max_random_h": 0,
                        "max_random_s": 0, "max_random_l": 0, "max_random_shear_ratio": 0.0,
                        "max_random_scale": 1.0, "min_random_scale": 1.0, "min_crop_size": -1, "max_crop_size": -1,
                        "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "pca_noise": 0.0}

# Named sets of defaults (`--recipe NAME`): fine-tune.py's defaults stay the defaults; a recipe replaces some of
# them, and flags given on the command line still win. The run logs the values a recipe set.
RECIPES: Dict[str, Dict[str, object]] = {
    # Caffe's fine-tuning solver values (momentum 0.9, VGG's weight decay 5e-4), a batch that keeps 2 CPU cores
    # busy without a large memory footprint, top-5 reported, the new head drawn Xavier-uniform: the recipe
    # `make demo` measured (fine-tuned 0.725 vs scratch 0.119) and the trainer's defaults before issue 21.
    "transfer": {"mom": 0.9, "wd": 0.0005, "batch_size": 32, "top_k": 5, "data_nthreads": 2,
                 "initializer": "xavier"},
}


def active_augmentations(cfg) -> List[str]:
    """The random augmentations `cfg` turns on (those off their neutral value in RANDOM_AUGMENTATIONS)."""
    return [name for name, neutral in RANDOM_AUGMENTATIONS.items() if getattr(cfg, name) != neutral]


@dataclass
class TrainConfig:
    """A resolved training run. Field names are the CLI option names with '-' -> '_'."""

    # ---- pretrained model (fine-tune.py) ---------------------------------------------------------------
    pretrained_model: str = option("", group=MODEL, help="PREFIX of the converted checkpoint")
    pretrained_epoch: int = option(0, group=MODEL, help="the converter writes epoch 0")
    layer_before_fullc: Optional[str] = option(
        None, group=MODEL, parse=str,
        help="attach the new head after this layer (fine-tune.py's default flatten0; here by default the head the "
             "sidecar declares, or VGG's)")
    num_classes: Optional[int] = option(None, group=MODEL, parse=int,
                                        help="default: the class map's size; checked against the labels in the "
                                             ".rec files")
    hidden: int = option(0, group=MODEL, help="new: width of an extra hidden head layer (0: none)")
    hidden_dropout: float = option(0.5, group=MODEL, help="new: dropout after the hidden head layer")
    keep_head_names: bool = option(False, group=MODEL, kind="on",
                                   help="new: name the new classifier and its output as the pretrained ones (e.g. "
                                        "fc8 -> prob, label prob_label) instead of fine-tune.py's fc -> softmax "
                                        "(label softmax_label)")
    network: Optional[str] = option(None, group=MODEL, parse=str,
                                    help="fit.py's network name: the network here is the checkpoint's; only "
                                         "--initializer default reads it (alexnet: Normal, vgg*: Xavier)")
    num_layers: Optional[int] = option(None, group=MODEL, parse=int,
                                       help="fit.py's depth of --network: the checkpoint's network is used "
                                            "as it is")
    from_scratch: bool = option(False, group=MODEL, kind="on",
                                help="new: train --pretrained-model's architecture from fresh weights (every "
                                     "layer; fit.py's default initializer), the baseline of a fine-tune")
    # ---- data (fit.py / data.py) -------------------------------------------------------------------------
    data_train: str = option("", group=DATA, help=".rec of the training set")
    data_train_idx: str = option("", group=DATA, help="its .idx (default: the .idx beside the .rec, if any)")
    data_val: Optional[str] = option(None, group=DATA, parse=str, help=".rec of the validation set",
                                     trajectory=False)
    data_val_idx: str = option("", group=DATA, help="its .idx (default: the .idx beside the .rec, if any)",
                               trajectory=False)
    image_shape: Optional[Tuple[int, int, int]] = option(None, group=DATA, parse=parse_ints,
                                                         help="C,H,W (default: the sidecar's input_shape)")
    batch_size: int = option(128, group=DATA, help="per worker, across all its devices")
    num_examples: Optional[int] = option(None, group=DATA, parse=int,
                                         help="fit.py's epoch size, in images, for the lr schedule (default: the "
                                              "records counted); each epoch still reads every record")
    resize: int = option(-1, group=DATA, help="shorter side resized to this before cropping (-1: as packed)")
    data_nthreads: int = option(4, group=DATA, help="decode threads", trajectory=False)
    rgb_mean: Optional[Tuple[float, ...]] = option(None, group=DATA, parse=parse_floats,
                                                   help="override the sidecar's mean (R,G,B)")
    rgb_std: Optional[Tuple[float, ...]] = option(None, group=DATA, parse=parse_floats,
                                                  help="override the sidecar's std (R,G,B)")
    pad_size: int = option(0, group=DATA, help="pad every image by this many pixels on each side (before cropping)")
    fill_value: int = option(127, group=DATA, help="value of the padding pixels")
    benchmark: bool = option(False, group=DATA, kind="switch",
                             help="fit.py's synthetic-data speed test: not offered here (warns); use --test-io 1 "
                                  "to time the input pipeline")
    # ---- augmentation (data.py names and defaults, passed to ImageRecordIter as data.py passes them;
    # train.data.Augment holds exactly this group) -------------------------------------------------------
    random_crop: bool = option(False, group=AUGMENT, kind="switch", help="1: random crop instead of centre")
    random_resized_crop: bool = option(False, group=AUGMENT, kind="switch",
                                       help="1: crop a random area (--min/max-random-area) and aspect ratio, resized")
    min_random_area: float = option(1.0, group=AUGMENT,
                                    help="smallest crop area of --random-resized-crop, a fraction of the image")
    max_random_area: float = option(1.0, group=AUGMENT)
    min_random_aspect_ratio: Optional[float] = option(
        None, group=AUGMENT, parse=float, help="with it the aspect ratio is drawn from [min, max]")
    max_random_aspect_ratio: float = option(
        0.0, group=AUGMENT, help="without --min-random-aspect-ratio: an aspect ratio jitter of 1 +- this, with or "
                                 "without --random-resized-crop")
    random_mirror: bool = option(False, group=AUGMENT, kind="switch")
    max_random_rotate_angle: int = option(0, group=AUGMENT)
    max_random_h: int = option(0, group=AUGMENT, help="max change of hue, 0..180")
    max_random_s: int = option(0, group=AUGMENT, help="max change of saturation, 0..255")
    max_random_l: int = option(0, group=AUGMENT, help="max change of lightness, 0..255")
    max_random_shear_ratio: float = option(0.0, group=AUGMENT, help="0..1")
    max_random_scale: float = option(1.0, group=AUGMENT)
    min_random_scale: float = option(1.0, group=AUGMENT)
    min_crop_size: int = option(-1, group=AUGMENT, help="crop a random square side in [min, max] (-1: off)")
    max_crop_size: int = option(-1, group=AUGMENT)
    brightness: float = option(0.0, group=AUGMENT)
    contrast: float = option(0.0, group=AUGMENT)
    saturation: float = option(0.0, group=AUGMENT)
    pca_noise: float = option(0.0, group=AUGMENT)
    use_imagenet_data_augmentation: bool = option(
        False, group=AUGMENT, kind="switch",
        help="train_imagenet.py's preset; fine-tune.py ignores it, so here it only warns: set the augmentation "
             "flags")
    # ---- schedule and optimizer --------------------------------------------------------------------------
    num_epochs: int = option(30, group=SCHEDULE, help="fine-tune.py's default", trajectory=False)
    lr: float = option(0.01, group=SCHEDULE, help="fine-tune.py's default")
    lr_scheduler: str = option("step", group=SCHEDULE, choices=SCHEDULERS, help="new: step (fit.py's) or cosine")
    lr_factor: float = option(0.1, group=SCHEDULE)
    lr_step_epochs: str = option("20", group=SCHEDULE, parse=parse_step_epochs,
                                 help="epochs at which the lr is multiplied by --lr-factor, or powN: a polynomial "
                                      "decay of power N to 0 (fit.py's)")
    lr_warmup_epochs: float = option(0.0, group=SCHEDULE,
                                     help="new: linear warm-up from 0 before either schedule, any optimizer")
    warmup_epochs: int = option(5, group=SCHEDULE, help="lbsgd's warm-up to the large-batch lr (fit.py's; "
                                                        "other optimizers: see --lr-warmup-epochs)")
    warmup_strategy: str = option("linear", group=SCHEDULE, choices=WARMUP_STRATEGIES, help="lbsgd's warm-up ramp")
    macrobatch_size: int = option(0, group=SCHEDULE, help="lbsgd's effective batch size across workers")
    optimizer: str = option("sgd", group=SCHEDULE, choices=OPTIMIZERS, help="any mx.optimizer name")
    initializer: str = option("default", group=SCHEDULE, choices=INITIALIZERS,
                              help="the new head's initial weights (fit.py's names; seeded by --seed)")
    mom: float = option(0.0, group=SCHEDULE, help="momentum of sgd, dcasgd, nag, signum, lbsgd")
    wd: float = option(0.0, group=SCHEDULE)
    lr_mult: List[str] = option(group=SCHEDULE, kind="append", default_factory=list, metavar="REGEX=MULT",
                                help="new, repeatable; parameters matching REGEX train at MULT x lr; 0 freezes; "
                                     "later rules win")
    dtype: str = option("float32", group=SCHEDULE, choices=DTYPES,
                        help="float16 needs a GPU; multi-precision SGD keeps fp32 masters")
    # ---- devices -----------------------------------------------------------------------------------------
    gpus: Optional[str] = option(None, group=DEVICES, parse=str, help="e.g. 0,1 (default: CPU)",
                                 trajectory=False)
    cpus: int = option(1, group=DEVICES, help="new: CPU contexts to train on without --gpus (data-parallel "
                                              "like --gpus)", trajectory=False)
    kv_store: str = option("device", group=DEVICES, choices=KV_STORES, help="fit.py's default")
    gc_type: str = option("none", group=DEVICES, choices=GRADIENT_COMPRESSION,
                          help="kvstore gradient compression (needs a device or dist kvstore)")
    gc_threshold: float = option(0.5, group=DEVICES, help="threshold of 2bit gradient compression")
    # ---- checkpoints and logging -------------------------------------------------------------------------
    model_prefix: str = option("", group=OUTPUT, help="where checkpoints are written", trajectory=False)
    save_period: int = option(1, group=OUTPUT, help="write a checkpoint every N epochs (and after the last)",
                              trajectory=False)
    load_epoch: Optional[int] = option(None, group=OUTPUT, parse=int,
                                       help="resume MODEL_PREFIX-NNNN (params + optimizer state); not the "
                                            "pretrained epoch", trajectory=False)
    allow_config_change: bool = option(False, group=OUTPUT, kind="on",
                                       help="new: resume although trajectory-shaping options differ from "
                                            "PREFIX-config.json (the change is recorded there)", trajectory=False)
    overwrite: bool = option(False, group=OUTPUT, kind="on", help="new: start afresh over existing checkpoints "
                             "(the whole earlier run is removed when the new one starts)", trajectory=False)
    trust_states: bool = option(False, group=OUTPUT, kind="on",
                                help="new: load a pickled PREFIX-NNNN.states (MXNet's own format, written by older "
                                     "runs); a pickle can run code, so only for a checkpoint folder you trust",
                                trajectory=False)
    disp_batches: int = option(20, group=OUTPUT, help="Speedometer line every N batches", trajectory=False)
    top_k: int = option(0, group=OUTPUT, help="top-k accuracy reported besides top-1 (0: off)", trajectory=False)
    loss: str = option("", group=OUTPUT, help="ce and/or nll_loss (comma list): losses logged per epoch besides "
                                              "accuracy (cross-entropy is always in the metrics files)",
                       trajectory=False)
    monitor: int = option(0, group=OUTPUT, help="log every parameter's statistics every N batches (mx.mon.Monitor)",
                          trajectory=False)
    test_io: bool = option(False, group=OUTPUT, kind="switch", help="1: only read the training data and log its "
                                                                    "speed, no training", trajectory=False)
    profile_worker_suffix: str = option("", group=OUTPUT, help="profile this worker into this file (rankN_ "
                                                               "prepended when distributed)", trajectory=False)
    profile_server_suffix: str = option("", group=OUTPUT, help="profile the dist kvstore servers into this file",
                                        trajectory=False)
    seed: int = option(0, group=OUTPUT, help="new: seeds head init, shuffling, augmentation and dropout")
    progress: bool = option(True, group=OUTPUT, kind="off", flag="--no-progress",
                            help="new: no progress bar (it is drawn on a terminal only)", trajectory=False)
    # Off by default: matplotlib's import and one figure cost ~0.6 s at the end of every run, a fixed cost
    # fine-tune.py does not have (bench.scale); the CSV/JSON are always written and plot any time later.
    plot_metrics: bool = option(False, group=OUTPUT, kind="on",
                                help="new: draw PREFIX-metrics.png when the run ends (or later: "
                                     "python -m train.metrics PREFIX)", trajectory=False)
    recipe: str = option("", group=OUTPUT, choices=tuple(RECIPES),
                         help="new: a named set of defaults (train/config.py RECIPES; transfer: mom 0.9, wd 5e-4, "
                              "batch 32, top-k 5, 2 decode threads, Xavier head); flags given still win",
                         trajectory=False)

    def __post_init__(self):
        # Library callers (recipes, tests) may give the step epochs as a sequence; the option is fit.py's text.
        if not isinstance(self.lr_step_epochs, str):
            self.lr_step_epochs = ",".join(str(int(e)) for e in self.lr_step_epochs)

    def validate(self) -> None:
        """Reject bad values with one clear message each, before any work is done."""
        def bad(msg: str):
            raise ValueError(msg)
        if not self.pretrained_model and self.load_epoch is None:
            bad("--pretrained-model PREFIX is required (a converted checkpoint), unless resuming with --load-epoch")
        if not self.data_train:
            bad("--data-train FILE.rec is required")
        if not self.model_prefix:
            bad("--model-prefix is required (where checkpoints are written)")
        for name, allowed in (("optimizer", OPTIMIZERS), ("lr_scheduler", SCHEDULERS), ("kv_store", KV_STORES),
                              ("dtype", DTYPES), ("initializer", INITIALIZERS), ("warmup_strategy", WARMUP_STRATEGIES),
                              ("gc_type", GRADIENT_COMPRESSION)):
            if getattr(self, name) not in allowed:
                bad(f"{flag_of(name)} {getattr(self, name)}: supported are {', '.join(allowed)}")
        if self.kv_store == "nccl" and not self.gpus:
            bad("--kv-store nccl needs --gpus: NCCL runs on GPUs only; on CPU use --kv-store device or local")
        if self.dtype == "float16" and not self.gpus:
            bad("--dtype float16 needs --gpus: MXNet's CPU kernels are float32 only")
        for name in ("batch_size", "num_epochs", "cpus", "disp_batches", "save_period"):
            if getattr(self, name) < 1:
                bad(f"{flag_of(name)} must be at least 1")
        if self.lr <= 0:
            bad("--lr must be positive")
        if self.num_classes is not None and self.num_classes < 2:
            bad("--num-classes must be at least 2")
        if self.load_epoch is not None and not 0 < self.load_epoch < self.num_epochs:  # a resume (see
            # train.fit.resolve_load_epoch: with --pretrained-model, --load-epoch names the pretrained epoch)
            bad(f"--load-epoch {self.load_epoch}: resumes after that epoch, so it must be in 1..{self.num_epochs - 1}"
                f" (--num-epochs {self.num_epochs})")
        if self.image_shape is not None and len(self.image_shape) != 3:
            bad(f"--image-shape must be C,H,W, got {self.image_shape}")
        if not 0 < self.min_random_area <= self.max_random_area <= 1:
            bad("--min-random-area/--max-random-area must satisfy 0 < min <= max <= 1")
        if self.min_random_aspect_ratio is None and not 0 <= self.max_random_aspect_ratio < 1:
            bad(f"--max-random-aspect-ratio {self.max_random_aspect_ratio:g}: without --min-random-aspect-ratio it "
                f"is a jitter of 1 +- this, so it must be in [0, 1)")
        if self.min_random_aspect_ratio is not None and not 0 < self.min_random_aspect_ratio \
                <= self.max_random_aspect_ratio:
            bad("--min-random-aspect-ratio/--max-random-aspect-ratio must satisfy 0 < min <= max")
        if self.random_crop and self.random_resized_crop:
            bad("--random-crop 1 and --random-resized-crop 1 are two crop modes (ImageRecordIter refuses both); "
                "choose one")
        if self.min_random_scale > self.max_random_scale or self.min_random_scale <= 0:
            bad("--min-random-scale/--max-random-scale must satisfy 0 < min <= max")
        if (self.min_crop_size > 0) != (self.max_crop_size > 0) or self.min_crop_size > self.max_crop_size:
            bad("--min-crop-size/--max-crop-size: give both, with 0 < min <= max (or leave both -1)")
        try:
            parse_step_epochs(self.lr_step_epochs)
        except ValueError as err:
            bad(str(err))
        unknown = [t for t in self.loss.replace(" ", "").split(",") if t and t not in ("ce", "nll", "nll_loss")]
        if unknown:
            bad(f"--loss {unknown[0]}: supported are ce, nll_loss (comma-separated)")

    def to_dict(self) -> dict:
        return asdict(self)

    def group(self, name: str) -> Dict[str, object]:
        """The values of one option group, e.g. `cfg.group(AUGMENT)` -> the augmentation settings."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("group") == name}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """The options of a dict (a recorded PREFIX-config.json included: its record keys are set aside), each
        converted back to its declared type (JSON has lists where the config has tuples)."""
        options = {k: v for k, v in data.items() if k not in RECORD_KEYS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        tuples = _tuple_fields()
        if "warmup_epochs" in options and "lr_warmup_epochs" not in options:  # recorded before issue 21, when
            options["lr_warmup_epochs"] = options.pop("warmup_epochs")       # the warm-up was any optimizer's
        if isinstance(options.get("lr_step_epochs"), list):  # recorded before 'powN' was accepted: a list
            options["lr_step_epochs"] = ",".join(str(e) for e in options["lr_step_epochs"])
        return cls(**{k: (tuple(v) if k in tuples and isinstance(v, list) else v) for k, v in options.items()})


def _tuple_fields() -> set:
    hints = typing.get_type_hints(TrainConfig)
    return {name for name, hint in hints.items() if "Tuple" in str(hint) or "tuple" in str(hint)}


def trajectory_options() -> Tuple[str, ...]:
    """The options that shape the training trajectory (a resume must not change them silently); the device
    count, which also does, is compared from what the run resolved, and --num-epochs is reported instead."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata.get("trajectory", True))


def flag_of(name: str) -> str:
    """The command-line flag of a TrainConfig field, e.g. 'kv_store' -> '--kv-store'."""
    return "--" + name.replace("_", "-")


def option_names(group: str) -> Tuple[str, ...]:
    """The fields of one option group, in declaration order (AUGMENT: what train.data.Augment holds)."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata.get("group") == group)


def add_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every TrainConfig option to `parser`, in groups, with the dataclass defaults."""
    groups: Dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        default = f.default if f.default is not MISSING else f.default_factory()
        kw: dict = {"dest": f.name, "help": meta["help"] or None}
        if meta["kind"] == "switch":
            kw.update(type=int, default=int(default), metavar="0|1")
        elif meta["kind"] in ("on", "off"):
            kw.update(action="store_true" if meta["kind"] == "on" else "store_false", default=default)
            # "%(default).0s" prints nothing and keeps ArgumentDefaultsHelpFormatter from adding "(default: True)"
            # to a --no-X flag, whose default is that X happens (the help says so).
            if meta["kind"] == "off":
                kw["help"] = (kw["help"] or "") + "%(default).0s"
        elif meta["kind"] == "append":
            kw.update(action="append", default=[], metavar=meta["metavar"])
        else:
            kw.update(type=checked_type(meta["parse"] or hints[f.name]), default=default, choices=meta["choices"],
                      metavar=meta["metavar"])
        group.add_argument(meta["flag"] or flag_of(f.name), **kw)
    return parser


def build_parser(prog: str = "python -m train", description: str = "", epilog: Optional[str] = None
                 ) -> argparse.ArgumentParser:
    """The `python -m train` parser, derived from TrainConfig (recipes add their own options to it)."""
    return add_options(argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                               formatter_class=HelpFormatter))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default shown; the description and epilog (the command list) kept as written."""


def parse_with_recipe(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv`; with `--recipe NAME` the recipe's values become the defaults first, so flags given win."""
    known, _ = parser.parse_known_args(list(argv))
    name = getattr(known, "recipe", "")
    if name:
        _set_defaults(parser, RECIPES[name])
    return parser.parse_args(list(argv))


def _set_defaults(parser: argparse.ArgumentParser, values: Dict[str, object]) -> None:
    """`parser.set_defaults(**values)` on the parser and its sub-command parsers (whose defaults win)."""
    parser.set_defaults(**values)
    for action in parser._actions:  # noqa: SLF001 - argparse lists its sub-command parsers only here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in set(action.choices.values()):
                _set_defaults(sub, values)


def recipe_values(cfg: "TrainConfig") -> Dict[str, object]:
    """The options of `cfg` that its recipe set and the command line left as the recipe has them."""
    return {k: v for k, v in RECIPES.get(cfg.recipe, {}).items() if getattr(cfg, k) == v}


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """The CLI edge: parsed namespace -> TrainConfig (0/1 switches become bools)."""
    values = {f.name: getattr(ns, f.name) for f in fields(TrainConfig)}
    for f in fields(TrainConfig):
        if f.metadata["kind"] == "switch":
            values[f.name] = bool(values[f.name])
    return TrainConfig(**values)


def config_path(model_prefix: str) -> Path:
    """Where a run's resolved config is written: PREFIX-config.json beside its checkpoints."""
    return Path(str(model_prefix) + CONFIG_SUFFIX)


def load_run_config(prefix: str) -> TrainConfig:
    """The options of the run that wrote PREFIX (its PREFIX-config.json), every type as declared.

    Raises:
        FileNotFoundError: there is no PREFIX-config.json.
        ValueError: it is not JSON, or holds keys that are not options.
    """
    path = config_path(prefix)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; it is written by `python -m train` beside its checkpoints")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
