"""Tiny random-weight models of every family, built offline; see :func:`build_tiny_models`."""

from inference_server.engine.tiny.build import FAMILIES, build_tiny_models

__all__ = ["FAMILIES", "build_tiny_models"]
