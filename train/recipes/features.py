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

Equivalence with `python -m train` and the backbone frozen (tests/test_recipes.py checks it to 1e-5, several
batches per epoch): the cache is cut below the lowest Dropout on the way to the head (VGG: relu6, below drop6),
and the frozen layers from there up (drop6, fc7, relu7, drop7) run in the head graph, so training sees dropped
activations as full passes do; each epoch visits the records in the order ImageRecordIter's shuffle gives full
passes (read from a probe file of 1x1 images, see full_pass_order; a .rec without a file-order .idx falls back
to a seeded permutation). A dropout that cannot be moved above the cache (inside a branch, or below a layer with
running statistics) is refused with the reason. BatchNorm must use its stored statistics (use_global_stats, as
in a deploy prototxt): the cache runs the backbone in inference mode. Dropout masks themselves are random, so
with dropout the two routes agree in distribution, not bit for bit.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mxnet as mx
import numpy as np

from recbuild.atomic import atomic_path
from recbuild.publish import writer_lock
from symbols.checkpoint import (CheckpointError, load_optimizer_states, params_path, save_optimizer_states,
                                states_path)
from symbols.head import build_head, frozen, with_lr_mults
from symbols.sidecar import Preprocess, load_sidecar
from train.config import TrainConfig, active_augmentations, config_path, load_run_config
from train.data import DataError, plan_input, record_iter
from train.fit import (EpochMeter, EpochStream, FitResult, Model, TrainError, guard_resume, init_optimizer,
                       load_checkpoint, log_epoch, prepare_from_config, prepare_model, publish_epoch, resolve_mults,
                       resume_point, reusable_train_iter, schedule, start_run, trained_sidecar, write_run_files)
from train.metrics import Tally

log = logging.getLogger(__name__)

CACHE_FORMAT = "mxtransfer.features/2"   # /2: the mirrored view flips the raw image (mean images)
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


# ---- where the cache is cut ----------------------------------------------------------------------------------
@dataclass
class CachePoint:
    """Where the backbone's output is cached, and what of the network runs above it in the head graph.

    Attributes:
        blob: the internal output that is cached (flattened).
        upper: the layers from `blob` up to the head's feature output, as a symbol over `data` (None when the
            blob is the feature output itself); it holds the dropout layers, which train like full passes.
        dropouts: names of the Dropout layers in `upper`.
    """

    blob: str
    upper: Optional[mx.sym.Symbol]
    dropouts: List[str]


def cache_point(symbol: mx.sym.Symbol, feature_output: str, shape) -> CachePoint:
    """Cut the network below its lowest Dropout, so every dropout between the cached blob and the new head
    runs in the head graph (in training mode, as in full passes); with no dropout, cache the feature output.

    Raises:
        TrainError: the layers between the lowest dropout and the head are not a single chain of layers
            without auxiliary state (a branch, a BatchNorm), so they cannot run above the cache.
    """
    internals = symbol.get_internals()
    graph = json.loads(internals[feature_output].tojson())
    nodes = graph["nodes"]
    dropouts = [i for i, n in enumerate(nodes) if n["op"] == "Dropout"]
    if not dropouts:
        return CachePoint(feature_output, None, [])
    names = [nodes[i]["name"] for i in dropouts]
    refuse = (f"dropout {names} below the head: full passes drop activations there in training, and the layers "
              f"from {names[0]} up to {feature_output} cannot run above the feature cache")
    chain, index = [], graph["heads"][0][0]
    while True:  # down from the feature output to the lowest dropout, one data input at a time
        chain.append(index)
        data_inputs = [j for j, _, _ in nodes[index]["inputs"] if nodes[j]["op"] != "null"]
        if index == dropouts[0] or len(data_inputs) != 1:
            break
        index = data_inputs[0]
    if chain[-1] != dropouts[0] or not set(dropouts) <= set(chain):
        raise TrainError(f"{refuse} (they are not a single chain of layers); train with `python -m train`")
    source = nodes[[j for j, _, _ in nodes[dropouts[0]]["inputs"] if nodes[j]["op"] != "null"][0]]
    blob = f"{source['name']}_output"
    if blob not in internals.list_outputs():
        raise TrainError(f"{refuse} ({source['name']} has several outputs); train with `python -m train`")
    upper = _chain_symbol(nodes, chain[::-1])
    if upper.list_auxiliary_states():
        raise TrainError(f"{refuse} (they include layers with running statistics: "
                         f"{upper.list_auxiliary_states()}); train with `python -m train`")
    blob_shape = internals[blob].infer_shape(data=(1,) + tuple(shape))[1][0]
    if len(blob_shape) != 2:  # the cache holds flattened rows; the layers above see the blob's own shape
        upper = upper(data=mx.sym.reshape(mx.sym.var("data"), shape=(-1,) + tuple(blob_shape[1:])))
    return CachePoint(blob, upper, [nodes[i]["name"] for i in chain[::-1] if nodes[i]["op"] == "Dropout"])


def _chain_symbol(nodes: List[dict], chain: List[int]) -> mx.sym.Symbol:
    """The layers `chain` (bottom up) of a symbol's JSON nodes as a symbol whose lowest input is `data`."""
    new_nodes = [{"op": "null", "name": "data", "inputs": []}]
    previous = 0
    for index in chain:
        inputs = []
        for j, out, version in nodes[index]["inputs"]:
            if nodes[j]["op"] == "null":  # a parameter of this layer
                new_nodes.append(dict(nodes[j]))
                inputs.append([len(new_nodes) - 1, 0, 0])
            else:
                inputs.append([previous, out, version])
        new_nodes.append({**nodes[index], "inputs": inputs})
        previous = len(new_nodes) - 1
    arg_nodes = [i for i, n in enumerate(new_nodes) if n["op"] == "null"]
    return mx.sym.load_json(json.dumps({"nodes": new_nodes, "arg_nodes": arg_nodes, "heads": [[previous, 0, 0]],
                                        "attrs": {"mxnet_version": ["int", 10901]}}))


# ---- the record order of full passes ----------------------------------------------------------------------------
def full_pass_order(rec_path, num_records: int, batch_size: int, seed: int, epoch: int, batches: int, probe_dir,
                    reused: bool) -> Optional[np.ndarray]:
    """The file positions of the records, filler included, that `python -m train` feeds in epoch `epoch`
    (from 0) of a run seeded `seed`, so the head sees the same batches as in full passes.

    With `reused` (train.fit.reusable_train_iter), full passes read one iterator seeded seed * 1000 whose
    epoch e is its e-th reshuffle (train.fit.EpochStream); otherwise a fresh iterator per epoch seeded
    seed * 1000 + epoch, its last batch filled by round_batch. ImageRecordIter's shuffle over an indexed .rec
    depends only on the record count and the seed, so the order is read from a probe file of as many 1x1 images
    labelled with their position (built once, cached). None when the .rec has no .idx in file order
    (ImageRecordIter then shuffles by chunks of bytes).
    """
    idx = Path(rec_path).with_suffix(".idx")
    if not idx.is_file():
        return None
    offsets = [int(line.split("\t")[1]) for line in idx.read_text().splitlines() if line.strip()]
    if len(offsets) != num_records or offsets != sorted(offsets):
        return None
    probe = Path(probe_dir) / f"order-probe-{num_records}.rec"
    if not probe.is_file():
        _write_probe(probe, num_records)

    def probe_iter(probe_seed: int, round_batch: bool) -> mx.io.DataIter:
        return mx.io.ImageRecordIter(path_imgrec=str(probe), path_imgidx=str(probe.with_suffix(".idx")),
                                     data_shape=(3, 1, 1), batch_size=batch_size, shuffle=True, seed=probe_seed,
                                     seed_aug=probe_seed, round_batch=round_batch, preprocess_threads=1,
                                     verbose=False, label_width=1)
    if reused:
        stream = EpochStream(lambda: probe_iter(seed * 1000, False), num_records, epoch)
        batches_read = stream.epoch()
    else:
        batches_read = probe_iter(seed * 1000 + epoch, True)
    order = [batch.label[0].asnumpy().astype(np.int64) for _, batch in zip(range(batches), batches_read)]
    return np.concatenate(order)


def _write_probe(path: Path, count: int) -> None:
    image = mx.recordio.pack_img(mx.recordio.IRHeader(0, 0.0, 0, 0), np.zeros((1, 1, 3), np.uint8), img_fmt=".png")
    _, payload = mx.recordio.unpack(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as rec_tmp, atomic_path(path.with_suffix(".idx")) as idx_tmp:  # the .rec lands last
        writer = mx.recordio.MXIndexedRecordIO(str(idx_tmp), str(rec_tmp), "w")
        for i in range(count):
            writer.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, float(i), i, 0), payload))
        writer.close()


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
    from train.data import record_count
    count = record_count(rec_path)
    if count == 0:
        raise DataError(f"{rec_path}: contains no records")
    # ImageRecordIter refuses a batch larger than the file; Module.forward reshapes to the smaller batch.
    it = record_iter(rec_path, min(backbone.batch_size, count), pre, sidecar_dir, "label", shape, train=False,
                     resize=resize, threads=threads, rgb_mean=rgb_mean, rgb_std=rgb_std)
    feats, labels, flipped = [], [], []
    bar = tqdm(total=count, unit="img", desc=f"features {Path(rec_path).name}", disable=not progress, leave=False)
    for batch in it:
        keep = batch.data[0].shape[0] - batch.pad
        data = batch.data[0]
        feats.append(backbone(data)[:keep])
        if mirror:
            # The mirrored raw image's model input (flipping `data` would also flip a mean image).
            flipped.append(backbone(pre.mirror_input(data, sidecar_dir))[:keep])
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
# (train.config.RANDOM_AUGMENTATIONS lists them with the value at which each is off.)
def _check_cacheable(cfg: TrainConfig) -> None:
    active = [k for k in active_augmentations(cfg) if k != "random_mirror"]
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

    Uses the same set-up as `train.fit.fit` (head surgery and its seeded initialisation, lr_mult rules for the
    head parameters, schedule, optimizer, run files, checkpoint publishing), so with no dropout in the
    backbone and no augmentation it reaches the same head as full forward passes with a frozen backbone.

    Args:
        cfg: a trainer config (pretrained model, data, schedule, optimizer, output prefix).
        cache_dir: where feature files live.
        mirror: cache the mirrored view too and pick one view per image per epoch (also implied by
            cfg.random_mirror).
        class_balance: draw each epoch's records class-balanced (train.recipes.sampling).
        save_every: also write a full checkpoint (+ head optimizer state) every N epochs (0: only the last).

    Raises:
        TrainError / DataError: bad input; TrainingDiverged: NaN loss; PrefixBusy: another run writes the prefix.
    """
    cfg.validate()
    _check_cacheable(cfg)
    with writer_lock(cfg.model_prefix):  # one writer per prefix, as python -m train; settles a killed run first
        return _train_from_cache(_with_pretrained_model(cfg), cache_dir, mirror or cfg.random_mirror,
                                 class_balance, save_every)


def _train_from_cache(cfg: TrainConfig, cache_dir, mirror: bool, class_balance: bool, save_every: int) -> FitResult:
    prefix = cfg.model_prefix
    classes = start_run(cfg, prefix)
    prepared = prepare_from_config(cfg, classes.num_classes)  # as train.fit does
    shape = tuple(cfg.image_shape or prepared.pre.input_shape)
    model = Model(prepared.symbol, prepared.arg_params, prepared.aux_params, prepared.spec,
                  trained_sidecar(prepared, cfg, prefix, shape, classes, recipe="feature cache"),
                  prepared.sidecar_dir, list(prepared.new_params), shape, prepared.dropped)
    model.pre = plan_input(model.pre, model.sidecar_dir, model.shape, cfg)  # pack sidecars vs the input, as fit
    head_mults = _head_mults(model, cfg)
    point = cache_point(prepared.symbol, prepared.spec.feature_output, shape)
    if point.dropouts:
        log.info("feature cache at %s; %s run in the head graph, as in full passes", point.blob, point.dropouts)
    train_set, val_set = _feature_sets(cfg, prepared, point.blob, shape, cache_dir, mirror)

    n, dim = train_set.features.shape
    batches_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    history, begin_epoch, begin_num_update, _ = resume_point(cfg, prefix, batches_per_epoch)
    carried = guard_resume(cfg, 1, batches_per_epoch, begin_num_update)
    module, sched = _head_module(model, cfg, point, dim, head_mults, batches_per_epoch, begin_num_update)
    write_run_files(cfg, prefix, model, classes, {
        "recipe": "features", "new_params": model.new_params, "feature_dim": dim, "mirror": mirror,
        "cache_point": point.blob, "dropout_in_head": point.dropouts,
        "class_balance": class_balance,
        "cache": {"train": str(train_set.path), "val": str(val_set.path) if val_set else None},
        "batches_per_epoch": batches_per_epoch, "dropped_pretrained": model.dropped}, carried)
    backbone_args = {k: v for k, v in model.arg_params.items() if k not in model.new_params}

    last_good = (str(params_path(prefix, cfg.load_epoch)) if cfg.load_epoch else
                 f"{cfg.pretrained_model}-{cfg.pretrained_epoch:04d}.params (no epoch saved)")

    def save(epoch: int) -> str:
        head_args, _ = module.get_params()
        publish_epoch(prefix, epoch, {**backbone_args, **head_args}, model.aux_params,
                      lambda path: save_optimizer_states(module, path), history, history.rows[-1])
        return str(params_path(prefix, epoch))

    from tqdm import tqdm
    bar = tqdm(total=cfg.num_epochs - begin_epoch, unit="epoch", desc="head from cache", disable=not cfg.progress)
    started = time.time()
    for epoch in range(begin_epoch, cfg.num_epochs):
        num_update = begin_num_update + (epoch - begin_epoch + 1) * batches_per_epoch
        lr_start = float(sched(num_update - batches_per_epoch + 1))  # what the epoch's first update uses
        order = None if class_balance else full_pass_order(cfg.data_train, n, cfg.batch_size, cfg.seed, epoch,
                                                            batches_per_epoch, cache_dir,
                                                            reused=reusable_train_iter(cfg))
        row = _train_head_epoch(module, cfg, epoch, train_set, mirror, class_balance, batches_per_epoch, last_good,
                                order)
        lr_end = float(sched(num_update))
        row.update(lr=lr_end, lr_start=lr_start, lr_end=lr_end, num_update=num_update)
        log_epoch(epoch, row, "train")
        if val_set is not None:
            row.update(_evaluate_features(module, val_set, cfg.batch_size, cfg.top_k))
            log_epoch(epoch, row, "val")
        history.rows.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row.get('val_accuracy', float('nan')):.3f}",
                        refresh=False)
        if epoch + 1 == cfg.num_epochs or (save_every and (epoch + 1) % save_every == 0):
            last_good = save(epoch + 1)
    bar.close()
    if cfg.plot_metrics:
        history.draw()
    log.info("head trained from cache: %d epochs in %.1f s", cfg.num_epochs - begin_epoch, time.time() - started)
    return FitResult(prefix, cfg.num_epochs, history.rows, classes.num_classes, classes.names, model.dropped)


def _with_pretrained_model(cfg: TrainConfig) -> TrainConfig:
    """Resuming without --pretrained-model (as python -m train allows): the run's own config names it."""
    if cfg.load_epoch is None or cfg.pretrained_model:
        return cfg
    saved = config_path(cfg.model_prefix)
    try:
        recorded = load_run_config(cfg.model_prefix)
    except FileNotFoundError:
        recorded = None
    if recorded is None or not recorded.pretrained_model:
        raise TrainError(f"{saved}: missing or names no pretrained model; pass --pretrained-model to resume "
                         f"the feature-cache run")
    return replace(cfg, pretrained_model=recorded.pretrained_model, pretrained_epoch=recorded.pretrained_epoch)


def _head_mults(model: Model, cfg: TrainConfig) -> Dict[str, float]:
    """The lr multipliers of the new head's parameters; rules for the backbone are reported as ignored."""
    mults = resolve_mults(model.param_names(), cfg.lr_mult)
    trained_backbone = [n for n in model.param_names() if n not in model.new_params and mults[n] != 0]
    if cfg.lr_mult and trained_backbone:
        log.warning("feature cache: the backbone stays frozen; lr_mult rules for %s... are ignored",
                    trained_backbone[:3])
    if all(mults[n] == 0 for n in model.new_params):
        raise TrainError("--lr-mult freezes every head parameter; nothing would train")
    return {p: mults[p] for p in model.new_params}


def _feature_sets(cfg: TrainConfig, prepared, blob: str, shape, cache_dir, mirror: bool
                  ) -> Tuple[FeatureSet, Optional[FeatureSet]]:
    """Training (and validation) features through the backbone: the pretrained weights below `blob`."""
    backbone = Backbone(prepared.symbol, blob, prepared.arg_params, prepared.aux_params, shape, EXTRACT_BATCH)
    common = dict(pre=prepared.pre, sidecar_dir=prepared.sidecar_dir, shape=shape, cache_dir=cache_dir,
                  resize=cfg.resize, threads=cfg.data_nthreads, rgb_mean=cfg.rgb_mean, rgb_std=cfg.rgb_std,
                  progress=cfg.progress)
    train_set = cached_features(backbone, cfg.data_train, mirror=mirror, **common)
    val_set = cached_features(backbone, cfg.data_val, mirror=False, **common) if cfg.data_val else None
    return train_set, val_set


def _head_module(model: Model, cfg: TrainConfig, point: CachePoint, dim: int, head_mults: Dict[str, float],
                 batches_per_epoch: int, begin_num_update: int) -> Tuple[mx.mod.Module, mx.lr_scheduler.LRScheduler]:
    """The head graph (the frozen layers above the cache point, dropout included, then the new head), bound on
    the CPU, weights and optimizer (state on resume) in place; and the lr schedule its optimizer follows."""
    features = point.upper if point.upper is not None else mx.sym.var("data")
    head_sym = build_head(features, model.pre.num_classes, model.spec, cfg.hidden, cfg.hidden_dropout)
    frozen_above = [n for n in head_sym.list_arguments() if n not in head_mults and n not in ("data", model.label_name)]
    module = mx.mod.Module(with_lr_mults(head_sym, head_mults), data_names=["data"],
                           label_names=[model.label_name], context=mx.cpu(),
                           fixed_param_names=frozen(head_mults) + frozen_above)
    module.bind(data_shapes=[("data", (cfg.batch_size, dim))], label_shapes=[(model.label_name, (cfg.batch_size,))],
                for_training=True)
    source = model.arg_params
    if cfg.load_epoch is not None:
        _, source, _ = load_checkpoint(cfg.model_prefix, cfg.load_epoch, "resume")
    head_args = {p: source[p] for p in list(model.new_params) + frozen_above}
    module.init_params(arg_params=head_args, aux_params={}, allow_missing=False, allow_extra=False)
    sched = schedule(cfg.lr_scheduler, cfg.lr, batches_per_epoch, cfg.num_epochs, cfg.lr_step_epochs,
                     cfg.lr_factor, cfg.lr_warmup_epochs)
    init_optimizer(module, None, cfg, sched, begin_num_update)
    if cfg.load_epoch is not None:
        states = states_path(cfg.model_prefix, cfg.load_epoch)
        if not states.is_file():
            raise TrainError(f"{states}: optimizer state missing, cannot resume exactly")
        try:  # our pickle-free format; MXNet's pickle only with --trust-states
            load_optimizer_states(module, states, trust_pickle=cfg.trust_states)
        except CheckpointError as err:
            raise TrainError(str(err)) from None
    return module, sched


def _train_head_epoch(module: mx.mod.Module, cfg: TrainConfig, epoch: int, train_set: FeatureSet, mirror: bool,
                      class_balance: bool, batches_per_epoch: int, last_good: str,
                      order: Optional[np.ndarray] = None) -> dict:
    """One epoch over the cached features in `order` (file positions, filler included: full_pass_order), or
    a seeded permutation padded as ImageRecordIter's round_batch pads; its metrics row."""
    # Order, mirror choice and dropout replay from (seed, epoch), as in train.fit: exact resume.
    seed = cfg.seed * 1000 + epoch
    mx.random.seed(seed)
    rng = np.random.RandomState(seed)
    labels_all, n, batch = train_set.labels, len(train_set.labels), cfg.batch_size
    pad = batches_per_epoch * batch - n
    if order is None:
        if class_balance:
            from train.recipes.sampling import balanced_indices
            order = balanced_indices(labels_all, seed)
        else:
            order = rng.permutation(n)
        order = np.concatenate([order, order[:pad]]) if pad else order  # ImageRecordIter's round_batch
    use_mirror = rng.rand(len(order)) < 0.5 if mirror else np.zeros(len(order), bool)
    x = np.where(use_mirror[:, None], train_set.mirrored[order], train_set.features[order]) if mirror \
        else train_set.features[order]
    y = labels_all[order]
    meter = EpochMeter(epoch, cfg.top_k, batch, cfg.disp_batches, None, last_good)
    x_nd, y_nd = mx.nd.array(x), mx.nd.array(y)  # one copy per epoch; batches are views of it
    pending = None
    for b in range(batches_per_epoch):
        sl = slice(b * batch, (b + 1) * batch)
        module.forward_backward(mx.io.DataBatch([x_nd[sl]], [y_nd[sl]]))
        module.update()
        # As in train.fit: the host reads a batch's outputs after the next update is queued.
        current = (b, module.get_outputs()[0].copy(), y[sl], pad if b == batches_per_epoch - 1 else 0)
        if pending is not None:
            meter.consume(*pending)
        pending = current
    meter.consume(*pending)
    return meter.row()


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
    """Fill the cache for `recs` without training (e.g. to time extraction, or to share a cache): the same
    cache point as train_from_cache, so its runs reuse these files."""
    pre = load_sidecar(pretrained_model)
    prepared = prepare_model(pretrained_model, pretrained_epoch, max(pre.num_classes or 2, 2), image_shape,
                             layer_before_fullc)
    shape = tuple(image_shape or prepared.pre.input_shape)
    point = cache_point(prepared.symbol, prepared.spec.feature_output, shape)
    backbone = Backbone(prepared.symbol, point.blob, prepared.arg_params, prepared.aux_params, shape)
    return [cached_features(backbone, rec, prepared.pre, prepared.sidecar_dir, shape, cache_dir,
                            mirror=mirror, resize=resize, threads=threads, progress=progress) for rec in recs]
