"""lm-evaluation-harness on exported folders (issue 5).

lm-eval's built-in `hf` model (HFLM) already loads a HypeNet folder with `trust_remote_code=True`: its
loglikelihood requests are plain forwards, and its generate_until requests go through `generate()`,
which gets a `HypeNetCache` from the folder's code (left-padded batches work). So the command line is

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,dtype=bfloat16 \\
        --include_path examples/lm_eval --tasks hypenet_retrieval_mc,hypenet_retrieval_gen

and this module only adds the repository's local tasks (examples/lm_eval, no downloads) and a long-input
option: `--prefill-chunk` sets the folder's `prefill_chunk_size`, so HypeNet prefills long requests in
chunks. Needs `pip install "lm-eval[hf]"`.

    python -m megatron_hypenet.lm_eval_entry --model DIR --tasks hypenet_retrieval_mc --device cpu
"""

import argparse
import json
import os
from pathlib import Path

LOCAL_TASKS = Path(__file__).resolve().parents[1] / "examples" / "lm_eval"


def make_lm(model_dir: str, device: str = "cpu", dtype: str = "auto", batch_size: int = 1,
            prefill_chunk: int | None = None, max_length: int | None = None):
    """lm-eval's HFLM over an HF folder (Qwen3 or HypeNet)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoConfig

    kwargs = {}
    if prefill_chunk is not None:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
        if getattr(config, "model_type", None) == "hypenet":  # a Qwen3 config has no such option
            kwargs["prefill_chunk_size"] = prefill_chunk  # HFLM passes unknown kwargs to from_pretrained
    return HFLM(pretrained=model_dir, trust_remote_code=True, device=device, dtype=dtype, batch_size=batch_size,
                max_length=max_length, **kwargs)


def evaluate(model_dir: str, tasks: list, device: str = "cpu", dtype: str = "auto", batch_size: int = 1,
             prefill_chunk: int | None = None, max_length: int | None = None, limit=None) -> dict:
    """`lm_eval.simple_evaluate` with this repository's local tasks registered; returns its results."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # the local tasks name their data relative to the repository root
    cwd = os.getcwd()
    os.chdir(LOCAL_TASKS.parents[1])
    try:
        lm = make_lm(model_dir, device, dtype, batch_size, prefill_chunk, max_length)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(LOCAL_TASKS)),
                                      limit=limit)
    finally:
        os.chdir(cwd)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder")
    p.add_argument("--tasks", nargs="+", default=["hypenet_retrieval_mc", "hypenet_retrieval_gen"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prefill-chunk", type=int, default=None, help="HypeNet prefill_chunk_size for long requests")
    p.add_argument("--max-length", type=int, default=None, help="lm-eval's context limit (default: the config's)")
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    out = evaluate(args.model, args.tasks, args.device, args.dtype, args.batch_size, args.prefill_chunk,
                   args.max_length, args.limit)
    from lm_eval.utils import make_table

    print(make_table(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out["results"], indent=2, default=str) + "\n")
    return out


if __name__ == "__main__":
    main()
