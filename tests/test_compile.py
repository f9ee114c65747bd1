"""--compile (torch.compile'd decoder layers): the trainer trains exactly as eager, on CPU."""

import os

import pytest
import torch

from helpers import ROOT, distill_flags, load_model, make_distill_work, metrics, model_logits, torchrun
from megatron_hypenet import parallel
from megatron_hypenet.config import make_config
from megatron_hypenet.halo.stages import forward_hidden
from megatron_hypenet.model import build_model, compile_layers


def _tiny_model(layer_pattern: str, **fields):
    """A tiny HypeNet of one layer per letter (vocabulary 64), eager."""
    config = make_config(hidden_size=32, num_layers=len(layer_pattern), num_attention_heads=4, num_query_groups=2,
                         kv_channels=8, ffn_hidden_size=64, layer_pattern=layer_pattern, use_cpu_initialization=True,
                         **fields)
    return build_model(config, 64, True)


def test_compile_layers_compiles_every_layer(recwarn):
    parallel.initialize(1, 1)
    try:
        model = _tiny_model("ALD")
        compile_layers(model)
        assert all(layer._compiled_call_impl is not None for layer in model.decoder.layers)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        forward_hidden(model, torch.randint(0, 64, (1, 8))).sum().backward()
        counters = torch._dynamo.utils.counters
        assert counters["stats"]["unique_graphs"] >= 3  # one per mixer kind at least (Gated DeltaNet's too)
        # whole layers, unbroken (layers.RowParallelLinear: megatron-core's warned, a break, at every call; on GPU
        # Lightning's Triton kernel is the one break left)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert not [w for w in recwarn if "tp_group is None" in str(w.message)]
    finally:
        parallel.destroy()


def test_compiled_layers_take_another_stage_shape():
    """A recipe's ablation worker trains stage after stage in one process. Gated DeltaNet layers (with short convs)
    compiled after a Lightning stage at another length and micro-batch failed in inductor when dynamo recompiled
    with symbolic sizes ("cannot determine truth value of Relational"); compile_layers' static shapes compile
    them for the new shape, and they compute what their eager twins do."""
    parallel.initialize(1, 1)
    try:
        torch._dynamo.reset()
        finetuned = _tiny_model("AL", lightning_short_conv=True)
        compile_layers(finetuned)
        forward_hidden(finetuned, torch.randint(0, 64, (2, 256))).sum().backward()
        distilled = _tiny_model("AD", lightning_short_conv=True)
        x = torch.randint(0, 64, (4, 128), generator=torch.Generator().manual_seed(0))
        eager = forward_hidden(distilled, x)
        compile_layers(distilled)
        compiled = forward_hidden(distilled, x)
        compiled.sum().backward()
        assert torch.allclose(compiled, eager, atol=1e-5)
    finally:
        parallel.destroy()


def test_compiled_distill_gives_the_eager_loss_curve(tmp_path):
    """Distill of a hybrid (HyPE attention and Lightning layers) from a teacher, both compiled, at TP=2: the same
    losses and gradient norms as eager in one process over 5 steps, and a checkpoint an eager one-process model
    loads (compiling in place keeps the parameter names)."""
    work = make_distill_work(tmp_path)
    trainer = os.path.join(ROOT, "pretrain_hypenet.py")
    torchrun(1, trainer, *distill_flags(work, tmp_path / "eager"))
    run = torchrun(2, trainer, *distill_flags(work, tmp_path / "compiled", "ALLA", "--compile",
                                             "--tensor-model-parallel-size", 2), timeout=600)
    assert "--compile: 8 decoder layers" in run.stdout + run.stderr
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 5
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (a, b)
    try:
        x = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
        eager_model, _ = load_model(str(tmp_path / "eager"))
        compiled_model, _ = load_model(str(tmp_path / "compiled"))
        assert torch.allclose(model_logits(compiled_model, x), model_logits(eager_model, x), rtol=1e-3, atol=1e-3)
    finally:
        parallel.destroy()


@pytest.mark.parametrize("layout", [["--pipeline-model-parallel-size", "2"], ["--context-parallel-size", "2"],
                                    ["--zero-stage", "3"]])
def test_compile_refuses_untested_layouts(layout, capsys):
    from megatron_hypenet.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--stage", "pretrain", "--data-path", "d", "--train-iters", "1", "--compile", *layout])
    assert "--compile is tested with tensor and data parallelism only" in capsys.readouterr().err
