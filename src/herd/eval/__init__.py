"""Quality measurements against text: perplexity, and KL divergence from a reference model's distributions."""

from .kld import BaseRun, base_run, compare
from .perplexity import perplexity, read_text, text_chunks

__all__ = ["perplexity", "read_text", "text_chunks", "BaseRun", "base_run", "compare"]
