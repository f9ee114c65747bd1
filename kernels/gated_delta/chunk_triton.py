"""The chunk loop of Gated DeltaNet's chunked form (``chunk.chunk_state_loop``) as one Triton kernel,
forward and backward.

``chunk.py`` computes everything that is parallel over chunks with batched PyTorch ops (the
triangular solve for the pseudo values, the intra-chunk scores) and leaves a loop over chunks:

    U_n = Ut_n - W_n S_n,   o_n = q_in_n S_n + scores_n U_n,   S_{n+1} = last_n S_n + k_out_n^T U_n

In PyTorch that loop is a handful of small matmuls per chunk, forward and backward, launched one by
one. Here one program per (sequence, head, value tile) walks all chunks with the state tile in
registers. Value columns never mix (every product above is linear in the columns of S and U), so
the tiles are independent.

Backward: with dS = dL/dS_{n+1}, walking the chunks in reverse,

    dU = scores^T do + k_out dS         (= dUt)
    dW = -dU S_n^T,  dq_in = do S_n^T,  dscores = do U^T,  dk_out = U dS^T,  dlast = <S_n, dS>
    dS_n = last dS + q_in^T do - W^T dU

The states entering the chunks are stored by the forward pass ([B, H, N, Dk, Dv] fp32, as the
PyTorch loop's autograd keeps them) and U is recomputed. The gradients that sum over value columns
(dW, dq_in, dscores, dk_out, dlast) are written per value tile and summed afterwards (deterministic, unlike
atomic adds; transient memory of the value-tile count times those gradients). Everything is fp32: ``chunk.py``
computes in fp32 (fp64 inputs keep the PyTorch loop).
"""

import functools

import torch
import triton
import triton.language as tl

from .. import triton_utils
from ..triton_utils import dot, dot_precision, pow2


@triton.jit
def _state_tile(DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Key and value offsets, their masks, and the offsets and mask of this program's [BK, BV] state tile."""
    o_k = tl.arange(0, BK)
    o_v = tl.program_id(0) * BV + tl.arange(0, BV)
    mk, mv = o_k < DK, o_v < DV
    return o_k, o_v, mk, mv, o_k[:, None] * DV + o_v[None, :], mk[:, None] & mv[None, :]


@triton.jit
def _load_chunk(ut_ptr, w_ptr, qi_ptr, sc_ptr, ko_ptr, last_ptr, c, o_k, o_v, mk, mv,
                DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr):
    """Chunk c's (of all [B * H * N]) W, q_in, k_out, Ut value tile, scores and decay, and the offsets of its
    key-width and value-width tiles."""
    r = tl.arange(0, C)
    k_off = c * C * DK + r[:, None] * DK + o_k[None, :]
    v_off = c * C * DV + r[:, None] * DV + o_v[None, :]
    w = tl.load(w_ptr + k_off, mask=mk[None, :], other=0.0)
    qi = tl.load(qi_ptr + k_off, mask=mk[None, :], other=0.0)
    ko = tl.load(ko_ptr + k_off, mask=mk[None, :], other=0.0)
    ut = tl.load(ut_ptr + v_off, mask=mv[None, :], other=0.0)
    sc = tl.load(sc_ptr + c * C * C + r[:, None] * C + r[None, :])
    return w, qi, ko, ut, sc, tl.load(last_ptr + c), k_off, v_off


@triton.jit
def _fwd_kernel(ut_ptr, w_ptr, qi_ptr, sc_ptr, ko_ptr, last_ptr, s0_ptr, o_ptr, states_ptr, sn_ptr, N,
                DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PREC: tl.constexpr):
    i_bh = tl.program_id(1).to(tl.int64)
    o_k, o_v, mk, mv, s_off, s_mask = _state_tile(DK, DV, BK, BV)
    S = tl.load(s0_ptr + i_bh * DK * DV + s_off, mask=s_mask, other=0.0)
    for n in range(N):
        c = i_bh * N + n
        w, qi, ko, ut, sc, a, k_off, v_off = _load_chunk(ut_ptr, w_ptr, qi_ptr, sc_ptr, ko_ptr, last_ptr, c,
                                                         o_k, o_v, mk, mv, DK, DV, C)
        tl.store(states_ptr + c * DK * DV + s_off, S, mask=s_mask)
        u = ut - dot(w, S, None, PREC)
        o = dot(sc, u, dot(qi, S, None, PREC), PREC)
        tl.store(o_ptr + v_off, o, mask=mv[None, :])
        S = dot(tl.trans(ko), u, a * S, PREC)
    tl.store(sn_ptr + i_bh * DK * DV + s_off, S, mask=s_mask)


@triton.jit
def _bwd_kernel(ut_ptr, w_ptr, qi_ptr, sc_ptr, ko_ptr, last_ptr, states_ptr, do_ptr, dsn_ptr,
                dut_ptr, dw_ptr, dqi_ptr, dsc_ptr, dko_ptr, dlast_ptr, ds0_ptr, N, BHN,
                DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PREC: tl.constexpr):
    i_bh = tl.program_id(1).to(tl.int64)
    o_k, o_v, mk, mv, s_off, s_mask = _state_tile(DK, DV, BK, BV)
    r = tl.arange(0, C)
    part = tl.program_id(0).to(tl.int64) * BHN  # this value tile's slice of the per-tile partial sums
    dS = tl.load(dsn_ptr + i_bh * DK * DV + s_off, mask=s_mask, other=0.0)
    for m in range(N):
        c = i_bh * N + (N - 1 - m)
        w, qi, ko, ut, sc, a, k_off, v_off = _load_chunk(ut_ptr, w_ptr, qi_ptr, sc_ptr, ko_ptr, last_ptr, c,
                                                         o_k, o_v, mk, mv, DK, DV, C)
        do = tl.load(do_ptr + v_off, mask=mv[None, :], other=0.0)
        S = tl.load(states_ptr + c * DK * DV + s_off, mask=s_mask, other=0.0)
        u = ut - dot(w, S, None, PREC)
        du = dot(ko, dS, dot(tl.trans(sc), do, None, PREC), PREC)
        tl.store(dut_ptr + v_off, du, mask=mv[None, :])
        pk_off = part * C * DK + k_off
        tl.store(dw_ptr + pk_off, -dot(du, tl.trans(S), None, PREC), mask=mk[None, :])
        tl.store(dqi_ptr + pk_off, dot(do, tl.trans(S), None, PREC), mask=mk[None, :])
        tl.store(dko_ptr + pk_off, dot(u, tl.trans(dS), None, PREC), mask=mk[None, :])
        tl.store(dsc_ptr + (part + c) * C * C + r[:, None] * C + r[None, :], dot(do, tl.trans(u), None, PREC))
        tl.store(dlast_ptr + part + c, tl.sum(tl.sum(S * dS, 1), 0))
        dS = a * dS + dot(tl.trans(qi), do, None, PREC) - dot(tl.trans(w), du, None, PREC)
    tl.store(ds0_ptr + i_bh * DK * DV + s_off, dS, mask=s_mask)


# H100/H200: at most 227 KB of shared memory per program (opt-in)
MAX_SHARED = 227 * 1024
MAX_HEAD_DIM = 128
STAGES = 1  # software-pipelining stages of both kernels (see launch_config)
# warps of both kernels: with 8 in the backward (16-bit inputs, head dim 128) triton 3.6 built a backward that gave a
# wrong k gradient and an illegal memory access on an H100 (docs/kernel_notes.md)
WARPS = 4


def launch_config(DK, DV, precise):
    """(key tile, value tile, value tiles, PREC) on CUDA.

    ``precise`` (fp32 inputs) takes three tf32 products per dot (~fp32 accuracy, like the PyTorch loop's fp32
    matmuls); 16-bit inputs take one, as their own rounding is coarser. Tiles and warps were chosen by
    compiling for sm_90 (``tools/bench_gated_delta.py --compile-report``): one software-pipelining stage, as
    Triton's default three exceed the shared memory at these fp32 tiles, and value tiles narrow enough that the
    state and its gradient stay in registers (tf32x3 spills at any width; it is correct, only slower).
    ``tests/test_kernels.py`` compiles every head dim this picks for and checks the shared memory."""
    bk = pow2(DK)
    bv = min(32 if bk <= 64 and not precise else 16, pow2(DV))
    return bk, bv, triton.cdiv(DV, bv), "tf32x3" if precise else "tf32"


def _config(x, DK, DV, precise):
    cfg = launch_config(DK, DV, precise)
    return cfg if x.is_cuda else cfg[:3] + (dot_precision(x),)


class _ChunkLoopFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Ut, W, q_in, scores, k_out, last, S0, precise):
        B, H, N, C, DV = Ut.shape
        DK = W.shape[-1]
        Ut, W, q_in, scores, k_out, last, S0 = (x.contiguous() for x in (Ut, W, q_in, scores, k_out, last, S0))
        o = triton_utils.empty(Ut.shape, torch.float32, Ut.device)
        states = triton_utils.empty((B, H, N, DK, DV), torch.float32, Ut.device)
        S_end = triton_utils.empty((B, H, DK, DV), torch.float32, Ut.device)
        bk, bv, nv, prec = _config(Ut, DK, DV, precise)
        _fwd_kernel[(nv, B * H)](Ut, W, q_in, scores, k_out, last, S0, o, states, S_end, N, DK, DV, C, bk, bv,
                                 PREC=prec, num_warps=WARPS, num_stages=STAGES)
        ctx.save_for_backward(Ut, W, q_in, scores, k_out, last, states)
        ctx.precise = precise
        return o, S_end

    @staticmethod
    def backward(ctx, do, dS_end):
        Ut, W, q_in, scores, k_out, last, states = ctx.saved_tensors
        B, H, N, C, DV = Ut.shape
        DK = W.shape[-1]
        bk, bv, nv, prec = _config(Ut, DK, DV, ctx.precise)
        dev, f32 = Ut.device, torch.float32
        do, dS_end = do.contiguous(), dS_end.contiguous()
        dUt = triton_utils.empty(Ut.shape, f32, dev)
        dS0 = triton_utils.empty((B, H, DK, DV), f32, dev)
        dW, dq_in, dk_out = (triton_utils.empty((nv,) + W.shape, f32, dev) for _ in range(3))
        dscores = triton_utils.empty((nv,) + scores.shape, f32, dev)
        dlast = triton_utils.empty((nv,) + last.shape, f32, dev)
        _bwd_kernel[(nv, B * H)](Ut, W, q_in, scores, k_out, last, states, do, dS_end,
                                 dUt, dW, dq_in, dscores, dk_out, dlast, dS0, N, B * H * N, DK, DV, C, bk, bv,
                                 PREC=prec, num_warps=WARPS, num_stages=STAGES)
        dW, dq_in, dscores, dk_out, dlast = (x.sum(0) for x in (dW, dq_in, dscores, dk_out, dlast))
        return dUt, dW, dq_in, dscores, dk_out, dlast, dS0, None


@torch.compiler.disable
def chunk_state_loop_triton(Ut, W, q_in, scores, k_out, last, S, precise=True):
    """``chunk.chunk_state_loop`` (same arguments and results, all fp32) in Triton; differentiable in every
    input. ``precise``: fp32-accurate products (see ``launch_config``). Runs on CUDA tensors, or on CPU
    tensors when Triton was imported with TRITON_INTERPRET=1. Opaque to torch.compile, like the Lightning
    kernel (inductor re-compiling Triton kernels fails)."""
    B, H, N, C, DV = Ut.shape
    DK = W.shape[-1]
    shapes = {"W": (W, (B, H, N, C, DK)), "q_in": (q_in, (B, H, N, C, DK)), "k_out": (k_out, (B, H, N, C, DK)),
              "scores": (scores, (B, H, N, C, C)), "last": (last, (B, H, N)), "S": (S, (B, H, DK, DV))}
    for name, (x, shape) in shapes.items():
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} to go with Ut {list(Ut.shape)}; got {list(x.shape)}")
    if any(x.dtype != torch.float32 for x in (Ut, W, q_in, scores, k_out, last, S)):
        raise ValueError("the Triton chunk loop computes in fp32: every input must be fp32 (fp64 inputs take "
                         "chunk.chunk_state_loop)")
    if C < 16 or C & (C - 1):
        raise ValueError(f"the chunk size must be a power of two of at least 16 for the Triton loop; got {C}")
    if DK > MAX_HEAD_DIM:
        raise ValueError(f"the Triton loop keeps a [{DK}, value tile] state in registers: built for key head dims "
                         f"up to {MAX_HEAD_DIM}; got {DK} (chunk.chunk_state_loop takes any)")
    if N == 0:
        return Ut.new_zeros(Ut.shape), S
    return _ChunkLoopFunction.apply(Ut, W, q_in, scores, k_out, last, S, precise)


def chunk_state_loop_for(dtype: torch.dtype):
    """The Triton loop as ``gated_delta_rule`` runs it for q of this dtype: fp32-accurate products for fp32
    inputs, single tf32 products for 16-bit ones (see ``launch_config``)."""
    return functools.partial(chunk_state_loop_triton, precise=dtype == torch.float32)
