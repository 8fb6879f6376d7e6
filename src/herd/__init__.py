"""herd: run, quantize, fine-tune and serve Llama 4 models.

Public API: ``herd.load``, ``herd.LLM``, ``herd.Config``, ``herd.HerdError`` (and its subclasses).
"""

from .config import Config, VisionConfig
from .errors import (
    ConfigError,
    ContextOverflowError,
    FormatError,
    HerdError,
    MissingTensorError,
    RequestError,
    ShapeMismatchError,
    TokenizerError,
    WeightsError,
)
from .llm import LLM, load

__version__ = "0.1.0"

__all__ = [
    "load",
    "LLM",
    "Config",
    "VisionConfig",
    "HerdError",
    "ConfigError",
    "WeightsError",
    "MissingTensorError",
    "ShapeMismatchError",
    "FormatError",
    "TokenizerError",
    "ContextOverflowError",
    "RequestError",
]
