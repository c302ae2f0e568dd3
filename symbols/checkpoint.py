"""The one home of MXNet checkpoint files: their names, loading, saving and listing.

A checkpoint is what `mx.model.save_checkpoint` writes and `mx.model.load_checkpoint` reads:
`PREFIX-symbol.json` plus `PREFIX-NNNN.params`, an NDArray file whose keys are `arg:NAME` / `aux:NAME`;
the trainer adds `PREFIX-NNNN.states` (optimizer state). Every writer here publishes atomically (temporary
file, then rename), so a killed run never leaves a file that looks complete; inside a recbuild.publish
publication the files join its set instead. Readers here settle the prefix first (recbuild.publish.settle), so
they never see half of a set a killed writer committed. The converter, the trainer, the recipes, the predictor,
deployment and the demo all go through these functions, so their file names and their error messages cannot
drift apart.

Optimizer state is saved as an NDArray file (`mx.nd.save`: arrays only, nothing in it can run code) holding
the updater's state arrays plus a `__layout__` array with the JSON that puts them back together (parameter
index -> None, an array, or a tuple/list of them). MXNet's own `.states` is a pickle (`Updater.get_states`),
which runs whatever code the file names when loaded: such a file is loaded only when the caller trusts it
(`--trust-states`).
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import mxnet as mx
import numpy as np

from recbuild.atomic import atomic_path
from recbuild.publish import settle

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
    settle(prefix)
    pattern = re.compile(re.escape(name) + r"-(\d{%d})\.params" % _EPOCH_DIGITS)
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name)))


def latest_epoch(prefix: PathLike) -> int:
    """The highest N of the `PREFIX-NNNN.params` files; CheckpointError when there is none."""
    epochs = list_epochs(prefix)
    if not epochs:
        raise CheckpointError(f"{prefix}-NNNN.params: no checkpoint found")
    return epochs[-1]


def resolve_epoch(prefix: PathLike, text: str) -> int:
    """An EPOCH argument (train.predict, tools.deploy): a number, or 'latest' (the highest PREFIX-NNNN.params)."""
    if text == "latest":
        return latest_epoch(prefix)
    if text.isdigit():
        return int(text)
    raise CheckpointError(f"epoch {text!r}: expected a number or 'latest'")


def load_checkpoint(prefix: PathLike, epoch: int, what: str = "checkpoint"
                    ) -> Tuple[mx.sym.Symbol, Dict[str, mx.nd.NDArray], Dict[str, mx.nd.NDArray]]:
    """`mx.model.load_checkpoint`, with one-line errors naming the missing or unreadable file.

    Args:
        prefix / epoch: as for mx.model.load_checkpoint.
        what: what the caller loads ("pretrained", "resume", ...), said in the error.
    """
    settle(prefix)
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


# ---- optimizer state without pickle -----------------------------------------------------------------------------
STATES_FORMAT = "mxtransfer.optimizer-states/1"
_LAYOUT_KEY = "__layout__"
_NDARRAY_FILE_MAGIC = struct.pack("<Q", 0x112)  # what every mx.nd.save file starts with


def _updater(module: mx.mod.Module):
    """The Updater holding a Module's optimizer state (the kvstore's when it updates there)."""
    # Module keeps these private; its own save/load_optimizer_states read them the same way.
    updater = module._kvstore._updater if module._update_on_kvstore else module._updater  # noqa: SLF001
    if updater is None:
        raise CheckpointError("the optimizer state lives on the kvstore servers and cannot be checkpointed")
    return updater


def save_optimizer_states(module: mx.mod.Module, path: PathLike) -> Path:
    """Write the Module's optimizer state to `path` as an NDArray file (see the module docstring), atomically."""
    arrays: Dict[str, mx.nd.NDArray] = {}

    def encode(value):
        if value is None:
            return None
        if isinstance(value, mx.nd.NDArray):
            name = f"s{len(arrays)}"
            # mx.nd.save writes a CPU array straight from its memory; copyto(cpu) would hold a second copy of the
            # whole state (528 MB for VGG16's momentum) until the file is written.
            arrays[name] = value if value.context.device_type == "cpu" else value.copyto(mx.cpu())
            return {"nd": name}
        if isinstance(value, (tuple, list)):
            return {"tuple" if isinstance(value, tuple) else "list": [encode(v) for v in value]}
        if isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise CheckpointError(f"{path}: cannot save an optimizer state of type {type(value).__name__}")

    entries = [{"key": key, "state": encode(state)} for key, state in _updater(module).states.items()]
    layout = json.dumps({"format": STATES_FORMAT, "states": entries}).encode("utf-8")
    arrays[_LAYOUT_KEY] = mx.nd.array(np.frombuffer(layout, np.uint8), dtype=np.uint8)
    with atomic_path(path) as tmp:
        mx.nd.save(str(tmp), arrays)
    return Path(path)


def read_optimizer_states(path: PathLike) -> Dict[object, object]:
    """The {parameter index: state} dictionary of a `.states` file of ours (NDArrays on the CPU).

    Raises:
        CheckpointError: the file is not one of ours (a pickle says so and names --trust-states) or is damaged.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(len(_NDARRAY_FILE_MAGIC))
    if head != _NDARRAY_FILE_MAGIC:
        kind = "a pickle (MXNet's own format)" if head[:1] == b"\x80" else "not an NDArray file"
        raise CheckpointError(f"{path}: optimizer state is {kind}; a pickle can run code when loaded, so it is "
                              f"not loaded; if this checkpoint folder is yours and trusted, pass --trust-states")
    try:
        arrays = mx.nd.load(str(path))
        layout = json.loads(bytes(arrays.pop(_LAYOUT_KEY).asnumpy().astype(np.uint8)).decode("utf-8"))
        if not isinstance(arrays, dict) or layout.get("format") != STATES_FORMAT:
            raise ValueError(f"format {layout.get('format')!r}")

        def decode(node):
            if node is None:
                return None
            if "nd" in node:
                return arrays[node["nd"]]
            if "tuple" in node:
                return tuple(decode(v) for v in node["tuple"])
            if "list" in node:
                return [decode(v) for v in node["list"]]
            return node["value"]
        return {entry["key"]: decode(entry["state"]) for entry in layout["states"]}
    except (mx.base.MXNetError, KeyError, ValueError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: damaged optimizer state ({first[:200]})") from None


def load_optimizer_states(module: mx.mod.Module, path: PathLike, trust_pickle: bool = False) -> None:
    """Load `path` into the Module's optimizer: our NDArray format; MXNet's pickle only with `trust_pickle`."""
    if trust_pickle:
        with open(path, "rb") as handle:
            if handle.read(len(_NDARRAY_FILE_MAGIC)) != _NDARRAY_FILE_MAGIC:
                module.load_optimizer_states(str(path))  # the caller vouched for the file (--trust-states)
                return
    states = read_optimizer_states(path)
    updater = _updater(module)
    updater.states = states
    updater.states_synced = dict.fromkeys(states, False)  # moved to each weight's device on first use
