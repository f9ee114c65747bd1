"""Long-context inference speed: a HypeNet against the same-shaped Qwen3, side by side (issue 5).

Both models are built with random bf16 weights in one process and measured the same way:

- prefill: the whole context in chunks (`--prefill-chunk`) through the models' own HF decoder layers,
  with K/V written into a preallocated buffer, so memory stays bounded by the KV cache plus one chunk;
- decode: one token at the end of that context, a whole-model step captured in a CUDA graph (static
  buffers, no Python or launch overhead), replayed and timed with CUDA events;
- peak memory: `torch.cuda.max_memory_allocated` over prefill + decode, this model's weights included
  (the other model's, resident too, subtracted).

The Qwen3 is `transformers.Qwen3ForCausalLM` with its weights moved into an all-attention HypeNet module
graph (`attention_rope=True`, no HyPE scale), which is exactly Qwen3 (tests/test_hf_modeling.py checks
it; this script checks it again against Qwen3ForCausalLM's logits before timing). So both models run the
same prefill and decode code: the only difference measured is the layer pattern.

The decode step is written out here (the HF `HypeNetCache` allocates new tensors each step, which a CUDA
graph cannot replay): attention reads the static K/V buffer without repeating it per query head (the
query heads of a KV group act as query rows), Lightning layers update their fp32 state in place with the
Triton step kernel. `check_against_hf` compares it with the HF forward before anything is timed.

    python tools/bench_inference.py --lengths 8192 32768 131072 --out results.json
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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from megatron_hypenet.hf.configuration_hypenet import ATTENTION, HypeNetConfig  # noqa: E402
from megatron_hypenet.hf.modeling_hypenet import (  # noqa: E402
    HypeNetForCausalLM,
    HypeNetLightningCacheLayer,
    _slopes,
    apply_rope,
    query_scale,
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


def hybrid_pattern(num_layers: int, attention_fraction: float) -> str:
    """`round(num_layers * fraction)` attention layers spread evenly, the last layer one of them
    (28 layers at 1/8: 4 attention layers, 6 13 20 27; rounding up keeps the comparison conservative)."""
    k = max(1, round(num_layers * attention_fraction))
    attention = {int((i + 1) * num_layers / k) - 1 for i in range(k)}
    return "".join(ATTENTION if i in attention else "L" for i in range(num_layers))


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
    as_hypenet = HypeNetConfig(**common, rope_theta=ROPE_THETA, attention_rope=True, attention_query_scale_base=None)
    with torch.device("meta"):
        qwen_graph = HypeNetForCausalLM(as_hypenet)
    qwen_graph.load_state_dict(qwen.state_dict(), strict=True, assign=True)  # shares qwen's tensors
    qwen_graph.tie_weights()
    return {"hypenet": hypenet, "qwen3": qwen_graph.eval()}, qwen


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
            self.layers.append(None if mixer == ATTENTION else HypeNetLightningCacheLayer())
        self.length = 0  # tokens already in the cache

    def update(self, k, v, layer_idx):
        s, e = self.length, self.length + k.shape[2]
        self.k[layer_idx][:, :, s:e] = k
        self.v[layer_idx][:, :, s:e] = v
        return self.k[layer_idx][:, :, :e], self.v[layer_idx][:, :, :e]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def _rope(model, position_ids, dtype):
    return {d: rope_cos_sin(position_ids, d, model.config.rope_theta, dtype) for d in model.model._rope_dims}


@torch.no_grad()
def prefill(model, cache: StaticCache, input_ids: torch.Tensor, chunk: int, progress: bool = False):
    """Runs `input_ids` ``[1, T]`` through the model's own decoder layers, `chunk` tokens at a time;
    returns the logits of the last token. Later chunks attend to the cache with a bottom-right causal
    mask (never materialised, so flash attention applies)."""
    inner = model.model
    T = input_ids.shape[1]
    for s in tqdm(range(0, T, chunk), desc="prefill", unit="chunk", leave=False, disable=not progress):
        ids = input_ids[:, s:s + chunk]
        n, past = ids.shape[1], cache.length
        hidden = inner.embed_tokens(ids)
        position_ids = torch.arange(past, past + n, device=ids.device)[None]
        mask = None if past == 0 else causal_lower_right(n, past + n)
        rope = _rope(model, position_ids, hidden.dtype)
        for layer in inner.layers:
            hidden = layer(hidden, position_ids=position_ids, position_embeddings=rope, attention_mask=mask,
                           token_mask=None, past_key_values=cache)
        cache.length += n
    return model.lm_head(inner.norm(hidden[:, -1:]))


def decode_attention(q, k, v, scale, valid: int, bias, backend="split"):
    """One query per head over every cached key. q ``[1, H, 1, D]``; k, v the whole static buffer
    ``[1, G, Lp, D]`` of which the first `valid` are keys; bias ``[Lp]`` (0 for those, -inf after). The H/G query heads of a
    KV group become query rows of that group, so K/V are read once and never repeated per head.

    "split" is flash decoding with matmuls: scores for all keys, softmax, then P @ V over `SPLIT`-token
    splits in parallel, summed; a fused attention kernel parallelises over heads only, which leaves most
    of the GPU idle at batch 1 (measured ~10x slower at 256K). "sdpa" is kept for comparison."""
    B, H, _, D = q.shape
    G, Lp = k.shape[1], k.shape[2]
    q = q.reshape(B, G, H // G, D)
    if backend == "sdpa":
        o = F.scaled_dot_product_attention(q, k[:, :, :valid], v[:, :, :valid], scale=scale)
        return o.reshape(B, H, 1, D)
    p = torch.softmax((q @ k.transpose(-1, -2)).float() * scale + bias, dim=-1).to(v.dtype)  # [B, G, r, Lp]
    r, S = H // G, Lp // SPLIT
    p = p.view(B, G, r, S, SPLIT).transpose(2, 3)  # [B, G, S, r, SPLIT]
    o = (p @ v.view(B, G, S, SPLIT, D)).sum(2, dtype=torch.float32)  # [B, G, r, D]
    return o.to(v.dtype).reshape(B, H, 1, D)


def _lightning_step(q, k, v, slopes, state, scale):
    """One token of Lightning Attention updating `state` in place (the same address every replay)."""
    if q.is_cuda:
        from kernels.lightning.fused_recurrent import fused_recurrent_lightning_step

        return fused_recurrent_lightning_step(q, k, v, slopes, state, scale, out_state=state)[0]
    from kernels.lightning.naive import lightning_attention_step_ref

    o, new_state = lightning_attention_step_ref(q, k, v, slopes, state, scale)
    state.copy_(new_state)
    return o


def _conv_step(conv, x, past):
    """Short conv for one token; `past` (the last K - 1 inputs) is updated in place."""
    full = torch.cat([past.to(x.dtype), x], dim=1)
    past.copy_(full[:, 1:])
    return F.conv1d(full.transpose(1, 2), conv.weight, groups=x.shape[-1]).transpose(1, 2)


def _attention_decode(attn, x, position_ids, rope, cache, i, pos, bias, backend):
    """HypeNetAttention.forward for one token at position `pos`, K/V written into the static buffer."""
    D, c = attn.head_dim, attn.config
    q = attn.q_norm(attn.q_proj(x).view(1, 1, -1, D))
    k = attn.k_norm(attn.k_proj(x).view(1, 1, -1, D))
    v = attn.v_proj(x).view(1, 1, -1, D)
    if c.attention_rope:
        cos, sin = rope[D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if c.attention_query_scale_base is not None:
        q = q * query_scale(position_ids, c.attention_query_scale_base)[:, :, None, None].to(q.dtype)
    cache.k[i][:, :, pos] = k[:, 0]
    cache.v[i][:, :, pos] = v[:, 0]
    o = decode_attention(q.transpose(1, 2), cache.k[i], cache.v[i], D**-0.5, pos + 1, bias, backend)
    return attn.o_proj(o.transpose(1, 2).reshape(1, 1, -1))


def _lightning_decode(la, x, rope, layer_cache):
    """HypeNetLightningAttention.forward for one token, the recurrent (and conv) state updated in place."""
    H, D, c = la.num_heads, la.head_dim, la.config
    q, k, v = la.q_proj(x), la.k_proj(x), la.v_proj(x)
    if c.lightning_short_conv:
        q, k, v = (_conv_step(getattr(la, f"{n}_conv"), t, layer_cache.conv_states[n])
                   for n, t in (("q", q), ("k", k), ("v", v)))
    q, k, v = (t.view(1, 1, H, D) for t in (q, k, v))
    if c.lightning_qk_norm:
        q, k = la.q_norm(q), la.k_norm(k)
    if c.lightning_rope:
        cos, sin = rope[D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = _lightning_step(q[:, 0], k[:, 0], v[:, 0], _slopes(H, x.device), layer_cache.recurrent_state, la.scale)
    o = o.reshape(1, 1, H * D)
    if c.lightning_output_norm:
        o = la.o_norm(o)
    if c.lightning_output_gate:
        o = o * torch.sigmoid(la.g_proj(x))
    return la.o_proj(o)


def make_decode_step(model, cache: StaticCache, backend="split"):
    """A no-argument function that decodes the token in `step.token` at position `cache.length` and
    returns its logits; all its inputs are static tensors, so it can be captured in a CUDA graph."""
    inner, config = model.model, model.config
    device, dtype = inner.embed_tokens.weight.device, inner.embed_tokens.weight.dtype
    pos = cache.length
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    position_ids = torch.full((1, 1), pos, dtype=torch.long, device=device)
    bias = torch.zeros(cache.max_len, device=device)
    bias[pos + 1:] = float("-inf")  # the buffer past this token holds no keys yet
    D = config.lightning_head_dim
    for i, layer_cache in enumerate(cache.layers):  # a fresh cache: zero states (what a prefill would leave)
        if layer_cache is not None and layer_cache.recurrent_state is None:
            layer_cache.recurrent_state = torch.zeros(1, config.lightning_num_heads, D, D, device=device)
        if layer_cache is not None and config.lightning_short_conv and not layer_cache.conv_states:
            width = config.lightning_num_heads * D
            layer_cache.conv_states = {n: torch.zeros(1, config.lightning_conv_size - 1, width, device=device,
                                                      dtype=dtype) for n in "qkv"}

    @torch.no_grad()
    def step():
        hidden = inner.embed_tokens(token)
        rope = _rope(model, position_ids, dtype)
        for i, layer in enumerate(inner.layers):
            x = layer.input_layernorm(hidden)
            if layer.is_attention:
                x = _attention_decode(layer.self_attn, x, position_ids, rope, cache, i, pos, bias, backend)
            else:
                x = _lightning_decode(layer.linear_attn, x, rope, cache.layers[i])
            hidden = hidden + x
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return model.lm_head(inner.norm(hidden))

    step.token = token
    return step


def capture(step, cache: StaticCache):
    """A function running `step` and returning its logits: on CUDA the replay of a graph of `step` (warmed
    up on a side stream first, so Triton compiles and cuBLAS picks its kernels outside the capture);
    elsewhere `step` itself. Warm-up and capture leave the Lightning states as they found them."""
    if not step.token.is_cuda:
        return step
    states = [t for c in cache.layers if c is not None for t in (c.recurrent_state, *c.conv_states.values())]
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
def check_against_hf(model, reference, device, chunk: int, length: int = 200, decode_steps: int = 4, seed: int = 0):
    """Relative L2 error of this script's chunked prefill + (graph-captured) decode against the reference
    HF model's one-shot forward over the same tokens. Returns the worst over the positions checked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, length + decode_steps), generator=g).to(device)
    ref = reference(ids).logits.float()
    dtype = model.model.embed_tokens.weight.dtype
    cache = StaticCache(model.config, length + decode_steps, device, dtype)
    outs = [prefill(model, cache, ids[:, :length], chunk)]
    for t in range(decode_steps - 1):  # each step captured at its own position, like the timed ones
        step = make_decode_step(model, cache)
        replay = capture(step, cache)
        step.token.copy_(ids[:, length + t:length + t + 1])
        outs.append(replay().clone())
        cache.length += 1
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


def _pick_backend(cache, pos, device):
    """The faster decode attention ("split" or "sdpa") over this cache's first attention layer, timed
    eagerly; returns (choice, {backend: seconds})."""
    if device.type != "cuda" or not cache.k:
        return "split", {}
    i = next(iter(cache.k))
    k, v = cache.k[i], cache.v[i]
    q = torch.randn(1, 2 * k.shape[1], 1, k.shape[-1], device=device, dtype=k.dtype)
    bias = torch.zeros(cache.max_len, device=device)
    bias[pos + 1:] = float("-inf")
    times = {b: _time_replays(lambda: decode_attention(q, k, v, 0.1, pos + 1, bias, b), device, 0.05)
             for b in ("split", "sdpa")}
    return min(times, key=times.get), times


def measure(model, length: int, chunk: int, device, seed: int = 0) -> dict:
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
        backend, attention_s = _pick_backend(cache, cache.length, device)
        replay = capture(make_decode_step(model, cache, backend), cache)
        decode_s = _time_replays(replay, device)
        peak = torch.cuda.max_memory_allocated() - others if device.type == "cuda" else None
        result = {"status": "ok", "prefill_s": prefill_s, "prefill_tok_s": length / prefill_s,
                  "decode_ms": decode_s * 1e3, "decode_attention": backend,
                  "attention_layer_ms": {b: t * 1e3 for b, t in attention_s.items()},
                  "peak_gib": None if peak is None else peak / 2**30}
    except torch.OutOfMemoryError:
        result = {"status": "OOM"}
    finally:
        cache = replay = None  # noqa: F841  (free the KV cache and the graph before the next run)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown_table(results: list) -> str:
    """One row per context length: both models and the HypeNet/Qwen3 ratios."""
    rows = ["| context | Qwen3 prefill tok/s | HypeNet prefill tok/s | prefill speedup | Qwen3 decode ms/tok | "
            "HypeNet decode ms/tok | decode speedup | Qwen3 peak GiB | HypeNet peak GiB |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        q, h = r["qwen3"], r["hypenet"]
        def cell(m, key, spec):
            return m["status"] if m["status"] != "ok" else _fmt(m.get(key), spec)
        both = q["status"] == h["status"] == "ok"
        prefill_x = f"{h['prefill_tok_s'] / q['prefill_tok_s']:.2f}x" if both else "-"
        decode_x = f"{q['decode_ms'] / h['decode_ms']:.2f}x" if both else "-"
        rows.append(f"| {r['length']} | {cell(q, 'prefill_tok_s', ',.0f')} | {cell(h, 'prefill_tok_s', ',.0f')} | "
                    f"{prefill_x} | {cell(q, 'decode_ms', '.3f')} | {cell(h, 'decode_ms', '.3f')} | {decode_x} | "
                    f"{cell(q, 'peak_gib', '.1f')} | {cell(h, 'peak_gib', '.1f')} |")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="context lengths (tokens)")
    p.add_argument("--models", nargs="+", default=["hypenet", "qwen3"], choices=["hypenet", "qwen3"])
    p.add_argument("--attention-fraction", type=float, default=1 / 8, help="share of HypeNet layers that are attention")
    p.add_argument("--prefill-chunk", type=int, default=16384, help="prefill chunk (tokens)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tiny", action="store_true", help="a tiny model (8 layers, hidden 64): smoke tests on CPU")
    p.add_argument("--check-tolerance", type=float, default=0.1,
                   help="max relative logits error against the HF forward before timing (bf16 noise is ~1e-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON (rewritten after every measurement)")
    args = p.parse_args(argv)
    if any(n <= 0 for n in args.lengths) or args.prefill_chunk <= 0:
        p.error("--lengths and --prefill-chunk must be positive")
    if not 0 < args.attention_fraction <= 1:
        p.error("--attention-fraction must be in (0, 1]")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with --tiny) for a smoke test")
    shape = TINY if args.tiny else QWEN3_1_7B
    pattern = hybrid_pattern(shape["num_hidden_layers"], args.attention_fraction)
    models, reference = build_models(shape, pattern, device, dtype, args.seed)
    check_chunk = 64 if not args.tiny else 16
    checks = {"qwen3": check_against_hf(models["qwen3"], reference, device, check_chunk),
              "hypenet": check_against_hf(models["hypenet"], models["hypenet"], device, check_chunk)}
    del reference
    print(f"logits check against the HF forward (relative L2 error): {checks}", flush=True)
    bad = {k: v for k, v in checks.items() if not v <= args.check_tolerance}
    if bad:  # still timed (the speed is real), but flagged in the JSON and here
        print(f"WARNING: the benchmark's decode path disagrees with the HF model beyond "
              f"{args.check_tolerance}: {bad}", flush=True)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
            "torch": torch.__version__, "dtype": args.dtype, "shape": shape, "hypenet_layer_pattern": pattern,
            "prefill_chunk": args.prefill_chunk, "logits_check": checks, "argv": sys.argv[1:] if argv is None else argv}
    for model in models.values():  # compile Triton kernels and pick cuBLAS kernels outside the timings,
        measure(model, 2 * check_chunk + 3, check_chunk, device)  # at the check's shapes and at the
        measure(model, min(args.lengths[0], 2 * args.prefill_chunk), args.prefill_chunk, device)  # timed ones
    results = []
    for length in tqdm(args.lengths, desc="lengths", unit="length"):
        row = {"length": length}
        for name in ("hypenet", "qwen3"):
            row[name] = measure(models[name], length, args.prefill_chunk, device, args.seed) \
                if name in args.models else {"status": "skipped"}
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
