"""Per-GPU memory of a HALO run: teacher, student, optimizer state and activations, per parallel layout.

    python tools/estimate_memory.py --model qwen3-8b --stage distill --seq-length 4096 --tp 4 --pp 2 --dp 4
    python tools/estimate_memory.py --hf-config qwen3/config.json --num-attention-layers 4 --seq-length 131072 \
        --stage finetune --tp 8 --cp 4 --sequence-parallel --recompute full
    python tools/estimate_memory.py --model qwen3-32b --stage distill --seq-length 4096 --search --gpus 64

Parameters are counted exactly from the shapes, module by module as `model.build_model` makes them
(tests/test_estimate_memory.py checks the count against a built model). The other terms are models
of what the trainer keeps, in bytes:

    teacher     2 per parameter of its pipeline stage / TP (frozen bf16: no grads, no optimizer)
    student     weights, gradients and Adam state per parameter of the stage / TP:
                  plain        2 bf16 weight + 4 fp32 grad + 4 fp32 master + 8 Adam m, v    = 18
                  distributed  2 + 4 + 12 / DP (megatron-core's distributed optimizer shards the
                               fp32 master weights and Adam moments over the data-parallel group)
                  zero3        18 / DP, plus two layers' bf16 weights gathered at a time
                               (the trainer's --zero-stage 3, DeepSpeed: data parallel only)
                (The trainer without a sharded optimizer keeps fp32 weights under bf16 autocast with
                torch AdamW: 4 + 4 + 8, plus autocast's bf16 weight copies, also 18 as `plain`.)
    activations per layer and micro-batch, bytes per token of the rank's sequence chunk (s / CP),
                counted from the tensors autograd saves in our layers under bf16 autocast with the
                fp32 residual stream (tests compare with the saved tensors of a built model):
                  attention  20 h + 16 H D + 6 G D + 8 f
                  Lightning  22 h + 36 H D + 8 f, plus the kernel's fp32 block states 4 H D^2 / 64
                  Gated DeltaNet  Lightning's, plus 44 H D + 18.4 H C + 2 H D^2 / C for its chunked
                             form (chunks of C = 64 tokens: the WY factors, the [C, C] decay and score
                             blocks, the per-chunk states): what its layers save beyond Lightning's on the
                             PyTorch chunk path, fitted at head dims 16-128; under CP the chunk also
                             runs as an affine map of its entering state, D value columns wider
                             (docs/parallelism.md): another 14 H D + 4 H D^2 / C
                where h = hidden, H/G = query/KV heads of head size D, f = FFN; under TP every
                head and FFN term is / TP and the h terms too with sequence parallelism.
                Under CP the attention layers also keep the all-gathered K and V (H heads, the full
                sequence: 4 s H D / TP) and the boolean causal mask (s / CP x s bytes).
                recompute selective (--recompute-modules core_attn): the mixer core between the
                input and output projections is rerun, so it keeps only the QKV output and the
                projection input: attention 2 (H + 2 G) D + 2 H D instead of 16 H D + 6 G D (and no
                CP gather), Lightning 8 H D instead of 36 H D + states.
                recompute full: each layer keeps only its fp32 input (4 h), plus one layer's full
                activations while it is recomputed.
                Pipeline: with 1F1B stage i holds PP - i micro-batches in flight; interleaving
                (virtual PP v) multiplies by 1 + (PP - 1) / (PP v) (Korthikanti et al. 2022).
    loss        the chunked LM head / KL (losses.py) never holds full logits: one chunk of
                fp32 logits [chunk, V / TP] and about 4 same-sized temporaries (log-softmax, exp,
                their grads), twice for the KL (teacher and student), plus the final hidden
                states kept for the chunks' recompute (4 h per token; distill also the teacher's).
    teacher fwd the frozen teacher's forward keeps nothing for backward; its largest transient is
                one layer's working set, about 2 (2 f + 3 h + (H + 2 G) D) bytes per token / TP.
    overhead    CUDA context, NCCL buffers and allocator slack: a fixed --overhead-gib (default 3).

Shapes of the presets are the `config.json` files of the Hugging Face repositories
Qwen/Qwen3-1.7B, -4B, -8B, -14B and -32B (vocab 151936, head_dim 128, SwiGLU, q/k RMSNorm; tied
embeddings for 1.7B and 4B only).
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from a checkout

from megatron_hypenet.patterns import default_num_attention_layers, evenly_spaced  # noqa: E402  (plain Python)

GATED_DELTA_CHUNK = 64  # kernels/gated_delta/chunk.py's CHUNK (that module needs torch; this one does not)

GiB = 2**30

# name: (hidden, layers, heads, kv heads, ffn, tied); vocab 151936 and head_dim 128 for all.
_QWEN3 = {
    "qwen3-1.7b": (2048, 28, 16, 8, 6144, True),
    "qwen3-4b": (2560, 36, 32, 8, 9728, True),
    "qwen3-8b": (4096, 36, 32, 8, 12288, False),
    "qwen3-14b": (5120, 40, 40, 8, 17408, False),
    "qwen3-32b": (5120, 64, 64, 8, 25600, False),
}
PRESETS = {
    name: dict(hidden_size=h, num_layers=n, num_attention_heads=a, num_query_groups=g, kv_channels=128,
               ffn_hidden_size=f, vocab_size=151936, tie_word_embeddings=tied)
    for name, (h, n, a, g, f, tied) in _QWEN3.items()
}
# issue #7's teacher (examples/reproduce.yaml's make_tiny_teacher; tests/test_reproduce.py keeps them equal)
PRESETS["reproduce-teacher"] = dict(hidden_size=640, num_layers=12, num_attention_heads=10, num_query_groups=5,
                                    kv_channels=64, ffn_hidden_size=1792, vocab_size=8192, tie_word_embeddings=True)
# A shape small enough to build and run on a CPU in seconds (tests, `bench_training --tiny`).
TINY_SHAPE = dict(hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                  ffn_hidden_size=128, vocab_size=512, tie_word_embeddings=True)

ARCH_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size")


def config_fields(shape: dict) -> dict:
    """The HypeNetConfig fields of a shape (everything but the vocabulary and tying)."""
    return {k: shape[k] for k in ARCH_KEYS}


def shape_from_hf(path: str) -> dict:
    with open(path) as f:
        hf = json.load(f)
    if hf.get("model_type") not in ("qwen3", "hypenet"):
        raise ValueError(f"{path}: expected a Qwen3 (or HypeNet) config.json, got model_type={hf.get('model_type')!r}")
    return dict(hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                num_attention_heads=hf["num_attention_heads"],
                num_query_groups=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                kv_channels=hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]),
                ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                tie_word_embeddings=hf.get("tie_word_embeddings", False))


@dataclass
class Student:
    """The Lightning options that change parameter or activation counts (defaults: the trainer's)."""

    lightning_num_heads: Optional[int] = None  # default: the attention heads
    lightning_head_dim: Optional[int] = None  # default: kv_channels
    lightning_qk_norm: bool = True
    lightning_output_norm: bool = True
    lightning_output_gate: bool = True
    lightning_short_conv: bool = False
    lightning_conv_size: int = 4


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vpp: int = 1
    sequence_parallel: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def __str__(self):
        s = f"TP{self.tp} PP{self.pp}" + (f"x{self.vpp}" if self.vpp > 1 else "") + f" CP{self.cp} DP{self.dp}"
        return s + (" SP" if self.sequence_parallel else "")


def padded_vocab(v: int) -> int:
    from_model = 128  # megatron_hypenet.model.VOCAB_DIVISIBLE_BY (not imported: this tool needs no torch)
    return -(-v // from_model) * from_model


# ---- parameters -------------------------------------------------------------------------------

def _heads(shape, st: Student):
    return st.lightning_num_heads or shape["num_attention_heads"], st.lightning_head_dim or shape["kv_channels"]


def layer_params(shape: dict, mixer: str, st: Student, tp: int = 1) -> int:
    """Parameters of one decoder layer on one TP rank (replicated norms counted in full)."""
    h, f = shape["hidden_size"], shape["ffn_hidden_size"]
    n = 2 * h + 3 * h * f // tp  # input and pre-MLP RMSNorm; fc1 (gate and up) and fc2
    if mixer == "A":
        H, G, D = shape["num_attention_heads"], shape["num_query_groups"], shape["kv_channels"]
        n += h * (H + 2 * G) * D // tp + H * D * h // tp + 2 * D  # QKV, output, q/k norm
    else:
        H, D = _heads(shape, st)
        n += h * 3 * H * D // tp + H * D * h // tp
        n += 2 * D * st.lightning_qk_norm + H * D // tp * st.lightning_output_norm
        n += h * H * D // tp * st.lightning_output_gate + 3 * H * D * st.lightning_conv_size // tp * st.lightning_short_conv
        if mixer == "D":  # Gated DeltaNet: decay-input and beta projections, A_log and dt_bias per head
            n += 2 * h * H // tp + 2 * H // tp
    return n


def stage_layers(pattern: str, pp: int, vpp: int = 1):
    """The layer mixers of each pipeline rank (with virtual stages, its chunks in order)."""
    n, chunks = len(pattern), pp * vpp
    if n % chunks:
        raise ValueError(f"{n} layers cannot be split evenly over PP x virtual PP = {pp} x {vpp}")
    per = n // chunks
    return ["".join(pattern[(c * pp + r) * per:(c * pp + r + 1) * per] for c in range(vpp)) for r in range(pp)]


def stage_params(shape: dict, pattern: str, st: Student, tp: int = 1, pp: int = 1, vpp: int = 1) -> list:
    """Parameters on each pipeline rank (one TP rank): its layers, plus embedding / final norm / LM head."""
    h, V = shape["hidden_size"], padded_vocab(shape["vocab_size"])
    out = []
    for r, layers in enumerate(stage_layers(pattern, pp, vpp)):
        n = sum(layer_params(shape, m, st, tp) for m in layers)
        first, last = r == 0, r == pp - 1
        if first:
            n += V * h // tp
        if last:
            n += h  # final norm
            if not shape["tie_word_embeddings"] or not first:  # tied across stages: the last one keeps a copy
                n += V * h // tp
        out.append(n)
    return out


def total_params(shape: dict, pattern: str, st: Student = Student()) -> int:
    return stage_params(shape, pattern, st)[0]


# ---- activations ------------------------------------------------------------------------------

def layer_activation_bytes(shape: dict, mixer: str, st: Student, lay: Layout, s_local: int, s_full: int,
                           recompute: str = "none") -> float:
    """Bytes one layer keeps for backward per micro-batch row (see the module docstring)."""
    h, f = shape["hidden_size"], shape["ffn_hidden_size"]
    t = lay.tp
    hs = h / t if lay.sequence_parallel else h
    selective = recompute == "selective"  # the mixer core keeps only its input (QKV output) and output
    if mixer == "A":
        H, G, D = shape["num_attention_heads"], shape["num_query_groups"], shape["kv_channels"]
        core = 2 * (H + 2 * G) * D + 2 * H * D if selective else 16 * H * D + 6 * G * D
        per_token = 20 * hs + (core + 8 * f) / t
        extra = 0.0
        if lay.cp > 1 and not selective:  # all-gathered K and V (repeated to H heads) and the [s/CP, s] mask
            extra = 4 * s_full * H * D / t + s_local * s_full
        return per_token * s_local + extra
    H, D = _heads(shape, st)
    core = 2 * 3 * H * D + 2 * H * D if selective else 36 * H * D + 4 * H * D * D / 64
    if mixer == "D" and not selective:
        C = GATED_DELTA_CHUNK
        core += 44 * H * D + 18.4 * H * C + 2 * H * D * D / C
        if lay.cp > 1:  # gated_delta_rule_affine: the recurrence over [v | 0], and q M for the entering state
            core += 14 * H * D + 4 * H * D * D / C
    per_token = 22 * hs + (core + 8 * f) / t
    return per_token * s_local


def layer_input_bytes(shape, lay: Layout, s_local: int) -> float:
    h = shape["hidden_size"]
    return 4 * s_local * (h / lay.tp if lay.sequence_parallel else h)


def activation_bytes(shape, layers: str, st: Student, lay: Layout, seq: int, mbs: int, recompute: str) -> float:
    s_local = seq // lay.cp
    per = [layer_activation_bytes(shape, m, st, lay, s_local, seq, recompute) for m in layers]
    if recompute == "full":
        one = len(layers) * layer_input_bytes(shape, lay, s_local) + max(per)
    else:
        one = sum(per)
    return one * mbs


def in_flight(lay: Layout, rank: int) -> float:
    """Micro-batches whose activations pipeline rank `rank` holds at its peak (1F1B, interleaved)."""
    if lay.pp == 1:
        return 1.0
    n = lay.pp - rank
    if lay.vpp > 1:
        n *= 1 + (lay.pp - 1) / (lay.pp * lay.vpp)
    return n


def loss_bytes(shape, lay: Layout, seq: int, mbs: int, chunk: int, distill: bool) -> float:
    V, h = padded_vocab(shape["vocab_size"]), shape["hidden_size"]
    s_local = seq // lay.cp
    logits = 5 * 4 * min(chunk, s_local) * mbs * V / lay.tp * (2 if distill else 1)
    hidden = 4 * s_local * mbs * h * (2 if distill else 1)
    return logits + hidden


def teacher_forward_bytes(shape, lay: Layout, seq: int, mbs: int) -> float:
    h, f = shape["hidden_size"], shape["ffn_hidden_size"]
    H, G, D = shape["num_attention_heads"], shape["num_query_groups"], shape["kv_channels"]
    return 2 * (2 * f + 3 * h + (H + 2 * G) * D) / lay.tp * seq / lay.cp * mbs


# ---- the estimate -----------------------------------------------------------------------------

OPTIMIZERS = ("plain", "distributed", "zero3")


def estimate(shape: dict, pattern: str, lay: Layout, seq: int, mbs: int = 1, stage: str = "distill",
             optimizer: str = "distributed", recompute: str = "none", chunk: int = 1024, st: Student = Student(),
             overhead_gib: float = 3.0) -> dict:
    """GiB per term on the most loaded pipeline rank."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if seq % lay.cp:
        raise ValueError(f"sequence length {seq} is not divisible by context parallel size {lay.cp}")
    distill = stage in ("distill", "align")
    layers_per_rank = stage_layers(pattern, lay.pp, lay.vpp)
    s_params = stage_params(shape, pattern, st, lay.tp, lay.pp, lay.vpp)
    t_params = stage_params(shape, "A" * len(pattern), st, lay.tp, lay.pp, lay.vpp)
    rows = []
    for r in range(lay.pp):
        p = s_params[r]
        if optimizer == "plain":
            w, g, o = 2 * p, 4 * p, 12 * p
        elif optimizer == "distributed":
            w, g, o = 2 * p, 4 * p, 12 * p / lay.dp
        else:
            biggest = max(layer_params(shape, m, st, lay.tp) for m in layers_per_rank[r])
            w, g, o = 2 * p / lay.dp + 2 * 2 * biggest, 4 * p / lay.dp, 12 * p / lay.dp
        terms = {
            "teacher weights (bf16)": 2 * t_params[r] if distill else 0.0,
            "student weights (bf16)": w,
            "student grads (fp32)": g,
            "optimizer (fp32 master + Adam)": o,
            "activations": activation_bytes(shape, layers_per_rank[r], st, lay, seq, mbs, recompute) * in_flight(lay, r),
            "loss (chunked LM head/KL)": loss_bytes(shape, lay, seq, mbs, chunk, distill) if r == lay.pp - 1 else 0.0,
            "teacher forward (transient)": teacher_forward_bytes(shape, lay, seq, mbs) if distill else 0.0,
        }
        terms = {k: v / GiB for k, v in terms.items()}
        terms["overhead"] = overhead_gib
        terms["total"] = sum(terms.values())
        rows.append(terms)
    worst = max(range(lay.pp), key=lambda r: rows[r]["total"])
    return {"rank": worst, "terms": rows[worst], "student_params": sum(stage_params(shape, pattern, st)),
            "teacher_params": sum(stage_params(shape, "A" * len(pattern), st))}


def default_pattern(num_layers: int, num_attention: Optional[int] = None) -> str:
    """`num_attention` attention layers spread evenly (default 1/8, the paper's ratio), the rest Lightning."""
    k = num_attention if num_attention is not None else default_num_attention_layers(num_layers)
    return evenly_spaced(num_layers, k, centred=True)


def valid_layout(shape, pattern, lay: Layout, optimizer: str = "distributed") -> Optional[str]:
    """Why `lay` cannot run this model, or None."""
    if optimizer == "zero3" and (lay.tp, lay.pp, lay.cp) != (1, 1, 1):
        return "the ZeRO-3 path (--zero-stage 3, DeepSpeed) runs data parallel only: TP = PP = CP = 1"
    if shape["num_attention_heads"] % lay.tp or shape["num_query_groups"] % lay.tp:
        return f"{shape['num_attention_heads']} heads / {shape['num_query_groups']} KV groups not divisible by TP {lay.tp}"
    if len(pattern) % (lay.pp * lay.vpp):
        return f"{len(pattern)} layers not divisible by PP x VPP {lay.pp * lay.vpp}"
    if lay.sequence_parallel and lay.tp == 1:
        return "sequence parallelism needs TP > 1"
    return None


def search(shape, pattern, gpus: int, seq: int, limit: float, max_tp: int = 8, **kw) -> list:
    """Every layout of `gpus` GPUs (TP <= max_tp, SP on with TP > 1) that fits, smallest model-parallel first."""
    out = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8, 16):
            for cp in (1, 2, 4, 8, 16):
                if tp > max_tp or gpus % (tp * pp * cp) or seq % cp:
                    continue
                lay = Layout(tp, pp, cp, gpus // (tp * pp * cp), 1, tp > 1)
                if valid_layout(shape, pattern, lay, kw.get("optimizer", "distributed")):
                    continue
                for recompute in ("none", "selective", "full"):
                    est = estimate(shape, pattern, lay, seq, recompute=recompute, **kw)
                    if est["terms"]["total"] <= limit:
                        out.append((lay, recompute, est))
                        break
    out.sort(key=lambda x: (x[0].tp * x[0].pp * x[0].cp, x[1] != "none", x[2]["terms"]["total"]))
    return out


def table(est: dict, limit: float) -> str:
    width = max(map(len, est["terms"]))
    lines = [f"{'term':<{width}}  {'GiB':>9}"]
    for k, v in est["terms"].items():
        if k == "total":
            lines.append("-" * (width + 11))
        lines.append(f"{k:<{width}}  {v:9.2f}")
    fits = est["terms"]["total"] <= limit
    lines.append(f"{'fits ' + format(limit, 'g') + ' GiB' if fits else 'EXCEEDS ' + format(limit, 'g') + ' GiB'}"
                 f" (pipeline rank {est['rank']}, the most loaded)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--model", choices=sorted(PRESETS), help="a Qwen3 shape preset")
    m.add_argument("--hf-config", help="a Qwen3 HF config.json")
    p.add_argument("--layer-pattern", help="'A'/'L' per layer (default: --num-attention-layers spread evenly)")
    p.add_argument("--num-attention-layers", type=int, default=None, help="default: 1/8 of the layers")
    p.add_argument("--stage", choices=("distill", "align", "finetune", "pretrain"), default="distill",
                   help="distill/align hold the frozen teacher too")
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=1, help="virtual pipeline stages per rank (interleaved 1F1B)")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="distributed",
                   help="plain: replicated; distributed: megatron-core's distributed optimizer; zero3: all sharded "
                        "(--zero-stage 3)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    p.add_argument("--loss-chunk-size", type=int, default=1024)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--overhead-gib", type=float, default=3.0, help="CUDA context, NCCL buffers, allocator slack")
    p.add_argument("--search", action="store_true", help="list the layouts of --gpus GPUs that fit")
    p.add_argument("--gpus", type=int, default=8, help="--search: GPUs in all")
    p.add_argument("--top", type=int, default=8, help="--search: layouts to list")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args = p.parse_args(argv)

    shape = PRESETS[args.model] if args.model else shape_from_hf(args.hf_config)
    pattern = args.layer_pattern or default_pattern(shape["num_layers"], args.num_attention_layers)
    if len(pattern) != shape["num_layers"] or set(pattern) - {"A", "L"}:
        p.error(f"--layer-pattern needs {shape['num_layers']} characters of 'A'/'L', got {pattern!r}")
    kw = dict(mbs=args.micro_batch_size, stage=args.stage, optimizer=args.optimizer,
              chunk=args.loss_chunk_size, overhead_gib=args.overhead_gib)
    name = args.model or args.hf_config
    print(f"{name}: {shape['num_layers']} layers, pattern {pattern}, stage {args.stage}, seq {args.seq_length}, "
          f"micro batch {args.micro_batch_size}, optimizer {args.optimizer}")
    if args.search:
        found = search(shape, pattern, args.gpus, args.seq_length, args.gpu_memory, **kw)
        print(f"layouts of {args.gpus} GPUs that fit {args.gpu_memory:g} GiB (most loaded rank):")
        for lay, recompute, est in found[:args.top]:
            print(f"  {str(lay):<24} recompute {recompute:<9}  {est['terms']['total']:6.1f} GiB")
        if not found:
            print("  none")
        return 0 if found else 1
    lay = Layout(args.tp, args.pp, args.cp, args.dp, args.vpp, args.sequence_parallel)
    why = valid_layout(shape, pattern, lay, args.optimizer)
    if why:
        p.error(f"layout {lay}: {why}")
    try:
        est = estimate(shape, pattern, lay, args.seq_length, recompute=args.recompute, **kw)
    except ValueError as e:
        p.error(str(e))
    print(f"layout {lay} ({lay.gpus} GPUs), recompute {args.recompute}; student {est['student_params'] / 1e9:.2f}B "
          f"params, teacher {est['teacher_params'] / 1e9:.2f}B")
    if args.json:
        print(json.dumps(est, indent=2))
    else:
        print(table(est, args.gpu_memory))
    return 0 if est["terms"]["total"] <= args.gpu_memory else 2


if __name__ == "__main__":
    sys.exit(main())
