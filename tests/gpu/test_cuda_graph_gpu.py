"""--cuda-graph on one GPU (cuda_graph.py): align, distill and finetune with each step's forward and backward
replayed from a CUDA graph follow the eager run's loss curve, also with two micro-batches per step, with
Gated DeltaNet's Triton kernels, with align's attention twins and with distill's Muon on the token mixers
(examples/reproduce.yaml trains them graphed; Muon graphed and compiled over every weight is refused, see
docs/results_run28.md);
and with --compile, the graphed run follows the run that launches the same compiled kernels one by one.

Tolerance, as in test_resume_gpu.py: a second eager run measures the kernels' run-to-run noise
(atomics in the bf16 attention and Lightning backward kernels), and every step of the graphed run must satisfy
    |loss_i - ref_i| <= max(4 * noise, 2^-8 * max_j |ref_j|).
A replay runs the same kernels on the same batches as eager, so anything beyond that noise is a bug: stale
gradients (accumulating across steps), a batch not copied into the graph's inputs, a stale autocast cast.
--compile fuses kernels and rounds differently from eager, so `--compile --cuda-graph` is held to the same
tolerance against `--compile` alone, which runs the same compiled kernels without the graph.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_operations import Run, losses, make_env

pytestmark = pytest.mark.gpu

ITERS = 20
BF16_ROUNDING = 2.0 ** -8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("gpu_cuda_graph"))


def _stage_cmd(env, stage, save, *extra):
    extra = ["--train-iters", str(ITERS), "--bf16", *extra]
    if stage == "finetune":
        extra += ["--load", env.baseline("align")]
    elif stage == "distill":
        env.baseline("align")
    return env.cmd(stage, save, *extra)


@pytest.mark.parametrize("stage, extra", [("align", ()), ("distill", ()), ("finetune", ()),
                                          ("distill", ("--global-batch-size", "8")),
                                          ("align", ("--rnn-mixer", "gated_deltanet")),
                                          ("align", ("--attention-twins",)),
                                          ("distill", ("--train-only-mixers", "--optimizer", "muon"))],
                         ids=["align", "distill", "finetune", "distill-2-micro-batches", "align-gated-deltanet",
                              "align-attention-twins", "distill-muon"])
def test_graphed_steps_follow_the_eager_curve(env, stage, extra):
    name = stage + ("_" + extra[-1].lstrip("-") if extra else "")
    variants = {"eager": (), "eager2": (), "graph": ("--cuda-graph",), "compile": ("--compile",),
                "compile_graph": ("--compile", "--cuda-graph")}
    runs = {v: (_stage_cmd(env, stage, env.path(f"{name}_{v}"), *extra, *flags), env.path(f"{name}_{v}"))
            for v, flags in variants.items()}
    with ThreadPoolExecutor(len(runs)) as pool:
        list(pool.map(lambda r: Run(*r).wait(timeout=600), runs.values()))
    curves = {v: losses(env.path(f"{name}_{v}")) for v in runs}
    ref = curves["eager"]
    noise = max(abs(a - b) for a, b in zip(ref, curves["eager2"]))
    tol = max(4 * noise, BF16_ROUNDING * max(map(abs, ref)))
    pairs = {f"{graphed} vs {plain}": (curves[graphed], curves[plain])
             for graphed, plain in (("graph", "eager"), ("compile_graph", "compile"))}
    report = {k: {"max_abs_diff": max(abs(a - b) for a, b in zip(x, y)), "bitwise_equal": x == y}
              for k, (x, y) in pairs.items()}
    print("GPU-CUDA-GRAPH " + json.dumps({"stage": name, "eager": ref, "run_to_run_noise": noise, "tolerance": tol,
                                          **report}))
    for v in runs:
        if "graph" in v:
            log = open(env.path(f"{name}_{v}") + ".log").read()
            assert "--cuda-graph: captured the step's forward and backward" in log, v
    for label, (got, want) in pairs.items():
        assert len(got) == len(want) == ITERS, label
        bad = [(i + 1, g, w) for i, (g, w) in enumerate(zip(got, want)) if abs(g - w) > tol]
        assert not bad, f"{label}: (iteration, loss, reference) beyond {tol:.3g}: {bad}"
