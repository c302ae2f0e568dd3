"""Network symbols, the preprocessing sidecar that travels with every checkpoint, the class-name rule
(symbols/classes.py: which file names a model's classes) and head surgery."""
from symbols import mxnet_compat  # noqa: F401  numpy aliases MXNet 1.9.1 needs, before any `import mxnet`
