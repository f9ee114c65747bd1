"""Benchmark Gated DeltaNet's chunked op with its loop over chunks in Triton against the same op with
the PyTorch loop, side by side in one process, with Lightning Attention at the same shape for scale.

    python -m tools.bench_gated_delta --out gated_delta.md [--shapes 2x1024x10x64 1x8192x16x64]

A shape is BxTxHxD (q, k, v [B, T, H, D], bf16 as the trainer's layers hand them over; the op computes in
fp32). For each shape: the Triton path's output and input gradients against the PyTorch path's (relative
L2 error), then forward and forward+backward times (medians of triton.testing.do_bench) and the ratio.
The first shape is issue #7's Gated DeltaNet layer (micro-batch 2 of 1024 tokens, 10 heads of 64).
The timing needs a GPU; tests/test_kernels.py runs the error check on CPU through the Triton interpreter.
--compile-report needs none: the kernels' shared memory, registers and spills, compiled for sm_90 at the
launch configuration of each head dim.
"""

import argparse
import datetime

import torch

from kernels import lightning_attention, lightning_slopes
from kernels.gated_delta import _triton_chunk_loop, chunk_gated_delta_rule
from kernels.gated_delta.chunk import chunk_state_loop

PATHS = ("PyTorch loop", "Triton loop")


def make_inputs(B, T, H, D, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, device=device, generator=g, dtype=torch.float32)  # noqa: E731
    q, k, v = (rand(B, T, H, D).to(dtype).requires_grad_() for _ in range(3))
    # the layer's parametrisation: g = -A softplus(.) <= 0 with Lightning-like decays, beta = sigmoid(.)
    gate = (-lightning_slopes(H).to(device) * torch.nn.functional.softplus(rand(B, T, H))).requires_grad_()
    beta = torch.sigmoid(rand(B, T, H)).requires_grad_()
    return [q, k, v, gate, beta]


def run(inputs, loop, chunk_size):
    from kernels.gated_delta.chunk_triton import chunk_state_loop_for

    fn = chunk_state_loop if loop == PATHS[0] else chunk_state_loop_for(inputs[0].dtype)  # as the trainer runs it
    return chunk_gated_delta_rule(*inputs, chunk_size=chunk_size, chunk_loop=fn)[0]


def check(inputs, chunk_size):
    """Relative L2 error of the Triton path's output and gradients against the PyTorch path's."""
    grads = {}
    for loop in PATHS:
        o = run(inputs, loop, chunk_size)
        do = torch.randn(o.shape, generator=torch.Generator(device=o.device).manual_seed(1), device=o.device)
        grads[loop] = [o.detach().float()] + [gr.float() for gr in torch.autograd.grad(o.float(), inputs, do)]
    return max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(grads[PATHS[1]], grads[PATHS[0]]))


def time_both(fn, inputs):
    from triton.testing import do_bench

    with torch.no_grad():
        fwd = do_bench(fn, warmup=10, rep=100, return_mode="median")

    def fwd_bwd():
        fn().float().sum().backward()

    return fwd, do_bench(fwd_bwd, warmup=10, rep=100, grad_to_none=inputs, return_mode="median")


def compile_report(head_dims=(32, 64, 128)):
    """Rows of (head dim, precise, kernel, warps, shared bytes, cuobjdump's REG/STACK line) at the launch
    configuration the op picks, compiled for sm_90 on any machine."""
    from kernels.gated_delta import chunk_triton as ct
    from tools.bench_kernels import compile_sm90

    rows = []
    for dim in head_dims:
        for precise in (False, True):
            bk, bv, _, prec = ct.launch_config(dim, dim, precise)
            consts = dict(DK=dim, DV=dim, C=64, BK=bk, BV=bv, PREC=prec)
            for fn in (ct._fwd_kernel, ct._bwd_kernel):
                sig = {a: "*fp32" if a.endswith("_ptr") else "i32" for a in fn.arg_names if a not in consts}
                shared, regs = compile_sm90(fn, sig, consts, ct.WARPS, ct.STAGES)
                rows.append(dict(head_dim=dim, precise=precise, kernel=fn.__name__, warps=ct.WARPS, shared=shared,
                                 regs=regs))
                print(f"D={dim} {prec} {fn.__name__}: value tile {bv}, {ct.WARPS} warps, {ct.STAGES} stage, "
                      f"shared {shared} B; {regs}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+",
                   default=["2x1024x10x64", "1x8192x16x64", "1x8192x16x128", "1x32768x16x128"],
                   help="BxTxHxD of q, k, v")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--out", help="append the markdown table here")
    p.add_argument("--compile-report", action="store_true", help="compile for sm_90 and report resources; no GPU")
    args = p.parse_args(argv)
    if args.compile_report:
        return compile_report()
    if not torch.cuda.is_available():
        p.error("no CUDA device: the timing needs a GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16

    rows = ["| B x T x H x D | path | fwd ms | fwd+bwd ms | PyTorch loop time / this | max rel. error vs PyTorch loop |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    for shape in args.shapes:
        B, T, H, D = (int(x) for x in shape.split("x"))
        inputs = make_inputs(B, T, H, D, device, dtype)
        if _triton_chunk_loop(inputs[0]) is None:
            print(f"{shape}: the op keeps the PyTorch loop at this head dim "
                  "(kernels/gated_delta/chunk_triton.py, MAX_HEAD_DIM); not timed", flush=True)
            continue
        err = check(inputs, args.chunk_size)
        print(f"{shape}: Triton loop vs PyTorch loop, max rel. error {err:.2e}", flush=True)
        times = {loop: time_both(lambda loop=loop: run(inputs, loop, args.chunk_size), inputs) for loop in PATHS}
        slopes = lightning_slopes(H).to(device)
        times["Lightning (Triton), same shape"] = time_both(lambda: lightning_attention(*inputs[:3], slopes)[0],
                                                            inputs[:3])
        base = times[PATHS[0]][1]
        for name, (fwd, both) in times.items():
            note = f"{err:.2e}" if name == PATHS[1] else ""
            rows.append(f"| {shape} | {name} | {fwd:.3f} | {both:.3f} | {base / both:.2f}x | {note} |")
            print(rows[-1], flush=True)
        del inputs
    table = "\n".join([f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}", ""] + rows)
    print("\n" + table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
