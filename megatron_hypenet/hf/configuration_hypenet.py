"""HypeNet configuration for the standalone Hugging Face implementation (docs/architecture.md).

This file is copied verbatim into every exported folder, so it imports nothing but `transformers`.
"""

from transformers import PretrainedConfig

ATTENTION, LIGHTNING, GATED_DELTA = "A", "L", "D"
RNN_LETTERS = (LIGHTNING, GATED_DELTA)
LIGHTNING_SCALES = ("sqrt", "linear", "none")


class HypeNetConfig(PretrainedConfig):
    r"""A Qwen3 decoder whose per-layer token mixer is softmax attention ("A"), Lightning Attention ("L") or
    Gated DeltaNet ("D").

    The Qwen3 fields keep their Qwen3 names and meaning. The HypeNet fields are those of the Megatron
    `HypeNetConfig` (same names, same defaults):

        layer_pattern (`str`, defaults to all "A"): one character per layer, "A", "L" or "D".
        attention_rope (`bool`, defaults to `False`): RoPE in attention layers (the teacher uses it).
        attention_query_scale_base (`float` or `None`, defaults to 256.0): HyPE query scale base `a`;
            queries at position i are scaled by log(i + a) / log(a). `None` disables it.
        The lightning_* fields configure both RNN mixers ("L" and "D").
        lightning_rope (`bool`, defaults to `True`): RoPE in Lightning layers.
        lightning_num_heads / lightning_head_dim (`int`, default to the attention heads / head_dim).
        lightning_qk_norm, lightning_output_gate, lightning_output_norm (`bool`, default to `True`).
        lightning_output_norm_per_head (`bool`, defaults to `False`): the output norm normalises each head
            on its own instead of the concatenated heads.
        lightning_short_conv (`bool`, defaults to `False`), lightning_conv_size (`int`, defaults to 4).
        lightning_scale (`str`, defaults to "sqrt"): "sqrt" (D**-0.5), "linear" (1/D) or "none" (1).

    Inference only:
        prefill_chunk_size (`int` or `None`): process prompts longer than this in chunks that carry the
            cache, bounding the activation memory of a long prefill.
    """

    model_type = "hypenet"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=False,
        rope_theta=None,
        rope_parameters=None,
        layer_pattern=None,
        attention_rope=False,
        attention_query_scale_base=256.0,
        lightning_rope=True,
        lightning_num_heads=None,
        lightning_head_dim=None,
        lightning_qk_norm=True,
        lightning_output_gate=True,
        lightning_output_norm=True,
        lightning_output_norm_per_head=False,
        lightning_short_conv=False,
        lightning_conv_size=4,
        lightning_scale="sqrt",
        prefill_chunk_size=None,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        if head_dim is None:
            head_dim = _divide(hidden_size, num_attention_heads, "hidden_size", "num_attention_heads")
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        # Our RoPE is always the plain one: a float theta. transformers 5 also wants `rope_parameters`,
        # so both are kept and must agree.
        self.rope_theta = float(_rope_theta(rope_theta, rope_parameters))
        self.rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        self.layer_pattern = ATTENTION * num_hidden_layers if layer_pattern is None else layer_pattern
        self.attention_rope = attention_rope
        self.attention_query_scale_base = (
            None if attention_query_scale_base is None else float(attention_query_scale_base)
        )
        self.lightning_rope = lightning_rope
        self.lightning_num_heads = num_attention_heads if lightning_num_heads is None else lightning_num_heads
        self.lightning_head_dim = self.head_dim if lightning_head_dim is None else lightning_head_dim
        self.lightning_qk_norm = lightning_qk_norm
        self.lightning_output_gate = lightning_output_gate
        self.lightning_output_norm = lightning_output_norm
        self.lightning_output_norm_per_head = lightning_output_norm_per_head
        self.lightning_short_conv = lightning_short_conv
        self.lightning_conv_size = lightning_conv_size
        self.lightning_scale = lightning_scale
        self.prefill_chunk_size = prefill_chunk_size
        self._validate_hypenet()
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate_hypenet(self):
        n = self.num_hidden_layers
        if not isinstance(self.layer_pattern, str):
            raise TypeError(
                f"layer_pattern must be a string of 'A'/'L'/'D' characters, got {type(self.layer_pattern).__name__}"
            )
        if len(self.layer_pattern) != n:
            raise ValueError(
                f"layer_pattern {self.layer_pattern!r} has {len(self.layer_pattern)} characters but "
                f"num_hidden_layers={n}: "
                "give one character ('A' softmax attention, 'L' Lightning Attention or 'D' Gated DeltaNet) per layer"
            )
        bad = sorted(set(self.layer_pattern) - {ATTENTION, *RNN_LETTERS})
        if bad:
            raise ValueError(f"layer_pattern may only contain 'A' and 'L'/'D' (attention, Lightning, Gated DeltaNet); "
                             f"found {bad} in {self.layer_pattern!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"HypeNet uses Qwen3's SwiGLU MLP: hidden_act must be 'silu', got {self.hidden_act!r}")
        _divide(self.num_attention_heads, self.num_key_value_heads, "num_attention_heads", "num_key_value_heads")
        for name in ("head_dim", "lightning_num_heads", "lightning_head_dim", "lightning_conv_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.attention_rope and ATTENTION in self.layer_pattern and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.lightning_rope and set(RNN_LETTERS) & set(self.layer_pattern) and self.lightning_head_dim % 2:
            raise ValueError(f"RoPE needs an even lightning_head_dim, got {self.lightning_head_dim}")
        if self.lightning_scale not in LIGHTNING_SCALES:
            raise ValueError(f"lightning_scale must be one of {LIGHTNING_SCALES}, got {self.lightning_scale!r}")
        a = self.attention_query_scale_base
        if a is not None and a <= 1:
            raise ValueError(f"attention_query_scale_base must be > 1 (log(a) divides) or None, got {a}")
        chunk = self.prefill_chunk_size
        if chunk is not None and (not isinstance(chunk, int) or chunk <= 0):
            raise ValueError(f"prefill_chunk_size must be a positive integer or None, got {self.prefill_chunk_size!r}")


def _divide(numerator, denominator, num_name, den_name):
    if denominator <= 0 or numerator % denominator:
        raise ValueError(f"{num_name}={numerator} must be divisible by {den_name}={denominator}")
    return numerator // denominator


def _rope_theta(rope_theta, rope_parameters):
    """The one theta, from `rope_theta` and/or transformers 5's `rope_parameters` (plain RoPE only)."""
    if rope_parameters is None:
        return 1_000_000.0 if rope_theta is None else rope_theta
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"HypeNet supports plain RoPE only; rope_parameters has rope_type={rope_type!r}")
    theta = rope_parameters.get("rope_theta", rope_theta)
    if rope_theta is not None and theta is not None and float(theta) != float(rope_theta):
        raise ValueError(f"rope_theta={rope_theta} disagrees with rope_parameters['rope_theta']={theta}")
    return 1_000_000.0 if theta is None else theta


__all__ = ["HypeNetConfig"]
