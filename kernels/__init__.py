"""Fast kernels for HypeNet's RNN mixers, each beside the readable reference it is tested against."""

from .lightning import lightning_attention, lightning_attention_step, lightning_slopes

__all__ = ["lightning_attention", "lightning_attention_step", "lightning_slopes"]
