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
    q, k, v, state, s_off, s_mask, o_v, mv, i_bh = triton_utils.load_step_tile(q_ptr, k_ptr, v_ptr, s_ptr, DK, DV,
                                                                               BK, BV)
    decay = tl.exp(-tl.load(slopes_ptr + i_bh % H).to(tl.float32))
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
    o, new_state, grid, bk, bv = triton_utils.step_launch(v, state, out_state)
    if B * H:
        _step_kernel[grid](q, k, v, state, o, new_state, slopes, scale, H, DK, DV, BK=bk, BV=bv, num_warps=4)
    return o, new_state
