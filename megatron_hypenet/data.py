"""Trainer data: megatron-core GPT datasets over `tools/preprocess_data.py` output, and a resumable loader.

Samples are dicts of [seq_length] tensors: tokens, labels (tokens shifted by one), loss_mask,
position_ids. Documents are concatenated across EOD tokens as in Megatron-LM pretraining.
"""

import os
from collections import OrderedDict
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split, get_blend_from_list

EOD_TOKEN = "<|endoftext|>"


def load_tokenizer(tokenizer_dir: str):
    """The HF tokenizer of a folder (the teacher's, or `tools/train_tokenizer.py` output)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer folder not found: {tokenizer_dir} (an HF tokenizer folder, e.g. the "
                                f"teacher checkpoint, or one made by `python tools/train_tokenizer.py`)")
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def eod_token_id(tokenizer) -> int:
    """The end-of-document id written between documents.

    `<|endoftext|>` when the vocabulary has it: Qwen3 pretraining separates documents with it,
    while the eos of Qwen3 chat checkpoints is `<|im_end|>`. Otherwise the eos token.
    """
    eod = tokenizer.convert_tokens_to_ids(EOD_TOKEN)
    if eod is not None and eod != tokenizer.unk_token_id:
        return eod
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither {EOD_TOKEN} nor an eos token")
    return tokenizer.eos_token_id


class MegatronTokenizerAdapter:
    """The part of a Megatron tokenizer that GPTDataset reads: eod, vocab_size, unique_identifiers.

    There is no `pad`: GPTDataset then pads partial samples with -1, which can never collide with
    the EOD token (with Qwen3 pad == eod, and Megatron would warn and do the same).
    """

    def __init__(self, eod: int, vocab_size: Optional[int] = None):
        self.eod = eod
        self.vocab_size = vocab_size
        # Part of the dataset cache key: indices built for one tokenizer are not reused for another.
        self.unique_identifiers = OrderedDict(cls=type(self).__name__, eod=eod, vocab_size=vocab_size)


def _preprocess_command(prefix: str) -> str:
    return (f"python tools/preprocess_data.py --input CORPUS.jsonl --json-key text --tokenizer TOKENIZER_DIR "
            f"--output-prefix {prefix} --append-eod")


def _check_prefix(prefix: str, split_matrix, seq_length: int) -> None:
    """Fail early, with the cause in words, where megatron-core would assert or build nothing."""
    for path in (prefix + ".bin", prefix + ".idx"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found. Create {prefix}.bin/.idx with:\n  {_preprocess_command(prefix)}")
    if os.path.getsize(prefix + ".bin") == 0:  # (and an empty .bin cannot be memory-mapped)
        raise ValueError(f"{prefix}.bin/.idx is an empty dataset (no tokens). Recreate it from a non-empty "
                         f"corpus:\n  {_preprocess_command(prefix)}")
    indexed = IndexedDataset(prefix)
    lengths = indexed.sequence_lengths.copy()  # a view of the index mmap, which closes with `indexed`
    del indexed
    for split, bookends in zip(Split, split_matrix):
        if bookends is None:
            continue
        # The document ranges megatron-core's builder gives each split.
        begin, end = (int(round(fraction * len(lengths))) for fraction in bookends)
        num_tokens = int(lengths[begin:end].sum())
        if num_tokens < seq_length + 1:
            raise ValueError(
                f"{prefix}: the {split.name} split has {end - begin} documents and {num_tokens} tokens, fewer than "
                f"seq_length + 1 = {seq_length + 1}: not one sample of that length can be drawn. Use a shorter "
                f"sequence length, more data, or a larger {split.name} share of the split string.")


def build_gpt_datasets(
    data_prefix: Union[str, Sequence[str]],
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: Optional[int] = None,
    tokenizer_dir: Optional[str] = None,
    eod_id: Optional[int] = None,
    split: str = "98,2,0",
    cache_dir: Optional[str] = None,
    test_samples: Optional[int] = None,
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> tuple[Optional[GPTDataset], Optional[GPTDataset], Optional[GPTDataset]]:
    """(train, valid, test) GPTDatasets; a split with weight 0 in `split` is None.

    data_prefix: one PREFIX of PREFIX.bin/.idx, or a Megatron blend list ([w1, p1, w2, p2, ...] or
    [p1, p2, ...]). *_samples None: one epoch of that split. The tokenizer (`tokenizer_dir`) or
    `eod_id` gives the EOD token. Indices are cached under `cache_dir` (megatron-core's default:
    PREFIX/cache/). Under torch.distributed every rank must call this; megatron-core builds on
    rank 0 first, then on the other ranks from its cache.
    """
    if (tokenizer_dir is None) == (eod_id is None):
        raise ValueError("build_gpt_datasets: give exactly one of tokenizer_dir and eod_id")
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
        adapter = MegatronTokenizerAdapter(eod_token_id(tokenizer), len(tokenizer))
    else:
        adapter = MegatronTokenizerAdapter(eod_id)
    prefixes = [data_prefix] if isinstance(data_prefix, str) else list(data_prefix)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=get_blend_from_list(prefixes),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=adapter,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model applies its own causal mask
    )
    for prefix in config.blend[0]:
        _check_prefix(prefix, config.split_matrix, seq_length)
    sizes = [train_samples, valid_samples, test_samples]
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank, config).build()
    train = datasets[0]
    if train is not None and len(train) < train_samples:  # an unweighted blend builds one epoch only
        raise ValueError(f"the train data has {len(train)} samples of {seq_length} tokens, fewer than the "
                         f"{train_samples} requested; give the blend weights or more data")
    return tuple(datasets)


class PretrainingSampler:
    """Megatron-LM's MegatronPretrainingSampler: micro-batch indices for one data-parallel rank.

    Samples are read in order (GPTDataset already shuffled them with its seed), global batch after
    global batch, each split evenly over the ranks; starting at `consumed_samples` resumes a run
    exactly where it stopped. A last incomplete global batch is dropped.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        if total_samples <= 0:
            raise ValueError("the dataset is empty: no samples to load")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} is outside the dataset's {total_samples} samples")
        if micro_batch_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.global_batch = micro_batch_size * dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        for batch_start in range(self.consumed_samples, self.total_samples - self.global_batch + 1, self.global_batch):
            first = batch_start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


def make_dataloader(dataset, micro_batch_size: int, consumed_samples: int, seed: int,
                    dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Deterministic loader of this rank's micro-batches, resuming after `consumed_samples`.

    The sample order is fixed by the dataset (its seeded shuffle); `seed` pins the workers' RNGs so
    anything random downstream of the dataset stays reproducible too.
    """
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
