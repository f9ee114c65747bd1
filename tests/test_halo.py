"""The four HALO stages end to end on a tiny local teacher, and the layer-selection rule."""

import json
import os

import pytest
import yaml

from megatron_hypenet.halo.select import (
    choose_attention_layers,
    default_num_attention_layers,
    importance_scores,
    pattern_with_attention,
    rescored_pattern,
)

RECIPE = {
    "name": "test",
    "seed": 0,
    "make_tiny_teacher": {"tokenizer_vocab_size": 400, "hidden_size": 64, "num_layers": 4, "heads": 4,
                          "kv_heads": 2, "head_dim": 16, "ffn": 128, "tie": True},
    "data": {"generate_corpus": {"num_docs": 400, "seed": 0}},
    # eval_interval 1: every step's held-out loss on the same validation batches (the training loss of a
    # 2-4 sequence batch is too noisy to show 15-30 steps of learning)
    "common": {"seq_length": 128, "micro_batch_size": 4, "split": "90,10,0", "no_progress": True, "eval_interval": 1},
    "stages": {
        "pretrain": {"train_iters": 30, "lr": 3.0e-3, "lr_decay_style": "constant"},
        "align": {"train_iters": 20, "lr": 3.0e-3, "lr_decay_style": "constant"},
        "select": {"num_attention_layers": 1, "select_examples": 2},
        "distill": {"train_iters": 20, "lr": 2.0e-3, "lr_decay_style": "constant"},
        "finetune": {"train_iters": 15, "lr": 1.0e-3, "seq_length": 256, "micro_batch_size": 2,
                     "lr_decay_style": "constant", "save_interval": 5},
    },
    "eval": {"needle_multipliers": [1, 4], "needle_examples": 2, "loss_samples": 4},
}


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    from megatron_hypenet.recipe import run_recipe

    work = tmp_path_factory.mktemp("halo")
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    report = run_recipe(str(path), str(work / "run"))
    return work / "run", report


def _losses(save_dir, key="loss"):
    return [json.loads(line)[key] for line in open(os.path.join(save_dir, "metrics.jsonl"))]


@pytest.mark.parametrize("stage, folder", [("pretrain", "teacher"), ("align", "align"), ("distill", "distill"),
                                           ("finetune", "finetune")])
def test_each_stage_reduces_its_loss(recipe_run, stage, folder):
    """The stage's own loss on the held-out batches, after its first step and after its last."""
    run, _ = recipe_run
    assert len(_losses(run / "checkpoints" / folder)) == RECIPE["stages"][stage]["train_iters"]
    held_out = _losses(run / "checkpoints" / folder, "valid_loss")
    assert held_out[-1] < held_out[0], f"{stage}: held-out loss went from {held_out[0]:.4f} to {held_out[-1]:.4f}"


def test_recipe_writes_pattern_exports_and_report(recipe_run):
    run, report = recipe_run
    pattern = (run / "checkpoints" / "select" / "layer_pattern.txt").read_text().strip()
    assert len(pattern) == 4 and pattern.count("A") == 1
    assert report["layer_pattern"] == pattern
    config = json.load(open(run / "hf_student" / "config.json"))
    assert config["model_type"] == "hypenet" and config["layer_pattern"] == pattern
    assert config["attention_rope"] is False and config["attention_query_scale_base"] == 256.0
    assert json.load(open(run / "hf_teacher" / "config.json"))["model_type"] == "qwen3"
    for row in report["models"].values():
        assert set(row) == {"valid_loss", "needle@1x", "needle@4x"}
        assert 0 < row["valid_loss"] < 10
    # the finetune stage kept the last 2 of its interval checkpoints
    kept = sorted(d for d in os.listdir(run / "checkpoints" / "finetune") if d.startswith("iter_"))
    assert kept == ["iter_0000010", "iter_0000015"]


def test_rerunning_a_finished_recipe_skips_every_stage(recipe_run, tmp_path):
    from megatron_hypenet.recipe import run_stage

    run, _ = recipe_run
    common = dict(RECIPE["common"], data_path=str(run / "data" / "corpus"), tokenizer=str(run / "teacher_hf_init"))
    result = run_stage("distill", {**common, "teacher": str(run / "checkpoints" / "teacher"),
                                   "load": str(run / "checkpoints" / "align"),
                                   "layer_pattern": str(run / "checkpoints" / "select" / "layer_pattern.txt"),
                                   "save": str(run / "checkpoints" / "distill"), **RECIPE["stages"]["distill"]})
    assert result["iterations"] == RECIPE["stages"]["distill"]["train_iters"]
    assert len(_losses(run / "checkpoints" / "distill")) == RECIPE["stages"]["distill"]["train_iters"]


def test_rerun_select_keeps_the_saved_selection(recipe_run, monkeypatch):
    """A re-run recipe must not redo the sweep: a different pattern would not match the distill
    checkpoint it resumes. A saved selection of another size is refused."""
    from megatron_hypenet.halo import select
    from megatron_hypenet.recipe import run_stage

    run, report = recipe_run
    monkeypatch.setattr(select, "retrieval_accuracy", lambda *a, **k: pytest.fail("the sweep ran again"))
    options = dict(RECIPE["common"], data_path=str(run / "data" / "corpus"), tokenizer=str(run / "teacher_hf_init"),
                   teacher=str(run / "checkpoints" / "teacher"), load=str(run / "checkpoints" / "align"),
                   save=str(run / "checkpoints" / "select"), **RECIPE["stages"]["select"])
    assert run_stage("select", options)["layer_pattern"] == report["layer_pattern"]
    with pytest.raises(ValueError, match="keeps 1 attention layers of 4, not the 2 of 4 asked for"):
        run_stage("select", {**options, "num_attention_layers": 2})
    with pytest.raises(ValueError, match="ranked the layers by --select-score ratio, not recall"):
        run_stage("select", {**options, "select_score": "recall"})


def test_train_only_mixers_keeps_the_rest_as_loaded(recipe_run, tmp_path):
    """distill --train-only-mixers: the exported student's embeddings, MLPs and norms are the teacher's
    (bit for bit), while its attention layers, which start as the teacher's, have moved."""
    from safetensors.torch import load_file

    from megatron_hypenet.convert import mcore_to_hf
    from megatron_hypenet.recipe import run_stage

    run, _ = recipe_run
    ck = run / "checkpoints"
    common = dict(RECIPE["common"], data_path=str(run / "data" / "corpus"), tokenizer=str(run / "teacher_hf_init"))
    run_stage("distill", {**common, "teacher": str(ck / "teacher"), "load": str(ck / "align"),
                          "layer_pattern": str(ck / "select" / "layer_pattern.txt"), "save": str(tmp_path / "d"),
                          **RECIPE["stages"]["distill"], "train_iters": 3, "train_only_mixers": True})
    mcore_to_hf(str(tmp_path / "d"), str(tmp_path / "hf"))
    student = load_file(str(tmp_path / "hf" / "model.safetensors"))
    teacher = load_file(str(run / "hf_teacher" / "model.safetensors"))
    kept = [k for k in student if ".self_attn." not in k and ".linear_attn." not in k]  # attention, RNN mixers
    assert any("mlp" in k for k in kept) and any("embed_tokens" in k for k in kept)
    for key in kept:
        assert student[key].float().equal(teacher[key].float()), key
    attention = [k for k in student if k.endswith(".self_attn.q_proj.weight")]
    assert attention
    for key in attention:  # the attention layers start as the teacher's: these moved in distill
        assert not student[key].float().equal(teacher[key].float()), key


def test_select_score_recall_ranks_by_the_recall_drop(recipe_run, tmp_path):
    """--select-score recall runs the same sweep and keeps the layers whose swap loses the most recall."""
    from megatron_hypenet.recipe import run_stage

    run, _ = recipe_run
    options = dict(RECIPE["common"], data_path=str(run / "data" / "corpus"), tokenizer=str(run / "teacher_hf_init"),
                   teacher=str(run / "checkpoints" / "teacher"), load=str(run / "checkpoints" / "align"),
                   save=str(tmp_path / "select"), **{**RECIPE["stages"]["select"], "num_attention_layers": 2},
                   select_score="recall")
    result = run_stage("select", options)
    recall, general = ([row[key] for row in result["layers"]] for key in ("recall", "general"))
    assert result["score"] == "recall"
    assert [row["importance"] for row in result["layers"]] == [max(recall) - r for r in recall]
    assert result["attention_layers"] == choose_attention_layers([max(recall) - r for r in recall], 2, general)
    assert json.loads((tmp_path / "select" / "selection.json").read_text())["score"] == "recall"


def test_selection_follows_the_importance_formula():
    recall = [0.9, 0.5, 0.9, 0.8]
    general = [-1.0, -1.05, -1.3, -1.0]
    eps = 1e-3
    imp = importance_scores(recall, general, eps=eps)
    assert imp[0] == 0 and imp[2] == 0
    assert imp[1] == pytest.approx(0.4 / (0.05 + eps))
    assert imp[3] == 50  # 0.1 / eps = 100, clipped
    assert choose_attention_layers(imp, 2) == [1, 3]
    assert choose_attention_layers(imp, 1) == [3]
    assert pattern_with_attention(4, [1, 3]) == "LALA"
    assert choose_attention_layers([1.0, 1.0, 0.0], 1) == [0]  # ties go to the earlier layer...
    assert choose_attention_layers([0.0, 0.0, 0.0], 1, general=[-1.0, -1.2, -1.1]) == [1]  # ...after the general drop
    with pytest.raises(ValueError, match="cannot keep 5 attention layers out of 4"):
        choose_attention_layers(imp, 5)
    assert default_num_attention_layers(28) == 4 and default_num_attention_layers(4) == 1


def test_recall_score_keeps_the_layers_run_7s_ratio_passed_over():
    """Run 7's sweep (docs/results/run7/report.json): layer 3's swap costs no general score and 0.06 recall,
    so the ratio keeps it over layer 7, whose swap takes recall from 0.60 to 0.23; the recall drop does not."""
    recall = [0.515625, 0.570312, 0.601562, 0.539062, 0.59375, 0.125, 0.078125, 0.226562, 0.59375, 0.59375, 0.578125,
              0.539062]
    general = [-1.290996, -1.252349, -1.249104, -1.249134, -1.249989, -1.297863, -1.295312, -1.296382, -1.2561,
               -1.252076, -1.256564, -1.295555]
    assert choose_attention_layers(importance_scores(recall, general), 3, general) == [3, 5, 6]
    assert choose_attention_layers(importance_scores(recall, general, score="recall"), 3, general) == [5, 6, 7]
    with pytest.raises(ValueError, match="selection score 'loss': known scores are"):
        importance_scores(recall, general, score="loss")
    # a recipe ablation with `layer_pattern: recall` re-ranks the main run's saved sweep, without running it again
    from megatron_hypenet.recipe import ablation_pattern

    selection = {"layer_pattern": "LLLALAALLLLL", "attention_layers": [3, 5, 6],
                 "layers": [{"layer": i, "recall": r, "general": g} for i, (r, g) in enumerate(zip(recall, general))]}
    assert rescored_pattern(selection, "recall") == "LLLLLAAALLLL"
    assert rescored_pattern(selection, "ratio") == selection["layer_pattern"]
    assert ablation_pattern({"layer_pattern": "recall"}, "LLLALAALLLLL", selection) == "LLLLLAAALLLL"
    spec = {"layer_pattern": "recall", "options": {"rnn_mixer": "gated_deltanet"}}
    assert ablation_pattern(spec, "LLLALAALLLLL", selection) == "DDDDDAAADDDD"
    with pytest.raises(ValueError, match="ranks the main run's selection sweep by that score: the recipe needs a"):
        ablation_pattern({"layer_pattern": "recall"}, "LLLALAALLLLL")
    # one more attention layer than the sweep kept: the next layer in each ranking joins
    assert rescored_pattern(selection, "recall", k=4) == "ALLLLAAALLLL"  # layer 0: recall drop 0.086, next after 7
    four = {"layer_pattern": "recall", "num_attention_layers": 4}
    assert ablation_pattern(four, "LLLALAALLLLL", selection) == rescored_pattern(selection, "recall", k=4)
    assert ablation_pattern({"layer_pattern": "even", "num_attention_layers": 4}, "LLLALAALLLLL") == "LLALLALLALLA"


def test_selection_eps_defaults_to_a_tenth_of_the_general_spread():
    """With a noise-sized eps, a layer whose swap barely moves either score outranks the layer whose swap
    loses all recall (docs/results_run1.md); the default eps keeps the recall drop in charge."""
    recall = [0.5, 0.45, 0.0, 0.5]
    general = [-1.72, -1.721, -1.80, -1.90]
    assert choose_attention_layers(importance_scores(recall, general, eps=1e-3), 1) == [1]
    imp = importance_scores(recall, general)
    eps = 0.1 * (1.90 - 1.72)
    assert imp[2] == pytest.approx(0.5 / (0.08 + eps)) and imp[1] == pytest.approx(0.05 / (0.001 + eps))
    assert choose_attention_layers(imp, 1) == [2]
    assert importance_scores([0.5, 0.0], [-1.0, -1.0]) == [0.0, 50.0]  # no spread: eps 1e-3


def _losses_at_cp1_and_cp2(run, tmp_path, *flags):
    """A 3-step run of `pretrain_hypenet.py` at CP=1 and at CP=2 (gloo): the two loss curves."""
    from helpers import ROOT, torchrun

    common = ["--data-path", run / "data" / "corpus", "--tokenizer", run / "teacher_hf_init", "--seq-length", 128,
              "--micro-batch-size", 2, "--split", "90,10,0", "--train-iters", 3, "--lr", 1e-3, "--no-progress"]
    losses = []
    for cp in (1, 2):
        save = tmp_path / f"cp{cp}"
        torchrun(cp, os.path.join(ROOT, "pretrain_hypenet.py"), *flags, *common, "--save", save,
                 "--context-parallel-size", cp)
        losses.append(_losses(save))
    return losses


def test_distill_with_context_parallel_matches_one_process(recipe_run, tmp_path):
    """The trainer splits each sequence over 2 CP ranks (gloo); the loss curve equals the unsplit run's."""
    run, _ = recipe_run
    ck = run / "checkpoints"
    one, two = _losses_at_cp1_and_cp2(run, tmp_path, "--stage", "distill", "--teacher", ck / "teacher",
                                      "--load", ck / "align", "--layer-pattern", ck / "select" / "layer_pattern.txt")
    assert len(one) == 3
    assert two == pytest.approx(one, abs=1e-5)


def test_gated_deltanet_align_with_context_parallel_matches_one_process(recipe_run, tmp_path):
    """Align of Gated DeltaNet layers (short convs too) with each sequence split over 2 CP ranks."""
    run, _ = recipe_run
    one, two = _losses_at_cp1_and_cp2(run, tmp_path, "--stage", "align", "--teacher", run / "checkpoints" / "teacher",
                                      "--rnn-mixer", "gated_deltanet", "--lightning-short-conv")
    assert len(one) == 3
    assert two == pytest.approx(one, abs=1e-5)


def test_attention_twins_align_and_start_distill(recipe_run, tmp_path):
    """align --attention-twins trains a HyPE attention twin of every layer beside its RNN twin; distill starts
    its attention layers from them (and its RNN layers from the RNN twins), while a RoPE-attention student,
    whose kind the twins are not, starts them from the teacher. At lr 0 distill's saved weights are its init."""
    from megatron_hypenet import checkpoint, parallel
    from megatron_hypenet.recipe import run_stage

    run, _ = recipe_run
    ck = run / "checkpoints"
    common = dict(RECIPE["common"], data_path=str(run / "data" / "corpus"), tokenizer=str(run / "teacher_hf_init"),
                  teacher=str(ck / "teacher"))
    run_stage("align", {**common, **RECIPE["stages"]["align"], "train_iters": 4, "attention_twins": True,
                        "save": str(tmp_path / "align")})
    # finite at every step: a twin's output at position 0 is the teacher's exactly (the clamped distance)
    losses = _losses(tmp_path / "align")
    assert len(losses) == 4 and all(0 < loss < float("inf") for loss in losses)
    assert _losses(tmp_path / "align", "valid_loss")[-1] < _losses(tmp_path / "align", "valid_loss")[0]

    def tensors(root, mixer, layer):
        parallel.ensure_process_group()
        path = checkpoint.resolve(str(root))
        meta = checkpoint.tensor_metadata(path)
        return {name: checkpoint.load_global_tensor(path, f"decoder.layers.{layer}.{mixer}.{name}", meta)
                for name in ("linear_qkv.weight", "linear_proj.weight")}

    # the selection sweep swaps RNN twins into the teacher (its RoPE attention is not the twins' kind)
    sweep = run_stage("select", {**common, **RECIPE["stages"]["select"], "load": str(tmp_path / "align"),
                                 "save": str(tmp_path / "select")})
    assert sweep["layer_pattern"].count("A") == 1
    pattern = "LALL"
    for kind, options in (("twin", {}), ("teacher", {"attention_rope": True, "attention_query_scale_base": 0})):
        run_stage("distill", {**common, **RECIPE["stages"]["distill"], "load": str(tmp_path / "align"),
                              "layer_pattern": pattern, "train_iters": 1, "lr": 0.0, "save": str(tmp_path / kind),
                              **options})
        student = tensors(tmp_path / kind, "self_attention", 1)
        twin, teacher = tensors(tmp_path / "align", "attention_twin", 1), tensors(ck / "teacher", "self_attention", 1)
        expected, other = (twin, teacher) if kind == "twin" else (teacher, twin)
        for name in student:
            assert student[name].equal(expected[name]) and not student[name].equal(other[name]), (kind, name)
        rnn = tensors(tmp_path / kind, "self_attention", 0)
        for name, t in tensors(tmp_path / "align", "self_attention", 0).items():
            assert rnn[name].equal(t), (kind, name)


def test_attention_twins_is_an_align_flag():
    from megatron_hypenet.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--stage", "distill", "--attention-twins", "--teacher", "t", "--load", "l", "--data-path", "d"])
    assert parse_args(["--stage", "align", "--attention-twins", "--teacher", "t", "--data-path", "d"]).attention_twins
