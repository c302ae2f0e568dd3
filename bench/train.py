"""Fine-tune step throughput (forward + backward + update, batch 32) of a VGG16-shaped network.

    python -m bench.train                       # CPU: reduced input (64x64), 3 timed steps
    python -m bench.train --gpus 0 --size 224   # GPU server: the real VGG16 input
    python -m bench.train --gpus 0 --size 224 --dtype float16

Three runs of the same network with a new 10-class head, measured in this process on synthetic data (so the
decoder is not what is timed):
  baseline   fine-tune.py/fit.py's way: stock Module, optimizer given as a string, every layer trained
  ours/all   train.fit's optimizer object with lr_mult rules, every layer trained (should cost the same)
  ours/frozen  --lr-mult '^conv[1-4]_=0': frozen layers get no weight gradients (fixed_param_names)
Ratios are against the baseline of the same run.
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional

import mxnet as mx
import numpy as np

from symbols import vgg
from symbols.head import frozen, parse_lr_mult, replace_head, resolve_lr_mults
from train.fit import contexts, make_optimizer, param_idx2name, updates_on_kvstore

FREEZE = r"^conv[1-4]_"


def build(size: int, num_classes: int, dtype: str):
    sym = vgg.vgg(1000)
    shapes = dict(zip(sym.list_arguments(), sym.infer_shape(data=(1, 3, size, size))[0]))
    rng = np.random.RandomState(0)
    args = {n: mx.nd.array(rng.normal(0, 0.01, s).astype(np.float32)) for n, s in shapes.items()
            if n not in ("data", "prob_label")}
    return replace_head(sym, args, {}, (3, size, size), num_classes, vgg.HEAD, dtype=dtype)


def make_step(head, ctx: List[mx.Context], batch: int, size: int, mode: str, dtype: str):
    """A bound module for `mode` and a function running one fine-tune step on a fixed synthetic batch."""
    names = [n for n in head.symbol.list_arguments() if n not in ("data", head.label_name)]
    rules = [parse_lr_mult(f"{FREEZE}=0")] if mode == "frozen" else []
    mults = resolve_lr_mults(names, rules)
    mod = mx.mod.Module(head.symbol, data_names=["data"], label_names=[head.label_name], context=ctx,
                        fixed_param_names=frozen(mults))
    mod.bind(data_shapes=[("data", (batch, 3, size, size))], label_shapes=[(head.label_name, (batch,))])
    mod.init_params(arg_params=head.arg_params, aux_params=head.aux_params)
    if mode == "baseline":
        mod.init_optimizer(kvstore="local", optimizer="sgd", optimizer_params=(
            ("learning_rate", 0.001), ("momentum", 0.9), ("wd", 5e-4), ("multi_precision", dtype == "float16")))
    else:
        sizes = [int(np.prod(head.arg_params[n].shape)) for n in names]
        on_kv = updates_on_kvstore("local", len(ctx), sizes)
        opt = make_optimizer("sgd", 0.001, param_idx2name(names, len(ctx), on_kv), mults, 1.0 / batch,
                             multi_precision=dtype == "float16")
        mod.init_optimizer(kvstore="local", optimizer=opt)
    rng = np.random.RandomState(1)
    data = mx.io.DataBatch([mx.nd.array(rng.uniform(-1, 1, (batch, 3, size, size)))],
                           [mx.nd.array(rng.randint(0, 10, batch))])

    def step():
        mod.forward_backward(data)
        mod.update()

    step()  # warm-up: memory planning, kernel selection
    mx.nd.waitall()
    return step


def timed(step, batch: int, steps: int) -> float:
    mx.nd.waitall()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    mx.nd.waitall()  # the engine is asynchronous: wait for the last update before stopping the clock
    return batch * steps / (time.perf_counter() - start)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default=None, help="e.g. 0 (default: CPU)")
    p.add_argument("--size", type=int, default=None, help="input side (default 224 on GPU, 64 on CPU)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds; the best of each is kept")
    p.add_argument("--no-cache", action="store_true", help="skip the feature-cache comparison (bench/train_cache.py)")
    args = p.parse_args(argv)
    ctx = contexts(args.gpus, 1)
    on_gpu = bool(args.gpus)
    size = args.size or (224 if on_gpu else 64)
    steps = args.steps or (20 if on_gpu else 3)
    head = build(size, 10, args.dtype)
    print(f"VGG16 fine-tune step, batch {args.batch_size}, input 3x{size}x{size}, {args.dtype}, on {ctx}, "
          f"{steps} timed steps x {args.rounds} rounds, mxnet {mx.__version__}")
    modes = ("baseline", "all", "frozen")
    steppers = {mode: make_step(head, ctx, args.batch_size, size, mode, args.dtype) for mode in modes}
    results: Dict[str, float] = {mode: 0.0 for mode in modes}
    # Interleaved rounds, best of each: on a shared machine a neighbour's burst hits one round, not one mode.
    for _ in range(args.rounds):
        for mode in modes:
            results[mode] = max(results[mode], timed(steppers[mode], args.batch_size, steps))
    base = results["baseline"]
    labels = {"baseline": "baseline (stock Module, string optimizer)", "all": "ours, every layer trained",
              "frozen": f"ours, --lr-mult '{FREEZE}=0'"}
    for mode, value in results.items():
        print(f"  {labels[mode]:<44} {value:8.2f} img/s   {value / base:5.2f}x")
    if not args.no_cache:  # issue 6: head epochs/s from the feature cache vs full forward passes, same data
        from bench.train_cache import report
        report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
