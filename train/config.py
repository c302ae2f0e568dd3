"""Every default of the trainer, in one place, as a dataclass the CLI fills and every run writes out.

The option names are fine-tune.py's and common/fit.py's (with dashes turned into underscores), so existing
command lines keep working; what is new is marked "new".
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Tuple

KV_STORES = ("local", "device", "dist_sync", "dist_device_sync", "dist_async", "nccl")
OPTIMIZERS = ("sgd", "nag", "adam")
SCHEDULERS = ("step", "cosine")
DTYPES = ("float32", "float16")
CONFIG_SUFFIX = "-config.json"


@dataclass
class TrainConfig:
    """A resolved training run. Field names are the CLI option names with '-' -> '_'."""

    # ---- pretrained model (fine-tune.py) ---------------------------------------------------------------
    pretrained_model: str = ""              # PREFIX of the converted checkpoint (symbol, params, sidecar)
    pretrained_epoch: int = 0               # the converter writes epoch 0
    layer_before_fullc: Optional[str] = None  # None: VGG's declared head, else the sidecar's classifier
    num_classes: Optional[int] = None       # None: from the class map, else max label + 1
    hidden: int = 0                         # new: width of a hidden head layer (0: none)
    hidden_dropout: float = 0.5             # new: dropout after the hidden head layer
    # ---- data (fit.py / data.py) -------------------------------------------------------------------------
    data_train: str = ""
    data_val: Optional[str] = None
    image_shape: Optional[Tuple[int, int, int]] = None  # None: the sidecar's input_shape
    batch_size: int = 32                    # fine-tune.py's default
    num_examples: Optional[int] = None      # fit.py's; not needed (records are counted), checked when given
    resize: int = -1                        # shorter side resized to this before cropping (-1: as packed)
    data_nthreads: int = 2                  # decode threads: the CI machine has 2 cores
    rgb_mean: Optional[Tuple[float, float, float]] = None  # override the sidecar (RGB order)
    rgb_std: Optional[Tuple[float, float, float]] = None
    # ---- augmentation (data.py names) -------------------------------------------------------------------
    random_crop: bool = False
    random_resized_crop: bool = False
    min_random_area: float = 0.08           # Inception-style crop covers 8%..100% of the image
    max_random_area: float = 1.0
    min_random_aspect_ratio: float = 0.75   # 3/4 .. 4/3, the usual RandomResizedCrop range
    max_random_aspect_ratio: float = 1.333
    random_mirror: bool = False
    max_random_rotate_angle: int = 0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    pca_noise: float = 0.0
    # ---- schedule ----------------------------------------------------------------------------------------
    num_epochs: int = 30                    # fine-tune.py's default
    lr: float = 0.01                        # fine-tune.py's default
    lr_scheduler: str = "step"              # new: step (fit.py's) or cosine
    lr_factor: float = 0.1
    lr_step_epochs: Tuple[int, ...] = (20,)  # fine-tune.py's default '20'
    warmup_epochs: float = 0.0              # linear warm-up from 0 before either schedule
    # ---- optimizer ---------------------------------------------------------------------------------------
    optimizer: str = "sgd"
    mom: float = 0.9                        # fine-tune.py sets 0; Caffe's fine-tuning solvers use 0.9
    wd: float = 0.0005                      # fine-tune.py sets 0; Caffe's VGG solver value
    lr_mult: List[str] = field(default_factory=list)  # new: 'REGEX=MULT', 0 freezes
    dtype: str = "float32"                  # float16 needs a GPU; multi-precision SGD keeps fp32 masters
    # ---- devices -----------------------------------------------------------------------------------------
    gpus: Optional[str] = None              # '0,1'; None: CPU
    cpus: int = 1                           # new: CPU contexts when no GPU (data-parallel like --gpus)
    kv_store: str = "device"                # fit.py's default
    # ---- checkpoints and logging -------------------------------------------------------------------------
    model_prefix: str = ""
    load_epoch: Optional[int] = None        # resume from model_prefix-NNNN (params + optimizer states)
    overwrite: bool = False                 # new: allow a fresh run over existing checkpoints
    disp_batches: int = 20
    top_k: int = 5                          # top-k accuracy reported besides top-1 (0: off)
    seed: int = 0                           # new: seeds head init, shuffling, augmentation and dropout
    progress: bool = True                   # new: tqdm bar

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
        if self.optimizer not in OPTIMIZERS:
            bad(f"--optimizer {self.optimizer}: supported are {', '.join(OPTIMIZERS)}")
        if self.lr_scheduler not in SCHEDULERS:
            bad(f"--lr-scheduler {self.lr_scheduler}: supported are {', '.join(SCHEDULERS)}")
        if self.kv_store not in KV_STORES:
            bad(f"--kv-store {self.kv_store}: supported are {', '.join(KV_STORES)}")
        if self.dtype not in DTYPES:
            bad(f"--dtype {self.dtype}: supported are {', '.join(DTYPES)}")
        if self.dtype == "float16" and not self.gpus:
            bad("--dtype float16 needs --gpus: MXNet's CPU kernels are float32 only")
        for name in ("batch_size", "num_epochs", "cpus", "disp_batches"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            bad("--lr must be positive")
        if self.num_classes is not None and self.num_classes < 2:
            bad("--num-classes must be at least 2")
        if self.load_epoch is not None and not 0 < self.load_epoch < self.num_epochs:
            bad(f"--load-epoch {self.load_epoch}: resumes after that epoch, so it must be in 1..{self.num_epochs - 1}"
                f" (--num-epochs {self.num_epochs})")
        if self.image_shape is not None and len(self.image_shape) != 3:
            bad(f"--image-shape must be C,H,W, got {self.image_shape}")
        if not 0 < self.min_random_area <= self.max_random_area <= 1:
            bad("--min-random-area/--max-random-area must satisfy 0 < min <= max <= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**data)


def config_path(model_prefix: str) -> Path:
    """Where a run's resolved config is written: PREFIX-config.json beside its checkpoints."""
    return Path(str(model_prefix) + CONFIG_SUFFIX)


def load_config(path) -> TrainConfig:
    return TrainConfig.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
