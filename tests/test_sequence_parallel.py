"""Sequence parallelism (megatron-core's --sequence-parallel) for HypeNet: TP=2 with SP against TP=1 (gloo)."""

import math
import os

import pytest
import torch

from megatron_hypenet import checkpoint
from megatron_hypenet.config import read_model_description

from helpers import ROOT, distill_flags, make_distill_work, metrics, torchrun, worker
from test_model import work  # noqa: F401  (the module fixture: teacher and hybrid checkpoints)


def test_hypenet_tp2_sequence_parallel_loss_and_grads_equal_tp1(work):  # noqa: F811
    """The hybrid (attention + Lightning with short conv, HyPE) with the sequence split between the TP ranks
    outside the tensor-parallel regions: same loss and the same gradient for every parameter."""
    one = worker(1, "loss_grad", str(work / "hybrid"), str(work / "sp_lg1.pt"), tp=1)
    two = worker(2, "loss_grad", str(work / "hybrid"), str(work / "sp_lg2.pt"), tp=2, sp=True)
    assert torch.isfinite(one["loss"]) and one["loss"] > 0
    assert abs(float(one["loss"]) - float(two["loss"])) <= 1e-5
    assert set(one["grads"]) == set(two["grads"])
    for name, norm in one["grads"].items():
        assert norm > 0, name
        assert math.isclose(norm, two["grads"][name], rel_tol=1e-4), (name, norm, two["grads"][name])
    assert math.isclose(float(one["grad_norm"]), float(two["grad_norm"]), rel_tol=1e-4)


def test_teacher_tp2_sequence_parallel_logits_equal_tp1(work):  # noqa: F811
    one = worker(1, "logits", str(work / "teacher"), str(work / "sp_logits1.pt"), tp=1)
    two = worker(2, "logits", str(work / "teacher"), str(work / "sp_logits2.pt"), tp=2, sp=True)
    assert one["logits"].shape == two["logits"].shape
    assert (one["logits"] - two["logits"]).abs().max() <= 1e-5


def test_distill_with_tp2_sequence_parallel_matches_one_process(tmp_path):
    """The trainer end to end (embedding scatter, chunked KL over gathered LM-head chunks, norm-grad sums,
    clipping, AdamW): the TP=2 + SP loss curve equals the single-process one."""
    work = make_distill_work(tmp_path)
    trainer = os.path.join(ROOT, "pretrain_hypenet.py")
    chunked = ["--loss-chunk-size", 16]  # several LM-head chunks per sequence
    torchrun(1, trainer, *distill_flags(work, tmp_path / "tp1", "ALLA", *chunked))
    torchrun(2, trainer, *distill_flags(work, tmp_path / "tp2sp", "ALLA", *chunked, "--tensor-model-parallel-size", 2,
                                        "--sequence-parallel"))
    one, two = metrics(tmp_path / "tp1"), metrics(tmp_path / "tp2sp")
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)


@pytest.mark.parametrize("twins", [[], ["--attention-twins"]], ids=["rnn", "attention_twins"])
def test_align_with_tp2_sequence_parallel_matches_one_process(tmp_path, twins):
    """Align's per-token loss is taken after each layer's mixer, where under SP every TP rank holds its own
    slice of the sequence: the slices' sums add up over TP, and the TP=2 + SP curve equals the one-process one
    (with the attention twins, whose heads TP splits as the teacher's)."""
    work = make_distill_work(tmp_path)
    trainer = os.path.join(ROOT, "pretrain_hypenet.py")

    def align_flags(save, *extra):  # distill's run, less its --load and --layer-pattern (align takes the teacher)
        flags = distill_flags(work, save, "ALLA", *extra)
        drop = {flags.index("--load"), flags.index("--layer-pattern")}
        flags = [f for i, f in enumerate(flags) if not drop & {i, i - 1}]
        flags[flags.index("--stage") + 1] = "align"
        return flags

    torchrun(1, trainer, *align_flags(tmp_path / "align_tp1", *twins))
    torchrun(2, trainer, *align_flags(tmp_path / "align_tp2sp", *twins, "--tensor-model-parallel-size", 2,
                                      "--sequence-parallel"))
    one, two = metrics(tmp_path / "align_tp1"), metrics(tmp_path / "align_tp2sp")
    assert len(one) == len(two) == 5 and one[-1]["loss"] < one[0]["loss"]
    saved = read_model_description(checkpoint.resolve(str(tmp_path / "align_tp2sp")))
    assert saved["attention_twins"] is bool(twins)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)


def test_sequence_parallel_needs_tensor_parallel():
    from megatron_hypenet.config import make_config

    with pytest.raises(ValueError, match="sequence"):
        make_config(num_layers=2, hidden_size=64, num_attention_heads=4, sequence_parallel=True)
