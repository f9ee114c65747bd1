"""Activation recomputation (--recompute-granularity/-method/-num-layers/-modules) on HypeNet layers:
the same loss and gradients as without, and the recomputation really happens (forwards counted)."""

from collections import Counter

import pytest
import torch

from megatron_hypenet import checkpoint, parallel
from megatron_hypenet.config import config_from_description, read_model_description
from megatron_hypenet.halo.stages import forward_hidden
from megatron_hypenet.losses import chunked_cross_entropy
from megatron_hypenet.model import build_model
from test_model import work  # noqa: F401  (the module fixture: the hybrid "ALLA" checkpoint)

LAYERS = 4
# fields -> forward calls per step of (each layer, each mixer's core, each MLP); 1 = no recompute there
CASES = {
    "full-uniform-1": (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
                       [2] * LAYERS, [2] * LAYERS, [2] * LAYERS),
    "full-uniform-2": (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
                       [2] * LAYERS, [2] * LAYERS, [2] * LAYERS),
    "full-block-1": (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
                     [2, 1, 1, 1], [2, 1, 1, 1], [2, 1, 1, 1]),
    "selective-core": (dict(recompute_granularity="selective"), [1] * LAYERS, [2] * LAYERS, [1] * LAYERS),
    "selective-core-mlp": (dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
                           [1] * LAYERS, [2] * LAYERS, [2] * LAYERS),
}


def _step(root, **fields):
    """One training forward/backward of the hybrid; returns loss, grads and the forward calls counted."""
    parallel.initialize(1, 1)
    desc = read_model_description(checkpoint.resolve(root))
    model = build_model(config_from_description(desc, **fields), desc["vocab_size"], desc["tie_word_embeddings"])
    checkpoint.load_checkpoint(root, model, desc, load_state=False)
    model.train()
    calls = Counter()

    def count(key):
        return lambda *args: calls.update([key])

    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_hook(count(("layer", i)))
        layer.mlp.register_forward_hook(count(("mlp", i)))
        mixer, core = layer.self_attention, layer.self_attention.core
        mixer.core = lambda qkv, core=core, i=i: (calls.update([("core", i)]), core(qkv))[1]
    x = torch.randint(0, desc["vocab_size"], (2, 25), generator=torch.Generator().manual_seed(5))
    hidden = forward_hidden(model, x[:, :-1])
    loss = chunked_cross_entropy(model, hidden, x[:, 1:], torch.ones_like(x[:, 1:]), chunk_size=8)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    counts = {kind: [calls[(kind, i)] for i in range(LAYERS)] for kind in ("layer", "core", "mlp")}
    return loss.detach(), grads, counts


@pytest.fixture(scope="module")
def reference(work):  # noqa: F811
    loss, grads, counts = _step(str(work / "hybrid"))
    assert counts == {"layer": [1] * LAYERS, "core": [1] * LAYERS, "mlp": [1] * LAYERS}
    return loss, grads


@pytest.mark.parametrize("case", CASES)
def test_recompute_gives_the_same_loss_and_grads(work, reference, case):  # noqa: F811
    fields, layer_calls, core_calls, mlp_calls = CASES[case]
    loss, grads, counts = _step(str(work / "hybrid"), **fields)
    assert counts == {"layer": layer_calls, "core": core_calls, "mlp": mlp_calls}
    ref_loss, ref_grads = reference
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert g.abs().max() > 0, name
        assert torch.allclose(g, ref_grads[name], rtol=1e-5, atol=1e-7), name


def test_recompute_runs_under_the_forward_autocast():
    """megatron-core's checkpoint function reruns the function outside autocast (under the trainer's bf16
    autocast on fp32 weights that is a dtype error); the one every recompute here goes through restores it.
    (A whole bf16 step cannot run on CPU: megatron-core's linear backward re-enters only CUDA autocast.)"""
    from megatron.core import tensor_parallel

    from megatron_hypenet.layers import checkpoint_under_forward_autocast
    from megatron_hypenet.model import build_model  # noqa: F401  (installs it as tensor_parallel.checkpoint)

    assert tensor_parallel.checkpoint is checkpoint_under_forward_autocast

    def autocast_seen(checkpoint_fn):
        seen = []

        def fn(x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return x * 2

        x = torch.ones(3, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = checkpoint_fn(fn, False, x)
        y.sum().backward()
        return seen

    assert autocast_seen(tensor_parallel.random.checkpoint) == [True, False]  # megatron-core's own
    assert autocast_seen(checkpoint_under_forward_autocast) == [True, True]


def test_unsupported_selective_module_is_refused(work):  # noqa: F811
    desc = read_model_description(checkpoint.resolve(str(work / "hybrid")))
    with pytest.raises(ValueError, match="support selective recompute of"):
        config_from_description(desc, recompute_granularity="selective", recompute_modules=["layernorm"])
