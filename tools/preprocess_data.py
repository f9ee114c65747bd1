"""Tokenize documents into a megatron-core indexed dataset PREFIX.bin/.idx (Megatron-LM style).

  python tools/preprocess_data.py --input corpus.jsonl --json-key text --tokenizer TOKENIZER_DIR \
      --output-prefix data/corpus --append-eod --workers 4

Inputs: text files (one document per blank-line-separated block, or per line with --split-lines),
JSONL files (.jsonl/.json, the --json-key field of each line), or --hf-dataset NAME_OR_PATH (a hub
name, a `save_to_disk` folder, a folder of data files, or one .jsonl/.json/.csv/.parquet/.txt file).
Each document is one sequence; --append-eod ends it with the EOD token so GPTDataset can pack
documents. The output appears all at once: it is written under temporary names, then renamed.
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

if __package__ in (None, ""):  # run as `python tools/preprocess_data.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm

from megatron_hypenet.data import eod_token_id, load_tokenizer

JSON_SUFFIXES = (".jsonl", ".json")
HF_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def iter_file_documents(path: str, json_key: str = "text", split_lines: bool = False) -> Iterator[str]:
    """The non-blank documents of one text or JSONL file, with errors naming the file and line."""
    found = False
    with open(path, encoding="utf-8") as f:
        try:
            if path.endswith(JSON_SUFFIXES):
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        text = _json_text(line, json_key, f"{path}:{lineno}")
                        if text.strip():
                            found = True
                            yield text
            else:
                block = []
                for line in f:
                    if line.strip():
                        block.append(line)
                    if block and (split_lines or not line.strip()):
                        found = True
                        yield "".join(block).rstrip("\n")
                        block = []
                if block:
                    found = True
                    yield "".join(block).rstrip("\n")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    if not found:
        raise ValueError(f"{path}: no documents (the file is empty or blank)")


def _json_text(line: str, json_key: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict) or json_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: no {json_key!r} field (found {keys}); choose it with --json-key")
    if not isinstance(record[json_key], str):
        raise ValueError(f"{where}: {json_key!r} is a {type(record[json_key]).__name__}, not a string")
    return record[json_key]


def load_hf_dataset(name_or_path: str, split: str = "train"):
    """A `datasets.Dataset` from a hub name, a `save_to_disk` folder, a data folder or a data file."""
    import datasets

    if os.path.isdir(name_or_path) and any(
        os.path.isfile(os.path.join(name_or_path, marker)) for marker in ("state.json", "dataset_dict.json")
    ):
        dataset = datasets.load_from_disk(name_or_path)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{name_or_path}: no split {split!r} (splits: {sorted(dataset)}); use --hf-split")
            dataset = dataset[split]
        return dataset
    if os.path.isfile(name_or_path):
        suffix = os.path.splitext(name_or_path)[1]
        if suffix not in HF_BUILDERS:
            raise ValueError(f"{name_or_path}: unknown data file type {suffix!r} (known: {sorted(HF_BUILDERS)})")
        return datasets.load_dataset(HF_BUILDERS[suffix], data_files={split: name_or_path}, split=split)
    return datasets.load_dataset(name_or_path, split=split)


def iter_hf_documents(dataset, json_key: str = "text") -> Iterator[str]:
    if json_key not in dataset.column_names:
        raise ValueError(f"dataset has no {json_key!r} column (columns: {dataset.column_names}); use --json-key")
    for batch in dataset.iter(batch_size=1000):
        for text in batch[json_key]:
            if not isinstance(text, str):
                raise ValueError(f"dataset column {json_key!r} holds {type(text).__name__}, not strings")
            if text.strip():
                yield text


def open_documents(inputs: Sequence[str] = (), json_key: str = "text", split_lines: bool = False,
                   hf_dataset: Optional[str] = None, hf_split: str = "train") -> tuple[Iterator[str], Optional[int]]:
    """(documents, their number where known) from files or a `datasets` dataset; inputs are checked first."""
    if bool(inputs) == bool(hf_dataset):
        raise ValueError("give input files or an hf dataset (exactly one of the two)")
    if hf_dataset:
        dataset = load_hf_dataset(hf_dataset, hf_split)
        return iter_hf_documents(dataset, json_key), len(dataset)
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file not found: {path}")
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path}: no documents (the file is empty)")
    return (text for path in inputs for text in iter_file_documents(path, json_key, split_lines)), None


_worker_tokenizer = None


def _load_worker_tokenizer(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _encode(texts: list[str]) -> list[list[int]]:
    return _worker_tokenizer(texts, add_special_tokens=False)["input_ids"]


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class PreprocessResult:
    output_prefix: str
    num_documents: int
    num_tokens: int


def preprocess(inputs: Sequence[str], tokenizer_dir: str, output_prefix: str, json_key: str = "text",
               split_lines: bool = False, append_eod: bool = False, workers: int = 1,
               hf_dataset: Optional[str] = None, hf_split: str = "train") -> PreprocessResult:
    """Tokenize `inputs` (or `hf_dataset`) into output_prefix.bin/.idx, one sequence per document."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tokenizer = load_tokenizer(tokenizer_dir)
    eod = eod_token_id(tokenizer)
    documents, num_documents = open_documents(inputs, json_key, split_lines, hf_dataset, hf_split)

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    paths = {suffix: (f"{output_prefix}{suffix}", f"{output_prefix}{suffix}.tmp-{os.getpid()}") for suffix in (".bin", ".idx")}
    builder = IndexedDatasetBuilder(paths[".bin"][1], dtype=DType.optimal_dtype(len(tokenizer)))
    result = PreprocessResult(output_prefix, 0, 0)
    try:
        if workers > 1:
            # The pool processes are the parallelism; Rust threads forked with them could deadlock.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            pool = multiprocessing.Pool(workers, initializer=_load_worker_tokenizer, initargs=(tokenizer_dir,))
        else:
            _load_worker_tokenizer(tokenizer_dir)
            pool = contextlib.nullcontext()
        with pool, tqdm(total=num_documents, desc=f"tokenize -> {output_prefix}", unit="doc") as progress:
            encode = pool.imap if workers > 1 else map  # imap keeps the documents' order
            for batch in encode(_encode, _batches(documents, 256)):
                for ids in batch:
                    ids = ids + [eod] if append_eod else ids
                    builder.add_document(ids, [len(ids)])
                    result.num_tokens += len(ids)
                result.num_documents += len(batch)
                progress.update(len(batch))
        if result.num_documents == 0:
            raise ValueError(f"no documents in {hf_dataset or ', '.join(inputs)}")
        builder.finalize(paths[".idx"][1])
        for final, temporary in paths.values():
            os.replace(temporary, final)
    finally:
        builder.data_file.close()
        for _, temporary in paths.values():
            if os.path.exists(temporary):
                os.remove(temporary)
    return result


def add_document_source_args(parser: argparse.ArgumentParser) -> None:
    """The flags that say where documents come from (shared with tools/train_tokenizer.py)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE", help="text or JSONL (.jsonl/.json) files")
    source.add_argument("--hf-dataset", metavar="NAME_OR_PATH", help="a `datasets` dataset name or local path")
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--json-key", default="text", help="the text field of JSONL records / dataset rows")
    parser.add_argument("--split-lines", action="store_true", help="text files: one document per line")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_document_source_args(parser)
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="HF tokenizer folder (e.g. the teacher's)")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    args = parser.parse_args(argv)
    try:
        result = preprocess(args.input or (), args.tokenizer, args.output_prefix, args.json_key, args.split_lines,
                            args.append_eod, args.workers, args.hf_dataset, args.hf_split)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {result.output_prefix}.bin/.idx: {result.num_documents} documents, {result.num_tokens} tokens")


if __name__ == "__main__":
    main()
