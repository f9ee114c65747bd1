"""Stage 1's calibrated initialisation (`--align-init calibrated`): two statistics of one micro-batch.

The paper's initialisation copies each attention head into the RNN head of the same index, whose decay
is fixed by that index alone, and starts the output norm at 1. On the first micro-batch of the align
stage (tokens the stage trains on anyway) we measure two things instead:

1. **Which teacher head goes with which decay.** A head that looks a few tokens back is served by a
   fast decay, one that looks far back by a slow one. Each teacher head's span is the mean over
   queries of E_attention[log(1 + distance)]; within a layer the shortest-span head takes the
   fastest-decay RNN head, the next the next, and so on (`span_head_order`). Only the start changes:
   the decays stay Lightning's fixed ALiBi slopes, the model is the same.
2. **The output scale.** The student's output norm makes every token unit-RMS, several times off the
   teacher's attention output. Each output-norm channel is scaled so that the student's input to the
   output projection has the teacher's RMS in that channel (`output_scales`).

Both passes run the align step forward-only through the pipeline schedule (`forward` below), with
hooks that record the statistics of each rank's layers; sums are reduced over data- and
context-parallel ranks, heads gathered over tensor-parallel ranks, so every layout gets the same init.
"""

import logging
import math
from typing import Callable, Dict

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from kernels import lightning_slopes

from ..layers import HypeNetAttention, RNNMixer, _cp_group
from .init import gather_cat

log = logging.getLogger("megatron_hypenet")

SPAN_QUERY_BLOCK = 256  # query rows per block of attention probabilities: memory b x h x block x s


def span_head_order(spans: torch.Tensor, slopes: torch.Tensor) -> list:
    """order[p] = the teacher head RNN head p starts from: the k-th fastest decay (largest slope) takes
    the k-th shortest span (ties: lower index first)."""
    if spans.shape != slopes.shape:
        raise ValueError(f"{spans.numel()} head spans for {slopes.numel()} RNN heads")
    order = [0] * len(spans)
    by_decay = sorted(range(len(slopes)), key=lambda p: (-float(slopes[p]), p))
    by_span = sorted(range(len(spans)), key=lambda h: (float(spans[h]), h))
    for p, h in zip(by_decay, by_span):
        order[p] = h
    return order


@torch.no_grad()
def attention_log_distance(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Sum over queries and batch of E_p[log(1 + i - j)] under causal softmax attention, per head [h].

    q [s, b, h, d] is this rank's chunk of the sequence; k [S, b, h, d] every key up to its end
    (S = s without context parallelism)."""
    s, S = q.shape[0], k.shape[0]
    q_pos = torch.arange(S - s, S, device=q.device)
    k_pos = torch.arange(S, device=q.device)
    kf = k.float().permute(1, 2, 3, 0)  # [b, h, d, S]
    total = torch.zeros(q.shape[2], dtype=torch.float64, device=q.device)
    for a in range(0, s, SPAN_QUERY_BLOCK):
        qb = q[a:a + SPAN_QUERY_BLOCK].float().permute(1, 2, 0, 3)  # [b, h, n, d]
        distance = (q_pos[a:a + SPAN_QUERY_BLOCK, None] - k_pos[None, :]).float()
        scores = (qb @ kf) * scale
        probs = torch.softmax(scores.masked_fill(distance < 0, float("-inf")), dim=-1)
        total += (probs * torch.log1p(distance.clamp(min=0))).sum((-1, -2, 0)).double()
    return total


def _sum_over_data(t: torch.Tensor) -> torch.Tensor:
    """Sum over data- and context-parallel ranks (the same statistic on every replica)."""
    if parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        if group.size() > 1:
            dist.all_reduce(t, group=group)
    return t


def _gather_keys(k: torch.Tensor) -> torch.Tensor:
    """Keys of every earlier context-parallel chunk and this one, [S, b, h, d]."""
    group = _cp_group()
    if group is None:
        return k
    return gather_cat(k, 0, group)[: (group.rank() + 1) * k.shape[0]]


def teacher_head_spans(teachers, forward: Callable[[], None]) -> Dict[int, torch.Tensor]:
    """{global layer number: [all heads] mean log attention distance} of this rank's teacher layers."""
    sums, counts, hooks = {}, {}, []
    for teacher in teachers:
        for layer in teacher.decoder.layers:
            mixer = layer.self_attention
            if not isinstance(mixer, HypeNetAttention):
                raise TypeError(f"teacher layer {layer.layer_number} is not softmax attention")

            def record(module, inputs, output, mixer=mixer, n=layer.layer_number):
                q, k, _ = mixer.heads(output[0])
                sums[n] = sums.get(n, 0) + attention_log_distance(q, _gather_keys(k), mixer.head_dim**-0.5)
                counts[n] = counts.get(n, 0) + q.shape[0] * q.shape[1]

            hooks.append(mixer.linear_qkv.register_forward_hook(record))
    try:
        forward()
    finally:
        for hook in hooks:
            hook.remove()
    spans = {}
    for teacher in teachers:
        for layer in teacher.decoder.layers:
            n, mixer = layer.layer_number, layer.self_attention
            total = torch.cat([sums[n], torch.tensor([float(counts[n])], dtype=torch.float64, device=sums[n].device)])
            total = _sum_over_data(total)
            # TP ranks hold consecutive heads
            spans[n] = gather_cat((total[:-1] / total[-1]).float(), 0, mixer.tp_group).cpu()
    return spans


def head_orders(teachers, num_heads: int, forward: Callable[[], None]) -> Dict[int, list]:
    """{global layer number: order} for this rank's layers (see `span_head_order`)."""
    slopes = lightning_slopes(num_heads)
    return {n: span_head_order(spans, slopes) for n, spans in teacher_head_spans(teachers, forward).items()}


def _channel_sq(store: dict, key):
    def hook(module, inputs):
        x = inputs[0].detach().float()
        sq = torch.cat([x.pow(2).flatten(0, -2).sum(0).double(),
                        torch.tensor([x[..., 0].numel()], dtype=torch.float64, device=x.device)])
        store[key] = store.get(key, 0) + sq
    return hook


@torch.no_grad()
def output_scales(students, teachers, forward: Callable[[], None]) -> Dict[int, torch.Tensor]:
    """{global layer number: [local channels] factor} that gives each RNN mixer's output-projection input the
    teacher attention's RMS per channel (both measured on the teacher's stream, as align trains them)."""
    store, hooks = {}, []
    for student, teacher in zip(students, teachers):
        for s_layer, t_layer in zip(student.decoder.layers, teacher.decoder.layers):
            if isinstance(s_layer.self_attention, RNNMixer) and hasattr(s_layer.self_attention, "out_norm"):
                n = s_layer.layer_number
                hooks.append(s_layer.self_attention.linear_proj.register_forward_pre_hook(_channel_sq(store, ("s", n))))
                hooks.append(t_layer.self_attention.linear_proj.register_forward_pre_hook(_channel_sq(store, ("t", n))))
    try:
        forward()
    finally:
        for hook in hooks:
            hook.remove()
    scales = {}
    for _, n in sorted(k for k in store if k[0] == "s"):
        s_sq, t_sq = _sum_over_data(store[("s", n)]), _sum_over_data(store[("t", n)])
        s_ms, t_ms = s_sq[:-1] / s_sq[-1], t_sq[:-1] / t_sq[-1]
        # a channel the student leaves at zero cannot be scaled into shape: it keeps its weight
        scales[n] = torch.where(s_ms > 0, (t_ms / s_ms.clamp(min=1e-30)).sqrt(), torch.ones_like(s_ms)).float()
    return scales


@torch.no_grad()
def apply_output_scales(students, scales: Dict[int, torch.Tensor]) -> None:
    for student in students:
        for layer in student.decoder.layers:
            if layer.layer_number in scales:
                weight = layer.self_attention.out_norm.weight
                weight.mul_(scales[layer.layer_number].to(weight.device, weight.dtype))


def describe(orders: Dict[int, list], scales: Dict[int, torch.Tensor]) -> str:
    """One log line per layer: the head order and the mean output-norm factor."""
    lines = []
    for n in sorted(orders):
        scale = scales.get(n)
        mean = f", output norm x{math.exp(scale.log().mean().item()):.2f} (geometric mean)" if scale is not None else ""
        lines.append(f"layer {n - 1}: RNN heads start from teacher heads {orders[n]}{mean}")
    return "\n".join(lines)


def calibrate_student(students, teachers, forward: Callable[[], None],
                      copy_teacher: Callable[[Dict[int, list]], None]) -> tuple:
    """The calibrated init: measures the head orders, has `copy_teacher(orders)` initialise the students from the
    teachers in that order, then scales their output norms. `forward` runs the align stage forward-only on its
    first micro-batch (the first time on a student not yet initialised: only the teacher's attention is read).
    Returns (orders, scales)."""
    orders = head_orders(teachers, students[0].config.lightning_num_heads, forward)
    copy_teacher(orders)
    scales = output_scales(students, teachers, forward)
    apply_output_scales(students, scales)
    # one log per pipeline stage (its layers)
    if parallel_state.get_tensor_model_parallel_rank() == 0 and \
            parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
        log.info("align init calibrated on the first micro-batch:\n%s", describe(orders, scales))
    return orders, scales
