"""Gated DeltaNet: the chunked PyTorch form for training and prefill, the one-token step for decoding
(``chunk.py``), both tested against the token-by-token reference (``naive.py``)."""

from .chunk import chunk_gated_delta_rule, gated_delta_rule_step
from .naive import gated_delta_rule_recurrent_ref


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """(o, final_state) for q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, g, beta ``[B, T, H]``; see ``chunk.py``."""
    return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


__all__ = ["chunk_gated_delta_rule", "gated_delta_rule", "gated_delta_rule_recurrent_ref", "gated_delta_rule_step"]
