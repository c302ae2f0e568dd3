"""Shared tooling: the Caffe converter, verification against OpenCV, deployment, launch and demo."""
