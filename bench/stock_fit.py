"""`python -m bench.stock_fit`: the stock baseline the trainer benchmarks time `python -m train` against.

A fine-tune.py-style script that uses MXNet only (it imports nothing from this project, so it costs what a
user's stock script costs): load the converted checkpoint, cut it at the feature layer, attach a new
FullyConnected + SoftmaxOutput head, and train with `mx.mod.Module.fit` (accuracy metric, Speedometer every
`--disp-batches`, `do_checkpoint` every epoch, SGD with momentum and weight decay, a MultiFactorScheduler as
common/fit.py builds it).

Two departures from fine-tune.py, both so that the benches compare training loops and not bugs or iterator
options:
- the old classifier is dropped by its name (`--classifier`), not by fine-tune.py's `'fc' not in name`, which
  also drops fc6/fc7; the network trained is therefore the same as `python -m train`'s;
- the ImageRecordIter gets the same arguments `python -m train` gives it (its `.idx`, the mean, `scale`),
  and `--kv-store` is passed to Module.fit as a name, so on one device no kvstore is created (Module.fit's
  own fastest path; common/fit.py passes a KVStore object, which adds a push/pull per parameter).

`--fixed-params REGEX` freezes the matching parameters with Module's `fixed_param_names` (the stock way of
freezing layers; no weight gradients are computed for them).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from typing import List, Optional

import mxnet as mx


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.stock_fit", description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained-model", required=True, help="PREFIX of the converted checkpoint")
    p.add_argument("--pretrained-epoch", type=int, default=0)
    p.add_argument("--layer-before-fullc", default="drop7", help="the new head is attached to this layer's output")
    p.add_argument("--classifier", default="fc8", help="name of the old classifier, dropped (and reused)")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--data-train", required=True)
    p.add_argument("--image-shape", required=True, help="C,H,W")
    p.add_argument("--rgb-mean", default="0,0,0")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-examples", type=int, required=True, help="records in --data-train (fit.py's epoch size)")
    p.add_argument("--num-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--mom", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=0.0005)
    p.add_argument("--lr-factor", type=float, default=0.1)
    p.add_argument("--lr-step-epochs", default="20")
    p.add_argument("--data-nthreads", type=int, default=2)
    p.add_argument("--kv-store", default="device")
    p.add_argument("--gpus", default=None, help="e.g. 0 (default: one CPU context)")
    p.add_argument("--disp-batches", type=int, default=20)
    p.add_argument("--fixed-params", default=None, help="regex of parameters to freeze (fixed_param_names)")
    p.add_argument("--model-prefix", required=True)
    p.add_argument("--seed", type=int, default=0)
    return p


def fine_tune_symbol(symbol: mx.sym.Symbol, arg_params: dict, layer: str, classifier: str, num_classes: int):
    """fine-tune.py's get_fine_tune_model, dropping only the old classifier's weights."""
    features = symbol.get_internals()[layer + "_output"]
    net = mx.sym.FullyConnected(data=features, num_hidden=num_classes, name=classifier)
    net = mx.sym.SoftmaxOutput(data=net, name="softmax")
    kept = {k: v for k, v in arg_params.items() if not k.startswith(classifier + "_")}
    return net, kept


def lr_scheduler(lr: float, factor: float, step_epochs: str, epoch_size: int):
    """common/fit.py's _get_lr_scheduler from epoch 0: None when no step falls inside the run."""
    steps = [epoch_size * int(e) for e in step_epochs.split(",") if e.strip() and int(e) > 0]
    if factor >= 1 or not steps:
        return None
    return mx.lr_scheduler.MultiFactorScheduler(step=steps, factor=factor, base_lr=lr)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG, format="%(asctime)-15s %(message)s")  # fine-tune.py's
    mx.random.seed(args.seed)
    shape = tuple(int(v) for v in args.image_shape.split(","))
    mean = [float(v) for v in args.rgb_mean.split(",")]
    symbol, arg_params, aux_params = mx.model.load_checkpoint(args.pretrained_model, args.pretrained_epoch)
    net, arg_params = fine_tune_symbol(symbol, arg_params, args.layer_before_fullc, args.classifier,
                                       args.num_classes)
    iter_args = dict(path_imgrec=args.data_train, label_width=1, data_name="data", label_name="softmax_label",
                     data_shape=shape, batch_size=args.batch_size, mean_r=mean[0], mean_g=mean[1], mean_b=mean[2],
                     scale=args.scale, rand_crop=False, rand_mirror=False, shuffle=True, seed=args.seed,
                     preprocess_threads=args.data_nthreads, num_parts=1, part_index=0, round_batch=True,
                     verbose=False)
    idx = os.path.splitext(args.data_train)[0] + ".idx"
    if os.path.isfile(idx):
        iter_args["path_imgidx"] = idx
    train = mx.io.ImageRecordIter(**iter_args)
    epoch_size = max(1, -(-args.num_examples // args.batch_size))
    fixed = None
    if args.fixed_params:
        rule = re.compile(args.fixed_params)
        fixed = [n for n in net.list_arguments() if rule.search(n) and n not in ("data", "softmax_label")]
    context = [mx.gpu(int(g)) for g in args.gpus.split(",")] if args.gpus else [mx.cpu()]
    module = mx.mod.Module(net, context=context, fixed_param_names=fixed)
    module.fit(train, begin_epoch=0, num_epoch=args.num_epochs, eval_metric=["accuracy"], kvstore=args.kv_store,
               optimizer="sgd",
               optimizer_params={"learning_rate": args.lr, "momentum": args.mom, "wd": args.wd,
                                 "lr_scheduler": lr_scheduler(args.lr, args.lr_factor, args.lr_step_epochs,
                                                              epoch_size)},
               initializer=mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2),
               arg_params=arg_params, aux_params=aux_params, allow_missing=True,
               batch_end_callback=[mx.callback.Speedometer(args.batch_size, args.disp_batches)],
               epoch_end_callback=mx.callback.do_checkpoint(args.model_prefix))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
