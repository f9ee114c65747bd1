"""Layer patterns, one letter per layer: "A" softmax attention, "L" Lightning, "D" Gated DeltaNet.

Plain Python (no torch), so tools/estimate_memory.py can use it on any machine.
"""

ATTENTION, LIGHTNING, GATED_DELTA = "A", "L", "D"
# --rnn-mixer: the letter the HALO stages write where they make a layer an RNN mixer
RNN_MIXERS = {"lightning": LIGHTNING, "gated_deltanet": GATED_DELTA}


def pattern_with_attention(num_layers: int, attention_layers, rnn: str = LIGHTNING) -> str:
    return "".join(ATTENTION if i in attention_layers else rnn for i in range(num_layers))


def default_num_attention_layers(num_layers: int) -> int:
    """1/8 of the layers (the paper's ratio), at least one."""
    return max(1, round(num_layers / 8))


def evenly_spaced(num_layers: int, num_attention: int, rnn: str = LIGHTNING, centred: bool = False) -> str:
    """`num_attention` attention layers, one per equal group of layers: each group's last layer (so the
    model's last layer is attention), or with `centred` the group's middle layer."""
    if not 0 <= num_attention <= num_layers:
        raise ValueError(f"--num-attention-layers {num_attention} is outside 0..{num_layers}")
    k = num_attention
    if centred:
        chosen = {min(num_layers - 1, int((i + 0.5) * num_layers / k)) for i in range(k)}
    else:
        chosen = {int((i + 1) * num_layers / k) - 1 for i in range(k)}
    return pattern_with_attention(num_layers, chosen, rnn)
