"""Sharded checkpoints (megatron-core dist_checkpointing), Megatron-LM directory layout:

    <dir>/latest_checkpointed_iteration.txt      the newest *complete* iteration
    <dir>/iter_0000100/                          dist_checkpointing files + hypenet_model.json

A checkpoint is written to `iter_XXXXXXX.tmp` and `commit`ted (renamed, then the tracker file replaced
atomically) only once every rank has finished writing: a job killed mid-save leaves the previous
checkpoint as the latest (the next run deletes the stale `.tmp`, see `remove_partial_saves`). With
`AsyncSaves` the write runs in the background and the commit happens when a later poll finds it done.
dist_checkpointing stores global tensors, so a checkpoint written at one TP/PP layout loads at any other.
"""

import logging
import os
import shutil
import signal
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from . import parallel
from .config import MODEL_FILE, read_model_description, write_model_description

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
# test hook: =N exits mid-save of iteration N, before the rename (sync: tensors written; async: write in flight)
TEST_DIE_IN_SAVE = "HYPENET_TEST_DIE_IN_SAVE"
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def start_save_helper() -> None:
    """Starts dist_checkpointing's save helper process (a multiprocessing manager holding the write-results
    queue, started once per process by the first save) with the pre-emption signals ignored, which it
    inherits: a signal sent to the whole process group (Slurm does that) then cannot kill it before the
    trainer's final save. Call it before the process's first save."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in PREEMPTION_SIGNALS}
    try:
        from megatron.core.dist_checkpointing.strategies.filesystem_async import _get_write_results_queue

        _get_write_results_queue()
    except ImportError:  # another megatron-core layout: it is then started by the first save
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
        parallel.barrier()


def _rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict with one key per layer (HypeNet layers differ in shape).

    `model` may be a list of (virtual pipeline) chunks: their entries are merged, chunk i's names
    prefixed `chunk{i}/`; what is stored is keyed by the global names inside (global layer numbers).
    """
    merged = {}
    for i, chunk in enumerate(_chunks(model)):
        sd = chunk.sharded_state_dict(metadata={"non_homogeneous_layers": True})
        merged.update({(f"chunk{i}/{k}" if i else k): v for k, v in sd.items() if not k.endswith("_extra_state")})
    return merged


def load_model_state(model, state: dict) -> None:
    """Loads a state dict laid out as `model_sharded_state_dict` makes it (one module or a list of chunks)."""
    for i, chunk in enumerate(_chunks(model)):
        prefix = f"chunk{i}/" if i else ""
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "/" not in k[len(prefix):]}
        chunk.load_state_dict(own, strict=False)


def init_optimizer_state(optimizer) -> None:
    """A fresh torch AdamW or Muon has no state tensors to load into: create them (zeros, overwritten by the load)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                if isinstance(optimizer, torch.optim.Muon):
                    optimizer.state[p] = {"momentum_buffer": torch.zeros_like(p)}
                else:
                    optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                          "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def optimizer_sharded_state_dict(optimizer, model_sd: dict, is_loading: bool = False) -> dict:
    """The optimizer's state as ShardedTensors that follow the model's sharding (any layout); megatron-core's
    distributed optimizer (distributed_optimizer.py) and optimizer.MuonWithAdamW make their own."""
    if hasattr(optimizer, "sharded_state_dict"):
        return optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    return torch_optimizer_sharded_state_dict(optimizer, model_sd)


def torch_optimizer_sharded_state_dict(optimizer: torch.optim.Optimizer, model_sd: dict) -> dict:
    init_optimizer_state(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    id_to_sharded = get_param_id_to_sharded_param_map(model_sd, iter(params))
    state = optimizer.state_dict()
    # AdamW steps all parameters together: the scalar step travels in the param groups, not as a tensor.
    steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
    if steps:
        for group in state["param_groups"]:
            group["step"] = max(steps)
    optim_state_to_sharding_state(state, id_to_sharded, exclude_keys=("step",))
    return state


def restore_steps(state: dict) -> dict:
    """Undoes the scalar step of `torch_optimizer_sharded_state_dict` on a loaded state."""
    for group in state["param_groups"]:
        if "step" in group:
            for pid in group["params"]:
                state["state"][pid]["step"] = torch.tensor(group["step"], dtype=torch.float32)
    return state


def _check_optimizer_state(path: str, sharded_optimizer: dict) -> None:
    """Refuses, before reading, a checkpoint whose optimizer state is of another kind (AdamW vs Muon)."""
    wanted = {t.key for t in nested_values(sharded_optimizer) if isinstance(t, ShardedTensor)}
    try:
        saved = set(dist_checkpointing.load_tensors_metadata(path))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - rewrap with the path
        raise _unreadable(path, e) from e
    missing = sorted(wanted - saved)
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no optimizer state {missing[0]!r} (and {len(missing) - 1} more): it was saved "
            f"by another optimizer (--optimizer adamw / muon) or without one. Resume with the --optimizer it was "
            f"saved with, or start this run in a new --save folder (--load takes its weights, not its optimizer)")


def _write(sharded_sd: dict, root: str, iteration: int, async_save: bool = False) -> Optional[AsyncRequest]:
    """Writes into `iter_N.tmp`; with `async_save` returns the request that writes it in the background."""
    tmp = iteration_dir(root, iteration) + ".tmp"
    if _rank0():
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # leftovers of an interrupted save
        os.makedirs(tmp)
    _barrier()
    return dist_checkpointing.save(sharded_sd, tmp, sharded_strategy=get_default_save_sharded_strategy(),
                                   async_sharded_save=async_save)


def _test_die_in_save(iteration: int) -> None:
    if os.environ.get(TEST_DIE_IN_SAVE) == str(iteration):
        os._exit(1)  # simulates a job killed before the rename


def commit(root: str, iteration: int, desc: dict, keep_last: Optional[int] = None) -> str:
    """Makes the fully written `iter_N.tmp` the latest checkpoint: rename, replace the tracker, prune.

    Collective; call it only once every rank's write has finished (a sync save, or an async save's
    finalize step), so a partial write is never taken as the latest.
    """
    path = iteration_dir(root, iteration)
    _barrier()
    if _rank0():
        write_model_description(path + ".tmp", desc)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(path + ".tmp", path)
        tracker = os.path.join(root, TRACKER)
        with open(tracker + ".tmp", "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker + ".tmp", tracker)
        if keep_last:
            _prune(root, keep_last)
    _barrier()
    return path


class AsyncSaves:
    """Checkpoints being written in the background (`--async-save`); each is committed once written.

    megatron-core's AsyncCallsQueue forks one writer process per save. What is written is fixed when
    `save_checkpoint` returns: GPU tensors are copied to host memory before the fork (the request's
    preload_fn), and the fork gives the writer a copy-on-write image of host memory, so later optimizer
    steps cannot reach it. (megatron's persistent worker is not used: it is a spawned process that
    receives CPU tensors through shared memory, i.e. the live ones, and it needs CUDA.) `poll` and `wait`
    are collective: every rank calls them at the same points, as megatron's `maybe_finalize_async_save`.
    """

    def __init__(self):
        self._queue = AsyncCallsQueue(persistent=False)

    def schedule(self, request: AsyncRequest) -> None:
        self._queue.schedule_async_request(request)

    def poll(self) -> int:
        """Commits the saves that every rank has finished writing, without waiting; returns how many."""
        return len(self._queue.maybe_finalize_async_calls(blocking=False))

    def wait(self) -> int:
        """Waits for every pending save and commits it (before exit: the last save must be complete)."""
        return len(self._queue.maybe_finalize_async_calls(blocking=True))

    def __len__(self) -> int:
        return self._queue.get_num_unfinalized_calls()


def _save(sharded_sd: dict, root: str, iteration: int, desc: dict, keep_last: Optional[int] = None,
          async_saves: Optional[AsyncSaves] = None) -> str:
    if async_saves is None:
        _write(sharded_sd, root, iteration)
        _test_die_in_save(iteration)
        return commit(root, iteration, desc, keep_last)
    if len(async_saves):  # one save in flight at most: bounds host memory and what a kill can lose
        if _rank0():
            log.warning("checkpoint %d waits for the previous one to be written; a longer --save-interval "
                        "avoids the stall", iteration)
        async_saves.wait()
    request = _write(sharded_sd, root, iteration, async_save=True)
    request.add_finalize_fn(lambda: commit(root, iteration, desc, keep_last))  # after megatron's own finalize
    async_saves.schedule(request)
    if _rank0():
        log.info("writing checkpoint %d in the background (--async-save)", iteration)
    _test_die_in_save(iteration)
    return iteration_dir(root, iteration)


def save_checkpoint(root: str, iteration: int, model, desc: dict, optimizer=None, state: Optional[dict] = None,
                    keep_last: Optional[int] = None, async_saves: Optional[AsyncSaves] = None) -> str:
    """Saves model (+ optimizer, + plain `state`: scheduler, RNG, data position, HALO stage) atomically.

    With `async_saves` the tensors are written in the background: the returned folder exists (and the
    tracker names it) only after a later `async_saves.poll()` / `wait()` commits it.
    """
    model_sd = model_sharded_state_dict(model)
    sharded = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd)
    if state is not None:
        sharded["state"] = state
    return _save(sharded, root, iteration, desc, keep_last, async_saves)


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
                "lightning_output_gate", "lightning_output_norm", "lightning_output_norm_per_head",
                "lightning_qk_norm", "attention_twins"):
        if saved.get(key) != desc.get(key):
            raise CheckpointError(
                f"checkpoint {path} was saved with {key}={saved.get(key)!r} but this model has "
                f"{key}={desc.get(key)!r}; load a checkpoint of the same model, or convert/initialise it "
                f"for this one (tools/convert_hf_to_mcore.py, or the HALO stage that creates it); when "
                f"resuming from --save, give this run a new --save folder"
            )


def _lr_mults(state) -> set:
    """The lr_mult of every parameter group in a loaded optimizer state (Muon's parts and megatron-core's chained
    optimizers nest theirs); 1 where a group has none (checkpoints from before --non-mixer-lr-mult)."""
    if isinstance(state, list):
        return set().union(*(_lr_mults(v) for v in state))
    if not isinstance(state, dict):
        return set()
    groups = state.get("param_groups")
    found = {float(g.get("lr_mult", 1.0)) for g in groups if isinstance(g, dict)} if isinstance(groups, list) else set()
    return found.union(*(_lr_mults(v) for k, v in state.items() if k != "param_groups"))


def _check_lr_mults(path: str, loaded: dict, optimizer) -> None:
    """Refuses to resume with another --non-mixer-lr-mult: torch would keep the saved groups' lr_mult silently."""
    saved, wanted = _lr_mults(loaded), {float(g.get("lr_mult", 1.0)) for g in optimizer.param_groups}
    if saved and saved != wanted:
        def flag(mults):
            other = sorted(mults - {1.0})
            return f"--non-mixer-lr-mult {other[0]:g}" if other else "no --non-mixer-lr-mult"

        raise CheckpointError(f"checkpoint {path} was trained with {flag(saved)}, this run asks for {flag(wanted)}: "
                              f"resume with the same flag, or give this run a new --save folder")


def load_checkpoint(root: str, model, desc: dict, optimizer=None, iteration: Optional[int] = None,
                    load_state: bool = True) -> Tuple[str, Optional[dict]]:
    """Loads into `model` (any TP/PP layout) and optionally `optimizer`; returns (path, plain state)."""
    path = resolve(root, iteration)
    check_compatible(path, desc)
    model_sd = model_sharded_state_dict(model)
    sharded = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)
        _check_optimizer_state(path, sharded["optimizer"])
    try:  # read all of it before loading into the model and optimizer
        common = dist_checkpointing.load_common_state_dict(path)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - rewrap with the path; the original stays chained
        raise _unreadable(path, e) from e
    if optimizer is not None:  # the plain optimizers' groups are in the common state: before a load they would fail
        _check_lr_mults(path, common.get("optimizer"), optimizer)
    try:
        loaded = dist_checkpointing.load(sharded, path)
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        raise _unreadable(path, e) from e
    if optimizer is not None:  # megatron-core's distributed optimizer loads its groups with the tensors
        _check_lr_mults(path, loaded["optimizer"], optimizer)
    state = common.get("state") if load_state else None
    load_model_state(model, loaded["model"])
    if optimizer is not None:
        own_format = hasattr(optimizer, "sharded_state_dict")
        optimizer.load_state_dict(loaded["optimizer"] if own_format else restore_steps(loaded["optimizer"]))
    return path, state


# ---- layout-free access, for the converters ------------------------------------------------------

def save_global_tensors(root: str, iteration: int, tensors: Dict[str, torch.Tensor], desc: dict) -> str:
    """Writes whole (global) tensors as checkpoint `iteration` of `root` and makes it the latest; each
    rank passes its own subset. Returns the checkpoint folder."""
    sharded = {"model": {key: ShardedTensor.from_rank_offsets(key, t, replica_id=0) for key, t in tensors.items()}}
    return _save(sharded, root, iteration, desc)


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
