"""The HALO stages as (models to build, how to initialise them, the loss of one batch).

    pretrain  CE on the teacher itself (how the embedded demo makes its tiny teacher)
    align     stage 1: every attention mixer gets an RNN twin (--rnn-mixer: Lightning or Gated DeltaNet)
              trained to reproduce its output (with --attention-twins also a HyPE attention twin)
    distill   stage 2: the hybrid (selected pattern, HyPE) against the frozen teacher, forward KL
    finetune  stage 3: the hybrid alone, CE at a longer sequence length
(select, between align and distill, trains nothing: see select.py.)

Every model is built as one chunk per (virtual) pipeline stage of this rank, teacher and student
alike, and each stage's math is a `step(chunk, batch)` over a `pipeline.PipelineChunk`: the loss on
the last stage, else the tensor for the next stage (see pipeline.py). Without pipeline parallelism
there is one chunk, and `StageModels.loss(batch)` is its step: the whole model's loss.
"""

import logging
import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

from .. import checkpoint, parallel
from ..config import (ATTENTION, MIXER_ATTRIBUTES, RNN_MIXERS, config_from_description, model_description,
                      read_model_description)
from ..losses import chunked_cross_entropy, chunked_kl
from ..model import build_model
from ..pipeline import PipelineChunk, stage_output
from .calibrate import calibrate_student
from .init import freeze_all_but_mixers, init_student_from_teacher, load_hybrid

log = logging.getLogger("megatron_hypenet")


def forward_hidden(model, tokens: torch.Tensor, stage_input: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hidden states [s, b, h] after this pipeline stage (after the final norm on the last one); the
    LM head runs chunked in the loss. The first stage embeds `tokens`, the others continue `stage_input`."""
    if model.pre_process:
        hidden = model.embedding(input_ids=tokens, position_ids=None)
    else:
        model.set_input_tensor(stage_input)  # megatron's decoder reads a later stage's input from here
        hidden = None
    return model.decoder(hidden_states=hidden, attention_mask=None)


def student_fields(args, pattern: str) -> dict:
    return dict(
        layer_pattern=pattern,
        attention_rope=args.attention_rope,
        attention_query_scale_base=args.attention_query_scale_base,
        lightning_rope=not args.no_lightning_rope,
        lightning_qk_norm=not args.no_lightning_qk_norm,
        lightning_output_gate=not args.no_lightning_output_gate,
        lightning_output_norm=not args.no_lightning_output_norm,
        lightning_output_norm_per_head=args.lightning_output_norm_per_head,
        lightning_short_conv=args.lightning_short_conv,
        lightning_scale=args.lightning_scale,
    )


def parallel_fields(args, teacher: bool = False) -> dict:
    fields = dict(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=getattr(args, "virtual_pipeline_model_parallel_size", None),
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        # stages exchange fp32 activations: the student's residual stream is fp32 (fp32 weights under
        # autocast) and the teacher's bf16 half converts to it and back exactly
        pipeline_dtype=torch.float32,
        # separate isend/irecv (megatron-LM's default with the interleaved schedule): batched, a PP=2
        # pair exchanges activations and gradients in one batch, which gloo matched in the wrong order
        batch_p2p_comm=False,
    )
    if args.sequence_parallel:
        local = args.seq_length // args.context_parallel_size
        if local % args.tensor_model_parallel_size:
            raise ValueError(f"--sequence-parallel splits each rank's {local} tokens over tensor parallel size "
                             f"{args.tensor_model_parallel_size}: pick a --seq-length divisible by TP x CP")
    if teacher and args.bf16:
        fields.update(params_dtype=torch.bfloat16)  # frozen: no fp32 master copy needed
    elif not teacher:  # the frozen teacher runs without grad: nothing to recompute
        fields.update(recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                      recompute_num_layers=args.recompute_num_layers, recompute_modules=args.recompute_modules)
    return fields


def vp_stages(args) -> list:
    """The virtual pipeline stages this rank holds a chunk of ([None]: no virtual pipeline)."""
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    return [None] if vpp is None else list(range(vpp))


def build_from_description(desc: dict, args, teacher: bool = False, vp_stage=None, **overrides):
    config = config_from_description(desc, **parallel_fields(args, teacher), **overrides)
    model = build_model(config, desc["vocab_size"], desc["tie_word_embeddings"], vp_stage=vp_stage)
    new_desc = model_description(config, desc["vocab_size"], desc["tie_word_embeddings"], desc.get("hf_extra", {}))
    return model, new_desc


def build_chunks(desc: dict, args, teacher: bool = False, **overrides):
    """This rank's model chunks, one per virtual pipeline stage, and the model description."""
    built = [build_from_description(desc, args, teacher, vp_stage=vp, **overrides) for vp in vp_stages(args)]
    return [model for model, _ in built], built[0][1]


def frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class StageModels:
    student: List[torch.nn.Module]  # this rank's chunks (one per virtual pipeline stage)
    desc: dict  # the student's model description (saved with its checkpoints)
    teacher: Optional[List[torch.nn.Module]]  # the frozen teacher's chunks, same stage placement
    trainable: List[torch.nn.Parameter]
    # run when not resuming; its argument runs the stage forward-only on its first micro-batch (calibration)
    initialise: Callable[[Callable[[], None]], None]
    chunks: List[PipelineChunk]  # what the pipeline schedule runs
    stacked: int = 1  # hidden states per sequence sent between stages (distill: student and teacher)

    def loss(self, batch: dict) -> torch.Tensor:
        """The whole model's loss of one batch (no pipeline parallelism: one chunk)."""
        assert len(self.chunks) == 1 and self.chunks[0].is_first and self.chunks[0].is_last
        return self.chunks[0](batch)


def _stage(student, desc, teacher, trainable, initialise, step, stacked=1) -> StageModels:
    teachers = teacher or [None] * len(student)
    chunks = [PipelineChunk(s, t, step, vp) for s, t, vp in zip(student, teachers, range(len(student)))]
    if len(chunks) == 1:
        chunks[0].vp_stage = None
    return StageModels(student, desc, teacher, trainable, initialise, chunks, stacked)


def _trainable(models, args) -> list:
    if getattr(args, "train_only_mixers", False):
        return [p for m in models for p in freeze_all_but_mixers(m, rnn_only=False)]
    return [p for m in models for p in m.parameters()]


def _ce_step(args):
    def step(chunk, batch):
        hidden = forward_hidden(chunk.student, batch["tokens"], chunk.stage_input)
        if not chunk.is_last:
            return hidden
        return chunked_cross_entropy(chunk.student, hidden, batch["labels"], batch["loss_mask"], args.loss_chunk_size)
    return step


def _distill_step(args):
    """Student and teacher run side by side; the stage tensor stacks them along the batch ([s, 2b, h])."""

    def step(chunk, batch):
        s_in = t_in = None
        if chunk.stage_input is not None:
            s_in, t_in = chunk.stage_input.chunk(2, dim=1)
            t_in = t_in.detach().to(next(chunk.teacher.parameters()).dtype)
        hidden = forward_hidden(chunk.student, batch["tokens"], s_in)
        with torch.no_grad():
            t_hidden = forward_hidden(chunk.teacher, batch["tokens"], t_in)
        if not chunk.is_last:
            return torch.cat([hidden, t_hidden.to(hidden.dtype)], dim=1)
        return chunked_kl(chunk.student, chunk.teacher, hidden, t_hidden.to(hidden.dtype), batch["loss_mask"],
                          args.loss_chunk_size)

    return step


def _load_teacher(args):
    root = args.teacher or args.load
    desc = read_model_description(checkpoint.resolve(root))
    teacher, desc = build_chunks(desc, args, teacher=True)
    checkpoint.load_checkpoint(root, teacher, desc, load_state=False)
    return [frozen(t) for t in teacher], desc


def build_stage(args) -> StageModels:
    stage = args.stage
    if stage in ("pretrain", "finetune"):
        desc = read_model_description(checkpoint.resolve(args.load))
        student, desc = build_chunks(desc, args)
        init = lambda forward: checkpoint.load_checkpoint(args.load, student, desc, load_state=False)  # noqa: E731
        return _stage(student, desc, None, _trainable(student, args), init, _ce_step(args))

    teacher, t_desc = _load_teacher(args)
    n_layers = t_desc["num_layers"]
    if stage == "align":
        student, desc = build_chunks(t_desc, args, **student_fields(args, align_pattern(args, n_layers)),
                                     attention_twins=args.attention_twins)
        trainable = [p for s in student for p in freeze_all_but_mixers(s)]

        def copy_teacher(head_orders=None):
            for s, t in zip(student, teacher):
                init_student_from_teacher(s, t, head_orders)
                _draw_gates(s, args.seed)

        def init(forward):
            if args.align_init == "calibrated":
                calibrate_student(student, teacher, forward, copy_teacher)
            else:
                copy_teacher()

        return _stage(student, desc, teacher, trainable, init, _align_step)

    if stage == "distill":
        pattern = args.layer_pattern
        if not pattern:
            raise ValueError("--stage distill needs --layer-pattern (a string or the select stage's layer_pattern.txt)")
        student, desc = build_chunks(t_desc, args, **student_fields(args, pattern))

        def init(forward):
            if not args.load:
                raise ValueError("--stage distill needs --load <align checkpoint> to take the RNN mixers from")
            load_desc = read_model_description(checkpoint.resolve(args.load))
            if load_desc["layer_pattern"] == pattern:
                checkpoint.load_checkpoint(args.load, student, desc, load_state=False)
            else:
                source = load_hybrid(student, pattern, args.teacher, args.load)
                if ATTENTION in pattern and parallel.is_rank0():
                    log.info("distill: the attention layers start from %s", source)

        return _stage(student, desc, teacher, _trainable(student, args), init, _distill_step(args), stacked=2)
    raise ValueError(f"stage {stage!r} does not train; see halo/select.py")


def align_pattern(args, num_layers: int) -> str:
    """The align stage's all-RNN student: --layer-pattern if given (e.g. mixing 'L' and 'D'), else the
    --rnn-mixer letter at every layer."""
    pattern = args.layer_pattern or RNN_MIXERS[args.rnn_mixer] * num_layers
    if ATTENTION in pattern:
        raise ValueError(f"--stage align trains an RNN twin of every attention layer: --layer-pattern {pattern!r} "
                         f"must not contain 'A' (leave it out to use --rnn-mixer {args.rnn_mixer} everywhere)")
    return pattern


def _draw_gates(model, seed: int) -> None:
    """The output gates are the one part of an aligned student left at a random init: draw each from a
    generator seeded by its global layer, so the student is the same at every TP/PP layout (the
    construction-time draw depends on which layers a rank builds)."""
    for layer in model.decoder.layers:
        gate = getattr(layer.self_attention, "linear_gate", None)
        if gate is None:
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + layer.layer_number)
            _initialize_affine_weight_cpu(gate.weight, gate.output_size, gate.input_size, gate.output_size_per_partition,
                                          0, gate.config.init_method, params_dtype=gate.weight.dtype,
                                          skip_set_tensor_parallel_attributes=True)


def _align_step(chunk, batch):
    """Stage 1: each RNN mixer (and attention twin) sees the teacher's (detached) normed input of its layer and
    is trained to reproduce the teacher mixer's output; loss = mean over mixers of ||y_t - y_s|| / sqrt(d).
    Only the teacher's residual stream goes to the next stage; each stage's layer terms are local."""
    teacher, student = chunk.teacher, chunk.student
    with torch.no_grad():
        if teacher.pre_process:
            h = teacher.embedding(input_ids=batch["tokens"], position_ids=None)
        else:
            h = chunk.stage_input.detach().to(next(teacher.parameters()).dtype)
    total = h.new_zeros((), dtype=torch.float32)
    tokens = h.shape[0] * h.shape[1]
    # every layer's aligned mixers: its RNN twin, and its attention twin with --attention-twins
    mixer_names = MIXER_ATTRIBUTES if student.config.attention_twins else MIXER_ATTRIBUTES[:1]
    for t_layer, s_layer in zip(teacher.decoder.layers, student.decoder.layers):
        with torch.no_grad():
            x = t_layer.input_layernorm(h)
            y_t, _ = t_layer.self_attention(x)
            h = h + y_t
            h = h + t_layer.mlp(t_layer.pre_mlp_layernorm(h))[0]
        x_s = x.to(next(s_layer.parameters()).dtype)
        for name in mixer_names:
            y_s, _ = getattr(s_layer, name)(x_s)
            # clamped: an attention twin's output at position 0 is the teacher's exactly (no earlier token, and
            # RoPE and the HyPE scale are 1 there), and the gradient of sqrt at 0 is infinite
            dist = (y_s.float() - y_t.float()).pow(2).sum(-1).clamp_min(1e-20).sqrt() / math.sqrt(y_t.shape[-1])
            total = total + dist.sum()
    if student.config.sequence_parallel:
        # each TP rank holds an equal slice of the sequence: sum the slices, and since every rank then
        # has the same loss, the backward is the identity (as losses._tp_sum)
        total = reduce_from_tensor_model_parallel_region(total)
        tokens *= parallel_state.get_tensor_model_parallel_world_size()
    term = total / (tokens * student.config.num_layers * len(mixer_names))  # all layers: PP stages add their terms
    return stage_output(chunk, term if chunk.is_last else h, term)
