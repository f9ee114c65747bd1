"""Gated DeltaNet in PyTorch: the chunked form (training, prefill) and the one-token step (decoding).

The recurrence (Yang, Kautz, Hatamizadeh 2024), per head, with q and k L2-normalised here:

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   a_t = exp(g_t),  g_t <= 0,  b_t in (0, 1)
    o_t = scale * q_t^T S_t                                   (state S [Dk, Dv], fp32)

Chunked (WY/UT) form. Inside a chunk starting from state S0, with G_t = sum_{s <= t} g_s (chunk-local),
write S_t = a_t S_{t-1} + k_t u_t^T. Unrolling gives the "pseudo values" u as a unit lower-triangular
system, (I + A) U = diag(b) V - diag(b exp(G)) K S0 with A_ij = b_i exp(G_i - G_j) (k_i . k_j) for j < i, so

    U     = Ut - W S0,            Ut = (I + A)^-1 diag(b) V,   W = (I + A)^-1 diag(b exp(G)) K
    O     = scale * ((Q exp(G)) S0 + (Q K^T * exp(G_i - G_j) * [j <= i]) U)
    S_end = exp(G_last) S0 + (K exp(G_last - G))^T U

Ut, W and the intra-chunk scores of all chunks are computed at once; only the short state recurrence
over chunks is sequential (``chunk_state_loop``; on GPU ``chunk_triton.py`` runs it as one Triton
kernel). Every exponent is <= 0, so nothing overflows. Computed in fp32 (fp64 for fp64 inputs) with any
outer autocast switched off; autograd goes through the PyTorch ops.

This file imports nothing but torch: an exported HF folder carries it as gated_delta_chunk.py.
Shapes: q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, g, beta ``[B, T, H]``, state ``[B, H, Dk, Dv]``; with
``cu_seqlens`` (packed, B == 1) the state restarts at each boundary and states are ``[N, H, Dk, Dv]``.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

CHUNK = 64
L2_EPS = 1e-6


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last axis (a zero vector, e.g. a padded token's k, stays zero)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_inputs(q, k, v, g, beta, initial_state=None, cu_seqlens=None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B, T, H, Dk] and v [B, T, H, Dv]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if g.shape != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(f"g and beta must be [B, T, H] = {list(q.shape[:3])} (one per token and head); got "
                         f"g {tuple(g.shape)}, beta {tuple(beta.shape)}")
    B, T, H, Dk = q.shape
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs a packed batch with B == 1; got B = {B}")
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != T:
            raise ValueError(f"cu_seqlens must start at 0 and end at T = {T}; got {cu_seqlens.tolist()}")
    n = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (n, H, Dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [{n}, {H}, {Dk}, {v.shape[-1]}]; got {tuple(initial_state.shape)}")


def segments(T: int, cu_seqlens) -> list:
    if cu_seqlens is None:
        return [(0, T)]
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def final_states(finals: list, output_final_state: bool) -> Optional[torch.Tensor]:
    """Final states are fp32 (fp64 when the inputs were fp64, so references stay exact)."""
    if not output_final_state:
        return None
    S = torch.cat(finals, 0)
    return S if S.dtype == torch.float64 else S.float()


def _chunked(q, k, v, g, beta, scale, S, chunk_size, chunk_loop):
    """One batch of sequences [B, T, H, *] (compute dtype, q and k normalised) from state S [B, H, Dk, Dv]."""
    B, T, H, Dk = q.shape
    pad = -T % chunk_size
    if pad:  # padded tokens (k = 0, g = 0, beta = 0) leave the state as it is
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    N, C = (T + pad) // chunk_size, chunk_size
    if N == 0:
        return v.new_zeros(B, 0, H, v.shape[-1]), S
    # [B, H, N, C, D] and [B, H, N, C]
    q, k, v = (x.transpose(1, 2).reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v))
    g, beta = (x.transpose(1, 2).reshape(B, H, N, C) for x in (g, beta))
    G = g.cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # exp of a future (positive) difference could overflow: mask before exponentiating
    decay = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")))  # [.., C, C]
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([v * beta[..., None], k * (beta * G.exp())[..., None]], -1)
    Ut, W = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True).split(
        [v.shape[-1], Dk], -1)
    scores = (q @ k.transpose(-1, -2)) * decay
    q_in = q * G.exp()[..., None]
    k_out = k * torch.exp(G[..., -1:] - G)[..., None]
    last = G[..., -1].exp()  # [B, H, N]
    o, S = chunk_loop(Ut, W, q_in, scores, k_out, last, S)
    o = scale * o.reshape(B, H, N * C, -1)[:, :, :T]
    return o.transpose(1, 2), S


def chunk_state_loop(Ut, W, q_in, scores, k_out, last, S):
    """The sequential part of the chunked form: chunk n, from the state S entering it, gives
    U = Ut - W S, its (unscaled) output q_in S + scores U and the state k_out^T U + last S leaving it.
    Ut ``[B, H, N, C, Dv]``, W, q_in, k_out ``[B, H, N, C, Dk]``, scores ``[B, H, N, C, C]``, last
    ``[B, H, N]``, S ``[B, H, Dk, Dv]`` -> (o ``[B, H, N, C, Dv]``, final S). A loop of small matmuls:
    ``chunk_triton.py`` runs it as one kernel."""
    outs = []
    for n in range(Ut.shape[2]):
        U = Ut[:, :, n] - W[:, :, n] @ S
        outs.append(q_in[:, :, n] @ S + scores[:, :, n] @ U)
        S = last[:, :, n, None, None] * S + k_out[:, :, n].transpose(-1, -2) @ U
    return torch.stack(outs, 2), S


def chunk_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    chunk_size: int = CHUNK, chunk_loop=None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(o ``[B, T, H, Dv]`` in v's dtype, final state or None), any T. ``chunk_loop`` replaces
    ``chunk_state_loop`` (same arguments and results), e.g. with the Triton kernel."""
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    # an outer autocast (the trainer's bf16) would run the matmuls below in bf16: keep them in fp32
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                       chunk_size, chunk_loop or chunk_state_loop)


def _chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                            chunk_loop):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    ct, out_dtype = compute_dtype(q), v.dtype
    q, k = (l2_normalize(x.to(ct)) for x in (q, k))
    v, g, beta = (x.to(ct) for x in (v, g, beta))
    outs, finals = [], []
    for n, (start, end) in enumerate(segments(T, cu_seqlens)):
        rows = B if cu_seqlens is None else 1
        if initial_state is None:
            S = q.new_zeros(rows, H, Dk, Dv)
        else:
            S = (initial_state if cu_seqlens is None else initial_state[n : n + 1]).to(ct)
        o, S = _chunked(q[:, start:end], k[:, start:end], v[:, start:end], g[:, start:end], beta[:, start:end],
                        scale, S, chunk_size, chunk_loop)
        outs.append(o)
        finals.append(S)
    return torch.cat(outs, 1).to(out_dtype), final_states(finals, output_final_state)


def check_step_inputs(q, k, v, g, beta, state) -> None:
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2] \
            or state.shape != (*q.shape, v.shape[-1]) or g.shape != q.shape[:2] or beta.shape != q.shape[:2]:
        raise ValueError(f"step expects q, k [B, H, Dk], v [B, H, Dv], g, beta [B, H], state [B, H, Dk, Dv]; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
                         f"beta {tuple(beta.shape)}, state {tuple(state.shape)}")


def gated_delta_rule_step(q, k, v, g, beta, state, scale=None):
    """One decode token: q, k ``[B, H, Dk]``, v ``[B, H, Dv]``, g, beta ``[B, H]``, state ``[B, H, Dk, Dv]``
    (fp32). Returns (o ``[B, H, Dv]``, new state): S' = a S + k (b (v - k^T a S))^T, o = scale q^T S'."""
    check_step_inputs(q, k, v, g, beta, state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = compute_dtype(state)
    with torch.autocast(device_type=q.device.type, enabled=False):  # fp32 state math under an outer autocast
        q, k = (l2_normalize(x.to(ct)) for x in (q, k))
        S = g.to(ct).exp()[..., None, None] * state.to(ct)
        u = beta.to(ct)[..., None] * (v.to(ct) - torch.einsum("bhk,bhkv->bhv", k, S))
        S = S + k[..., :, None] * u[..., None, :]
        o = scale * torch.einsum("bhk,bhkv->bhv", q, S)
    return o.to(v.dtype), S.to(state.dtype)
