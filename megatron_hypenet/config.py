"""HypeNetConfig: a megatron-core TransformerConfig with the per-layer mixer pattern, the RNN-mixer
(Lightning Attention, Gated DeltaNet) options and the HyPE options (see docs/architecture.md)."""

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from .files import replaced_atomically
from .patterns import ATTENTION, GATED_DELTA, LIGHTNING, RNN_MIXERS  # noqa: F401  (re-exported to the stages)

MIXER_NAMES = {ATTENTION: "softmax attention", LIGHTNING: "Lightning Attention", GATED_DELTA: "Gated DeltaNet"}
LIGHTNING_SCALES = ("sqrt", "linear", "none")
# The decoder layer's token-mixer children: its own mixer, and in align the attention twin beside it (model.py).
# The student init, the align loss and the optimizer's lr multiples (by parameter name) find the mixers by these
# names; halo/init.freeze_all_but_mixers reaches the same two attributes directly (a test checks they agree).
MIXER_ATTRIBUTES = ("self_attention", "attention_twin")
# Selective recompute targets our layers support: "core_attn" is each mixer's core (layers._Mixer.core),
# "mlp" megatron-core's dense MLP.
RECOMPUTE_MODULES = ("core_attn", "mlp")

# HypeNet fields, shared one to one with the exported HF config.json.
HYPENET_FIELDS = (
    "layer_pattern",
    "attention_rope",
    "attention_query_scale_base",
    "lightning_rope",
    "lightning_num_heads",
    "lightning_head_dim",
    "lightning_qk_norm",
    "lightning_output_gate",
    "lightning_output_norm",
    "lightning_output_norm_per_head",
    "lightning_short_conv",
    "lightning_conv_size",
    "lightning_scale",
    "rope_theta",
)


@dataclass
class HypeNetConfig(TransformerConfig):
    layer_pattern: Optional[str] = None
    """One character per layer: "A" softmax attention, "L" Lightning Attention, "D" Gated DeltaNet.
    None = all "A". The lightning_* options below configure both RNN mixers ("L" and "D")."""

    attention_rope: bool = False
    """RoPE in attention layers. HyPE uses NoPE there; the Qwen3 teacher uses RoPE."""

    attention_query_scale_base: Optional[float] = 256.0
    """HyPE: attention queries are scaled by log(pos + a) / log(a). None disables it."""

    lightning_rope: bool = True
    lightning_num_heads: Optional[int] = None
    lightning_head_dim: Optional[int] = None
    lightning_qk_norm: bool = True
    lightning_output_gate: bool = True
    lightning_output_norm: bool = True
    lightning_output_norm_per_head: bool = False
    """The output RMSNorm normalises each head on its own instead of the concatenated heads (the paper's).
    A head's state sums about 1/(1 - exp(-m_h)) terms, so over all heads the slow decays dominate the norm and
    the fast heads' outputs shrink; per head, each keeps a softmax head's unit scale (RetNet's GroupNorm)."""
    lightning_short_conv: bool = False
    lightning_conv_size: int = 4
    lightning_scale: str = "sqrt"

    rope_theta: float = 1_000_000.0

    attention_twins: bool = False
    """Align only (halo/stages.py): every layer also holds an `attention_twin`, a softmax attention mixer of
    this config's kind (HyPE unless attention_rope), aligned to the teacher's attention beside the RNN twin.
    Distill starts its attention layers from them instead of from the teacher's weights, which were trained
    with RoPE: a NoPE layer that starts from those unaligned is left to distill to fix."""

    def __post_init__(self):
        super().__post_init__()
        if self.layer_pattern is None:
            self.layer_pattern = ATTENTION * self.num_layers
        if len(self.layer_pattern) != self.num_layers:
            raise ValueError(
                f"layer_pattern has {len(self.layer_pattern)} characters but the model has "
                f"{self.num_layers} layers: give one character ('A', 'L' or 'D') per layer, e.g. "
                f"--layer-pattern {'A' + 'L' * (self.num_layers - 1)}"
            )
        bad = set(self.layer_pattern) - set(MIXER_NAMES)
        if bad:
            raise ValueError(f"layer_pattern may only contain 'A' and 'L'/'D' (softmax attention and the RNN "
                             f"mixers Lightning / Gated DeltaNet); found {sorted(bad)} in {self.layer_pattern!r}")
        if self.lightning_num_heads is None:
            self.lightning_num_heads = self.num_attention_heads
        if self.lightning_head_dim is None:
            self.lightning_head_dim = self.kv_channels
        if self.lightning_scale not in LIGHTNING_SCALES:
            raise ValueError(f"lightning_scale must be one of {LIGHTNING_SCALES}, got {self.lightning_scale!r}")
        tp = self.tensor_model_parallel_size
        if self.lightning_num_heads % tp:
            raise ValueError(f"lightning_num_heads={self.lightning_num_heads} is not divisible by tensor parallel size {tp}")
        if self.recompute_granularity == "selective" and set(self.recompute_modules) - set(RECOMPUTE_MODULES):
            raise ValueError(f"--recompute-modules {self.recompute_modules}: HypeNet layers support selective "
                             f"recompute of {list(RECOMPUTE_MODULES)} only")
        if self.attention_query_scale_base is not None and self.attention_query_scale_base <= 1:
            raise ValueError(f"attention_query_scale_base must be > 1 (log(a) divides), got {self.attention_query_scale_base}")

    @property
    def is_teacher(self) -> bool:
        """True when the stack is exactly Qwen3: all attention, RoPE, no HyPE scale."""
        return set(self.layer_pattern) == {ATTENTION} and self.attention_rope and self.attention_query_scale_base is None

    def hypenet_fields(self) -> dict:
        return {name: getattr(self, name) for name in HYPENET_FIELDS}


def teacher_fields(num_layers: int) -> dict:
    """The HypeNet settings under which the stack is the Qwen3 teacher."""
    return dict(layer_pattern=ATTENTION * num_layers, attention_rope=True, attention_query_scale_base=None)


def config_from_hf(hf: dict, **overrides) -> HypeNetConfig:
    """Builds a HypeNetConfig from a Qwen3 (or HypeNet) HF config.json dict.

    A Qwen3 config gives the teacher stack; HypeNet fields in `hf` or `overrides` turn it into a student.
    """
    model_type = hf.get("model_type")
    if model_type not in ("qwen3", "hypenet"):
        raise ValueError(f"expected a Qwen3 or HypeNet config.json, got model_type={model_type!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"only SwiGLU (hidden_act='silu') Qwen3 models are supported, got {hf.get('hidden_act')!r}")
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen3 sliding-window attention is not supported; convert a model with use_sliding_window=false")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not supported; convert a model with plain RoPE")
    theta = hf.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
    n_layers = hf["num_hidden_layers"]
    fields = teacher_fields(n_layers) if model_type == "qwen3" else {k: hf[k] for k in HYPENET_FIELDS if k in hf}
    fields["rope_theta"] = float(theta)
    fields.update(overrides)
    base = dict(
        num_layers=n_layers,
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        kv_channels=hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]),
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
    )
    return make_config(**{**base, **fields})


# Settings every HypeNet/Qwen3 stack shares; parallel and precision settings come from the caller.
TRAINING_DEFAULTS = dict(
    normalization="RMSNorm",
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
    add_qkv_bias=False,
    qk_layernorm=True,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
    use_cpu_initialization=True,
    init_method_std=0.02,
)


def make_config(**kwargs) -> HypeNetConfig:
    merged = dict(TRAINING_DEFAULTS)
    merged.update(kwargs)
    if merged.get("params_dtype") is None:
        merged["params_dtype"] = torch.bfloat16 if merged.get("bf16") else torch.float32
    return HypeNetConfig(**merged)


def replace(config: HypeNetConfig, **changes) -> HypeNetConfig:
    """A copy of `config` with `changes` applied (re-validated)."""
    return dataclasses.replace(config, **changes)


# ---- the model description stored beside every checkpoint -------------------------------------------

MODEL_FILE = "hypenet_model.json"
MODEL_KEYS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "layernorm_epsilon",
) + HYPENET_FIELDS + ("attention_twins",)  # (twins exist only in align checkpoints: not an HF field)


def model_description(config: HypeNetConfig, vocab_size: int, tie_word_embeddings: bool, hf_extra: dict) -> dict:
    """What a checkpoint needs to be rebuilt and exported: architecture, vocabulary, HF token ids."""
    desc = {key: getattr(config, key) for key in MODEL_KEYS}
    desc.update(vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings, hf_extra=hf_extra)
    return desc


def write_model_description(directory: str, desc: dict) -> None:
    with replaced_atomically(os.path.join(directory, MODEL_FILE)) as f:
        json.dump(desc, f, indent=2)


# Fields added after checkpoints were first written: a description without one was saved with this value.
ADDED_KEYS = {"lightning_output_norm_per_head": False, "attention_twins": False}


def read_model_description(directory: str) -> dict:
    path = os.path.join(directory, MODEL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: {directory} is not a megatron-hypenet checkpoint. Create one with "
            f"`python tools/convert_hf_to_mcore.py --hf-dir <qwen3 folder> --out {directory}`."
        )
    with open(path) as f:
        desc = json.load(f)
    for key, value in ADDED_KEYS.items():
        desc.setdefault(key, value)
    return desc


def config_from_description(desc: dict, **overrides) -> HypeNetConfig:
    fields = {key: desc[key] for key in MODEL_KEYS}
    fields.update(overrides)
    return make_config(**fields)
