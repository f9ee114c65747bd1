"""HALO distillation of a Qwen3 teacher into a HypeNet hybrid on megatron-core.

    torchrun --nproc-per-node 8 pretrain_hypenet.py --stage distill --teacher ckpt/teacher \
        --load ckpt/align --layer-pattern ckpt/select/layer_pattern.txt --save ckpt/distill \
        --data-path data/corpus_text_document --seq-length 4096 --micro-batch-size 1 ...

With no arguments it runs the embedded default: a tiny Qwen3 teacher made and trained here on local
text (no downloads), all four HALO stages, an HF export and a summary table (examples/tiny.yaml).
"""

import json
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # run from a checkout without installing


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv:
        from megatron_hypenet.recipe import run_recipe

        return run_recipe(os.path.join(HERE, "examples", "tiny.yaml"))
    from megatron_hypenet import parallel
    from megatron_hypenet.arguments import parse_args

    args = parse_args(argv)
    rank0 = True
    try:
        if args.stage == "select":
            from megatron_hypenet.halo.select import run_select

            result = run_select(args)
        else:
            from megatron_hypenet.training import train

            result = train(args)
        rank0 = parallel.is_rank0()
    finally:
        parallel.destroy()
    if rank0:
        print(json.dumps({k: v for k, v in result.items() if k != "layers"}))
    return result


if __name__ == "__main__":
    main()
