"""Shared tooling: the Caffe converter, verification against OpenCV, deployment, launch and demo."""
import symbols.mxnet_compat  # noqa: F401  numpy aliases MXNet 1.9.1 needs, before any `import mxnet`
