"""Hugging Face folders: write one from a stream of tensors, read one back a tensor at a time.

A HypeNet folder carries its own code (configuration_hypenet.py, modeling_hypenet.py, the Lightning
reference as lightning_naive.py and the Gated DeltaNet op as gated_delta_chunk.py), so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` needs nothing from this repository. A Qwen3 (teacher) folder is a plain transformers folder.
"""

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

import kernels.gated_delta.chunk as gated_delta_chunk
import kernels.lightning.naive as lightning_naive

from .configuration_hypenet import HypeNetConfig
from .modeling_hypenet import HypeNetForCausalLM

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_HERE = Path(__file__).resolve().parent
# destination name -> source file: what a HypeNet folder needs to run without this repository
CODE_FILES = {
    "configuration_hypenet.py": _HERE / "configuration_hypenet.py",
    "modeling_hypenet.py": _HERE / "modeling_hypenet.py",
    "lightning_naive.py": Path(lightning_naive.__file__).resolve(),
    "gated_delta_chunk.py": Path(gated_delta_chunk.__file__).resolve(),
}
AUTO_MAP = {
    "AutoConfig": "configuration_hypenet.HypeNetConfig",
    "AutoModel": "modeling_hypenet.HypeNetModel",
    "AutoModelForCausalLM": "modeling_hypenet.HypeNetForCausalLM",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)

Config = Union[HypeNetConfig, Qwen3Config]


def expected_tensors(config: Config) -> dict:
    """{hf_name: shape} of a complete checkpoint for `config` (lm_head absent when embeddings are tied)."""
    model_class = HypeNetForCausalLM if isinstance(config, HypeNetConfig) else Qwen3ForCausalLM
    with torch.device("meta"):
        model = model_class(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


class _ShardWriter:
    """Writes safetensors shards as they fill, so at most one shard is held in memory."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.shard, self.shard_bytes = {}, 0
        self.files, self.weight_map, self.total_bytes = [], {}, 0

    def add(self, name: str, tensor: torch.Tensor):
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a view into a larger tensor (e.g. a fused QKV) cannot be saved alone
        size = tensor.nbytes
        if self.shard and self.shard_bytes + size > self.max_shard_bytes:
            self.flush()
        self.shard[name] = tensor
        self.shard_bytes += size
        self.total_bytes += size

    def flush(self):
        if not self.shard:
            return
        path = self.directory / f"shard-{len(self.files) + 1:05d}.partial"
        save_file(self.shard, str(path), metadata={"format": "pt"})
        self.files.append(path)
        self.weight_map.update({name: path for name in self.shard})
        self.shard, self.shard_bytes = {}, 0

    def finish(self):
        """Gives the shards their final names: one `model.safetensors`, or numbered shards plus an index."""
        self.flush()
        if len(self.files) == 1:
            self.files[0].rename(self.directory / SINGLE_FILE)
            return
        n = len(self.files)
        final = {path: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, path in enumerate(self.files)}
        for path, name in final.items():
            path.rename(self.directory / name)
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {name: final[path] for name, path in sorted(self.weight_map.items())},
        }
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_hf_folder(
    out_dir: Union[str, os.PathLike],
    config: Config,
    tensors: Iterable[Tuple[str, torch.Tensor]],
    tokenizer_dir: Optional[Union[str, os.PathLike]] = None,
    max_shard_bytes: int = 2**30,
    overwrite: bool = False,
    generation_config: Optional[GenerationConfig] = None,
) -> Path:
    """Writes a Hugging Face folder from `(hf_name, tensor)` pairs, consumed lazily.

    `config` is a `HypeNetConfig` (the folder gets the HypeNet code and an `auto_map`) or a
    `transformers.Qwen3Config` (a plain Qwen3 folder). Every tensor the config needs must come exactly once,
    with its shape; `lm_head.weight` must not come when embeddings are tied. Tokenizer files are copied from
    `tokenizer_dir`; `generation_config.json` is `generation_config`, else `tokenizer_dir`'s (the teacher's
    stop tokens and sampling defaults), else one made from the config's token ids.

    The folder is written beside `out_dir` and renamed into place at the end, so an interrupted export never
    leaves a folder that looks complete. An existing non-empty `out_dir` is replaced only with `overwrite`.
    """
    if not isinstance(config, (HypeNetConfig, Qwen3Config)):
        raise TypeError(f"config must be a HypeNetConfig or a transformers.Qwen3Config, got {type(config).__name__}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out_dir = Path(out_dir)
    _check_destination(out_dir, overwrite)
    tokenizer_dir = None if tokenizer_dir is None else Path(tokenizer_dir)
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} is not a folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        dtype = _write_tensors(tmp, config, tensors, max_shard_bytes)
        _write_config(tmp, config, dtype)
        _write_generation_config(tmp, config, tokenizer_dir, generation_config)
        if isinstance(config, HypeNetConfig):
            for name, source in CODE_FILES.items():
                shutil.copyfile(source, tmp / name)
        if tokenizer_dir is not None:
            _copy_tokenizer(tokenizer_dir, tmp)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_destination(out_dir: Path, overwrite: bool):
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")


def _write_tensors(directory: Path, config: Config, tensors, max_shard_bytes) -> torch.dtype:
    """Streams the tensors into shards, checking names and shapes against the config; returns the
    floating dtype of the checkpoint (recorded in config.json so `dtype="auto"` loads it as written)."""
    expected = expected_tensors(config)
    writer, seen, dtype = _ShardWriter(directory, max_shard_bytes), set(), None
    for name, tensor in tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} was given twice")
        if name not in expected:
            hint = " (embeddings are tied: leave lm_head.weight out)" if name == "lm_head.weight" else ""
            raise ValueError(f"unexpected tensor {name!r} for this config{hint}")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the config expects {expected[name]}")
        if dtype is None and tensor.is_floating_point():
            dtype = tensor.dtype
        seen.add(name)
        writer.add(name, tensor)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{len(missing)} tensors missing from the export, e.g. {missing[:5]}")
    writer.finish()
    return dtype or torch.float32


def _write_config(directory: Path, config: Config, dtype: torch.dtype):
    config = copy.deepcopy(config)
    config.dtype = dtype
    if isinstance(config, HypeNetConfig):
        config.architectures = ["HypeNetForCausalLM"]
        config.auto_map = dict(AUTO_MAP)
    else:
        config.architectures = ["Qwen3ForCausalLM"]
    # Every field written out (not only those differing from defaults): the Megatron side reads this file too.
    config.to_json_file(str(directory / CONFIG_FILE), use_diff=False)


def _write_generation_config(directory: Path, config: Config, tokenizer_dir, generation_config):
    teacher = None if tokenizer_dir is None else tokenizer_dir / GENERATION_CONFIG_FILE
    if generation_config is None and teacher is not None and teacher.is_file():
        shutil.copyfile(teacher, directory / GENERATION_CONFIG_FILE)
        return
    if generation_config is None:
        generation_config = GenerationConfig.from_model_config(config)
    generation_config.save_pretrained(str(directory))


def _copy_tokenizer(tokenizer_dir: Path, directory: Path):
    found = [name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not found:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}")
    for name in found:
        shutil.copyfile(tokenizer_dir / name, directory / name)


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool):
    _check_destination(out_dir, overwrite)  # again: something may have appeared while we wrote
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def iter_hf_tensors(hf_dir: Union[str, os.PathLike]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yields `(name, tensor)` from a Hugging Face folder's safetensors files, one tensor at a time."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"Hugging Face folder {hf_dir} does not exist")
    if not (hf_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{hf_dir} has no {CONFIG_FILE}: not a Hugging Face model folder")
    shards = _shard_files(hf_dir)
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _shard_files(hf_dir: Path) -> list:
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = [hf_dir / name for name in sorted(set(weight_map.values()))]
        missing = [path.name for path in shards if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{hf_dir} is incomplete: {INDEX_FILE} lists missing shards {missing}")
        return shards
    if (hf_dir / SINGLE_FILE).is_file():
        return [hf_dir / SINGLE_FILE]
    raise FileNotFoundError(
        f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints are supported)"
    )
