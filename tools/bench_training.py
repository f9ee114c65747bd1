"""Training throughput on one GPU: a HypeNet student against the same shape with every layer attention.

    python -m tools.bench_training --seq-lengths 8192 32768 --out bench_training.json
    python -m tools.bench_training --tiny          # CPU, a few seconds: checks the path, claims nothing
    python -m tools.bench_training --model reproduce-teacher --seq-lengths 1024 --micro-batch-size 32 --compile
        # issue #7's teacher and student, eager against torch.compile'd layers (`--compile` of the trainer)
    python -m tools.bench_training --model reproduce-teacher --seq-lengths 1024 --micro-batch-size 2 \
        --rnn-mixer gated_deltanet   # the student with Gated DeltaNet layers, its chunk loop in Triton and
                                     # in PyTorch (HYPENET_GATED_DELTA_LOOP=pytorch), beside all-attention

One process builds each model through the trainer's own code (`config.make_config`,
`model.build_model`) and times training steps exactly as `finetune` trains: random tokens, the
final hidden states from `halo.stages.forward_hidden`, the chunked LM-head CE of
`losses.chunked_cross_entropy`, backward, `training.clip_grad_norm` and torch AdamW, on fp32
master weights under bf16 autocast (what `--bf16` does). Attention runs through torch SDPA,
Lightning through the repository's Triton kernel.

Model FLOPs per step (training = 3 x forward; what MFU divides by the peak):
    dense     6 * N * tokens, N = weights of every matmul (QKV, output, gate and MLP
              projections, and the LM head once; the embedding lookup is not a matmul)
    attention 6 * b * s^2 * H * D per attention layer: forward QK^T and PV are 2 * 2 * s^2 * H * D
              per sequence, causal halves that, x3 for training (Megatron's 12 * s^2 * h, causal)
    Lightning 3 * tokens * H * (2 * C * D + 4 * D^2) per Lightning layer, chunk C = 64: per token and
              head the forward does the causal intra-chunk q k^T and (q k^T) v (2 * C/2 * D each), the
              inter-chunk q S and the k^T v state update (2 * D^2 each)
Not counted: Gated DeltaNet's mixer (a Gated DeltaNet student's MFU is a lower bound), norms, RoPE,
softmax, elementwise work, the LM head recomputed by the chunked loss and layers recomputed under
activation recompute (model FLOPs, not hardware FLOPs).
MFU = model FLOPs / step time / peak; the peak defaults to 989 TFLOP/s, the H100 SXM dense bf16
rate of NVIDIA's datasheet (no sparsity).
"""

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import time

import torch

from megatron_hypenet import parallel
from kernels.gated_delta import LOOP_ENV
from megatron_hypenet.config import ATTENTION, LIGHTNING, RNN_MIXERS, make_config, teacher_fields
from megatron_hypenet.halo.stages import forward_hidden
from megatron_hypenet.losses import chunked_cross_entropy
from megatron_hypenet.model import build_model, compile_layers
from megatron_hypenet.training import clip_grad_norm
from tools.estimate_memory import PRESETS, TINY_SHAPE, config_fields, default_pattern

H100_SXM_BF16_PEAK_TFLOPS = 989.0
LIGHTNING_CHUNK = 64


def matmul_weights(model) -> int:
    """N of the dense FLOPs term: every matmul weight, the LM head once (tied or not)."""
    n = 0
    for name, p in model.named_parameters():
        if p.ndim >= 2 and "word_embeddings" not in name:
            n += p.numel()
    if model.share_embeddings_and_output_weights:
        n += model.shared_embedding_or_output_weight().numel()
    return n


def model_flops(config, n_matmul: int, batch: int, seq: int) -> dict:
    tokens = batch * seq
    n_attn, n_lin = config.layer_pattern.count(ATTENTION), config.layer_pattern.count(LIGHTNING)
    hd = config.num_attention_heads * config.kv_channels
    D, H = config.lightning_head_dim, config.lightning_num_heads
    terms = {
        "dense": 6 * n_matmul * tokens,
        "attention": n_attn * 6 * batch * seq * seq * hd,
        "lightning": n_lin * 3 * tokens * H * (2 * LIGHTNING_CHUNK * D + 4 * D * D),
    }
    terms["total"] = sum(terms.values())
    return terms


def recompute_fields(mode: str) -> dict:
    """The trainer's --recompute-granularity full: megatron-core keeps each layer's input and reruns the
    layer in backward (model.py makes its checkpoint restore the forward's bf16 autocast)."""
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return {}


def build(shape: dict, pattern: str, teacher: bool, recompute: str, device, compiled: bool = False):
    fields = teacher_fields(shape["num_layers"]) if teacher else dict(layer_pattern=pattern)
    config = make_config(**config_fields(shape), **fields, **recompute_fields(recompute),
                         use_cpu_initialization=device.type == "cpu")
    model = build_model(config, shape["vocab_size"], shape["tie_word_embeddings"]).to(device)
    if compiled:
        compile_layers(model)
    model.train()
    return config, model


def time_steps(model, vocab, batch, seq, steps, warmup, chunk, device):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(2)]
    cuda = device.type == "cuda"
    times, losses = [], []
    for i in range(warmup + steps):
        data = batches[i % 2].to(device)
        tokens, labels = data[:, :-1], data[:, 1:]
        mask = torch.ones_like(labels, dtype=torch.float32)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        # bf16 autocast as --bf16 on GPUs; CPU runs stay fp32 (megatron-core's linear backward
        # only re-enters autocast on CUDA)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = chunked_cross_entropy(model, forward_hidden(model, tokens), labels, mask, chunk)
        loss.backward()
        clip_grad_norm(params, 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    del opt
    return times, losses


def run_one(name, shape, pattern, teacher, seq, args, device, compiled=False) -> dict:
    """Times one (model, sequence length); with --recompute auto, falls back to full recompute on OOM.
    Compiled: the warm-up steps include the compilation (give it a few)."""
    modes = ["none", "full"] if args.recompute == "auto" else [args.recompute]
    for mode in modes:
        config = model = None
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            config, model = build(shape, pattern, teacher, mode, device, compiled)
            times, losses = time_steps(model, shape["vocab_size"], args.micro_batch_size, seq, args.steps,
                                       args.warmup, args.loss_chunk_size, device)
        except torch.OutOfMemoryError:
            if mode == modes[-1]:
                raise
            print(f"{name} s={seq}: out of memory without recompute; retrying with full recompute", flush=True)
            continue
        finally:
            n_matmul = matmul_weights(model) if model is not None else None
            n_params = sum(p.numel() for p in model.parameters()) if model is not None else None
            del model
            gc.collect()
        step = statistics.median(times)
        flops = model_flops(config, n_matmul, args.micro_batch_size, seq)
        return {
            "model": name, "compiled": compiled, "layer_pattern": config.layer_pattern, "seq_length": seq,
            "micro_batch_size": args.micro_batch_size, "recompute": mode, "params": n_params,
            "matmul_weights": n_matmul, "step_s": step, "step_s_all": times,
            "tokens_per_s": args.micro_batch_size * seq / step,
            "model_tflop_per_step": flops["total"] / 1e12, "flops_terms": flops,
            "mfu": flops["total"] / step / (args.peak_tflops * 1e12),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "loss": losses,
        }


def markdown(rows) -> str:
    """One row per run; the ratios pair rows of the same sequence length (and the same --compile setting for
    HypeNet / all-attention, the same model for compiled / eager)."""
    out = ["| model | compiled | seq | recompute | tokens/s | step s | model TFLOP/step | MFU | peak GiB | "
           "HypeNet / all-attention | compiled / eager |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    tps = {(r["model"], r["compiled"], r["seq_length"]): r["tokens_per_s"] for r in rows if "error" not in r}
    for r in rows:
        compiled = r["compiled"]
        if "error" in r:
            out.append(f"| {r['model']} | {compiled} | {r['seq_length']} | | failed: {r['error']} | | | | | | |")
            continue
        base = tps.get(("all-attention", compiled, r["seq_length"]))
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if r["model"].startswith("hypenet") and base else ""
        eager = tps.get((r["model"], False, r["seq_length"]))
        speedup = f"{r['tokens_per_s'] / eager:.2f}x" if compiled and eager else ""
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else ""
        out.append(f"| {r['model']} `{r['layer_pattern']}` | {compiled} | {r['seq_length']} | {r['recompute']} | "
                   f"{r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['model_tflop_per_step']:.1f} | "
                   f"{100 * r['mfu']:.1f}% | {mem} | {ratio} | {speedup} |")
    return "\n".join(out)


@contextlib.contextmanager
def gated_delta_loop(loop):
    """HYPENET_GATED_DELTA_LOOP set to `loop` for one model's steps (None: left as it is), then put back."""
    saved = os.environ.get(LOOP_ENV)
    if loop is not None:
        os.environ[LOOP_ENV] = loop
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(LOOP_ENV, None)
        else:
            os.environ[LOOP_ENV] = saved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3-1.7b", choices=sorted(PRESETS), help="student shape")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loss-chunk-size", type=int, default=1024)
    p.add_argument("--recompute", choices=("auto", "none", "full"), default="auto",
                   help="auto: none, and full recompute where that runs out of memory")
    p.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_PEAK_TFLOPS)
    p.add_argument("--compile", action="store_true",
                   help="time each model twice: eager, then with torch.compile'd layers (the trainer's --compile)")
    p.add_argument("--rnn-mixer", default="lightning", choices=sorted(RNN_MIXERS),
                   help="the student's RNN layers; gated_deltanet times its chunk loop in Triton and in PyTorch")
    p.add_argument("--tiny", action="store_true", help="a tiny shape on CPU (checks the path; no timing claims)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)

    shape = TINY_SHAPE if args.tiny else PRESETS[args.model]
    if args.tiny and args.seq_lengths == p.get_default("seq_lengths"):
        args.seq_lengths = [64]
    parallel.initialize(1, 1, 1, seed=0)
    device = parallel.device()
    # 1/8 attention, the paper's ratio
    pattern = default_pattern(shape["num_layers"]).replace(LIGHTNING, RNN_MIXERS[args.rnn_mixer])
    # (name, teacher, HYPENET_GATED_DELTA_LOOP): Gated DeltaNet's loop over chunks both ways, in one process
    models = [("hypenet", False, None), ("all-attention", True, None)]
    if args.rnn_mixer == "gated_deltanet":
        models.insert(1, ("hypenet, PyTorch loop", False, "pytorch"))
    rows = []
    try:
        for name, teacher, loop in models:
            for seq in args.seq_lengths:
                for compiled in (False, True) if args.compile else (False,):
                    try:
                        with gated_delta_loop(loop):
                            rows.append(run_one(name, shape, pattern, teacher, seq, args, device, compiled))
                    except Exception as e:  # keep the other rows: one call of device time measures them all
                        rows.append({"model": name, "compiled": compiled, "seq_length": seq,
                                     "error": f"{type(e).__name__}: {e}"[:200]})
                        if args.tiny:
                            raise
                    print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        parallel.destroy()
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{where}, torch {torch.__version__}, {datetime.date.today()}, peak {args.peak_tflops} TFLOP/s\n")
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": where, "torch": torch.__version__, "date": str(datetime.date.today()),
                       "peak_tflops": args.peak_tflops, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
