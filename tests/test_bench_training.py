"""tools/bench_training.py at a tiny shape on CPU: the path runs, its FLOP formula and its recompute are right.
(No timing claims: throughput is measured on GPUs, docs/benchmarks.md.)"""

import json
import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_hypenet import parallel
from megatron_hypenet.halo.stages import forward_hidden
from megatron_hypenet.losses import chunked_cross_entropy
from megatron_hypenet.model import padded_vocab_size
from tools.bench_training import build, main, matmul_weights, model_flops
from tools.estimate_memory import TINY_SHAPE

CPU = torch.device("cpu")


def _step(model, tokens):
    loss = chunked_cross_entropy(model, forward_hidden(model, tokens[:, :-1]), tokens[:, 1:],
                                 torch.ones(tokens.shape[0], tokens.shape[1] - 1), 1024)
    loss.backward()
    return loss


def test_tiny_mode_runs_both_models(tmp_path):
    out = tmp_path / "bench.json"
    rows = main(["--tiny", "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert [r["model"] for r in rows] == ["hypenet", "all-attention"]
    assert rows[0]["layer_pattern"].count("A") == 1 and rows[1]["layer_pattern"] == "AAAA"
    for r in rows:
        assert all(map(lambda x: 0 < x < 20, r["loss"])), r["loss"]
        assert r["tokens_per_s"] > 0 and r["flops_terms"]["total"] == sum(
            v for k, v in r["flops_terms"].items() if k != "total")
    assert json.loads(out.read_text())["rows"][0]["seq_length"] == 64


def test_dense_flops_equal_the_counted_matmuls():
    """torch's FLOP counter sees every matmul of a training step; ours must be its dense term plus the
    LM head's one extra forward (the chunked loss recomputes it), exactly."""
    parallel.initialize(1, 1, 1, seed=0)
    try:
        for teacher in (True, False):
            config, model = build(TINY_SHAPE, "LLAL", teacher, "none", CPU)
            b, s = 2, 96
            counter = FlopCounterMode(display=False)
            with counter:
                _step(model, torch.randint(0, TINY_SHAPE["vocab_size"], (b, s + 1)))
            mm = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
            head = 2 * padded_vocab_size(TINY_SHAPE["vocab_size"]) * TINY_SHAPE["hidden_size"] * b * s
            assert mm == model_flops(config, matmul_weights(model), b, s)["dense"] + head
    finally:
        parallel.destroy()


def _saved_bytes(model, tokens):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_hidden(model, tokens)
    return sum(seen.values())


def test_full_recompute_keeps_less_and_gives_the_same_loss_and_grads():
    parallel.initialize(1, 1, 1, seed=0)
    try:
        tokens = torch.randint(0, TINY_SHAPE["vocab_size"], (2, 257))
        grads, saved = {}, {}
        for mode in ("none", "full"):
            torch.manual_seed(0)
            _, model = build(TINY_SHAPE, "LLAL", False, mode, CPU)
            saved[mode] = _saved_bytes(model, tokens[:, :-1])
            loss = _step(model, tokens)
            grads[mode] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
        assert saved["full"] < saved["none"] / 3, saved  # layers' insides are not kept, only their inputs
        assert torch.equal(grads["none"][0], grads["full"][0])
        for a, b in zip(grads["none"][1], grads["full"][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        parallel.destroy()


def test_gated_deltanet_student_is_timed_with_both_chunk_loops(monkeypatch):
    """--rnn-mixer gated_deltanet: the student's RNN layers are Gated DeltaNet, and it is timed a second time with
    HYPENET_GATED_DELTA_LOOP=pytorch, which is put back afterwards."""
    import kernels.gated_delta as gd
    from kernels.gated_delta import LOOP_ENV

    monkeypatch.delenv(LOOP_ENV, raising=False)
    seen = []
    real = gd._triton_chunk_loop
    monkeypatch.setattr(gd, "_triton_chunk_loop", lambda q: seen.append(os.environ.get(LOOP_ENV)) or real(q))
    rows = main(["--tiny", "--steps", "1", "--warmup", "0", "--rnn-mixer", "gated_deltanet"])
    assert [r["model"] for r in rows] == ["hypenet", "hypenet, PyTorch loop", "all-attention"]
    assert rows[0]["layer_pattern"] == rows[1]["layer_pattern"] and set(rows[0]["layer_pattern"]) == {"A", "D"}
    assert set(seen) == {None, "pytorch"}
    assert LOOP_ENV not in os.environ
    assert all(0 < x < 20 for r in rows for x in r["loss"])
