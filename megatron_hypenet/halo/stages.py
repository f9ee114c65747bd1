"""The HALO stages as (models to build, how to initialise them, the loss of one batch).

    pretrain  CE on the teacher itself (how the embedded demo makes its tiny teacher)
    align     stage 1: every attention mixer gets a Lightning twin trained to reproduce its output
    distill   stage 2: the hybrid (selected pattern, HyPE) against the frozen teacher, forward KL
    finetune  stage 3: the hybrid alone, CE at a longer sequence length
(select, between align and distill, trains nothing: see select.py.)
"""

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .. import checkpoint
from ..config import ATTENTION, LIGHTNING, config_from_description, model_description, read_model_description
from ..losses import chunked_cross_entropy, chunked_kl
from ..model import build_model
from .init import freeze_all_but_mixers, init_student_from_teacher, load_hybrid


def forward_hidden(model, tokens: torch.Tensor) -> torch.Tensor:
    """Final hidden states [s, b, h] (after the final norm); the LM head runs chunked in the loss."""
    emb = model.embedding(input_ids=tokens, position_ids=None)
    return model.decoder(hidden_states=emb, attention_mask=None)


def student_fields(args, pattern: str) -> dict:
    return dict(
        layer_pattern=pattern,
        attention_rope=args.attention_rope,
        attention_query_scale_base=args.attention_query_scale_base,
        lightning_rope=not args.no_lightning_rope,
        lightning_qk_norm=not args.no_lightning_qk_norm,
        lightning_output_gate=not args.no_lightning_output_gate,
        lightning_output_norm=not args.no_lightning_output_norm,
        lightning_short_conv=args.lightning_short_conv,
        lightning_scale=args.lightning_scale,
    )


def parallel_fields(args, teacher: bool = False) -> dict:
    fields = dict(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
    )
    if teacher and args.bf16:
        fields.update(params_dtype=torch.bfloat16)  # frozen: no fp32 master copy needed
    return fields


def build_from_description(desc: dict, args, teacher: bool = False, **overrides):
    config = config_from_description(desc, **parallel_fields(args, teacher), **overrides)
    model = build_model(config, desc["vocab_size"], desc["tie_word_embeddings"])
    new_desc = model_description(config, desc["vocab_size"], desc["tie_word_embeddings"], desc.get("hf_extra", {}))
    return model, new_desc


def frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class StageModels:
    student: torch.nn.Module
    desc: dict  # the student's model description (saved with its checkpoints)
    teacher: Optional[torch.nn.Module]
    trainable: List[torch.nn.Parameter]
    initialise: Callable[[], None]  # run when not resuming
    loss: Callable[[dict], torch.Tensor]


def _ce(student, args):
    def loss(batch):
        hidden = forward_hidden(student, batch["tokens"])
        return chunked_cross_entropy(student, hidden, batch["labels"], batch["loss_mask"], args.loss_chunk_size)
    return loss


def _load_teacher(args):
    root = args.teacher or args.load
    desc = read_model_description(checkpoint.resolve(root))
    teacher, desc = build_from_description(desc, args, teacher=True)
    checkpoint.load_checkpoint(root, teacher, desc, load_state=False)
    return frozen(teacher), desc


def build_stage(args) -> StageModels:
    stage = args.stage
    if stage in ("pretrain", "finetune"):
        desc = read_model_description(checkpoint.resolve(args.load))
        student, desc = build_from_description(desc, args)
        init = lambda: checkpoint.load_checkpoint(args.load, student, desc, load_state=False)  # noqa: E731
        return StageModels(student, desc, None, list(student.parameters()), init, _ce(student, args))

    teacher, t_desc = _load_teacher(args)
    n_layers = t_desc["num_layers"]
    if stage == "align":
        student, desc = build_from_description(t_desc, args, **student_fields(args, LIGHTNING * n_layers))
        trainable = freeze_all_but_mixers(student)
        return StageModels(student, desc, teacher, trainable, lambda: init_student_from_teacher(student, teacher),
                           _align_loss(student, teacher))

    if stage == "distill":
        pattern = args.layer_pattern
        if not pattern:
            raise ValueError("--stage distill needs --layer-pattern (a string or the select stage's layer_pattern.txt)")
        student, desc = build_from_description(t_desc, args, **student_fields(args, pattern))

        def init():
            if not args.load:
                raise ValueError("--stage distill needs --load <align checkpoint> to take the Lightning mixers from")
            load_desc = read_model_description(checkpoint.resolve(args.load))
            if load_desc["layer_pattern"] == pattern:
                checkpoint.load_checkpoint(args.load, student, desc, load_state=False)
            else:
                load_hybrid(student, pattern, args.teacher, args.load)

        def loss(batch):
            hidden = forward_hidden(student, batch["tokens"])
            with torch.no_grad():
                t_hidden = forward_hidden(teacher, batch["tokens"])
            return chunked_kl(student, teacher, hidden, t_hidden.to(hidden.dtype), batch["loss_mask"], args.loss_chunk_size)

        return StageModels(student, desc, teacher, list(student.parameters()), init, loss)
    raise ValueError(f"stage {stage!r} does not train; see halo/select.py")


def _align_loss(student, teacher):
    """Stage 1: each Lightning mixer sees the teacher's (detached) normed input of its layer and is
    trained to reproduce the teacher mixer's output; loss = mean over layers of ||y_t - y_s|| / sqrt(d)."""

    def loss(batch):
        with torch.no_grad():
            h = teacher.embedding(input_ids=batch["tokens"], position_ids=None)
        total = 0.0
        layers = list(zip(teacher.decoder.layers, student.decoder.layers))
        for t_layer, s_layer in layers:
            with torch.no_grad():
                x = t_layer.input_layernorm(h)
                y_t, _ = t_layer.self_attention(x)
                h = h + y_t
                h = h + t_layer.mlp(t_layer.pre_mlp_layernorm(h))[0]
            y_s, _ = s_layer.self_attention(x.to(next(s_layer.parameters()).dtype))
            dist = (y_s.float() - y_t.float()).pow(2).sum(-1).sqrt() / math.sqrt(y_t.shape[-1])
            total = total + dist.mean()
        return total / len(layers)

    return loss
