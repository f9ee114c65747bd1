"""Run 28's crash ('CUDA error: unspecified launch failure' in 3 of the 5 distill processes that trained the
weights outside the mixers): the recipe's shapes on a random teacher, then distill processes side by side, each
a variant of the main student's flags (--non-mixer-lr-mult 0.3, Muon, --cuda-graph, --compile).

A record of what ran on H100s, not a tool; results in <SET>.json (docs/results_run28.md):
- `repro`: each process one flag away from the main student's (2026-12-07, the tree of commit c612f65);
- `bisect29`, `bisect30`: the two bisects (2026-12-07, the tree of commit b4c49a5), run through
  bisect_entry.py, which lifts arguments.py's refusal of this combination and adds the patches named by each
  variant's BISECT_MODE. They ran as two copies of this script that differed only in the variant table; the
  copies are merged here as the sets.
Since run 28 arguments.py refuses Muon with --cuda-graph and --compile unless --train-only-mixers, so `repro`'s
`main` and `main_seed2` need that refusal taken out to run again.
    python docs/results/run28/repro_crash.py SET WORK_DIR ITERS [cpu]"""
import json, os, subprocess, sys, time

sys.path.insert(0, os.getcwd())


def variant_sets(main: list) -> dict:
    """{set: {process: (flags, BISECT_MODE, extra environment)}}"""
    seed2 = main + ["--seed", "2"]
    return {
        "repro": {
            "main": (main, "", {}),
            "main_seed2": (seed2, "", {}),
            "no_compile": ([f for f in main if f != "--compile"], "", {}),
            "no_graph": ([f for f in main if f != "--cuda-graph"], "", {}),
            "adamw": (["--non-mixer-lr-mult", "0.3"] + main[4:], "", {}),
            "mixers_only": (["--optimizer", "muon", "--train-only-mixers"] + main[4:], "", {}),
        },
        "bisect29": {
            "main_plain": (main, "", {}),
            "main_sync": (main, "sync", {}),
            "main_sync_seed2": (seed2, "sync", {}),
            "main_blocking": (main, "sync", {"CUDA_LAUNCH_BLOCKING": "1"}),
            "clone_grads": (main, "clone_grads", {}),
            "clone_grads_seed2": (seed2, "clone_grads", {}),
            "mixer_muon": (main, "mixer_muon", {}),
        },
        "bisect30": {
            "ctrl": (seed2, "", {}),
            "ctrl_b": (seed2, "", {}),
            "clear_ws": (seed2, "clear_ws", {}),
            "clear_ws_b": (seed2, "clear_ws", {}),
            "opt_stream": (seed2, "opt_stream", {}),
            "opt_stream_b": (seed2, "opt_stream", {}),
            "ws0": (seed2, "", {"CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUBLASLT_WORKSPACE_SIZE": "0"}),
            "no_compile": ([f for f in seed2 if f != "--compile"], "", {}),
            "no_graph": ([f for f in seed2 if f != "--cuda-graph"], "", {}),
        },
    }


def main():
    SET, W = sys.argv[1], sys.argv[2]
    ITERS = int(sys.argv[3])
    GPU = len(sys.argv) < 5
    from megatron_hypenet.recipe import _prepare_teacher_and_data  # noqa: E402

    shape = dict(hidden_size=640, num_layers=12, heads=10, kv_heads=5, head_dim=64, ffn=1792) if GPU else \
        dict(hidden_size=64, num_layers=4, heads=4, kv_heads=2, head_dim=16, ffn=128)
    recipe = {"seed": 0, "data": {"generate_corpus": {"num_docs": 3000 if GPU else 200, "seed": 0}},
              "make_tiny_teacher": {"tokenizer_vocab_size": 2048 if GPU else 400, "tie": True, **shape}}
    t0 = time.time()
    hf, prefix = _prepare_teacher_and_data(recipe, W)
    if not os.path.exists(f"{W}/teacher"):
        subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf-dir", hf, "--out", f"{W}/teacher"],
                       check=True)
    print("prepared", round(time.time() - t0), "s", flush=True)
    seq = ["--seq-length", "1024" if GPU else "64"]
    common = ["pretrain_hypenet.py", "--data-path", prefix, "--tokenizer", hf, "--teacher", f"{W}/teacher", *seq,
              "--micro-batch-size", "2", "--split", "99,1,0", "--eval-iters", "1", "--log-interval", "100",
              "--no-progress", "--lightning-short-conv", "--lightning-output-norm-per-head"] + (["--bf16"] if GPU else [])
    if not os.path.exists(f"{W}/align/latest_checkpointed_iteration.txt"):
        subprocess.run([sys.executable, *common, "--stage", "align", "--train-iters", "20", "--lr", "1e-2",
                        "--attention-twins", "--save", f"{W}/align"], check=True)
    print("aligned", round(time.time() - t0), "s", flush=True)
    pattern = "LLLLLALLALLL" if GPU else "LALL"
    main = ["--optimizer", "muon", "--non-mixer-lr-mult", "0.3", "--cuda-graph", "--compile"] if GPU else \
        ["--optimizer", "muon", "--non-mixer-lr-mult", "0.3"]
    variants = variant_sets(main)[SET]
    entry = "pretrain_hypenet.py" if SET == "repro" else "docs/results/run28/bisect_entry.py"
    procs = {}
    for name, (flags, mode, env) in variants.items():
        cmd = [sys.executable, entry, *common[1:], "--stage", "distill", "--load", f"{W}/align",
               "--layer-pattern", pattern,
               "--train-iters", str(ITERS), "--lr", "2e-3", "--lr-warmup-iters", "40", "--lr-wsd-decay-fraction", "0.5",
               "--save", f"{W}/{name}", "--save-interval", "100000", *flags]
        procs[name] = subprocess.Popen(cmd, stdout=open(f"{W}/{name}.log", "w"), stderr=subprocess.STDOUT,
                                       env={**os.environ, "BISECT_MODE": mode, **env})
    out = {}
    deadline = time.time() + float(os.environ.get("DEADLINE_S", "420"))
    for name, p in procs.items():
        try:
            rc = p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "killed at the deadline"
        rows = [json.loads(x) for x in open(f"{W}/{name}/metrics.jsonl")] if os.path.exists(f"{W}/{name}/metrics.jsonl") else []
        log = open(f"{W}/{name}.log").read()
        err = [line[:300] for line in log.splitlines() if "Error" in line or "BISECT FAULT" in line][-4:]
        out[name] = {"rc": rc, "iterations": len(rows), "last_loss": rows[-1]["loss"] if rows else None,
                     "mean_loss_last_300": sum(r["loss"] for r in rows[-300:]) / max(1, len(rows[-300:])), "errors": err}
        print("result", name, json.dumps(out[name]), flush=True)
    print("total", round(time.time() - t0), "s")
    json.dump(out, open(os.path.join(os.environ.get("OUT", W), f"{SET}.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
