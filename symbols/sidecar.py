"""The preprocessing sidecar: how a checkpoint expects its input, written beside every checkpoint.

File: `PREFIX-preprocess.json` beside `PREFIX-symbol.json` / `PREFIX-NNNN.params`. The converter writes it,
the trainer copies it forward (with the new class count and class names), and the predictor and deploy
bundle read it, so nobody has to remember a model's channel order or mean again (the usual cause of the
"~10% accuracy after fine-tuning converted VGG" reports).

The model input is computed from an image with pixel values in [0, 255]:

    x = pixels in `channel_order` ("RGB" or "BGR"), shape (C, H, W) = input_shape
    x = (x - mean) / std * scale

`mean` is either per-channel values (in `channel_order`) or the name of a `.npy` file beside the sidecar
holding a float32 (C, H, W) mean image (in `channel_order`, already cropped to `input_shape`). `std` defaults
to 1 and `scale` to 1. Caffe's `transform_param.scale` becomes `scale`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from recbuild.atomic import atomic_path, write_json

FORMAT = "mxtransfer.preprocess/1"
SUFFIX = "-preprocess.json"
CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass
class Preprocess:
    """Everything a consumer needs to feed a checkpoint correctly.

    Attributes:
        input_shape: (C, H, W) of the `data` input, without the batch axis.
        channel_order: "RGB" or "BGR", the order the first layer expects.
        mean: per-channel mean in `channel_order`, or the file name (relative to the sidecar) of a
            float32 (C, H, W) `.npy` mean image, or None for no mean subtraction.
        std: per-channel std in `channel_order`, or None for 1.
        scale: multiplier applied after mean and std (Caffe's transform_param.scale).
        num_classes: size of the classifier output.
        classifier: name of the classifier layer (FullyConnected) that head surgery replaces, e.g. "fc8".
        feature_output: the internal output that feeds the classifier, e.g. "drop7_output"; the trainer
            attaches the new head here.
        output_name: name of the SoftmaxOutput layer (its symbol output is `<output_name>_output`).
        input_name: name of the data input; always "data" for our outputs.
        class_names: class names in label order, once a model has been fine-tuned on a class map.
        source: free-form provenance (converter inputs, training run).
    """

    input_shape: Tuple[int, int, int]
    channel_order: str = "RGB"
    mean: Union[None, List[float], str] = None
    std: Optional[List[float]] = None
    scale: float = 1.0
    num_classes: Optional[int] = None
    classifier: Optional[str] = None
    feature_output: Optional[str] = None
    output_name: str = "softmax"
    input_name: str = "data"
    class_names: Optional[List[str]] = None
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        self.input_shape = tuple(int(v) for v in self.input_shape)
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {self.input_shape}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {self.channel_order!r}")
        channels = self.input_shape[0]
        if isinstance(self.mean, (list, tuple)):
            self.mean = [float(v) for v in self.mean]
            if len(self.mean) not in (1, channels):
                raise ValueError(f"mean has {len(self.mean)} values for {channels} channels")
        if self.std is not None:
            self.std = [float(v) for v in self.std]
            if len(self.std) not in (1, channels):
                raise ValueError(f"std has {len(self.std)} values for {channels} channels")

    # ---- derived values -------------------------------------------------------------------------------
    def mean_array(self, sidecar_dir: Union[str, Path] = ".") -> Optional[np.ndarray]:
        """The mean as a float32 array broadcastable to (C, H, W), or None."""
        if self.mean is None:
            return None
        if isinstance(self.mean, str):
            path = Path(sidecar_dir) / self.mean
            mean = np.load(path).astype(np.float32)
            if mean.shape != self.input_shape:
                raise ValueError(f"{path}: mean image has shape {mean.shape}, the model input is {self.input_shape}")
            return mean
        values = np.asarray(self.mean, np.float32)
        return np.broadcast_to(values.reshape(-1, 1, 1), (self.input_shape[0], 1, 1)).copy()

    def std_array(self) -> np.ndarray:
        if self.std is None:
            return np.ones((self.input_shape[0], 1, 1), np.float32)
        values = np.asarray(self.std, np.float32)
        return np.broadcast_to(values.reshape(-1, 1, 1), (self.input_shape[0], 1, 1)).copy()

    def apply(self, images_rgb: np.ndarray, sidecar_dir: Union[str, Path] = ".") -> np.ndarray:
        """Turn RGB uint8/float images (N, H, W, C) or (N, C, H, W) in [0, 255] into model input (N, C, H, W).

        Images must already have the spatial size of `input_shape`.
        """
        x = np.asarray(images_rgb, np.float32)
        if x.ndim == 3:
            x = x[None]
        if x.shape[-1] == self.input_shape[0] and x.shape[1] != self.input_shape[0]:
            x = x.transpose(0, 3, 1, 2)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"images have shape {tuple(x.shape[1:])}, the model input is {self.input_shape}")
        if self.channel_order == "BGR":
            x = x[:, ::-1]
        mean = self.mean_array(sidecar_dir)
        if mean is not None:
            x = x - mean
        return np.ascontiguousarray((x / self.std_array()) * self.scale, dtype=np.float32)

    # ---- io ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, data: dict, where: str = "sidecar") -> "Preprocess":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{where}: not a preprocessing sidecar (format {FORMAT!r} expected)")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known - {"format"})
        if unknown:
            raise ValueError(f"{where}: unknown sidecar keys {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k != "format"})


def sidecar_path(prefix) -> Path:
    """`PREFIX-preprocess.json` for checkpoint prefix `PREFIX`."""
    return Path(str(prefix) + SUFFIX)


def save_sidecar(prefix, pre: Preprocess) -> Path:
    """Write the sidecar of checkpoint `prefix` atomically."""
    path = sidecar_path(prefix)
    write_json(path, pre.to_dict())
    return path


def load_sidecar(prefix) -> Preprocess:
    """Read the sidecar of checkpoint `prefix`; a clear error names the file when it is missing or bad."""
    path = sidecar_path(prefix)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no preprocessing sidecar beside checkpoint {prefix}; convert with "
            f"`python -m tools.caffe_converter` or pass the preprocessing flags explicitly") from None
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return Preprocess.from_dict(data, where=str(path))


def has_sidecar(prefix) -> bool:
    return sidecar_path(prefix).is_file()


def copy_mean_file(pre: Preprocess, src_prefix, dst_prefix) -> Preprocess:
    """When the mean is an image file, copy it beside `dst_prefix` and return the sidecar pointing at it."""
    if not isinstance(pre.mean, str):
        return pre
    src = Path(str(src_prefix)).parent / pre.mean
    dst_name = Path(str(dst_prefix)).name + "-mean.npy"
    dst = Path(str(dst_prefix)).parent / dst_name
    if src.resolve() != dst.resolve():
        with atomic_path(dst) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, np.load(src))
    return replace(pre, mean=dst_name)
