"""Learning-rate range test: `python -m train lr-find` (or `python -m train.lr_find`), `python -m train`'s options.

The model `python -m train` would start from (the pretrained checkpoint with its new head, or MODEL_PREFIX at
--load-epoch) is trained in memory for up to --num-batches batches while the base learning rate grows
exponentially from --start-lr to --end-lr; --lr-mult rules scale and freeze parameters exactly as in training,
with the same optimizer, momentum, weight decay, data and augmentation. The sweep stops early when the running
average of the loss diverges (exceeds --diverge times its minimum, or becomes NaN/inf). Nothing on disk is
written but the plot and its JSON (default MODEL_PREFIX-lr-find.png / .json, else lr-find.png / .json).

Suggested rate: one tenth of the rate at which the smoothed loss (a centred moving average) is lowest ("minimum /
10", Smith 2017 and fastai's lr_min). Where the loss bottoms out the rate is already at the edge of stability; a
decade below it the loss still falls quickly and training is stable. The steepest-descent point of the smoothed
loss (fastai's other rule) is reported too, but not suggested: over ~100 noisy batches its position moves with
the noise and the smoothing, while the minimum is a robust feature of the curve.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import List, Optional

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "mxtransfer.lrfind/1"
START_LR = 1e-6          # seven decades below END_LR: covers fine-tuning (1e-4..1e-2) with room either side
END_LR = 10.0
NUM_BATCHES = 100        # about what one needs for a readable curve; the test's small set is swept in 60
DIVERGE = 4.0            # stop once the running loss is 4x its minimum (fastai's rule)
# beta of the bias-corrected running average the stop rule watches. fastai's 0.98 averages ~50 batches: over a
# 100-batch sweep that lags by ~3 decades of lr, which measured on the tests' set moved the curve's minimum from
# ~0.1 to ~9. 0.9 (~10 batches) still ignores single noisy batches and reacts within a decade.
SMOOTHING = 0.9
# The suggestion is read off a centred moving average (no lag: the sweep is complete by then) of this fraction
# of the batches, at least SUGGEST_MIN_WINDOW.
SUGGEST_WINDOW = 0.1
SUGGEST_MIN_WINDOW = 5


@dataclass
class LRFindResult:
    """The sweep: base lr and loss per batch, the smoothed loss and the suggestions."""

    lrs: List[float]
    losses: List[float]
    smoothed: List[float]      # centred moving average: what the suggestion is read from
    running: List[float]       # the running average the stop rule watched
    suggested_lr: Optional[float]
    steepest_lr: Optional[float]
    min_loss_lr: Optional[float]
    stopped: str
    frozen: List[str] = field(default_factory=list)
    lr_mults: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "rule": "minimum of the smoothed loss / 10", **self.__dict__}


def lr_at(step: int, num_batches: int, start_lr: float, end_lr: float) -> float:
    """Exponential sweep: start_lr at step 0, end_lr at step num_batches - 1."""
    return start_lr * (end_lr / start_lr) ** (step / max(1, num_batches - 1))


def centred(losses: List[float]) -> List[float]:
    """Centred moving average (edges padded with the end values) over SUGGEST_WINDOW of the batches."""
    x = np.asarray(losses, np.float64)
    width = max(SUGGEST_MIN_WINDOW, int(len(x) * SUGGEST_WINDOW)) | 1  # odd, so it is centred
    if len(x) < width:
        return list(x)
    padded = np.concatenate([np.full(width // 2, x[0]), x, np.full(width // 2, x[-1])])
    return list(np.convolve(padded, np.ones(width) / width, mode="valid"))


def suggest(lrs: List[float], smoothed: List[float], skip: int = 3) -> tuple:
    """(minimum / 10, steepest descent, minimum) of a smoothed loss curve; None where the curve is too short."""
    if len(lrs) <= skip + 2:
        return None, None, None
    sm = np.array(smoothed[skip:])
    lr = np.array(lrs[skip:])
    best = int(np.argmin(sm))
    slope = np.gradient(sm, np.log(lr))
    steepest = float(lr[int(np.argmin(slope[:best + 1]))]) if best > 0 else float(lr[0])
    return float(lr[best]) / 10, steepest, float(lr[best])


def _model(cfg, num_classes: int):
    """The symbol, weights, sidecar and folder `fit` would start from (read only)."""
    from symbols.checkpoint import CheckpointError, load_checkpoint
    from symbols.sidecar import has_sidecar, load_sidecar, sidecar_path
    from train.fit import TrainError, prepare_from_config
    if cfg.load_epoch is not None:
        if not has_sidecar(cfg.model_prefix):
            raise TrainError(f"{sidecar_path(cfg.model_prefix)}: missing, cannot start from {cfg.model_prefix}")
        pre = load_sidecar(cfg.model_prefix)
        try:
            symbol, args, aux = load_checkpoint(cfg.model_prefix, cfg.load_epoch, "resume")
        except CheckpointError as err:
            raise TrainError(str(err)) from None
        return symbol, args, aux, pre.output_name, pre, Path(cfg.model_prefix).parent
    prepared = prepare_from_config(cfg, num_classes)   # the model training would start from
    return (prepared.symbol, prepared.arg_params, prepared.aux_params, prepared.spec.output_name, prepared.pre,
            prepared.sidecar_dir)


def lr_find(cfg, start_lr: float = START_LR, end_lr: float = END_LR, num_batches: int = NUM_BATCHES,
            diverge: float = DIVERGE, beta: float = SMOOTHING, progress: bool = False) -> LRFindResult:
    """Run the range test for a training configuration (train.config.TrainConfig); nothing is saved.
    `progress`: the sweep's own bar (cfg.progress is the trainer's, off here)."""
    import mxnet as mx
    from dataclasses import replace
    from symbols.head import frozen, with_lr_mults
    from train.data import Augment, record_iter, resolve_classes
    from train.fit import TrainError, contexts, init_optimizer, resolve_mults
    from train.metrics import Tally
    if not 0 < start_lr < end_lr:
        raise TrainError(f"--start-lr {start_lr} / --end-lr {end_lr}: need 0 < start < end")
    cfg.validate()
    ctx = contexts(cfg.gpus, cfg.cpus)
    classes = resolve_classes(cfg.data_train, cfg.num_classes, cfg.data_val)
    symbol, args, aux, output_name, pre, sidecar_dir = _model(cfg, classes.num_classes)
    label_name = f"{output_name}_label"
    shape = tuple(cfg.image_shape or pre.input_shape)
    param_names = [n for n in symbol.list_arguments() if n not in ("data", label_name)]
    mults = resolve_mults(param_names, cfg.lr_mult)
    fixed = frozen(mults)
    if len(fixed) == len(param_names):
        raise TrainError("--lr-mult freezes every parameter; nothing would train")
    # The training copy of the symbol carries the --lr-mult rules, as in python -m train (see with_lr_mults).
    module = mx.mod.Module(with_lr_mults(symbol, mults), data_names=["data"], label_names=[label_name],
                           context=ctx, fixed_param_names=fixed)
    module.bind(data_shapes=[("data", (cfg.batch_size,) + shape)], label_shapes=[(label_name, (cfg.batch_size,))],
                for_training=True)
    module.init_params(arg_params=args, aux_params=aux, allow_missing=False, allow_extra=True)  # copies
    # Module creates the optimizer by name exactly as training does (index map, rescale_grad, lr multipliers);
    # the sweep then moves only its base rate.
    init_optimizer(module, "local" if len(ctx) > 1 else None, replace(cfg, lr=start_lr), None, 0)
    optimizer = module._optimizer  # noqa: SLF001 (Module keeps the optimizer it created here)

    augment = Augment.from_config(cfg)
    lrs, losses, running, stopped, tally, best, average = [], [], [], "completed", Tally(), math.inf, 0.0
    passes = 0
    bar = _progress(progress, num_batches)
    while len(lrs) < num_batches and stopped == "completed":
        mx.random.seed(cfg.seed * 1000 + passes)
        it = record_iter(cfg.data_train, cfg.batch_size, pre, sidecar_dir, label_name, shape, train=True,
                         augment=augment, seed=cfg.seed * 1000 + passes, resize=cfg.resize,
                         threads=cfg.data_nthreads, rgb_mean=cfg.rgb_mean, rgb_std=cfg.rgb_std)
        passes += 1
        for batch in it:
            lr = lr_at(len(lrs), num_batches, start_lr, end_lr)
            optimizer.lr = lr  # the base rate; set_lr_mult's multipliers apply on top, as in training
            module.forward_backward(batch)
            probs = module.get_outputs()[0].asnumpy()
            keep = probs.shape[0] - batch.pad
            loss = tally.update(probs[:keep], batch.label[0].asnumpy()[:keep]) if np.isfinite(probs).all() \
                else math.inf
            lrs.append(lr)
            losses.append(loss)
            average = beta * average + (1 - beta) * loss  # bias-corrected below: early values are not near 0
            running.append(average / (1 - beta ** len(losses)) if math.isfinite(loss) else math.inf)
            best = min(best, running[-1])
            bar.set_postfix_str(f"lr {lr:.2g}, loss {running[-1]:.3g}", refresh=False)
            bar.update()
            if not math.isfinite(running[-1]) or running[-1] > diverge * best:
                stopped = f"diverged at lr {lr:.3g} (running loss {running[-1]:.3g}, minimum {best:.3g})"
                break
            module.update()
            if len(lrs) >= num_batches:
                break
    bar.close()
    finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
    smoothed = centred([losses[i] for i in finite])
    suggested, steepest, at_min = suggest([lrs[i] for i in finite], smoothed)
    curve = dict(zip(finite, smoothed))
    return LRFindResult(lrs, [v if math.isfinite(v) else None for v in losses],
                        [curve.get(i) for i in range(len(lrs))], [v if math.isfinite(v) else None for v in running],
                        suggested, steepest, at_min, stopped, fixed, {n: m for n, m in mults.items() if m != 1.0})


def _progress(enabled: bool, num_batches: int):
    """The sweep's bar: batches of --num-batches, rate and ETA, the current lr and running loss (a sweep that
    diverges ends early, short of the total)."""
    from tqdm import tqdm
    return tqdm(total=num_batches, unit="batch", desc="lr-find", disable=not enabled, leave=False)


def plot_png(result: LRFindResult) -> bytes:
    """Loss and smoothed loss against the learning rate (log axis), the suggestions marked."""
    from recbuild.html_report import figure_png, pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    finite = [(lr, loss) for lr, loss in zip(result.lrs, result.losses) if loss is not None]
    ax.plot([f[0] for f in finite], [f[1] for f in finite], ".", color="0.6", ms=3, label="batch loss")
    ax.plot([lr for lr, s in zip(result.lrs, result.smoothed) if s is not None],
            [s for s in result.smoothed if s is not None], "-", label="smoothed (centred)")
    for value, style, text in ((result.suggested_lr, "g--", "suggested (min / 10)"),
                               (result.min_loss_lr, "r:", "minimum"), (result.steepest_lr, "b:", "steepest")):
        if value:
            ax.axvline(value, color=style[0], ls=style[1:], lw=1.2, label=f"{text}: {value:.2g}")
    ax.set_xscale("log")
    curve = [s for s in result.smoothed if s is not None] or [1.0]
    top = min(max(curve), 2 * curve[0])  # the divergent tail would otherwise flatten the useful part
    ax.set(xlabel="learning rate (base; --lr-mult applies on top)", ylabel="cross-entropy", ylim=(0, top * 1.1),
           title="learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return figure_png(fig)


def build_parser() -> argparse.ArgumentParser:
    """`python -m train`'s parser (the same options) plus the sweep's own."""
    from train.config import build_parser as train_parser
    p = train_parser()
    p.prog = "python -m train lr-find"
    p.description = __doc__.split("\n\n")[0]
    g = p.add_argument_group("range test")
    g.add_argument("--start-lr", type=float, default=START_LR)
    g.add_argument("--end-lr", type=float, default=END_LR)
    g.add_argument("--num-batches", type=int, default=NUM_BATCHES, help="length of the sweep")
    g.add_argument("--diverge", type=float, default=DIVERGE, help="stop when the running loss exceeds this x its min")
    g.add_argument("--out", type=Path, default=None,
                   help="plot to write (and its .json beside it); default MODEL_PREFIX-lr-find.png or lr-find.png")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from recbuild.atomic import write_json
    from recbuild.html_report import write_png
    from train.config import config_from_args
    from train.data import DataError
    from train.fit import TrainError, resolve_load_epoch
    from train.config import parse_with_recipe
    a = parse_with_recipe(build_parser(), sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(a)
    out = a.out or Path(f"{cfg.model_prefix}-lr-find.png" if cfg.model_prefix else "lr-find.png")
    # --model-prefix is where training would write; the range test writes nothing there, so it may be absent.
    cfg = replace(cfg, model_prefix=cfg.model_prefix or str(out.with_suffix("")), progress=False)
    if a.num_batches < 5:
        print("error: --num-batches must be at least 5", file=sys.stderr)
        return 2
    try:
        result = lr_find(resolve_load_epoch(cfg), a.start_lr, a.end_lr, a.num_batches, a.diverge, progress=a.progress)
    except (TrainError, DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_png(out, plot_png(result))
    write_json(out.with_suffix(".json"), result.to_dict())
    if result.suggested_lr is None:
        print(f"lr-find: {len(result.lrs)} batches, {result.stopped}: too few to suggest a rate; widen the sweep "
              f"(--start-lr/--num-batches). Plot {out}")
        return 1
    print(f"lr-find: {len(result.lrs)} batches ({result.stopped}); smoothed loss lowest at lr "
          f"{result.min_loss_lr:.3g}, steepest descent at {result.steepest_lr:.3g}. Suggested --lr "
          f"{result.suggested_lr:.3g} (minimum / 10). Plot {out}, data {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
