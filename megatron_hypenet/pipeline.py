"""Pipeline parallelism through megatron-core's schedules (1F1B, interleaved), for every HALO stage.

Each rank holds one `PipelineChunk` per (virtual) pipeline stage: the student's layers of that stage
and, co-located, the frozen teacher's *same* layers (see docs/parallelism.md). What a stage sends to
the next is one tensor:

    pretrain, finetune   the student's hidden states                 [s, b, h]
    distill              student and teacher hidden states, stacked  [s, 2b, h]  (teacher half detached)
    align                the teacher's hidden states                 [s, b, h]  (the student's mixers read
                                                                                 the teacher's stream)

The last stage computes the loss (CE, or the KL from both final hidden states). Align's loss is a
sum of per-layer terms, each computed on the stage that holds its layer: `stage_output` makes such a
term part of the backward that megatron-core's schedule drives from the last stage's loss.
With PP=1 the same code runs one chunk that is both first and last stage (megatron-core's
no-pipelining schedule), so there is one training path.
"""

import contextlib
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import get_forward_backward_func


class PipelineChunk(torch.nn.Module):
    """One (virtual) pipeline stage of a HALO stage, as megatron-core's schedules drive it.

    `step(chunk, batch)` is the stage's math: it returns the loss on the last stage, else the tensor
    sent to the next stage. The schedule hands the received tensor over through `set_input_tensor`.
    """

    def __init__(self, student, teacher, step: Callable, vp_stage: Optional[int] = None):
        super().__init__()
        self.student, self.teacher, self.step = student, teacher, step
        self.config = student.config  # what the schedule reads (pipeline dtype, sequence parallel, ...)
        self.model_type = ModelType.encoder_or_decoder
        self.vp_stage = vp_stage
        self.stage_input = None  # the tensor received from the previous stage (None on the first)
        self.term_weight = 1.0  # weight of a loss term computed here (align) in the step's loss
        self.terms: List[torch.Tensor] = []  # such terms' values, for logging

    @property
    def is_first(self) -> bool:
        return self.student.pre_process

    @property
    def is_last(self) -> bool:
        return self.student.post_process

    def set_input_tensor(self, tensors) -> None:
        self.stage_input = tensors[0] if isinstance(tensors, (list, tuple)) else tensors

    def forward(self, batch: dict) -> torch.Tensor:
        out = self.step(self, batch)
        return out if self.is_last else out.to(self.config.pipeline_dtype or out.dtype)


class _StageTerm(torch.autograd.Function):
    """Passes a stage's output on; in backward, seeds `term` (a loss term computed on this stage) with
    its weight, and gives the stage input the zero gradient the schedule sends back."""

    @staticmethod
    def forward(ctx, output, term, weight, stage_input):
        ctx.weight, ctx.term_meta = weight, (term.dtype, term.device)
        ctx.input_meta = None if stage_input is None else (stage_input.shape, stage_input.dtype, stage_input.device)
        return output.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        dtype, device = ctx.term_meta
        term_grad = torch.full((), ctx.weight, dtype=dtype, device=device)
        input_grad = None
        if ctx.input_meta is not None:
            shape, in_dtype, in_device = ctx.input_meta
            input_grad = torch.zeros(shape, dtype=in_dtype, device=in_device)
        return None, term_grad, None, input_grad


def stage_output(chunk: PipelineChunk, output: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """The output of a stage that computed `term`, a part of the loss that depends on no later stage.

    On the last stage `output` is the loss itself (the schedule backpropagates it, weighted 1/microbatches);
    elsewhere the term's gradient is seeded when the schedule runs this stage's backward.
    """
    if chunk.is_last:
        if chunk.stage_input is None:
            return output
        return _StageTerm.apply(output, output, chunk.term_weight, chunk.stage_input)
    chunk.terms.append(term.detach())
    return _StageTerm.apply(output, term, chunk.term_weight, chunk.stage_input)


def run(chunks: List[PipelineChunk], batches: list, seq_length: int, micro_batch_size: int,
        forward_only: bool = False, autocast=None, whole_model_loss: Optional[Callable] = None) -> float:
    """Forward (and backward) of `batches` (this rank's micro-batches of one step) through the schedule;
    returns the mean loss over the micro-batches (on every rank).

    `micro_batch_size` is the batch size of the tensor sent between stages (2x for distill). Without
    pipeline parallelism `whole_model_loss(batch)` (the stage's loss) replaces the one chunk's forward.
    """
    device = next(chunks[0].parameters()).device
    one = torch.ones((), dtype=torch.int, device=device)
    reported = []

    def loss_func(loss):
        reported.append(loss.detach().clone())  # before the schedule divides it by the micro-batch count
        return loss, one, {}  # (loss, tokens, ...): our loss is already a per-micro-batch mean

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        with autocast or contextlib.nullcontext():
            out = whole_model_loss(batch) if whole_model_loss is not None else chunk(batch)
        return out, loss_func

    for chunk in chunks:
        chunk.term_weight, chunk.terms = 1.0 / len(batches), []
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    if pipelined:
        whole_model_loss = None
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(batches) for _ in chunks],
        model=chunks,
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    values = reported + [t for chunk in chunks for t in chunk.terms]
    total = torch.stack([v.double() for v in values]).sum() if values else torch.zeros((), dtype=torch.float64)
    if pipelined:  # the last stage holds the loss (align: every stage holds its layers' terms)
        total = total.to(device)
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return float(total) / len(batches)


def allreduce_tied_embedding_grads(students) -> None:
    """Tied input/output embeddings live on the first and the last stage: their gradients add up
    (megatron-core's embedding group; finalize_model_grads does this for DDP-wrapped models)."""
    group = parallel_state.get_embedding_group(check_initialized=False)
    if group is None or group.size() <= 1 or not parallel_state.is_rank_in_embedding_group():
        return
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    model = students[0] if first else students[-1]
    if not model.share_embeddings_and_output_weights:
        return
    weight = model.shared_embedding_or_output_weight()
    if weight.grad is not None:
        dist.all_reduce(weight.grad, group=group)
