"""IrisNet and its parts: encoder, task encoder, two-way transformer and mask decoder."""

from .iris_net import IrisNet, build_iris_net

__all__ = ["IrisNet", "build_iris_net"]
