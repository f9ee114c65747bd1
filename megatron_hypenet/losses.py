"""Losses over vocabulary-parallel logits, computed in sequence chunks.

The LM head runs chunk by chunk under activation checkpointing, so full-vocabulary logits for a
long sequence never exist at once (forward or backward): memory is O(chunk x vocab / TP).
Padded vocabulary entries (megatron pads to a multiple of 128) are masked out so the softmax is
exactly the HF model's.
"""

import torch
import torch.distributed.nn.functional as dist_fn
from megatron.core import parallel_state
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from torch.utils.checkpoint import checkpoint


def _tp():
    group = parallel_state.get_tensor_model_parallel_group()
    return group, group.size(), group.rank()


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """[s, b, V/TP] fp32 logits of this TP rank's vocabulary shard, padding entries at -inf."""
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight)
    logits = logits.float()
    _, tp, rank = _tp()
    shard = logits.shape[-1]
    first = rank * shard
    if first + shard > model.vocab_size:
        pad = torch.arange(first, first + shard, device=logits.device) >= model.vocab_size
        logits = logits.masked_fill(pad, float("-inf"))
    return logits


def vocab_parallel_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    group, tp, _ = _tp()
    m = logits.detach().amax(-1, keepdim=True)
    if tp > 1:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    sum_exp = (logits - m).exp().sum(-1, keepdim=True)
    if tp > 1:  # each rank normalises its own shard with the total: gradients from all ranks add up

        sum_exp = dist_fn.all_reduce(sum_exp, group=group)
    return logits - m - sum_exp.log()


def _tp_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of per-shard partial results. Every rank then computes the same loss from it, so the backward
    is the identity (an all-reduce there would count each gradient TP times)."""
    return reduce_from_tensor_model_parallel_region(x)


def _token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy [s, b] for vocab-sharded logits."""
    logp = vocab_parallel_log_softmax(logits)
    _, _, rank = _tp()
    shard = logits.shape[-1]
    local = labels - rank * shard
    mine = (local >= 0) & (local < shard)
    picked = logp.gather(-1, local.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1) * mine
    return -_tp_sum(picked)


def _token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-token forward KL(teacher || student) [s, b]."""
    logp_s = vocab_parallel_log_softmax(student_logits)
    logp_t = vocab_parallel_log_softmax(teacher_logits)
    p_t = logp_t.exp()
    # 0 * (-inf) at padded entries would be nan; they carry no teacher mass.
    term = torch.where(p_t > 0, p_t * (logp_t - logp_s), torch.zeros_like(p_t))
    return _tp_sum(term.sum(-1))


def _chunks(s: int, size: int):
    return [(i, min(i + size, s)) for i in range(0, s, size)]


def _sequence_parallel_size(model) -> int:
    return _tp()[1] if model.config.sequence_parallel else 1


def _head_chunks(model, hidden, size: int):
    """(a, b, rows) per chunk of `hidden`: rows picks the matching [s, b] labels/mask of the full sequence.

    Under sequence parallelism `hidden` is this rank's slice of the sequence and the output layer
    all-gathers its input, so chunk [a, b) of every rank's slice comes out stacked rank by rank.
    """
    sp = _sequence_parallel_size(model)
    local = hidden.shape[0]
    for a, b in _chunks(local, max(1, size // sp)):
        yield a, b, lambda t, a=a, b=b: t.view(sp, local, *t.shape[1:])[:, a:b].flatten(0, 1)


def chunked_cross_entropy(model, hidden, labels, loss_mask, chunk_size: int = 1024) -> torch.Tensor:
    """Mean next-token CE over `loss_mask`; hidden [s, b, h], labels/loss_mask [b, s]."""
    labels, loss_mask = labels.t(), loss_mask.t().float()
    total = hidden.new_zeros((), dtype=torch.float32)
    for a, b, rows in _head_chunks(model, hidden, chunk_size):
        fn = lambda h, y, m: (_token_ce(lm_logits(model, h), y) * m).sum()  # noqa: E731
        total = total + checkpoint(fn, hidden[a:b], rows(labels), rows(loss_mask), use_reentrant=False)
    return total / loss_mask.sum().clamp(min=1)


def chunked_kl(student, teacher, student_hidden, teacher_hidden, loss_mask, chunk_size: int = 1024) -> torch.Tensor:
    """Mean forward KL(teacher || student) over `loss_mask`; the teacher's head runs without grad."""
    loss_mask = loss_mask.t().float()
    total = student_hidden.new_zeros((), dtype=torch.float32)

    def fn(hs, ht, m):
        with torch.no_grad():
            t_logits = lm_logits(teacher, ht)
        return (_token_kl(lm_logits(student, hs), t_logits) * m).sum()

    for a, b, rows in _head_chunks(student, student_hidden, chunk_size):
        total = total + checkpoint(fn, student_hidden[a:b], teacher_hidden[a:b], rows(loss_mask), use_reentrant=False)
    return total / loss_mask.sum().clamp(min=1)


def full_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """[b, s, V] logits gathered over TP and cut to the real vocabulary (evaluation, tests)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(lm_logits(model, hidden))
    return logits[..., : model.vocab_size].transpose(0, 1)
