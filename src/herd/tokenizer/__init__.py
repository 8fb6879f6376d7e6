"""Tokenizer (tiktoken file or tokenizer.json) and the Llama 4 chat format."""

from .chat import ChatFormat, parse_tool_calls, render_jinja_template
from .tokenizer import StreamDecoder, Tokenizer

__all__ = ["Tokenizer", "StreamDecoder", "ChatFormat", "parse_tool_calls", "render_jinja_template"]
