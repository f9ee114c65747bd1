"""One decode step of Lightning Attention in Triton (see ``naive.py``):

    S' = exp(-slope_h) S + k^T v ;  o = scale * q S'

The step reads and writes the fp32 state once, so it is bound by memory bandwidth: one program
per (batch, head, value tile) keeps a [Dk, BV] state tile in registers.
"""

import torch
import triton
import triton.language as tl

from .. import triton_utils


@triton.jit
def _step_kernel(q_ptr, k_ptr, v_ptr, s_ptr, o_ptr, s_out_ptr, slopes_ptr, scale, H, DK, DV,
                 BK: tl.constexpr, BV: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mk = o_k < DK
    mv = o_v < DV
    s_off = i_bh.to(tl.int64) * DK * DV + o_k[:, None] * DV + o_v[None, :]
    s_mask = mk[:, None] & mv[None, :]
    state = tl.load(s_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + i_bh * DK + o_k, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + i_bh * DK + o_k, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + i_bh * DV + o_v, mask=mv, other=0.0).to(tl.float32)
    decay = tl.exp(-tl.load(slopes_ptr + i_h).to(tl.float32))
    state = decay * state + k[:, None] * v[None, :]
    tl.store(s_out_ptr + s_off, state.to(s_out_ptr.dtype.element_ty), mask=s_mask)
    o = tl.sum(q[:, None] * state, axis=0) * scale
    tl.store(o_ptr + i_bh * DV + o_v, o.to(o_ptr.dtype.element_ty), mask=mv)


def fused_recurrent_lightning_step(q, k, v, slopes, state, scale=None, out_state=None):
    """q, k ``[B, H, Dk]``, v ``[B, H, Dv]``, state ``[B, H, Dk, Dv]`` -> (o ``[B, H, Dv]``, new state).

    The new state is a fresh tensor of ``state``'s dtype, or ``out_state`` if given (which may be
    ``state`` itself: each program reads its tile before writing it, so in place is safe)."""
    if q.dim() != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2] or state.shape != (*q.shape, v.shape[-1]):
        raise ValueError(f"step expects q, k [B, H, Dk], v [B, H, Dv], state [B, H, Dk, Dv]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, state {tuple(state.shape)}")
    B, H, DK = q.shape
    DV = v.shape[-1]
    scale = DK**-0.5 if scale is None else float(scale)
    q, k, v, state = (x.contiguous() for x in (q, k, v, state))
    slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
    o = triton_utils.empty((B, H, DV), v.dtype, v.device)
    if out_state is None:
        new_state = triton_utils.empty(state.shape, state.dtype, state.device)
    elif out_state.shape != state.shape or not out_state.is_contiguous():
        raise ValueError(f"out_state must be a contiguous {tuple(state.shape)} tensor")
    else:
        new_state = out_state
    bk = max(16, triton.next_power_of_2(DK))
    # A [Dk, BV] fp32 tile of 8-16 KB per program: enough programs to fill the GPU at batch 1.
    bv = min(max(16, triton.next_power_of_2(DV)), max(16, 4096 // bk))
    if B * H:
        _step_kernel[(triton.cdiv(DV, bv), B * H)](q, k, v, state, o, new_state, slopes, scale, H, DK, DV,
                                                   BK=bk, BV=bv, num_warps=4)
    return o, new_state
