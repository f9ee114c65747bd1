"""tools/estimate_memory.py: parameter counts exact against built models, optimizer terms exact, the
activation model within a stated factor of the tensors autograd really saves."""

import pytest
import torch

from megatron_hypenet import parallel
from megatron_hypenet.config import make_config
from megatron_hypenet.halo.stages import forward_hidden
from megatron_hypenet.model import build_model
from tools.estimate_memory import (
    GATED_DELTA_CHUNK, GiB, PRESETS, TINY_SHAPE, Layout, Student, config_fields, estimate, layer_activation_bytes,
    main, stage_params, total_params,
)

# Activations: saved-tensor bytes of our layers (CPU, bf16 autocast) over the estimate stay within this factor.
ACTIVATION_FACTOR = 1.25
UNTIED = dict(TINY_SHAPE, tie_word_embeddings=False, hidden_size=96, num_attention_heads=6, num_query_groups=3,
              ffn_hidden_size=160, vocab_size=300)


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    parallel.initialize(1, 1, 1, seed=0)
    yield
    parallel.destroy()


def _model(shape, pattern, st=Student()):
    fields = {k: v for k, v in vars(st).items() if v is not None}
    config = make_config(**config_fields(shape), layer_pattern=pattern, **fields)
    return build_model(config, shape["vocab_size"], shape["tie_word_embeddings"])


@pytest.mark.parametrize("shape, pattern, st", [
    (TINY_SHAPE, "AAAA", Student()),
    (TINY_SHAPE, "LALL", Student()),
    (TINY_SHAPE, "LLLL", Student(lightning_short_conv=True, lightning_output_gate=False, lightning_qk_norm=False)),
    (UNTIED, "ALAL", Student(lightning_num_heads=3, lightning_head_dim=32, lightning_output_norm=False)),
    (TINY_SHAPE, "DALD", Student()),
])
def test_parameter_count_equals_the_built_model(shape, pattern, st):
    model = _model(shape, pattern, st)
    assert total_params(shape, pattern, st) == sum(p.numel() for p in model.parameters())


def test_pipeline_stages_add_up():
    """Stages hold their layers; a tied embedding gets a copy on the last stage (megatron-core)."""
    for shape in (TINY_SHAPE, UNTIED):
        stages = stage_params(shape, "LALL", Student(), pp=2)
        extra = shape["tie_word_embeddings"] * 512 * shape["hidden_size"]  # padded vocab 512 (tiny) x h
        assert sum(stages) == total_params(shape, "LALL") + extra


def test_optimizer_terms_are_exact_bytes_per_parameter():
    model = _model(TINY_SHAPE, "LALL")
    n = sum(p.numel() for p in model.parameters())
    kw = dict(stage="finetune", recompute="none")
    plain = estimate(TINY_SHAPE, "LALL", Layout(dp=4), 64, optimizer="plain", **kw)["terms"]
    dist = estimate(TINY_SHAPE, "LALL", Layout(dp=4), 64, optimizer="distributed", **kw)["terms"]
    zero3 = estimate(TINY_SHAPE, "LALL", Layout(dp=4), 64, optimizer="zero3", **kw)["terms"]
    assert plain["student weights (bf16)"] * GiB == 2 * n and plain["student grads (fp32)"] * GiB == 4 * n
    assert plain["optimizer (fp32 master + Adam)"] * GiB == 12 * n
    assert dist["optimizer (fp32 master + Adam)"] * GiB == 12 * n / 4 and dist["student grads (fp32)"] * GiB == 4 * n
    assert zero3["optimizer (fp32 master + Adam)"] * GiB == 12 * n / 4 and zero3["student grads (fp32)"] * GiB == n
    assert plain["teacher weights (bf16)"] == 0  # finetune has no teacher
    teacher = estimate(TINY_SHAPE, "LALL", Layout(), 64, stage="distill")["terms"]["teacher weights (bf16)"]
    assert teacher * GiB == 2 * sum(p.numel() for p in _model(TINY_SHAPE, "AAAA").parameters())


def _saved_bytes(model, seq):
    """Bytes of the distinct storages autograd saves for backward during one forward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, 512, (1, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        forward_hidden(model, tokens)
    return sum(seen.values())


def _two_layer_shape(head_dim):
    return dict(TINY_SHAPE, hidden_size=256, num_attention_heads=256 // head_dim, num_query_groups=128 // head_dim,
                kv_channels=head_dim, ffn_hidden_size=768, num_layers=2)


def _saved_slope(model):
    """Saved bytes per layer, 512 tokens less 256: the slope drops what does not grow with the sequence
    (weights, casts)."""
    return (_saved_bytes(model, 512) - _saved_bytes(model, 256)) / 2


def _estimated_slope(shape, mixer, lay):
    """The estimator's bytes for one layer, the rank's 512 tokens less 256 (of CP times as many in all)."""
    return (layer_activation_bytes(shape, mixer, Student(), lay, 512, 512 * lay.cp)
            - layer_activation_bytes(shape, mixer, Student(), lay, 256, 256 * lay.cp))


@pytest.mark.parametrize("mixer, head_dim", [("A", 64), ("L", 64), ("D", 64), ("D", 32), ("D", 128)])
def test_activation_model_matches_saved_tensors(mixer, head_dim):
    shape = _two_layer_shape(head_dim)
    measured = _saved_slope(_model(shape, mixer * 2))
    est = _estimated_slope(shape, mixer, Layout())
    assert 1 / ACTIVATION_FACTOR < measured / est < ACTIVATION_FACTOR, (measured, est)


class _FirstOfTwoRanks:
    """Stands in for the context-parallel group of rank 0 of 2 in one process: the layer runs its CP path."""

    def rank(self):
        return 0


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_gated_delta_context_parallel_term_matches_saved_tensors(monkeypatch, head_dim):
    """What a D layer saves more on a CP rank (the affine chunk, layers.cp_gated_delta_rule) is the
    estimator's CP term."""
    from megatron_hypenet import layers

    shape = _two_layer_shape(head_dim)
    model = _model(shape, "DD")
    one = _saved_slope(model)
    monkeypatch.setattr(layers, "_cp_group", _FirstOfTwoRanks)
    monkeypatch.setattr(layers, "gather_stack", lambda x, group: torch.stack([x, x]))
    measured = _saved_slope(model) - one
    est = _estimated_slope(shape, "D", Layout(cp=2)) - _estimated_slope(shape, "D", Layout())
    assert measured / est == pytest.approx(1, abs=0.05), (measured, est)


def test_gated_delta_chunk_is_the_kernels():
    from kernels.gated_delta.chunk import CHUNK

    assert GATED_DELTA_CHUNK == CHUNK


def test_presets_have_the_published_sizes():
    """Qwen3 model cards: 1.7B, 4.0B, 8.2B, 14.8B, 32.8B parameters."""
    published = {"qwen3-1.7b": 1.7, "qwen3-4b": 4.0, "qwen3-8b": 8.2, "qwen3-14b": 14.8, "qwen3-32b": 32.8}
    for name, billions in published.items():
        n = total_params(PRESETS[name], "A" * PRESETS[name]["num_layers"])
        assert abs(n / 1e9 - billions) < 0.05, (name, n)


def test_cli_flags_layouts_over_the_limit(capsys):
    assert main(["--model", "qwen3-8b", "--seq-length", "4096", "--tp", "4", "--pp", "2", "--dp", "4"]) == 0
    assert main(["--model", "qwen3-32b", "--seq-length", "4096", "--dp", "8"]) == 2
    out = capsys.readouterr().out
    assert "fits 80 GiB" in out and "EXCEEDS 80 GiB" in out
    with pytest.raises(SystemExit):
        main(["--model", "qwen3-8b", "--seq-length", "4096", "--tp", "3"])  # 32 heads over TP 3


def test_recompute_and_sharding_lower_the_activation_and_state_terms():
    shape, pattern = PRESETS["qwen3-8b"], "L" * 35 + "A"
    act = {r: estimate(shape, pattern, Layout(tp=4, dp=2, sequence_parallel=True), 32768, recompute=r,
                       stage="finetune")["terms"]["activations"] for r in ("none", "selective", "full")}
    assert act["full"] < act["selective"] < act["none"]
    sp = estimate(shape, pattern, Layout(tp=4, dp=2, sequence_parallel=True), 32768, stage="finetune")["terms"]
    no_sp = estimate(shape, pattern, Layout(tp=4, dp=2), 32768, stage="finetune")["terms"]
    assert sp["activations"] < no_sp["activations"] and sp["optimizer (fp32 master + Adam)"] == no_sp[
        "optimizer (fp32 master + Adam)"]
    # 1F1B: the first pipeline rank holds PP micro-batches of its layers, as many as one rank without PP
    uniform = "L" * 36
    pp = estimate(shape, uniform, Layout(pp=4), 4096, stage="finetune")
    one = estimate(shape, uniform, Layout(), 4096, stage="finetune")
    assert pp["rank"] == 0 and pp["terms"]["activations"] == pytest.approx(one["terms"]["activations"])
