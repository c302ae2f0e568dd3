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
        packing: how a raw image became the picture the model was trained on, before the crop: the training
            .rec's pack transform (`resize`, `center_crop`, `color`, `encoding`, `quality`, `pass_through`,
            from its `NAME.pack.json`) and `iterator_resize` (the trainer's --resize, -1 for none). Written by
            the trainer; None when unknown (a converted model, or a .rec without a pack sidecar).
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
    packing: Optional[dict] = None

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

    # ---- the formula: one home for every consumer ----------------------------------------------------
    # x = (pixels in channel_order - mean) / std * scale. `apply` computes it on numpy images,
    # `iterator_args` hands it to ImageRecordIter (plus the mean-image step it cannot do), `graph` builds it
    # as scalar symbol ops (fusion), `mirror_input` gives the model input of the mirrored image.
    def per_channel(self, values: Optional[Sequence[float]], what: str) -> Optional[List[float]]:
        """1 value (all channels) or one per channel -> one per channel; None stays None.

        Raises:
            ValueError: any other count, naming `what` (e.g. "--rgb-mean") and the values.
        """
        if values is None:
            return None
        values = [float(v) for v in values]
        channels = self.input_shape[0]
        if len(values) not in (1, channels):
            given = ",".join(f"{v:g}" for v in values)
            raise ValueError(f"{what} {given}: give 1 value (all channels) or {channels} (one per channel), "
                             f"not {len(values)}")
        return values * channels if len(values) == 1 else values

    def mean_array(self, sidecar_dir: Union[str, Path] = ".", shape: Optional[Sequence[int]] = None
                   ) -> Optional[np.ndarray]:
        """The mean as a float32 array broadcastable to (C, H, W), or None.

        Args:
            sidecar_dir: folder of the sidecar (a mean image is relative to it).
            shape: the (C, H, W) a mean image must have; default `input_shape`.

        Raises:
            ValueError: the mean image is missing or has another shape.
        """
        if self.mean is None:
            return None
        if not isinstance(self.mean, str):
            return np.asarray(self.per_channel(self.mean, "mean"), np.float32).reshape(-1, 1, 1)
        path = Path(sidecar_dir) / self.mean
        if not path.is_file():
            raise ValueError(f"{path}: mean image named by the sidecar is missing")
        mean = np.load(path).astype(np.float32)
        wanted = tuple(int(v) for v in (shape or self.input_shape))
        if mean.shape != wanted:
            raise ValueError(f"{path}: mean image has shape {mean.shape}, the input is {wanted}; "
                             f"use --image-shape {','.join(map(str, mean.shape))} or a per-channel mean")
        return mean

    def std_array(self) -> np.ndarray:
        """The std as a float32 (C, 1, 1) array (ones when the sidecar has none)."""
        values = self.per_channel(self.std, "std") or [1.0] * self.input_shape[0]
        return np.asarray(values, np.float32).reshape(-1, 1, 1)

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

    def mirror_input(self, x, sidecar_dir: Union[str, Path] = "."):
        """The model input of the horizontally mirrored image, from the model input `x` (N, C, H, W).

        Mirroring acts on the raw pixels: the result is (flip(pixels) - mean) / std * scale. With a per-channel
        mean that is flip(x); with a mean image M it is flip(x) + (flip(M) - M) / std * scale, because
        flipping x would also flip M. `x` may be a numpy array or an mx.nd.NDArray (returned alike).
        """
        mean = self.mean_array(sidecar_dir, tuple(x.shape[1:])) if isinstance(self.mean, str) else None
        correction = None
        if mean is not None:
            correction = ((mean[:, :, ::-1] - mean) / self.std_array() * self.scale).astype(np.float32)
        if isinstance(x, np.ndarray):
            flipped = x[:, :, :, ::-1]
            return np.ascontiguousarray(flipped if correction is None else flipped + correction, dtype=np.float32)
        import mxnet as mx  # NDArray inputs only: the numpy path stays importable without MXNet
        flipped = mx.nd.flip(x, axis=3)
        return flipped if correction is None else flipped + mx.nd.array(correction[None], ctx=x.context)

    def iterator_args(self, sidecar_dir: Union[str, Path], image_shape: Sequence[int],
                      rgb_mean: Optional[Sequence[float]] = None, rgb_std: Optional[Sequence[float]] = None
                      ) -> Tuple[dict, Optional[Tuple[np.ndarray, Optional[List[float]], float]]]:
        """ImageRecordIter's mean/std/scale arguments (RGB order) and the mean-image step to run afterwards.

        ImageRecordIter computes (pixel - mean) / std * scale per RGB channel, this formula; values kept in
        BGR order are mapped to RGB here and the batch is reversed to BGR after the iterator. A mean image is
        subtracted after the iterator (ImageRecordIter's `mean_img` silently computes one over the data when
        the file is missing and never checks its shape), so then the iterator leaves pixels raw.

        Args:
            sidecar_dir: folder of the sidecar (a mean image is relative to it).
            image_shape: (C, H, W) fed to the model; a mean image must have exactly this shape.
            rgb_mean / rgb_std: overrides in RGB order (1 or C values).

        Returns:
            (kwargs, mean_step): mean_step is None, or (mean image in channel_order, std in channel_order or
            None, scale) to apply to the channel-ordered batch.

        Raises:
            ValueError: wrong value counts, a missing or mis-shaped mean image; the message names it.
        """
        order = slice(None, None, -1) if self.channel_order == "BGR" else slice(None)
        kw: dict = {"scale": float(self.scale)}
        mean_image = None
        mean = self.per_channel(rgb_mean, "--rgb-mean")
        if mean is None and isinstance(self.mean, str):
            mean_image = self.mean_array(sidecar_dir, image_shape)
        elif mean is None and self.mean is not None:
            mean = self.per_channel(self.mean, "mean")[order]
        std = self.per_channel(rgb_std, "--rgb-std")
        if std is None and self.std is not None:
            std = self.per_channel(self.std, "std")[order]
        if mean_image is not None:
            kw["scale"] = 1.0
            step = (mean_image, None if std is None else list(std)[order], float(self.scale))
            return kw, step
        if mean is not None:
            kw.update(mean_r=mean[0], mean_g=mean[1 % len(mean)], mean_b=mean[2 % len(mean)])
        if std is not None:
            kw.update(std_r=std[0], std_g=std[1 % len(std)], std_b=std[2 % len(std)])
        return kw, None

    def graph(self, x, name: str):
        """The formula as symbol ops on an RGB [0, 255] (N, 3, H, W) symbol: channel order, then per channel
        (c - mean) * (scale / std) as scalar ops (no extra weights to freeze). Nodes are named `<name>_split`
        and `<name>_preprocessed`. Per-channel means only.

        Raises:
            ValueError: a mean image, or not 3 channels.
        """
        import mxnet as mx
        if isinstance(self.mean, str) or self.input_shape[0] != 3:
            raise ValueError(f"the in-graph formula needs a per-channel mean and 3 channels, not {self.mean!r} "
                             f"with {self.input_shape[0]}")
        channels = mx.sym.split(x, num_outputs=3, axis=1, name=f"{name}_split")
        order = (2, 1, 0) if self.channel_order == "BGR" else (0, 1, 2)
        mean = self.per_channel(self.mean, "mean") or [0.0] * 3
        std = self.per_channel(self.std, "std") or [1.0] * 3
        out = []
        for i, source in enumerate(order):  # i: position in the model's channel order
            c = channels[source]
            if mean[i] != 0:
                c = c - float(mean[i])
            factor = float(self.scale) / float(std[i])
            if factor != 1.0:
                c = c * factor
            out.append(c)
        return mx.sym.Concat(*out, dim=1, name=f"{name}_preprocessed")

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


# ---- a plain MXNet checkpoint (no sidecar): fine-tune.py's assumptions ----------------------------------------
# MXNet's example/image-classification (1.9.1) feeds every network the same way: common/data.py's --rgb-mean and
# --rgb-std defaults on ImageRecordIter's RGB decode, fine-tune.py's --image-shape and --layer-before-fullc
# defaults. A checkpoint without our sidecar (a model-zoo model, any fine-tune.py output) is read under them.
FINE_TUNE_PY_RGB_MEAN = (123.68, 116.779, 103.939)
FINE_TUNE_PY_RGB_STD = (1.0, 1.0, 1.0)
FINE_TUNE_PY_IMAGE_SHAPE = (3, 224, 224)
FINE_TUNE_PY_LAYER_BEFORE_FULLC = "flatten0"


def _classifier_of(nodes: list, heads: list) -> Tuple[str, Optional[dict]]:
    """(name of the final SoftmaxOutput or "softmax", the FullyConnected node feeding it or None)."""
    last = nodes[heads[0][0]] if heads else None
    if last is None or last["op"] != "SoftmaxOutput":
        return "softmax", None
    source = nodes[last["inputs"][0][0]]
    return last["name"], (source if source["op"] == "FullyConnected" else None)


def plain_checkpoint_sidecar(symbol_json: str, image_shape: Optional[Sequence[int]] = None,
                             rgb_mean: Optional[Sequence[float]] = None, rgb_std: Optional[Sequence[float]] = None,
                             layer_before_fullc: Optional[str] = None, prefix: str = "") -> Preprocess:
    """The sidecar of a checkpoint that has none, under fine-tune.py's assumptions: RGB input, data.py's mean and
    std (or the `rgb_mean`/`rgb_std` given), fine-tune.py's 3x224x224 (or `image_shape`), and the new head after
    `layer_before_fullc`, else fine-tune.py's `flatten0` where the network has it, else the input of the
    FullyConnected layer feeding the final SoftmaxOutput. `source["assumed"]` says all of it in one line.

    Args:
        symbol_json: the checkpoint's PREFIX-symbol.json text.
        prefix: the checkpoint prefix, named in the `assumed` line.
    """
    graph = json.loads(symbol_json)
    nodes = graph["nodes"]
    output_name, fc = _classifier_of(nodes, graph.get("heads", []))
    names = {n["name"] for n in nodes if n["op"] != "null"}
    layer = layer_before_fullc or (FINE_TUNE_PY_LAYER_BEFORE_FULLC if FINE_TUNE_PY_LAYER_BEFORE_FULLC in names
                                   else None)
    feature = f"{layer}_output" if layer else None
    if feature is None and fc is not None:
        source = nodes[fc["inputs"][0][0]]
        feature = source["name"] if source["op"] == "null" else f"{source['name']}_output"
    attrs = (fc or {}).get("attrs", (fc or {}).get("param", {}))
    num_classes = int(attrs["num_hidden"]) if "num_hidden" in attrs else None
    mean = [float(v) for v in (rgb_mean or FINE_TUNE_PY_RGB_MEAN)]
    std = [float(v) for v in (rgb_std or FINE_TUNE_PY_RGB_STD)]
    shape = tuple(int(v) for v in (image_shape or FINE_TUNE_PY_IMAGE_SHAPE))
    head = (f"new head after {feature[:-len('_output')] if feature and feature.endswith('_output') else feature}"
            + (f" (replacing {fc['name']})" if fc is not None else ""))
    assumed = (f"{prefix or 'checkpoint'}: a plain MXNet checkpoint (no {Path(str(prefix)).name}{SUFFIX}), read "
               f"with fine-tune.py's assumptions: RGB, --rgb-mean {','.join(f'{v:g}' for v in mean)}, --rgb-std "
               f"{','.join(f'{v:g}' for v in std)}, --image-shape {','.join(map(str, shape))}, {head}; pass those "
               f"flags if it was trained otherwise")
    return Preprocess(input_shape=shape, channel_order="RGB", mean=mean, std=std, scale=1.0,
                      num_classes=num_classes, classifier=fc["name"] if fc is not None else None,
                      feature_output=feature, output_name=output_name,
                      source={"plain_checkpoint": str(prefix), "assumed": assumed})


def declared_input_size(pre: Preprocess) -> Optional[Tuple[int, int]]:
    """(H, W) when the model takes only that size: the converter's `source.input_sizes` with `fixed` (an
    InnerProduct after spatial axes), found through the `parent` chain the trainer keeps; None otherwise."""
    source = pre.source or {}
    while isinstance(source, dict):
        sizes = source.get("input_sizes")
        if isinstance(sizes, dict) and sizes.get("fixed") and sizes.get("declared"):
            return tuple(int(v) for v in sizes["declared"][-2:])
        source = source.get("parent")
    return None


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
