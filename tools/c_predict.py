"""MXNet's C predict API (c_predict_api.h) through ctypes: what C/C++ serving code sees of a model.

Legacy deployments load `PREFIX-symbol.json` and the raw bytes of `PREFIX-NNNN.params` with MXPredCreate and
never touch the Python frontend. This wrapper calls exactly those entry points of the wheel's libmxnet.so
(MXPredCreate, MXPredSetInput, MXPredForward, MXPredGetOutputShape, MXPredGetOutput, MXPredFree), so tests
and `python -m tools.deploy --check` see what such code would see.

    with CPredictor.from_files(bundle / "model-symbol.json", bundle / "model-0000.params",
                               {"data": (1, 3, 224, 224)}) as pred:
        probs = pred.forward(data=x)[0]
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

log = logging.getLogger(__name__)

PredictorHandle = ctypes.c_void_p
mx_uint = ctypes.c_uint
mx_float = ctypes.c_float
# Device types as c_predict_api.h numbers them.
DEV_CPU, DEV_GPU = 1, 2
# The C API entry points we bind; `nm -D libmxnet.so` lists them as exported text symbols.
REQUIRED_SYMBOLS = ("MXPredCreate", "MXPredSetInput", "MXPredForward", "MXPredGetOutputShape",
                    "MXPredGetOutput", "MXPredFree", "MXGetLastError")


def find_libmxnet() -> Path:
    """The libmxnet.so of the installed mxnet wheel, found without importing the Python frontend."""
    spec = importlib.util.find_spec("mxnet")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mxnet is not installed; `make install` installs the mxnet wheel")
    for folder in spec.submodule_search_locations:
        lib = Path(folder) / "libmxnet.so"
        if lib.is_file():
            return lib
    raise FileNotFoundError(f"no libmxnet.so in {list(spec.submodule_search_locations)}")


_LIB: Optional[ctypes.CDLL] = None


def load_library(path: Union[str, Path, None] = None) -> ctypes.CDLL:
    """Load libmxnet.so (once) and declare the predict API's argument and return types."""
    global _LIB
    if _LIB is not None and path is None:
        return _LIB
    # RTLD_LOCAL, as mxnet's own loader does: libmxnet.so carries its own libjpeg/libpng symbols, and
    # exporting them globally makes Pillow (loaded later in the same process) bind to them and fail.
    lib = ctypes.CDLL(str(path or find_libmxnet()), ctypes.RTLD_LOCAL)
    missing = [name for name in REQUIRED_SYMBOLS if not hasattr(lib, name)]
    if missing:
        raise OSError(f"{path or find_libmxnet()}: lacks the C predict API symbols {missing}")
    lib.MXGetLastError.restype = ctypes.c_char_p
    lib.MXPredCreate.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                 mx_uint, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(mx_uint),
                                 ctypes.POINTER(mx_uint), ctypes.POINTER(PredictorHandle)]
    lib.MXPredSetInput.argtypes = [PredictorHandle, ctypes.c_char_p, ctypes.POINTER(mx_float), mx_uint]
    lib.MXPredForward.argtypes = [PredictorHandle]
    lib.MXPredGetOutputShape.argtypes = [PredictorHandle, mx_uint, ctypes.POINTER(ctypes.POINTER(mx_uint)),
                                         ctypes.POINTER(mx_uint)]
    lib.MXPredGetOutput.argtypes = [PredictorHandle, mx_uint, ctypes.POINTER(mx_float), mx_uint]
    lib.MXPredFree.argtypes = [PredictorHandle]
    for name in REQUIRED_SYMBOLS[:-1]:
        getattr(lib, name).restype = ctypes.c_int
    if path is None:
        _LIB = lib
    return lib


class CPredictError(RuntimeError):
    """A C predict API call returned non-zero; the message is MXGetLastError()."""


class CPredictor:
    """One MXNet predictor created through the C API.

    Args:
        symbol_json: the content of PREFIX-symbol.json.
        param_bytes: the raw bytes of PREFIX-NNNN.params (the `arg:`/`aux:` keyed NDArray file).
        input_shapes: input name -> full shape including the batch axis, e.g. {"data": (1, 3, 224, 224)}.
        dev_type: DEV_CPU or DEV_GPU.
        dev_id: device index.
    """

    def __init__(self, symbol_json: str, param_bytes: bytes, input_shapes: Dict[str, Sequence[int]],
                 dev_type: int = DEV_CPU, dev_id: int = 0):
        self._lib = load_library()
        self.input_shapes = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
        self.num_outputs = len(json.loads(symbol_json).get("heads", [[0]]))
        keys = (ctypes.c_char_p * len(self.input_shapes))(*[k.encode() for k in self.input_shapes])
        indptr, dims = [0], []
        for shape in self.input_shapes.values():
            dims.extend(shape)
            indptr.append(len(dims))
        self._handle = PredictorHandle()
        # Keep the params buffer alive for the duration of the call; MXPredCreate copies it.
        params = ctypes.create_string_buffer(param_bytes, len(param_bytes))
        self._call("MXPredCreate", symbol_json.encode(), params, len(param_bytes), dev_type, dev_id,
                   len(self.input_shapes), keys, (mx_uint * len(indptr))(*indptr), (mx_uint * len(dims))(*dims),
                   ctypes.byref(self._handle))

    @classmethod
    def from_files(cls, symbol_file: Union[str, Path], params_file: Union[str, Path],
                   input_shapes: Dict[str, Sequence[int]], **kwargs) -> "CPredictor":
        """Create a predictor from a checkpoint's symbol JSON and params file, as C serving code does."""
        return cls(Path(symbol_file).read_text(encoding="utf-8"), Path(params_file).read_bytes(), input_shapes,
                   **kwargs)

    def _call(self, name: str, *args) -> None:
        if getattr(self._lib, name)(*args) != 0:
            raise CPredictError(f"{name}: {self._lib.MXGetLastError().decode(errors='replace').strip()}")

    def forward(self, **inputs: np.ndarray) -> List[np.ndarray]:
        """Set every input (float32, the shape given at creation), run forward, return all outputs."""
        if self._handle is None:
            raise CPredictError("predictor already freed")
        for name, value in inputs.items():
            if name not in self.input_shapes:
                raise KeyError(f"unknown input {name!r}; the predictor has {list(self.input_shapes)}")
            arr = np.ascontiguousarray(value, np.float32)
            if arr.shape != self.input_shapes[name]:
                raise ValueError(f"input {name!r} has shape {arr.shape}, the predictor was created for "
                                 f"{self.input_shapes[name]}")
            self._call("MXPredSetInput", self._handle, name.encode(),
                       arr.ctypes.data_as(ctypes.POINTER(mx_float)), arr.size)
        self._call("MXPredForward", self._handle)
        return [self.output(i) for i in range(self.num_outputs)]

    def output_shape(self, index: int = 0) -> Tuple[int, ...]:
        data, ndim = ctypes.POINTER(mx_uint)(), mx_uint()
        self._call("MXPredGetOutputShape", self._handle, index, ctypes.byref(data), ctypes.byref(ndim))
        return tuple(data[i] for i in range(ndim.value))

    def output(self, index: int = 0) -> np.ndarray:
        shape = self.output_shape(index)
        out = np.empty(shape, np.float32)
        self._call("MXPredGetOutput", self._handle, index, out.ctypes.data_as(ctypes.POINTER(mx_float)), out.size)
        return out

    def close(self) -> None:
        """MXPredFree; safe to call twice."""
        if self._handle is not None and self._handle.value:
            self._call("MXPredFree", self._handle)
        self._handle = None

    def __enter__(self) -> "CPredictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass
