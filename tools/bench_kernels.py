"""Benchmark the Lightning Attention kernels against SDPA (flash) and fla, with roofline floors.

    python -m tools.bench_kernels --out bench.md [--sweep] [--no-fla]

One run measures, on the current GPU: the ceilings (device-to-device copy bandwidth, bf16 matmul
rate), then at T = 4K, 16K, 64K, 128K (B=1, H=16, D=128, bf16) our forward and forward+backward
(default config, plus one row pair per --variants config), torch SDPA causal attention on the
flash backend, and fla's chunk_simple_gla / chunk_gla where they run; then the decode step at
batch 1, 8, 64, 256. --sweep times the passes apart for a few configs (its own list, or
--sweep-variants; and --baseline, an older chunk.py, in the same process); --compile-report needs
no GPU. Times are medians of
triton.testing.do_bench on fresh random inputs. The floor of a row is
max(FLOPs / matmul rate, minimum bytes / copy bandwidth); "x floor" is time over floor.
"""

import argparse
import datetime
import json
import math
import subprocess
import sys

import torch
import triton
from triton.testing import do_bench

from kernels.lightning import chunk as lchunk
from kernels.lightning.chunk import chunk_lightning_attention
from kernels.lightning.fused_recurrent import fused_recurrent_lightning_step
from kernels.lightning.naive import lightning_slopes

B, H, D = 1, 16, 128
DT = torch.bfloat16
CHUNK = 64


def bench(fn, grad_to_none=None):
    return do_bench(fn, warmup=30, rep=200, grad_to_none=grad_to_none, return_mode="median")


def ceilings():
    n = 1 << 30  # 1 GiB each way
    src = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    bw = 2 * n / copy_ms / 1e9  # TB/s: bytes read + bytes written
    del src, dst
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = bench(lambda: a @ b)
    rate = 2 * 8192**3 / mm_ms / 1e9  # TFLOP/s
    return bw, rate


def lightning_flops(T, bwd):
    """Useful FLOPs of the chunked algorithm (chunk 64): per token and head, forward does the
    intra-chunk q k^T and (s) v plus q S and the k^T v state update; backward recomputes two score
    matrices and does three intra-chunk products and five [Dk x Dv] products."""
    fwd = CHUNK * D + CHUNK * D + 2 * D * D
    back = 2 * CHUNK * D + 3 * CHUNK * D + 5 * D * D
    return 2 * B * T * H * (fwd + (back if bwd else 0))


def lightning_bytes(T, bwd):
    """Each input read once and each output written once: q, k, v, o (+ do, dq, dk, dv)."""
    return B * T * H * D * 2 * (11 if bwd else 4)


def sdpa_flops(T, bwd):
    fwd = 2 * B * H * T * T * D  # two causal (half) T x T x D products
    return fwd * (3.5 if bwd else 1.0)


class Table:
    def __init__(self, bw, rate):
        self.bw, self.rate, self.rows = bw, rate, []
        self.on_row = lambda: None

    def add(self, T, impl, what, ms, flops, nbytes, sdpa_ms=None, note=""):
        if ms is None:
            self.rows.append(f"| {T} | {impl} | {what} | n/a | | | | | | {note} |")
            self.on_row()
            return
        floor = max(flops / self.rate / 1e9, nbytes / self.bw / 1e6)  # ms: TFLOP/s and GB/s
        vs = f"{sdpa_ms / ms:.1f}x" if sdpa_ms else ""
        self.rows.append(f"| {T} | {impl} | {what} | {ms:.3f} | {flops / ms / 1e9:.0f} | {nbytes / ms / 1e6:.0f} | "
                         f"{floor:.3f} | {ms / floor:.2f} | {vs} | {note} |")
        print(self.rows[-1], flush=True)
        self.on_row()

    def markdown(self):
        head = ("| T | impl | pass | ms | TFLOP/s | GB/s | floor ms | x floor | SDPA time / this | note |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        return "\n".join([head] + self.rows)


def rand(*shape, requires_grad=False):
    return torch.randn(*shape, device="cuda", dtype=DT).requires_grad_(requires_grad)


def time_ours(T, cfg=None, fn=chunk_lightning_attention):
    cfg = cfg or {}
    q, k, v = (rand(B, T, H, D, requires_grad=True) for _ in range(3))
    slopes = lightning_slopes(H).cuda()
    do = rand(B, T, H, D)
    with torch.no_grad():
        fwd = bench(lambda: fn(q, k, v, slopes, **cfg))

    def fwd_bwd():
        o, _ = fn(q, k, v, slopes, **cfg)
        o.backward(do)

    both = bench(fwd_bwd, grad_to_none=[q, k, v])
    return fwd, both


def time_parts(T, cfg, mod=lchunk):
    """The passes timed apart (for the notes): block states, chain, forward kernel, then the
    backward's reverse state pass and its kernel. mod: this chunk module or a baseline copy
    (--baseline), timed in the same process; a module without the split reports the two
    state-pass kernels together."""
    c = mod._default_config(B * T, H, torch.device("cuda"))
    c.update(cfg)
    q, k, v, do = (rand(B * T, H, D) for _ in range(4))
    slopes = lightning_slopes(H).cuda()
    plan = mod._make_plan(B, T, None, q.device, c["chunk_size"] * c["block_chunks"])
    scale = D**-0.5
    scan = bench(lambda: mod._scan(k, v, slopes, None, 1.0, plan, c, False, False))
    if hasattr(mod, "_chain"):
        ckpt, _ = mod._scan(k, v, slopes, None, 1.0, plan, c, False, False)
        chain = bench(lambda: mod._chain(ckpt, None, None, slopes, plan, c, False))
    else:
        chain = 0.0
    fwd = bench(lambda: mod._forward(q, k, v, slopes, scale, None, False, plan, c))
    _, _, ckpt = mod._forward(q, k, v, slopes, scale, None, False, plan, c)
    g_scan = bench(lambda: mod._scan(q, do, slopes, None, scale, plan, c, True, False))
    bwd = bench(lambda: mod._backward(q, k, v, do, None, slopes, scale, ckpt, plan, c, False))
    return dict(block_states=scan - chain, chain=chain, fwd_kernel=fwd - scan, g_scan=g_scan, bwd_kernel=bwd - g_scan,
                bwd=bwd), c


def check_variant(cfg, fn=chunk_lightning_attention, T=4096 + 37, heads=4, cu_seqlens=None, dim=D, device="cuda",
                  dtype=DT):
    """Largest relative error of o, final state and the four gradients against the float64
    chunked reference, for a config the GPU tests do not run (ragged T, initial state, and with
    cu_seqlens, e.g. [0, 100, 100, T], packed sequences). On CPU it runs under TRITON_INTERPRET=1
    (tests/test_kernels.py, small T and dim)."""
    from kernels.lightning.naive import lightning_attention_chunk_ref

    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, T, heads, dim, device=device, generator=g).to(dtype).requires_grad_(True)
               for _ in range(3))
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=device)
    n_seq = 1 if cu is None else len(cu) - 1
    h0 = torch.randn(n_seq, heads, dim, dim, device=device, generator=g).requires_grad_(True)
    slopes = lightning_slopes(heads).to(device)
    leaves = [q, k, v, h0]
    refs = [x.detach().double().requires_grad_(True) for x in leaves]
    o, ht = fn(q, k, v, slopes, None, h0, True, cu, **cfg)
    ro, rht = lightning_attention_chunk_ref(*refs[:3], slopes.double(), None, refs[3], True, cu)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    torch.autograd.backward([o, ht], [do, dht])
    torch.autograd.backward([ro, rht], [do.double(), dht.double()])
    pairs = [(o, ro), (ht, rht)] + [(x.grad, r.grad) for x, r in zip(leaves, refs)]
    errors = [((a.double() - b).norm() / b.norm()).item() for a, b in pairs]
    # max() keeps a NaN only when it comes first: an unwritten (NaN) element must never read as accurate
    return max(errors) if all(math.isfinite(e) for e in errors) else float("nan")


def load_baseline(path):
    """An earlier chunk.py (e.g. from `git show`) as a module, to time before/after in one process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lightning_chunk_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def time_sdpa(T):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (rand(B, H, T, D, requires_grad=True) for _ in range(3))
    do = rand(B, H, T, D)
    f = torch.nn.functional.scaled_dot_product_attention
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with torch.no_grad():
            fwd = bench(lambda: f(q, k, v, is_causal=True))
        both = bench(lambda: f(q, k, v, is_causal=True).backward(do), grad_to_none=[q, k, v])
    return fwd, both


def time_fla(T, which):
    """fla forward (and forward+backward) or the reason it does not run."""
    q, k, v = (rand(B, T, H, D, requires_grad=True) for _ in range(3))
    slopes = lightning_slopes(H).cuda()
    if which == "chunk_simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla

        # g_gamma: fla's per-head constant log-decay, i.e. Lightning Attention exactly.
        def fn():
            return chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=D**-0.5)[0]
    else:
        from fla.ops.gla import chunk_gla

        g = (-slopes)[:, None].expand(B, T, H, D).contiguous()

        def fn():
            return chunk_gla(q, k, v, g, scale=D**-0.5)[0]
    do = rand(B, T, H, D)
    with torch.no_grad():
        fwd = bench(fn)
    try:
        both = bench(lambda: fn().backward(do), grad_to_none=[q, k, v])
        note = ""
    except Exception as e:  # noqa: BLE001 - the reason goes into the table
        both, note = None, f"backward: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return fwd, both, note


def time_step(batch):
    """Decode step; input sets rotate so that at least ~200 MB is touched (no L2 hits)."""
    per_call = batch * H * D * D * 4 * 2
    n_sets = max(1, min(64, -(-200_000_000 // per_call)))
    sets = [(rand(batch, H, D), rand(batch, H, D), rand(batch, H, D),
             torch.randn(batch, H, D, D, device="cuda")) for _ in range(n_sets)]
    slopes = lightning_slopes(H).cuda()
    it = [0]

    def step():
        q, k, v, s = sets[it[0] % n_sets]
        it[0] += 1
        fused_recurrent_lightning_step(q, k, v, slopes, s)

    ms = bench(step)
    nbytes = per_call + batch * H * D * 2 * 4
    return ms, nbytes


def compile_report(overrides=None):
    """Shared memory, registers and stack (spills) of each kernel at the benchmark shape, compiled
    for sm_90 on any machine (ptxas and cuobjdump ship with Triton): a spill or a shared-memory
    size that allows one CTA per SM shows here without device time."""
    c = lchunk._default_config(65536, H, torch.device("cpu"))
    c.update(overrides or {})
    bf, f32 = "*bf16", "*fp32"
    common = dict(slopes_ptr=f32, cu_ptr="*i64", btab_ptr="*i32")
    R, BC = c["block_chunks"], c["chunk_size"]
    kernels = {
        "_block_state_kernel": (dict(k_ptr=bf, v_ptr=bf, buf_ptr=f32, **common, upd_scale="fp32"),
                                dict(H=H, DK=D, DV=D, BT=BC * R, SC=c["scan_chunk"], BK=c["scan_tile"],
                                     BV=c["scan_tile"], REVERSE=False, PREC="tf32"),
                                c["scan_warps"], c["scan_stages"]),
        "_state_chain_kernel": (dict(buf_ptr=f32, h0_ptr=f32, ht_ptr=f32, slopes_ptr=f32, cu_ptr="*i64",
                                     boff_ptr="*i64"),
                                dict(H=H, DK=D, DV=D, BT=BC * R, NG=c["chain_blocks"],
                                     E=c["chain_elems"] // c["chain_blocks"], HAS_H0=False, STORE_HT=False,
                                     REVERSE=False), 4, 1),
        "_fwd_kernel": (dict(q_ptr=bf, k_ptr=bf, v_ptr=bf, o_ptr=bf, ckpt_ptr=f32, **common, scale="fp32"),
                        dict(H=H, DK=D, DV=D, BC=BC, R=R, BK=D, BV=c["value_tile"], PREC="tf32"),
                        c["num_warps"], c["num_stages"]),
        "_bwd_kernel": (dict(q_ptr=bf, k_ptr=bf, v_ptr=bf, do_ptr=bf, dq_ptr=bf, dk_ptr=bf, dv_ptr=bf, s_ckpt_ptr=f32,
                             g_ckpt_ptr=f32, **common, scale="fp32"),
                        dict(H=H, DK=D, DV=D, NTK=D // c["value_tile"], BC=BC, R=R, BK=D, BV=D, BVK=c["value_tile"],
                             BVV=c["value_tile"], FUSED_DKDV=bool(c["fused_dkdv"]), PREC="tf32"),
                        c["bwd_warps"], c["bwd_stages"]),
    }
    print(f"sm_90, H={H}, D={D}, bf16, default config at T=65536: {c}")
    for name, (sig, consts, warps, stages) in kernels.items():
        shared, regs = compile_sm90(getattr(lchunk, name), sig, consts, warps, stages)
        print(f"{name}: {warps} warps, {stages} stages, shared {shared} B; {regs}")


def compile_sm90(fn, sig, consts, warps, stages):
    """(shared memory in bytes, cuobjdump's REG/STACK line) of a Triton kernel compiled for sm_90 on any
    machine (ptxas and cuobjdump ship with Triton). sig: pointer and scalar argument types; consts: the
    constexpr arguments."""
    import os
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    # Pointers 16-byte aligned, as the launcher specialises them on the GPU (vector loads, cp.async).
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items() if t.startswith("*")}
    src = ASTSource(fn, {**sig, **{a: "constexpr" for a in consts}}, constexprs=consts, attrs=attrs)
    kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kern.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return kern.metadata.shared, next((line.strip() for line in usage.splitlines() if "REG:" in line), usage.strip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--fla-ops", default="chunk_simple_gla,chunk_gla")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time the passes apart for tuning variants")
    ap.add_argument("--sweep-lengths", default="65536,131072", help="T of the sweep (the variants at the first)")
    ap.add_argument("--lengths", default="4096,16384,65536,131072")
    ap.add_argument("--baseline", default=None, help="an earlier chunk.py to time beside this one in --sweep")
    ap.add_argument("--skip-table", action="store_true", help="only the sweep (with --sweep)")
    ap.add_argument("--only", default=None, help="comma-separated indices of the sweep runs to time")
    ap.add_argument("--sweep-variants", default=None,
                    help="JSON list of config overrides the sweep times after the default (instead of its own list)")
    ap.add_argument("--variants", default="[]",
                    help='JSON list of config overrides timed as extra table rows, e.g. \'[{"block_chunks": 16}]\'')
    ap.add_argument("--compile-report", nargs="?", const="{}", default=None, metavar="JSON",
                    help="no GPU needed: compile the kernels for sm_90 (default config, updated by the JSON "
                         "object given) and print shared memory, registers, spills")
    args = ap.parse_args()
    if args.compile_report is not None:
        compile_report(json.loads(args.compile_report))
        return

    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    bw, rate = ceilings()
    lines = [f"device: {dev} ({smi}); torch {torch.__version__}, triton {triton.__version__}; "
             f"{datetime.date.today()}",
             f"command: {' '.join(['python -m tools.bench_kernels'] + sys.argv[1:])}",
             f"ceilings measured in this run: copy {bw:.2f} TB/s (read+write), bf16 matmul {rate:.0f} TFLOP/s",
             f"shapes: B={B}, H={H}, D={D}, {DT}; ours default config per T (chunk 64)", ""]
    print("\n".join(lines), flush=True)
    table = Table(bw * 1e3, rate)  # GB/s and TFLOP/s

    step_rows, sweep_rows = [], []

    def report():
        """The whole markdown so far; rewritten to --out after every row, so a run cut short
        still leaves its numbers."""
        text = "\n".join(lines + [table.markdown()]
                         + (["", "Decode step (B x H=16 x 128 x 128 fp32 state, read + written):", ""] + step_rows
                            if step_rows else [])
                         + (["", "Tuning sweep, ms (default config at T=65536: "
                             f"{lchunk._default_config(65536, H, torch.device('cuda'))}):", ""] + sweep_rows
                            if sweep_rows else []))
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return text

    table.on_row = report
    lengths = [] if args.skip_table else [int(t) for t in args.lengths.split(",")]
    variants = json.loads(args.variants)
    sdpa = {}
    for T in lengths:
        sf = sb = None
        if not args.no_sdpa:
            try:
                sf, sb = time_sdpa(T)
                table.add(T, "SDPA flash", "fwd", sf, sdpa_flops(T, False), lightning_bytes(T, False))
                table.add(T, "SDPA flash", "fwd+bwd", sb, sdpa_flops(T, True), lightning_bytes(T, True))
            except Exception as e:  # noqa: BLE001
                table.add(T, "SDPA flash", "fwd", None, 0, 0, note=f"{type(e).__name__}: {str(e)[:80]}")
            torch.cuda.empty_cache()
        sdpa[T] = (sf, sb)
        for var in [{}] + variants:
            of, ob = time_ours(T, var)
            name = "ours (Triton)" + (f" {var}" if var else "")
            table.add(T, name, "fwd", of, lightning_flops(T, False), lightning_bytes(T, False), sf)
            table.add(T, name, "fwd+bwd", ob, lightning_flops(T, True), lightning_bytes(T, True), sb)
        torch.cuda.empty_cache()

    step_rows += [] if args.skip_table else ["| batch | ms | GB/s | % of copy bandwidth |", "| --- | --- | --- | --- |"]
    for batch in () if args.skip_table else (1, 8, 64, 256):
        ms, nbytes = time_step(batch)
        gbs = nbytes / ms / 1e6
        step_rows.append(f"| {batch} | {ms:.4f} | {gbs:.0f} | {100 * gbs / (bw * 1e3):.0f}% |")
        print(step_rows[-1], flush=True)
        report()

    if args.sweep:
        sweep_rows += ["| T | version | config | block states | chain | fwd kernel | G scan | bwd kernel | fwd "
                       "| fwd+bwd | max rel err (T=4133) |",
                       "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        sweep_variants = [
            {},
            dict(block_chunks=16),
            dict(block_chunks=16, scan_chunk=128, scan_tile=64, scan_warps=4),  # v5 as first measured
            dict(bwd_stages=3),
        ]
        if args.sweep_variants is not None:
            sweep_variants = [{}] + json.loads(args.sweep_variants)
        base = load_baseline(args.baseline) if args.baseline else None
        runs = []
        lens = [int(t) for t in args.sweep_lengths.split(",")]
        for T in lens:  # before/after first, then the variants
            runs += [(T, "baseline", {}, base)] if base else []
            runs += [(T, "new", {}, lchunk)]
        runs += [(lens[0], "new", var, lchunk) for var in sweep_variants[1:]]
        if args.only:
            runs = [r for i, r in enumerate(runs) if i in {int(x) for x in args.only.split(",")}]
        for T, version, var, mod in runs:
            try:
                parts, c = time_parts(T, var, mod)
                e2e = time_ours(T, var, mod.chunk_lightning_attention)
                err = check_variant(var, mod.chunk_lightning_attention)
                sweep_rows.append(f"| {T} | {version} | {var or 'default'} | "
                                  + " | ".join(f"{parts[x]:.3f}" for x in ("block_states", "chain", "fwd_kernel",
                                                                           "g_scan", "bwd_kernel"))
                                  + f" | {e2e[0]:.3f} | {e2e[1]:.3f} | {err:.1e} |")
            except Exception as e:  # noqa: BLE001
                sweep_rows.append(f"| {T} | {version} | {var} | failed: {type(e).__name__}: {str(e)[:100]} "
                                  "| | | | | | | |")
            print(sweep_rows[-1], flush=True)
            report()
            torch.cuda.empty_cache()

    # fla last: its autotuning takes minutes on first use.
    for T in [] if args.no_fla else lengths:
        sf, sb = sdpa[T]
        for which in args.fla_ops.split(","):
            try:
                ff, fb, note = time_fla(T, which)
                table.add(T, f"fla {which}", "fwd", ff, lightning_flops(T, False), lightning_bytes(T, False), sf)
                table.add(T, f"fla {which}", "fwd+bwd", fb, lightning_flops(T, True), lightning_bytes(T, True),
                          sb, note=note)
            except Exception as e:  # noqa: BLE001
                table.add(T, f"fla {which}", "fwd", None, 0, 0,
                          note=f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
            torch.cuda.empty_cache()

    print("\n" + report())


if __name__ == "__main__":
    main()
