"""One-command HALO recipes: teacher -> data -> align -> select -> distill -> finetune -> HF export -> report.

Every stage runs through the same entry point as `pretrain_hypenet.py` with flags built from the
recipe, so a recipe is exactly a sequence of commands a user could type. A stage whose checkpoint is
already complete is skipped and an interrupted one resumes, so re-running a recipe continues it.
"""

import itertools
import json
import logging
import math
import os
import time
from typing import List

import torch
import yaml

log = logging.getLogger("megatron_hypenet")

STAGE_ORDER = ("pretrain", "align", "select", "distill", "finetune")


def to_flags(options: dict) -> List[str]:
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def run_stage(stage: str, options: dict) -> dict:
    from megatron_hypenet import parallel
    from megatron_hypenet.arguments import parse_args

    args = parse_args(["--stage", stage, *to_flags(options)])
    log.info("stage %s: pretrain_hypenet.py %s", stage, " ".join(["--stage", stage, *to_flags(options)]))
    try:
        if stage == "select":
            from megatron_hypenet.halo.select import run_select

            return run_select(args)
        from megatron_hypenet.training import train

        return train(args)
    finally:
        parallel.destroy()


def _prepare_teacher_and_data(recipe: dict, work: str) -> tuple:
    """HF teacher folder and indexed dataset prefix, made locally when the recipe asks for it."""
    from megatron_hypenet.corpus import generate_corpus
    from tools.preprocess_data import preprocess

    data = recipe.get("data", {})
    if "generate_corpus" in data:
        corpus = os.path.join(work, "corpus.jsonl")
        if not os.path.exists(corpus):
            generate_corpus(corpus, **data["generate_corpus"])
        inputs = [corpus]
    else:
        inputs = data.get("inputs", [])
    teacher_hf = recipe.get("hf_teacher")
    if teacher_hf is None:
        from megatron_hypenet.tiny import save_random_qwen3
        from tools.train_tokenizer import train_tokenizer

        spec = dict(recipe["make_tiny_teacher"])
        teacher_hf = os.path.join(work, "teacher_hf_init")
        if not os.path.exists(os.path.join(teacher_hf, "config.json")):
            tok_dir = os.path.join(work, "tokenizer")
            train_tokenizer(inputs, spec.pop("tokenizer_vocab_size", 1024), tok_dir)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tok_dir)
            save_random_qwen3(teacher_hf, seed=recipe.get("seed", 0), tokenizer_dir=tok_dir,
                              vocab_size=len(tok), eos_token_id=tok.eos_token_id, **spec)
    prefix = os.path.join(work, "data", "corpus")
    if not os.path.exists(prefix + ".idx"):
        kwargs = {"hf_dataset": data["hf_dataset"]} if "hf_dataset" in data else {}
        preprocess(inputs, teacher_hf, prefix, append_eod=True, **kwargs)
    return teacher_hf, prefix


def run_recipe(path: str, work_dir: str = None) -> dict:
    with open(path) as f:
        recipe = yaml.safe_load(f)
    work = work_dir or recipe.get("work_dir", os.path.join("runs", recipe.get("name", "recipe")))
    os.makedirs(work, exist_ok=True)
    t_start = time.time()
    teacher_hf, prefix = _prepare_teacher_and_data(recipe, work)

    from megatron_hypenet.convert import hf_to_mcore, mcore_to_hf

    ck = lambda name: os.path.join(work, "checkpoints", name)  # noqa: E731
    if not os.path.exists(os.path.join(ck("teacher_init"), "latest_checkpointed_iteration.txt")):
        hf_to_mcore(teacher_hf, ck("teacher_init"))
    common = dict(recipe.get("common", {}), data_path=prefix, tokenizer=teacher_hf)
    stages = recipe.get("stages", {})
    teacher = ck("teacher_init")
    results = {}
    if "pretrain" in stages:
        results["pretrain"] = run_stage("pretrain", {**common, "load": teacher, "save": ck("teacher"), **stages["pretrain"]})
        teacher = ck("teacher")
    results["align"] = run_stage("align", {**common, "teacher": teacher, "save": ck("align"), **stages.get("align", {})})
    results["select"] = run_stage("select", {**common, "teacher": teacher, "load": ck("align"), "save": ck("select"),
                                             **stages.get("select", {})})
    pattern_file = os.path.join(ck("select"), "layer_pattern.txt")
    results["distill"] = run_stage("distill", {**common, "teacher": teacher, "load": ck("align"),
                                               "layer_pattern": pattern_file, "save": ck("distill"),
                                               **stages.get("distill", {})})
    final = ck("distill")
    if "finetune" in stages:
        results["finetune"] = run_stage("finetune", {**common, "load": ck("distill"), "save": ck("finetune"),
                                                     **stages["finetune"]})
        final = ck("finetune")

    hf_teacher_out, hf_student_out = os.path.join(work, "hf_teacher"), os.path.join(work, "hf_student")
    for src, dst in ((teacher, hf_teacher_out), (final, hf_student_out)):
        mcore_to_hf(src, dst, overwrite=True)
    report = evaluate_exports(recipe, work, hf_teacher_out, hf_student_out, prefix, results)
    report["minutes"] = (time.time() - t_start) / 60
    with open(os.path.join(work, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(format_report(report))
    return report


def _stage_tokens_per_s(save_dir: str) -> float:
    path = os.path.join(save_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return float("nan")
    rows = [json.loads(line) for line in open(path)]
    rows = rows[1:] or rows  # the first step pays one-off start-up costs
    return sum(r["tokens_per_s"] for r in rows) / max(1, len(rows))


def evaluate_exports(recipe, work, teacher_dir, student_dir, prefix, results) -> dict:
    """Loads both exported HF folders with transformers and compares them on held-out data and retrieval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_hypenet.data import build_gpt_datasets, make_dataloader
    from megatron_hypenet.retrieval import lm_loss, make_needle_examples, retrieval_accuracy

    ev = recipe.get("eval", {})
    train_len = recipe["common"]["seq_length"]
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    loss_samples, num_needles = ev.get("loss_samples", 16), ev.get("needle_examples", 20)
    _, valid, _ = build_gpt_datasets(prefix, train_len, 1234, 1, valid_samples=loss_samples,
                                     eod_id=tok.eos_token_id, split=recipe["common"].get("split", "98,2,0"))
    # megatron-core builds whole epochs of the split: take only the samples asked for
    batches = list(itertools.islice(make_dataloader(valid, 4, 0, 0), math.ceil(loss_samples / 4)))
    report = {"train_length": train_len, "needle_examples": num_needles, "models": {}}
    for name, folder in (("teacher (Qwen3)", teacher_dir), ("student (HypeNet)", student_dir)):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        logits_fn = lambda ids: model(input_ids=ids, use_cache=False).logits  # noqa: E731
        row = {"valid_loss": lm_loss(logits_fn, batches)}
        for mult in ev.get("needle_multipliers", [1, 4]):
            examples = make_needle_examples(tok, train_len * mult, num_needles, seed=7)
            row[f"needle@{mult}x"], _ = retrieval_accuracy(logits_fn, examples)
        report["models"][name] = row
    report["tokens_per_s"] = {stage: _stage_tokens_per_s(os.path.join(work, "checkpoints", "teacher" if stage == "pretrain" else stage))
                              for stage in results if stage != "select"}
    report["layer_pattern"] = results["select"]["layer_pattern"]
    report["exports"] = {"teacher": teacher_dir, "student": student_dir}
    return report


def format_report(report: dict) -> str:
    models = report["models"]
    cols = list(next(iter(models.values())))
    lines = ["", f"HALO summary (training length {report['train_length']} tokens, "
                 f"student layer pattern {report['layer_pattern']}; needle@Mx: exact-match accuracy on "
                 f"{report['needle_examples']} held-out prompts of M x {report['train_length']} tokens)",
             f"{'model':<20}" + "".join(f"{c:>14}" for c in cols)]
    for name, row in models.items():
        lines.append(f"{name:<20}" + "".join(f"{row[c]:>14.4f}" for c in cols))
    lines.append("training tokens/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in report["tokens_per_s"].items()))
    lines.append(f"HF exports: {report['exports']['teacher']} , {report['exports']['student']}")
    lines.append(f"total time: {report.get('minutes', float('nan')):.1f} min")
    return "\n".join(lines)
