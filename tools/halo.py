"""Run a whole HALO recipe (teacher -> align -> select -> distill -> finetune -> HF export) in one command.

    python tools/halo.py --recipe examples/tiny.yaml [--work-dir runs/tiny]
    python tools/halo.py --recipe examples/reproduce.yaml   # issue #7 on one H100 (examples/README.md)
    python tools/halo.py --recipe examples/reproduce.yaml --ablations muon_lr_2e-3 --set eval.tasks=[]
    torchrun --nproc-per-node 8 tools/halo.py --recipe examples/qwen3_1p7b.yaml

Re-running the same command continues where it stopped: finished stages are skipped and an
interrupted stage resumes from its latest checkpoint.
"""

import argparse
import logging
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe YAML (see examples/)")
    parser.add_argument("--work-dir", help="overrides the recipe's work_dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one recipe key, VALUE read as YAML: --set stages.pretrain.train_iters=3300 "
                             "--set eval.tasks=[] (repeatable; +KEY=VALUE adds a key the recipe lacks)")
    parser.add_argument("--ablations", metavar="NAMES",
                        help="train only these of the recipe's ablations, comma-separated ('none': none)")
    args = parser.parse_args(argv)
    if not os.path.exists(args.recipe):
        parser.error(f"--recipe {args.recipe}: file not found")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megatron_hypenet.recipe import RecipeOverrideError, run_recipe

    command = shlex.join(["python", "tools/halo.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_recipe(args.recipe, args.work_dir, command=command, sets=args.set, ablations=args.ablations)
    except RecipeOverrideError as err:  # raised before anything starts: a usage error, said as one
        parser.error(str(err))


if __name__ == "__main__":
    main()
