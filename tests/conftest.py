"""Shared fixtures. Each area keeps its own fixtures in its test module or a tests/_*.py helper."""
import os

import symbols.mxnet_compat  # noqa: F401  before any test module imports mxnet (numpy 1.24+ on Python 3.12)

# Tests run on CPU; keep MXNet from spawning more engine threads than the 2-core CI machine has.
os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
