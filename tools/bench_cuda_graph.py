"""The HALO stages' training steps eager against --cuda-graph (and --compile), in the trainer itself.

    python -m tools.bench_cuda_graph --out bench_cuda_graph.json    # one GPU, about 3 minutes
    python -m tools.bench_cuda_graph --tiny    # CPU, eager only: checks the path, claims nothing

One process makes a random Qwen3 teacher of examples/reproduce.yaml's shape (61M parameters; random
weights time like trained ones), a generated corpus and its tokenizer, converts the teacher and builds
a hybrid student from it, then runs the trainer (`training.train`, what pretrain_hypenet.py runs) for
each stage and variant with the recipe's own stage options: align (attention twins), distill (student
`LLLALLLAALLL`, run 18's selection) and finetune, micro-batch 2. Each variant is one flag set on the
same stage, data and seed:
    eager          the recipe's stage without its --cuda-graph and --compile
    cuda_graph     --cuda-graph
    compile        --compile (each decoder layer torch.compile'd)
    compile_graph  --compile --cuda-graph
Reported: the median of the trainer's own per-step tokens/s (metrics.jsonl), over the steps after the
first 10 (capture and compilation happen in the first ones), its ratio to eager in the same process,
and the largest loss difference to eager over the first 20 steps. eager and cuda_graph run the same
kernels on the same batches; compile fuses kernels, which moves bf16 roundings.
With --processes N each (stage, variant) instead runs as N trainer processes at once on the one GPU, the way
the recipe trains its ablations beside the main student (`ablation_workers`); reported: their summed tokens/s.
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "reproduce.yaml")
PATTERN = "LLLALLLAALLL"
VARIANTS = {"eager": {}, "cuda_graph": {"cuda_graph": True}, "compile": {"compile": True},
            "compile_graph": {"compile": True, "cuda_graph": True}}
TINY_TEACHER = dict(hidden_size=64, num_layers=4, heads=4, kv_heads=2, head_dim=16, ffn=128, tie=True)
TINY_PATTERN = "LALL"


def make_work(work: str, recipe: dict, tiny: bool) -> dict:
    """Teacher checkpoint, hybrid student checkpoint, tokenizer and data under `work`."""
    from transformers import AutoTokenizer

    from megatron_hypenet import checkpoint, parallel
    from megatron_hypenet.arguments import parse_args
    from megatron_hypenet.config import model_description, read_model_description
    from megatron_hypenet.convert import hf_to_mcore
    from megatron_hypenet.corpus import generate_corpus
    from megatron_hypenet.halo.init import init_student_from_teacher
    from megatron_hypenet.halo.stages import build_from_description
    from megatron_hypenet.tiny import save_random_qwen3
    from tools.preprocess_data import preprocess
    from tools.train_tokenizer import train_tokenizer

    spec = dict(TINY_TEACHER if tiny else recipe["make_tiny_teacher"])
    vocab = 512 if tiny else spec.pop("tokenizer_vocab_size")
    spec.pop("tokenizer_max_chars", None)
    corpus = generate_corpus(os.path.join(work, "corpus.jsonl"), num_docs=300 if tiny else 3000, seed=0,
                             doc_tokens_hint=200)
    tok_dir = os.path.join(work, "tokenizer")
    train_tokenizer([corpus], vocab_size=min(vocab, 1000), out_dir=tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if len(tokenizer) > vocab:
        raise ValueError(f"the benchmark's tokenizer outgrew the model's vocabulary of {vocab}")
    hf = save_random_qwen3(os.path.join(work, "hf"), seed=0, tokenizer_dir=tok_dir, vocab_size=vocab,
                           eos_token_id=tokenizer.eos_token_id, **spec)
    prefix = os.path.join(work, "data", "corpus")
    preprocess([corpus], hf, prefix, append_eod=True)
    parallel.initialize(1, 1)
    try:
        teacher_dir, hybrid_dir = os.path.join(work, "teacher"), os.path.join(work, "hybrid")
        hf_to_mcore(hf, teacher_dir)
        t_desc = read_model_description(checkpoint.resolve(teacher_dir))
        student_options = {k: v for k, v in recipe["stages"]["distill"].items() if k.startswith("lightning_")}
        args = parse_args(["--stage", "distill", "--teacher", teacher_dir, "--data-path", prefix])
        teacher, _ = build_from_description(t_desc, args, teacher=True)
        checkpoint.load_checkpoint(teacher_dir, teacher, t_desc, load_state=False)
        student, _ = build_from_description(t_desc, args, layer_pattern=TINY_PATTERN if tiny else PATTERN,
                                            attention_rope=False, **student_options)
        init_student_from_teacher(student, teacher)
        desc = model_description(student.config, t_desc["vocab_size"], True, t_desc["hf_extra"])
        checkpoint.save_checkpoint(hybrid_dir, 0, student, desc)
    finally:
        parallel.destroy()
    return {"hf": hf, "data": prefix, "teacher": teacher_dir, "hybrid": hybrid_dir}


def stage_options(recipe: dict, stage: str, paths: dict, save: str, iters: int, tiny: bool) -> dict:
    """The recipe's options of `stage` (pretrain_hypenet.py flags as keys), pointed at the benchmark's folders."""
    options = {**recipe["common"], **recipe["stages"][stage], "train_iters": iters, "save": save,
               "data_path": paths["data"], "tokenizer": paths["hf"], "log_interval": 10 ** 6, "compile": False,
               "cuda_graph": False}
    options["lr_warmup_iters"] = min(options.get("lr_warmup_iters", 0), iters // 2)
    if stage in ("align", "distill"):
        options["teacher"] = paths["teacher"]
    if stage == "distill":
        options.update(load=paths["hybrid"], layer_pattern=TINY_PATTERN if tiny else PATTERN)
    if stage == "finetune":
        options["load"] = paths["hybrid"]
    if tiny:  # CPU: short sequences, fp32 (megatron's linear backward fails under CPU bf16 autocast)
        options.update(seq_length=64 * (2 if stage == "finetune" else 1), bf16=False)
    return options


def median_tokens_per_s(rows: list) -> float:
    """Over the steps after the first 10 (capture and compilation), or all of a shorter run's."""
    return statistics.median(r["tokens_per_s"] for r in rows[10:] or rows)


def run_variant(stage: str, options: dict) -> dict:
    from megatron_hypenet.recipe import read_metrics, run_stage

    t0 = time.time()
    run_stage(stage, options)
    rows = read_metrics(options["save"])
    return {"wall_s": time.time() - t0, "steps": len(rows), "tokens_per_s": median_tokens_per_s(rows),
            "losses": [r["loss"] for r in rows]}


def run_processes(stage: str, options: dict, n: int) -> dict:
    """`n` copies of the stage as separate trainer processes at once (own save folders); summed tokens/s."""
    import subprocess
    import sys

    from megatron_hypenet.parallel import PROCESS_GROUP_ENV
    from megatron_hypenet.recipe import read_metrics, to_flags

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # each its own one-process group, not this process's (ensure_process_group put its RANK and port in os.environ)
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_ENV}
    saves = [f"{options['save']}_{i}" for i in range(n)]
    t0 = time.time()
    procs = []
    for save in saves:
        with open(save + ".log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(root, "pretrain_hypenet.py"), "--stage", stage,
                 *to_flags({**options, "save": save})], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"trainer exit codes {codes}; see {options['save']}_<i>.log")
    runs = [read_metrics(save) for save in saves]
    per = [median_tokens_per_s(rows) for rows in runs]
    return {"wall_s": time.time() - t0, "steps": len(runs[0]), "tokens_per_s": sum(per), "per_process": per,
            "losses": [r["loss"] for r in runs[0]]}


def markdown(rows: list) -> str:
    lines = ["| stage | variant | tokens/s | / eager | max abs loss diff to eager (first 20 steps) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['variant']} | error: {r['error'][:80]} | | |")
            continue
        ratio = f"{r['vs_eager']:.2f}x" if r.get("vs_eager") else ""
        diff = f"{r['max_loss_diff']:.2e}" if r.get("max_loss_diff") is not None else ""
        lines.append(f"| {r['stage']} | {r['variant']} | {r['tokens_per_s']:,.0f} | {ratio} | {diff} |")
    return "\n".join(lines)


def main(argv=None):
    from megatron_hypenet.recipe import load_recipe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", nargs="+", default=["align", "distill", "finetune"],
                   choices=["align", "distill", "finetune"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--iters", type=int, default=150, help="training steps per (stage, variant)")
    p.add_argument("--recipe", default=RECIPE, help="the recipe whose teacher shape and stage options are timed")
    p.add_argument("--processes", type=int, default=1,
                   help="run each (stage, variant) as this many trainer processes at once; report their sum")
    p.add_argument("--tiny", action="store_true", help="a tiny shape on CPU, eager only (checks the path)")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        p.error("the benchmark times CUDA graphs: run it on a GPU, or pass --tiny for the CPU path check")
    variants = ["eager"] if args.tiny else args.variants
    recipe = load_recipe(args.recipe)
    work = args.work or tempfile.mkdtemp(prefix="bench_cuda_graph_")
    rows = []
    try:
        paths = make_work(work, recipe, args.tiny)
        for stage in args.stages:
            eager = None
            for variant in variants:
                save = os.path.join(work, f"{stage}_{variant}")
                row = {"stage": stage, "variant": variant}
                options = {**stage_options(recipe, stage, paths, save, args.iters, args.tiny), **VARIANTS[variant]}
                try:
                    row.update(run_variant(stage, options) if args.processes == 1 else
                               run_processes(stage, options, args.processes))
                except Exception as e:  # keep the other rows: one call of device time measures them all
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    if args.tiny:
                        raise
                if variant == "eager" and "error" not in row:
                    eager = row
                elif eager is not None and "error" not in row:
                    row["vs_eager"] = row["tokens_per_s"] / eager["tokens_per_s"]
                    row["max_loss_diff"] = max(abs(a - b) for a, b in zip(row["losses"][:20], eager["losses"][:20]))
                rows.append(row)
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu"
    print(f"\n{where}, torch {torch.__version__}, {datetime.date.today()}, {args.iters} steps per row, "
          f"{args.processes} trainer process(es) per row\n")
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": where, "torch": torch.__version__, "date": str(datetime.date.today()),
                       "iters": args.iters, "processes": args.processes, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
