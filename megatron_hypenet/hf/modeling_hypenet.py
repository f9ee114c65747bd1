"""HypeNet for Hugging Face transformers: a Qwen3 decoder whose token mixers are softmax attention ("A"),
Lightning Attention ("L") or Gated DeltaNet ("D") layers.

The math, the config fields, the weight names and the decoding cache follow megatron-hypenet's
docs/architecture.md, like the Megatron training model. This file is copied verbatim into every exported
folder, beside configuration_hypenet.py, lightning_naive.py (the PyTorch reference of the Lightning op) and
gated_delta_chunk.py (the PyTorch Gated DeltaNet op), and loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_hypenet import ATTENTION, GATED_DELTA, RNN_LETTERS, HypeNetConfig

try:  # an exported folder carries the reference beside this file
    from .lightning_naive import lightning_attention_chunk_ref, lightning_attention_step_ref, lightning_slopes
except ImportError:  # imported from the megatron_hypenet package, where the reference lives in kernels/
    from kernels.lightning.naive import lightning_attention_chunk_ref, lightning_attention_step_ref, lightning_slopes

try:  # megatron-hypenet's fused kernels where installed: same math, Triton on GPU, the reference elsewhere
    from kernels import lightning_attention, lightning_attention_step
except ImportError:
    lightning_attention, lightning_attention_step = lightning_attention_chunk_ref, lightning_attention_step_ref

try:  # an exported folder carries the Gated DeltaNet op beside this file
    from .gated_delta_chunk import chunk_gated_delta_rule, gated_delta_rule_step
except ImportError:  # imported from the megatron_hypenet package
    from kernels.gated_delta.chunk import chunk_gated_delta_rule, gated_delta_rule_step

try:  # megatron-hypenet's entry points where installed (the same ops; faster kernels plug in there)
    from kernels import gated_delta_rule, gated_delta_rule_step
except ImportError:
    gated_delta_rule = chunk_gated_delta_rule


# ---- shared pieces -----------------------------------------------------------------------------------


class HypeNetRMSNorm(nn.Module):
    """Qwen3's RMSNorm: statistics in fp32, weight applied in the input dtype. With `group_size`, each group of
    that many consecutive channels (a head) is normalised on its own."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, group_size: Optional[int] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype, shape = hidden_states.dtype, hidden_states.shape
        hidden_states = hidden_states.to(torch.float32)
        if self.group_size is not None:
            hidden_states = hidden_states.unflatten(-1, (-1, self.group_size))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = (hidden_states * torch.rsqrt(variance + self.variance_epsilon)).reshape(shape)
        return self.weight * hidden_states.to(input_dtype)


class HypeNetMLP(nn.Module):
    def __init__(self, config: HypeNetConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, projections=None):
        """`projections`: the gate and up projections of `x` if already computed (e.g. by one matmul)."""
        gate, up = (self.gate_proj(x), self.up_proj(x)) if projections is None else projections
        return self.down_proj(F.silu(gate) * up)


# Constants are cached per device rather than kept as buffers: transformers builds models on the meta
# device and would otherwise have to re-create non-persistent buffers after loading.
@lru_cache(maxsize=None)
def _inv_freq(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))).to(device)


@lru_cache(maxsize=None)
def _slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    return lightning_slopes(num_heads).to(device)


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """cos, sin ``[B, T, dim]`` of the `rotate_half` RoPE convention (Qwen3's), computed in fp32."""
    freqs = position_ids[..., None].float() * _inv_freq(dim, theta, position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, T, H, D]``; cos, sin ``[B, T, D]``."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def query_scale(position_ids: torch.Tensor, base: float) -> torch.Tensor:
    """HyPE's attention query scale log(i + a) / log(a) (1 at position 0), fp32, shaped like position_ids."""
    return torch.log(position_ids.float() + base) / math.log(base)


# ---- decoding cache ----------------------------------------------------------------------------------


class HypeNetLightningCacheLayer:
    """An RNN layer's (Lightning or Gated DeltaNet) decoding state, whose size does not grow with the context:
    the fp32 recurrent state ``[B, H, D, D]`` and, with short conv, the last ``K - 1`` conv inputs of q, k and
    v side by side, ``[B, K - 1, 3 * H * D]`` (the left context the next token's causal conv window needs)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self):
        self.recurrent_state: Optional[torch.Tensor] = None
        self.conv_state: Optional[torch.Tensor] = None

    @property
    def is_initialized(self) -> bool:
        return self.recurrent_state is not None

    def _map(self, fn):
        if self.recurrent_state is not None:
            self.recurrent_state = fn(self.recurrent_state)
        if self.conv_state is not None:
            self.conv_state = fn(self.conv_state)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map(lambda t: t[indices])

    def reset(self):
        self.recurrent_state, self.conv_state = None, None

    def crop(self, tokens_to_remove: int):
        if tokens_to_remove:
            raise NotImplementedError("a Lightning Attention state keeps no per-token history and cannot be cropped")

    def offload(self):
        pass

    def prefetch(self):
        pass

    def get_max_length(self) -> int:
        return -1


class HypeNetCache(Cache):
    """Decoding cache of a HypeNet: K/V (after norm and RoPE) for attention layers, a constant-size
    `HypeNetLightningCacheLayer` for RNN (Lightning, Gated DeltaNet) layers. It counts the tokens it has seen
    itself, since a model may have no attention layer to measure them by."""

    def __init__(self, config: HypeNetConfig):
        super().__init__(
            layers=[DynamicLayer() if m == ATTENTION else HypeNetLightningCacheLayer() for m in config.layer_pattern]
        )
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reset(self):
        super().reset()
        self.seen_tokens = 0


# ---- token mixers ------------------------------------------------------------------------------------


class HypeNetAttention(nn.Module):
    """Softmax attention with GQA and QK-norm; RoPE optional (teacher) and HyPE's log-position query scale."""

    def __init__(self, config: HypeNetConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = HypeNetRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = HypeNetRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def project(self, hidden_states, position_ids, position_embeddings, projections=None):
        """q ``[B, T, heads, D]`` and k, v ``[B, T, kv_heads, D]``: projected, QK-normed, RoPE'd (teacher) and
        q scaled by HyPE's log-position factor, as they enter attention and the cache. `projections`: the
        q, k, v projections if already computed (e.g. by one matmul over the three weights)."""
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, self.head_dim)
        if projections is None:
            projections = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q, k, v = (x.view(shape) for x in projections)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.config.attention_rope:
            cos, sin = position_embeddings[self.head_dim]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        base = self.config.attention_query_scale_base
        if base is not None:
            q = q * query_scale(position_ids, base)[:, :, None, None].to(q.dtype)
        return q, k, v

    def forward(self, hidden_states, position_ids, position_embeddings, attention_mask, past_key_values=None):
        B, T, _ = hidden_states.shape
        q, k, v = (x.transpose(1, 2) for x in self.project(hidden_states, position_ids, position_embeddings))
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        o = grouped_attention(q, k, v, attention_mask, scale=self.head_dim**-0.5)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


def grouped_attention(q, k, v, mask, scale):
    """Softmax attention with grouped K/V, never copied per query head. q ``[B, H, T, D]``; k, v
    ``[B, G, S, D]`` (H a multiple of G); mask: None (causal if T > 1), a bool ``[B, 1, T, S]`` or a
    `CausalBias`. One query per head (decoding): the H/G query heads of a KV group become T rows of that
    group, which any SDPA backend takes; longer inputs use SDPA's `enable_gqa` (flash attention reads
    grouped K/V natively)."""
    B, H, T, D = q.shape
    G = k.shape[1]
    if T == 1 and G != H:
        o = F.scaled_dot_product_attention(q.view(B, G, H // G, D), k, v, attn_mask=mask, scale=scale)
        return o.view(B, H, 1, D)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=scale, enable_gqa=G != H
    )


class HypeNetShortConv(nn.Module):
    """The weight ``[C, 1, K]`` (as `nn.Conv1d`'s) of a causal depthwise conv over time, no bias, no
    activation. The mixer runs q's, k's and v's convs as one (`causal_conv`)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel_size))


def causal_conv(x: torch.Tensor, weight: torch.Tensor, past: Optional[torch.Tensor] = None):
    """Causal depthwise conv of x ``[B, T, C]`` with weight ``[C, 1, K]``; past: the previous ``K - 1``
    inputs (zeros at the start of a sequence). Returns the output ``[B, T, C]`` and the last ``K - 1``
    inputs, for the next call."""
    B, T, C = x.shape
    K = weight.shape[-1]
    if past is None:
        past = x.new_zeros(B, K - 1, C)
    full = torch.cat([past.to(x.dtype), x], dim=1)
    if T == 1:  # a decode step: one multiply and one sum over the window, cheaper than a conv launch
        y = (full * weight[:, 0].t().to(x.dtype)).sum(1, keepdim=True)
    else:
        y = F.conv1d(full.transpose(1, 2), weight.to(x.dtype), groups=C).transpose(1, 2)
    return y, full[:, full.shape[1] - (K - 1) :]


class HypeNetLightningAttention(nn.Module):
    """Lightning Attention: un-shared K/V, optional short conv, QK-norm, RoPE, fixed per-head ALiBi decay,
    output RMSNorm (over all heads, or per head), sigmoid output gate."""

    def __init__(self, config: HypeNetConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.lightning_num_heads, config.lightning_head_dim
        width = self.num_heads * self.head_dim
        self.scale = {"sqrt": self.head_dim**-0.5, "linear": 1.0 / self.head_dim, "none": 1.0}[config.lightning_scale]
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)
        if config.lightning_short_conv:
            self.q_conv = HypeNetShortConv(width, config.lightning_conv_size)
            self.k_conv = HypeNetShortConv(width, config.lightning_conv_size)
            self.v_conv = HypeNetShortConv(width, config.lightning_conv_size)
        if config.lightning_qk_norm:
            self.q_norm = HypeNetRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = HypeNetRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        if config.lightning_output_norm:
            per_head = self.head_dim if config.lightning_output_norm_per_head else None
            self.o_norm = HypeNetRMSNorm(width, eps=config.rms_norm_eps, group_size=per_head)
        if config.lightning_output_gate:
            self.g_proj = nn.Linear(config.hidden_size, width, bias=False)

    def _short_conv(self, q, k, v, cache):
        """q, k and v through their convs as one conv over the three side by side: a decode step's cost is
        its kernel count, and three convs and state updates per layer cost three times the launches."""
        weight = torch.cat([self.q_conv.weight, self.k_conv.weight, self.v_conv.weight])
        past = cache.conv_state if cache is not None else None
        y, tail = causal_conv(torch.cat([q, k, v], dim=-1), weight, past)
        if past is not None and past.shape == tail.shape:
            past.copy_(tail)  # in place: a decode step keeps its buffers (CUDA graphs replay them)
        elif cache is not None:
            # a view would pin the whole prompt's activations; plain strides, whatever the chunk length
            cache.conv_state = tail.clone(memory_format=torch.contiguous_format)
        return y.chunk(3, dim=-1)

    def project(self, hidden_states, position_embeddings, token_mask=None, cache=None, projections=None):
        """q, k, v ``[B, T, H, D]`` as they enter the recurrence: projected, short-conv'd (the conv tails of
        `cache`, a `HypeNetLightningCacheLayer`, updated), QK-normed and RoPE'd; padded tokens zeroed.
        `projections`: the q, k, v projections if already computed (e.g. by one matmul)."""
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        keep = None if token_mask is None else token_mask[:, :, None].to(hidden_states.dtype)
        if projections is None:
            projections = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q, k, v = projections
        if keep is not None:  # padding must not reach the conv window of the real tokens either
            q, k, v = q * keep, k * keep, v * keep
        if self.config.lightning_short_conv:
            q, k, v = self._short_conv(q, k, v, cache)
        q, k, v = (x.view(B, T, H, D) for x in (q, k, v))
        if self.config.lightning_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.config.lightning_rope:
            cos, sin = position_embeddings[D]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if keep is not None:  # padded tokens never enter the state
            k, v = k * keep[..., None], v * keep[..., None]
        return q, k, v

    def output(self, o, hidden_states, gate=None):
        """The mixer's output from the recurrence's `o` ``[B, T, H * D]``: output norm, gate, projection.
        `gate`: the gate projection of `hidden_states` if already computed."""
        if self.config.lightning_output_norm:
            o = self.o_norm(o)
        if self.config.lightning_output_gate:
            o = o * torch.sigmoid(self.g_proj(hidden_states) if gate is None else gate)
        return self.o_proj(o)

    def forward(self, hidden_states, position_embeddings, token_mask=None, past_key_values=None):
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        cache = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        q, k, v = self.project(hidden_states, position_embeddings, token_mask, cache)
        state = cache.recurrent_state if cache is not None else None
        o, state = self.recurrence(q, k, v, hidden_states, token_mask, state, cache is not None)
        if cache is not None:
            cache.recurrent_state = state
        return self.output(o.reshape(B, T, H * D), hidden_states)

    def recurrence(self, q, k, v, hidden_states, token_mask, state, want_state):
        """(o ``[B, T, H, D]``, final state): one decode step when a state is carried and T == 1."""
        slopes = _slopes(self.num_heads, q.device)
        if q.shape[1] == 1 and state is not None:
            o, state = lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], slopes, state, scale=self.scale)
            return o[:, None], state
        return lightning_attention(q, k, v, slopes, scale=self.scale, initial_state=state,
                                   output_final_state=want_state)


class HypeNetGatedDeltaNet(HypeNetLightningAttention):
    """Gated DeltaNet: the Lightning layer's projections, convs, norms and gate around the gated delta rule
    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T (q, k L2-normalised in the op), with a per-token
    decay g_t = log a_t = -exp(A_log) softplus(a_proj(x_t) + dt_bias) and b_t = sigmoid(b_proj(x_t))."""

    def __init__(self, config: HypeNetConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.a_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.b_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))

    def decay_and_beta(self, hidden_states, token_mask=None, projections=None):
        """g, beta ``[B, T, H]`` in fp32; padded tokens get g = 0, so they leave the state as it is.
        `projections`: the a, b projections if already computed (e.g. by one matmul)."""
        if projections is None:
            projections = self.a_proj(hidden_states), self.b_proj(hidden_states)
        a, b = (x.float() for x in projections)
        g = -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())
        if token_mask is not None:
            g = g * token_mask[:, :, None].to(g.dtype)
        return g, torch.sigmoid(b)

    def recurrence(self, q, k, v, hidden_states, token_mask, state, want_state):
        g, beta = self.decay_and_beta(hidden_states, token_mask)
        if q.shape[1] == 1 and state is not None:
            o, state = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, scale=self.scale)
            return o[:, None], state
        return gated_delta_rule(q, k, v, g, beta, scale=self.scale, initial_state=state, output_final_state=want_state)


# ---- model -------------------------------------------------------------------------------------------


class HypeNetDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HypeNetConfig, layer_idx: int):
        super().__init__()
        self.is_attention = config.layer_pattern[layer_idx] == ATTENTION
        # Attention layers keep Qwen3's module name, so a Qwen3 state dict loads into an all-"A" model.
        if self.is_attention:
            self.self_attn = HypeNetAttention(config, layer_idx)
        elif config.layer_pattern[layer_idx] == GATED_DELTA:
            self.linear_attn = HypeNetGatedDeltaNet(config, layer_idx)
        else:
            self.linear_attn = HypeNetLightningAttention(config, layer_idx)
        self.mlp = HypeNetMLP(config)
        self.input_layernorm = HypeNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = HypeNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states, position_ids=None, position_embeddings=None, attention_mask=None, token_mask=None,
        past_key_values=None, **kwargs,
    ):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.is_attention:
            hidden_states = self.self_attn(
                hidden_states, position_ids, position_embeddings, attention_mask, past_key_values
            )
        else:
            hidden_states = self.linear_attn(hidden_states, position_embeddings, token_mask, past_key_values)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class HypeNetPreTrainedModel(PreTrainedModel):
    config: HypeNetConfig
    config_class = HypeNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HypeNetDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True  # attention always runs through F.scaled_dot_product_attention
    _can_compile_fullgraph = False
    # A recurrent state cannot be rolled back, so generate() must refuse assisted decoding.
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # Identity kernels (last tap 1), as in converted models: a fresh short conv passes its input through.
        if isinstance(module, HypeNetShortConv) and not getattr(module.weight, "_is_hf_initialized", False):
            module.weight.zero_()
            module.weight[..., -1] = 1.0
        # Gated DeltaNet as converted models start (and Megatron inits it): zero a, b projections, so beta
        # starts at 1/2 and the decay at Lightning's exp(-slope_h) (softplus(dt_bias) = 1). Runs after the
        # projections' own (random) init: children are initialised first.
        if isinstance(module, HypeNetGatedDeltaNet):
            if not getattr(module.A_log, "_is_hf_initialized", False):
                module.A_log.copy_(lightning_slopes(module.num_heads).log())
                module.dt_bias.fill_(math.log(math.e - 1))
            for proj in (module.a_proj, module.b_proj):
                if not getattr(proj.weight, "_is_hf_initialized", False):
                    proj.weight.zero_()


def _causal_mask(mask: Optional[torch.Tensor], q_len: int, past: int, device):
    """SDPA mask for queries at positions ``past ..``: None where `is_causal` (or a single query seeing
    everything) does the job, a bottom-right causal bias (never materialised, flash attention runs it)
    for a later prefill chunk without padding, else a bool ``[B, 1, q_len, past + q_len]`` (True = attend)."""
    if mask is None and (past == 0 or q_len == 1):
        return None
    if mask is None:
        return causal_lower_right(q_len, past + q_len)
    q_pos = torch.arange(past, past + q_len, device=device)[:, None]
    k_pos = torch.arange(past + q_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if mask is not None:
        # A padded query would see no key at all and SDPA would return NaN; letting it see itself keeps
        # it finite (its output is never used).
        allowed = (allowed & mask[:, None, None, :]) | (k_pos == q_pos)
    return allowed


class HypeNetModel(HypeNetPreTrainedModel):
    def __init__(self, config: HypeNetConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([HypeNetDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = HypeNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        # RoPE tables are built once per forward for each head size that uses them
        rope_dims = set()
        if config.attention_rope and ATTENTION in config.layer_pattern:
            rope_dims.add(config.head_dim)
        if config.lightning_rope and set(RNN_LETTERS) & set(config.layer_pattern):
            rope_dims.add(config.lightning_head_dim)
        self._rope_dims = sorted(rope_dims)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[HypeNetCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        prefill_chunk_size: Optional[int] = None,
        **kwargs,
    ):
        """`attention_mask` is the 2D padding mask over past and new tokens ``[B, past + T]`` (1 = real token).
        `prefill_chunk_size` (else `config.prefill_chunk_size`) processes longer inputs in chunks that hand
        the cache on, so the attention scores never exceed ``chunk x context``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if past_key_values is not None and not isinstance(past_key_values, HypeNetCache):
            raise TypeError(
                f"HypeNet needs a HypeNetCache (K/V and Lightning states), got {type(past_key_values).__name__}; "
                "pass past_key_values=None and use_cache=True to get one"
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        chunk = prefill_chunk_size or self.config.prefill_chunk_size
        chunked = chunk is not None and T > chunk
        if self.gradient_checkpointing and self.training:
            # checkpointed layers run twice and drop the cache, which chunks need to hand their state on
            if chunked:
                raise ValueError("prefill_chunk_size is an inference option: it cannot run with gradient checkpointing")
            use_cache, past_key_values = False, None
        if past_key_values is None and (use_cache or chunked):
            past_key_values = HypeNetCache(self.config)  # chunks hand their state on through it
        past = past_key_values.get_seq_length() if past_key_values is not None else 0

        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask must be the 2D padding mask [batch, past + new tokens] = [{B}, {past + T}], "
                    f"got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.bool()
        if position_ids is None:
            if attention_mask is not None:  # left padding: real tokens count from 0, as generate() does
                position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(~attention_mask, 0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None]
        position_ids = position_ids.expand(B, T)

        bounds = [(s, min(s + chunk, T)) for s in range(0, T, chunk)] if chunked else [(0, T)]
        hidden, all_hidden = [], []
        for s, e in bounds:
            h, layer_states = self._run_layers(
                inputs_embeds[:, s:e],
                position_ids[:, s:e],
                None if attention_mask is None else attention_mask[:, : past + e],
                past_key_values,
                output_hidden_states,
            )
            hidden.append(h)
            all_hidden.append(layer_states)
        hidden_states = self.norm(torch.cat(hidden, dim=1) if chunked else hidden[0])
        layer_outputs = None
        if output_hidden_states:
            layer_outputs = tuple(torch.cat(parts, dim=1) for parts in zip(*all_hidden)) + (hidden_states,)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=layer_outputs,
        )
        return output if return_dict else output.to_tuple()

    def _run_layers(self, hidden_states, position_ids, mask, cache, output_hidden_states):
        """One pass of the layers over new tokens; `mask` covers past and new tokens."""
        T = hidden_states.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        attention_mask = _causal_mask(mask, T, past, hidden_states.device)
        token_mask = None if mask is None else mask[:, -T:]
        rope = {d: rope_cos_sin(position_ids, d, self.config.rope_theta, hidden_states.dtype) for d in self._rope_dims}
        layer_states = []
        for layer in self.layers:
            if output_hidden_states:
                layer_states.append(hidden_states)
            hidden_states = layer(
                hidden_states,
                position_ids=position_ids,
                position_embeddings=rope,
                attention_mask=attention_mask,
                token_mask=token_mask,
                past_key_values=cache,
            )
        if cache is not None:
            cache.seen_tokens += T
        return hidden_states, layer_states


class HypeNetForCausalLM(HypeNetPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HypeNetConfig):
        super().__init__(config)
        self.model = HypeNetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[HypeNetCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int = 0,
        prefill_chunk_size: Optional[int] = None,
        **kwargs,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            prefill_chunk_size=prefill_chunk_size,
        )
        hidden_states = outputs.last_hidden_state
        # logits_to_keep=0 keeps all (slice(-0, None)); generate() asks for the last one only
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
        )
        return output if return_dict else output.to_tuple()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() would build a DynamicCache, which has no room for Lightning states: give it ours."""
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"HypeNet decodes with its own HypeNetCache; cache_implementation="
                    f"{generation_config.cache_implementation!r} is not supported"
                )
            model_kwargs["past_key_values"] = HypeNetCache(self.config)
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


__all__ = ["HypeNetCache", "HypeNetForCausalLM", "HypeNetModel", "HypeNetPreTrainedModel"]
