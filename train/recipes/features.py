"""Feature cache: run the frozen backbone once, train the head from the cache, write the full model.

    python -m train.recipes features --pretrained-model out/model/vgg16 --data-train out/rec/x_train.rec \\
        --data-val out/rec/x_val.rec --model-prefix out/train/vgg16-head --num-epochs 200 --lr 0.01 --mirror

The backbone is the pretrained network up to the output that feeds the classifier (the sidecar's
`feature_output`, VGG's declared head, or `--layer-before-fullc`), run in inference mode (dropout off) with
the validation preprocessing (centre crop, the sidecar's mean/std/channel order). With `--mirror` the
horizontally flipped view is cached too and each epoch picks one view per image at random, which is what
`--random-mirror 1` does in full fine-tuning. Other augmentations cannot be cached and are refused.

Cache files: `<cache-dir>/<rec stem>-<key>.npz` holding `features` (N, D) float32, `labels` (N,), optionally
`mirrored` (N, D), and `meta` (JSON). The key hashes the .rec (absolute path, size, mtime) and the model
(backbone symbol JSON, the bytes of every backbone parameter, the preprocessing and input shape), so a changed
file or model never reuses stale features. Files are written atomically.

Equivalence: with no dropout below the head and BatchNorm on its stored statistics (use_global_stats, as in
a deploy prototxt), the head trained here equals the one `python -m train` trains with the backbone frozen
(tests/test_recipes.py checks it to 1e-5). VGG's drop7 output is cached without its dropout; for that
regularisation use --hidden N --hidden-dropout P, which trains a dropout layer inside the new head.

The checkpoint written is the whole network (backbone weights untouched + the trained head) with the same
symbol, sidecar, class map, config and metrics files as `python -m train`, so predict, deploy and resume do
not know it came from a cache.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mxnet as mx
import numpy as np

from symbols.head import build_head, parse_lr_mult, resolve_lr_mults
from symbols.sidecar import Preprocess, copy_mean_file, load_sidecar
from recbuild.atomic import atomic_path, write_json
from train.config import TrainConfig, config_path
from train.data import DataError, record_iter, resolve_classes
from train.fit import (Checkpointer, FitResult, TrainError, TrainingDiverged, _load_checkpoint, make_optimizer,
                       param_idx2name, prepare_model, schedule)
from train.metrics import MetricsLog, Tally

log = logging.getLogger(__name__)

CACHE_FORMAT = "mxtransfer.features/1"
DEFAULT_CACHE_DIR = ".cache/features"   # git-ignored; features are derived data, never committed
EXTRACT_BATCH = 32                      # inference batch: memory-bound on CPU, larger batches gain little


@dataclass
class FeatureSet:
    """Cached backbone outputs of one .rec: features (N, D), labels (N,), optional mirrored view, the file."""

    features: np.ndarray
    labels: np.ndarray
    mirrored: Optional[np.ndarray]
    path: Path
    from_cache: bool


# ---- keys ---------------------------------------------------------------------------------------------------
def rec_fingerprint(rec_path) -> dict:
    """What identifies a .rec's content cheaply: absolute path, size and modification time (ns)."""
    path = Path(rec_path)
    if not path.is_file():
        raise DataError(f"{path}: no such .rec file")
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def backbone_hash(backbone: mx.sym.Symbol, arg_params: Dict[str, mx.nd.NDArray],
                  aux_params: Dict[str, mx.nd.NDArray]) -> str:
    """sha256 of the backbone's symbol JSON and the bytes of every parameter it uses (names sorted)."""
    h = hashlib.sha256(backbone.tojson().encode("utf-8"))
    for kind, names, params in (("arg", backbone.list_arguments(), arg_params),
                                ("aux", backbone.list_auxiliary_states(), aux_params)):
        for name in sorted(names):
            if name in params:
                h.update(f"{kind}:{name}".encode("utf-8"))
                h.update(np.ascontiguousarray(params[name].asnumpy(), np.float32).tobytes())
    return h.hexdigest()


def cache_key(rec_path, model_hash: str, pre: Preprocess, shape, resize: int, mirror: bool,
              rgb_mean=None, rgb_std=None) -> Tuple[str, dict]:
    """(short key, the description it hashes) for one .rec through one backbone and preprocessing."""
    prep = {k: v for k, v in pre.to_dict().items() if k not in ("class_names", "source", "num_classes")}
    desc = {"format": CACHE_FORMAT, "rec": rec_fingerprint(rec_path), "model": model_hash, "preprocess": prep,
            "shape": list(shape), "resize": resize, "mirror": bool(mirror),
            "rgb_mean": list(rgb_mean) if rgb_mean else None, "rgb_std": list(rgb_std) if rgb_std else None}
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode("utf-8")).hexdigest()[:20]
    return digest, desc


# ---- extraction -----------------------------------------------------------------------------------------------
class Backbone:
    """The frozen part of a network bound for inference: `data` in, the feature output (flattened) out."""

    def __init__(self, symbol: mx.sym.Symbol, feature_output: str, arg_params, aux_params, shape,
                 batch_size: int = EXTRACT_BATCH, ctx: Optional[mx.Context] = None):
        internals = symbol.get_internals()
        if feature_output not in internals.list_outputs():
            raise TrainError(f"feature output {feature_output!r} is not in the network")
        self.symbol = mx.sym.Flatten(internals[feature_output], name="cached_features")
        self.batch_size = batch_size
        self.hash = backbone_hash(internals[feature_output], arg_params, aux_params)
        self.module = mx.mod.Module(self.symbol, data_names=["data"], label_names=None, context=ctx or mx.cpu())
        self.module.bind(data_shapes=[("data", (batch_size,) + tuple(shape))], for_training=False)
        self.module.set_params(arg_params, aux_params, allow_missing=False, allow_extra=True)

    def __call__(self, data: mx.nd.NDArray) -> np.ndarray:
        self.module.forward(mx.io.DataBatch([data]), is_train=False)
        return self.module.get_outputs()[0].asnumpy()


def extract(backbone: Backbone, rec_path, pre: Preprocess, sidecar_dir, shape, mirror: bool = False,
            resize: int = -1, threads: int = 2, rgb_mean=None, rgb_std=None, progress: bool = True
            ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Run the backbone over every record of a .rec (file order, centre crop); (features, labels, mirrored)."""
    from tqdm import tqdm
    from train.data import scan_labels
    count = scan_labels(rec_path).size
    if count == 0:
        raise DataError(f"{rec_path}: contains no records")
    # ImageRecordIter refuses a batch larger than the file; Module.forward reshapes to the smaller batch.
    it = record_iter(rec_path, min(backbone.batch_size, count), pre, sidecar_dir, "label", shape, train=False, resize=resize,
                     threads=threads, rgb_mean=rgb_mean, rgb_std=rgb_std)
    feats, labels, flipped = [], [], []
    bar = tqdm(unit="img", desc=f"features {Path(rec_path).name}", disable=not progress, leave=False)
    for batch in it:
        keep = batch.data[0].shape[0] - batch.pad
        data = batch.data[0]
        feats.append(backbone(data)[:keep])
        if mirror:
            flipped.append(backbone(mx.nd.flip(data, axis=3))[:keep])
        labels.append(batch.label[0].asnumpy()[:keep])
        bar.update(keep)
    bar.close()
    if not feats:
        raise DataError(f"{rec_path}: contains no records")
    return (np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.float32),
            np.concatenate(flipped).astype(np.float32) if mirror else None)


def cached_features(backbone: Backbone, rec_path, pre: Preprocess, sidecar_dir, shape, cache_dir,
                    mirror: bool = False, resize: int = -1, threads: int = 2, rgb_mean=None, rgb_std=None,
                    progress: bool = True) -> FeatureSet:
    """Features of `rec_path`, from the cache when its key matches, else extracted and stored (atomically)."""
    key, desc = cache_key(rec_path, backbone.hash, pre, shape, resize, mirror, rgb_mean, rgb_std)
    path = Path(cache_dir) / f"{Path(rec_path).stem}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta == desc:
                    log.info("features of %s from cache %s", rec_path, path)
                    return FeatureSet(z["features"], z["labels"], z["mirrored"] if mirror else None, path, True)
        except (OSError, ValueError, KeyError) as err:  # a damaged cache file is rebuilt, not trusted
            log.warning("%s: unreadable feature cache (%s); extracting again", path, err)
    started = time.time()
    feats, labels, flipped = extract(backbone, rec_path, pre, sidecar_dir, shape, mirror, resize, threads,
                                     rgb_mean, rgb_std, progress)
    arrays = {"features": feats, "labels": labels, "meta": np.array(json.dumps(desc, sort_keys=True))}
    if flipped is not None:
        arrays["mirrored"] = flipped
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    log.info("cached %d x %d features of %s in %.1f s -> %s", feats.shape[0], feats.shape[1], rec_path,
             time.time() - started, path)
    return FeatureSet(feats, labels, flipped, path, False)


# ---- head training --------------------------------------------------------------------------------------------
# Augmentations that change every epoch's pixels; a cache holds fixed views (random_mirror: a second view).
# (min/max_random_area and the aspect limits only matter with random_resized_crop, so they are not listed.)
_UNCACHEABLE = ("random_crop", "random_resized_crop", "max_random_rotate_angle", "brightness", "contrast",
                "saturation", "pca_noise")


def _check_cacheable(cfg: TrainConfig) -> None:
    active = [k for k in _UNCACHEABLE if getattr(cfg, k)]
    if active:
        raise TrainError(f"--{active[0].replace('_', '-')}: the feature cache holds one fixed view per image; "
                         f"only --random-mirror/--mirror can be cached; drop it or train with `python -m train`")
    if cfg.dtype != "float32":
        raise TrainError("--dtype float16: the feature cache trains the head in float32 on CPU; use float32")
    if cfg.kv_store.startswith("dist"):
        raise TrainError(f"--kv-store {cfg.kv_store}: head training from a cache is single-process; use local")


def train_from_cache(cfg: TrainConfig, cache_dir=DEFAULT_CACHE_DIR, mirror: bool = False,
                     class_balance: bool = False, save_every: int = 0) -> FitResult:
    """Train a new head on cached backbone features and write the full model as `cfg.model_prefix`.

    Uses the same head surgery, initialisation (seeded), optimizer, lr_mult rules for head parameters and
    schedule as `train.fit.fit`, so with no dropout in the backbone and no augmentation it reaches the same
    head as full forward passes with a frozen backbone.

    Args:
        cfg: a trainer config (pretrained model, data, schedule, optimizer, output prefix).
        cache_dir: where feature files live.
        mirror: cache the mirrored view too and pick one view per image per epoch (also implied by
            cfg.random_mirror).
        class_balance: draw each epoch's records class-balanced (train.recipes.sampling).
        save_every: also write a full checkpoint (+ head optimizer state) every N epochs (0: only the last).

    Raises:
        TrainError / DataError: bad input; TrainingDiverged: NaN loss.
    """
    cfg.validate()
    _check_cacheable(cfg)
    if cfg.load_epoch is not None and not cfg.pretrained_model:
        # Resuming without --pretrained-model (as python -m train allows): the run's own config names it.
        saved = config_path(cfg.model_prefix)
        base = json.loads(saved.read_text(encoding="utf-8")).get("pretrained_model") if saved.is_file() else None
        if not base:
            raise TrainError(f"{saved}: missing or names no pretrained model; pass --pretrained-model to resume "
                             f"the feature-cache run")
        cfg = replace(cfg, pretrained_model=base,
                      pretrained_epoch=json.loads(saved.read_text(encoding="utf-8")).get("pretrained_epoch", 0))
    mirror = mirror or cfg.random_mirror
    ckpt = Checkpointer(cfg.model_prefix)
    prefix = cfg.model_prefix
    classes = resolve_classes(cfg.data_train, cfg.num_classes, cfg.data_val)
    resume = cfg.load_epoch is not None
    existing = [e for e in ckpt.existing_epochs() if e > 0]
    if not resume and existing and not cfg.overwrite:
        raise TrainError(f"{ckpt.params_path(existing[-1])} exists: resume with --load-epoch {existing[-1]}, or pass "
                         f"--overwrite, or choose another --model-prefix")

    prepared = prepare_model(cfg.pretrained_model, cfg.pretrained_epoch, classes.num_classes, cfg.image_shape,
                             cfg.layer_before_fullc, cfg.hidden, cfg.hidden_dropout, cfg.seed)
    spec = prepared.spec
    shape = tuple(cfg.image_shape or prepared.pre.input_shape)
    label_name = f"{spec.output_name}_label"
    all_params = [n for n in prepared.symbol.list_arguments() if n not in ("data", label_name)]
    try:
        mults = resolve_lr_mults(all_params, [parse_lr_mult(t) for t in cfg.lr_mult])
    except ValueError as err:
        raise TrainError(str(err)) from None
    head_params = list(prepared.new_params)
    trained_backbone = [n for n in all_params if n not in head_params and mults[n] != 0]
    if cfg.lr_mult and trained_backbone:
        log.warning("feature cache: the backbone stays frozen; lr_mult rules for %s... are ignored",
                    trained_backbone[:3])
    if all(mults[n] == 0 for n in head_params):
        raise TrainError("--lr-mult freezes every head parameter; nothing would train")

    # The backbone: the pretrained weights below the head, exactly those the full model keeps.
    backbone = Backbone(prepared.symbol, spec.feature_output, prepared.arg_params, prepared.aux_params, shape,
                        EXTRACT_BATCH)
    sidecar_dir = prepared.sidecar_dir
    common = dict(pre=prepared.pre, sidecar_dir=sidecar_dir, shape=shape, cache_dir=cache_dir, resize=cfg.resize,
                  threads=cfg.data_nthreads, rgb_mean=cfg.rgb_mean, rgb_std=cfg.rgb_std, progress=cfg.progress)
    train_set = cached_features(backbone, cfg.data_train, mirror=mirror, **common)
    val_set = cached_features(backbone, cfg.data_val, mirror=False, **common) if cfg.data_val else None
    del backbone

    n, dim = train_set.features.shape
    batch = cfg.batch_size
    batches_per_epoch = max(1, math.ceil(n / batch))
    head_sym = build_head(mx.sym.var("data"), classes.num_classes, spec, cfg.hidden, cfg.hidden_dropout)
    module = mx.mod.Module(head_sym, data_names=["data"], label_names=[label_name], context=mx.cpu(),
                           fixed_param_names=[p for p in head_params if mults[p] == 0])
    module.bind(data_shapes=[("data", (batch, dim))], label_shapes=[(label_name, (batch,))], for_training=True)
    head_args = {p: prepared.arg_params[p] for p in head_params}
    history = MetricsLog.load(prefix, cfg.load_epoch) if resume else MetricsLog(prefix)
    begin_epoch = cfg.load_epoch or 0
    if resume:
        _, saved_args, _ = _load_checkpoint(prefix, cfg.load_epoch, "resume")
        head_args = {p: saved_args[p] for p in head_params}
    module.init_params(arg_params=head_args, aux_params={}, allow_missing=False, allow_extra=False)
    prev = history.row(begin_epoch) if resume else None
    begin_num_update = int(prev["num_update"]) if prev and "num_update" in prev else begin_epoch * batches_per_epoch
    sched = schedule(cfg.lr_scheduler, cfg.lr, batches_per_epoch, cfg.num_epochs, cfg.lr_step_epochs,
                     cfg.lr_factor, cfg.warmup_epochs)
    optimizer = make_optimizer(cfg.optimizer, cfg.lr, param_idx2name(head_params, 1, False),
                               {p: mults[p] for p in head_params}, 1.0 / batch, sched, cfg.mom, cfg.wd,
                               begin_num_update)
    module.init_optimizer(kvstore=None, optimizer=optimizer)
    if resume:
        states = ckpt.states_path(cfg.load_epoch)
        if not states.is_file():
            raise TrainError(f"{states}: optimizer state missing, cannot resume exactly")
        module.load_optimizer_states(str(states))

    pre = replace(prepared.pre, input_shape=shape, num_classes=classes.num_classes, classifier=spec.classifier,
                  feature_output=spec.feature_output, output_name=spec.output_name, class_names=classes.names,
                  source={"fine_tuned_from": f"{cfg.pretrained_model}-{cfg.pretrained_epoch:04d}",
                          "data_train": str(cfg.data_train), "recipe": "feature cache",
                          "parent": prepared.pre.source})
    if isinstance(pre.mean, str):
        pre = copy_mean_file(pre, cfg.pretrained_model, prefix)
    write_json(config_path(prefix), {**cfg.to_dict(), "resolved": {
        "recipe": "features", "num_classes": classes.num_classes, "class_names": classes.names,
        "image_shape": list(shape), "head": asdict(spec), "new_params": head_params,
        "feature_dim": dim, "mirror": mirror, "class_balance": class_balance,
        "cache": {"train": str(train_set.path), "val": str(val_set.path) if val_set else None},
        "batches_per_epoch": batches_per_epoch, "mxnet": mx.__version__}})
    ckpt.write_model_files(prepared.symbol, pre, classes.names)
    backbone_args = {k: v for k, v in prepared.arg_params.items() if k not in head_params}

    def save(epoch: int) -> None:
        args, _ = module.get_params()
        bad = [k for k, v in args.items() if not np.isfinite(v.asnumpy()).all()]
        if bad:
            raise TrainingDiverged(f"head weights became non-finite by epoch {epoch} ({bad[0]}); lower --lr")
        blob = {f"arg:{k}": v for k, v in backbone_args.items()}
        blob.update({f"arg:{k}": v for k, v in args.items()})
        blob.update({f"aux:{k}": v for k, v in prepared.aux_params.items()})
        with atomic_path(ckpt.params_path(epoch)) as tmp:
            mx.nd.save(str(tmp), blob)
        with atomic_path(ckpt.states_path(epoch)) as tmp:
            module.save_optimizer_states(str(tmp))
        history.write()

    from tqdm import tqdm
    labels_all = train_set.labels
    tally = Tally(cfg.top_k)
    bar = tqdm(total=cfg.num_epochs - begin_epoch, unit="epoch", desc="head from cache", disable=not cfg.progress)
    started = time.time()
    for epoch in range(begin_epoch, cfg.num_epochs):
        # Order, mirror choice and dropout replay from (seed, epoch), as in train.fit: exact resume.
        seed = cfg.seed * 1000 + epoch
        mx.random.seed(seed)
        rng = np.random.RandomState(seed)
        if class_balance:
            from train.recipes.sampling import balanced_indices
            order = balanced_indices(labels_all, seed)
        else:
            order = rng.permutation(n)
        use_mirror = rng.rand(n) < 0.5 if mirror else np.zeros(n, bool)
        pad = batches_per_epoch * batch - n
        order = np.concatenate([order, order[:pad]]) if pad else order  # ImageRecordIter's round_batch
        use_mirror = np.concatenate([use_mirror, use_mirror[:pad]]) if pad else use_mirror
        x = np.where(use_mirror[:, None], train_set.mirrored[order], train_set.features[order]) if mirror \
            else train_set.features[order]
        y = labels_all[order]
        tally.reset()
        t0 = time.time()
        x_nd, y_nd = mx.nd.array(x), mx.nd.array(y)  # one copy per epoch; batches are views of it
        for b in range(batches_per_epoch):
            sl = slice(b * batch, (b + 1) * batch)
            module.forward_backward(mx.io.DataBatch([x_nd[sl]], [y_nd[sl]]))
            probs = module.get_outputs()[0].asnumpy()
            if not np.isfinite(probs).all():
                raise TrainingDiverged(f"loss became NaN/inf at epoch {epoch + 1} batch {b + 1}; lower --lr")
            module.update()
            keep = batch - (pad if b == batches_per_epoch - 1 else 0)
            tally.update(probs[:keep], y[sl][:keep])
        seconds = time.time() - t0
        num_update = begin_num_update + (epoch - begin_epoch + 1) * batches_per_epoch
        row = {"epoch": epoch + 1, **tally.result("train_"), "img_per_s": n / max(seconds, 1e-9),
               "seconds": seconds, "lr": float(sched(num_update)), "num_update": num_update}
        if val_set is not None:
            row.update(_evaluate_features(module, val_set, batch, cfg.top_k))
        history.rows.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row.get('val_accuracy', float('nan')):.3f}",
                        refresh=False)
        if epoch + 1 == cfg.num_epochs or (save_every and (epoch + 1) % save_every == 0):
            save(epoch + 1)
    bar.close()
    log.info("head trained from cache: %d epochs in %.1f s", cfg.num_epochs - begin_epoch, time.time() - started)
    return FitResult(prefix, cfg.num_epochs, history.rows, classes.num_classes, classes.names)


def _evaluate_features(module: mx.mod.Module, feats: FeatureSet, batch: int, top_k: int) -> Dict[str, float]:
    tally = Tally(top_k)
    x, y = feats.features, feats.labels
    padded = -len(x) % batch
    x_nd = mx.nd.array(np.concatenate([x, np.zeros((padded,) + x.shape[1:], x.dtype)]) if padded else x)
    for start in range(0, len(x), batch):
        keep = min(batch, len(x) - start)
        module.forward(mx.io.DataBatch([x_nd[start:start + batch]]), is_train=False)
        probs = module.get_outputs()[0].asnumpy()[:keep]
        if not np.isfinite(probs).all():
            return {"val_loss": float("nan"), "val_accuracy": float("nan")}
        tally.update(probs, y[start:start + keep])
    return tally.result("val_")


def features_only(pretrained_model: str, pretrained_epoch: int, recs: List[str], cache_dir=DEFAULT_CACHE_DIR,
                  mirror: bool = False, image_shape=None, layer_before_fullc: Optional[str] = None,
                  resize: int = -1, threads: int = 2, progress: bool = True) -> List[FeatureSet]:
    """Fill the cache for `recs` without training (e.g. to time extraction, or to share a cache)."""
    pre = load_sidecar(pretrained_model)
    prepared = prepare_model(pretrained_model, pretrained_epoch, max(pre.num_classes or 2, 2), image_shape,
                             layer_before_fullc)
    shape = tuple(image_shape or prepared.pre.input_shape)
    backbone = Backbone(prepared.symbol, prepared.spec.feature_output, prepared.arg_params, prepared.aux_params,
                        shape)
    return [cached_features(backbone, rec, prepared.pre, prepared.sidecar_dir, shape, cache_dir,
                            mirror=mirror, resize=resize, threads=threads, progress=progress) for rec in recs]
