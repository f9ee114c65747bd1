"""Worker run under `torchrun` (gloo on CPU) by the tests: builds a model at the given TP size,
loads a checkpoint and writes what the test compares to OUT (rank 0 only).

    torchrun --nproc-per-node 2 tests/dist_worker.py MODE CKPT OUT [TP [CP [SP]]]   (SP: 1 = sequence parallel)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron.core import parallel_state  # noqa: E402

from megatron_hypenet import checkpoint, parallel  # noqa: E402
from megatron_hypenet.config import config_from_description, read_model_description  # noqa: E402
from megatron_hypenet.halo.stages import forward_hidden  # noqa: E402
from megatron_hypenet.losses import chunked_cross_entropy, full_logits  # noqa: E402
from megatron_hypenet.model import build_model  # noqa: E402

SEQ, BATCH = 24, 2


def tokens(vocab: int) -> torch.Tensor:
    """Identical on every rank: its own generator, never the global RNG."""
    return torch.randint(0, vocab, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(7))


def full_grad_norms(model) -> dict:
    """Gradient norm of every full parameter: tensor-parallel shards' squares summed over the TP group."""
    norms = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        sq = p.grad.double().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            torch.distributed.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
        norms[name] = sq.sqrt().item()
    return norms


def main(mode: str, ckpt: str, out: str, tp: int, cp: int = 1, sp: int = 0) -> None:
    parallel.initialize(tp, 1, cp)
    desc = read_model_description(checkpoint.resolve(ckpt))
    config = config_from_description(desc, tensor_model_parallel_size=tp, sequence_parallel=bool(sp))
    model = build_model(config, desc["vocab_size"], desc["tie_word_embeddings"])
    checkpoint.load_checkpoint(ckpt, model, desc, load_state=False)
    x = tokens(desc["vocab_size"])
    inputs, labels = (parallel.context_parallel_chunk(t) for t in (x[:, :-1], x[:, 1:]))
    if mode == "logits":
        model.eval()
        result = {"logits": full_logits(model, forward_hidden(model, inputs))}
    elif mode == "loss_grad":
        # one forward/backward: the loss and the gradient norm of every full (gathered) parameter
        hidden = forward_hidden(model, inputs)
        loss = chunked_cross_entropy(model, hidden, labels, torch.ones_like(labels), chunk_size=10)
        loss.backward()
        from megatron_hypenet.training import clip_grad_norm, sync_grads

        sync_grads(model)
        loss = loss.detach()
        if cp > 1:  # each rank's loss is the mean over its chunk: the sequence's loss is their mean
            torch.distributed.all_reduce(loss, group=parallel_state.get_context_parallel_group())
            loss /= cp
        grads = full_grad_norms(model)
        grad_norm = torch.tensor(clip_grad_norm(list(model.parameters()), 0.0))
        result = {"loss": loss, "grads": grads, "grad_norm": grad_norm}
    elif mode == "save":
        save_root = out + ".ckpt"
        checkpoint.save_checkpoint(save_root, 3, model, desc)
        result = {"saved": save_root}
    else:
        raise ValueError(mode)
    if parallel.is_rank0():
        torch.save(result, out)
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:]))
