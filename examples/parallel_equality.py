"""Multi-GPU equality check of issue #4: 20 distillation steps of a small model at each parallel layout
give the loss curve of the one-GPU run, and a checkpoint saved at one layout loads at another.

    python examples/parallel_equality.py --out parallel_equality.json            # GPUs (NCCL, bf16), 4 GPUs
    python examples/parallel_equality.py --cpu --out parallel_equality.json      # gloo, fp32, 2 processes
    python examples/parallel_equality.py --rnn-mixer gated_deltanet ...          # Gated DeltaNet layers ("DADD")

Everything is made here (no downloads): a tiny Qwen3 teacher on a generated corpus, converted, aligned
for a few steps at one process. Then `pretrain_hypenet.py --stage distill` runs through torchrun at
the reference layout (1 process) and at each layout below, all with the same global batch (micro
batch 2, global batch 4, so data parallel sees the same samples), and the curves in each run's
metrics.jsonl are compared step by step. Checkpoints: one `finetune` step (its loss is the loaded
weights' loss on the first batch) from the reference's distill checkpoint at every layout must equal
the same at the reference layout, and from each layout's checkpoint at the reference layout must
equal the same at that layout.

Differences are relative to the reference's step-1 value (|loss - reference| / reference step-1 loss,
the same for the gradient norm), with tolerances
    step 1 (loss and gradient norm) and checkpoints (same weights, only the reduction order
    differs): fp32 1e-5, bf16 2e-2
    the whole curve: fp32 5e-3, bf16 5e-2
The curve's bound is looser because Adam divides by sqrt(v): on parameters whose gradients are
near zero, reduction-order noise becomes full-size update differences, which then compound (seen on
CPU, TP=2: 1e-6 at step 1, 6e-4 of the step-1 loss at step 20). The bf16 values are stated, not yet
measured on GPUs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOLERANCE = {"cpu": {"step1": 1e-5, "curve": 5e-3}, "gpu": {"step1": 2e-2, "curve": 5e-2}}
LAYER_PATTERN = {"lightning": "LALL", "gated_deltanet": "DADD"}
# name: (processes, flags); the distributed optimizer shards over data parallel ranks only.
LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "cp2": (2, ["--context-parallel-size", "2"]),
    "dp2": (2, ["--use-distributed-optimizer"]),
    "dp2-replicated": (2, []),  # data parallel with the optimizer state replicated
    "tp2-pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "tp2-cp2": (4, ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2", "--sequence-parallel"]),
}
# The CPU runs every 2-process layout; PP there depends on the trainer's pipeline path running on gloo.
CPU_LAYOUTS = ("tp2", "pp2", "cp2", "dp2")
GPU_LAYOUTS = ("tp2", "pp2", "cp2", "dp2", "tp2-pp2")
RECIPE = {"seed": 0, "data": {"generate_corpus": {"num_docs": 400, "seed": 0}},
          "make_tiny_teacher": {"tokenizer_vocab_size": 400, "hidden_size": 64, "num_layers": 4, "heads": 4,
                                "kv_heads": 2, "head_dim": 16, "ffn": 128, "tie": True}}


def torchrun(nproc: int, args: list, log: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           os.path.join(ROOT, "pretrain_hypenet.py"), *map(str, args)]
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        with open(log) as f:
            lines = f.read().splitlines()
        # the first error a worker printed is the cause; torchrun's own report follows it
        cause = next((l.strip() for l in lines if ("error:" in l or "Error:" in l) and "ChildFailedError" not in l),
                     lines[-1] if lines else "")
        raise RuntimeError(f"exit {proc.returncode} ({log}): {cause[:300]}")


def metric(save: str, key: str = "loss") -> list:
    with open(os.path.join(save, "metrics.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


def curve_diff(losses_: list, ref: list) -> float:
    if len(losses_) != len(ref):
        return float("inf")
    return max(abs(x - y) for x, y in zip(losses_, ref)) / ref[0]


def prepare(work: str, common: list, rnn_mixer: str) -> dict:
    """Tiny teacher, data, converted teacher and a short align run (one process)."""
    from megatron_hypenet.convert import hf_to_mcore
    from megatron_hypenet.recipe import _prepare_teacher_and_data

    teacher_hf, prefix = _prepare_teacher_and_data(RECIPE, work)
    teacher = os.path.join(work, "teacher")
    if not os.path.exists(os.path.join(teacher, "latest_checkpointed_iteration.txt")):
        hf_to_mcore(teacher_hf, teacher)
    data = ["--data-path", prefix, "--tokenizer", teacher_hf]
    align = os.path.join(work, f"align_{rnn_mixer}")
    if not os.path.exists(os.path.join(align, "metrics.jsonl")):
        torchrun(1, ["--stage", "align", "--teacher", teacher, "--save", align, "--train-iters", 5, "--lr", 3e-3,
                     *data, *common], align + ".log")
    return {"teacher": teacher, "align": align, "data": data}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="gloo and fp32 on CPU, the 2-process layouts")
    p.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=None)
    p.add_argument("--rnn-mixer", choices=sorted(LAYER_PATTERN), default="lightning")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--work-dir", default=None, help="default: a temporary folder")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    kind = "cpu" if args.cpu else "gpu"
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even on a GPU machine (the runs inherit it)
    layouts = args.layouts or (CPU_LAYOUTS if args.cpu else GPU_LAYOUTS)
    tol = TOLERANCE[kind]
    work = args.work_dir or tempfile.mkdtemp(prefix="parallel_equality_")
    os.makedirs(work, exist_ok=True)
    common = ["--seq-length", 128, "--micro-batch-size", 2, "--global-batch-size", 4, "--split", "90,10,0",
              "--lr-decay-style", "constant", "--no-progress", "--eval-iters", 1,
              "--rnn-mixer", args.rnn_mixer] + ([] if args.cpu else ["--bf16"])
    made = prepare(work, common, args.rnn_mixer)
    distill = ["--stage", "distill", "--teacher", made["teacher"], "--load", made["align"], "--layer-pattern",
               LAYER_PATTERN[args.rnn_mixer], "--train-iters", args.steps, "--lr", 1e-3, *made["data"], *common]

    def finetune_loss(load: str, name: str, nproc: int, flags: list) -> float:
        save = os.path.join(work, f"finetune_{name}")
        torchrun(nproc, ["--stage", "finetune", "--load", load, "--save", save, "--no-resume", "--train-iters", 1,
                         "--lr", 1e-4, *made["data"], *common, *flags], save + ".log")
        return metric(save)[0]

    ref_save = os.path.join(work, "distill_ref")
    torchrun(1, [*distill, "--save", ref_save, "--no-resume"], ref_save + ".log")
    ref = metric(ref_save)
    ref_grad = metric(ref_save, "grad_norm")[0]
    ref_ckpt = finetune_loss(ref_save, "ref_at_ref", 1, [])
    rows = []
    for name in layouts:
        nproc, flags = LAYOUTS[name]
        row = {"layout": name, "processes": nproc, "flags": " ".join(flags)}
        save = os.path.join(work, f"distill_{name}")
        try:
            torchrun(nproc, [*distill, "--save", save, "--no-resume", *flags], save + ".log")
            row["losses"] = metric(save)
            grad = metric(save, "grad_norm")[0]
            row["step1_diff"] = max(abs(row["losses"][0] - ref[0]) / ref[0], abs(grad - ref_grad) / ref_grad)
            row["curve_diff"] = curve_diff(row["losses"], ref)
            at_layout = finetune_loss(ref_save, f"ref_at_{name}", nproc, flags)
            own = finetune_loss(save, f"{name}_at_{name}", nproc, flags)
            at_ref = finetune_loss(save, f"{name}_at_ref", 1, [])
            row["ckpt_diff"] = max(abs(at_layout - ref_ckpt) / ref_ckpt, abs(at_ref - own) / own)
            row["pass"] = (row["step1_diff"] <= tol["step1"] and row["curve_diff"] <= tol["curve"]
                           and row["ckpt_diff"] <= tol["step1"])
        except RuntimeError as e:
            row["error"] = str(e)
            row["pass"] = False
        rows.append(row)

    print(f"\n{kind}, {LAYER_PATTERN[args.rnn_mixer]}: {args.steps} distill steps, reference = 1 process; "
          f"|loss - reference| / reference step-1 loss, tolerances {tol}; checkpoint = first finetune loss of a "
          f"checkpoint loaded at another layout\n")
    print("| layout | processes | step 1 (loss, grad norm) | curve (max) | checkpoint | result |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['layout']} | {r['processes']} | | | | FAIL: {r['error']} |")
        else:
            print(f"| {r['layout']} | {r['processes']} | {r['step1_diff']:.1e} | {r['curve_diff']:.1e} | "
                  f"{r['ckpt_diff']:.1e} | {'pass' if r['pass'] else 'FAIL'} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"kind": kind, "layer_pattern": LAYER_PATTERN[args.rnn_mixer], "tolerance": tol,
                       "steps": args.steps, "reference": ref,
                       "reference_ckpt_loss": ref_ckpt, "rows": rows, "work_dir": work}, f, indent=2)
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
