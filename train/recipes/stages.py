"""Staged fine-tuning: a schedule file gives each stage its epochs, lr_mult rules, optimizer, lr and augmentation.

    python -m train.recipes stages --schedule stages.json --pretrained-model out/model/vgg16 \\
        --data-train out/rec/x_train.rec --data-val out/rec/x_val.rec --model-prefix out/train/staged [--resume]

Schedule file (JSON):

    {"stages": [
      {"name": "head", "epochs": 3, "optimizer": "adam", "lr": 0.001, "lr_mult": ["^(?!fc8_)=0"],
       "augment": {"random_mirror": true, "random_resized_crop": true}},
      {"name": "top blocks", "epochs": 4, "optimizer": "sgd", "lr": 0.001, "mom": 0.9,
       "lr_mult": ["^conv[1-4]_=0"], "augment": {"random_mirror": true}},
      {"name": "polish", "epochs": 2, "optimizer": "sgd", "lr": 0.0001, "augment": {}}
    ]}

Keys per stage (anything else is refused, naming the file and stage): `epochs` (required), `name`, `optimizer`,
`lr`, `mom`, `wd`, `lr_mult` (list of 'REGEX=MULT', 0 freezes; default: everything trains), `lr_step_epochs`
(epochs *counted from the stage start*), `lr_factor`, `lr_scheduler` and `warmup_epochs` (first stage only:
both count updates from the start of the run), `augment` (trainer augmentation fields; a stage gets exactly the
augmentation it lists, nothing inherited) and `class_balance` (bool). Unset keys take the command-line values.

How it runs: all stages write one checkpoint series PREFIX-NNNN with global epoch numbers (stage k covers
epochs start_k+1 .. end_k), one metrics file and PREFIX-stages.json (the schedule, per-stage resolved
frozen/lr_mult maps, and where each stage ended). Stage k>0 continues from the checkpoint at start_k with a
fresh optimizer (its own type, lr, momentum; no state carried across a boundary); the update count (and so
any lr steps) continues. Resume (`--resume`) finds the last checkpoint: inside a stage it resumes with that
stage's optimizer state exactly; on a boundary it starts the next stage. A later-stage Adam keeps the global
update count, so its bias correction is already ~1: its first steps are damped; the recipe uses SGD there.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

from recbuild.atomic import write_json
from train.config import AUGMENT, OPTIMIZERS, SCHEDULERS, TrainConfig, config_path, option_names
from symbols.checkpoint import list_epochs
from train.fit import FitResult, TrainError, fit

log = logging.getLogger(__name__)

STAGES_FORMAT = "mxtransfer.stages/1"
STAGE_KEYS = ("name", "epochs", "optimizer", "lr", "mom", "wd", "lr_mult", "lr_step_epochs", "lr_factor",
              "lr_scheduler", "warmup_epochs", "augment", "class_balance")
FIRST_STAGE_ONLY = ("lr_scheduler", "warmup_epochs")


@dataclass
class Stage:
    """One stage of a schedule; None means 'the command line's value'."""

    epochs: int
    name: str = ""
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    mom: Optional[float] = None
    wd: Optional[float] = None
    lr_mult: List[str] = field(default_factory=list)
    lr_step_epochs: List[int] = field(default_factory=list)
    lr_factor: Optional[float] = None
    lr_scheduler: Optional[str] = None
    warmup_epochs: Optional[float] = None
    augment: Dict[str, object] = field(default_factory=dict)
    class_balance: bool = False


def stages_path(model_prefix) -> Path:
    return Path(f"{model_prefix}-stages.json")


def parse_schedule(data: dict, where: str = "schedule") -> List[Stage]:
    """Validate a schedule (see the module docstring); every problem names the file and the stage."""
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise TrainError(f"{where}: expected {{\"stages\": [{{\"epochs\": N, ...}}, ...]}} with at least one stage")
    aug_keys = set(option_names(AUGMENT))
    stages = []
    for i, raw in enumerate(data["stages"]):
        at = f"{where}: stage {i + 1}" + (f" ({raw.get('name')})" if isinstance(raw, dict) and raw.get("name") else "")
        if not isinstance(raw, dict):
            raise TrainError(f"{at}: expected an object")
        unknown = sorted(set(raw) - set(STAGE_KEYS))
        if unknown:
            raise TrainError(f"{at}: unknown keys {unknown}; supported: {', '.join(STAGE_KEYS)}")
        if i > 0:
            late = [k for k in FIRST_STAGE_ONLY if k in raw]
            if late:
                raise TrainError(f"{at}: {late[0]} is allowed in the first stage only (it counts updates from the "
                                 f"start of the run); use lr and lr_step_epochs in later stages")
        if not isinstance(raw.get("epochs"), int) or raw["epochs"] < 1:
            raise TrainError(f"{at}: 'epochs' must be a whole number >= 1")
        if raw.get("optimizer") is not None and raw["optimizer"] not in OPTIMIZERS:
            raise TrainError(f"{at}: optimizer {raw['optimizer']!r}; supported: {', '.join(OPTIMIZERS)}")
        if raw.get("lr_scheduler") is not None and raw["lr_scheduler"] not in SCHEDULERS:
            raise TrainError(f"{at}: lr_scheduler {raw['lr_scheduler']!r}; supported: {', '.join(SCHEDULERS)}")
        if raw.get("lr") is not None and not (isinstance(raw["lr"], (int, float)) and raw["lr"] > 0):
            raise TrainError(f"{at}: lr must be a positive number")
        lr_mult = raw.get("lr_mult", [])
        if not isinstance(lr_mult, list) or not all(isinstance(r, str) for r in lr_mult):
            raise TrainError(f"{at}: lr_mult must be a list of 'REGEX=MULT' strings")
        augment = raw.get("augment", {})
        if not isinstance(augment, dict) or set(augment) - aug_keys:
            bad = sorted(set(augment) - aug_keys) if isinstance(augment, dict) else augment
            raise TrainError(f"{at}: augment keys {bad} unknown; supported: {', '.join(sorted(aug_keys))}")
        steps = raw.get("lr_step_epochs", [])
        if not isinstance(steps, list) or not all(isinstance(s, int) and 0 < s < raw["epochs"] for s in steps):
            raise TrainError(f"{at}: lr_step_epochs must be epochs inside the stage (1..{raw['epochs'] - 1})")
        stages.append(Stage(**{**raw, "lr_mult": list(lr_mult), "lr_step_epochs": list(steps),
                               "augment": dict(augment)}))
    return stages


def load_schedule(path) -> List[Stage]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainError(f"{path}: schedule file not found") from None
    except ValueError as err:
        raise TrainError(f"{path}: not valid JSON ({err})") from None
    return parse_schedule(data, str(path))


def stage_config(base: TrainConfig, stage: Stage, start: int, end: int) -> TrainConfig:
    """The trainer config of one stage: global epochs, the stage's optimizer, rules and augmentation."""
    aug = TrainConfig().group(AUGMENT)  # a stage gets exactly the augmentation it lists
    aug.update(stage.augment)
    values = {"num_epochs": end, "lr_mult": list(stage.lr_mult),
              "lr_step_epochs": ",".join(str(start + s) for s in stage.lr_step_epochs), **aug}
    # A stage's warmup_epochs is the trainer's --lr-warmup-epochs (any optimizer), not fit.py's lbsgd warm-up.
    for key, option in (("optimizer", "optimizer"), ("lr", "lr"), ("mom", "mom"), ("wd", "wd"),
                        ("lr_factor", "lr_factor"), ("lr_scheduler", "lr_scheduler"),
                        ("warmup_epochs", "lr_warmup_epochs")):
        value = getattr(stage, key)
        if value is not None:
            values[option] = value
    if start > 0:  # later stages: constant lr unless they step it; cosine/warm-up belong to stage one
        values["lr_scheduler"] = "step"
        values["lr_warmup_epochs"] = 0.0
    return replace(base, **values)


def _schedule_digest(stages: List[Stage]) -> str:
    return hashlib.sha256(json.dumps([s.__dict__ for s in stages], sort_keys=True).encode()).hexdigest()[:16]


def run_stages(base: TrainConfig, stages: List[Stage], resume: bool = False, until_epoch: Optional[int] = None
               ) -> FitResult:
    """Run (or resume) a staged fine-tuning.

    Args:
        base: the command line's config (model, data, devices, prefix; defaults for unset stage keys).
        stages: the parsed schedule.
        resume: continue from the last checkpoint of `base.model_prefix` (mid-stage or on a boundary).
        until_epoch: stop after this global epoch (to split a run into sessions; `resume` continues it).

    Raises:
        TrainError: bad schedule, a checkpoint series from another schedule, or the trainer's own errors.
    """
    prefix = base.model_prefix
    ends, total = [], 0
    for s in stages:
        total += s.epochs
        ends.append(total)
    digest = _schedule_digest(stages)
    record_path = stages_path(prefix)
    existing = [e for e in list_epochs(prefix) if e > 0]
    last = existing[-1] if existing else 0
    record = {"format": STAGES_FORMAT, "schedule": [s.__dict__ for s in stages], "digest": digest, "stages": []}
    if resume:
        if not existing:
            raise TrainError(f"--resume: no checkpoint {prefix}-NNNN.params to resume from")
        if record_path.is_file():
            old = json.loads(record_path.read_text(encoding="utf-8"))
            if old.get("digest") != digest:
                raise TrainError(f"{record_path}: these checkpoints were made with another schedule; resume with "
                                 f"the same schedule file, or start afresh with --overwrite")
            record["stages"] = [s for s in old.get("stages", []) if s.get("end", 0) <= last]
    else:
        if existing and not base.overwrite:
            raise TrainError(f"{prefix}-{last:04d}.params exists: pass --resume to continue, or --overwrite, or "
                             f"choose another --model-prefix")
        last = 0
    result: Optional[FitResult] = None
    start = 0
    for k, (stage, end) in enumerate(zip(stages, ends)):
        stage_start, start = start, end
        if last >= end:
            continue
        stop = min(end, until_epoch) if until_epoch else end
        if stop <= last:
            break
        cfg = stage_config(base, stage, stage_start, end)
        cfg = replace(cfg, num_epochs=stop, load_epoch=last if last > 0 else None,
                      overwrite=base.overwrite if last == 0 else False)
        boundary = last == stage_start and last > 0
        provider = None
        if stage.class_balance:
            from train.recipes.sampling import epoch_rec_provider
            provider = epoch_rec_provider(cfg.data_train, prefix, cfg.seed)
        log.info("stage %d/%d %s: epochs %d..%d, %s lr %g, lr_mult %s%s", k + 1, len(stages), stage.name,
                 last + 1, stop, cfg.optimizer, cfg.lr, cfg.lr_mult or "(all train)",
                 ", fresh optimizer" if boundary else (", resuming" if last > stage_start else ""))
        result = fit(cfg, restart_optimizer=boundary, epoch_train_rec=provider)
        resolved = json.loads(config_path(prefix).read_text(encoding="utf-8")).get("resolved", {})
        record["stages"] = [s for s in record["stages"] if s["stage"] != k + 1] + [{
            "stage": k + 1, "name": stage.name, "start": stage_start, "end": end, "done_to": stop,
            "optimizer": cfg.optimizer, "lr": cfg.lr, "lr_mult": cfg.lr_mult, "frozen": resolved.get("frozen"),
            "lr_mults": resolved.get("lr_mults"), "augment": cfg.group(AUGMENT),
            "class_balance": stage.class_balance}]
        write_json(record_path, record)
        last = stop
        if until_epoch and stop >= until_epoch:
            break
    if result is None:
        raise TrainError(f"{prefix}: nothing to do (the last checkpoint, epoch {last}, already ends the schedule "
                         f"of {total} epochs)")
    return result

