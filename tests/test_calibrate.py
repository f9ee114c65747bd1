"""Stage 1's calibrated initialisation (halo/calibrate.py): the span statistic against a float64 reference,
the head-to-decay matching, and on a tiny teacher: the order follows the HF teacher's own attention
probabilities, the student's heads are the copy-initialised ones permuted, and its output projection
sees the teacher's RMS per channel. The TP=2 + SP (test_sequence_parallel.py), PP=2 and DP=2
(test_pipeline.py) and CP=2 (below) align runs reproduce the one-process curve with it on."""

import math
import os

import pytest
import torch

from helpers import ROOT, make_distill_work, metrics, torchrun
from kernels import lightning_slopes
from megatron_hypenet.halo import calibrate
from megatron_hypenet.halo.calibrate import attention_log_distance, span_head_order


def reference_log_distance(q, k, scale):
    """Per head: sum over batch and queries of E[log(1 + i - j)], float64, one query at a time."""
    q, k = q.double(), k.double()
    s, S = q.shape[0], k.shape[0]
    total = torch.zeros(q.shape[2], dtype=torch.float64)
    for row in range(s):
        i = S - s + row
        scores = torch.einsum("bhd,jbhd->bhj", q[row], k[: i + 1]) * scale
        p = torch.softmax(scores, -1)
        total += (p * torch.log1p(i - torch.arange(i + 1, dtype=torch.float64))).sum((0, 2))
    return total


@pytest.mark.parametrize("block", [256, 5])
def test_attention_log_distance_matches_float64_reference(monkeypatch, block):
    monkeypatch.setattr(calibrate, "SPAN_QUERY_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(12, 2, 3, 8, generator=g), torch.randn(12, 2, 3, 8, generator=g)
    out = attention_log_distance(q, k, 8**-0.5)
    assert torch.allclose(out, reference_log_distance(q, k, 8**-0.5), rtol=1e-5)
    # a context-parallel chunk: the last 4 queries against every key up to them
    out = attention_log_distance(q[-4:], k, 8**-0.5)
    assert torch.allclose(out, reference_log_distance(q[-4:], k, 8**-0.5), rtol=1e-5)


def test_attention_log_distance_orders_local_and_broad_heads():
    """A head whose keys match only their own query looks 0 tokens back; a head with zero queries attends
    uniformly, E[log(1 + d)] = mean over j <= i of log(1 + i - j)."""
    T = 16
    eye = torch.eye(T)[:, None, None, :] * 30.0  # [T, 1, 1, T]: query i matches key i only
    q = torch.cat([eye, torch.zeros(T, 1, 1, T)], dim=2)
    k = torch.cat([eye, torch.zeros(T, 1, 1, T)], dim=2)
    sums = attention_log_distance(q, k, 1.0) / T
    uniform = sum(sum(math.log1p(d) for d in range(i + 1)) / (i + 1) for i in range(T)) / T
    assert sums[0] < 1e-6 and sums[1] == pytest.approx(uniform, rel=1e-6)


def test_span_head_order_gives_fast_decays_to_short_spans():
    slopes = lightning_slopes(4)  # decreasing: head 0 decays fastest
    assert span_head_order(torch.tensor([5.0, 1.0, 3.0, 2.0]), slopes) == [1, 3, 2, 0]
    slopes = lightning_slopes(6)  # not a power of two: the ALiBi interleave is not monotone
    order = span_head_order(torch.tensor([0.5, 2.0, 1.0, 6.0, 3.0, 4.0]), slopes)
    spans = torch.tensor([0.5, 2.0, 1.0, 6.0, 3.0, 4.0])[order]
    by_slope = torch.argsort(slopes, descending=True)
    assert torch.all(spans[by_slope].diff() > 0)  # faster decay, shorter span
    assert sorted(order) == list(range(6))
    with pytest.raises(ValueError, match="3 head spans for 4 RNN heads"):
        span_head_order(torch.ones(3), slopes[:4])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_distill_work(tmp_path_factory.mktemp("calibrate"))


def align_stage(work, align_init):
    from megatron_hypenet.arguments import parse_args
    from megatron_hypenet.halo.stages import build_stage

    args = parse_args(["--stage", "align", "--teacher", str(work / "teacher"), "--data-path", "x",
                       "--seq-length", "64", "--align-init", align_init])
    return build_stage(args)


def test_calibrated_init_permutes_heads_by_span_and_matches_output_rms(work):
    from transformers import AutoModelForCausalLM

    from megatron_hypenet.pipeline import run

    torch.manual_seed(0)
    tokens = torch.randint(0, 300, (2, 65))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 64)}
    forward = lambda: run(stage.chunks, [batch], 64, 2, forward_only=True, whole_model_loss=stage.loss)  # noqa: E731
    stage = align_stage(work, "copy")
    stage.initialise(forward)
    copied = {layer.layer_number: (layer.self_attention.linear_qkv.weight.clone(),
                                   layer.self_attention.linear_proj.weight.clone())
              for layer in stage.student[0].decoder.layers}
    from megatron_hypenet.halo.init import init_student_from_teacher

    def copy_teacher(head_orders):
        for student, teacher in zip(stage.student, stage.teacher):
            init_student_from_teacher(student, teacher, head_orders)

    orders, scales = calibrate.calibrate_student(stage.student, stage.teacher, forward, copy_teacher)

    # the order follows spans measured independently, on the HF teacher's attention probabilities
    hf = AutoModelForCausalLM.from_pretrained(str(work / "hf"), attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = hf(batch["tokens"], output_attentions=True).attentions
    distance = torch.log1p((torch.arange(64)[:, None] - torch.arange(64)[None, :]).clamp(min=0).float())
    H, D = hf.config.num_attention_heads, hf.config.head_dim
    assert len(orders) == len(attentions) and not all(o == list(range(H)) for o in orders.values())
    for n, probs in enumerate(attentions, start=1):
        spans = (probs * distance).sum(-1).mean((0, 2))
        assert orders[n] == span_head_order(spans, lightning_slopes(H))

    for layer in stage.student[0].decoder.layers:
        n, mixer = layer.layer_number, layer.self_attention
        qkv, proj = copied[n]
        order = orders[n]
        assert torch.equal(mixer.linear_qkv.weight.view(H, 3 * D, -1), qkv.view(H, 3 * D, -1)[order])
        assert torch.equal(mixer.linear_proj.weight.view(-1, H, D), proj.view(-1, H, D)[:, order])

    # after scaling, the output projection's input has the teacher's RMS in every channel
    seen = {}

    def hook(key):
        return lambda module, inputs: seen.__setitem__(key, inputs[0].float().pow(2).mean((0, 1)).sqrt())

    hooks = [mod.register_forward_pre_hook(hook((who, layer.layer_number)))
             for model, who in ((stage.student[0], "s"), (stage.teacher[0], "t"))
             for layer in model.decoder.layers for mod in [layer.self_attention.linear_proj]]
    forward()
    for h in hooks:
        h.remove()
    for n in orders:
        assert torch.allclose(seen[("s", n)], seen[("t", n)], rtol=1e-4), n
        assert not torch.allclose(scales[n], torch.ones_like(scales[n]))


def align_flags(work, save, *extra):
    return ["--stage", "align", "--teacher", work / "teacher", "--data-path", work / "data" / "corpus",
            "--tokenizer", work / "hf", "--seq-length", 64, "--micro-batch-size", 2, "--split", "90,10,0",
            "--train-iters", 4, "--lr", 1e-2, "--lr-decay-style", "constant", "--no-progress", "--save", save, *extra]


def test_calibrated_align_starts_closer_to_the_teacher_than_the_copy(work, tmp_path):
    """The first step's align loss (the init's error on the calibration micro-batch) drops."""
    trainer = os.path.join(ROOT, "pretrain_hypenet.py")
    torchrun(1, trainer, *align_flags(work, tmp_path / "copy", "--align-init", "copy"))
    torchrun(1, trainer, *align_flags(work, tmp_path / "calibrated"))
    copy, calibrated = metrics(tmp_path / "copy"), metrics(tmp_path / "calibrated")
    assert calibrated[0]["loss"] < 0.9 * copy[0]["loss"], (copy[0], calibrated[0])


def test_calibrated_align_with_context_parallel_matches_one_process(work, tmp_path):
    """CP=2 measures the spans of its queries against every earlier chunk's keys: the same init, the same curve."""
    trainer = os.path.join(ROOT, "pretrain_hypenet.py")
    torchrun(1, trainer, *align_flags(work, tmp_path / "cp1"))
    torchrun(2, trainer, *align_flags(work, tmp_path / "cp2", "--context-parallel-size", 2))
    one, two = metrics(tmp_path / "cp1"), metrics(tmp_path / "cp2")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
