"""megatron-hypenet: HALO distillation of Qwen3 Transformers into HypeNet hybrids on megatron-core."""

import warnings

# megatron-core warns on import when the optional accelerators are absent; the local specs are supported.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")

__version__ = "0.1.0"
