"""ZeRO-3 (`--zero-stage 3`) through DeepSpeed, for students too large for tensor/pipeline parallelism.

DeepSpeed's engine owns the student's parameters, gradients and AdamW state, each partitioned over the
data-parallel ranks and gathered layer by layer for the forward and the backward. The frozen teacher
stays outside the engine: whole on every rank, bf16 under --bf16, never in the optimizer. The trainer's
loop is unchanged apart from three calls into `ZeroOptimizer` (docs/parallelism.md, "ZeRO-3"):

    forward  `loss(batch)` runs the stage's loss through the engine (its backward hooks reduce-scatter
             the gradients); the micro-batch loop and the 1/micro-batches scaling stay the trainer's
    step     DeepSpeed clips to --clip-grad with the trainer's formula, skips a step whose gradient
             norm is not finite, and steps AdamW at the trainer's learning rate (`param_groups`)
    save     the engine state (partitioned fp32 master weights and Adam moments, one file per rank) goes
             to <save>/zero3/iter_N first; then the gathered parameters are saved as the usual
             dist_checkpointing folder <save>/iter_N, which the next stage and the HF export read
"""

import json
import logging
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from . import checkpoint, parallel

log = logging.getLogger("megatron_hypenet")

ENGINE_DIR = "zero3"  # <save>/zero3/iter_N: the DeepSpeed engine state of checkpoint iter_N
# DeepSpeed settings the trainer's own flags and loop decide; a --deepspeed-config file may not set them.
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "managed_gradient_accumulation", "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16")


def check_layout(args) -> None:
    """ZeRO-3 shards the student over data-parallel ranks only; refuse what it is not wired to."""
    unsupported = [
        (args.tensor_model_parallel_size > 1, "--tensor-model-parallel-size > 1"),
        (args.pipeline_model_parallel_size > 1, "--pipeline-model-parallel-size > 1"),
        (args.context_parallel_size > 1, "--context-parallel-size > 1"),
        (args.sequence_parallel, "--sequence-parallel"),
        (getattr(args, "use_distributed_optimizer", False), "--use-distributed-optimizer"),
        (getattr(args, "async_save", False), "--async-save"),
        (args.recompute_granularity is not None, "--recompute-granularity"),
    ]
    bad = [flag for is_set, flag in unsupported if is_set]
    if bad:
        raise ValueError(f"--zero-stage 3 shards the student over data-parallel ranks only and cannot be combined "
                         f"with {', '.join(bad)}; drop those flags, or drop --zero-stage and use TP/PP with "
                         f"megatron-core's distributed optimizer")
    if args.stage == "select":
        raise ValueError("--stage select trains nothing; leave --zero-stage out")


def deepspeed_config(args) -> dict:
    config = {}
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            config = json.load(f)
        owned = sorted(set(config) & set(OWNED_KEYS))
        if owned:
            raise ValueError(f"--deepspeed-config {args.deepspeed_config} sets {owned}: these come from the trainer's "
                             f"flags (--micro-batch-size, --global-batch-size, --clip-grad, --lr..., --bf16); "
                             f"remove them")
        stage = config.get("zero_optimization", {}).get("stage", 3)
        if stage != 3:
            raise ValueError(f"--deepspeed-config {args.deepspeed_config} sets zero_optimization.stage={stage}; "
                             f"--zero-stage 3 needs 3 (ZeRO-1/2 is megatron-core's distributed optimizer)")
    config.setdefault("zero_optimization", {})["stage"] = 3
    config.setdefault("steps_per_print", 1 << 30)  # the trainer logs
    config.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW, as in the plain loop
    config.update(
        train_micro_batch_size_per_gpu=args.micro_batch_size,
        # The trainer runs the micro-batches of a step and scales each loss by their count; every backward
        # adds to the partitioned gradients and `step()` is the accumulation boundary.
        gradient_accumulation_steps=1,
        managed_gradient_accumulation=False,
        gradient_clipping=args.clip_grad,
        bf16={"enabled": bool(args.bf16)},
    )
    return config


class _StageLoss(torch.nn.Module):
    """What the engine wraps: the student (its parameters are the engine's) and the stage's loss of a batch."""

    def __init__(self, student, loss_fn):
        super().__init__()
        self.student = student
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(batch)


def _register_external_parameters(student) -> None:
    """ZeRO-3 gathers a module's own parameters around its forward. Parameters read by another module's
    forward must be registered with it, or they are seen partitioned (empty) outside the engine's forward
    (evaluation, the LM head recomputed in the backward by losses.py)."""
    import deepspeed

    register_external_parameter = deepspeed.zero.register_external_parameter
    for module in student.modules():
        for child in module.children():
            if type(child).forward is torch.nn.Module.forward:  # a parameter holder (q/k norm, conv, ...)
                for p in child.parameters():
                    register_external_parameter(module, p)
    if student.share_embeddings_and_output_weights and student.post_process:  # the tied LM head
        register_external_parameter(student.output_layer, student.shared_embedding_or_output_weight())


class ZeroOptimizer:
    """The DeepSpeed ZeRO-3 engine over the student, in the place of the trainer's AdamW."""

    def __init__(self, args, stage, optimizer: torch.optim.Optimizer, resume_from: Optional[str] = None):
        import deepspeed

        check_layout(args)
        self.root = args.save
        (student,) = stage.student
        self.student = student
        _register_external_parameters(student)
        self.engine, _, _, _ = deepspeed.initialize(model=_StageLoss(student, stage.loss), optimizer=optimizer,
                                                    config=deepspeed_config(args))
        if resume_from is not None:
            self._load_engine(resume_from)

    # ---- the trainer's optimizer interface -------------------------------------------------------------

    @property
    def param_groups(self):
        return self.engine.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.optimizer.zero_grad(set_to_none=set_to_none)

    def loss(self, batch):
        """The stage's loss through the engine (fetches the partitioned parameters, hooks the backward)."""
        return self.engine(batch)

    def step(self) -> float:
        """Clips (DeepSpeed: grads x clip / (norm + 1e-6) when norm > clip, as training.clip_grad_norm) and
        steps; returns the global gradient norm, inf when the step was skipped as not finite."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("inf") if norm is None or not self.engine.was_step_applied() else float(norm)

    # ---- checkpoints -----------------------------------------------------------------------------------

    def save(self, iteration: int, desc: dict, state: dict, keep_last: Optional[int]) -> str:
        """Engine state first (a model checkpoint never lacks it), then the gathered model as iter_N."""
        import deepspeed

        tag = os.path.basename(checkpoint.iteration_dir(self.root, iteration))
        self.engine.save_checkpoint(os.path.join(self.root, ENGINE_DIR), tag=tag, save_latest=False)
        with deepspeed.zero.GatheredParameters(list(self.student.parameters()), modifier_rank=None):
            path = checkpoint.save_checkpoint(self.root, iteration, [self.student], desc, None, state, keep_last)
        if parallel.is_rank0():
            kept = {os.path.basename(checkpoint.iteration_dir(self.root, i))
                    for i in checkpoint.complete_iterations(self.root)}
            engine_dir = os.path.join(self.root, ENGINE_DIR)
            for name in os.listdir(engine_dir):
                if name.startswith("iter_") and name not in kept:
                    shutil.rmtree(os.path.join(engine_dir, name), ignore_errors=True)
        if dist.is_initialized():
            parallel.barrier()
        return path

    def _load_engine(self, path: str) -> None:
        tag = os.path.basename(os.path.normpath(path))
        engine_dir = os.path.join(os.path.dirname(os.path.normpath(path)), ENGINE_DIR)
        if not os.path.isdir(os.path.join(engine_dir, tag)):
            raise checkpoint.CheckpointError(
                f"{path} has no DeepSpeed engine state in {os.path.join(engine_dir, tag)}: it was not saved by a "
                f"--zero-stage 3 run. Resume it without --zero-stage, or start this run in a new --save folder "
                f"with --load {path}")
        loaded, _ = self.engine.load_checkpoint(engine_dir, tag=tag, load_module_strict=False,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise checkpoint.CheckpointError(f"could not read the DeepSpeed engine state in {engine_dir}/{tag}")
        log.info("resumed the ZeRO-3 engine state from %s/%s", engine_dir, tag)
