"""Pieces the Triton kernels in ``kernels/`` share: the output buffers (every kernel), for the chunked ones
(Lightning's and Gated DeltaNet's) the tensor-core product, its precision and the tile width, and for the two
decode steps their tiling, the loads of a program's inputs and the output buffers."""

import torch
import triton
import triton.language as tl


def empty(shape, dtype, device) -> torch.Tensor:
    """Every kernel's output buffers come from here, looked up as ``triton_utils.empty`` at each call, so that
    tests can poison them all (fill with NaN) in one place."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b on the tensor cores, fp32 accumulation (acc may be None). PREC "interpret"
    upcasts the operands: the Triton interpreter multiplies bf16 wrongly (numpy has no bf16),
    and the upcast is exact."""
    if PREC == "interpret":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


def dot_precision(x: torch.Tensor) -> str:
    """PREC for ``dot`` on operands like x."""
    if not x.is_cuda:
        return "interpret"
    # fp32 inputs: three tf32 products per dot give ~fp32 accuracy on tensor cores.
    return "tf32x3" if x.dtype == torch.float32 else "tf32"


def pow2(n: int) -> int:
    """A tile width covering n: tl.dot needs powers of two of at least 16."""
    return max(16, triton.next_power_of_2(n))


# ---- decode steps: one program per (batch x head, value tile) holding a [Dk, BV] fp32 state tile ------------


@triton.jit
def load_step_tile(q_ptr, k_ptr, v_ptr, s_ptr, DK, DV, BK: tl.constexpr, BV: tl.constexpr):
    """This program's inputs in fp32, q and k ``[BK]``, v ``[BV]`` and the state tile ``[BK, BV]``, with what
    storing needs: the state's offsets and mask, the value offsets and mask, and the batch x head index."""
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
    v = tl.load(v_ptr + i_bh * DV + o_v, mask=mv, other=0.0).to(tl.float32)
    return q, k, v, state, s_off, s_mask, o_v, mv, i_bh


def step_launch(v: torch.Tensor, state: torch.Tensor, out_state=None):
    """(o, new_state, grid, BK, BV) for a decode step over v ``[B, H, Dv]`` and state ``[B, H, Dk, Dv]``: the output
    buffer, the new state (a fresh tensor, or ``out_state``, which may be ``state`` itself: each program reads its
    tile before writing it), and the tiling: a [Dk, BV] fp32 tile of 8-16 KB per program, enough programs to fill
    the GPU at batch 1."""
    B, H, DK, DV = state.shape
    o = empty((B, H, DV), v.dtype, v.device)
    if out_state is None:
        new_state = empty(state.shape, state.dtype, state.device)
    elif out_state.shape != state.shape or not out_state.is_contiguous():
        raise ValueError(f"out_state must be a contiguous {tuple(state.shape)} tensor")
    else:
        new_state = out_state
    bk = pow2(DK)
    bv = min(pow2(DV), max(16, 4096 // bk))
    return o, new_state, (triton.cdiv(DV, bv), B * H), bk, bv
