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
    q, k, v, state, s_off, s_mask, o_v, mv, i_bh = triton_utils.load_step_tile(q_ptr, k_ptr, v_ptr, s_ptr, DK, DV,
                                                                               BK, BV)
    q = q / tl.sqrt(tl.sum(q * q, axis=0) + eps)
    k = k / tl.sqrt(tl.sum(k * k, axis=0) + eps)
    state = tl.exp(tl.load(g_ptr + i_bh).to(tl.float32)) * state
    u = tl.load(beta_ptr + i_bh).to(tl.float32) * (v - tl.sum(k[:, None] * state, axis=0))
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
    scale = DK**-0.5 if scale is None else float(scale)
    q, k, v, g, beta, state = (x.contiguous() for x in (q, k, v, g, beta, state))
    o, new_state, grid, bk, bv = triton_utils.step_launch(v, state, out_state)
    if B * H:
        _step_kernel[grid](q, k, v, g, beta, state, o, new_state, scale, L2_EPS, DK, v.shape[-1], BK=bk, BV=bv,
                           num_warps=4)
    return o, new_state
