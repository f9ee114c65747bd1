"""Tensor-by-tensor access to an HF folder's safetensors files (one shard or an indexed set)."""

import json
import os
from typing import Dict, Iterator, Tuple

import torch
from safetensors import safe_open


class SafetensorsFolder:
    """Opens lazily; `get(name)` reads one tensor, so a model never has to fit in memory at once."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"HF model folder {folder} does not exist")
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                self.files: Dict[str, str] = json.load(f)["weight_map"]
        elif os.path.exists(single):
            with safe_open(single, framework="pt") as f:
                self.files = {name: "model.safetensors" for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"{folder} has no model.safetensors or model.safetensors.index.json; save the model with "
                f"`model.save_pretrained(dir, safe_serialization=True)` (pytorch_model.bin is not read)"
            )
        for shard in sorted(set(self.files.values())):
            if not os.path.exists(os.path.join(folder, shard)):
                raise FileNotFoundError(f"{folder}: shard {shard} listed in the index is missing")
        self._open = {}

    def names(self):
        return list(self.files)

    def config(self) -> dict:
        path = os.path.join(self.folder, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: {self.folder} is not an HF model folder")
        with open(path) as f:
            return json.load(f)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"{self.folder} has no tensor {name!r}")
        shard = self.files[name]
        if shard not in self._open:
            self._open[shard] = safe_open(os.path.join(self.folder, shard), framework="pt")
        return self._open[shard].get_tensor(name)

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for name in self.files:
            yield name, self.get(name)
