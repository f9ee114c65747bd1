"""Benchmark the Lightning Attention kernels against SDPA (flash) and fla, with roofline floors.

    python -m tools.bench_kernels --out bench.md [--sweep] [--no-fla]

One run measures, on the current GPU: the ceilings (device-to-device copy bandwidth, bf16 matmul
rate), then at T = 4K, 16K, 64K, 128K (B=1, H=16, D=128, bf16) our forward and forward+backward,
torch SDPA causal attention on the flash backend, and fla's chunk_simple_gla / chunk_gla where
they run; then the decode step at batch 1, 8, 64, 256. Times are medians of
triton.testing.do_bench on fresh random inputs. The floor of a row is
max(FLOPs / matmul rate, minimum bytes / copy bandwidth); "x floor" is time over floor.
"""

import argparse
import datetime
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


def time_ours(T, cfg=None):
    cfg = cfg or {}
    q, k, v = (rand(B, T, H, D, requires_grad=True) for _ in range(3))
    slopes = lightning_slopes(H).cuda()
    do = rand(B, T, H, D)
    with torch.no_grad():
        fwd = bench(lambda: chunk_lightning_attention(q, k, v, slopes, **cfg))

    def fwd_bwd():
        o, _ = chunk_lightning_attention(q, k, v, slopes, **cfg)
        o.backward(do)

    both = bench(fwd_bwd, grad_to_none=[q, k, v])
    return fwd, both


def time_parts(T, cfg):
    """Scan, forward and backward passes timed apart (for the notes)."""
    c = lchunk._default_config(B * T, H, torch.device("cuda"))
    c.update(cfg)
    q, k, v, do = (rand(B * T, H, D) for _ in range(4))
    slopes = lightning_slopes(H).cuda()
    plan = lchunk._make_plan(B, T, None, q.device, c["chunk_size"] * c["block_chunks"])
    scale = D**-0.5
    scan = bench(lambda: lchunk._scan(k, v, slopes, None, 1.0, plan, c, False, False))
    fwd = bench(lambda: lchunk._forward(q, k, v, slopes, scale, None, False, plan, c))
    _, _, ckpt = lchunk._forward(q, k, v, slopes, scale, None, False, plan, c)
    bwd = bench(lambda: lchunk._backward(q, k, v, do, None, slopes, scale, ckpt, plan, c, False))
    return scan, fwd - scan, bwd, c


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--fla-ops", default="chunk_simple_gla,chunk_gla")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time tuning variants at T=64K")
    ap.add_argument("--lengths", default="4096,16384,65536,131072")
    args = ap.parse_args()

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
                         + (["", "Tuning sweep at T=65536 (default config "
                             f"{lchunk._default_config(65536, H, torch.device('cuda'))}):", ""] + sweep_rows
                            if sweep_rows else []))
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return text

    table.on_row = report
    lengths = [int(t) for t in args.lengths.split(",")]
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
        of, ob = time_ours(T)
        table.add(T, "ours (Triton)", "fwd", of, lightning_flops(T, False), lightning_bytes(T, False), sf)
        table.add(T, "ours (Triton)", "fwd+bwd", ob, lightning_flops(T, True), lightning_bytes(T, True), sb)
        torch.cuda.empty_cache()

    step_rows += ["| batch | ms | GB/s | % of copy bandwidth |", "| --- | --- | --- | --- |"]
    for batch in (1, 8, 64, 256):
        ms, nbytes = time_step(batch)
        gbs = nbytes / ms / 1e6
        step_rows.append(f"| {batch} | {ms:.4f} | {gbs:.0f} | {100 * gbs / (bw * 1e3):.0f}% |")
        print(step_rows[-1], flush=True)
        report()

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

    if args.sweep:
        sweep_rows += ["| config | scan ms | fwd kernel ms | backward ms (G scan + bwd kernel) |", "| --- | --- | --- | --- |"]
        variants = [
            {},
            dict(block_chunks=4), dict(block_chunks=16),
            dict(bwd_stages=2), dict(value_tile=128, num_warps=8, bwd_stages=2),
            dict(scan_stages=3), dict(scan_chunk=64), dict(scan_chunk=256, scan_warps=8),
            dict(scan_tile=128, scan_warps=8), dict(scan_tile=32),
        ]
        for var in variants:
            try:
                scan, fwd, bwd, c = time_parts(65536, var)
                sweep_rows.append(f"| {var or 'default'} | {scan:.3f} | {fwd:.3f} | {bwd:.3f} |")
            except Exception as e:  # noqa: BLE001
                sweep_rows.append(f"| {var} | failed: {type(e).__name__}: {str(e)[:100]} | | |")
            print(sweep_rows[-1], flush=True)
            report()

    print("\n" + report())


if __name__ == "__main__":
    main()
