"""Chunked Lightning Attention in Triton: forward and backward (see ``naive.py`` for the math).

Layout. Tokens of all sequences are handled as one packed stream ``[tokens, H, D]``: a plain
batch ``[B, T]`` is the packed stream with ``cu_seqlens = [0, T, 2T, ...]``. Each sequence is cut
into *blocks* of ``BT`` tokens, each block into ``R`` *chunks* of ``BC`` tokens (``BT = R * BC``).

Forward:
  1. The fp32 state at every block start (the *checkpoints*) and the final state, in two passes:
     ``_block_state_kernel`` computes each block's own contribution in parallel, and
     ``_state_chain_kernel`` chains them per sequence: elementwise work, done as a parallel
     scan over blocks (the step ``S -> a^len S + L`` composes associatively).
  2. ``_fwd_kernel``: one program per (block, head, value tile) starts from the block's
     checkpoint and walks the block chunk by chunk: exact intra-chunk attention with the decay
     matrix ``a^(i-j)`` plus the inter-chunk term ``a^(i+1) q S``, carrying S in registers.

Backward, the mirror image: the gradient of the state, G_t = dL/dS_t, obeys the same recurrence
in reverse time, ``G_{t-1} = a G_t + scale q_t^T do_t``. So
  1. The same two passes with REVERSE=True on (q, do) give G at every block *end*, and dh0.
  2. ``_bwd_kernel`` runs, for each block, the same block walk in three roles:
        dq = walk(q'=do, k'=v, v'=k, state S^T)            forward in time
        dk = walk(q'=v,  k'=do, v'=q, state G^T)           backward in time
        dv = walk(q'=k,  k'=q,  v'=do, state G)            backward in time
     as neighbouring programs of one launch, so q, k, v, do of a block are read from HBM about
     once and served to the other two from L2. The role (pointers, strides, direction) is a
     run-time value, so one walk is compiled: forward-kernel-sized shared memory, 2 CTAs per SM.
     With ``fused_dkdv`` (the default for 16-bit inputs and D <= 128, with ``bwd_warps=8``) two programs per block run
     instead: a full-width dq walk and one walk computing dk and dv together from the whole G
     (``_dkdv_walk_t``), so G is updated once and no score product is repeated per value tile.
     Its [D, D] fp32 state needs 8 warps (1 CTA per SM) and, at D=128, 2-byte inputs (fp32
     tiles exceed shared memory).

The decay is a per-head constant a = exp(-slope), so every decay factor is ``a^e = exp2(-m2 e)``
with e >= 0 computed from positions: nothing cumulative is loaded, and no factor can overflow.
"""

import functools

import torch
import triton
import triton.language as tl

from .. import triton_utils
from ..triton_utils import dot, dot_precision, pow2

LOG2E = 1.4426950408889634


@triton.jit
def _pow_a(m2, e):
    """a^e for a = exp(-slope), m2 = slope * log2(e)."""
    return tl.exp2(-m2 * e.to(tl.float32))


@triton.jit
def _decay_weights(m2, j, n, REVERSE, TO_END: tl.constexpr):
    """Per-row decay of a chunk of n valid rows (zero on rows >= n).

    TO_END: a^(n-1-j), the distance from row j to the chunk's last row; else a^(j+1), the
    distance from the state before the chunk. Time reversal swaps the two. REVERSE may be a
    run-time value (the backward kernel picks the direction per program)."""
    e = tl.where(REVERSE != TO_END, n - 1 - j, j + 1)
    return tl.where(j < n, _pow_a(m2, tl.maximum(e, 0)), 0.0)


@triton.jit
def _block_coords(cu_ptr, btab_ptr, i_b, BT: tl.constexpr):
    """(first token of block i_b, end of its sequence) from the block table."""
    i_n = tl.load(btab_ptr + 2 * i_b)
    b = tl.load(btab_ptr + 2 * i_b + 1).to(tl.int64)
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    return bos + b * BT, eos


@triton.jit
def _block_state_kernel(k_ptr, v_ptr, buf_ptr, slopes_ptr, cu_ptr, btab_ptr, upd_scale,
                        H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                        BT: tl.constexpr, SC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        REVERSE: tl.constexpr, PREC: tl.constexpr):
    """A block's own contribution to the state, upd_scale * sum_t w_t k_t^T v_t, as if it started
    from zero: w_t = a^(distance to the block's last token), or REVERSE, a^(distance from the
    state before the block). Every block is independent, so this pass is fully parallel."""
    i_kv, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k = i_kv // tl.cdiv(DV, BV)
    i_v = i_kv % tl.cdiv(DV, BV)
    t_blk, eos = _block_coords(cu_ptr, btab_ptr, i_b, BT)
    t_end = tl.minimum(t_blk + BT, eos)
    m2 = tl.load(slopes_ptr + i_h).to(tl.float32) * 1.4426950408889634
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    j = tl.arange(0, SC)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for s in range(BT // SC):
        rows = t_blk + s * SC + j
        valid = rows < t_end
        kk = tl.load(k_ptr + rows[:, None] * (H * DK) + i_h * DK + o_k[None, :],
                     mask=valid[:, None] & (o_k[None, :] < DK), other=0.0)
        vv = tl.load(v_ptr + rows[:, None] * (H * DV) + i_h * DV + o_v[None, :],
                     mask=valid[:, None] & (o_v[None, :] < DV), other=0.0)
        if REVERSE:
            e = rows - t_blk + 1
        else:
            e = t_end - 1 - rows
        w = tl.where(valid, _pow_a(m2, tl.maximum(e, 0)), 0.0) * upd_scale
        # Decay (and scale) v rather than k: k^T then feeds the tensor cores straight from shared memory.
        acc = dot(tl.trans(kk), (vv * w[:, None]).to(vv.dtype), acc, PREC)
    s_off = o_k[:, None] * DV + o_v[None, :]
    tl.store(buf_ptr + (i_b.to(tl.int64) * H + i_h) * DK * DV + s_off, acc,
             mask=(o_k[:, None] < DK) & (o_v[None, :] < DV))


@triton.jit
def _compose(a1, x1, a2, x2):
    """Two block steps S -> a S + L in a row, as one: associative, so the chain over blocks is a
    parallel scan rather than a loop of dependent loads."""
    return a1 * a2, x1 * a2 + x2


@triton.jit
def _state_chain_kernel(buf_ptr, h0_ptr, ht_ptr, slopes_ptr, cu_ptr, boff_ptr,
                        H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
                        NG: tl.constexpr, E: tl.constexpr,
                        HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, REVERSE: tl.constexpr):
    """Chains the block contributions of one sequence, state_{b+1} = a^len_b state_b + L_b,
    overwriting each L_b in place with the state entering block b (REVERSE: leaving it, walking
    from the end). The work is elementwise, so a program owns E flat state elements and takes NG
    blocks at a time: one load, a scan over the blocks, one store. (v3 walked the blocks one by
    one: a dependent HBM round trip per block, which made this pass scale with the block count.)"""
    i_e, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    length = tl.load(cu_ptr + i_n + 1).to(tl.int64) - bos
    boff = tl.load(boff_ptr + i_n).to(tl.int64)
    m2 = tl.load(slopes_ptr + i_h).to(tl.float32) * 1.4426950408889634
    o_e = i_e * E + tl.arange(0, E)
    emask = o_e < DK * DV
    g = tl.arange(0, NG)
    if HAS_H0:
        carry = tl.load(h0_ptr + i_nh.to(tl.int64) * DK * DV + o_e, mask=emask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([E], dtype=tl.float32)
    nb = tl.cdiv(length, BT)
    for g0 in range(0, nb, NG):
        j = g0 + g  # position along the chain (from the end with REVERSE)
        valid = j < nb
        if REVERSE:
            b = nb - 1 - j
            b_next = b - 1
        else:
            b = j
            b_next = b + 1
        rows = ((boff + b) * H + i_h) * DK * DV
        m = valid[:, None] & emask[None, :]
        local = tl.load(buf_ptr + rows[:, None] + o_e[None, :], mask=m, other=0.0)
        # Past the end: decay 1 and L = 0, the identity step, so the last scan row is the carry.
        decay = tl.where(valid, _pow_a(m2, tl.minimum(length - b * BT, BT)), 1.0)
        decay = decay[:, None] + tl.zeros([NG, E], tl.float32)  # the scan wants equal shapes
        local = tl.where((g == 0)[:, None], local + decay * carry[None, :], local)
        _, incl = tl.associative_scan((decay, local), 0, _compose)
        # incl[j] is the state after the j-th block of the group, i.e. the state entering the next.
        tl.store(buf_ptr + ((boff + b_next[:, None]) * H + i_h) * DK * DV + o_e[None, :], incl,
                 mask=m & (j + 1 < nb)[:, None] & (g + 1 < NG)[:, None])
        if REVERSE:
            b0 = nb - 1 - g0
        else:
            b0 = g0
        tl.store(buf_ptr + ((boff + b0) * H + i_h) * DK * DV + o_e, carry, mask=emask)
        carry = tl.sum(tl.where((g == NG - 1)[:, None], incl, 0.0), axis=0)
    if STORE_HT:
        tl.store(ht_ptr + i_nh.to(tl.int64) * DK * DV + o_e, carry, mask=emask)


@triton.jit
def _block_walk(q_ptr, k_ptr, v_ptr, o_ptr, s_ptr, s_stride_key, s_stride_val,
                t_blk, eos, i_v, m2, intra_scale, inter_scale, upd_scale, REVERSE,
                stride_qk: tl.constexpr, stride_vo: tl.constexpr, DKEY: tl.constexpr, DVAL: tl.constexpr,
                BC: tl.constexpr, R: tl.constexpr, BKEY: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """One block of one head: out = intra_scale * (scores * W) v' + inter_scale * a^e q' S.

    q'/k' are [tokens, DKEY] rows (stride stride_qk), v'/out [tokens, DVAL] (stride stride_vo),
    already offset to the head; this program owns value columns [i_v*BV, (i_v+1)*BV). The state
    tile [DKEY, BV] is read from s_ptr with the given strides (so S or S^T) and carried across
    the R chunks, forward in time or, with REVERSE, backward. REVERSE (0/1) may be a run-time
    value: it only enters index arithmetic, so one compiled walk serves both directions."""
    i = tl.arange(0, BC)
    o_k = tl.arange(0, BKEY)
    o_v = i_v * BV + tl.arange(0, BV)
    mk = o_k < DKEY
    mv = o_v < DVAL
    state = tl.load(s_ptr + o_k[:, None] * s_stride_key + o_v[None, :] * s_stride_val,
                    mask=mk[:, None] & mv[None, :], other=0.0)
    # The decay matrix is the same for every chunk of a head: a^(i-j) on the causal side, which
    # time reversal flips to the other triangle.
    diff = (i[:, None] - i[None, :]) * (1 - 2 * REVERSE)
    W = tl.where(diff >= 0, _pow_a(m2, tl.maximum(diff, 0)), 0.0)

    for r in range(R):
        t0 = t_blk + (r + REVERSE * (R - 1 - 2 * r)) * BC  # chunk r, or chunk R-1-r in reverse
        n = tl.minimum(tl.maximum(eos - t0, 0), BC)
        rows = t0 + i
        rmask = i < n
        qk_mask = rmask[:, None] & mk[None, :]
        vo_mask = rmask[:, None] & mv[None, :]
        qq = tl.load(q_ptr + rows[:, None] * stride_qk + o_k[None, :], mask=qk_mask, other=0.0)
        kk = tl.load(k_ptr + rows[:, None] * stride_qk + o_k[None, :], mask=qk_mask, other=0.0)
        vv = tl.load(v_ptr + rows[:, None] * stride_vo + o_v[None, :], mask=vo_mask, other=0.0)

        scores = dot(qq, tl.trans(kk), None, PREC) * (W * intra_scale)
        # One accumulator: the row-decayed inter-chunk term, then the intra-chunk product on top.
        out = dot(qq, state.to(qq.dtype), None, PREC)
        out *= (inter_scale * _decay_weights(m2, i, n, REVERSE, False))[:, None]
        out = dot(scores.to(vv.dtype), vv, out, PREC)
        tl.store(o_ptr + rows[:, None] * stride_vo + o_v[None, :], out.to(o_ptr.dtype.element_ty), mask=vo_mask)

        vw = (vv * (upd_scale * _decay_weights(m2, i, n, REVERSE, True))[:, None]).to(vv.dtype)
        state = dot(tl.trans(kk), vw, state * _pow_a(m2, n), PREC)


@triton.jit
def _chunk_out_t(st, qq, kk, vv, Wt, w_col, PREC: tl.constexpr):
    """One chunk of a block walk, transposed: out^T = (st q'^T) * w_col + v'^T ((k' q'^T) * Wt),
    i.e. out = w (q' state) + ((q' k'^T) * W) v' with st = state^T, Wt = W^T (scales folded in).

    Triton puts all warps of a product that feeds another product on its rows; with 8 warps and
    BC = 64 rows the second warp group repeats the first one's work. Transposed, the two
    products with the state or the output have D = 128 rows, split between the warp groups;
    only the small score product (BC x BC x D) is still done twice."""
    s = (dot(kk, tl.trans(qq), None, PREC) * Wt).to(vv.dtype)
    out = dot(st, tl.trans(qq), None, PREC) * w_col
    return dot(tl.trans(vv), s, out, PREC)


@triton.jit
def _dq_walk_t(do_ptr, v_ptr, k_ptr, dq_ptr, s_ptr, t_blk, eos, m2, scale,
               stride_k: tl.constexpr, stride_v: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               BC: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dq of one block of one head, all DK columns, carrying the whole forward state S [DK, DV]
    forward in time (the ``fused_dkdv`` layout): the dq role of ``_block_walk`` with one value
    tile, computed transposed (``_chunk_out_t``)."""
    i = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    mk = o_k < DK
    mv = o_v < DV
    S = tl.load(s_ptr + o_k[:, None] * DV + o_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
    diff = i[None, :] - i[:, None]  # the transpose of the causal a^(i-j)
    Wt = tl.where(diff >= 0, _pow_a(m2, tl.maximum(diff, 0)), 0.0) * scale
    for r in range(R):
        t0 = t_blk + r * BC
        n = tl.minimum(tl.maximum(eos - t0, 0), BC)
        rows = t0 + i
        rmask = i < n
        k_mask = rmask[:, None] & mk[None, :]
        v_mask = rmask[:, None] & mv[None, :]
        dd = tl.load(do_ptr + rows[:, None] * stride_v + o_v[None, :], mask=v_mask, other=0.0)
        vv = tl.load(v_ptr + rows[:, None] * stride_v + o_v[None, :], mask=v_mask, other=0.0)
        kk = tl.load(k_ptr + rows[:, None] * stride_k + o_k[None, :], mask=k_mask, other=0.0)
        w_col = (scale * _decay_weights(m2, i, n, 0, False))[None, :]
        dqt = _chunk_out_t(S.to(dd.dtype), dd, vv, kk, Wt, w_col, PREC)
        tl.store(dq_ptr + rows[None, :] * stride_k + o_k[:, None], dqt.to(dq_ptr.dtype.element_ty),
                 mask=tl.trans(k_mask))
        kw = (kk * _decay_weights(m2, i, n, 0, True)[:, None]).to(kk.dtype)
        S = dot(tl.trans(kw), vv, S * _pow_a(m2, n), PREC)


@triton.jit
def _dkdv_walk_t(q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, g_ptr, t_blk, eos, m2, scale,
                 stride_k: tl.constexpr, stride_v: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                 BC: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dk and dv of one block of one head in one program carrying the whole state gradient G
    [DK, DV] backward in time (the ``fused_dkdv`` layout):
        dv = scale (k q^T * W) do + a^e k G,   dk = scale (v do^T * W) q + a^e v G^T,
        G <- a^n G + scale q^T (w do).
    The dk and dv roles of ``_block_walk`` each update G and recompute their score matrix per
    value tile; here G is updated once and each score matrix computed once per chunk (twice
    on the hardware at 8 warps, ``_chunk_out_t``)."""
    i = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    mk = o_k < DK
    mv = o_v < DV
    G = tl.load(g_ptr + o_k[:, None] * DV + o_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
    gb = G.to(q_ptr.dtype.element_ty)
    diff = i[:, None] - i[None, :]  # the transpose of the backward-in-time a^(j-i)
    Wt = tl.where(diff >= 0, _pow_a(m2, tl.maximum(diff, 0)), 0.0) * scale
    for r in range(R):
        t0 = t_blk + (R - 1 - r) * BC
        n = tl.minimum(tl.maximum(eos - t0, 0), BC)
        rows = t0 + i
        rmask = i < n
        k_mask = rmask[:, None] & mk[None, :]
        v_mask = rmask[:, None] & mv[None, :]
        qq = tl.load(q_ptr + rows[:, None] * stride_k + o_k[None, :], mask=k_mask, other=0.0)
        kk = tl.load(k_ptr + rows[:, None] * stride_k + o_k[None, :], mask=k_mask, other=0.0)
        vv = tl.load(v_ptr + rows[:, None] * stride_v + o_v[None, :], mask=v_mask, other=0.0)
        dd = tl.load(do_ptr + rows[:, None] * stride_v + o_v[None, :], mask=v_mask, other=0.0)
        w_col = _decay_weights(m2, i, n, 1, False)[None, :]
        # dv = walk(k, q, do, G), then dk = walk(v, do, q, G^T): one accumulator live at a time.
        dvt = _chunk_out_t(tl.trans(gb), kk, qq, dd, Wt, w_col, PREC)
        tl.store(dv_ptr + rows[None, :] * stride_v + o_v[:, None], dvt.to(dv_ptr.dtype.element_ty),
                 mask=tl.trans(v_mask))
        dkt = _chunk_out_t(gb, vv, dd, qq, Wt, w_col, PREC)
        tl.store(dk_ptr + rows[None, :] * stride_k + o_k[:, None], dkt.to(dk_ptr.dtype.element_ty),
                 mask=tl.trans(k_mask))
        # The decay on q rather than do: q^T then feeds the tensor cores from registers, do from
        # shared memory (the other way round spilled).
        qw = (qq * (scale * _decay_weights(m2, i, n, 1, True))[:, None]).to(qq.dtype)
        G = dot(tl.trans(qw), dd, G * _pow_a(m2, n), PREC)
        # G in bf16 carried from one chunk to the next: Triton then feeds G and G^T to the tensor
        # cores from shared memory rather than a register copy per use (which spilled).
        gb = G.to(qq.dtype)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, ckpt_ptr, slopes_ptr, cu_ptr, btab_ptr, scale,
                H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                BC: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PREC: tl.constexpr):
    i_v, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t_blk, eos = _block_coords(cu_ptr, btab_ptr, i_b, BC * R)
    m2 = tl.load(slopes_ptr + i_h).to(tl.float32) * 1.4426950408889634
    s_ptr = ckpt_ptr + (i_b.to(tl.int64) * H + i_h) * DK * DV
    _block_walk(q_ptr + i_h * DK, k_ptr + i_h * DK, v_ptr + i_h * DV, o_ptr + i_h * DV, s_ptr, DV, 1,
                t_blk, eos, i_v, m2, scale, scale, 1.0, 0, H * DK, H * DV, DK, DV,
                BC, R, BK, BV, PREC)


@triton.jit
def _bwd_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, s_ckpt_ptr, g_ckpt_ptr,
                slopes_ptr, cu_ptr, btab_ptr, scale,
                H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, NTK: tl.constexpr,
                BC: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                BVK: tl.constexpr, BVV: tl.constexpr, FUSED_DKDV: tl.constexpr, PREC: tl.constexpr):
    """Program axis 0 picks the role: NTK dq tiles, NTK dk tiles, then the dv tiles (BVK / BVV
    wide); with FUSED_DKDV, one full-width dq program, then one program for dk and dv together.
    S is the forward state at the block start, G the state gradient at its end.

    The role only changes pointers, strides, scales and the direction, all chosen here at run
    time, so with DK == DV a single walk is compiled. (v4 compiled one walk per role: three
    sets of pipeline buffers, 147-229 KB of shared memory, one CTA per SM.)"""
    pid, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t_blk, eos = _block_coords(cu_ptr, btab_ptr, i_b, BC * R)
    m2 = tl.load(slopes_ptr + i_h).to(tl.float32) * 1.4426950408889634
    st_off = (i_b.to(tl.int64) * H + i_h) * DK * DV
    q_ptr += i_h * DK
    k_ptr += i_h * DK
    v_ptr += i_h * DV
    do_ptr += i_h * DV
    if FUSED_DKDV:
        if pid == 0:
            _dq_walk_t(do_ptr, v_ptr, k_ptr, dq_ptr + i_h * DK, s_ckpt_ptr + st_off, t_blk, eos, m2, scale,
                       H * DK, H * DV, DK, DV, BC, R, BK, BV, PREC)
        else:
            _dkdv_walk_t(q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr + i_h * DK, dv_ptr + i_h * DV, g_ckpt_ptr + st_off,
                         t_blk, eos, m2, scale, H * DK, H * DV, DK, DV, BC, R, BK, BV, PREC)
    else:
        if pid < NTK:  # dq = walk(do, v, k, S^T), forward in time
            a_ptr, b_ptr, c_ptr, out_ptr, s_ptr = do_ptr, v_ptr, k_ptr, dq_ptr + i_h * DK, s_ckpt_ptr + st_off
            ssk, ssv, tile, rev, inter, upd = 1, DV, pid, 0, scale, 1.0
        elif pid < 2 * NTK:  # dk = walk(v, do, q, G^T), backward in time
            a_ptr, b_ptr, c_ptr, out_ptr, s_ptr = v_ptr, do_ptr, q_ptr, dk_ptr + i_h * DK, g_ckpt_ptr + st_off
            ssk, ssv, tile, rev, inter, upd = 1, DV, pid - NTK, 1, 1.0, scale
        else:  # dv = walk(k, q, do, G), backward in time
            a_ptr, b_ptr, c_ptr, out_ptr, s_ptr = k_ptr, q_ptr, do_ptr, dv_ptr + i_h * DV, g_ckpt_ptr + st_off
            ssk, ssv, tile, rev, inter, upd = DV, 1, pid - 2 * NTK, 1, 1.0, scale
        if DK == DV:
            _block_walk(a_ptr, b_ptr, c_ptr, out_ptr, s_ptr, ssk, ssv, t_blk, eos, tile, m2, scale, inter, upd, rev,
                        H * DK, H * DK, DK, DK, BC, R, BK, BVK, PREC)
        elif pid < 2 * NTK:  # keys of width DV, values of width DK
            _block_walk(a_ptr, b_ptr, c_ptr, out_ptr, s_ptr, ssk, ssv, t_blk, eos, tile, m2, scale, inter, upd, rev,
                        H * DV, H * DK, DV, DK, BC, R, BV, BVK, PREC)
        else:  # keys of width DK, values of width DV
            _block_walk(a_ptr, b_ptr, c_ptr, out_ptr, s_ptr, ssk, ssv, t_blk, eos, tile, m2, scale, inter, upd, rev,
                        H * DK, H * DV, DK, DV, BC, R, BK, BVV, PREC)


# ----------------------------------------------------------------------------------------------
# Host side


class _Plan:
    """Sequence boundaries and the block table for one call (shared by forward and backward)."""

    def __init__(self, lengths, device, block_size):
        self.N = len(lengths)
        self.BT = block_size
        nbs = [triton.cdiv(n, block_size) for n in lengths]
        self.n_blocks = sum(nbs)
        self.max_blocks = max(nbs, default=0)
        boff = [0]
        for nb in nbs[:-1]:
            boff.append(boff[-1] + nb)
        table = [(n, b) for n, nb in enumerate(nbs) for b in range(nb)]
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        self.cu = torch.tensor(starts, dtype=torch.int64).to(device)
        self.boff = torch.tensor(boff, dtype=torch.int64).to(device)
        self.btab = torch.tensor(table or [(0, 0)], dtype=torch.int32).reshape(-1, 2).to(device)


@functools.lru_cache(maxsize=64)
def _cached_plan(lengths, device, block_size):
    # Building the tables costs host-to-device copies that would dominate short calls.
    return _Plan(lengths, device, block_size)


def _make_plan(B, T, cu_seqlens, device, block_size):
    if cu_seqlens is None:
        lengths = (T,) * B
    else:
        bounds = [int(x) for x in cu_seqlens.tolist()]
        lengths = tuple(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    return _cached_plan(lengths, device, block_size)


def _num_sms(device):
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _default_config(n_tokens, H, device, dtype=torch.bfloat16, dk=128, dv=128):
    """Chunk 64; the block (checkpoint interval) as long as still gives ~2 blocks per SM and head
    set: each block costs a fixed overhead in the state passes and writes a checkpoint, while
    short sequences need short blocks for parallelism. Measured on an H100 at T=64K (the sweep in
    docs/kernel_notes.md): blocks of 2048 tokens beat 1024 by ~4% fwd+bwd; scan tiles of 128x128
    with 8 warps and 64-row steps beat 64x64 tiles by ~8% in the block-state pass. ``num_warps``
    / ``num_stages`` are the forward kernel's, ``bwd_warps`` / ``bwd_stages`` the backward's.
    16-bit inputs with head dims ``dk``, ``dv`` <= 128 take the fused dk+dv backward with 8 warps
    and 3 stages (H100, T=64K, same process: fwd+bwd 1.988 vs 2.111 ms); fp32 operands would not
    fit its shared memory, nor would the whole [DK, DV] fp32 state it keeps per program for larger
    heads (it was only built and measured for D <= 128)."""
    fused = dtype.itemsize == 2 and max(pow2(dk), pow2(dv)) <= 128
    bc = 64
    r = 32
    while r > 4 and (n_tokens // (bc * r)) * H < 2 * _num_sms(device):
        r //= 2
    return dict(chunk_size=bc, block_chunks=r, scan_chunk=64, scan_tile=128, value_tile=64,
                num_warps=4, num_stages=2, bwd_warps=8 if fused else 4, bwd_stages=3 if fused else 2,
                fused_dkdv=fused, scan_warps=8,
                scan_stages=2, chain_blocks=64, chain_elems=4096)


def _scan(k, v, slopes, h0, upd_scale, plan, cfg, reverse, want_final):
    """The state at every block start (REVERSE: the state gradient at every block end), fp32
    [n_blocks, H, DK, DV], and the final state (REVERSE: dh0) or None. Two passes: the blocks'
    own contributions in parallel, then a scan over blocks."""
    _, H, DK = k.shape
    DV = v.shape[-1]
    ckpt = triton_utils.empty((max(plan.n_blocks, 1), H, DK, DV), torch.float32, k.device)
    ht = triton_utils.empty((plan.N, H, DK, DV), torch.float32, k.device) if want_final else None
    _block_states(k, v, ckpt, slopes, upd_scale, plan, cfg, reverse)
    _chain(ckpt, h0, ht, slopes, plan, cfg, reverse)
    return ckpt, ht


def _block_states(k, v, ckpt, slopes, upd_scale, plan, cfg, reverse):
    _, H, DK = k.shape
    DV = v.shape[-1]
    if plan.n_blocks:
        sc = min(cfg["scan_chunk"], plan.BT)
        bk = min(pow2(DK), cfg["scan_tile"])
        bv = min(pow2(DV), cfg["scan_tile"])
        _block_state_kernel[(triton.cdiv(DK, bk) * triton.cdiv(DV, bv), plan.n_blocks, H)](
            k, v, ckpt, slopes, plan.cu, plan.btab, upd_scale, H, DK, DV,
            BT=plan.BT, SC=sc, BK=bk, BV=bv, REVERSE=reverse, PREC=dot_precision(k),
            num_warps=cfg["scan_warps"], num_stages=cfg["scan_stages"],
        )


def _chain(ckpt, h0, ht, slopes, plan, cfg, reverse):
    """Block contributions in ckpt -> states, in place; chain_blocks blocks per scan, chain_elems
    state elements per program."""
    _, H, DK, DV = ckpt.shape
    ng = min(triton.next_power_of_2(max(plan.max_blocks, 1)), cfg["chain_blocks"])
    e = min(max(cfg["chain_elems"] // ng, 16), triton.next_power_of_2(DK * DV))
    _state_chain_kernel[(triton.cdiv(DK * DV, e), plan.N * H)](
        ckpt, h0 if h0 is not None else ckpt, ht if ht is not None else ckpt, slopes, plan.cu, plan.boff,
        H, DK, DV, BT=plan.BT, NG=ng, E=e, HAS_H0=h0 is not None, STORE_HT=ht is not None, REVERSE=reverse,
        num_warps=4,
    )


def _forward(q, k, v, slopes, scale, h0, want_final, plan, cfg):
    """q, k [tokens, H, DK], v [tokens, H, DV] contiguous -> (o, final state, checkpoints)."""
    _, H, DK = q.shape
    DV = v.shape[-1]
    ckpt, ht = _scan(k, v, slopes, h0, 1.0, plan, cfg, reverse=False, want_final=want_final)
    o = triton_utils.empty(v.shape, v.dtype, v.device)
    if plan.n_blocks:
        bv = min(pow2(DV), cfg["value_tile"])
        _fwd_kernel[(triton.cdiv(DV, bv), plan.n_blocks, H)](
            q, k, v, o, ckpt, slopes, plan.cu, plan.btab, scale, H, DK, DV,
            BC=cfg["chunk_size"], R=cfg["block_chunks"], BK=pow2(DK), BV=bv, PREC=dot_precision(q),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return o, ht, ckpt


def _backward(q, k, v, do, dht, slopes, scale, s_ckpt, plan, cfg, want_dh0):
    _, H, DK = q.shape
    DV = v.shape[-1]
    g_ckpt, dh0 = _scan(q, do, slopes, dht, scale, plan, cfg, reverse=True, want_final=want_dh0)
    dq = triton_utils.empty(q.shape, q.dtype, q.device)
    dk = triton_utils.empty(k.shape, k.dtype, k.device)
    dv = triton_utils.empty(v.shape, v.dtype, v.device)
    if plan.n_blocks:
        bvk = min(pow2(DK), cfg["value_tile"])
        bvv = min(pow2(DV), cfg["value_tile"])
        ntk = triton.cdiv(DK, bvk)
        fused = bool(cfg["fused_dkdv"])
        n_roles = 2 if fused else 2 * ntk + triton.cdiv(DV, bvv)
        _bwd_kernel[(n_roles, plan.n_blocks, H)](
            q, k, v, do, dq, dk, dv, s_ckpt, g_ckpt, slopes, plan.cu, plan.btab, scale, H, DK, DV, ntk,
            BC=cfg["chunk_size"], R=cfg["block_chunks"], BK=pow2(DK), BV=pow2(DV), BVK=bvk, BVV=bvv,
            FUSED_DKDV=fused, PREC=dot_precision(q), num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"],
        )
    return dq, dk, dv, dh0


class _ChunkLightningFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, scale, h0, want_final, plan, cfg):
        shape_q, shape_v = q.shape, v.shape
        H = q.shape[2]
        q, k, v = (x.reshape(-1, H, x.shape[-1]).contiguous() for x in (q, k, v))
        h0c = None if h0 is None else h0.float().contiguous()
        o, ht, ckpt = _forward(q, k, v, slopes, scale, h0c, want_final, plan, cfg)
        ctx.save_for_backward(q, k, v, slopes, ckpt)
        ctx.meta = (scale, plan, cfg, shape_q, shape_v, h0 is not None)
        return o.reshape(shape_v), ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, slopes, ckpt = ctx.saved_tensors
        scale, plan, cfg, shape_q, shape_v, has_h0 = ctx.meta
        H = q.shape[1]
        do = do.reshape(-1, H, shape_v[-1]).contiguous()
        dht = None if dht is None else dht.float().contiguous()
        want_dh0 = has_h0 and ctx.needs_input_grad[5]
        dq, dk, dv, dh0 = _backward(q, k, v, do, dht, slopes, scale, ckpt, plan, cfg, want_dh0)
        return (dq.reshape(shape_q), dk.reshape(shape_q), dv.reshape(shape_v), None, None, dh0,
                None, None, None)


def chunk_lightning_attention(q, k, v, slopes, scale=None, initial_state=None, output_final_state=False,
                              cu_seqlens=None, **config):
    """Lightning Attention with Triton kernels; differentiable in q, k, v and initial_state.

    Shapes as in ``naive.py``. ``config`` overrides the tuning knobs of ``_default_config``
    (e.g. ``chunk_size=16, block_chunks=3`` in tests). Runs on CUDA tensors, or on CPU tensors
    when this module was imported with TRITON_INTERPRET=1."""
    B, T, H, DK = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B, T, H, Dk] and v [B, T, H, Dv]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if slopes.shape != (H,):
        raise ValueError(f"slopes must have shape [{H}]; got {tuple(slopes.shape)}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs a packed batch with B == 1; got B = {B}")
    n_seq = B if cu_seqlens is None else len(cu_seqlens) - 1
    DV = v.shape[-1]
    if initial_state is not None and initial_state.shape != (n_seq, H, DK, DV):
        raise ValueError(f"initial_state must be [{n_seq}, {H}, {DK}, {DV}]; got {tuple(initial_state.shape)}")
    scale = DK**-0.5 if scale is None else float(scale)
    cfg = _default_config(B * T, H, q.device, q.dtype, DK, DV)
    unknown = set(config) - set(cfg)
    if unknown:
        raise TypeError(f"unknown config keys {sorted(unknown)}")
    cfg.update(config)
    plan = _make_plan(B, T, cu_seqlens, q.device, cfg["chunk_size"] * cfg["block_chunks"])
    slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
    return _ChunkLightningFunction.apply(q, k, v, slopes, scale, initial_state, output_final_state, plan, cfg)
