"""`python -m bench.train_cache`: head training from the feature cache against full forward passes.

Both run in this one invocation, on the same .rec, the same network and the same head, optimizer and batch:

- full:  `train.fit.fit` with the backbone frozen (`--lr-mult '^(?!fc8_)=0'`): every epoch decodes the images
         and runs the whole network forward (and the head backward), as `python -m train` does;
- cache: `train.recipes.features.train_from_cache`: the backbone runs once (timed separately as the
         extraction), then every epoch trains the head on the cached features.

The network is VGG16's layout (13 convolutions, Caffe names) at a quarter of the width, 112x112 input and
512-wide fc6/fc7, so a CPU run takes a minute; the ratio only grows with the real VGG16 (the backbone
dominates more). Images: seeded synthetic photos-like JPEGs whose colours encode 4 classes, packed with
mx.recordio into a temporary folder.

Prints per-epoch seconds of each (training loop only, from each run's metrics), epochs/s, the ratio
(target >= 20x on CPU), the one-off extraction time and the epoch count at which the cache has paid for itself.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import cv2
import mxnet as mx
import numpy as np

from recbuild.classmap import write_class_map
from symbols import vgg
from symbols.sidecar import Preprocess, save_sidecar
from train.config import TrainConfig
from train.fit import fit
from train.recipes.features import train_from_cache

# ---- defaults, in one place ------------------------------------------------------------------------------------
IMAGES = 256              # 8 batches of 32: several batches per epoch, a minute of full passes on 2 cores
CLASSES = 4
SIZE = 112                # input side; images are packed at 128 and centre-cropped like real data
STAGES = tuple((max(c // 4, 8), n) for c, n in vgg.VGG16_STAGES)   # VGG16 layout, quarter width
FC_WIDTH = 512
FULL_EPOCHS = 2           # enough for a stable per-epoch time; each is the expensive one
CACHE_EPOCHS = 50         # head epochs are milliseconds; many of them give a stable time
BATCH = 32
TARGET = 20.0


def _images(folder: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.RandomState(seed)
    rec_path = folder / "bench_train.rec"
    writer = mx.recordio.MXIndexedRecordIO(str(folder / "bench_train.idx"), str(rec_path), "w")
    for i in range(n):
        label = i % CLASSES
        base = rng.uniform(0, 255, 3) * 0.3 + 180 * np.eye(3)[label % 3] * (1 if label < 3 else 0.5)
        img = np.clip(base + rng.normal(0, 25, (128, 128, 3)), 0, 255).astype(np.uint8)
        img = cv2.GaussianBlur(img, (5, 5), 0)
        writer.write_idx(i, mx.recordio.pack_img(mx.recordio.IRHeader(0, float(label), i, 0), img, quality=90))
    writer.close()
    write_class_map(folder / "bench", [f"class{c}" for c in range(CLASSES)])
    return rec_path


def _model(folder: Path) -> Path:
    sym = vgg.vgg(1000, STAGES, fc_width=FC_WIDTH)
    shapes, _, _ = sym.infer_shape(data=(1, 3, SIZE, SIZE))
    rng = np.random.RandomState(0)
    args = {n: mx.nd.array(rng.normal(0, np.sqrt(2.0 / max(int(np.prod(s[1:])), 1)), s) if n.endswith("weight")
                           else np.zeros(s)) for n, s in zip(sym.list_arguments(), shapes)
            if n not in ("data", "prob_label")}
    prefix = folder / "vgg16q"
    mx.model.save_checkpoint(str(prefix), 0, sym, args, {})
    save_sidecar(prefix, Preprocess(input_shape=(3, SIZE, SIZE), channel_order="BGR", mean=[104.0, 117.0, 123.0],
                                    classifier="fc8", feature_output="drop7_output", output_name="prob",
                                    num_classes=1000))
    return prefix


def cache_comparison(images: int = IMAGES, full_epochs: int = FULL_EPOCHS, cache_epochs: int = CACHE_EPOCHS,
                     workdir=None) -> dict:
    """Run both paths and return their timings and the ratio (see the module docstring)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp)
        rec = _images(folder, images)
        model = _model(folder)
        common = dict(pretrained_model=str(model), data_train=str(rec), batch_size=BATCH, lr=0.01,
                      optimizer="sgd", progress=False, top_k=0, disp_batches=10**6)
        full = fit(TrainConfig(**common, num_epochs=full_epochs, model_prefix=str(folder / "full"),
                               lr_mult=["^(?!fc8_)=0"]))
        started = time.time()
        cached = train_from_cache(TrainConfig(**common, num_epochs=cache_epochs, model_prefix=str(folder / "cache")),
                                  cache_dir=folder / "features")
        cache_wall = time.time() - started
    full_epoch_s = float(np.mean([r["seconds"] for r in full.metrics]))
    cache_epoch_s = float(np.mean([r["seconds"] for r in cached.metrics]))
    cache_loop = float(np.sum([r["seconds"] for r in cached.metrics]))
    extraction = cache_wall - cache_loop
    return {"images": images, "full_epoch_s": full_epoch_s, "cache_epoch_s": cache_epoch_s,
            "ratio": full_epoch_s / cache_epoch_s, "extraction_s": extraction,
            "break_even_epochs": extraction / max(full_epoch_s - cache_epoch_s, 1e-9),
            "full_epochs": full_epochs, "cache_epochs": cache_epochs}


def report(images: int = IMAGES, full_epochs: int = FULL_EPOCHS, cache_epochs: int = CACHE_EPOCHS) -> float:
    """Run `cache_comparison` and print its figures; returns the ratio."""
    r = cache_comparison(images, full_epochs, cache_epochs)
    print(f"feature cache vs full forward passes, {r['images']} images {SIZE}x{SIZE}, VGG16 layout at 1/4 width, "
          f"batch {BATCH}, CPU")
    print(f"  full forward (frozen backbone): {r['full_epoch_s']:.3f} s/epoch = {1 / r['full_epoch_s']:.3f} epochs/s "
          f"({r['full_epochs']} epochs)")
    print(f"  head from cache:                {r['cache_epoch_s']:.4f} s/epoch = {1 / r['cache_epoch_s']:.1f} epochs/s "
          f"({r['cache_epochs']} epochs)")
    print(f"  one-off extraction (+ setup):   {r['extraction_s']:.1f} s; pays for itself after "
          f"{r['break_even_epochs']:.1f} epochs")
    verdict = "OK" if r["ratio"] >= TARGET else "BELOW TARGET"
    print(f"  ratio (epochs/s cache / full):  {r['ratio']:.0f}x  (target >= {TARGET:.0f}x: {verdict})")
    return r["ratio"]


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=IMAGES)
    p.add_argument("--full-epochs", type=int, default=FULL_EPOCHS)
    p.add_argument("--cache-epochs", type=int, default=CACHE_EPOCHS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    return 0 if report(args.images, args.full_epochs, args.cache_epochs) >= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
