"""Training herd's own Llama 4 modules: data streams, the training loop, export, and the demo model recipe."""

from .data import (
    IGNORE,
    MixedBatches,
    PackedChat,
    RandomWindows,
    chat_eval_batches,
    encode_chat,
    encode_documents,
    fixed_windows,
    load_stream,
    read_chat_jsonl,
    read_documents,
    save_stream,
    unigram_cross_entropy,
)
from .export import export_hf, hf_config_dict
from .trainer import (
    RouterWatch,
    TrainConfig,
    Trainer,
    causal_lm_loss,
    load_balancing_loss,
    lr_at,
    select_trainable,
    utilisation_summary,
)

__all__ = [
    "IGNORE",
    "MixedBatches",
    "PackedChat",
    "RandomWindows",
    "RouterWatch",
    "TrainConfig",
    "Trainer",
    "causal_lm_loss",
    "chat_eval_batches",
    "encode_chat",
    "encode_documents",
    "export_hf",
    "fixed_windows",
    "hf_config_dict",
    "load_balancing_loss",
    "load_stream",
    "lr_at",
    "read_chat_jsonl",
    "read_documents",
    "save_stream",
    "select_trainable",
    "unigram_cross_entropy",
    "utilisation_summary",
]
