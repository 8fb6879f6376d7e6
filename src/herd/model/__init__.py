"""Llama 4 as torch modules built from one Config."""

from .text import Llama4TextModel

__all__ = ["Llama4TextModel"]
