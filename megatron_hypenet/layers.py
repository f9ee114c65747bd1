"""HypeNet token mixers and norms as megatron-core modules.

The mixers sit in the `self_attention` slot of megatron-core's `TransformerLayer` and take their
linear layers from `ModuleSpec` submodules, so tensor parallelism comes from
`ColumnParallelLinear`/`RowParallelLinear` and nothing here talks to the parallel state except
through the TP group handed in. The math is docs/architecture.md; the HF export mirrors it.
"""

import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from kernels import gated_delta_rule, lightning_attention, lightning_slopes
from kernels.gated_delta import entering_state, gated_delta_rule_affine

from .config import HypeNetConfig


def _tp_group(pg_collection):
    if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
        return pg_collection.tp
    return parallel_state.get_tensor_model_parallel_group()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, sum_sq_group=None, width=None) -> torch.Tensor:
    """Qwen3's RMSNorm: statistics in fp32, weight applied in the input dtype.

    With `sum_sq_group`, the channels of `x` are one shard of `width` channels spread over that group
    (the heads of a TP rank), and the mean square is all-reduced so the result equals the unsharded norm.
    """
    dtype = x.dtype
    xf = x.float()
    if sum_sq_group is None:
        mean_sq = xf.pow(2).mean(-1, keepdim=True)
    else:
        mean_sq = dist_fn.all_reduce(xf.pow(2).sum(-1, keepdim=True), group=sum_sq_group) / width
    # in x's dtype even when the weight is an fp32 master copy under bf16 autocast
    return (weight * (xf * torch.rsqrt(mean_sq + eps)).to(dtype)).to(dtype)


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's, handing its own TP group to the matmul. megatron-core 0.16 hands it None (the matmul
    does not communicate here), which raises a Python warning on rank 0 at every call: millions in a run's logs,
    and a graph break in each torch.compile'd layer (--compile). The group is the one None stands for."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


class RMSNorm(torch.nn.Module):
    """RMSNorm with the `(config, hidden_size, eps)` signature megatron-core's specs build norms with.

    Unlike megatron-core's local torch norm it supports sequence parallelism: the weight is marked
    `sequence_parallel` so its gradient is all-reduced across the TP group, as for TE's norms.
    """

    def __init__(self, config: HypeNetConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float):
    """cos, sin [T, dim] for the HF `rotate_half` RoPE convention, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [s, b, h, d]; cos/sin [s, d]."""
    cos, sin = cos[:, None, None, :].to(x.dtype), sin[:, None, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def query_scale(positions: torch.Tensor, base: float) -> torch.Tensor:
    """HyPE's attention query scale log(pos + a) / log(a) (1 at position 0) [T], fp32."""
    return torch.log(positions.float() + base) / math.log(base)


class _AllGatherStack(torch.autograd.Function):
    """all_gather into a stacked [world, ...] tensor; backward sums every rank's gradient for this rank's
    piece (reduce-scatter). torch.distributed.nn's all_gather loses cross-rank gradients on gloo."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((group.size() * x.shape[0], *x.shape[1:]))  # gloo wants the pieces end to end
        torch.distributed.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out.view(group.size(), *x.shape)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if torch.distributed.get_backend(ctx.group) == "gloo":  # gloo has no reduce-scatter
            torch.distributed.all_reduce(grad, group=ctx.group)
            return grad[ctx.group.rank()], None
        out = grad.new_empty(grad.shape[1:])
        torch.distributed.reduce_scatter_tensor(out, grad.flatten(0, 1), group=ctx.group)
        return out, None


def gather_stack(x: torch.Tensor, group) -> torch.Tensor:
    return _AllGatherStack.apply(x, group)


def _cp_group():
    """The context-parallel group when the sequence is split over ranks, else None."""
    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_context_parallel_world_size() == 1:
        return None
    return parallel_state.get_context_parallel_group()


def sequence_positions(seq_len: int, device) -> torch.Tensor:
    """Absolute positions of this rank's tokens: context parallel ranks hold consecutive chunks."""
    group = _cp_group()
    start = 0 if group is None else group.rank() * seq_len
    return torch.arange(start, start + seq_len, device=device)


def cp_attention(q, k, v, scale):
    """Causal attention [b, h, s, d] over a sequence split into consecutive chunks across the CP group:
    keys/values are all-gathered (autograd-aware) and each rank's queries see keys up to their position."""
    group = _cp_group()
    if group is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    s = q.shape[2]
    # One collective for k and v: two independent ones could run their backwards in different orders on
    # different ranks and exchange each other's gradients.
    kv = gather_stack(torch.stack([k, v]), group)  # [cp, 2, b, h, s, d]
    k, v = (torch.cat(kv[:, i].unbind(0), dim=2) for i in range(2))
    q_pos = torch.arange(s, device=q.device) + group.rank() * s
    mask = torch.arange(k.shape[2], device=q.device)[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def cp_lightning_attention(q, k, v, slopes, scale):
    """Lightning Attention over consecutive sequence chunks on the CP group, [b, t, h, d].

    Each rank runs its chunk from a zero state and shares its final state; the state entering chunk r is
    the decay-weighted prefix of the earlier chunks' states, and its contribution to the outputs,
    scale * exp(-m (t+1)) q_t S_in, is added. Exact: the recurrence is linear in the initial state.
    """
    group = _cp_group()
    o, final = lightning_attention(q, k, v, slopes, scale=scale, output_final_state=group is not None)
    if group is None:
        return o
    states = gather_stack(final, group)  # [cp, b, h, dk, dv]
    t, rank = q.shape[1], group.rank()
    m = slopes.to(final.dtype)  # fp32 state (fp64 in the float64 reference tests)
    # S_in = sum_{j<rank} exp(-m t (rank-1-j)) S_j. Later ranks get weight 0 rather than being left out:
    # every rank must use every gathered state, or the all-gather's backward runs on some ranks only.
    hops = (rank - 1 - torch.arange(states.shape[0], device=q.device)).float()
    weights = torch.exp(-m[None, :] * t * hops.clamp(min=0)[:, None]) * (hops >= 0)[:, None]
    s_in = (weights[:, None, :, None, None] * states).sum(0)
    decay = torch.exp(-m[None, :] * torch.arange(1, t + 1, device=q.device, dtype=m.dtype)[:, None])
    q_decayed = q.to(m.dtype) * decay[None, :, :, None]
    return (o.to(m.dtype) + scale * torch.einsum("bthk,bhkv->bthv", q_decayed, s_in)).to(o.dtype)


def cp_gated_delta_rule(q, k, v, g, beta, scale):
    """Gated DeltaNet over consecutive sequence chunks on the CP group, [b, t, h, d]; o in v's dtype.
    Each rank runs its chunk as an affine function of its entering state (gated_delta_rule_affine), the
    ranks share their (S0, M), and each chains the earlier ranks' into its entering state. Exact."""
    group = _cp_group()
    if group is None:
        return gated_delta_rule(q, k, v, g, beta, scale=scale)[0]
    o0, q_m, s0, m = gated_delta_rule_affine(q, k, v, g, beta, scale)
    dv = v.shape[-1]
    finals = gather_stack(torch.cat([s0, m], -1), group)  # one collective (see cp_attention)
    s_in = entering_state(finals[..., :dv], finals[..., dv:], group.rank())
    return (o0 + torch.einsum("bthk,bhkv->bthv", q_m, s_in)).to(v.dtype)


def causal_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv over time; x [s, b, c], weight [c, 1, K]. Under context parallelism the
    window reaches back into the previous rank's chunk, so its last K-1 inputs replace the zero padding."""
    K = weight.shape[-1]
    group = _cp_group()
    if group is None:
        history = x.new_zeros(K - 1, *x.shape[1:])
    else:
        tails = gather_stack(x[-(K - 1):], group)
        # a one-hot pick keeps every gathered tail in the graph (see cp_lightning_attention)
        pick = torch.arange(tails.shape[0], device=x.device) == group.rank() - 1
        history = (pick.to(x.dtype)[:, None, None, None] * tails).sum(0)
    y = F.conv1d(torch.cat([history, x]).permute(1, 2, 0), weight, groups=x.shape[-1])
    return y.permute(2, 0, 1)


def checkpoint_under_forward_autocast(function, distribute_saved_activations, *args):
    """megatron-core's activation checkpoint (`tensor_parallel.checkpoint`), recomputing under the autocast
    state of the forward. megatron-core's CheckpointFunction reruns `function` in the backward outside any
    autocast: under the trainer's bf16 autocast on fp32 weights the rerun would mix bf16 activations with
    fp32 weights (a dtype error in the first linear layer, seen on H100 with full recompute)."""
    device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    enabled, dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)

    def run(*inputs):
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return function(*inputs)

    return tensor_parallel.random.checkpoint(run, distribute_saved_activations, *args)


@dataclass
class MixerSubmodules:
    linear_qkv: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    linear_gate: Union[ModuleSpec, type, None] = None
    linear_a: Union[ModuleSpec, type, None] = None  # Gated DeltaNet: decay input
    linear_b: Union[ModuleSpec, type, None] = None  # Gated DeltaNet: beta input


class _Mixer(MegatronModule):
    """What every mixer shares: the fused QKV projection, the output projection and the head shard."""

    def __init__(self, config, submodules, layer_number, num_heads, qkv_out, proj_in, pg_collection):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.tp_group = _tp_group(pg_collection)
        self.tp_size = self.tp_group.size() if self.tp_group is not None else 1
        self.tp_rank = self.tp_group.rank() if self.tp_group is not None else 0
        if num_heads % self.tp_size:
            raise ValueError(f"{num_heads} heads cannot be split over tensor parallel size {self.tp_size}")
        self.local_heads = num_heads // self.tp_size
        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size, qkv_out, config=config, init_method=config.init_method,
            gather_output=False, bias=False, skip_bias_add=False, is_expert=False, tp_group=self.tp_group,
        )
        self.linear_proj = build_module(
            submodules.linear_proj, proj_in, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True, skip_bias_add=True,
            is_expert=False, tp_group=self.tp_group,
        )

    def _qk_norm(self, q, k):
        eps = self.config.layernorm_epsilon
        return rms_norm(q, self.q_layernorm.weight, eps), rms_norm(k, self.k_layernorm.weight, eps)

    def _mix(self, *inputs):
        """`core` (everything between the input projections and linear_proj: the per-head activations).
        Selective recompute with "core_attn" keeps only its inputs and recomputes it in the backward, as
        megatron-core does for its core attention."""
        config = self.config
        if self.training and config.recompute_granularity == "selective" and "core_attn" in config.recompute_modules:
            return checkpoint_under_forward_autocast(self.core, False, *inputs)
        return self.core(*inputs)


class _HeadNorm(torch.nn.Module):
    """A [D] RMSNorm weight shared by all heads (q_norm / k_norm): replicated over TP."""

    def __init__(self, config, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim, dtype=config.params_dtype))


class HypeNetAttention(_Mixer):
    """Softmax attention (GQA) with QK-norm and HyPE: NoPE + log-position query scale, or RoPE for the teacher.

    `linear_qkv` keeps megatron-core's layout (per KV group: its query heads, then k, then v) so
    checkpoints interoperate with megatron-core's own SelfAttention.
    """

    def __init__(self, config: HypeNetConfig, submodules: MixerSubmodules, layer_number: int, pg_collection=None,
                 **kwargs):
        H, G, D = config.num_attention_heads, config.num_query_groups, config.kv_channels
        super().__init__(config, submodules, layer_number, H, (H + 2 * G) * D, H * D, pg_collection)
        if G % self.tp_size:
            raise ValueError(f"{G} KV groups cannot be split over tensor parallel size {self.tp_size}")
        self.local_groups = G // self.tp_size
        self.head_dim = D
        self.q_layernorm = _HeadNorm(config, D)
        self.k_layernorm = _HeadNorm(config, D)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        qkv, _ = self.linear_qkv(hidden_states)  # sequence parallel: gathers the whole sequence
        return self.linear_proj(self._mix(qkv))

    def core(self, qkv):
        s, b, _ = qkv.shape
        # SDPA wants [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in self.heads(qkv))
        o = cp_attention(q, k, v, self.head_dim**-0.5)
        return o.permute(2, 0, 1, 3).reshape(s, b, self.local_heads * self.head_dim)

    def heads(self, qkv):
        """q, k, v [s, b, local heads, d] as attention sees them: QK-norm, position encoding, K/V repeated from
        their GQA groups to every query head (portable across torch versions, unlike SDPA's own GQA)."""
        s, b, _ = qkv.shape
        per_group = self.local_heads // self.local_groups
        qkv = qkv.view(s, b, self.local_groups, per_group + 2, self.head_dim)
        q = qkv[:, :, :, :per_group].reshape(s, b, self.local_heads, self.head_dim)
        k, v = qkv[:, :, :, per_group], qkv[:, :, :, per_group + 1]
        q, k = self._qk_norm(q, k)
        pos = sequence_positions(s, q.device)
        if self.config.attention_rope:
            cos, sin = rope_cos_sin(pos, self.head_dim, self.config.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.config.attention_query_scale_base is not None:
            q = q * query_scale(pos, self.config.attention_query_scale_base)[:, None, None, None].to(q.dtype)
        return q, k.repeat_interleave(per_group, dim=2), v.repeat_interleave(per_group, dim=2)


class _ShardedVector(torch.nn.Module):
    """A parameter whose first axis is split over the TP group with the heads (output norm, conv)."""

    def __init__(self, config, shape, init):
        super().__init__()
        self.weight = torch.nn.Parameter(init(torch.empty(shape, dtype=config.params_dtype)))
        setattr(self.weight, "tensor_model_parallel", True)
        setattr(self.weight, "partition_dim", 0)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)


def _identity_conv(w):
    """Causal conv kernel that passes its input through: a converted model starts as its teacher."""
    torch.nn.init.zeros_(w)
    w[..., -1] = 1.0
    return w


class RNNMixer(_Mixer):
    """What the RNN mixers share (docs/architecture.md): un-shared K/V, QK-norm, RoPE, output RMSNorm (over all
    heads, or per head), sigmoid output gate, optional short conv. Subclasses give the recurrence and its extra inputs.

    `linear_qkv` is laid out per head ([q_h; k_h; v_h]), so a TP rank holds whole heads.
    """

    def __init__(self, config: HypeNetConfig, submodules: MixerSubmodules, layer_number: int, pg_collection=None,
                 **kwargs):
        H, D = config.lightning_num_heads, config.lightning_head_dim
        super().__init__(config, submodules, layer_number, H, 3 * H * D, H * D, pg_collection)
        self.head_dim = D
        self.scale = {"sqrt": D**-0.5, "linear": 1.0 / D, "none": 1.0}[config.lightning_scale]
        local = self.local_heads * D
        if config.lightning_qk_norm:
            self.q_layernorm = _HeadNorm(config, D)
            self.k_layernorm = _HeadNorm(config, D)
        if config.lightning_output_norm:
            self.out_norm = _ShardedVector(config, (local,), torch.nn.init.ones_)
        if config.lightning_output_gate:
            self.linear_gate = self._column_linear(submodules.linear_gate, H * D)
        if config.lightning_short_conv:
            K = config.lightning_conv_size
            self.q_conv, self.k_conv, self.v_conv = (_ShardedVector(config, (local, 1, K), _identity_conv) for _ in range(3))

    def _column_linear(self, spec, out_features):
        """A projection of the layer input split over TP by head (its output stays sharded)."""
        return build_module(
            spec, self.config.hidden_size, out_features, config=self.config, init_method=self.config.init_method,
            gather_output=False, bias=False, skip_bias_add=True, is_expert=False, tp_group=self.tp_group,
        )

    def local_slopes(self) -> torch.Tensor:
        """The ALiBi slopes of this rank's heads, by *global* head index."""
        first = self.tp_rank * self.local_heads
        return lightning_slopes(self.config.lightning_num_heads)[first : first + self.local_heads]

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        qkv, _ = self.linear_qkv(hidden_states)  # sequence parallel: gathers the whole sequence
        o = self._mix(qkv, *self.recurrence_inputs(hidden_states))
        if self.config.lightning_output_gate:
            gate, _ = self.linear_gate(hidden_states)
            o = o * torch.sigmoid(gate)
        return self.linear_proj(o)

    def recurrence_inputs(self, hidden_states) -> tuple:
        """Per-token inputs of the recurrence besides q, k, v, computed from the layer input."""
        return ()

    def recurrence(self, q, k, v, *inputs):
        """o [b, t, h, d] from q, k, v [b, t, h, d] and `recurrence_inputs` ([s, b, ...])."""
        raise NotImplementedError

    def core(self, qkv, *inputs):
        s, b, _ = qkv.shape
        H, D = self.local_heads, self.head_dim
        qkv = qkv.view(s, b, H, 3, D)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        if self.config.lightning_short_conv:
            weight = torch.cat([self.q_conv.weight, self.k_conv.weight, self.v_conv.weight])
            x = torch.cat([t.reshape(s, b, H * D) for t in (q, k, v)], -1)  # channels [q; k; v] like `weight`
            q, k, v = causal_conv(x, weight).view(s, b, 3, H, D).unbind(2)
        if self.config.lightning_qk_norm:
            q, k = self._qk_norm(q, k)
        if self.config.lightning_rope:
            cos, sin = rope_cos_sin(sequence_positions(s, q.device), D, self.config.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = self.recurrence(*(x.transpose(0, 1) for x in (q, k, v)), *inputs)
        o = o.transpose(0, 1).reshape(s, b, H * D)
        if self.config.lightning_output_norm and self.config.lightning_output_norm_per_head:
            o = rms_norm(o.view(s, b, H, D), self.out_norm.weight.view(H, D), self.config.layernorm_epsilon)
            o = o.view(s, b, H * D)
        elif self.config.lightning_output_norm:  # over all heads: TP ranks sum their heads' squares
            group = self.tp_group if self.tp_size > 1 else None
            o = rms_norm(o, self.out_norm.weight, self.config.layernorm_epsilon, group, H * D * self.tp_size)
        return o


class LightningAttention(RNNMixer):
    """Lightning Attention ('L'): linear attention with a fixed per-head ALiBi decay exp(-slope_h)."""

    def __init__(self, config: HypeNetConfig, submodules: MixerSubmodules, layer_number: int, pg_collection=None,
                 **kwargs):
        super().__init__(config, submodules, layer_number, pg_collection)
        self.register_buffer("slopes", self.local_slopes(), persistent=False)

    def recurrence(self, q, k, v):
        return cp_lightning_attention(q, k, v, self.slopes, self.scale)


# softplus(DT_BIAS_INIT) = 1: with a zero decay projection, a converted layer starts at Lightning's decay
DT_BIAS_INIT = math.log(math.e - 1)


class GatedDeltaNet(RNNMixer):
    """Gated DeltaNet ('D', docs/architecture.md): the delta rule with a data-dependent decay,
    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, q and k L2-normalised inside the op.

    g_t = log a_t = -exp(A_log) * softplus(linear_a(x_t) + dt_bias) and b_t = sigmoid(linear_b(x_t)), one of
    each per head. Initialised so that a converted layer starts with Lightning's decay: linear_a and linear_b
    zero (b = 1/2), A_log = log(slope_h), softplus(dt_bias) = 1.
    """

    def __init__(self, config: HypeNetConfig, submodules: MixerSubmodules, layer_number: int, pg_collection=None,
                 **kwargs):
        super().__init__(config, submodules, layer_number, pg_collection)
        H = config.lightning_num_heads
        self.linear_a = self._column_linear(submodules.linear_a, H)
        self.linear_b = self._column_linear(submodules.linear_b, H)
        with torch.no_grad():
            self.linear_a.weight.zero_()
            self.linear_b.weight.zero_()
        slopes = self.local_slopes()
        self.A_log = _ShardedVector(config, (self.local_heads,), lambda w: w.copy_(slopes.log()))
        self.dt_bias = _ShardedVector(config, (self.local_heads,), lambda w: w.fill_(DT_BIAS_INIT))

    def recurrence_inputs(self, hidden_states):
        a, _ = self.linear_a(hidden_states)  # sequence parallel: gathers the whole sequence
        b, _ = self.linear_b(hidden_states)
        return a, b

    def recurrence(self, q, k, v, a, b):
        a, b = a.transpose(0, 1).float(), b.transpose(0, 1).float()  # [b, t, h]
        g = -self.A_log.weight.float().exp() * F.softplus(a + self.dt_bias.weight.float())
        return cp_gated_delta_rule(q, k, v, g, torch.sigmoid(b), self.scale)
