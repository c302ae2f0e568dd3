"""Lets MXNet 1.9.1 import on numpy 1.24+, which Python 3.12 needs (numpy 1.23 has no 3.12 wheel).

MXNet 1.9.1 still uses numpy's aliases of the builtin types (`np.bool`, `np.int`, ...), deprecated in numpy 1.20
and removed in 1.24; on 1.26 `import mxnet` fails with an AttributeError. The aliases named exactly the builtins,
so putting them back changes nothing else. On numpy 1.23.5 (Python 3.8-3.11) they still exist and nothing is set.

It must run before `import mxnet`: the packages whose modules import mxnet (symbols, train, tools, bench) import it
in their `__init__.py`, which Python runs before any of their modules, and tests/conftest.py does for the tests.
A script of your own that imports mxnet before any of ours needs `import symbols.mxnet_compat` first.
"""
from __future__ import annotations

import sys
import types
import warnings
from typing import List

import numpy

# What a process that only imports mxnet runs (`python -c IMPORT_MXNET`: a ps-lite scheduler or server, whose loop
# runs inside the import), the aliases first.
IMPORT_MXNET = "import symbols.mxnet_compat; import mxnet"
REMOVED_ALIASES = {"bool": bool, "int": int, "float": float, "complex": complex, "object": object, "str": str}


def restore_numpy_aliases(np: types.ModuleType = numpy) -> List[str]:
    """Set each alias `np` lacks to its builtin; returns the names set (none on numpy < 1.24)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy 1.20-1.23 warns when a deprecated alias is looked up
        missing = sorted(name for name in REMOVED_ALIASES if not hasattr(np, name))
    for name in missing:
        setattr(np, name, REMOVED_ALIASES[name])
    return missing


def stock_script(path) -> List[str]:
    """The command that runs a stock MXNet script as `python SCRIPT` does (the wheel's im2rec.py, convert_model.py),
    after restore_numpy_aliases; append the script's arguments. The child imports this module, so this repository
    must be on its path (the venv's .pth, or PYTHONPATH)."""
    return [sys.executable, "-c", "import runpy, sys; import symbols.mxnet_compat; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')", str(path)]


restore_numpy_aliases()
