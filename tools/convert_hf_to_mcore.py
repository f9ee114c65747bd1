"""Convert a Qwen3 (or HypeNet) Hugging Face folder into a megatron-core dist_checkpointing checkpoint.

    python tools/convert_hf_to_mcore.py --hf-dir Qwen3-8B/ --out ckpt/teacher --tp 4 --pp 2
    torchrun --nproc-per-node 8 tools/convert_hf_to_mcore.py --hf-dir Qwen3-32B/ --out ckpt/teacher --tp 8

Weights are read one tensor at a time from the safetensors shards; under torchrun the tensors are
spread over the ranks, each holding only its share. The checkpoint stores global tensors, so it loads
at any TP/PP layout; --tp/--pp check that the model splits at the layout you will train with.
A HF hub name works too where the hub is reachable (it is downloaded to the local cache first).
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF folder (or hub name) with config.json and *.safetensors")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size the model must split into")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size the model must split into")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast weights (default: keep)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hf_dir = args.hf_dir
    if not os.path.isdir(hf_dir) and "/" in hf_dir and not hf_dir.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        hf_dir = snapshot_download(hf_dir, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
    from megatron_hypenet.convert import hf_to_mcore

    path = hf_to_mcore(hf_dir, args.out, args.tp, args.pp, args.dtype)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
