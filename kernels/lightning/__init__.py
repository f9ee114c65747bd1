"""Lightning Attention: one entry point that picks the Triton kernel on GPU and the PyTorch
reference elsewhere (see ``naive.py`` for the math)."""

import torch

from .naive import (
    lightning_attention_chunk_ref,
    lightning_attention_recurrent_ref,
    lightning_attention_step_ref,
    lightning_slopes,
)


def _triton_ok(x):
    if not x.is_cuda:
        return False
    try:
        from . import chunk  # noqa: F401  (import fails where Triton is missing)
    except ImportError:
        return False
    return True


def lightning_attention(q, k, v, slopes, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None):
    """(o, final_state) for q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``; see ``naive.py``."""
    if _triton_ok(q):
        return _chunk_triton(q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens)
    return lightning_attention_chunk_ref(q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens)


@torch.compiler.disable
def _chunk_triton(q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens):
    """The Triton kernel, opaque to torch.compile: inductor fails to re-compile it (triton 3.6, H200), so a
    compiled layer (the trainer's --compile) breaks its graph here and compiles the code around it."""
    from .chunk import chunk_lightning_attention

    return chunk_lightning_attention(q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens)


def lightning_attention_step(q, k, v, slopes, state, scale=None):
    """One decode token for a batch: q, k ``[B, H, Dk]``, v ``[B, H, Dv]``, state ``[B, H, Dk, Dv]``."""
    if _triton_ok(q):
        from .fused_recurrent import fused_recurrent_lightning_step

        return fused_recurrent_lightning_step(q, k, v, slopes, state, scale)
    return lightning_attention_step_ref(q, k, v, slopes, state, scale)
