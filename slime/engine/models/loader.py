"""Reads the tensors of a Hugging Face safetensors checkpoint, sharded or not, one at a time.

    from slime.engine.models.loader import iterate_checkpoint
    model.load_weights(iterate_checkpoint("/path/to/hf-dir"))
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import torch

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path!r} is not a directory")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            weight_map = json.load(open(index))["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from exc
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ValueError(f"{index} names shard files that do not exist: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"checkpoint path {path!r} holds no *.safetensors files (only safetensors are supported)")
    return [os.path.join(path, f) for f in files]


def iterate_checkpoint(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in checkpoint_files(path):
        with safe_open(file, framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
