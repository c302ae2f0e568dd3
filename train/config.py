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

KV_STORES = ("local", "device", "dist_sync", "dist_device_sync", "dist_async", "nccl")
OPTIMIZERS = ("sgd", "nag", "adam")
SCHEDULERS = ("step", "cosine")
DTYPES = ("float32", "float16")
CONFIG_SUFFIX = "-config.json"
# Keys of PREFIX-config.json that are not options: what the run resolved, and the changes resumes allowed.
RECORD_KEYS = ("resolved", "config_history")


# ---- the list-valued options' parsers: recbuild.values' (one rule for every CLI), plus --gpus --------------------
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
# The augmentations that draw random numbers per image (the area and aspect limits only bound
# random_resized_crop): the trainer rebuilds its iterator per epoch when one is on (see train.fit.EpochStream).
RANDOM_AUGMENTATIONS = ("random_crop", "random_resized_crop", "random_mirror", "max_random_rotate_angle",
                        "brightness", "contrast", "saturation", "pca_noise")


@dataclass
class TrainConfig:
    """A resolved training run. Field names are the CLI option names with '-' -> '_'."""

    # ---- pretrained model (fine-tune.py) ---------------------------------------------------------------
    pretrained_model: str = option("", group=MODEL, help="PREFIX of the converted checkpoint")
    pretrained_epoch: int = option(0, group=MODEL, help="the converter writes epoch 0")
    layer_before_fullc: Optional[str] = option(
        None, group=MODEL, parse=str, help="attach the new head after this layer (default: VGG's declared head, else the "
                                "sidecar's)")
    num_classes: Optional[int] = option(None, group=MODEL, parse=int,
                                        help="default: the class map's size; checked against the labels in the "
                                             ".rec files")
    hidden: int = option(0, group=MODEL, help="new: width of an extra hidden head layer (0: none)")
    hidden_dropout: float = option(0.5, group=MODEL, help="new: dropout after the hidden head layer")
    from_scratch: bool = option(False, group=MODEL, kind="on",
                                help="new: train --pretrained-model's architecture from fresh weights (every "
                                     "layer; fit.py's default initializer), the baseline of a fine-tune")
    # ---- data (fit.py / data.py) -------------------------------------------------------------------------
    data_train: str = option("", group=DATA, help=".rec of the training set")
    data_val: Optional[str] = option(None, group=DATA, parse=str, help=".rec of the validation set",
                                     trajectory=False)
    image_shape: Optional[Tuple[int, int, int]] = option(None, group=DATA, parse=parse_ints,
                                                         help="C,H,W (default: the sidecar's input_shape)")
    batch_size: int = option(32, group=DATA, help="per worker, across all its devices (fine-tune.py's default)")
    num_examples: Optional[int] = option(None, group=DATA, parse=int,
                                         help="fit.py's epoch size; the records are counted, this is only "
                                              "checked against them", trajectory=False)
    resize: int = option(-1, group=DATA, help="shorter side resized to this before cropping (-1: as packed)")
    data_nthreads: int = option(2, group=DATA, help="decode threads (the CI machine has 2 cores)",
                                trajectory=False)
    rgb_mean: Optional[Tuple[float, ...]] = option(None, group=DATA, parse=parse_floats,
                                                   help="override the sidecar's mean (R,G,B)")
    rgb_std: Optional[Tuple[float, ...]] = option(None, group=DATA, parse=parse_floats,
                                                  help="override the sidecar's std (R,G,B)")
    # ---- augmentation (data.py names; train.data.Augment holds exactly this group) -----------------------
    random_crop: bool = option(False, group=AUGMENT, kind="switch", help="1: random crop instead of centre")
    random_resized_crop: bool = option(False, group=AUGMENT, kind="switch",
                                       help="1: Inception-style crop of --min/max-random-area and aspect ratio, "
                                            "resized")
    min_random_area: float = option(0.08, group=AUGMENT, help="Inception-style crop covers 8%%..100%% of the image")
    max_random_area: float = option(1.0, group=AUGMENT)
    min_random_aspect_ratio: float = option(0.75, group=AUGMENT, help="3/4 .. 4/3, the usual RandomResizedCrop "
                                                                      "range")
    max_random_aspect_ratio: float = option(1.333, group=AUGMENT)
    random_mirror: bool = option(False, group=AUGMENT, kind="switch")
    max_random_rotate_angle: int = option(0, group=AUGMENT)
    brightness: float = option(0.0, group=AUGMENT)
    contrast: float = option(0.0, group=AUGMENT)
    saturation: float = option(0.0, group=AUGMENT)
    pca_noise: float = option(0.0, group=AUGMENT)
    # ---- schedule and optimizer --------------------------------------------------------------------------
    num_epochs: int = option(30, group=SCHEDULE, help="fine-tune.py's default", trajectory=False)
    lr: float = option(0.01, group=SCHEDULE, help="fine-tune.py's default")
    lr_scheduler: str = option("step", group=SCHEDULE, choices=SCHEDULERS, help="new: step (fit.py's) or cosine")
    lr_factor: float = option(0.1, group=SCHEDULE)
    lr_step_epochs: Tuple[int, ...] = option((20,), group=SCHEDULE, parse=parse_ints,
                                             help="fine-tune.py's default '20'")
    warmup_epochs: float = option(0.0, group=SCHEDULE, help="linear warm-up from 0 before either schedule")
    optimizer: str = option("sgd", group=SCHEDULE, choices=OPTIMIZERS)
    mom: float = option(0.9, group=SCHEDULE, help="fine-tune.py sets 0; Caffe's fine-tuning solvers use 0.9")
    wd: float = option(0.0005, group=SCHEDULE, help="fine-tune.py sets 0; Caffe's VGG solver value")
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
    # ---- checkpoints and logging -------------------------------------------------------------------------
    model_prefix: str = option("", group=OUTPUT, help="where checkpoints are written", trajectory=False)
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
    top_k: int = option(5, group=OUTPUT, help="top-k accuracy reported besides top-1 (0: off)", trajectory=False)
    seed: int = option(0, group=OUTPUT, help="new: seeds head init, shuffling, augmentation and dropout")
    progress: bool = option(True, group=OUTPUT, kind="off", flag="--no-progress", help="new: no tqdm bar",
                            trajectory=False)
    # Off by default: matplotlib's import and one figure cost ~0.6 s at the end of every run, a fixed cost
    # fine-tune.py does not have (bench.scale); the CSV/JSON are always written and plot any time later.
    plot_metrics: bool = option(False, group=OUTPUT, kind="on",
                                help="new: draw PREFIX-metrics.png when the run ends (or later: "
                                     "python -m train.metrics PREFIX)", trajectory=False)

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
                              ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                bad(f"{flag_of(name)} {getattr(self, name)}: supported are {', '.join(allowed)}")
        if self.kv_store == "nccl" and not self.gpus:
            bad("--kv-store nccl needs --gpus: NCCL runs on GPUs only; on CPU use --kv-store device or local")
        if self.dtype == "float16" and not self.gpus:
            bad("--dtype float16 needs --gpus: MXNet's CPU kernels are float32 only")
        for name in ("batch_size", "num_epochs", "cpus", "disp_batches"):
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
        elif meta["kind"] == "append":
            kw.update(action="append", default=[], metavar=meta["metavar"])
        else:
            kw.update(type=checked_type(meta["parse"] or hints[f.name]), default=default, choices=meta["choices"],
                      metavar=meta["metavar"])
        group.add_argument(meta["flag"] or flag_of(f.name), **kw)
    return parser


def build_parser(prog: str = "python -m train", description: str = "") -> argparse.ArgumentParser:
    """The `python -m train` parser, derived from TrainConfig (recipes add their own options to it)."""
    return add_options(argparse.ArgumentParser(prog=prog, description=description,
                                               formatter_class=argparse.ArgumentDefaultsHelpFormatter))


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
