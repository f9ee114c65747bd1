"""One decode step of Gated DeltaNet in Triton (the math: ``chunk.gated_delta_rule_step``):

    S' = a S + k (b (v - k^T a S))^T,   o = scale q^T S',   a = exp(g), q and k L2-normalised

The PyTorch step reads the fp32 state for k^T a S and again for the update and the output; here one program per
(batch, head, value tile) holds a [Dk, BV] state tile in registers, so the state is read and written once. Value
columns never mix (k^T S and q^T S' are per column), so the tiles are independent.
"""

import torch
import triton
import triton.language as tl

from .. import triton_utils
from .chunk import L2_EPS, check_step_inputs


@triton.jit
def _step_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, s_ptr, o_ptr, s_out_ptr, scale, eps, DK, DV,
                 BK: tl.constexpr, BV: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mk = o_k < DK
    mv = o_v < DV
    s_off = i_bh.to(tl.int64) * DK * DV + o_k[:, None] * DV + o_v[None, :]
    s_mask = mk[:, None] & mv[None, :]
    state = tl.load(s_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + i_bh * DK + o_k, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + i_bh * DK + o_k, mask=mk, other=0.0).to(tl.float32)
    q = q / tl.sqrt(tl.sum(q * q, axis=0) + eps)
    k = k / tl.sqrt(tl.sum(k * k, axis=0) + eps)
    v = tl.load(v_ptr + i_bh * DV + o_v, mask=mv, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(g_ptr + i_bh).to(tl.float32))
    beta = tl.load(beta_ptr + i_bh).to(tl.float32)
    state = decay * state
    u = beta * (v - tl.sum(k[:, None] * state, axis=0))
    state = state + k[:, None] * u[None, :]
    tl.store(s_out_ptr + s_off, state.to(s_out_ptr.dtype.element_ty), mask=s_mask)
    o = tl.sum(q[:, None] * state, axis=0) * scale
    tl.store(o_ptr + i_bh * DV + o_v, o.to(o_ptr.dtype.element_ty), mask=mv)


def fused_recurrent_gated_delta_step(q, k, v, g, beta, state, scale=None, out_state=None):
    """q, k ``[B, H, Dk]``, v ``[B, H, Dv]``, g, beta ``[B, H]``, state ``[B, H, Dk, Dv]`` (fp32) -> (o ``[B, H, Dv]``
    in v's dtype, new state). The new state is a fresh tensor of ``state``'s dtype, or ``out_state`` if given
    (which may be ``state`` itself: each program reads its tile before writing it, so in place is safe)."""
    check_step_inputs(q, k, v, g, beta, state)
    B, H, DK = q.shape
    DV = v.shape[-1]
    scale = DK**-0.5 if scale is None else float(scale)
    q, k, v, g, beta, state = (x.contiguous() for x in (q, k, v, g, beta, state))
    o = triton_utils.empty((B, H, DV), v.dtype, v.device)
    if out_state is None:
        new_state = triton_utils.empty(state.shape, state.dtype, state.device)
    elif out_state.shape != state.shape or not out_state.is_contiguous():
        raise ValueError(f"out_state must be a contiguous {tuple(state.shape)} tensor")
    else:
        new_state = out_state
    bk = triton_utils.pow2(DK)
    # A [Dk, BV] fp32 tile of 8-16 KB per program, as Lightning's step: enough programs to fill the GPU at batch 1.
    bv = min(triton_utils.pow2(DV), max(16, 4096 // bk))
    if B * H:
        _step_kernel[(triton.cdiv(DV, bv), B * H)](q, k, v, g, beta, state, o, new_state, scale, L2_EPS, DK, DV,
                                                   BK=bk, BV=bv, num_warps=4)
    return o, new_state
