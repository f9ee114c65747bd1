"""CPU stand-ins for the few CUDA calls megatron-core makes unconditionally.

megatron-core 0.16 calls `torch.cuda.synchronize()` and allocates small bookkeeping tensors on
`torch.cuda.current_device()` inside dist_checkpointing and its schedules, even for CPU tensors.
On a machine without CUDA (CI, laptops, the embedded demo) those calls become no-ops / the CPU, so
the same code paths run under gloo. Installed only when CUDA is absent; GPU runs are untouched.
"""

import torch

_installed = False


def install() -> None:
    global _installed
    if _installed or torch.cuda.is_available():
        return
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.set_device = lambda *args, **kwargs: None
    _installed = True
