"""HALO weight initialisation and composition, on each rank's local TP shards (no communication).

- `init_student_from_teacher`: every Lightning mixer of the student starts from its teacher attention
  layer (q/k/v/o and q/k-norm; K/V repeated to one head per query head); all other weights are
  copied; gates keep their random init, output norms start at 1, short convs at the identity.
- `load_hybrid`: a student of any layer pattern built from two checkpoints: the teacher's (attention
  layers, MLPs, norms, embeddings) and the aligned all-Lightning model's (Lightning mixers).
"""

import re

import torch
from megatron.core import dist_checkpointing

from .. import checkpoint
from ..config import LIGHTNING, read_model_description
from ..layers import LightningAttention
from ..qwen3_mapping import attention_to_lightning_qkv

MIXER_KEY = re.compile(r"decoder\.layers\.(\d+)\.self_attention\.")


@torch.no_grad()
def init_student_from_teacher(student, teacher) -> None:
    t_layers = {layer.layer_number: layer for layer in teacher.decoder.layers}
    for s_layer in student.decoder.layers:
        t_layer = t_layers[s_layer.layer_number]
        s_mix, t_mix = s_layer.self_attention, t_layer.self_attention
        for name, module in s_layer.named_children():
            if name != "self_attention":
                module.load_state_dict(getattr(t_layer, name).state_dict())
        if not isinstance(s_mix, LightningAttention):
            s_mix.load_state_dict(t_mix.state_dict())
            continue
        if s_mix.local_heads != t_mix.local_heads or s_mix.head_dim != t_mix.head_dim:
            raise ValueError(
                "initialising Lightning from attention needs lightning_num_heads == num_attention_heads and "
                f"lightning_head_dim == kv_channels; got {s_mix.local_heads} vs {t_mix.local_heads} local heads, "
                f"head dim {s_mix.head_dim} vs {t_mix.head_dim}"
            )
        s_mix.linear_qkv.weight.copy_(attention_to_lightning_qkv(
            t_mix.linear_qkv.weight, t_mix.local_heads, t_mix.local_groups, t_mix.head_dim))
        s_mix.linear_proj.weight.copy_(t_mix.linear_proj.weight)
        if hasattr(s_mix, "q_layernorm"):
            s_mix.q_layernorm.weight.copy_(t_mix.q_layernorm.weight)
            s_mix.k_layernorm.weight.copy_(t_mix.k_layernorm.weight)
    for name in ("embedding", "output_layer"):
        if hasattr(student, name) and hasattr(teacher, name):
            getattr(student, name).load_state_dict(getattr(teacher, name).state_dict())
    if hasattr(student.decoder, "final_layernorm") and student.decoder.final_layernorm is not None:
        student.decoder.final_layernorm.load_state_dict(teacher.decoder.final_layernorm.state_dict())


def load_hybrid(model, pattern: str, teacher_root: str, rnn_root: str) -> None:
    """Fills `model` (layer pattern `pattern`; a module or a list of pipeline chunks) from the teacher and
    the aligned all-Lightning checkpoint."""
    teacher_path, rnn_path = checkpoint.resolve(teacher_root), checkpoint.resolve(rnn_root)
    rnn_desc = read_model_description(rnn_path)
    for i, mixer in enumerate(pattern):
        if mixer == LIGHTNING and rnn_desc["layer_pattern"][i] != LIGHTNING:
            raise checkpoint.CheckpointError(f"{rnn_path} has no Lightning mixer for layer {i}; use the align stage's output")
    sd = checkpoint.model_sharded_state_dict(model)

    def from_rnn(key):
        m = MIXER_KEY.match(key)
        return m is not None and pattern[int(m.group(1))] == LIGHTNING

    loaded = {}
    for path, keep in ((teacher_path, lambda k: not from_rnn(k)), (rnn_path, from_rnn)):
        part = {k: v for k, v in sd.items() if keep(getattr(v, "key", k))}  # stored keys: global layer numbers
        # collective: every rank loads, even one whose pipeline stage takes nothing from this checkpoint
        loaded.update(dist_checkpointing.load({"model": part}, path).get("model", {}))
    checkpoint.load_model_state(model, loaded)


def freeze_all_but_mixers(model) -> list:
    """Stage 1 trains only the Lightning mixers; returns the trainable parameters."""
    params = []
    for layer in model.decoder.layers:
        for p in layer.parameters():
            p.requires_grad_(False)
        if isinstance(layer.self_attention, LightningAttention):
            for p in layer.self_attention.parameters():
                p.requires_grad_(True)
                params.append(p)
    for name in ("embedding", "output_layer"):
        if getattr(model, name, None) is not None:
            for p in getattr(model, name).parameters():
                p.requires_grad_(False)
    if model.decoder.final_layernorm is not None:
        for p in model.decoder.final_layernorm.parameters():
            p.requires_grad_(False)
    return params
