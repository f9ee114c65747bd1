"""Export a megatron-hypenet checkpoint (teacher or HypeNet, any TP/PP layout) as a Hugging Face folder.

    python tools/convert_mcore_to_hf.py --mcore-dir ckpt/finetune --out hf/hypenet [--dtype bf16]

A teacher becomes a plain Qwen3 folder; a HypeNet student a folder with configuration_hypenet.py and
modeling_hypenet.py, loaded with AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).
Tensors stream one at a time into safetensors shards; the folder appears only once complete.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mcore-dir", required=True, help="checkpoint folder (its latest iteration is exported)")
    p.add_argument("--out", required=True, help="output HF folder")
    p.add_argument("--ckpt-step", type=int, default=None, help="export this iteration instead of the latest")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megatron_hypenet.convert import mcore_to_hf

    out = mcore_to_hf(args.mcore_dir, args.out, args.ckpt_step, args.dtype, args.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
