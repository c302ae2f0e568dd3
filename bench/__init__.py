"""Benchmarks: ratios against a baseline measured in the same run (python -m bench.pack|convert|train)."""
import symbols.mxnet_compat  # noqa: F401  numpy aliases MXNet 1.9.1 needs, before any `import mxnet`
