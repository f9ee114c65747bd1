"""CPU stand-ins for the few CUDA calls megatron-core makes unconditionally.

megatron-core 0.16 calls `torch.cuda.synchronize()` and allocates small bookkeeping tensors on
`torch.cuda.current_device()` inside dist_checkpointing and its schedules, even for CPU tensors.
On a machine without CUDA (CI, laptops, the embedded demo) those calls become no-ops / the CPU, so
the same code paths run under gloo. Installed only when CUDA is absent; GPU runs are untouched.
"""

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def install() -> None:
    global _installed
    if _installed or torch.cuda.is_available():
        return
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.set_device = lambda *args, **kwargs: None
    # Sequence parallelism and activation recomputation fork/save megatron-core's *CUDA* RNG states.
    # CPU ops never draw from them, so on CPU there is nothing to fork or restore (the CPU RNG is
    # still saved and restored by megatron-core's checkpoint function).
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None
    mp_random.CudaRNGStatesTracker.fork = lambda self, *args, **kwargs: contextlib.nullcontext()
    # A tied embedding's last-stage copy is moved with .cuda() before its first all-reduce (PP > 1).
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # The pipeline schedules count tokens in a tensor made with device="cuda" (not current_device()).
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchOnCpu()
    _installed = True


class _TorchOnCpu:
    """`torch` as megatron-core's schedules module sees it: tensors it creates on "cuda" go to the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


class _CudaTensorsOnCpu(TorchFunctionMode):
    """megatron-core's DistributedDataParallel and optimizers check parameters' `.type()` against
    "torch.cuda.FloatTensor" and make bookkeeping tensors on "cuda": inside this mode CPU tensors
    report CUDA type names and "cuda" factory calls make CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        device = kwargs.get("device")
        if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def megatron_cuda_calls():
    """Context for megatron-core's DDP / distributed-optimizer calls: on a machine without CUDA they
    run on CPU tensors (gloo); with CUDA it does nothing."""
    return contextlib.nullcontext() if torch.cuda.is_available() else _CudaTensorsOnCpu()
