"""--cuda-graph on CPU: what can be checked without a GPU. The captured step itself (its loss curve against
eager's, gradient accumulation over micro-batches, --compile with it) is tests/gpu/test_cuda_graph_gpu.py."""

import pytest
import torch

from megatron_hypenet.arguments import parse_args
from megatron_hypenet.cuda_graph import CapturedStep


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"],
                                    ["--context-parallel-size", "2"], ["--use-distributed-optimizer"],
                                    ["--recompute-granularity", "full"], ["--zero-stage", "3"]])
def test_cuda_graph_refuses_untested_layouts(layout, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--stage", "pretrain", "--data-path", "d", "--cuda-graph", *layout])
    err = capsys.readouterr().err
    assert "--cuda-graph captures steps with no collective inside them" in err and layout[0] in err


def test_cuda_graph_is_accepted_alone():
    assert parse_args(["--stage", "pretrain", "--data-path", "d", "--cuda-graph"]).cuda_graph


def test_captured_step_on_cpu_says_it_needs_a_gpu():
    weight = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="run it on a GPU"):
        CapturedStep(lambda batch: (weight * batch["tokens"]).sum(), [weight], [{"tokens": torch.ones(3)}], False)


def test_benchmark_runs_the_trainer_eager_on_cpu(tmp_path):
    """tools/bench_cuda_graph.py's path (random teacher, hybrid, every HALO training stage through the trainer)
    on a tiny shape; the graph variants need a GPU, the eager rows must train."""
    from tools.bench_cuda_graph import main

    rows = main(["--tiny", "--iters", "3", "--out", str(tmp_path / "bench.json")])
    assert [(r["stage"], r["variant"]) for r in rows] == [("align", "eager"), ("distill", "eager"),
                                                          ("finetune", "eager")]
    for r in rows:
        assert r["steps"] == 3 and r["tokens_per_s"] > 0 and all(0 < x < 20 for x in r["losses"]), r
