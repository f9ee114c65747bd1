"""Megatron-LM style command-line flags for pretrain_hypenet.py (and `--config file.yaml`)."""

import argparse
import os
from typing import List, Optional

import yaml

from .config import RNN_MIXERS
from .files import replaced_atomically

OPTIMIZERS = ("adamw", "muon")  # --optimizer: optimizer.py
SELECT_SCORES = ("ratio", "recall")  # --select-score: halo/select.py's importance_scores

STAGES = ("pretrain", "align", "select", "distill", "finetune")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="HALO distillation of a Qwen3 teacher into a HypeNet hybrid (megatron-core).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of flags (keys as flag names with underscores); CLI flags win")
    g = p.add_argument_group("stage and checkpoints")
    g.add_argument("--stage", choices=STAGES, default="distill")
    g.add_argument("--load", help="checkpoint to start from (teacher for pretrain/align, align output for distill, ...)")
    g.add_argument("--teacher", help="frozen teacher checkpoint (align, select, distill)")
    g.add_argument("--save", help="where checkpoints, metrics.jsonl, config.yaml and TensorBoard logs go")
    g.add_argument("--save-interval", type=int, default=0, help="save every N iterations (0: only at the end)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep in --save")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background while training goes on (each still becomes the "
                        "latest only once completely written)")
    g.add_argument("--ckpt-step", type=int, default=None, help="load this iteration instead of the latest")
    g.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --save")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="indexed dataset prefix(es) made by tools/preprocess_data.py")
    g.add_argument("--split", default="98,2,0")
    g.add_argument("--tokenizer", help="HF tokenizer folder (default: the one stored with the checkpoint)")
    g.add_argument("--seq-length", type=int, default=512)
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel size")
    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=None, help="default: lr / 10")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=("wsd", "cosine", "linear", "constant"), default="wsd")
    g.add_argument("--lr-wsd-decay-fraction", type=float, default=0.2, help="WSD: share of iterations spent decaying")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="muon: Muon on the weight matrices inside the layers, AdamW on the rest, at the same --lr "
                        "(megatron_hypenet/optimizer.py); needs every matrix whole on its rank (no TP, no sharded "
                        "optimizer)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", help="bf16 compute (fp32 master weights); teacher kept in bf16")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer (student and teacher): inductor fuses the norms, RoPE and "
                        "activations that small models spend most of a step on; the first steps compile")
    g.add_argument("--cuda-graph", action="store_true",
                   help="capture each step's forward and backward as one CUDA graph and replay it (cuda_graph.py): "
                        "for small micro-batches, where launching kernels takes longer than running them")
    g.add_argument("--loss-chunk-size", type=int, default=1024, help="tokens per chunk of the LM head / KL")
    g.add_argument("--nan-policy", choices=("skip", "stop"), default="skip", help="on a NaN/Inf loss")
    g.add_argument("--max-skipped-iters", type=int, default=10, help="stop after this many consecutive bad steps")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                   help="model chunks per pipeline rank (interleaved 1F1B schedule)")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="megatron-core's DistributedDataParallel + distributed optimizer: AdamW state (and the fp32 "
                        "master weights under --bf16) sharded over the data-parallel ranks (ZeRO-1)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split the sequence over the TP ranks outside the tensor-parallel regions (needs TP > 1)")
    g.add_argument("--zero-stage", type=int, choices=(0, 3), default=0,
                   help="3: DeepSpeed ZeRO-3 shards the student's parameters, gradients and optimizer state over "
                        "the data-parallel ranks (no TP/PP/CP); ZeRO-1/2 is megatron's distributed optimizer")
    g.add_argument("--deepspeed-config", default=None,
                   help="--zero-stage 3: a DeepSpeed JSON config merged over the trainer's (e.g. zero_optimization "
                        "offload or bucket sizes); batch, clipping, optimizer and precision stay the trainer's flags")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="activation recomputation: whole layers (full) or --recompute-modules (selective)")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None,
                   help="full: recompute groups of --recompute-num-layers layers (uniform) or only the first "
                        "--recompute-num-layers layers (block)")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="see --recompute-method")
    g.add_argument("--recompute-modules", nargs="+", choices=("core_attn", "mlp"), default=None,
                   help="selective: what to recompute; core_attn = each mixer's core between its input and output "
                        "projections (default: core_attn)")
    g = p.add_argument_group("HypeNet student")
    g.add_argument("--layer-pattern", help="'A'/'L'/'D' per layer (attention, Lightning, Gated DeltaNet), or a file "
                                           "holding it (the select stage writes one); authoritative where given")
    g.add_argument("--rnn-mixer", choices=tuple(RNN_MIXERS), default="lightning",
                   help="the RNN mixer the stages put where they make layers RNN layers (align's all-RNN student, "
                        "select's pattern): lightning = 'L', gated_deltanet = 'D'")
    g.add_argument("--align-init", choices=("calibrated", "copy"), default="calibrated",
                   help="align: how the RNN mixers start from their attention layers. copy = the paper's (RNN head h "
                        "from attention head h, output norm at 1); calibrated = on the first micro-batch, heads "
                        "matched to the decays by attention span and the output norm scaled to the teacher's output "
                        "(halo/calibrate.py)")
    g.add_argument("--num-attention-layers", type=int, default=None, help="select: layers kept as attention")
    g.add_argument("--attention-rope", action="store_true", help="RoPE in attention layers (ablation; HyPE: off)")
    g.add_argument("--attention-query-scale-base", type=float, default=256.0, help="HyPE a; <= 0 disables")
    g.add_argument("--no-lightning-rope", action="store_true")
    g.add_argument("--no-lightning-output-gate", action="store_true")
    g.add_argument("--no-lightning-output-norm", action="store_true")
    g.add_argument("--lightning-output-norm-per-head", action="store_true",
                   help="the RNN layers' output RMSNorm normalises each head on its own (default: over all heads, "
                        "as in the paper)")
    g.add_argument("--attention-twins", action="store_true",
                   help="align: also align a HyPE attention twin of every layer (NoPE and the log query scale, or "
                        "the --attention-rope kind), from which distill starts its attention layers instead of the "
                        "teacher's RoPE-trained weights")
    g.add_argument("--no-lightning-qk-norm", action="store_true")
    g.add_argument("--lightning-short-conv", action="store_true")
    g.add_argument("--train-only-mixers", action="store_true",
                   help="train only the token mixers (each layer's attention or RNN module); the embeddings, MLPs, "
                        "layer norms and LM head keep their loaded values (align always trains only its RNN mixers)")
    g.add_argument("--non-mixer-lr-mult", type=float, default=None,
                   help="train every weight, those outside the token mixers (embeddings, MLPs, layer norms, LM head) "
                        "at this multiple of --lr (megatron-core's lr_mult); unset, all train at --lr (the paper's "
                        "distill); --train-only-mixers freezes them instead")
    g.add_argument("--lightning-scale", choices=("sqrt", "linear", "none"), default="sqrt")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-iters", type=int, default=4)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--select-lengths", type=int, nargs="+", default=None, help="select: retrieval lengths (default: seq/2, seq)")
    g.add_argument("--select-examples", type=int, default=16, help="select: retrieval examples per task and length")
    g.add_argument("--select-score", choices=SELECT_SCORES, default="ratio",
                   help="select: rank layers by recall drop / general drop (ratio, the paper's) or by the recall "
                        "drop alone (recall, Jet-Nemotron-style)")
    g.add_argument("--select-eps", type=float, default=None,
                   help="select: eps of the importance ratio, in general-score (minus loss) units (default: a tenth "
                        "of the spread of the layers' general scores)")
    g.add_argument("--select-haystack", default=None, metavar="JSONL",
                   help="select: cut the retrieval haystacks from this text (jsonl with a 'text' key; e.g. held-out "
                        "files of the training corpus) and score needle + pass key; default: the synthetic corpus' "
                        "prose, needle + key-value retrieval")
    g.add_argument("--tensorboard-dir", default=None, help="default: <save>/tensorboard")
    g.add_argument("--wandb-project", default=None, help="log to wandb (offline unless --wandb-mode online)")
    g.add_argument("--wandb-mode", choices=("offline", "online", "disabled"), default="offline")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        if not os.path.exists(args.config):
            parser.error(f"--config {args.config}: file not found")
        with open(args.config) as f:
            values = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"--config {args.config}: unknown keys {unknown}")
        parser.set_defaults(**values)
        args = parser.parse_args(argv)  # re-parse so explicit CLI flags override the file
    return finalize(args, parser)


def finalize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if args.attention_query_scale_base is not None and args.attention_query_scale_base <= 0:
        args.attention_query_scale_base = None
    if args.stage != "select" and args.train_iters <= 0:
        parser.error("--train-iters must be positive")
    if args.stage in ("align", "distill", "select") and not (args.teacher or args.load):
        parser.error(f"--stage {args.stage} needs --teacher (a converted teacher checkpoint)")
    if args.attention_twins and args.stage != "align":
        parser.error(f"--attention-twins is an align flag (--stage {args.stage}): distill takes the twins from its "
                     "--load align checkpoint")
    if args.stage != "select" and not args.data_path:
        parser.error("--data-path is required (make one with tools/preprocess_data.py)")
    vpp = args.virtual_pipeline_model_parallel_size
    if vpp is not None and (vpp < 2 or args.pipeline_model_parallel_size < 2):
        parser.error(f"--virtual-pipeline-model-parallel-size {vpp} needs --pipeline-model-parallel-size > 1 "
                     f"and at least 2 chunks per rank; leave it out for the plain 1F1B schedule")
    if args.optimizer == "muon":
        refused = [flag for flag, on in (
            ("--tensor-model-parallel-size > 1", args.tensor_model_parallel_size > 1),
            ("--use-distributed-optimizer", args.use_distributed_optimizer),
            ("--zero-stage 3", args.zero_stage == 3)) if on]
        if refused:
            parser.error(f"--optimizer muon orthogonalises whole weight matrices, which {', '.join(refused)} "
                         f"split over ranks: use data or pipeline parallelism with it, or --optimizer adamw")
    if args.non_mixer_lr_mult is not None:
        if args.non_mixer_lr_mult <= 0:
            parser.error(f"--non-mixer-lr-mult must be positive, not {args.non_mixer_lr_mult}: to freeze the weights "
                         "outside the token mixers use --train-only-mixers")
        if args.train_only_mixers:
            parser.error("--non-mixer-lr-mult trains the weights outside the token mixers, which --train-only-mixers "
                         "freezes: pass one of the two")
        if args.stage in ("align", "select"):
            parser.error(f"--non-mixer-lr-mult has nothing to scale in --stage {args.stage} (align trains only its "
                         "RNN mixers, select trains nothing)")
    if args.deepspeed_config and args.zero_stage != 3:
        parser.error("--deepspeed-config is read by --zero-stage 3 only")
    if args.zero_stage == 3:
        from .zero3 import check_layout

        try:
            check_layout(args)
        except ValueError as e:
            parser.error(str(e))
    untested = [flag for flag, on in (("--pipeline-model-parallel-size > 1", args.pipeline_model_parallel_size > 1),
                                      ("--context-parallel-size > 1", args.context_parallel_size > 1),
                                      ("--zero-stage 3", args.zero_stage == 3)) if on]
    if args.compile and untested:
        parser.error(f"--compile is tested with tensor and data parallelism only, not with {', '.join(untested)}: "
                     f"leave --compile out for this layout")
    if args.cuda_graph:
        refused = untested + [flag for flag, on in (
            ("--tensor-model-parallel-size > 1", args.tensor_model_parallel_size > 1),
            ("--use-distributed-optimizer", args.use_distributed_optimizer),
            ("--recompute-granularity", args.recompute_granularity is not None)) if on]
        if refused:
            parser.error(f"--cuda-graph captures steps with no collective inside them (one GPU, or data parallel: "
                         f"gradients are all-reduced outside the graph); not tested with {', '.join(refused)}: "
                         f"leave --cuda-graph out for this layout")
    if args.optimizer == "muon" and args.cuda_graph and args.compile and not args.train_only_mixers \
            and args.stage != "align":
        # run 28 and its bisect (docs/results_run28.md): 'CUDA error: unspecified launch failure' at random in 9 of 21
        # such distill processes on H100s, raised by a kernel of torch's Muon step; in none of 7 that left out Muon
        # on the MLPs, the graph or compile; cause not found
        parser.error("--optimizer muon with --cuda-graph and --compile, training the weights outside the token mixers, "
                     "crashed on H100s ('CUDA error: unspecified launch failure', docs/results_run28.md): leave out "
                     "--compile or --cuda-graph, pass --train-only-mixers, or use --optimizer adamw")
    if args.layer_pattern and os.path.exists(args.layer_pattern):
        with open(args.layer_pattern) as f:
            args.layer_pattern = f.read().strip()
    return args


def save_resolved(args: argparse.Namespace, directory: str) -> str:
    """Writes the full resolved flags; `--config <that file>` reproduces the run."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "config.yaml")
    values = {k: v for k, v in vars(args).items() if k != "config"}
    with replaced_atomically(path) as f:
        yaml.safe_dump(values, f, sort_keys=True)
    return path
