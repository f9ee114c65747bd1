"""`--use-distributed-optimizer`: megatron-core's DistributedDataParallel and distributed optimizer.

The student's chunks are wrapped in `megatron.core.distributed.DistributedDataParallel`: backward
hooks accumulate gradients into contiguous fp32 buffers (`main_grad`), which `finalize_model_grads`
reduce-scatters over the data-parallel(+CP) group, together with megatron-core's other gradient
steps (TP-partial replicated parameters: q/k norms, sequence-parallel norms; tied embeddings across
pipeline stages; the same rules as the plain path's `training.sync_grads`). The optimizer is
`get_megatron_optimizer`'s AdamW whose state (fp32 master weights under --bf16, both moments) is
sharded over the data-parallel ranks (ZeRO-1). The frozen teacher is never wrapped nor optimised.

Numerics follow the plain path: megatron-core's standard parameter groups (no weight decay on biases
and 1-D tensors, as `optimizer.decay_groups`), the clip uses the same global norm, a step whose
gradient norm is not finite is skipped (the trainer's --nan-policy decides what follows). With --bf16
the student's weights are bf16 and the optimizer keeps the fp32 master copy (megatron-core's mixed
precision).
Checkpoints hold the optimizer state in megatron-core's 'dp_reshardable' layout, so they load at
another data-parallel size; model weights load at any layout, the optimizer state not across a TP/PP
change ('fully_reshardable', which would allow that, fails to load in megatron-core 0.16 without
Apex/TE).
"""

import math

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from . import checkpoint
from .cpu_compat import megatron_cuda_calls
from .optimizer import is_mixer_parameter

SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


class DistributedOptimizer:
    """The trainer's optimizer for `--use-distributed-optimizer` (same calls as torch's: param_groups,
    zero_grad; `step()` also finalizes the gradients and returns the grad norm)."""

    def __init__(self, args, students):
        if args.bf16:
            for p in (p for model in students for p in model.parameters()):  # buffers (decay slopes) stay fp32
                p.data = p.data.bfloat16()  # megatron-core mixed precision: bf16 weights, fp32 master in the optimizer
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
        config = OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                                 adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, clip_grad=args.clip_grad,
                                 bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                                 use_distributed_optimizer=True)
        with megatron_cuda_calls():
            self.chunks = [DistributedDataParallel(config=m.config, ddp_config=ddp_config, module=m) for m in students]
            # megatron-core's standard groups: no weight decay on biases and 1-D tensors, as optimizer.decay_groups
            overrides = get_standard_config_overrides(config)
            if args.non_mixer_lr_mult is not None:  # as optimizer.lr_mults; the trainer's set_lr applies lr_mult
                non_mixer = ParamWithNamePredicate(name="non_mixer", fn=lambda p, name: not is_mixer_parameter(name))
                overrides[ParamKey(with_name_predicate=non_mixer)] = {"lr_mult": args.non_mixer_lr_mult}
            self.optimizer = get_megatron_optimizer(config, self.chunks, config_overrides=overrides)
        for opt in self._optimizers:  # wd_mult is applied by megatron's LR scheduler, which this trainer does not use
            for group in opt.param_groups:
                group["weight_decay"] = args.weight_decay * group["wd_mult"]
        self.clip_grad = args.clip_grad

    @property
    def _optimizers(self) -> list:
        """The megatron-core optimizers behind `self.optimizer` (a chain of them, or itself)."""
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self) -> float:
        """Reduces the gradients, clips and steps (unless the norm is not finite); returns the grad norm."""
        with megatron_cuda_calls():
            finalize_model_grads(self.chunks)
            found_inf = self.optimizer.prepare_grads()
            norm = float(self.optimizer.get_grad_norm())
            if found_inf or not math.isfinite(norm):
                return float("nan") if found_inf else norm
            if self.clip_grad > 0:
                for opt in self._optimizers:
                    params = opt.get_parameters()
                    if params:
                        clip_grad_by_total_norm_fp32(params, max_norm=self.clip_grad, total_norm=norm)
            self.optimizer.step_with_ready_grads()
        return norm

    # ---- checkpoints (checkpoint.py calls these for a megatron-core optimizer) ----

    def sharded_state_dict(self, model_sd: dict, is_loading: bool = False) -> dict:
        if is_loading:  # a fresh torch AdamW has no state (not even its step) to load into: zeros, overwritten
            for opt in self._optimizers:
                checkpoint.init_optimizer_state(opt.optimizer)
        with megatron_cuda_calls():
            return self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=SHARDING)

    @torch.no_grad()  # it copies into the (fp32: the model's own) master weights
    def load_state_dict(self, state: dict) -> None:
        with megatron_cuda_calls():
            self.optimizer.load_state_dict(state)
        # megatron-core (without Apex/TE) restores AdamW's step count into the param groups only; torch's
        # AdamW reads it per parameter (bias correction): without this a resumed run steps differently
        for opt in self._optimizers:
            for group in opt.optimizer.param_groups:
                if "step" in group:
                    for p in group["params"]:
                        opt.optimizer.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
