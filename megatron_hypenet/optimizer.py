"""The plain path's optimizer (`--optimizer`): AdamW, or Muon on the hidden weight matrices with AdamW on the rest.

Muon (torch.optim.Muon) steps each weight matrix along its momentum orthogonalised by Newton-Schulz
iterations. It is meant for the matrices inside the layers only: the embedding, the LM head and every tensor
that is not a matrix (norm gains, short convs, Gated DeltaNet's per-head vectors) stay on AdamW. With
`adjust_lr_fn="match_rms_adamw"` a Muon update has AdamW's RMS, so both parts share --lr, its schedule and
--weight-decay.

Newton-Schulz needs a whole matrix. Tensor parallelism, megatron-core's distributed optimizer and ZeRO-3 split
the matrices or own the optimizer, so `--optimizer muon` refuses them (arguments.py); data and pipeline
parallelism leave every matrix whole on its rank.
"""

from typing import List

import torch

from . import checkpoint
from .config import MIXER_ATTRIBUTES

MUON_MOMENTUM = 0.95
# not matrices inside a layer, although 2-D: they map tokens to and from the hidden size
NOT_MUON = ("embedding.", "output_layer.")


def is_mixer_parameter(name: str) -> bool:
    """Whether a parameter (by its name in the model) belongs to a decoder layer's token mixer."""
    return any(f".{attribute}." in name for attribute in MIXER_ATTRIBUTES)


def lr_mults(models, params, non_mixer_lr_mult) -> dict:
    """id(parameter) -> its multiple of --lr: `non_mixer_lr_mult` (--non-mixer-lr-mult) for the weights outside
    the token mixers, 1 for the rest; empty (everything at --lr) when it is None."""
    if non_mixer_lr_mult is None:
        return {}
    wanted = {id(p) for p in params}
    return {id(p): non_mixer_lr_mult for model in models for name, p in model.named_parameters()
            if id(p) in wanted and not is_mixer_parameter(name)}


def by_lr_mult(params, mults: dict = None) -> list:
    """[(lr_mult, its parameters)] under `lr_mults`' map, 1 first (group 0's lr is then --lr's schedule)."""
    params, mults = list(params), mults or {}
    return [(m, [p for p in params if mults.get(id(p), 1.0) == m])
            for m in sorted({mults.get(id(p), 1.0) for p in params}, key=lambda m: m != 1.0)]


def decay_groups(params, weight_decay: float, mults: dict = None) -> list:
    """AdamW parameter groups under megatron-core's default rule, so the plain, ZeRO-3 and distributed
    optimizers agree: no weight decay on 1-D tensors (norm gains, Gated DeltaNet's A_log / dt_bias). Each group
    also carries megatron-core's `lr_mult` (`by_lr_mult`)."""
    groups = []
    for mult, mine in by_lr_mult(params, mults):
        groups += [{"params": [p for p in mine if p.ndim > 1], "weight_decay": weight_decay, "lr_mult": mult},
                   {"params": [p for p in mine if p.ndim <= 1], "weight_decay": 0.0, "lr_mult": mult}]
    return [g for g in groups if g["params"]]


def set_lr(optimizer, lr: float) -> None:
    """The step's learning rate, times each group's `lr_mult` (megatron-core's scheduler does the same)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def adamw(params, lr: float, weight_decay: float, betas, mults: dict = None) -> torch.optim.AdamW:
    return torch.optim.AdamW(decay_groups(params, weight_decay, mults), lr=lr, betas=betas)


def muon_matrices(models, params) -> List[torch.nn.Parameter]:
    """Of `params`, the 2-D weights inside the decoder layers of `models` (the chunks that own them)."""
    wanted = {id(p) for p in params}
    return [p for model in models for name, p in model.named_parameters()
            if id(p) in wanted and p.ndim == 2 and not name.startswith(NOT_MUON)]


class MuonWithAdamW:
    """torch's Muon over the matrices and AdamW over the rest, behind the trainer's optimizer calls
    (param_groups, zero_grad, step, and the checkpoint hooks)."""

    def __init__(self, matrices, others, lr: float, weight_decay: float, betas, mults: dict = None):
        groups = [{"params": mine, "lr_mult": mult} for mult, mine in by_lr_mult(matrices, mults)]
        self.parts = {"muon": torch.optim.Muon(groups, lr=lr, weight_decay=weight_decay, momentum=MUON_MOMENTUM,
                                               adjust_lr_fn="match_rms_adamw")}
        if others:
            self.parts["adamw"] = adamw(others, lr, weight_decay, betas, mults)

    @property
    def param_groups(self) -> list:
        return [g for part in self.parts.values() for g in part.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for part in self.parts.values():
            part.step()

    def sharded_state_dict(self, model_sd: dict, is_loading: bool = False) -> dict:
        return {name: checkpoint.torch_optimizer_sharded_state_dict(part, model_sd)
                for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(checkpoint.restore_steps(state[name]))


def build_optimizer(args, models, params):
    """The optimizer of the plain path (no --use-distributed-optimizer; ZeRO-3 wraps what this returns)."""
    params = list(params)
    betas = (args.adam_beta1, args.adam_beta2)
    mults = lr_mults(models, params, args.non_mixer_lr_mult)
    if args.optimizer == "adamw":
        return adamw(params, args.lr, args.weight_decay, betas, mults)
    matrices = muon_matrices(models, params)
    if not matrices:
        raise ValueError("--optimizer muon found no weight matrix among the trained parameters; use --optimizer adamw")
    chosen = {id(p) for p in matrices}
    return MuonWithAdamW(matrices, [p for p in params if id(p) not in chosen], args.lr, args.weight_decay, betas,
                         mults)
