"""Operations (issue #6): exact resume after a real kill, pre-emption signals, a kill in the middle of a
checkpoint write, bad inputs that must leave checkpoints untouched, the NaN policy, metrics and config.

The trainer runs as `python pretrain_hypenet.py ...` in subprocesses (own process group, so a kill
takes dist_checkpointing's helper process too); the bad-input, NaN and async-snapshot cases run
in-process. A tiny 2-layer teacher on generated text is made once for the module; the uninterrupted
baselines run in the background while the tests start their own runs (2 cores: two trainers at a time).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, folder_hash
from megatron_hypenet.parallel import PROCESS_GROUP_ENV

PRETRAIN = os.path.join(ROOT, "pretrain_hypenet.py")
ITERS, KILL_AT, SAVE_INTERVAL = 8, 4, 2
RECIPE = {"seed": 0, "data": {"generate_corpus": {"num_docs": 300, "seed": 0}},
          "make_tiny_teacher": {"tokenizer_vocab_size": 400, "hidden_size": 64, "num_layers": 2, "heads": 4,
                                "kv_heads": 2, "head_dim": 16, "ffn": 128, "tie": True}}
COMMON = ["--seq-length", "64", "--micro-batch-size", "4", "--split", "90,10,0", "--lr", "3e-3",
          "--lr-decay-style", "wsd", "--lr-warmup-iters", "2", "--eval-iters", "1", "--log-interval", "1",
          "--no-progress"]
TRACKER = "latest_checkpointed_iteration.txt"


# ---- helpers ---------------------------------------------------------------------------------------

def metrics(save):
    path = os.path.join(save, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def losses(save):
    rows = metrics(save)
    assert [r["iteration"] for r in rows] == list(range(1, len(rows) + 1)), "duplicated or missing iterations"
    return [r["loss"] for r in rows]


def tracker(save):
    try:
        return int(open(os.path.join(save, TRACKER)).read())
    except (OSError, ValueError):
        return None


class Run:
    """One trainer subprocess in its own process group; output goes to <save>.log."""

    def __init__(self, cmd, save, env=None):
        self.save, self.log = save, save + ".log"
        full_env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_ENV}  # not this process's group
        full_env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
                        **(env or {}))
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait(self, expect=0, timeout=240):
        try:
            rc = self.proc.wait(timeout)
        finally:  # also ends helpers a trainer that died hard (os._exit, SIGKILL) left behind
            self.signal_group(signal.SIGKILL)
        assert rc == expect, f"exit code {rc} (expected {expect}):\n{open(self.log).read()[-4000:]}"
        return self

    def signal_group(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill_after_checkpoint(self, k, timeout=180):
        """SIGKILL (the whole group) once iteration >= k is checkpointed and a later step has been logged."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            t = tracker(self.save)
            if t is not None and t >= k and len(metrics(self.save)) > t:
                break
            assert self.proc.poll() is None, f"trainer ended early:\n{open(self.log).read()[-4000:]}"
            time.sleep(0.01)
        self.signal_group(signal.SIGKILL)
        self.proc.wait(60)
        return tracker(self.save), len(metrics(self.save))


class Env:
    def __init__(self, work, hf, prefix, teacher):
        self.work, self.hf, self.prefix, self.teacher = str(work), hf, prefix, teacher
        self.runs = {}

    def path(self, name):
        return os.path.join(self.work, name)

    def cmd(self, stage, save, *extra):
        args = ["--stage", stage, "--save", save, "--data-path", self.prefix, "--tokenizer", self.hf, *COMMON]
        if stage == "pretrain":
            args += ["--load", self.teacher]
        else:
            args += ["--teacher", self.teacher]
        if stage == "distill":
            args += ["--load", self.path("align"), "--layer-pattern", "LA"]
        return [sys.executable, PRETRAIN, *args, *extra]

    def train_cmd(self, stage, save):
        return self.cmd(stage, save, "--train-iters", str(ITERS), "--save-interval", str(SAVE_INTERVAL))

    def start_baseline(self, stage):
        if stage not in self.runs:
            save = self.path("align" if stage == "align" else f"{stage}_baseline")
            cmd = self.train_cmd(stage, save) if stage != "align" else self.cmd("align", save, "--train-iters", "4")
            if stage == "distill":
                self.baseline("align")
            self.runs[stage] = Run(cmd, save)
        return self.runs[stage]

    def start_config_run(self):
        """`--config <baseline>/config.yaml` into another folder; started early so it overlaps another test."""
        if "from_config" not in self.runs:
            config = os.path.join(self.start_baseline("pretrain").save, "config.yaml")
            while not os.path.exists(config):  # the baseline writes it before its first step
                assert self.runs["pretrain"].proc.poll() is None, "the pretrain baseline ended without config.yaml"
                time.sleep(0.1)
            save = self.path("from_config")
            self.runs["from_config"] = Run([sys.executable, PRETRAIN, "--config", config, "--save", save], save)
        return self.runs["from_config"]

    def baseline(self, stage):
        """The save folder of the uninterrupted run of `stage` (started in the background if needed)."""
        run = self.start_baseline(stage)
        if run.proc.returncode is None:
            run.wait()
        return run.save


def make_env(work) -> Env:
    """The tiny teacher (converted to a checkpoint) and its data in `work`; no run is started."""
    from megatron_hypenet.convert import hf_to_mcore
    from megatron_hypenet.recipe import _prepare_teacher_and_data

    hf, prefix = _prepare_teacher_and_data(RECIPE, str(work))
    teacher = os.path.join(str(work), "teacher")
    hf_to_mcore(hf, teacher)
    return Env(work, hf, prefix, teacher)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = make_env(tmp_path_factory.mktemp("ops"))
    e.start_baseline("pretrain")  # both uninterrupted baselines the kill tests compare against
    e.start_baseline("align")
    yield e
    for run in e.runs.values():
        if run.proc.poll() is None:
            run.signal_group(signal.SIGKILL)


def run_in_process(stage, options):
    from megatron_hypenet.recipe import run_stage

    return run_stage(stage, {"seq_length": 64, "micro_batch_size": 4, "split": "90,10,0", "eval_iters": 1,
                             "no_progress": True, **options})


def load_all(save):
    """Reads every tensor and the plain state of the latest checkpoint (what a resume reads)."""
    from megatron.core import dist_checkpointing

    from megatron_hypenet import checkpoint, parallel

    parallel.ensure_process_group()
    path = checkpoint.resolve(save)
    meta = checkpoint.tensor_metadata(path)
    for key in meta:
        assert checkpoint.load_global_tensor(path, key, meta).isfinite().all()
    return dist_checkpointing.load_common_state_dict(path)["state"]


# ---- 1. a real kill at step k, then the same command: the same loss curve, bit for bit ------------------

ASYNC = "--async-save"
BACKGROUND = "in the background (--async-save)"  # logged by each async save


@pytest.mark.parametrize("stage, extra", [("pretrain", ()), ("distill", ()), ("pretrain", (ASYNC,))],
                         ids=["pretrain", "distill", "pretrain-async-save"])
def test_kill_then_resume_reproduces_the_uninterrupted_run(env, stage, extra):
    """With --async-save the killed run's checkpoints were written in the background (one may be in flight
    at the kill) and compared with the synchronous baseline: the async write must hold the state at the save."""
    if stage == "distill":
        env.baseline("align")
        env.start_baseline("distill")
    save = env.path(f"{stage}_killed" + ("_async" if extra else ""))
    cmd = env.train_cmd(stage, save) + list(extra)
    at, rows = Run(cmd, save).kill_after_checkpoint(KILL_AT)
    assert at >= KILL_AT and rows >= at  # rows past `at` are steps the resumed run repeats
    Run(cmd, save).wait()  # the same command resumes
    log = open(save + ".log").read()
    assert "resumed %s at iteration %d" % (stage, at) in log
    assert (BACKGROUND in log) == bool(extra)
    expected = losses(env.baseline(stage))
    assert len(expected) == ITERS
    assert losses(save) == expected  # exact; losses() also refuses duplicated iterations
    assert [r["lr"] for r in metrics(save)] == [r["lr"] for r in metrics(env.baseline(stage))]
    assert tracker(save) == ITERS
    assert sorted(d for d in os.listdir(save) if d.startswith("iter_")) == ["iter_0000006", "iter_0000008"]  # keep-last 2


def test_muon_resumes_exactly_with_its_momentum(env):
    """--optimizer muon: the weight matrices inside the layers take Muon, the rest (tied embedding, norm gains)
    AdamW, and both states travel in the checkpoint: a run killed after a save resumes on the uninterrupted run's
    losses, bit for bit."""
    muon = ("--optimizer", "muon")
    full, killed = env.path("muon_full"), env.path("muon_killed")
    env.baseline("align")
    uninterrupted = Run(env.train_cmd("distill", full) + list(muon), full)
    cmd = env.train_cmd("distill", killed) + list(muon)
    at, _ = Run(cmd, killed).kill_after_checkpoint(KILL_AT)
    Run(cmd, killed).wait()
    assert "resumed distill at iteration %d" % at in open(killed + ".log").read()
    uninterrupted.wait()
    assert len(losses(full)) == ITERS and losses(killed) == losses(full)
    assert losses(full)[1:] != losses(env.baseline("distill"))[1:]  # the same batches, stepped otherwise than AdamW

    from megatron.core import dist_checkpointing

    from megatron_hypenet import checkpoint

    keys = dist_checkpointing.load_tensors_metadata(checkpoint.resolve(full))
    muon_keys = {k.split(".", 3)[3] for k in keys if k.startswith("optimizer.state.momentum_buffer.")}
    adamw_keys = {k.split(".", 3)[3] for k in keys if k.startswith("optimizer.state.exp_avg.")}
    model_keys = {k for k in keys if not k.startswith("optimizer.")}
    assert muon_keys and not muon_keys & adamw_keys and muon_keys | adamw_keys == model_keys
    assert any("linear_qkv.weight" in k for k in muon_keys) and any("linear_fc1.weight" in k for k in muon_keys)
    assert not [k for k in muon_keys if "embedding" in k or "norm" in k or "conv" in k]


# ---- 2. SIGTERM (to the whole process group, as Slurm does): checkpoint, exit code 0 ---------------------

@pytest.mark.parametrize("sig, extra", [(signal.SIGTERM, ()), (signal.SIGTERM, (ASYNC, "--save-interval", "1"))],
                         ids=["sync", "async-save"])
def test_preemption_signal_saves_and_exits_cleanly(env, sig, extra):
    """With --async-save and a save every iteration, a background write is mostly in flight when the signal
    comes (to the writer processes too): the trainer still commits a final checkpoint at the stop."""
    save = env.path("preempted" + ("_async" if extra else ""))
    run = Run(env.cmd("pretrain", save, "--train-iters", "500", *extra), save)
    t0 = time.time()
    while len(metrics(save)) < 3:
        assert run.proc.poll() is None and time.time() - t0 < 180, open(run.log).read()[-4000:]
        time.sleep(0.02)
    t_signal = time.time()
    run.signal_group(sig)
    run.wait(expect=0, timeout=60)
    assert time.time() - t_signal < 30, "pre-emption exit took too long"
    stopped = metrics(save)[-1]["iteration"]
    assert tracker(save) == stopped < 500
    assert not [d for d in os.listdir(save) if d.endswith(".tmp")]
    state = load_all(save)
    assert state["iteration"] == stopped and state["consumed_samples"] == 4 * stopped and state["stage"] == "pretrain"
    log = open(run.log).read()
    assert '"preempted": true' in log
    assert (BACKGROUND in log) == bool(extra)


def test_preempted_recipe_stops_before_the_next_stage(tmp_path):
    """tools/halo.py: SIGTERM during the teacher's pretraining checkpoints it and ends the whole recipe
    (exit 0); align must not start from the half-trained teacher. Re-running the command resumes the
    pretraining where it stopped (and a second signal stops it again)."""
    import yaml

    recipe = {**RECIPE, "common": {"seq_length": 64, "micro_batch_size": 4, "split": "90,10,0", "log_interval": 1,
                                   "no_progress": True},
              "stages": {"pretrain": {"train_iters": 500, "lr": 3e-3}, "align": {"train_iters": 2},
                         "distill": {"train_iters": 2, "layer_pattern": "LA"}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    work = str(tmp_path / "run")
    teacher = os.path.join(work, "checkpoints", "teacher")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "halo.py"), "--recipe", str(tmp_path / "recipe.yaml"),
           "--work-dir", work]
    stops = []
    for attempt in range(2):
        run = Run(cmd, str(tmp_path / f"attempt{attempt}"))
        t0 = time.time()
        while not metrics(teacher) or metrics(teacher)[-1]["iteration"] < (stops[-1] if stops else 0) + 3:
            assert run.proc.poll() is None and time.time() - t0 < 300, open(run.log).read()[-4000:]
            time.sleep(0.02)
        run.signal_group(signal.SIGTERM)
        run.wait(expect=0, timeout=120)
        stops.append(tracker(teacher))
        assert stops[-1] == metrics(teacher)[-1]["iteration"] < 500
        assert "recipe pre-empted: pretrain stopped at iteration" in open(run.log).read()
        assert not os.path.exists(os.path.join(work, "checkpoints", "align"))
    assert stops[1] > stops[0]
    assert [r["iteration"] for r in metrics(teacher)] == list(range(1, stops[1] + 1))  # resumed, not restarted


# ---- 3. a kill in the middle of a checkpoint write ------------------------------------------------------

@pytest.mark.parametrize("extra", [(), (ASYNC,)], ids=["sync", "async-save"])
def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(env, extra):
    """The hook exits after iteration KILL_AT's tensors are written (sync) or while their background write
    is in flight (async: the trainer dies right after starting the writer, which the group kill then ends)."""
    env.start_config_run()  # (test_config_file_reproduces_the_run's run, in parallel with this one)
    save = env.path("died_in_save" + ("_async" if extra else ""))
    cmd = env.train_cmd("pretrain", save) + list(extra)
    Run(cmd, save, env={"HYPENET_TEST_DIE_IN_SAVE": str(KILL_AT)}).wait(expect=1)
    previous = KILL_AT - SAVE_INTERVAL
    assert tracker(save) == previous
    partial = os.path.join(save, f"iter_{KILL_AT:07d}.tmp")
    assert os.path.isdir(partial)  # started, never renamed
    # sync: the write had finished (metadata.json is its last file); async: it was never finalized
    assert os.path.exists(os.path.join(partial, "metadata.json")) != bool(extra)
    assert not os.path.exists(os.path.join(save, f"iter_{KILL_AT:07d}"))
    assert load_all(save)["iteration"] == previous
    Run(cmd, save).wait()
    assert f"resumed pretrain at iteration {previous}" in open(save + ".log").read()
    assert not [d for d in os.listdir(save) if d.endswith(".tmp")]  # the stale partial save was removed
    assert losses(save) == losses(env.baseline("pretrain"))


def check_async_save_holds_the_state_at_the_save(teacher, save, device="cpu"):
    """Saves asynchronously, then takes an AdamW step at once (before the background write can have read
    the tensors): the committed checkpoint must hold the parameters and moments of the moment of the save."""
    import torch

    from megatron_hypenet import checkpoint, parallel
    from megatron_hypenet.config import config_from_description, read_model_description
    from megatron_hypenet.model import build_model

    # the group is destroyed after, if made here: NCCL warns at exit of a pytest process that kept one
    with parallel.process_group():
        parallel.initialize(1, 1)
        desc = read_model_description(checkpoint.resolve(teacher))

        def model_and_optimizer():
            model = build_model(config_from_description(desc), desc["vocab_size"], desc["tie_word_embeddings"])
            return model.to(device), torch.optim.AdamW(model.parameters(), lr=0.1)

        def step(model, optimizer):
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            optimizer.step()

        def snapshot(model, optimizer):
            moments = [t for s in optimizer.state.values() for k, t in sorted(s.items()) if k != "step"]
            return [t.detach().cpu().clone() for t in [*model.parameters(), *moments]]

        model, optimizer = model_and_optimizer()
        checkpoint.load_checkpoint(teacher, model, desc, load_state=False)
        step(model, optimizer)
        at_save = snapshot(model, optimizer)
        saves = checkpoint.AsyncSaves()
        path = checkpoint.save_checkpoint(save, 1, model, desc, optimizer, {"iteration": 1}, async_saves=saves)
        step(model, optimizer)  # in place, while the write runs
        assert len(saves) == 1 and tracker(save) is None and not os.path.exists(path)  # committed only by poll/wait
        saves.wait()
        assert len(saves) == 0 and tracker(save) == 1 and os.path.isdir(path)
        loaded, loaded_optimizer = model_and_optimizer()
        checkpoint.load_checkpoint(save, loaded, desc, loaded_optimizer)
        after = snapshot(model, optimizer)
        got = snapshot(loaded, loaded_optimizer)
        assert len(got) == len(at_save) == len(after) > 0
        assert all(not torch.equal(a, b) for a, b in zip(at_save, after))  # the step changed every tensor
        assert all(torch.equal(g, a) for g, a in zip(got, at_save))


def test_async_save_holds_the_state_at_the_save(env):
    check_async_save_holds_the_state_at_the_save(env.teacher, env.path("async_snapshot"))


# ---- 4. config.yaml reproduces the run --------------------------------------------------------------------

def test_config_file_reproduces_the_run(env):
    import yaml

    base = env.baseline("pretrain")
    run = env.start_config_run()
    if run.proc.returncode is None:
        run.wait()
    save = run.save
    assert losses(save) == losses(base)
    a, b = (yaml.safe_load(open(os.path.join(d, "config.yaml"))) for d in (base, save))
    assert a.pop("save") == base and b.pop("save") == save and a == b


# ---- 5. bad inputs: a clear error naming the fix, checkpoints byte-identical -------------------------------

def _teacher_with_vocab(env, name, vocab_size):
    from transformers import AutoTokenizer

    from megatron_hypenet.convert import hf_to_mcore
    from megatron_hypenet.tiny import save_random_qwen3

    out = env.path(name)
    if not os.path.exists(os.path.join(out, TRACKER)):
        tok = AutoTokenizer.from_pretrained(env.hf)
        spec = {k: v for k, v in RECIPE["make_tiny_teacher"].items() if k != "tokenizer_vocab_size"}
        save_random_qwen3(out + "_hf", seed=1, tokenizer_dir=env.hf, vocab_size=vocab_size,
                          eos_token_id=tok.eos_token_id, **spec)
        hf_to_mcore(out + "_hf", out)
    return out


def _copy(env, stage, name):
    dst = env.path(name)
    if not os.path.exists(dst):
        shutil.copytree(env.baseline(stage), dst)
    return dst


def _case_corrupt(env):
    save = _copy(env, "pretrain", "corrupt")
    shard = os.path.join(save, f"iter_{ITERS:07d}", "__0_1.distcp")
    with open(shard, "r+b") as f:  # truncated, as by a full disk
        f.truncate(os.path.getsize(shard) // 2)
    return "pretrain", {"load": env.teacher, "save": save}, r"truncated or corrupt; resume from an earlier one with --ckpt-step 6"


def _case_layer_pattern(env):
    return "distill", {"teacher": env.teacher, "load": env.path("align"), "save": _copy(env, "distill", "other_pattern"),
                       "layer_pattern": "AL"}, r"layer_pattern='LA' but this model has layer_pattern='AL'.*new --save folder"


def _case_vocab(env):
    return "pretrain", {"load": _teacher_with_vocab(env, "teacher_v512", 512), "save": _copy(env, "pretrain", "intact")}, \
        r"vocab_size=\d+ but this model has vocab_size=512"


def _case_tokenizer(env):
    return "pretrain", {"load": _teacher_with_vocab(env, "teacher_v256", 256), "save": _copy(env, "pretrain", "intact")}, \
        r"has \d+ tokens .* vocab_size 256: it is not this teacher's tokenizer. Pass the teacher's HF folder with --tokenizer"


def _case_missing_data(env):
    return "pretrain", {"load": env.teacher, "save": _copy(env, "pretrain", "intact"),
                        "data_path": env.path("nowhere/corpus")}, r"(?s)nowhere/corpus.bin not found. Create .*tools/preprocess_data.py"


def _case_empty_data(env):
    empty = env.path("empty/corpus")
    os.makedirs(os.path.dirname(empty), exist_ok=True)
    for ext in (".bin", ".idx"):
        open(empty + ext, "wb").close()
    return "pretrain", {"load": env.teacher, "save": _copy(env, "pretrain", "intact"), "data_path": empty}, \
        r"(?s)empty dataset .*tools/preprocess_data.py"


def _case_seq_length(env):
    return "pretrain", {"load": env.teacher, "save": _copy(env, "pretrain", "intact"), "seq_length": 200_000}, \
        r"fewer than seq_length \+ 1 = 200001.*Use a shorter sequence length"


def _case_layout(env):
    return "pretrain", {"load": env.teacher, "save": _copy(env, "pretrain", "intact"), "tensor_model_parallel_size": 2}, \
        r"world size 1 is not divisible by TP x PP x CP = 2 x 1 x 1; launch a multiple of 2 processes"


def _case_other_optimizer(env):
    return "pretrain", {"load": env.teacher, "save": _copy(env, "pretrain", "intact"), "optimizer": "muon"}, \
        r"has no optimizer state 'optimizer.state.momentum_buffer.*saved by another optimizer.*new --save folder"


def _case_other_lr_mult(env):
    return "distill", {"teacher": env.teacher, "load": env.path("align"), "save": _copy(env, "distill", "other_mult"),
                       "layer_pattern": "LA",
                       "non_mixer_lr_mult": 0.3}, \
        r"trained with no --non-mixer-lr-mult, this run asks for --non-mixer-lr-mult 0.3: resume with the same flag"


BAD_INPUTS = {"corrupt_checkpoint": _case_corrupt, "other_optimizer": _case_other_optimizer,
              "other_lr_mult": _case_other_lr_mult, "other_layer_pattern": _case_layer_pattern,
              "other_vocabulary": _case_vocab, "tokenizer_larger_than_vocab": _case_tokenizer,
              "missing_data_prefix": _case_missing_data, "empty_data": _case_empty_data,
              "seq_length_above_data": _case_seq_length, "impossible_parallel_layout": _case_layout}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_clearly_and_leaves_checkpoints_intact(env, case):
    stage, options, message = BAD_INPUTS[case](env)
    options = {"data_path": env.prefix, "tokenizer": env.hf, "train_iters": ITERS, **options}
    before = folder_hash(options["save"])
    with pytest.raises(Exception, match=message):
        run_in_process(stage, options)
    assert folder_hash(options["save"]) == before


def test_muon_refuses_layouts_that_split_its_matrices(capsys):
    from megatron_hypenet.arguments import parse_args

    base = ["--stage", "pretrain", "--load", "x", "--data-path", "x", "--optimizer", "muon"]
    for flags, named in ((["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size > 1"),
                         (["--use-distributed-optimizer"], "--use-distributed-optimizer"),
                         (["--zero-stage", "3"], "--zero-stage 3")):
        with pytest.raises(SystemExit):
            parse_args(base + flags)
        err = capsys.readouterr().err
        assert f"--optimizer muon orthogonalises whole weight matrices, which {named} split" in err, err
    assert parse_args(base + ["--pipeline-model-parallel-size", "2"]).optimizer == "muon"


# ---- 6. NaN / Inf: skipped (and logged) or stop ---------------------------------------------------------

def test_nan_policy_skip_and_stop_are_logged(env, monkeypatch):
    import torch

    from megatron_hypenet import training

    real_build = training.build_stage

    def build_with_a_nan_at_iteration_3(args):
        stage = real_build(args)
        loss, calls = stage.loss, []

        def nan_loss(batch):
            calls.append(1)
            out = loss(batch)
            return out * float("nan") if len(calls) == 3 else out

        stage.loss = nan_loss
        return stage

    monkeypatch.setattr(training, "build_stage", build_with_a_nan_at_iteration_3)
    base = {"load": env.teacher, "data_path": env.prefix, "tokenizer": env.hf, "train_iters": 5, "lr": 3e-3}
    skip = env.path("nan_skip")
    result = run_in_process("pretrain", {**base, "save": skip, "nan_policy": "skip"})
    rows = metrics(skip)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5] and result["iterations"] == 5
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]
    assert math.isnan(rows[2]["loss"]) and math.isfinite(rows[3]["loss"]) and tracker(skip) == 5

    stop = env.path("nan_stop")
    with pytest.raises(FloatingPointError, match=r"non-finite loss/gradients at iteration 3 .*lower --lr"):
        run_in_process("pretrain", {**base, "save": stop, "nan_policy": "stop", "save_interval": 2})
    rows = metrics(stop)
    assert [r["iteration"] for r in rows] == [1, 2, 3] and rows[2]["skipped"] and math.isnan(rows[2]["loss"])
    assert tracker(stop) == 2  # the last good checkpoint is left as the latest
    assert torch.isfinite(torch.tensor([r["loss"] for r in rows[:2]])).all()


# ---- 7. metrics rows past the resumed iteration are dropped ----------------------------------------------

def test_resume_truncates_metrics_of_steps_after_the_checkpoint(tmp_path):
    from megatron_hypenet.training import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iteration": i, "loss": i}) + "\n" for i in range(1, 6)) + '{"iteration": 6, "lo')
    truncate_metrics(str(path), 3)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_weight_decay_spares_one_dimensional_parameters():
    """The plain AdamW path follows megatron-core's rule: 2-D weights decay, norm gains and
    per-head vectors (Gated DeltaNet's A_log, dt_bias) do not."""
    import torch

    from megatron_hypenet.optimizer import decay_groups

    vector, matrix = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))
    optimizer = torch.optim.AdamW(decay_groups([vector, matrix], 0.1), lr=0.5)
    for p in (vector, matrix):
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(vector.detach(), torch.ones(3))
    assert torch.allclose(matrix.detach(), torch.full((2, 2), 1 - 0.5 * 0.1))
    assert decay_groups([vector], 0.1) == [{"params": [vector], "weight_decay": 0.0, "lr_mult": 1.0}]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_non_mixer_lr_mult_scales_the_steps_outside_the_mixers(optimizer):
    """--non-mixer-lr-mult 0.25: with equal gradients, a weight outside the token mixers (here an MLP's; under Muon
    both are matrices on Muon, the norm gain on AdamW) moves a quarter as far as the mixer's; the group at 1x comes
    first."""
    import argparse

    import torch

    from megatron_hypenet.optimizer import build_optimizer, set_lr

    layer = torch.nn.Module()
    layer.self_attention, layer.mlp, layer.norm = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)
    model = torch.nn.Module()
    model.decoder = torch.nn.Module()
    model.decoder.layers = torch.nn.ModuleList([layer])
    with torch.no_grad():
        layer.mlp.weight.copy_(layer.self_attention.weight)
    args = argparse.Namespace(optimizer=optimizer, lr=1e-2, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                              non_mixer_lr_mult=0.25)
    opt = build_optimizer(args, [model], model.parameters())
    assert opt.param_groups[0]["lr_mult"] == 1.0 and {g["lr_mult"] for g in opt.param_groups} == {1.0, 0.25}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gradient = torch.randn(4, 4)
    for name, p in model.named_parameters():
        p.grad = gradient.clone() if p.ndim == 2 else torch.ones_like(p)
    set_lr(opt, args.lr)
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert moved["decoder.layers.0.mlp.weight"] == pytest.approx(0.25 * moved["decoder.layers.0.self_attention.weight"],
                                                                 rel=1e-3)
    assert moved["decoder.layers.0.self_attention.bias"] == pytest.approx(1e-2, rel=1e-3)  # Adam's first step: lr
    assert moved["decoder.layers.0.norm.weight"] == pytest.approx(0.25e-2, rel=1e-3)


def test_mixer_parameters_by_name_are_the_mixers_that_train_alone():
    """The optimizer finds the token mixers by parameter name (--non-mixer-lr-mult, the distributed optimizer's
    override), freezing finds them by module (--train-only-mixers, align): on a HypeNet with attention twins both
    pick the same parameters, and both pick some and leave some."""
    from megatron_hypenet import parallel
    from megatron_hypenet.config import make_config
    from megatron_hypenet.halo.init import freeze_all_but_mixers
    from megatron_hypenet.model import build_model
    from megatron_hypenet.optimizer import is_mixer_parameter

    parallel.initialize(1, 1)
    try:
        config = make_config(hidden_size=32, num_layers=3, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                             ffn_hidden_size=64, layer_pattern="ALD", attention_twins=True,
                             use_cpu_initialization=True)
        model = build_model(config, 64, True)
        frozen_apart = {id(p) for p in freeze_all_but_mixers(model, rnn_only=False)}
        by_name = {id(p) for name, p in model.named_parameters() if is_mixer_parameter(name)}
        assert by_name == frozen_apart
        assert 0 < len(by_name) < len(list(model.parameters()))
        assert any(".attention_twin." in name for name, _ in model.named_parameters())
    finally:
        parallel.destroy()


def test_non_mixer_lr_mult_refuses_what_it_cannot_mean(capsys):
    from megatron_hypenet.arguments import parse_args

    base = ["--load", "x", "--teacher", "x", "--data-path", "x"]
    for flags, message in ((["--stage", "distill", "--non-mixer-lr-mult", "0"], "must be positive, not 0.0"),
                           (["--stage", "distill", "--non-mixer-lr-mult", "0.3", "--train-only-mixers"],
                            "which --train-only-mixers freezes: pass one of the two"),
                           (["--stage", "align", "--non-mixer-lr-mult", "0.3"], "nothing to scale in --stage align")):
        with pytest.raises(SystemExit):
            parse_args(base + flags)
        err = capsys.readouterr().err
        assert message in err, err
    assert parse_args(base + ["--stage", "finetune", "--non-mixer-lr-mult", "0.3"]).non_mixer_lr_mult == 0.3


def test_muon_graphed_and_compiled_needs_train_only_mixers(capsys):
    """The combination that crashed run 28's distill processes is refused before anything loads; each way out of
    it the message names is accepted."""
    from megatron_hypenet.arguments import parse_args

    base = ["--stage", "distill", "--load", "x", "--teacher", "x", "--data-path", "x", "--optimizer", "muon"]
    for flags in ([], ["--non-mixer-lr-mult", "0.3"]):
        with pytest.raises(SystemExit):
            parse_args(base + ["--cuda-graph", "--compile", *flags])
        err = capsys.readouterr().err
        assert "crashed on H100s ('CUDA error: unspecified launch failure', docs/results_run28.md)" in err, err
    for flags in (["--cuda-graph", "--compile", "--train-only-mixers"], ["--cuda-graph"], ["--compile"]):
        assert parse_args(base + flags).optimizer == "muon"
    assert parse_args(base[:-1] + ["adamw", "--cuda-graph", "--compile"]).cuda_graph


def test_plain_run_makes_its_group_without_a_port():
    """A plain `python` run (no torchrun) makes its one-process group on an in-process store: nothing listens on the
    MASTER_PORT it sets for other libraries, so trainers that start together (a recipe's ablation workers, the GPU
    tests' four runs) cannot take each other's port between one picking it and binding it. The group is made again
    after it is destroyed, as a recipe does stage after stage in one process."""
    check_plain_run_group()


def check_plain_run_group():
    """The check above, on the GPU when there is one (tests/gpu/test_process_group_gpu.py). There the process's GPU is
    set but the NCCL group not bound to it (parallel.ensure_process_group says why): no communicator is made before a
    collective needs one, and `parallel.barrier` names the device, so neither torch nor NCCL guesses it from the rank.
    """
    code = """
import os
import socket
import torch
import torch.distributed as dist
from megatron_hypenet import parallel
device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
for _ in range(2):
    with parallel.process_group():
        assert dist.get_world_size() == 1 and dist.get_rank() == 0 and os.environ["WORLD_SIZE"] == "1"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", int(os.environ["MASTER_PORT"]))) != 0, "a store listens on MASTER_PORT"
        if device.type == "cuda":
            assert dist.group.WORLD.bound_device_id is None and torch.cuda.current_device() == 0
        parallel.barrier()
        dist.barrier()  # as megatron-core's dataset builds and checkpoint saves call it: no device named
        t = torch.ones(2, device=device)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0]
    assert not dist.is_initialized()
print("made twice")
"""
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_ENV}
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "made twice" in out.stdout, out.stderr[-3000:]
    # torch's barrier() warning and NCCL's "Guessing device ID" both name device_id when a barrier has no device:
    # neither may show, for parallel.barrier nor for megatron-core's own barriers
    assert "device_id" not in out.stderr, out.stderr[-3000:]


def test_a_write_that_fails_midway_leaves_the_file_as_it_was(tmp_path):
    from megatron_hypenet.files import replaced_atomically

    path = str(tmp_path / "config.yaml")
    with replaced_atomically(path) as f:
        f.write("old\n")
    with pytest.raises(RuntimeError):
        with replaced_atomically(path) as f:
            f.write("half of the ne")
            raise RuntimeError("killed mid-write")
    assert open(path).read() == "old\n"
    with replaced_atomically(path) as f:
        f.write("new\n")
    assert open(path).read() == "new\n" and sorted(os.listdir(tmp_path)) == ["config.yaml"]
