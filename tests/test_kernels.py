"""CPU tests of the Triton kernels, run by the Triton interpreter against float64 references: Lightning
Attention's (and its PyTorch references against each other, float64, with gradcheck) and Gated DeltaNet's
chunk loop and decode step.

The interpreter must be switched on (TRITON_INTERPRET=1) before triton is first imported, which
a pytest session cannot promise, so ``test_triton_kernels_in_interpreter`` runs this module again
in a fresh process with it on; there the kernel tests (marked ``interpreted``) run.

The interpreter is slow, so shapes are tiny (T <= 80, D 16/32) and the chunk is 16 tokens, but
they still cover T not a multiple of the chunk or block, varlen (with an empty sequence), an
initial state, Dk != Dv and forward plus backward. Every buffer the kernels allocate is filled
with NaN first, so an element the kernels fail to write cannot pass.
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from helpers import check_fwd_bwd, poison_kernel_buffers, rel_err
from kernels.lightning.naive import (
    lightning_attention_chunk_ref,
    lightning_attention_recurrent_ref,
    lightning_attention_step_ref,
    lightning_slopes,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs inside test_triton_kernels_in_interpreter")


def test_triton_kernels_in_interpreter():
    if INTERPRETED:
        pytest.skip("already inside the interpreted run")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    assert " passed" in run.stdout and "skipped" in run.stdout  # the outer wrapper skips itself


def _patch_interpreter_for_numpy():
    """Triton 3.6's interpreter turns a tensor into a loop bound with int() of a 1-element array,
    which NumPy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream the same way)."""
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interp._patch_lang_tensor = patched


if INTERPRETED:
    _patch_interpreter_for_numpy()
    from kernels.gated_delta import chunk_triton
    from kernels.lightning import chunk, fused_recurrent


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    if INTERPRETED:
        poison_kernel_buffers(monkeypatch)


def make_inputs(B, T, H, DK, DV, dtype, n_states=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, DK, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, DV, generator=g).to(dtype)
    h0 = None if n_states is None else torch.randn(n_states, H, DK, DV, generator=g, dtype=torch.float64).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    # Steeper slopes than the defaults of tiny H, so that chunk-to-chunk decay spans real ranges.
    slopes = lightning_slopes(H) * torch.linspace(0.2, 1.0, H)
    return q, k, v, h0, slopes


TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}

CASES = {
    # name: (B, T, H, DK, DV, dtype, cu_seqlens, initial state, config)
    "fp32-batch-h0-dk<dv": (2, 37, 2, 16, 32, torch.float32, None, True, dict(chunk_size=16, block_chunks=2, scan_chunk=16)),
    "fp32-varlen-h0-dk>dv": (1, 80, 2, 32, 16, torch.float32, [0, 5, 5, 41, 80], True,
                             dict(chunk_size=16, block_chunks=3, scan_chunk=16)),
    "bf16-batch": (2, 50, 2, 32, 32, torch.bfloat16, None, False, dict(chunk_size=16, block_chunks=2, scan_chunk=32)),
    "fp16-varlen-int32": (1, 45, 1, 16, 16, torch.float16, [0, 17, 45], True, dict(chunk_size=16, block_chunks=1, scan_chunk=16)),
    "fp32-short-seq-default-config": (1, 3, 2, 16, 16, torch.float32, None, True, {}),
    # 5 blocks chained 2 at a time: the carry between scan groups, in both directions.
    "fp32-varlen-h0-chain-groups": (1, 75, 2, 16, 16, torch.float32, [0, 70, 75], True,
                                    dict(chunk_size=16, block_chunks=1, scan_chunk=16, chain_blocks=2, chain_elems=64)),
    # dk and dv by one program carrying the whole state gradient (the fused_dkdv knob).
    "fp32-varlen-h0-dk>dv-fused-dkdv": (1, 80, 2, 32, 16, torch.float32, [0, 5, 5, 41, 80], True,
                                        dict(chunk_size=16, block_chunks=3, scan_chunk=16, fused_dkdv=True)),
    "fp32-batch-h0-dk<dv-fused-dkdv": (2, 37, 2, 16, 32, torch.float32, None, True,
                                       dict(chunk_size=16, block_chunks=2, scan_chunk=16, fused_dkdv=True)),
}


@interpreted
@pytest.mark.parametrize("name", list(CASES))
def test_triton_chunk_fwd_bwd_matches_float64_reference(name):
    B, T, H, DK, DV, dtype, cu, with_h0, cfg = CASES[name]
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32 if "int32" in name else torch.int64)
    n_states = B if cu is None else len(cu) - 1
    q, k, v, h0, slopes = make_inputs(B, T, H, DK, DV, dtype, n_states if with_h0 else None)
    leaves = [q, k, v] + ([h0] if with_h0 else [])
    for x in leaves:
        x.requires_grad_(True)
    o, ht = chunk.chunk_lightning_attention(q, k, v, slopes, None, h0, True, cu_t, **cfg)
    assert o.dtype == dtype and ht.dtype == torch.float32 and ht.shape == (n_states, H, DK, DV)

    ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    rq, rk, rv = ref_leaves[:3]
    rh0 = ref_leaves[3] if with_h0 else None
    ro, rht = lightning_attention_recurrent_ref(rq, rk, rv, slopes.double(), None, rh0, True, cu_t)
    tol = TOL[dtype]
    assert rel_err(o, ro) < tol
    assert rel_err(ht, rht) < tol

    g = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=g).to(dtype)
    dht = torch.randn(ht.shape, generator=g)
    torch.autograd.backward([o, ht], [do, dht])
    torch.autograd.backward([ro, rht], [do.double(), dht.double()])
    for name_, x, rx in zip("q k v h0".split(), leaves, ref_leaves):
        assert x.grad.dtype == x.dtype
        assert rel_err(x.grad, rx.grad) < tol, name_


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cu", [None, [0, 37, 37, 230]])
def test_fused_dkdv_chunk64_matches_float64(cu, dtype):
    """The fused_dkdv backward at the benchmark's chunk (64), through the benchmark's own variant
    check: 2-4 blocks of 2 chunks, lengths not multiples of 64, an empty sequence, an initial
    state and its gradient. fp32 is the sharp check (bf16 rounding of o alone is ~8e-3)."""
    from tools.bench_kernels import check_variant

    err = check_variant(dict(block_chunks=2, fused_dkdv=True), T=230, heads=2, cu_seqlens=cu, dim=32, device="cpu",
                        dtype=dtype)
    assert err < TOL[dtype]


@pytest.mark.parametrize("dtype, dim, fused", [(torch.bfloat16, 128, True), (torch.float32, 128, False),
                                                (torch.bfloat16, 256, False), (torch.float16, 96, True)])
def test_default_config_fuses_dkdv_only_for_16_bit_heads_up_to_128(dtype, dim, fused):
    # the fused backward keeps a whole [D, D] fp32 state per program: built for D <= 128 only
    pytest.importorskip("triton")
    from kernels.lightning.chunk import _default_config

    cfg = _default_config(65536, 8, torch.device("cpu"), dtype, dk=dim, dv=dim)
    assert cfg["fused_dkdv"] is fused
    assert (cfg["bwd_warps"], cfg["bwd_stages"]) == ((8, 3) if fused else (4, 2))


@interpreted
def test_triton_chunk_without_final_state_or_state_grad():
    q, k, v, h0, slopes = make_inputs(1, 20, 1, 16, 16, torch.float32, 1)
    q.requires_grad_(True)
    o, ht = chunk.chunk_lightning_attention(q, k, v, slopes, 0.5, h0, False, chunk_size=16, block_chunks=1)
    assert ht is None
    o.sum().backward()
    rq = q.detach().double().requires_grad_(True)
    ro, _ = lightning_attention_recurrent_ref(rq, k.double(), v.double(), slopes.double(), 0.5, h0.double())
    ro.sum().backward()
    assert rel_err(o, ro) < 2e-5 and rel_err(q.grad, rq.grad) < 2e-5


@interpreted
def test_triton_chunk_rejects_bad_arguments():
    q, k, v, h0, slopes = make_inputs(2, 8, 2, 16, 16, torch.float32, 2)
    with pytest.raises(ValueError):
        chunk.chunk_lightning_attention(q, k, v, slopes[:1])
    with pytest.raises(ValueError):
        chunk.chunk_lightning_attention(q, k, v, slopes, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError):
        chunk.chunk_lightning_attention(q, k, v, slopes, initial_state=h0[:1])
    with pytest.raises(TypeError):
        chunk.chunk_lightning_attention(q, k, v, slopes, not_a_knob=1)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_step_matches_reference_and_chunk(dtype):
    B, H, DK, DV, steps = 3, 2, 16, 32, 5
    q, k, v, h0, slopes = make_inputs(B, steps, H, DK, DV, dtype, B)
    state = h0.clone()
    outs = []
    for t in range(steps):
        o, new = fused_recurrent.fused_recurrent_lightning_step(q[:, t], k[:, t], v[:, t], slopes, state)
        ro, rnew = lightning_attention_step_ref(q[:, t].double(), k[:, t].double(), v[:, t].double(),
                                                slopes, state.double())
        assert o.dtype == dtype and new.dtype == torch.float32
        assert rel_err(o, ro) < TOL[dtype] and rel_err(new, rnew) < 1e-6
        outs.append(o)
        state = new
    # Decoding token by token continues exactly what the chunked kernel computes over the prompt.
    co, cht = chunk.chunk_lightning_attention(q, k, v, slopes, None, h0, True, chunk_size=16, block_chunks=1)
    assert rel_err(torch.stack(outs, 1), co.double()) < TOL[dtype]
    assert rel_err(state, cht) < (1e-5 if dtype == torch.float32 else TOL[dtype])


@interpreted
def test_triton_step_in_place():
    q, k, v, h0, slopes = make_inputs(2, 1, 2, 16, 16, torch.float32, 2)
    state = h0.clone()
    o, new = fused_recurrent.fused_recurrent_lightning_step(q[:, 0], k[:, 0], v[:, 0], slopes, state, out_state=state)
    ro, rnew = lightning_attention_step_ref(q[:, 0], k[:, 0], v[:, 0], slopes, h0)
    assert new.data_ptr() == state.data_ptr()
    assert rel_err(o, ro) < 1e-6 and rel_err(new, rnew) < 1e-6


# ---- Gated DeltaNet's chunk loop -----------------------------------------------------------------


def _loop_inputs(B, H, N, C, DK, DV, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    Ut, S0 = rand(B, H, N, C, DV), rand(B, H, DK, DV)
    W, q_in, k_out = (rand(B, H, N, C, DK) * 0.3 for _ in range(3))
    scores = rand(B, H, N, C, C).tril() * 0.2
    last = torch.rand(B, H, N, generator=g, dtype=torch.float64) * 0.5 + 0.5
    return [Ut, W, q_in, scores, k_out, last, S0]


@interpreted
@pytest.mark.parametrize("precise", [True, False])  # value tiles of 16 and 32
@pytest.mark.parametrize("DK, DV", [(16, 16), (24, 80)])  # (24, 80): a masked key tile, several value tiles
def test_triton_gated_delta_chunk_loop_matches_pytorch_loop_in_float64(DK, DV, precise):
    from kernels.gated_delta.chunk import chunk_state_loop

    ref_in = [x.requires_grad_(True) for x in _loop_inputs(2, 2, 3, 16, DK, DV)]
    tri_in = [x.detach().float().requires_grad_(True) for x in ref_in]
    o, S = chunk_triton.chunk_state_loop_triton(*tri_in, precise=precise)
    ro, rS = chunk_state_loop(*ref_in)
    assert o.dtype == S.dtype == torch.float32
    check_fwd_bwd([o, S], [ro, rS], tri_in, ref_in, "Ut W q_in scores k_out last S0".split(), 2e-6,
                  torch.Generator().manual_seed(1))


@interpreted
@pytest.mark.parametrize("cu", [None, [0, 5, 40]])
def test_triton_gated_delta_rule_matches_float64_recurrence(cu):
    """The whole chunked op with the Triton loop (chunk 16, T not a multiple of it, an initial state) against
    the token-by-token reference: outputs, final states and the gradients of every input."""
    from kernels.gated_delta import chunk_gated_delta_rule, gated_delta_rule_recurrent_ref

    B, T, H, DK, DV = (2, 37, 2, 16, 32) if cu is None else (1, 40, 2, 16, 32)
    n = B if cu is None else len(cu) - 1
    cu_t = None if cu is None else torch.tensor(cu)
    g = torch.Generator().manual_seed(3)
    ref_in = [torch.randn(B, T, H, DK, generator=g, dtype=torch.float64) for _ in range(2)]
    ref_in += [torch.randn(B, T, H, DV, generator=g, dtype=torch.float64),
               -torch.rand(B, T, H, generator=g, dtype=torch.float64) * 0.3,
               torch.rand(B, T, H, generator=g, dtype=torch.float64),
               torch.randn(n, H, DK, DV, generator=g, dtype=torch.float64)]
    ref_in = [x.requires_grad_(True) for x in ref_in]
    tri_in = [x.detach().float().requires_grad_(True) for x in ref_in]
    o, S = chunk_gated_delta_rule(*tri_in[:5], scale=0.7, initial_state=tri_in[5], output_final_state=True,
                                  cu_seqlens=cu_t, chunk_size=16, chunk_loop=chunk_triton.chunk_state_loop_triton)
    ro, rS = gated_delta_rule_recurrent_ref(*ref_in[:5], scale=0.7, initial_state=ref_in[5],
                                            output_final_state=True, cu_seqlens=cu_t)
    check_fwd_bwd([o, S], [ro, rS], tri_in, ref_in, "q k v g beta h0".split(), 1e-5, torch.Generator().manual_seed(4))


def _step_inputs(B, T, H, DK, DV, dtype, seed=5):
    """q, k, v, g, beta over T tokens and a start state, float64 (cast by the caller)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, DK, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, DV, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.5
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    h0 = torch.randn(B, H, DK, DV, generator=gen, dtype=torch.float64)
    return [q.to(dtype), k.to(dtype), v.to(dtype), g, beta], h0


@interpreted
@pytest.mark.parametrize("dtype, DK, DV", [(torch.float32, 16, 32), (torch.bfloat16, 16, 32),
                                           (torch.float32, 24, 80)])  # (24, 80): a masked key tile, 2 value tiles
def test_triton_gated_delta_step_matches_float64_recurrence(dtype, DK, DV):
    """Decoding token by token with the Triton step reproduces the float64 recurrence over the same tokens:
    every output and the final state."""
    from kernels.gated_delta import gated_delta_rule_recurrent_ref
    from kernels.gated_delta.fused_recurrent import fused_recurrent_gated_delta_step

    B, T, H = 2, 6, 2
    (q, k, v, g, beta), h0 = _step_inputs(B, T, H, DK, DV, dtype)
    ro, rS = gated_delta_rule_recurrent_ref(q.double(), k.double(), v.double(), g, beta, scale=0.7,
                                            initial_state=h0, output_final_state=True)
    state = h0.float()
    outs = []
    for t in range(T):
        o, state = fused_recurrent_gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t].float(), beta[:, t].float(),
                                                    state, scale=0.7)
        assert o.dtype == dtype and state.dtype == torch.float32
        outs.append(o)
    assert rel_err(torch.stack(outs, 1), ro) < TOL[dtype]
    assert rel_err(state, rS) < 1e-5


@interpreted
def test_triton_gated_delta_step_in_place():
    from kernels.gated_delta.chunk import gated_delta_rule_step
    from kernels.gated_delta.fused_recurrent import fused_recurrent_gated_delta_step

    (q, k, v, g, beta), h0 = _step_inputs(2, 1, 2, 16, 16, torch.float32)
    step = [q[:, 0], k[:, 0], v[:, 0], g[:, 0].float(), beta[:, 0].float()]
    state = h0.float()
    o, new = fused_recurrent_gated_delta_step(*step, state, out_state=state)
    ro, rnew = gated_delta_rule_step(*step, h0.float())
    assert new.data_ptr() == state.data_ptr()
    assert rel_err(o, ro) < 1e-6 and rel_err(new, rnew) < 1e-6


def test_gated_delta_step_rejects_bad_shapes():
    from kernels.gated_delta import gated_delta_rule_step

    (q, k, v, g, beta), h0 = _step_inputs(1, 1, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match=r"step expects q, k \[B, H, Dk\]"):
        gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0[..., :8])
    with pytest.raises(ValueError, match="step expects"):
        gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g, beta[:, 0], h0)


@interpreted
def test_bench_gated_delta_error_check_compares_the_two_loops():
    from tools.bench_gated_delta import check, make_inputs

    inputs = make_inputs(1, 40, 2, 16, torch.device("cpu"), torch.float32)
    assert check(inputs, chunk_size=16) < 1e-5


def test_gated_delta_launch_configs_fit_hopper_shared_memory():
    """Compiled for sm_90 (no GPU needed) at the configuration the op launches for each head dim and precision:
    Triton's default pipelining would ask for more shared memory than an H100 has, which only a launch shows."""
    pytest.importorskip("triton")
    if INTERPRETED:
        pytest.skip("compiles for the GPU: outside the interpreted run")
    from kernels.gated_delta.chunk_triton import MAX_SHARED
    from tools.bench_gated_delta import compile_report

    rows = compile_report()
    assert len(rows) == 12
    for row in rows:
        assert 0 < row["shared"] <= MAX_SHARED, row


def test_gated_delta_dispatch_picks_the_loop(monkeypatch):
    """Which loop gated_delta_rule hands the chunked form, for inputs that claim to be on CUDA."""
    pytest.importorskip("triton")
    from kernels.gated_delta import LOOP_ENV, _triton_chunk_loop
    from kernels.gated_delta.chunk_triton import chunk_state_loop_triton

    def q(dtype=torch.bfloat16, dim=64, cuda=True):
        return SimpleNamespace(is_cuda=cuda, dtype=dtype, shape=(1, 8, 2, dim))

    monkeypatch.delenv(LOOP_ENV, raising=False)
    loop = _triton_chunk_loop(q())
    assert loop.func is chunk_state_loop_triton and loop.keywords == {"precise": False}
    assert _triton_chunk_loop(q(torch.float32)).keywords == {"precise": True}
    assert _triton_chunk_loop(q(cuda=False)) is None
    assert _triton_chunk_loop(q(torch.float64)) is None
    assert _triton_chunk_loop(q(dim=256)) is None
    assert _triton_chunk_loop(q(dim=128)).keywords == {"precise": False}
    assert _triton_chunk_loop(q(torch.float32, dim=128)).keywords == {"precise": True}
    monkeypatch.setenv(LOOP_ENV, "pytorch")
    assert _triton_chunk_loop(q()) is None
    monkeypatch.setenv(LOOP_ENV, "fla")
    with pytest.raises(ValueError, match="'triton' or 'pytorch'"):
        _triton_chunk_loop(q())


def test_gated_delta_step_dispatch(monkeypatch):
    """gated_delta_rule_step takes the Triton step for inputs that claim to be on CUDA, chunk.py's PyTorch step for
    CPU and fp64 inputs and under LOOP_ENV=pytorch."""
    pytest.importorskip("triton")
    import kernels.gated_delta as gd
    from kernels.gated_delta import fused_recurrent

    seen = []
    monkeypatch.setattr(fused_recurrent, "fused_recurrent_gated_delta_step", lambda *a: seen.append("triton"))
    monkeypatch.setattr(gd.chunk, "gated_delta_rule_step", lambda *a: seen.append("pytorch"))
    monkeypatch.delenv(gd.LOOP_ENV, raising=False)
    cuda_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    for q in (cuda_bf16, SimpleNamespace(is_cuda=True, dtype=torch.float64), SimpleNamespace(is_cuda=False,
                                                                                            dtype=torch.float32)):
        gd.gated_delta_rule_step(q, None, None, None, None, None)
    monkeypatch.setenv(gd.LOOP_ENV, "pytorch")
    gd.gated_delta_rule_step(cuda_bf16, None, None, None, None, None)
    assert seen == ["triton", "pytorch", "pytorch", "pytorch"]


def test_triton_gated_delta_chunk_loop_rejects_bad_arguments():
    pytest.importorskip("triton")
    from kernels.gated_delta.chunk_triton import chunk_state_loop_triton

    args = [x.float() for x in _loop_inputs(1, 2, 2, 16, 16, 16)]
    with pytest.raises(ValueError, match="scores must be"):
        chunk_state_loop_triton(*args[:3], args[3][..., :8], *args[4:])
    with pytest.raises(ValueError, match="fp32"):
        chunk_state_loop_triton(*[x.double() for x in args])
    bad_chunk = _loop_inputs(1, 2, 2, 12, 16, 16)
    with pytest.raises(ValueError, match="power of two"):
        chunk_state_loop_triton(*[x.float() for x in bad_chunk])
    wide = _loop_inputs(1, 1, 1, 16, 256, 16)
    with pytest.raises(ValueError, match="up to 128"):
        chunk_state_loop_triton(*[x.float() for x in wide])


# ---- the references themselves (float64, no Triton) --------------------------------------------


def test_reference_chunk_gradcheck():
    q, k, v, h0, slopes = (x.double() if x is not None else None for x in make_inputs(1, 7, 2, 3, 4, torch.float64, 1))
    inputs = [x.requires_grad_(True) for x in (q, k, v, h0)]

    def f(q, k, v, h0):
        return lightning_attention_chunk_ref(q, k, v, slopes, 0.7, h0, True, chunk_size=3)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("cu", [None, [0, 3, 3, 19, 24]])
def test_references_chunked_recurrent_and_decode_agree(cu):
    B = 2 if cu is None else 1
    cu_t = None if cu is None else torch.tensor(cu)
    n = B if cu is None else len(cu) - 1
    q, k, v, h0, slopes = make_inputs(B, 24, 3, 5, 6, torch.float64, n)
    slopes = slopes.double()
    rec, rec_h = lightning_attention_recurrent_ref(q, k, v, slopes, None, h0, True, cu_t)
    for C in (1, 4, 7, 64):
        o, h = lightning_attention_chunk_ref(q, k, v, slopes, None, h0, True, cu_t, chunk_size=C)
        torch.testing.assert_close(o, rec, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h, rec_h, rtol=1e-10, atol=1e-10)
    # Token-by-token decode with the step reference reproduces every output and the final states.
    bounds = [(0, 24)] * B if cu is None else list(zip(cu[:-1], cu[1:]))
    for i, (s, e) in enumerate(bounds):
        b = i if cu is None else 0
        state = h0[i : i + 1]
        for t in range(s, e):
            o_t, state = lightning_attention_step_ref(q[b : b + 1, t], k[b : b + 1, t], v[b : b + 1, t], slopes, state)
            torch.testing.assert_close(o_t[0], rec[b, t], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state[0], rec_h[i], rtol=1e-10, atol=1e-10)
