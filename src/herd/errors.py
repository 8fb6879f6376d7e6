"""Errors raised for bad input. Each carries a one-line message naming the file/field and what was expected.

The CLI prints ``str(err)`` and exits 1; library users catch ``HerdError``.
"""

from __future__ import annotations


class HerdError(Exception):
    """Base class of every error herd raises for bad input (files, configs, requests)."""


class ConfigError(HerdError):
    """A config.json / GGUF metadata / preset is missing, malformed or not Llama 4."""


class WeightsError(HerdError):
    """A checkpoint file is missing, truncated, corrupt, or lacks / mis-shapes a tensor."""


class MissingTensorError(WeightsError):
    """A tensor the model needs is not in the checkpoint."""


class ShapeMismatchError(WeightsError):
    """A tensor in the checkpoint has a shape other than the config implies."""


class FormatError(WeightsError):
    """A file is not in the format it claims to be (bad magic, unknown type id, data past end...)."""


class TokenizerError(HerdError):
    """A tokenizer file is missing or malformed, or a token is unknown."""


class ContextOverflowError(HerdError):
    """The prompt plus the requested tokens do not fit in the context window."""


class RequestError(HerdError):
    """A generation request has invalid parameters (sampling values, messages, ...)."""
