"""Readable PyTorch references for Lightning Attention.

Lightning Attention is linear attention with a fixed, data-independent decay per head:

    S_t = exp(-slope_h) * S_{t-1} + k_t^T v_t          (state [Dk, Dv], fp32)
    o_t = scale * q_t S_t

Every fast kernel in this package is tested against these functions. They compute in
float32 (or float64 when given float64 inputs) and run on any device.

Shapes: q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, slopes ``[H]`` (positive),
state ``[B, H, Dk, Dv]``. With ``cu_seqlens`` (packed variable-length batch, B == 1) the
state restarts at each sequence boundary and states are per sequence: ``[N, H, Dk, Dv]``.
"""

import math
from typing import Optional, Tuple

import torch


def lightning_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes: for a power of two H, m_h = 2^(-8 (h + 1) / H); otherwise the slopes of
    the closest smaller power of two followed by every other slope of the next one."""

    def power_of_two(n):
        start = 2 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        n = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(n) + power_of_two(2 * n)[0::2][: num_heads - n]
    return torch.tensor(slopes, dtype=torch.float32)


def _check(q, k, v, slopes, initial_state, cu_seqlens):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape; got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must match q in [B, T, H]; got {tuple(v.shape)} vs {tuple(q.shape)}")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if slopes.shape != (H,):
        raise ValueError(f"slopes must have shape [{H}] (one per head); got {tuple(slopes.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs a packed batch with B == 1; got B = {B}")
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != T:
            raise ValueError(f"cu_seqlens must start at 0 and end at T = {T}; got {cu_seqlens.tolist()}")
    n = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (n, H, Dk, Dv):
        raise ValueError(f"initial_state must be [{n}, {H}, {Dk}, {Dv}]; got {tuple(initial_state.shape)}")


def _segments(T, cu_seqlens):
    if cu_seqlens is None:
        return [(0, T)]
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lightning_attention_recurrent_ref(
    q, k, v, slopes, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token-by-token recurrence: the definition itself, O(T) sequential steps."""
    _check(q, k, v, slopes, initial_state, cu_seqlens)
    B, T, H, Dk = q.shape
    scale = Dk**-0.5 if scale is None else scale
    ct = _compute_dtype(q)
    decay = torch.exp(-slopes.to(ct))[None, :, None, None]
    o = torch.empty(v.shape, dtype=ct, device=v.device)
    finals = []
    for n, (start, end) in enumerate(_segments(T, cu_seqlens)):
        if initial_state is None:
            S = torch.zeros(B if cu_seqlens is None else 1, H, Dk, v.shape[-1], dtype=ct, device=q.device)
        else:
            S = (initial_state if cu_seqlens is None else initial_state[n : n + 1]).to(ct)
        for t in range(start, end):
            S = decay * S + k[:, t, :, :, None].to(ct) * v[:, t, :, None, :].to(ct)
            o[:, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, t].to(ct), S)
        finals.append(S)
    return o.to(v.dtype), _final(finals, output_final_state)


def _final(finals, output_final_state):
    """Final states are fp32 (fp64 when the inputs were fp64, so references stay exact)."""
    if not output_final_state:
        return None
    S = torch.cat(finals, 0)
    return S if S.dtype == torch.float64 else S.float()


def lightning_attention_chunk_ref(
    q, k, v, slopes, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunked form: exact within-chunk attention with decay weights plus an inter-chunk state.

    For a chunk starting from state S0, with positions i, j inside the chunk:
        o_i   = scale * (exp(-m (i+1)) q_i S0 + sum_{j<=i} exp(-m (i-j)) (q_i . k_j) v_j)
        S_end = exp(-m C) S0 + sum_j exp(-m (C-1-j)) k_j^T v_j
    This is the form the Triton kernel implements; it is differentiable end to end.
    """
    _check(q, k, v, slopes, initial_state, cu_seqlens)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    ct = _compute_dtype(q)
    m = slopes.to(device=q.device, dtype=ct)
    outs, finals = [], []
    for n, (start, end) in enumerate(_segments(T, cu_seqlens)):
        if initial_state is None:
            S = torch.zeros(q.shape[0] if cu_seqlens is None else 1, H, Dk, Dv, dtype=ct, device=q.device)
        else:
            S = (initial_state if cu_seqlens is None else initial_state[n : n + 1]).to(ct)
        for c0 in range(start, end, chunk_size):
            c1 = min(c0 + chunk_size, end)
            C = c1 - c0
            qc, kc, vc = (x[:, c0:c1].to(ct).transpose(1, 2) for x in (q, k, v))  # [B, H, C, D]
            idx = torch.arange(C, device=q.device, dtype=ct)
            diff = idx[:, None] - idx[None, :]
            causal = diff >= 0
            # exp of a masked (future) difference would overflow; mask before exponentiating
            w = torch.exp(-m[:, None, None] * diff.clamp(min=0)) * causal  # [H, C, C]
            scores = qc @ kc.transpose(-1, -2) * w
            inter = torch.exp(-m[:, None] * (idx + 1))[..., None] * (qc @ S)  # [B, H, C, Dv]
            outs.append((scale * (scores @ vc + inter)).transpose(1, 2))
            k_decay = torch.exp(-m[:, None] * (C - 1 - idx))[..., None]  # [H, C, 1]
            S = torch.exp(-m * C)[:, None, None] * S + (kc * k_decay).transpose(-1, -2) @ vc
        finals.append(S)
    o = torch.cat(outs, 1) if outs else v.new_zeros(v.shape, dtype=ct)
    return o.to(v.dtype), _final(finals, output_final_state)


def lightning_attention_step_ref(q, k, v, slopes, state, scale=None):
    """One decode token: q, k ``[B, H, Dk]``, v ``[B, H, Dv]``, state ``[B, H, Dk, Dv]`` (fp32).
    Returns (o ``[B, H, Dv]``, new_state)."""
    if q.dim() != 3 or state.dim() != 4 or state.shape[:3] != q.shape or state.shape[-1] != v.shape[-1]:
        raise ValueError(
            f"step expects q, k [B, H, Dk], v [B, H, Dv], state [B, H, Dk, Dv]; got q {tuple(q.shape)}, "
            f"v {tuple(v.shape)}, state {tuple(state.shape)}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = _compute_dtype(state)
    decay = torch.exp(-slopes.to(device=q.device, dtype=ct))[None, :, None, None]
    new_state = decay * state.to(ct) + k.to(ct)[..., :, None] * v.to(ct)[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q.to(ct), new_state)
    return o.to(v.dtype), new_state.to(state.dtype)
