"""Process-group set-up: torchrun (NCCL on GPUs, gloo on CPUs) and megatron-core model parallelism.

Model math never reads the parallel state; only this module, the trainer and the checkpoint code do.
"""

import contextlib
import os
import random
import socket
import warnings

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from . import cpu_compat

# Multicast NVLink can take a shared host's GPUs down; keep it off in every process we start.
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# What torchrun sets (and ensure_process_group for a plain `python` run): a child process that should make its own
# group must not inherit them
PROCESS_GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_plain_run = False  # ensure_process_group set PROCESS_GROUP_ENV itself: this process was not launched by torchrun


def ensure_process_group() -> None:
    """Joins torchrun's process group, or makes a one-process one (dist_checkpointing needs a group)."""
    for key, value in NVLS_OFF.items():
        os.environ.setdefault(key, value)
    cpu_compat.install()
    if dist.is_initialized():
        return
    global _plain_run
    if "RANK" not in os.environ:  # a plain single-process run
        # torchrun's variables, for libraries that read them (DeepSpeed looks for MPI without them)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        _plain_run = True
    # A plain run's group meets in an in-process store, not a TCP one on that port: processes that start together
    # (a recipe's ablation workers, the tests' trainers) could take each other's port before binding it
    rendezvous = dict(store=dist.HashStore(), rank=0, world_size=1) if _plain_run else {}
    if torch.cuda.is_available():
        # The GPU is set, not bound (init_process_group's device_id): a bound group, and every group made after it
        # (megatron-core's ~20 included), sets up its NCCL communicator at once instead of at its first collective.
        # Run 23's nine one-GPU trainers sharing an H100 failed in those set-ups ("Failed to CUDA calloc"), which
        # the lazy groups of runs 14-22 never reached. `barrier` names the device instead.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # megatron-core's barriers (dataset builds, dist_checkpointing saves) name no device, and torch then warns on
        # each that it uses the current one: the one set just above, which is what we want, so the warning is noise
        warnings.filterwarnings("ignore", message=r"barrier\(\): using the device under current context")
        dist.init_process_group("nccl", **rendezvous)
    else:
        dist.init_process_group("gloo", **rendezvous)


def barrier() -> None:
    """A barrier of the whole group on this process's GPU: unbound, NCCL would otherwise guess the device from the
    global rank (and warn that this can hang where ranks do not map one to one onto a node's GPUs)."""
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextlib.contextmanager
def process_group():
    """`ensure_process_group` for one piece of work (also a decorator): a group made here is destroyed on leaving,
    as NCCL warns at exit of one left behind; a group the caller had stays."""
    made = not dist.is_initialized()
    ensure_process_group()
    try:
        yield
    finally:
        if made:
            destroy()


def initialize(tp: int = 1, pp: int = 1, cp: int = 1, vpp=None, seed: int = 1234) -> None:
    """Joins (or creates, for a plain `python` run) the process group and builds the TP/PP/CP/DP groups."""
    ensure_process_group()
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(
            f"world size {world} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}; launch "
            f"a multiple of {tp * pp * cp} processes (torchrun --nproc-per-node ...) or change the layout"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
    )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Same seed on TP ranks (replicated init), different per PP stage, as Megatron does."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def context_parallel_chunk(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's consecutive chunk of the sequence (dim) under context parallelism."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return x
    if x.shape[dim] % cp:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by context parallel size {cp}")
    return x.chunk(cp, dim=dim)[parallel_state.get_context_parallel_rank()]


def local_batch(batch: dict, device) -> dict:
    """A data-loader batch on `device`, cut to this rank's sequence chunk ([b, s] tensors)."""
    return {k: context_parallel_chunk(v.to(device)) for k, v in batch.items()}


def _group_mean(value: float, group) -> float:
    if group.size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t, group=group)
    return float(t.item()) / group.size()


def context_parallel_mean(value: float) -> float:
    """Each CP rank's loss is the mean over its equal-sized chunk; the sequence's loss is their mean."""
    return _group_mean(value, parallel_state.get_context_parallel_group())


def data_parallel_mean(value: float) -> float:
    """A step's loss over the global batch: the mean of every DP x CP rank's loss (each a mean over an
    equal share of the tokens: its micro-batches, its sequence chunk)."""
    return _group_mean(value, parallel_state.get_data_parallel_group(with_context_parallel=True))
