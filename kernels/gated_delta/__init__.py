"""Gated DeltaNet: the chunked PyTorch form for training and prefill, the one-token step for decoding
(``chunk.py``), both tested against the token-by-token reference (``naive.py``); on GPU the chunked form's
loop over chunks runs as a Triton kernel (``chunk_triton.py``), and so does the step (``fused_recurrent.py``)."""

import os

import torch

from . import chunk
from .chunk import chunk_gated_delta_rule
from .naive import gated_delta_rule_recurrent_ref


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """(o, final_state) for q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, g, beta ``[B, T, H]``; see ``chunk.py``."""
    return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                  chunk_loop=_triton_chunk_loop(q))


def gated_delta_rule_step(q, k, v, g, beta, state, scale=None):
    """One decode token: q, k ``[B, H, Dk]``, v ``[B, H, Dv]``, g, beta ``[B, H]``, state ``[B, H, Dk, Dv]`` -> (o,
    new state); the Triton step on GPU (``fused_recurrent.py``), ``chunk.py``'s PyTorch step elsewhere."""
    if _use_triton(q):
        from .fused_recurrent import fused_recurrent_gated_delta_step

        return fused_recurrent_gated_delta_step(q, k, v, g, beta, state, scale)
    return chunk.gated_delta_rule_step(q, k, v, g, beta, state, scale)


def gated_delta_rule_affine(q, k, v, g, beta, scale=None):
    """The op as a function of the state S entering the sequence (context parallelism runs it per rank):
    (o0, qM, S0, M) with outputs o0 + qM @ S and final state M @ S + S0. M_t, the product of the first t
    transitions a (I - b k k^T), is what a run from the state [0 | I] on the values [v | 0] carries in its
    identity columns, so one run gives all four: o0 ``[B, T, H, Dv]`` and qM ``[B, T, H, Dk]`` (fp32, so
    that qM meets S before any rounding), S0 ``[B, H, Dk, Dv]`` and M ``[B, H, Dk, Dk]``."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    eye = torch.eye(Dk, device=q.device, dtype=ct).expand(B, H, Dk, Dk)
    start = torch.cat([eye.new_zeros(B, H, Dk, Dv), eye], -1)
    values = torch.cat([v.to(ct), v.new_zeros(B, T, H, Dk, dtype=ct)], -1)
    o, final = gated_delta_rule(q, k, values, g, beta, scale, initial_state=start, output_final_state=True)
    return o[..., :Dv], o[..., Dv:], final[..., :Dv], final[..., Dv:]


def entering_state(S0, M, index):
    """The state entering sequence piece ``index`` of consecutive pieces that each started from zero, from
    their stacked ``S0`` ``[P, B, H, Dk, Dv]`` and ``M`` ``[P, B, H, Dk, Dk]`` (gated_delta_rule_affine):
    S_{j+1} = M_j S_j + S0_j from S_0 = 0. Pieces at or after ``index`` enter with weight 0 rather than being
    left out, so every piece is in the autograd graph (an all-gather's backward must run on every rank)."""
    S = torch.zeros_like(S0[0])
    for j in range(S0.shape[0]):
        keep = float(j < index)
        S = S + keep * (M[j] @ S + S0[j] - S)
    return S


# HYPENET_GATED_DELTA_LOOP=pytorch keeps chunk.py's PyTorch chunk loop and step on CUDA too: a way around a Triton
# build that miscompiles the kernels (as fla's gated kernels are on triton 3.6 + Hopper) without changing code
LOOP_ENV = "HYPENET_GATED_DELTA_LOOP"


def triton_chosen() -> bool:
    """LOOP_ENV's choice: True for 'triton' (the default), False for 'pytorch'."""
    choice = os.environ.get(LOOP_ENV, "triton")
    if choice not in ("triton", "pytorch"):
        raise ValueError(f"{LOOP_ENV} must be 'triton' or 'pytorch'; got {choice!r}")
    return choice == "triton"


def _use_triton(q) -> bool:
    """Whether q's op runs a Triton kernel: CUDA inputs, not fp64 (the kernels compute in fp32), Triton importable,
    and LOOP_ENV not 'pytorch'."""
    if not triton_chosen() or not q.is_cuda or q.dtype == torch.float64:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_chunk_loop(q):
    """The Triton chunk loop for inputs `_use_triton` accepts, else None (chunk.py's PyTorch loop); key heads wider
    than the kernel was built for keep the PyTorch loop too."""
    if not _use_triton(q):
        return None
    try:
        from .chunk_triton import MAX_HEAD_DIM, chunk_state_loop_for
    except ImportError:  # no Triton
        return None
    if q.shape[-1] > MAX_HEAD_DIM:
        return None
    return chunk_state_loop_for(q.dtype)


__all__ = ["chunk_gated_delta_rule", "gated_delta_rule", "gated_delta_rule_recurrent_ref", "gated_delta_rule_step"]
