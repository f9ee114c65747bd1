"""The one mapping between HF names/layouts (Qwen3, HypeNet) and megatron-core's global tensors.

Every converter and the HALO initialisation use these functions, so a layout is written once.
Megatron tensors here are *global* (unsharded): dist_checkpointing stores global tensors and
reshards them to any TP/PP layout on load.
"""

from typing import Callable, Dict, Iterator, List, Tuple

import torch

from .config import ATTENTION, GATED_DELTA
from .model import padded_vocab_size


# ---- fused QKV layouts ----------------------------------------------------------------------------

def merge_qkv_grouped(q, k, v, heads: int, groups: int, dim: int) -> torch.Tensor:
    """megatron-core GQA layout: per KV group, its query heads, then its k head, then its v head."""
    hidden = q.shape[-1]
    q = q.view(groups, heads // groups * dim, hidden)
    return torch.cat([q, k.view(groups, dim, hidden), v.view(groups, dim, hidden)], dim=1).reshape(-1, hidden)


def split_qkv_grouped(w, heads: int, groups: int, dim: int):
    hidden = w.shape[-1]
    w = w.view(groups, (heads // groups + 2) * dim, hidden)
    q, k, v = w.split([heads // groups * dim, dim, dim], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def merge_qkv_per_head(q, k, v, heads: int, dim: int) -> torch.Tensor:
    """RNN-mixer (Lightning, Gated DeltaNet) layout: per head [q_h; k_h; v_h], so a TP shard holds whole heads."""
    hidden = q.shape[-1]
    return torch.stack([x.view(heads, dim, hidden) for x in (q, k, v)], dim=1).reshape(-1, hidden)


def split_qkv_per_head(w, heads: int, dim: int):
    hidden = w.shape[-1]
    q, k, v = w.view(heads, 3, dim, hidden).unbind(1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def repeat_kv(w, heads: int, groups: int, dim: int) -> torch.Tensor:
    """GQA K/V rows [G*D, h] -> one K/V per query head [H*D, h] (HALO's un-shared KV initialisation)."""
    hidden = w.shape[-1]
    return w.view(groups, 1, dim, hidden).expand(groups, heads // groups, dim, hidden).reshape(-1, hidden)


def attention_to_lightning_qkv(qkv_grouped, heads: int, groups: int, dim: int) -> torch.Tensor:
    """HALO stage-1 init of an RNN mixer's fused QKV from an attention mixer's (works per TP shard)."""
    q, k, v = split_qkv_grouped(qkv_grouped, heads, groups, dim)
    return merge_qkv_per_head(q, repeat_kv(k, heads, groups, dim), repeat_kv(v, heads, groups, dim), heads, dim)


def pad_rows(w, rows: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])]) if rows > w.shape[0] else w


# ---- name mapping ---------------------------------------------------------------------------------

# A rule: megatron key, the HF names it is made of, to_mcore(list of HF tensors) and to_hf(tensor) -> list.
Rule = Tuple[str, List[str], Callable, Callable]


def _same(name_m, name_h) -> Rule:
    return (name_m, [name_h], lambda ts: ts[0], lambda t: [t])


def mapping_rules(desc: dict) -> Iterator[Rule]:
    """Rules for a model description (config.model_description): global megatron tensors <-> HF tensors."""
    V, Vp = desc["vocab_size"], padded_vocab_size(desc["vocab_size"])
    H, G, D = desc["num_attention_heads"], desc["num_query_groups"], desc["kv_channels"]
    LH, LD = desc["lightning_num_heads"], desc["lightning_head_dim"]
    vocab = (lambda ts: pad_rows(ts[0], Vp), lambda t: [t[:V]])
    yield ("embedding.word_embeddings.weight", ["model.embed_tokens.weight"], *vocab)
    for i, mixer in enumerate(desc["layer_pattern"]):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        yield _same(m + "input_layernorm.weight", h + "input_layernorm.weight")
        yield _same(m + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight")
        yield (m + "mlp.linear_fc1.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
               lambda ts: torch.cat(ts, 0), lambda t: list(t.chunk(2, 0)))
        yield _same(m + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight")
        a = m + "self_attention."
        if mixer == ATTENTION:
            s = h + "self_attn."
            yield (a + "linear_qkv.weight", [s + "q_proj.weight", s + "k_proj.weight", s + "v_proj.weight"],
                   lambda ts: merge_qkv_grouped(*ts, H, G, D), lambda t: list(split_qkv_grouped(t, H, G, D)))
            yield _same(a + "q_layernorm.weight", s + "q_norm.weight")
            yield _same(a + "k_layernorm.weight", s + "k_norm.weight")
            yield _same(a + "linear_proj.weight", s + "o_proj.weight")
            continue
        s = h + "linear_attn."
        yield (a + "linear_qkv.weight", [s + "q_proj.weight", s + "k_proj.weight", s + "v_proj.weight"],
               lambda ts: merge_qkv_per_head(*ts, LH, LD), lambda t: list(split_qkv_per_head(t, LH, LD)))
        yield _same(a + "linear_proj.weight", s + "o_proj.weight")
        if desc["lightning_qk_norm"]:
            yield _same(a + "q_layernorm.weight", s + "q_norm.weight")
            yield _same(a + "k_layernorm.weight", s + "k_norm.weight")
        if desc["lightning_output_norm"]:
            yield _same(a + "out_norm.weight", s + "o_norm.weight")
        if desc["lightning_output_gate"]:
            yield _same(a + "linear_gate.weight", s + "g_proj.weight")
        if desc["lightning_short_conv"]:
            for x in "qkv":
                yield _same(a + f"{x}_conv.weight", s + f"{x}_conv.weight")
        if mixer == GATED_DELTA:
            yield _same(a + "linear_a.weight", s + "a_proj.weight")
            yield _same(a + "linear_b.weight", s + "b_proj.weight")
            yield _same(a + "A_log.weight", s + "A_log")
            yield _same(a + "dt_bias.weight", s + "dt_bias")
    yield _same("decoder.final_layernorm.weight", "model.norm.weight")
    if not desc["tie_word_embeddings"]:
        yield ("output_layer.weight", ["lm_head.weight"], *vocab)


def hf_names(desc: dict) -> Dict[str, str]:
    """HF tensor name -> megatron key, to check a folder holds exactly what the description needs."""
    return {name: key for key, names, _, _ in mapping_rules(desc) for name in names}
