"""Quality measurements against text: perplexity (llama-perplexity's chunking and scoring), and KL divergence
from a base model's distributions, with the base pass kept in memory so it serves many models."""

from .kld import BaseRun, base_run, compare, kld_stats, token_kld
from .perplexity import chunk_tokens, perplexity, read_text, scored_logprobs, text_chunks

__all__ = ["perplexity", "read_text", "chunk_tokens", "text_chunks", "scored_logprobs", "BaseRun", "base_run",
           "compare", "kld_stats", "token_kld"]
