"""Train a byte-level BPE tokenizer and save it as an HF tokenizer folder.

  python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 4096 --output-dir tokenizer/

Qwen2/3-style: NFC normalization, Qwen's pre-tokenization regex (digits one by one, so numbers
copy digit by digit), byte-level BPE, and one special token `<|endoftext|>` as bos, eos and pad.
The folder loads with `transformers.AutoTokenizer.from_pretrained(DIR)`.
"""

import argparse
import json
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as `python tools/train_tokenizer.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from megatron_hypenet.data import EOD_TOKEN
from tools.preprocess_data import add_document_source_args, open_documents

# The pre-tokenization regex of the Qwen2/Qwen3 tokenizers.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(files: Sequence[str], vocab_size: int, out_dir: str, json_key: str = "text",
                    split_lines: bool = False, hf_dataset: Optional[str] = None, hf_split: str = "train",
                    min_frequency: int = 2, max_chars: Optional[int] = None):
    """Train on text/JSONL `files` (or `hf_dataset`), save to `out_dir`; returns the HF tokenizer.

    `max_chars` stops after the document that reaches that many characters: a few tens of MB fix the merges
    of a small vocabulary, and training time grows with the text."""
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet) + 1:
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(alphabet)} bytes + {EOD_TOKEN}")
    documents, num_documents = open_documents(files, json_key, split_lines, hf_dataset, hf_split)
    if max_chars is not None:
        documents, num_documents = _first_chars(documents, max_chars), None

    tokenizer = Tokenizer(models.BPE())  # byte-level: every string is covered, no unknown token
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOD_TOKEN],
                                  initial_alphabet=alphabet, show_progress=True)
    tokenizer.train_from_iterator(documents, trainer=trainer, length=num_documents)

    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOD_TOKEN, eos_token=EOD_TOKEN,
                                           pad_token=EOD_TOKEN)
    hf_tokenizer.save_pretrained(out_dir)
    # transformers 5 records its new class name, which transformers 4 cannot load; both know this one.
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return hf_tokenizer


def _first_chars(documents, max_chars: int):
    total = 0
    for text in documents:
        if total >= max_chars:
            return
        total += len(text)
        yield text


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_document_source_args(parser)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--max-chars", type=int, default=None,
                        help="train on the first documents only, up to this many characters")
    parser.add_argument("--output-dir", required=True, metavar="DIR")
    args = parser.parse_args(argv)
    try:
        tokenizer = train_tokenizer(args.input or (), args.vocab_size, args.output_dir, args.json_key,
                                    args.split_lines, args.hf_dataset, args.hf_split, args.min_frequency,
                                    args.max_chars)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.output_dir}")


if __name__ == "__main__":
    main()
