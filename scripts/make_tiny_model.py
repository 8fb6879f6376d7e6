"""Write a tiny random Llama 4 checkpoint (Hugging Face layout) with transformers, for trying herd out.

    python scripts/make_tiny_model.py OUT_DIR [--seed 0]

The model has the real 202,048-token vocabulary (so the real Llama 4 tokenizer fits) but a 64-wide,
4-layer body with 4 experts: it loads in a second and produces random text. It is what the README's quick
start runs until a trained model is bundled.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(
        vocab_size=202048,
        hidden_size=64,
        intermediate_size=128,
        intermediate_size_mlp=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        attention_chunk_size=8192,
        bos_token_id=200000,
        eos_token_id=[200001, 200007, 200008],
        pad_token_id=200018,
    )
    torch.manual_seed(args.seed)
    model = Llama4ForCausalLM(config)
    model.save_pretrained(args.out)
    print(f"wrote a tiny random Llama 4 checkpoint to {args.out}")


if __name__ == "__main__":
    main()
