"""--zero-stage 3 (DeepSpeed ZeRO-3 over the student, teacher outside the engine) against the plain
data-parallel trainer at world size 2 (gloo): same losses, same weights, exact resume, and its
checkpoint is an ordinary one that the next stage loads."""

import os
import shutil

import pytest

pytest.importorskip("deepspeed")

from helpers import ROOT, distill_flags, make_distill_work, torchrun  # noqa: E402
from helpers import metrics as _metrics  # noqa: E402
from megatron_hypenet import checkpoint  # noqa: E402

PATTERN = "ALLA"
ITERS = 5
TRAINER = os.path.join(ROOT, "pretrain_hypenet.py")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_distill_work(tmp_path_factory.mktemp("zero3"), PATTERN)


def _flags(work, save, *extra):
    return distill_flags(work, save, PATTERN, *extra)


def _weights(root):
    path = checkpoint.resolve(str(root))
    meta = checkpoint.tensor_metadata(path)
    return {k: checkpoint.load_global_tensor(path, k, meta) for k in meta}


@pytest.fixture(scope="module")
def runs(work):
    plain, zero = work / "plain", work / "zero"
    torchrun(2, TRAINER, *_flags(work, plain), timeout=600)
    torchrun(2, TRAINER, *_flags(work, zero, "--zero-stage", 3), timeout=600)
    return _metrics(plain), _metrics(zero)


def test_zero3_losses_equal_plain_data_parallel(runs):
    plain, zero = runs
    assert [m["iteration"] for m in zero] == list(range(1, ITERS + 1))
    # 2 micro-batches per rank and step (gradient accumulation); clipping active (norm > --clip-grad 0.05)
    assert sum(m["grad_norm"] > 0.05 for m in plain) >= 2
    for p, z in zip(plain, zero):
        assert z["loss"] == pytest.approx(p["loss"], rel=1e-5), (p, z)
        assert z["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-4), (p, z)
        assert z["lr"] == p["lr"]
    assert plain[-1]["loss"] < plain[0]["loss"]


def test_zero3_checkpoint_holds_the_full_trained_weights(work, runs):
    plain, zero = _weights(work / "plain"), _weights(work / "zero")
    assert set(plain) == set(zero) and plain
    initial = _weights(work / "hybrid")
    for key, value in plain.items():
        # Adam's normalised steps amplify 1e-7-relative gradient differences where its second moment is
        # tiny: compare with how far training moved the tensor (measured: under 1e-3 of it everywhere)
        moved = (value - initial[key]).abs().max()
        assert moved > 0, key
        assert (zero[key] - value).abs().max() <= 1e-3 * moved, key
    assert os.path.isdir(work / "zero" / "zero3" / f"iter_{ITERS:07d}")


def test_zero3_resumes_exactly(work, runs):
    """Cut the ZeRO-3 run back to its iteration-3 checkpoint and resume: iterations 4 and 5 repeat exactly."""
    _, zero = runs
    resumed = work / "zero_resumed"
    shutil.copytree(work / "zero", resumed)
    shutil.rmtree(resumed / f"iter_{ITERS:07d}")
    shutil.rmtree(resumed / "zero3" / f"iter_{ITERS:07d}")
    (resumed / checkpoint.TRACKER).write_text("3")
    torchrun(2, TRAINER, *_flags(work, resumed, "--zero-stage", 3), timeout=600)
    again = _metrics(resumed)
    assert [m["iteration"] for m in again] == list(range(1, ITERS + 1))
    for a, b in zip(again[3:], zero[3:]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_next_stage_loads_the_zero3_checkpoint(work, runs):
    """The finetune stage (plain trainer, one process) starts from the ZeRO-3 distill checkpoint."""
    save = work / "finetune"
    flags = ["--stage", "finetune", "--load", work / "zero", "--data-path", work / "data" / "corpus",
             "--seq-length", 64, "--micro-batch-size", 2, "--split", "90,10,0", "--train-iters", 1,
             "--no-progress", "--save", save]
    torchrun(1, TRAINER, *flags, timeout=600)
    assert len(_metrics(save)) == 1


def test_unsupported_layouts_are_refused():
    from megatron_hypenet.arguments import parse_args

    base = ["--stage", "finetune", "--load", "x", "--data-path", "x", "--zero-stage", "3"]
    with pytest.raises(SystemExit):
        parse_args(base + ["--tensor-model-parallel-size", "2"])
    with pytest.raises(SystemExit):
        parse_args(["--stage", "finetune", "--load", "x", "--data-path", "x", "--deepspeed-config", "ds.json"])


@pytest.fixture(scope="module")
def mixers_runs(work):
    """--train-only-mixers under the plain trainer and under ZeRO-3, world size 2."""
    plain, zero = work / "mixers_plain", work / "mixers_zero"
    torchrun(2, TRAINER, *_flags(work, plain, "--train-only-mixers"), timeout=600)
    torchrun(2, TRAINER, *_flags(work, zero, "--train-only-mixers", "--zero-stage", 3), timeout=600)
    return plain, zero


def test_zero3_trains_only_the_mixers(work, mixers_runs):
    """With --train-only-mixers, ZeRO-3 takes the plain trainer's steps, and both leave every weight outside the
    token mixers (embeddings, MLPs, norms) exactly as loaded while the mixers move."""
    plain, zero = mixers_runs
    for p, z in zip(_metrics(plain), _metrics(zero)):
        assert z["loss"] == pytest.approx(p["loss"], rel=1e-5), (p, z)
        assert z["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-4), (p, z)
    initial = _weights(work / "hybrid")
    for run in (plain, zero):
        trained = _weights(run)
        assert set(trained) == set(initial)
        mixers = [k for k in trained if ".self_attention." in k]
        assert mixers and len(mixers) < len(trained)
        for key, value in trained.items():
            if key in mixers:
                assert not value.equal(initial[key]) or "norm" in key, (run.name, key)
            else:
                assert value.equal(initial[key]), (run.name, key)
        assert any(not trained[k].equal(initial[k]) for k in mixers if "norm" not in k)


def test_zero3_applies_the_non_mixer_lr_mult(work, runs):
    """--non-mixer-lr-mult: DeepSpeed keeps the groups' lr_mult, so ZeRO-3 takes the plain trainer's steps, which the
    multiple moves off the all-at---lr curve."""
    plain, zero = work / "non_mixer_plain", work / "non_mixer_zero"
    torchrun(2, TRAINER, *_flags(work, plain, "--non-mixer-lr-mult", 0.3), timeout=600)
    torchrun(2, TRAINER, *_flags(work, zero, "--non-mixer-lr-mult", 0.3, "--zero-stage", 3), timeout=600)
    everything, _ = runs
    assert abs(_metrics(plain)[-1]["loss"] - everything[-1]["loss"]) > 1e-3 * everything[-1]["loss"]
    for p, z in zip(_metrics(plain), _metrics(zero)):
        assert z["loss"] == pytest.approx(p["loss"], rel=1e-5), (p, z)
        assert z["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-4), (p, z)
