"""Tiny Qwen3 teachers built locally (no downloads): for tests, demos and the embedded default job."""

import os
from typing import Optional

import torch


def tiny_qwen3_config(vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 4, heads: int = 4,
                      kv_heads: int = 2, head_dim: int = 16, ffn: int = 128, tie: bool = True,
                      max_position_embeddings: int = 4096, eos_token_id: Optional[int] = None,
                      rope_theta: float = 10000.0):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=ffn, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, attention_bias=False,
        # no pad_token_id, as in Qwen3's own configs: HF zeroes that token's embedding row (padding_idx), and with
        # pad = EOS every document boundary fed an all-zero hidden state, whose RMSNorm gradients reached 1e19 in a
        # 12-layer random student (seen in tools/bench_cuda_graph.py). Padding is the tokenizer's business.
        eos_token_id=eos_token_id, bos_token_id=eos_token_id, pad_token_id=None,
    )


def save_random_qwen3(out_dir: str, seed: int = 0, tokenizer_dir: Optional[str] = None, **config_kwargs) -> str:
    """A randomly initialised tiny Qwen3 saved as an HF folder (safetensors)."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config(**config_kwargs)).eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_dir is not None:
        from .convert import copy_tokenizer

        copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir
