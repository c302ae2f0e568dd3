"""The fit loop: head surgery, lr_mult rules, atomic per-epoch checkpoints, exact resume.

Reusable pieces (train.recipes builds on them): `contexts`, `schedule`, `prepare_model`, `start_run`,
`resolve_mults`, `resume_point`, `init_optimizer`, `trained_sidecar`, `write_run_files`, `publish_epoch`,
`fit`.

Why an explicit loop instead of Module.fit: the NaN check must stop a run before a poisoned epoch is
published, checkpoints must be atomic and carry the optimizer state, and each epoch reseeds shuffling,
augmentation and dropout from (seed, epoch), which is what makes "2 epochs + resume 2" equal "4 epochs".
What Module already does is left to it: the kvstore's update placement, the optimizer's index -> name map
and rescale_grad come from `Module.init_optimizer`, exactly as in Module.fit.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from recbuild.atomic import write_json
from recbuild.publish import publish, writer_lock
from recbuild.classmap import write_class_map
from symbols import checkpoint
from symbols.head import (HeadError, find_head, fine_tune_names, frozen, parse_lr_mult, replace_head,
                          resolve_lr_mults, scratch_network, to_float16, with_lr_mults)
from symbols.sidecar import (Preprocess, copy_mean_file, declared_input_size, has_sidecar, load_sidecar,
                             plain_checkpoint_sidecar, save_sidecar, sidecar_path)
from symbols.vgg import HeadSpec
from train.config import (AUGMENT, MOMENTUM_OPTIMIZERS, TrainConfig, active_augmentations,
                          config_path, flag_of, load_run_config, parse_gpus, poly_power, recipe_values, step_epochs,
                          trajectory_options)
from train.data import Augment, ClassInfo, plan_input, record_count, record_iter, resolve_classes
from train.metrics import MetricsLog, Tally

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainError(ValueError):
    """Bad input to a training run (files, flags); the message names it."""


# ---- devices, schedule, optimizer ------------------------------------------------------------------------------
def contexts(gpus: Optional[str], cpus: int = 1) -> List[mx.Context]:
    """`--gpus 0,1` -> [gpu(0), gpu(1)]; no GPUs -> `cpus` CPU contexts (data-parallel the same way)."""
    try:
        ids = parse_gpus(gpus)
    except ValueError as err:
        raise TrainError(str(err)) from None
    if not ids:
        return [mx.cpu(i) for i in range(cpus)]
    available = mx.context.num_gpus()
    missing = [i for i in ids if i >= available]
    if missing:
        raise TrainError(f"--gpus {gpus}: GPU {missing[0]} not found ({available} visible; is this the "
                         f"mxnet-cu112 build? `make install GPU=cu112; source tools/gpu_env.sh`)")
    return [mx.gpu(i) for i in ids]


def schedule(kind: str, lr: float, batches_per_epoch: int, num_epochs: int, steps_text="",
             factor: float = 0.1, warmup_epochs: float = 0.0) -> mx.lr_scheduler.LRScheduler:
    """The learning rate as a function of the update count (MXNet's own schedulers, so dist servers can
    unpickle them). `steps_text` is --lr-step-epochs (or a sequence of epochs): absolute epochs, or 'powN',
    fit.py's polynomial decay to 0 over the run; a resumed run starts the count where it stopped."""
    warmup = int(round(warmup_epochs * batches_per_epoch))
    text = steps_text if isinstance(steps_text, str) else ",".join(str(int(e)) for e in steps_text)
    power = poly_power(text) if factor < 1 else None  # fit.py: --lr-factor >= 1 means a constant lr, powN too
    if power is not None and kind != "cosine":
        total = max(num_epochs * batches_per_epoch, warmup + 1)
        return mx.lr_scheduler.PolyScheduler(max_update=total, base_lr=lr, pwr=power, final_lr=0.0,
                                             warmup_steps=warmup, warmup_begin_lr=0.0)
    step_epochs = step_epochs_of(text) if factor < 1 else ()  # fit.py: --lr-factor >= 1 means a constant lr
    if kind == "cosine":
        total = max(num_epochs * batches_per_epoch, warmup + 1)
        return mx.lr_scheduler.CosineScheduler(max_update=total, base_lr=lr, final_lr=0.0, warmup_steps=warmup,
                                               warmup_begin_lr=0.0)
    steps = [int(e * batches_per_epoch) for e in sorted(step_epochs) if 0 < e < num_epochs]
    steps = [s for s in steps if s > warmup]
    if not steps:
        # MultiFactorScheduler needs a step; one past the end never fires.
        steps = [num_epochs * batches_per_epoch + warmup + 1]
    return mx.lr_scheduler.MultiFactorScheduler(step=steps, factor=factor, base_lr=lr, warmup_steps=warmup,
                                                warmup_begin_lr=0.0)


step_epochs_of = step_epochs


def optimizer_params(cfg: TrainConfig, lr_scheduler, begin_num_update: int, epoch_size: int = 1,
                     num_workers: int = 1) -> dict:
    """Module.init_optimizer's `optimizer_params` for `cfg.optimizer`, any mx.optimizer name, as fit.py sets
    them (rescale_grad is Module's to set): --mom only where the optimizer has a momentum, lbsgd's warm-up and
    batch scale from --warmup-epochs/--warmup-strategy/--macrobatch-size and the epoch size.

    `begin_num_update` continues the schedule (and Adam's bias correction) on resume.
    """
    params = dict(learning_rate=cfg.lr, wd=cfg.wd, lr_scheduler=lr_scheduler, begin_num_update=begin_num_update,
                  multi_precision=cfg.dtype == "float16")
    if cfg.optimizer in MOMENTUM_OPTIMIZERS:
        params["momentum"] = cfg.mom
    if cfg.optimizer == "lbsgd":
        macrobatch = max(cfg.macrobatch_size, cfg.batch_size * num_workers)
        params.update(updates_per_epoch=max(1, epoch_size), begin_epoch=cfg.load_epoch or 0,
                      batch_scale=math.ceil(macrobatch / cfg.batch_size / num_workers),
                      warmup_strategy=cfg.warmup_strategy, warmup_epochs=cfg.warmup_epochs,
                      num_epochs=cfg.num_epochs)
    return params


def init_optimizer(module: mx.mod.Module, kvstore, cfg: TrainConfig, lr_scheduler, begin_num_update: int,
                   epoch_size: int = 1, num_workers: int = 1) -> None:
    """Let Module create the optimizer by name, as Module.fit does: it builds the index -> name map for the
    update placement it chooses, sets rescale_grad, and reads the lr multipliers from the training symbol's
    `__lr_mult__` attributes (see symbols.head.with_lr_mults), so they hold on every device/kvstore layout."""
    params = optimizer_params(cfg, lr_scheduler, begin_num_update, epoch_size, num_workers)
    try:
        module.init_optimizer(kvstore=kvstore, optimizer=cfg.optimizer, optimizer_params=params)
    except (TypeError, ValueError, AssertionError, mx.base.MXNetError) as err:
        raise TrainError(f"--optimizer {cfg.optimizer}: MXNet refused its parameters "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def check_optimizer(name: str, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Refuse an optimizer that cannot update these parameters, before training starts.

    Raises:
        TrainError: groupadagrad (row-wise AdaGrad for embeddings) with a parameter that is not 2-D.
    """
    if name == "groupadagrad":
        other = [n for n, shape in shapes.items() if len(shape) != 2]
        if other:
            raise TrainError(f"--optimizer groupadagrad updates 2-D weights only (embedding rows); {other[0]} has "
                             f"shape {shapes[other[0]]}; use adagrad")


def check_kv_store(name: str, gpus: Optional[str]) -> None:
    """Refuse, in one line each, the kvstores fit.py could name that cannot run here.

    Raises:
        TrainError: horovod/byteps not installed, nccl without GPUs or without an NCCL build.
    """
    import importlib.util
    if name in ("horovod", "byteps"):
        module = {"horovod": "horovod.mxnet", "byteps": "byteps.mxnet"}[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            raise TrainError(f"--kv-store {name}: {module} is not installed (it is a separate package, launched with "
                             f"its own runner); use --kv-store device, or dist_sync with `python -m tools.launch`")
    if name == "nccl":
        if not gpus:
            raise TrainError("--kv-store nccl needs --gpus: NCCL runs on GPUs only; on CPU use --kv-store device")
        if not mx.runtime.Features().is_enabled("NCCL"):
            raise TrainError("--kv-store nccl: this MXNet build has no NCCL (mxnet-cu* wheels of 1.9.1 do); use "
                             "--kv-store device")


def make_kvstore(cfg: TrainConfig):
    """The kvstore object fit.py would create, where one is needed before Module: a dist store, or gradient
    compression (--gc-type), which is set on the store object. Else None: Module creates --kv-store by name."""
    if "dist" not in cfg.kv_store and cfg.gc_type == "none":
        return None
    kv = mx.kv.create(cfg.kv_store)
    if cfg.gc_type != "none":
        try:
            kv.set_gradient_compression({"type": cfg.gc_type, "threshold": cfg.gc_threshold})
        except Exception as err:  # noqa: BLE001 - MXNet raises a bare Exception for the stores without it
            raise TrainError(f"--gc-type {cfg.gc_type}: --kv-store {cfg.kv_store} cannot compress gradients "
                             f"({str(err).splitlines()[0][:120]}); use --kv-store device or a dist store") from None
    return kv


def make_initializer(name: str, network: Optional[str] = None) -> Optional[mx.init.Initializer]:
    """fit.py's --initializer, for the new head's weights: None for 'xavier', which symbols.head draws itself
    (MXNet's Xavier() distribution, uniform with fan-avg and magnitude 3, seeded with numpy by --seed)."""
    if name == "default":
        if network == "alexnet":
            return mx.init.Normal()
        if network and "vgg" in network:
            return None
        return mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2)
    return {"xavier": None, "msra": mx.init.MSRAPrelu(), "orthogonal": mx.init.Orthogonal(),
            "normal": mx.init.Normal(), "uniform": mx.init.Uniform(), "one": mx.init.One(),
            "zero": mx.init.Zero()}[name]


def flag_notes(cfg: TrainConfig) -> List[str]:
    """One line for each fine-tune.py flag given that does nothing (or less) here, saying what it does."""
    notes = []
    if cfg.network or cfg.num_layers:
        given = " ".join(f for f, v in (("--network " + str(cfg.network), cfg.network),
                                       ("--num-layers " + str(cfg.num_layers), cfg.num_layers)) if v)
        notes.append(f"{given}: the network is the pretrained checkpoint's ({cfg.pretrained_model or cfg.model_prefix}"
                     f"-symbol.json); --network only picks --initializer default's distribution, as in fit.py")
    if cfg.benchmark:
        notes.append("--benchmark 1: synthetic data is not offered here; training reads --data-train (time the "
                     "input pipeline with --test-io 1)")
    if cfg.use_imagenet_data_augmentation:
        notes.append("--use-imagenet-data-augmentation 1: train_imagenet.py's preset, which fine-tune.py ignores too; "
                     "no augmentation is added, set the augmentation flags")
    if cfg.optimizer != "lbsgd":
        lbsgd_only = [f"{flag_of(k)} {getattr(cfg, k)}" for k, v in (("warmup_epochs", 5),
                      ("warmup_strategy", "linear"), ("macrobatch_size", 0)) if getattr(cfg, k) != v]
        if lbsgd_only:
            notes.append(f"{', '.join(lbsgd_only)}: read by --optimizer lbsgd only (as in fit.py); a warm-up for "
                         f"{cfg.optimizer} is --lr-warmup-epochs")
    if cfg.mom and cfg.optimizer not in MOMENTUM_OPTIMIZERS:
        notes.append(f"--mom {cfg.mom:g}: {cfg.optimizer} has no momentum parameter (fit.py passes --mom to "
                     f"{', '.join(MOMENTUM_OPTIMIZERS)} only)")
    if cfg.profile_server_suffix and "dist" not in cfg.kv_store:
        notes.append(f"--profile-server-suffix {cfg.profile_server_suffix}: only a dist kvstore has servers; "
                     f"nothing is profiled on that side")
    if cfg.dtype == "float16" and cfg.network:
        notes.append("--dtype float16: the checkpoint's symbol is cast here (input to float16, logits back to float32)"
                     "; fine-tune.py rebuilds it from --network instead")
    return notes


# ---- the model ------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A network ready to train: symbol, complete weights, its sidecar and where it came from."""

    symbol: mx.sym.Symbol
    arg_params: Dict[str, mx.nd.NDArray]
    aux_params: Dict[str, mx.nd.NDArray]
    spec: HeadSpec
    pre: Preprocess
    sidecar_dir: Path
    new_params: List[str]
    dropped: List[str] = field(default_factory=list)


def load_checkpoint(prefix: str, epoch: int, what: str):
    """symbols.checkpoint.load_checkpoint with the trainer's error type."""
    try:
        return checkpoint.load_checkpoint(prefix, epoch, what)
    except checkpoint.CheckpointError as err:
        raise TrainError(str(err)) from None


def prepare_model(pretrained_model: str, pretrained_epoch: int, num_classes: int,
                  image_shape: Optional[Sequence[int]] = None, layer_before_fullc: Optional[str] = None,
                  hidden: int = 0, hidden_dropout: float = 0.5, seed: int = 0, dtype: str = "float32",
                  keep_head_names: bool = False, initializer: Optional[mx.init.Initializer] = None,
                  rgb_mean: Optional[Sequence[float]] = None, rgb_std: Optional[Sequence[float]] = None,
                  from_scratch: bool = False) -> Prepared:
    """Load a pretrained checkpoint and give it a new `num_classes` head, named as fine-tune.py names it (`fc` ->
    `softmax`, label `softmax_label`) unless `keep_head_names`; `initializer` draws its weights (None:
    symbols.head's seeded Xavier-uniform).

    Its sidecar says how it is fed; a plain MXNet checkpoint (no sidecar: a model-zoo model, a fine-tune.py
    output) is read under fine-tune.py's assumptions (symbols.sidecar.plain_checkpoint_sidecar, with the
    `image_shape`/`rgb_mean`/`rgb_std`/`layer_before_fullc` given), said in one log line. `from_scratch` keeps
    the architecture and re-initialises every weight (symbols.head.scratch_network).
    """
    looked_for = [checkpoint.symbol_path(pretrained_model), checkpoint.params_path(pretrained_model, pretrained_epoch),
                  sidecar_path(pretrained_model)]
    if not any(path.exists() for path in looked_for):  # a wrong path, not an unconverted model
        folder = looked_for[0].parent
        raise TrainError(f"--pretrained-model {pretrained_model}: no such checkpoint: none of "
                         f"{', '.join(p.name for p in looked_for)} exists in {folder}"
                         + ("" if folder.is_dir() else " (the folder does not exist)"))
    sym, args, aux = load_checkpoint(pretrained_model, pretrained_epoch, "pretrained")
    if has_sidecar(pretrained_model):
        pre = load_sidecar(pretrained_model)
    else:
        pre = plain_checkpoint_sidecar(sym.tojson(), image_shape, rgb_mean, rgb_std, layer_before_fullc,
                                       prefix=str(pretrained_model))
        log.info("%s", pre.source["assumed"])
        if pre.classifier is None and not layer_before_fullc:
            layer_before_fullc = pre.feature_output
    shape = tuple(image_shape or pre.input_shape)
    try:
        spec = find_head(sym, pre.classifier, pre.feature_output, pre.output_name, layer_before_fullc)
        if not keep_head_names:
            spec = fine_tune_names(sym, spec)
        if from_scratch:
            sym, args, aux = scratch_network(sym, args, aux, seed)
        head = replace_head(sym, args, aux, shape, num_classes, spec, hidden, hidden_dropout, seed, dtype,
                            initializer)
    except HeadError as err:
        raise TrainError(f"{pretrained_model}: {err}") from None
    return Prepared(head.symbol, head.arg_params, head.aux_params, head.spec, pre,
                    Path(str(pretrained_model)).parent, head.new_params, head.dropped)


def check_preprocessing(pre: Preprocess, cfg: TrainConfig) -> None:
    """Start-up lines for the settings that silently change what a pretrained model sees (issue 22): a
    --rgb-mean/--rgb-std other than the sidecar's (logged; a warning when it is the sidecar's in reverse
    channel order, the RGB/BGR mix-up), and an --image-shape other than a fixed-size model's declared size."""
    where = cfg.pretrained_model
    order = slice(None, None, -1) if pre.channel_order == "BGR" else slice(None)
    for flag, given, own in (("--rgb-mean", cfg.rgb_mean, pre.mean), ("--rgb-std", cfg.rgb_std, pre.std)):
        if given is None or pre.source.get("plain_checkpoint"):  # a plain checkpoint's sidecar is the flags
            continue
        if isinstance(own, str):
            log.info("%s %s replaces %s's mean image %s", flag, _numbers(given), where, own)
            continue
        ours = pre.per_channel(given, flag)
        theirs = pre.per_channel(own, flag)[order] if own is not None else [0.0 if "mean" in flag else 1.0] * 3
        if np.allclose(ours, theirs, atol=1e-3):
            continue
        if np.allclose(ours, theirs[::-1], atol=0.5):
            log.warning("%s %s is %s's own %s in reverse (B,G,R) order: the flag takes R,G,B, so the model's "
                        "own is %s; drop the flag to use it", flag, _numbers(given), where, flag[6:],
                        _numbers(theirs))
        else:
            log.info("%s %s (R,G,B) replaces %s's %s %s", flag, _numbers(given), where, flag[6:],
                     _numbers(theirs))
    declared = declared_input_size(pre)
    if cfg.image_shape is not None and declared is not None and tuple(cfg.image_shape[1:]) != declared:
        log.warning("--image-shape %s: %s takes only %dx%d (its sidecar's source.input_sizes: fixed); at %dx%d "
                    "its layers see another scale than they were trained at and the new head is sized for it; "
                    "pack at %d and drop --image-shape unless this is meant", _numbers(cfg.image_shape), where,
                    *declared, *cfg.image_shape[1:], max(declared))


def _numbers(values) -> str:
    return ",".join(f"{float(v):g}" for v in values)


def trained_sidecar(prepared: Prepared, cfg: TrainConfig, prefix: str, shape: Sequence[int], classes: ClassInfo,
                    **source) -> Preprocess:
    """The sidecar of the trained model: the pretrained one with the new head, classes and input shape; a mean
    image is copied beside the new checkpoint."""
    spec = prepared.spec
    pre = replace(prepared.pre, input_shape=tuple(shape), num_classes=classes.num_classes,
                  classifier=spec.classifier, feature_output=spec.feature_output, output_name=spec.output_name,
                  class_names=classes.names,
                  source={"fine_tuned_from": f"{cfg.pretrained_model}-{cfg.pretrained_epoch:04d}",
                          "data_train": str(cfg.data_train), **source, "parent": prepared.pre.source})
    if isinstance(pre.mean, str):
        pre = copy_mean_file(pre, cfg.pretrained_model, prefix)
    return pre


@dataclass
class Model:
    """What a run trains: the symbol, its weights, its sidecar (as it will be saved) and where it came from."""

    symbol: mx.sym.Symbol
    arg_params: Dict[str, mx.nd.NDArray]
    aux_params: Dict[str, mx.nd.NDArray]
    spec: HeadSpec
    pre: Preprocess
    sidecar_dir: Path         # where a mean image named by `pre` is read from while training
    new_params: List[str]
    shape: Tuple[int, ...]
    dropped: List[str] = field(default_factory=list)

    @property
    def label_name(self) -> str:
        return f"{self.spec.output_name}_label"

    def param_names(self) -> List[str]:
        return [n for n in self.symbol.list_arguments() if n not in ("data", self.label_name)]


def prepare_from_config(cfg: TrainConfig, num_classes: int) -> Prepared:
    """prepare_model with every option of `cfg` that shapes the starting model, and the start-up lines about it:
    the one route by which a run (fit, the feature cache, lr-find) gets the model it starts from."""
    prepared = prepare_model(cfg.pretrained_model, cfg.pretrained_epoch, num_classes, cfg.image_shape,
                             cfg.layer_before_fullc, cfg.hidden, cfg.hidden_dropout, cfg.seed,
                             keep_head_names=cfg.keep_head_names,
                             initializer=make_initializer(cfg.initializer, cfg.network),
                             rgb_mean=cfg.rgb_mean, rgb_std=cfg.rgb_std, from_scratch=cfg.from_scratch)
    if cfg.from_scratch:
        log.info("--from-scratch: %s's architecture with fresh weights in every layer (seed %d); its pretrained "
                 "weights are not used", cfg.pretrained_model, cfg.seed)
    check_preprocessing(prepared.pre, cfg)
    return prepared


def _fresh_model(cfg: TrainConfig, prefix: str, classes: ClassInfo) -> Model:
    prepared = prepare_from_config(cfg, classes.num_classes)
    shape = tuple(cfg.image_shape or prepared.pre.input_shape)
    pre = trained_sidecar(prepared, cfg, prefix, shape, classes,
                          **({"from_scratch": True} if cfg.from_scratch else {}))
    sidecar_dir = Path(prefix).parent if isinstance(prepared.pre.mean, str) else prepared.sidecar_dir
    return Model(prepared.symbol, prepared.arg_params, prepared.aux_params, prepared.spec, pre, sidecar_dir,
                 prepared.new_params, shape, prepared.dropped)


def _resumed_model(cfg: TrainConfig, prefix: str, classes: ClassInfo) -> Model:
    if not has_sidecar(prefix):
        raise TrainError(f"{sidecar_path(prefix)}: missing, cannot resume {prefix}")
    pre = load_sidecar(prefix)
    symbol, args, aux = load_checkpoint(prefix, cfg.load_epoch, "resume")
    if pre.num_classes != classes.num_classes:
        raise TrainError(f"{sidecar_path(prefix)}: the checkpoint has {pre.num_classes} classes, the data "
                         f"{classes.num_classes}")
    if pre.class_names and classes.names and pre.class_names != classes.names:
        raise TrainError(f"{classes.class_map}: class names differ from those the checkpoint was trained with "
                         f"({sidecar_path(prefix)}); a resume must use the same classes in the same order")
    spec = HeadSpec(pre.classifier, pre.feature_output or "", pre.output_name)
    return Model(symbol, args, aux, spec, pre, Path(prefix).parent, [], tuple(cfg.image_shape or pre.input_shape))


# ---- what every training route settles first ------------------------------------------------------------------
def resolve_load_epoch(cfg: TrainConfig) -> TrainConfig:
    """The command line's --load-epoch, one rule (docs/training.md):

    - with --pretrained-model P, `--load-epoch N` names the pretrained epoch, as in fine-tune.py: the run starts
      from P-NNNN.params with a new head (the same as --pretrained-epoch N);
    - without --pretrained-model, `--load-epoch N` resumes the run at --model-prefix from its epoch N (weights,
      optimizer state, schedule; the run's other options are checked against PREFIX-config.json).

    Returns the config in the trainer's terms (pretrained_epoch, and load_epoch for a resume only).

    Refused, each with a one-line reason: P is the --model-prefix itself (fine-tune.py's way of continuing a
    run: a new head on the run, or a resume of it?); --model-prefix already has its own epoch N (the old "same
    command plus --load-epoch N" resume; --overwrite says "start afresh"); --pretrained-epoch names another
    epoch.
    """
    if cfg.load_epoch is None or not cfg.pretrained_model:
        return cfg
    if cfg.model_prefix and Path(cfg.pretrained_model).resolve() == Path(cfg.model_prefix).resolve():
        raise TrainError(f"--pretrained-model and --model-prefix are both {cfg.model_prefix}: to resume that run "
                         f"with its optimizer state, drop --pretrained-model (--model-prefix {cfg.model_prefix} "
                         f"--load-epoch {cfg.load_epoch}); to start a new run from its epoch {cfg.load_epoch}, "
                         f"choose another --model-prefix")
    own = checkpoint.params_path(cfg.model_prefix, cfg.load_epoch) if cfg.model_prefix else None
    if own is not None and own.is_file() and not cfg.overwrite:
        raise TrainError(f"--load-epoch {cfg.load_epoch} with --pretrained-model starts a new run from "
                         f"{checkpoint.params_path(cfg.pretrained_model, cfg.load_epoch)} (fine-tune.py's meaning), "
                         f"but this run's {own} exists: to resume it, drop --pretrained-model; to start afresh, "
                         f"pass --overwrite or another --model-prefix")
    if cfg.pretrained_epoch not in (0, cfg.load_epoch):
        raise TrainError(f"--load-epoch {cfg.load_epoch} and --pretrained-epoch {cfg.pretrained_epoch} name two "
                         f"epochs of {cfg.pretrained_model}: with --pretrained-model, --load-epoch is the "
                         f"pretrained epoch (fine-tune.py's meaning); give one of them")
    return replace(cfg, pretrained_epoch=cfg.load_epoch, load_epoch=None)


def start_run(cfg: TrainConfig, prefix: str) -> ClassInfo:
    """Validate `cfg`, check the data's classes, drop what an older version's killed run left of an unpublished
    epoch and check that a fresh run does not overwrite checkpoints. The caller holds the prefix's writer lock,
    whose settle already removed dead runs' `.part` files (recbuild.publish.remove_dead_leftovers)."""
    cfg.validate()
    classes = resolve_classes(cfg.data_train, cfg.num_classes, cfg.data_val)
    drop_unpublished(prefix)
    done = complete_epochs(prefix)
    if cfg.load_epoch is None and done and not cfg.overwrite:
        raise TrainError(f"{checkpoint.params_path(prefix, done[-1])} exists: resume with --load-epoch "
                         f"{done[-1]}, or pass --overwrite, or choose another --model-prefix")
    later = [e for e in checkpoint.list_epochs(prefix) if cfg.load_epoch is not None and e > cfg.load_epoch]
    if later:  # their epochs would stand beside the resumed run's until overwritten: `latest` would mix the two
        raise TrainError(f"{checkpoint.params_path(prefix, later[-1])} exists: resuming from epoch "
                         f"{cfg.load_epoch} would leave epochs {', '.join(map(str, later))} of the earlier "
                         f"trajectory beside the new ones; resume with --load-epoch {later[-1]}, or move those "
                         f"epochs away, or resume into another --model-prefix")
    return classes


def complete_epochs(prefix: str) -> List[int]:
    """Epochs (> 0) that can be resumed: `.params` (published last) and, where the run keeps optimizer state
    (every kvstore but a dist one updating on its servers), `.states` beside it."""
    epochs = [e for e in checkpoint.list_epochs(prefix) if e > 0]
    with_states = [e for e in epochs if checkpoint.states_path(prefix, e).is_file()]
    return with_states if with_states else epochs


def drop_unpublished(prefix: str) -> None:
    """Remove what a run killed inside publish_epoch left of an epoch whose .params never came: its .states
    and its metrics row (they are written first), so the files on disk describe whole epochs only."""
    published = set(checkpoint.list_epochs(prefix))
    folder, name = Path(prefix).parent, Path(prefix).name
    for states in folder.glob(f"{name}-[0-9][0-9][0-9][0-9].states") if folder.is_dir() else []:
        if int(states.name[len(name) + 1:len(name) + 5]) not in published:
            log.info("removing %s: its epoch was never published (no .params)", states)
            states.unlink(missing_ok=True)
    history = MetricsLog.load(prefix, max(published, default=0))
    if history.json_path.is_file() and len(history.rows) < len(MetricsLog.load(prefix, 10 ** 9).rows):
        history.write()


def resolve_mults(param_names: Sequence[str], rules: Sequence[str]) -> Dict[str, float]:
    """`--lr-mult` rules -> {parameter: multiplier} (TrainError for a bad or unmatched rule)."""
    try:
        return resolve_lr_mults(param_names, [parse_lr_mult(text) for text in rules])
    except ValueError as err:
        raise TrainError(str(err)) from None


def resume_point(cfg: TrainConfig, prefix: str, batches_per_epoch: int) -> Tuple[MetricsLog, int, int, Optional[dict]]:
    """(metrics so far, first epoch to run, update count so far, the metrics row of the resumed epoch)."""
    if cfg.load_epoch is None:
        return MetricsLog(prefix), 0, 0, None
    history = MetricsLog.load(prefix, cfg.load_epoch)
    prev = history.row(cfg.load_epoch)
    done = int(prev["num_update"]) if prev and "num_update" in prev else cfg.load_epoch * batches_per_epoch
    return history, cfg.load_epoch, done, prev


def guard_resume(cfg: TrainConfig, num_contexts: int, batches_per_epoch: int, num_update: int,
                 check: bool = True) -> dict:
    """On --load-epoch, compare every trajectory-shaping option with the run's PREFIX-config.json (unless
    `check` is False: a new stage of train.recipes.stages, whose options differ by design).

    Returns what the rewritten PREFIX-config.json carries forward: its `config_history` (with this change
    when --allow-config-change let it through) and the pretrained parameters the run dropped.

    Raises:
        TrainError: an option differs and --allow-config-change is not given; the message names them all.
    """
    path = config_path(cfg.model_prefix)
    if cfg.load_epoch is None:
        return {}
    if not path.is_file():
        log.warning("%s: missing, so this resume cannot be checked against the run's options", path)
        return {}
    recorded = load_run_config(cfg.model_prefix)
    record = json.loads(path.read_text(encoding="utf-8"))
    changed = {flag_of(name): (getattr(recorded, name), getattr(cfg, name)) for name in trajectory_options()
               if getattr(recorded, name) != getattr(cfg, name)
               and not (name in ("pretrained_model", "pretrained_epoch") and not cfg.pretrained_model)}
    devices = len(record.get("resolved", {}).get("contexts", [])) or num_contexts
    if devices != num_contexts:
        changed["devices"] = (devices, num_contexts)
    carried = {"config_history": list(record.get("config_history", [])),
               "dropped_pretrained": record.get("resolved", {}).get("dropped_pretrained", [])}
    if not check:
        return carried
    if changed and not cfg.allow_config_change:
        listed = ", ".join(f"{flag} {_shown(new)} (the run had {_shown(old)})" for flag, (old, new) in changed.items())
        raise TrainError(f"{path}: resuming with options that change the training trajectory: {listed}; resume "
                         f"with the run's values, or pass --allow-config-change to continue with these (the change "
                         f"is recorded in {path.name})")
    if changed:
        log.warning("resuming %s at epoch %d with changed options (allowed): %s", cfg.model_prefix, cfg.load_epoch,
                    {k: {"from": o, "to": n} for k, (o, n) in changed.items()})
        carried["config_history"].append({"resumed_from_epoch": cfg.load_epoch, "time": time.strftime(
            "%Y-%m-%dT%H:%M:%S%z"), "changed": {k: {"from": o, "to": n} for k, (o, n) in changed.items()}})
    if recorded.num_epochs != cfg.num_epochs:
        log.warning("%s", schedule_change(recorded, cfg, batches_per_epoch, num_update))
    return carried


def _shown(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else "(none)"
    return str(value)


def schedule_change(recorded: TrainConfig, cfg: TrainConfig, batches_per_epoch: int, num_update: int) -> str:
    """What a changed --num-epochs does to the lr schedule from the resumed epoch on, in one sentence."""
    def plan(c: TrainConfig):
        return schedule(c.lr_scheduler, c.lr, batches_per_epoch, c.num_epochs, c.lr_step_epochs, c.lr_factor,
                        c.lr_warmup_epochs)
    now, recorded_plan = plan(cfg)(num_update + 1), plan(recorded)
    # MXNet's schedulers hold their last value past their end, so walk the recorded plan to its end first.
    recorded_plan(min(num_update + 1, recorded.num_epochs * batches_per_epoch))
    before = recorded_plan(num_update + 1)
    where = f"--num-epochs {recorded.num_epochs} -> {cfg.num_epochs}, resuming at epoch {cfg.load_epoch + 1}"
    if cfg.lr_scheduler == "cosine":
        return (f"{where}: the cosine schedule is re-planned to reach 0 at epoch {cfg.num_epochs}; the lr continues "
                f"at {now:g} where the {recorded.num_epochs}-epoch plan had {before:g}")
    old_steps = [e for e in step_epochs(recorded.lr_step_epochs) if 0 < e < recorded.num_epochs]
    new_steps = [e for e in step_epochs(cfg.lr_step_epochs) if 0 < e < cfg.num_epochs]
    steps = "the same lr steps" if old_steps == new_steps else f"lr steps at epochs {new_steps or 'none'} " \
                                                                 f"(were {old_steps or 'none'})"
    return f"{where}: step schedule with {steps}; the lr continues at {now:g}"


def write_run_files(cfg: TrainConfig, prefix: str, model: Model, classes: ClassInfo, resolved: dict,
                    carried: Optional[dict] = None, record_config: bool = True) -> None:
    """PREFIX-config.json (the options, what the run resolved, the config history), the symbol, sidecar and
    class map, published as one unit. A fresh run (no --load-epoch) removes every file of an earlier run on this
    prefix in the same unit (--overwrite; start_run refuses otherwise), so no later step can pair the two runs."""
    carried = carried or {}
    with publish(prefix) as unit:
        if cfg.load_epoch is None:
            for path in earlier_run_files(prefix):
                unit.remove(path)
        _write_run_files(cfg, prefix, model, classes, resolved, carried, record_config)


def earlier_run_files(prefix: str) -> List[Path]:
    """What a training run on `prefix` wrote: every epoch > 0 (.params, .states), the metrics, the config, the
    recipes' stage record and the class map (epoch 0, the symbol and the sidecar may be a converted model's:
    they are replaced, not removed)."""
    folder, name = Path(prefix).parent, Path(prefix).name
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(name) + r"(-\d{4}\.(params|states)|-metrics\.(json|csv|png)|-config\.json|"
                         r"-stages\.json|\.classes\.json)")
    files = [p for p in folder.iterdir() if pattern.fullmatch(p.name)]
    return sorted(p for p in files if not p.name.endswith("-0000.params") and not p.name.endswith("-0000.states"))


def _write_run_files(cfg: TrainConfig, prefix: str, model: Model, classes: ClassInfo, resolved: dict,
                     carried: dict, record_config: bool) -> None:
    if record_config:
        dropped = resolved.pop("dropped_pretrained", None) or carried.get("dropped_pretrained", [])
        write_json(config_path(cfg.model_prefix), {**cfg.to_dict(), "resolved": {
            "num_classes": classes.num_classes, "class_names": classes.names, "image_shape": list(model.shape),
            "head": asdict(model.spec), "dropped_pretrained": dropped, **resolved, "mxnet": mx.__version__},
            "config_history": carried.get("config_history", [])})
    checkpoint.save_symbol(prefix, model.symbol)
    save_sidecar(prefix, model.pre)
    if classes.names:
        write_class_map(prefix, classes.names)


def publish_epoch(prefix: str, epoch: int, args: Dict[str, mx.nd.NDArray], aux: Dict[str, mx.nd.NDArray],
                  write_states: Optional[Callable[[str], None]], history: MetricsLog, row: dict) -> None:
    """Publish one epoch as a unit (recbuild.publish): PREFIX-NNNN.states (with `write_states`), the metrics
    rows (.json and .csv) and PREFIX-NNNN.params are staged, then renamed together, the .params last (it marks an
    epoch complete for list_epochs, --load-epoch, the resume advice and stock readers). A kill at any point leaves
    the epoch whole (after the next settle) or absent; never a .params of one run beside a .states of another.

    Raises:
        TrainingDiverged: a weight is not finite; nothing is written.
    """
    bad = [n for n, v in list(args.items()) + list(aux.items()) if not all_finite(v)]
    if bad:
        raise TrainingDiverged(f"weights became non-finite in epoch {epoch} ({bad[0]}...); not writing "
                               f"{checkpoint.params_path(prefix, epoch)}; lower --lr")
    with publish(prefix) as unit:
        if write_states is not None:
            write_states(str(unit.stage(checkpoint.states_path(prefix, epoch))))
        # PREFIX-metrics.json/.csv and the .params join the unit through recbuild.atomic's staging hook.
        history.append(row)
        checkpoint.save_params(checkpoint.params_path(prefix, epoch), args, aux)


# Elements per slice when checking weights on the device. asnumpy() of a whole VGG16 fc6 weight is a 411 MB host
# copy plus a 103 MB mask (this check once set the run's peak memory above stock Module.fit's, and took 6 s);
# x * 0 is 0 for a finite x and NaN for NaN/inf, so the sum of a slice times 0 is finite exactly when every
# element is, and its 16 MB temporary comes from MXNet's memory pool.
_FINITE_SLICE = 1 << 22


def all_finite(array: mx.nd.NDArray) -> bool:
    """Whether every element is finite, computed on the array's device; one scalar per slice reaches the host."""
    flat = array.reshape((-1,))
    sums = [mx.nd.sum(flat[i:i + _FINITE_SLICE] * 0) for i in range(0, flat.shape[0], _FINITE_SLICE)]
    return bool(np.isfinite(mx.nd.concat(*sums, dim=0).asnumpy()).all()) if sums else True


def current_params(module: mx.mod.Module) -> Tuple[Dict[str, mx.nd.NDArray], Dict[str, mx.nd.NDArray]]:
    """The weights to checkpoint. On one float32 device they are the executor's own arrays, read in place:
    Module.get_params copies each one to the CPU, divides it by the device count and casts it, three
    temporaries per weight (1.2 GB at VGG16's fc6) for an average of one. Otherwise Module.get_params."""
    executors = module._exec_group.execs  # noqa: SLF001 - Module's executor group, one executor per device
    arg_dict, aux_dict = executors[0].arg_dict, executors[0].aux_dict
    names = module._param_names + module._aux_names  # noqa: SLF001
    if len(executors) != 1 or any({**arg_dict, **aux_dict}[n].dtype != np.float32 for n in names):
        return module.get_params()
    return ({n: arg_dict[n] for n in module._param_names},  # noqa: SLF001
            {n: aux_dict[n] for n in module._aux_names})  # noqa: SLF001


def log_epoch(epoch_index: int, row: dict, phase: str, losses: str = "") -> None:
    """fine-tune.py's (Module.fit's) epoch lines, which MXNet's tools/parse_log.py reads: `Epoch[N]
    Train-accuracy=...`, `Epoch[N] Time cost=...`, `Epoch[N] Validation-accuracy=...`, N counted from 0 (the
    checkpoint of Epoch[0] is -0001). Cross-entropy is always logged (the NaN stop computes it); `losses`
    (--loss 'nll_loss') adds mx.metric's `nll-loss` line, the same -log p(label)."""
    side, label = ("train_", "Train") if phase == "train" else ("val_", "Validation")
    for key, name in _metric_names(row, side):
        log.info("Epoch[%d] %s-%s=%f", epoch_index, label, name, row[key])
    if any(t.strip() in ("nll", "nll_loss") for t in losses.split(",")) and f"{side}loss" in row:
        log.info("Epoch[%d] %s-nll-loss=%f", epoch_index, label, row[f"{side}loss"])
    if phase == "train":
        log.info("Epoch[%d] Time cost=%.3f", epoch_index, row["seconds"])


def _metric_names(row: dict, side: str) -> List[Tuple[str, str]]:
    """(row key, MXNet metric name) in fine-tune.py's order: accuracy, top_k_accuracy_K, cross-entropy (the
    names mx.metric gives them)."""
    names = []
    for key in sorted(row, key=lambda k: k.endswith("loss")):
        if not key.startswith(side):
            continue
        metric = key[len(side):]
        if metric == "loss":
            names.append((key, "cross-entropy"))
        elif metric.startswith("top_") and metric.endswith("_accuracy"):
            names.append((key, f"top_k_accuracy_{metric[4:-9]}"))
        else:
            names.append((key, metric))
    return names


# ---- the loop -------------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """Where the run ended and what it measured."""

    prefix: str
    last_epoch: int
    metrics: List[dict]
    num_classes: int
    class_names: Optional[List[str]]
    dropped: List[str] = field(default_factory=list)   # pretrained parameters the new head left out or replaced


class EpochStream:
    """One shuffling ImageRecordIter for every training epoch, instead of one per epoch.

    MXNet 1.9's reset() with round_batch skips the records that padded the last batch, so the iterator runs
    with round_batch=False, whose reset() starts a fresh, complete permutation; the last batch's stale rows
    (reported with pad 0) are replaced here by the epoch's first records and reported as pad. Each reset()
    advances the shuffle the same way whether or not the epoch was read, so a resume at epoch k replays k
    resets and continues exactly. Random augmentation draws per decoded image and cannot be replayed that way:
    with it (or a per-epoch file, or distributed parts) the trainer builds a fresh iterator per epoch instead.
    """

    def __init__(self, make: Callable[[], mx.io.DataIter], num_records: int, begin_epoch: int):
        self.iterator, self.num_records = make(), num_records
        for _ in range(begin_epoch):
            self.iterator.reset()
        self.fresh = True

    def epoch(self):
        """The batches of the next epoch: every record once, the last batch filled up with the first ones."""
        if not self.fresh:
            self.iterator.reset()
        self.fresh, seen, first = False, 0, None
        for batch in self.iterator:
            size = batch.data[0].shape[0]
            keep = min(size, self.num_records - seen)
            if keep <= 0:
                break
            seen += keep
            if first is None:
                first = (batch.data[0].copy(), batch.label[0].copy())
            if keep < size:
                batch = mx.io.DataBatch(
                    data=[mx.nd.concat(batch.data[0][:keep], first[0][:size - keep], dim=0)],
                    label=[mx.nd.concat(batch.label[0][:keep], first[1][:size - keep], dim=0)],
                    pad=size - keep, provide_data=batch.provide_data, provide_label=batch.provide_label)
            yield batch


class ReusedPasses:
    """One ImageRecordIter for every pass over an unshuffled set (validation), instead of one per pass.

    MXNet 1.9's ImageRecordIter cannot simply be reset: with round_batch it pads the last batch with the first
    records of the next pass and then skips them after reset(); with round_batch=False every pass starts at the
    first record, but the last batch is filled with stale rows and reported with pad 0. So the iterator runs
    with round_batch=False and the real rows of each batch are counted here from the record count.
    """

    def __init__(self, make: Callable[[], mx.io.DataIter], num_records: int):
        self.make, self.num_records, self.iterator = make, num_records, None

    def __iter__(self):
        """(batch, number of real rows at its top) for one whole pass."""
        if self.iterator is None:
            self.iterator = self.make()
        else:
            self.iterator.reset()
        seen = 0
        for batch in self.iterator:
            keep = min(batch.data[0].shape[0], self.num_records - seen)
            if keep <= 0:
                break
            seen += keep
            yield batch, keep


def _evaluate(module: mx.mod.Module, data, top_k: int, epoch_index: int) -> Dict[str, float]:
    """Validation metrics; `data` yields (batch, real rows) like ReusedPasses, or plain batches (pad used)."""
    tally = Tally(top_k)
    for item in data:
        batch, keep = item if isinstance(item, tuple) else (item, None)
        module.forward(batch, is_train=False)
        probs = module.get_outputs()[0].asnumpy()
        keep = probs.shape[0] - batch.pad if keep is None else keep
        labels = batch.label[0].asnumpy()[:keep]
        probs = probs[:keep]
        if not np.isfinite(probs).all():
            log.warning("Epoch[%d] validation: the network's outputs are NaN/inf, so the validation loss and "
                        "accuracy are NaN; the weights were finite (lower --lr if this repeats)", epoch_index)
            return {"val_loss": float("nan"), "val_accuracy": float("nan")}
        tally.update(probs, labels)
    return tally.result("val_")


class EpochMeter:
    """Consumes each batch's outputs on the host, one batch behind the device: the running metrics, the NaN/inf
    guard, the progress bar and Speedometer's lines (`Epoch[N] Batch [a-b]\tSpeed: ... samples/sec\t...`,
    every `disp_batches`, as mx.callback.Speedometer writes them)."""

    def __init__(self, epoch_index: int, top_k: int, batch_size: int, disp_batches: int, bar, last_good: str):
        self.epoch_index, self.batch_size, self.disp_batches = epoch_index, batch_size, disp_batches
        self.tally, self.window = Tally(top_k), Tally(top_k)
        self.bar, self.last_good = bar, last_good
        self.images, self.start = 0, time.time()
        self.tic = self.start

    def consume(self, index: int, outputs: mx.nd.NDArray, labels: np.ndarray, pad: int) -> None:
        probs = outputs.asnumpy()
        if not np.isfinite(probs).all():
            raise TrainingDiverged(
                f"loss became NaN/inf at epoch {self.epoch_index + 1} batch {index + 1}; stopped, nothing of this "
                f"epoch written. Last good checkpoint: {self.last_good}. Lower --lr (or raise --warmup-epochs) "
                f"and resume with --load-epoch")
        keep = probs.shape[0] - pad
        loss = self.tally.update(probs[:keep], labels[:keep])
        self.window.update(probs[:keep], labels[:keep])
        self.images += keep
        if self.bar is not None:
            self.bar.update(keep)
            self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{self.tally.result()['accuracy']:.3f}", refresh=False)
        if index > 0 and index % self.disp_batches == 0:
            speed = self.disp_batches * self.batch_size / max(time.time() - self.tic, 1e-9)
            values = self.window.result()
            pairs = [(name, values[key]) for key, name in _metric_names(values, "")]
            log.info("Epoch[%d] Batch [%d-%d]\tSpeed: %.2f samples/sec" + "\t%s=%f" * len(pairs), self.epoch_index,
                     index - self.disp_batches, index, speed, *sum(pairs, ()))
            self.window.reset()
            self.tic = time.time()
        elif index == 0:
            self.tic = time.time()  # Speedometer starts timing after the first batch

    def row(self) -> dict:
        seconds = time.time() - self.start
        return {"epoch": self.epoch_index + 1, **self.tally.result("train_"),
                "img_per_s": self.images / max(seconds, 1e-9), "seconds": seconds}


@dataclass
class _Loop:
    """The fixed parts of one run's epoch loop."""

    cfg: TrainConfig
    module: mx.mod.Module
    model: Model
    prefix: str
    rank: int
    num_workers: int
    batches_per_epoch: int
    lr_plan: mx.lr_scheduler.LRScheduler   # a copy of the optimizer's schedule, queried for the metrics rows
    begin_epoch: int
    begin_num_update: int
    history: MetricsLog
    with_states: bool
    top_k: int
    epoch_train_rec: Optional[Callable[[int], str]]
    num_records: int = 0
    monitor: Optional[mx.mon.Monitor] = None
    stream: Optional[EpochStream] = None
    val: Optional[ReusedPasses] = None

    def make_iter(self, path, train: bool, seed: int, round_batch: bool = True) -> mx.io.DataIter:
        cfg = self.cfg
        return record_iter(path, cfg.batch_size, self.model.pre, self.model.sidecar_dir, self.model.label_name,
                           self.model.shape, train=train, augment=Augment(**cfg.group(AUGMENT)),
                           seed=seed, resize=cfg.resize, threads=cfg.data_nthreads,
                           num_parts=self.num_workers if train else 1, part_index=self.rank if train else 0,
                           rgb_mean=cfg.rgb_mean, rgb_std=cfg.rgb_std, round_batch=round_batch,
                           idx_path=(cfg.data_train_idx if path == cfg.data_train else "") or None,
                           pad=cfg.pad_size, fill_value=cfg.fill_value)

    def train_batches(self, epoch: int, epoch_seed: int):
        """This epoch's training batches: from the one reused iterator where that replays exactly (see
        EpochStream), else from a fresh iterator seeded (seed, epoch)."""
        cfg = self.cfg
        if reusable_train_iter(cfg, self.num_workers, self.epoch_train_rec):
            if self.stream is None:
                self.stream = EpochStream(lambda: self.make_iter(cfg.data_train, True, cfg.seed * 1000, False),
                                          self.num_records, self.begin_epoch)
            return self.stream.epoch()
        epoch_rec = self.epoch_train_rec(epoch) if self.epoch_train_rec is not None else cfg.data_train
        return _batches(lambda k: self.make_iter(epoch_rec, True, epoch_seed + 7919 * k),
                        self.batches_per_epoch if self.num_workers > 1 else None)

    def val_passes(self) -> ReusedPasses:
        """The validation iterator, built on the first pass and reused by the next ones."""
        if self.val is None:
            cfg = self.cfg
            count = record_count(cfg.data_val)
            self.val = ReusedPasses(lambda: record_iter(
                cfg.data_val, cfg.batch_size, self.model.pre, self.model.sidecar_dir, self.model.label_name,
                self.model.shape, train=False, seed=cfg.seed, resize=cfg.resize, threads=cfg.data_nthreads,
                rgb_mean=cfg.rgb_mean, rgb_std=cfg.rgb_std, round_batch=False, idx_path=cfg.data_val_idx or None),
                count)
        return self.val

    def write_states(self, path: str) -> None:
        checkpoint.save_optimizer_states(self.module, path)

    def layout(self) -> dict:
        return {"contexts": len(self.module._context),  # noqa: SLF001 - Module keeps its devices here
                "update_on_kvstore": bool(self.module._update_on_kvstore)}  # noqa: SLF001

    def run(self, last_good: str) -> None:
        try:
            for epoch in range(self.begin_epoch, self.cfg.num_epochs):
                last_good = self.run_epoch(epoch, last_good)
        finally:
            if self.rank == 0 and self.cfg.plot_metrics:
                self.history.draw()

    def run_epoch(self, epoch: int, last_good: str) -> str:
        done_before = _updates_done(self.begin_num_update, epoch - self.begin_epoch, self.batches_per_epoch,
                                    self.module._optimizer)  # noqa: SLF001 - Module owns the optimizer
        lr_start = float(self.lr_plan(done_before + 1))
        row = self.train_epoch(epoch, last_good)
        num_update = _updates_done(self.begin_num_update, epoch - self.begin_epoch + 1, self.batches_per_epoch,
                                   self.module._optimizer)  # noqa: SLF001
        lr_end = float(self.lr_plan(num_update))
        row.update(lr=lr_end, lr_start=lr_start, lr_end=lr_end, num_update=num_update, layout=self.layout())
        if not np.isfinite(row["train_loss"]):
            raise TrainingDiverged(f"loss became NaN/inf in epoch {epoch + 1}; last good checkpoint: {last_good}")
        losses = self.cfg.loss
        log_epoch(epoch, row, "train", losses)
        if self.cfg.data_val:
            row.update(_evaluate(self.module, self.val_passes(), self.top_k, epoch))
            log_epoch(epoch, row, "val", losses)
        # --save-period N: fit.py's do_checkpoint(period=N) writes every Nth epoch; the last one is written too,
        # so a run always ends with its result on disk.
        if (epoch + 1) % self.cfg.save_period and epoch + 1 < self.cfg.num_epochs:
            self.history.rows.append(row)   # kept for the next published epoch's metrics files
            return last_good
        args, aux = current_params(self.module)
        publish_epoch(self.prefix, epoch + 1, args, aux, self.write_states if self.with_states else None,
                      self.history, row)
        log.info('Saved checkpoint to "%s"', checkpoint.params_path(self.prefix, epoch + 1))
        return str(checkpoint.params_path(self.prefix, epoch + 1))

    def train_epoch(self, epoch: int, last_good: str) -> dict:
        cfg = self.cfg
        # Shuffling, augmentation and dropout replay exactly from (seed, epoch): the basis of exact resume.
        epoch_seed = cfg.seed * 1000 + epoch
        mx.random.seed(epoch_seed)
        train_iter = self.train_batches(epoch, epoch_seed)
        # The bar counts images: this worker's share of the records (a distributed part may wrap around).
        images = (self.num_records if self.num_workers == 1 else self.batches_per_epoch * cfg.batch_size)
        bar = _progress(cfg.progress and self.rank == 0, images, epoch + 1, cfg.num_epochs)
        meter = EpochMeter(epoch, self.top_k, cfg.batch_size, cfg.disp_batches, bar, last_good)
        pending = None
        try:
            for index, batch in enumerate(train_iter):
                if self.monitor is not None:
                    self.monitor.tic()
                self.module.forward_backward(batch)
                self.module.update()
                if self.monitor is not None:
                    self.monitor.toc_print()
                # A device-side snapshot of the outputs (the next forward overwrites them). The host reads it only
                # after the next batch's update is queued, so it never waits for a batch before queueing its
                # update; a NaN stops the run one batch later, still before anything of the epoch is published.
                current = (index, self.module.get_outputs()[0].copy(), batch.label[0].asnumpy(), batch.pad)
                if pending is not None:
                    meter.consume(*pending)
                pending = current
            if pending is not None:
                meter.consume(*pending)
            # The epoch's clock stops when its last update has run, not when it was queued: Module.fit's does (its
            # iterator waits for the data buffer the last backward reads), and the checkpoint waits for it anyway.
            mx.nd.waitall()
        finally:
            if bar is not None:
                bar.close()
        return meter.row()


def _bind(model: Model, cfg: TrainConfig, ctx: List[mx.Context], mults: Dict[str, float]) -> mx.mod.Module:
    """A Module over the training symbol (float16 cast, lr multipliers attached), weights loaded."""
    # float16 trains a cast copy; checkpoints keep the float32 symbol (same names), which runs anywhere.
    train_symbol = to_float16(model.symbol, model.spec) if cfg.dtype == "float16" else model.symbol
    module = mx.mod.Module(with_lr_mults(train_symbol, mults), data_names=["data"],
                           label_names=[model.label_name], context=ctx, fixed_param_names=frozen(mults))
    module.bind(data_shapes=[("data", (cfg.batch_size,) + model.shape)],
                label_shapes=[(model.label_name, (cfg.batch_size,))], for_training=True)
    module.init_params(arg_params=model.arg_params, aux_params=model.aux_params, allow_missing=False,
                       allow_extra=True)
    return module


def _load_states(module: mx.mod.Module, prefix: str, epoch: int, prev: Optional[dict], trust: bool = False) -> None:
    states = checkpoint.states_path(prefix, epoch)
    if not states.is_file():
        raise TrainError(f"{states}: optimizer state missing, cannot resume momentum exactly")
    layout = prev.get("layout") if prev else None
    now = {"contexts": len(module._context), "update_on_kvstore": bool(module._update_on_kvstore)}  # noqa: SLF001
    if layout and layout != now:
        raise TrainError(f"{states}: written with {layout}, this run has {now}; resume with the same "
                         f"--gpus/--cpus/--kv-store")
    try:
        checkpoint.load_optimizer_states(module, states, trust_pickle=trust)
    except checkpoint.CheckpointError as err:
        raise TrainError(str(err)) from None


def fit(cfg: TrainConfig, ctx: Optional[List[mx.Context]] = None, kvstore=None,
        restart_optimizer: bool = False, epoch_train_rec=None) -> FitResult:
    """Run (or resume) a fine-tuning run described by `cfg`.

    Args:
        cfg: the resolved configuration (validated here).
        ctx: devices; default from cfg.gpus / cfg.cpus.
        kvstore: an already created KVStore (e.g. a dist one); default from cfg.kv_store.
        restart_optimizer: when resuming, start a fresh optimizer (no .states loaded): a new stage of
            train.recipes.stages, whose optimizer may differ from the one that wrote the checkpoint.
        epoch_train_rec: optional callable (epoch index from 0) -> .rec path read for that epoch instead
            of cfg.data_train, with the same record count (train.recipes.sampling's class balance).

    Raises:
        TrainError / DataError: bad input, before training starts.
        TrainingDiverged: the loss became NaN/inf; the last good checkpoint is kept.
        recbuild.publish.PrefixBusy: another process is writing this prefix.
    """
    with contextlib.ExitStack() as hold:  # the prefix's writer lock, held for the whole run
        return _fit(cfg, ctx, kvstore, restart_optimizer, epoch_train_rec, hold)


def _fit(cfg: TrainConfig, ctx, kvstore, restart_optimizer: bool, epoch_train_rec,
         hold: contextlib.ExitStack) -> FitResult:
    cfg.validate()
    ctx = ctx or contexts(cfg.gpus, cfg.cpus)
    if kvstore is None:
        check_kv_store(cfg.kv_store, cfg.gpus)
        kvstore = make_kvstore(cfg)
    if cfg.recipe:
        log.info("--recipe %s: %s", cfg.recipe, " ".join(f"{flag_of(k)} {v}" for k, v in recipe_values(cfg).items()))
    for note in flag_notes(cfg):
        log.warning("%s", note)
    rank, num_workers = (kvstore.rank, kvstore.num_workers) if kvstore is not None else (0, 1)
    prefix = cfg.model_prefix if rank == 0 else f"{cfg.model_prefix}-{rank}"  # fit.py's convention
    hold.enter_context(writer_lock(prefix))  # also settles what a killed run on it left
    classes = start_run(cfg, prefix)
    resume = cfg.load_epoch is not None
    model = _resumed_model(cfg, prefix, classes) if resume else _fresh_model(cfg, prefix, classes)
    model.pre = plan_input(model.pre, model.sidecar_dir, model.shape, cfg)  # pack sidecars vs the input
    param_names = model.param_names()
    missing = [n for n in param_names if n not in model.arg_params]
    if missing:
        raise TrainError(f"{prefix}: weights for {missing[:5]} are missing from the checkpoint")
    mults = resolve_mults(param_names, cfg.lr_mult)
    fixed = frozen(mults)
    if len(fixed) == len(param_names):
        raise TrainError("--lr-mult freezes every parameter; nothing would train")

    batches_per_epoch = max(1, math.ceil(math.ceil(classes.num_records / num_workers) / cfg.batch_size))
    epoch_size = schedule_epoch_size(cfg, batches_per_epoch, num_workers)
    if cfg.test_io:
        read_speed(cfg, model, num_workers, rank)
        return FitResult(prefix, 0, [], classes.num_classes, classes.names, model.dropped)
    history, begin_epoch, begin_num_update, prev = resume_point(cfg, prefix, batches_per_epoch)
    carried = guard_resume(cfg, len(ctx), epoch_size, begin_num_update, check=not restart_optimizer)
    check_optimizer(cfg.optimizer, {n: tuple(v.shape) for n, v in model.arg_params.items() if n not in fixed})
    module = _bind(model, cfg, ctx, mults)
    # Module.init_params copied the weights into the module; the loaded ones would be a third copy held for
    # the whole run (528 MB for VGG16, what put the peak above stock Module.fit's).
    model.arg_params, model.aux_params = {}, {}
    monitor = None
    if cfg.monitor > 0:
        monitor = mx.mon.Monitor(cfg.monitor, pattern=".*")
        module.install_monitor(monitor)
    sched = schedule(cfg.lr_scheduler, cfg.lr, epoch_size, cfg.num_epochs, cfg.lr_step_epochs,
                     cfg.lr_factor, cfg.lr_warmup_epochs)
    init_optimizer(module, kvstore if kvstore is not None else cfg.kv_store, cfg, sched, begin_num_update,
                   epoch_size, num_workers)
    # A dist kvstore that updates on the servers keeps the optimizer state there, out of reach of a checkpoint.
    dist_states = "dist" in cfg.kv_store and module._update_on_kvstore  # noqa: SLF001
    if resume and not restart_optimizer:
        if dist_states:
            log.warning("dist kvstore: optimizer state lives on the servers and is not checkpointed; momentum "
                        "restarts from zero on resume")
        else:
            _load_states(module, prefix, cfg.load_epoch, prev, cfg.trust_states)

    write_run_files(cfg, prefix, model, classes, {
        "frozen": fixed, "lr_mults": {n: m for n, m in mults.items() if m != 1.0}, "new_params": model.new_params,
        "dropped_pretrained": model.dropped, "contexts": [str(c) for c in ctx], "kv_store": cfg.kv_store,
        "num_workers": num_workers, "batches_per_epoch": batches_per_epoch}, carried, record_config=rank == 0)
    log.info("training %s: %d classes, %d records, %d params (%d frozen), on %s",
             prefix, classes.num_classes, classes.num_records, len(param_names), len(fixed), ctx)

    last_good = (str(checkpoint.params_path(prefix, begin_epoch)) if resume else
                 f"{cfg.pretrained_model}-{cfg.pretrained_epoch:04d}.params (no epoch finished)")
    top_k = cfg.top_k if cfg.top_k < classes.num_classes else 0  # top-k of all classes is always 1
    lr_plan = schedule(cfg.lr_scheduler, cfg.lr, epoch_size, cfg.num_epochs, cfg.lr_step_epochs,
                       cfg.lr_factor, cfg.lr_warmup_epochs)
    with profiling(cfg, kvstore, rank, num_workers):
        _Loop(cfg, module, model, prefix, rank, num_workers, batches_per_epoch, lr_plan, begin_epoch,
              begin_num_update, history, not dist_states, top_k, epoch_train_rec, classes.num_records,
              monitor=monitor).run(last_good)
    return FitResult(prefix, cfg.num_epochs, history.rows, classes.num_classes, classes.names, model.dropped)


def schedule_epoch_size(cfg: TrainConfig, batches_per_epoch: int, num_workers: int) -> int:
    """Updates per epoch as the lr schedule (and lbsgd) count them: fit.py's epoch size from --num-examples,
    ceil(int(num_examples / workers) / batch), when given; else the batches the data gives."""
    if cfg.num_examples is None:
        return batches_per_epoch
    size = max(1, math.ceil(int(cfg.num_examples / num_workers) / cfg.batch_size))
    if size != batches_per_epoch:
        log.warning("--num-examples %d: the lr schedule counts epochs of %d batches (fit.py's epoch size); the data "
                    "gives %d batches per epoch, and every epoch reads all of them", cfg.num_examples, size,
                    batches_per_epoch)
    return size


def read_speed(cfg: TrainConfig, model: "Model", num_workers: int, rank: int) -> None:
    """--test-io 1: read one epoch of training batches, decoded and augmented, logging fit.py's lines
    `Batch [i]\tSpeed: N samples/sec` every --disp-batches; nothing is trained or written."""
    it = record_iter(cfg.data_train, cfg.batch_size, model.pre, model.sidecar_dir, model.label_name, model.shape,
                     train=True, augment=Augment.from_config(cfg), seed=cfg.seed * 1000, resize=cfg.resize,
                     threads=cfg.data_nthreads, num_parts=num_workers, part_index=rank, rgb_mean=cfg.rgb_mean,
                     rgb_std=cfg.rgb_std, idx_path=cfg.data_train_idx or None, pad=cfg.pad_size,
                     fill_value=cfg.fill_value)
    tic = started = time.time()
    count = 0
    for i, batch in enumerate(it):
        batch.data[0].wait_to_read()
        count += batch.data[0].shape[0] - batch.pad
        if (i + 1) % cfg.disp_batches == 0:
            log.info("Batch [%d]\tSpeed: %.2f samples/sec", i, cfg.disp_batches * cfg.batch_size / (time.time() - tic))
            tic = time.time()
    log.info("--test-io: read %d images in %.2f s (%.2f samples/sec); nothing trained", count,
             time.time() - started, count / max(time.time() - started, 1e-9))


class profiling:
    """--profile-worker-suffix / --profile-server-suffix: MXNet's profiler around the epochs, as fit.py sets it
    (a worker of several writes rankN_SUFFIX); the worker's trace is dumped when training ends."""

    def __init__(self, cfg: TrainConfig, kvstore, rank: int, num_workers: int):
        suffix = cfg.profile_worker_suffix
        self.worker = (f"rank{rank}_{suffix}" if num_workers > 1 else suffix) if suffix else ""
        self.server = cfg.profile_server_suffix if kvstore is not None and "dist" in cfg.kv_store else ""

    def __enter__(self):
        if self.server:
            mx.profiler.set_config(filename=self.server, profile_all=True, profile_process="server")
            mx.profiler.set_state(state="run", profile_process="server")
        if self.worker:
            mx.profiler.set_config(filename=self.worker, profile_all=True, profile_process="worker")
            mx.profiler.set_state(state="run", profile_process="worker")
        return self

    def __exit__(self, *exc):
        if self.worker:
            mx.profiler.set_state(state="stop", profile_process="worker")
            mx.profiler.dump(profile_process="worker")
            log.info("profile of this worker written to %s", self.worker)
        if self.server:
            mx.profiler.set_state(state="stop", profile_process="server")
        return False


def reusable_train_iter(cfg: TrainConfig, num_workers: int = 1, epoch_train_rec=None) -> bool:
    """Whether one training iterator can serve every epoch and still replay exactly on resume: no random
    augmentation (its per-image draws cannot be replayed), one file for every epoch, one worker."""
    return num_workers == 1 and epoch_train_rec is None and not active_augmentations(cfg)


def _batches(make, count: Optional[int]):
    """Batches of one epoch. With `count` (distributed), exactly that many: dist_sync waits for every worker at
    every push, so a worker whose part is a batch short would hang the job; a short part wraps around."""
    produced, refill = 0, 0
    it = make(0)
    while True:
        for batch in it:
            if count is not None and produced >= count:
                return
            produced += 1
            yield batch
        if count is None or produced >= count:
            return
        refill += 1
        it = make(refill)


def _updates_done(begin: int, epochs_run: int, batches_per_epoch: int, optimizer) -> int:
    """Update count after this epoch: the optimizer's own counter where it runs locally, else the plan."""
    counted = int(getattr(optimizer, "num_update", 0) or 0)
    return counted if counted > begin else begin + epochs_run * batches_per_epoch


def _progress(enabled: bool, total: int, epoch: int, epochs: int):
    """The epoch's bar, on stderr when it is a terminal only: in a log file or a pipe its carriage-return
    fragments would share lines with the log records (Speedometer's lines carry the same figures there). On a
    terminal the log records are routed through the bar (tqdm.write), so each keeps a line of its own."""
    import sys
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return _RoutedBar(tqdm(total=total, unit="img", unit_scale=False, desc=f"epoch {epoch}/{epochs}", leave=False,
                           dynamic_ncols=True, file=sys.stderr))


class _RoutedBar:
    """A tqdm bar that, while open, sends every logging record through tqdm.write (above the bar)."""

    def __init__(self, bar):
        from tqdm.contrib.logging import logging_redirect_tqdm
        self.bar = bar
        self.redirect = logging_redirect_tqdm()
        self.redirect.__enter__()

    def update(self, n: int) -> None:
        self.bar.update(n)

    def set_postfix(self, **kw) -> None:
        self.bar.set_postfix(**kw)

    def close(self) -> None:
        self.redirect.__exit__(None, None, None)
        self.bar.close()
