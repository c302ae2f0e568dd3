"""The fit loop: head surgery, lr_mult rules as an optimizer object, atomic per-epoch checkpoints, exact resume.

Reusable pieces (recipes build on them): `contexts`, `schedule`, `make_optimizer`, `prepare_model`,
`Checkpointer`, `fit`.

Why an explicit loop instead of Module.fit: the NaN check must see every batch before its update, checkpoints
must be atomic and carry the optimizer state, and each epoch reseeds shuffling, augmentation and dropout from
(seed, epoch), which is what makes "2 epochs + resume 2" equal "4 epochs".
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from recbuild.classmap import write_class_map
from symbols.head import (HeadError, NewHead, find_head, frozen, parse_lr_mult, replace_head,
                          resolve_lr_mults, to_float16)
from symbols.sidecar import Preprocess, copy_mean_file, has_sidecar, load_sidecar, save_sidecar, sidecar_path
from symbols.vgg import HeadSpec
from recbuild.atomic import atomic_path, write_json
from train.config import TrainConfig, config_path
from train.data import Augment, ClassInfo, DataError, plan_input, record_iter, resolve_classes
from train.metrics import MetricsLog, Tally

log = logging.getLogger(__name__)

# MXNet's 'local' kvstore stops updating on the kvstore for parameters above this size (model._create_kvstore);
# the optimizer's index -> name map depends on it, so it is mirrored here.
_KV_LOCAL_MAX_SIZE = 1024 * 1024 * 16


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainError(ValueError):
    """Bad input to a training run (files, flags); the message names it."""


# ---- devices and optimizer ---------------------------------------------------------------------------------
def contexts(gpus: Optional[str], cpus: int = 1) -> List[mx.Context]:
    """`--gpus 0,1` -> [gpu(0), gpu(1)]; no GPUs -> `cpus` CPU contexts (data-parallel the same way)."""
    if gpus:
        try:
            ids = [int(g) for g in str(gpus).split(",") if g.strip()]
        except ValueError:
            raise TrainError(f"--gpus {gpus!r}: expected comma-separated GPU ids, e.g. 0,1") from None
        available = mx.context.num_gpus()
        missing = [i for i in ids if i >= available]
        if missing:
            raise TrainError(f"--gpus {gpus}: GPU {missing[0]} not found ({available} visible; is this the "
                             f"mxnet-cu112 build? `make install GPU=cu112; source tools/gpu_env.sh`)")
        return [mx.gpu(i) for i in ids]
    return [mx.cpu(i) for i in range(cpus)]


def updates_on_kvstore(kv_type: Optional[str], num_contexts: int, param_sizes: Sequence[int]) -> bool:
    """Whether Module will run the optimizer inside the kvstore, mirroring mxnet.model._create_kvstore.

    It decides the optimizer's index layout: one index per parameter on the kvstore, otherwise one per
    (parameter, device) pair, i.e. index = param * num_devices + device.
    """
    if kv_type is None or (num_contexts == 1 and "dist" not in kv_type):
        return False
    if kv_type == "local" and param_sizes and max(param_sizes) > _KV_LOCAL_MAX_SIZE:
        return False
    return bool(int(os.getenv("MXNET_UPDATE_ON_KVSTORE", "1")))


def param_idx2name(param_names: Sequence[str], num_contexts: int, on_kvstore: bool) -> Dict[int, str]:
    """The optimizer index -> parameter name map Module uses (see updates_on_kvstore)."""
    if on_kvstore:
        return dict(enumerate(param_names))
    return {i * num_contexts + k: name for k in range(num_contexts) for i, name in enumerate(param_names)}


def schedule(kind: str, lr: float, batches_per_epoch: int, num_epochs: int, step_epochs: Sequence[int] = (),
             factor: float = 0.1, warmup_epochs: float = 0.0) -> mx.lr_scheduler.LRScheduler:
    """The learning rate as a function of the update count (MXNet's own schedulers, so dist servers can
    unpickle them). Steps are absolute epochs; a resumed run starts the count where it stopped."""
    warmup = int(round(warmup_epochs * batches_per_epoch))
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


def make_optimizer(name: str, lr: float, idx2name: Dict[int, str], lr_mults: Dict[str, float],
                   rescale_grad: float, lr_scheduler=None, mom: float = 0.9, wd: float = 0.0005,
                   begin_num_update: int = 0, multi_precision: bool = False, symbol=None) -> mx.optimizer.Optimizer:
    """An optimizer object whose per-parameter lr multipliers work on any device/kvstore layout.

    Symbol `__lr_mult__` attributes only reach the optimizer when Module creates it from a string; an object
    needs `param_idx2name` for the layout Module will use and `set_lr_mult` by name, which is done here.
    `begin_num_update` continues the schedule (and Adam's bias correction) on resume.
    """
    kwargs = dict(learning_rate=lr, wd=wd, rescale_grad=rescale_grad, lr_scheduler=lr_scheduler,
                  param_idx2name=idx2name, begin_num_update=begin_num_update, sym=symbol)
    if name in ("sgd", "nag"):
        kwargs.update(momentum=mom, multi_precision=multi_precision)
    elif name == "adam":
        kwargs.update(multi_precision=multi_precision) if multi_precision else None
    else:
        raise TrainError(f"--optimizer {name}: supported are sgd, nag, adam")
    optimizer = mx.optimizer.create(name, **kwargs)
    optimizer.set_lr_mult({n: m for n, m in lr_mults.items() if m != 1.0})
    return optimizer


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


def _load_checkpoint(prefix: str, epoch: int, what: str):
    for path in (Path(f"{prefix}-symbol.json"), Path(f"{prefix}-{epoch:04d}.params")):
        if not path.is_file():
            raise TrainError(f"{path}: {what} checkpoint file missing (prefix {prefix}, epoch {epoch})")
    try:
        return mx.model.load_checkpoint(prefix, epoch)
    except mx.base.MXNetError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
        raise TrainError(f"{prefix}-{epoch:04d}.params: cannot load {what} checkpoint ({first})") from None


def prepare_model(pretrained_model: str, pretrained_epoch: int, num_classes: int,
                  image_shape: Optional[Sequence[int]] = None, layer_before_fullc: Optional[str] = None,
                  hidden: int = 0, hidden_dropout: float = 0.5, seed: int = 0, dtype: str = "float32") -> Prepared:
    """Load a converted checkpoint and its sidecar and give it a new `num_classes` head."""
    if not has_sidecar(pretrained_model):
        raise TrainError(f"{sidecar_path(pretrained_model)}: no preprocessing sidecar beside the pretrained model; "
                         f"convert it with `python -m tools.caffe_converter`")
    pre = load_sidecar(pretrained_model)
    sym, args, aux = _load_checkpoint(pretrained_model, pretrained_epoch, "pretrained")
    shape = tuple(image_shape or pre.input_shape)
    try:
        spec = find_head(sym, pre.classifier, pre.feature_output, pre.output_name, layer_before_fullc)
        head = replace_head(sym, args, aux, shape, num_classes, spec, hidden, hidden_dropout, seed, dtype)
    except HeadError as err:
        raise TrainError(f"{pretrained_model}: {err}") from None
    return Prepared(head.symbol, head.arg_params, head.aux_params, head.spec, pre,
                    Path(str(pretrained_model)).parent, head.new_params)


# ---- checkpoints ----------------------------------------------------------------------------------------------
class Checkpointer:
    """Writes PREFIX-symbol.json, PREFIX-NNNN.params, PREFIX-NNNN.states, the sidecar and the class map,
    each atomically, so a killed run leaves only complete checkpoints."""

    def __init__(self, prefix: str):
        self.prefix = str(prefix)

    def params_path(self, epoch: int) -> Path:
        return Path(f"{self.prefix}-{epoch:04d}.params")

    def states_path(self, epoch: int) -> Path:
        return Path(f"{self.prefix}-{epoch:04d}.states")

    def existing_epochs(self) -> List[int]:
        folder, name = Path(self.prefix).parent, Path(self.prefix).name
        found = []
        for p in folder.glob(f"{name}-*.params") if folder.is_dir() else []:
            tail = p.name[len(name) + 1:-len(".params")]
            if len(tail) == 4 and tail.isdigit():
                found.append(int(tail))
        return sorted(found)

    def write_model_files(self, symbol: mx.sym.Symbol, pre: Preprocess, class_names: Optional[List[str]]) -> None:
        with atomic_path(f"{self.prefix}-symbol.json") as tmp:
            symbol.save(str(tmp))
        save_sidecar(self.prefix, pre)
        if class_names:
            write_class_map(self.prefix, class_names)

    def write_epoch(self, epoch: int, module: mx.mod.Module, with_states: bool) -> None:
        args, aux = module.get_params()
        bad = [n for n, v in list(args.items()) + list(aux.items()) if not np.isfinite(v.asnumpy()).all()]
        if bad:
            raise TrainingDiverged(f"weights became non-finite in epoch {epoch} ({bad[0]}...); not writing "
                                   f"{self.params_path(epoch)}; lower --lr")
        blob = {f"arg:{n}": v.astype("float32") for n, v in args.items()}
        blob.update({f"aux:{n}": v.astype("float32") for n, v in aux.items()})
        with atomic_path(self.params_path(epoch)) as tmp:
            mx.nd.save(str(tmp), blob)
        if with_states:
            with atomic_path(self.states_path(epoch)) as tmp:
                module.save_optimizer_states(str(tmp))


# ---- the loop -------------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """Where the run ended and what it measured."""

    prefix: str
    last_epoch: int
    metrics: List[dict]
    num_classes: int
    class_names: Optional[List[str]]


def _check_finite(probs: np.ndarray, epoch: int, batch: int, last_good: str) -> None:
    if not np.isfinite(probs).all():
        raise TrainingDiverged(f"loss became NaN/inf at epoch {epoch} batch {batch}; stopped. Last good checkpoint: "
                               f"{last_good}. Lower --lr (or raise --warmup-epochs) and resume with --load-epoch")


def _evaluate(module: mx.mod.Module, data: mx.io.DataIter, top_k: int) -> Dict[str, float]:
    tally = Tally(top_k)
    for batch in data:
        module.forward(batch, is_train=False)
        probs = module.get_outputs()[0].asnumpy()
        keep = probs.shape[0] - batch.pad
        labels = batch.label[0].asnumpy()[:keep]
        probs = probs[:keep]
        if not np.isfinite(probs).all():
            return {"val_loss": float("nan"), "val_accuracy": float("nan")}
        tally.update(probs, labels)
    return tally.result("val_")


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
    """
    cfg.validate()
    ctx = ctx or contexts(cfg.gpus, cfg.cpus)
    kv_type = cfg.kv_store
    if kvstore is None and "dist" in kv_type:
        kvstore = mx.kv.create(kv_type)
    rank, num_workers = (kvstore.rank, kvstore.num_workers) if kvstore is not None else (0, 1)
    prefix = cfg.model_prefix if rank == 0 else f"{cfg.model_prefix}-{rank}"  # fit.py's convention
    ckpt = Checkpointer(prefix)

    classes = resolve_classes(cfg.data_train, cfg.num_classes, cfg.data_val)
    if cfg.num_examples is not None and cfg.num_examples != classes.num_records:
        log.warning("--num-examples %d, but %s holds %d records; the counted number is used", cfg.num_examples,
                    cfg.data_train, classes.num_records)
    resume = cfg.load_epoch is not None
    existing = [e for e in ckpt.existing_epochs() if e > 0]
    if not resume and existing and not cfg.overwrite:
        raise TrainError(f"{ckpt.params_path(existing[-1])} exists: resume with --load-epoch {existing[-1]}, or pass "
                         f"--overwrite, or choose another --model-prefix")

    if resume:
        if not has_sidecar(prefix):
            raise TrainError(f"{sidecar_path(prefix)}: missing, cannot resume {prefix}")
        pre = load_sidecar(prefix)
        symbol, args, aux = _load_checkpoint(prefix, cfg.load_epoch, "resume")
        spec = HeadSpec(pre.classifier, pre.feature_output or "", pre.output_name)
        if pre.num_classes != classes.num_classes:
            raise TrainError(f"{sidecar_path(prefix)}: the checkpoint has {pre.num_classes} classes, the data "
                             f"{classes.num_classes}")
        if pre.class_names and classes.names and pre.class_names != classes.names:
            raise TrainError(f"{classes.class_map}: class names differ from those the checkpoint was trained with "
                             f"({sidecar_path(prefix)}); a resume must use the same classes in the same order")
        sidecar_dir, new_params = Path(prefix).parent, []
        shape = tuple(cfg.image_shape or pre.input_shape)
    else:
        prepared = prepare_model(cfg.pretrained_model, cfg.pretrained_epoch, classes.num_classes, cfg.image_shape,
                                 cfg.layer_before_fullc, cfg.hidden, cfg.hidden_dropout, cfg.seed)
        symbol, args, aux, spec = prepared.symbol, prepared.arg_params, prepared.aux_params, prepared.spec
        shape = tuple(cfg.image_shape or prepared.pre.input_shape)
        pre = replace(prepared.pre, input_shape=shape, num_classes=classes.num_classes, classifier=spec.classifier,
                      feature_output=spec.feature_output, output_name=spec.output_name,
                      class_names=classes.names,
                      source={"fine_tuned_from": f"{cfg.pretrained_model}-{cfg.pretrained_epoch:04d}",
                              "data_train": str(cfg.data_train), "parent": prepared.pre.source})
        if isinstance(pre.mean, str):
            pre = copy_mean_file(pre, cfg.pretrained_model, prefix)
        sidecar_dir, new_params = prepared.sidecar_dir, prepared.new_params
        if isinstance(prepared.pre.mean, str):
            sidecar_dir = Path(prefix).parent
    label_name = f"{spec.output_name}_label"
    pre = plan_input(pre, sidecar_dir, shape, cfg)  # train/data.py: pack sidecars vs the input, at start-up

    param_names = [n for n in symbol.list_arguments() if n not in ("data", label_name)]
    missing = [n for n in param_names if n not in args]
    if missing:
        raise TrainError(f"{prefix}: weights for {missing[:5]} are missing from the checkpoint")
    rules = [parse_lr_mult(text) for text in cfg.lr_mult]
    try:
        mults = resolve_lr_mults(param_names, rules)
    except ValueError as err:
        raise TrainError(str(err)) from None
    fixed = frozen(mults)
    if len(fixed) == len(param_names):
        raise TrainError("--lr-mult freezes every parameter; nothing would train")

    def make_iter(path, train: bool, seed: int):
        return record_iter(path, cfg.batch_size, pre, sidecar_dir, label_name, shape, train=train,
                           augment=Augment(**{k: getattr(cfg, k) for k in Augment.__dataclass_fields__}),
                           seed=seed, resize=cfg.resize, threads=cfg.data_nthreads,
                           num_parts=num_workers if train else 1, part_index=rank if train else 0,
                           rgb_mean=cfg.rgb_mean, rgb_std=cfg.rgb_std)

    records_per_part = math.ceil(classes.num_records / num_workers)
    batches_per_epoch = max(1, math.ceil(records_per_part / cfg.batch_size))
    history = MetricsLog.load(prefix, cfg.load_epoch) if resume else MetricsLog(prefix)
    begin_epoch = cfg.load_epoch or 0
    prev = history.row(begin_epoch) if resume else None
    begin_num_update = int(prev["num_update"]) if prev and "num_update" in prev else begin_epoch * batches_per_epoch

    # float16 trains a cast copy; checkpoints keep the float32 symbol (same names), which runs anywhere.
    train_symbol = to_float16(symbol, spec) if cfg.dtype == "float16" else symbol
    module = mx.mod.Module(train_symbol, data_names=["data"], label_names=[label_name], context=ctx,
                           fixed_param_names=fixed)
    module.bind(data_shapes=[("data", (cfg.batch_size,) + shape)], label_shapes=[(label_name, (cfg.batch_size,))],
                for_training=True)
    module.init_params(arg_params=args, aux_params=aux, allow_missing=False, allow_extra=True)

    arg_shapes = dict(zip(symbol.list_arguments(), symbol.infer_shape(data=(1,) + shape)[0]))
    sizes = [int(np.prod(arg_shapes[n])) for n in param_names]
    on_kv = updates_on_kvstore(kv_type if kvstore is None else kvstore.type, len(ctx), sizes)
    rescale = 1.0 / (cfg.batch_size * (num_workers if "_sync" in kv_type else 1))
    sched = schedule(cfg.lr_scheduler, cfg.lr, batches_per_epoch, cfg.num_epochs, cfg.lr_step_epochs,
                     cfg.lr_factor, cfg.warmup_epochs)
    optimizer = make_optimizer(cfg.optimizer, cfg.lr, param_idx2name(param_names, len(ctx), on_kv), mults, rescale,
                               sched, cfg.mom, cfg.wd, begin_num_update, cfg.dtype == "float16")
    module.init_optimizer(kvstore=kvstore if kvstore is not None else kv_type, optimizer=optimizer)
    if module._update_on_kvstore != on_kv:  # noqa: SLF001 - the layout must match the optimizer's index map
        if "dist" in kv_type:
            raise RuntimeError("the kvstore's update placement differs from the one planned; set "
                               "MXNET_UPDATE_ON_KVSTORE=1")
        optimizer.idx2name = param_idx2name(param_names, len(ctx), module._update_on_kvstore)
    dist_states = "dist" in kv_type and module._update_on_kvstore
    if resume and not restart_optimizer:
        states = ckpt.states_path(cfg.load_epoch)
        if dist_states:
            log.warning("dist kvstore: optimizer state lives on the servers and is not checkpointed; momentum "
                        "restarts from zero on resume")
        elif not states.is_file():
            raise TrainError(f"{states}: optimizer state missing, cannot resume momentum exactly")
        else:
            layout = prev.get("layout") if prev else None
            now = {"contexts": len(ctx), "update_on_kvstore": bool(module._update_on_kvstore)}
            if layout and layout != now:
                raise TrainError(f"{states}: written with {layout}, this run has {now}; resume with the same "
                                 f"--gpus/--cpus/--kv-store")
            module.load_optimizer_states(str(states))

    if rank == 0:
        write_json(config_path(cfg.model_prefix), {**cfg.to_dict(), "resolved": {
            "num_classes": classes.num_classes, "class_names": classes.names, "image_shape": list(shape),
            "head": asdict(spec),
            "frozen": fixed, "lr_mults": {n: m for n, m in mults.items() if m != 1.0}, "new_params": new_params,
            "contexts": [str(c) for c in ctx], "kv_store": kv_type, "num_workers": num_workers,
            "batches_per_epoch": batches_per_epoch, "mxnet": mx.__version__}})
    ckpt.write_model_files(symbol, pre, classes.names)
    log.info("training %s: %d classes, %d records, %d params (%d frozen), on %s",
             prefix, classes.num_classes, classes.num_records, len(param_names), len(fixed), ctx)

    last_good = str(ckpt.params_path(begin_epoch)) if resume else f"{cfg.pretrained_model}-{cfg.pretrained_epoch:04d}.params (no epoch finished)"
    top_k = cfg.top_k if cfg.top_k < classes.num_classes else 0  # top-k of all classes is always 1
    tally = Tally(top_k)
    for epoch in range(begin_epoch, cfg.num_epochs):
        # Shuffling, augmentation and dropout replay exactly from (seed, epoch): the basis of exact resume.
        mx.random.seed(cfg.seed * 1000 + epoch)
        epoch_rec = epoch_train_rec(epoch) if epoch_train_rec is not None else cfg.data_train
        epoch_seed = cfg.seed * 1000 + epoch
        train_iter = _batches(lambda k: make_iter(epoch_rec, True, epoch_seed + 7919 * k),
                              batches_per_epoch if num_workers > 1 else None)
        tally.reset()
        start, images, batch_no = time.time(), 0, 0
        bar = _progress(cfg.progress and rank == 0, batches_per_epoch * cfg.batch_size, epoch + 1, cfg.num_epochs)
        for batch_no, batch in enumerate(train_iter, start=1):
            module.forward_backward(batch)
            probs = module.get_outputs()[0].asnumpy()
            _check_finite(probs, epoch + 1, batch_no, last_good)
            module.update()
            keep = probs.shape[0] - batch.pad
            loss = tally.update(probs[:keep], batch.label[0].asnumpy()[:keep])
            images += keep
            if bar is not None:
                bar.update(keep)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{tally.result()['accuracy']:.3f}", refresh=False)
            if batch_no % cfg.disp_batches == 0:
                log.info("Epoch[%d] Batch[%d] Speed: %.1f img/s loss=%.4f accuracy=%.4f", epoch + 1, batch_no,
                         images / max(time.time() - start, 1e-9), loss, tally.result()["accuracy"])
        if bar is not None:
            bar.close()
        seconds = time.time() - start
        num_update = _updates_done(begin_num_update, epoch - begin_epoch + 1, batches_per_epoch, optimizer)
        row = {"epoch": epoch + 1, **tally.result("train_"), "img_per_s": images / max(seconds, 1e-9),
               "seconds": seconds, "lr": float(sched(num_update)), "num_update": num_update,
               "layout": {"contexts": len(ctx), "update_on_kvstore": bool(module._update_on_kvstore)}}
        if not np.isfinite(row["train_loss"]):
            raise TrainingDiverged(f"loss became NaN/inf in epoch {epoch + 1}; last good checkpoint: {last_good}")
        if cfg.data_val:  # a fresh iterator per pass: ImageRecordIter.reset() skips the wrapped filler
            row.update(_evaluate(module, make_iter(cfg.data_val, False, cfg.seed), top_k))
        ckpt.write_epoch(epoch + 1, module, with_states=not dist_states)
        last_good = str(ckpt.params_path(epoch + 1))
        history.append(row)
        log.info("Epoch[%d] %s", epoch + 1, " ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                     if isinstance(v, float)))
    return FitResult(prefix, cfg.num_epochs, history.rows, classes.num_classes, classes.names)


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
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="img", unit_scale=False, desc=f"epoch {epoch}/{epochs}", leave=False,
                dynamic_ncols=True)
