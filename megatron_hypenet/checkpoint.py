"""Sharded checkpoints (megatron-core dist_checkpointing), Megatron-LM directory layout:

    <dir>/latest_checkpointed_iteration.txt      the newest *complete* iteration
    <dir>/iter_0000100/                          dist_checkpointing files + hypenet_model.json

A checkpoint is written to `iter_XXXXXXX.tmp` and renamed only once every rank has finished, and
the tracker file is replaced atomically after that: a job killed mid-save leaves the previous
checkpoint as the latest (the next run deletes the stale `.tmp`, see `remove_partial_saves`).
dist_checkpointing stores global tensors, so a checkpoint written at one TP/PP layout loads at any other.
"""

import os
import shutil
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from .config import MODEL_FILE, read_model_description, write_model_description

TRACKER = "latest_checkpointed_iteration.txt"
TEST_DIE_IN_SAVE = "HYPENET_TEST_DIE_IN_SAVE"  # test hook: =N exits mid-save of iteration N (before the rename)


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path} is corrupt (holds {text!r}, expected an iteration number); "
                              f"point it at one of the iter_* folders in {root} or delete it") from None


def complete_iterations(root: str) -> list:
    """Iterations in `root` whose checkpoint was fully written (renamed from .tmp, with metadata.json)."""
    if not os.path.isdir(root):
        return []
    its = [int(d[5:]) for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit()]
    return sorted(i for i in its if os.path.exists(os.path.join(iteration_dir(root, i), "metadata.json")))


def remove_partial_saves(root: str) -> list:
    """Deletes what an interrupted save left (`iter_*.tmp`, a tracker `.tmp`); never a complete checkpoint."""
    removed = []
    if _rank0() and os.path.isdir(root):
        for d in sorted(os.listdir(root)):
            if d.startswith("iter_") and d.endswith(".tmp") or d == TRACKER + ".tmp":
                path = os.path.join(root, d)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                removed.append(path)
    _barrier()
    return removed


def _unreadable(path: str, error: BaseException) -> CheckpointError:
    if isinstance(error, CheckpointException) and error.failures:  # the first rank's own exception
        error = next(iter(error.failures.values()))
    detail = (f"{type(error).__name__}: {error}".splitlines() or [""])[0].rstrip(": ")
    root = os.path.dirname(os.path.normpath(path))
    earlier = [i for i in complete_iterations(root) if iteration_dir(root, i) != os.path.normpath(path)]
    fix = (f"resume from an earlier one with --ckpt-step {earlier[-1]}" if earlier
           else "re-create it, or start over in a new --save folder")
    return CheckpointError(f"could not read checkpoint {path} ({detail}). It is truncated or "
                           f"corrupt; {fix}. Nothing on disk was changed")


def resolve(root: str, iteration: Optional[int] = None) -> str:
    """The checkpoint folder to load: `iteration`, else the tracker's, else `root` itself if it is one."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"checkpoint folder {root} does not exist")
    iteration = latest_iteration(root) if iteration is None else iteration
    path = root if iteration is None else iteration_dir(root, iteration)
    if not os.path.exists(os.path.join(path, "metadata.json")):
        raise CheckpointError(
            f"{path} is not a complete dist_checkpointing checkpoint (no metadata.json): it may be a "
            f"partial save; load an earlier iteration with --ckpt-step or re-create it"
        )
    return path


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict with one key per layer (HypeNet layers differ in shape)."""
    sd = model.sharded_state_dict(metadata={"non_homogeneous_layers": True})
    return {k: v for k, v in sd.items() if not k.endswith("_extra_state")}


def _init_optimizer_state(optimizer) -> None:
    """A fresh AdamW has no state tensors to load into: create them (zeros, overwritten by the load)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def optimizer_sharded_state_dict(optimizer, model_sd: dict) -> dict:
    """A torch optimizer's state as ShardedTensors that follow the model's sharding (any layout)."""
    _init_optimizer_state(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    id_to_sharded = get_param_id_to_sharded_param_map(model_sd, iter(params))
    state = optimizer.state_dict()
    # AdamW steps all parameters together: the scalar step travels in the param groups, not as a tensor.
    steps = {float(s["step"]) for s in state["state"].values()}
    for group in state["param_groups"]:
        group["step"] = max(steps) if steps else 0.0
    optim_state_to_sharding_state(state, id_to_sharded, exclude_keys=("step",))
    return state


def _restore_steps(state: dict) -> dict:
    for group in state["param_groups"]:
        for pid in group["params"]:
            state["state"][pid]["step"] = torch.tensor(group["step"], dtype=torch.float32)
    return state


def _save_dir(sharded_sd: dict, final_dir: str, desc: dict) -> None:
    tmp = final_dir + ".tmp"
    if _rank0():
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # leftovers of an interrupted save
        os.makedirs(tmp)
    _barrier()
    strategy = get_default_save_sharded_strategy()
    dist_checkpointing.save(sharded_sd, tmp, sharded_strategy=strategy)
    if os.environ.get(TEST_DIE_IN_SAVE) and final_dir == iteration_dir(os.path.dirname(final_dir),
                                                                        int(os.environ[TEST_DIE_IN_SAVE])):
        os._exit(1)  # simulates a job killed after the tensors are written but before the rename
    _barrier()
    if _rank0():
        write_model_description(tmp, desc)
        if os.path.exists(final_dir):
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    _barrier()


def _write_tracker(root: str, iteration: int) -> None:
    if _rank0():
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, TRACKER))
    _barrier()


def save_checkpoint(root: str, iteration: int, model, desc: dict, optimizer=None, state: Optional[dict] = None,
                    keep_last: Optional[int] = None) -> str:
    """Saves model (+ optimizer, + plain `state`: scheduler, RNG, data position, HALO stage) atomically."""
    model_sd = model_sharded_state_dict(model)
    sharded = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd)
    if state is not None:
        sharded["state"] = state
    path = iteration_dir(root, iteration)
    _save_dir(sharded, path, desc)
    _write_tracker(root, iteration)
    if keep_last and _rank0():
        _prune(root, keep_last)
    _barrier()
    return path


def _prune(root: str, keep_last: int) -> None:
    iters = sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit())
    for it in iters[:-keep_last]:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


def check_compatible(path: str, desc: dict) -> None:
    """Refuses a checkpoint made for another architecture before any tensor is read."""
    try:
        saved = read_model_description(path)
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from e
    for key in ("layer_pattern", "vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                "num_query_groups", "kv_channels", "ffn_hidden_size", "tie_word_embeddings",
                "lightning_num_heads", "lightning_head_dim", "lightning_short_conv",
                "lightning_output_gate", "lightning_output_norm", "lightning_qk_norm"):
        if saved.get(key) != desc.get(key):
            raise CheckpointError(
                f"checkpoint {path} was saved with {key}={saved.get(key)!r} but this model has "
                f"{key}={desc.get(key)!r}; load a checkpoint of the same model, or convert/initialise it "
                f"for this one (tools/convert_hf_to_mcore.py, or the HALO stage that creates it); when "
                f"resuming from --save, give this run a new --save folder"
            )


def load_checkpoint(root: str, model, desc: dict, optimizer=None, iteration: Optional[int] = None,
                    load_state: bool = True) -> Tuple[str, Optional[dict]]:
    """Loads into `model` (any TP/PP layout) and optionally `optimizer`; returns (path, plain state)."""
    path = resolve(root, iteration)
    check_compatible(path, desc)
    model_sd = model_sharded_state_dict(model)
    sharded = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd)
    try:  # read all of it before loading into the model and optimizer
        loaded = dist_checkpointing.load(sharded, path)
        state = dist_checkpointing.load_common_state_dict(path).get("state") if load_state else None
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - rewrap with the path; the original stays chained
        raise _unreadable(path, e) from e
    model.load_state_dict(loaded["model"], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(_restore_steps(loaded["optimizer"]))
    return path, state


# ---- layout-free access, for the converters ------------------------------------------------------

def save_global_tensors(path: str, tensors: Dict[str, torch.Tensor], desc: dict) -> None:
    """Writes whole (global) tensors as a dist_checkpointing checkpoint; each rank passes its own subset."""
    sharded = {"model": {key: ShardedTensor.from_rank_offsets(key, t, replica_id=0) for key, t in tensors.items()}}
    _save_dir(sharded, path, desc)


def tensor_metadata(path: str) -> dict:
    """Global shapes and dtypes of the model tensors in a checkpoint (no tensor data is read)."""
    return {k: v for k, v in dist_checkpointing.load_tensors_metadata(path).items() if not k.startswith("optimizer")}


def load_global_tensor(path: str, key: str, metadata: dict) -> torch.Tensor:
    """One global tensor from a checkpoint, whatever TP/PP layout wrote it."""
    if key not in metadata:
        raise CheckpointError(f"{path} has no tensor {key!r}; it was written for another model (see {MODEL_FILE} there)")
    meta = metadata[key]
    target = torch.empty(meta.global_shape, dtype=meta.dtype)
    return dist_checkpointing.load({key: ShardedTensor.from_rank_offsets(key, target, replica_id=0)}, path)[key]
