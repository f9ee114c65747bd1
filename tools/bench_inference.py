"""Long-context inference speed: a HypeNet against the same-shaped Qwen3, side by side (issue 5).

Both models are built with random bf16 weights in one process and measured the same way:

- prefill: the whole context in chunks (`--prefill-chunk`) through the HF model's own layer loop, with
  K/V written into a preallocated buffer, so memory stays bounded by the KV cache plus one chunk;
- decode: one token at the end of that context, a whole-model step captured in a CUDA graph (static
  buffers, no Python or launch overhead), replayed and timed with CUDA events;
- peak memory: `torch.cuda.max_memory_allocated` over prefill + decode, this model's weights included
  (the other model's, resident too, subtracted);
- floor: the bytes a decode token must move (weights, K/V, Lightning states) over the measured
  device-to-device copy rate, for both models, to show what bounds the ratio.

The Qwen3 is `transformers.Qwen3ForCausalLM` with its weights moved into an all-attention HypeNet module
graph (`attention_rope=True`, no HyPE scale), which is exactly Qwen3 (tests/test_hf_modeling.py checks
it; this script checks it again against Qwen3ForCausalLM's logits before timing). So both models run the
same prefill and decode code: the only difference measured is the layer pattern.

The decode step (`decode_layer`) runs the HF modules' own `project`/`output`/`mlp` over static buffers:
attention writes K/V at a tensor position and reads the buffer without repeating it per query head (the
query heads of a KV group act as query rows), Lightning layers update their fp32 state in place with the
Triton step kernel (a custom op), Gated DeltaNet layers theirs (a custom op too; with
HYPENET_GATED_DELTA_LOOP=pytorch the PyTorch step, compiled with the layer), projections sharing an input
are one matmul. Each layer is compiled by torch.compile (inductor on CUDA: one graph per layer kind, reused by every layer and context length),
then the whole step is captured in one CUDA graph. `check_against_hf` compares it with the HF forward
before anything is timed.

    python tools/bench_inference.py --lengths 8192 32768 131072 --out results.json
    python tools/bench_inference.py --rnn-mixer gated_deltanet --lengths 8192 131072   # Gated DeltaNet RNN layers
    python tools/bench_inference.py --device cpu --tiny --lengths 64 128   # smoke test, no GPU
"""

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from kernels.gated_delta import triton_chosen  # noqa: E402
from kernels.gated_delta.chunk import gated_delta_rule_step  # noqa: E402
from kernels.lightning.naive import lightning_attention_step_ref  # noqa: E402
from megatron_hypenet.hf.configuration_hypenet import ATTENTION, HypeNetConfig  # noqa: E402
from megatron_hypenet.patterns import LIGHTNING, RNN_MIXERS, evenly_spaced  # noqa: E402
from megatron_hypenet.hf.modeling_hypenet import (  # noqa: E402
    HypeNetForCausalLM,
    HypeNetGatedDeltaNet,
    HypeNetLightningCacheLayer,
    _slopes,
    rope_cos_sin,
)

# Qwen3-1.7B's shape (tied embeddings, rope_theta 1e6).
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
ROPE_THETA = 1_000_000.0
SPLIT = 1024  # decode attention reads the KV cache in splits of this many tokens, all in parallel
DEFAULT_LENGTHS = (8192, 32768, 131072, 262144, 524288, 1048576)


def hybrid_pattern(num_layers: int, attention_fraction: float, rnn: str = LIGHTNING) -> str:
    """`round(num_layers * fraction)` attention layers spread evenly, the last layer one of them
    (28 layers at 1/8: 4 attention layers, 6 13 20 27; rounding up keeps the comparison conservative),
    the others of the RNN mixer `rnn` (a pattern letter)."""
    return evenly_spaced(num_layers, max(1, round(num_layers * attention_fraction)), rnn)


def build_models(shape: dict, pattern: str, device, dtype, seed: int = 0):
    """{'hypenet': HypeNetForCausalLM, 'qwen3': all-attention HypeNet holding a Qwen3's weights} and the
    reference `Qwen3ForCausalLM` (for the logits check), random weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(shape, max_position_embeddings=1 << 21, rms_norm_eps=1e-6, initializer_range=0.02)
    with torch.device(device):
        # _from_config builds in `dtype` directly; .to(dtype) would also cast Qwen3's fp32 RoPE frequencies
        qwen = Qwen3ForCausalLM._from_config(Qwen3Config(
            **common, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, attention_bias=False,
        ), dtype=dtype).eval()
        hypenet = HypeNetForCausalLM._from_config(
            HypeNetConfig(**common, rope_theta=ROPE_THETA, layer_pattern=pattern), dtype=dtype).eval()
    return {"hypenet": hypenet, "qwen3": qwen3_as_hypenet(qwen)}, qwen


def qwen3_as_hypenet(qwen) -> HypeNetForCausalLM:
    """An all-attention HypeNet module graph holding a `Qwen3ForCausalLM`'s weights (shared, not copied):
    with RoPE in attention and no HyPE scale it is exactly that Qwen3."""
    c = qwen.config
    config = HypeNetConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, tie_word_embeddings=c.tie_word_embeddings,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, attention_rope=True, attention_query_scale_base=None)
    with torch.device("meta"):
        graph = HypeNetForCausalLM(config)
    graph.load_state_dict(qwen.state_dict(), strict=True, assign=True)
    graph.tie_weights()
    return graph.eval()


# ---- static cache, chunked prefill, graph-capturable decode step ----------------------------------------


class StaticCache:
    """What HypeNet's HF layers expect of a cache (`update` for attention, `layers[i]` for Lightning),
    over buffers allocated once: K/V ``[1, G, max_len, D]`` per attention layer, written in place."""

    def __init__(self, config: HypeNetConfig, max_len: int, device, dtype):
        # a whole number of decode splits: the padding (< SPLIT tokens) is masked out, never read as keys
        self.max_len = SPLIT * math.ceil(max_len / SPLIT)
        shape = (1, config.num_key_value_heads, self.max_len, config.head_dim)
        self.k, self.v, self.layers = {}, {}, []
        for i, mixer in enumerate(config.layer_pattern):
            if mixer == ATTENTION:
                self.k[i] = torch.empty(shape, device=device, dtype=dtype)
                self.v[i] = torch.empty(shape, device=device, dtype=dtype)
                for t in (self.k[i], self.v[i]):  # one compiled decode step for every context length
                    torch._dynamo.maybe_mark_dynamic(t, 2)
            self.layers.append(None if mixer == ATTENTION else HypeNetLightningCacheLayer())
        self.seen_tokens = 0  # tokens already in the cache (the name HypeNetModel counts them by)

    def update(self, k, v, layer_idx):
        s, e = self.seen_tokens, self.seen_tokens + k.shape[2]
        self.k[layer_idx][:, :, s:e] = k
        self.v[layer_idx][:, :, s:e] = v
        return self.k[layer_idx][:, :, :e], self.v[layer_idx][:, :, :e]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens


def _rope(model, position_ids, dtype):
    return {d: rope_cos_sin(position_ids, d, model.config.rope_theta, dtype) for d in model.model._rope_dims}


@torch.no_grad()
def prefill(model, cache: StaticCache, input_ids: torch.Tensor, chunk: int, progress: bool = False):
    """Runs `input_ids` ``[1, T]`` through the HF model's own layer loop, `chunk` tokens at a time;
    returns the logits of the last token. Later chunks attend to the cache with a bottom-right causal
    bias (never materialised, so flash attention applies)."""
    inner = model.model
    T = input_ids.shape[1]
    for s in tqdm(range(0, T, chunk), desc="prefill", unit="chunk", leave=False,
                  disable=not progress or bool(os.environ.get("TQDM_DISABLE"))):
        ids = input_ids[:, s:s + chunk]
        position_ids = torch.arange(cache.seen_tokens, cache.seen_tokens + ids.shape[1], device=ids.device)[None]
        hidden, _ = inner._run_layers(inner.embed_tokens(ids), position_ids, None, cache, False)
    return model.lm_head(inner.norm(hidden[:, -1:]))


def decode_attention(q, k, v, scale, pos):
    """One query per head over the static buffer. q ``[1, H, 1, D]``; k, v ``[1, G, Lp, D]`` of which
    positions ``<= pos`` (a 1-element tensor) hold keys. The H/G query heads of a KV group become query
    rows of that group, so K/V are read once and never repeated per head.

    Flash decoding with matmuls: scores for all keys, softmax, then P @ V over `SPLIT`-token splits in
    parallel, summed. A fused attention kernel parallelises over heads only, which leaves most of the
    GPU idle at batch 1 (SDPA measured ~6x slower at 256K+)."""
    B, H, _, D = q.shape
    G, Lp = k.shape[1], k.shape[2]
    r, S = H // G, Lp // SPLIT
    s = (q.reshape(B, G, r, D) @ k.transpose(-1, -2)).float() * scale  # [B, G, r, Lp]
    s = s.masked_fill(torch.arange(Lp, device=q.device) > pos, float("-inf"))  # no keys there yet
    p = torch.softmax(s, dim=-1).to(v.dtype).view(B, G, r, S, SPLIT).transpose(2, 3)  # [B, G, S, r, SPLIT]
    o = (p @ v.view(B, G, S, SPLIT, D)).sum(2, dtype=torch.float32)  # [B, G, r, D]
    return o.to(v.dtype).reshape(B, H, 1, D)


@torch.library.custom_op("hypenet_bench::lightning_step_", mutates_args=("state",))
def lightning_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, state: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """One token of Lightning Attention updating `state` in place (the same address every replay). An
    opaque op to torch.compile: the Triton step kernel runs as it is inside a compiled decode step."""
    if q.is_cuda:
        from kernels.lightning.fused_recurrent import fused_recurrent_lightning_step

        return fused_recurrent_lightning_step(q, k, v, slopes, state, scale, out_state=state)[0]
    o, new_state = lightning_attention_step_ref(q, k, v, slopes, state, scale)
    state.copy_(new_state)
    return o


@lightning_step_.register_fake
def _(q, k, v, slopes, state, scale):
    return torch.empty_like(v)


# HYPENET_GATED_DELTA_LOOP, read once: inside the compiled decode step the choice must be a constant.
GATED_DELTA_TRITON_STEP = triton_chosen()


@torch.library.custom_op("hypenet_bench::gated_delta_step_", mutates_args=("state",))
def gated_delta_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      state: torch.Tensor, scale: float) -> torch.Tensor:
    """One token of Gated DeltaNet updating `state` in place, opaque to torch.compile as `lightning_step_` is."""
    if q.is_cuda:
        from kernels.gated_delta.fused_recurrent import fused_recurrent_gated_delta_step

        return fused_recurrent_gated_delta_step(q, k, v, g, beta, state, scale, out_state=state)[0]
    o, new_state = gated_delta_rule_step(q, k, v, g, beta, state, scale)
    state.copy_(new_state)
    return o


@gated_delta_step_.register_fake
def _(q, k, v, g, beta, state, scale):
    return torch.empty_like(v)


def decode_layer(layer, hidden, position_ids, rope, k_cache, v_cache, lightning_cache, slopes, fused):
    """`HypeNetDecoderLayer.forward` for one token at `position_ids` ``[1, 1]``, through the HF modules'
    own `project`/`output`/`mlp`, the projections that share an input taken in one matmul over `fused`
    (`fuse_projections`): attention writes its K/V into the static buffers (in place, at a tensor
    position, so one graph serves every position), Lightning and Gated DeltaNet update their fp32 state
    in place (Gated DeltaNet's a/b projections fused with q, k, v)."""
    w_in, w_mlp, names, sizes = fused
    x = layer.input_layernorm(hidden)
    p = dict(zip(names, F.linear(x, w_in).split(sizes, dim=-1)))
    qkv = p["q_proj"], p["k_proj"], p["v_proj"]
    if layer.is_attention:
        attn = layer.self_attn
        q, k, v = attn.project(x, position_ids, rope, qkv)  # [1, 1, heads, D]
        pos = position_ids[0]
        k_cache[:, :, pos] = k.transpose(1, 2)
        v_cache[:, :, pos] = v.transpose(1, 2)
        o = decode_attention(q.transpose(1, 2), k_cache, v_cache, attn.head_dim**-0.5, pos)
        x = attn.o_proj(o.reshape(1, 1, -1))
    else:
        la = layer.linear_attn
        q, k, v = la.project(x, rope, None, lightning_cache, qkv)  # conv tails updated in place
        state = lightning_cache.recurrent_state
        if isinstance(la, HypeNetGatedDeltaNet):
            g, beta = la.decay_and_beta(x, projections=(p["a_proj"], p["b_proj"]))
            if GATED_DELTA_TRITON_STEP:
                o = gated_delta_step_(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, la.scale)
            else:
                o, new_state = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, la.scale)
                state.copy_(new_state)  # in place, as the Lightning step: one address every replay
        else:
            o = lightning_step_(q[:, 0], k[:, 0], v[:, 0], slopes, state, la.scale)
        x = la.output(o.reshape(1, 1, -1), x, p.get("g_proj"))
    hidden = hidden + x
    h = layer.post_attention_layernorm(hidden)
    return hidden + layer.mlp(h, F.linear(h, w_mlp).chunk(2, dim=-1))


def fuse_projections(model) -> list:
    """Per layer (w_in, w_mlp, names, sizes): the weights that multiply the same input, concatenated (q, k, v,
    the RNN mixer's output gate and Gated DeltaNet's a, b; the MLP's gate and up), so a decode step reads each group in one matmul. The
    modules' weights become views of these tensors: same values, no extra memory, HF forward unchanged."""
    fused = []
    for layer in model.model.layers:
        mixer = layer.self_attn if layer.is_attention else layer.linear_attn
        names = [n for n in ("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj") if hasattr(mixer, n)]
        w_in = _concat_weights([getattr(mixer, n) for n in names])
        w_mlp = _concat_weights([layer.mlp.gate_proj, layer.mlp.up_proj])
        fused.append((w_in, w_mlp, names, [getattr(mixer, n).out_features for n in names]))
    return fused


def _concat_weights(linears) -> torch.Tensor:
    weight = torch.cat([m.weight.detach() for m in linears])
    for m, part in zip(linears, weight.split([m.out_features for m in linears])):
        m.weight = torch.nn.Parameter(part, requires_grad=False)
    return weight


def decode_head(model, hidden):
    return model.lm_head(model.model.norm(hidden))


@lru_cache(maxsize=None)
def _compiled(fn, backend: str):
    """`fn` compiled once per backend ("none": eager). Dynamo compiles one graph per layer kind and
    config and reuses it for every layer of that kind (the modules' weights are graph inputs)."""
    return fn if backend == "none" else torch.compile(fn, backend=backend, fullgraph=True)


def make_decode_step(model, cache: StaticCache, backend: str = "none"):
    """A no-argument function that decodes the token in `step.token` at the position in
    `step.position_ids` and returns its logits; its inputs are static tensors, so one CUDA graph of it
    serves every position. `backend`: torch.compile backend of the per-layer step ("none": eager)."""
    inner, config = model.model, model.config
    device, dtype = inner.embed_tokens.weight.device, inner.embed_tokens.weight.dtype
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    position_ids = torch.full((1, 1), cache.seen_tokens, dtype=torch.long, device=device)
    H, D = config.lightning_num_heads, config.lightning_head_dim
    slopes = _slopes(H, device)
    for layer_cache in cache.layers:  # a fresh cache: zero states (what a prefill would leave)
        if layer_cache is not None and layer_cache.recurrent_state is None:
            layer_cache.recurrent_state = torch.zeros(1, H, D, D, device=device)
        if layer_cache is not None and config.lightning_short_conv and layer_cache.conv_state is None:
            layer_cache.conv_state = torch.zeros(1, config.lightning_conv_size - 1, 3 * H * D, device=device,
                                                 dtype=dtype)
    layer_fn, head_fn = _compiled(decode_layer, backend), _compiled(decode_head, backend)
    if getattr(model, "fused_projections", None) is None:
        model.fused_projections = fuse_projections(model)

    @torch.no_grad()
    def step():
        hidden = inner.embed_tokens(token)
        rope = _rope(model, position_ids, dtype)
        for i, layer in enumerate(inner.layers):
            hidden = layer_fn(layer, hidden, position_ids, rope, cache.k.get(i), cache.v.get(i), cache.layers[i],
                              slopes, model.fused_projections[i])
        return head_fn(model, hidden)

    step.token, step.position_ids = token, position_ids
    return step


def capture(step, cache: StaticCache):
    """A function running `step` and returning its logits: on CUDA the replay of a graph of `step` (warmed
    up on a side stream first, so torch.compile and Triton compile and cuBLAS picks its kernels outside
    the capture); elsewhere `step` itself. Warm-up and capture leave the Lightning states as they found them."""
    if not step.token.is_cuda:
        return step
    states = [t for c in cache.layers if c is not None for t in (c.recurrent_state, c.conv_state) if t is not None]
    saved = [t.clone() for t in states]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for t, s in zip(states, saved):
        t.copy_(s)

    def replay():
        graph.replay()
        return out

    return replay


# ---- correctness check ---------------------------------------------------------------------------------


@torch.no_grad()
def check_against_hf(model, reference, device, chunk: int, backend: str, length: int = SPLIT + 100,
                     decode_steps: int = 4, seed: int = 0):
    """Relative L2 error of this script's chunked prefill + (graph-captured) decode against the reference
    HF model's one-shot forward over the same tokens. One captured step is replayed at successive
    positions, as a generation loop would. Returns the worst over the positions checked.

    The default length spans two decode splits: a one-split cache would be compiled for its size alone
    (dynamo specialises a size-1 split count), the timed lengths then compiling once more."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, length + decode_steps), generator=g).to(device)
    ref = reference(ids).logits.float()
    dtype = model.model.embed_tokens.weight.dtype
    cache = StaticCache(model.config, length + decode_steps, device, dtype)
    outs = [prefill(model, cache, ids[:, :length], chunk)]
    step = make_decode_step(model, cache, backend)
    replay = capture(step, cache)
    for t in range(length, length + decode_steps - 1):
        step.token.copy_(ids[:, t:t + 1])
        step.position_ids.fill_(t)
        outs.append(replay().clone())
    worst = 0.0
    for j, logits in enumerate(outs):
        r = ref[:, length - 1 + j]
        worst = max(worst, ((logits[:, -1].float() - r).norm() / r.norm()).item())
    return worst


# ---- measurement ---------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_replays(replay, device, min_seconds=0.3, repeats=3):
    """Median over `repeats` of the mean time per replay (seconds), CUDA events on GPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        replay()
        return time.perf_counter() - t0
    replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    n = int(min(200, max(5, min_seconds / max((time.perf_counter() - t0) / 3, 1e-6))))
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / n)
    return statistics.median(times)


def measure(model, length: int, chunk: int, device, backend: str, seed: int = 0) -> dict:
    """Prefill `length` random tokens, then time one decode token at that context."""
    dtype = model.model.embed_tokens.weight.dtype
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # both models stay on the GPU: count this one's weights, not the other's
        own = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
        others = torch.cuda.memory_allocated() - own
    try:
        cache = StaticCache(model.config, length + 1, device, dtype)
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
        ids = ids.to(device)
        _sync(device)
        t0 = time.perf_counter()
        prefill(model, cache, ids, chunk, progress=True)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        replay = capture(make_decode_step(model, cache, backend), cache)
        decode_s = _time_replays(replay, device)
        peak = torch.cuda.max_memory_allocated() - others if device.type == "cuda" else None
        result = {"status": "ok", "prefill_s": prefill_s, "prefill_tok_s": length / prefill_s,
                  "decode_ms": decode_s * 1e3, "peak_gib": None if peak is None else peak / 2**30}
    except torch.OutOfMemoryError:
        result = {"status": "OOM"}
    finally:
        cache = replay = None  # noqa: F841  (free the KV cache and the graph before the next run)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def decode_bytes(model, length: int) -> int:
    """The fewest bytes one decode token at context `length` moves through device memory: every weight
    read once (tied embeddings once: the LM head reads the whole table), every attention layer's K/V
    read, every Lightning state read and written."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    element = model.model.embed_tokens.weight.element_size()
    attention = c.layer_pattern.count(ATTENTION)
    kv = attention * 2 * c.num_key_value_heads * (length + 1) * c.head_dim * element
    states = (len(c.layer_pattern) - attention) * 2 * c.lightning_num_heads * c.lightning_head_dim**2 * 4
    return weights + kv + states


def copy_bandwidth(device, nbytes: int = 1 << 30):
    """Device-to-device copy rate in bytes/s, bytes read plus bytes written (None off CUDA)."""
    if device.type != "cuda":
        return None
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = _time_replays(lambda: dst.copy_(src), device, min_seconds=0.2, repeats=5)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown_table(results: list) -> str:
    """One row per context length: both models, the HypeNet/Qwen3 ratios and the decode bandwidth floors."""
    rows = ["| context | Qwen3 prefill tok/s | HypeNet prefill tok/s | prefill speedup | Qwen3 decode ms/tok | "
            "HypeNet decode ms/tok | decode speedup | Qwen3 floor ms | HypeNet floor ms | floor ratio | "
            "Qwen3 peak GiB | HypeNet peak GiB |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        q, h = r["qwen3"], r["hypenet"]

        def cell(m, key, spec):
            return m["status"] if m["status"] != "ok" else _fmt(m.get(key), spec)

        both = q["status"] == h["status"] == "ok"
        prefill_x = f"{h['prefill_tok_s'] / q['prefill_tok_s']:.2f}x" if both else "-"
        decode_x = f"{q['decode_ms'] / h['decode_ms']:.2f}x" if both else "-"
        floors = q.get("floor_ms"), h.get("floor_ms")
        floor_x = f"{floors[0] / floors[1]:.2f}x" if None not in floors else "-"
        rows.append(f"| {r['length']} | {cell(q, 'prefill_tok_s', ',.0f')} | {cell(h, 'prefill_tok_s', ',.0f')} | "
                    f"{prefill_x} | {cell(q, 'decode_ms', '.3f')} | {cell(h, 'decode_ms', '.3f')} | {decode_x} | "
                    f"{_fmt(floors[0], '.3f')} | {_fmt(floors[1], '.3f')} | {floor_x} | "
                    f"{cell(q, 'peak_gib', '.1f')} | {cell(h, 'peak_gib', '.1f')} |")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="context lengths (tokens)")
    p.add_argument("--models", nargs="+", default=["hypenet", "qwen3"], choices=["hypenet", "qwen3"])
    p.add_argument("--attention-fraction", type=float, default=1 / 8, help="share of HypeNet layers that are attention")
    p.add_argument("--rnn-mixer", default="lightning", choices=sorted(RNN_MIXERS),
                   help="the HypeNet's RNN layers (the same choice as pretrain_hypenet.py's --rnn-mixer)")
    p.add_argument("--prefill-chunk", type=int, default=16384, help="prefill chunk (tokens)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tiny", action="store_true", help="a tiny model (8 layers, hidden 64): smoke tests on CPU")
    p.add_argument("--check-tolerance", type=float, default=0.1,
                   help="max relative logits error against the HF forward before timing (bf16 noise is ~1e-2)")
    p.add_argument("--compile", default="auto", choices=["auto", "inductor", "aot_eager", "none"],
                   help="torch.compile backend of the decode step's layers, the same for both models "
                        "(auto: inductor on CUDA, none elsewhere; aot_eager checks the tracing on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON (rewritten after every measurement)")
    args = p.parse_args(argv)
    if any(n <= 0 for n in args.lengths) or args.prefill_chunk <= 0:
        p.error("--lengths and --prefill-chunk must be positive")
    if not 0 < args.attention_fraction <= 1:
        p.error("--attention-fraction must be in (0, 1]")
    return args


def run_checks(models, reference, device, args, backend):
    chunk = 64 if not args.tiny else 16
    return {"qwen3": check_against_hf(models["qwen3"], reference, device, chunk, backend),
            "hypenet": check_against_hf(models["hypenet"], models["hypenet"], device, chunk, backend)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with --tiny) for a smoke test")
    backend = args.compile if args.compile != "auto" else ("inductor" if device.type == "cuda" else "none")
    shape = TINY if args.tiny else QWEN3_1_7B
    pattern = hybrid_pattern(shape["num_hidden_layers"], args.attention_fraction, RNN_MIXERS[args.rnn_mixer])
    models, reference = build_models(shape, pattern, device, dtype, args.seed)
    t0 = time.perf_counter()
    try:  # the first decode steps compile (both models' layer kinds)
        checks = run_checks(models, reference, device, args, backend)
    except Exception:  # noqa: BLE001  (a compiler failure must not lose the run: both models go eager)
        if backend == "none":
            raise
        traceback.print_exc()
        print(f"WARNING: torch.compile(backend={backend!r}) failed; both models decode eagerly", flush=True)
        backend = "none"
        torch._dynamo.reset()
        checks = run_checks(models, reference, device, args, backend)
    del reference
    print(f"logits check against the HF forward (relative L2 error, compile={backend}, "
          f"{time.perf_counter() - t0:.0f} s with compilation): {checks}", flush=True)
    bad = {k: v for k, v in checks.items() if not v <= args.check_tolerance}
    if bad:  # still timed (the speed is real), but flagged in the JSON and here
        print(f"WARNING: the benchmark's decode path disagrees with the HF model beyond "
              f"{args.check_tolerance}: {bad}", flush=True)
    bandwidth = copy_bandwidth(device)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
            "torch": torch.__version__, "dtype": args.dtype, "shape": shape, "hypenet_layer_pattern": pattern,
            "prefill_chunk": args.prefill_chunk, "compile": backend, "logits_check": checks,
            "copy_bandwidth_gb_s": None if bandwidth is None else bandwidth / 1e9,
            "argv": sys.argv[1:] if argv is None else argv}
    print(f"copy bandwidth: {info['copy_bandwidth_gb_s']} GB/s (read + write)", flush=True)
    results, warmed = [], set()
    for length in tqdm(args.lengths, desc="lengths", unit="length"):
        # Warm up at this length's prefill shapes (first chunk, and one that attends to a cached one) so
        # first-use Triton compilation stays out of the timings; longer contexts repeat those shapes.
        warm = min(length, 2 * args.prefill_chunk)
        if warm not in warmed:
            for name in args.models:
                measure(models[name], warm, args.prefill_chunk, device, backend, args.seed)
            warmed.add(warm)
        row = {"length": length}
        for name in ("hypenet", "qwen3"):
            row[name] = measure(models[name], length, args.prefill_chunk, device, backend, args.seed) \
                if name in args.models else {"status": "skipped"}
            row[name]["bytes_per_token"] = decode_bytes(models[name], length)
            if bandwidth is not None:
                row[name]["floor_ms"] = row[name]["bytes_per_token"] / bandwidth * 1e3
            print(f"{name} @ {length}: {row[name]}", flush=True)
        results.append(row)
        if args.out:  # after every length, so a run stopped at its time limit keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    print(markdown_table(results))
    return {"info": info, "results": results}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
