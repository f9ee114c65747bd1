"""Qwen3/HypeNet HF folders <-> megatron-core dist_checkpointing checkpoints.

Both directions stream one tensor at a time through `qwen3_mapping.mapping_rules`. Checkpoints are
layout-free (dist_checkpointing stores global tensors), so a checkpoint converted once loads at any
TP/PP; `tp`/`pp` are validated against the model here so a bad layout fails at conversion time.
Launched with torchrun, the tensors are spread over the ranks, each holding only its share.
"""

import json
import logging
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint, parallel
from .config import config_from_hf, model_description, read_model_description
from .qwen3_mapping import hf_names, mapping_rules
from .safetensors_folder import SafetensorsFolder

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_EXTRA_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "torch_dtype")


def copy_tokenizer(src: str, dst: str) -> bool:
    files = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(src, f))]
    if not files:
        return False
    if os.path.exists(os.path.join(src, "generation_config.json")):  # the teacher's stop tokens travel along
        files.append("generation_config.json")
    os.makedirs(dst, exist_ok=True)
    for f in files:
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    return True


def description_from_hf(hf: dict, tp: int = 1, pp: int = 1) -> dict:
    cfg = config_from_hf(hf, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if cfg.num_layers % pp:
        raise ValueError(f"{cfg.num_layers} layers cannot be split into {pp} pipeline stages")
    if cfg.num_query_groups % tp:
        raise ValueError(f"{cfg.num_query_groups} KV heads cannot be split over tensor parallel size {tp}")
    return model_description(cfg, hf["vocab_size"], bool(hf.get("tie_word_embeddings", False)),
                             {k: hf[k] for k in HF_EXTRA_KEYS if k in hf})


@parallel.process_group()
def hf_to_mcore(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, dtype: Optional[str] = None) -> str:
    """Converts a Qwen3 (or HypeNet) HF folder into `out_dir/iter_0000000`; returns that path."""
    folder = SafetensorsFolder(hf_dir)
    desc = description_from_hf(folder.config(), tp, pp)
    expected = hf_names(desc)
    missing = sorted(set(expected) - set(folder.names()))
    if missing:
        raise ValueError(f"{hf_dir} lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}; "
                         f"is config.json from the same model as the weights?")
    unused = sorted(set(folder.names()) - set(expected))
    if unused:
        raise ValueError(f"{hf_dir} has {len(unused)} tensors this model does not use, e.g. {unused[:3]}; "
                         f"the config and weights disagree (e.g. tie_word_embeddings)")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    rules = list(mapping_rules(desc))
    mine = {}
    for n, (key, names, to_mcore, _) in enumerate(tqdm(rules, desc="HF -> mcore", disable=rank != 0)):
        if n % world == rank:
            t = to_mcore([folder.get(name) for name in names])
            mine[key] = t.to(DTYPES[dtype]) if dtype else t
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        copy_tokenizer(hf_dir, os.path.join(out_dir, TOKENIZER_DIR))
    return checkpoint.save_global_tensors(out_dir, 0, mine, desc)


def find_tokenizer(path: str) -> Optional[str]:
    for d in (os.path.join(path, TOKENIZER_DIR), os.path.join(os.path.dirname(path.rstrip("/")), TOKENIZER_DIR)):
        if os.path.isdir(d):
            return d
    return None


def hf_config(desc: dict):
    """The HF config of a checkpoint: plain Qwen3 for a teacher, HypeNet (remote code) otherwise."""
    extra = desc.get("hf_extra", {})
    common = dict(
        vocab_size=desc["vocab_size"], hidden_size=desc["hidden_size"], intermediate_size=desc["ffn_hidden_size"],
        num_hidden_layers=desc["num_layers"], num_attention_heads=desc["num_attention_heads"],
        num_key_value_heads=desc["num_query_groups"], head_dim=desc["kv_channels"],
        rms_norm_eps=desc["layernorm_epsilon"], tie_word_embeddings=desc["tie_word_embeddings"],
        max_position_embeddings=extra.get("max_position_embeddings", 32768),
        bos_token_id=extra.get("bos_token_id"), eos_token_id=extra.get("eos_token_id"),
        pad_token_id=extra.get("pad_token_id"),
    )
    teacher = set(desc["layer_pattern"]) == {"A"} and desc["attention_rope"] and desc["attention_query_scale_base"] is None
    if teacher:
        from transformers import Qwen3Config

        return Qwen3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": desc["rope_theta"]})
    from .hf.configuration_hypenet import HypeNetConfig as HFHypeNetConfig
    from .config import HYPENET_FIELDS

    return HFHypeNetConfig(**common, **{k: desc[k] for k in HYPENET_FIELDS})


@parallel.process_group()
def mcore_to_hf(mcore_dir: str, out_dir: str, iteration: Optional[int] = None, dtype: Optional[str] = None,
                overwrite: bool = False) -> str:
    """Exports a teacher or HypeNet checkpoint as an HF folder that `from_pretrained` + `generate()` load."""
    from .hf.export import write_hf_folder

    path = checkpoint.resolve(mcore_dir, iteration)
    desc = read_model_description(path)
    metadata = checkpoint.tensor_metadata(path)
    rules = list(mapping_rules(desc))

    def tensors():
        for key, names, _, to_hf in tqdm(rules, desc="mcore -> HF"):
            for name, t in zip(names, to_hf(checkpoint.load_global_tensor(path, key, metadata))):
                t = t.contiguous()
                yield name, t.to(DTYPES[dtype]) if dtype else t

    tokenizer_dir = find_tokenizer(path)
    if tokenizer_dir is None:
        log.warning("%s has no tokenizer/ folder: the export will have no tokenizer files", path)
    write_hf_folder(out_dir, hf_config(desc), tensors(), tokenizer_dir=tokenizer_dir, overwrite=overwrite)
    return out_dir


def describe(path: str) -> str:
    return json.dumps(read_model_description(checkpoint.resolve(path)), indent=2)
