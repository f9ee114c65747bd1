"""Fast kernels for HypeNet's RNN mixers, each beside the readable reference it is tested against."""

from .gated_delta import gated_delta_rule, gated_delta_rule_step
from .lightning import lightning_attention, lightning_attention_step, lightning_slopes

__all__ = ["gated_delta_rule", "gated_delta_rule_step", "lightning_attention", "lightning_attention_step",
           "lightning_slopes"]
