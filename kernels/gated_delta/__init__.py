"""Gated DeltaNet: the chunked PyTorch form for training and prefill, the one-token step for decoding
(``chunk.py``), both tested against the token-by-token reference (``naive.py``); on GPU the chunked form's
loop over chunks runs as a Triton kernel (``chunk_triton.py``)."""

import os

import torch

from .chunk import chunk_gated_delta_rule, gated_delta_rule_step
from .naive import gated_delta_rule_recurrent_ref


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """(o, final_state) for q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, g, beta ``[B, T, H]``; see ``chunk.py``."""
    return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                  chunk_loop=_triton_chunk_loop(q))


# HYPENET_GATED_DELTA_LOOP=pytorch keeps chunk.py's PyTorch loop on CUDA too: a way around a Triton build that
# miscompiles the kernel (as fla's gated kernels are on triton 3.6 + Hopper) without changing code
LOOP_ENV = "HYPENET_GATED_DELTA_LOOP"


def _triton_chunk_loop(q):
    """The Triton chunk loop for CUDA inputs, else None (chunk.py's PyTorch loop). fp64 inputs keep the PyTorch
    loop (the kernel computes in fp32), as do key heads wider than the kernel was built for."""
    choice = os.environ.get(LOOP_ENV, "triton")
    if choice not in ("triton", "pytorch"):
        raise ValueError(f"{LOOP_ENV} must be 'triton' or 'pytorch'; got {choice!r}")
    if choice == "pytorch" or not q.is_cuda or q.dtype == torch.float64:
        return None
    try:
        from .chunk_triton import MAX_HEAD_DIM, chunk_state_loop_for
    except ImportError:  # no Triton
        return None
    if q.shape[-1] > MAX_HEAD_DIM:
        return None
    return chunk_state_loop_for(q.dtype)


__all__ = ["chunk_gated_delta_rule", "gated_delta_rule", "gated_delta_rule_recurrent_ref", "gated_delta_rule_step"]
