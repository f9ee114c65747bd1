"""HALO weight initialisation and composition, on each rank's local TP shards.

- `init_student_from_teacher`: every RNN mixer (Lightning or Gated DeltaNet) of the student starts from its
  teacher attention layer (q/k/v/o and q/k-norm; K/V repeated to one head per query head; heads in the
  teacher's order, or in an order calibrate.py matched to the decays, which needs a TP gather); all other
  weights are copied; gates keep their random init, output norms start at 1, short convs at the identity,
  Gated DeltaNet's decay and beta parameters at their construction init (layers.GatedDeltaNet).
- `load_hybrid`: a student of any layer pattern built from two checkpoints: the teacher's (attention
  layers, MLPs, norms, embeddings) and the aligned all-RNN model's (its RNN mixers, and its attention twins
  for the attention layers where it has them: --attention-twins).
"""

import dataclasses
import re
from typing import Dict, Optional

import torch
from megatron.core import dist_checkpointing

from .. import checkpoint
from ..config import ATTENTION, MIXER_ATTRIBUTES, MIXER_NAMES, read_model_description
from ..layers import RNNMixer
from ..qwen3_mapping import attention_to_lightning_qkv

MIXER_KEY = re.compile(r"decoder\.layers\.(\d+)\.self_attention\.")
TWIN_KIND = ("attention_rope", "attention_query_scale_base")  # what an attention twin must share with its student


def gather_cat(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's `t` of `group`, concatenated along `dim` in rank order (no autograd): a TP-sharded weight
    whole, the heads of all TP ranks, the keys of all CP chunks."""
    if group is None or group.size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(group.size())]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reordered_heads(s_mix, t_mix, order: list):
    """The RNN mixer's local fused QKV and output projection when its head p (global) starts from teacher
    head order[p]: the teacher's whole weights are gathered over TP, since a head may come from another rank."""
    H, D, group = len(order), t_mix.head_dim, t_mix.tp_group
    G = t_mix.local_groups * t_mix.tp_size
    qkv = attention_to_lightning_qkv(gather_cat(t_mix.linear_qkv.weight, 0, group), H, G, D)
    proj = gather_cat(t_mix.linear_proj.weight, 1, group)
    local = slice(s_mix.tp_rank * s_mix.local_heads, (s_mix.tp_rank + 1) * s_mix.local_heads)
    qkv = qkv.view(H, 3 * D, -1)[order][local].reshape(-1, qkv.shape[-1])
    proj = proj.view(proj.shape[0], H, D)[:, order][:, local].reshape(proj.shape[0], -1)
    return qkv, proj


@torch.no_grad()
def init_student_from_teacher(student, teacher, head_orders: Optional[Dict[int, list]] = None) -> None:
    """`head_orders` ({global layer number: order}, calibrate.head_orders) starts RNN head p of a layer from
    teacher head order[p]; without it head p starts from head p (the paper's initialisation)."""
    t_layers = {layer.layer_number: layer for layer in teacher.decoder.layers}
    for s_layer in student.decoder.layers:
        t_layer = t_layers[s_layer.layer_number]
        s_mix, t_mix = s_layer.self_attention, t_layer.self_attention
        for name, module in s_layer.named_children():
            if name not in MIXER_ATTRIBUTES:
                module.load_state_dict(getattr(t_layer, name).state_dict())
        if hasattr(s_layer, "attention_twin"):
            s_layer.attention_twin.load_state_dict(t_mix.state_dict())
        if not isinstance(s_mix, RNNMixer):
            s_mix.load_state_dict(t_mix.state_dict())
            continue
        if s_mix.local_heads != t_mix.local_heads or s_mix.head_dim != t_mix.head_dim:
            raise ValueError(
                "initialising an RNN mixer from attention needs lightning_num_heads == num_attention_heads and "
                f"lightning_head_dim == kv_channels; got {s_mix.local_heads} vs {t_mix.local_heads} local heads, "
                f"head dim {s_mix.head_dim} vs {t_mix.head_dim}"
            )
        if head_orders is not None and s_layer.layer_number in head_orders:
            qkv, proj = _reordered_heads(s_mix, t_mix, head_orders[s_layer.layer_number])
        else:
            qkv = attention_to_lightning_qkv(t_mix.linear_qkv.weight, t_mix.local_heads, t_mix.local_groups,
                                             t_mix.head_dim)
            proj = t_mix.linear_proj.weight
        s_mix.linear_qkv.weight.copy_(qkv)
        s_mix.linear_proj.weight.copy_(proj)
        if hasattr(s_mix, "q_layernorm"):
            s_mix.q_layernorm.weight.copy_(t_mix.q_layernorm.weight)
            s_mix.k_layernorm.weight.copy_(t_mix.k_layernorm.weight)
    for name in ("embedding", "output_layer"):
        if hasattr(student, name) and hasattr(teacher, name):
            getattr(student, name).load_state_dict(getattr(teacher, name).state_dict())
    if hasattr(student.decoder, "final_layernorm") and student.decoder.final_layernorm is not None:
        student.decoder.final_layernorm.load_state_dict(teacher.decoder.final_layernorm.state_dict())


def load_hybrid(model, pattern: str, teacher_root: str, rnn_root: str) -> str:
    """Fills `model` (layer pattern `pattern`; a module or a list of pipeline chunks) from the teacher and
    the aligned all-RNN checkpoint, whose mixer must be of the same kind at every RNN layer of `pattern`.
    Attention layers take the align checkpoint's attention twins when it has twins of their kind (HyPE or
    RoPE), else the teacher's attention. Returns where they came from, for the log."""
    teacher_path, rnn_path = checkpoint.resolve(teacher_root), checkpoint.resolve(rnn_root)
    align = read_model_description(rnn_path)
    check_rnn_mixers(pattern, align["layer_pattern"], rnn_path)
    config = (model[0] if isinstance(model, (list, tuple)) else model).config
    twins = align["attention_twins"] and all(align[k] == getattr(config, k) for k in TWIN_KIND)
    from_teacher, from_align = {}, {}
    for k, v in checkpoint.model_sharded_state_dict(model).items():
        m = MIXER_KEY.match(getattr(v, "key", k))  # stored keys: global layer numbers
        mixer = None if m is None else pattern[int(m.group(1))]
        if mixer is None or (mixer == ATTENTION and not twins):
            from_teacher[k] = v
        elif mixer == ATTENTION:
            from_align[k] = dataclasses.replace(v, key=v.key.replace(".self_attention.", ".attention_twin.", 1))
        else:
            from_align[k] = v
    loaded = {}
    for path, part in ((teacher_path, from_teacher), (rnn_path, from_align)):
        # collective: every rank loads, even one whose pipeline stage takes nothing from this checkpoint
        loaded.update(dist_checkpointing.load({"model": part}, path).get("model", {}))
    checkpoint.load_model_state(model, loaded)
    if twins:
        return f"the attention twins of {rnn_path}"
    other = f" (its attention twins are of another kind: {', '.join(f'{k}={align[k]}' for k in TWIN_KIND)})"
    return f"the teacher {teacher_path}" + (other if align["attention_twins"] else "")


def check_rnn_mixers(pattern: str, rnn_pattern: str, rnn_path: str) -> None:
    """Every RNN layer of `pattern` must find a mixer of its kind at that layer of the align checkpoint."""
    if len(rnn_pattern) != len(pattern):
        raise checkpoint.CheckpointError(f"the align checkpoint {rnn_path} has {len(rnn_pattern)} layers ("
                                         f"{rnn_pattern!r}); the requested layer pattern {pattern!r} has {len(pattern)}")
    wrong = [i for i, m in enumerate(pattern) if m != ATTENTION and rnn_pattern[i] != m]
    if wrong:
        i = wrong[0]
        raise checkpoint.CheckpointError(
            f"the requested layer pattern {pattern!r} needs a {MIXER_NAMES[pattern[i]]} ('{pattern[i]}') mixer at "
            f"layer {i}, but the align checkpoint {rnn_path} has layer pattern {rnn_pattern!r} "
            f"({MIXER_NAMES[rnn_pattern[i]]} there); align with the matching --rnn-mixer, or pass a --layer-pattern / "
            f"--rnn-mixer that uses the checkpoint's mixers")


def freeze_all_but_mixers(model, rnn_only: bool = True) -> list:
    """Freezes everything but the token mixers, of the RNN layers only (stage 1, with their attention twins) or
    of every layer (--train-only-mixers); returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for layer in model.decoder.layers:
        mixers = [layer.self_attention] if not rnn_only or isinstance(layer.self_attention, RNNMixer) else []
        if hasattr(layer, "attention_twin"):
            mixers.append(layer.attention_twin)
        for mixer in mixers:
            for p in mixer.parameters():
                p.requires_grad_(True)
                params.append(p)
    return params
