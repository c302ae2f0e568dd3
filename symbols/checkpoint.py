"""The one home of MXNet checkpoint files: their names, loading, saving and listing.

A checkpoint is what `mx.model.save_checkpoint` writes and `mx.model.load_checkpoint` reads:
`PREFIX-symbol.json` plus `PREFIX-NNNN.params`, an NDArray file whose keys are `arg:NAME` / `aux:NAME`;
the trainer adds `PREFIX-NNNN.states` (optimizer state). Every writer here publishes atomically (temporary
file, then rename), so a killed run never leaves a file that looks complete. The converter, the trainer, the
recipes, the predictor, deployment and the demo all go through these functions, so their file names and their
error messages cannot drift apart.
"""
from __future__ import annotations

import ctypes
import pickle
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import mxnet as mx
import numpy as np
from mxnet.base import _LIB, check_call

from recbuild.atomic import atomic_path

PathLike = Union[str, Path]
# mx.model.save_checkpoint formats the epoch as %04d; longer numbers are legal but never written by MXNet.
_EPOCH_DIGITS = 4


class CheckpointError(ValueError):
    """A checkpoint file is missing or unreadable; the message is one line naming the file."""


def symbol_path(prefix: PathLike) -> Path:
    return Path(f"{prefix}-symbol.json")


def params_path(prefix: PathLike, epoch: int) -> Path:
    return Path(f"{prefix}-{epoch:0{_EPOCH_DIGITS}d}.params")


def states_path(prefix: PathLike, epoch: int) -> Path:
    return Path(f"{prefix}-{epoch:0{_EPOCH_DIGITS}d}.states")


def list_epochs(prefix: PathLike) -> List[int]:
    """The epochs N with a `PREFIX-NNNN.params` file, ascending."""
    folder, name = Path(str(prefix)).parent, Path(str(prefix)).name
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(name) + r"-(\d{%d})\.params" % _EPOCH_DIGITS)
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name)))


def latest_epoch(prefix: PathLike) -> int:
    """The highest N of the `PREFIX-NNNN.params` files; CheckpointError when there is none."""
    epochs = list_epochs(prefix)
    if not epochs:
        raise CheckpointError(f"{prefix}-NNNN.params: no checkpoint found")
    return epochs[-1]


def load_checkpoint(prefix: PathLike, epoch: int, what: str = "checkpoint"
                    ) -> Tuple[mx.sym.Symbol, Dict[str, mx.nd.NDArray], Dict[str, mx.nd.NDArray]]:
    """`mx.model.load_checkpoint`, with one-line errors naming the missing or unreadable file.

    Args:
        prefix / epoch: as for mx.model.load_checkpoint.
        what: what the caller loads ("pretrained", "resume", ...), said in the error.
    """
    for path in (symbol_path(prefix), params_path(prefix, epoch)):
        if not path.is_file():
            others = [f"{e:04d}" for e in list_epochs(prefix)]
            hint = f"; epochs beside it: {', '.join(others)}" if others and path.suffix == ".params" else ""
            raise CheckpointError(f"{path}: {what} file missing (prefix {prefix}, epoch {epoch}){hint}")
    try:
        return mx.model.load_checkpoint(str(prefix), epoch)
    except mx.base.MXNetError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
        raise CheckpointError(f"{params_path(prefix, epoch)}: cannot load {what} ({first})") from None


def params_blob(args: Mapping[str, object], aux: Mapping[str, object],
                dtype: Optional[str] = "float32") -> Dict[str, object]:
    """The `arg:`/`aux:` keyed dictionary a `.params` file holds (NDArrays or numpy arrays alike)."""
    def cast(value):
        # copy=False: a weight already in `dtype` is written as it is (a copy of every weight doubled a
        # checkpoint's peak memory; NDArray and numpy astype both take it)
        return value.astype(dtype, copy=False) if dtype is not None else value
    blob = {f"arg:{k}": cast(v) for k, v in args.items()}
    blob.update({f"aux:{k}": cast(v) for k, v in aux.items()})
    return blob


def save_params(path: PathLike, args: Mapping[str, mx.nd.NDArray], aux: Mapping[str, mx.nd.NDArray],
                dtype: Optional[str] = "float32") -> Path:
    """Write an `arg:`/`aux:` `.params` file atomically with mx.nd.save; numpy values are wrapped."""
    blob = {k: (mx.nd.array(v, dtype=v.dtype) if isinstance(v, np.ndarray) else v)
            for k, v in params_blob(args, aux, dtype).items()}
    with atomic_path(path) as tmp:
        mx.nd.save(str(tmp), blob)
    return Path(path)


def save_symbol(prefix: PathLike, symbol: mx.sym.Symbol) -> Path:
    """Write `PREFIX-symbol.json` atomically."""
    path = symbol_path(prefix)
    with atomic_path(path) as tmp:
        symbol.save(str(tmp))
    return path


def save_checkpoint(prefix: PathLike, epoch: int, symbol: Optional[mx.sym.Symbol],
                    args: Mapping[str, mx.nd.NDArray], aux: Mapping[str, mx.nd.NDArray],
                    dtype: Optional[str] = "float32") -> List[Path]:
    """`mx.model.save_checkpoint`, each file atomic; `symbol=None` writes only the `.params`."""
    written = [save_params(params_path(prefix, epoch), args, aux, dtype)]
    if symbol is not None:
        written.append(save_symbol(prefix, symbol))
    return written


# ---- optimizer states, written with one state's bytes in memory at a time ------------------------------------
# Module.save_optimizer_states pickles the updater's states into one bytes object and then writes it. Each NDArray
# pickles through MXNDArraySaveRawBytes, which grows a C++ string, copies it into a bytearray, and protocol 4
# copies that again: ~3x the largest state (1.4 GB for VGG16's fc6 momentum) on top of the whole pickle. This
# writer builds each CPU array's raw bytes (the same NDArray::Save layout, checked against SaveRawBytes in the
# tests) in one buffer the data is copied into once, and pickles it with protocol 5, which writes a bytearray straight
# from its buffer. `Module.load_optimizer_states` (pickle.loads) reads the file as it reads its own.
_NDARRAY_V2_MAGIC = 0xF993FAC9


def _raw_ndarray_bytes(array: mx.nd.NDArray) -> bytearray:
    """What NDArray.__getstate__ puts under 'handle' for a dense CPU array: magic, storage type (dense),
    ndim, int64 dims, context (dev_type, dev_id), dtype flag, then the data."""
    ctx = array.context
    header = (np.array([_NDARRAY_V2_MAGIC], "<u4").tobytes() + np.array([0, array.ndim], "<i4").tobytes()
              + np.array(array.shape, "<i8").tobytes()
              + np.array([ctx.device_typeid, ctx.device_id, mx.ndarray.ndarray._DTYPE_NP_TO_MX[
                  np.dtype(array.dtype).type]], "<i4").tobytes())
    buffer = bytearray(len(header) + array.size * np.dtype(array.dtype).itemsize)
    buffer[:len(header)] = header
    # The data straight into the buffer: MXNDArraySyncCopyToCPU (MXNet's C API, what asnumpy() calls into an
    # array of its own) waits for pending writes and copies `size` elements.
    target = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    check_call(_LIB.MXNDArraySyncCopyToCPU(array.handle, ctypes.byref(target, len(header)),
                                           ctypes.c_size_t(array.size)))
    return buffer


class _StatesPickler(pickle.Pickler):
    def reducer_override(self, obj):
        # Dense CPU arrays only (optimizer states on a GPU or sparse ones keep NDArray's own pickling).
        if type(obj) is mx.nd.NDArray and obj.stype == "default" and obj.context.device_type == "cpu" \
                and not mx.util.is_np_shape():
            return mx.nd.NDArray, (None,), {"handle": _raw_ndarray_bytes(obj)}
        return NotImplemented


def save_optimizer_states(states: object, path: PathLike) -> None:
    """Write an updater's `states` (what `Updater.get_states()` pickles) to `path`, loadable by
    `Module.load_optimizer_states`, holding one state's bytes at a time."""
    with open(path, "wb") as out:
        _StatesPickler(out, protocol=5).dump(states)
